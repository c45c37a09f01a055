/*
 * test_timer.c — loom_sleep / loom_sleep_until / loom_now (src/runtime/
 * timer.c): never early, not absurdly late, many timers at once.
 *
 * Timing bounds here are sanity bounds only (CI machines are noisy): a
 * sleep must not end before its deadline, and must end within 50 ms
 * after it on an idle runtime.
 */
#include <stdatomic.h>

#include "check.h"

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
      late = loom_now() - t0 - d;
      CHECKF(late >= 0, "loom_sleep(%lld ms) woke %lld ns early", (long long)ms[k],
             (long long)-late);
      CHECKF(late < LATE_BOUND, "loom_sleep(%lld ms) woke %.3f ms late", (long long)ms[k],
             late / 1e6);
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
    CHECK_LT(late, LATE_BOUND);
    printf("loom_sleep_until(+%2lld ms): lateness %.3f ms\n", (long long)ms[k], late / 1e6);
  }
}

TEST(sleep_precision) { check_run(precision_main, NULL, 0); }

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

CHECK_MAIN()
