/*
 * sema.h — a binary semaphore for coroutines, FIFO, never parks a thread.
 *
 * The runtime's own lock for sections that may park (one reader of a
 * connection at a time, one writer).  A zeroed loom__sema is free.
 * Waiters queue in arrival order and the releaser hands the semaphore
 * straight to the first of them, so none can be overtaken.
 *
 * A wait can be made cancellable: the waiter brings a record,
 * loom__sema_cancel (from any thread: a context's cancel hook) ends its
 * wait if the semaphore is not its yet, and the record remembers the
 * cancel until the waiter takes it back.  The record's state changes
 * under the semaphore's lock only, so a cancel and a hand-off cannot both
 * win.
 */
#ifndef LOOM_RUNTIME_SEMA_H
#define LOOM_RUNTIME_SEMA_H

#include <stdbool.h>

struct loom__g;

typedef struct loom__sema_waiter {
  struct loom__g *g;
  struct loom__sema_waiter *next;
  int state; /* LOOM__SEMA_* */
} loom__sema_waiter;

enum {
  LOOM__SEMA_IDLE,      /* neither waiting nor holding */
  LOOM__SEMA_QUEUED,    /* parked in the queue */
  LOOM__SEMA_HELD,      /* the semaphore is the record's owner's */
  LOOM__SEMA_CANCELLED, /* cancelled: the next acquire_c fails */
};

typedef struct loom__sema {
  _Atomic int lock;              /* spinlock over the fields below */
  bool held;
  loom__sema_waiter *head, *tail; /* waiters, in arrival order */
} loom__sema;

/* Take it, parking the coroutine while another holds it. */
void loom__sema_acquire(loom__sema *s);
void loom__sema_release(loom__sema *s);

/* The cancellable forms, with a record w (state LOOM__SEMA_IDLE to
 * begin with) that outlives every loom__sema_cancel on it.
 * acquire_c: true with the semaphore (w HELD), false if w was cancelled
 * before or while it waited (w CANCELLED).  release_c gives it up and
 * makes w IDLE again, so it can wait anew. */
bool loom__sema_acquire_c(loom__sema *s, loom__sema_waiter *w);
void loom__sema_release_c(loom__sema *s, loom__sema_waiter *w);
/* Cancel w's wait: true if w was not holding s (a queued waiter leaves
 * the queue and is readied; a later acquire_c fails at once), false if
 * it holds s (nothing changes).  Any thread; never parks. */
bool loom__sema_cancel(loom__sema *s, loom__sema_waiter *w);

#endif
