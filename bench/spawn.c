/*
 * spawn.c — spawn + run + exit, amortized per coroutine.
 *
 * The main coroutine spawns `n` coroutines that each do one atomic add and
 * return, then waits until the counter reaches n (polling with
 * loom_yield(): there are no channels or wait groups yet).  Two batches:
 * the first runs on a cold runtime (G structs and stacks are created, the
 * kernel commits stack pages), the second reuses what the first left in
 * the free-G and stack caches.  ns_per_op is the warm batch, cold_ns_per_op
 * the first; both are wall time / n, with spawning, running and waiting
 * all inside the interval.
 *
 * Go peer: bench/go/spawn.go (goroutines + sync.WaitGroup).
 * Usage: spawn [n] [procs]   (default 1 000 000 and the runtime's default)
 */
#include <stdatomic.h>

#include "bench.h"

struct args {
  long n;
  int procs;
};

static atomic_long counter;

static void inc(void *arg) {
  (void)arg;
  atomic_fetch_add_explicit(&counter, 1, memory_order_relaxed);
}

static int64_t batch(long n) {
  long target = atomic_load(&counter) + n;
  int64_t t0 = bench_now();
  for (long i = 0; i < n; i++) {
    int rc = loom_go(inc, NULL);
    if (rc != 0)
      bench_die("loom_go", rc);
  }
  while (atomic_load_explicit(&counter, memory_order_relaxed) < target)
    loom_yield();
  return bench_now() - t0;
}

static void bench_main(void *arg) {
  struct args *a = arg;
  int64_t cold = batch(a->n);
  int64_t warm = batch(a->n);
  printf("RESULT name=spawn impl=loom procs=%d n=%ld ns_per_op=%.1f "
         "cold_ns_per_op=%.1f\n",
         loom_procs(), a->n, (double)warm / (double)a->n,
         (double)cold / (double)a->n);
  fflush(stdout);
}

int main(int argc, char **argv) {
  struct args a = {
      .n = bench_arg(argc, argv, 1, 1000000),
      .procs = (int)bench_arg(argc, argv, 2, 0),
  };
  bench_run(bench_main, &a, a.procs);
  return 0;
}
