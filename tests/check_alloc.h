/*
 * check_alloc.h — a loom_allocator for failure injection, shared by the
 * tests that make allocations fail (test_alloc.c, test_engine_alloc.c).
 *
 * It allocates with realloc/free and counts the blocks handed out and
 * not yet freed (`nlive`: 0 again when the test ends means loom freed
 * everything).  Every allocation fails while `fail_all` is set; otherwise
 * the including test decides, call by call, in its own
 *
 *   static bool should_fail(void);
 *
 * which it defines after including this header.  Every injected failure
 * passes through injected(): `break injected` in gdb shows who asked, and
 * with LOOM_TEST_ALLOC_BT=1 in the environment each one prints its stack
 * (addresses for addr2line) — for the failures that timing hides from
 * gdb.
 *
 * A sweep (one loom_run per failing allocation) starts
 * check_alloc_watchdog once, then makes each run with
 * check_alloc_loom_run: a run that lasts longer than its limit is a
 * hang, reported with the allocation it failed and the stacks of every
 * thread.
 */
#ifndef LOOM_TESTS_CHECK_ALLOC_H
#define LOOM_TESTS_CHECK_ALLOC_H

#include <execinfo.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <unistd.h>

#include "check.h"

static atomic_long nlive;          /* blocks handed out and not yet freed */
static atomic_long injected_count; /* failures we caused */
static atomic_int fail_all;        /* every allocation fails while set */

static bool should_fail(void);

__attribute__((noinline)) static void *injected(void) {
  atomic_fetch_add(&injected_count, 1);
  const char *bt = getenv("LOOM_TEST_ALLOC_BT");
  if (bt != NULL && bt[0] == '1') {
    void *frames[24];
    int n = backtrace(frames, 24);
    fprintf(stderr, "injected failure, stack:\n");
    backtrace_symbols_fd(frames, n, 2);
  }
  return NULL;
}

static void *hook_realloc(void *ud, void *p, size_t n) {
  (void)ud;
  if (atomic_load(&fail_all) || should_fail())
    return injected();
  void *q = realloc(p, n);
  if (q != NULL && p == NULL)
    atomic_fetch_add(&nlive, 1);
  return q;
}

static void hook_free(void *ud, void *p) {
  (void)ud;
  CHECK(p != NULL);
  atomic_fetch_sub(&nlive, 1);
  free(p);
}

static const loom_allocator hook = {hook_realloc, hook_free, NULL};

static _Atomic int64_t alloc_run_started; /* check_mono_ns(); 0: none */
static atomic_long alloc_run_at;          /* what that run fails */
static atomic_int alloc_run_from;
static int alloc_run_limit_s;

static inline void check_alloc_run_begin(long at, bool from) {
  atomic_store(&alloc_run_at, at);
  atomic_store(&alloc_run_from, from);
  atomic_store(&alloc_run_started, check_mono_ns());
}

static inline void check_alloc_run_end(void) {
  atomic_store(&alloc_run_started, 0);
}

static inline void *alloc_watchdog_main(void *arg) {
  (void)arg;
  for (;;) {
    usleep(100 * 1000);
    int64_t t = atomic_load(&alloc_run_started);
    if (t && check_mono_ns() - t > (int64_t)alloc_run_limit_s * 1000000000) {
      fprintf(stderr,
              "watchdog: allocation %ld%s: the run is stuck after %d s\n",
              atomic_load(&alloc_run_at),
              atomic_load(&alloc_run_from) ? " and on" : "", alloc_run_limit_s);
      fflush(stderr);
      check_dump_hang();
      abort();
    }
  }
  return NULL;
}

/* One run of a sweep: loom_run(fn, arg) on `procs` Ps, bracketed for
 * the watchdog, which must return 0 and leave no block allocated. */
static inline void check_alloc_loom_run(void (*fn)(void *), void *arg,
                                        int procs, long at, bool from) {
  CHECK_EQ(atomic_load(&nlive), 0);
  loom_config cfg;
  loom_config_init(&cfg);
  cfg.procs = procs;
  check_alloc_run_begin(at, from);
  int r = loom_run(fn, arg, &cfg);
  check_alloc_run_end();
  CHECKF(r == 0, "allocation %ld%s: loom_run returned %d (%s)", at,
         from ? " and on" : "", r, loom_err_name(r));
  CHECKF(atomic_load(&nlive) == 0,
         "allocation %ld%s: %ld blocks still allocated after loom_run "
         "returned",
         at, from ? " and on" : "", atomic_load(&nlive));
}

/* Start the watchdog of a sweep whose runs each take under limit_s. */
static inline void check_alloc_watchdog(int limit_s) {
  alloc_run_limit_s = limit_s;
  pthread_t w;
  CHECK_EQ(pthread_create(&w, NULL, alloc_watchdog_main, NULL), 0);
  CHECK_EQ(pthread_detach(w), 0);
}

#endif
