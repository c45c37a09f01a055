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

void loom__sema_acquire(loom__sema *s) {
  lock(s);
  if (!s->held) {
    s->held = true;
    unlock(s);
    return;
  }
  loom__g *g = loom__getg();
  if (g == NULL)
    loom__throw("sema_acquire: not on a coroutine");
  g->schedlink = NULL;
  if (s->tail != NULL)
    s->tail->schedlink = g;
  else
    s->head = g;
  s->tail = g;
  /* The lock is released once g is off its stack; the releaser then
   * hands `held` over to it and readies it. */
  loom__park(unlock_commit, s, "sema");
}

void loom__sema_release(loom__sema *s) {
  lock(s);
  loom__g *g = s->head;
  if (g == NULL) {
    s->held = false;
    unlock(s);
    return;
  }
  s->head = g->schedlink;
  if (s->head == NULL)
    s->tail = NULL;
  unlock(s);
  loom__ready(g); /* held stays true: it is g's now */
}
