/*
 * ctx.c — context trees (see loom/ctx.h).
 *
 * Each node keeps its parent (a counted reference: values and deadlines
 * are looked up toward the root) and a list of its children (not counted:
 * cancellation goes down it).  Cancelling walks the subtree with an
 * explicit stack threaded through the nodes, never recursion: a chain of
 * ten thousand contexts must not overflow a coroutine's stack.  While a
 * node is on that stack it holds a reference, so a child released during
 * its parent's cancel is not freed under it.  Freeing likewise walks up
 * the parent chain in a loop.
 *
 * A node is cancelled exactly once: under its lock, err goes from 0 to
 * the reason, and only the caller that did that closes its done channel.
 */
#include <errno.h>
#include <stdatomic.h>

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
  loom_ctx *kids;           /* children, not counted */
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

void loom_ctx_unref(loom_ctx *c) {
  while (c != NULL && !c->background &&
         atomic_fetch_sub(&c->refs, 1) == 1) {
    loom_ctx *parent = c->parent;
    /* The armed timer's reference is gone, so it has fired (and its
     * timers_run is done with it) or was stopped: a safety net. */
    if (c->has_timer)
      loom__timer_del(&c->timer);
    loom_chan_free(c->done);
    loom__free(c);
    c = parent; /* drop the reference c held on its parent */
  }
}

/* Cancel one node; its live children are appended (with a reference
 * each) to the walk's work list. */
/* Recursion only on the out-of-memory path, one level per failed push. */
static void cancel_one(loom_ctx *n, int err, void ***work, size_t *len, // NOLINT(misc-no-recursion)
                       size_t *cap) {
  loom__spin_lock(&n->lock);
  if (n->err != 0) {
    loom__spin_unlock(&n->lock);
    return;
  }
  __atomic_store_n(&n->err, err, __ATOMIC_RELEASE);
  bool armed = n->has_timer; /* set under this lock (with_deadline) */
  /* Hooks run under the lock: they are short (they expire a poll
   * descriptor) and take no context lock, and running them here means a
   * hook never runs after loom__ctx_unhook returned. */
  for (loom__ctx_hook *h = n->hooks; h != NULL; h = h->next) {
    h->linked = false;
    h->fn(h->arg);
  }
  n->hooks = NULL;
  loom_ctx *k = n->kids;
  n->kids = NULL;
  for (loom_ctx *x = k; x != NULL; x = x->sib_next) {
    x->linked = false;
    loom_ctx_ref(x);
  }
  loom__spin_unlock(&n->lock);
  loom_chan_close(n->done); /* wakes everything waiting on it */
  /* No wait: we may be its own fn.  A timer stopped before it fired
   * drops the reference it held; never the last one here (our caller,
   * or the walk, holds another). */
  if (armed && loom__timer_stop(&n->timer))
    loom_ctx_unref(n);
  while (k != NULL) {
    loom_ctx *next = k->sib_next; /* read before k can be released */
    if (loom__ptrs_push(work, len, cap, k) != 0) {
      /* No memory for the list: this child's subtree recursively. */
      size_t l2 = 0, c2 = 0;
      void **w2 = NULL;
      cancel_one(k, err, &w2, &l2, &c2);
      while (l2 > 0) {
        loom_ctx *x = w2[--l2];
        cancel_one(x, err, &w2, &l2, &c2);
        loom_ctx_unref(x);
      }
      loom__free(w2);
      loom_ctx_unref(k);
    }
    k = next;
  }
}

static void cancel(loom_ctx *root, int err) {
  void **work = NULL;
  size_t len = 0, cap = 0;
  cancel_one(root, err, &work, &len, &cap);
  while (len > 0) {
    loom_ctx *n = work[--len];
    cancel_one(n, err, &work, &len, &cap);
    loom_ctx_unref(n);
  }
  loom__free(work);
}

bool loom__ctx_hook_add(loom_ctx *c, loom__ctx_hook *h) {
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
  return live;
}

void loom__ctx_unhook(loom_ctx *c, loom__ctx_hook *h) {
  if (c == NULL || c->background)
    return;
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
  if (perr != 0)
    cancel(c, perr);
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

int loom_ctx_with_deadline(loom_ctx **out, loom_ctx *parent,
                           int64_t deadline) {
  loom__m *m = loom__getm();
  if (m == NULL || m->p == NULL || loom__getg() == NULL)
    return LOOM_ENOTCO;
  if (loom__timers_reserve(&m->p->timers, 1) != 0)
    return -ENOMEM;
  loom_ctx *c;
  int err = child(out, parent, &c);
  if (err != 0)
    return err;
  if (c->deadline == 0 || deadline < c->deadline)
    c->deadline = deadline;
  attach(c);
  if (c->deadline <= loom_now()) {
    cancel(c, -ETIMEDOUT);
  } else if (c->deadline == deadline) {
    /* Our own deadline is the earlier one: arm it (an inherited one
     * reaches us through the parent's cancel). */
    c->timer.fn = deadline_fire;
    c->timer.done = deadline_done;
    c->timer.arg = c;
    /* Armed under c->lock, and only while c is live: a parent's cancel
     * may have reached c since attach (cancel_one reads has_timer under
     * the same lock). */
    loom__spin_lock(&c->lock);
    bool arm = c->err == 0;
    if (arm) {
      loom_ctx_ref(c); /* the timer's reference */
      c->has_timer = true;
      loom__timer_add(&m->p->timers, &c->timer, deadline);
    }
    loom__spin_unlock(&c->lock);
    if (arm)
      loom__wake_netpoller(m->rt, deadline);
  }
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

int loom_ctx_err(loom_ctx *c) {
  return c == NULL || c->background ? 0
                                    : __atomic_load_n(&c->err, __ATOMIC_ACQUIRE);
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
  loom_ctx *p = c->parent;
  if (!p->background) {
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
  loom_ctx_unref(c);
}

/* ---- blocking calls bounded by a context ------------------------------- */

int loom_sleep_ctx(loom_ctx *c, int64_t ns) {
  int err = loom_ctx_err(c);
  if (err != 0)
    return err;
  loom_case cs[1] = {{loom_ctx_done(c), LOOM_RECV, NULL, false}};
  int r = loom_select(cs, 1, loom__after(ns < 0 ? 0 : ns));
  return r == -ETIMEDOUT ? 0 : r == 0 ? loom_ctx_err(c) : r;
}

int loom_chan_send_ctx(loom_chan *ch, const void *elem, loom_ctx *c) {
  loom_case cs[2] = {{ch, LOOM_SEND, (void *)(uintptr_t)elem, false},
                     {loom_ctx_done(c), LOOM_RECV, NULL, false}};
  int r = loom_select(cs, 2, 0);
  if (r == 0)
    return cs[0].ok ? 0 : -EPIPE;
  return r == 1 ? loom_ctx_err(c) : r;
}

int loom_chan_recv_ctx(loom_chan *ch, void *elem, loom_ctx *c) {
  loom_case cs[2] = {{ch, LOOM_RECV, elem, false},
                     {loom_ctx_done(c), LOOM_RECV, NULL, false}};
  int r = loom_select(cs, 2, 0);
  if (r == 0)
    return cs[0].ok ? 1 : 0;
  return r == 1 ? loom_ctx_err(c) : r;
}
