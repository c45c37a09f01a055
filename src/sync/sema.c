/*
 * sema.c — loom_sema (counting, FIFO), loom_wg (wait group) and
 * loom_cond (condition variable): a count or nothing, and a queue of
 * waiters, under one spinlock each.  A release that finds a waiter hands
 * the unit straight to it, so a newcomer cannot take it first.
 */
#include <errno.h>
#include <stdint.h>

#include "ctx/ctx_internal.h"
#include "loom/sync.h"
#include "runtime/runtime.h"
#include "sync/wait.h"

/* A wait on a waitlist (obj) taken back (loom__abandon): off the queue.
 * A semaphore's unit, a wait group's zero or a condition's signal handed
 * to the waiter needs nothing given back. */
static bool withdraw_wait(loom__waiter *w) {
  loom_waitlist_ *l = w->obj;
  return loom__waitq_take_back(&l->lock_, &l->q_, w->node);
}
static const loom__abandon abandon_wait = {withdraw_wait, NULL};

/* Queue the caller on l, wait, and on a deadline take it off again.
 * Called with l's lock held; returns with it released.  0 or
 * -ETIMEDOUT.  If abandoned: `how`, with `obj` (loom__waiter_watch). */
static int wait_on(loom_waitlist_ *l, int64_t deadline, loom_ctx *ctx,
                   const loom__abandon *how, void *obj) {
  loom__waiter w;
  loom__waiter_init(&w, deadline == 0 && ctx == NULL);
  loom__wnode local, *n = loom__wnode_get(&w, &l->q_, &local);
  *n = (loom__wnode){.w = &w};
  loom__waitq_push(&l->q_, n);
  loom__waiter_watch(&w, how, obj, n);
  loom__waiter_wait_unlock(&w, &l->lock_, deadline, ctx);
  loom__waiter_unwatch(&w);
  if (w.fired < 0) {
    loom__spin_lock(&l->lock_);
    loom__waitq_unlink(&l->q_, n);
    loom__spin_unlock(&l->lock_);
  }
  loom__wnode_put(n, &local);
  return w.fired >= 0 ? 0 : loom__waiter_err(&w, ctx);
}

/* Wake every waiter of l; called with l's lock held, returns with it
 * released. */
static void wake_all(loom_waitlist_ *l) {
  loom__wnode *list = NULL, *n;
  while ((n = loom__waitq_pop(&l->q_)) != NULL) {
    n->w->fired = 0;
    n->prev = list; /* unlinked: reuse prev as our chain */
    list = n;
  }
  loom__spin_unlock(&l->lock_);
  while (list != NULL) {
    n = list;
    list = n->prev; /* before waking: n is gone once its waiter runs */
    loom__waiter_wake(n->w);
  }
}

/* ---- semaphore ---------------------------------------------------------- */

int loom__sema_acquire_how(loom_sema *s, int64_t deadline, loom_ctx *ctx,
                           const loom__abandon *how, void *obj) {
  if (s == NULL)
    return -EINVAL;
  int e = loom__ctx_reason(ctx);
  if (e != 0)
    return e;
  loom__spin_lock(&s->q_.lock_);
  if (s->count_ > 0 && s->q_.q_.head_ == NULL) {
    s->count_--;
    loom__spin_unlock(&s->q_.lock_);
    return 0;
  }
  if (deadline != 0 && deadline <= loom_now()) {
    loom__spin_unlock(&s->q_.lock_);
    return -ETIMEDOUT;
  }
  return wait_on(&s->q_, deadline, ctx, how, obj != NULL ? obj : &s->q_);
}

int loom_sema_acquire(loom_sema *s, int64_t deadline) {
  return loom__sema_acquire_how(s, deadline, NULL, &abandon_wait, NULL);
}

int loom_sema_acquire_ctx(loom_sema *s, loom_ctx *ctx) {
  return loom__sema_acquire_how(s, 0, ctx, &abandon_wait, NULL);
}

int loom_sema_tryacquire(loom_sema *s) {
  if (s == NULL)
    return -EINVAL;
  loom__spin_lock(&s->q_.lock_);
  int r = -EAGAIN;
  if (s->count_ > 0 && s->q_.q_.head_ == NULL) {
    s->count_--;
    r = 0;
  }
  loom__spin_unlock(&s->q_.lock_);
  return r;
}

void loom_sema_release(loom_sema *s) {
  loom__spin_lock(&s->q_.lock_);
  loom__wnode *n = loom__waitq_pop(&s->q_.q_);
  if (n == NULL)
    s->count_++;
  else
    n->w->fired = 0; /* the unit goes to n */
  loom__spin_unlock(&s->q_.lock_);
  if (n != NULL)
    loom__waiter_wake(n->w);
}

/* ---- wait group ----------------------------------------------------------- */

int loom_wg_add(loom_wg *wg, int64_t delta) {
  /* The count changes by CAS, without the lock, except the change to
   * zero: that one is made holding the lock, which is released as the
   * last touch of *wg.  A waiter that sees zero takes the lock once
   * before it returns, so it cannot return — and free the wait group, the
   * common C pattern — while the last loom_wg_done is still inside. */
  if (wg == NULL)
    return -EINVAL;
  int64_t c = __atomic_load_n(&wg->count_, __ATOMIC_ACQUIRE);
  for (;;) {
    /* c >= 0 always; c + delta must stay in 0..INT64_MAX. */
    if (delta < 0 ? delta == INT64_MIN || c < -delta : delta > INT64_MAX - c)
      return -EINVAL;
    if (c + delta == 0 && delta != 0)
      break;
    if (__atomic_compare_exchange_n(&wg->count_, &c, c + delta, true,
                                    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
      return 0;
  }
  loom__spin_lock(&wg->q_.lock_);
  c = __atomic_load_n(&wg->count_, __ATOMIC_ACQUIRE);
  while (c + delta >= 0 &&
         !__atomic_compare_exchange_n(&wg->count_, &c, c + delta, true,
                                      __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
    ;
  if (c + delta < 0) {
    loom__spin_unlock(&wg->q_.lock_);
    return -EINVAL;
  }
  if (c + delta == 0)
    wake_all(&wg->q_); /* releases the lock */
  else
    loom__spin_unlock(&wg->q_.lock_);
  return 0;
}

int loom_wg_done(loom_wg *wg) { return loom_wg_add(wg, -1); }

/* Zero seen: wait out a loom_wg_add still holding the lock (see there). */
static int wg_zero(loom_wg *wg) {
  loom__spin_lock(&wg->q_.lock_);
  loom__spin_unlock(&wg->q_.lock_);
  return 0;
}

static int wg_wait(loom_wg *wg, int64_t deadline, loom_ctx *ctx) {
  if (wg == NULL)
    return -EINVAL;
  /* A context done before the call wins, as in every other *_ctx call,
   * even over a count that is zero already. */
  int e = ctx != NULL ? loom__ctx_reason(ctx) : 0;
  if (e != 0)
    return e;
  if (__atomic_load_n(&wg->count_, __ATOMIC_ACQUIRE) == 0)
    return wg_zero(wg);
  loom__spin_lock(&wg->q_.lock_);
  if (__atomic_load_n(&wg->count_, __ATOMIC_ACQUIRE) == 0) {
    loom__spin_unlock(&wg->q_.lock_);
    return 0;
  }
  if (deadline != 0 && deadline <= loom_now()) {
    loom__spin_unlock(&wg->q_.lock_);
    return -ETIMEDOUT;
  }
  return wait_on(&wg->q_, deadline, ctx, &abandon_wait, &wg->q_);
}

int loom_wg_wait(loom_wg *wg, int64_t deadline) {
  return wg_wait(wg, deadline, NULL);
}

int loom_wg_wait_ctx(loom_wg *wg, loom_ctx *ctx) { return wg_wait(wg, 0, ctx); }

/* ---- condition variable ----------------------------------------------------- */

static int cond_wait(loom_cond *c, loom_mutex *mu, int64_t deadline,
                     loom_ctx *ctx) {
  if (c == NULL || mu == NULL)
    return -EINVAL;
  int e = loom__ctx_reason(ctx);
  if (e != 0)
    return e; /* mu still held, as on every return */
  /* A deadline that has passed needs no wait, and so no timer: the
   * other waits look before they queue too. */
  if (deadline != 0 && deadline <= loom_now())
    return -ETIMEDOUT;
  loom__spin_lock(&c->q_.lock_);
  /* Unlock mu only once we are queued, so a signal sent right after
   * cannot be missed; mu's unlock never parks. */
  loom__waiter w;
  loom__waiter_init(&w, deadline == 0 && ctx == NULL);
  loom__wnode local, *n = loom__wnode_get(&w, &c->q_.q_, &local);
  *n = (loom__wnode){.w = &w};
  loom__waitq_push(&c->q_.q_, n);
  loom__waiter_watch(&w, &abandon_wait, &c->q_, n);
  loom_mutex_unlock(mu);
  loom__waiter_wait_unlock(&w, &c->q_.lock_, deadline, ctx);
  loom__waiter_unwatch(&w);
  int r = 0;
  if (w.fired < 0) {
    loom__spin_lock(&c->q_.lock_);
    loom__waitq_unlink(&c->q_.q_, n);
    loom__spin_unlock(&c->q_.lock_);
    r = loom__waiter_err(&w, ctx);
  }
  loom__wnode_put(n, &local);
  loom_mutex_lock(mu);
  return r;
}

int loom_cond_wait(loom_cond *c, loom_mutex *mu, int64_t deadline) {
  return cond_wait(c, mu, deadline, NULL);
}

int loom_cond_wait_ctx(loom_cond *c, loom_mutex *mu, loom_ctx *ctx) {
  return cond_wait(c, mu, 0, ctx);
}

void loom_cond_signal(loom_cond *c) {
  loom__spin_lock(&c->q_.lock_);
  loom__wnode *n = loom__waitq_pop(&c->q_.q_);
  if (n != NULL)
    n->w->fired = 0;
  loom__spin_unlock(&c->q_.lock_);
  if (n != NULL)
    loom__waiter_wake(n->w);
}

void loom_cond_broadcast(loom_cond *c) {
  loom__spin_lock(&c->q_.lock_);
  wake_all(&c->q_);
}
