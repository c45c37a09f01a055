/*
 * export_test.h — internals the tests may look at (Go's export_test.go).
 * Linked from the static library only; never installed.
 */
#ifndef LOOM_EXPORT_TEST_H
#define LOOM_EXPORT_TEST_H

#include <stdint.h>

/* Index (0..procs-1) of the P running the caller, or -1 outside a
 * coroutine. */
int loom__test_proc_id(void);
/* Id of the M (thread) running the caller, or 0 outside the runtime. */
uint64_t loom__test_thread_id(void);
/* 1 if stack guards are kernel guard pages (MADV_GUARD_INSTALL), 0 if
 * the canary fallback is in use.  Valid while a runtime runs. */
int loom__test_stack_guard_pages(void);
/* Before loom_run: act as on a kernel without MADV_GUARD_INSTALL —
 * mode 1: mprotect guards (within their budget), 2: canaries only;
 * 0: what the kernel has. */
void loom__test_stack_fallback(int mode);
/* Rounds sysmon has made since the runtime started.  Valid while a
 * runtime runs. */
uint64_t loom__test_sysmon_rounds(void);
/* The next n wake-ups that would start a thread for an idle P
 * (loom__wakep, once it has claimed the spinning slot) do nothing: a lost
 * wake-up, for the tests of what recovers from one.  Returns how many
 * of the previous request were still to be lost (0 cancels it). */
int loom__test_lose_wakeps(int n);
/* fn (NULL: none) runs first thing in every plain thread's wake-up of a
 * coroutine, before it takes the runtime's global lock: a test's way to
 * hold a waker at that point.  Returns the previous one. */
void (*loom__test_hold_foreign_ready(void (*fn)(void)))(void);
/* Blocks of wait records (wrec.c) the running runtime has made, or -1
 * with none running: a record never given back shows as growth. */
int loom__test_wrec_blocks(void);

#endif
