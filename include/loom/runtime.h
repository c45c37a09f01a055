/*
 * loom/runtime.h — coroutines scheduled M:N over OS threads.
 *
 * A loom program starts with loom_run(), which turns the calling thread
 * into the first of the runtime's worker threads and runs `main_fn` as the
 * main coroutine.  Coroutines (Go's goroutines) are spawned with loom_go();
 * they are stackful, so any function may park (sleep, wait on a channel,
 * wait for a socket) anywhere in its call stack.  loom_run() returns when
 * the main coroutine returns; coroutines still parked or runnable then are
 * abandoned, their stacks freed, and every runtime thread joined.  What an
 * abandoned coroutine was waiting on (a channel, a select's channels, a
 * context, a sync object) is left as if it had given up its wait at that
 * moment: it is off every queue and hook, a mutex or rwmutex it was
 * waiting for counts it no longer, and one it had been handed but had
 * not yet run to take is unlocked again; but a channel element, a
 * semaphore unit or a condition's signal handed to it is gone with it.
 * So an object that outlives the runtime stays usable from plain threads
 * (or a later runtime), and can be freed, cancelled or released once
 * loom_run has returned — not before, even if a plain thread completed
 * the coroutine's wait meanwhile (loom_run may be taking that wait back
 * at the same moment; a wait on freed memory was a bug already).  A
 * loom_run on another thread returns LOOM_ERUNNING until this one has
 * taken every such wait back.  A lock an abandoned coroutine held stays
 * locked.
 *
 * Scheduling follows Go's G/M/P model: `procs` processors (P) each own a
 * run queue; OS threads (M) run coroutines only while they hold a P; idle
 * threads steal work from busy ones.  Scheduling is cooperative: a
 * coroutine runs until it parks, yields, or returns.  A coroutine that runs
 * for more than 10 ms without doing so is reported by the monitor thread,
 * and from then on, with more than one processor, the coroutines queued
 * behind it and the timers on its processor are taken over by the others.
 *
 * Calls that block the thread (file I/O, a foreign library) belong between
 * loom_block_enter() and loom_block_exit() so the processor can be handed
 * to another thread while the call lasts.
 *
 * Thread-local storage: a coroutine may resume on another thread after any
 * call that parks.  The runtime saves and restores errno per coroutine, but
 * a compiler may keep the address of a `__thread` variable (or of errno)
 * in a register across such a call; code that must use thread-local state
 * of a library across a park pins itself with loom_pin(), and coroutine
 * state belongs in loom_local_*().
 *
 * Environment (read by loom_config_init(), so loom_run(.., NULL) honours
 * it): LOOM_PROCS, LOOM_STACK_SIZE (bytes; k/m suffixes), LOOM_SCHEDTRACE
 * (milliseconds between trace lines).  A value that is not a plain
 * decimal number (with k/m for the stack size) is ignored; one that parses
 * but is out of range makes loom_run return -EINVAL.
 */
#ifndef LOOM_RUNTIME_H
#define LOOM_RUNTIME_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "loom/error.h"

#include "loom/common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Runtime configuration.  Zero in a field means "the default". */
typedef struct loom_config {
  /* Number of processors (Ps): coroutines running in parallel.
   * Default: the CPUs this process may run on; env LOOM_PROCS. */
  int procs;
  /* Reserved stack size of a coroutine, in bytes, rounded up to pages.
   * Memory is committed only as the stack is touched.
   * Default 64 KiB; env LOOM_STACK_SIZE.  Minimum 16 KiB. */
  size_t stack_size;
  /* Print a scheduler trace line every `schedtrace_ms` milliseconds
   * through `log`.  Default 0 (off); env LOOM_SCHEDTRACE. */
  int schedtrace_ms;
  /* Warn (through `log`) about a coroutine that runs longer than this
   * without a scheduling point, once per occurrence.  Time its thread
   * spent off the CPU (a loaded machine) does not count.  Default 10 ms;
   * negative: never warn. */
  int64_t long_run_warn_ns;
  /* Where the runtime's messages go (the long-run warning, the trace,
   * "cannot start a thread").  Default: a line on stderr.  `msg` has no
   * trailing newline.  Called from the monitor thread or a scheduler
   * path; must not park.  (A stack overflow is reported straight to
   * stderr from the fault handler, which cannot call back.) */
  void (*log)(void *log_arg, const char *msg);
  void *log_arg;
} loom_config;

/*
 * loom_config_init — fill `cfg` with the defaults, then apply the
 * LOOM_* environment variables.  Never fails.
 */
LOOM_API void loom_config_init(loom_config *cfg);

/*
 * loom_run — start the runtime and run main_fn(arg) as the main coroutine.
 *
 * `cfg` NULL means loom_config_init() defaults.  Blocks the calling thread
 * until main_fn returns, then stops the runtime: coroutines still alive
 * are abandoned (not resumed; their stacks and runtime state are freed),
 * all threads are joined.  A coroutine inside loom_block_enter/exit at that
 * moment is waited for until it leaves the blocking section, and one
 * running on another thread until it reaches a scheduling point.
 * A stack overflow in a coroutine (a touch of the guard page at the bottom
 * of its stack) ends the process with a report on stderr naming the
 * coroutine and where it was spawned.  Before Linux 6.13 (no
 * MADV_GUARD_INSTALL) only the first vm.max_map_count / 8 stacks get a
 * guard page; the others have a canary checked at each switch, which
 * catches an overflow late (docs/runtime.md, "Stacks").
 *
 * Returns 0; LOOM_ERUNNING if a runtime is already running in this
 * process (one at a time); -EINVAL for a bad configuration; -ENOMEM or
 * another negated errno when the runtime cannot start.
 * Must not be called from a coroutine.
 */
LOOM_API int loom_run(void (*main_fn)(void *arg), void *arg, const loom_config *cfg);

/* Per-spawn options for loom_go_with(). */
typedef struct loom_go_opts {
  /* Stack size for this coroutine; 0: the runtime's. Minimum 16 KiB. */
  size_t stack_size;
} loom_go_opts;

/*
 * loom_go — spawn a coroutine running fn(arg).
 *
 * The new coroutine runs soon, on any thread of the runtime.  Callable
 * from a coroutine or from any other thread of the process while a
 * runtime runs (a thread that is not a loom thread hands the coroutine to
 * the global run queue).  Never parks.  `arg` is passed as is; the caller
 * keeps ownership of what it points to.
 *
 * Returns 0; LOOM_ENORUNTIME if no runtime is running (or it is stopping);
 * -ENOMEM if no stack could be had; -EINVAL for a bad option.
 */
LOOM_API int loom_go(void (*fn)(void *arg), void *arg);
LOOM_API int loom_go_with(void (*fn)(void *arg), void *arg, const loom_go_opts *opts);

/*
 * loom_yield — let other runnable coroutines run; the caller stays
 * runnable and resumes after them.  Outside a coroutine: sched_yield().
 */
LOOM_API void loom_yield(void);

/*
 * loom_sleep — park the calling coroutine for at least `ns` nanoseconds
 * (ns <= 0 yields).  loom_sleep_until takes an absolute loom_now() time.
 * Returns 0.  Outside a coroutine the thread sleeps (nanosleep); so does
 * a coroutine's when there is no memory for its timer, as a blocking
 * call (loom_block_enter), so the P goes on.  Parks.
 */
LOOM_API int loom_sleep(int64_t ns);
LOOM_API int loom_sleep_until(int64_t deadline);

/* loom_now — monotonic clock in nanoseconds (CLOCK_MONOTONIC). */
LOOM_API int64_t loom_now(void);

/* loom_id — the calling coroutine's id (1 for the main coroutine, unique
 * for the runtime's life), or 0 outside a coroutine. */
LOOM_API uint64_t loom_id(void);

/* loom_procs — the runtime's number of Ps, or 0 if none is running. */
LOOM_API int loom_procs(void);

/*
 * loom_block_enter / loom_block_exit — bracket a call that may block the
 * thread (disk I/O, getaddrinfo, a foreign library).  If the call lasts
 * longer than about 20 µs, the monitor hands this coroutine's P to another
 * thread so other coroutines keep running; loom_block_exit then takes a P
 * back (possibly parking until one is free).  Entering costs two atomic
 * stores; leaving, one compare-and-swap when the P was not taken.
 * The pair must be balanced and not nested; a coroutine that returns
 * between them (or whose local destructor enters and returns) leaves
 * the section.  Between them the coroutine waits as
 * a plain thread does: loom_sleep, loom_yield, loom_fd_wait and the
 * waits of channels, select, mutexes, semaphores, wait groups and
 * condition variables block the thread (the P is handed on meanwhile);
 * socket calls (read, write, accept, dial and the packet calls) fail
 * there with LOOM_ENOTCO (net.h), since they would park.
 * Outside a coroutine they do nothing.  The other thread may have
 * to be created: if that fails (no memory, no threads), the monitor
 * tries again every few milliseconds, and until it succeeds the P's
 * coroutines wait — so a call that waits for one of them can only end
 * once memory comes back.
 */
LOOM_API void loom_block_enter(void);
LOOM_API void loom_block_exit(void);

/*
 * loom_pin / loom_unpin — wire the calling coroutine to its current OS
 * thread (Go's LockOSThread): until unpinned it runs only on this thread,
 * and the thread runs nothing else.  For libraries that keep thread-local
 * state across calls.  Calls nest: the coroutine is unpinned when every
 * loom_pin has its loom_unpin.  A coroutine that returns while pinned is
 * unpinned.  loom_pin returns 0, or LOOM_ENOTCO outside a coroutine.
 */
LOOM_API int loom_pin(void);
LOOM_API void loom_unpin(void);

/*
 * Coroutine-local storage.  A key is created once (any thread) and then
 * names one pointer-sized slot in every coroutine, initially NULL.
 * When a coroutine returns, `dtor` (if not NULL) is called on its
 * non-NULL value, on that coroutine.  A destructor may set values again;
 * they are destroyed in further rounds, at most 4 in all (as POSIX's
 * PTHREAD_DESTRUCTOR_ITERATIONS): a value still set after the 4th is
 * dropped without its destructor.  Coroutines abandoned at shutdown do
 * not run destructors; the runtime frees its own storage only.
 * At most LOOM_LOCAL_KEYS keys exist in a process.
 */
#define LOOM_LOCAL_KEYS 128
typedef struct loom_local_key {
  unsigned idx;
} loom_local_key;

/* Returns 0, or -EAGAIN when all keys are taken. Thread-safe. */
LOOM_API int loom_local_key_create(loom_local_key *key, void (*dtor)(void *value));
/* Returns 0; LOOM_ENOTCO outside a coroutine; -ENOMEM; -EINVAL bad key. */
LOOM_API int loom_local_set(loom_local_key key, void *value);
/* The calling coroutine's value, or NULL (also outside a coroutine). */
LOOM_API void *loom_local_get(loom_local_key key);

/* A snapshot of the scheduler, as LOOM_SCHEDTRACE prints it. */
typedef struct loom_stats {
  int procs;             /* Ps */
  int idle_procs;        /* Ps with no M */
  int threads;           /* Ms created, including the one running loom_run */
  int idle_threads;      /* Ms parked with nothing to do */
  int spinning_threads;  /* Ms looking for work */
  uint64_t global_runq;  /* coroutines in the global run queue */
  uint64_t coroutines;   /* coroutines alive (spawned, not yet returned) */
  uint64_t spawned;      /* coroutines spawned so far */
  uint64_t steals;       /* successful steals from another P's queue */
  uint64_t netpoll_wakeups; /* times a thread blocked in the poller woke */
} loom_stats;

/* Fill `out`; returns 0 or LOOM_ENORUNTIME.  Thread-safe; never parks. */
LOOM_API int loom_stats_get(loom_stats *out);

#ifdef __cplusplus
}
#endif
#endif /* LOOM_RUNTIME_H */
