/*
 * parked.c — resident memory of a parked coroutine.
 *
 * The main coroutine reads VmRSS, spawns `n` coroutines that each bump a
 * counter and loom_sleep() for an hour, waits until all have parked (plus
 * 20 ms for the last ones to finish switching out), reads VmRSS again.
 * kib_per_op = (after - before) / n: stack pages touched, G structs,
 * timers, queues — everything a parked coroutine costs.  Then main
 * returns and loom_run() abandons and frees them; the time that takes is
 * printed as an INFO line.
 *
 * Go peer: bench/go/parked.go (goroutines in time.Sleep(time.Hour)).
 * Usage: parked [n] [procs]   (default 1 000 000 and the runtime's default)
 */
#include <stdatomic.h>

#include "bench.h"

#define HOUR_NS (3600LL * 1000000000LL)

struct args {
  long n;
  int procs;
};

static atomic_long parked;
static int64_t main_done; /* when bench_main returned */

static void sleeper(void *arg) {
  (void)arg;
  atomic_fetch_add_explicit(&parked, 1, memory_order_relaxed);
  loom_sleep(HOUR_NS);
}

static void bench_main(void *arg) {
  struct args *a = arg;
  long before, after;
  int64_t t0, el;

  before = bench_rss_kib();
  t0 = bench_now();
  for (long i = 0; i < a->n; i++) {
    int rc = loom_go(sleeper, NULL);
    if (rc != 0) {
      fprintf(stderr, "parked: loom_go failed after %ld coroutines\n", i);
      bench_die("loom_go", rc);
    }
  }
  while (atomic_load_explicit(&parked, memory_order_relaxed) < a->n)
    loom_sleep(1000000);
  el = bench_now() - t0;
  loom_sleep(20000000);
  after = bench_rss_kib();
  printf("RESULT name=parked impl=loom procs=%d n=%ld kib_per_op=%.3f "
         "rss_before_kib=%ld rss_after_kib=%ld spawn_ns_per_op=%.1f\n",
         loom_procs(), a->n, (double)(after - before) / (double)a->n, before,
         after, (double)el / (double)a->n);
  fflush(stdout);
  main_done = bench_now();
}

int main(int argc, char **argv) {
  struct args a = {
      .n = bench_arg(argc, argv, 1, 1000000),
      .procs = (int)bench_arg(argc, argv, 2, 0),
  };
  bench_run(bench_main, &a, a.procs);
  /* The runtime abandons and frees the n parked coroutines. */
  printf("INFO parked: loom_run returned %.1f ms after main did\n",
         (double)(bench_now() - main_done) / 1e6);
  return 0;
}
