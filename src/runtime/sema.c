/* sema.c — the runtime's FIFO binary semaphore (see sema.h). */
#include "runtime/sema.h"

#include <stdatomic.h>

#include "runtime/runtime.h"

static void lock(loom__sema *s) {
  while (atomic_exchange_explicit(&s->lock, 1, memory_order_acquire))
    while (atomic_load_explicit(&s->lock, memory_order_relaxed))
      __builtin_ia32_pause();
}

static void unlock(loom__sema *s) {
  atomic_store_explicit(&s->lock, 0, memory_order_release);
}

static bool unlock_commit(loom__g *g, void *arg) {
  (void)g;
  unlock(arg);
  return true;
}

/* With s locked and held by another: queue w and park until a release
 * hands s over or a cancel takes w out.  Returns unlocked. */
static void wait_turn(loom__sema *s, loom__sema_waiter *w) {
  loom__g *g = loom__getg();
  if (g == NULL)
    loom__throw("sema_acquire: not on a coroutine");
  w->g = g;
  w->next = NULL;
  w->state = LOOM__SEMA_QUEUED;
  if (s->tail != NULL)
    s->tail->next = w;
  else
    s->head = w;
  s->tail = w;
  /* The lock is released once g is off its stack; the releaser (or a
   * cancel) then sets w's state and readies g. */
  loom__park(unlock_commit, s, "sema");
}

void loom__sema_acquire(loom__sema *s) {
  lock(s);
  if (!s->held) {
    s->held = true;
    unlock(s);
    return;
  }
  loom__sema_waiter w;
  wait_turn(s, &w);
}

/* With s locked: hand it to the first waiter, or free it.  Returns
 * unlocked. */
static void hand_off(loom__sema *s) {
  if (!s->held) /* a release without an acquire: a caller's bug */
    loom__throw("sema_release: not held");
  loom__sema_waiter *w = s->head;
  if (w == NULL) {
    s->held = false;
    unlock(s);
    return;
  }
  s->head = w->next;
  if (s->head == NULL)
    s->tail = NULL;
  w->state = LOOM__SEMA_HELD;
  loom__g *g = w->g; /* w lives on g's stack: read before the unlock */
  unlock(s);
  loom__ready(g); /* held stays true: it is g's now */
}

void loom__sema_release(loom__sema *s) {
  lock(s);
  hand_off(s);
}

bool loom__sema_acquire_c(loom__sema *s, loom__sema_waiter *w) {
  lock(s);
  if (w->state == LOOM__SEMA_CANCELLED) {
    unlock(s);
    return false;
  }
  if (!s->held) {
    s->held = true;
    w->state = LOOM__SEMA_HELD;
    unlock(s);
    return true;
  }
  wait_turn(s, w);
  /* Woken: the state was set under the lock before the wake-up. */
  return w->state == LOOM__SEMA_HELD;
}

void loom__sema_release_c(loom__sema *s, loom__sema_waiter *w) {
  lock(s);
  w->state = LOOM__SEMA_IDLE;
  hand_off(s);
}

bool loom__sema_cancel(loom__sema *s, loom__sema_waiter *w) {
  lock(s);
  int st = w->state;
  if (st == LOOM__SEMA_HELD) {
    unlock(s);
    return false;
  }
  w->state = LOOM__SEMA_CANCELLED;
  loom__g *g = NULL;
  if (st == LOOM__SEMA_QUEUED) {
    loom__sema_waiter **pp = &s->head, *prev = NULL;
    while (*pp != w) {
      prev = *pp;
      pp = &(*pp)->next;
    }
    *pp = w->next;
    if (s->tail == w)
      s->tail = prev;
    g = w->g;
  }
  unlock(s);
  if (g != NULL)
    loom__ready(g);
  return true;
}
