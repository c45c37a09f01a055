/*
 * pollfd.h — poll descriptors: what a coroutine waiting for an fd parks on.
 *
 * One poll descriptor (pd) per fd the runtime polls.  Each has a read
 * waiter and a write waiter, each a word with one of these values:
 *
 *   PD_NIL    nobody waits and no readiness is pending
 *   PD_READY  readiness arrived with nobody waiting; the next wait
 *             consumes it and returns at once
 *   PD_WAIT   a coroutine is about to park (between its check and the
 *             park's commit)
 *   a G       that coroutine is parked here
 *
 * Transitions (Go's netpollblock / netpollunblock):
 *   waiter:   READY -> NIL (consume, no park)  or  NIL -> WAIT, then in the
 *             park's commit WAIT -> G; if the commit finds READY instead
 *             (the event came between the check and the park), it does
 *             not park.  On wake-up it swaps the word back to NIL and
 *             learns whether it was readiness (READY) or not (NIL: a
 *             deadline, a close — it re-checks which).
 *   notifier: readiness (the poller) moves NIL/WAIT/G -> READY; a
 *             deadline or a close moves WAIT/G -> NIL.  A notifier that
 *             takes a G out of the word makes it runnable.
 * Every step is a CAS on the word, so an event that lands between a
 * coroutine's EAGAIN and its park is never lost, and a G is woken once.
 *
 * Deadlines are absolute loom_now() times kept per direction, with one
 * timer each.  A sequence number, bumped whenever a deadline is changed
 * or the pd is closed, makes a timer that fires late harmless.  Another,
 * bumped on every open, is packed into the poller's event cookie, so an
 * event still in flight for an fd that was closed does not wake the next
 * user of the same pd.
 *
 * Lifetime: pds come from a per-runtime pool and are never freed while the
 * runtime runs (a late event may still point at one).  The owner closes a
 * pd only when no coroutine waits on it any more (loom__pd_evict first
 * wakes any that do).
 */
#ifndef LOOM_NETPOLL_POLLFD_H
#define LOOM_NETPOLL_POLLFD_H

#include <stdbool.h>
#include <stdint.h>

#include "loom/sync.h"
#include "runtime/timer.h"

struct loom__rt;
struct loom__g;

enum { PD_NIL = 0, PD_READY = 1, PD_WAIT = 2 };

typedef struct loom__pd {
  int fd;
  _Atomic uintptr_t rg, wg;   /* the waiter words above */
  _Atomic int lock;           /* spinlock: deadlines, seqs, closing */
  bool closing;               /* evicted: every wait fails with ECLOSED */
  _Atomic bool hangup; /* an event reported the peer's hang-up, an error or
                          urgent data (see loom_read) */
  _Atomic uint32_t fdseq;     /* bumped per open; tags poller cookies */
  _Atomic bool either;        /* write readiness wakes the read waiter too
                                 (loom__pd_either) */
  uint32_t rseq, wseq;        /* bumped per deadline change and close */
  uint32_t rseq_armed, wseq_armed;
  int64_t rd, wd;             /* deadline: 0 none, -1 passed, else time */
  _Atomic unsigned expired;   /* 1: rd is -1, 2: wd is -1 (read unlocked);
                                 4, 8: a read, a write was cut by its
                                 context (loom__pd_cancel_fire), which a
                                 deadline set since does not undo */
  loom__timer rt, wt;
  loom_waitq_ wsleep;         /* loom__pd_sleep's sleepers (sync/wait.h) */
  int slock;                  /* spinlock over wsleep (taken before
                                 `lock` where both are held) */
  struct loom__pd *link;      /* pool free list */
  /* loom_fd_wait's sharing of a foreign fd (fd_wait.c, under its lock):
   * the directions taken ('r' 1, 'w' 2) and the next shared pd. */
  unsigned fdw_dirs;
  struct loom__pd *fdw_next;
  struct loom__rt *owner;
} loom__pd;

/* Take a pd for `fd` and register fd with the poller (edge-triggered,
 * read, write and peer-hang-up).  -errno from epoll_ctl, or -ENOMEM. */
int loom__pd_open(struct loom__rt *rt, int fd, loom__pd **out);
/* Return the pd to the pool, unregistering the fd first when `unregister`
 * (an fd that is closed right after needs no epoll_ctl: closing it drops
 * the registration).  No coroutine may wait on it (evict first if one
 * might). */
void loom__pd_close(loom__pd *pd, bool unregister);
/* Wake every coroutine waiting on pd; later waits fail with LOOM_ECLOSED. */
void loom__pd_evict(loom__pd *pd);
/* From now on a write readiness also wakes the one waiting for 'r' (a
 * wait for either direction, loom_fd_wait's).  True if write readiness
 * came already (then there is no need to wait). */
bool loom__pd_either(loom__pd *pd);
/* And back: a write readiness wakes only the write waiter. */
void loom__pd_either_off(loom__pd *pd);
/* Wait for readiness: mode 'r' or 'w'.  Returns 0 when ready,
 * -ETIMEDOUT when the deadline passed, LOOM_ECLOSED when evicted.
 * Parks.  At most one coroutine waits per direction. */
int loom__pd_wait(loom__pd *pd, int mode);
/* Sleep until `until` (a loom_now() time), for a writer whose fd's
 * readiness cannot say when to try again: an unconnected Unix datagram
 * socket has room per destination (each peer's receive queue), and a
 * send that fails for a full peer reports write space itself (its
 * buffer, allocated and freed), so waiting on readiness would spin.
 * Readiness does not end the sleep; a close, or a change or expiry of
 * the write deadline (a context's cancel too), ends every sleep at once.
 * Any number of coroutines may sleep, apart from the one waiter of
 * loom__pd_wait.  A cancel of `ctx` (NULL: none) ends this sleep alone.
 * 0 (the time came, or the deadline was moved: try again), -ETIMEDOUT,
 * LOOM_ECLOSED, -ENOMEM (no timer), or ctx's reason.  Parks. */
struct loom_ctx;
int loom__pd_sleep(loom__pd *pd, int64_t until, struct loom_ctx *ctx);
/* End every loom__pd_sleep now, as a change of the write deadline
 * would: each sleeper tries again (returns 0).  Any thread. */
void loom__pd_wake(loom__pd *pd);
/* Forget a readiness the poller recorded while nobody waited, just
 * before the system call that takes what it announced: afterwards the
 * recorded readiness means input that came after that call began (but
 * for bytes that land between the two, which the call takes anyway).
 * Only the direction's one waiter calls it. */
void loom__pd_consume(loom__pd *pd, int mode);
/* Whether the deadline of `mode` has passed (a load, no lock): every
 * operation checks it before its first system call, so a passed
 * deadline stops it even when the fd is ready (as Go's prepareRead). */
bool loom__pd_expired(loom__pd *pd, int mode);
/* What loom__pd_wait would fail with right now (0: nothing). */
int loom__pd_check(loom__pd *pd, int mode);
/* Set the deadline of one direction ('r', 'w') or both ('r'+'w'):
 * 0 none, else an absolute loom_now() time (already passed: waiters
 * wake with -ETIMEDOUT).  Any thread.  0, -ENOMEM, or LOOM_ENOTCO for
 * a deadline ahead where there is no P to time it (a thread that is not
 * a coroutine, or inside loom_block_enter/exit). */
int loom__pd_set_deadline(loom__pd *pd, int mode, int64_t deadline);
/* The same with a deadline per direction: rd for reads, wd for writes
 * (each if `mode` has it), under one lock, so a call that fails (also
 * LOOM_ENOTCO) has changed neither. */
int loom__pd_set_deadlines(loom__pd *pd, int mode, int64_t rd, int64_t wd);

/* Expire the deadline of `mode` ('r' or 'w') at once; any thread, no
 * runtime needed.  Waiters wake with -ETIMEDOUT. */
void loom__pd_expire(loom__pd *pd, int mode);
/* The same as context-hook callbacks (arg: the pd). */
void loom__pd_expire_read(void *pd);
void loom__pd_expire_write(void *pd);

/* A context's cancel over one call, that can be undone when the call
 * succeeds all the same (the cancel landed as it completed).  The caller
 * fills pd and mode, fired false, and hooks loom__pd_cancel_fire with
 * the record as its argument; the record must outlive the hook (the
 * caller's frame does: the unhook waits for a running hook).  After the
 * unhook, `fired` says whether the hook ran, and loom__pd_cancel_undo
 * puts back what it changed.
 *
 * Besides expiring the deadline, the hook marks the direction cut: the
 * waits and checks of `mode` fail with -ETIMEDOUT while the mark is set,
 * whatever deadline is set meanwhile, so a deadline another coroutine
 * sets between the cancel and the call's wake-up cannot put the call
 * back to sleep with its context done.  The mark is the call's: at most
 * one call per direction may use a loom__pd_cancel at a time (net's
 * turns), and it ends with loom__pd_cancel_clear or _undo. */
typedef struct loom__pd_cancel {
  loom__pd *pd;
  int mode;     /* 'r' or 'w' */
  bool fired;   /* the hook ran: was and seq are set */
  int64_t was;  /* the deadline the expire overwrote */
  uint32_t seq; /* the direction's sequence number after the expire */
} loom__pd_cancel;
/* The hook: loom__pd_expire, recording into the loom__pd_cancel `x`. */
void loom__pd_cancel_fire(void *x);
/* Undo a fired cancel: put back the deadline it overwrote, unless a
 * change since (a new deadline, another expire, a close) stands in its
 * way.  A deadline that has passed meanwhile is passed, as it would be
 * without the cancel.  On a coroutine, after the unhook.  0, or (the
 * deadline then stays passed) LOOM_ENOTCO for a deadline still ahead
 * inside loom_block_enter/exit, -ENOMEM for no room for its timer. */
int loom__pd_cancel_undo(loom__pd_cancel *x);
/* A fired cancel whose call was cut short and is leaving: remove the
 * mark, and leave the deadline as it is (passed, unless set since).
 * loom__pd_cancel_undo removes it too. */
void loom__pd_cancel_clear(loom__pd_cancel *x);

/* Poller side: readiness for mode 'r', 'w', both ('r'+'w') or neither
 * (0) on the pd behind `cookie`; `hangup` when the event reported the
 * peer's hang-up, an error or urgent data (it sets pd->hangup, which
 * stays set).
 * The Gs it makes runnable are stored at gs[*n...], and *n counts them
 * (at most two per call).  The Gs are not touched. */
void loom__pd_ready(uintptr_t cookie, int mode, bool hangup,
                    struct loom__g **gs, int *n);
/* Whether an event has reported a hang-up, an error or urgent data since
 * the pd was opened. */
bool loom__pd_hungup(loom__pd *pd);
/* The cookie the poller stores with fd's registration. */
uintptr_t loom__pd_cookie(loom__pd *pd);

/* Free every pd of the runtime (at teardown). */
void loom__pd_pool_destroy(struct loom__rt *rt);

#endif
