/*
 * loom/ctx.h — contexts: cancellation, deadlines and values, in a tree
 * (Go's context package).
 *
 * A context is a node.  Cancelling one (loom_ctx_cancel, its deadline
 * passing, or its parent being cancelled) cancels its whole subtree,
 * each node exactly once, and closes each node's done channel, which
 * wakes everything waiting on it.  Values are looked up toward the root.
 *
 * Ownership: every loom_ctx_with_* call returns a node with one reference,
 * owned by the caller, who must drop it with loom_ctx_release when done
 * (Go's `defer cancel()`).  Release cancels the node if it was not, then
 * drops the reference; a node lives while a child or loom_ctx_ref holder
 * keeps it.  So a subtree may be released while another coroutine still
 * uses a node of it, as long as that coroutine holds its own reference.
 * The background context is static: never cancelled, release is a no-op.
 *
 * All calls are thread-safe.  Times are loom_now() nanoseconds.
 * Coroutines that still waited under a context when their loom_run
 * returned (a receive on its done channel, or any call bounded by it)
 * leave it as if they had never waited (runtime.h): it can then be
 * cancelled and released as any other.
 */
#ifndef LOOM_CTX_H
#define LOOM_CTX_H

#include <stdint.h>

#include "loom/chan.h"
#include "loom/common.h"
#include "loom/error.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct loom_ctx loom_ctx;

/* The root: never cancelled, no deadline, no values. */
LOOM_API loom_ctx *loom_ctx_background(void);

/* A child that is cancelled by loom_ctx_cancel or with its parent.
 * 0, -ENOMEM, -EINVAL (NULL parent). */
LOOM_API int loom_ctx_with_cancel(loom_ctx **out, loom_ctx *parent);

/* A child that is also cancelled, with -ETIMEDOUT, at `deadline` (or
 * earlier if the parent's deadline is earlier); 0 means none, as
 * everywhere in loom (the child then has its parent's deadline, if any).
 * A deadline of its own already passed gives a context cancelled at
 * once; one it takes from its parent cancels it with the parent, never
 * before (also when it has passed and the parent's timer is yet to run,
 * as Go's WithDeadline hands back a WithCancel child then).  A
 * deadline of its own still ahead is a runtime timer: it may be armed on
 * a coroutine, inside loom_block_enter/exit, or on a plain thread while
 * a runtime runs, and LOOM_ENORUNTIME (nothing made) when none does; a
 * runtime that ends takes the timer with it, and the context is never
 * cancelled by it.  0, -ENOMEM, -EINVAL (NULL out or parent). */
LOOM_API int loom_ctx_with_deadline(loom_ctx **out, loom_ctx *parent,
                                    int64_t deadline);
LOOM_API int loom_ctx_with_timeout(loom_ctx **out, loom_ctx *parent,
                                   int64_t ns);

/* A child carrying key → value (compared by address). */
LOOM_API int loom_ctx_with_value(loom_ctx **out, loom_ctx *parent,
                                 const void *key, void *value);

/* Cancel c and its subtree with -ECANCELED (no-op for the nodes already
 * cancelled).  Returns once every node of the subtree is cancelled, also
 * when another thread's cancel reached some of them first (as Go's,
 * which holds each node's lock while it cancels the node's children). */
LOOM_API void loom_ctx_cancel(loom_ctx *c);

/* 0 while live; -ECANCELED or -ETIMEDOUT once cancelled.  Non-zero
 * exactly when loom_ctx_done(c) is closed (Go: "If Done is not yet
 * closed, Err returns nil"); waiters woken by the cancel see it. */
LOOM_API int loom_ctx_err(loom_ctx *c);

/* A channel that is closed when c is cancelled, for loom_select (a
 * receive case on it becomes ready, with ok false).  NULL for the
 * background context (a NULL channel is never ready).  Valid while the
 * caller holds a reference to c.  Only to receive from: c closes it, and
 * a send on it or a close of it by anyone else breaks c (Go makes it a
 * receive-only channel; C cannot say so). */
LOOM_API loom_chan *loom_ctx_done(loom_ctx *c);

/* The earliest deadline of c and its ancestors, 0 if none. */
LOOM_API int64_t loom_ctx_deadline(loom_ctx *c);

/* The value for `key` in c or its nearest ancestor that has one, or NULL. */
LOOM_API void *loom_ctx_value(loom_ctx *c, const void *key);

/* Take another reference (for a coroutine that outlives the creator's
 * use), and drop one.  loom_ctx_release is the creator's, called once:
 * it cancels the node and drops the creator's reference (a second call
 * would drop a reference the creator no longer has); see the ownership
 * note above. */
LOOM_API loom_ctx *loom_ctx_ref(loom_ctx *c);
LOOM_API void loom_ctx_unref(loom_ctx *c);
LOOM_API void loom_ctx_release(loom_ctx *c);

/* Blocking calls bounded by a context: they return what the plain call
 * returns, or loom_ctx_err(c) (-ECANCELED, -ETIMEDOUT) once c is
 * cancelled.  A context cancelled before the call fails it at once,
 * though the channel be ready: nothing is sent or received.  A NULL
 * channel gives -EINVAL at once, as the plain call.  Each parks. */
LOOM_API int loom_sleep_ctx(loom_ctx *c, int64_t ns);
LOOM_API int loom_chan_send_ctx(loom_chan *ch, const void *elem, loom_ctx *c);
LOOM_API int loom_chan_recv_ctx(loom_chan *ch, void *elem, loom_ctx *c);

#ifdef __cplusplus
}
#endif
#endif /* LOOM_CTX_H */
