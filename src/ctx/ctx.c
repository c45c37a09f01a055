/*
 * ctx.c — context trees (see loom/ctx.h).
 *
 * Each node keeps its parent (a counted reference: values and deadlines
 * are looked up toward the root) and a list of its children (not counted:
 * cancellation goes down it).  Cancelling walks the subtree with an
 * explicit stack threaded through the nodes, never recursion: a chain of
 * ten thousand contexts must not overflow a coroutine's stack, and when
 * that stack cannot get memory the walk goes on through the tree's own
 * links (cancel_nomem): a cancel never fails.  While a node is on that
 * stack it holds a reference, so a child released during its parent's
 * cancel is not freed under it.  Freeing likewise walks up
 * the parent chain in a loop.
 *
 * A node is cancelled exactly once: under its lock, err goes from 0 to
 * the reason, and only the caller that did that closes its done channel
 * and runs its hooks, then sets `fin`.  A cancel returns only once the
 * whole subtree is cancelled, as Go's does (it holds each node's lock
 * while it cancels the node's children): a walk that meets a node
 * another thread is cancelling waits for that node's fin, and goes on
 * down its children itself.  For that, a cancelled node keeps its
 * children on its list; only a child's release takes it off (after its
 * own cancel, which has waited for its subtree).
 *
 * loom_ctx_err reports err only once the done channel is marked closed,
 * so that an err seen means a closed done channel, and a done channel
 * seen closed means an err (Go's contract).
 */
#include <errno.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "loom/ctx.h"
#include "runtime/alloc.h"
#include "runtime/stack.h"
#include "runtime/runtime.h"
#include "ctx/ctx_internal.h"
#include "sync/wait.h"

struct loom_ctx {
  int lock;                 /* over err, children, linked */
  _Atomic int refs;
  int err;                  /* 0, -ECANCELED, -ETIMEDOUT; read atomically */
  bool background;
  bool linked;              /* on its parent's children list */
  bool has_value;
  bool has_timer;
  loom_ctx *parent;         /* counted reference */
  loom_ctx *kids;           /* children, not counted; kept at cancel */
  _Atomic int fin;          /* cancelled: done closed, hooks run */
  _Atomic int tree_fin;     /* and its whole subtree (see cancel_subtree) */
  loom_ctx *sib_next, *sib_prev;
  loom_chan *done;
  int64_t deadline;         /* effective: min with the parent's, 0 none */
  const void *key;
  void *value;
  loom__timer timer;
  loom__ctx_hook *hooks;    /* run at cancel, under lock */
};

static loom_ctx background = {.background = true};

loom_ctx *loom_ctx_background(void) { return &background; }

loom_ctx *loom_ctx_ref(loom_ctx *c) {
  if (c != NULL && !c->background)
    atomic_fetch_add(&c->refs, 1);
  return c;
}

/* Off its parent's list of children, if it is still on it. */
static void unlink_child(loom_ctx *c) {
  loom_ctx *p = c->parent;
  if (p->background)
    return;
  loom__spin_lock(&p->lock);
  if (c->linked) {
    if (c->sib_prev != NULL)
      c->sib_prev->sib_next = c->sib_next;
    else
      p->kids = c->sib_next;
    if (c->sib_next != NULL)
      c->sib_next->sib_prev = c->sib_prev;
    c->linked = false;
  }
  loom__spin_unlock(&p->lock);
}

/* A reference to a child found on its parent's list (under the parent's
 * lock), unless its last one is being dropped: then it has no children
 * left, and it leaves the list as soon as the lock is free. */
static bool ref_listed(loom_ctx *c) {
  int r = atomic_load(&c->refs);
  while (r > 0)
    if (atomic_compare_exchange_weak(&c->refs, &r, r + 1))
      return true;
  return false;
}

void loom_ctx_unref(loom_ctx *c) {
  while (c != NULL && !c->background &&
         atomic_fetch_sub(&c->refs, 1) == 1) {
    loom_ctx *parent = c->parent;
    /* Released, it left the list; dropped without a release (or by
     * the last holder after it), it leaves now. */
    unlink_child(c);
    /* The armed timer's reference is gone, so it has fired (and its
     * timers_run is done with it) or was stopped: a safety net. */
    if (c->has_timer)
      loom__timer_del(&c->timer);
    loom_chan_free(c->done);
    loom__free(c);
    c = parent; /* drop the reference c held on its parent */
  }
}

/* Until another thread's cancel of n is through with n itself (it never
 * parks meanwhile: it closes a channel and runs short hooks). */
static void wait_fin(loom_ctx *n) {
  unsigned spins = 1;
  while (!atomic_load_explicit(&n->fin, memory_order_acquire))
    loom__backoff(&spins);
}

/* Cancel n itself, or wait for the cancel of it under way. */
static void cancel_node(loom_ctx *n, int err) {
  loom__spin_lock(&n->lock);
  bool first = n->err == 0;
  if (first)
    __atomic_store_n(&n->err, err, __ATOMIC_RELEASE);
  bool armed = n->has_timer; /* set under this lock (with_deadline) */
  loom__spin_unlock(&n->lock);
  if (!first) {
    wait_fin(n);
    return;
  }
  loom_chan_close(n->done); /* wakes everything waiting on it */
  /* Hooks run under the lock, after the close (a waiter woken by one
   * finds done closed), and so never after loom__ctx_unhook returned.
   * None is added once err is set. */
  loom__spin_lock(&n->lock);
  for (loom__ctx_hook *h = n->hooks; h != NULL; h = h->next) {
    h->linked = false;
    h->fn(h->arg);
  }
  n->hooks = NULL;
  loom__spin_unlock(&n->lock);
  atomic_store_explicit(&n->fin, 1, memory_order_release);
  /* No wait: we may be its own fn.  A timer stopped before it fired
   * drops the reference it held; never the last one here (our caller,
   * or the walk, holds another). */
  if (armed && loom__timer_stop_any(&n->timer)) /* any thread */
    loom_ctx_unref(n);
}

/* x and its subtree, when there is no memory for a work list: a walk
 * down and back up the tree itself.  It goes down to a child not yet
 * tree_fin, and back up (by the parent pointer) from a node none of
 * whose children is left; so it holds a reference on the node it is at,
 * nothing else, and needs neither memory nor recursion.  A node with k
 * children costs k looks along their list, each up to k long: slow for
 * a wide fan-out, but only when memory has run out.  It ends: a
 * cancelled node gets no new children (attach cancels them instead). */
static void cancel_nomem(loom_ctx *x, int err) {
  if (atomic_load_explicit(&x->tree_fin, memory_order_acquire))
    return;
  cancel_node(x, err);
  loom_ctx *n = x; /* the caller's reference covers x */
  for (;;) {
    loom_ctx *k = NULL;
    loom__spin_lock(&n->lock);
    for (loom_ctx *y = n->kids; y != NULL && k == NULL; y = y->sib_next)
      if (!atomic_load_explicit(&y->tree_fin, memory_order_acquire) &&
          ref_listed(y))
        k = y;
    loom__spin_unlock(&n->lock);
    if (k != NULL) {
      cancel_node(k, err);
      /* Down, with the reference ref_listed took; n's own (none on x)
       * goes: k's reference on its parent keeps n alive. */
      if (n != x)
        loom_ctx_unref(n);
      n = k;
      continue;
    }
    atomic_store_explicit(&n->tree_fin, 1, memory_order_release);
    if (n == x)
      return;
    /* Up: a reference on the parent (kept alive by n's until then),
     * but none on x, which the caller's covers. */
    loom_ctx *p = n->parent;
    if (p != x)
      loom_ctx_ref(p);
    loom_ctx_unref(n);
    n = p;
  }
}

/* A work list entry that marks the end of a node's subtree: the node's
 * address with the low bit set (contexts are aligned). */
#define SUBTREE_END ((uintptr_t)1)

/* Cancel one node (unless its subtree is done already), and append its
 * children, with a reference each, to the walk's work list, below its
 * end mark.  What finds no room on the list is done here, without
 * memory. */
static void cancel_one(loom_ctx *n, int err, void ***work, size_t *len,
                       size_t *cap) {
  if (atomic_load_explicit(&n->tree_fin, memory_order_acquire))
    return; /* and so is every child added since: attach cancels them */
  cancel_node(n, err);
  /* The children, each with a reference: they stay on the list, which
   * may change as soon as the lock is dropped (a release unlinks). */
  loom__spin_lock(&n->lock);
  int nk = 0;
  for (loom_ctx *x = n->kids; x != NULL; x = x->sib_next)
    nk++;
  loom_ctx *kv_s[16];
  loom_ctx **kv = nk <= 16 ? kv_s : loom__malloc((size_t)nk * sizeof *kv);
  if (kv != NULL) {
    nk = 0;
    for (loom_ctx *x = n->kids; x != NULL; x = x->sib_next)
      if (ref_listed(x))
        kv[nk++] = x;
  }
  loom__spin_unlock(&n->lock);
  if (kv == NULL) {
    cancel_nomem(n, err);
    return;
  }
  /* n's end mark, below its children (no memory: n stays unmarked,
   * which costs only a walk more). */
  if (loom__ptrs_push(work, len, cap,
                      (void *)((uintptr_t)loom_ctx_ref(n) | SUBTREE_END)) != 0)
    loom_ctx_unref(n);
  for (int i = 0; i < nk; i++) {
    if (loom__ptrs_push(work, len, cap, kv[i]) != 0) {
      cancel_nomem(kv[i], err);
      loom_ctx_unref(kv[i]);
    }
  }
  if (kv != kv_s)
    loom__free(kv);
}

/* x's whole subtree, with a work list of its own.  The list is a stack:
 * cancel_one pushes a node's end mark below its children, so the mark
 * comes off once every descendant has been done, and the node is marked
 * tree_fin.  A later cancel of a node so marked (a release of each node
 * of a cancelled chain, parents first) then stops there instead of
 * walking the subtree again. */
static void cancel_subtree(loom_ctx *x, int err) {
  size_t len = 0, cap = 0;
  void **work = NULL;
  cancel_one(x, err, &work, &len, &cap);
  while (len > 0) {
    uintptr_t e = (uintptr_t)work[--len];
    loom_ctx *y = (loom_ctx *)(e & ~SUBTREE_END);
    if (e & SUBTREE_END)
      atomic_store_explicit(&y->tree_fin, 1, memory_order_release);
    else
      cancel_one(y, err, &work, &len, &cap);
    loom_ctx_unref(y);
  }
  loom__free(work);
  /* Done, whether or not its end mark found room on the list. */
  atomic_store_explicit(&x->tree_fin, 1, memory_order_release);
}

static void cancel(loom_ctx *root, int err) { cancel_subtree(root, err); }

static void hook_undo(loom__undo *u, loom__g *g) {
  (void)g;
  loom__ctx_hook *h =
      (loom__ctx_hook *)(void *)((char *)u - offsetof(loom__ctx_hook, undo));
  loom__ctx_unhook(h->ctx, h);
}

bool loom__ctx_hook_add(loom_ctx *c, loom__ctx_hook *h, loom__g *g) {
  if (c == NULL || c->background)
    return true; /* never cancelled: nothing to hook */
  loom__spin_lock(&c->lock);
  bool live = c->err == 0;
  if (live) {
    h->prev = NULL;
    h->next = c->hooks;
    if (c->hooks != NULL)
      c->hooks->prev = h;
    c->hooks = h;
    h->linked = true;
  }
  loom__spin_unlock(&c->lock);
  h->g = live ? g : NULL;
  if (h->g != NULL) {
    h->ctx = c;
    h->undo.fn = hook_undo;
    loom__undo_push(g, &h->undo);
  }
  return live;
}

void loom__ctx_unhook(loom_ctx *c, loom__ctx_hook *h) {
  if (c == NULL || c->background)
    return;
  if (h->g != NULL)
    loom__undo_pop(h->g, &h->undo);
  loom__spin_lock(&c->lock);
  if (h->linked) {
    if (h->prev != NULL)
      h->prev->next = h->next;
    else
      c->hooks = h->next;
    if (h->next != NULL)
      h->next->prev = h->prev;
    h->linked = false;
  }
  loom__spin_unlock(&c->lock);
}

/* The armed deadline holds a reference to its context, so the cancel
 * walk it starts cannot free the context under its own running timer
 * (the walk may drop the last reference of a child, which drops its
 * reference on us).  The timer's reference goes once timers_run is done
 * with the timer (deadline_done), or when a cancel stops the timer. */
static void deadline_fire(loom__timer *t, void *arg) {
  (void)t;
  cancel(arg, -ETIMEDOUT);
}

static void deadline_done(void *arg) { loom_ctx_unref(arg); }

static int child(loom_ctx **out, loom_ctx *parent, loom_ctx **made) {
  if (out == NULL || parent == NULL)
    return -EINVAL;
  loom_ctx *c = loom__calloc(1, sizeof *c);
  if (c == NULL)
    return -ENOMEM;
  int err = loom_chan_make(&c->done, 0, 0);
  if (err != 0) {
    loom__free(c);
    return err;
  }
  atomic_init(&c->refs, 1);
  c->parent = loom_ctx_ref(parent);
  c->deadline = parent->deadline;
  *made = c;
  return 0;
}

/* Hang c under its parent, or cancel it at once if the parent is. */
static void attach(loom_ctx *c) {
  loom_ctx *p = c->parent;
  if (p->background)
    return;
  loom__spin_lock(&p->lock);
  int perr = p->err;
  if (perr == 0) {
    c->sib_prev = NULL;
    c->sib_next = p->kids;
    if (p->kids != NULL)
      p->kids->sib_prev = c;
    p->kids = c;
    c->linked = true;
  }
  loom__spin_unlock(&p->lock);
  if (perr != 0) {
    /* The parent's cancel may still be closing its done channel: a child
     * done before its parent would have loom_ctx_err(parent) say 0 to
     * whoever saw the child's cancel.  That cancel never parks. */
    wait_fin(p);
    cancel(c, perr);
  }
}

int loom_ctx_with_cancel(loom_ctx **out, loom_ctx *parent) {
  loom_ctx *c;
  int err = child(out, parent, &c);
  if (err != 0)
    return err;
  attach(c);
  *out = c;
  return 0;
}

int loom_ctx_with_value(loom_ctx **out, loom_ctx *parent, const void *key,
                        void *value) {
  loom_ctx *c;
  int err = child(out, parent, &c);
  if (err != 0)
    return err;
  c->has_value = true;
  c->key = key;
  c->value = value;
  attach(c);
  *out = c;
  return 0;
}

/* Where a deadline's timer goes (loom__arm_begin: any thread), unless
 * it needs none (a->heap NULL). */
static int arm_begin(loom__arm *a, loom_ctx *parent, int64_t deadline) {
  a->heap = NULL;
  int64_t pd = parent->deadline;
  if (deadline == 0 || (pd != 0 && pd <= deadline) || deadline <= loom_now())
    return 0; /* none of its own, the parent's first, or passed: no timer */
  return loom__arm_begin(a, 1);
}

static void arm_end(loom__arm *a, int64_t armed) {
  if (a->heap != NULL)
    loom__arm_end(a, armed);
}

int loom_ctx_with_deadline(loom_ctx **out, loom_ctx *parent,
                           int64_t deadline) {
  if (out == NULL || parent == NULL)
    return -EINVAL;
  loom_ctx *c;
  int err = child(out, parent, &c);
  if (err != 0)
    return err;
  /* 0 is "none", as everywhere in loom: the parent's deadline, if any. */
  if (deadline != 0 && (c->deadline == 0 || deadline < c->deadline))
    c->deadline = deadline;
  /* Hung under the parent before the heap is held: a plain thread holds
   * the runtime's lock from loom__arm_begin on, and a plain thread that
   * cancels the parent takes that lock while it holds the parent's (its
   * hooks wake coroutines).  Without room for the timer, the child goes
   * again, and nobody has seen it. */
  attach(c);
  loom__arm a;
  err = arm_begin(&a, parent, deadline);
  if (err != 0) {
    loom_ctx_release(c);
    return err;
  }
  int64_t armed = 0;
  int64_t pd = parent->deadline;
  if (a.heap == NULL) {
    /* Our own deadline, passed: cancelled now.  None, or the parent's
     * (passed or not): its cancel reaches us, and we are never done
     * before it is, also when its timer has yet to run (Go's
     * WithDeadline gives a WithCancel child then). */
    if (deadline != 0 && (pd == 0 || deadline < pd) && deadline <= loom_now())
      cancel(c, -ETIMEDOUT);
  } else {
    /* Our own deadline is the earlier one: arm it, even if it has passed
     * since arm_begin looked (it fires at once).  Armed under c->lock,
     * and only while c is live: a parent's cancel may have reached c
     * since attach (cancel_one reads has_timer under the same lock). */
    c->timer.fn = deadline_fire;
    c->timer.done = deadline_done;
    c->timer.arg = c;
    loom__spin_lock(&c->lock);
    if (c->err == 0) {
      loom_ctx_ref(c); /* the timer's reference */
      c->has_timer = true;
      loom__timer_add(a.heap, &c->timer, deadline);
      armed = deadline;
    }
    loom__spin_unlock(&c->lock);
  }
  arm_end(&a, armed);
  *out = c;
  return 0;
}

int loom_ctx_with_timeout(loom_ctx **out, loom_ctx *parent, int64_t ns) {
  /* Saturated, as loom_sleep's: a huge timeout is "never". */
  return loom_ctx_with_deadline(out, parent, loom__after(ns < 0 ? 0 : ns));
}

void loom_ctx_cancel(loom_ctx *c) {
  if (c != NULL && !c->background)
    cancel(c, -ECANCELED);
}

int loom__ctx_reason(loom_ctx *c) {
  if (c == NULL || c->background)
    return 0;
  int e = __atomic_load_n(&c->err, __ATOMIC_ACQUIRE);
  /* A call that returns the reason must find loom_ctx_err agreeing with
   * it: wait out the moment between err and the done channel's close
   * (the cancel never parks there; it needs only c's lock and the
   * channel's, which no caller of this holds). */
  unsigned spins = 1;
  while (e != 0 && !loom__chan_closed(c->done))
    loom__backoff(&spins);
  return e;
}

int loom_ctx_err(loom_ctx *c) {
  if (c == NULL || c->background)
    return 0;
  int e = __atomic_load_n(&c->err, __ATOMIC_ACQUIRE);
  return e != 0 && loom__chan_closed(c->done) ? e : 0;
}

loom_chan *loom_ctx_done(loom_ctx *c) {
  return c == NULL || c->background ? NULL : c->done;
}

int64_t loom_ctx_deadline(loom_ctx *c) { return c ? c->deadline : 0; }

void *loom_ctx_value(loom_ctx *c, const void *key) {
  for (; c != NULL && !c->background; c = c->parent)
    if (c->has_value && c->key == key)
      return c->value;
  return NULL;
}

void loom_ctx_release(loom_ctx *c) {
  if (c == NULL || c->background)
    return;
  cancel(c, -ECANCELED);
  unlink_child(c);
  loom_ctx_unref(c);
}

/* ---- blocking calls bounded by a context ------------------------------- */

/* Without memory for the select's timer, loom_sleep_ctx sleeps in
 * slices of this, as loom_sleep does, and looks at the context between
 * them: like the plain call, it does not fail for want of a timer. */
#define SLEEP_CTX_SLICE_NS (5 * INT64_C(1000000))

int loom_sleep_ctx(loom_ctx *c, int64_t ns) {
  int64_t until = loom__after(ns < 0 ? 0 : ns);
  for (;;) {
    int err = loom_ctx_err(c);
    if (err != 0)
      return err;
    loom_case cs[1] = {{loom_ctx_done(c), LOOM_RECV, NULL, false}};
    int r = loom_select(cs, 1, until);
    if (r != -ENOMEM)
      return r == -ETIMEDOUT ? 0 : r == 0 ? loom_ctx_err(c) : r;
    int64_t left = until - loom_now();
    if (left <= 0)
      return 0;
    loom_sleep(left < SLEEP_CTX_SLICE_NS ? left : SLEEP_CTX_SLICE_NS);
  }
}

/* A NULL channel is the plain call's -EINVAL, not a case that is never
 * ready: the select would wait for the cancel.  A context done before
 * the call fails it, as every other call that takes one: the select
 * would choose at random between it and a ready channel. */
int loom_chan_send_ctx(loom_chan *ch, const void *elem, loom_ctx *c) {
  if (ch == NULL)
    return -EINVAL;
  int e = loom__ctx_reason(c);
  if (e != 0)
    return e;
  loom_case cs[2] = {{ch, LOOM_SEND, (void *)(uintptr_t)elem, false},
                     {loom_ctx_done(c), LOOM_RECV, NULL, false}};
  int r = loom_select(cs, 2, 0);
  if (r == 0)
    return cs[0].ok ? 0 : -EPIPE;
  return r == 1 ? loom_ctx_err(c) : r;
}

int loom_chan_recv_ctx(loom_chan *ch, void *elem, loom_ctx *c) {
  if (ch == NULL)
    return -EINVAL;
  int e = loom__ctx_reason(c);
  if (e != 0)
    return e;
  loom_case cs[2] = {{ch, LOOM_RECV, elem, false},
                     {loom_ctx_done(c), LOOM_RECV, NULL, false}};
  int r = loom_select(cs, 2, 0);
  if (r == 0)
    return cs[0].ok ? 1 : 0;
  return r == 1 ? loom_ctx_err(c) : r;
}
