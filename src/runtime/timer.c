/*
 * timer.c — 4-ary min-heaps of timers, one per P (see timer.h).
 *
 * Go keeps timers per P for the same reasons: adding a timer touches only
 * the local P, an idle M sleeps exactly until the earliest deadline of all
 * Ps, and a thief that finds no Gs runs its victim's due timers, so a
 * busy P cannot delay a timer past the next steal.  A 4-ary heap is
 * shallower than a binary one and its four children share a cache line.
 */
#include "runtime/timer.h"

#include <errno.h>
#include <sched.h>
#include <stdatomic.h>

#include "runtime/alloc.h"

/* A waiter that keeps finding the heap locked yields its CPU now and
 * then (every 1024 pauses), in case the holder's thread was preempted. */
static void lock(loom__timers *ts) {
  unsigned spins = 0;
  for (;;) {
    if (!atomic_exchange_explicit(&ts->lock, 1, memory_order_acquire))
      return;
    while (atomic_load_explicit(&ts->lock, memory_order_relaxed))
      if ((++spins & 1023) == 0)
        sched_yield();
      else
        __builtin_ia32_pause();
  }
}

static void unlock(loom__timers *ts) {
  atomic_store_explicit(&ts->lock, 0, memory_order_release);
}

void loom__timers_init(loom__timers *ts) {
  atomic_init(&ts->lock, 0);
  ts->h = NULL;
  ts->len = ts->cap = 0;
  atomic_init(&ts->timer0, 0);
}

void loom__timers_close(loom__timers *ts) {
  lock(ts);
  for (int i = 0; i < ts->len; i++) {
    ts->h[i]->idx = -1;
    atomic_store_explicit(&ts->h[i]->heap, NULL, memory_order_release);
  }
  atomic_store_explicit(&ts->timer0, 0, memory_order_relaxed);
  unlock(ts);
}

void loom__timers_destroy(loom__timers *ts) {
  /* A pending timer will never run: its done hook says so now (a
   * context's armed deadline holds a reference that only done gives
   * back, and the context may be released after the runtime is gone). */
  for (int i = 0; i < ts->len; i++) {
    loom__timer *t = ts->h[i];
    atomic_store_explicit(&t->heap, NULL, memory_order_relaxed);
    if (t->done != NULL)
      t->done(t->arg);
  }
  loom__free(ts->h);
  ts->h = NULL;
  ts->len = ts->cap = 0;
}

int loom__timers_reserve(loom__timers *ts, int n) {
  /* Only the owner adds, so len cannot grow behind our back; thieves
   * running timers only shrink it.  Allocate unlocked, swap locked. */
  lock(ts);
  int len = ts->len, cap = ts->cap;
  unlock(ts);
  if (len + n <= cap)
    return 0;
  int ncap = cap ? cap * 2 : 64;
  while (ncap < len + n)
    ncap *= 2;
  loom__timer **h = loom__malloc((size_t)ncap * sizeof *h);
  if (h == NULL)
    return -ENOMEM;
  lock(ts);
  for (int i = 0; i < ts->len; i++)
    h[i] = ts->h[i];
  loom__timer **old = ts->h;
  ts->h = h;
  ts->cap = ncap;
  unlock(ts);
  loom__free(old);
  return 0;
}

static void set(loom__timers *ts, int i, loom__timer *t) {
  ts->h[i] = t;
  t->idx = i;
}

static void siftup(loom__timers *ts, int i) {
  loom__timer *t = ts->h[i];
  while (i > 0) {
    int parent = (i - 1) / 4;
    if (ts->h[parent]->when <= t->when)
      break;
    set(ts, i, ts->h[parent]);
    i = parent;
  }
  set(ts, i, t);
}

static void siftdown(loom__timers *ts, int i) {
  loom__timer *t = ts->h[i];
  for (;;) {
    int c = 4 * i + 1;
    if (c >= ts->len)
      break;
    int best = c;
    int end = c + 4 < ts->len ? c + 4 : ts->len;
    for (int j = c + 1; j < end; j++)
      if (ts->h[j]->when < ts->h[best]->when)
        best = j;
    if (ts->h[best]->when >= t->when)
      break;
    set(ts, i, ts->h[best]);
    i = best;
  }
  set(ts, i, t);
}

static void publish(loom__timers *ts) {
  atomic_store_explicit(&ts->timer0, ts->len ? ts->h[0]->when : 0,
                        memory_order_relaxed);
}

/* Remove the entry at i; lock held. */
static void remove_at(loom__timers *ts, int i) {
  loom__timer *t = ts->h[i];
  int last = --ts->len;
  if (i != last) {
    set(ts, i, ts->h[last]);
    if (i > 0 && ts->h[i]->when < ts->h[(i - 1) / 4]->when)
      siftup(ts, i);
    else
      siftdown(ts, i);
  }
  t->idx = -1;
  atomic_store_explicit(&t->heap, NULL, memory_order_release);
}

void loom__timer_add(loom__timers *ts, loom__timer *t, int64_t when) {
  if (when <= 0)
    when = 1; /* 0 means "no timer" in timer0 */
  t->when = when;
  lock(ts);
  int i = ts->len++;
  ts->h[i] = t;
  t->idx = i;
  siftup(ts, i);
  atomic_store_explicit(&t->heap, ts, memory_order_release);
  publish(ts);
  unlock(ts);
}

bool loom__timer_del(loom__timer *t) {
  /* A firing may be running even when the stop took the timer out of a
   * heap: it was armed again as that firing's fn ran. */
  bool stopped = loom__timer_stop(t);
  while (atomic_load_explicit(&t->running, memory_order_acquire))
    sched_yield(); /* fn is a few hundred instructions */
  return stopped;
}

bool loom__timer_stop(loom__timer *t) {
  for (;;) {
    loom__timers *ts = atomic_load_explicit(&t->heap, memory_order_acquire);
    if (ts == NULL)
      return false;
    lock(ts);
    if (atomic_load_explicit(&t->heap, memory_order_relaxed) == ts) {
      remove_at(ts, t->idx);
      publish(ts);
      unlock(ts);
      return true;
    }
    unlock(ts);
  }
}

int64_t loom__timers_run(loom__timers *ts, int64_t now) {
  int64_t next;
  lock(ts);
  while (ts->len > 0 && ts->h[0]->when <= now) {
    loom__timer *t = ts->h[0];
    /* A count, not a flag: a timer re-added while its fn still runs
     * (loom_sleep does not wait for it) may start again on another
     * thread, and the first to finish must not clear the second's mark. */
    atomic_fetch_add_explicit(&t->running, 1, memory_order_relaxed);
    remove_at(ts, 0); /* publishes heap = NULL with release */
    publish(ts);
    unlock(ts);
    void (*done)(void *) = t->done; /* t may be gone after the count */
    void *arg = t->arg;
    t->fn(t, arg);
    atomic_fetch_sub_explicit(&t->running, 1, memory_order_release);
    if (done != NULL)
      done(arg);
    lock(ts);
  }
  next = ts->len ? ts->h[0]->when : 0;
  unlock(ts);
  return next;
}

int loom__timers_len(loom__timers *ts) {
  lock(ts);
  int n = ts->len;
  unlock(ts);
  return n;
}
