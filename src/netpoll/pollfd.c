/*
 * pollfd.c — poll descriptors: the waiter state machine, deadlines and
 * the pool (see pollfd.h for the states and the rules).
 */
#include "netpoll/pollfd.h"

#include <errno.h>
#include <stdatomic.h>
#include <string.h>

#include "runtime/alloc.h"
#include "runtime/runtime.h"
#include "sync/wait.h"

#define TAG_SHIFT 48
#define PD_BLOCK 64

struct pd_block {
  struct pd_block *next;
  loom__pd pd[PD_BLOCK];
};

/* Held for a few instructions; a waiter that keeps finding it held backs
 * off to yielding its CPU, in case the holder's thread was preempted
 * (two cores, a plain thread setting deadlines in a loop). */
static void pd_lock(loom__pd *pd) {
  unsigned spins = 1;
  while (atomic_exchange_explicit(&pd->lock, 1, memory_order_acquire))
    while (atomic_load_explicit(&pd->lock, memory_order_relaxed))
      loom__backoff(&spins);
}

static void pd_unlock(loom__pd *pd) {
  atomic_store_explicit(&pd->lock, 0, memory_order_release);
}

static _Atomic uintptr_t *waiter(loom__pd *pd, int mode) {
  return mode == 'r' ? &pd->rg : &pd->wg;
}

/* ---- the pool ------------------------------------------------------ */

static void rd_fire(loom__timer *t, void *arg);
static void wd_fire(loom__timer *t, void *arg);

static loom__pd *pd_alloc(loom__rt *rt) {
  pthread_mutex_lock(&rt->pd_lock);
  if (rt->pd_free == NULL) {
    struct pd_block *b = loom__calloc(1, sizeof *b);
    if (b == NULL) {
      pthread_mutex_unlock(&rt->pd_lock);
      return NULL;
    }
    b->next = rt->pd_blocks;
    rt->pd_blocks = b;
    for (int i = PD_BLOCK - 1; i >= 0; i--) {
      b->pd[i].owner = rt;
      /* Set once: a deadline timer may still be running (reading these)
       * while its deadline is re-armed. */
      b->pd[i].rt.fn = rd_fire;
      b->pd[i].rt.arg = &b->pd[i];
      b->pd[i].wt.fn = wd_fire;
      b->pd[i].wt.arg = &b->pd[i];
      b->pd[i].link = rt->pd_free;
      rt->pd_free = &b->pd[i];
    }
  }
  loom__pd *pd = rt->pd_free;
  rt->pd_free = pd->link;
  pthread_mutex_unlock(&rt->pd_lock);
  return pd;
}

static void pd_release(loom__pd *pd) {
  loom__rt *rt = pd->owner;
  pthread_mutex_lock(&rt->pd_lock);
  pd->link = rt->pd_free;
  rt->pd_free = pd;
  pthread_mutex_unlock(&rt->pd_lock);
}

void loom__pd_pool_destroy(loom__rt *rt) {
  struct pd_block *b = rt->pd_blocks;
  while (b != NULL) {
    struct pd_block *next = b->next;
    loom__free(b);
    b = next;
  }
  rt->pd_blocks = NULL;
  rt->pd_free = NULL;
}

bool loom__pd_hungup(loom__pd *pd) {
  return atomic_load_explicit(&pd->hangup, memory_order_acquire);
}

uintptr_t loom__pd_cookie(loom__pd *pd) {
  uintptr_t p = (uintptr_t)pd;
  uint32_t seq = atomic_load_explicit(&pd->fdseq, memory_order_relaxed);
  return p | ((uintptr_t)(seq & 0xffff) << TAG_SHIFT);
}

/* ---- the waiter words ---------------------------------------------- */

/* Notifier side.  Returns the G to make runnable, or NULL. */
static loom__g *unblock(loom__pd *pd, int mode, bool ioready) {
  _Atomic uintptr_t *gpp = waiter(pd, mode);
  for (;;) {
    uintptr_t old = atomic_load_explicit(gpp, memory_order_acquire);
    if (old == PD_READY)
      return NULL;
    if (old == PD_NIL && !ioready)
      return NULL;
    uintptr_t new_ = ioready ? PD_READY : PD_NIL;
    /* seq_cst: against loom__pd_either's store and load (the same
     * instruction on x86 as acq_rel). */
    if (atomic_compare_exchange_weak_explicit(
            gpp, &old, new_, memory_order_seq_cst, memory_order_acquire)) {
      if (old == PD_WAIT || old == PD_NIL)
        return NULL;
      atomic_fetch_sub_explicit(&pd->owner->netpoll_waiters, 1,
                                memory_order_relaxed);
      return (loom__g *)old;
    }
  }
}

struct commit_arg {
  _Atomic uintptr_t *gpp;
};

static bool block_commit(loom__g *g, void *arg) {
  _Atomic uintptr_t *gpp = ((struct commit_arg *)arg)->gpp;
  uintptr_t expect = PD_WAIT;
  loom__rt *rt = loom__rt_get();
  /* Count first: a poller that sees the G must also see a waiter. */
  atomic_fetch_add_explicit(&rt->netpoll_waiters, 1, memory_order_relaxed);
  if (atomic_compare_exchange_strong_explicit(gpp, &expect, (uintptr_t)g,
                                              memory_order_acq_rel,
                                              memory_order_acquire))
    return true;
  atomic_fetch_sub_explicit(&rt->netpoll_waiters, 1, memory_order_relaxed);
  return false; /* readiness or a wake-up came first: do not sleep */
}

void loom__pd_consume(loom__pd *pd, int mode) {
  _Atomic uintptr_t *gpp = waiter(pd, mode);
  uintptr_t v = PD_READY;
  if (atomic_load_explicit(gpp, memory_order_relaxed) == PD_READY)
    atomic_compare_exchange_strong_explicit(gpp, &v, PD_NIL,
                                            memory_order_acq_rel,
                                            memory_order_relaxed);
}

/* Store the deadline of `mode` (under pd's lock), and whether it has
 * passed where loom__pd_expired reads it. */
static void set_slot(loom__pd *pd, int mode, int64_t d) {
  unsigned bit = mode == 'r' ? 1u : 2u;
  *(mode == 'r' ? &pd->rd : &pd->wd) = d;
  if (d < 0)
    atomic_fetch_or_explicit(&pd->expired, bit, memory_order_release);
  else if (atomic_load_explicit(&pd->expired, memory_order_relaxed) & bit)
    atomic_fetch_and_explicit(&pd->expired, ~bit, memory_order_release);
}

/* The bit of `expired` that marks a direction cut by a context. */
static unsigned cut_bit(int mode) { return mode == 'r' ? 4u : 8u; }

bool loom__pd_expired(loom__pd *pd, int mode) {
  return atomic_load_explicit(&pd->expired, memory_order_acquire) &
         (mode == 'r' ? 1u | 4u : 2u | 8u);
}

/* 0: nothing wrong; else why a wait must fail now. */
int loom__pd_check(loom__pd *pd, int mode) {
  pd_lock(pd);
  int err = 0;
  if (pd->closing)
    err = LOOM_ECLOSED;
  else if ((mode == 'r' ? pd->rd : pd->wd) < 0 ||
           (atomic_load_explicit(&pd->expired, memory_order_relaxed) &
            cut_bit(mode)))
    err = -ETIMEDOUT;
  pd_unlock(pd);
  return err;
}

/* Waiter side: true if woken by readiness. */
static bool block(loom__pd *pd, int mode) {
  _Atomic uintptr_t *gpp = waiter(pd, mode);
  for (;;) {
    uintptr_t v = PD_READY;
    if (atomic_compare_exchange_strong_explicit(gpp, &v, PD_NIL,
                                                memory_order_acq_rel,
                                                memory_order_acquire))
      return true;
    v = PD_NIL;
    if (atomic_compare_exchange_strong_explicit(gpp, &v, PD_WAIT,
                                                memory_order_acq_rel,
                                                memory_order_acquire))
      break;
    if (v != PD_READY && v != PD_NIL)
      loom__throw("pd_wait: two coroutines wait on one fd in one direction");
  }
  /* A deadline or a close that landed after our check but before
   * PD_WAIT was visible found no waiter: check again before parking. */
  if (loom__pd_check(pd, mode) == 0) {
    struct commit_arg ca = {gpp};
    loom__getg()->io_streak = 0; /* parking is a scheduling point */
    loom__park(block_commit, &ca, "io wait");
  }
  uintptr_t old = atomic_exchange_explicit(gpp, PD_NIL, memory_order_acq_rel);
  if (old > PD_WAIT)
    loom__throw("pd_wait: woken with a waiter still recorded");
  return old == PD_READY;
}

int loom__pd_wait(loom__pd *pd, int mode) {
  for (;;) {
    int err = loom__pd_check(pd, mode);
    if (err != 0)
      return err;
    if (block(pd, mode))
      return 0;
  }
}

/* ---- sleepers ------------------------------------------------------ */

/* Wake every sleeper, after a change to what they look at (closing,
 * the write deadline) made under pd's lock and released: a sleeper
 * queues itself before it looks at that state, both under slock, so
 * either it sees the change or it is found here. */
static void wake_sleepers(loom__pd *pd) {
  loom__wnode *first = NULL, **tail = &first, *n;
  loom__spin_lock(&pd->slock);
  while ((n = loom__waitq_pop(&pd->wsleep)) != NULL) {
    *tail = n;
    tail = &n->next;
  }
  *tail = NULL;
  loom__spin_unlock(&pd->slock);
  while (first != NULL) {
    n = first->next; /* first is gone once its waiter runs */
    loom__waiter_wake(first->w);
    first = n;
  }
}

void loom__pd_wake(loom__pd *pd) { wake_sleepers(pd); }

/* A sleep taken back (loom__abandon): off the queue. */
static bool withdraw_sleep(loom__waiter *w) {
  loom__pd *pd = w->obj;
  return loom__waitq_take_back(&pd->slock, &pd->wsleep, w->node);
}
static const loom__abandon abandon_sleep = {withdraw_sleep, NULL};

int loom__pd_sleep(loom__pd *pd, int64_t until, struct loom_ctx *ctx) {
  loom__m *m = loom__getm();
  if (m == NULL || m->p == NULL)
    loom__throw("pd_sleep: not on a coroutine, or inside "
                "loom_block_enter/exit");
  loom__waiter w;
  loom__waiter_init(&w, false);
  loom__wnode n = {.w = &w};
  loom__spin_lock(&pd->slock);
  loom__waitq_push(&pd->wsleep, &n);
  int err = loom__pd_check(pd, 'w');
  if (err != 0) {
    loom__waitq_unlink(&pd->wsleep, &n);
    loom__spin_unlock(&pd->slock);
    return err;
  }
  loom__waiter_watch(&w, &abandon_sleep, pd, &n);
  loom__waiter_wait_unlock(&w, &pd->slock, until, ctx);
  loom__waiter_unwatch(&w);
  loom__spin_lock(&pd->slock);
  loom__waitq_unlink(&pd->wsleep, &n); /* if its timer ended it */
  loom__spin_unlock(&pd->slock);
  if (w.fired == LOOM__FIRED_NOMEM || w.fired == LOOM__FIRED_CANCEL)
    return loom__waiter_err(&w, ctx);
  return loom__pd_check(pd, 'w');
}

/* ---- deadlines ------------------------------------------------------ */

static void deadline_fire(loom__pd *pd, int mode, loom__timer *t) {
  (void)t;
  pd_lock(pd);
  uint32_t seq = mode == 'r' ? pd->rseq : pd->wseq;
  uint32_t armed = mode == 'r' ? pd->rseq_armed : pd->wseq_armed;
  int64_t d = mode == 'r' ? pd->rd : pd->wd;
  /* A stale timer: the deadline moved since.  The sequence numbers catch
   * a timer that fires after the move; a timer already running, and
   * waiting for our lock while the deadline was moved and re-armed,
   * sees the new sequence numbers, but not a new deadline that is due. */
  if (seq != armed || pd->closing || d <= 0 || d > loom_now()) {
    pd_unlock(pd);
    return;
  }
  set_slot(pd, mode, -1);
  loom__g *g = unblock(pd, mode, false);
  pd_unlock(pd);
  if (g != NULL)
    loom__ready(g);
  if (mode == 'w')
    wake_sleepers(pd);
}

static void rd_fire(loom__timer *t, void *arg) { deadline_fire(arg, 'r', t); }
static void wd_fire(loom__timer *t, void *arg) { deadline_fire(arg, 'w', t); }

static loom__g *set_one(loom__pd *pd, loom__timers *heap, int mode, int64_t d,
                        int64_t now) {
  loom__timer *t = mode == 'r' ? &pd->rt : &pd->wt;
  if (mode == 'r')
    pd->rseq++;
  else
    pd->wseq++;
  loom__timer_stop(t); /* we hold pd's lock, which a running fn takes;
                          the sequence number makes that fn a no-op */
  if (d == 0) {
    set_slot(pd, mode, 0);
    return NULL;
  }
  if (d <= now) {
    set_slot(pd, mode, -1);
    return unblock(pd, mode, false);
  }
  set_slot(pd, mode, d);
  if (mode == 'r')
    pd->rseq_armed = pd->rseq;
  else
    pd->wseq_armed = pd->wseq;
  loom__timer_add(heap, t, d);
  return NULL;
}

/* loom__pd_set_deadlines; with `seq`, only if the direction's sequence
 * number is still *seq and the pd is not closing (one direction only:
 * loom__pd_cancel_undo). */
static int set_guarded(loom__pd *pd, int mode, int64_t rd, int64_t wd,
                       const uint32_t *seq) {
  bool r = mode == 'r' || mode == 'r' + 'w';
  bool w = mode == 'w' || mode == 'r' + 'w';
  int64_t now = loom_now();
  int64_t ahead = 0; /* the earlier of the deadlines still ahead */
  if (r && rd > now)
    ahead = rd;
  if (w && wd > now && (ahead == 0 || wd < ahead))
    ahead = wd;
  /* Only a deadline still ahead needs a timer; one in the past (how a
   * close wakes a blocked call) must work without memory, from any
   * thread (a timer stop and a ready work anywhere).  Room for a timer
   * per direction, before either is touched (loom__arm_begin: any
   * thread too). */
  loom__arm a = {.heap = NULL};
  if (ahead != 0) {
    int err = loom__arm_begin(&a, 2);
    if (err != 0)
      return err;
  }
  loom__g *rg = NULL, *wg = NULL;
  pd_lock(pd);
  bool stands =
      seq == NULL || (!pd->closing && (r ? pd->rseq : pd->wseq) == *seq);
  if (r && stands)
    rg = set_one(pd, a.heap, 'r', rd, now);
  if (w && stands)
    wg = set_one(pd, a.heap, 'w', wd, now);
  pd_unlock(pd);
  if (a.heap != NULL) /* wakes an M for the timer, if armed */
    loom__arm_end(&a, stands ? ahead : 0);
  if (!stands)
    return 0;
  if (rg != NULL)
    loom__ready(rg);
  if (wg != NULL)
    loom__ready(wg);
  if (w)
    wake_sleepers(pd); /* each looks at the new deadline */
  return 0;
}

int loom__pd_set_deadlines(loom__pd *pd, int mode, int64_t rd, int64_t wd) {
  return set_guarded(pd, mode, rd, wd, NULL);
}

int loom__pd_set_deadline(loom__pd *pd, int mode, int64_t d) {
  return set_guarded(pd, mode, d, d, NULL);
}

/* Move the deadline of `mode` into the past now, from any thread (no
 * timer needed): a context's cancel uses it to end a blocked call.
 * *was gets the deadline it overwrote, *seq the direction's sequence
 * number after the change (both under the lock, so that an undo can
 * tell whether anybody moved the deadline since).  `cut` also marks the
 * direction cut (loom__pd_cancel). */
static void expire(loom__pd *pd, int mode, bool cut, int64_t *was,
                   uint32_t *seq) {
  pd_lock(pd);
  *was = mode == 'r' ? pd->rd : pd->wd;
  *seq = mode == 'r' ? ++pd->rseq : ++pd->wseq;
  set_slot(pd, mode, -1);
  if (cut)
    atomic_fetch_or_explicit(&pd->expired, cut_bit(mode), memory_order_release);
  loom__timer_stop(mode == 'r' ? &pd->rt : &pd->wt);
  loom__g *g = unblock(pd, mode, false);
  pd_unlock(pd);
  if (g != NULL)
    loom__ready(g);
  if (mode == 'w')
    wake_sleepers(pd);
}

void loom__pd_expire(loom__pd *pd, int mode) {
  int64_t was;
  uint32_t seq;
  expire(pd, mode, false, &was, &seq);
}

void loom__pd_expire_read(void *pd) { loom__pd_expire(pd, 'r'); }
void loom__pd_expire_write(void *pd) { loom__pd_expire(pd, 'w'); }

void loom__pd_cancel_fire(void *arg) {
  loom__pd_cancel *x = arg;
  expire(x->pd, x->mode, true, &x->was, &x->seq);
  x->fired = true;
}

void loom__pd_cancel_clear(loom__pd_cancel *x) {
  atomic_fetch_and_explicit(&x->pd->expired, ~cut_bit(x->mode),
                            memory_order_release);
}

/* Put back the deadline x's expire overwrote, as loom__pd_set_deadline
 * would set it now (one that has passed meanwhile is passed), unless
 * the direction's sequence number moved since: a new deadline, another
 * expire or a close came after ours and stands.  A deadline ahead needs
 * a timer, and so room for it; without it the deadline stays passed, as
 * before the undo. */
int loom__pd_cancel_undo(loom__pd_cancel *x) {
  loom__pd_cancel_clear(x);
  if (x->was < 0)
    return 0; /* it had passed already: the expire changed nothing */
  return set_guarded(x->pd, x->mode, x->was, x->was, &x->seq);
}

/* ---- open, evict, close -------------------------------------------- */

int loom__pd_open(loom__rt *rt, int fd, loom__pd **out) {
  loom__pd *pd = pd_alloc(rt);
  if (pd == NULL)
    return -ENOMEM;
  pd_lock(pd);
  pd->fd = fd;
  pd->closing = false;
  atomic_store_explicit(&pd->hangup, false, memory_order_relaxed);
  atomic_store_explicit(&pd->either, false, memory_order_relaxed);
  pd->rd = pd->wd = 0;
  atomic_store_explicit(&pd->expired, 0, memory_order_relaxed);
  pd->rseq++;
  pd->wseq++;
  atomic_store_explicit(&pd->rg, PD_NIL, memory_order_relaxed);
  atomic_store_explicit(&pd->wg, PD_NIL, memory_order_relaxed);
  atomic_fetch_add_explicit(&pd->fdseq, 1, memory_order_release);
  pd_unlock(pd);
  int err = loom__netpoll_add(&rt->np, fd, loom__pd_cookie(pd));
  if (err != 0) {
    pd_release(pd);
    return err;
  }
  *out = pd;
  return 0;
}

/* A write event either finds `either` set (and wakes the read waiter),
 * or marked the write word ready before our load of it (both sides
 * seq_cst: a store, then a load of the other's word). */
bool loom__pd_either(loom__pd *pd) {
  atomic_store_explicit(&pd->either, true, memory_order_seq_cst);
  return atomic_load_explicit(&pd->wg, memory_order_seq_cst) == PD_READY;
}

void loom__pd_either_off(loom__pd *pd) {
  atomic_store_explicit(&pd->either, false, memory_order_relaxed);
}

void loom__pd_evict(loom__pd *pd) {
  pd_lock(pd);
  pd->closing = true;
  pd->rseq++;
  pd->wseq++;
  loom__g *rg = unblock(pd, 'r', false);
  loom__g *wg = unblock(pd, 'w', false);
  pd_unlock(pd);
  if (rg != NULL)
    loom__ready(rg);
  if (wg != NULL)
    loom__ready(wg);
  wake_sleepers(pd);
}

void loom__pd_close(loom__pd *pd, bool unregister) {
  if (unregister)
    loom__netpoll_del(&pd->owner->np, pd->fd);
  pd_lock(pd);
  pd->closing = true;
  pd->rseq++;
  pd->wseq++;
  pd_unlock(pd);
  loom__timer_del(&pd->rt);
  loom__timer_del(&pd->wt);
  if (atomic_load(&pd->rg) > PD_WAIT || atomic_load(&pd->wg) > PD_WAIT ||
      pd->wsleep.head_ != NULL)
    loom__throw("pd_close: a coroutine still waits on the fd");
  /* Stale events for this fd now carry an old tag. */
  atomic_fetch_add_explicit(&pd->fdseq, 1, memory_order_release);
  pd->fd = -1;
  pd_release(pd);
}

/* ---- poller side ---------------------------------------------------- */

void loom__pd_ready(uintptr_t cookie, int mode, bool hangup, loom__g **gs,
                    int *n) {
  loom__pd *pd =
      (loom__pd *)(cookie & (((uintptr_t)1 << TAG_SHIFT) - 1));
  uint32_t tag = (uint32_t)(cookie >> TAG_SHIFT);
  if ((atomic_load_explicit(&pd->fdseq, memory_order_acquire) & 0xffff) !=
      tag)
    return; /* an event for an fd this pd no longer serves */
  /* Before the wake-ups: a reader woken by this event sees it. */
  if (hangup && !atomic_load_explicit(&pd->hangup, memory_order_relaxed))
    atomic_store_explicit(&pd->hangup, true, memory_order_release);
  loom__g *w = mode == 'w' || mode == 'r' + 'w' ? unblock(pd, 'w', true)
                                                : NULL;
  /* After the write side's word: see loom__pd_either. */
  bool rd = mode == 'r' || mode == 'r' + 'w' ||
            atomic_load_explicit(&pd->either, memory_order_seq_cst);
  loom__g *r = rd ? unblock(pd, 'r', true) : NULL;
  if (r != NULL)
    gs[(*n)++] = r;
  if (w != NULL)
    gs[(*n)++] = w;
}
