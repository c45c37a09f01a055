/*
 * loom/sync.h — mutex, counting semaphore, wait group, once, condition
 * variable: Go's sync package for coroutines.
 *
 * Waiting parks the coroutine, never its thread; plain threads of the
 * process may use them too (they block in the kernel).  A zeroed object is
 * a valid, unlocked / empty one (LOOM_MUTEX_INIT and friends say so
 * explicitly); none needs destroying.  The fields are private.
 *
 * Deadlines are absolute loom_now() times; 0 means none.  A wait with a
 * deadline ahead needs a timer: when none can be had, it returns -ENOMEM
 * at once (besides the results each call lists).  Every call that
 * returns int returns -EINVAL for a NULL object (or mutex), touching
 * nothing; the void calls need a valid one.
 */
#ifndef LOOM_SYNC_H
#define LOOM_SYNC_H

#include <stdbool.h>
#include <stdint.h>

#include "loom/common.h"
#include "loom/ctx.h"
#include "loom/error.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Private: a FIFO of waiters and the spinlock over it. */
typedef struct loom_waitq_ {
  void *head_, *tail_;
} loom_waitq_;
typedef struct loom_waitlist_ {
  int lock_;
  loom_waitq_ q_;
} loom_waitlist_;

/*
 * Mutex.  A locker that finds it held spins briefly, then parks (never
 * the thread).  Normal mode lets a running locker take a just-released
 * mutex ahead of the woken waiter (throughput); a waiter that has kept
 * losing for more than 1 ms switches the mutex to starvation mode, in
 * which unlock hands it straight to the first waiter, so no waiter is
 * bypassed forever (Go's sync.Mutex).  Not reentrant; any coroutine may
 * unlock it.
 */
typedef struct loom_mutex {
  uint32_t state_;
  loom_waitlist_ q_;
} loom_mutex;
#define LOOM_MUTEX_INIT {0, {0, {0, 0}}}

/* Parks.  loom_mutex_lock_until returns 0 or -ETIMEDOUT. */
LOOM_API void loom_mutex_lock(loom_mutex *mu);
LOOM_API int loom_mutex_lock_until(loom_mutex *mu, int64_t deadline);
/* Bounded by a context: 0, or loom_ctx_err(ctx) once it is cancelled. */
LOOM_API int loom_mutex_lock_ctx(loom_mutex *mu, loom_ctx *ctx);
/* 0 if taken, -EBUSY if held. */
LOOM_API int loom_mutex_trylock(loom_mutex *mu);
/* Unlocking an unlocked mutex stops the process with a message. */
LOOM_API void loom_mutex_unlock(loom_mutex *mu);

/* Counting semaphore, FIFO: a release goes to the longest waiter. */
typedef struct loom_sema {
  int64_t count_;
  loom_waitlist_ q_;
} loom_sema;
#define LOOM_SEMA_INIT(n) {(n), {0, {0, 0}}}

/* Take one unit, parking while none is left.  0 or -ETIMEDOUT. */
LOOM_API int loom_sema_acquire(loom_sema *s, int64_t deadline);
/* Bounded by a context: 0, or loom_ctx_err(ctx). */
LOOM_API int loom_sema_acquire_ctx(loom_sema *s, loom_ctx *ctx);
/* 0, or -EAGAIN if none is left. */
LOOM_API int loom_sema_tryacquire(loom_sema *s);
LOOM_API void loom_sema_release(loom_sema *s);

/*
 * Wait group: loom_wg_add(n) before starting n tasks, loom_wg_done() as
 * each finishes, loom_wg_wait() until the count is back at zero.
 * Reusable once it is zero.  loom_wg_add returns -EINVAL (and changes
 * nothing) if the count would go negative or past INT64_MAX.
 */
typedef struct loom_wg {
  int64_t count_;
  loom_waitlist_ q_;
} loom_wg;
#define LOOM_WG_INIT {0, {0, {0, 0}}}

LOOM_API int loom_wg_add(loom_wg *wg, int64_t delta);
LOOM_API int loom_wg_done(loom_wg *wg);
/* 0 or -ETIMEDOUT.  Parks. */
LOOM_API int loom_wg_wait(loom_wg *wg, int64_t deadline);
/* Bounded by a context: 0, or loom_ctx_err(ctx) (also when ctx is done
 * before the call and the count is zero already, as the other *_ctx
 * calls put a done context first). */
LOOM_API int loom_wg_wait_ctx(loom_wg *wg, loom_ctx *ctx);

/*
 * Reader/writer mutex (Go's sync.RWMutex): many readers or one writer.
 * A writer waiting in loom_rwmutex_lock stops new readers, so readers
 * cannot starve it.  A zeroed one is unlocked.  Parks.
 */
typedef struct loom_rwmutex {
  loom_mutex w_;
  loom_sema writer_sem_, reader_sem_;
  uint64_t state_; /* readers (low 32 bits), departing (high 32 bits) */
} loom_rwmutex;
#define LOOM_RWMUTEX_INIT                                                      \
  { LOOM_MUTEX_INIT, LOOM_SEMA_INIT(0), LOOM_SEMA_INIT(0), 0 }
LOOM_API void loom_rwmutex_rlock(loom_rwmutex *rw);
LOOM_API void loom_rwmutex_runlock(loom_rwmutex *rw);
LOOM_API void loom_rwmutex_lock(loom_rwmutex *rw);
LOOM_API void loom_rwmutex_unlock(loom_rwmutex *rw);
/* Take it without waiting (Go's TryRLock / TryLock): 0, or -EBUSY when
 * that would wait (tryrlock: a writer holds it or waits for it;
 * trylock: anyone holds it or a writer waits); -EINVAL for NULL. */
LOOM_API int loom_rwmutex_tryrlock(loom_rwmutex *rw);
LOOM_API int loom_rwmutex_trylock(loom_rwmutex *rw);
/*
 * Bounded waits (Go has none): the _until forms return 0 or -ETIMEDOUT
 * (with a deadline already passed they take the lock only where the try
 * form would, as loom_mutex_lock_until does); the _ctx forms 0, or
 * loom_ctx_err(ctx) once it is cancelled (at once, touching nothing, if
 * it is done before the call).  Either may also return -ENOMEM (no
 * timer), or -EINVAL for a NULL rwmutex.  A writer that gives up
 * withdraws its claim: the readers its wait held back are let in, and
 * the next writer may go.  A wait that ends just as the lock comes free
 * (the last reader leaving as a writer's deadline passes) may return 0:
 * the caller then holds it.  Parks.
 */
LOOM_API int loom_rwmutex_rlock_until(loom_rwmutex *rw, int64_t deadline);
LOOM_API int loom_rwmutex_rlock_ctx(loom_rwmutex *rw, loom_ctx *ctx);
LOOM_API int loom_rwmutex_lock_until(loom_rwmutex *rw, int64_t deadline);
LOOM_API int loom_rwmutex_lock_ctx(loom_rwmutex *rw, loom_ctx *ctx);

/* Once: fn(arg) runs exactly once; concurrent callers wait for it.  A
 * call of loom_once_do on the same `o` from inside fn waits for itself
 * for ever, as Go's Once.Do does. */
typedef struct loom_once {
  int done_;
  loom_mutex mu_;
} loom_once;
#define LOOM_ONCE_INIT {0, LOOM_MUTEX_INIT}
LOOM_API void loom_once_do(loom_once *o, void (*fn)(void *arg), void *arg);

/*
 * Condition variable, used with a loom_mutex held.  loom_cond_wait
 * unlocks `mu`, parks until signalled (or the deadline), and locks `mu`
 * again before returning: 0, or -ETIMEDOUT (mu is held either way; a
 * deadline that has passed already returns it at once, `mu` untouched).
 * Spurious wake-ups do not happen, but the condition may have changed
 * again by the time `mu` is back: wait in a loop.
 */
typedef struct loom_cond {
  loom_waitlist_ q_;
} loom_cond;
#define LOOM_COND_INIT {{0, {0, 0}}}
LOOM_API int loom_cond_wait(loom_cond *c, loom_mutex *mu, int64_t deadline);
/* Bounded by a context: 0, or loom_ctx_err(ctx) (at once if ctx is done
 * already); mu is held on return either way. */
LOOM_API int loom_cond_wait_ctx(loom_cond *c, loom_mutex *mu, loom_ctx *ctx);
LOOM_API void loom_cond_signal(loom_cond *c);
LOOM_API void loom_cond_broadcast(loom_cond *c);

#ifdef __cplusplus
}
#endif
#endif /* LOOM_SYNC_H */
