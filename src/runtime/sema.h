/*
 * sema.h — a binary semaphore for coroutines, FIFO, never parks a thread.
 *
 * The runtime's own lock for sections that may park (one reader of a
 * connection at a time, one writer).  A zeroed loom__sema is free.
 * Waiters queue in arrival order and the releaser hands the semaphore
 * straight to the first of them, so none can be overtaken.
 */
#ifndef LOOM_RUNTIME_SEMA_H
#define LOOM_RUNTIME_SEMA_H

#include <stdbool.h>

struct loom__g;

typedef struct loom__sema {
  _Atomic int lock;            /* spinlock over the fields below */
  bool held;
  struct loom__g *head, *tail; /* waiters, linked by schedlink */
} loom__sema;

/* Take it, parking the coroutine while another holds it. */
void loom__sema_acquire(loom__sema *s);
void loom__sema_release(loom__sema *s);

#endif
