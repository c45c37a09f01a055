/*
 * wait.h — what every blocking primitive of the sync layer shares: a
 * waiter (a coroutine or a plain thread), FIFO queues of wait nodes, the
 * claim that decides who completes a wait, and the wait itself with an
 * optional deadline.  See chan.c for the claiming protocol.
 */
#ifndef LOOM_SYNC_WAIT_H
#define LOOM_SYNC_WAIT_H

#include <stdbool.h>
#include <stdint.h>

#include "loom/chan.h"
#include "loom/sync.h"
#include "runtime/note.h"
#include "runtime/runtime.h"

struct loom__g;

typedef struct loom__waiter {
  struct loom__g *g;         /* coroutine, or NULL for a plain thread */
  loom__note note;           /* a thread sleeps here */
  _Atomic uint64_t own_word; /* a thread's wait word */
  _Atomic uint64_t *word;    /* &g->wait_word or &own_word */
  uint64_t seq;
  int fired;             /* what completed it (>= 0); -1: the deadline */
  bool exclusive;        /* on one queue, no deadline: claims skip CAS */
  bool handed;           /* mutex: ownership was handed to this waiter */
  bool ok;               /* chan, with fired: transferred (true) or the
                            channel closed; in the waiter, not its node,
                            which the woken coroutine need not read */
  _Atomic int committed; /* the park's commit has finished with the
                            waiter's stack (see wait.c) */
  /* A coroutine's wait, while it lasts (loom__waiter_watch): */
  loom__undo undo;
  const struct loom__abandon *how;
  void *obj;                /* what it waits on */
  struct loom__wnode *node; /* its node there, if it has one */
} loom__waiter;

typedef struct loom__wnode {
  loom__waiter *w;
  struct loom__wnode *next, *prev;
  void *elem;   /* chan: source or destination */
  int idx;      /* chan: case index */
  bool queued;
  bool send;
} loom__wnode;

/*
 * Where a wait's node lives.  On the waiter's stack, `local`, as a rule:
 * nothing to take or give back.  But each stack is a page of its own, and
 * a queue a list through its nodes, so a walk of a long queue — a close
 * waking thousands, a broadcast — is a chain of TLB misses, each address
 * in the node before.  So a coroutine that joins a queue already waited
 * on takes a wait record from its P's cache instead (runtime/wrec.c, Go's
 * sudog cache), packed with the others: such a walk then misses the cache
 * at each node, not the TLB.  (The first in a queue, the only one in most,
 * pays nothing.)  loom__wnode_put gives it back once nothing can touch it:
 * after the wait has returned and its clean-up has taken the node off the
 * queue.  An abandoned wait's record goes with the runtime.  The get
 * runs under the object's spinlock (whether the queue is empty is known
 * only there); once in 64 records or so per P it takes the runtime's
 * list, under a mutex, or allocates a block of them.
 */
_Static_assert(sizeof(struct loom__wnode) <=
                   sizeof(((struct loom__wrec *)0)->body),
               "a wait node fits a wait record's body");
static inline struct loom__wnode *loom__wnode_get(const loom__waiter *w,
                                                  const loom_waitq_ *q,
                                                  struct loom__wnode *local) {
  struct loom__wnode *n =
      w->g != NULL && q->head_ != NULL ? loom__wrec_get() : NULL;
  return n != NULL ? n : local;
}
static inline void loom__wnode_put(struct loom__wnode *n,
                                   const struct loom__wnode *local) {
  if (n != local)
    loom__wrec_put(n);
}

/* The queue type is the public headers' private loom_waitq_ (void
 * pointers to loom__wnode), so sync objects can be declared publicly. */
typedef loom_waitq_ loom__waitq;

/* Spinlocks over plain ints (the public structs hold plain ints), with
 * __atomic builtins. */
void loom__spin_lock_slow(int *l);
/* One round of waiting for another thread to get somewhere: *spins
 * pauses, doubling from 1 up to 64, then a yield of the CPU (the other
 * thread may have lost its own).  Start with *spins = 1. */
void loom__backoff(unsigned *spins);
static inline void loom__spin_lock(int *l) {
  if (__atomic_exchange_n(l, 1, __ATOMIC_ACQUIRE))
    loom__spin_lock_slow(l); /* held: back off there */
}
static inline void loom__spin_unlock(int *l) {
  __atomic_store_n(l, 0, __ATOMIC_RELEASE);
}

/* Inline, as the queue push and the wake below: every wait and wake of
 * the sync layer goes through them, and a call's frame costs as much as
 * their bodies. */
static inline void loom__waiter_init(loom__waiter *w, bool exclusive) {
  /* A coroutine inside loom_block_enter/exit has no P to park on: it
   * waits as a plain thread does, and its thread blocks. */
  loom__m *m = loom__getm();
  w->g = m != NULL && m->p != NULL && m->curg != NULL && !m->curg->is_g0
             ? m->curg
             : NULL;
  w->fired = -1;
  w->exclusive = exclusive;
  w->handed = false;
  if (w->g != NULL) {
    w->word = &w->g->wait_word;
    /* Nobody claims an exclusive waiter by its word, and it has no
     * deadline whose timer a new sequence would fence off. */
    if (exclusive)
      return;
    w->seq = (atomic_load_explicit(w->word, memory_order_relaxed) >> 1) + 1;
  } else {
    loom__note_clear(&w->note);
    w->word = &w->own_word;
    w->seq = 1;
  }
  atomic_store_explicit(w->word, w->seq << 1, memory_order_release);
}

bool loom__waiter_claim(loom__waiter *w);

/*
 * A coroutine's wait may be abandoned by loom_run's end (loom__undo in
 * runtime/runtime.h).  loom__waiter_watch records, on the coroutine's G
 * (g->wait_undo: a coroutine is in one such wait at a time, and a context
 * hook of the wait, on g->undo, is undone before it), how to take it
 * back, until loom__waiter_unwatch (after the wait and the clean-up after
 * it); for a plain thread both do nothing.  Teardown (loom__waiter_undo)
 * then does one of:
 *
 *   withdraw(w): the wait is still pending, and now nobody will complete
 *     it (teardown has claimed the waiter, or it is exclusive): take w's
 *     node(s) off obj's queues and undo what the wait did to obj, as its
 *     deadline would.  An exclusive waiter is claimed by taking its node
 *     off its queue: withdraw returns false, doing nothing, if a waker
 *     has taken it already (loom__waitq_withdraw, loom__waitq_take_back).
 *     Also called for a wait that its deadline or a cancel ended, whose
 *     coroutine never ran to clean up.
 *   give_back(w) (may be NULL): a waker completed the wait (w->fired >=
 *     0) and readied the coroutine, which never ran.  Undo only what the
 *     coroutine would still have done to obj — unlock a lock it was
 *     handed, take its other select cases off their channels.  A
 *     channel's element, a semaphore's unit or a condition's signal
 *     handed to the coroutine is gone with it.
 *
 * Until a waker has readied the G, it may still touch w: teardown waits
 * for that before it looks at w->fired, and before the stack is freed.
 *
 * Every object an abandoned coroutine waits on must be alive until
 * loom_run returns (runtime.h), even if a plain thread has completed
 * that wait meanwhile: a waker cannot know whether teardown took the
 * wait back first (a release, a buffered send or a close returns the
 * same either way), and withdraw locks the object.
 */
typedef struct loom__abandon {
  bool (*withdraw)(loom__waiter *w);
  void (*give_back)(loom__waiter *w);
} loom__abandon;

void loom__waiter_undo(loom__undo *u, struct loom__g *g);

static inline void loom__waiter_watch(loom__waiter *w, const loom__abandon *how,
                                      void *obj, struct loom__wnode *node) {
  if (w->g == NULL)
    return;
  w->how = how;
  w->obj = obj;
  w->node = node;
  w->undo.fn = loom__waiter_undo;
  w->g->wait_undo = &w->undo;
}

static inline void loom__waiter_unwatch(loom__waiter *w) {
  if (w->g != NULL)
    w->g->wait_undo = NULL;
}

static inline void loom__waiter_wake(loom__waiter *w) {
  if (w->g != NULL)
    loom__ready(w->g);
  else
    loom__note_wakeup(&w->note);
}

static inline void loom__waitq_push(loom__waitq *q, loom__wnode *n) {
  loom__wnode *t = q->tail_;
  n->next = NULL;
  n->prev = t;
  if (t != NULL)
    t->next = n;
  else
    q->head_ = n;
  q->tail_ = n;
  n->queued = true;
}

void loom__waitq_push_front(loom__waitq *q, loom__wnode *n);
void loom__waitq_unlink(loom__waitq *q, loom__wnode *n);

/* For a withdraw (loom__abandon): take `lock`, and take n off q, unless
 * n's waiter is exclusive and a waker has taken n off already: then
 * false, with the lock released.  True with the lock held. */
static inline bool loom__waitq_withdraw(int *lock, loom__waitq *q,
                                        loom__wnode *n) {
  loom__spin_lock(lock);
  if (n->w->exclusive && !n->queued) {
    loom__spin_unlock(lock);
    return false;
  }
  loom__waitq_unlink(q, n);
  return true;
}

/* The same, with the lock released either way: a withdraw with nothing
 * to undo under the lock but the node. */
static inline bool loom__waitq_take_back(int *lock, loom__waitq *q,
                                         loom__wnode *n) {
  if (!loom__waitq_withdraw(lock, q, n))
    return false;
  loom__spin_unlock(lock);
  return true;
}

/* The first node whose waiter we can claim, unlinked; NULL if none. */
loom__wnode *loom__waitq_pop_some(loom__waitq *q);
static inline loom__wnode *loom__waitq_pop(loom__waitq *q) {
  return q->head_ != NULL ? loom__waitq_pop_some(q) : NULL;
}

/*
 * Wait until the waiter is claimed.  `release(arg)` drops the caller's
 * locks: for a coroutine once it is off its stack (so a claimant can
 * never find it runnable before it parked), for a thread before it
 * sleeps.  With a deadline (0: none) the waiter may be claimed by its
 * timer; then w->fired stays -1.  Parks.
 */
void loom__waiter_wait(loom__waiter *w, void (*release)(void *arg), void *arg,
                       int64_t deadline);

struct loom_ctx;
/* The same, and a cancel of `ctx` (NULL: none) may claim the waiter too;
 * then w->fired is LOOM__FIRED_CANCEL.  The waiter must not be exclusive
 * when ctx is given. */
#define LOOM__FIRED_CANCEL (-2)
/* A deadline's timer could not get memory (twice): the wait ended at
 * once, and the call reports -ENOMEM. */
#define LOOM__FIRED_NOMEM (-3)
void loom__waiter_wait_ctx(loom__waiter *w, void (*release)(void *arg),
                           void *arg, int64_t deadline, struct loom_ctx *ctx);

/* The same, when the caller holds one spinlock, `lock`, and nothing
 * else: the wait releases it.  A coroutine's wait with neither a deadline
 * nor a context takes the short path, whose commit only drops the lock:
 * nothing on the waiter's stack is touched after that, so the woken
 * coroutine need not wait for the commit to finish. */
void loom__waiter_wait_unlock(loom__waiter *w, int *lock, int64_t deadline,
                              struct loom_ctx *ctx);

/* loom_sema_acquire(_ctx), for a wait that, if abandoned, takes itself
 * back as `how` says, with `obj` (NULL: the semaphore's waitlist): the
 * rwmutex's writer. */
int loom__sema_acquire_how(loom_sema *s, int64_t deadline, struct loom_ctx *ctx,
                           const loom__abandon *how, void *obj);

/* What a wait that was not claimed by a waker reports: -ETIMEDOUT, the
 * context's reason, or -ENOMEM. */
int loom__waiter_err(const loom__waiter *w, struct loom_ctx *ctx);

/* Whether close has begun on c (it is marked before any waiter wakes):
 * for loom_ctx_err, which must not report a cancel before its done
 * channel says so. */
bool loom__chan_closed(loom_chan *c);

#endif
