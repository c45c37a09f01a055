/*
 * taskpool.c — bounded queues drained by worker coroutines; see
 * loom/taskpool.h.
 *
 * Each queue is a buffered loom channel of tasks: the channel already
 * has what a queue needs — FIFO order, a bound, waiting senders when it
 * is full, waiting receivers when it is empty, and close that lets the
 * receivers drain what is buffered.  A worker loops on loom_chan_recv of
 * its queue until the channel is closed and empty.
 *
 * Rejected: one shared queue for all workers (no per-key order); a
 * worker per key (unbounded coroutines under a key-rich load).
 */
#include <errno.h>
#include <stdatomic.h>
#include <stdint.h>

#include "loom/chan.h"
#include "loom/runtime.h"
#include "loom/sync.h"
#include "loom/taskpool.h"
#include "runtime/alloc.h"
#include "runtime/runtime.h"

typedef struct task {
  void (*fn)(void *arg);
  void *arg;
} task;

struct loom_taskpool {
  int nq, per_queue;
  loom_chan **q;
  loom_wg workers;
  /* Submits inside the pool.  A submitter that waited for room and was
   * woken by its deadline takes itself off the queue's waiters under the
   * queue's lock, after the close has woken the others: the close frees
   * the queues only once every submit has left. */
  loom_wg submits;
  _Atomic int closing;
};

typedef struct worker_arg {
  loom_taskpool *p;
  loom_chan *q;
} worker_arg;

static void worker_main(void *arg) {
  worker_arg wa = *(worker_arg *)arg;
  loom__free(arg);
  loom__pool_tag_set(wa.p); /* read by the engine's closes (owner.c) */
  task t;
  while (loom_chan_recv(wa.q, &t) == 1)
    t.fn(t.arg);
  loom_wg_done(&wa.p->workers);
}

static void pool_free(loom_taskpool *p) {
  for (int i = 0; p->q != NULL && i < p->nq; i++)
    loom_chan_free(p->q[i]);
  loom__free(p->q);
  loom__free(p);
}

int loom_taskpool_make(loom_taskpool **out, const loom_taskpool_opts *o) {
  int nq = o && o->queues ? o->queues : loom_procs() * 2;
  int per = o && o->workers ? o->workers : 1;
  size_t qlen = o && o->queue_len ? o->queue_len : 256;
  if (nq <= 0 || per <= 0 || nq > 65536 || per > 65536)
    return -EINVAL;
  if (loom_id() == 0)
    return LOOM_ENOTCO;
  if (qlen > SIZE_MAX / sizeof(task)) /* no buffer that size */
    return -EINVAL;
  loom_taskpool *p = loom__calloc(1, sizeof *p);
  if (!p)
    return -ENOMEM;
  p->per_queue = per;
  p->q = loom__calloc((size_t)nq, sizeof *p->q);
  if (!p->q)
    goto fail;
  for (; p->nq < nq; p->nq++) {
    int rc = loom_chan_make(&p->q[p->nq], sizeof(task), qlen);
    if (rc < 0)
      goto fail;
  }
  /* Start the workers; if one cannot start, close what exists. */
  for (int i = 0; i < nq; i++) {
    for (int w = 0; w < per; w++) {
      worker_arg *wa = loom__malloc(sizeof *wa);
      if (!wa)
        goto fail_started;
      *wa = (worker_arg){p, p->q[i]};
      loom_wg_add(&p->workers, 1);
      if (loom_go(worker_main, wa) < 0) {
        loom_wg_done(&p->workers);
        loom__free(wa);
        goto fail_started;
      }
    }
  }
  *out = p;
  return 0;
fail_started:
  loom_taskpool_close(p);
  return -ENOMEM;
fail:
  pool_free(p);
  return -ENOMEM;
}

int loom_taskpool_submit(loom_taskpool *p, uint64_t key, void (*fn)(void *),
                         void *arg, int64_t deadline) {
  if (fn == NULL) /* a worker would call it */
    return -EINVAL;
  loom_wg_add(&p->submits, 1);
  int rc;
  if (atomic_load(&p->closing)) {
    rc = -EPIPE;
  } else {
    loom_chan *q = p->q[key % (uint64_t)p->nq];
    task t = {fn, arg};
    if (deadline == LOOM_TASKPOOL_NOWAIT)
      rc = loom_chan_try_send(q, &t);
    else if (deadline > 0)
      rc = loom_chan_send_until(q, &t, deadline);
    else
      rc = loom_chan_send(q, &t);
  }
  loom_wg_done(&p->submits); /* the last touch of *p */
  return rc == -EPIPE ? LOOM_ECLOSED : rc;
}

size_t loom_taskpool_queued(loom_taskpool *p) {
  size_t n = 0;
  for (int i = 0; i < p->nq; i++)
    n += loom_chan_len(p->q[i]);
  return n;
}

int loom_taskpool_queues(loom_taskpool *p) { return p->nq; }

size_t loom_taskpool_queue_len(loom_taskpool *p, int i) {
  return i >= 0 && i < p->nq ? loom_chan_len(p->q[i]) : 0;
}

void loom_taskpool_close(loom_taskpool *p) {
  atomic_store(&p->closing, 1);
  for (int i = 0; i < p->nq; i++)
    loom_chan_close(p->q[i]);
  loom_wg_wait(&p->workers, 0);
  loom_wg_wait(&p->submits, 0);
  pool_free(p);
}
