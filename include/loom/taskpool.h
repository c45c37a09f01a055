/*
 * loom/taskpool.h — a pool of worker coroutines behind bounded queues.
 *
 * A task pool separates network I/O from slow handlers (getty's task
 * pool): an engine session hands each decoded package to the pool instead
 * of running on_message on its reader, and the reader goes back to the
 * socket.  The pool has `queues` bounded FIFO queues; each queue is
 * drained by `workers` coroutines of its own.
 *
 * A task goes to the queue picked by its key (key % queues), so with one
 * worker per queue, tasks of one key run one at a time in submission
 * order — the way one session's packages stay in order.  Round-robin
 * dispatch is a key that counts up.
 *
 * A full queue is backpressure, not growth: loom_taskpool_submit waits
 * (up to its deadline) for room, so a session whose handler is slow stops
 * reading and TCP pushes back on its peer.  A queue counts tasks, not
 * bytes: what a task holds is its submitter's to bound (an engine session
 * bounds its packages in the pool by pool_high, engine.h).
 */
#ifndef LOOM_TASKPOOL_H
#define LOOM_TASKPOOL_H

#include <stddef.h>
#include <stdint.h>

#include "loom/common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct loom_taskpool loom_taskpool;

typedef struct loom_taskpool_opts {
  int queues;       /* number of queues (0: loom_procs() * 2) */
  int workers;      /* worker coroutines per queue (0: 1) */
  size_t queue_len; /* tasks each queue holds before submit waits (0: 256) */
} loom_taskpool_opts;

/*
 * loom_taskpool_make — start a pool (`o` NULL: defaults).  On a
 * coroutine.  Returns 0 and *p; -EINVAL (a negative count, more than
 * 65536 queues or workers per queue, a queue_len too large for any
 * buffer), -ENOMEM, LOOM_ENOTCO.
 */
LOOM_API int loom_taskpool_make(loom_taskpool **p, const loom_taskpool_opts *o);

/*
 * loom_taskpool_submit — queue fn(arg) on the queue of `key`.  Waits for
 * room until `deadline` (loom_now() time; 0: no limit;
 * LOOM_TASKPOOL_NOWAIT: do not wait).  Returns 0; -EAGAIN (full, no wait),
 * -ETIMEDOUT, LOOM_ECLOSED (the pool is closing: fn will not run),
 * -EINVAL (fn is NULL), -ENOMEM (no memory for the deadline's timer,
 * as for a channel send with a deadline).
 * Callable from any coroutine or plain thread (which then blocks); parks.
 */
#define LOOM_TASKPOOL_NOWAIT INT64_C(-1)
LOOM_API int loom_taskpool_submit(loom_taskpool *p, uint64_t key,
                                  void (*fn)(void *arg), void *arg,
                                  int64_t deadline);

/* Tasks queued and not yet started, over all queues.  Any thread. */
LOOM_API size_t loom_taskpool_queued(loom_taskpool *p);
/* Number of queues.  Any thread. */
LOOM_API int loom_taskpool_queues(loom_taskpool *p);
/* Tasks waiting in queue `i` (0 .. queues - 1; 0 for another i): one key
 * that floods its queue shows here, not in the total.  Any thread. */
LOOM_API size_t loom_taskpool_queue_len(loom_taskpool *p, int i);

/*
 * loom_taskpool_close — stop taking tasks, run every task already queued,
 * wait for the workers to finish, and free the pool.  Submitters waiting
 * for room return LOOM_ECLOSED, and so does a task that submits while the
 * pool drains.  Any other submit must have begun before the close does:
 * the caller stops its submitters first (an engine's servers and clients
 * before the pool they use), as the pool is freed when this returns.  On
 * a coroutine that is not one of the pool's workers.  Parks.
 */
LOOM_API void loom_taskpool_close(loom_taskpool *p);

#ifdef __cplusplus
}
#endif
#endif /* LOOM_TASKPOOL_H */
