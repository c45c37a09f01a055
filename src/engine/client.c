/*
 * client.c — an engine client: keeps `conns` sessions connected.
 *
 * One supervisor coroutine per client does all the dialling.  It sleeps
 * on the owner's `changed` condition while enough sessions are live, and
 * when one is missing it dials: the first `conns` dials back to back, a
 * redial at most once per interval, and after a failure it backs off
 * (interval, doubling up to reconnect_max).  Sessions never redial from their
 * own callbacks, so a reconnect cannot re-enter user code, and a server that
 * accepts and drops at once costs at most one dial per interval.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "ctx/ctx_internal.h"
#include "engine/engine.h"
#include "loom/ctx.h"
#include "loom/runtime.h"
#include "runtime/alloc.h"
#include "runtime/runtime.h"

struct loom_client {
  loom__owner owner;
  loom_session_opts so;
  char network[12];
  char *addr;
  int conns;
  int64_t interval, max_wait, dial_timeout;
  bool oneshot;        /* reconnect_interval < 0: one dial per session */
  uint64_t dials;      /* dials started (owner.mu) */
  uint64_t dials_done; /* dials finished, either way (owner.mu) */
  uint64_t failures;   /* dials failed (owner.mu) */
  int last_err;        /* the latest failure's error (owner.mu) */
  loom_ctx *ctx;       /* cancelled by loom_client_close */
  loom_sema sup_done;  /* released as the supervisor leaves */
  uint64_t rr;         /* loom_client_session's round robin */
  int waiters;         /* coroutines in loom_client_wait (owner.mu) */
  int64_t close_deadline; /* for a close handed to its own coroutine */
  loom__sockopts sock;
  void (*on_closed)(void *arg, int rc);
  void *closed_arg;
};

static int dial_one(loom_client *cl) {
  int64_t deadline = loom__after(cl->dial_timeout);
  if (loom__is_packet(cl->network)) {
    /* getty's probe: an empty datagram makes a refused UDP port fail
     * now.  Not on unixgram, where connect() fails already when nobody
     * is there, and where the probe would wait, with no bound, for room
     * in the queue of a peer that has stopped reading: the client would
     * neither connect nor close. */
    loom_dial_packet_opts po = {.probe = "", .probe_len = 0};
    bool udp = strncmp(cl->network, "udp", 3) == 0;
    loom_pconn *pc;
    int rc =
        loom_dial_packet_with(&pc, cl->network, cl->addr, udp ? &po : NULL);
    if (rc < 0)
      return rc;
    if ((rc = loom__sockopts_apply(&cl->sock, cl->network, NULL, pc)) < 0) {
      loom_pconn_close(pc);
      return rc;
    }
    return loom__session_start(&cl->owner, &cl->so, cl->network, NULL, pc,
                               true);
  }
  loom_dial_opts o = {.deadline = deadline, .ctx = cl->ctx};
  loom_conn *c;
  int rc = loom_dial_with(&c, cl->network, cl->addr, &o);
  if (rc < 0)
    return rc;
  if ((rc = loom__sockopts_apply(&cl->sock, cl->network, c, NULL)) < 0) {
    loom_close(c);
    return rc;
  }
  return loom__session_start(&cl->owner, &cl->so, cl->network, c, NULL, false);
}

/* Another dial is due: fewer sessions than wanted, and (one-shot) a
 * session slot never dialled yet.  owner.mu held. */
static bool dial_due(loom_client *cl) {
  if (cl->oneshot && cl->dials >= (uint64_t)cl->conns)
    return false;
  return cl->owner.open < (uint64_t)cl->conns;
}

static void supervisor(void *arg) {
  loom_client *cl = arg;
  int64_t backoff = 0; /* after a failure: doubles up to max_wait */
  int64_t next_at = 0; /* no dial before this loom_now() time */
  for (;;) {
    loom_mutex_lock(&cl->owner.mu);
    while (!dial_due(cl) && !loom__ctx_reason(cl->ctx))
      loom_cond_wait(&cl->owner.changed, &cl->owner.mu, 0);
    cl->dials++;
    bool first = cl->dials < (uint64_t)cl->conns; /* more to come at once */
    loom_mutex_unlock(&cl->owner.mu);
    int64_t now = loom_now();
    if (next_at > now && loom_sleep_ctx(cl->ctx, next_at - now) < 0)
      break;
    if (loom__ctx_reason(cl->ctx))
      break;
    int rc = dial_one(cl);
    if (rc < 0 &&
        !loom__ctx_reason(cl->ctx)) /* counted before waiters see it */
      loom__owner_count(&cl->owner, LOOM__ERR_accept);
    loom_mutex_lock(&cl->owner.mu);
    cl->dials_done++;
    if (rc < 0) {
      cl->failures++;
      cl->last_err = rc;
    }
    loom_cond_broadcast(&cl->owner.changed); /* loom_client_wait */
    loom_mutex_unlock(&cl->owner.mu);
    if (rc < 0) {
      if (loom__ctx_reason(cl->ctx))
        break;
      backoff = !backoff                     ? cl->interval
                : backoff > cl->max_wait / 2 ? cl->max_wait
                                             : backoff * 2;
      if (backoff > cl->max_wait)
        backoff = cl->max_wait;
      next_at = loom__after(backoff);
    } else {
      /* The first `conns` dials go out back to back; a redial (a session
       * was lost) comes at most once per interval — the first one too,
       * an interval after the last of those — so a server that accepts
       * and drops at once is not hammered. */
      backoff = 0;
      next_at = first ? 0 : loom__after(cl->interval);
    }
  }
  loom_sema_release(&cl->sup_done);
}

int loom_client_start(loom_client **out, const loom_client_opts *o) {
  if (!o || !o->network || !o->addr || o->conns < 0 || o->reconnect_max < 0 ||
      o->dial_timeout < 0 || o->keepalive < 0 ||
      o->keepalive > LOOM__KEEPALIVE_MAX || o->rcvbuf < 0 || o->sndbuf < 0)
    return -EINVAL;
  if (loom_id() == 0)
    return LOOM_ENOTCO;
  loom_client *cl = loom__calloc(1, sizeof *cl);
  if (!cl)
    return -ENOMEM;
  loom__owner_init(&cl->owner);
  int rc = loom__session_opts(&cl->so, &o->session);
  if (rc < 0 || strlen(o->network) >= sizeof cl->network ||
      (loom__is_packet(o->network) && o->session.compress))
    goto fail_einval;
  cl->owner.pool = cl->so.pool;
  snprintf(cl->network, sizeof cl->network, "%s", o->network);
  cl->addr = loom__strdup(o->addr);
  if (!cl->addr)
    goto fail_nomem;
  cl->conns = o->conns ? o->conns : 1;
  cl->sock = (loom__sockopts){.nodelay_off = o->no_delay_off,
                              .keepalive = o->keepalive,
                              .rcvbuf = o->rcvbuf,
                              .sndbuf = o->sndbuf};
  cl->on_closed = o->on_closed;
  cl->closed_arg = o->closed_arg;
  cl->oneshot = o->reconnect_interval < 0;
  cl->interval = o->reconnect_interval > 0 ? o->reconnect_interval : 100000000;
  cl->max_wait = o->reconnect_max ? o->reconnect_max : INT64_C(5000000000);
  if (cl->max_wait < cl->interval)
    cl->max_wait = cl->interval;
  cl->dial_timeout = o->dial_timeout ? o->dial_timeout : INT64_C(5000000000);
  rc = loom_ctx_with_cancel(&cl->ctx, loom_ctx_background());
  if (rc < 0)
    goto fail;
  if (loom_go(supervisor, cl) < 0) {
    loom_ctx_release(cl->ctx);
    goto fail_nomem;
  }
  *out = cl;
  return 0;
fail_einval:
  rc = -EINVAL;
  goto fail;
fail_nomem:
  rc = -ENOMEM;
fail:
  loom__free(cl->addr);
  loom__free(cl);
  return rc;
}

int loom_client_wait(loom_client *cl, int n, int64_t deadline) {
  if (loom_id() == 0)
    return LOOM_ENOTCO;
  int rc = 0;
  loom_mutex_lock(&cl->owner.mu);
  cl->waiters++; /* a close frees the client only once we are out */
  uint64_t failures = cl->failures;
  for (;;) {
    /* Count sessions that are open, not merely started. */
    int live = 0;
    for (loom_session *s = cl->owner.head; s; s = loom__session_next(s))
      live += loom__session_opened(s) && !loom_session_closed(s);
    if (live >= n)
      break;
    if (loom__ctx_reason(cl->ctx)) {
      rc = LOOM_ECLOSED;
      break;
    }
    /* A one-shot client that has dialled every slot will not get more. */
    if (cl->oneshot && cl->dials_done >= (uint64_t)cl->conns &&
        cl->owner.open < (uint64_t)n) {
      rc = cl->failures ? cl->last_err : LOOM_ECLOSED;
      break;
    }
    rc = loom_cond_wait(&cl->owner.changed, &cl->owner.mu, deadline);
    if (rc < 0) {
      if (cl->failures != failures)
        rc = cl->last_err; /* why it is not connected */
      break;
    }
  }
  if (--cl->waiters == 0 && loom__ctx_reason(cl->ctx))
    loom_cond_broadcast(&cl->owner.changed); /* close_now waits for it */
  loom_mutex_unlock(&cl->owner.mu);
  return rc;
}

int loom_client_session(loom_client *cl, loom_session **out) {
  int rc = -ENOTCONN;
  loom_mutex_lock(&cl->owner.mu);
  uint64_t n = cl->owner.open;
  if (n) {
    uint64_t skip = cl->rr++ % n;
    loom_session *pick = NULL;
    /* Start at the round-robin position; take the first usable one. */
    loom_session *s = cl->owner.head;
    for (uint64_t i = 0; i < skip && s; i++)
      s = loom__session_next(s);
    /* n counts sessions that already left the list too (they leave it
     * before their last unref, and the count after it). */
    for (uint64_t i = 0; i < n && !pick; i++) {
      if (!s)
        s = cl->owner.head;
      if (!s)
        break;
      if (loom__session_opened(s) && !loom_session_closed(s))
        pick = s;
      s = loom__session_next(s);
    }
    if (pick) {
      *out = loom_session_ref(pick);
      rc = 0;
    }
  }
  loom_mutex_unlock(&cl->owner.mu);
  return rc;
}

void loom_client_metrics(loom_client *cl, loom_metrics *out) {
  loom__owner_metrics(&cl->owner, out);
}

static int close_now(loom_client *cl, int64_t deadline);

static void close_main(void *arg) {
  loom_client *cl = arg;
  (void)close_now(cl, cl->close_deadline);
}

int loom_client_close(loom_client *cl, int64_t deadline) {
  if (loom_id() == 0)
    return LOOM_ENOTCO;
  /* From a callback of its sessions or their pool: see loom_server_close. */
  if (loom__owner_close_elsewhere(&cl->owner)) {
    cl->close_deadline = deadline;
    return loom_go(close_main, cl);
  }
  return close_now(cl, deadline);
}

static int close_now(loom_client *cl, int64_t deadline) {
  loom_ctx_cancel(cl->ctx);
  loom_mutex_lock(&cl->owner.mu);
  loom_cond_broadcast(&cl->owner.changed);
  /* Waiters see the cancel and leave; the client is freed below. */
  while (cl->waiters > 0)
    (void)loom_cond_wait(&cl->owner.changed, &cl->owner.mu, 0);
  loom_mutex_unlock(&cl->owner.mu);
  loom_sema_acquire(&cl->sup_done, 0);
  int rc = loom__owner_close_all(&cl->owner, 0, deadline);
  if (rc < 0)
    loom__owner_close_all(&cl->owner, LOOM_ECLOSED, 0);
  loom_ctx_release(cl->ctx);
  void (*done)(void *, int) = cl->on_closed;
  void *arg = cl->closed_arg;
  loom__free(cl->addr);
  loom__free(cl);
  if (done != NULL)
    done(arg, rc);
  return rc;
}
