/*
 * test_sync.c — mutex (mutual exclusion, starvation mode, deadlines),
 * semaphore, wait group reuse, once, condition variable broadcast, each
 * against the Go behaviour it mirrors, on coroutines and threads.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>

#include "check.h"
#include "loom.h"
#include "runtime/export_test.h"

/* ------------------------------------------------------------------ */
/* Mutual exclusion under contention, coroutines on all Ps + threads.   */

static loom_mutex mu = LOOM_MUTEX_INIT;
static long counter;     /* protected by mu, deliberately not atomic */
static int inside;       /* protected by mu */
static loom_wg wg = LOOM_WG_INIT;

static void bump(long n) {
  for (long i = 0; i < n; i++) {
    loom_mutex_lock(&mu);
    CHECK_EQ(++inside, 1);
    counter++;
    if ((i & 63) == 0)
      loom_yield(); /* park while holding it: others must wait */
    inside--;
    loom_mutex_unlock(&mu);
  }
}

static long per;
static void bumper(void *arg) {
  (void)arg;
  bump(per);
  loom_wg_done(&wg);
}
static void *thread_bumper(void *arg) {
  (void)arg;
  bump(per);
  loom_wg_done(&wg);
  return NULL;
}

static void mutex_main(void *arg) {
  (void)arg;
  per = CHECK_SCALE(20000, 5000, 2000);
  pthread_t t;
  CHECK_OK(loom_wg_add(&wg, 9));
  for (int i = 0; i < 8; i++)
    CHECK_OK(loom_go(bumper, NULL));
  CHECK_EQ(pthread_create(&t, NULL, thread_bumper, NULL), 0);
  CHECK_OK(loom_wg_wait(&wg, 0));
  loom_block_enter();
  pthread_join(t, NULL);
  loom_block_exit();
  CHECK_EQ(counter, 9 * per);
  CHECK_OK(loom_mutex_trylock(&mu));
  CHECK_ERR(loom_mutex_trylock(&mu), -EBUSY);
  int64_t t0 = loom_now();
  CHECK_ERR(loom_mutex_lock_until(&mu, t0 + 20 * CHECK_MS), -ETIMEDOUT);
  CHECK_GE(loom_now() - t0, 20 * CHECK_MS);
  loom_mutex_unlock(&mu);
  loom_mutex_lock(&mu); /* the timed-out waiter left nothing behind */
  loom_mutex_unlock(&mu);
}
TEST(mutex_exclusion) { check_run(mutex_main, NULL, 2); }

/* Starvation mode: a coroutine that keeps re-locking cannot bypass a
 * waiter forever.  Liveness with a lenient bound (timing is the OS's as
 * much as ours): measured here, the worst of 200 waits is 1-3 ms with
 * starvation mode and 5-40 ms without it. */
static loom_mutex smu = LOOM_MUTEX_INIT;
static atomic_int hog_stop, waiter_got;
static void hog(void *arg) {
  (void)arg;
  while (!atomic_load(&hog_stop)) {
    loom_mutex_lock(&smu);
    check_spin_ns(100000); /* hold it 0.1 ms */
    loom_mutex_unlock(&smu);
    /* re-lock at once: in normal mode it would always win */
  }
}
static int64_t worst_wait;
static void starved(void *arg) {
  (void)arg;
  for (int i = 0; i < 200; i++) {
    int64_t t0 = loom_now();
    loom_mutex_lock(&smu);
    if (loom_now() - t0 > worst_wait)
      worst_wait = loom_now() - t0;
    loom_mutex_unlock(&smu);
    atomic_fetch_add(&waiter_got, 1);
  }
}
static void starve_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_go(hog, NULL));
  loom_sleep(5 * CHECK_MS);
  CHECK_OK(loom_go(starved, NULL));
  int64_t end = loom_now() + 5000 * CHECK_MS;
  while (atomic_load(&waiter_got) < 200) {
    CHECKF(loom_now() < end, "the waiter got the mutex only %d times in 5 s",
           atomic_load(&waiter_got));
    loom_sleep(CHECK_MS);
  }
  atomic_store(&hog_stop, 1);
  loom_sleep(5 * CHECK_MS);
  printf("worst wait for the mutex: %.2f ms\n", worst_wait / 1e6);
  CHECKF(worst_wait < 200 * CHECK_MS, "a waiter waited %.1f ms for the mutex",
         worst_wait / 1e6);
}
TEST(mutex_starvation_mode) { check_run(starve_main, NULL, 2); }

/* Starvation mode ends, as Go's does, as soon as it hands the mutex to
 * a waiter that did not starve (waited under 1 ms), not only when the
 * queue empties: else lockers that re-lock at once keep the queue full
 * and every lock stays a hand-off and a context switch for good.  On one
 * P: three lockers queue behind main, main makes the first of them lose
 * for 2 ms (starvation mode), then lets them go.  The state word's
 * starving bit (bit 1) is read by the holder at each lock. */
#define LS_ROUNDS 1000
static loom_mutex lsmu = LOOM_MUTEX_INIT;
static int ls_starving; /* protected by lsmu */
static atomic_int ls_done;
static void lockstep(void *arg) {
  (void)arg;
  for (int i = 0; i < LS_ROUNDS; i++) {
    loom_mutex_lock(&lsmu);
    if (__atomic_load_n(&lsmu.state_, __ATOMIC_RELAXED) & 2u)
      ls_starving++;
    loom_mutex_unlock(&lsmu); /* and re-lock at once */
  }
  atomic_fetch_add(&ls_done, 1);
}
static void starve_end_main(void *arg) {
  (void)arg;
  loom_mutex_lock(&lsmu);
  for (int i = 0; i < 3; i++)
    CHECK_OK(loom_go(lockstep, NULL));
  loom_sleep(CHECK_MS); /* all three queue */
  for (int round = 0; round < 2; round++) {
    loom_mutex_unlock(&lsmu); /* wakes the first locker... */
    loom_mutex_lock(&lsmu);   /* ...which loses: one P, we run first */
    loom_sleep(2 * CHECK_MS); /* it queues again, 2 ms later the 2nd time */
  }
  CHECKF(__atomic_load_n(&lsmu.state_, __ATOMIC_RELAXED) & 2u,
         "not in starvation mode: state %#x", lsmu.state_);
  loom_mutex_unlock(&lsmu); /* hand-off to the starved locker */
  int64_t end = loom_now() + 10000 * CHECK_MS;
  while (atomic_load(&ls_done) < 3) {
    CHECKF(loom_now() < end, "the lockers did not finish in 10 s");
    loom_sleep(CHECK_MS);
  }
  printf("%d of %d locks taken in starvation mode\n", ls_starving,
         3 * LS_ROUNDS);
  CHECKF(ls_starving < LS_ROUNDS / 10,
         "%d of %d locks taken in starvation mode", ls_starving, 3 * LS_ROUNDS);
}
TEST(mutex_starvation_mode_ends_on_a_short_wait) {
  check_run(starve_end_main, NULL, 1);
}

/* Every way of waiting at once, on all Ps: plain locks, short deadlines
 * that often expire, contexts cancelled under the waiters, try-locks.
 * Exclusion holds, each success is counted once, and when all are done
 * the state word is back to zero: no waiter count, woken or starving
 * bit is left behind by a waiter that gave up or by an unlock that woke
 * nobody because a spinner was about. */
static loom_mutex mmu = LOOM_MUTEX_INIT;
static long mixed_count, mixed_inside; /* protected by mmu */
static atomic_long mixed_ok, mixed_gave_up; /* gave up: timed out, cancelled */
static loom_wg mwg = LOOM_WG_INIT;
static loom_ctx *_Atomic mixed_ctx;

static void mixed_hold(void) {
  CHECK_EQ(++mixed_inside, 1);
  mixed_count++;
  if ((mixed_count & 7) == 0)
    check_spin_ns(5000); /* long enough for waiters to queue and expire */
  else if ((mixed_count & 63) == 1)
    loom_yield(); /* park while holding it */
  mixed_inside--;
  loom_mutex_unlock(&mmu);
  atomic_fetch_add(&mixed_ok, 1);
}

static void mixed_locker(void *arg) {
  long id = (long)arg, rounds = CHECK_SCALE(20000, 4000, 1500);
  uint64_t x = (uint64_t)id * 0x9e3779b97f4a7c15ULL + 1;
  for (long i = 0; i < rounds; i++) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    int rc = 0;
    switch (x % 4) {
    case 0:
      loom_mutex_lock(&mmu);
      break;
    case 1:
      rc = loom_mutex_lock_until(&mmu, loom_now() + (int64_t)(x >> 40) % 50000);
      if (rc != 0) {
        CHECK_ERR(rc, -ETIMEDOUT);
        atomic_fetch_add(&mixed_gave_up, 1);
      }
      break;
    case 2: {
      loom_ctx *c = atomic_load(&mixed_ctx);
      rc = loom_mutex_lock_ctx(&mmu, c);
      if (rc != 0) {
        CHECK_ERR(rc, -ECANCELED);
        atomic_fetch_add(&mixed_gave_up, 1);
      }
      break;
    }
    default:
      rc = loom_mutex_trylock(&mmu);
      if (rc != 0)
        CHECK_ERR(rc, -EBUSY);
      break;
    }
    if (rc == 0)
      mixed_hold();
    if ((i & 255) == 0)
      loom_yield();
  }
  loom_wg_done(&mwg);
}

static atomic_int mixed_stop;
static loom_ctx *mixed_old[4096];
static void canceller(void *arg) {
  /* A new context every 100 µs; the old one is cancelled while lockers
   * may be queued under it.  Released only at the end: a locker may still
   * hold a pointer it loaded before the swap. */
  loom_ctx **old = mixed_old;
  int n = 0;
  while (!atomic_load(&mixed_stop) && n < 4096) {
    loom_ctx *c;
    CHECK_OK(loom_ctx_with_cancel(&c, loom_ctx_background()));
    old[n++] = atomic_exchange(&mixed_ctx, c);
    loom_ctx_cancel(old[n - 1]);
    loom_sleep(100000);
  }
  while (!atomic_load(&mixed_stop))
    loom_sleep(CHECK_MS);
  for (int i = 0; i < n; i++)
    loom_ctx_release(old[i]);
  loom_wg_done(arg);
}

static void mixed_main(void *arg) {
  (void)arg;
  loom_ctx *first;
  CHECK_OK(loom_ctx_with_cancel(&first, loom_ctx_background()));
  atomic_store(&mixed_ctx, first);
  loom_wg canc = LOOM_WG_INIT;
  CHECK_OK(loom_wg_add(&canc, 1));
  CHECK_OK(loom_go(canceller, &canc));
  CHECK_OK(loom_wg_add(&mwg, 8));
  for (long i = 0; i < 8; i++)
    CHECK_OK(loom_go(mixed_locker, (void *)(i + 1)));
  CHECK_OK(loom_wg_wait(&mwg, 0));
  atomic_store(&mixed_stop, 1);
  CHECK_OK(loom_wg_wait(&canc, 0));
  printf("%ld locked, %ld timed out or cancelled\n", mixed_count,
         atomic_load(&mixed_gave_up));
  CHECK_EQ(mixed_count, atomic_load(&mixed_ok));
  CHECK_GT(mixed_count, 0);
  CHECK_EQ(__atomic_load_n(&mmu.state_, __ATOMIC_ACQUIRE), 0u);
  CHECK_OK(loom_mutex_trylock(&mmu));
  loom_mutex_unlock(&mmu);
  loom_ctx_cancel(atomic_load(&mixed_ctx));
  loom_ctx_release(atomic_load(&mixed_ctx));
}
TEST(mutex_mixed_waits_leave_no_state) { check_run(mixed_main, NULL, 2); }

/* ------------------------------------------------------------------ */
/* Semaphore: FIFO, never more than N inside.                           */

static loom_sema sem = LOOM_SEMA_INIT(3);
static atomic_int in_sem, max_in_sem;
static loom_wg swg = LOOM_WG_INIT;
static void sem_user(void *arg) {
  (void)arg;
  for (int i = 0; i < 200; i++) {
    CHECK_OK(loom_sema_acquire(&sem, 0));
    int now = atomic_fetch_add(&in_sem, 1) + 1;
    int m = atomic_load(&max_in_sem);
    while (now > m && !atomic_compare_exchange_weak(&max_in_sem, &m, now))
      ;
    loom_yield();
    atomic_fetch_sub(&in_sem, 1);
    loom_sema_release(&sem);
  }
  loom_wg_done(&swg);
}
static void sema_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_wg_add(&swg, 10));
  for (int i = 0; i < 10; i++)
    CHECK_OK(loom_go(sem_user, NULL));
  CHECK_OK(loom_wg_wait(&swg, 0));
  CHECK_LE(atomic_load(&max_in_sem), 3);
  CHECK_EQ(atomic_load(&max_in_sem), 3);
  loom_sema s0 = LOOM_SEMA_INIT(0);
  CHECK_ERR(loom_sema_tryacquire(&s0), -EAGAIN);
  CHECK_ERR(loom_sema_acquire(&s0, loom_now() + 10 * CHECK_MS), -ETIMEDOUT);
  loom_sema_release(&s0);
  CHECK_OK(loom_sema_tryacquire(&s0));
}
TEST(semaphore) { check_run(sema_main, NULL, 2); }

/* ------------------------------------------------------------------ */
/* Wait group reuse, bad add, deadline.                                 */

static loom_wg rwg = LOOM_WG_INIT;
static atomic_int round_done;
static void task(void *arg) {
  (void)arg;
  loom_sleep(CHECK_MS);
  atomic_fetch_add(&round_done, 1);
  loom_wg_done(&rwg);
}
static void wg_main(void *arg) {
  (void)arg;
  for (int r = 1; r <= 5; r++) {
    CHECK_OK(loom_wg_add(&rwg, 20));
    for (int i = 0; i < 20; i++)
      CHECK_OK(loom_go(task, NULL));
    CHECK_OK(loom_wg_wait(&rwg, 0));
    CHECK_EQ(atomic_load(&round_done), 20 * r);
  }
  CHECK_ERR(loom_wg_add(&rwg, -1), -EINVAL);
  CHECK_OK(loom_wg_add(&rwg, 1));
  CHECK_ERR(loom_wg_wait(&rwg, loom_now() + 10 * CHECK_MS), -ETIMEDOUT);
  CHECK_OK(loom_wg_done(&rwg));
  CHECK_OK(loom_wg_wait(&rwg, 0));
}
TEST(waitgroup_reuse) { check_run(wg_main, NULL, 2); }

/* ------------------------------------------------------------------ */
/* Once and cond broadcast.                                             */

static loom_once once = LOOM_ONCE_INIT;
static atomic_int once_runs;
static void init_fn(void *arg) {
  (void)arg;
  loom_sleep(5 * CHECK_MS); /* others arrive meanwhile and must wait */
  atomic_fetch_add(&once_runs, 1);
}
static loom_mutex cmu = LOOM_MUTEX_INIT;
static loom_cond cv = LOOM_COND_INIT;
static int ready_flag;        /* under cmu */
static atomic_int cond_woke;
static loom_wg cwg = LOOM_WG_INIT;
static void once_and_wait(void *arg) {
  (void)arg;
  loom_once_do(&once, init_fn, NULL);
  CHECK_EQ(atomic_load(&once_runs), 1);
  loom_mutex_lock(&cmu);
  while (!ready_flag)
    CHECK_OK(loom_cond_wait(&cv, &cmu, 0));
  loom_mutex_unlock(&cmu);
  atomic_fetch_add(&cond_woke, 1);
  loom_wg_done(&cwg);
}
static void cond_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_wg_add(&cwg, 50));
  for (int i = 0; i < 50; i++)
    CHECK_OK(loom_go(once_and_wait, NULL));
  loom_sleep(30 * CHECK_MS);
  CHECK_EQ(atomic_load(&cond_woke), 0);
  loom_mutex_lock(&cmu);
  ready_flag = 1;
  loom_cond_broadcast(&cv);
  loom_mutex_unlock(&cmu);
  CHECK_OK(loom_wg_wait(&cwg, loom_now() + 5000 * CHECK_MS));
  CHECK_EQ(atomic_load(&cond_woke), 50);
  CHECK_EQ(atomic_load(&once_runs), 1);
  /* A timed wait returns with the mutex held. */
  loom_mutex_lock(&cmu);
  CHECK_ERR(loom_cond_wait(&cv, &cmu, loom_now() + 5 * CHECK_MS), -ETIMEDOUT);
  CHECK_ERR(loom_mutex_trylock(&cmu), -EBUSY);
  loom_mutex_unlock(&cmu);
}
TEST(once_and_cond_broadcast) { check_run(cond_main, NULL, 2); }

/* ------------------------------------------------------------------ */
/* RWMutex: readers together, writers alone, a writer not starved.      */

static loom_rwmutex rw = LOOM_RWMUTEX_INIT;
static atomic_int readers_in, max_readers, writer_in, rw_bad;
static atomic_int rw_stop, writes_done;
static long rw_value; /* under rw */

static void rw_reader(void *arg) {
  (void)arg;
  while (!atomic_load(&rw_stop)) {
    loom_rwmutex_rlock(&rw);
    int n = atomic_fetch_add(&readers_in, 1) + 1;
    int m = atomic_load(&max_readers);
    while (n > m && !atomic_compare_exchange_weak(&max_readers, &m, n))
      ;
    if (atomic_load(&writer_in))
      atomic_store(&rw_bad, 1);
    loom_yield(); /* overlap with other readers */
    atomic_fetch_sub(&readers_in, 1);
    loom_rwmutex_runlock(&rw);
  }
}
static void rw_writer(void *arg) {
  (void)arg;
  for (int i = 0; i < 200; i++) {
    loom_rwmutex_lock(&rw);
    atomic_store(&writer_in, 1);
    if (atomic_load(&readers_in) != 0)
      atomic_store(&rw_bad, 1);
    rw_value++;
    loom_yield();
    atomic_store(&writer_in, 0);
    loom_rwmutex_unlock(&rw);
    atomic_fetch_add(&writes_done, 1);
  }
}
static void rw_main(void *arg) {
  (void)arg;
  for (int i = 0; i < 8; i++)
    CHECK_OK(loom_go(rw_reader, NULL));
  loom_sleep(5 * CHECK_MS);
  CHECK_OK(loom_go(rw_writer, NULL));
  CHECK_OK(loom_go(rw_writer, NULL));
  int64_t end = loom_now() + 10000 * CHECK_MS;
  while (atomic_load(&writes_done) < 400) {
    CHECKF(loom_now() < end, "writers starved: %d of 400 writes",
           atomic_load(&writes_done));
    loom_sleep(CHECK_MS);
  }
  atomic_store(&rw_stop, 1);
  loom_sleep(10 * CHECK_MS);
  CHECK_EQ(atomic_load(&rw_bad), 0);
  CHECK_GE(atomic_load(&max_readers), 2); /* readers did share it */
  loom_rwmutex_lock(&rw);
  CHECK_EQ(rw_value, 400);
  loom_rwmutex_unlock(&rw);
}
TEST(rwmutex) { check_run(rw_main, NULL, 2); }

/* Try forms: they take what is free, never wait, and keep exclusion
 * when mixed with the waiting forms on all Ps. */
static loom_rwmutex trw = LOOM_RWMUTEX_INIT;
static atomic_int trw_readers, trw_writers, trw_bad;
static atomic_long trw_got;
static loom_wg trw_wg = LOOM_WG_INIT;
static void trw_inside(bool writer) {
  if (writer) {
    if (atomic_fetch_add(&trw_writers, 1) != 0 || atomic_load(&trw_readers))
      atomic_fetch_add(&trw_bad, 1);
    atomic_fetch_sub(&trw_writers, 1);
  } else {
    atomic_fetch_add(&trw_readers, 1);
    if (atomic_load(&trw_writers))
      atomic_fetch_add(&trw_bad, 1);
    atomic_fetch_sub(&trw_readers, 1);
  }
  atomic_fetch_add(&trw_got, 1);
}
static void trw_worker(void *arg) {
  long id = (long)arg;
  for (int i = 0; i < CHECK_SCALE(20000, 5000, 2000); i++) {
    switch ((id + i) % 4) {
    case 0:
      if (loom_rwmutex_tryrlock(&trw) == 0) {
        trw_inside(false);
        loom_rwmutex_runlock(&trw);
      }
      break;
    case 1:
      if (loom_rwmutex_trylock(&trw) == 0) {
        trw_inside(true);
        loom_rwmutex_unlock(&trw);
      }
      break;
    case 2:
      loom_rwmutex_rlock(&trw);
      trw_inside(false);
      loom_rwmutex_runlock(&trw);
      break;
    default:
      loom_rwmutex_lock(&trw);
      trw_inside(true);
      loom_rwmutex_unlock(&trw);
      break;
    }
    if ((i & 15) == 0)
      loom_yield();
  }
  loom_wg_done(&trw_wg);
}
static atomic_int trw_waiter_in;
static void trw_writer_waits(void *arg) {
  (void)arg;
  loom_rwmutex_lock(&trw); /* waits for main's read lock */
  atomic_store(&trw_waiter_in, 1);
  loom_rwmutex_unlock(&trw);
}
static void trw_main(void *arg) {
  (void)arg;
  CHECK_ERR(loom_rwmutex_tryrlock(NULL), -EINVAL);
  CHECK_ERR(loom_rwmutex_trylock(NULL), -EINVAL);
  CHECK_OK(loom_rwmutex_tryrlock(&trw));
  CHECK_OK(loom_rwmutex_tryrlock(&trw)); /* readers share it */
  CHECK_ERR(loom_rwmutex_trylock(&trw), -EBUSY);
  loom_rwmutex_runlock(&trw);
  CHECK_ERR(loom_rwmutex_trylock(&trw), -EBUSY);
  /* A writer waiting for the last reader stops new readers, tries too. */
  CHECK_OK(loom_go(trw_writer_waits, NULL));
  while ((int32_t)(uint32_t)__atomic_load_n(&trw.state_, __ATOMIC_RELAXED) >= 0)
    loom_yield();
  CHECK_ERR(loom_rwmutex_tryrlock(&trw), -EBUSY);
  CHECK_ERR(loom_rwmutex_trylock(&trw), -EBUSY);
  loom_rwmutex_runlock(&trw);
  while (!atomic_load(&trw_waiter_in))
    loom_yield();
  loom_rwmutex_lock(&trw); /* the waiter's unlock is complete */
  CHECK_ERR(loom_rwmutex_tryrlock(&trw), -EBUSY);
  CHECK_ERR(loom_rwmutex_trylock(&trw), -EBUSY);
  loom_rwmutex_unlock(&trw);
  CHECK_OK(loom_rwmutex_trylock(&trw));
  loom_rwmutex_unlock(&trw);

  loom_wg_add(&trw_wg, 8);
  for (long i = 0; i < 8; i++)
    CHECK_OK(loom_go(trw_worker, (void *)i));
  CHECK_OK(loom_wg_wait(&trw_wg, 0));
  CHECK_EQ(atomic_load(&trw_bad), 0);
  CHECK_GT(atomic_load(&trw_got), 0);
  CHECK_OK(loom_rwmutex_trylock(&trw)); /* all released */
  loom_rwmutex_unlock(&trw);
}
TEST(rwmutex_try_forms) { check_run(trw_main, NULL, 2); }

/* Freed the moment the wait returns (or the lock is taken): the other
 * side's loom_wg_done / loom_mutex_unlock must be done with the object by
 * then.  ASan names any late touch; the plain build corrupts the heap. */
typedef struct freeable {
  loom_wg wg;
  loom_mutex mu;
} freeable;

static void done_once(void *arg) { CHECK_OK(loom_wg_done(&((freeable *)arg)->wg)); }

static void unlock_later(void *arg) {
  freeable *f = arg;
  loom_yield(); /* let the main coroutine queue on the mutex */
  loom_mutex_unlock(&f->mu);
}

static void free_main(void *arg) {
  (void)arg;
  int rounds = CHECK_SCALE(20000, 5000, 2000);
  for (int i = 0; i < rounds; i++) {
    freeable *f = calloc(1, sizeof *f);
    CHECK_OK(loom_wg_add(&f->wg, 2));
    CHECK_OK(loom_go(done_once, f));
    CHECK_OK(loom_go(done_once, f));
    CHECK_OK(loom_wg_wait(&f->wg, 0));
    loom_mutex_lock(&f->mu);
    CHECK_OK(loom_go(unlock_later, f));
    loom_mutex_lock(&f->mu); /* parks until unlock_later unlocks */
    loom_mutex_unlock(&f->mu);
    free(f);
  }
}

TEST(free_right_after_wait_or_lock) { check_run(free_main, NULL, 2); }

/* The same for a reader/writer mutex: a reader that was queued behind a
 * writer may free it as soon as its read lock is taken and dropped, so
 * the writer's unlock must be done with it by then.  The writer is a
 * plain thread, so the woken reader runs on a P of its own at once. */
static loom_sema rwf_go = LOOM_SEMA_INIT(0);
static loom_rwmutex *_Atomic rwf_obj;
static atomic_int rwf_stop;

static void *rw_unlock_later(void *arg) {
  (void)arg;
  for (;;) {
    CHECK_OK(loom_sema_acquire(&rwf_go, 0));
    if (atomic_load(&rwf_stop))
      return NULL;
    loom_rwmutex *obj = atomic_load(&rwf_obj);
    for (int k = 0; k < 100; k++) /* let the main coroutine queue */
      __builtin_ia32_pause();
    loom_rwmutex_unlock(obj);
  }
}

static void rw_free_main(void *arg) {
  (void)arg;
  int rounds = CHECK_SCALE(20000, 5000, 2000);
  pthread_t t;
  CHECK_EQ(pthread_create(&t, NULL, rw_unlock_later, NULL), 0);
  for (int i = 0; i < rounds; i++) {
    loom_rwmutex *obj = calloc(1, sizeof *obj);
    loom_rwmutex_lock(obj);
    atomic_store(&rwf_obj, obj);
    loom_sema_release(&rwf_go);
    loom_rwmutex_rlock(obj); /* parks until the thread unlocks */
    loom_rwmutex_runlock(obj);
    free(obj);
  }
  atomic_store(&rwf_stop, 1);
  loom_sema_release(&rwf_go);
  loom_block_enter();
  pthread_join(t, NULL);
  loom_block_exit();
}

TEST(rwmutex_free_right_after_rlock) { check_run(rw_free_main, NULL, 2); }

/* ------------------------------------------------------------------ */
/* RWMutex waits bounded by a deadline or a context.                    */

#define RW_WRITER (1 << 30) /* what a writer takes off the count (mutex.c) */

/* The reader count: negative while a writer holds or waits. */
static int32_t rw_count(loom_rwmutex *m) {
  return (int32_t)(uint32_t)__atomic_load_n(&m->state_, __ATOMIC_ACQUIRE);
}

/* Nobody in it, waiting for it, or owed a unit: what waits that gave up
 * must leave behind once everyone else has left. */
static void check_rw_idle(loom_rwmutex *m) {
  CHECK_EQ(rw_count(m), 0);
  CHECK_EQ(__atomic_load_n(&m->w_.state_, __ATOMIC_ACQUIRE), 0);
  CHECK_EQ(__atomic_load_n(&m->reader_sem_.count_, __ATOMIC_ACQUIRE), 0);
  CHECK_EQ(__atomic_load_n(&m->writer_sem_.count_, __ATOMIC_ACQUIRE), 0);
  CHECK(__atomic_load_n(&m->reader_sem_.q_.q_.head_, __ATOMIC_ACQUIRE) == NULL);
  CHECK(__atomic_load_n(&m->writer_sem_.q_.q_.head_, __ATOMIC_ACQUIRE) == NULL);
  CHECK_OK(loom_rwmutex_trylock(m));
  loom_rwmutex_unlock(m);
}

static loom_rwmutex brw = LOOM_RWMUTEX_INIT;
static atomic_int bw_result = 1, br_result = 1, b_in;
static void bw_until(void *ns) {
  int64_t d = loom_now() + (int64_t)(intptr_t)ns;
  atomic_store(&bw_result, loom_rwmutex_lock_until(&brw, d));
}
static void bw_ctx(void *c) {
  atomic_store(&bw_result, loom_rwmutex_lock_ctx(&brw, c));
}
static void br_until(void *ns) {
  int64_t d = loom_now() + (int64_t)(intptr_t)ns;
  atomic_store(&br_result, loom_rwmutex_rlock_until(&brw, d));
}
static void br_ctx(void *c) {
  atomic_store(&br_result, loom_rwmutex_rlock_ctx(&brw, c));
}
/* A plain reader: says when it is in, leaves when told to. */
static void b_reader(void *arg) {
  (void)arg;
  loom_rwmutex_rlock(&brw);
  atomic_store(&b_in, 1);
  while (atomic_load(&b_in) != 2)
    loom_yield();
  loom_rwmutex_runlock(&brw);
  atomic_store(&b_in, 3);
}
static void *b_reader_thread(void *arg) {
  b_reader(arg);
  return NULL;
}
/* A plain writer: says when it is in, and leaves. */
static void b_writer(void *arg) {
  (void)arg;
  loom_rwmutex_lock(&brw);
  atomic_store(&b_in, 1);
  loom_rwmutex_unlock(&brw);
}
static int wait_result(atomic_int *r) {
  while (atomic_load(r) == 1)
    loom_yield();
  int v = atomic_load(r);
  atomic_store(r, 1);
  return v;
}
static void wait_for_writer(void) {
  while (rw_count(&brw) >= 0) /* the writer has announced itself */
    loom_yield();
}

static void brw_main(void *arg) {
  (void)arg;
  CHECK_ERR(loom_rwmutex_rlock_until(NULL, 0), -EINVAL);
  CHECK_ERR(loom_rwmutex_rlock_ctx(NULL, NULL), -EINVAL);
  CHECK_ERR(loom_rwmutex_lock_until(NULL, 0), -EINVAL);
  CHECK_ERR(loom_rwmutex_lock_ctx(NULL, NULL), -EINVAL);

  /* A context done before the call wins, even over a free rwmutex, and
   * touches nothing. */
  loom_ctx *done;
  CHECK_OK(loom_ctx_with_cancel(&done, loom_ctx_background()));
  loom_ctx_cancel(done);
  CHECK_ERR(loom_rwmutex_rlock_ctx(&brw, done), -ECANCELED);
  CHECK_ERR(loom_rwmutex_lock_ctx(&brw, done), -ECANCELED);
  check_rw_idle(&brw);

  /* Free: every form takes it, a passed deadline as the try form does. */
  CHECK_OK(loom_rwmutex_rlock_until(&brw, 0));
  CHECK_OK(loom_rwmutex_rlock_until(&brw, 1)); /* passed: readers share */
  CHECK_OK(loom_rwmutex_rlock_ctx(&brw, loom_ctx_background()));
  CHECK_EQ(rw_count(&brw), 3);
  CHECK_ERR(loom_rwmutex_lock_until(&brw, 1), -ETIMEDOUT); /* at once */
  CHECK_EQ(rw_count(&brw), 3); /* and nothing announced */
  for (int i = 0; i < 3; i++)
    loom_rwmutex_runlock(&brw);
  CHECK_OK(loom_rwmutex_lock_until(&brw, 1));
  CHECK_ERR(loom_rwmutex_rlock_until(&brw, 1), -ETIMEDOUT);
  CHECK_ERR(loom_rwmutex_lock_until(&brw, 1), -ETIMEDOUT);
  loom_rwmutex_unlock(&brw);
  CHECK_OK(loom_rwmutex_lock_ctx(&brw, loom_ctx_background()));
  loom_rwmutex_unlock(&brw);
  check_rw_idle(&brw);

  /* A reader behind a writer: its deadline, then its context. */
  loom_rwmutex_lock(&brw);
  int64_t t0 = loom_now();
  CHECK_OK(loom_go(br_until, (void *)(intptr_t)(20 * CHECK_MS)));
  CHECK_ERR(wait_result(&br_result), -ETIMEDOUT);
  CHECK_GE(loom_now() - t0, 20 * CHECK_MS);
  CHECK_EQ(rw_count(&brw), -RW_WRITER); /* it counted itself out again */
  loom_ctx *c;
  CHECK_OK(loom_ctx_with_cancel(&c, loom_ctx_background()));
  CHECK_OK(loom_go(br_ctx, c));
  while (rw_count(&brw) != -RW_WRITER + 1)
    loom_yield();
  loom_sleep(2 * CHECK_MS);
  CHECK_EQ(atomic_load(&br_result), 1);
  loom_ctx_cancel(c);
  CHECK_ERR(wait_result(&br_result), -ECANCELED);
  loom_ctx_release(c);
  CHECK_EQ(rw_count(&brw), -RW_WRITER);
  loom_rwmutex_unlock(&brw);
  check_rw_idle(&brw);

  /* A writer that times out behind a reader lets in the reader that
   * queued behind it, while the first reader is still in. */
  loom_rwmutex_rlock(&brw);
  /* The writer's deadline is no earlier than this: until then it
   * waits, and the reader must stay out.  (A host that freezes the
   * process through the 5 ms sleep may wake us past it, the writer gone
   * and the reader in: nothing to judge then.) */
  int64_t writer_waits_until = loom_now() + 30 * CHECK_MS;
  CHECK_OK(loom_go(bw_until, (void *)(intptr_t)(30 * CHECK_MS)));
  wait_for_writer();
  CHECK_OK(loom_go(b_reader, NULL));
  loom_sleep(5 * CHECK_MS);
  int in = atomic_load(&b_in);
  CHECKF(in == 0 || loom_now() >= writer_waits_until,
         "a reader got in %.1f ms before the writer queued ahead of it gave up",
         (writer_waits_until - loom_now()) / 1e6); /* held back by the writer */
  CHECK_ERR(wait_result(&bw_result), -ETIMEDOUT);
  while (atomic_load(&b_in) != 1)
    loom_yield();
  atomic_store(&b_in, 2);
  while (atomic_load(&b_in) != 3)
    loom_yield();
  atomic_store(&b_in, 0);
  loom_rwmutex_runlock(&brw);
  check_rw_idle(&brw);

  /* The same with a context cancelled, and the held-back reader a
   * plain thread. */
  loom_rwmutex_rlock(&brw);
  CHECK_OK(loom_ctx_with_cancel(&c, loom_ctx_background()));
  CHECK_OK(loom_go(bw_ctx, c));
  wait_for_writer();
  pthread_t t;
  CHECK_EQ(pthread_create(&t, NULL, b_reader_thread, NULL), 0);
  loom_sleep(5 * CHECK_MS);
  CHECK_EQ(atomic_load(&b_in), 0);
  loom_ctx_cancel(c);
  CHECK_ERR(wait_result(&bw_result), -ECANCELED);
  while (atomic_load(&b_in) != 1)
    loom_yield();
  atomic_store(&b_in, 2);
  loom_block_enter();
  pthread_join(t, NULL);
  loom_block_exit();
  atomic_store(&b_in, 0);
  loom_ctx_release(c);
  loom_rwmutex_runlock(&brw);
  check_rw_idle(&brw);

  /* A reader that counted itself behind a writer waiting for an earlier
   * reader gives up: the writer still waits for that reader alone, and
   * gets in once it leaves. */
  loom_rwmutex_rlock(&brw);
  CHECK_OK(loom_go(b_writer, NULL));
  wait_for_writer();
  CHECK_OK(loom_ctx_with_cancel(&c, loom_ctx_background()));
  CHECK_OK(loom_go(br_ctx, c));
  while (rw_count(&brw) != -RW_WRITER + 2)
    loom_yield();
  loom_sleep(2 * CHECK_MS);
  loom_ctx_cancel(c);
  CHECK_ERR(wait_result(&br_result), -ECANCELED);
  loom_ctx_release(c);
  CHECK_EQ(rw_count(&brw), -RW_WRITER + 1);
  loom_sleep(2 * CHECK_MS);
  CHECK_EQ(atomic_load(&b_in), 0);
  loom_rwmutex_runlock(&brw);
  while (atomic_load(&b_in) != 1)
    loom_yield();
  atomic_store(&b_in, 0);
  check_rw_idle(&brw);

  /* A writer that gives up while another writer holds it (waiting for
   * the inner mutex) leaves nothing behind either. */
  loom_rwmutex_lock(&brw);
  CHECK_OK(loom_go(bw_until, (void *)(intptr_t)(5 * CHECK_MS)));
  CHECK_ERR(wait_result(&bw_result), -ETIMEDOUT);
  CHECK_OK(loom_ctx_with_cancel(&c, loom_ctx_background()));
  CHECK_OK(loom_go(bw_ctx, c));
  loom_sleep(2 * CHECK_MS);
  loom_ctx_cancel(c);
  CHECK_ERR(wait_result(&bw_result), -ECANCELED);
  loom_ctx_release(c);
  loom_rwmutex_unlock(&brw);
  check_rw_idle(&brw);
  loom_ctx_release(done);
}
TEST(rwmutex_bounded_waits) { check_run(brw_main, NULL, 2); }

/* A bounded wait that ends just as the lock comes free, over and over:
 * a writer whose deadline passes as a plain thread's last read lock is
 * dropped, and a reader whose deadline passes as the write lock is.
 * Either outcome may happen; whichever it is, the waiter holds the lock
 * exactly when it says 0, and nothing is left behind (no unit owed to
 * nobody, no count off by one). */
static loom_rwmutex erw = LOOM_RWMUTEX_INIT;
static atomic_int e_phase;  /* 0 idle, 1 go (thread holds), 2 released */
static atomic_long e_at;    /* when the thread lets go */
static atomic_int e_writer; /* what the thread holds: 1 write, 0 read */
static atomic_int e_stop;
static void *e_thread(void *arg) {
  (void)arg;
  for (;;) {
    while (atomic_load(&e_phase) != 1)
      if (atomic_load(&e_stop))
        return NULL;
      else
        __builtin_ia32_pause();
    while (loom_now() < atomic_load(&e_at))
      __builtin_ia32_pause();
    if (atomic_load(&e_writer))
      loom_rwmutex_unlock(&erw);
    else
      loom_rwmutex_runlock(&erw);
    atomic_store(&e_phase, 2);
  }
}
static void edge_main(void *arg) {
  (void)arg;
  pthread_t t;
  CHECK_EQ(pthread_create(&t, NULL, e_thread, NULL), 0);
  int rounds = CHECK_SCALE(3000, 1000, 300);
  long got[2] = {0, 0}, gave_up[2] = {0, 0};
  for (int i = 0; i < rounds; i++) {
    int writer_waits = i & 1; /* the thread holds the other kind */
    atomic_store(&e_writer, !writer_waits);
    if (writer_waits)
      loom_rwmutex_rlock(&erw); /* the thread's read lock, dropped there */
    else
      loom_rwmutex_lock(&erw);
    int64_t now = loom_now();
    int64_t at = now + 30000;
    int64_t deadline = at + ((i / 2) % 21 - 10) * 2000; /* ±20 µs */
    atomic_store(&e_at, at);
    atomic_store(&e_phase, 1);
    int r;
    if (i % 4 < 2) {
      r = writer_waits ? loom_rwmutex_lock_until(&erw, deadline)
                       : loom_rwmutex_rlock_until(&erw, deadline);
    } else {
      loom_ctx *c;
      CHECK_OK(loom_ctx_with_deadline(&c, loom_ctx_background(), deadline));
      r = writer_waits ? loom_rwmutex_lock_ctx(&erw, c)
                       : loom_rwmutex_rlock_ctx(&erw, c);
      loom_ctx_release(c);
    }
    CHECK(r == 0 || r == -ETIMEDOUT);
    if (r == 0) {
      got[writer_waits]++;
      /* Holding it means the thread has let go of its own. */
      CHECK_EQ(rw_count(&erw), writer_waits ? -RW_WRITER : 1);
      CHECK_ERR(loom_rwmutex_trylock(&erw), -EBUSY);
      if (writer_waits)
        CHECK_ERR(loom_rwmutex_tryrlock(&erw), -EBUSY);
    } else {
      gave_up[writer_waits]++;
    }
    while (atomic_load(&e_phase) != 2)
      loom_yield();
    atomic_store(&e_phase, 0);
    if (r == 0) {
      if (writer_waits)
        loom_rwmutex_unlock(&erw);
      else
        loom_rwmutex_runlock(&erw);
    }
    check_rw_idle(&erw);
  }
  atomic_store(&e_stop, 1);
  loom_block_enter();
  pthread_join(t, NULL);
  loom_block_exit();
  printf("writer: %ld got, %ld gave up; reader: %ld got, %ld gave up\n", got[1],
         gave_up[1], got[0], gave_up[0]);
}
TEST(rwmutex_wait_ends_as_the_lock_comes_free) {
  check_watchdog(60, "rwmutex waits ending as the lock comes free");
  check_run(edge_main, NULL, 2);
}

/* Many readers and writers on every P and on plain threads, with plain,
 * deadline and context waits; deadlines of zero (passed) and a few
 * microseconds, contexts cancelled before the call, by their timeout or
 * by another coroutine while they wait.  Exclusion holds throughout,
 * every worker finishes (nobody is stranded behind a writer that gave
 * up), and the rwmutex ends idle. */
static loom_rwmutex srw = LOOM_RWMUTEX_INIT;
static atomic_int s_readers, s_writers, s_bad, s_stop, s_live;
static long s_value; /* under the write lock */
static atomic_long s_writes, s_reads, s_gave_up;
#define S_SLOTS 4
static loom_ctx *_Atomic s_slot[S_SLOTS]; /* for the canceller */

static loom_ctx *s_ctx(int64_t i) {
  loom_ctx *c;
  int kind = (int)(i % 4);
  if (kind == 1) {
    CHECK_OK(loom_ctx_with_timeout(&c, loom_ctx_background(), (i % 5) * 4000));
    return c;
  }
  CHECK_OK(loom_ctx_with_cancel(&c, loom_ctx_background()));
  if (kind == 0) {
    loom_ctx_cancel(c); /* done before the call */
    return c;
  }
  loom_ctx *old = atomic_exchange(&s_slot[i % S_SLOTS], loom_ctx_ref(c));
  if (old != NULL)
    loom_ctx_unref(old);
  return c;
}

/* Hold the lock a while: a coroutine yields on every 8th round (at
 * `phase`), otherwise up to 63 pauses. */
static void s_hold(int64_t i, bool co, int phase) {
  if (co && i % 8 == phase)
    loom_yield();
  else
    for (int k = 0; k < (int)(i % 64); k++)
      __builtin_ia32_pause();
}

static void s_take(int64_t i, bool co) {
  bool writer = i % 4 == 0;
  int form = (int)((i / 4) % 3); /* plain, deadline, context */
  int r = 0;
  loom_ctx *c = NULL;
  if (form == 0) {
    if (writer)
      loom_rwmutex_lock(&srw);
    else
      loom_rwmutex_rlock(&srw);
  } else if (form == 1) {
    int64_t d = loom_now() + (i % 5) * 5000; /* 0: passed already */
    r = writer ? loom_rwmutex_lock_until(&srw, d)
               : loom_rwmutex_rlock_until(&srw, d);
    CHECK(r == 0 || r == -ETIMEDOUT);
  } else {
    c = s_ctx(i / 12);
    r = writer ? loom_rwmutex_lock_ctx(&srw, c)
               : loom_rwmutex_rlock_ctx(&srw, c);
    CHECK(r == 0 || r == -ETIMEDOUT || r == -ECANCELED);
    if (r != 0)
      CHECK_EQ(r, loom_ctx_err(c));
  }
  if (r != 0) {
    atomic_fetch_add(&s_gave_up, 1);
  } else if (writer) {
    if (atomic_fetch_add(&s_writers, 1) != 0 || atomic_load(&s_readers) != 0)
      atomic_store(&s_bad, 1);
    s_value++;
    s_hold(i, co, 0);
    if (atomic_load(&s_readers) != 0)
      atomic_store(&s_bad, 1);
    atomic_fetch_sub(&s_writers, 1);
    atomic_fetch_add(&s_writes, 1);
    loom_rwmutex_unlock(&srw);
  } else {
    atomic_fetch_add(&s_readers, 1);
    if (atomic_load(&s_writers) != 0)
      atomic_store(&s_bad, 1);
    s_hold(i, co, 1);
    if (atomic_load(&s_writers) != 0)
      atomic_store(&s_bad, 1);
    atomic_fetch_sub(&s_readers, 1);
    atomic_fetch_add(&s_reads, 1);
    loom_rwmutex_runlock(&srw);
  }
  if (c != NULL)
    loom_ctx_release(c);
}

static void s_co(void *arg) {
  for (int64_t i = (intptr_t)arg; !atomic_load(&s_stop); i++)
    s_take(i, true);
  atomic_fetch_sub(&s_live, 1);
}
static void *s_thread(void *arg) {
  for (int64_t i = (intptr_t)arg; !atomic_load(&s_stop); i++)
    s_take(i, false);
  return NULL;
}
/* Cancels the contexts waiters published, as they wait (or not). */
static void s_canceller(void *arg) {
  (void)arg;
  for (unsigned k = 0; !atomic_load(&s_stop); k++) {
    loom_ctx *c = atomic_exchange(&s_slot[k % S_SLOTS], NULL);
    if (c != NULL) {
      loom_ctx_cancel(c);
      loom_ctx_unref(c);
    }
    if (k % 4 == 0)
      loom_sleep(3000);
    else
      loom_yield();
  }
  atomic_fetch_sub(&s_live, 1);
}
static void stress_main(void *arg) {
  (void)arg;
  enum { NCO = 8, NTH = 2 };
  pthread_t t[NTH];
  atomic_store(&s_live, NCO + 1);
  for (int i = 0; i < NTH; i++)
    CHECK_EQ(pthread_create(&t[i], NULL, s_thread, (void *)(intptr_t)(i * 7)),
             0);
  for (int i = 0; i < NCO; i++)
    CHECK_OK(loom_go(s_co, (void *)(intptr_t)(i * 13)));
  CHECK_OK(loom_go(s_canceller, NULL));
  loom_sleep(CHECK_SCALE(400, 400, 400) * CHECK_MS);
  atomic_store(&s_stop, 1);
  while (atomic_load(&s_live) != 0)
    loom_sleep(CHECK_MS);
  loom_block_enter();
  for (int i = 0; i < NTH; i++)
    pthread_join(t[i], NULL);
  loom_block_exit();
  for (int i = 0; i < S_SLOTS; i++) {
    loom_ctx *c = atomic_exchange(&s_slot[i], NULL);
    if (c != NULL)
      loom_ctx_unref(c);
  }
  CHECK_EQ(atomic_load(&s_bad), 0);
  CHECK_EQ(s_value, atomic_load(&s_writes));
  CHECK_GT(atomic_load(&s_writes), 0);
  CHECK_GT(atomic_load(&s_reads), 0);
  CHECK_GT(atomic_load(&s_gave_up), 0);
  check_rw_idle(&srw);
  printf("%ld writes, %ld reads, %ld gave up\n", atomic_load(&s_writes),
         atomic_load(&s_reads), atomic_load(&s_gave_up));
}
TEST(rwmutex_bounded_stress) {
  check_watchdog(60, "rwmutex with waits that give up");
  check_run(stress_main, NULL, 4);
}

/* The count never goes below zero nor wraps past INT64_MAX. */
TEST(wg_add_refuses_overflow) {
  loom_wg g = LOOM_WG_INIT;
  CHECK_EQ(loom_wg_add(&g, INT64_MIN), -EINVAL);
  CHECK_EQ(loom_wg_add(&g, -1), -EINVAL);
  CHECK_OK(loom_wg_add(&g, INT64_MAX));
  CHECK_EQ(loom_wg_add(&g, 1), -EINVAL);
  CHECK_EQ(loom_wg_add(&g, INT64_MAX), -EINVAL);
  CHECK_OK(loom_wg_add(&g, -INT64_MAX)); /* back to zero: reusable */
  CHECK_OK(loom_wg_add(&g, 2));
  CHECK_OK(loom_wg_add(&g, -2));
}

/* Units are never lost nor made up when a release races with the
 * acquirer's deadline or its context's cancel, with coroutines on two Ps
 * and plain threads on one semaphore: every unit released is either
 * taken by exactly one acquire that returned 0 or still counted. */
static loom_sema ua_sem = LOOM_SEMA_INIT(0);
static atomic_long ua_taken, ua_released;
static atomic_int ua_stop, ua_live;
static void ua_take(int64_t i) {
  int r;
  if (i % 3 == 0) {
    /* A context cancelled already, or one whose deadline races with
     * the releases (so no taker outlives the releasers). */
    loom_ctx *c;
    if (i % 2 == 0) {
      CHECK_OK(loom_ctx_with_cancel(&c, loom_ctx_background()));
      loom_ctx_cancel(c); /* the acquire returns at once */
    } else {
      CHECK_OK(
          loom_ctx_with_timeout(&c, loom_ctx_background(), (i % 5) * 20000));
    }
    r = loom_sema_acquire_ctx(&ua_sem, c);
    CHECK(r == 0 || r == -ECANCELED || r == -ETIMEDOUT);
    loom_ctx_release(c);
  } else {
    r = loom_sema_acquire(&ua_sem, loom_now() + (i % 5) * 20000);
    CHECK(r == 0 || r == -ETIMEDOUT);
  }
  if (r == 0)
    atomic_fetch_add(&ua_taken, 1);
}
static void ua_co_taker(void *arg) {
  (void)arg;
  for (int64_t i = 0; !atomic_load(&ua_stop); i++)
    ua_take(i);
  atomic_fetch_sub(&ua_live, 1);
}
static void *ua_thread_taker(void *arg) {
  (void)arg;
  for (int64_t i = 1; !atomic_load(&ua_stop); i++) {
    int r = loom_sema_acquire(&ua_sem, loom_now() + (i % 5) * 20000);
    CHECK(r == 0 || r == -ETIMEDOUT);
    if (r == 0)
      atomic_fetch_add(&ua_taken, 1);
  }
  return NULL;
}
static void ua_releaser(void *arg) {
  (void)arg;
  while (!atomic_load(&ua_stop)) {
    loom_sema_release(&ua_sem);
    atomic_fetch_add(&ua_released, 1);
    if (atomic_load(&ua_released) % 4 == 0)
      loom_yield();
  }
  atomic_fetch_sub(&ua_live, 1);
}
static void ua_main(void *arg) {
  (void)arg;
  pthread_t t;
  CHECK_EQ(pthread_create(&t, NULL, ua_thread_taker, NULL), 0);
  atomic_store(&ua_live, 6);
  for (int i = 0; i < 4; i++)
    CHECK_OK(loom_go(ua_co_taker, NULL));
  for (int i = 0; i < 2; i++)
    CHECK_OK(loom_go(ua_releaser, NULL));
  loom_sleep(CHECK_SCALE(300, 300, 300) * CHECK_MS);
  atomic_store(&ua_stop, 1);
  while (atomic_load(&ua_live) != 0)
    loom_sleep(CHECK_MS);
  pthread_join(t, NULL);
  long left = 0;
  while (loom_sema_tryacquire(&ua_sem) == 0)
    left++;
  CHECK_EQ(atomic_load(&ua_taken) + left, atomic_load(&ua_released));
}
TEST(sema_units_survive_deadlines_and_cancels) {
  check_watchdog(20, "semaphore with deadline, context and thread waiters");
  check_run(ua_main, NULL, 2);
}

/* Exclusion holds and nobody hangs when plain threads and coroutines on
 * two Ps share one mutex with plain, deadline and context locks. */
static loom_mutex mm_mu = LOOM_MUTEX_INIT;
static int mm_inside;
static long mm_count;
static atomic_int mm_stop, mm_bad, mm_live;
static long mm_take(int64_t i) {
  int r = 0;
  switch (i % 3) {
  case 0:
    loom_mutex_lock(&mm_mu);
    break;
  case 1:
    r = loom_mutex_lock_until(&mm_mu, loom_now() + (i % 7) * 10000);
    break;
  default: {
    loom_ctx *c;
    CHECK_OK(loom_ctx_with_cancel(&c, loom_ctx_background()));
    if (i % 2 == 0)
      loom_ctx_cancel(c);
    r = loom_mutex_lock_ctx(&mm_mu, c);
    loom_ctx_release(c);
  }
  }
  if (r != 0)
    return 0;
  if (__atomic_fetch_add(&mm_inside, 1, __ATOMIC_RELAXED) != 0)
    atomic_store(&mm_bad, 1);
  mm_count++;
  for (int k = 0; k < (int)(i % 50); k++)
    __builtin_ia32_pause();
  __atomic_fetch_sub(&mm_inside, 1, __ATOMIC_RELAXED);
  loom_mutex_unlock(&mm_mu);
  return 1;
}
static atomic_long mm_locked;
static void mm_co(void *arg) {
  (void)arg;
  for (int64_t i = 0; !atomic_load(&mm_stop); i++) {
    atomic_fetch_add(&mm_locked, mm_take(i));
    if (i % 16 == 0)
      loom_yield();
  }
  atomic_fetch_sub(&mm_live, 1);
}
static void *mm_thread(void *arg) {
  (void)arg;
  for (int64_t i = 0; !atomic_load(&mm_stop); i++)
    atomic_fetch_add(&mm_locked, mm_take(i));
  return NULL;
}
static void mm_main(void *arg) {
  (void)arg;
  pthread_t t[2];
  for (int i = 0; i < 2; i++)
    CHECK_EQ(pthread_create(&t[i], NULL, mm_thread, NULL), 0);
  atomic_store(&mm_live, 6);
  for (int i = 0; i < 6; i++)
    CHECK_OK(loom_go(mm_co, NULL));
  loom_sleep(300 * CHECK_MS);
  atomic_store(&mm_stop, 1);
  while (atomic_load(&mm_live) != 0)
    loom_sleep(CHECK_MS);
  for (int i = 0; i < 2; i++)
    pthread_join(t[i], NULL);
  CHECK_EQ(atomic_load(&mm_bad), 0);
  loom_mutex_lock(&mm_mu);
  CHECK_EQ(mm_count, atomic_load(&mm_locked));
  loom_mutex_unlock(&mm_mu);
  CHECK_EQ(loom_mutex_trylock(&mm_mu), 0); /* no state left behind */
  loom_mutex_unlock(&mm_mu);
}
TEST(mutex_threads_and_coroutines_mixed_waits) {
  check_watchdog(60, "mutex shared by threads and coroutines");
  check_run(mm_main, NULL, 2);
}

/* A context's cancel that lands while its waiters are parking: between
 * a waiter's release of the object's lock and the hooking of its
 * context (the commit hooks after the release, so that a hook may take
 * the locks of what it wakes), or just before or after.  One context is
 * shared by coroutines on two Ps and a plain thread that wait, over and
 * over, on a semaphore that a coroutine feeds, on a cond that it
 * broadcasts, and on a mutex another coroutine holds; a plain thread
 * cancels after a spin that differs from round to round.  Every waiter
 * must end with the cancel (none sleeps on), units are neither lost nor
 * made up, the mutex excludes and is left unlocked. */
static loom_sema cw_sem = LOOM_SEMA_INIT(0);
static loom_mutex cw_mu = LOOM_MUTEX_INIT, cw_held = LOOM_MUTEX_INIT;
static loom_cond cw_cond = LOOM_COND_INIT;
static loom_ctx *cw_ctx;
static atomic_long cw_taken, cw_released;
static atomic_int cw_live, cw_inside, cw_bad;
static int cw_spin;

static void cw_wait(int kind) {
  for (;;) {
    int r;
    if (kind == 0) {
      r = loom_sema_acquire_ctx(&cw_sem, cw_ctx);
      if (r == 0)
        atomic_fetch_add(&cw_taken, 1);
    } else if (kind == 1) {
      loom_mutex_lock(&cw_mu);
      r = loom_cond_wait_ctx(&cw_cond, &cw_mu, cw_ctx);
      loom_mutex_unlock(&cw_mu);
    } else {
      r = loom_mutex_lock_ctx(&cw_held, cw_ctx);
      if (r == 0) {
        if (atomic_fetch_add(&cw_inside, 1) != 0)
          atomic_store(&cw_bad, 1);
        atomic_fetch_sub(&cw_inside, 1);
        loom_mutex_unlock(&cw_held);
      }
    }
    if (r == -ECANCELED)
      return;
    CHECK_EQ(r, 0);
  }
}
static void cw_co(void *arg) {
  cw_wait((int)(intptr_t)arg);
  atomic_fetch_sub(&cw_live, 1);
}
static void *cw_thread(void *arg) {
  cw_wait((int)(intptr_t)arg);
  atomic_fetch_sub(&cw_live, 1);
  return NULL;
}
/* Feeds the semaphore and wakes the cond's waiters until the cancel. */
static void cw_feeder(void *arg) {
  (void)arg;
  while (loom_ctx_err(cw_ctx) == 0) {
    loom_sema_release(&cw_sem);
    atomic_fetch_add(&cw_released, 1);
    loom_mutex_lock(&cw_mu);
    loom_cond_broadcast(&cw_cond);
    loom_mutex_unlock(&cw_mu);
    loom_yield();
  }
  atomic_fetch_sub(&cw_live, 1);
}
/* Holds cw_held for a while at a time, so its lockers park. */
static void cw_holder(void *arg) {
  (void)arg;
  while (loom_ctx_err(cw_ctx) == 0) {
    loom_mutex_lock(&cw_held);
    if (atomic_fetch_add(&cw_inside, 1) != 0)
      atomic_store(&cw_bad, 1);
    loom_sleep(20000);
    atomic_fetch_sub(&cw_inside, 1);
    loom_mutex_unlock(&cw_held);
    loom_yield();
  }
  atomic_fetch_sub(&cw_live, 1);
}
static void *cw_canceller(void *arg) {
  (void)arg;
  for (volatile int k = 0; k < cw_spin; k++)
    __builtin_ia32_pause();
  loom_ctx_cancel(cw_ctx);
  return NULL;
}
static void cw_main(void *arg) {
  (void)arg;
  int rounds = CHECK_SCALE(300, 100, 40);
  for (int round = 0; round < rounds; round++) {
    CHECK_OK(loom_ctx_with_cancel(&cw_ctx, loom_ctx_background()));
    cw_spin = (round * 37) % 400; /* 0 to about 10 µs of PAUSEs */
    atomic_store(&cw_live, 3 * 3 + 2 + 1);
    pthread_t th, tc;
    for (int kind = 0; kind < 3; kind++)
      for (int i = 0; i < 3; i++)
        CHECK_OK(loom_go(cw_co, (void *)(intptr_t)kind));
    CHECK_OK(loom_go(cw_feeder, NULL));
    CHECK_OK(loom_go(cw_holder, NULL));
    CHECK_EQ(
        pthread_create(&th, NULL, cw_thread, (void *)(intptr_t)(round % 3)), 0);
    loom_yield();
    CHECK_EQ(pthread_create(&tc, NULL, cw_canceller, NULL), 0);
    while (atomic_load(&cw_live) != 0)
      loom_sleep(CHECK_MS / 4);
    loom_block_enter();
    pthread_join(th, NULL);
    pthread_join(tc, NULL);
    loom_block_exit();
    loom_ctx_release(cw_ctx);
  }
  long left = 0;
  while (loom_sema_tryacquire(&cw_sem) == 0)
    left++;
  CHECK_EQ(atomic_load(&cw_taken) + left, atomic_load(&cw_released));
  CHECK_EQ(atomic_load(&cw_bad), 0);
  CHECK_EQ(loom_mutex_trylock(&cw_held), 0); /* left unlocked */
  loom_mutex_unlock(&cw_held);
}
TEST(cancels_land_while_waiters_park) {
  check_watchdog(120, "waiters of a context cancelled as they park");
  check_run(cw_main, NULL, 2);
}

/* A NULL object is a bad argument: every call that returns an error
 * says -EINVAL at once (and touches nothing), as the channel calls do. */
TEST(null_objects_are_einval) {
  loom_mutex m = LOOM_MUTEX_INIT;
  loom_cond c = LOOM_COND_INIT;
  CHECK_ERR(loom_mutex_trylock(NULL), -EINVAL);
  CHECK_ERR(loom_mutex_lock_until(NULL, 0), -EINVAL);
  CHECK_ERR(loom_mutex_lock_ctx(NULL, NULL), -EINVAL);
  CHECK_ERR(loom_sema_acquire(NULL, 0), -EINVAL);
  CHECK_ERR(loom_sema_acquire_ctx(NULL, NULL), -EINVAL);
  CHECK_ERR(loom_sema_tryacquire(NULL), -EINVAL);
  CHECK_ERR(loom_wg_add(NULL, 1), -EINVAL);
  CHECK_ERR(loom_wg_done(NULL), -EINVAL);
  CHECK_ERR(loom_wg_wait(NULL, 0), -EINVAL);
  CHECK_ERR(loom_wg_wait_ctx(NULL, NULL), -EINVAL);
  CHECK_ERR(loom_cond_wait(NULL, &m, 0), -EINVAL);
  CHECK_ERR(loom_cond_wait(&c, NULL, 0), -EINVAL);
  CHECK_ERR(loom_cond_wait_ctx(NULL, &m, NULL), -EINVAL);
  CHECK_ERR(loom_cond_wait_ctx(&c, NULL, NULL), -EINVAL);
  CHECK_EQ(m.state_, 0u); /* untouched */
}

/* A deadline long past — INT64_MIN, or -1 — ends every wait at once
 * with -ETIMEDOUT on a plain thread, as it does on a coroutine: a
 * condition variable's wait included, which queues before it looks. */
static void past_waits(void) {
  loom_mutex pmu = LOOM_MUTEX_INIT, held = LOOM_MUTEX_INIT;
  loom_cond pcv = LOOM_COND_INIT;
  loom_sema psem = LOOM_SEMA_INIT(0);
  loom_wg pwg = LOOM_WG_INIT;
  loom_chan *ch;
  int v;
  static const int64_t pasts[] = {INT64_MIN, INT64_MIN + 1, -1, 1};
  CHECK_OK(loom_chan_make(&ch, sizeof(int), 0));
  CHECK_OK(loom_wg_add(&pwg, 1));
  CHECK_OK(loom_mutex_lock_until(&held, 0));
  for (size_t i = 0; i < sizeof pasts / sizeof pasts[0]; i++) {
    int64_t d = pasts[i];
    CHECK_OK(loom_mutex_lock_until(&pmu, 0));
    CHECK_ERR(loom_cond_wait(&pcv, &pmu, d), -ETIMEDOUT);
    loom_mutex_unlock(&pmu);
    CHECK_ERR(loom_mutex_lock_until(&held, d), -ETIMEDOUT);
    CHECK_ERR(loom_sema_acquire(&psem, d), -ETIMEDOUT);
    CHECK_ERR(loom_wg_wait(&pwg, d), -ETIMEDOUT);
    CHECK_ERR(loom_chan_recv_until(ch, &v, d), -ETIMEDOUT);
  }
  loom_mutex_unlock(&held);
  loom_chan_free(ch);
}
static void *past_thread(void *arg) {
  (void)arg;
  past_waits();
  return NULL;
}
static void past_main(void *arg) {
  (void)arg;
  past_waits();
  loom_block_enter();
  past_waits();
  loom_block_exit();
}
TEST(deadline_long_past_ends_waits_at_once) {
  check_watchdog(20, "waits with a deadline long past");
  pthread_t t;
  CHECK_EQ(pthread_create(&t, NULL, past_thread, NULL), 0);
  CHECK_EQ(pthread_join(t, NULL), 0);
  check_run(past_main, NULL, 2);
}

/* ------------------------------------------------------------------ */
/* Wait records (sync/wait.h): a coroutine that joins a queue someone   */
/* already waits on takes a record from its P's cache; every way a wait */
/* ends must give it back.  One never given back shows as the runtime's */
/* blocks of records growing from round to round.                       */

enum { WR_CROWD = 200, WR_KINDS = 13 };
static loom_chan *wr_c, *wr_d;
static loom_sema wr_sem = LOOM_SEMA_INIT(0);
static loom_mutex wr_mu = LOOM_MUTEX_INIT;
static loom_cond wr_cond = LOOM_COND_INIT;
static loom_rwmutex wr_rw = LOOM_RWMUTEX_INIT;
static loom_wg wr_gate = LOOM_WG_INIT, wr_done = LOOM_WG_INIT;
static loom_ctx *wr_ctx;
static atomic_int wr_waiting;
static int wr_in_cond; /* under wr_mu */

static void wr_waiter(void *arg) {
  int kind = (int)(intptr_t)arg, v = 0;
  int64_t soon = loom_now() + 20 * CHECK_MS;
  if (kind == 8 || kind == 9) {
    loom_mutex_lock(&wr_mu);
    wr_in_cond++;
    if (kind == 8)
      CHECK_OK(loom_cond_wait(&wr_cond, &wr_mu, 0)); /* a broadcast */
    else
      CHECK_ERR(loom_cond_wait_ctx(&wr_cond, &wr_mu, wr_ctx), -ECANCELED);
    loom_mutex_unlock(&wr_mu);
    loom_wg_done(&wr_done);
    return;
  }
  atomic_fetch_add(&wr_waiting, 1);
  switch (kind) {
  case 0: /* a send hands it an element */
    CHECK_EQ(loom_chan_recv(wr_c, &v), 1);
    break;
  case 1: /* the close */
    CHECK_EQ(loom_chan_recv(wr_c, &v), 0);
    break;
  case 2: /* a receive takes its element */
    CHECK_OK(loom_chan_send(wr_c, &v));
    break;
  case 3: { /* the close of one of the select's channels */
    loom_case cs[2] = {{.chan = wr_c, .dir = LOOM_RECV, .elem = &v},
                       {.chan = wr_d, .dir = LOOM_RECV, .elem = &v}};
    CHECK_EQ(loom_select(cs, 2, 0), 1);
    CHECK(!cs[1].ok);
    break;
  }
  case 4: /* its deadline */
    CHECK_ERR(loom_chan_recv_until(wr_c, &v, soon), -ETIMEDOUT);
    break;
  case 5: /* a cancel */
    CHECK_ERR(loom_chan_recv_ctx(wr_c, &v, wr_ctx), -ECANCELED);
    break;
  case 6: /* a release */
    CHECK_OK(loom_sema_acquire(&wr_sem, 0));
    break;
  case 7: /* its deadline */
    CHECK_ERR(loom_sema_acquire(&wr_sem, soon), -ETIMEDOUT);
    break;
  case 11: /* the writer's unlock */
    loom_rwmutex_rlock(&wr_rw);
    loom_rwmutex_runlock(&wr_rw);
    break;
  case 12: /* its deadline, the writer still in */
    CHECK_ERR(loom_rwmutex_rlock_until(&wr_rw, soon), -ETIMEDOUT);
    break;
  case 10: /* the wait group's last done */
    CHECK_OK(loom_wg_wait(&wr_gate, 0));
  }
  loom_wg_done(&wr_done);
}

/* A crowd of one kind: queued (most of it), then let go. */
static void wr_crowd(int kind) {
  atomic_store(&wr_waiting, 0);
  wr_in_cond = 0;
  CHECK_OK(loom_chan_make(&wr_c, sizeof(int), 0));
  CHECK_OK(loom_chan_make(&wr_d, sizeof(int), 0));
  CHECK_OK(loom_ctx_with_cancel(&wr_ctx, loom_ctx_background()));
  CHECK_OK(loom_wg_add(&wr_gate, 1));
  CHECK_OK(loom_wg_add(&wr_done, WR_CROWD));
  if (kind >= 11)
    loom_rwmutex_lock(&wr_rw);
  for (int i = 0; i < WR_CROWD; i++)
    CHECK_OK(loom_go(wr_waiter, (void *)(intptr_t)kind));
  for (;;) { /* all counted; the cond's, queued once counted */
    loom_mutex_lock(&wr_mu);
    int n = atomic_load(&wr_waiting) + wr_in_cond;
    loom_mutex_unlock(&wr_mu);
    if (n == WR_CROWD)
      break;
    loom_sleep(CHECK_MS);
  }
  loom_sleep(2 * CHECK_MS); /* the counted ones into their queues */
  int v = 7;
  switch (kind) {
  case 0:
    for (int i = 0; i < WR_CROWD; i++)
      CHECK_OK(loom_chan_send(wr_c, &v));
    break;
  case 1:
    CHECK_OK(loom_chan_close(wr_c));
    break;
  case 2:
    for (int i = 0; i < WR_CROWD; i++)
      CHECK_EQ(loom_chan_recv(wr_c, &v), 1);
    break;
  case 3:
    CHECK_OK(loom_chan_close(wr_d));
    break;
  case 5:
  case 9:
    loom_ctx_cancel(wr_ctx);
    break;
  case 6:
    for (int i = 0; i < WR_CROWD; i++)
      loom_sema_release(&wr_sem);
    break;
  case 8:
    loom_mutex_lock(&wr_mu);
    loom_cond_broadcast(&wr_cond);
    loom_mutex_unlock(&wr_mu);
    break;
  case 10:
    CHECK_OK(loom_wg_done(&wr_gate));
    break;
  case 11:
    loom_rwmutex_unlock(&wr_rw);
    break;
  default: /* 4, 7, 12: their deadlines */
    break;
  }
  CHECK_OK(loom_wg_wait(&wr_done, 0));
  if (kind == 12)
    loom_rwmutex_unlock(&wr_rw);
  if (kind != 10)
    CHECK_OK(loom_wg_done(&wr_gate));
  loom_ctx_cancel(wr_ctx);
  loom_ctx_release(wr_ctx);
  loom_chan_free(wr_c);
  loom_chan_free(wr_d);
}

static void wr_main(void *arg) {
  (void)arg;
  int rounds = CHECK_SCALE(16, 8, 8), after2 = 0;
  for (int r = 0; r < rounds; r++) {
    for (int kind = 0; kind < WR_KINDS; kind++)
      wr_crowd(kind);
    if (r == 0) /* they were used: a crowd in one queue */
      CHECK(loom__test_wrec_blocks() >= WR_CROWD / 64);
    if (r == 1)
      after2 = loom__test_wrec_blocks();
  }
  /* Past the second round, growth only as the Ps' caches (128 records
   * each, up to twice that before they spill) shift: a record lost per
   * wait of any one kind would be WR_CROWD per round. */
  int slack = 2 * 128 * loom_procs() / 64 + 1;
  CHECK(loom__test_wrec_blocks() <= after2 + slack);
}

TEST(wait_records_come_back_however_waits_end) {
  check_watchdog(60, "crowds of every kind of wait");
  check_run(wr_main, NULL, 2);
}

/* Under ASan a spare wait record is poisoned, so a waker that touches a
 * node after its waiter gave it back is reported (docs/sync.md).  The
 * record's free-list link overlaid the node's first field, `w`, the one
 * every waker reads after unlocking: that field stayed readable. */
#if CHECK_ASAN
#include <sanitizer/asan_interface.h>

#include "sync/wait.h"

static loom_sema sp_sem = LOOM_SEMA_INIT(0);
static loom_wg sp_wg = LOOM_WG_INIT;
static void sp_waiter(void *arg) {
  (void)arg;
  CHECK_OK(loom_sema_acquire(&sp_sem, 0));
  loom_wg_done(&sp_wg);
}
static void sp_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_wg_add(&sp_wg, 2));
  CHECK_OK(loom_go(sp_waiter, NULL));
  CHECK_OK(loom_go(sp_waiter, NULL));
  loom_yield(); /* one P: both run until they park */
  loom__wnode *first = sp_sem.q_.q_.head_, *rec = sp_sem.q_.q_.tail_;
  CHECK(first != NULL && rec != NULL && rec != first); /* rec: a record */
  CHECK(!__asan_address_is_poisoned(&rec->w));
  loom_sema_release(&sp_sem);
  loom_sema_release(&sp_sem);
  CHECK_OK(loom_wg_wait(&sp_wg, 0));
  CHECK(__asan_address_is_poisoned(&rec->w));
  CHECK(__asan_address_is_poisoned(&rec->next));
  CHECK(__asan_address_is_poisoned(&rec->prev));
  CHECK(__asan_address_is_poisoned(&rec->elem));
}
#endif
TEST(spare_wait_records_are_poisoned_whole) {
#if CHECK_ASAN
  check_run(sp_main, NULL, 1);
#endif
}

CHECK_MAIN()
