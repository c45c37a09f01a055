/*
 * rwmutex.c — loom_rwmutex, Go's sync.RWMutex over a loom_mutex and two
 * loom_semas.
 */
#include <errno.h>

#include "loom/sync.h"
#include "runtime/runtime.h"
#include "sync/wait.h"

/* ---- reader/writer mutex (Go's algorithm) --------------------------------
 * readers_ counts active readers; a writer subtracts RW_MAX from it, so
 * arriving readers see it negative and queue on reader_sem_.  departing_
 * counts the readers the writer still waits for; the last of them
 * releases writer_sem_.  The semaphores count, so a release that comes
 * before its acquire is not lost.
 *
 * Unlike Go, a writer's unlock drops w_ before it gives readers_ back:
 * from that add on, a reader may take the lock, drop it and free the
 * rwmutex (unlock, then free), so the add must be the unlock's last
 * touch of *rw but for the releases owed to readers still queued.  The
 * next writer, which may get w_ in between, waits for the add before it
 * subtracts. */

#define RW_MAX (1 << 30)

void loom_rwmutex_rlock(loom_rwmutex *rw) {
  if (__atomic_add_fetch(&rw->readers_, 1, __ATOMIC_ACQ_REL) < 0)
    (void)loom_sema_acquire(&rw->reader_sem_, 0); /* a writer is pending */
}

void loom_rwmutex_runlock(loom_rwmutex *rw) {
  int32_t r = __atomic_sub_fetch(&rw->readers_, 1, __ATOMIC_ACQ_REL);
  if (r < 0) {
    if (r + 1 == 0 || r + 1 == -RW_MAX)
      loom__throw("rwmutex_runlock: not read-locked");
    if (__atomic_sub_fetch(&rw->departing_, 1, __ATOMIC_ACQ_REL) == 0)
      loom_sema_release(&rw->writer_sem_); /* the last reader out */
  }
}

void loom_rwmutex_lock(loom_rwmutex *rw) {
  loom_mutex_lock(&rw->w_); /* one writer at a time */
  /* The writer before us may still be between its w_ unlock and its
   * add: readers_ is negative until then (a few instructions). */
  unsigned spins = 1;
  while (__atomic_load_n(&rw->readers_, __ATOMIC_ACQUIRE) < 0)
    loom__backoff(&spins);
  int32_t r =
      __atomic_sub_fetch(&rw->readers_, RW_MAX, __ATOMIC_ACQ_REL) + RW_MAX;
  if (r != 0 && __atomic_add_fetch(&rw->departing_, r, __ATOMIC_ACQ_REL) != 0)
    (void)loom_sema_acquire(&rw->writer_sem_, 0);
}

int loom_rwmutex_tryrlock(loom_rwmutex *rw) {
  if (rw == NULL)
    return -EINVAL;
  int32_t r = __atomic_load_n(&rw->readers_, __ATOMIC_RELAXED);
  while (r >= 0) /* no writer holds it or waits for it */
    if (__atomic_compare_exchange_n(&rw->readers_, &r, r + 1, true,
                                    __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
      return 0;
  return -EBUSY;
}

int loom_rwmutex_trylock(loom_rwmutex *rw) {
  if (rw == NULL)
    return -EINVAL;
  if (loom_mutex_trylock(&rw->w_) != 0)
    return -EBUSY;
  /* No readers (and no writer before us still giving readers_ back):
   * take it as loom_rwmutex_lock does, with nobody to wait for. */
  int32_t zero = 0;
  if (__atomic_compare_exchange_n(&rw->readers_, &zero, -RW_MAX, false,
                                  __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
    return 0;
  loom_mutex_unlock(&rw->w_);
  return -EBUSY;
}

void loom_rwmutex_unlock(loom_rwmutex *rw) {
  /* Negative only while write-locked; only the holder gives it back. */
  if (__atomic_load_n(&rw->readers_, __ATOMIC_RELAXED) >= 0)
    loom__throw("rwmutex_unlock: not write-locked");
  loom_mutex_unlock(&rw->w_);
  int32_t r = __atomic_add_fetch(&rw->readers_, RW_MAX, __ATOMIC_ACQ_REL);
  for (int32_t i = 0; i < r; i++)
    loom_sema_release(&rw->reader_sem_); /* readers that queued meanwhile */
}
