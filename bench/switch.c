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
 * Usage: switch [iters]   (round trips; default 10 000 000)
 * ns_per_op = wall time / (2 * iters): one switch.
 */
#include "arch/switch.h"
#include "bench.h"

static loom__ctx main_ctx, co_ctx;

static void co_entry(void *arg) {
  (void)arg;
  for (;;)
    loom__ctx_switch(&co_ctx, &main_ctx);
}

int main(int argc, char **argv) {
  long iters = bench_arg(argc, argv, 1, 10000000);
  size_t size = (size_t)64 << 10;
  char *stack = malloc(size);
  int64_t t0, el;

  if (stack == NULL || iters <= 0)
    return 1;
  loom__ctx_make(&co_ctx, stack + size, co_entry, NULL);
  for (long i = 0; i < iters / 10; i++) /* warm up */
    loom__ctx_switch(&main_ctx, &co_ctx);
  t0 = bench_now();
  for (long i = 0; i < iters; i++)
    loom__ctx_switch(&main_ctx, &co_ctx);
  el = bench_now() - t0;
  printf("RESULT name=switch impl=loom iters=%ld ns_per_op=%.2f\n", iters,
         (double)el / (double)(2 * iters));
  free(stack); /* co_ctx is parked forever on it; never resumed */
  return 0;
}
