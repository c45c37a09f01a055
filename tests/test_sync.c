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
  while (__atomic_load_n(&trw.readers_, __ATOMIC_RELAXED) >= 0)
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

CHECK_MAIN()
