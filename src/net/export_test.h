/*
 * export_test.h — net internals the tests may use (runtime/export_test.h's
 * counterpart).  Linked from the static library only; never installed.
 */
#ifndef LOOM_NET_EXPORT_TEST_H
#define LOOM_NET_EXPORT_TEST_H

#include <sys/types.h>

#include "loom/ctx.h"

/* When set, every call bounded by a context (loom_read_ctx,
 * loom_write_ctx, loom_accept_ctx, the packet calls) calls it with the
 * context and the operation's result `r` after the operation returned
 * and before the cancel hook is removed: the moment in which a cancel
 * that lands while the call is completing still runs the hook, which a
 * test can reach only from here.  NULL outside tests; a test sets it
 * while no such call runs. */
extern void (*loom__test_ctx_op_done)(loom_ctx *ctx, ssize_t r);

#endif
