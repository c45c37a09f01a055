/*
 * switch.c — the floor under yield: a bare loom__ctx_switch() ping-pong
 * between two contexts, no scheduler, no run queue, no runtime at all.
 *
 * Not a loom API benchmark and without a Go peer (Go exposes no bare
 * switch): it says what one register-save-and-stack-swap costs on this
 * machine, so the yield number can be read against it.  It reaches the
 * internal src/arch/switch.h, as tests reach internals; the static library
 * links hidden symbols fine.
 *
 * Two figures, because the switch returns with `ret` into the other
 * context, and the CPU predicts that return from its own call stack:
 *   ns_per_op            the two sides call loom__ctx_switch from
 *                        different places (main's loop, the partner's
 *                        loop): every return is mispredicted.
 *   same_site_ns_per_op  both loop in one function and switch from the
 *                        same call, as coroutines that park and yield
 *                        through the same code do: the return is right.
 *
 * Usage: switch [iters]   (round trips; default 10 000 000)
 * ns_per_op = wall time / (2 * iters): one switch.
 */
#include "arch/switch.h"
#include "bench.h"

static loom__ctx main_ctx, co_ctx;
static int same_site;

/* Both sides of the same-site case loop here, switching from one call. */
__attribute__((noinline)) static void loop(loom__ctx *self, loom__ctx *other,
                                           long n) {
  for (long i = 0; i < n; i++) {
    loom__ctx_switch(self, other);
    __asm__ volatile("" ::: "memory");
  }
}

static void co_entry(void *arg) {
  (void)arg;
  if (same_site)
    for (;;)
      loop(&co_ctx, &main_ctx, 1L << 62);
  for (;;)
    loom__ctx_switch(&co_ctx, &main_ctx);
}

/* ns per switch: main's side switches `iters` times from its own loop,
 * or from loop() when same_site. */
static double measure(char *stack, size_t size, long iters) {
  int64_t t0, el;
  loom__ctx_make(&co_ctx, stack + size, co_entry, NULL);
  if (same_site) {
    loop(&main_ctx, &co_ctx, iters / 10); /* warm up */
    t0 = bench_now();
    loop(&main_ctx, &co_ctx, iters);
  } else {
    for (long i = 0; i < iters / 10; i++) /* warm up */
      loom__ctx_switch(&main_ctx, &co_ctx);
    t0 = bench_now();
    for (long i = 0; i < iters; i++)
      loom__ctx_switch(&main_ctx, &co_ctx);
  }
  el = bench_now() - t0;
  return (double)el / (double)(2 * iters);
}

int main(int argc, char **argv) {
  long iters = bench_arg(argc, argv, 1, 10000000);
  size_t size = (size_t)64 << 10;
  char *stack = malloc(size);

  if (stack == NULL || iters <= 0)
    return 1;
  /* Each measure makes a fresh context on the same stack: the one before
   * is parked for ever and never resumed. */
  double other_site = measure(stack, size, iters);
  same_site = 1;
  double one_site = measure(stack, size, iters);
  printf("RESULT name=switch impl=loom iters=%ld ns_per_op=%.2f "
         "same_site_ns_per_op=%.2f\n",
         iters, other_site, one_site);
  free(stack);
  return 0;
}
