/*
 * sync.c — sync and context microbenchmarks; bench/go/sync.go is the peer.
 *
 *   sync mutex [n] [procs]    8 coroutines each lock/unlock a shared mutex
 *                             n/8 times around a tiny critical section:
 *                             ns per lock/unlock pair (2 Ps)
 *   sync cancel [n] [procs]   n coroutines block on a context's done
 *                             channel; time from the cancel until all have
 *                             woken and finished: ns per waiter (2 Ps).
 *                             ns_per_op: the first crowd, whose stacks are
 *                             fresh, carved in address order;
 *                             recycled_ns_per_op: the median of the last
 *                             RECYCLED of CROWDS crowds, on stacks that
 *                             have gone round the free lists as in a
 *                             long-running program (scattered: each
 *                             waiter's first touch is a TLB miss)
 */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"
#include "loom/ctx.h"
#include "loom/sync.h"

static const char *mode;
static long n;
static loom_mutex mu = LOOM_MUTEX_INIT;
static long shared;
static loom_wg wg = LOOM_WG_INIT;
static loom_ctx *ctx;
static atomic_long parked;

static void locker(void *arg) {
  long per = (long)arg;
  for (long i = 0; i < per; i++) {
    loom_mutex_lock(&mu);
    shared++;
    loom_mutex_unlock(&mu);
  }
  loom_wg_done(&wg);
}

enum { CROWDS = 21, RECYCLED = 10 };

static int cmp_i64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return x < y ? -1 : x > y;
}

static void blocked(void *arg) {
  (void)arg;
  atomic_fetch_add(&parked, 1);
  loom_chan_recv(loom_ctx_done(ctx), NULL); /* Go: <-ctx.Done() */
  loom_wg_done(&wg);
}

/* One crowd of n waiters: ns from the cancel until all have finished;
 * *close gets the ns of the cancel call alone (it closes the context's
 * done channel, which readies every waiter). */
static int64_t cancel_crowd(int64_t *close) {
  atomic_store(&parked, 0);
  loom_ctx_with_cancel(&ctx, loom_ctx_background());
  loom_wg_add(&wg, n);
  for (long i = 0; i < n; i++)
    loom_go(blocked, NULL);
  while (atomic_load(&parked) < n)
    loom_sleep(1000000);
  loom_sleep(10000000); /* all parked in the receive */
  int64_t t0 = bench_now();
  loom_ctx_cancel(ctx);
  *close = bench_now() - t0;
  loom_wg_wait(&wg, 0);
  int64_t el = bench_now() - t0;
  loom_ctx_release(ctx);
  return el;
}

static void bench_main(void *arg) {
  (void)arg;
  int64_t t0, el, recycled = 0, close0 = 0, rclose = 0;
  if (strcmp(mode, "mutex") == 0) {
    loom_wg_add(&wg, 8);
    t0 = bench_now();
    for (int i = 0; i < 8; i++)
      loom_go(locker, (void *)(n / 8));
    loom_wg_wait(&wg, 0);
    el = bench_now() - t0;
    if (shared != (n / 8) * 8)
      bench_die("mutex lost updates", -1);
  } else {
    int64_t crowd[CROWDS], close[CROWDS];
    for (int r = 0; r < CROWDS; r++)
      crowd[r] = cancel_crowd(&close[r]);
    el = crowd[0];
    close0 = close[0];
    qsort(crowd + CROWDS - RECYCLED, RECYCLED, sizeof *crowd, cmp_i64);
    qsort(close + CROWDS - RECYCLED, RECYCLED, sizeof *close, cmp_i64);
    recycled = crowd[CROWDS - RECYCLED / 2];
    rclose = close[CROWDS - RECYCLED / 2];
  }
  printf("RESULT name=sync_%s impl=loom procs=%d n=%ld ns_per_op=%.1f", mode,
         loom_procs(), n, (double)el / (double)n);
  if (recycled != 0)
    printf(" recycled_ns_per_op=%.1f close_ns_per_op=%.1f"
           " recycled_close_ns_per_op=%.1f",
           (double)recycled / (double)n, (double)close0 / (double)n,
           (double)rclose / (double)n);
  printf("\n");
  fflush(stdout);
}

int main(int argc, char **argv) {
  mode = argc > 1 ? argv[1] : "mutex";
  n = bench_arg(argc, argv, 2, strcmp(mode, "mutex") == 0 ? 2000000 : 10000);
  int procs = (int)bench_arg(argc, argv, 3, 2);
  bench_run(bench_main, NULL, procs);
  return 0;
}
