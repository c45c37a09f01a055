/*
 * cpu_threads.c — control for cpu.c: the same CPU-bound load on plain
 * pthreads, no loom.
 *
 * `threads` threads take the `tasks` tasks (bench_work(), `iters` steps
 * each) from a shared atomic counter until none is left.  ms = wall time
 * from starting the threads to joining them.  The speed-up of 2 threads
 * over 1 is what this machine gives at that moment — on a shared, noisy
 * host often well under 2 — and is the ceiling to read loom's and Go's
 * speed-ups against.
 *
 * Usage: cpu_threads <threads> [tasks] [iters]   (default 1, 400, 1 000 000)
 */
#include <pthread.h>
#include <stdatomic.h>

#include "bench.h"

static atomic_long next_task;
static atomic_ulong sink;
static long g_tasks, g_iters;

static void *worker(void *arg) {
  (void)arg;
  for (;;) {
    long i = atomic_fetch_add_explicit(&next_task, 1, memory_order_relaxed);
    if (i >= g_tasks)
      return NULL;
    atomic_fetch_add_explicit(&sink, bench_work((uint64_t)i + 1, g_iters),
                              memory_order_relaxed);
  }
}

int main(int argc, char **argv) {
  long nthreads = bench_arg(argc, argv, 1, 1);
  pthread_t tids[64];
  int64_t t0, el;

  g_tasks = bench_arg(argc, argv, 2, 400);
  g_iters = bench_arg(argc, argv, 3, 1000000);
  if (nthreads < 1 || nthreads > 64) {
    fprintf(stderr, "cpu_threads: 1..64 threads\n");
    return 2;
  }
  t0 = bench_now();
  for (long i = 0; i < nthreads; i++)
    if (pthread_create(&tids[i], NULL, worker, NULL) != 0) {
      fprintf(stderr, "cpu_threads: pthread_create failed\n");
      return 1;
    }
  for (long i = 0; i < nthreads; i++)
    pthread_join(tids[i], NULL);
  el = bench_now() - t0;
  printf("RESULT name=cpu impl=threads procs=%ld tasks=%ld iters=%ld ms=%.2f "
         "checksum=%lx\n",
         nthreads, g_tasks, g_iters, (double)el / 1e6,
         (unsigned long)atomic_load(&sink));
  return 0;
}
