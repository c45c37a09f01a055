/*
 * mutex.c — loom_mutex (Go's sync.Mutex) and loom_once.
 *
 * state_: bit 0 locked, bit 1 starving, bit 2 woken, bits 3.. the
 * number of queued waiters.  Locking: a CAS from "not locked, not
 * starving"; else a short spin while the holder runs elsewhere; else
 * queue and park.  Unlock with no waiters is one CAS.
 *
 * Normal mode: unlock clears the locked bit and wakes the first waiter,
 * which competes with any running locker (a running locker usually wins:
 * better throughput, and the waiter goes back to the front of the queue).
 * The woken bit says that a locker is awake and will contend without
 * being woken: a spinner (it sets the bit while waiters are queued) or
 * the waiter the last unlock woke.  An unlock that finds it set wakes
 * nobody, and whoever set it clears it in the CAS that takes the mutex
 * or queues it again, so at most one waiter is woken at a time and a
 * burst of unlocks by a running locker does not fill the run queues with
 * waiters that will only queue again.
 * Starvation mode: set by a waiter that has kept losing for more than
 * 1 ms (counted from the first time it had to queue again); unlock
 * then hands the mutex straight to the first waiter and nobody barges or
 * spins, so no waiter can be bypassed forever.  It ends, as Go's does,
 * when the queue empties or when it hands the mutex to a waiter that did
 * not starve (waited under 1 ms): else lockers that re-lock at once would
 * keep the queue full, and every lock would stay a hand-off for good.
 *
 * Every change of state_ by a waiter is a CAS from the value it saw under
 * the queue's lock, so an unlock that slips in between (its fast path
 * does not take that lock) makes the CAS fail and the waiter look again,
 * instead of sleeping on a mutex nobody holds.  An unlock's last touch
 * of *mu is the atomic operation that drops the locked bit: whoever takes
 * the mutex next may free it at once (unlock, then free: the common C
 * pattern).
 */
#include <errno.h>

#include "ctx/ctx_internal.h"
#include "loom/sync.h"
#include "runtime/runtime.h"
#include "sync/wait.h"

#define LOCKED 1u
#define STARVING 2u
#define WOKEN 4u
#define WAITER (1u << 3)
#define STARVE_NS 1000000
#define SPIN_ROUNDS 4
#define SPIN_PAUSES 30

static uint32_t load(loom_mutex *mu) {
  return __atomic_load_n(&mu->state_, __ATOMIC_ACQUIRE);
}

static bool cas(loom_mutex *mu, uint32_t old, uint32_t new_) {
  return __atomic_compare_exchange_n(&mu->state_, &old, new_, false,
                                     __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

int loom_mutex_trylock(loom_mutex *mu) {
  if (mu == NULL)
    return -EINVAL;
  uint32_t s = load(mu);
  while (!(s & (LOCKED | STARVING))) {
    if (cas(mu, s, s | LOCKED))
      return 0;
    s = load(mu);
  }
  return -EBUSY;
}

/* Spin, as Go does, only when it cannot delay anyone: another P is busy
 * (the holder may be running there) and nothing else is runnable on ours
 * (the holder may be queued right here, waiting for the P we would be
 * burning). */
static bool can_spin(int iter) {
  if (iter >= SPIN_ROUNDS)
    return false;
  loom__m *m = loom__getm();
  if (m == NULL || m->p == NULL)
    return true; /* a plain thread: spinning costs only itself */
  loom__rt *rt = m->rt;
  return rt->nprocs > atomic_load_explicit(&rt->npidle, memory_order_relaxed) +
                          atomic_load_explicit(&rt->nmspinning,
                                               memory_order_relaxed) +
                          1 &&
         loom__runq_empty(m->p);
}

/* A waiter that gave up (deadline, cancel, or abandoned): off the queue,
 * and no longer counted (the unlocker counts only those it claims).
 * Under the queue's lock. */
static void give_up_locked(loom_mutex *mu, loom__wnode *n) {
  loom__waitq_unlink(&mu->q_.q_, n);
  uint32_t t = __atomic_sub_fetch(&mu->state_, WAITER, __ATOMIC_ACQ_REL);
  if ((t & STARVING) && mu->q_.q_.head_ == NULL)
    __atomic_and_fetch(&mu->state_, ~STARVING, __ATOMIC_ACQ_REL);
}

/* A lock's wait taken back (loom__abandon). */
static bool withdraw_lock(loom__waiter *w) {
  loom_mutex *mu = w->obj;
  if (!loom__waitq_withdraw(&mu->q_.lock_, &mu->q_.q_, w->node))
    return false;
  give_up_locked(mu, w->node);
  loom__spin_unlock(&mu->q_.lock_);
  return true;
}

/* Handed the mutex, the waiter unlocks it.  Woken to contend, it is why
 * WOKEN is set, which tells unlockers not to wake anyone: it clears that,
 * and if the mutex is free, takes and releases it, so that a waiter
 * queued behind is woken. */
static void give_back_lock(loom__waiter *w) {
  loom_mutex *mu = w->obj;
  if (!w->handed) {
    __atomic_and_fetch(&mu->state_, ~WOKEN, __ATOMIC_ACQ_REL);
    if (loom_mutex_trylock(mu) != 0)
      return; /* its holder's unlock wakes the next */
  }
  loom_mutex_unlock(mu);
}

static const loom__abandon abandon_lock = {withdraw_lock, give_back_lock};

static int lock_slow(loom_mutex *mu, int64_t deadline, loom_ctx *ctx) {
  int *lk = &mu->q_.lock_;
  int64_t wait_start = 0;
  bool requeue = false;
  bool awoke = false; /* we are why WOKEN is set: clear it when done */
  int iter = 0;
  for (;;) {
    uint32_t s = load(mu);
    if ((s & (LOCKED | STARVING)) == LOCKED && can_spin(iter)) {
      /* Tell unlockers not to wake anyone while we are here. */
      if (!awoke && !(s & WOKEN) && s >= WAITER && cas(mu, s, s | WOKEN))
        awoke = true;
      for (int k = 0; k < SPIN_PAUSES; k++)
        __builtin_ia32_pause();
      iter++;
      continue;
    }
    if (!(s & (LOCKED | STARVING))) {
      if (cas(mu, s, awoke ? (s | LOCKED) & ~WOKEN : s | LOCKED))
        return 0;
      continue;
    }
    loom__spin_lock(lk);
    s = load(mu);
    if (!(s & (LOCKED | STARVING))) {
      loom__spin_unlock(lk); /* freed meanwhile: take it above */
      continue;
    }
    uint32_t ns = s + WAITER;
    if (awoke)
      ns &= ~WOKEN;
    /* The wait is timed from the first time a woken waiter has to queue
     * again: most waits end at the first wake-up, and a clock read costs
     * as much as the rest of a contended lock (25 ns here). */
    if (requeue && wait_start == 0)
      wait_start = loom_now();
    else if (wait_start == 0 && (s & STARVING))
      wait_start = loom_now(); /* a hand-off will ask how long we waited */
    if (wait_start != 0 && loom_now() - wait_start > STARVE_NS)
      ns |= STARVING;
    if (!cas(mu, s, ns)) {
      loom__spin_unlock(lk);
      continue;
    }
    awoke = false;
    loom__waiter w;
    loom__waiter_init(&w, deadline == 0 && ctx == NULL);
    loom__wnode n = {.w = &w};
    if (requeue)
      loom__waitq_push_front(&mu->q_.q_, &n); /* woken once: stay first */
    else
      loom__waitq_push(&mu->q_.q_, &n);
    requeue = true;
    loom__waiter_watch(&w, &abandon_lock, mu, &n);
    loom__waiter_wait_unlock(&w, lk, deadline, ctx);
    loom__waiter_unwatch(&w);
    if (w.fired < 0) { /* deadline or cancel */
      loom__spin_lock(lk);
      give_up_locked(mu, &n);
      loom__spin_unlock(lk);
      return loom__waiter_err(&w, ctx);
    }
    if (w.handed) { /* starvation mode: the unlocker gave it to us */
      /* We did not starve: leave the mode (a waiter that queued before
       * it began has no time, and may have starved: keep it). */
      if (wait_start != 0 && loom_now() - wait_start <= STARVE_NS)
        __atomic_and_fetch(&mu->state_, ~STARVING, __ATOMIC_ACQ_REL);
      return 0;
    }
    awoke = true; /* the unlocker set WOKEN for us */
    iter = 0;
  }
}

void loom_mutex_lock(loom_mutex *mu) {
  if (!cas(mu, 0, LOCKED))
    (void)lock_slow(mu, 0, NULL);
}

int loom_mutex_lock_until(loom_mutex *mu, int64_t deadline) {
  if (mu == NULL)
    return -EINVAL;
  if (cas(mu, 0, LOCKED))
    return 0;
  if (deadline != 0 && deadline <= loom_now())
    return loom_mutex_trylock(mu) == 0 ? 0 : -ETIMEDOUT;
  return lock_slow(mu, deadline, NULL);
}

int loom_mutex_lock_ctx(loom_mutex *mu, loom_ctx *ctx) {
  if (mu == NULL)
    return -EINVAL;
  int e = loom__ctx_reason(ctx);
  if (e != 0)
    return e;
  if (cas(mu, 0, LOCKED))
    return 0;
  return lock_slow(mu, 0, ctx);
}

void loom_mutex_unlock(loom_mutex *mu) {
  /* Guess "locked, nothing else" (one CAS); a failed CAS tells the state. */
  uint32_t s = LOCKED;
  for (;;) {
    if (!(s & LOCKED))
      loom__throw("mutex_unlock: the mutex is not locked");
    if ((s & STARVING) || ((s & WOKEN) == 0 && s >= WAITER))
      break;
    /* Nobody to wake, or someone awake already: just release. */
    if (__atomic_compare_exchange_n(&mu->state_, &s, s & ~LOCKED, false,
                                    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
      return;
  }
  int *lk = &mu->q_.lock_;
  loom__wnode *woken = NULL; /* a waiter woken to contend (normal mode) */
  for (;;) {
    loom__spin_lock(lk);
    s = load(mu);
    loom__wnode *n = NULL;
    if ((s & STARVING) || (!(s & WOKEN) && woken == NULL))
      n = loom__waitq_pop(&mu->q_.q_);
    if (n != NULL) {
      n->w->fired = 0; /* woken by an unlock, not by its deadline */
      if (s & STARVING) {
        __atomic_sub_fetch(&mu->state_, WAITER, __ATOMIC_ACQ_REL);
        n->w->handed = true; /* stays locked: it is n's now */
        if (mu->q_.q_.head_ == NULL)
          __atomic_and_fetch(&mu->state_, ~STARVING, __ATOMIC_ACQ_REL);
        loom__spin_unlock(lk);
        loom__waiter_wake(n->w);
        if (woken != NULL)
          loom__waiter_wake(woken->w);
        return;
      }
      /* n is awake now; a spinner may set WOKEN at the same moment, and
       * then both clear it (a harmless extra wake later, never a lost
       * one). */
      s = load(mu);
      while (!cas(mu, s, (s - WAITER) | WOKEN))
        s = load(mu);
      woken = n;
    } else if (s & STARVING) {
      __atomic_and_fetch(&mu->state_, ~STARVING, __ATOMIC_ACQ_REL);
    }
    loom__spin_unlock(lk);
    /* Dropping LOCKED is the last touch of *mu.  A locker that queued
     * meanwhile is not lost: the woken waiter (or the spinner that set
     * WOKEN) contends, and its unlock finds the new waiter's count.  But
     * a waiter that queued again after waiting too long may have turned
     * the mutex to starvation mode since we looked: then nobody may take
     * it by contending, and it must be handed over (go round). */
    s = load(mu);
    while (!(s & STARVING))
      if (__atomic_compare_exchange_n(&mu->state_, &s, s & ~LOCKED, false,
                                      __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        if (woken != NULL)
          loom__waiter_wake(woken->w);
        return;
      }
  }
}

void loom_once_do(loom_once *o, void (*fn)(void *), void *arg) {
  if (__atomic_load_n(&o->done_, __ATOMIC_ACQUIRE))
    return;
  loom_mutex_lock(&o->mu_);
  if (!o->done_) {
    fn(arg);
    __atomic_store_n(&o->done_, 1, __ATOMIC_RELEASE);
  }
  loom_mutex_unlock(&o->mu_);
}
