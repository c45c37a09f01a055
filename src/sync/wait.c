/*
 * wait.c — waiters, wait queues and claims for the sync layer (wait.h).
 *
 * A waiter is completed by whoever claims it first: a CAS on its wait
 * word, (sequence << 1) | claimed.  A coroutine's word lives in its G, so
 * a deadline timer that fires late — into a later wait of the same
 * coroutine — finds the sequence moved on and fails its CAS.  A waiter
 * that sits on one queue with no deadline cannot be claimed twice, and
 * skips the CAS.
 */
#include "sync/wait.h"

#include <errno.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>

#include "ctx/ctx_internal.h"
#include "runtime/runtime.h"

/* The lock was held when loom__spin_lock tried it. */
void loom__spin_lock_slow(
    int *l) { // NOLINT(readability-non-const-parameter): written by __atomic
  unsigned spins = 1;
  do {
    /* Back off while it is held: hammering the line slows the holder. */
    do
      loom__backoff(&spins);
    while (__atomic_load_n(l, __ATOMIC_RELAXED));
  } while (__atomic_exchange_n(l, 1, __ATOMIC_ACQUIRE));
}

void loom__backoff(unsigned *spins) {
  for (unsigned i = 0; i < *spins; i++)
    __builtin_ia32_pause();
  if (*spins < 64)
    *spins <<= 1;
  else
    sched_yield();
}

bool loom__waiter_claim(loom__waiter *w) {
  if (w->exclusive)
    return true;
  uint64_t expect = w->seq << 1;
  return atomic_compare_exchange_strong_explicit(
      w->word, &expect, expect | 1, memory_order_acq_rel, memory_order_acquire);
}

void loom__waiter_undo(loom__undo *u, loom__g *g) {
  loom__waiter *w =
      (loom__waiter *)(void *)((char *)u - offsetof(loom__waiter, undo));
  if (atomic_load_explicit(&g->status, memory_order_acquire) == G_WAITING) {
    /* Ours if we claim it; an exclusive waiter's claim is its withdraw
     * (its node taken off the queue under the object's lock). */
    if (w->exclusive ? w->how->withdraw(w)
                     : loom__waiter_claim(w) && w->how->withdraw(w))
      return;
    /* A claimant was first: its wake-up is on its way. */
    while (atomic_load_explicit(&g->status, memory_order_acquire) == G_WAITING)
      sched_yield();
  }
  if (w->fired < 0)
    (void)w->how->withdraw(w); /* its deadline or a cancel ended it */
  else if (w->how->give_back != NULL)
    w->how->give_back(w);
}

static loom__wnode *head(loom__waitq *q) { return q->head_; }

void loom__waitq_push_front(loom__waitq *q, loom__wnode *n) {
  loom__wnode *h = q->head_;
  n->prev = NULL;
  n->next = h;
  if (h != NULL)
    h->prev = n;
  else
    q->tail_ = n;
  q->head_ = n;
  n->queued = true;
}

void loom__waitq_unlink(loom__waitq *q, loom__wnode *n) {
  if (!n->queued)
    return;
  if (n->prev != NULL)
    n->prev->next = n->next;
  else
    q->head_ = n->next;
  if (n->next != NULL)
    n->next->prev = n->prev;
  else
    q->tail_ = n->prev;
  n->queued = false;
}

loom__wnode *loom__waitq_pop_some(loom__waitq *q) {
  for (;;) {
    loom__wnode *n = head(q);
    if (n == NULL)
      return NULL;
    loom__waitq_unlink(q, n);
    if (loom__waiter_claim(n->w))
      return n;
    /* Claimed elsewhere: another queue of its select, or its deadline. */
  }
}

/* ---- waiting ------------------------------------------------------------ */

struct park_arg {
  loom__waiter *w;
  void (*release)(void *arg);
  void *arg;
  int64_t deadline;
  struct loom_ctx *ctx;
  loom__ctx_hook *hook;
  bool hooked;
};

static void deadline_fire(loom__timer *t, void *arg) {
  (void)t;
  loom__g *g = arg;
  uint64_t expect = g->wait_timer_seq << 1;
  if (atomic_compare_exchange_strong(&g->wait_word, &expect, expect | 1))
    loom__ready(g);
}

static void cancel_fire(void *arg) {
  loom__waiter *w = arg;
  if (loom__waiter_claim(w)) {
    w->fired = LOOM__FIRED_CANCEL;
    loom__waiter_wake(w);
  }
}

/*
 * The commit arms the deadline timer, releases the caller's locks, and
 * then hooks the context.  Either claimant may ready the coroutine before
 * the commit is over (a timer can fire on another thread at once, a
 * waker can claim the waiter once the locks are gone); the woken
 * coroutine then spins on w->committed before it leaves its frame, so the
 * commit may keep using the park arguments on its stack to the end.
 * The context is hooked after the release, not before: a cancel runs its
 * hooks under the context's lock, and a hook may take the lock of what
 * it wakes (the net layer's expire takes a socket's sleepers' lock, which
 * a sleeper's wait releases here), so a commit that took the context's
 * lock while holding that one could wait for a cancel waiting for it.
 * A cancel that lands between the two is not lost: the hook is then
 * refused, and the commit claims the waiter itself.
 */
static bool park_commit(loom__g *g, void *arg) {
  struct park_arg *pa = arg;
  loom__waiter *w = pa->w;
  bool stay = true;
  if (pa->deadline != 0) {
    loom__m *m = loom__getm();
    g->timer.fn = deadline_fire;
    g->timer.arg = g;
    g->wait_timer_seq = atomic_load(&g->wait_word) >> 1;
    loom__timer_add(&m->p->timers, &g->timer, pa->deadline);
    loom__wake_netpoller(m->rt, pa->deadline);
  }
  pa->release(pa->arg);
  if (pa->ctx != NULL) {
    pa->hooked = loom__ctx_hook_add(pa->ctx, pa->hook, g);
    if (!pa->hooked && loom__waiter_claim(w)) {
      w->fired = LOOM__FIRED_CANCEL; /* cancelled already: do not sleep */
      stay = false;
    }
  }
  atomic_store_explicit(&w->committed, 1, memory_order_release);
  return stay;
}

/* Not inlined into loom__waiter_wait_unlock, whose short path would
 * then pay for this one's frame. */
__attribute__((noinline)) void
loom__waiter_wait_ctx(loom__waiter *w, void (*release)(void *arg), void *arg,
                      int64_t deadline, struct loom_ctx *ctx) {
  loom__ctx_hook hook = {.fn = cancel_fire, .arg = w};
  if (w->g != NULL) {
    loom__timers *ts = &loom__getm()->p->timers;
    if (deadline != 0 && loom__timers_reserve(ts, 1) != 0 &&
        loom__timers_reserve(ts, 1) != 0) { /* once more: memory comes back */
      /* No memory for the deadline's timer: the wait cannot be bounded,
       * so it ends now with -ENOMEM — unless a waker has claimed it
       * already: then its wake is on the way, and no timer is needed. */
      if (loom__waiter_claim(w)) {
        w->fired = LOOM__FIRED_NOMEM;
        release(arg);
        return;
      }
      deadline = 0;
    }
    atomic_store_explicit(&w->committed, 0, memory_order_relaxed);
    struct park_arg pa = {w, release, arg, deadline, ctx, &hook, false};
    loom__park(park_commit, &pa, "sync");
    while (!atomic_load_explicit(&w->committed, memory_order_acquire))
      __builtin_ia32_pause();
    if (pa.hooked)
      loom__ctx_unhook(ctx, &hook); /* after this the hook cannot run */
    if (deadline != 0)
      loom__timer_del(&w->g->timer); /* waits for a running deadline_fire */
    return;
  }
  /* A plain thread: the locks first here too (see park_commit). */
  release(arg);
  bool hooked = false;
  if (ctx != NULL) {
    hooked = loom__ctx_hook_add(ctx, &hook, NULL);
    if (!hooked && loom__waiter_claim(w)) {
      w->fired = LOOM__FIRED_CANCEL;
      return;
    }
  }
  if (deadline == 0) {
    loom__note_sleep(&w->note);
  } else {
    /* Compared before subtracting: deadline - now overflows for a
     * deadline long past (INT64_MIN), which is "at once" too. */
    int64_t now = loom_now();
    int64_t left = deadline > now ? deadline - now : 0;
    if (!loom__note_tsleep(&w->note, left)) {
      if (!loom__waiter_claim(w))
        loom__note_sleep(&w->note); /* a claimant is on its way */
      /* else timed out: w->fired stays -1 */
    }
  }
  if (hooked)
    loom__ctx_unhook(ctx, &hook);
}

static void unlock_lock(void *lock) { loom__spin_unlock(lock); }

/* The short path's commit: `lock` is not on the parking coroutine's
 * stack, and the unlock is its last touch of memory the coroutine may
 * reuse once a claimant has readied it. */
static bool unlock_commit(loom__g *g, void *lock) {
  (void)g;
  loom__spin_unlock(lock);
  return true;
}

void loom__waiter_wait_unlock(loom__waiter *w, int *lock, int64_t deadline,
                              struct loom_ctx *ctx) {
  if (w->g != NULL && deadline == 0 && ctx == NULL)
    loom__park(unlock_commit, lock, "sync");
  else
    loom__waiter_wait_ctx(w, unlock_lock, lock, deadline, ctx);
}

int loom__waiter_err(const loom__waiter *w, struct loom_ctx *ctx) {
  if (w->fired == LOOM__FIRED_NOMEM)
    return -ENOMEM;
  return w->fired == LOOM__FIRED_CANCEL ? loom__ctx_reason(ctx) : -ETIMEDOUT;
}

void loom__waiter_wait(loom__waiter *w, void (*release)(void *arg), void *arg,
                       int64_t deadline) {
  loom__waiter_wait_ctx(w, release, arg, deadline, NULL);
}
