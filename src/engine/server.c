/*
 * server.c — an engine server: a listener whose connections become
 * sessions (stream networks), or one session on a bound packet socket.
 *
 * The accept loop runs on its own coroutine and owns the listener: it
 * accepts under the server's context, and loom_server_close cancels that
 * context, then waits for the loop to close the listener and leave
 * (closing a listener frees it, so nobody else may touch it).  Then the
 * sessions are closed through the owner, gracefully up to the deadline.
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

struct loom_server {
  loom__owner owner;
  loom_session_opts so;
  char network[12];
  char addr[128]; /* as bound */
  int max_conns;
  loom__sockopts sock;
  loom_listener *ln;   /* the accept loop's */
  loom_ctx *ctx;       /* cancelled to stop accepting */
  loom_sema loop_done; /* released as the accept loop leaves */
  bool packet;
  int64_t close_deadline; /* for a close handed to its own coroutine */
  void (*on_closed)(void *arg, int rc);
  void *closed_arg;
};

static void accept_loop(void *arg) {
  loom_server *srv = arg;
  int64_t backoff = 0;
  for (;;) {
    loom_conn *c;
    int rc = loom_accept_ctx(srv->ln, &c, srv->ctx);
    if (rc < 0) {
      if (loom__ctx_reason(srv->ctx) || rc == LOOM_ECLOSED)
        break;
      /* A failure that is not the descriptor shortage loom_accept rides
       * out itself (ECONNABORTED, EPERM from a firewall, ...): count it
       * and back off a little, so it cannot become a spin. */
      loom__owner_count(&srv->owner, LOOM__ERR_accept);
      backoff = backoff ? backoff * 2 : 1000000;
      if (backoff > 100000000)
        backoff = 100000000;
      loom_sleep_ctx(srv->ctx, backoff);
      continue;
    }
    backoff = 0;
    if (srv->max_conns > 0) {
      loom_mutex_lock(&srv->owner.mu);
      bool full = srv->owner.open >= (uint64_t)srv->max_conns;
      loom_mutex_unlock(&srv->owner.mu);
      if (full) {
        loom__owner_count(&srv->owner, LOOM__ERR_refused);
        loom_close(c);
        continue;
      }
    }
    (void)loom__sockopts_apply(&srv->sock, srv->network, c, NULL);
    if (loom__session_start(&srv->owner, &srv->so, srv->network, c, NULL,
                            false) < 0)
      loom__owner_count(&srv->owner, LOOM__ERR_other);
  }
  loom_listener_close(srv->ln);
  srv->ln = NULL;
  loom_sema_release(&srv->loop_done);
}

int loom_server_start(loom_server **out, const loom_server_opts *o) {
  if (!o || !o->network || !o->addr)
    return -EINVAL;
  if (loom_id() == 0)
    return LOOM_ENOTCO;
  loom_server *srv = loom__calloc(1, sizeof *srv);
  if (!srv)
    return -ENOMEM;
  loom__owner_init(&srv->owner);
  int rc = loom__session_opts(&srv->so, &o->session);
  if (rc < 0 || o->max_conns < 0 || o->keepalive < 0 ||
      o->keepalive > LOOM__KEEPALIVE_MAX || o->rcvbuf < 0 || o->sndbuf < 0 ||
      strlen(o->network) >= sizeof srv->network)
    goto fail_einval;
  srv->owner.pool = srv->so.pool;
  snprintf(srv->network, sizeof srv->network, "%s", o->network);
  srv->max_conns = o->max_conns;
  srv->sock = (loom__sockopts){.nodelay_off = o->no_delay_off,
                               .keepalive = o->keepalive,
                               .rcvbuf = o->rcvbuf,
                               .sndbuf = o->sndbuf};
  srv->on_closed = o->on_closed;
  srv->closed_arg = o->closed_arg;
  srv->packet = loom__is_packet(o->network);

  if (srv->packet) {
    if (srv->so.compress)
      goto fail_einval;
    loom_pconn *pc;
    loom_listen_opts lo = {.reuseport = o->reuseport};
    rc = loom_listen_packet_with(&pc, o->network, o->addr, &lo);
    if (rc < 0)
      goto fail;
    if ((rc = loom__sockopts_apply(&srv->sock, srv->network, NULL, pc)) < 0) {
      loom_pconn_close(pc);
      goto fail;
    }
    loom_pconn_local_addr(pc, srv->addr, sizeof srv->addr);
    rc = loom__session_start(&srv->owner, &srv->so, srv->network, NULL, pc,
                             false);
    if (rc < 0)
      goto fail;
    *out = srv;
    return 0;
  }

  loom_listen_opts lo = {.backlog = o->backlog, .reuseport = o->reuseport};
  rc = loom_listen_with(&srv->ln, o->network, o->addr, &lo);
  if (rc < 0)
    goto fail;
  loom_listener_addr(srv->ln, srv->addr, sizeof srv->addr);
  rc = loom_ctx_with_cancel(&srv->ctx, loom_ctx_background());
  if (rc < 0)
    goto fail_listener;
  rc = loom_go(accept_loop, srv);
  if (rc < 0)
    goto fail_ctx;
  *out = srv;
  return 0;

fail_ctx:
  loom_ctx_release(srv->ctx);
fail_listener:
  loom_listener_close(srv->ln);
  goto fail;
fail_einval:
  rc = -EINVAL;
fail:
  loom__free(srv);
  return rc;
}

int loom_server_addr(loom_server *srv, char *buf, size_t len) {
  int n = snprintf(buf, len, "%s", srv->addr);
  return n < 0 || (size_t)n >= len ? -ENOSPC : 0;
}

void loom_server_metrics(loom_server *srv, loom_metrics *out) {
  loom__owner_metrics(&srv->owner, out);
}

static int close_now(loom_server *srv, int64_t deadline);

static void close_main(void *arg) {
  loom_server *srv = arg;
  (void)close_now(srv, srv->close_deadline);
}

int loom_server_close(loom_server *srv, int64_t deadline) {
  if (loom_id() == 0)
    return LOOM_ENOTCO;
  /* From a callback of one of its own sessions, or a worker of their
   * pool: what the close waits for cannot end while it waits here. */
  if (loom__owner_close_elsewhere(&srv->owner)) {
    srv->close_deadline = deadline;
    return loom_go(close_main, srv);
  }
  return close_now(srv, deadline);
}

static int close_now(loom_server *srv, int64_t deadline) {
  if (srv->ctx) {
    loom_ctx_cancel(srv->ctx);
    loom_sema_acquire(&srv->loop_done, 0);
    loom_ctx_release(srv->ctx);
  }
  int rc = loom__owner_close_all(&srv->owner, 0, deadline);
  if (rc < 0)
    loom__owner_close_all(&srv->owner, LOOM_ECLOSED, 0);
  void (*done)(void *, int) = srv->on_closed;
  void *arg = srv->closed_arg;
  loom__free(srv);
  if (done != NULL)
    done(arg, rc);
  return rc;
}
