/*
 * test_chaos.c — randomized stress: many coroutines on 2-4 Ps mixing
 * channels, select, mutex/rwmutex/cond/sema/wg, contexts, sleeps, yields,
 * spawns, pinning, blocking sections, a plain thread, and loopback TCP,
 * with invariants checked as they run and at the end of each epoch.
 *
 * Parameters (environment):
 *   CHAOS_SEED   base seed (default 1)
 *   CHAOS_MS     total run time in ms (default 3000)
 *   CHAOS_PROCS  Ps (default 2 + seed % 3)
 *   CHAOS_OPS    bitmask of operation groups to enable (default all)
 *   CHAOS_VERBOSE  print per-epoch stats
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "check.h"
#include "check_rng.h"
#include "loom.h"

/* ---- parameters ----------------------------------------------------- */

#define NW_MAX 32
static int NW = 12; /* worker coroutines (CHAOS_NW) */
static uint64_t g_seed = 1;
static int64_t g_ms = 3000;
static int g_procs;
static unsigned g_ops = ~0u;
static int g_verbose;

enum {
  OP_CHAN = 1 << 0,
  OP_SELECT = 1 << 1,
  OP_CLOSE = 1 << 2,
  OP_MUTEX = 1 << 3,
  OP_RW = 1 << 4,
  OP_COND = 1 << 5,
  OP_SEMA = 1 << 6,
  OP_WG = 1 << 7,
  OP_CTX = 1 << 8,
  OP_SLEEP = 1 << 9,
  OP_SPAWN = 1 << 10,
  OP_PIN = 1 << 11,
  OP_BLOCK = 1 << 12,
  OP_NET = 1 << 13,
  OP_THREAD = 1 << 14,
  OP_CTXMUT = 1 << 15,
  OP_SPIN = 1 << 16,
  OP_BIGSEL = 1 << 17,
  OP_FD = 1 << 18,
};

static void params(void) {
  const char *e;
  if ((e = getenv("CHAOS_SEED")) != NULL)
    g_seed = strtoull(e, NULL, 0);
  if ((e = getenv("CHAOS_MS")) != NULL)
    g_ms = strtoll(e, NULL, 0);
  g_procs = 2 + (int)(g_seed % 3);
  if ((e = getenv("CHAOS_PROCS")) != NULL)
    g_procs = atoi(e);
  if ((e = getenv("CHAOS_OPS")) != NULL)
    g_ops = (unsigned)strtoul(e, NULL, 0);
  g_verbose = getenv("CHAOS_VERBOSE") != NULL;
  if ((e = getenv("CHAOS_NW")) != NULL)
    NW = atoi(e);
  if (NW < 1 || NW > NW_MAX)
    NW = 12;
  fprintf(stderr, "chaos: seed=%llu ms=%lld procs=%d ops=%#x\n",
          (unsigned long long)g_seed, (long long)g_ms, g_procs, g_ops);
}

/* ---- world ------------------------------------------------------------ */

#define TW NW_MAX /* the plain thread's worker id */
#define NTH 2
#define NWID (NW_MAX + NTH)
#define NCH 6
#define MAXV (1u << 20) /* values per worker per epoch */
#define NCTX 4
#define SEMN 3
#define NPAIR 3

typedef struct {
  uint64_t v, chk;
} elem_t;
#define MAGIC 0xA5A5F00DDEADBEEFULL

static loom_chan *chans[NCH];
static _Atomic unsigned char *marks[NWID]; /* +1 sent ok, +2 received */
static _Atomic uint32_t vnext[NWID];
static atomic_int stop_flag;
static atomic_long n_sent, n_recv, n_ops, n_timeouts, n_closed_seen;

static loom_mutex mu = LOOM_MUTEX_INIT;
static int mu_inside; /* under mu */
static long mu_count;
static atomic_long mu_taken;

static loom_rwmutex rw = LOOM_RWMUTEX_INIT;
static atomic_int rw_readers, rw_writer;

static loom_mutex cmu = LOOM_MUTEX_INIT;
static loom_cond cv = LOOM_COND_INIT;
static long c_items, c_produced, c_consumed; /* under cmu */

static loom_sema sem = LOOM_SEMA_INIT(SEMN);
static atomic_int sem_holders;

static loom_mutex ctxmu = LOOM_MUTEX_INIT;
static loom_ctx *ctx_root;
static loom_ctx *ctx_slot[NCTX]; /* under ctxmu; each holds the creator's ref */

static loom_wg wg_all = LOOM_WG_INIT;
static loom_wg wg_spawn = LOOM_WG_INIT;
static atomic_long spawned_ran;

static int epoch_no;

static const char *where_[NWID];
static void at(int wid, const char *w) { where_[wid] = w; }

/* ---- value accounting ----------------------------------------------- */

static elem_t mkval(int wid) {
  uint32_t n = atomic_fetch_add(&vnext[wid], 1);
  if (n >= MAXV)
    CHECK_FAIL("too many values for worker %d", wid);
  uint64_t v = ((uint64_t)wid << 32) | n;
  elem_t e = {v, v ^ MAGIC};
  return e;
}

static void mark_sent(const elem_t *e) {
  int w = (int)(e->v >> 32);
  uint32_t n = (uint32_t)e->v;
  atomic_fetch_add(&marks[w][n], 1);
  atomic_fetch_add(&n_sent, 1);
}

static void mark_recv(const elem_t *e) {
  CHECKF(e->chk == (e->v ^ MAGIC), "torn element v=%llx chk=%llx",
         (unsigned long long)e->v, (unsigned long long)e->chk);
  int w = (int)(e->v >> 32);
  uint32_t n = (uint32_t)e->v;
  CHECKF(w >= 0 && w < NWID && n < MAXV, "bad value %llx",
         (unsigned long long)e->v);
  atomic_fetch_add(&marks[w][n], 2);
  atomic_fetch_add(&n_recv, 1);
}

static int64_t rdeadline(rng_t *r) {
  /* mostly short deadlines, sometimes in the past */
  switch (rn(r, 8)) {
  case 0:
    return loom_now() - 1000;
  case 1:
    return loom_now() + 1;
  default:
    return loom_now() + (int64_t)rn(r, 2000) * 1000;
  }
}

/* -ETIMEDOUT must not come before the deadline. */
#define CHECK_LATE(res, dl)                                                    \
  do {                                                                         \
    if ((res) == -ETIMEDOUT) {                                                 \
      int64_t now_ = loom_now();                                               \
      CHECKF(now_ >= (dl), "timed out %lld ns before its deadline",            \
             (long long)((dl)-now_));                                          \
    }                                                                          \
  } while (0)

static bool stopping(void) { return atomic_load(&stop_flag) != 0; }

/* ---- contexts --------------------------------------------------------- */

/* A reference to a random shared context (or background). */
static loom_ctx *ctx_pick(rng_t *r) {
  int i = (int)rn(r, NCTX + 1);
  if (i == NCTX)
    return loom_ctx_background();
  loom_mutex_lock(&ctxmu);
  loom_ctx *c =
      ctx_slot[i] ? loom_ctx_ref(ctx_slot[i]) : loom_ctx_ref(ctx_root);
  loom_mutex_unlock(&ctxmu);
  return c;
}

static void ctx_put(loom_ctx *c) { loom_ctx_unref(c); }

/* A fresh child of a random shared context, owned by the caller. */
static loom_ctx *ctx_child(rng_t *r, loom_ctx **parent_out) {
  loom_ctx *p = ctx_pick(r), *c = NULL;
  int e;
  switch (rn(r, 3)) {
  case 0:
    e = loom_ctx_with_cancel(&c, p);
    break;
  case 1:
    e = loom_ctx_with_timeout(&c, p, (int64_t)rn(r, 3000) * 1000);
    break;
  default:
    e = loom_ctx_with_deadline(&c, p, rdeadline(r));
    break;
  }
  CHECK_OK(e);
  *parent_out = p;
  return c;
}

static void check_ctx_err(loom_ctx *c, int r, const char *what) {
  CHECKF(r == -ECANCELED || r == -ETIMEDOUT, "%s: ctx error %d (%s)", what, r,
         loom_err_name(r));
  int ce = loom_ctx_err(c);
  if (ce == -ETIMEDOUT) {
    int64_t d = loom_ctx_deadline(c), now = loom_now();
    CHECKF(d != 0 && now >= d, "%s: ctx timed out %lld ns before its deadline",
           what, (long long)(d - now));
  }
  CHECKF(ce == r, "%s: returned %s but ctx err is %s", what, loom_err_name(r),
         loom_err_name(ce));
}

struct canceller {
  loom_ctx *c;
  int64_t delay;
};
static void canceller_main(void *arg) {
  struct canceller *k = arg;
  if (k->delay > 0)
    loom_sleep(k->delay);
  loom_ctx_cancel(k->c);
  loom_ctx_unref(k->c);
  free(k);
  loom_wg_done(&wg_spawn);
}

static void spawn_canceller(loom_ctx *c, int64_t delay) {
  struct canceller *k = malloc(sizeof *k);
  k->c = loom_ctx_ref(c);
  k->delay = delay;
  CHECK_OK(loom_wg_add(&wg_spawn, 1));
  int e = loom_go(canceller_main, k);
  if (e != 0) { /* the runtime is stopping (shutdown test) */
    CHECKF(e == LOOM_ENORUNTIME, "loom_go: %d", e);
    loom_ctx_unref(k->c);
    free(k);
    loom_wg_done(&wg_spawn);
  }
}

/* ---- channel operations ------------------------------------------------ */

static loom_chan *chan_pick(rng_t *r) { return chans[rn(r, NCH)]; }

static void op_send(int wid, rng_t *r) {
  loom_chan *c = chan_pick(r);
  elem_t e = mkval(wid);
  int m = (int)rn(r, 4), res;
  loom_ctx *p = NULL, *cx = NULL;
  switch (m) {
  case 0:
    at(wid, "send");
    res = loom_chan_send(c, &e);
    CHECKF(res == 0 || res == -EPIPE, "send: %d", res);
    break;
  case 1:
    at(wid, "send_until");
    int64_t dl = rdeadline(r);
    res = loom_chan_send_until(c, &e, dl);
    CHECK_LATE(res, dl);
    CHECKF(res == 0 || res == -EPIPE || res == -ETIMEDOUT, "send_until: %d",
           res);
    break;
  case 2:
    at(wid, "try_send");
    res = loom_chan_try_send(c, &e);
    CHECKF(res == 0 || res == -EPIPE || res == -EAGAIN, "try_send: %d", res);
    break;
  default:
    cx = ctx_child(r, &p);
    if (rn(r, 3) == 0)
      spawn_canceller(cx, rn(r, 1000) * 1000);
    at(wid, "send_ctx");
    res = loom_chan_send_ctx(c, &e, cx);
    if (res != 0 && res != -EPIPE)
      check_ctx_err(cx, res, "send_ctx");
    loom_ctx_release(cx);
    ctx_put(p);
    break;
  }
  if (res == 0)
    mark_sent(&e);
  else if (res == -EPIPE)
    atomic_fetch_add(&n_closed_seen, 1);
  else
    atomic_fetch_add(&n_timeouts, 1);
}

static void op_recv(int wid, rng_t *r) {
  loom_chan *c = chan_pick(r);
  elem_t e = {0, 0};
  int m = (int)rn(r, 4), res;
  loom_ctx *p = NULL, *cx = NULL;
  switch (m) {
  case 0:
    at(wid, "recv");
    res = loom_chan_recv(c, &e);
    CHECKF(res == 0 || res == 1, "recv: %d", res);
    break;
  case 1:
    at(wid, "recv_until");
    int64_t dl = rdeadline(r);
    res = loom_chan_recv_until(c, &e, dl);
    CHECK_LATE(res, dl);
    CHECKF(res == 0 || res == 1 || res == -ETIMEDOUT, "recv_until: %d", res);
    break;
  case 2:
    at(wid, "try_recv");
    res = loom_chan_try_recv(c, &e);
    CHECKF(res == 0 || res == 1 || res == -EAGAIN, "try_recv: %d", res);
    break;
  default:
    cx = ctx_child(r, &p);
    if (rn(r, 3) == 0)
      spawn_canceller(cx, rn(r, 1000) * 1000);
    at(wid, "recv_ctx");
    res = loom_chan_recv_ctx(c, &e, cx);
    if (res != 0 && res != 1)
      check_ctx_err(cx, res, "recv_ctx");
    loom_ctx_release(cx);
    ctx_put(p);
    break;
  }
  if (res == 1)
    mark_recv(&e);
  else if (res == 0)
    atomic_fetch_add(&n_closed_seen, 1);
  else
    atomic_fetch_add(&n_timeouts, 1);
}

static void op_select(int wid, rng_t *r) {
  int n = 1 + (int)rn(r, 4);
  loom_case cs[6];
  elem_t ev[6];
  bool any_chan = false;
  loom_ctx *p = NULL, *cx = NULL;
  for (int i = 0; i < n; i++) {
    if (rn(r, 8) == 0) {
      cs[i].chan = NULL;
      cs[i].dir = rn(r, 2) ? LOOM_SEND : LOOM_RECV;
    } else {
      cs[i].chan = chan_pick(r);
      any_chan = true;
      cs[i].dir = rn(r, 2) ? LOOM_SEND : LOOM_RECV;
    }
    if (cs[i].dir == LOOM_SEND)
      ev[i] = mkval(wid);
    else
      ev[i] = (elem_t){0, 0};
    cs[i].elem = &ev[i];
    cs[i].ok = false;
  }
  int nctx = -1;
  if (rn(r, 4) == 0) {
    cx = ctx_child(r, &p);
    if (rn(r, 3) == 0)
      spawn_canceller(cx, rn(r, 1000) * 1000);
    nctx = n;
    cs[n].chan = loom_ctx_done(cx);
    cs[n].dir = LOOM_RECV;
    cs[n].elem = NULL;
    cs[n].ok = false;
    n++;
  }
  int64_t dl;
  int dm = (int)rn(r, 3);
  if (dm == 0 && any_chan)
    dl = 0;
  else if (dm == 1)
    dl = LOOM_SELECT_NOWAIT;
  else
    dl = rdeadline(r);
  at(wid, dl == 0                    ? "select(block)"
          : dl == LOOM_SELECT_NOWAIT ? "select(nowait)"
                                     : "select(dl)");
  int res = loom_select(cs, n, dl);
  if (dl > 0)
    CHECK_LATE(res, dl);
  if (res >= 0) {
    CHECKF(res < n, "select: index %d of %d", res, n);
    CHECKF(cs[res].chan != NULL, "select: chose a NULL case %d", res);
    if (res == nctx) {
      CHECKF(!cs[res].ok, "select: ctx done delivered an element");
      CHECKF(loom_ctx_err(cx) != 0, "select: ctx done ready but ctx live");
    } else if (cs[res].dir == LOOM_SEND) {
      if (cs[res].ok)
        mark_sent(&ev[res]);
      else
        atomic_fetch_add(&n_closed_seen, 1);
    } else {
      if (cs[res].ok)
        mark_recv(&ev[res]);
      else
        atomic_fetch_add(&n_closed_seen, 1);
    }
  } else {
    CHECKF((res == -EAGAIN && dl == LOOM_SELECT_NOWAIT) ||
               (res == -ETIMEDOUT && dl > 0),
           "select: %d (%s) dl=%lld", res, loom_err_name(res), (long long)dl);
    atomic_fetch_add(&n_timeouts, 1);
  }
  if (cx != NULL) {
    loom_ctx_release(cx);
    ctx_put(p);
  }
}

/* A select over many cases (more than the 8 kept on the stack), channels
 * repeated, with a zero-size signal channel among them. */
static loom_chan *sig_chan;
static void op_bigselect(int wid, rng_t *r) {
  int n = 9 + (int)rn(r, 24);
  loom_case cs[40];
  elem_t ev[40];
  for (int i = 0; i < n; i++) {
    if (rn(r, 10) == 0) {
      cs[i].chan = sig_chan;
      cs[i].dir = rn(r, 2) ? LOOM_SEND : LOOM_RECV;
      cs[i].elem = NULL;
    } else {
      cs[i].chan = rn(r, 12) == 0 ? NULL : chan_pick(r);
      cs[i].dir = rn(r, 2) ? LOOM_SEND : LOOM_RECV;
      ev[i] = cs[i].dir == LOOM_SEND ? mkval(wid) : (elem_t){0, 0};
      cs[i].elem = &ev[i];
    }
    cs[i].ok = false;
  }
  int64_t dl = rn(r, 3) == 0 ? LOOM_SELECT_NOWAIT : rdeadline(r);
  at(wid, "bigselect");
  int res = loom_select(cs, n, dl);
  if (dl > 0)
    CHECK_LATE(res, dl);
  if (res < 0) {
    CHECKF(res == -ETIMEDOUT || res == -EAGAIN || res == -ENOMEM,
           "bigselect %d", res);
    return;
  }
  CHECK(res < n && cs[res].chan != NULL);
  if (cs[res].chan == sig_chan)
    return;
  if (cs[res].ok) {
    if (cs[res].dir == LOOM_SEND)
      mark_sent(&ev[res]);
    else
      mark_recv(&ev[res]);
  }
}

/* loom_fd_wait on pipes loom does not own. */
static int pipes[2][2];
static atomic_long fd_bytes_w, fd_bytes_r, fd_busy;
static void op_fd(int wid, rng_t *r) {
  int i = (int)rn(r, 2);
  if (rn(r, 3) == 0) {
    at(wid, "fd_write");
    char b = 'x';
    if (write(pipes[i][1], &b, 1) == 1)
      atomic_fetch_add(&fd_bytes_w, 1);
    return;
  }
  int res;
  loom_ctx *p = NULL, *cx = NULL;
  int64_t dl = rn(r, 4) == 0 ? 0 : rdeadline(r);
  if (dl == 0 || rn(r, 2)) {
    cx = ctx_child(r, &p);
    if (rn(r, 2))
      spawn_canceller(cx, (int64_t)rn(r, 500) * 1000);
    at(wid, "fd_wait_ctx");
    res = loom_fd_wait_ctx(pipes[i][0], LOOM_FD_READ, dl, cx);
    /* with a deadline, its -ETIMEDOUT may race a cancel that lands after the
     * call */
    if (res != 0 && res != -EBUSY && !(res == -ETIMEDOUT && dl != 0))
      check_ctx_err(cx, res, "fd_wait_ctx");
  } else {
    at(wid, "fd_wait");
    res = loom_fd_wait(pipes[i][0], LOOM_FD_READ, dl);
    CHECKF(res == 0 || res == -ETIMEDOUT || res == -EBUSY, "fd_wait %d", res);
    CHECK_LATE(res, dl);
  }
  if (res == -EBUSY)
    atomic_fetch_add(&fd_busy, 1);
  if (res == 0) {
    char b;
    ssize_t n = read(pipes[i][0], &b, 1);
    if (n == 1)
      atomic_fetch_add(&fd_bytes_r, 1);
    else
      CHECKF(n < 0 && errno == EAGAIN, "pipe read %zd", n);
  }
  if (cx != NULL) {
    loom_ctx_release(cx);
    ctx_put(p);
  }
}

static void op_close(int wid, rng_t *r) {
  at(wid, "close");
  int res = loom_chan_close(chan_pick(r));
  CHECKF(res == 0 || res == -EPIPE, "close: %d", res);
}

/* ---- sync operations ------------------------------------------------------
 */

static void in_mutex(rng_t *r) {
  CHECK_EQ(++mu_inside, 1);
  mu_count++;
  atomic_fetch_add(&mu_taken, 1);
  if (rn(r, 8) == 0)
    loom_yield();
  else if (rn(r, 16) == 0)
    loom_sleep(rn(r, 50) * 1000);
  CHECK_EQ(mu_inside, 1);
  mu_inside--;
}

static void op_mutex(int wid, rng_t *r) {
  int m = (int)rn(r, 4), res = 0;
  loom_ctx *p = NULL, *cx = NULL;
  switch (m) {
  case 0:
    at(wid, "mutex_lock");
    loom_mutex_lock(&mu);
    break;
  case 1:
    at(wid, "mutex_lock_until");
    int64_t dl = rdeadline(r);
    res = loom_mutex_lock_until(&mu, dl);
    CHECK_LATE(res, dl);
    CHECKF(res == 0 || res == -ETIMEDOUT, "lock_until: %d", res);
    break;
  case 2:
    at(wid, "mutex_trylock");
    res = loom_mutex_trylock(&mu);
    CHECKF(res == 0 || res == -EBUSY, "trylock: %d", res);
    break;
  default:
    cx = ctx_child(r, &p);
    if (rn(r, 3) == 0)
      spawn_canceller(cx, rn(r, 500) * 1000);
    at(wid, "mutex_lock_ctx");
    res = loom_mutex_lock_ctx(&mu, cx);
    if (res != 0)
      check_ctx_err(cx, res, "mutex_lock_ctx");
    break;
  }
  if (res == 0) {
    at(wid, "mutex held");
    in_mutex(r);
    loom_mutex_unlock(&mu);
  } else {
    atomic_fetch_add(&n_timeouts, 1);
  }
  if (cx != NULL) {
    loom_ctx_release(cx);
    ctx_put(p);
  }
}

/* Take rw (as a writer or a reader) plainly, by a deadline or bounded
 * by a context that may be cancelled meanwhile: 0 when held. */
static int rw_take(int wid, rng_t *r, bool writer, loom_ctx **cx,
                   loom_ctx **p) {
  int res = 0;
  switch (rn(r, 3)) {
  case 0:
    at(wid, writer ? "rw_lock" : "rw_rlock");
    if (writer)
      loom_rwmutex_lock(&rw);
    else
      loom_rwmutex_rlock(&rw);
    break;
  case 1: {
    at(wid, writer ? "rw_lock_until" : "rw_rlock_until");
    int64_t dl = rdeadline(r);
    res = writer ? loom_rwmutex_lock_until(&rw, dl)
                 : loom_rwmutex_rlock_until(&rw, dl);
    CHECK_LATE(res, dl);
    CHECKF(res == 0 || res == -ETIMEDOUT, "rw until: %d", res);
    break;
  }
  default:
    *cx = ctx_child(r, p);
    if (rn(r, 3) == 0)
      spawn_canceller(*cx, rn(r, 500) * 1000);
    at(wid, writer ? "rw_lock_ctx" : "rw_rlock_ctx");
    res = writer ? loom_rwmutex_lock_ctx(&rw, *cx)
                 : loom_rwmutex_rlock_ctx(&rw, *cx);
    if (res != 0)
      check_ctx_err(*cx, res, "rw ctx");
    break;
  }
  return res;
}

static void op_rw(int wid, rng_t *r) {
  bool writer = rn(r, 4) == 0;
  loom_ctx *p = NULL, *cx = NULL;
  if (rw_take(wid, r, writer, &cx, &p) != 0) {
    atomic_fetch_add(&n_timeouts, 1);
  } else if (writer) {
    CHECK_EQ(atomic_fetch_add(&rw_writer, 1), 0);
    CHECK_EQ(atomic_load(&rw_readers), 0);
    if (rn(r, 4) == 0)
      loom_yield();
    CHECK_EQ(atomic_load(&rw_readers), 0);
    atomic_fetch_sub(&rw_writer, 1);
    loom_rwmutex_unlock(&rw);
  } else {
    atomic_fetch_add(&rw_readers, 1);
    CHECK_EQ(atomic_load(&rw_writer), 0);
    if (rn(r, 4) == 0)
      loom_yield();
    CHECK_EQ(atomic_load(&rw_writer), 0);
    atomic_fetch_sub(&rw_readers, 1);
    loom_rwmutex_runlock(&rw);
  }
  if (cx != NULL) {
    loom_ctx_release(cx);
    ctx_put(p);
  }
}

static void op_cond(int wid, rng_t *r) {
  if (rn(r, 2) == 0) {
    at(wid, "cond_produce");
    loom_mutex_lock(&cmu);
    c_items++;
    c_produced++;
    if (rn(r, 4) == 0)
      loom_cond_broadcast(&cv);
    else
      loom_cond_signal(&cv);
    loom_mutex_unlock(&cmu);
    return;
  }
  int m = (int)rn(r, 3);
  loom_ctx *p = NULL, *cx = NULL;
  if (m == 2) {
    cx = ctx_child(r, &p);
    if (rn(r, 3) == 0)
      spawn_canceller(cx, rn(r, 500) * 1000);
  }
  int64_t dl = m == 1 ? rdeadline(r) : 0;
  at(wid, "cond_consume");
  loom_mutex_lock(&cmu);
  while (c_items == 0 && !stopping()) {
    int res;
    if (m == 0) {
      at(wid, "cond_wait");
      res = loom_cond_wait(&cv, &cmu, 0);
      CHECK_EQ(res, 0);
    } else if (m == 1) {
      at(wid, "cond_wait_dl");
      res = loom_cond_wait(&cv, &cmu, dl);
      CHECK_LATE(res, dl);
      CHECKF(res == 0 || res == -ETIMEDOUT, "cond_wait: %d", res);
    } else {
      at(wid, "cond_wait_ctx");
      res = loom_cond_wait_ctx(&cv, &cmu, cx);
      if (res != 0)
        check_ctx_err(cx, res, "cond_wait_ctx");
    }
    if (res != 0) {
      atomic_fetch_add(&n_timeouts, 1);
      break;
    }
  }
  if (c_items > 0) {
    c_items--;
    c_consumed++;
  }
  loom_mutex_unlock(&cmu);
  if (cx != NULL) {
    loom_ctx_release(cx);
    ctx_put(p);
  }
}

static void op_sema(int wid, rng_t *r) {
  int m = (int)rn(r, 4), res = 0;
  loom_ctx *p = NULL, *cx = NULL;
  switch (m) {
  case 0:
    at(wid, "sema_acquire");
    res = loom_sema_acquire(&sem, 0);
    CHECK_EQ(res, 0);
    break;
  case 1:
    at(wid, "sema_acquire_dl");
    int64_t dl = rdeadline(r);
    res = loom_sema_acquire(&sem, dl);
    CHECK_LATE(res, dl);
    CHECKF(res == 0 || res == -ETIMEDOUT, "sema_acquire: %d", res);
    break;
  case 2:
    at(wid, "sema_try");
    res = loom_sema_tryacquire(&sem);
    CHECKF(res == 0 || res == -EAGAIN, "sema_try: %d", res);
    break;
  default:
    cx = ctx_child(r, &p);
    if (rn(r, 3) == 0)
      spawn_canceller(cx, rn(r, 500) * 1000);
    at(wid, "sema_acquire_ctx");
    res = loom_sema_acquire_ctx(&sem, cx);
    if (res != 0)
      check_ctx_err(cx, res, "sema_acquire_ctx");
    break;
  }
  if (res == 0) {
    int h = atomic_fetch_add(&sem_holders, 1) + 1;
    CHECKF(h <= SEMN, "sema: %d holders", h);
    if (rn(r, 4) == 0)
      loom_yield();
    atomic_fetch_sub(&sem_holders, 1);
    loom_sema_release(&sem);
  } else {
    atomic_fetch_add(&n_timeouts, 1);
  }
  if (cx != NULL) {
    loom_ctx_release(cx);
    ctx_put(p);
  }
}

struct wgkid {
  loom_wg *wg;
  atomic_int *cnt;
  int64_t sleep;
};
static void wgkid_main(void *arg) {
  struct wgkid *k = arg;
  if (k->sleep > 0)
    loom_sleep(k->sleep);
  else if (k->sleep == 0)
    loom_yield();
  atomic_fetch_add(k->cnt, 1);
  loom_wg_done(k->wg);
}

static void op_wg(int wid, rng_t *r) {
  loom_wg wg = LOOM_WG_INIT;
  atomic_int cnt = 0;
  int k = 1 + (int)rn(r, 4);
  struct wgkid kids[4];
  CHECK_OK(loom_wg_add(&wg, k));
  for (int i = 0; i < k; i++) {
    kids[i] = (struct wgkid){&wg, &cnt,
                             rn(r, 3) == 0 ? (int64_t)rn(r, 300) * 1000 : -1};
    int e;
    if (rn(r, 4) == 0) {
      loom_go_opts o = {.stack_size = 32 << 10};
      e = loom_go_with(wgkid_main, &kids[i], &o);
    } else {
      e = loom_go(wgkid_main, &kids[i]);
    }
    if (e != 0) {
      CHECKF(e == LOOM_ENORUNTIME, "loom_go: %d", e);
      atomic_fetch_add(&cnt, 1);
      loom_wg_done(&wg);
    }
  }
  int m = (int)rn(r, 3), res;
  loom_ctx *p = NULL, *cx = NULL;
  if (m == 1) {
    at(wid, "wg_wait_dl");
    int64_t dl = rdeadline(r);
    res = loom_wg_wait(&wg, dl);
    CHECK_LATE(res, dl);
    CHECKF(res == 0 || res == -ETIMEDOUT, "wg_wait: %d", res);
  } else if (m == 2) {
    cx = ctx_child(r, &p);
    at(wid, "wg_wait_ctx");
    res = loom_wg_wait_ctx(&wg, cx);
    if (res != 0)
      check_ctx_err(cx, res, "wg_wait_ctx");
    loom_ctx_release(cx);
    ctx_put(p);
  }
  at(wid, "wg_wait");
  CHECK_OK(loom_wg_wait(&wg, 0)); /* kids use our stack: always wait */
  CHECK_EQ(atomic_load(&cnt), k);
}

/* ---- ctx operations ----------------------------------------------------- */

static void op_ctx(int wid, rng_t *r) {
  loom_ctx *p, *c = ctx_child(r, &p);
  int m = (int)rn(r, 4);
  if (rn(r, 2) == 0)
    spawn_canceller(rn(r, 2) ? c : p, rn(r, 800) * 1000);
  if (m == 0) {
    at(wid, "sleep_ctx");
    int64_t t0 = loom_now();
    int res = loom_sleep_ctx(c, 20 * CHECK_MS);
    int64_t dt = loom_now() - t0;
    if (res != 0) {
      check_ctx_err(c, res, "sleep_ctx");
    } else {
      CHECKF(dt >= 20 * CHECK_MS, "sleep_ctx returned 0 after %lld ns",
             (long long)dt);
    }
  } else if (m == 1) {
    /* a grandchild: cancel propagation */
    loom_ctx *g = NULL;
    CHECK_OK(loom_ctx_with_timeout(&g, c, (int64_t)rn(r, 2000) * 1000));
    loom_case cs[1] = {{loom_ctx_done(g), LOOM_RECV, NULL, false}};
    at(wid, "ctx_done_select");
    int res = loom_select(cs, 1, loom_now() + 2000 * CHECK_MS);
    if (res == 0) {
      CHECK(loom_ctx_err(g) != 0);
      CHECK(!cs[0].ok);
    } else {
      CHECKF(res == -ETIMEDOUT, "ctx select %d", res);
      /* the grandchild's own timeout is <= 2 ms: 300 ms is a lost wake-up */
      CHECKF(false,
             "ctx done not closed within 2 s of a <=2 ms timeout (err=%d)",
             loom_ctx_err(g));
    }
    if (loom_ctx_err(c) != 0)
      CHECK(loom_ctx_err(g) != 0);
    loom_ctx_release(g);
  } else if (m == 2) {
    int before = loom_ctx_err(c);
    loom_ctx_cancel(c);
    CHECK(loom_ctx_err(c) == (before ? before : -ECANCELED) ||
          (before == 0 && loom_ctx_err(c) != 0));
    int res = loom_chan_try_recv(loom_ctx_done(c), NULL);
    CHECK_EQ(res, 0);
  } else {
    /* values */
    static int key;
    loom_ctx *v = NULL;
    CHECK_OK(loom_ctx_with_value(&v, c, &key, (void *)(uintptr_t)(wid + 1)));
    CHECK(loom_ctx_value(v, &key) == (void *)(uintptr_t)(wid + 1));
    if (loom_ctx_err(c) != 0)
      CHECK(loom_ctx_err(v) != 0);
    loom_ctx_release(v);
  }
  loom_ctx_release(c);
  ctx_put(p);
}

/* Replace a shared slot, or cancel one. */
static void op_ctxmut(int wid, rng_t *r) {
  int i = (int)rn(r, NCTX);
  at(wid, "ctxmut");
  if (rn(r, 3) == 0) {
    loom_mutex_lock(&ctxmu);
    loom_ctx *c = ctx_slot[i] ? loom_ctx_ref(ctx_slot[i]) : NULL;
    loom_mutex_unlock(&ctxmu);
    if (c != NULL) {
      loom_ctx_cancel(c);
      loom_ctx_unref(c);
    }
    return;
  }
  loom_ctx *parent;
  int j = (int)rn(r, NCTX + 1);
  loom_mutex_lock(&ctxmu);
  parent = (j < NCTX && j != i && ctx_slot[j]) ? loom_ctx_ref(ctx_slot[j])
                                               : loom_ctx_ref(ctx_root);
  loom_mutex_unlock(&ctxmu);
  loom_ctx *n = NULL;
  if (rn(r, 2))
    CHECK_OK(loom_ctx_with_cancel(&n, parent));
  else
    CHECK_OK(loom_ctx_with_timeout(&n, parent, (int64_t)rn(r, 20000) * 1000));
  loom_ctx_unref(parent);
  loom_mutex_lock(&ctxmu);
  loom_ctx *old = ctx_slot[i];
  ctx_slot[i] = n;
  loom_mutex_unlock(&ctxmu);
  if (old != NULL)
    loom_ctx_release(old);
}

/* ---- scheduling operations ------------------------------------------------
 */

static void spawned_main(void *arg) {
  uint64_t x = (uint64_t)(uintptr_t)arg;
  if (x % 3 == 0)
    loom_yield();
  else if (x % 3 == 1)
    loom_sleep((int64_t)(x % 100) * 1000);
  atomic_fetch_add(&spawned_ran, 1);
  loom_wg_done(&wg_spawn);
}

static void op_spawn(int wid, rng_t *r) {
  at(wid, "spawn");
  int k = 1 + (int)rn(r, 3);
  for (int i = 0; i < k; i++) {
    CHECK_OK(loom_wg_add(&wg_spawn, 1));
    int e = loom_go(spawned_main, (void *)(uintptr_t)rnd(r));
    if (e != 0) {
      CHECKF(e == LOOM_ENORUNTIME, "loom_go: %d", e);
      loom_wg_done(&wg_spawn);
    }
  }
}

static void op_sleep(int wid, rng_t *r) {
  switch (rn(r, 4)) {
  case 0:
    at(wid, "yield");
    loom_yield();
    break;
  case 1:
    at(wid, "sleep0");
    loom_sleep(0);
    break;
  default: {
    at(wid, "sleep");
    int64_t ns = (int64_t)rn(r, 200) * 1000;
    int64_t t0 = loom_now();
    CHECK_EQ(loom_sleep(ns), 0);
    CHECKF(loom_now() - t0 >= ns, "slept %lld < %lld",
           (long long)(loom_now() - t0), (long long)ns);
    break;
  }
  }
}

static void op_block(int wid, rng_t *r) {
  at(wid, "block");
  loom_block_enter();
  usleep(rn(r, 300));
  loom_block_exit();
}

static void op_any(int wid, rng_t *r, int depth);

static void op_pin(int wid, rng_t *r) {
  at(wid, "pin");
  int depth = 1 + (int)rn(r, 2);
  for (int i = 0; i < depth; i++)
    CHECK_OK(loom_pin());
  int k = 1 + (int)rn(r, 3);
  for (int i = 0; i < k; i++)
    op_any(wid, r, 1);
  for (int i = 0; i < depth; i++)
    loom_unpin();
  if (rn(r, 4) == 0)
    loom_unpin(); /* extra unpin on count 0 is a no-op */
}

/* ---- the worker -----------------------------------------------------------
 */

static void op_any(int wid, rng_t *r, int depth) {
  for (;;) {
    unsigned k = rn(r, 100);
    unsigned op;
    if (k < 16)
      op = OP_CHAN;
    else if (k < 30)
      op = OP_SELECT;
    else if (k < 31)
      op = OP_CLOSE;
    else if (k < 40)
      op = OP_MUTEX;
    else if (k < 45)
      op = OP_RW;
    else if (k < 52)
      op = OP_COND;
    else if (k < 58)
      op = OP_SEMA;
    else if (k < 62)
      op = OP_WG;
    else if (k < 70)
      op = OP_CTX;
    else if (k < 73)
      op = OP_CTXMUT;
    else if (k < 82)
      op = OP_SLEEP;
    else if (k < 86)
      op = OP_SPAWN;
    else if (k < 89)
      op = OP_PIN;
    else if (k < 93)
      op = OP_BLOCK;
    else if (k < 94)
      op = OP_SPIN;
    else if (k < 96)
      op = OP_BIGSEL;
    else if (k < 99)
      op = OP_FD;
    else
      op = OP_CHAN;
    if (!(g_ops & op))
      continue;
    if (op == OP_CLOSE && rn(r, 20) != 0)
      continue; /* closing is rare */
    if (op == OP_PIN && depth > 0)
      continue;
    atomic_fetch_add(&n_ops, 1);
    switch (op) {
    case OP_CHAN:
      if (rn(r, 2))
        op_send(wid, r);
      else
        op_recv(wid, r);
      break;
    case OP_SELECT:
      op_select(wid, r);
      break;
    case OP_CLOSE:
      op_close(wid, r);
      break;
    case OP_MUTEX:
      op_mutex(wid, r);
      break;
    case OP_RW:
      op_rw(wid, r);
      break;
    case OP_COND:
      op_cond(wid, r);
      break;
    case OP_SEMA:
      op_sema(wid, r);
      break;
    case OP_WG:
      op_wg(wid, r);
      break;
    case OP_CTX:
      op_ctx(wid, r);
      break;
    case OP_CTXMUT:
      op_ctxmut(wid, r);
      break;
    case OP_SLEEP:
      op_sleep(wid, r);
      break;
    case OP_SPAWN:
      op_spawn(wid, r);
      break;
    case OP_PIN:
      op_pin(wid, r);
      break;
    case OP_BLOCK:
      op_block(wid, r);
      break;
    case OP_SPIN:
      if (rn(r, 4) == 0) {
        at(wid, "spin");
        check_spin_ns((int64_t)rn(r, 15000) * 1000); /* no scheduling point */
      }
      break;
    case OP_BIGSEL:
      op_bigselect(wid, r);
      break;
    case OP_FD:
      op_fd(wid, r);
      break;
    }
    return;
  }
}

static void worker_main(void *arg) {
  int wid = (int)(intptr_t)arg;
  rng_t r;
  rng_seed(&r, g_seed * 1000003u + (uint64_t)epoch_no * 131 + (uint64_t)wid);
  while (!stopping())
    op_any(wid, &r, 0);
  at(wid, "done");
  loom_wg_done(&wg_all);
}

/* ---- a plain thread using the same objects ------------------------------- */

static atomic_int threads_running;

static void *thread_main(void *arg) {
  int wid = TW + (int)(intptr_t)arg;
  rng_t r;
  rng_seed(&r, g_seed * 7777 + (uint64_t)epoch_no * 3 + (uint64_t)wid);
  while (!stopping()) {
    switch (rn(&r, 16)) {
    case 11: {
      elem_t e;
      int res = loom_chan_recv(chan_pick(&r), &e);
      CHECKF(res == 0 || res == 1, "thread recv %d", res);
      if (res == 1)
        mark_recv(&e);
      break;
    }
    case 12: {
      elem_t e = mkval(wid);
      int res = loom_chan_send(chan_pick(&r), &e);
      CHECKF(res == 0 || res == -EPIPE, "thread send %d", res);
      if (res == 0)
        mark_sent(&e);
      break;
    }
    case 13:
      loom_mutex_lock(&mu);
      CHECK_EQ(++mu_inside, 1);
      mu_count++;
      mu_inside--;
      loom_mutex_unlock(&mu);
      break;
    case 14:
      loom_mutex_lock(&cmu);
      while (c_items == 0 && !stopping())
        CHECK_OK(loom_cond_wait(&cv, &cmu, 0));
      if (c_items > 0) {
        c_items--;
        c_consumed++;
      }
      loom_mutex_unlock(&cmu);
      break;
    case 15: {
      loom_case cs[3];
      elem_t ev[3];
      for (int i = 0; i < 3; i++) {
        cs[i].chan = chan_pick(&r);
        cs[i].dir = rn(&r, 2) ? LOOM_SEND : LOOM_RECV;
        ev[i] = cs[i].dir == LOOM_SEND ? mkval(wid) : (elem_t){0, 0};
        cs[i].elem = &ev[i];
        cs[i].ok = false;
      }
      int res = loom_select(cs, 3, 0);
      CHECKF(res >= 0 && res < 3, "thread select %d", res);
      if (cs[res].ok) {
        if (cs[res].dir == LOOM_SEND)
          mark_sent(&ev[res]);
        else
          mark_recv(&ev[res]);
      }
      break;
    }
    case 0: {
      elem_t e = mkval(wid);
      int res = loom_chan_send_until(chan_pick(&r), &e,
                                     loom_now() + (int64_t)rn(&r, 500) * 1000);
      CHECKF(res == 0 || res == -EPIPE || res == -ETIMEDOUT, "thread send %d",
             res);
      if (res == 0)
        mark_sent(&e);
      break;
    }
    case 1: {
      elem_t e;
      int res = loom_chan_recv_until(chan_pick(&r), &e,
                                     loom_now() + (int64_t)rn(&r, 500) * 1000);
      CHECKF(res == 0 || res == 1 || res == -ETIMEDOUT, "thread recv %d", res);
      if (res == 1)
        mark_recv(&e);
      break;
    }
    case 2: {
      int res =
          loom_mutex_lock_until(&mu, loom_now() + (int64_t)rn(&r, 500) * 1000);
      if (res == 0) {
        CHECK_EQ(++mu_inside, 1);
        mu_count++;
        mu_inside--;
        loom_mutex_unlock(&mu);
      }
      break;
    }
    case 3: {
      int res =
          loom_sema_acquire(&sem, loom_now() + (int64_t)rn(&r, 500) * 1000);
      if (res == 0) {
        int h = atomic_fetch_add(&sem_holders, 1) + 1;
        CHECKF(h <= SEMN, "sema: %d holders", h);
        atomic_fetch_sub(&sem_holders, 1);
        loom_sema_release(&sem);
      }
      break;
    }
    case 4: {
      loom_mutex_lock(&cmu);
      c_items++;
      c_produced++;
      loom_cond_signal(&cv);
      loom_mutex_unlock(&cmu);
      break;
    }
    case 5: {
      /* cancel a random shared context: needs a ref under ctxmu */
      int i = (int)rn(&r, NCTX);
      if (rn(&r, 4) == 0) {
        loom_mutex_lock(&ctxmu);
        loom_ctx *c = ctx_slot[i] ? loom_ctx_ref(ctx_slot[i]) : NULL;
        loom_mutex_unlock(&ctxmu);
        if (c != NULL) {
          loom_ctx_cancel(c);
          loom_ctx_unref(c);
        }
      }
      break;
    }
    case 6: {
      CHECK_OK(loom_wg_add(&wg_spawn, 1));
      int e = loom_go(spawned_main, (void *)(uintptr_t)rnd(&r));
      if (e != 0) {
        CHECKF(e == LOOM_ENORUNTIME, "thread loom_go %d", e);
        loom_wg_done(&wg_spawn);
      }
      break;
    }
    case 8:
    case 9: {
      /* ctx-bounded waits from a plain thread on a shared context */
      int i = (int)rn(&r, NCTX);
      loom_mutex_lock(&ctxmu);
      loom_ctx *c =
          ctx_slot[i] ? loom_ctx_ref(ctx_slot[i]) : loom_ctx_ref(ctx_root);
      loom_mutex_unlock(&ctxmu);
      int res;
      switch (rn(&r, 6)) {
      case 0: {
        elem_t e;
        res = loom_chan_recv_ctx(chan_pick(&r), &e, c);
        if (res == 1)
          mark_recv(&e);
        else if (res != 0)
          check_ctx_err(c, res, "thread recv_ctx");
        break;
      }
      case 1: {
        elem_t e = mkval(wid);
        res = loom_chan_send_ctx(chan_pick(&r), &e, c);
        if (res == 0)
          mark_sent(&e);
        else if (res != -EPIPE)
          check_ctx_err(c, res, "thread send_ctx");
        break;
      }
      case 2:
        res = loom_mutex_lock_ctx(&mu, c);
        if (res == 0) {
          CHECK_EQ(++mu_inside, 1);
          mu_count++;
          mu_inside--;
          loom_mutex_unlock(&mu);
        } else {
          check_ctx_err(c, res, "thread lock_ctx");
        }
        break;
      case 3:
        res = loom_sema_acquire_ctx(&sem, c);
        if (res == 0) {
          int h = atomic_fetch_add(&sem_holders, 1) + 1;
          CHECKF(h <= SEMN, "sema: %d holders", h);
          atomic_fetch_sub(&sem_holders, 1);
          loom_sema_release(&sem);
        } else {
          check_ctx_err(c, res, "thread sema_ctx");
        }
        break;
      case 4:
        res = loom_sleep_ctx(c, (int64_t)rn(&r, 500) * 1000);
        if (res != 0)
          check_ctx_err(c, res, "thread sleep_ctx");
        break;
      default:
        loom_mutex_lock(&cmu);
        if (c_items == 0 && !stopping()) {
          res = loom_cond_wait_ctx(&cv, &cmu, c);
          if (res != 0)
            check_ctx_err(c, res, "thread cond_wait_ctx");
        }
        if (c_items > 0) {
          c_items--;
          c_consumed++;
        }
        loom_mutex_unlock(&cmu);
        break;
      }
      loom_ctx_unref(c);
      break;
    }
    default: {
      loom_case cs[2] = {{chan_pick(&r), LOOM_RECV, NULL, false},
                         {chan_pick(&r), LOOM_SEND, NULL, false}};
      elem_t in = {0, 0}, out = mkval(wid);
      cs[0].elem = &in;
      cs[1].elem = &out;
      int res = loom_select(cs, 2, loom_now() + (int64_t)rn(&r, 300) * 1000);
      if (res == 0 && cs[0].ok)
        mark_recv(&in);
      if (res == 1 && cs[1].ok)
        mark_sent(&out);
      CHECKF(res == 0 || res == 1 || res == -ETIMEDOUT, "thread select %d",
             res);
      break;
    }
    }
  }
  atomic_fetch_sub(&threads_running, 1);
  return NULL;
}

/* ---- net --------------------------------------------------------------- */

struct endp {
  loom_conn *c;
  atomic_uint calls; /* odd: inside a call */
  atomic_int closed; /* closed by the closer */
};

struct pair {
  int id;
  struct endp w, r; /* writer's end, reader's end */
  uint64_t wrote, got;
  int wres, rres;
  rng_t rng;
  atomic_int writer_done;
};
static struct pair pairs[NPAIR];
static atomic_long net_bytes;

static unsigned char pat(int id, uint64_t pos) {
  return (unsigned char)((pos * 131u + (uint64_t)id * 17u + (pos >> 8)) & 0xff);
}

static void net_writer(void *arg) {
  struct pair *pr = arg;
  rng_t *r = &pr->rng;
  unsigned char buf[8192];
  loom_ctx *p = NULL, *cx = NULL;
  while (!stopping()) {
    size_t n = 1 + rn(r, sizeof buf);
    for (size_t i = 0; i < n; i++)
      buf[i] = pat(pr->id, pr->wrote + i);
    int m = (int)rn(r, 4);
    ssize_t res;
    if (atomic_load(&pr->w.closed))
      break;
    if (m == 1)
      loom_set_write_deadline(pr->w.c, rdeadline(r) + 2 * CHECK_MS);
    if (m == 2)
      cx = ctx_child(r, &p);
    atomic_fetch_add(&pr->w.calls, 1);
    if (m == 2)
      res = loom_write_ctx(pr->w.c, buf, n, cx);
    else
      res = loom_write(pr->w.c, buf, n);
    atomic_fetch_add(&pr->w.calls, 1);
    if (cx != NULL) {
      if (res < 0 && res != LOOM_ECLOSED && res != -EPIPE && res != -ECONNRESET)
        check_ctx_err(cx, (int)res, "write_ctx");
      if (loom_ctx_err(cx) != 0 && res >= 0 && !atomic_load(&pr->w.closed))
        CHECK_OK(loom_set_write_deadline(pr->w.c, 0));
      loom_ctx_release(cx);
      ctx_put(p);
      cx = NULL;
    }
    if (res < 0) {
      CHECKF(res == -ETIMEDOUT || res == LOOM_ECLOSED || res == -EPIPE ||
                 res == -ECONNRESET || res == -ECANCELED,
             "write: %zd (%s)", res, loom_err_name((int)res));
      pr->wres = (int)res;
      break; /* partial: the stream ends here */
    }
    CHECK_EQ(res, (ssize_t)n);
    pr->wrote += n;
    if (m == 1 && !atomic_load(&pr->w.closed))
      loom_set_write_deadline(pr->w.c, 0);
    if (rn(r, 8) == 0)
      loom_sleep(rn(r, 200) * 1000);
  }
  atomic_store(&pr->writer_done, 1);
  if (!atomic_exchange(&pr->w.closed, 1))
    CHECK_OK(loom_close(pr->w.c));
}

static void net_reader(void *arg) {
  struct pair *pr = arg;
  rng_t r;
  rng_seed(&r, g_seed + 99 + (uint64_t)pr->id * 3 + (uint64_t)epoch_no * 1000);
  unsigned char buf[4096];
  loom_ctx *p = NULL, *cx = NULL;
  for (;;) {
    if (atomic_load(&pr->r.closed)) {
      pr->rres = LOOM_ECLOSED;
      return;
    }
    size_t n = rn(&r, 16) == 0 ? 0 : 1 + rn(&r, sizeof buf);
    int m = (int)rn(&r, 4);
    if (m == 1)
      loom_set_read_deadline(pr->r.c, rdeadline(&r) + CHECK_MS);
    if (m == 2) {
      cx = ctx_child(&r, &p);
      if (rn(&r, 2) == 0)
        spawn_canceller(cx, rn(&r, 1000) * 1000);
    }
    atomic_fetch_add(&pr->r.calls, 1);
    ssize_t res = m == 2 ? loom_read_ctx(pr->r.c, buf, n, cx)
                         : loom_read(pr->r.c, buf, n);
    atomic_fetch_add(&pr->r.calls, 1);
    if (cx != NULL) {
      if (res < 0 && res != LOOM_ECLOSED && res != -ECONNRESET)
        check_ctx_err(cx, (int)res, "read_ctx");
      bool cancelled = loom_ctx_err(cx) != 0;
      loom_ctx_release(cx);
      ctx_put(p);
      cx = NULL;
      /* a cancel during the call leaves the read deadline in the past */
      if (cancelled && res != LOOM_ECLOSED && !atomic_load(&pr->r.closed))
        CHECK_OK(loom_set_read_deadline(pr->r.c, 0));
      if (res == -ETIMEDOUT || res == -ECANCELED)
        continue;
    }
    if (m == 1 && res != LOOM_ECLOSED && !atomic_load(&pr->r.closed))
      CHECK_OK(loom_set_read_deadline(pr->r.c, 0));
    if (res == -ETIMEDOUT) {
      CHECKF(m == 1, "read timed out without a deadline");
      continue;
    }
    if (res == LOOM_ECLOSED) {
      CHECK(atomic_load(&pr->r.closed));
      pr->rres = (int)res;
      return;
    }
    CHECKF(res >= 0 || res == -ECONNRESET, "read: %zd (%s)", res,
           loom_err_name((int)res));
    if (res < 0) {
      pr->rres = (int)res;
      break;
    }
    if (n == 0) {
      CHECK_EQ(res, 0);
      continue;
    }
    if (res == 0) {
      pr->rres = 0;
      break; /* EOF */
    }
    for (ssize_t i = 0; i < res; i++)
      CHECKF(buf[i] == pat(pr->id, pr->got + (uint64_t)i),
             "pair %d: byte %llu is %u, want %u", pr->id,
             (unsigned long long)(pr->got + (uint64_t)i), buf[i],
             pat(pr->id, pr->got + (uint64_t)i));
    pr->got += (uint64_t)res;
    atomic_fetch_add(&net_bytes, res);
    if (rn(&r, 4) == 0)
      loom_sleep(rn(&r, 300) * 1000); /* slow reader: writer blocks */
  }
  if (!atomic_exchange(&pr->r.closed, 1))
    CHECK_OK(loom_close(pr->r.c));
}

/* Close an end while its owner is (very likely) parked inside a call. */
static void net_closer(void *arg) {
  struct pair *pr = arg;
  rng_t r;
  rng_seed(&r, g_seed + 5 + (uint64_t)pr->id * 7 + (uint64_t)epoch_no * 313);
  if (rn(&r, 2) == 0) {
    loom_wg_done(&wg_all);
    return;
  }
  struct endp *e = rn(&r, 2) ? &pr->w : &pr->r;
  loom_sleep((int64_t)rn(&r, 100) * CHECK_MS);
  while (!stopping()) {
    unsigned v = atomic_load(&e->calls);
    if (v & 1) {
      /* the owner is (almost surely) parked inside the call: a thread
       * descheduled for 20 ms between its counter and the call would
       * make this close a use after free of the test's own making */
      loom_sleep(20 * CHECK_MS);
      if (atomic_load(&e->calls) == v && !atomic_exchange(&e->closed, 1)) {
        CHECK_OK(loom_close(e->c));
        break;
      }
    } else {
      loom_sleep(50 * 1000);
    }
    if (atomic_load(&e->closed))
      break;
  }
  loom_wg_done(&wg_all);
}

struct net_wrap {
  void (*fn)(void *);
  struct pair *pr;
};
static void net_writer_w(void *arg) {
  net_writer(arg);
  loom_wg_done(&wg_all);
}
static void net_reader_w(void *arg) {
  net_reader(arg);
  loom_wg_done(&wg_all);
}

/* A listener with a coroutine blocked in accept_ctx, cancelled. */
struct acc {
  loom_listener *l;
  loom_ctx *c;
  int res;
};
static void acceptor(void *arg) {
  struct acc *a = arg;
  loom_conn *c = NULL;
  a->res = loom_accept_ctx(a->l, &c, a->c);
  if (a->res == 0)
    loom_close(c);
  loom_wg_done(&wg_all);
}

static loom_listener *lst;
static char lst_addr[128];
static struct acc acc_state;

static void net_setup(rng_t *r) {
  CHECK_OK(loom_listen(&lst, "tcp", "127.0.0.1:0"));
  CHECK_OK(loom_listener_addr(lst, lst_addr, sizeof lst_addr));
  for (int i = 0; i < NPAIR; i++) {
    struct pair *pr = &pairs[i];
    memset(pr, 0, sizeof *pr);
    pr->id = i + epoch_no * NPAIR;
    rng_seed(&pr->rng, g_seed * 31 + (uint64_t)pr->id);
    loom_conn *a = NULL, *b = NULL;
    CHECK_OK(loom_dial(&a, "tcp", lst_addr));
    CHECK_OK(loom_accept(lst, &b));
    if (rn(r, 2)) {
      loom_conn_set_buffers(a, 4096, 4096);
      loom_conn_set_buffers(b, 4096, 4096);
    }
    pr->w.c = a;
    pr->r.c = b;
  }
  acc_state.l = lst;
  acc_state.res = 1;
  CHECK_OK(loom_ctx_with_timeout(&acc_state.c, ctx_root,
                                 (int64_t)rn(r, 50) * CHECK_MS));
  CHECK_OK(loom_wg_add(&wg_all, 1 + 3 * NPAIR));
  CHECK_OK(loom_go(acceptor, &acc_state));
  for (int i = 0; i < NPAIR; i++) {
    CHECK_OK(loom_go(net_writer_w, &pairs[i]));
    CHECK_OK(loom_go(net_reader_w, &pairs[i]));
    CHECK_OK(loom_go(net_closer, &pairs[i]));
  }
}

static void net_finish(void) {
  CHECKF(acc_state.res == -ETIMEDOUT || acc_state.res == -ECANCELED,
         "accept_ctx: %d (%s)", acc_state.res, loom_err_name(acc_state.res));
  loom_ctx_release(acc_state.c);
  CHECK_OK(loom_listener_close(lst));
  for (int i = 0; i < NPAIR; i++) {
    struct pair *pr = &pairs[i];
    CHECKF(pr->got <= pr->wrote || pr->wres != 0,
           "pair %d got %llu > wrote %llu", pr->id, (unsigned long long)pr->got,
           (unsigned long long)pr->wrote);
    /* A clean stream (no write error, reader not closed) is read in full. */
    if (pr->wres == 0 && pr->rres == 0)
      CHECKF(pr->got == pr->wrote, "pair %d: got %llu of %llu", pr->id,
             (unsigned long long)pr->got, (unsigned long long)pr->wrote);
  }
}

/* ---- epochs ------------------------------------------------------------ */

static void dump_state(void) {
  fprintf(stderr, "chaos: stuck workers in epoch %d:\n", epoch_no);
  for (int i = 0; i < NW; i++)
    if (where_[i] && strcmp(where_[i], "done") != 0)
      fprintf(stderr, "  worker %d at %s\n", i, where_[i]);
  fprintf(stderr, "  sem_holders=%d\n", atomic_load(&sem_holders));
  for (int i = 0; i < NPAIR; i++)
    fprintf(stderr,
            "  pair %d wrote=%llu got=%llu wres=%d rres=%d wcalls=%u rcalls=%u "
            "wcl=%d rcl=%d\n",
            pairs[i].id, (unsigned long long)pairs[i].wrote,
            (unsigned long long)pairs[i].got, pairs[i].wres, pairs[i].rres,
            atomic_load(&pairs[i].w.calls), atomic_load(&pairs[i].r.calls),
            atomic_load(&pairs[i].w.closed), atomic_load(&pairs[i].r.closed));
  loom_stats st;
  if (loom_stats_get(&st) == 0)
    fprintf(stderr,
            "  stats: procs=%d idle=%d threads=%d idle_threads=%d spinning=%d "
            "gq=%llu coroutines=%llu\n",
            st.procs, st.idle_procs, st.threads, st.idle_threads,
            st.spinning_threads, (unsigned long long)st.global_runq,
            (unsigned long long)st.coroutines);
}

static void run_epoch(rng_t *r, int64_t len) {
  atomic_store(&stop_flag, 0);
  for (int i = 0; i < NWID; i++) {
    uint32_t used = atomic_load(&vnext[i]);
    for (uint32_t k = 0; k < used && k < MAXV; k++)
      atomic_store_explicit(&marks[i][k], 0, memory_order_relaxed);
    atomic_store(&vnext[i], 0);
    where_[i] = NULL;
  }
  for (int i = 0; i < NCH; i++) {
    static const size_t caps[] = {0, 0, 1, 2, 4, 16};
    CHECK_OK(loom_chan_make(&chans[i], sizeof(elem_t), caps[rn(r, 6)]));
  }
  CHECK_OK(loom_chan_make(&sig_chan, 0, rn(r, 2) ? 0 : 3));
  for (int i = 0; i < 2; i++)
    CHECK_EQ(pipe2(pipes[i], O_NONBLOCK | O_CLOEXEC), 0);
  CHECK_OK(loom_ctx_with_cancel(&ctx_root, loom_ctx_background()));
  for (int i = 0; i < NCTX; i++) {
    if (i % 2)
      CHECK_OK(loom_ctx_with_cancel(&ctx_slot[i], ctx_root));
    else
      CHECK_OK(loom_ctx_with_timeout(&ctx_slot[i], ctx_root,
                                     (int64_t)rn(r, 200) * CHECK_MS));
  }
  c_items = 0;
  c_produced = 0;
  c_consumed = 0;
  pthread_t th[NTH];
  bool thread = (g_ops & OP_THREAD) != 0;
  if (thread) {
    atomic_store(&threads_running, NTH);
    for (int i = 0; i < NTH; i++)
      CHECK_EQ(pthread_create(&th[i], NULL, thread_main, (void *)(intptr_t)i),
               0);
  }
  bool net = (g_ops & OP_NET) != 0;
  if (net)
    net_setup(r);
  CHECK_OK(loom_wg_add(&wg_all, NW));
  for (int i = 0; i < NW; i++)
    CHECK_OK(loom_go(worker_main, (void *)(intptr_t)i));

  loom_sleep(len);

  /* stop */
  atomic_store(&stop_flag, 1);
  int64_t t0 = loom_now();
  for (int i = 0; i < NCH; i++) {
    int e = loom_chan_close(chans[i]);
    CHECKF(e == 0 || e == -EPIPE, "close %d", e);
  }
  loom_ctx_cancel(ctx_root);
  for (;;) {
    loom_mutex_lock(&cmu);
    loom_cond_broadcast(&cv);
    loom_mutex_unlock(&cmu);
    for (int i = 0; i < 2; i++) /* fd waiters with no deadline */
      if (write(pipes[i][1], "s", 1) != 1)
        CHECK(errno == EAGAIN);
    int e = loom_wg_wait(&wg_all, loom_now() + 20 * CHECK_MS);
    if (e == 0 && (!thread || atomic_load(&threads_running) == 0))
      break;
    CHECK(e == 0 || e == -ETIMEDOUT);
    if (e == 0)
      loom_sleep(CHECK_MS);
    if (loom_now() - t0 > 8000 * CHECK_MS) {
      fprintf(stderr, "threads running: %d\n", atomic_load(&threads_running));
      dump_state();
      CHECK_FAIL("workers did not stop within 8 s (epoch %d)", epoch_no);
    }
  }
  if (thread) {
    loom_block_enter();
    for (int i = 0; i < NTH; i++)
      pthread_join(th[i], NULL);
    loom_block_exit();
  }
  /* spawned coroutines, cancellers */
  t0 = loom_now();
  for (;;) {
    int e = loom_wg_wait(&wg_spawn, loom_now() + 20 * CHECK_MS);
    if (e == 0)
      break;
    if (loom_now() - t0 > 8000 * CHECK_MS)
      CHECK_FAIL("spawned coroutines did not finish within 8 s");
  }
  if (net)
    net_finish();

  /* drain what is still buffered and check every value */
  for (int i = 0; i < NCH; i++) {
    elem_t e;
    int res;
    while ((res = loom_chan_recv(chans[i], &e)) == 1)
      mark_recv(&e);
    CHECK_EQ(res, 0);
    CHECK_EQ(loom_chan_len(chans[i]), 0);
    loom_chan_free(chans[i]);
    chans[i] = NULL;
  }
  for (int i = 0; i < 2; i++) {
    close(pipes[i][0]);
    close(pipes[i][1]);
  }
  CHECK_OK(loom_chan_close(sig_chan));
  while (loom_chan_recv(sig_chan, NULL) == 1)
    ;
  loom_chan_free(sig_chan);
  sig_chan = NULL;
  long bad = 0;
  for (int w = 0; w < NWID; w++) {
    uint32_t n = atomic_load(&vnext[w]);
    for (uint32_t k = 0; k < n; k++) {
      unsigned m = atomic_load(&marks[w][k]);
      if (m != 0 && m != 3) {
        if (bad < 10)
          fprintf(stderr, "value w=%d n=%u: mark %u (%s)\n", w, k, m,
                  m == 1   ? "sent, never received"
                  : m == 2 ? "received, not sent"
                           : "duplicated");
        bad++;
      }
    }
  }
  CHECKF(bad == 0, "%ld values mis-accounted in epoch %d", bad, epoch_no);
  CHECK_EQ(mu_inside, 0);
  CHECK_EQ(c_produced, c_consumed + c_items);
  CHECK_EQ(atomic_load(&sem_holders), 0);
  CHECK_OK(loom_sema_tryacquire(&sem)); /* units all back */
  loom_sema_release(&sem);
  for (int i = 0; i < NCTX; i++) {
    loom_ctx_release(ctx_slot[i]);
    ctx_slot[i] = NULL;
  }
  loom_ctx_release(ctx_root);
  ctx_root = NULL;
}

static void chaos_main(void *arg) {
  (void)arg;
  rng_t r;
  rng_seed(&r, g_seed);
  int64_t end = loom_now() + g_ms * CHECK_MS;
  for (epoch_no = 0; loom_now() < end; epoch_no++) {
    int64_t len = (int64_t)(50 + rn(&r, 250)) * CHECK_MS;
    if (loom_now() + len > end)
      len = end - loom_now();
    run_epoch(&r, len);
    if (g_verbose)
      fprintf(stderr,
              "epoch %d: ops=%ld sent=%ld recv=%ld timeouts=%ld closed=%ld "
              "mu=%ld items=%ld/%ld "
              "spawned=%ld net=%ld\n",
              epoch_no, atomic_load(&n_ops), atomic_load(&n_sent),
              atomic_load(&n_recv), atomic_load(&n_timeouts),
              atomic_load(&n_closed_seen), atomic_load(&mu_taken), c_consumed,
              c_produced, atomic_load(&spawned_ran), atomic_load(&net_bytes));
  }
  fprintf(stderr,
          "chaos: %d epochs, ops=%ld sent=%ld recv=%ld timeouts=%ld mu=%ld "
          "net=%ld\n",
          epoch_no, atomic_load(&n_ops), atomic_load(&n_sent),
          atomic_load(&n_recv), atomic_load(&n_timeouts),
          atomic_load(&mu_taken), atomic_load(&net_bytes));
}

TEST(mix) {
  params();
  for (int i = 0; i < NWID; i++)
    marks[i] = calloc(MAXV, 1);
  check_watchdog(g_ms / 1000 + 60, "chaos mix");
  check_run(chaos_main, NULL, g_procs);
}

/* ---- shutdown with everything in flight --------------------------------- */

static atomic_int sd_thread_stop;
static atomic_long sd_go_ok, sd_go_norun, sd_ran;

static void sd_tiny(void *arg) {
  (void)arg;
  atomic_fetch_add(&sd_ran, 1);
  if (atomic_load(&sd_ran) % 3 == 0)
    loom_sleep(1000);
}

/* A plain thread spawning into whatever runtime is there. */
static void *sd_thread(void *arg) {
  (void)arg;
  while (!atomic_load(&sd_thread_stop)) {
    int e = loom_go(sd_tiny, NULL);
    if (e == 0)
      atomic_fetch_add(&sd_go_ok, 1);
    else {
      CHECKF(e == LOOM_ENORUNTIME, "foreign loom_go: %d", e);
      atomic_fetch_add(&sd_go_norun, 1);
    }
    loom_stats st;
    e = loom_stats_get(&st);
    CHECK(e == 0 || e == LOOM_ENORUNTIME);
    (void)loom_procs();
    usleep(50);
  }
  return NULL;
}

static void sd_reset(void) {
  static const loom_mutex m0 = LOOM_MUTEX_INIT;
  static const loom_rwmutex rw0 = LOOM_RWMUTEX_INIT;
  static const loom_cond c0 = LOOM_COND_INIT;
  static const loom_sema s0 = LOOM_SEMA_INIT(SEMN);
  static const loom_wg w0 = LOOM_WG_INIT;
  mu = m0;
  rw = rw0;
  cmu = m0;
  cv = c0;
  sem = s0;
  ctxmu = m0;
  wg_all = w0;
  wg_spawn = w0;
  mu_inside = 0;
  atomic_store(&rw_readers, 0);
  atomic_store(&rw_writer, 0);
  atomic_store(&sem_holders, 0);
  c_items = c_produced = c_consumed = 0;
  atomic_store(&stop_flag, 0);
  for (int i = 0; i < NWID; i++) {
    atomic_store(&vnext[i], 0);
    where_[i] = NULL;
  }
}

static void sd_main(void *arg) {
  rng_t *r = arg;
  for (int i = 0; i < NCH; i++) {
    static const size_t caps[] = {0, 0, 1, 2, 4, 16};
    CHECK_OK(loom_chan_make(&chans[i], sizeof(elem_t), caps[rn(r, 6)]));
  }
  CHECK_OK(loom_ctx_with_cancel(&ctx_root, loom_ctx_background()));
  for (int i = 0; i < NCTX; i++)
    CHECK_OK(loom_ctx_with_timeout(&ctx_slot[i], ctx_root,
                                   (int64_t)rn(r, 200) * CHECK_MS));
  if (g_ops & OP_NET)
    net_setup(r);
  CHECK_OK(loom_wg_add(&wg_all, NW));
  for (int i = 0; i < NW; i++)
    CHECK_OK(loom_go(worker_main, (void *)(intptr_t)i));
  /* a coroutine that will be inside a blocking section at the end */
  loom_sleep((int64_t)rn(r, 30) * CHECK_MS);
  /* return with everything running: abandoned */
}

static void shutdown_body(void);

/* Coroutines abandoned at shutdown leave their channels and contexts
 * behind, by design (runtime.h): under ASan the case runs in a child
 * without the leak check, keeping every other check. */
HELPER(chaos_shutdown_child) {
  shutdown_body();
  exit(0);
}
TEST(shutdown) {
  if (!CHECK_ASAN) {
    shutdown_body();
    return;
  }
  struct check_child c;
  char how[128];
  CHECK_EQ(setenv("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=1", 1), 0);
  check_spawn_self(&c, 120, "chaos_shutdown_child", "");
  printf("%s\n", c.out);
  CHECKF(!c.timed_out && WIFEXITED(c.status) && WEXITSTATUS(c.status) == 0,
         "the shutdown child %s", check_child_how(&c, how, sizeof how));
}

static void shutdown_body(void) {
  params();
  for (int i = 0; i < NWID; i++)
    marks[i] = calloc(MAXV, 1);
  check_watchdog(g_ms / 1000 + 60, "chaos shutdown");
  pthread_t th;
  CHECK_EQ(pthread_create(&th, NULL, sd_thread, NULL), 0);
  rng_t r;
  rng_seed(&r, g_seed);
  int64_t end = check_mono_ns() + g_ms * CHECK_MS;
  int runs = 0;
  while (check_mono_ns() < end) {
    sd_reset();
    epoch_no = runs;
    int procs = 1 + (int)rn(&r, 4);
    for (int i = 0; i < 2; i++)
      CHECK_EQ(pipe2(pipes[i], O_NONBLOCK | O_CLOEXEC), 0);
    check_run(sd_main, &r, procs);
    for (int i = 0; i < 2; i++) {
      close(pipes[i][0]);
      close(pipes[i][1]);
    }
    runs++;
  }
  atomic_store(&sd_thread_stop, 1);
  pthread_join(th, NULL);
  fprintf(stderr, "shutdown: %d runs, foreign go ok=%ld norun=%ld ran=%ld\n",
          runs, atomic_load(&sd_go_ok), atomic_load(&sd_go_norun),
          atomic_load(&sd_ran));
}

/* ---- cond: producers/consumers, lost wake-ups show as a stall ----------- */

static loom_mutex pc_mu = LOOM_MUTEX_INIT;
static loom_cond pc_cv = LOOM_COND_INIT;
static long pc_items, pc_prod, pc_cons;
static int pc_stop, pc_plain_waiting;
static loom_ctx *pc_root;

static void pc_consumer(void *arg) {
  rng_t r;
  rng_seed(&r, g_seed * 77 + (uint64_t)(uintptr_t)arg);
  loom_mutex_lock(&pc_mu);
  while (!pc_stop || pc_items > 0) {
    if (pc_items > 0) {
      pc_items--;
      pc_cons++;
      if (rn(&r, 4) == 0) {
        loom_mutex_unlock(&pc_mu);
        loom_yield();
        loom_mutex_lock(&pc_mu);
      }
      continue;
    }
    int m = (int)rn(&r, 3), res;
    if (m == 0) {
      pc_plain_waiting++;
      res = loom_cond_wait(&pc_cv, &pc_mu, 0);
      pc_plain_waiting--;
      CHECK_EQ(res, 0);
    } else if (m == 1) {
      res = loom_cond_wait(&pc_cv, &pc_mu,
                           loom_now() + (int64_t)rn(&r, 500) * 1000);
      CHECK(res == 0 || res == -ETIMEDOUT);
    } else {
      loom_ctx *c = NULL;
      CHECK_OK(loom_ctx_with_timeout(&c, pc_root, (int64_t)rn(&r, 500) * 1000));
      res = loom_cond_wait_ctx(&pc_cv, &pc_mu, c);
      CHECK(res == 0 || res == -ETIMEDOUT || res == -ECANCELED);
      loom_ctx_release(c);
    }
  }
  loom_mutex_unlock(&pc_mu);
  loom_wg_done(&wg_all);
}

static void pc_producer(void *arg) {
  rng_t r;
  rng_seed(&r, g_seed * 91 + (uint64_t)(uintptr_t)arg);
  int64_t end = loom_now() + g_ms * CHECK_MS;
  while (loom_now() < end) {
    loom_mutex_lock(&pc_mu);
    int k = 1 + (int)rn(&r, 3);
    pc_items += k;
    pc_prod += k;
    if (rn(&r, 5) == 0)
      loom_cond_broadcast(&pc_cv);
    else
      for (int i = 0; i < k; i++)
        loom_cond_signal(&pc_cv);
    loom_mutex_unlock(&pc_mu);
    if (rn(&r, 3) == 0)
      loom_sleep((int64_t)rn(&r, 100) * 1000);
    else
      loom_yield();
  }
  loom_wg_done(&wg_all);
}

static void pc_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_ctx_with_cancel(&pc_root, loom_ctx_background()));
  int nc = 8, np = 3;
  loom_wg prod = LOOM_WG_INIT;
  (void)prod;
  CHECK_OK(loom_wg_add(&wg_all, nc + np));
  for (int i = 0; i < nc; i++)
    CHECK_OK(loom_go(pc_consumer, (void *)(uintptr_t)i));
  for (int i = 0; i < np; i++)
    CHECK_OK(loom_go(pc_producer, (void *)(uintptr_t)(100 + i)));
  /* watch: items pending while every consumer sleeps in a plain wait, for
   * long, means a signal was lost */
  int64_t stuck_since = 0;
  while (loom_wg_wait(&wg_all, loom_now() + 5 * CHECK_MS) == -ETIMEDOUT) {
    loom_mutex_lock(&pc_mu);
    bool stuck = pc_items > 0 && pc_plain_waiting == nc;
    long items = pc_items;
    loom_mutex_unlock(&pc_mu);
    if (stuck) {
      if (stuck_since == 0)
        stuck_since = loom_now();
      CHECKF(loom_now() - stuck_since < 1000 * CHECK_MS,
             "lost wake-up: %ld items, all %d consumers in cond_wait for 1 s",
             items, nc);
    } else {
      stuck_since = 0;
    }
    loom_mutex_lock(&pc_mu);
    if (!pc_stop && pc_prod > 0 && loom_now() > 0) {
      /* producers finish on their own; then stop consumers */
    }
    loom_mutex_unlock(&pc_mu);
    static int64_t t_end;
    if (t_end == 0)
      t_end = loom_now() + g_ms * CHECK_MS;
    if (loom_now() > t_end + 50 * CHECK_MS) {
      loom_mutex_lock(&pc_mu);
      if (!pc_stop && pc_items == 0) {
        pc_stop = 1;
        loom_cond_broadcast(&pc_cv);
      }
      loom_mutex_unlock(&pc_mu);
    }
  }
  CHECK_EQ(pc_prod, pc_cons);
  fprintf(stderr, "cond_pc: produced=%ld consumed=%ld\n", pc_prod, pc_cons);
  loom_ctx_release(pc_root);
}
TEST(cond_pc) {
  params();
  check_watchdog(g_ms / 1000 + 30, "cond_pc");
  check_run(pc_main, NULL, g_procs);
}

/* ---- net: two readers, two writers, a deadline poker, per connection ---- */

#define NM_PAIRS 3
struct nm {
  loom_conn *a, *b; /* writers on a, readers on b */
  atomic_long wsum, wcnt, rsum, rcnt;
  atomic_int writers_left, readers_left, poke_stop;
  int64_t bytes_per_writer;
  int id;
};
static struct nm nms[NM_PAIRS];
static loom_wg nm_wg = LOOM_WG_INIT;

static void nm_writer(void *arg) {
  struct nm *x = arg;
  rng_t r;
  rng_seed(&r, g_seed * 13 + (uint64_t)x->id * 2 + (uint64_t)(uintptr_t)&r % 7);
  unsigned char buf[3000];
  int64_t left = x->bytes_per_writer;
  while (left > 0) {
    size_t n = 1 + rn(&r, sizeof buf);
    if ((int64_t)n > left)
      n = (size_t)left;
    long sum = 0;
    for (size_t i = 0; i < n; i++) {
      buf[i] = (unsigned char)rnd(&r);
      sum += buf[i];
    }
    ssize_t w;
    if (rn(&r, 3) == 0) {
      struct iovec iov[3];
      size_t a = n / 3, b = n / 3;
      iov[0] = (struct iovec){buf, a};
      iov[1] = (struct iovec){buf + a, b};
      iov[2] = (struct iovec){buf + a + b, n - a - b};
      w = loom_writev(x->a, iov, 3);
    } else {
      w = loom_write(x->a, buf, n);
    }
    CHECKF(w == (ssize_t)n, "nm write: %zd (%s)", w, loom_err_name((int)w));
    atomic_fetch_add(&x->wsum, sum);
    atomic_fetch_add(&x->wcnt, (long)n);
    left -= (int64_t)n;
    if (rn(&r, 8) == 0)
      loom_sleep(rn(&r, 100) * 1000);
  }
  if (atomic_fetch_sub(&x->writers_left, 1) == 1)
    CHECK_OK(loom_shutdown(x->a, SHUT_WR));
  loom_wg_done(&nm_wg);
}

static void nm_reader(void *arg) {
  struct nm *x = arg;
  rng_t r;
  rng_seed(&r,
           g_seed * 17 + (uint64_t)x->id * 3 + (uint64_t)(uintptr_t)&r % 11);
  unsigned char buf[2048];
  for (;;) {
    size_t n = rn(&r, 10) == 0 ? 0 : 1 + rn(&r, sizeof buf);
    ssize_t got = loom_read(x->b, buf, n);
    if (got == -ETIMEDOUT) {
      loom_yield();
      continue;
    }
    CHECKF(got >= 0, "nm read: %zd (%s)", got, loom_err_name((int)got));
    if (n == 0)
      continue;
    if (got == 0)
      break;
    long sum = 0;
    for (ssize_t i = 0; i < got; i++)
      sum += buf[i];
    atomic_fetch_add(&x->rsum, sum);
    atomic_fetch_add(&x->rcnt, got);
    if (rn(&r, 6) == 0)
      loom_sleep(rn(&r, 200) * 1000);
  }
  atomic_fetch_sub(&x->readers_left, 1);
  loom_wg_done(&nm_wg);
}

static void nm_poker(void *arg) {
  struct nm *x = arg;
  rng_t r;
  rng_seed(&r, g_seed * 19 + (uint64_t)x->id);
  while (atomic_load(&x->writers_left) > 0 && getenv("CHAOS_NOPOKE") == NULL) {
    int64_t now = loom_now();
    switch (rn(&r, 4)) {
    case 0:
      CHECK_OK(loom_set_read_deadline(x->b, now - 1));
      break;
    case 1:
      CHECK_OK(loom_set_read_deadline(x->b, now + (int64_t)rn(&r, 300) * 1000));
      break;
    case 2:
      /* Armed, moved and cleared under the writers, never reached: the
       * writers expect every write to complete.  Far enough ahead that a
       * loaded machine (a sanitizer build beside other work) cannot keep
       * this coroutine off the CPU until it passes. */
      CHECK_OK(loom_set_write_deadline(x->a, now + 5000 * CHECK_MS +
                                                 (int64_t)rn(&r, 300) * 1000));
      break;
    default:
      CHECK_OK(loom_set_deadline(x->b, 0, 0));
      break;
    }
    loom_sleep((int64_t)rn(&r, 300) * 1000);
    if (rn(&r, 2))
      CHECK_OK(loom_set_read_deadline(x->b, 0));
    CHECK_OK(loom_set_write_deadline(x->a, 0));
  }
  CHECK_OK(loom_set_read_deadline(x->b, 0));
  loom_wg_done(&nm_wg);
}

static void nm_main(void *arg) {
  (void)arg;
  rng_t r;
  rng_seed(&r, g_seed);
  int64_t end = loom_now() + g_ms * CHECK_MS;
  int rounds = 0;
  long total = 0;
  while (loom_now() < end) {
    loom_listener *l = NULL;
    char addr[128];
    bool unix_ = rn(&r, 2);
    if (unix_) {
      snprintf(addr, sizeof addr, "@loom-chaos-%d-%llu-%d", (int)getpid(),
               (unsigned long long)g_seed, rounds);
      CHECK_OK(loom_listen(&l, "unix", addr));
    } else {
      CHECK_OK(loom_listen(&l, "tcp", "127.0.0.1:0"));
      CHECK_OK(loom_listener_addr(l, addr, sizeof addr));
    }
    for (int i = 0; i < NM_PAIRS; i++) {
      struct nm *x = &nms[i];
      memset(x, 0, sizeof *x);
      x->id = i + rounds * NM_PAIRS;
      x->bytes_per_writer = 1 + (int64_t)rn(&r, 300000);
      CHECK_OK(loom_dial(&x->a, unix_ ? "unix" : "tcp", addr));
      CHECK_OK(loom_accept(l, &x->b));
      if (rn(&r, 2) && getenv("CHAOS_NOBUF") == NULL) {
        loom_conn_set_buffers(x->a, 16384, 16384);
        loom_conn_set_buffers(x->b, 16384, 16384);
      }
      atomic_store(&x->writers_left, 2);
      atomic_store(&x->readers_left, 2);
    }
    CHECK_OK(loom_listener_close(l));
    CHECK_OK(loom_wg_add(&nm_wg, NM_PAIRS * 5));
    for (int i = 0; i < NM_PAIRS; i++) {
      CHECK_OK(loom_go(nm_writer, &nms[i]));
      CHECK_OK(loom_go(nm_writer, &nms[i]));
      CHECK_OK(loom_go(nm_reader, &nms[i]));
      CHECK_OK(loom_go(nm_reader, &nms[i]));
      CHECK_OK(loom_go(nm_poker, &nms[i]));
    }
    int64_t t0 = loom_now();
    CHECK_OK(loom_wg_wait(&nm_wg, 0));
    if (g_verbose)
      fprintf(stderr, "round %d (%s): %lld ms\n", rounds,
              unix_ ? "unix" : "tcp",
              (long long)((loom_now() - t0) / CHECK_MS));
    for (int i = 0; i < NM_PAIRS; i++) {
      struct nm *x = &nms[i];
      CHECKF(atomic_load(&x->wcnt) == atomic_load(&x->rcnt) &&
                 atomic_load(&x->wsum) == atomic_load(&x->rsum),
             "conn %d: wrote %ld bytes (sum %ld), read %ld (sum %ld)", x->id,
             atomic_load(&x->wcnt), atomic_load(&x->wsum),
             atomic_load(&x->rcnt), atomic_load(&x->rsum));
      total += atomic_load(&x->rcnt);
      CHECK_OK(loom_close(x->a));
      CHECK_OK(loom_close(x->b));
    }
    rounds++;
  }
  fprintf(stderr, "net_multi: %d rounds, %ld bytes\n", rounds, total);
}
TEST(net_multi) {
  params();
  check_watchdog(g_ms / 1000 + 60, "net_multi");
  check_run(nm_main, NULL, g_procs);
}

/* ---- mutex storm: starvation mode, deadlines, cancels, foreign unlocks --- */

static loom_mutex ms_mu = LOOM_MUTEX_INIT;
static int ms_inside;
static long ms_count;
static atomic_long ms_timeouts, ms_handoffs, ms_maxwait;
static atomic_int ms_stop, ms_threads;
static loom_ctx *ms_root;
static loom_wg ms_wg = LOOM_WG_INIT;

static void ms_unlocker(void *arg) {
  (void)arg;
  if ((uintptr_t)arg & 1)
    loom_yield();
  CHECK_EQ(ms_inside, 1);
  ms_inside--;
  loom_mutex_unlock(&ms_mu);
  loom_wg_done(&ms_wg);
}

static void ms_body(rng_t *r, bool co) {
  CHECK_EQ(++ms_inside, 1);
  ms_count++;
  unsigned k = rn(r, 100);
  if (co && k < 5) {
    loom_sleep((int64_t)rn(r, 2000) * 1000); /* park holding it */
  } else if (k < 8) {
    check_spin_ns((int64_t)rn(r, 1500) * 1000); /* long holds: starvation */
  } else if (co && k < 20) {
    loom_yield();
  }
  if (co && rn(r, 10) == 0) {
    /* another coroutine unlocks it */
    CHECK_OK(loom_wg_add(&ms_wg, 1));
    int e = loom_go(ms_unlocker, (void *)(uintptr_t)rnd(r));
    CHECK_OK(e);
    atomic_fetch_add(&ms_handoffs, 1);
    return;
  }
  CHECK_EQ(ms_inside, 1);
  ms_inside--;
  loom_mutex_unlock(&ms_mu);
}

static void ms_one(rng_t *r, bool co) {
  int m = (int)rn(r, co ? 5 : 3), res = 0;
  int64_t t0 = loom_now(), dl = 0;
  loom_ctx *c = NULL;
  switch (m) {
  case 0:
    loom_mutex_lock(&ms_mu);
    break;
  case 1:
    dl = loom_now() + (int64_t)rn(r, 3000) * 1000;
    res = loom_mutex_lock_until(&ms_mu, dl);
    CHECK(res == 0 || res == -ETIMEDOUT);
    CHECK_LATE(res, dl);
    break;
  case 2:
    res = loom_mutex_trylock(&ms_mu);
    CHECK(res == 0 || res == -EBUSY);
    break;
  default:
    CHECK_OK(loom_ctx_with_timeout(&c, ms_root, (int64_t)rn(r, 3000) * 1000));
    if (rn(r, 2))
      spawn_canceller(c, (int64_t)rn(r, 2000) * 1000);
    res = loom_mutex_lock_ctx(&ms_mu, c);
    if (res != 0)
      check_ctx_err(c, res, "ms lock_ctx");
    break;
  }
  int64_t waited = loom_now() - t0;
  if (m == 0) {
    long mx = atomic_load(&ms_maxwait);
    while (waited > mx &&
           !atomic_compare_exchange_weak(&ms_maxwait, &mx, waited))
      ;
  }
  if (res == 0)
    ms_body(r, co);
  else
    atomic_fetch_add(&ms_timeouts, 1);
  if (c != NULL)
    loom_ctx_release(c);
}

static void ms_worker(void *arg) {
  rng_t r;
  rng_seed(&r, g_seed * 1234567 + (uint64_t)(uintptr_t)arg);
  while (!atomic_load(&ms_stop))
    ms_one(&r, true);
  loom_wg_done(&ms_wg);
}

static void *ms_thread(void *arg) {
  rng_t r;
  rng_seed(&r, g_seed * 7654321 + (uint64_t)(uintptr_t)arg);
  while (!atomic_load(&ms_stop)) {
    ms_one(&r, false);
    if (rn(&r, 4) == 0)
      usleep(rn(&r, 100));
  }
  atomic_fetch_sub(&ms_threads, 1);
  return NULL;
}

static void ms_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_ctx_with_cancel(&ms_root, loom_ctx_background()));
  int nw = 16;
  pthread_t th[2];
  atomic_store(&ms_threads, 2);
  for (int i = 0; i < 2; i++)
    CHECK_EQ(pthread_create(&th[i], NULL, ms_thread, (void *)(uintptr_t)i), 0);
  CHECK_OK(loom_wg_add(&ms_wg, nw));
  for (int i = 0; i < nw; i++)
    CHECK_OK(loom_go(ms_worker, (void *)(uintptr_t)i));
  loom_sleep(g_ms * CHECK_MS);
  atomic_store(&ms_stop, 1);
  int64_t t0 = loom_now();
  while (loom_wg_wait(&ms_wg, loom_now() + 10 * CHECK_MS) != 0 ||
         atomic_load(&ms_threads) != 0)
    CHECKF(loom_now() - t0 < 10000 * CHECK_MS,
           "mutex storm did not stop (inside=%d)", ms_inside);
  loom_block_enter();
  pthread_join(th[0], NULL);
  pthread_join(th[1], NULL);
  loom_block_exit();
  CHECK_OK(loom_wg_wait(&wg_spawn, 0));
  CHECK_EQ(ms_inside, 0);
  CHECK_OK(loom_mutex_trylock(&ms_mu));
  loom_mutex_unlock(&ms_mu);
  fprintf(stderr,
          "mutex_storm: locked %ld times, %ld timeouts, %ld foreign unlocks, "
          "max plain wait %ld ms\n",
          ms_count, atomic_load(&ms_timeouts), atomic_load(&ms_handoffs),
          atomic_load(&ms_maxwait) / CHECK_MS);
  loom_ctx_release(ms_root);
}
TEST(mutex_storm) {
  params();
  check_watchdog(g_ms / 1000 + 40, "mutex_storm");
  check_run(ms_main, NULL, g_procs);
}

/* ---- channel FIFO: per-sender order survives every path ------------------ */

#define FO_PROD 4
#define FO_CONS 3
static loom_chan *fo_ch, *fo_dummy;
static atomic_long fo_last[FO_CONS][FO_PROD];
static long fo_n;
static atomic_long fo_recvd;
static loom_wg fo_pwg = LOOM_WG_INIT, fo_cwg = LOOM_WG_INIT;

static void fo_producer(void *arg) {
  int id = (int)(uintptr_t)arg;
  rng_t r;
  rng_seed(&r, g_seed * 3 + (uint64_t)id);
  for (long i = 0; i < fo_n; i++) {
    uint64_t v[2] = {(uint64_t)id, (uint64_t)i};
    for (;;) {
      int m = (int)rn(&r, 4), res;
      if (m == 0) {
        res = loom_chan_send(fo_ch, v);
      } else if (m == 1) {
        res = loom_chan_send_until(fo_ch, v,
                                   loom_now() + (int64_t)rn(&r, 200) * 1000);
      } else if (m == 2) {
        res = loom_chan_try_send(fo_ch, v);
      } else {
        uint64_t dv[2] = {99, 99};
        loom_case cs[3] = {{fo_ch, LOOM_SEND, v, false},
                           {fo_dummy, LOOM_RECV, dv, false},
                           {NULL, LOOM_SEND, dv, false}};
        res = loom_select(cs, 3,
                          rn(&r, 2) ? LOOM_SELECT_NOWAIT : loom_now() + 100000);
        CHECKF(res == 0 || res == -ETIMEDOUT || res == -EAGAIN, "fo select %d",
               res);
        res = res == 0 ? (cs[0].ok ? 0 : -EPIPE) : res;
      }
      if (res == 0)
        break;
      CHECKF(res == -ETIMEDOUT || res == -EAGAIN, "fo send %d", res);
      if (rn(&r, 4) == 0)
        loom_yield();
    }
  }
  loom_wg_done(&fo_pwg);
}

static void fo_consumer(void *arg) {
  int id = (int)(uintptr_t)arg;
  rng_t r;
  rng_seed(&r, g_seed * 5 + (uint64_t)id);
  for (;;) {
    uint64_t v[2] = {0, 0};
    int m = (int)rn(&r, 4), res;
    if (m == 0) {
      res = loom_chan_recv(fo_ch, v);
    } else if (m == 1) {
      res = loom_chan_recv_until(fo_ch, v,
                                 loom_now() + (int64_t)rn(&r, 200) * 1000);
    } else if (m == 2) {
      res = loom_chan_try_recv(fo_ch, v);
    } else {
      uint64_t dv[2];
      loom_case cs[2] = {{fo_dummy, LOOM_RECV, dv, false},
                         {fo_ch, LOOM_RECV, v, false}};
      res = loom_select(cs, 2,
                        rn(&r, 2) ? LOOM_SELECT_NOWAIT : loom_now() + 100000);
      CHECKF(res == 1 || res == -ETIMEDOUT || res == -EAGAIN, "fo select %d",
             res);
      res = res == 1 ? (cs[1].ok ? 1 : 0) : res;
    }
    if (res == 0)
      break; /* closed and drained */
    if (res < 0) {
      CHECKF(res == -ETIMEDOUT || res == -EAGAIN, "fo recv %d", res);
      continue;
    }
    CHECKF(v[0] < FO_PROD, "fo: bad producer %llu", (unsigned long long)v[0]);
    long prev = atomic_load(&fo_last[id][v[0]]);
    CHECKF((long)v[1] > prev,
           "fo: consumer %d got %llu from producer %llu after %ld", id,
           (unsigned long long)v[1], (unsigned long long)v[0], prev);
    atomic_store(&fo_last[id][v[0]], (long)v[1]);
    atomic_fetch_add(&fo_recvd, 1);
    if (rn(&r, 8) == 0)
      loom_sleep(rn(&r, 50) * 1000);
  }
  loom_wg_done(&fo_cwg);
}

static void fo_main(void *arg) {
  (void)arg;
  static const size_t caps[] = {0, 1, 2, 3, 7};
  fo_n = CHECK_SCALE(20000, 5000, 3000);
  for (int ci = 0; ci < 5; ci++) {
    CHECK_OK(loom_chan_make(&fo_ch, 16, caps[ci]));
    CHECK_OK(loom_chan_make(&fo_dummy, 16, 0));
    for (int i = 0; i < FO_CONS; i++)
      for (int j = 0; j < FO_PROD; j++)
        atomic_store(&fo_last[i][j], -1);
    atomic_store(&fo_recvd, 0);
    CHECK_OK(loom_wg_add(&fo_pwg, FO_PROD));
    CHECK_OK(loom_wg_add(&fo_cwg, FO_CONS));
    for (int i = 0; i < FO_PROD; i++)
      CHECK_OK(loom_go(fo_producer, (void *)(uintptr_t)i));
    for (int i = 0; i < FO_CONS; i++)
      CHECK_OK(loom_go(fo_consumer, (void *)(uintptr_t)i));
    CHECK_OK(loom_wg_wait(&fo_pwg, 0));
    CHECK_OK(loom_chan_close(fo_ch));
    CHECK_OK(loom_wg_wait(&fo_cwg, 0));
    CHECK_EQ(atomic_load(&fo_recvd), FO_PROD * fo_n);
    loom_chan_free(fo_ch);
    loom_chan_free(fo_dummy);
  }
  fprintf(stderr, "chan_fifo: ok, %ld values per producer per capacity\n",
          fo_n);
}
TEST(chan_fifo) {
  params();
  check_watchdog(120, "chan_fifo");
  check_run(fo_main, NULL, g_procs);
}

/* ---- a counting allocator (ctx_tree checks nothing is left) ------------- */

static atomic_long cl_live;
static void *cl_realloc(void *ud, void *ptr, size_t size) {
  (void)ud;
  void *q = realloc(ptr, size);
  if (ptr == NULL && q != NULL)
    atomic_fetch_add(&cl_live, 1);
  return q;
}
static void cl_free(void *ud, void *ptr) {
  (void)ud;
  atomic_fetch_sub(&cl_live, 1);
  free(ptr);
}

/* ---- ctx trees: deep chains, concurrent cancels, releases and waiters ---- */

#define CT_N 3000
static loom_ctx *ct_node[CT_N];
static atomic_int ct_released[CT_N];
static atomic_long ct_woken;
static loom_wg ct_wg = LOOM_WG_INIT;

struct ct_waiter {
  loom_ctx *c; /* a reference of its own */
  int idx;
};
static void ct_wait(void *arg) {
  struct ct_waiter *w = arg;
  rng_t r;
  rng_seed(&r, g_seed + (uint64_t)w->idx);
  int res;
  switch (rn(&r, 4)) {
  case 0: {
    loom_case cs[1] = {{loom_ctx_done(w->c), LOOM_RECV, NULL, false}};
    res = loom_select(cs, 1, 0);
    CHECK_EQ(res, 0);
    break;
  }
  case 1:
    res = loom_sleep_ctx(w->c, 60 * 1000 * CHECK_MS);
    CHECK(res == -ECANCELED || res == -ETIMEDOUT);
    break;
  case 2: {
    loom_chan *never;
    CHECK_OK(loom_chan_make(&never, 8, 0));
    res = loom_chan_recv_ctx(never, NULL, w->c);
    CHECK(res == -ECANCELED || res == -ETIMEDOUT);
    loom_chan_free(never);
    break;
  }
  default: {
    loom_ctx *g = NULL;
    CHECK_OK(loom_ctx_with_cancel(&g, w->c));
    loom_case cs[1] = {{loom_ctx_done(g), LOOM_RECV, NULL, false}};
    res = loom_select(cs, 1, 0);
    CHECK_EQ(res, 0);
    loom_ctx_release(g);
    break;
  }
  }
  CHECK(loom_ctx_err(w->c) != 0);
  atomic_fetch_add(&ct_woken, 1);
  loom_ctx_unref(w->c);
  free(w);
  loom_wg_done(&ct_wg);
}

static void ct_releaser(void *arg) {
  int from = (int)(uintptr_t)arg;
  rng_t r;
  rng_seed(&r, g_seed * 11 + (uint64_t)from);
  for (int k = 0; k < CT_N / 4; k++) {
    int i = (int)rn(&r, CT_N);
    if (i == 0)
      continue;
    if (!atomic_exchange(&ct_released[i], 1))
      loom_ctx_release(ct_node[i]); /* the creator's reference, once */
    if (rn(&r, 16) == 0)
      loom_yield();
  }
  loom_wg_done(&ct_wg);
}

static void ct_canceller(void *arg) {
  (void)arg;
  rng_t r;
  rng_seed(&r, g_seed * 23);
  loom_sleep((int64_t)rn(&r, 3000) * 1000);
  /* the root: reachable while main holds it */
  loom_ctx_cancel(ct_node[0]);
  loom_wg_done(&ct_wg);
}

static void ct_main(void *arg) {
  (void)arg;
  rng_t r;
  rng_seed(&r, g_seed);
  for (int round = 0; round < 20; round++) {
    CHECK_OK(loom_ctx_with_cancel(&ct_node[0], loom_ctx_background()));
    atomic_store(&ct_released[0], 0);
    static int key;
    for (int i = 1; i < CT_N; i++) {
      /* a chain with branches: the parent is a recent node */
      int par = i - 1 - (int)rn(&r, i < 8 ? (uint32_t)i : 8);
      loom_ctx *p = ct_node[par];
      switch (rn(&r, 3)) {
      case 0:
        CHECK_OK(loom_ctx_with_cancel(&ct_node[i], p));
        break;
      case 1:
        CHECK_OK(loom_ctx_with_timeout(&ct_node[i], p,
                                       (int64_t)(1 + rn(&r, 20000)) * 1000));
        break;
      default:
        CHECK_OK(
            loom_ctx_with_value(&ct_node[i], p, &key, (void *)(uintptr_t)i));
        break;
      }
      atomic_store(&ct_released[i], 0);
    }
    int nw = 64;
    CHECK_OK(loom_wg_add(&ct_wg, nw + 3 + 1));
    for (int k = 0; k < nw; k++) {
      struct ct_waiter *w = malloc(sizeof *w);
      w->idx = (int)rn(&r, CT_N);
      w->c = loom_ctx_ref(ct_node[w->idx]);
      CHECK_OK(loom_go(ct_wait, w));
    }
    for (int k = 0; k < 3; k++)
      CHECK_OK(loom_go(ct_releaser, (void *)(uintptr_t)(round * 3 + k)));
    CHECK_OK(loom_go(ct_canceller, NULL));
    int64_t t0 = loom_now();
    while (loom_wg_wait(&ct_wg, loom_now() + 10 * CHECK_MS) != 0)
      CHECKF(loom_now() - t0 < 20000 * CHECK_MS,
             "ctx tree: waiters not woken (%ld woken)", atomic_load(&ct_woken));
    for (int i = CT_N - 1; i >= 0; i--)
      if (!atomic_exchange(&ct_released[i], 1))
        loom_ctx_release(ct_node[i]);
  }
  fprintf(stderr, "ctx_tree: %ld waiters woken\n", atomic_load(&ct_woken));
}
TEST(ctx_tree) {
  params();
  loom_allocator a = {cl_realloc, cl_free, NULL};
  loom_set_allocator(&a);
  check_watchdog(120, "ctx_tree");
  check_run(ct_main, NULL, g_procs);
  loom_set_allocator(NULL);
  CHECKF(atomic_load(&cl_live) == 0,
         "%ld blocks still allocated after loom_run", atomic_load(&cl_live));
}

CHECK_MAIN()
