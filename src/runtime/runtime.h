/*
 * runtime.h — the scheduler's data structures: G, M, P and the runtime.
 *
 * Vocabulary (Go's):
 *   G  a coroutine.  Lives in the top bytes of its own stack slot, so a
 *      parked coroutine costs the stack pages it touched and nothing else.
 *   M  an OS thread.  Runs Gs only while it holds a P.  Each M has a g0:
 *      the thread's own stack, where the scheduler loop runs when the M
 *      has nothing better to switch to.
 *   P  a processor: the right to run Gs, plus a run queue, a timer heap,
 *      a free-G cache and spare wait records (wrec.c).  `procs` of them.
 *
 * Locking: rt->lock (a mutex) protects the global run queue, the idle-P
 * and idle-M lists, and M creation.  Each P's run queue is lock-free
 * (one producer, the owner; many consumers, the owner and thieves).  Each
 * P's timer heap has its own spinlock.  Nothing blocks while holding a
 * lock, and no G switch happens while one is held.
 *
 * Thread-local state is reached only through loom__getm(), which the
 * compiler cannot cache across a switch (see proc.c).
 */
#ifndef LOOM_RUNTIME_RUNTIME_H
#define LOOM_RUNTIME_RUNTIME_H

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "arch/switch.h"
#include "loom/runtime.h"
#include "netpoll/netpoll.h"
#include "runtime/note.h"
#include "runtime/stack.h"
#include "runtime/timer.h"

/* sanitizer/valgrind helpers */
#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define LOOM_ASAN 1
#endif
#if __has_feature(thread_sanitizer)
#define LOOM_TSAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) && !defined(LOOM_ASAN)
#define LOOM_ASAN 1
#endif
#if defined(__SANITIZE_THREAD__) && !defined(LOOM_TSAN)
#define LOOM_TSAN 1
#endif

/* An object of a higher layer (a socket) that the runtime frees if it is
 * still alive at shutdown, when the coroutines that would have closed it
 * are abandoned.  `abandon` releases its resources without parking. */
typedef struct loom__rtobj {
  struct loom__rtobj *prev, *next;
  void (*abandon)(struct loom__rtobj *o);
} loom__rtobj;

typedef struct loom__g loom__g;
typedef struct loom__m loom__m;
typedef struct loom__p loom__p;
typedef struct loom__rt loom__rt;

#define LOOM_RUNQ_SIZE 256
#define LOOM_PCACHE 64 /* free Gs a P keeps; half spill when full */
#define LOOM_STALL_NS 10000000 /* see steal_stalled in proc.c */
#define LOOM_RUNNEXT_STREAK 32 /* see loom__runq_get in runq.c */

/*
 * G states.  Who owns the G in each:
 *   G_IDLE      in a free cache; nobody runs it.  Its slot may be reused.
 *   G_RUNNABLE  on a run queue (or about to be); the queue owns it.
 *   G_RUNNING   an M is executing it; only that M touches its context.
 *   G_WAITING   parked; whoever holds the wake-up (a timer, a wait queue)
 *               owns it and makes it runnable with loom__ready(), which is
 *               the only legal way out of this state.
 *   G_DEAD      returned; the M that switched away from it recycles it.
 * A G enters G_WAITING only after its context is saved (in the post-switch
 * action), so a waker can never run a G whose registers are not on its
 * stack yet.
 */
enum {
  G_IDLE = 0,
  G_RUNNABLE,
  G_RUNNING,
  G_WAITING,
  G_DEAD,
};

struct loom__g {
  loom__ctx ctx;            /* saved stack pointer while not running */
  _Atomic uint32_t status;  /* G_*; atomic: a waker CASes it */
  bool custom_stack;        /* own mapping (loom_go_with stack size) */
  bool is_g0;               /* an M's scheduler stack */
  bool is_main;             /* loom_run's coroutine: its return stops all */
  uint64_t id;              /* 0 for g0 */
  void (*fn)(void *);
  void *arg;
  loom__g *schedlink;       /* lists of ready Gs handed between layers */
  loom__stack stk;          /* the stack this G runs on */
  loom__m *lockedm;         /* pinned to this M (loom_pin), or NULL */
  uint32_t lockcount;       /* loom_pin nesting */
  int err;                  /* errno while switched out */
  uint32_t io_streak;       /* I/O calls in a row that did not park */
  _Atomic uint64_t wait_word; /* chan waits: seq << 1 | claimed */
  struct loom__undo *wait_undo; /* its sync wait's undo (loom__undo) */
  uint64_t wait_timer_seq;  /* the seq its deadline timer may claim */
  void **locals;            /* loom_local slots, allocated on first set */
  const void *spawn_pc;     /* return address of the loom_go call */
  const char *wait_reason;  /* why it is parked, for the debugger */
  void (*park_hook)(void *arg); /* run once as this G next stops running
                                   for a while (loom__park_hook_set); in
                                   the line every park writes */
  void *park_hook_arg;
  loom__timer timer;        /* loom_sleep's timer */
  void *asan_fake;          /* ASan fake-stack handle while switched out */
  void *tsan_fiber;         /* TSan fiber of this G */
  loom__g *alllink;         /* live custom-stack Gs, doubly linked (arena */
  loom__g *allprev;         /* Gs are found by walking the arenas) */
  void *cb_tag;             /* the engine: whose session callbacks this G
                               is running (loom__cb_tag), or NULL */
  void *pool_tag;           /* the engine: the task pool this G is a
                               worker of (loom__pool_tag), or NULL */
  struct loom__undo *undo;  /* what else it left elsewhere (loom__undo) */
};

/* Post-switch action: run by whichever context a switch lands in, on the
 * same M, once the G that switched away has its context saved. */
typedef void (*loom__post_fn)(loom__m *m, loom__g *prev, void *arg);

struct loom__m {
  uint64_t id;
  loom__rt *rt;
  loom__g g0;               /* scheduler context: this thread's stack */
  int *errno_addr;          /* this thread's errno (saved and restored
                               around every switch without a call) */
  loom__g *curg;            /* G running on this M (g0 when scheduling) */
  loom__p *p;               /* P held, or NULL */
  loom__p *nextp;           /* P handed over by whoever woke this M */
  loom__p *oldp;            /* P held before loom_block_enter */
  loom__g *lockedg;         /* G pinned to this M, or NULL */
  loom__g *handoff;         /* pinned G found by the fast path, for g0 */
  bool spinning;            /* looking for work; counted in nmspinning */
  bool in_block;            /* between loom_block_enter and _exit */
  loom__note park;          /* idle Ms sleep here */
  loom__m *link;            /* idle-M list */
  loom__m *alllink;         /* all Ms */
  pthread_t thread;
  bool is_m0;               /* the thread that called loom_run */
  uint32_t fastrand;
  loom__post_fn post_fn;
  loom__g *post_g;
  void *post_arg;
  /* Timers the fast path found due, run after the switch (proc.c). */
  bool timers_due;          /* this P's */
  loom__p *stalled_timers;  /* a stalled P's */
  int cpuclock;             /* this thread's CPU-time clockid */
  void *sigstack;           /* alternate signal stack */
  size_t sigstack_size;
  stack_t old_sigstack; /* the thread's own before ours (m0: the
                           caller's, put back when loom_run ends) */
};

enum {
  P_IDLE = 0,  /* on the idle list, no M */
  P_RUNNING,   /* held by an M */
  P_BLOCKED,   /* its M is in loom_block_enter; sysmon may retake it */
};

struct loom__p {
  int id;
  _Atomic uint32_t status;       /* P_*; CAS by the M and by sysmon */
  loom__p *link;                 /* idle-P list */
  _Atomic uint32_t schedtick;    /* +1 per G switched in; sysmon reads */
  _Atomic uint32_t timer_mask;   /* the fast path looks at timers when
                                    schedtick & timer_mask is 0: 7, or 0
                                    while sysmon says this P switches
                                    slowly with a timer set */
  /* Gs spawned and exited on this P: written by the owner only (no
   * shared cache line per spawn), summed by loom__gcount for stats. */
  _Atomic uint64_t nspawned, nexited;
  _Atomic uint32_t blocktick;    /* +1 per block section; sysmon reads */
  /* Id and spawn site of the G running on this P (0: none), for
   * sysmon's long-run warning.  Copies, so sysmon never reads a G. */
  _Atomic uint64_t run_id;
  _Atomic(const void *) run_pc;
  loom__rt *rt;

  /* Lock-free ring: the owner puts at tail, anyone takes at head.  Slots
   * are atomics because a thief may read a slot the owner overwrites
   * (its CAS on head then fails). */
  _Atomic uint32_t runqhead;
  _Atomic uint32_t runqtail;
  _Atomic(loom__g *) runq[LOOM_RUNQ_SIZE];
  _Atomic(loom__g *) runnext;    /* run next, ahead of runq */
  uint32_t next_streak;          /* Gs in a row from runnext; owner only */
  bool sole;                     /* the runtime's only P: nobody steals */

  /* Free-G cache, owner only.  Arrays, not lists through the Gs: each
   * G sits in its own stack page, and walking a list of them is a TLB
   * miss per node. */
  loom__g *gfree[LOOM_PCACHE];
  int ngfree;
  struct loom__wrec *wrec_free; /* spare wait records (wrec.c), owner */
  int nwrec;
  uint64_t goid_next, goid_end;  /* batch of G ids, owner only */

  loom__timers timers;

  /* sysmon's private bookkeeping */
  uint32_t sm_schedtick;
  uint32_t sm_runtick; /* schedtick at sysmon's stuck_behind */
  uint32_t sm_timertick; /* schedtick at sysmon's watch_timers */
  int64_t sm_timerwhen;  /* and when */
  int64_t sm_schedwhen;
  int64_t sm_cpu0;               /* holder's CPU time at half the limit */
  _Atomic int mclock;            /* CPU-time clock of the M holding it */
  uint32_t sm_blocktick;
  int64_t sm_blockwhen;
  bool sm_warned;

  /* Owner only: what this P last saw of every P (indexed by id), to find
   * one that stalls with Gs queued (see steal_stalled in proc.c). */
  struct loom__pwatch {
    uint32_t tick;               /* the other P's schedtick */
    int64_t since;               /* since when it has not moved (0: moving) */
  } watch[];
};

struct loom__rt {
  loom_config cfg;
  int nprocs;
  loom__p **allp;

  pthread_mutex_t lock;          /* protects the fields down to `mcount` */
  loom__g **gq;                  /* global run queue: a ring of */
  uint64_t gq_head, gq_cap, gq_len; /* gq_len Gs from gq_head, */
  loom__g *gq_spill, *gq_spill_tail; /* then a list through schedlink,
                                    used only when the ring cannot grow */
  loom__p *pidle;                /* idle Ps */
  loom__m *midle;                /* idle Ms */
  int nmidle;
  loom__m *allm;
  int mcount;
  bool newm_failing;           /* said so once; under lock */

  _Atomic uint64_t runqsize;     /* global queue length, read lock-free */
  _Atomic int npidle;
  _Atomic int nmspinning;
  _Atomic int nmidle_pub;        /* copy of nmidle for stats */
  _Atomic int mcount_pub;

  _Atomic bool stopping;         /* main returned: every M winds down */
  _Atomic uint64_t goidgen;
  /* Gs spawned and exited without a P (foreign threads, inside
   * loom_block_enter/exit); the rest are counted per P. */
  _Atomic uint64_t nspawned_nop, nexited_nop;
  _Atomic uint64_t steals;
  _Atomic uint64_t mnext;        /* M id generator */

  loom__stacks stacks;           /* arenas and the global free-G list */

  loom__netpoll np;
  _Atomic int64_t lastpoll;      /* 0 while an M blocks in the poller */
  _Atomic int64_t polluntil;     /* that M's wake-up time (0: none) */
  _Atomic uint64_t netpoll_waiters;
  _Atomic uint64_t netpoll_wakeups;
  pthread_mutex_t objs_lock;     /* live objects of higher layers */
  loom__rtobj *objs;
  pthread_mutex_t wrec_mu; /* the wait records' blocks, spares */
  struct loom__wrec_block *wrec_blocks;
  struct loom__wrec *wrec_free;
  int nwrec_free;
  pthread_mutex_t pd_lock;       /* the poll-descriptor pool */
  struct loom__pd *pd_free;
  struct pd_block *pd_blocks;
  struct loom__pd *fdw_pds; /* foreign fds loom_fd_wait waits on */

  pthread_t sysmon;
  bool sysmon_started;
  loom__note sysmon_note;
  _Atomic bool sysmonwait;       /* sysmon sleeps until woken (every P
                                    idle): a P leaving the list wakes it */
  _Atomic bool sysmonslow;       /* sysmon sleeps longer than a retake
                                    round: a blocking call wakes it */
  _Atomic uint64_t sysmon_rounds; /* for the tests */

  _Atomic int foreign_users;     /* foreign threads inside loom_go */
  int64_t start_time;

  /* Timers armed by threads that hold no P (a foreign thread, an M
   * inside loom_block_enter/exit): no P's heap is theirs to add to.
   * Every M runs this heap's due timers where it runs its own P's, and
   * the poller sleeps until its earliest too.  nop_timers_mu orders the
   * adders (a reserve and its add, as a P's owner does alone); running
   * and stopping take only the heap's own lock. */
  pthread_mutex_t nop_timers_mu;
  loom__timers nop_timers;
};

/*
 * The M running this thread, or NULL.  A G may resume on another thread
 * than the one it parked on, so the compiler must never keep the
 * thread's address (or anything derived from it) across a call that may
 * switch (see proc.c).  On x86_64 each call reads %fs afresh in a
 * volatile asm with a memory clobber, which the compiler can neither
 * merge with another read nor move across a call; the variable uses the
 * initial-exec model (one GOT load, no __tls_get_addr).  Elsewhere it is
 * a call the optimizer cannot see through.
 */
#if defined(__x86_64__)
extern __thread loom__m *loom__tls_m
    __attribute__((visibility("hidden"), tls_model("initial-exec")));
static inline loom__m *loom__getm(void) {
  loom__m *m;
  __asm__ volatile("movq loom__tls_m@gottpoff(%%rip), %0\n\t"
                   "movq %%fs:(%0), %0"
                   : "=r"(m)
                   :
                   : "memory");
  return m;
}
#else
loom__m *loom__getm(void);
#endif
/* The running runtime, or NULL. */
loom__rt *loom__rt_get(void);

/* Make a parked G runnable (from any thread, any context). */
void loom__ready(loom__g *g);
/* Park the running G: after its context is saved, `commit(g, arg)` runs;
 * if it returns false the G is made runnable again at once.  `commit`
 * must not park.  Returns when the G is readied. */
void loom__park(bool (*commit)(loom__g *g, void *arg), void *arg,
                const char *reason);
/* The G running on this thread, or NULL outside a coroutine. */
static inline loom__g *loom__getg(void) {
  loom__m *m = loom__getm();
  if (m == NULL || m->curg == NULL || m->curg->is_g0)
    return NULL;
  return m->curg;
}

/*
 * errno of the thread running the caller, read afresh.  glibc declares
 * __errno_location() const, so a compiler may compute errno's address
 * once per function and keep it across a call that parks, after which
 * the coroutine can be running on another thread: a later `errno` then
 * reads (or writes) the old thread's.  Code that may have parked since
 * it began reads errno with this; the M's errno address comes through
 * loom__getm(), which is never merged across a call.
 */
static inline int loom__errno(void) {
  loom__m *m = loom__getm();
  return m != NULL ? *m->errno_addr : errno;
}

/* t + ns for t, ns >= 0, saturated at INT64_MAX: a timeout too large
 * to add is "never", not a time in the past.  loom__after: from now. */
static inline int64_t loom__sat_add(int64_t t, int64_t ns) {
  return ns > INT64_MAX - t ? INT64_MAX : t + ns;
}
static inline int64_t loom__after(int64_t ns) {
  return loom__sat_add(loom_now(), ns);
}

/* A tag the engine puts on a coroutine while it runs callbacks of an
 * owner's sessions (a server's or a client's), so that closing that
 * owner from inside one of them can tell.  NULL outside coroutines. */
static inline void *loom__cb_tag(void) {
  loom__g *g = loom__getg();
  return g != NULL ? g->cb_tag : NULL;
}

static inline void loom__cb_tag_set(void *tag) {
  loom__g *g = loom__getg();
  if (g != NULL)
    g->cb_tag = tag;
}

/* The task pool the calling coroutine is a worker of, or NULL: a worker
 * must not wait for what only the pool's workers can run. */
static inline void *loom__pool_tag(void) {
  loom__g *g = loom__getg();
  return g != NULL ? g->pool_tag : NULL;
}

static inline void loom__pool_tag_set(void *pool) {
  loom__g *g = loom__getg();
  if (g != NULL)
    g->pool_tag = pool;
}

/*
 * What a waiting coroutine has left where other threads find it — a wait
 * node on a channel's or a mutex's queue, a hook on a context — and how to
 * take it back.  A coroutine abandoned by loom_run (parked, or readied
 * and never run again) never takes back what it left, and what it left
 * lives on its stack, which the runtime's end frees; the objects may
 * outlive the runtime.  So a wait records an undo on its G for as long
 * as it lasts, and the runtime's end runs the records of every abandoned
 * G before it frees a stack: those of g->undo newest first
 * (loom__undo_push before the coroutine parks, loom__undo_pop once it
 * has taken everything back), then g->wait_undo, the one wait of the
 * sync layer a coroutine can be in, which is on every channel operation's
 * path and so is one store to set and one to clear (sync/wait.h).
 * They run on the thread that called loom_run, with every M joined, the
 * runtime still current but stopping (a plain thread's wake-up changes
 * a G's status and nothing else; no other loom_run starts) and no
 * runtime lock held; plain threads may be using the same objects.  Only
 * the G's own code touches the list, and then teardown.
 */
typedef struct loom__undo {
  void (*fn)(struct loom__undo *u, loom__g *g);
  struct loom__undo *next;
} loom__undo;

static inline void loom__undo_push(loom__g *g, loom__undo *u) {
  u->next = g->undo;
  g->undo = u;
}

/* Take u off g's list (a no-op if it is not there: teardown takes each
 * record off before it runs it). */
static inline void loom__undo_pop(loom__g *g, loom__undo *u) {
  for (loom__undo **pp = &g->undo; *pp != NULL; pp = &(*pp)->next)
    if (*pp == u) {
      *pp = u->next;
      return;
    }
}

/*
 * A function the running coroutine wants run, once, the next time it
 * stops running for a while: as it parks (loom__park), or as it enters
 * a blocking section (loom_block_enter) — the way Linux flushes a
 * task's plugged I/O when the task goes to sleep (blk_flush_plug in
 * schedule).  NULL clears it; a new coroutine starts without one.  The
 * engine's reader sets one while it holds replies back to send them
 * together (session.c, corking), so that a callback that parks does not
 * hold them up.
 *
 * `fn(arg)` runs on the coroutine, inside loom__park before it switches
 * away: with whatever the parking primitive holds (a channel's or a
 * mutex's spinlock, a loom_cond's mutex).  So it must not park, nor take
 * a lock a parking primitive may hold — it may start a coroutine
 * (loom_go) to do such work, and little else.  In a blocking section,
 * before the P is given up.  Outside a coroutine: nothing.
 */
static inline void loom__park_hook_set(void (*fn)(void *), void *arg) {
  loom__g *g = loom__getg();
  if (g != NULL) {
    g->park_hook = fn;
    g->park_hook_arg = arg;
  }
}
/* Run and clear g's park hook (loom__park, loom_block_enter). */
void loom__park_hook_run(loom__g *g);

void loom__rt_track(loom__rt *rt, loom__rtobj *o);
void loom__rt_untrack(loom__rt *rt, loom__rtobj *o);

/* Called by I/O operations that completed without parking.  A coroutine
 * whose socket is always ready (an accept loop under a connection storm,
 * a fast stream) would otherwise never reach a scheduling point: every
 * 64th such call yields. */
#define LOOM_IO_STREAK 64
void loom__io_progress(void);

/* Scheduler pieces shared between proc.c, block.c and sysmon.c. */
void loom__handoffp(loom__rt *rt, loom__p *p);
void loom__startm(loom__rt *rt, loom__p *p, bool spinning);
void loom__wakep(loom__rt *rt);
void loom__wake_netpoller(loom__rt *rt, int64_t when);
/* Make Gs readied by the poller runnable, on the global queue. */
void loom__inject(loom__rt *rt, loom__g *const *gs, int n);
loom__p *loom__pidleget(loom__rt *rt); /* rt->lock held */
void loom__acquirep(loom__m *m, loom__p *p);
void loom__switch_to_g0(loom__m *m, loom__g *g, loom__post_fn fn, void *arg);
int loom__mutex_init(pthread_mutex_t *mu);
int64_t loom__earliest_timer(loom__rt *rt); /* 0: no timer anywhere */
/*
 * Arming up to n timers from any thread: loom__arm_begin finds the heap
 * and makes room in it, so that the adds cannot fail.  On a thread that
 * holds a P that is the P's own heap (only its owner adds there);
 * elsewhere (a plain thread, a coroutine inside loom_block_enter/exit)
 * the runtime's heap for threads without a P, locked until
 * loom__arm_end, with the runtime kept from being torn down meanwhile.
 * 0, LOOM_ENORUNTIME or -ENOMEM.  loom__arm_end(a, when): `when` is the
 * earliest deadline added (0: none), for which an M is woken.
 */
typedef struct loom__arm {
  loom__rt *rt;
  loom__timers *heap; /* where to loom__timer_add */
  bool nop;           /* the runtime's no-P heap, held */
} loom__arm;
int loom__arm_begin(loom__arm *a, int n);
void loom__arm_end(loom__arm *a, int64_t when);
/* loom__timer_stop from any thread, while a runtime runs or after: a
 * thread without an M holds the lock the runtime's end destroys its
 * timer heaps under, so the heap it finds is not taken apart or freed
 * meanwhile. */
bool loom__timer_stop_any(loom__timer *t);
const char *loom__symbolize(const void *pc, char *buf, size_t len);
void loom__log(loom__rt *rt, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* A cheap pseudo-random number, from the calling M's own state (no
 * shared line), or the thread's outside the runtime. */
uint32_t loom__fastrand(void);

/* A cheap pseudo-random number in [0, n), n > 0: the high half of a
 * 32 × 32-bit product (Go's fastrandn), where `%` would divide.  Biased
 * by at most n / 2^32. */
static inline uint32_t loom__fastrandn(uint32_t n) {
  return (uint32_t)(((uint64_t)loom__fastrand() * n) >> 32);
}

/* Gs spawned so far, and Gs alive (spawned and not returned): sums over
 * the Ps, for stats; a snapshot, not exact while Gs come and go. */
uint64_t loom__spawned(loom__rt *rt);
uint64_t loom__gcount(loom__rt *rt);

/* Run queues (runq.c). */
void loom__runq_put(loom__rt *rt, loom__p *p, loom__g *g, bool next);
loom__g *loom__runq_get(loom__p *p);
bool loom__runq_empty(loom__p *p);
uint32_t loom__runq_len(loom__p *p);
/* Moves up to half of victim's queue to p's tail: p's ring must have room
 * for half a ring (at most LOOM_RUNQ_SIZE / 2 queued).  With an empty
 * ring, `next` says whether to take victim's runnext too: */
enum loom__steal_next {
  LOOM__STEAL_RING,     /* no */
  LOOM__STEAL_NEXT,     /* yes, after a moment if victim runs (runq.c) */
  LOOM__STEAL_NEXT_NOW, /* yes: victim is stuck in one G */
};
loom__g *loom__runq_steal(loom__p *p, loom__p *victim,
                          enum loom__steal_next next);
void loom__globrunq_put(loom__rt *rt, loom__g *g);      /* lock held */
/* The global queue's first ring (1024 Gs), made with the runtime: the
 * scheduler allocates nothing unless more are queued at once.  -ENOMEM. */
int loom__globrunq_init(loom__rt *rt);
void loom__globrunq_putbatch(loom__rt *rt, loom__g *const *gs,
                             uint64_t n);               /* lock held */
loom__g *loom__globrunq_get(loom__rt *rt, loom__p *p, int max); /* held */

/* Wait records (wrec.c): blocks of LOOM__WREC_SIZE bytes, aligned to
 * it, from the P's cache, for the node of a coroutine's wait (sync/wait.h).
 * loom__wrec_get needs a P (NULL without one, or without memory); put
 * from any coroutine.  All are freed when the runtime ends. */
#define LOOM__WREC_SIZE 64
#define LOOM__WREC_PCACHE 128 /* a P's spares; half go back past that */
struct loom__wrec {
  /* What its user keeps there: ASan poisons all of it while spare. */
  char body[LOOM__WREC_SIZE - sizeof(struct loom__wrec *)];
  struct loom__wrec *next; /* while spare */
};
void *loom__wrec_get_slow(void);
void loom__wrec_put_slow(void *r);
void loom__wrec_destroy(loom__rt *rt);

static inline void *loom__wrec_get(void) {
#ifndef LOOM_ASAN /* which poisons spares: the slow path unpoisons */
  loom__m *m = loom__getm();
  loom__p *p = m != NULL ? m->p : NULL;
  struct loom__wrec *r = p != NULL ? p->wrec_free : NULL;
  if (r != NULL) {
    p->wrec_free = r->next;
    p->nwrec--;
    return r;
  }
#endif
  return loom__wrec_get_slow();
}

static inline void loom__wrec_put(void *x) {
#ifndef LOOM_ASAN
  loom__m *m = loom__getm();
  loom__p *p = m != NULL ? m->p : NULL;
  if (p != NULL && p->nwrec < LOOM__WREC_PCACHE) {
    struct loom__wrec *r = x;
    r->next = p->wrec_free;
    p->wrec_free = r;
    p->nwrec++;
    return;
  }
#endif
  loom__wrec_put_slow(x);
}

/* sysmon (sysmon.c). */
int loom__sysmon_start(loom__rt *rt);
void loom__sysmon_wake(loom__rt *rt);
void loom__sysmon_stop(loom__rt *rt);

/* coroutine-local storage (local.c): run destructors, free the slots. */
void loom__locals_destroy(loom__g *g, bool run_dtors);

#define LOOM_NORETURN __attribute__((noreturn))
LOOM_NORETURN void loom__throw(const char *msg);

#endif /* LOOM_RUNTIME_RUNTIME_H */
