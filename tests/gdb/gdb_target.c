/*
 * gdb_target.c — the program tests/gdb/run.sh debugs with
 * tools/loom-gdb.py.
 *
 * The main coroutine spawns NSLEEPERS coroutines that park in loom_sleep
 * two named frames down (sleeper -> deep_a -> deep_b -> loom_sleep), and
 * one that spins without a scheduling point on the second P, so that at
 * the breakpoint there are coroutines in every interesting state:
 * waiting (the sleepers), running on another thread (the spinner) and
 * running on this thread (main).  Once every sleeper has parked, main
 * calls loom_gdb_test_stop(), where the debugger stops, then releases the
 * spinner and returns; the sleepers are abandoned at shutdown.
 *
 * Alone (without gdb) it runs in a few milliseconds and exits 0.
 */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

#include "loom/runtime.h"

#define NSLEEPERS 3

static atomic_int parked;    /* sleepers about to park */
static atomic_bool spinning; /* the spinner has started */
static atomic_bool release;  /* main is past the breakpoint */

/* Keeps the compiler from turning a call into a tail jump (which would
 * drop the caller's frame from the backtrace the test looks for). */
#define KEEP_FRAME() __asm__ volatile("" ::: "memory")

__attribute__((noinline)) static void deep_b(int i) {
  atomic_fetch_add(&parked, 1);
  loom_sleep((int64_t)3600 * 1000000000 + i);
  KEEP_FRAME();
}

__attribute__((noinline)) static void deep_a(int i) {
  deep_b(i + 1);
  KEEP_FRAME();
}

static void sleeper(void *arg) {
  deep_a((int)(intptr_t)arg);
  KEEP_FRAME();
}

static void spinner(void *arg) {
  (void)arg;
  atomic_store(&spinning, true);
  while (!atomic_load(&release))
    KEEP_FRAME();
}

/* The breakpoint.  noinline and with a side effect so that it stays a
 * real call the debugger can stop in. */
__attribute__((noinline)) void loom_gdb_test_stop(void);
__attribute__((noinline)) void loom_gdb_test_stop(void) { KEEP_FRAME(); }

static void die(const char *what, int err) {
  fprintf(stderr, "gdb_target: %s: %d\n", what, err);
  exit(1);
}

static void main_co(void *arg) {
  int err;
  (void)arg;
  for (intptr_t i = 0; i < NSLEEPERS; i++)
    if ((err = loom_go(sleeper, (void *)i)) != 0)
      die("loom_go", err);
  if ((err = loom_go(spinner, NULL)) != 0)
    die("loom_go", err);
  /* A sleeper counts itself just before it parks; the extra sleep lets
   * the last one finish parking (its status turns waiting only after its
   * registers are saved). */
  while (atomic_load(&parked) < NSLEEPERS || !atomic_load(&spinning))
    loom_sleep(1000000);
  loom_sleep(5000000);
  loom_gdb_test_stop();
  atomic_store(&release, true);
}

int main(void) {
  loom_config cfg;
  loom_config_init(&cfg);
  cfg.procs = 2;             /* main on one P, the spinner on the other */
  cfg.long_run_warn_ns = -1; /* the spinner is on purpose */
  int err = loom_run(main_co, NULL, &cfg);
  if (err != 0)
    die("loom_run", err);
  return 0;
}
