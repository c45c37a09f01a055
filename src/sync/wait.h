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
  _Atomic int committed; /* the park's commit has finished with the
                            waiter's stack (see wait.c) */
} loom__waiter;

typedef struct loom__wnode {
  loom__waiter *w;
  struct loom__wnode *next, *prev;
  void *elem;   /* chan: source or destination */
  int idx;      /* chan: case index */
  bool success; /* chan: transferred (true) or closed */
  bool queued;
  bool send;
} loom__wnode;

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
    w->seq = (atomic_load(w->word) >> 1) + 1;
  } else {
    loom__note_clear(&w->note);
    w->word = &w->own_word;
    w->seq = 1;
  }
  atomic_store_explicit(w->word, w->seq << 1, memory_order_release);
}

bool loom__waiter_claim(loom__waiter *w);

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

/* What a wait that was not claimed by a waker reports: -ETIMEDOUT, the
 * context's reason, or -ENOMEM. */
int loom__waiter_err(const loom__waiter *w, struct loom_ctx *ctx);

/* Whether close has begun on c (it is marked before any waiter wakes):
 * for loom_ctx_err, which must not report a cancel before its done
 * channel says so. */
bool loom__chan_closed(loom_chan *c);

#endif
