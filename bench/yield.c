/*
 * yield.c — cost of loom_yield() between two coroutines on one P.
 *
 * The main coroutine spawns a partner; both call loom_yield() `iters`
 * times, so every yield switches to the other coroutine (runnable queue of
 * length one).  ns_per_op = wall time / (2 * iters): the cost of one
 * yield, i.e. one trip through the scheduler plus one context switch.
 * A short untimed round first warms the caches and the G free list.
 *
 * Go peer: bench/go/yield.go (runtime.Gosched, GOMAXPROCS=1).
 * Usage: yield [iters]   (default 5 000 000)
 */
#include <stdatomic.h>

#include "bench.h"

struct pingpong {
  long iters;
  atomic_int done;
};

static void partner(void *arg) {
  struct pingpong *pp = arg;
  for (long i = 0; i < pp->iters; i++)
    loom_yield();
  atomic_store_explicit(&pp->done, 1, memory_order_release);
}

/* 2*iters yields in all: `iters` here and `iters` in the partner. */
static void pingpong(long iters) {
  struct pingpong pp = {.iters = iters};
  int rc = loom_go(partner, &pp);
  if (rc != 0)
    bench_die("loom_go", rc);
  for (long i = 0; i < iters; i++)
    loom_yield();
  while (!atomic_load_explicit(&pp.done, memory_order_acquire))
    loom_yield();
}

static void bench_main(void *arg) {
  long iters = *(long *)arg;
  int64_t t0, el;

  pingpong(iters / 10);
  t0 = bench_now();
  pingpong(iters);
  el = bench_now() - t0;
  printf("RESULT name=yield impl=loom procs=%d iters=%ld ns_per_op=%.2f\n",
         loom_procs(), iters, (double)el / (double)(2 * iters));
  fflush(stdout);
}

int main(int argc, char **argv) {
  long iters = bench_arg(argc, argv, 1, 5000000);
  bench_run(bench_main, &iters, 1);
  return 0;
}
