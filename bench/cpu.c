/*
 * cpu.c — CPU-bound throughput on 1 vs 2 Ps.
 *
 * `tasks` independent coroutines each run bench_work() for `iters` steps
 * (a serial xorshift64 chain the compiler can neither vectorise nor drop:
 * its result is summed into a checksum that is printed).  The main
 * coroutine spawns them all and waits (polling a counter with
 * loom_yield()).  ms = wall time from the first spawn to the last finish.
 * Run with procs=1 and procs=2: the speed-up is ms(1) / ms(2).
 * Each task runs ~1–2 ms, well under the 10 ms long-run warning, and there
 * are enough of them (400) that the last one's imbalance stays small.
 *
 * Go peer: bench/go/cpu.go (same work(), GOMAXPROCS=procs).  Control:
 * bench/cpu_threads.c, the same load on plain pthreads, says what speed-up
 * the machine itself gives at that moment.
 * Usage: cpu <procs> [tasks] [iters]   (default 1, 400, 1 000 000)
 */
#include <stdatomic.h>

#include "bench.h"

struct args {
  int procs;
  long tasks;
  long iters;
};

static atomic_ulong sink;
static atomic_long finished;
static long g_iters;

static void task(void *arg) {
  uint64_t seed = (uint64_t)(uintptr_t)arg;
  atomic_fetch_add_explicit(&sink, bench_work(seed, g_iters),
                            memory_order_relaxed);
  atomic_fetch_add_explicit(&finished, 1, memory_order_release);
}

static void bench_main(void *arg) {
  struct args *a = arg;
  int64_t t0, el;

  g_iters = a->iters;
  t0 = bench_now();
  for (long i = 0; i < a->tasks; i++) {
    int rc = loom_go(task, (void *)(uintptr_t)(i + 1));
    if (rc != 0)
      bench_die("loom_go", rc);
  }
  while (atomic_load_explicit(&finished, memory_order_acquire) < a->tasks)
    loom_yield();
  el = bench_now() - t0;
  printf("RESULT name=cpu impl=loom procs=%d tasks=%ld iters=%ld ms=%.2f "
         "checksum=%lx\n",
         loom_procs(), a->tasks, a->iters, (double)el / 1e6,
         (unsigned long)atomic_load(&sink));
  fflush(stdout);
}

int main(int argc, char **argv) {
  struct args a = {
      .procs = (int)bench_arg(argc, argv, 1, 1),
      .tasks = bench_arg(argc, argv, 2, 400),
      .iters = bench_arg(argc, argv, 3, 1000000),
  };
  bench_run(bench_main, &a, a.procs);
  return 0;
}
