/*
 * owner.c — what servers and clients share: the list of live sessions,
 * closing them all, and metrics (the snapshot and its Prometheus text).
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "engine/engine.h"
#include "loom/runtime.h"
#include "runtime/alloc.h"
#include "runtime/runtime.h"

void loom__owner_init(loom__owner *o) { memset(o, 0, sizeof *o); }

void loom__owner_count(loom__owner *o, enum loom__errkind kind) {
  atomic_fetch_add_explicit(&o->errors[kind], 1, memory_order_relaxed);
}

void loom__owner_count_error(loom__owner *o, int err) {
  enum loom__errkind k;
  switch (err) {
  case -EBADMSG:
    k = LOOM__ERR_decode;
    break;
  case -EMSGSIZE:
    k = LOOM__ERR_oversize;
    break;
  case -ETIMEDOUT:
    k = LOOM__ERR_timeout;
    break;
  case -ECONNRESET:
  case -EPIPE:
  case -ECONNABORTED:
  case -ECONNREFUSED:
  case -ENOTCONN:
    k = LOOM__ERR_reset;
    break;
  case -ENOBUFS:
    return; /* counted as wq_full where it happened */
  case LOOM_ECOMPRESS:
    k = LOOM__ERR_compress;
    break;
  default:
    k = LOOM__ERR_other;
    break;
  }
  loom__owner_count(o, k);
}

void loom__owner_metrics(loom__owner *o, loom_metrics *m) {
  memset(m, 0, sizeof *m);
  /* One pass under the owner's lock (lock order: owner, then a session's
   * queue lock), so a session that ends meanwhile is counted once. */
  loom_mutex_lock(&o->mu);
  m->sessions_open = o->open;
  m->sessions_total = o->total;
  m->bytes_in = o->bytes_in;
  m->bytes_out = o->bytes_out;
  m->pkgs_in = o->pkgs_in;
  m->pkgs_out = o->pkgs_out;
  m->pkgs_dropped = o->pkgs_dropped;
  for (loom_session *s = o->head; s; s = loom__session_next(s)) {
    uint64_t v[6];
    loom__session_sample(s, v);
    m->bytes_in += v[0];
    m->bytes_out += v[1];
    m->pkgs_in += v[2];
    m->pkgs_out += v[3];
    m->wq_bytes += v[4];
    m->pkgs_dropped += v[5];
    if (v[4] > m->wq_max)
      m->wq_max = v[4];
  }
  loom_mutex_unlock(&o->mu);
  if (o->pool)
    m->pool_queued = loom_taskpool_queued(o->pool);
#define LOOM_ERR_LOAD_(name, help)                                             \
  m->errors.name = atomic_load_explicit(&o->errors[LOOM__ERR_##name],          \
                                        memory_order_relaxed);
  LOOM_METRIC_ERRORS(LOOM_ERR_LOAD_)
#undef LOOM_ERR_LOAD_
}

bool loom__owner_close_elsewhere(const loom__owner *o) {
  return loom__cb_tag() == o ||
         (o->pool != NULL && loom__pool_tag() == o->pool);
}

int loom__owner_close_all(loom__owner *o, int err, int64_t deadline) {
  /* Closing a session takes only its own queue lock (lock order: the
   * owner's, then a session's), so it is done under the owner's lock:
   * no list to allocate, which a close with no memory left must not
   * need. */
  loom_mutex_lock(&o->mu);
  int rc = 0;
  for (;;) {
    for (loom_session *s = o->head; s; s = loom__session_next(s)) {
      if (err < 0)
        loom_session_abort(s, err);
      else
        loom_session_close(s);
    }
    /* Wait for the list to empty.  New sessions may still appear (a
     * connection accepted just before the listener closed): go round. */
    uint64_t before = o->total;
    while (o->open > 0 && o->total == before && rc == 0) {
      rc = loom_cond_wait(&o->changed, &o->mu, deadline);
      if (rc == -ENOMEM) { /* no timer for the deadline: poll it */
        rc = deadline != 0 && loom_now() >= deadline ? -ETIMEDOUT : 0;
        loom_mutex_unlock(&o->mu);
        loom_yield();
        loom_mutex_lock(&o->mu);
      }
    }
    if (o->open == 0 || rc == -ETIMEDOUT)
      break;
  }
  rc = o->open == 0 ? 0 : -ETIMEDOUT;
  loom_mutex_unlock(&o->mu);
  return rc;
}

/* ---- Prometheus text ---------------------------------------------------- */

typedef struct out {
  char *p;
  size_t left;
  int total;
  int full;
} out;

__attribute__((format(printf, 2, 3))) static void put(out *o, const char *fmt,
                                                      ...) {
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(o->p, o->left, fmt, ap);
  va_end(ap);
  if (n < 0 || (size_t)n >= o->left) {
    o->full = 1;
    o->left = 0;
    return;
  }
  o->p += n;
  o->left -= (size_t)n;
  o->total += n;
}

static void metric(out *o, const char *pfx, const char *name, const char *type,
                   const char *help, uint64_t v) {
  put(o, "# HELP %s_%s %s\n# TYPE %s_%s %s\n%s_%s %llu\n", pfx, name, help, pfx,
      name, type, pfx, name, (unsigned long long)v);
}

/* Prometheus' metric names: [a-zA-Z_:][a-zA-Z0-9_:]* */
static bool metric_name(const char *s) {
  for (size_t i = 0; s[i] != '\0'; i++) {
    char c = s[i];
    if (!(c == '_' || c == ':' || (c >= 'a' && c <= 'z') ||
          (c >= 'A' && c <= 'Z') || (i > 0 && c >= '0' && c <= '9')))
      return false;
  }
  return s[0] != '\0';
}

int loom_metrics_prometheus(
    const loom_metrics *m, const char *prefix,
    char *buf, // NOLINT(readability-non-const-parameter): written through o.p
    size_t len) {
  const char *p = prefix ? prefix : "loom";
  if (!metric_name(p))
    return -EINVAL;
  out o = {buf, len, 0, 0};
  metric(&o, p, "sessions_open", "gauge", "Sessions open now.",
         m->sessions_open);
  metric(&o, p, "sessions_total", "counter", "Sessions ever opened.",
         m->sessions_total);
  metric(&o, p, "bytes_in_total", "counter", "Bytes received.", m->bytes_in);
  metric(&o, p, "bytes_out_total", "counter", "Bytes sent.", m->bytes_out);
  metric(&o, p, "packages_in_total", "counter", "Packages received.",
         m->pkgs_in);
  metric(&o, p, "packages_out_total", "counter", "Packages sent.", m->pkgs_out);
  metric(&o, p, "packages_dropped_total", "counter",
         "Packages written but dropped unsent by a close.", m->pkgs_dropped);
  metric(&o, p, "write_queue_bytes", "gauge", "Bytes waiting in write queues.",
         m->wq_bytes);
  metric(&o, p, "write_queue_max_bytes", "gauge",
         "Bytes in the longest write queue.", m->wq_max);
  metric(&o, p, "pool_queued_tasks", "gauge",
         "Packages waiting in the task pool.", m->pool_queued);
  put(&o,
      "# HELP %s_errors_total Errors by kind.\n"
      "# TYPE %s_errors_total counter\n",
      p, p);
#define LOOM_ERR_PUT_(name, help)                                              \
  put(&o, "%s_errors_total{kind=\"" #name "\"} %llu\n", p,                     \
      (unsigned long long)m->errors.name);
  LOOM_METRIC_ERRORS(LOOM_ERR_PUT_)
#undef LOOM_ERR_PUT_
  return o.full ? -ENOSPC : o.total;
}

int loom__sockopts_apply(const loom__sockopts *so, const char *network,
                         loom_conn *c, loom_pconn *pc) {
  int rc = 0;
  if (pc != NULL)
    return so->rcvbuf || so->sndbuf
               ? loom_pconn_set_buffers(pc, so->rcvbuf, so->sndbuf)
               : 0;
  if (strncmp(network, "tcp", 3) == 0) {
    if (so->nodelay_off)
      rc = loom_conn_set_nodelay(c, false);
    if (rc == 0 && so->keepalive > 0)
      rc = loom_conn_set_keepalive(c, true, so->keepalive);
  }
  if (rc == 0 && (so->rcvbuf || so->sndbuf))
    rc = loom_conn_set_buffers(c, so->rcvbuf, so->sndbuf);
  return rc;
}
