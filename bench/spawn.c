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
 * With `yield_every` = k > 0 the spawner also calls loom_yield() after
 * every k spawns, so the run queues stay short (at most about k Gs wait)
 * instead of holding up to n: that measures the per-coroutine path
 * without a million queued coroutines' worth of cold memory.  Scheduling
 * is cooperative, so with k = 0 and 1 P nothing runs until all n are
 * spawned; Go preempts its spawner every 10 ms and never queues that many.
 *
 * Go peer: bench/go/spawn.go (goroutines + sync.WaitGroup; Gosched for k).
 * Usage: spawn [n] [procs] [yield_every]   (default 1 000 000, the
 *        runtime's default procs, 0)
 */
#include <stdatomic.h>

#include "bench.h"

struct args {
  long n;
  int procs;
  long yield_every;
};

static atomic_long counter;

static void inc(void *arg) {
  (void)arg;
  atomic_fetch_add_explicit(&counter, 1, memory_order_relaxed);
}

static int64_t batch(long n, long yield_every) {
  long target = atomic_load(&counter) + n;
  int64_t t0 = bench_now();
  for (long i = 0; i < n; i++) {
    int rc = loom_go(inc, NULL);
    if (rc != 0)
      bench_die("loom_go", rc);
    if (yield_every > 0 && (i + 1) % yield_every == 0)
      loom_yield();
  }
  while (atomic_load_explicit(&counter, memory_order_relaxed) < target)
    loom_yield();
  return bench_now() - t0;
}

static void bench_main(void *arg) {
  struct args *a = arg;
  int64_t cold = batch(a->n, a->yield_every);
  int64_t warm = batch(a->n, a->yield_every);
  printf("RESULT name=spawn impl=loom procs=%d n=%ld yield_every=%ld "
         "ns_per_op=%.1f cold_ns_per_op=%.1f\n",
         loom_procs(), a->n, a->yield_every, (double)warm / (double)a->n,
         (double)cold / (double)a->n);
  fflush(stdout);
}

int main(int argc, char **argv) {
  struct args a = {
      .n = bench_arg(argc, argv, 1, 1000000),
      .procs = (int)bench_arg(argc, argv, 2, 0),
      .yield_every = bench_arg(argc, argv, 3, 0),
  };
  bench_run(bench_main, &a, a.procs);
  return 0;
}
