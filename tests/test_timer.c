/*
 * test_timer.c — loom_sleep / loom_sleep_until / loom_now (src/runtime/
 * timer.c): never early, not absurdly late, many timers at once.
 *
 * Timing bounds here are sanity bounds only (CI machines are noisy): a
 * sleep must not end before its deadline, and must end within 50 ms
 * after it on an idle runtime.  Time after the deadline that the whole
 * process spent frozen by the host (check_stalled_ns) is not the
 * runtime's lateness.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <unistd.h>

#include "check.h"
#include "runtime/timer.h"

#define LATE_BOUND (50 * CHECK_MS)

static void precision_main(void *arg) {
  static const int64_t ms[] = {1, 5, 20};
  size_t k;
  int i;
  (void)arg;
  loom_sleep(10 * CHECK_MS); /* let the runtime settle to idle */
  for (k = 0; k < sizeof ms / sizeof ms[0]; k++) {
    int64_t worst = 0, sum = 0;
    for (i = 0; i < 5; i++) {
      int64_t d = ms[k] * CHECK_MS, t0 = loom_now(), late;
      CHECK_OK(loom_sleep(d));
      int64_t t1 = loom_now(), stalled;
      late = t1 - t0 - d;
      CHECKF(late >= 0, "loom_sleep(%lld ms) woke %lld ns early", (long long)ms[k],
             (long long)-late);
      stalled = check_stalled_ns(t0 + d, t1); /* after the deadline */
      CHECKF(late - stalled < LATE_BOUND,
             "loom_sleep(%lld ms) woke %.3f ms late (%.3f ms of it the process "
             "was stalled)",
             (long long)ms[k], late / 1e6, stalled / 1e6);
      if (late > worst)
        worst = late;
      sum += late;
    }
    printf("loom_sleep(%2lld ms): mean lateness %.3f ms, worst %.3f ms\n", (long long)ms[k],
           sum / 5 / 1e6, worst / 1e6);
  }
  for (k = 0; k < sizeof ms / sizeof ms[0]; k++) {
    int64_t at = loom_now() + ms[k] * CHECK_MS, late;
    CHECK_OK(loom_sleep_until(at));
    late = loom_now() - at;
    CHECK_GE(late, 0);
    CHECK_LT(late - check_stalled_ns(at, at + late), LATE_BOUND);
    printf("loom_sleep_until(+%2lld ms): lateness %.3f ms\n", (long long)ms[k], late / 1e6);
  }
}

TEST(sleep_precision) {
  check_stall_start();
  check_run(precision_main, NULL, 0);
}

/* Zero, negative and past deadlines return at once (yield). */
static void zero_main(void *arg) {
  int64_t t0 = loom_now();
  int i;
  (void)arg;
  for (i = 0; i < 1000; i++) {
    CHECK_OK(loom_sleep(0));
    CHECK_OK(loom_sleep(-5));
    CHECK_OK(loom_sleep_until(0));
    CHECK_OK(loom_sleep_until(loom_now() - CHECK_MS));
    CHECK_OK(loom_sleep_until(INT64_MIN));
  }
  CHECK_LT(loom_now() - t0, 2000 * CHECK_MS);
}
TEST(sleep_zero_and_past) { check_run(zero_main, NULL, 2); }

/* loom_now is monotonic and agrees with CLOCK_MONOTONIC. */
TEST(now_monotonic) {
  int64_t prev = loom_now(), a, b, c;
  int i;
  for (i = 0; i < 100000; i++) {
    int64_t n = loom_now();
    CHECK_GE(n, prev);
    prev = n;
  }
  a = check_mono_ns();
  b = loom_now();
  c = check_mono_ns();
  CHECK_LE(a, b);
  CHECK_LE(b, c);
}

/* Many coroutines sleep different times at once: each wakes no earlier
 * than its own deadline, and all wake. */
#define MANY 5000
static atomic_long woke;
static atomic_long early;
static void random_sleeper(void *arg) {
  uintptr_t i = (uintptr_t)arg;
  int64_t d = (int64_t)((i * 7919) % 50) * CHECK_MS + (int64_t)(i % 1000) * 1000;
  int64_t t0 = loom_now();
  loom_sleep(d);
  if (loom_now() - t0 < d)
    atomic_fetch_add(&early, 1);
  atomic_fetch_add(&woke, 1);
}
static void many_main(void *arg) {
  uintptr_t i;
  int64_t end;
  (void)arg;
  for (i = 0; i < MANY; i++)
    CHECK_OK(loom_go(random_sleeper, (void *)i));
  end = loom_now() + 10000 * CHECK_MS;
  while (atomic_load(&woke) < MANY) {
    CHECKF(loom_now() < end, "%ld of %d sleepers woke", atomic_load(&woke), MANY);
    loom_sleep(CHECK_MS);
  }
  CHECK_EQ(atomic_load(&early), 0);
}
TEST(many_timers) { check_run(many_main, NULL, 2); }

/* Timers armed on one P fire while that P's coroutines are busy
 * elsewhere: a sleeper's timer is not stuck behind a coroutine that
 * parks its P in a long sleep, and timers on every P fire. */
static atomic_long ticks[4];
static void ticker(void *arg) {
  uintptr_t k = (uintptr_t)arg;
  int i;
  for (i = 0; i < 50; i++) {
    loom_sleep(CHECK_MS);
    atomic_fetch_add(&ticks[k], 1);
  }
}
static void tickers_main(void *arg) {
  uintptr_t k;
  int64_t end = loom_now() + 10000 * CHECK_MS;
  (void)arg;
  for (k = 0; k < 4; k++)
    CHECK_OK(loom_go(ticker, (void *)k));
  for (k = 0; k < 4; k++)
    while (atomic_load(&ticks[k]) < 50) {
      CHECKF(loom_now() < end, "ticker %d: %ld of 50 ticks", (int)k, atomic_load(&ticks[k]));
      loom_sleep(2 * CHECK_MS);
    }
}
TEST(tickers) { check_run(tickers_main, NULL, 2); }

/* A timer on a P whose coroutine hogs it (no scheduling point for
 * 300 ms) still fires on time: the idle P runs its due timers (Go's
 * timer stealing), and the woken coroutine runs elsewhere. */
static atomic_int hog_started;
static void hog(void *arg) {
  (void)arg;
  atomic_store(&hog_started, 1);
  check_spin_ns(300 * CHECK_MS);
}
static atomic_llong hogged_late;
static void sleeper_beside_hog(void *arg) {
  int64_t t0;
  (void)arg;
  /* the hog goes to this P's runnext and runs as soon as we park */
  CHECK_OK(loom_go(hog, NULL));
  t0 = loom_now();
  CHECK_OK(loom_sleep(5 * CHECK_MS));
  atomic_store(&hogged_late, loom_now() - t0 - 5 * CHECK_MS);
}
static void steal_timer_main(void *arg) {
  int64_t end = loom_now() + 5000 * CHECK_MS;
  (void)arg;
  atomic_store(&hogged_late, -1);
  CHECK_OK(loom_go(sleeper_beside_hog, NULL));
  while (atomic_load(&hogged_late) < 0) {
    CHECK(loom_now() < end);
    loom_sleep(CHECK_MS);
  }
  CHECK_EQ(atomic_load(&hog_started), 1);
  printf("a 5 ms sleep beside a 300 ms hog woke %.3f ms late\n", atomic_load(&hogged_late) / 1e6);
  CHECKF(atomic_load(&hogged_late) < 150 * CHECK_MS,
         "a 5 ms sleep woke %.1f ms late: its P was hogged and nobody ran its timers",
         atomic_load(&hogged_late) / 1e6);
}
TEST(timer_on_hogged_p_fires) { check_run(steal_timer_main, NULL, 2); }

/* Huge durations and deadlines sleep "forever" (no overflow of
 * now + ns: UBSan watches), until the runtime stops. */
static atomic_int huge_woke[2];
static void huge_sleeper(void *arg) {
  uintptr_t k = (uintptr_t)arg;
  if (k == 0)
    loom_sleep(INT64_MAX);
  else
    loom_sleep_until(INT64_MAX);
  atomic_store(&huge_woke[k], 1);
}
static void huge_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_go(huge_sleeper, (void *)0));
  CHECK_OK(loom_go(huge_sleeper, (void *)1));
  loom_sleep(100 * CHECK_MS);
  printf("after 100 ms: loom_sleep(INT64_MAX) %s, loom_sleep_until(INT64_MAX) %s\n",
         atomic_load(&huge_woke[0]) ? "returned" : "sleeps",
         atomic_load(&huge_woke[1]) ? "returned" : "sleeps");
  CHECKF(atomic_load(&huge_woke[0]) == 0, "loom_sleep(INT64_MAX) returned within 100 ms");
  CHECKF(atomic_load(&huge_woke[1]) == 0, "loom_sleep_until(INT64_MAX) returned within 100 ms");
}
TEST(sleep_huge) { check_run(huge_main, NULL, 2); }

/* The same with a deadline of INT64_MAX as the only timer while the
 * runtime stays busy (the monitor compares the earliest timer with the
 * clock all along). */
static void huge_until_main(void *arg) {
  int64_t end;
  (void)arg;
  CHECK_OK(loom_go(huge_sleeper, (void *)1));
  end = loom_now() + 150 * CHECK_MS;
  while (loom_now() < end)
    loom_yield();
  /* and idle: every M waits for that timer while main blocks */
  loom_block_enter();
  usleep(100 * 1000);
  loom_block_exit();
  CHECKF(atomic_load(&huge_woke[1]) == 0, "loom_sleep_until(INT64_MAX) returned within 250 ms");
}
TEST(sleep_until_huge) { check_run(huge_until_main, NULL, 2); }

/* A plain thread (no runtime at all) that waits with a deadline of
 * INT64_MAX waits "forever" too: the futex wait's own deadline must not
 * overflow (UBSan watches), and a send still wakes it. */
static loom_chan *plain_ch;
static void *plain_sender(void *arg) {
  (void)arg;
  usleep(20 * 1000);
  int v = 7;
  CHECK_OK(loom_chan_send(plain_ch, &v));
  return NULL;
}
TEST(plain_thread_waits_until_huge) {
  check_watchdog(20, "a plain thread's receive with a deadline of INT64_MAX");
  CHECK_OK(loom_chan_make(&plain_ch, sizeof(int), 0));
  pthread_t t;
  CHECK_EQ(pthread_create(&t, NULL, plain_sender, NULL), 0);
  int v = 0;
  CHECK_EQ(loom_chan_recv_until(plain_ch, &v, INT64_MAX), 1);
  CHECK_EQ(v, 7);
  CHECK_EQ(pthread_join(t, NULL), 0);
  loom_chan_free(plain_ch);
}

/* A coroutine that parks in a receive holds the channel's lock until the
 * park's commit, after the switch.  Timers found due while picking the
 * next coroutine must run after that commit: a context's deadline timer
 * closes the context's done channel, and run before the switch it would
 * spin on the lock its own thread holds (one P, so nobody else runs it). */
static void ctx_done_park_main(void *arg) {
  (void)arg;
  check_watchdog(20, "a receive on a context's done channel as its deadline falls due");
  for (int i = 0; i < 64; i++) {
    loom_ctx *c;
    CHECK_OK(loom_ctx_with_deadline(&c, loom_ctx_background(), loom_now() + 100000));
    int64_t end = loom_now() + 300000; /* the deadline passes, unfired */
    while (loom_now() < end) {
    }
    char x;
    CHECK_EQ(loom_chan_recv(loom_ctx_done(c), &x), 0); /* closed */
    loom_ctx_release(c);
  }
}
TEST(deadline_due_while_parking_on_its_done_channel) {
  check_run(ctx_done_park_main, NULL, 1);
}

/* loom__timer_del waits for a firing of the timer that is running, also
 * when the timer was armed again while that fn runs (a deadline moved
 * under it, as pollfd's set_one does): the stop then removes the new
 * arming, and the old firing must still be waited for, or its fn runs on
 * after del has returned (the timer, or what holds it, reused or freed).
 * On the timers alone, without a runtime: one thread runs the heap, whose
 * fn holds until a third thread lets it go. */
static atomic_int rd_started, rd_release, rd_done;
static loom__timers rd_heap;
static loom__timer rd_t;
static void rd_fn(loom__timer *t, void *arg) {
  (void)t;
  (void)arg;
  atomic_store(&rd_started, 1);
  while (!atomic_load(&rd_release))
    sched_yield();
  atomic_store(&rd_done, 1);
}
static void *rd_runner(void *arg) {
  (void)arg;
  loom__timers_run(&rd_heap, 1000);
  return NULL;
}
static void *rd_releaser(void *arg) {
  (void)arg;
  usleep(100 * 1000);
  atomic_store(&rd_release, 1);
  return NULL;
}
TEST(del_waits_for_a_firing_when_armed_again) {
  loom__timers_init(&rd_heap);
  CHECK_OK(loom__timers_reserve(&rd_heap, 4));
  rd_t.fn = rd_fn;
  loom__timer_add(&rd_heap, &rd_t, 10);
  pthread_t runner, releaser;
  CHECK_EQ(pthread_create(&runner, NULL, rd_runner, NULL), 0);
  while (!atomic_load(&rd_started))
    sched_yield();
  loom__timer_add(&rd_heap, &rd_t, 5000); /* armed again as fn runs */
  CHECK_EQ(pthread_create(&releaser, NULL, rd_releaser, NULL), 0);
  CHECK(loom__timer_del(&rd_t)); /* stopped the new arming */
  CHECKF(atomic_load(&rd_done) == 1,
         "loom__timer_del returned while the earlier firing's fn still ran");
  pthread_join(runner, NULL);
  pthread_join(releaser, NULL);
  loom__timers_destroy(&rd_heap);
}

CHECK_MAIN()

/* One P, two coroutines that each compute for 5 ms and then yield —
 * well within the 10 ms a coroutine may run without a scheduling point.
 * A 1 ms sleep beside them used to wake eight slices late (~40 ms): the
 * switches between them look at timers only every 8th time, as a clock
 * read costs more than a switch.  sysmon now tells a P that switches
 * slowly to look on every switch: late by the slice under way and the
 * one picked before the timer ran (about 9 ms here), once sysmon has
 * seen it (a round of up to 10 ms: the first sleep is not counted). */
static atomic_int yl_stop;
static void yl_spinner(void *arg) {
  (void)arg;
  while (!atomic_load(&yl_stop)) {
    int64_t t = loom_now();
    while (loom_now() - t < 5 * CHECK_MS)
      ;
    loom_yield();
  }
}
static void yl_main(void *arg) {
  (void)arg;
  int64_t worst = 0;
  CHECK_OK(loom_go(yl_spinner, NULL));
  CHECK_OK(loom_go(yl_spinner, NULL));
  CHECK_OK(loom_sleep(CHECK_MS));
  for (int i = 0; i < 10; i++) {
    int64_t t0 = loom_now();
    CHECK_OK(loom_sleep(CHECK_MS));
    int64_t late = loom_now() - t0 - CHECK_MS;
    if (late > worst)
      worst = late;
  }
  atomic_store(&yl_stop, 1);
  printf("1 ms sleep beside two 5 ms yielders: worst %.3f ms late\n",
         worst / 1e6);
  CHECKF(worst < 25 * CHECK_MS, "1 ms sleep woke %.3f ms late", worst / 1e6);
}
TEST(sleep_beside_long_slices_is_not_eight_slices_late) {
  check_watchdog(20, "sleep beside long slices");
  check_run(yl_main, NULL, 1);
}
