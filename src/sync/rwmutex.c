/*
 * rwmutex.c — loom_rwmutex: Go's sync.RWMutex, and waits on it that may
 * give up (Go has none).
 *
 * Vocabulary.  state_ holds two 32-bit counts, so that one atomic
 * operation changes both:
 *   readers (low half, signed): every reader counted in and not yet out,
 *     inside or waiting.  A writer announces itself by taking RW_MAX off
 *     it, so a reader that counts itself in later finds it negative and
 *     waits for a unit of reader_sem_;
 *   departing (high half): set by that writer, in the same CAS, to the
 *     readers it found: those it waits for.  Every read unlock takes one
 *     off both halves with one fetch_sub; the one that takes departing
 *     to zero while readers is negative releases writer_sem_ to the
 *     writer.  Without a writer the high half is garbage nobody reads.
 * w_ lets one writer at a time announce itself.  The semaphores count,
 * so a release that comes before its acquire is not lost.
 *
 * Go keeps departing in a word of its own, added to after the announce;
 * a read unlock in between takes it below zero, which the add makes
 * good.  That works while a writer never goes back: a writer that gives
 * up would have to know how many of the unlocks that saw its announce
 * have still to reach departing, and nothing says.  With both halves in
 * one word there is no such moment.
 *
 * The count.  Let I be the readers inside, U the units of reader_sem_
 * nobody has taken yet (in its count, or handed to a waiter that has not
 * run yet), and W the counted readers waiting with no unit.  Without a
 * writer, W is 0: every waiting reader has its unit, readers = I + U.
 * The writer's CAS makes departing = readers = I + U, and from then on
 * departing stays I + U: a reader coming in with a unit moves one from U
 * to I, a read unlock takes one off I and departing together, a new
 * reader adds to W and leaves departing alone.  So departing reaches 0
 * exactly when nobody is inside and no unit is left to let anyone in:
 * the writer has the lock.  Units are not any one reader's: a reader
 * that arrives behind the writer may take a unit left for an earlier one
 * (it comes in, and the earlier one waits as a newcomer would), as in
 * Go; the counts do not care which reader is which.  The unlock finds
 * I = U = 0 and readers = -RW_MAX + W: it adds RW_MAX back and releases
 * W units.
 *
 * Giving up.  A reader whose deadline or context claimed its wait looks,
 * under reader_sem_'s lock, at the count of units: one there is one it
 * may take (the lock came free as it gave up), and it returns holding
 * the lock; none means it is one of W (a writer is announced: without
 * one every waiting reader's unit is in the count or handed to its
 * waiter), and it counts itself out, readers - 1, departing untouched.
 * For that to hold, nothing may add the count back (and release units
 * for W) between its look and its decrement: so the unlock, and a writer
 * giving up, do their add and their releases under the same lock.
 * A writer whose wait for writer_sem_ gave up does one CAS, under that
 * lock too: departing 0 means the last reader left as it gave up and
 * released writer_sem_ (or is about to), so the lock is the writer's, and
 * it takes that unit; else the CAS adds RW_MAX back, after which no read
 * unlock looks at departing, and it releases readers - departing units,
 * one for each reader its announce held back.  Then it unlocks w_.
 *
 * Unlock, then free.  A writer's unlock drops w_ before it gives the
 * count back: from that add on a reader may take the lock, drop it and
 * free the rwmutex, so the add must be the last touch of *rw — unless a
 * counted reader is still inside its rlock call, to take a unit under
 * reader_sem_'s lock or to be woken after the unlock has dropped it:
 * then nobody may free it yet.  So with no reader counted the unlock's
 * last touch is a CAS of the count, and with some it takes the lock
 * first (while the writer holds, the count can only grow under that
 * lock: readers give up under it, and nobody is inside to unlock).  The
 * next writer, which may get w_ in between, waits for the add before it
 * announces itself.
 */
#include <errno.h>
#include <stdint.h>

#include "ctx/ctx_internal.h"
#include "loom/sync.h"
#include "runtime/runtime.h"
#include "sync/wait.h"

#define RW_MAX (1 << 30)
#define READER ((uint64_t)1)
#define DEPART ((uint64_t)1 << 32)

static int32_t readers(uint64_t s) { return (int32_t)(uint32_t)s; }
static int32_t departing(uint64_t s) { return (int32_t)(uint32_t)(s >> 32); }
static uint64_t word(int32_t r, int32_t d) {
  return (uint64_t)(uint32_t)r | (uint64_t)(uint32_t)d << 32;
}

static uint64_t load(loom_rwmutex *rw) {
  return __atomic_load_n(&rw->state_, __ATOMIC_ACQUIRE);
}

static bool cas(loom_rwmutex *rw, uint64_t *old, uint64_t new_) {
  return __atomic_compare_exchange_n(&rw->state_, old, new_, false,
                                     __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

/* Release n units of s, whose lock the caller holds: to its waiters
 * first, in order, the rest to its count.  Drops the lock, then wakes
 * them (each wait node is gone once its waiter runs). */
static void release_units(loom_sema *s, int32_t n) {
  loom__wnode *first = NULL, **tail = &first, *nd;
  while (n > 0 && (nd = loom__waitq_pop(&s->q_.q_)) != NULL) {
    nd->w->fired = 0;
    nd->prev = NULL; /* unlinked: prev chains them for the wake */
    *tail = nd;
    tail = &nd->prev;
    n--;
  }
  s->count_ += n;
  loom__spin_unlock(&s->q_.lock_);
  while (first != NULL) {
    nd = first;
    first = nd->prev; /* before the wake, which may end nd's life */
    loom__waiter_wake(nd->w);
  }
}

/* ---- readers ------------------------------------------------------------ */

/* A reader whose wait gave up, under reader_sem_'s lock: off the queue,
 * and either in (true: a unit came free as it gave up, and it took it)
 * or counted out (see the top of the file). */
static bool give_up_locked(loom_rwmutex *rw, loom__wnode *n) {
  loom_sema *s = &rw->reader_sem_;
  loom__waitq_unlink(&s->q_.q_, n);
  if (s->count_ > 0) {
    s->count_--;
    return true;
  }
  uint64_t old = __atomic_fetch_sub(&rw->state_, READER, __ATOMIC_ACQ_REL);
  if (readers(old) >= 0)
    loom__throw("rwmutex_rlock: gave up with no writer to wait for");
  return false;
}

/* A reader's wait taken back (loom__abandon): counted out, or, if it
 * got in (handed a unit, or taking one as it gives up), out again. */
static bool withdraw_read(loom__waiter *w) {
  loom_rwmutex *rw = w->obj;
  loom_sema *s = &rw->reader_sem_;
  if (!loom__waitq_withdraw(&s->q_.lock_, &s->q_.q_, w->node))
    return false;
  bool in = give_up_locked(rw, w->node);
  loom__spin_unlock(&s->q_.lock_);
  if (in)
    loom_rwmutex_runlock(rw);
  return true;
}
static void give_back_read(loom__waiter *w) { loom_rwmutex_runlock(w->obj); }
static const loom__abandon abandon_read = {withdraw_read, give_back_read};

/* Counted in while a writer holds the lock or waits for it: wait for a
 * unit of reader_sem_, or give up (see the top of the file). */
static int rlock_slow(loom_rwmutex *rw, int64_t deadline, loom_ctx *ctx) {
  loom_sema *s = &rw->reader_sem_;
  int *lk = &s->q_.lock_;
  loom__spin_lock(lk);
  if (s->count_ > 0 && s->q_.q_.head_ == NULL) {
    s->count_--;
    loom__spin_unlock(lk);
    return 0;
  }
  loom__waiter w;
  loom__waiter_init(&w, deadline == 0 && ctx == NULL);
  loom__wnode local, *n = loom__wnode_get(&w, &s->q_.q_, &local);
  *n = (loom__wnode){.w = &w};
  loom__waitq_push(&s->q_.q_, n);
  loom__waiter_watch(&w, &abandon_read, rw, n);
  loom__waiter_wait_unlock(&w, lk, deadline, ctx);
  loom__waiter_unwatch(&w);
  int r = 0; /* fired: a unit was handed to us */
  if (w.fired < 0) {
    loom__spin_lock(lk);
    r = give_up_locked(rw, n) ? 0 : loom__waiter_err(&w, ctx);
    loom__spin_unlock(lk);
  }
  loom__wnode_put(n, &local);
  return r;
}

void loom_rwmutex_rlock(loom_rwmutex *rw) {
  if (readers(__atomic_add_fetch(&rw->state_, READER, __ATOMIC_ACQ_REL)) < 0)
    (void)rlock_slow(rw, 0, NULL); /* a writer holds it or waits */
}

static int rlock_bounded(loom_rwmutex *rw, int64_t deadline, loom_ctx *ctx) {
  if (rw == NULL)
    return -EINVAL;
  int e = loom__ctx_reason(ctx);
  if (e != 0)
    return e;
  if (deadline != 0 && deadline <= loom_now())
    return loom_rwmutex_tryrlock(rw) == 0 ? 0 : -ETIMEDOUT;
  if (readers(__atomic_add_fetch(&rw->state_, READER, __ATOMIC_ACQ_REL)) < 0)
    return rlock_slow(rw, deadline, ctx);
  return 0;
}

int loom_rwmutex_rlock_until(loom_rwmutex *rw, int64_t deadline) {
  return rlock_bounded(rw, deadline, NULL);
}

int loom_rwmutex_rlock_ctx(loom_rwmutex *rw, loom_ctx *ctx) {
  return rlock_bounded(rw, 0, ctx);
}

void loom_rwmutex_runlock(loom_rwmutex *rw) {
  uint64_t old =
      __atomic_fetch_sub(&rw->state_, READER | DEPART, __ATOMIC_ACQ_REL);
  int32_t r = readers(old);
  if (r <= 0) { /* a writer is announced, or nobody reads */
    if (r == 0 || r == -RW_MAX)
      loom__throw("rwmutex_runlock: not read-locked");
    if (departing(old) == 1)
      loom_sema_release(&rw->writer_sem_); /* the last reader out */
  }
}

int loom_rwmutex_tryrlock(loom_rwmutex *rw) {
  if (rw == NULL)
    return -EINVAL;
  uint64_t s = __atomic_load_n(&rw->state_, __ATOMIC_RELAXED);
  while (readers(s) >= 0) /* no writer holds it or waits for it */
    if (__atomic_compare_exchange_n(&rw->state_, &s, s + READER, true,
                                    __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
      return 0;
  return -EBUSY;
}

/* ---- writers ------------------------------------------------------------ */

/* A writer that gave up its wait for the readers (err): withdraw the
 * announce, or take the lock the last reader left it meanwhile. */
static int withdraw(loom_rwmutex *rw, int err) {
  loom_sema *rs = &rw->reader_sem_;
  loom__spin_lock(&rs->q_.lock_);
  uint64_t s = load(rw);
  for (;;) {
    if (departing(s) == 0) {
      /* The last reader has left, and released writer_sem_ to us or is
       * about to (after its fetch_sub, in loom_rwmutex_runlock). */
      loom__spin_unlock(&rs->q_.lock_);
      (void)loom_sema_acquire(&rw->writer_sem_, 0);
      return 0;
    }
    if (cas(rw, &s, word(readers(s) + RW_MAX, departing(s))))
      break;
  }
  int32_t held = readers(s) + RW_MAX - departing(s); /* W */
  if (held < 0)
    loom__throw("rwmutex_lock: more readers departing than counted");
  release_units(rs, held); /* drops the lock */
  loom_mutex_unlock(&rw->w_);
  return err;
}

/* A writer's wait for the readers taken back (loom__abandon): it
 * withdraws, or if the last reader let it in meanwhile, leaves; handed
 * the lock, it leaves. */
static bool withdraw_write(loom__waiter *w) {
  loom_rwmutex *rw = w->obj;
  loom_sema *s = &rw->writer_sem_;
  if (!loom__waitq_take_back(&s->q_.lock_, &s->q_.q_, w->node))
    return false;
  if (withdraw(rw, -ECANCELED) == 0)
    loom_rwmutex_unlock(rw);
  return true;
}
static void give_back_write(loom__waiter *w) { loom_rwmutex_unlock(w->obj); }
static const loom__abandon abandon_write = {withdraw_write, give_back_write};

/* Holding w_: announce ourselves, and wait for the readers we found. */
static int lock_slow(loom_rwmutex *rw, int64_t deadline, loom_ctx *ctx) {
  /* The writer before us may still be between its w_ unlock and its
   * add: readers is negative until then (a few instructions). */
  unsigned spins = 1;
  uint64_t s = load(rw);
  int32_t r;
  for (;;) {
    r = readers(s);
    if (r < 0) {
      loom__backoff(&spins);
      s = load(rw);
    } else if (cas(rw, &s, word(r - RW_MAX, r))) {
      break;
    }
  }
  if (r == 0)
    return 0;
  int e = loom__sema_acquire_how(&rw->writer_sem_, deadline, ctx,
                                 &abandon_write, rw);
  return e == 0 ? 0 : withdraw(rw, e);
}

void loom_rwmutex_lock(loom_rwmutex *rw) {
  loom_mutex_lock(&rw->w_); /* one writer at a time */
  (void)lock_slow(rw, 0, NULL);
}

static int lock_bounded(loom_rwmutex *rw, int64_t deadline, loom_ctx *ctx) {
  if (rw == NULL)
    return -EINVAL;
  int e;
  if (ctx != NULL) {
    e = loom_mutex_lock_ctx(&rw->w_, ctx); /* a done ctx: at once */
  } else {
    if (deadline != 0 && deadline <= loom_now())
      return loom_rwmutex_trylock(rw) == 0 ? 0 : -ETIMEDOUT;
    e = loom_mutex_lock_until(&rw->w_, deadline);
  }
  return e != 0 ? e : lock_slow(rw, deadline, ctx);
}

int loom_rwmutex_lock_until(loom_rwmutex *rw, int64_t deadline) {
  return lock_bounded(rw, deadline, NULL);
}

int loom_rwmutex_lock_ctx(loom_rwmutex *rw, loom_ctx *ctx) {
  return lock_bounded(rw, 0, ctx);
}

int loom_rwmutex_trylock(loom_rwmutex *rw) {
  if (rw == NULL)
    return -EINVAL;
  if (loom_mutex_trylock(&rw->w_) != 0)
    return -EBUSY;
  /* No readers (and no writer before us still giving the count back):
   * take it as loom_rwmutex_lock does, with nobody to wait for. */
  uint64_t s = load(rw);
  while (readers(s) == 0)
    if (cas(rw, &s, word(-RW_MAX, 0)))
      return 0;
  loom_mutex_unlock(&rw->w_);
  return -EBUSY;
}

void loom_rwmutex_unlock(loom_rwmutex *rw) {
  /* Negative only while write-locked; only the holder gives it back. */
  uint64_t s = load(rw);
  if (readers(s) >= 0)
    loom__throw("rwmutex_unlock: not write-locked");
  loom_mutex_unlock(&rw->w_);
  loom_sema *rs = &rw->reader_sem_;
  for (;;) {
    if (readers(s) == -RW_MAX) {
      /* Nobody counted: this CAS is our last touch of *rw. */
      if (cas(rw, &s, word(0, departing(s))))
        return;
      continue;
    }
    loom__spin_lock(&rs->q_.lock_);
    s = load(rw);
    if (readers(s) == -RW_MAX) { /* they all gave up meanwhile */
      loom__spin_unlock(&rs->q_.lock_);
      continue;
    }
    /* Some reader is counted; more may count themselves in, none out. */
    while (!cas(rw, &s, word(readers(s) + RW_MAX, departing(s))))
      ;
    release_units(rs, readers(s) + RW_MAX); /* drops the lock */
    return;
  }
}
