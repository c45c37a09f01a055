/*
 * chan.c — channels and select (Go's runtime/chan.go and select.go, in C).
 *
 * A channel is a ring buffer plus two FIFO queues of waiters (sudogs):
 * senders waiting for room or a receiver, receivers waiting for an
 * element or a sender.  All of it is protected by the channel's spinlock,
 * held for a few hundred instructions at most and never while parked:
 * a coroutine parks with loom__park whose commit releases the lock once
 * the coroutine is off its stack; a plain thread releases it and sleeps
 * on a futex note.
 *
 * Hand-off: a sender that finds a parked receiver copies the element
 * straight into the receiver's destination and wakes it (and vice versa),
 * so an unbuffered channel never copies twice.
 *
 * Claiming.  A waiter can sit on several queues (select) and have a
 * deadline.  Whoever completes it — a channel operation, a close, the
 * deadline timer — must first claim it by a CAS on its wait word, which
 * holds (sequence << 1 | claimed).  Exactly one claim succeeds; the others
 * skip that sudog.  The sequence makes a deadline timer that fires late,
 * into a later wait of the same coroutine, fail its CAS: the word has
 * moved on.
 *
 * Lock order for select: channels in ascending address order, each once;
 * so two selects over the same channels in different orders cannot
 * deadlock (Go's sellock).
 */
#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "loom/chan.h"
#include "runtime/alloc.h"
#include "runtime/runtime.h"
#include "sync/export_test.h"
#include "sync/wait.h"

typedef loom__waiter waiter;
typedef loom__wnode sudog;
typedef loom__waitq waitq;

struct loom_chan {
  int lock;
  size_t esize, cap;
  size_t count, sendx, recvx; /* the ring: count elements from recvx */
  bool closed;
  waitq recvq, sendq;
  char *buf;
};

/* ---- locks, queues, claims -------------------------------------------- */

static void lock(loom_chan *c) { loom__spin_lock(&c->lock); }
static void unlock(loom_chan *c) { loom__spin_unlock(&c->lock); }

#define enqueue loom__waitq_push
#define unlink_sudog loom__waitq_unlink
#define dequeue loom__waitq_pop
#define wake loom__waiter_wake
#define claim loom__waiter_claim
#define sudog_get loom__wnode_get
#define sudog_put loom__wnode_put

static void (*_Atomic after_close_wake)(void); /* export_test.h */

void (*loom__test_after_close_wake(void (*fn)(void)))(void) {
  return atomic_exchange(&after_close_wake, fn);
}

/* Wake a waiter close has claimed; the test hook after it. */
static void close_wake(loom__waiter *w) {
  wake(w);
  void (*fn)(void) =
      atomic_load_explicit(&after_close_wake, memory_order_relaxed);
  if (fn != NULL)
    fn();
}

/* dequeue from the back: the last claimable waiter, or NULL. */
static sudog *dequeue_back(waitq *q) {
  for (;;) {
    sudog *s = q->tail_;
    if (s == NULL)
      return NULL;
    unlink_sudog(q, s);
    if (claim(s->w))
      return s;
  }
}

static void elem_copy(loom_chan *c, void *dst, const void *src) {
  if (dst == NULL)
    return;
  /* Pointers and integers are what most channels carry: copy those
   * inline rather than through a call to libc's memcpy. */
  switch (c->esize) {
  case 0:
    return;
  case 4:
    memcpy(dst, src, 4);
    return;
  case 8:
    memcpy(dst, src, 8);
    return;
  case 16:
    memcpy(dst, src, 16);
    return;
  default:
    memcpy(dst, src, c->esize);
  }
}

static char *slot(loom_chan *c, size_t i) {
  return c->buf != NULL ? c->buf + i * c->esize : NULL; /* NULL: esize 0 */
}

/* ---- making and freeing ----------------------------------------------- */

int loom_chan_make(loom_chan **out, size_t esize, size_t cap) {
  if (out == NULL || (esize != 0 && cap > SIZE_MAX / esize))
    return -EINVAL;
  loom_chan *c = loom__calloc(1, sizeof *c);
  if (c == NULL)
    return -ENOMEM;
  c->esize = esize;
  c->cap = cap;
  if (cap > 0 && esize > 0) {
    c->buf = loom__malloc(cap * esize);
    if (c->buf == NULL) {
      loom__free(c);
      return -ENOMEM;
    }
  }
  *out = c;
  return 0;
}

void loom_chan_free(loom_chan *c) {
  if (c == NULL)
    return;
  if (c->recvq.head_ != NULL || c->sendq.head_ != NULL)
    loom__throw("chan_free: coroutines or threads still wait on it");
  loom__free(c->buf);
  loom__free(c);
}

size_t loom_chan_len(loom_chan *c) {
  if (c == NULL)
    return 0; /* Go's len of a nil channel */
  lock(c);
  size_t n = c->count;
  unlock(c);
  return n;
}

size_t loom_chan_cap(loom_chan *c) { return c != NULL ? c->cap : 0; }

/* ---- the operations on a locked channel -------------------------------- */

/* Try to complete a send now.  1 done, -EPIPE closed, 0 would wait.
 * Leaves c locked; fills *wk with a waiter to wake after unlocking. */
__attribute__((always_inline)) static inline int
try_send_locked(loom_chan *c, const void *elem, waiter **wk) {
  if (c->closed)
    return -EPIPE;
  sudog *r = dequeue(&c->recvq);
  if (r != NULL) {
    elem_copy(c, r->elem, elem);
    r->w->ok = true;
    r->w->fired = r->idx;
    *wk = r->w;
    return 1;
  }
  if (c->count < c->cap) {
    elem_copy(c, slot(c, c->sendx), elem);
    c->sendx = (c->sendx + 1) % c->cap;
    c->count++;
    return 1;
  }
  return 0;
}

/* Try to complete a receive now.  1 with an element, 2 closed and
 * drained, 0 would wait. */
__attribute__((always_inline)) static inline int
try_recv_locked(loom_chan *c, void *elem, waiter **wk) {
  /* Senders still queued on a closed channel are close's to fail (it
   * drops the lock between wake-ups): none of them may hand over. */
  sudog *s = c->closed ? NULL : dequeue(&c->sendq);
  if (s != NULL) {
    if (c->cap == 0) {
      elem_copy(c, elem, s->elem);
    } else {
      /* Full buffer: take the head, and the sender's element goes to
       * the tail (the slot just freed), keeping FIFO order. */
      elem_copy(c, elem, slot(c, c->recvx));
      elem_copy(c, slot(c, c->recvx), s->elem);
      c->recvx = (c->recvx + 1) % c->cap;
      c->sendx = c->recvx;
    }
    s->w->ok = true;
    s->w->fired = s->idx;
    *wk = s->w;
    return 1;
  }
  if (c->count > 0) {
    elem_copy(c, elem, slot(c, c->recvx));
    c->recvx = (c->recvx + 1) % c->cap;
    c->count--;
    return 1;
  }
  if (c->closed)
    return 2;
  return 0;
}

/* ---- waiting ------------------------------------------------------------ */

#define waiter_init loom__waiter_init

struct unlock_set {
  loom_chan **locked; /* channels to unlock, in order */
  int nlocked;
};

static void unlock_all(void *arg) {
  struct unlock_set *u = arg;
  for (int i = u->nlocked - 1; i >= 0; i--)
    unlock(u->locked[i]);
}

/* A send's or a receive's wait taken back (loom__abandon). */
static bool withdraw_one(waiter *w) {
  loom_chan *c = w->obj;
  sudog *s = w->node;
  return loom__waitq_take_back(&c->lock, s->send ? &c->sendq : &c->recvq, s);
}
static const loom__abandon abandon_one = {withdraw_one, NULL};

/* ---- single operations --------------------------------------------------- */

__attribute__((always_inline)) static inline int
send_impl(loom_chan *c, const void *elem, bool block, int64_t deadline) {
  if (c == NULL || (elem == NULL && c->esize != 0))
    return -EINVAL;
  waiter *wk = NULL;
  lock(c);
  int r = try_send_locked(c, elem, &wk);
  if (r != 0 || !block || (deadline != 0 && deadline <= loom_now())) {
    unlock(c);
    if (wk != NULL)
      wake(wk);
    return r == 1 ? 0 : r != 0 ? r : block ? -ETIMEDOUT : -EAGAIN;
  }
  waiter w;
  waiter_init(&w, deadline == 0);
  sudog local, *s = sudog_get(&w, &c->sendq, &local);
  *s =
      (sudog){.w = &w, .elem = (void *)(uintptr_t)elem, .idx = 0, .send = true};
  enqueue(&c->sendq, s);
  loom__waiter_watch(&w, &abandon_one, c, s);
  loom__waiter_wait_unlock(&w, &c->lock, deadline, NULL);
  loom__waiter_unwatch(&w);
  if (w.fired < 0) {
    lock(c);
    unlink_sudog(&c->sendq, s);
    unlock(c);
    sudog_put(s, &local);
    return loom__waiter_err(&w, NULL);
  }
  r = w.ok ? 0 : -EPIPE;
  sudog_put(s, &local);
  return r;
}

__attribute__((always_inline)) static inline int
recv_impl(loom_chan *c, void *elem, bool block, int64_t deadline) {
  if (c == NULL)
    return -EINVAL;
  waiter *wk = NULL;
  lock(c);
  int r = try_recv_locked(c, elem, &wk);
  if (r != 0 || !block || (deadline != 0 && deadline <= loom_now())) {
    unlock(c);
    if (wk != NULL)
      wake(wk);
    return r == 1 ? 1 : r == 2 ? 0 : block ? -ETIMEDOUT : -EAGAIN;
  }
  waiter w;
  waiter_init(&w, deadline == 0);
  sudog local, *s = sudog_get(&w, &c->recvq, &local);
  *s = (sudog){.w = &w, .elem = elem, .idx = 0, .send = false};
  enqueue(&c->recvq, s);
  loom__waiter_watch(&w, &abandon_one, c, s);
  loom__waiter_wait_unlock(&w, &c->lock, deadline, NULL);
  loom__waiter_unwatch(&w);
  if (w.fired < 0) {
    lock(c);
    unlink_sudog(&c->recvq, s);
    unlock(c);
    sudog_put(s, &local);
    return loom__waiter_err(&w, NULL);
  }
  r = w.ok ? 1 : 0;
  sudog_put(s, &local);
  return r;
}

int loom_chan_send(loom_chan *c, const void *elem) {
  return send_impl(c, elem, true, 0);
}
int loom_chan_send_until(loom_chan *c, const void *elem, int64_t deadline) {
  return send_impl(c, elem, true, deadline);
}
int loom_chan_try_send(loom_chan *c, const void *elem) {
  return send_impl(c, elem, false, 0);
}
int loom_chan_recv(loom_chan *c, void *elem) {
  return recv_impl(c, elem, true, 0);
}
int loom_chan_recv_until(loom_chan *c, void *elem, int64_t deadline) {
  return recv_impl(c, elem, true, deadline);
}
int loom_chan_try_recv(loom_chan *c, void *elem) {
  return recv_impl(c, elem, false, 0);
}

bool loom__chan_closed(loom_chan *c) {
  return __atomic_load_n(&c->closed, __ATOMIC_ACQUIRE);
}

int loom_chan_close(loom_chan *c) {
  if (c == NULL)
    return -EINVAL;
  lock(c);
  if (c->closed) {
    unlock(c);
    return -EPIPE;
  }
  __atomic_store_n(&c->closed, true, __ATOMIC_RELEASE);
  /* Wake every claimable waiter, a batch at a time, unlocked.  Nobody
   * queues on a closed channel, so the queues only shrink meanwhile.
   *
   * The channel may be freed as soon as every call on it has returned
   * (close a done channel, and the woken waiter frees it), and waiters
   * close does not wake can leave on their own meanwhile (a deadline):
   * so after unlocking, close touches the channel again only while it
   * holds a waiter it has claimed and not yet woken, whose call cannot
   * return before that: the last of each batch, woken after the next
   * unlock.
   *
   * A walk of the queue is a chain of misses, each address in the node
   * before (past the first, the nodes are wait records, so cache
   * misses rather than TLB misses: wait.h).  So the batch is taken from
   * both ends of the queue, two chains whose misses overlap (Go's close
   * promises no order either: it readies the waiters last first).  What
   * each waiter learns goes to its waiter, on its stack, whose G the
   * wake-up touches next: prefetched here. */
  enum { BATCH = 32 };
  sudog *batch[BATCH];
  sudog *held = NULL;
  for (;;) {
    /* The head's waiters fill the batch from the front, the tail's from
     * the back, so that each part is in queue order: woken so, they run
     * so, and the run queue walks each part's stacks in address order
     * when they were carved in order. */
    int front = 0, back = BATCH;
    waitq *q = &c->recvq;
    while (front < back) {
      bool from_back = (front + BATCH - back) & 1;
      sudog *s = from_back ? dequeue_back(q) : dequeue(q);
      if (s == NULL) {
        if (q == &c->sendq || c->sendq.head_ == NULL)
          break;
        q = &c->sendq;
        continue;
      }
      s->w->ok = false;
      s->w->fired = s->idx;
      __builtin_prefetch(s->w->g); /* its wake touches the G */
      __builtin_prefetch(from_back ? q->tail_ : q->head_); /* that end's next */
      if (from_back)
        batch[--back] = s;
      else
        batch[front++] = s;
    }
    int n = front + BATCH - back;
    memmove(batch + front, batch + back,
            (size_t)(BATCH - back) * sizeof *batch);
    bool more = c->recvq.head_ != NULL || c->sendq.head_ != NULL;
    unlock(c);
    if (held != NULL)
      close_wake(held->w);
    if (!more) {
      for (int i = 0; i < n; i++)
        close_wake(batch[i]->w); /* the channel is not touched again */
      return 0;
    }
    for (int i = 0; i < n - 1; i++)
      close_wake(batch[i]->w);
    held = batch[n - 1]; /* keeps the channel alive until the next unlock */
    lock(c);
  }
}

/* ---- select --------------------------------------------------------------- */

static int cmp_chan(const void *a, const void *b) {
  uintptr_t x = (uintptr_t) * (loom_chan *const *)a;
  uintptr_t y = (uintptr_t) * (loom_chan *const *)b;
  return x < y ? -1 : x > y;
}

#define SELECT_MAX 1024

/* A waiting select, for the clean-up after its wait and for teardown. */
struct sel {
  loom_case *cases;
  int n;
  sudog **sg;        /* each queued case's sudog: a wait record, */
  sudog *sg_local;   /* or the case's one here (sudog_get) */
  loom_chan **locks; /* sorted, each once */
  int nu;
  int *order; /* with sg_local (and sg) and locks, on the heap past 8 */
};

/* Take every sudog of the select off its queue. */
static void dequeue_all(const struct sel *s) {
  for (int i = 0; i < s->nu; i++)
    lock(s->locks[i]);
  for (int i = 0; i < s->n; i++)
    if (s->cases[i].chan != NULL)
      unlink_sudog(s->sg[i]->send ? &s->cases[i].chan->sendq
                                  : &s->cases[i].chan->recvq,
                   s->sg[i]);
  for (int i = s->nu - 1; i >= 0; i--)
    unlock(s->locks[i]);
}

/* A select taken back (loom__abandon), fired or not: it would lock every
 * channel again to take its sudogs off.  It never returns, so its
 * scratch goes too. */
static void give_back_select(waiter *w) {
  struct sel *s = w->obj;
  dequeue_all(s);
  if (s->n > 8) {
    loom__free(s->order);
    loom__free(s->locks);
    loom__free(s->sg_local);
  }
}
static bool withdraw_select(waiter *w) {
  give_back_select(w);
  return true;
}
static const loom__abandon abandon_select = {withdraw_select, give_back_select};

/* Long, like Go's selectgo: poll, queue, wait, dequeue, in one place. */
int loom_select(loom_case *cases, int n, int64_t deadline) { // NOLINT(readability-function-cognitive-complexity)
  if (n < 0 || n > SELECT_MAX || (n > 0 && cases == NULL))
    return -EINVAL;
  for (int i = 0; i < n; i++)
    if (cases[i].chan != NULL &&
        ((cases[i].dir != LOOM_SEND && cases[i].dir != LOOM_RECV) ||
         (cases[i].dir == LOOM_SEND && cases[i].elem == NULL &&
          cases[i].chan->esize != 0)))
      return -EINVAL; /* no direction, or nothing to send */
  bool nowait = deadline == LOOM_SELECT_NOWAIT;

  /* Scratch: the poll order, the lock order, the sudogs (wait records
   * where we can have them, else these) and where each is.  Small
   * selects stay on the stack. */
  int order_s[8];
  loom_chan *locks_s[8];
  sudog sg_s[8], *sgp_s[8];
  int *order = order_s;
  loom_chan **locks = locks_s;
  sudog *sg_local = sg_s, **sg = sgp_s;
  if (n > 8) {
    order = loom__malloc((size_t)n * sizeof *order);
    locks = loom__malloc((size_t)n * sizeof *locks);
    sg_local = loom__calloc((size_t)n, sizeof *sg_local + sizeof *sg);
    if (order == NULL || locks == NULL || sg_local == NULL) {
      loom__free(order);
      loom__free(locks);
      loom__free(sg_local);
      return -ENOMEM;
    }
    sg = (sudog **)(void *)(sg_local + n);
  }

  /* A random permutation for polling; channels sorted, deduplicated. */
  int nl = 0;
  for (int i = 0; i < n; i++) {
    int j = (int)loom__fastrandn((uint32_t)i + 1);
    if (j != i)
      order[i] = order[j]; /* inside-out Fisher-Yates */
    order[j] = i;
    if (cases[i].chan != NULL)
      locks[nl++] = cases[i].chan;
  }
  if (nl <= 16) { /* insertion sort: selects are small */
    for (int i = 1; i < nl; i++) {
      loom_chan *x = locks[i];
      int j = i - 1;
      for (; j >= 0 && (uintptr_t)locks[j] > (uintptr_t)x; j--)
        locks[j + 1] = locks[j];
      locks[j + 1] = x;
    }
  } else {
    qsort(locks, (size_t)nl, sizeof *locks, cmp_chan);
  }
  int nu = 0;
  for (int i = 0; i < nl; i++)
    if (nu == 0 || locks[nu - 1] != locks[i])
      locks[nu++] = locks[i];
  for (int i = 0; i < nu; i++)
    lock(locks[i]);

  int result = -1;
  waiter *wk = NULL;
  for (int k = 0; k < n && result < 0; k++) {
    loom_case *cs = &cases[order[k]];
    if (cs->chan == NULL)
      continue;
    int r = cs->dir == LOOM_SEND ? try_send_locked(cs->chan, cs->elem, &wk)
                                 : try_recv_locked(cs->chan, cs->elem, &wk);
    if (r == 0)
      continue;
    result = order[k];
    cs->ok = r == 1; /* -EPIPE (send) or 2 (recv): the channel closed */
  }
  if (result >= 0 || nowait || (deadline != 0 && deadline <= loom_now())) {
    for (int i = nu - 1; i >= 0; i--)
      unlock(locks[i]);
    if (wk != NULL)
      wake(wk);
    if (result < 0)
      result = nowait ? -EAGAIN : -ETIMEDOUT;
    goto out;
  }
  if (nu == 0 && deadline == 0) {
    /* No channel and no deadline: Go's select {} blocks forever; we
     * refuse instead of hanging the caller. */
    result = -EINVAL;
    goto out;
  }

  /* Nothing ready: queue a sudog on every channel, then wait. */
  waiter w;
  waiter_init(&w, false);
  for (int i = 0; i < n; i++) {
    loom_case *cs = &cases[i];
    if (cs->chan == NULL)
      continue;
    waitq *q = cs->dir == LOOM_SEND ? &cs->chan->sendq : &cs->chan->recvq;
    sg[i] = sudog_get(&w, q, &sg_local[i]);
    *sg[i] = (sudog){
        .w = &w, .elem = cs->elem, .idx = i, .send = cs->dir == LOOM_SEND};
    enqueue(q, sg[i]);
  }
  struct sel sel = {cases, n, sg, sg_local, locks, nu, order};
  struct unlock_set u = {locks, nu};
  loom__waiter_watch(&w, &abandon_select, &sel, NULL);
  loom__waiter_wait(&w, unlock_all, &u, deadline);
  loom__waiter_unwatch(&w);
  dequeue_all(&sel); /* our other sudogs */
  if (w.fired < 0) {
    result = loom__waiter_err(&w, NULL);
  } else {
    result = w.fired;
    cases[result].ok = w.ok;
  }
  for (int i = 0; i < n; i++)
    if (cases[i].chan != NULL)
      sudog_put(sg[i], &sg_local[i]);

out:
  if (n > 8) {
    loom__free(order);
    loom__free(locks);
    loom__free(sg_local);
  }
  return result;
}
