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
 */
#ifndef LOOM_TESTS_CHECK_ALLOC_H
#define LOOM_TESTS_CHECK_ALLOC_H

#include <execinfo.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>

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

#endif
