/*
 * engine.h — what sessions share with the server or client that owns
 * them (internal).
 *
 * An owner (loom__owner) is embedded in every loom_server and
 * loom_client.  It keeps the list of its live sessions, the totals of the
 * ones that have ended, and error counters by kind, which is what
 * loom_server_metrics sums up.  Sessions count their own traffic in their
 * own fields, so the hot path touches no shared cache line.
 */
#ifndef LOOM_ENGINE_ENGINE_H
#define LOOM_ENGINE_ENGINE_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "loom/engine.h"
#include "loom/net.h"
#include "loom/sync.h"

enum loom__errkind {
#define LOOM_ERRKIND_(name, help) LOOM__ERR_##name,
  LOOM_METRIC_ERRORS(LOOM_ERRKIND_)
#undef LOOM_ERRKIND_
      LOOM__ERR_KINDS
};

typedef struct loom__owner {
  loom_mutex mu;      /* protects the fields up to `changed` */
  loom_session *head; /* live sessions (s->prev/next) */
  uint64_t open;      /* sessions whose reader has not ended: those on
                         the list, and those that left it and are
                         dropping the reader's reference (on_free) */
  uint64_t total;     /* sessions ever started */
  uint64_t bytes_in, bytes_out, pkgs_in, pkgs_out,
      pkgs_dropped;  /* of ended sessions */
  loom_cond changed; /* a session was added, opened or removed */
  _Atomic uint64_t errors[LOOM__ERR_KINDS]; /* relaxed counters */
  loom_taskpool *pool; /* for the pool_queued metric, or NULL */
} loom__owner;

void loom__owner_init(loom__owner *o);
void loom__owner_count_error(loom__owner *o, int err);
void loom__owner_count(loom__owner *o, enum loom__errkind kind);
void loom__owner_metrics(loom__owner *o, loom_metrics *m);
/* Whether a close of `o` must go on in a coroutine of its own rather
 * than wait for o's sessions here: called from a callback of one of
 * them (which ends only after the callback returns), or from a worker of
 * o's task pool (whose queue may hold o's packages, behind the caller). */
bool loom__owner_close_elsewhere(const loom__owner *o);
/* Close every live session (gracefully, or abort with `err` if err < 0),
 * and wait until none is left or `deadline` passes: 0 or -ETIMEDOUT. */
int loom__owner_close_all(loom__owner *o, int err, int64_t deadline);

/* The next session on an owner's list (owner->mu held), and a session's
 * traffic counters and queue length: bytes in/out, packages in/out,
 * queued bytes, packages dropped. */
loom_session *loom__session_next(loom_session *s);
/* on_open has accepted the session (owner->mu held). */
bool loom__session_opened(loom_session *s);
void loom__session_sample(loom_session *s, uint64_t v[6]);

/* A datagram network ("udp*", "unixgram"): one session per socket. */
static inline bool loom__is_packet(const char *network) {
  return strncmp(network, "udp", 3) == 0 || strcmp(network, "unixgram") == 0;
}

/* The socket options servers and clients set on each connection (the
 * fields of loom_server_opts / loom_client_opts of the same names). */
typedef struct loom__sockopts {
  bool nodelay_off;
  int keepalive, rcvbuf, sndbuf;
} loom__sockopts;

/* The most seconds of idle before keep-alive probes Linux takes
 * (TCP_KEEPIDLE's limit); more is -EINVAL at a server's or client's
 * start, not a failure of every connection. */
#define LOOM__KEEPALIVE_MAX 32767

/* Set them on a stream connection (Nagle and keep-alive on TCP only) or
 * on a packet socket (the buffer sizes): 0 or the first error. */
int loom__sockopts_apply(const loom__sockopts *so, const char *network,
                         loom_conn *c, loom_pconn *pc);

/* Check `in` and fill `out` with the defaults of loom/engine.h.
 * 0 or -EINVAL. */
int loom__session_opts(loom_session_opts *out, const loom_session_opts *in);

/* Start a session on a connected stream socket or a packet socket (one
 * of conn / pc non-NULL; `connected` says whether pc has a peer).  It
 * takes ownership of the socket, also on failure.  0 or -ENOMEM. */
int loom__session_start(loom__owner *owner, const loom_session_opts *o,
                        const char *network, loom_conn *conn, loom_pconn *pc,
                        bool connected);

#endif
