/*
 * runq.c — run queues: each P's lock-free ring and the global queue.
 *
 * A P's ring (Go's runq) has one producer, the P's owner, and many
 * consumers: the owner and thieves, who take from the head with a CAS.
 * The owner publishes a slot with a release store of the tail; consumers
 * read the tail with acquire.  When the ring is full, the owner moves half
 * of it, plus the G at hand, to the global queue in one batch, so a
 * spawn storm on one P spreads instead of failing.
 *
 * `runnext` holds the G to run next, ahead of the ring: a G readied by
 * the running one (the other side of a ping-pong, a freshly spawned
 * child) runs in the time slice of its waker instead of waiting behind
 * the whole queue.  Thieves take runnext only as a last resort.  Two Gs
 * that ready each other (a ping-pong over unbuffered channels) would
 * keep runnext full for as long as they like, and the ring would wait
 * for ever: after LOOM_RUNNEXT_STREAK Gs in a row from runnext, the
 * ring's head goes first.  (Go bounds such a chain by the time slice it
 * inherits, and preempts it.)
 *
 * The only P of a runtime (`sole`) has no thieves: its owner takes from
 * its ring and runnext with plain stores, two lock-prefixed instructions
 * fewer per switch.
 */
#include <errno.h>
#include <stdatomic.h>
#include <time.h>

#include "runtime/alloc.h"
#include "runtime/runtime.h"

#define N LOOM_RUNQ_SIZE

static uint32_t load_acq(_Atomic uint32_t *a) {
  return atomic_load_explicit(a, memory_order_acquire);
}

static bool cas_rel(_Atomic uint32_t *a, uint32_t old, uint32_t new_) {
  return atomic_compare_exchange_strong_explicit(
      a, &old, new_, memory_order_acq_rel, memory_order_relaxed);
}

static loom__g *slot_get(loom__p *p, uint32_t i) {
  return atomic_load_explicit(&p->runq[i % N], memory_order_relaxed);
}

static void slot_set(loom__p *p, uint32_t i, loom__g *g) {
  atomic_store_explicit(&p->runq[i % N], g, memory_order_relaxed);
}

/* Put g at the tail if the ring has room. */
static inline bool put_ring(loom__p *p, loom__g *g) {
  uint32_t h = load_acq(&p->runqhead);
  uint32_t t = atomic_load_explicit(&p->runqtail, memory_order_relaxed);
  if (t - h >= N)
    return false;
  slot_set(p, t, g);
  atomic_store_explicit(&p->runqtail, t + 1, memory_order_release);
  return true;
}

/* The ring was full: move half of it and `g` to the global queue, unless
 * a thief makes room first.  Out of line, so the common put needs no
 * frame. */
__attribute__((noinline)) static void put_full(loom__rt *rt, loom__p *p,
                                               loom__g *g) {
  loom__g *batch[N / 2 + 1];
  while (!put_ring(p, g)) {
    uint32_t h = load_acq(&p->runqhead);
    uint32_t t = atomic_load_explicit(&p->runqtail, memory_order_relaxed);
    uint32_t n = (t - h) / 2;
    if (t - h < N)
      continue;
    for (uint32_t i = 0; i < n; i++)
      batch[i] = slot_get(p, h + i);
    if (!cas_rel(&p->runqhead, h, h + n))
      continue;
    batch[n] = g;
    pthread_mutex_lock(&rt->lock);
    loom__globrunq_putbatch(rt, batch, n + 1);
    pthread_mutex_unlock(&rt->lock);
    return;
  }
}

void loom__runq_put(loom__rt *rt, loom__p *p, loom__g *g, bool next) {
  if (next) {
    /* Only the owner makes runnext non-NULL (thieves and the owner's get
     * only empty it), so an empty one is ours to fill with a store.  A
     * seq_cst one (an xchg): the caller then reads in loom__wakep whether
     * an M spins, and a spinning M that stops writes nmspinning and then
     * looks at our runnext (findrunnable).  Unless each write is ordered
     * before the read after it, both reads may miss the other's write
     * (x86 lets a load pass an earlier store) and the G waits, with a P
     * idle, until this one parks.  The only P has nobody to wake. */
    if (atomic_load_explicit(&p->runnext, memory_order_relaxed) == NULL) {
      if (p->sole)
        atomic_store_explicit(&p->runnext, g, memory_order_release);
      else
        atomic_store_explicit(&p->runnext, g, memory_order_seq_cst);
      return;
    }
    loom__g *old = atomic_exchange_explicit(&p->runnext, g,
                                            memory_order_acq_rel);
    if (old == NULL)
      return;
    g = old; /* the displaced runnext goes to the tail */
  }
  if (!put_ring(p, g))
    put_full(rt, p, g);
}

static loom__g *take_next(loom__p *p) {
  loom__g *next = atomic_load_explicit(&p->runnext, memory_order_relaxed);
  if (p->sole) { /* no thief: a store takes it */
    if (next != NULL)
      atomic_store_explicit(&p->runnext, NULL, memory_order_relaxed);
    return next;
  }
  if (next != NULL &&
      atomic_compare_exchange_strong_explicit(&p->runnext, &next, NULL,
                                              memory_order_acq_rel,
                                              memory_order_relaxed))
    return next;
  return NULL;
}

static loom__g *take_ring(loom__p *p);

loom__g *loom__runq_get(loom__p *p) {
  loom__g *g;
  if (p->next_streak < LOOM_RUNNEXT_STREAK) {
    g = take_next(p);
    if (g != NULL) {
      p->next_streak++;
      return g;
    }
  }
  p->next_streak = 0;
  g = take_ring(p);
  return g != NULL ? g : take_next(p);
}

static loom__g *take_ring(loom__p *p) {
  for (;;) {
    uint32_t h = load_acq(&p->runqhead);
    uint32_t t = atomic_load_explicit(&p->runqtail, memory_order_relaxed);
    if (t == h)
      return NULL;
    loom__g *g = slot_get(p, h);
    bool took = true;
    if (p->sole) /* no thief: a store takes it */
      atomic_store_explicit(&p->runqhead, h + 1, memory_order_release);
    else
      took = cas_rel(&p->runqhead, h, h + 1);
    if (took) {
      /* The G after it runs next.  Woken in a crowd (a close, a poll),
       * it is cold: each G sits in its own page, so its first touch is a
       * TLB miss, and resuming it walks the frames it parked in, which
       * lie just below the G (a coroutine parked in a channel receive
       * has ~650 bytes of them).  Start the walk and fetch those lines
       * while `g` runs.  Addresses only, nothing is read: the G may be
       * stolen, finish and be unmapped meanwhile, and a prefetch cannot
       * fault. */
      if (t - h > 1) {
        const char *g1 = (const char *)slot_get(p, h + 1);
        __builtin_prefetch(g1);
        for (int k = 1; k <= 12; k++)
          __builtin_prefetch(g1 - 64 * k);
      }
      return g;
    }
  }
}

bool loom__runq_empty(loom__p *p) {
  for (;;) {
    uint32_t h = load_acq(&p->runqhead);
    uint32_t t = load_acq(&p->runqtail);
    /* seq_cst: after a spinning M's nmspinning write (see runq_put). */
    loom__g *next = atomic_load_explicit(&p->runnext, memory_order_seq_cst);
    if (t == load_acq(&p->runqtail))
      return h == t && next == NULL;
  }
}

uint32_t loom__runq_len(loom__p *p) {
  uint32_t h = load_acq(&p->runqhead);
  uint32_t t = load_acq(&p->runqtail);
  uint32_t n = t - h;
  return n > N ? 0 : n;
}

/* Copy half of victim's ring into p's ring starting at p's tail. */
static uint32_t runq_grab(loom__p *p, loom__p *victim,
                          enum loom__steal_next stealnext) {
  uint32_t base = atomic_load_explicit(&p->runqtail, memory_order_relaxed);
  for (;;) {
    uint32_t h = load_acq(&victim->runqhead);
    uint32_t t = load_acq(&victim->runqtail);
    uint32_t n = t - h;
    n = n - n / 2;
    if (n == 0) {
      if (stealnext == LOOM__STEAL_RING)
        return 0;
      loom__g *next = atomic_load_explicit(&victim->runnext,
                                           memory_order_acquire);
      if (next == NULL)
        return 0;
      /* A running victim that has just readied `next` is probably about
       * to park and run it: stealing it now would bounce it, and the
       * channel or lock it works on, between threads.  Sleep first, as
       * Go does (usleep(3)): the kernel's timer slack makes that 50-100
       * us here, and meanwhile this M still counts as spinning, so
       * nobody wakes another M for work the victim will do itself.  A
       * pause loop of about a microsecond in its place left `chan
       * select` (one receiver, four senders, 2 Ps) at 301 ns against
       * 220 ns with the sleep, with 20 times the futex calls (an idle
       * M's sleep and wake-up each); the other channel, sync and spawn
       * cases, and the echo and engine servers' CPU per message, did
       * not move either way.  A victim stuck in one G (steal_stalled)
       * is not about to run anything: its runnext is taken at once. */
      if (stealnext == LOOM__STEAL_NEXT &&
          atomic_load_explicit(&victim->status, memory_order_relaxed) ==
              P_RUNNING) {
        int saved = errno;
        struct timespec ts = {0, 3000};
        (void)nanosleep(&ts, NULL);
        errno = saved;
      }
      if (!atomic_compare_exchange_strong_explicit(
              &victim->runnext, &next, NULL, memory_order_acq_rel,
              memory_order_relaxed))
        continue;
      slot_set(p, base, next);
      return 1;
    }
    if (n > N / 2)
      continue; /* read an inconsistent h/t pair */
    for (uint32_t i = 0; i < n; i++)
      slot_set(p, base + i, slot_get(victim, h + i));
    if (cas_rel(&victim->runqhead, h, h + n))
      return n;
  }
}

loom__g *loom__runq_steal(loom__p *p, loom__p *victim,
                          enum loom__steal_next stealnext) {
  uint32_t t = atomic_load_explicit(&p->runqtail, memory_order_relaxed);
  uint32_t n = runq_grab(p, victim, stealnext);
  if (n == 0)
    return NULL;
  n--;
  loom__g *g = slot_get(p, t + n);
  if (n > 0)
    atomic_store_explicit(&p->runqtail, t + n, memory_order_release);
  return g;
}

/* The global queue is a ring of pointers, so moving Gs in and out in
 * batches never touches the Gs themselves.  When the ring cannot grow
 * (out of memory), Gs queue behind it on a list: nothing is dropped. */
static bool gq_grow(loom__rt *rt, uint64_t need) {
  uint64_t len = rt->gq_len;
  uint64_t cap = rt->gq_cap ? rt->gq_cap : 1024;
  while (cap < len + need)
    cap *= 2;
  loom__g **q = loom__malloc(cap * sizeof *q);
  if (q == NULL)
    return false;
  for (uint64_t i = 0; i < len && rt->gq_cap != 0; i++)
    q[i] = rt->gq[(rt->gq_head + i) % rt->gq_cap];
  loom__free(rt->gq);
  rt->gq = q;
  rt->gq_cap = cap;
  rt->gq_head = 0;
  return true;
}

int loom__globrunq_init(loom__rt *rt) { return gq_grow(rt, 1) ? 0 : -ENOMEM; }

void loom__globrunq_put(loom__rt *rt, loom__g *g) {
  loom__globrunq_putbatch(rt, &g, 1);
}

void loom__globrunq_putbatch(loom__rt *rt, loom__g *const *gs, uint64_t n) {
  uint64_t i = 0;
  if (rt->gq_spill == NULL &&
      (rt->gq_len + n <= rt->gq_cap || gq_grow(rt, n))) {
    for (; i < n; i++)
      rt->gq[(rt->gq_head + rt->gq_len + i) % rt->gq_cap] = gs[i];
    rt->gq_len += n;
  }
  for (; i < n; i++) {
    gs[i]->schedlink = NULL;
    if (rt->gq_spill_tail != NULL)
      rt->gq_spill_tail->schedlink = gs[i];
    else
      rt->gq_spill = gs[i];
    rt->gq_spill_tail = gs[i];
  }
  atomic_fetch_add_explicit(&rt->runqsize, n, memory_order_relaxed);
}

static loom__g *gq_pop(loom__rt *rt) {
  if (rt->gq_len > 0) {
    loom__g *g = rt->gq[rt->gq_head];
    rt->gq_head = (rt->gq_head + 1) % rt->gq_cap;
    rt->gq_len--;
    return g;
  }
  loom__g *g = rt->gq_spill;
  rt->gq_spill = g->schedlink;
  if (rt->gq_spill == NULL)
    rt->gq_spill_tail = NULL;
  return g;
}

loom__g *loom__globrunq_get(loom__rt *rt, loom__p *p, int max) {
  uint64_t size = atomic_load_explicit(&rt->runqsize, memory_order_relaxed);
  if (size == 0)
    return NULL;
  uint64_t n = size / (uint64_t)rt->nprocs + 1;
  if (n > size)
    n = size;
  if (max > 0 && n > (uint64_t)max)
    n = (uint64_t)max;
  uint64_t room = N - loom__runq_len(p);
  if (n > room / 2 + 1)
    n = room / 2 + 1;
  atomic_fetch_sub_explicit(&rt->runqsize, n, memory_order_relaxed);
  loom__g *g = gq_pop(rt);
  for (uint64_t i = 1; i < n; i++)
    loom__runq_put(rt, p, gq_pop(rt), false);
  return g;
}
