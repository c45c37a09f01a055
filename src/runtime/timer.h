/*
 * timer.h — per-P timer heaps (4-ary, keyed by deadline).
 *
 * A timer belongs to at most one heap at a time.  Adding happens on the
 * P that owns the heap; deleting and running may happen from any thread
 * (a thief runs its victim's expired timers), under the heap's spinlock.
 * `fn` runs without the lock held, on a scheduler path: it must be short
 * and must not park (readying a G is the usual body).  loom__timer_del
 * waits for an `fn` that is running at that moment to finish (Go's
 * deltimer does the same), so after it returns the timer may be reused;
 * `fn` must therefore never delete its own timer.
 */
#ifndef LOOM_RUNTIME_TIMER_H
#define LOOM_RUNTIME_TIMER_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

typedef struct loom__timer loom__timer;
typedef struct loom__timers loom__timers;

struct loom__timer {
  int64_t when;                   /* loom_now() deadline */
  void (*fn)(loom__timer *t, void *arg);
  void *arg;
  /* Optional: called with `arg` once fn has returned and the timer is
   * no longer touched, so it may free what holds the timer (a context
   * whose armed deadline owns a reference to it). */
  void (*done)(void *arg);
  _Atomic(loom__timers *) heap;   /* heap holding it, NULL if not pending */
  int32_t idx;                    /* position in that heap */
  _Atomic int running;            /* fns executing now (see timer_del) */
};

struct loom__timers {
  _Atomic int lock;               /* spinlock over h/len/cap */
  loom__timer **h;
  int len, cap;
  _Atomic int64_t timer0;         /* earliest deadline, 0 if empty;
                                     read lock-free by every scheduler */
};

void loom__timers_init(loom__timers *ts);
/* The heap's end, in two steps: close marks every pending timer out of
 * any heap (a loom__timer_stop after it finds none there, and touches
 * nothing), and no timer may be added, run or stopped meanwhile; destroy
 * then tells each pending timer it never runs (its done hook), and frees
 * the heap. */
void loom__timers_close(loom__timers *ts);
void loom__timers_destroy(loom__timers *ts);
/* Make room for `n` more timers (only the owning P adds). -ENOMEM. */
int loom__timers_reserve(loom__timers *ts, int n);
/* Add `t` to fire at `when`; room must have been reserved. */
void loom__timer_add(loom__timers *ts, loom__timer *t, int64_t when);
/* Remove `t` if pending; true if this call stopped it from firing.  If
 * its fn is running, waits for it to return. */
bool loom__timer_del(loom__timer *t);
/* Like loom__timer_del but never waits: a running fn may still be
 * running.  For callers that hold a lock fn takes (and so rely on a
 * sequence number to make a late fn harmless). */
bool loom__timer_stop(loom__timer *t);
/* Run every timer due at `now`; returns the next deadline (0: none). */
int64_t loom__timers_run(loom__timers *ts, int64_t now);
int loom__timers_len(loom__timers *ts);

static inline int64_t loom__timers_next(loom__timers *ts) {
  return atomic_load_explicit(&ts->timer0, memory_order_relaxed);
}

#endif
