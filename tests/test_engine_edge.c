/*
 * test_engine_edge.c — the engine's contracts (loom/engine.h,
 * loom/taskpool.h) at their edges, against real sockets on loopback:
 * slow consumers under each write-queue policy, cron and idle timeouts,
 * write timeouts and linger, oversized / malformed / truncated input,
 * packet sessions, corrupt compressed streams, refusal and connection
 * limits, the close protocol and references, identity and statistics,
 * metrics and their Prometheus text, the task pool on its own, and many
 * coroutines writing to one session.
 *
 * Peers.  Where a case needs precise control (a peer that never reads,
 * with a small receive buffer set before connecting; a header with no
 * payload; half a frame then end-of-stream) the peer is a plain
 * socket(2), non-blocking, waited on with loom_fd_wait so it parks its
 * coroutine like any loom call.  Elsewhere peers are loom_dial
 * connections or loom_client sessions.
 *
 * What the engine does is recorded by one listener (ev_listener) into an
 * `ev` that the session's user pointer names: counts of each callback,
 * the first on_error code, a reference to the first session, its stats
 * as on_close saw them.  Every wait is bounded (WAIT_FOR), so a contract
 * the engine breaks by hanging fails naming what it waited for, not by
 * ctest's timeout.  Timing is checked only with generous sanity bounds.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <malloc.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <zlib.h>

#include "check.h"
#include "check_zlib.h"
#include "engine/export_test.h"
#include "loom.h"

#define SEC INT64_C(1000000000)

/* Wait (polling every millisecond) until `cond`, at most `secs` seconds. */
#define WAIT_FOR(cond, secs)                                                   \
  do {                                                                         \
    int64_t wf_end_ = loom_now() + (int64_t)(secs)*SEC;                        \
    while (!(cond)) {                                                          \
      if (loom_now() > wf_end_)                                                \
        CHECK_FAIL("waited %d s for: %s", (int)(secs), #cond);                 \
      loom_sleep(CHECK_MS);                                                    \
    }                                                                          \
  } while (0)

/* Run `fn` as a loom program with `procs` Ps, under a watchdog. */
static void run(void (*fn)(void *), int procs, const char *what) {
  check_watchdog(25, what);
  check_run(fn, NULL, procs);
}

/* ------------------------------------------------------------------ */
/* The recording listener.                                              */

typedef struct ev {
  atomic_int opens, msgs, crons, errs, closes, frees;
  atomic_int err;            /* the first on_error code */
  atomic_int echo_fail;      /* echo writes that did not return 0 */
  atomic_size_t bytes;       /* payload bytes seen by on_message */
  _Atomic int64_t opened_at; /* loom_now() in the last on_open */
  _Atomic uint64_t id;       /* loom_session_id in the last on_open */
  int open_rc;               /* what on_open returns */
  bool echo;                 /* on_message writes the package back */
  bool keep;                 /* on_open keeps a reference in `s` */
  loom_session *_Atomic s;   /* that reference (the first session) */
  void (*msg)(loom_session *s, const loom_pkg *pkg); /* extra work */
  void (*error)(loom_session *s, int err);           /* extra work */
  void (*close)(loom_session *s);                    /* extra work */
  loom_session_stats final; /* loom_session_stats_get in on_close */
  loom_taskpool *_Atomic pool; /* a case's pool, for its callbacks */
} ev;

static int ev_open(loom_session *s) {
  ev *e = loom_session_user(s);
  CHECK(e != NULL);
  atomic_store(&e->opened_at, loom_now());
  atomic_store(&e->id, loom_session_id(s));
  if (e->keep) {
    loom_session *none = NULL, *r = loom_session_ref(s);
    if (!atomic_compare_exchange_strong(&e->s, &none, r))
      loom_session_unref(r);
  }
  atomic_fetch_add(&e->opens, 1); /* last: whoever sees it sees `s` */
  return e->open_rc;
}

static void ev_message(loom_session *s, const loom_pkg *pkg) {
  ev *e = loom_session_user(s);
  atomic_fetch_add(&e->bytes, pkg->len);
  if (e->echo && loom_session_write(s, pkg->data, pkg->len, -1) != 0)
    atomic_fetch_add(&e->echo_fail, 1);
  if (e->msg)
    e->msg(s, pkg);
  atomic_fetch_add(&e->msgs, 1);
}

static void ev_cron(loom_session *s) {
  ev *e = loom_session_user(s);
  atomic_fetch_add(&e->crons, 1);
}

static void ev_error(loom_session *s, int err) {
  ev *e = loom_session_user(s);
  CHECK(loom_session_closed(s));
  CHECK_LT(err, 0);
  int none = 0;
  atomic_compare_exchange_strong(&e->err, &none, err);
  if (e->error)
    e->error(s, err);
  atomic_fetch_add(&e->errs, 1);
}

/* Several sessions of one server may close at once: `final` is the last
 * one's, written under this lock. */
static loom_mutex final_mu;

static void ev_close(loom_session *s) {
  ev *e = loom_session_user(s);
  CHECK(loom_session_closed(s));
  loom_mutex_lock(&final_mu);
  loom_session_stats_get(s, &e->final);
  loom_mutex_unlock(&final_mu);
  if (e->close)
    e->close(s);
  atomic_fetch_add(&e->closes, 1);
}

static const loom_session_listener ev_listener = {
    .on_open = ev_open,
    .on_message = ev_message,
    .on_cron = ev_cron,
    .on_error = ev_error,
    .on_close = ev_close,
};

/* on_free: after on_close, at the last unref; the user pointer and the
 * attributes are still there to be freed. */
static int free_key;
static void ev_free(loom_session *s) {
  ev *e = loom_session_user(s);
  CHECK(e != NULL);
  CHECK(loom_session_closed(s));
  CHECK_EQ(atomic_load(&e->closes), atomic_load(&e->frees) + 1);
  CHECK(loom_session_attr(s, &free_key) == e);
  atomic_fetch_add(&e->frees, 1);
}

static const loom_session_listener free_listener = {
    .on_open = ev_open,
    .on_message = ev_message,
    .on_error = ev_error,
    .on_close = ev_close,
    .on_free = ev_free,
};

static ev E; /* each case runs in its own process */
static ev CE; /* the client side's events */

/* Codecs outlive every server (they are read on the sessions). */
static loom_codec lenpfx, line;
static void codecs_init(void) {
  CHECK_OK(loom_codec_lenpfx(&lenpfx, NULL));
  CHECK_OK(loom_codec_line(&line, '\n', false));
}

/* Default server options: TCP on 127.0.0.1, port 0, recording into E. */
static loom_server_opts server_opts(const loom_codec *codec) {
  loom_server_opts o;
  memset(&o, 0, sizeof o);
  o.network = "tcp";
  o.addr = "127.0.0.1:0";
  o.session.listener = &ev_listener;
  o.session.codec = codec;
  o.session.user = &E;
  return o;
}

static loom_server *serve(const loom_server_opts *o, char addr[128]) {
  loom_server *srv;
  CHECK_OK(loom_server_start(&srv, o));
  CHECK_OK(loom_server_addr(srv, addr, 128));
  return srv;
}

/* A client's options for a server at addr: one TCP session with the
 * client-side listener (CE), as server_opts is the server's. */
static loom_client_opts client_opts(const char *addr, const loom_codec *codec) {
  loom_client_opts co;
  memset(&co, 0, sizeof co);
  co.network = "tcp";
  co.addr = addr;
  co.session.listener = &ev_listener;
  co.session.codec = codec;
  co.session.user = &CE;
  return co;
}

/* Start a client and return its first session, referenced. */
static loom_session *one_session(const loom_client_opts *co, loom_client **cl) {
  CHECK_OK(loom_client_start(cl, co));
  CHECK_OK(loom_client_wait(*cl, 1, loom_now() + 5 * SEC));
  loom_session *cs;
  CHECK_OK(loom_client_session(*cl, &cs));
  return cs;
}

/* A server started with `o`, and one peer connected to it over TCP. */
static loom_server *serve_dial(const loom_server_opts *o, loom_conn **peer) {
  char addr[128];
  loom_server *srv = serve(o, addr);
  CHECK_OK(loom_dial(peer, "tcp", addr));
  return srv;
}

static loom_metrics metrics(loom_server *srv) {
  loom_metrics m;
  loom_server_metrics(srv, &m);
  return m;
}

/* The one kept session, once on_open has run. */
static loom_session *kept_session(void) {
  WAIT_FOR(atomic_load(&E.opens) >= 1, 5);
  loom_session *s = atomic_load(&E.s);
  CHECK(s != NULL);
  return s;
}

/* ------------------------------------------------------------------ */
/* Peers.                                                               */

static int addr_port(const char *addr) {
  const char *c = strrchr(addr, ':');
  CHECK(c != NULL);
  return atoi(c + 1);
}

/* A non-blocking TCP socket connected to `addr` (127.0.0.1:port), with
 * SO_RCVBUF set before connecting when rcvbuf > 0. */
static int raw_dial(const char *addr, int rcvbuf) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  CHECK(fd >= 0);
  if (rcvbuf > 0)
    CHECK(setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf) == 0);
  struct sockaddr_in sa;
  memset(&sa, 0, sizeof sa);
  sa.sin_family = AF_INET;
  sa.sin_port = htons((uint16_t)addr_port(addr));
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
    CHECK_EQ(errno, EINPROGRESS);
    CHECK_OK(loom_fd_wait(fd, LOOM_FD_WRITE, loom_now() + 5 * SEC));
    int soerr = 0;
    socklen_t sl = sizeof soerr;
    CHECK(getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) == 0);
    CHECK_EQ(soerr, 0);
  }
  return fd;
}

/* Read exactly n bytes from a loom_conn (within 10 s). */
static void conn_read_full(loom_conn *c, void *p, size_t n) {
  uint8_t *b = p;
  CHECK_OK(loom_set_read_deadline(c, loom_now() + 10 * SEC));
  while (n > 0) {
    ssize_t k = loom_read(c, b, n);
    CHECKF(k > 0, "read returned %zd (%s) with %zu bytes to go", k,
           loom_err_name((int)k), n);
    b += k;
    n -= (size_t)k;
  }
}

/* The peer's end: end-of-stream (or a reset) within 5 s, not a hang. */
static void conn_expect_eof(loom_conn *c) {
  char buf[4096];
  CHECK_OK(loom_set_read_deadline(c, loom_now() + 5 * SEC));
  for (;;) {
    ssize_t k = loom_read(c, buf, sizeof buf);
    if (k > 0)
      continue;
    CHECKF(k == 0 || k == -ECONNRESET, "read returned %zd (%s)", k,
           loom_err_name((int)k));
    return;
  }
}

/* Close the peer, then the server (gracefully, within 5 s). */
static void finish(loom_server *srv, loom_conn *peer) {
  CHECK_OK(loom_close(peer));
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}

static void put_be32(uint8_t *p, uint32_t v) {
  p[0] = (uint8_t)(v >> 24);
  p[1] = (uint8_t)(v >> 16);
  p[2] = (uint8_t)(v >> 8);
  p[3] = (uint8_t)v;
}

static uint32_t get_be32(const uint8_t *p) {
  return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 |
         p[3];
}

/* A 4-byte big-endian length-prefixed frame of p[0..n) into out. */
static size_t frame(uint8_t *out, const void *p, size_t n) {
  put_be32(out, (uint32_t)n);
  memcpy(out + 4, p, n);
  return n + 4;
}

/* ------------------------------------------------------------------ */
/* 1. Slow consumer: a peer that never reads, per write-queue policy.   */

enum { PKG = 64 * 1024, WQ_HIGH = 256 * 1024, WQ_LOW = 128 * 1024 };
static uint8_t big[PKG];

typedef struct slow {
  loom_server *srv;
  char addr[128];
  int peer;
  loom_session *s;
} slow;

/* A server with small socket buffers and watermarks, and a peer with a
 * small receive buffer that never reads; on_message runs in slow_pool
 * when it is set. */
static loom_taskpool *slow_pool;
static void slow_start(slow *t, bool close_on_full, int64_t write_timeout,
                       size_t wq_high, int64_t linger) {
  codecs_init();
  for (size_t i = 0; i < PKG; i++)
    big[i] = (uint8_t)(i * 7 + 1);
  loom_server_opts o = server_opts(&lenpfx);
  o.sndbuf = 16384;
  o.session.wq_high = wq_high;
  o.session.wq_low = wq_high / 2;
  o.session.close_on_full = close_on_full;
  o.session.write_timeout = write_timeout;
  o.session.linger = linger;
  o.session.pool = slow_pool;
  E.keep = true;
  t->srv = serve(&o, t->addr);
  t->peer = raw_dial(t->addr, 16384);
  t->s = kept_session();
}

/* "A peer that reads slowly or never holds at most wq_high + one package
 * of our memory." */
static void check_wq_bound(loom_session *s) {
  loom_session_stats st;
  loom_session_stats_get(s, &st);
  CHECKF(st.wq_bytes <= (size_t)WQ_HIGH + PKG + 4, "wq_bytes %zu", st.wq_bytes);
}

/* Write packages of len bytes (at most PKG) with timeout 0 until the
 * queue refuses one and the socket has stopped taking bytes (the queue
 * length holds still); returns how many were refused. */
static int fill_with_until_stalled(loom_session *s, size_t len) {
  int refused = 0;
  size_t before = SIZE_MAX;
  for (int round = 0; round < 100; round++) {
    int rc;
    for (int i = 0; i < 1024; i++) {
      rc = loom_session_write(s, big, len, 0);
      check_wq_bound(s);
      if (rc != 0)
        break;
    }
    CHECK_ERR(rc, -EAGAIN);
    refused++;
    loom_session_stats st;
    loom_session_stats_get(s, &st);
    CHECK_GE(st.wq_bytes, (size_t)WQ_HIGH);
    if (st.wq_bytes == before)
      return refused;
    before = st.wq_bytes;
    loom_sleep(30 * CHECK_MS);
  }
  CHECK_FAIL("the write queue never stalled");
}
static int fill_until_stalled(loom_session *s) {
  return fill_with_until_stalled(s, PKG);
}

static void slow_end(slow *t) {
  close(t->peer); /* unread bytes: a reset, the session ends */
  WAIT_FOR(atomic_load(&E.closes) == 1, 10);
  loom_session_unref(t->s);
  CHECK_OK(loom_server_close(t->srv, loom_now() + 5 * SEC));
}

/* (a) timeout 0: -EAGAIN once full; the queue never exceeds wq_high plus
 * one package; every refusal is counted as wq_full. */
static void slow_eagain_main(void *arg) {
  (void)arg;
  slow t;
  slow_start(&t, false, 0, WQ_HIGH, 0);
  int refused = fill_until_stalled(t.s);
  for (int i = 0; i < 16; i++) {
    CHECK_ERR(loom_session_write(t.s, big, PKG, 0), -EAGAIN);
    check_wq_bound(t.s);
    refused++;
  }
  loom_session_stats st;
  loom_session_stats_get(t.s, &st);
  loom_metrics m = metrics(t.srv);
  CHECK_EQ(m.errors.wq_full, refused);
  CHECK_EQ(m.wq_bytes, st.wq_bytes); /* the one session's queue */
  CHECK_EQ(m.wq_max, st.wq_bytes);
  CHECK_EQ(m.sessions_open, 1);
  CHECK(!loom_session_closed(t.s));
  CHECK_EQ(atomic_load(&E.errs), 0);
  CHECK_EQ(atomic_load(&E.closes), 0);
  slow_end(&t);
}
TEST(slow_consumer_timeout0_eagain) { run(slow_eagain_main, 2, "slow eagain"); }

/* Timeouts of INT64_MAX mean "never", in the session's options and in
 * a write: now + timeout used to overflow into the past, so the write
 * failed at once with -ETIMEDOUT and the writer's deadline closed the
 * session. */
static atomic_int huge_rc = 1;
static void huge_writer(void *arg) {
  atomic_store(&huge_rc, loom_session_write(arg, big, PKG, INT64_MAX));
}
static void slow_huge_timeout_main(void *arg) {
  (void)arg;
  slow t;
  slow_start(&t, false, INT64_MAX, WQ_HIGH, 0);
  (void)fill_until_stalled(t.s);
  CHECK_OK(loom_go(huge_writer, t.s));
  loom_sleep(100 * CHECK_MS);
  CHECK_EQ(atomic_load(&huge_rc), 1); /* still waiting for room */
  CHECK(!loom_session_closed(t.s));
  CHECK_EQ(atomic_load(&E.errs), 0);
  slow_end(&t);
  WAIT_FOR(atomic_load(&huge_rc) != 1, 5);
  CHECK_ERR(atomic_load(&huge_rc), LOOM_ECLOSED);
}
TEST(slow_consumer_huge_timeouts_mean_never) {
  run(slow_huge_timeout_main, 2, "slow huge timeouts");
}

/* (b) timeout > 0: -ETIMEDOUT after about that long; the session stays. */
static void slow_timeout_main(void *arg) {
  (void)arg;
  slow t;
  slow_start(&t, false, 0, WQ_HIGH, 0);
  int refused = fill_until_stalled(t.s);
  int64_t t0 = loom_now();
  CHECK_ERR(loom_session_write(t.s, big, PKG, 200 * CHECK_MS), -ETIMEDOUT);
  int64_t el = loom_now() - t0;
  CHECKF(el >= 100 * CHECK_MS && el < 10 * SEC, "waited %lld ms",
         (long long)(el / CHECK_MS));
  check_wq_bound(t.s);
  CHECK_EQ(metrics(t.srv).errors.wq_full, refused + 1);
  CHECK(!loom_session_closed(t.s));
  CHECK_EQ(atomic_load(&E.errs), 0);
  slow_end(&t);
}
TEST(slow_consumer_timeout_etimedout) {
  run(slow_timeout_main, 2, "slow timeout");
}

/* Writers waiting for room are served in the order they came, as a Go
 * channel serves blocked senders (getty's write queue is one): four
 * writers park one after another on a full queue; the peer then reads,
 * and their packages reach it in that order.  They used to be woken all
 * together to race for the room, and the newest often won. */
enum { FIFO_N = 4, FIFO_MARK = 0xA0 };
static uint8_t fifo_pkg[FIFO_N][PKG];
static atomic_int fifo_done, fifo_started;
static void fifo_writer(void *arg) {
  int id = (int)(intptr_t)arg;
  loom_session *s = atomic_load(&E.s);
  atomic_fetch_add(&fifo_started, 1); /* runs on into the line: no park */
  int rc = loom_session_write(s, fifo_pkg[id], PKG, -1);
  CHECKF(rc == 0, "writer %d: %s", id, loom_err_name(rc));
  atomic_fetch_add(&fifo_done, 1);
}

/* The peer's side of the length-prefixed stream: the first payload byte
 * of every frame, in order (the fill's frames start with 1). */
typedef struct frame_scan {
  uint8_t hdr[4];
  size_t nhdr, left;
  bool first;
  int nmarks;
  int marks[FIFO_N];
} frame_scan;
static void frame_scan_bytes(frame_scan *f, const uint8_t *p, size_t n) {
  while (n > 0) {
    if (f->left == 0) {
      f->hdr[f->nhdr++] = *p++;
      n--;
      if (f->nhdr == 4) {
        f->left = (size_t)f->hdr[0] << 24 | (size_t)f->hdr[1] << 16 |
                  (size_t)f->hdr[2] << 8 | f->hdr[3];
        f->nhdr = 0;
        f->first = true;
      }
      continue;
    }
    if (f->first) {
      f->first = false;
      if (*p >= FIFO_MARK && *p < FIFO_MARK + FIFO_N && f->nmarks < FIFO_N)
        f->marks[f->nmarks++] = *p - FIFO_MARK;
    }
    size_t k = n < f->left ? n : f->left;
    f->left -= k;
    p += k;
    n -= k;
  }
}

static void fifo_main(void *arg) {
  (void)arg;
  slow t;
  slow_start(&t, false, 0, WQ_HIGH, 0);
  for (int i = 0; i < FIFO_N; i++)
    memset(fifo_pkg[i], FIFO_MARK + i, PKG);
  (void)fill_until_stalled(t.s);
  atomic_store(&fifo_started, 0);
  for (int i = 0; i < FIFO_N; i++) {
    CHECK_OK(loom_go(fifo_writer, (void *)(intptr_t)i));
    /* In line before the next one comes: it has started, and the few
     * steps from there to the line take no scheduling point but the
     * session's lock, which nobody holds for long. */
    WAIT_FOR(atomic_load(&fifo_started) == i + 1, 5);
    loom_sleep(50 * CHECK_MS);
  }
  CHECK_EQ(atomic_load(&fifo_done), 0);
  static uint8_t sink[1 << 16];
  static frame_scan f;
  memset(&f, 0, sizeof f);
  int64_t end = loom_now() + 10 * SEC;
  while (f.nmarks < FIFO_N) {
    CHECK(loom_now() < end);
    (void)loom_fd_wait(t.peer, LOOM_FD_READ, loom_now() + 10 * CHECK_MS);
    ssize_t n;
    while ((n = read(t.peer, sink, sizeof sink)) > 0)
      frame_scan_bytes(&f, sink, (size_t)n);
  }
  WAIT_FOR(atomic_load(&fifo_done) == FIFO_N, 5);
  char got[64] = "";
  for (int i = 0; i < FIFO_N; i++)
    snprintf(got + strlen(got), sizeof got - strlen(got), " %d", f.marks[i]);
  printf("the waiting writers' packages reached the peer in the order:%s\n",
         got);
  for (int i = 0; i < FIFO_N; i++)
    CHECKF(f.marks[i] == i, "order:%s", got);
  slow_end(&t);
}
TEST(slow_consumer_waiting_writers_served_in_order) {
  run(fifo_main, 1, "writers waiting for room, in order");
}
TEST(slow_consumer_waiting_writers_served_in_order_2p) {
  run(fifo_main, 2, "writers waiting for room, in order");
}

/* A write waiting without limit on a full queue is released by an abort
 * with LOOM_ECLOSED. */
static atomic_int blocked_rc = 1;
static loom_session *blocked_s;
static void blocked_writer(void *arg) {
  (void)arg;
  atomic_store(&blocked_rc, loom_session_write(blocked_s, big, PKG, -1));
}

/* The linger is long (20 s) on purpose: an abort drops the queue and
 * closes at once ("An error ... closes at once, dropping the queue"), so
 * nothing here may wait for the linger. */
enum { LONG_LINGER_S = 20 };

static void slow_abort_main(void *arg) {
  (void)arg;
  slow t;
  slow_start(&t, false, 0, WQ_HIGH, LONG_LINGER_S * SEC);
  fill_until_stalled(t.s);
  blocked_s = t.s;
  CHECK_OK(loom_go(blocked_writer, NULL));
  loom_sleep(100 * CHECK_MS);
  CHECK_EQ(atomic_load(&blocked_rc), 1); /* still waiting for room */
  loom_session_abort(t.s, -ECANCELED);
  WAIT_FOR(atomic_load(&blocked_rc) != 1, 5);
  CHECK_ERR(atomic_load(&blocked_rc), LOOM_ECLOSED);
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  CHECK_EQ(atomic_load(&E.errs), 1);
  CHECK_ERR(atomic_load(&E.err), -ECANCELED);
  CHECK_ERR(loom_session_write(t.s, "x", 1, 0), LOOM_ECLOSED);
  slow_end(&t);
}
TEST(slow_consumer_blocked_write_released_by_abort) {
  run(slow_abort_main, 2, "blocked write");
}

/* (c) close_on_full: the write that cannot be queued returns -ENOBUFS,
 * on_error(-ENOBUFS), on_close once, counted as wq_full. */
static void slow_close_on_full_main(void *arg) {
  (void)arg;
  slow t;
  slow_start(&t, true, 0, WQ_HIGH, LONG_LINGER_S * SEC);
  int rc = 0;
  for (int i = 0; i < 1024 && rc == 0; i++) {
    rc = loom_session_write(t.s, big, PKG, 0);
    check_wq_bound(t.s);
  }
  CHECK_ERR(rc, -ENOBUFS);
  CHECK(loom_session_closed(t.s));
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  CHECK_EQ(atomic_load(&E.errs), 1);
  CHECK_ERR(atomic_load(&E.err), -ENOBUFS);
  loom_metrics m = metrics(t.srv);
  CHECK_GT(m.errors.wq_full, 0);
  CHECK_EQ(m.errors.other, 0);
  CHECK_ERR(loom_session_write(t.s, big, PKG, 0), LOOM_ECLOSED);
  loom_sleep(50 * CHECK_MS);
  CHECK_EQ(atomic_load(&E.closes), 1);
  CHECK_EQ(atomic_load(&E.errs), 1);
  slow_end(&t);
}
TEST(slow_consumer_close_on_full_enobufs) {
  run(slow_close_on_full_main, 2, "close_on_full");
}

/* A producer waits in line, and the queue is below wq_high but above
 * wq_low (so the producer is not woken yet): the state in which the
 * line, not a full queue, is what a later write meets.  Built by filling
 * the queue to wq_high without a refusal, parking a producer, then
 * having the peer read until the socket has taken the queue below
 * wq_high.  The session has a (long) write_timeout, so that the writer
 * sends the queue in batches of 64 KiB, not all of it at once (the
 * queue shrinks when a batch is out): a queue of wq_high plus a package
 * leaves one batch at a time. */
enum { LINE_WRITE_TIMEOUT_S = 60 };
#define LINE_WRITE_TIMEOUT (LINE_WRITE_TIMEOUT_S * SEC)
static atomic_int line_rc = 1;
/* The producer holds a reference of its own: the cases end the session
 * (slow_end drops the test's reference) before its write has returned. */
static void line_producer(void *arg) {
  int rc = loom_session_write(arg, big, PKG, 20 * SEC);
  loom_session_unref(arg);
  atomic_store(&line_rc, rc);
}
static void line_below_high(slow *t) {
  size_t before = SIZE_MAX;
  loom_session_stats st;
  for (int round = 0;; round++) {
    CHECKF(round < 100, "the write queue never stalled");
    for (;;) { /* below wq_high a write is queued at once: no refusal */
      loom_session_stats_get(t->s, &st);
      if (st.wq_bytes >= WQ_HIGH)
        break;
      CHECK_OK(loom_session_write(t->s, big, PKG, 0));
    }
    if (st.wq_bytes == before)
      break;
    before = st.wq_bytes;
    loom_sleep(30 * CHECK_MS);
  }
  atomic_store(&line_rc, 1);
  CHECK_OK(loom_go(line_producer, loom_session_ref(t->s)));
  loom_sleep(50 * CHECK_MS);
  CHECK_EQ(atomic_load(&line_rc), 1); /* in line */
  /* The peer reads 16 KiB at a time until the queue is below wq_high
   * (what the socket buffers hold varies): 16 KiB below it at most. */
  static uint8_t sink[4096];
  for (int step = 0; st.wq_bytes >= WQ_HIGH; step++) {
    CHECKF(step < 100, "queue %zu: never below wq_high", st.wq_bytes);
    size_t got = 0;
    while (got < 16384) {
      CHECK_OK(loom_fd_wait(t->peer, LOOM_FD_READ, loom_now() + 5 * SEC));
      size_t want = 16384 - got;
      ssize_t n = read(t->peer, sink, want < sizeof sink ? want : sizeof sink);
      if (n < 0)
        CHECK_EQ(errno, EAGAIN);
      else
        got += (size_t)n;
    }
    before = SIZE_MAX;
    for (int i = 0; i < 100; i++) { /* until the socket stops taking */
      loom_session_stats_get(t->s, &st);
      if (st.wq_bytes == before)
        break;
      before = st.wq_bytes;
      loom_sleep(30 * CHECK_MS);
    }
  }
  CHECKF(st.wq_bytes < WQ_HIGH && st.wq_bytes > WQ_HIGH / 2,
         "queue %zu: not between the watermarks", st.wq_bytes);
  CHECK_EQ(atomic_load(&line_rc), 1); /* still in line */
}

/* Such a write that times out in line fails with -ETIMEDOUT, and
 * close_on_full leaves the session alone: the queue was not full. */
static void line_close_on_full_main(void *arg) {
  (void)arg;
  slow t;
  slow_start(&t, true, LINE_WRITE_TIMEOUT, WQ_HIGH, 0);
  line_below_high(&t);
  CHECK_ERR(loom_session_write(t.s, big, PKG, 100 * CHECK_MS), -ETIMEDOUT);
  CHECK(!loom_session_closed(t.s));
  CHECK_EQ(atomic_load(&E.errs), 0);
  CHECK_EQ(metrics(t.srv).errors.wq_full, 1); /* refused for want of room */
  /* Leaving the line, the write let the producer at its head look again:
   * it may have taken the room below wq_high, or still wait. */
  slow_end(&t);
  WAIT_FOR(atomic_load(&line_rc) != 1, 5);
  int rc = atomic_load(&line_rc);
  CHECKF(rc == 0 || rc == LOOM_ECLOSED, "the producer: %s", loom_err_name(rc));
}
TEST(slow_consumer_close_on_full_spares_a_timeout_in_line) {
  run(line_close_on_full_main, 2, "close_on_full, in line below high");
}

/* A reply from on_message takes the room that is there instead of
 * waiting behind the producer: a peer that waits for its reply before it
 * reads again must not wait for the line.  On the reader, and in a task
 * pool (arg non-NULL). */
static atomic_int reply_rc = 1;
static void reply_in_line(loom_session *s, const loom_pkg *pkg) {
  (void)pkg;
  atomic_store(&reply_rc, loom_session_write(s, "pong", 4, 500 * CHECK_MS));
}
static void line_reply_main(void *arg) {
  if (arg != NULL) {
    loom_taskpool_opts po = {.queues = 1, .workers = 1};
    CHECK_OK(loom_taskpool_make(&slow_pool, &po));
  }
  slow t;
  slow_start(&t, false, LINE_WRITE_TIMEOUT, WQ_HIGH, 0);
  line_below_high(&t);
  atomic_store(&reply_rc, 1);
  E.msg = reply_in_line;
  static const uint8_t ping[] = {0, 0, 0, 4, 'p', 'i', 'n', 'g'};
  CHECK_EQ(write(t.peer, ping, sizeof ping), (ssize_t)sizeof ping);
  WAIT_FOR(atomic_load(&reply_rc) != 1, 5);
  CHECK_OK(atomic_load(&reply_rc));
  CHECK_EQ(atomic_load(&line_rc), 1); /* the producer still waits */
  E.msg = NULL;
  slow_end(&t);
  WAIT_FOR(atomic_load(&line_rc) != 1, 5);
  if (slow_pool != NULL) {
    loom_taskpool_close(slow_pool);
    slow_pool = NULL;
  }
}
TEST(slow_consumer_reader_reply_skips_the_line) {
  run(line_reply_main, 2, "the reader's reply, in line below high");
}
static void line_reply_pooled_main(void *arg) {
  (void)arg;
  line_reply_main(&slow_pool);
}
TEST(slow_consumer_pooled_reply_skips_the_line) {
  run(line_reply_pooled_main, 2, "a pooled reply, in line below high");
}

/* Bytes count against wq_high until the socket has taken them, a batch
 * at a time: the writer offers the socket at most half of wq_high at
 * once, so a queue at wq_high holds at least half of it that the socket
 * has not been offered.  Seen from outside: bytes_out, which moves a
 * batch at a time, never jumps by more than that while the peer drains
 * the queue 4 KiB at a time.  The batch was the whole queue (up to 256
 * KiB), and a peer that had read all but its last bytes still found the
 * queue full. */
static void batch_room_main(void *arg) {
  (void)arg;
  slow t;
  slow_start(&t, false, 0, WQ_HIGH, 0);
  /* Frames of 64 KiB exactly, so that every batch but the last is half
   * of wq_high and the last one is a frame or two: two batches end
   * between two looks only if the socket took a whole frame at once,
   * which its 16 KiB buffers cannot.  (With 64 KiB + 4 byte frames, a
   * last batch of a few bytes ended with the one before it.) */
  (void)fill_with_until_stalled(t.s, PKG - 4);
  loom_session_stats st;
  loom_session_stats_get(t.s, &st);
  uint64_t out = st.bytes_out, most = 0;
  int jumps = 0;
  static uint8_t sink[4096];
  int64_t end = loom_now() + 10 * SEC;
  while (st.wq_bytes > 0) {
    CHECKF(loom_now() < end, "queue %zu: not drained", st.wq_bytes);
    (void)loom_fd_wait(t.peer, LOOM_FD_READ, loom_now() + 10 * CHECK_MS);
    ssize_t n = read(t.peer, sink, sizeof sink);
    if (n < 0)
      CHECK_EQ(errno, EAGAIN);
    loom_sleep(CHECK_MS / 4); /* the writer takes the room, if any */
    loom_session_stats_get(t.s, &st);
    if (st.bytes_out != out) {
      jumps++;
      if (st.bytes_out - out > most)
        most = st.bytes_out - out;
      out = st.bytes_out;
    }
  }
  printf("%d batches, the largest %llu bytes\n", jumps,
         (unsigned long long)most);
  CHECK_GE(jumps, 2);
  CHECKF(most <= WQ_HIGH / 2, "a batch of %llu bytes", (unsigned long long)most);
  slow_end(&t);
}
TEST(slow_consumer_writer_batch_is_half_of_wq_high) {
  run(batch_room_main, 2, "the writer's batches");
}

/* (d) Memory: 200 MB of attempted writes to a peer that never reads
 * costs about wq_high + one package.  Measured two ways: the bytes live
 * in loom's allocator (exact, every build), and the process RSS (plain
 * builds only: ASan's quarantine and TSan's allocator keep freed blocks
 * resident, which is not the engine's doing). */
static atomic_llong live_bytes, peak_bytes;
static atomic_llong new_blocks; /* allocations (not resizes) so far */

static void *count_realloc(void *ud, void *p, size_t n) {
  (void)ud;
  long long old = p ? (long long)malloc_usable_size(p) : 0;
  void *q = realloc(p, n ? n : 1);
  if (!q)
    return NULL;
  if (!p)
    atomic_fetch_add(&new_blocks, 1);
  long long d = (long long)malloc_usable_size(q) - old;
  long long now = atomic_fetch_add(&live_bytes, d) + d;
  long long pk = atomic_load(&peak_bytes);
  while (now > pk && !atomic_compare_exchange_weak(&peak_bytes, &pk, now)) {
  }
  return q;
}

static void count_free(void *ud, void *p) {
  (void)ud;
  atomic_fetch_sub(&live_bytes, (long long)malloc_usable_size(p));
  free(p);
}

/* run(), with loom's heap going through `realloc_fn` / `free_fn`. */
static void run_counted(void *(*realloc_fn)(void *, void *, size_t),
                        void (*free_fn)(void *, void *),
                        void (*fn)(void *), int procs, const char *what) {
  loom_allocator a = {realloc_fn, free_fn, NULL};
  loom_set_allocator(&a);
  run(fn, procs, what);
  loom_set_allocator(NULL);
}

static void slow_memory_main(void *arg) {
  (void)arg;
  slow t;
  slow_start(&t, false, 0, WQ_HIGH, 0);
  fill_until_stalled(t.s);
  long long base = atomic_load(&live_bytes);
  atomic_store(&peak_bytes, base);
  long rss0 = check_rss_mib();
  int ok = 0, refused = 0;
  for (int i = 0; i < 3200; i++) { /* 200 MiB */
    int rc = loom_session_write(t.s, big, PKG, 0);
    if (rc == 0) {
      ok++;
    } else {
      CHECK_ERR(rc, -EAGAIN);
      refused++;
    }
    if (i % 64 == 0)
      check_wq_bound(t.s);
  }
  long rss1 = check_rss_mib();
  long long grew = atomic_load(&peak_bytes) - base;
  printf("ok %d refused %d, loom heap peak +%lld KiB, rss %ld -> %ld MiB\n", ok,
         refused, grew / 1024, rss0, rss1);
  CHECK_GE(refused, 3100);
  CHECKF(grew < 4 * 1024 * 1024, "loom's heap grew by %lld bytes", grew);
  if (!CHECK_ASAN && !CHECK_TSAN)
    CHECKF(rss1 - rss0 < 32, "RSS grew from %ld to %ld MiB", rss0, rss1);
  slow_end(&t);
}
/* "read_buf: it grows to hold one package, and shrinks back": after a
 * 1 MiB package, the session's memory returns to about what it was. */
static void shrink_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&lenpfx);
  o.session.max_pkg_len = 2 << 20;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  WAIT_FOR(atomic_load(&E.opens) == 1, 5);
  loom_sleep(10 * CHECK_MS);
  long long base = atomic_load(&live_bytes);
  atomic_store(&peak_bytes, base);
  static uint8_t f[(1 << 20) + 4];
  frame(f, f + 4, 1 << 20);
  CHECK_EQ(loom_write(peer, f, sizeof f), (ssize_t)sizeof f);
  WAIT_FOR(atomic_load(&E.msgs) == 1, 5);
  uint8_t small[8];
  CHECK_EQ(loom_write(peer, small, frame(small, "x", 1)), 5);
  WAIT_FOR(atomic_load(&E.msgs) == 2, 5);
  loom_sleep(20 * CHECK_MS);
  long long grew = atomic_load(&peak_bytes) - base;
  long long now = atomic_load(&live_bytes) - base;
  printf("peak +%lld KiB, now +%lld KiB\n", grew / 1024, now / 1024);
  CHECK_GE(grew, 1 << 20); /* it did grow to hold the package */
  CHECKF(now < 64 * 1024, "still %lld bytes more than before", now);
  finish(srv, peer);
}
TEST(read_buf_shrinks_after_big_package) {
  run_counted(count_realloc, count_free, shrink_main, 2, "read buffer shrink");
}

/* The same with part of the next frame pending (2 bytes of its header)
 * as the long package is handled, as a pipelining peer leaves it: the
 * buffer grown for the long one went back only when nothing was
 * pending, so it stayed (2 MiB here) for as long as the session lived,
 * through every cron tick.  A cron tick now gives it back (not the next
 * read: a peer streaming long packages would have it shrink and grow
 * again for each), and keeps the pending bytes: the frame they begin
 * arrives whole. */
static void shrink_pending_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&lenpfx);
  o.session.max_pkg_len = 2 << 20;
  o.session.cron_period = 20 * CHECK_MS;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  WAIT_FOR(atomic_load(&E.opens) == 1, 5);
  loom_sleep(10 * CHECK_MS);
  long long base = atomic_load(&live_bytes);
  static uint8_t f[(1 << 20) + 4 + 2];
  frame(f, f + 4, 1 << 20);
  uint8_t next[8];
  frame(next, "y", 1);
  memcpy(f + (1 << 20) + 4, next, 2);
  CHECK_EQ(loom_write(peer, f, sizeof f), (ssize_t)sizeof f);
  WAIT_FOR(atomic_load(&E.msgs) == 1, 5);
  loom_sleep(100 * CHECK_MS); /* reads and cron ticks */
  long long now = atomic_load(&live_bytes) - base;
  printf("2 bytes pending: +%lld KiB\n", now / 1024);
  CHECKF(now < 64 * 1024, "still %lld bytes more than before", now);
  CHECK_EQ(loom_write(peer, next + 2, 3), 3);
  WAIT_FOR(atomic_load(&E.msgs) == 2, 5);
  finish(srv, peer);
}
TEST(read_buf_shrinks_with_the_next_frame_begun) {
  run_counted(count_realloc, count_free, shrink_pending_main, 2,
              "read buffer shrink, bytes pending");
}

/* A peer that floods long packages at a server whose pool handles them
 * slowly: a queue of the pool held 256 tasks, each a copy of a package,
 * so one peer could make the server hold queues x 256 x max_pkg_len
 * (130 MiB on one queue, 258 MiB round robin over two, with 512 KiB
 * frames sent without end; 33 MiB here, where the peer sends 64).  A
 * session's packages in the pool are bounded in bytes too (pool_high):
 * past it, the reader waits, and TCP pushes back. */
enum { FLOOD_PKG = 512 * 1024, FLOOD_N = 64 };
static atomic_int flood_fast;
static loom_wg flood_wg = LOOM_WG_INIT;
static loom_dispatch flood_dispatch;
static void flood_slow_handler(loom_session *s, const loom_pkg *pkg) {
  (void)s;
  CHECK_EQ(pkg->len, (size_t)FLOOD_PKG);
  if (!atomic_load(&flood_fast))
    loom_sleep(20 * CHECK_MS); /* a slow database call */
}
static void flood_peer(void *arg) {
  loom_conn *peer = arg;
  static uint8_t f[FLOOD_PKG + 4];
  frame(f, f + 4, FLOOD_PKG);
  for (int i = 0; i < FLOOD_N; i++)
    CHECK_EQ(loom_write(peer, f, sizeof f), (ssize_t)sizeof f);
  loom_wg_done(&flood_wg);
}
static void pool_flood_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_taskpool *pool;
  loom_taskpool_opts po = {.queues = 2, .workers = 1};
  CHECK_OK(loom_taskpool_make(&pool, &po));
  loom_server_opts o = server_opts(&lenpfx);
  o.session.pool = pool;
  o.session.dispatch = flood_dispatch;
  E.msg = flood_slow_handler;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  WAIT_FOR(atomic_load(&E.opens) == 1, 5);
  loom_sleep(10 * CHECK_MS);
  long long base = atomic_load(&live_bytes);
  atomic_store(&peak_bytes, base);
  loom_wg_add(&flood_wg, 1);
  CHECK_OK(loom_go(flood_peer, peer));
  loom_sleep(500 * CHECK_MS);
  long long grew = atomic_load(&peak_bytes) - base;
  int slowly = atomic_load(&E.msgs);
  atomic_store(&flood_fast, 1); /* let the rest through */
  CHECK_OK(loom_wg_wait(&flood_wg, 0));
  WAIT_FOR(atomic_load(&E.msgs) == FLOOD_N, 10); /* every one, whole */
  printf("%d handled slowly, loom heap peak +%lld KiB\n", slowly, grew / 1024);
  CHECK_GE(slowly, 5);       /* the pool did work */
  CHECK_LT(slowly, FLOOD_N); /* and the peer was ahead of it */
  /* pool_high (1 MiB) and one package more in the pool, a read buffer
   * grown for one package, and the session's own. */
  CHECKF(grew < 4 * 1024 * 1024, "one peer made the heap grow %lld KiB",
         grew / 1024);
  finish(srv, peer);
  loom_taskpool_close(pool);
}
TEST(pool_holds_a_bounded_share_of_a_flooding_peer) {
  run_counted(count_realloc, count_free, pool_flood_main, 2,
              "a peer floods a slow pool");
}
TEST(pool_holds_a_bounded_share_of_a_flooding_peer_round_robin) {
  flood_dispatch = LOOM_DISPATCH_ROUND_ROBIN;
  run_counted(count_realloc, count_free, pool_flood_main, 2,
              "a peer floods a slow pool, round robin");
}

/* Send one frame of n payload bytes and read its echo back, byte-exact. */
static void echo_once(loom_conn *peer, size_t n, uint8_t seed) {
  static uint8_t f[8192], back[8192];
  CHECK_LE(n + 4, sizeof f);
  for (size_t i = 0; i < n; i++)
    f[4 + i] = (uint8_t)(seed + i * 7);
  put_be32(f, (uint32_t)n);
  CHECK_EQ(loom_write(peer, f, n + 4), (ssize_t)(n + 4));
  conn_read_full(peer, back, n + 4);
  CHECK(memcmp(f, back, n + 4) == 0);
}

/* A session whose packages are small reads them on the reader's stack:
 * it holds no read buffer at all, before, during or after such traffic.
 * A pipelined burst takes a heap buffer, and the quiet reads after it
 * give it back.  read_buf is set to an odd size (3000 bytes) and the
 * allocator keeps the blocks asked for with exactly that size, so what
 * the runtime allocates now and then (a slab of poll descriptors, a
 * timer heap) does not blur the count. */
#define ODD_READ_BUF 3000
static pthread_mutex_t odd_mu = PTHREAD_MUTEX_INITIALIZER;
static void *odd_blocks[64];
static int odd_live;

static void odd_forget(void *p) {
  for (int i = 0; i < 64; i++)
    if (p != NULL && odd_blocks[i] == p) {
      odd_blocks[i] = NULL;
      odd_live--;
    }
}

static void *odd_realloc(void *ud, void *p, size_t n) {
  pthread_mutex_lock(&odd_mu);
  void *q = count_realloc(ud, p, n);
  if (q != NULL) {
    odd_forget(p);
    for (int i = 0; n == ODD_READ_BUF && i < 64; i++)
      if (odd_blocks[i] == NULL) {
        odd_blocks[i] = q;
        odd_live++;
        break;
      }
  }
  pthread_mutex_unlock(&odd_mu);
  return q;
}

static void odd_free(void *ud, void *p) {
  pthread_mutex_lock(&odd_mu);
  odd_forget(p);
  count_free(ud, p);
  pthread_mutex_unlock(&odd_mu);
}

static int odd_count(void) {
  pthread_mutex_lock(&odd_mu);
  int n = odd_live;
  pthread_mutex_unlock(&odd_mu);
  return n;
}

static void no_read_buffer_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&lenpfx);
  o.session.read_buf = ODD_READ_BUF;
  E.echo = true;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  WAIT_FOR(atomic_load(&E.opens) == 1, 5);
  for (int i = 0; i < 20; i++)
    echo_once(peer, 64, (uint8_t)i);
  int idle = odd_count();

  /* 64 frames of 1000 bytes in one write: the reads fill their room. */
  static uint8_t burst[64 * 1004], back[64 * 1004];
  for (int k = 0; k < 64; k++) {
    put_be32(burst + k * 1004, 1000);
    memset(burst + k * 1004 + 4, 'a' + k % 26, 1000);
  }
  long long before = atomic_load(&live_bytes);
  atomic_store(&peak_bytes, before);
  CHECK_EQ(loom_write(peer, burst, sizeof burst), (ssize_t)sizeof burst);
  conn_read_full(peer, back, sizeof back);
  CHECK(memcmp(burst, back, sizeof burst) == 0);
  long long grew = atomic_load(&peak_bytes) - before;
  for (int i = 0; i < 20; i++) /* quiet again: small reads in a row */
    echo_once(peer, 64, (uint8_t)i);
  loom_sleep(10 * CHECK_MS);
  int after = odd_count();
  long long kept = atomic_load(&live_bytes) - before;
  printf("read buffers while idle: %d; the burst took +%lld B; after it "
         "%d read buffers, %+lld B\n",
         idle, grew, after, kept);
  CHECKF(idle == 0, "an idle session holds %d read buffer(s)", idle);
  CHECK_GE(grew, ODD_READ_BUF); /* the burst did take a heap buffer */
  /* Given back: not just the read_buf-sized block, but what it grew to
   * (a realloc away from ODD_READ_BUF bytes). */
  CHECKF(after == 0 && kept < 2048,
         "after the burst: %d read buffer(s), %lld bytes more", after, kept);
  CHECK_EQ(atomic_load(&E.echo_fail), 0);
  finish(srv, peer);
}
TEST(idle_session_holds_no_read_buffer) {
  run_counted(odd_realloc, odd_free, no_read_buffer_main, 2,
              "no read buffer while idle");
}

/* Frames of every size around the stack buffer and read_buf, each sent
 * in pieces with pauses between them, so that reads end inside headers
 * and payloads: whatever a read on the stack leaves pending must move to
 * the heap intact. */
static void split_frames_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&lenpfx);
  E.echo = true;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  static const size_t sizes[] = {0,   1,   3,   250, 254,  255,  256,  500,
                                 506, 507, 508, 509, 512,  700,  1020, 1021,
                                 2000, 4090, 4092, 4093, 5000, 64,   0,   508};
  static uint8_t f[8192], back[8192];
  uint64_t x = 88172645463325252ULL;
  for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
    size_t n = sizes[k];
    for (size_t i = 0; i < n; i++)
      f[4 + i] = (uint8_t)(k * 31 + i);
    put_be32(f, (uint32_t)n);
    size_t sent = 0;
    while (sent < n + 4) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      size_t piece = 1 + (size_t)(x % 600);
      if (piece > n + 4 - sent)
        piece = n + 4 - sent;
      CHECK_EQ(loom_write(peer, f + sent, piece), (ssize_t)piece);
      sent += piece;
      loom_sleep(200000); /* let the server read what is there so far */
    }
    conn_read_full(peer, back, n + 4);
    CHECKF(memcmp(f, back, n + 4) == 0, "frame of %zu bytes came back changed",
           n);
  }
  CHECK_EQ(atomic_load(&E.msgs), (int)(sizeof sizes / sizeof sizes[0]));
  CHECK_EQ(atomic_load(&E.echo_fail), 0);
  finish(srv, peer);
}
TEST(frames_split_around_the_stack_buffer) {
  run(split_frames_main, 2, "split frames");
}

TEST(slow_consumer_memory_bound) {
  run_counted(count_realloc, count_free, slow_memory_main, 2, "memory bound");
}

/* ------------------------------------------------------------------ */
/* 2. Cron and idle.                                                    */

/* on_cron runs every cron_period on an idle session, and not more
 * often; the session stays open. */
static void cron_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&line);
  o.session.cron_period = 20 * CHECK_MS;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  WAIT_FOR(atomic_load(&E.opens) == 1, 5);
  WAIT_FOR(atomic_load(&E.crons) >= 5, 5);
  loom_sleep(100 * CHECK_MS);
  int n = atomic_load(&E.crons);
  int64_t el = loom_now() - atomic_load(&E.opened_at);
  CHECKF(n <= el / (20 * CHECK_MS) + 1, "%d crons in %lld ms", n,
         (long long)(el / CHECK_MS));
  CHECK_EQ(atomic_load(&E.errs), 0);
  CHECK_EQ(atomic_load(&E.closes), 0);
  CHECK_EQ(atomic_load(&E.msgs), 0);
  CHECK_OK(loom_close(peer)); /* end of stream: a graceful close */
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  CHECK_EQ(atomic_load(&E.errs), 0);
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}
TEST(cron_on_idle_session) { run(cron_main, 2, "cron"); }

/* read_timeout with a silent peer: on_error(-ETIMEDOUT), on_close, one
 * timeout counted; the peer sees the end of the stream. */
static void idle_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&line);
  o.session.read_timeout = 100 * CHECK_MS;
  char addr[128];
  loom_server *srv = serve(&o, addr);
  loom_conn *peer;
  int64_t t0 = loom_now();
  CHECK_OK(loom_dial(&peer, "tcp", addr));
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  CHECK_GE(loom_now() - t0, 50 * CHECK_MS);
  CHECK_EQ(atomic_load(&E.errs), 1);
  CHECK_ERR(atomic_load(&E.err), -ETIMEDOUT);
  loom_metrics m = metrics(srv);
  CHECK_EQ(m.errors.timeout, 1);
  CHECK_EQ(m.errors.other, 0);
  conn_expect_eof(peer);
  CHECK_OK(loom_close(peer));
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}
TEST(read_timeout_silent_peer) { run(idle_main, 2, "read timeout"); }

/* Cron wake-ups do not count as reads: with cron much shorter than
 * read_timeout, a silent peer still times out. */
static void cron_idle_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&line);
  o.session.read_timeout = 150 * CHECK_MS;
  o.session.cron_period = 20 * CHECK_MS;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  CHECK_ERR(atomic_load(&E.err), -ETIMEDOUT);
  CHECK_GE(atomic_load(&E.crons), 2);
  CHECK_EQ(metrics(srv).errors.timeout, 1);
  CHECK_OK(loom_close(peer));
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}
TEST(cron_does_not_defer_read_timeout) { run(cron_idle_main, 2, "cron+idle"); }

/* Cron and read timeout changed while the session runs, from outside
 * its reader: a session that had neither gets on_cron, then none again,
 * then times out on its silent peer. */
static void retime_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&line);
  E.keep = true;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  loom_session *s = kept_session();
  CHECK_ERR(loom_session_set_cron_period(s, -1), -EINVAL);
  CHECK_OK(loom_session_set_cron_period(s, 10 * CHECK_MS));
  WAIT_FOR(atomic_load(&E.crons) >= 3, 5);
  CHECK_OK(loom_session_set_cron_period(s, 0));
  loom_sleep(20 * CHECK_MS); /* a tick under way may still land */
  int n = atomic_load(&E.crons);
  loom_sleep(100 * CHECK_MS);
  CHECK_EQ(atomic_load(&E.crons), n);
  CHECK_EQ(atomic_load(&E.closes), 0);
  int64_t t0 = loom_now();
  CHECK_OK(loom_session_set_read_timeout(s, 50 * CHECK_MS));
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  CHECK_GE(loom_now() - t0, 50 * CHECK_MS); /* counted from the change */
  CHECK_ERR(atomic_load(&E.err), -ETIMEDOUT);
  CHECK_ERR(loom_session_set_read_timeout(s, 0), LOOM_ECLOSED);
  loom_session_unref(s);
  conn_expect_eof(peer);
  CHECK_OK(loom_close(peer));
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}
TEST(timeouts_changed_while_running) { run(retime_main, 2, "retime"); }

/* The same from a plain thread of the application's own. */
static void *retime_thread(void *arg) {
  loom_session *s = arg;
  CHECK_OK(loom_session_set_cron_period(s, 10 * CHECK_MS));
  return NULL;
}
static void retime_thread_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&line);
  E.keep = true;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  loom_session *s = kept_session();
  pthread_t th;
  CHECK_EQ(pthread_create(&th, NULL, retime_thread, s), 0);
  loom_block_enter();
  pthread_join(th, NULL);
  loom_block_exit();
  WAIT_FOR(atomic_load(&E.crons) >= 3, 5);
  CHECK_OK(loom_close(peer));
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  loom_session_unref(s);
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}
TEST(cron_period_set_from_a_thread) {
  run(retime_thread_main, 2, "retime thread");
}

/* read_timeout turned off just as the reader's idle check comes due, in
 * the window between its look at pending changes and the check (a test
 * hook makes the change there, as a reader preempted at that point would
 * let another thread make it): the check still measures the peer's
 * silence against the timeout it was armed with, so a peer that talks
 * every 2 ms is not idle, and the session stays open, now without a
 * timeout, instead of closing with -ETIMEDOUT at once. */
static atomic_int window_hits;
static void idle_window(loom_session *s) {
  if (atomic_fetch_add(&window_hits, 1) == 0)
    CHECK_OK(loom_session_set_read_timeout(s, 0));
}
static void idle_window_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&line);
  o.session.read_timeout = 30 * CHECK_MS;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  WAIT_FOR(atomic_load(&E.opens) == 1, 5);
  atomic_store(&loom__test_idle_window, idle_window);
  int64_t t0 = loom_now();
  /* Until the check has come and gone twice the old timeout. */
  while (atomic_load(&window_hits) == 0 || loom_now() - t0 < 100 * CHECK_MS) {
    CHECK_EQ(loom_write(peer, "x\n", 2), 2);
    loom_sleep(2 * CHECK_MS);
    CHECK(loom_now() - t0 < 5 * SEC);
  }
  atomic_store(&loom__test_idle_window, NULL);
  CHECK_EQ(atomic_load(&window_hits), 1); /* no timeout, no check since */
  CHECK_EQ(atomic_load(&E.errs), 0);
  CHECK_EQ(atomic_load(&E.closes), 0);
  loom_sleep(60 * CHECK_MS); /* silent now, with no timeout: still open */
  CHECK_EQ(atomic_load(&E.closes), 0);
  CHECK_OK(loom_close(peer));
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  CHECK_EQ(atomic_load(&E.errs), 0);
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}
TEST(read_timeout_turned_off_as_the_idle_check_comes) {
  run(idle_window_main, 2, "read timeout off in the idle check's window");
}

/* A cron that sets its own period at every tick (a heartbeat that
 * adjusts itself) does not defer the read timeout either: a silent
 * peer still times out. */
static void recron(loom_session *s) {
  ev_cron(s);
  CHECK_OK(loom_session_set_cron_period(s, 20 * CHECK_MS));
}
static const loom_session_listener recron_listener = {
    .on_open = ev_open,
    .on_message = ev_message,
    .on_cron = recron,
    .on_error = ev_error,
    .on_close = ev_close,
};
static void recron_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&line);
  o.session.listener = &recron_listener;
  o.session.read_timeout = 150 * CHECK_MS;
  o.session.cron_period = 20 * CHECK_MS;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  CHECK_ERR(atomic_load(&E.err), -ETIMEDOUT);
  CHECK_GE(atomic_load(&E.crons), 2);
  CHECK_OK(loom_close(peer));
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}
TEST(cron_period_set_does_not_defer_read_timeout) {
  run(recron_main, 2, "cron period set from on_cron");
}

/* A peer that sends more often than read_timeout is not closed; once it
 * stops, it is. */
static void busy_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&line);
  o.session.read_timeout = 250 * CHECK_MS;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  int sent = 0;
  int64_t end = loom_now() + 750 * CHECK_MS;
  while (loom_now() < end) {
    CHECK_EQ(loom_write(peer, "x\n", 2), 2);
    sent++;
    loom_sleep(10 * CHECK_MS);
  }
  WAIT_FOR(atomic_load(&E.msgs) == sent, 5);
  CHECK_EQ(atomic_load(&E.errs), 0);
  CHECK_EQ(atomic_load(&E.closes), 0);
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  CHECK_ERR(atomic_load(&E.err), -ETIMEDOUT);
  CHECK_OK(loom_close(peer));
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}
TEST(read_timeout_spares_busy_peer) { run(busy_main, 2, "busy peer"); }

/* ------------------------------------------------------------------ */
/* 3. write_timeout and linger.                                         */

/* A peer that never reads: queued bytes cannot be written within
 * write_timeout, the session aborts with -ETIMEDOUT. */
static void wto_main(void *arg) {
  (void)arg;
  slow t;
  slow_start(&t, false, 100 * CHECK_MS, 4 << 20, 0);
  int64_t t0 = loom_now();
  for (int i = 0; i < 12; i++) { /* 768 KiB: far over the socket buffers */
    int rc = loom_session_write(t.s, big, PKG, 0);
    if (rc == LOOM_ECLOSED)
      break; /* timed out already */
    CHECK_OK(rc);
  }
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  CHECK_GE(loom_now() - t0, 50 * CHECK_MS);
  CHECK_EQ(atomic_load(&E.errs), 1);
  CHECK_ERR(atomic_load(&E.err), -ETIMEDOUT);
  CHECK_EQ(metrics(t.srv).errors.timeout, 1);
  CHECK_ERR(loom_session_write(t.s, "x", 1, 0), LOOM_ECLOSED);
  slow_end(&t);
}
TEST(write_timeout_never_reading_peer) { run(wto_main, 2, "write timeout"); }

/* What a batch cut short by the write timeout sent before the cut is in
 * bytes_out: the peer, reading to the end, gets exactly that many. */
static void wto_count_main(void *arg) {
  (void)arg;
  slow t;
  slow_start(&t, false, 100 * CHECK_MS, 4 << 20, 0);
  for (int i = 0; i < 12; i++) { /* 768 KiB: far over the socket buffers */
    int rc = loom_session_write(t.s, big, PKG, 0);
    if (rc == LOOM_ECLOSED)
      break;
    CHECK_OK(rc);
  }
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  CHECK_ERR(atomic_load(&E.err), -ETIMEDOUT);
  static uint8_t sink[1 << 16];
  uint64_t got = 0;
  int64_t end = loom_now() + 10 * SEC;
  for (;;) {
    ssize_t k = recv(t.peer, sink, sizeof sink, 0);
    if (k > 0) {
      got += (uint64_t)k;
      continue;
    }
    if (k == 0)
      break; /* the session's close */
    CHECK_EQ(errno, EAGAIN);
    CHECK_LT(loom_now(), end);
    CHECK_OK(loom_fd_wait(t.peer, LOOM_FD_READ, end));
  }
  loom_mutex_lock(&final_mu);
  uint64_t counted = E.final.bytes_out;
  loom_mutex_unlock(&final_mu);
  printf("the peer got %llu bytes; bytes_out %llu\n", (unsigned long long)got,
         (unsigned long long)counted);
  CHECK_EQ(counted, got);
  slow_end(&t);
}
TEST(write_timeout_counts_what_went_out) {
  run(wto_count_main, 2, "write timeout count");
}

/* A write timeout set while the writer is stuck in a batch that had
 * none: the batch gets it, and the session aborts with -ETIMEDOUT. */
static void wto_set_main(void *arg) {
  (void)arg;
  slow t;
  slow_start(&t, false, 0, 4 << 20, 0);
  for (int i = 0; i < 12; i++) /* 768 KiB: far over the socket buffers */
    CHECK_OK(loom_session_write(t.s, big, PKG, 0));
  loom_sleep(50 * CHECK_MS); /* the writer waits, with no deadline */
  CHECK_EQ(atomic_load(&E.closes), 0);
  CHECK_ERR(loom_session_set_write_timeout(t.s, -1), -EINVAL);
  CHECK_OK(loom_session_set_write_timeout(t.s, 100 * CHECK_MS));
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  CHECK_ERR(atomic_load(&E.err), -ETIMEDOUT);
  CHECK_EQ(metrics(t.srv).errors.timeout, 1);
  CHECK_ERR(loom_session_set_write_timeout(t.s, 0), LOOM_ECLOSED);
  slow_end(&t);
}
TEST(write_timeout_set_on_a_stuck_writer) {
  run(wto_set_main, 2, "write timeout set");
}

/* A peer that reads steadily, a little every 10 ms, is never kept
 * waiting anywhere near write_timeout (200 ms) for room, so the session
 * must not time out even though draining the whole queue takes several
 * times write_timeout ("ns a write of queued bytes may wait for the
 * socket").
 *
 * Unless the host takes the CPUs away: a 64 KiB batch needs some 40 ms
 * of the reader's turns, and two or three stalls of tens of ms inside
 * one 200 ms window leave it less than that.  A timeout whose last
 * 250 ms the process spent more than 100 ms of frozen
 * (check_stalled_ns) is the host's doing, and the round is run again,
 * a few times at most; a timeout while the process ran fails. */
static atomic_int steady_done, steady_stop, steady_exited;
static _Atomic int64_t steady_closed_at;
static void steady_reader(void *arg) {
  int fd = *(int *)arg;
  static uint8_t buf[32768];
  size_t want = 3u << 20, got = 0;
  while (got < want && !atomic_load(&steady_stop)) {
    ssize_t k = recv(fd, buf, sizeof buf, 0);
    if (k > 0) {
      got += (size_t)k;
      loom_sleep(10 * CHECK_MS);
      continue;
    }
    if (atomic_load(&E.closes) > 0 && (k == 0 || errno == ECONNRESET))
      break; /* the session timed out under us: the main coroutine judges */
    CHECKF(k < 0 && errno == EAGAIN, "recv %zd after %zu bytes: %s", k, got,
           strerror(errno));
    CHECK_OK(loom_fd_wait(fd, LOOM_FD_READ, loom_now() + 5 * SEC));
  }
  atomic_store(&steady_done, got >= want);
  atomic_store(&steady_exited, 1);
}

static void steady_close(loom_session *s) {
  (void)s;
  atomic_store(&steady_closed_at, loom_now());
}

static void wto_steady_main(void *arg) {
  (void)arg;
  for (int attempt = 1;; attempt++) {
    memset(&E, 0, sizeof E);
    E.close = steady_close;
    atomic_store(&steady_done, 0);
    atomic_store(&steady_stop, 0);
    atomic_store(&steady_exited, 0);
    slow t;
    slow_start(&t, false, 200 * CHECK_MS, 8 << 20, 0);
    /* 3 MiB: 48 packages of 64 KiB (with their 4-byte headers, a little
     * over; the reader stops at 3 MiB). */
    for (int i = 0; i < 48; i++)
      CHECK_OK(loom_session_write(t.s, big, PKG, 0));
    CHECK_OK(loom_go(steady_reader, &t.peer));
    WAIT_FOR(atomic_load(&steady_done) || atomic_load(&E.closes) > 0, 20);
    atomic_store(&steady_stop, 1);
    WAIT_FOR(atomic_load(&steady_exited), 10);
    if (atomic_load(&E.errs) != 0 && atomic_load(&E.err) == -ETIMEDOUT &&
        attempt < 5) {
      int64_t at = atomic_load(&steady_closed_at);
      int64_t stalled = check_stalled_ns(at - 250 * CHECK_MS, at);
      if (stalled > 100 * CHECK_MS) {
        printf("attempt %d: timed out, the process stalled %.0f ms of the last "
               "250: again\n",
               attempt, stalled / 1e6);
        slow_end(&t);
        continue;
      }
    }
    CHECKF(atomic_load(&E.errs) == 0,
           "session closed with %s while the peer "
           "was reading",
           loom_err_name(atomic_load(&E.err)));
    CHECK(atomic_load(&steady_done));
    slow_end(&t);
    return;
  }
}
TEST(write_timeout_spares_reading_peer) {
  check_stall_start();
  run(wto_steady_main, 2, "steady reader");
}

/* Read exactly n bytes from a raw non-blocking socket (within 10 s). */
static void raw_read_full(int fd, uint8_t *p, size_t n) {
  int64_t end = loom_now() + 10 * SEC;
  while (n > 0) {
    ssize_t k = recv(fd, p, n, 0);
    if (k > 0) {
      p += k;
      n -= (size_t)k;
      continue;
    }
    CHECKF(k < 0 && errno == EAGAIN, "recv %zd with %zu bytes to go: %s", k, n,
           strerror(errno));
    CHECK_OK(loom_fd_wait(fd, LOOM_FD_READ, end));
  }
}

/* A write timeout set on a batch under way and then turned off again
 * while the writer is idle: the next batch has no deadline.  The peer
 * takes a pause well past the old timeout before it reads that batch,
 * and everything arrives; the session is not timed out. */
enum { WTO_PKG = 512 * 1024 };
static uint8_t wto_pkg[WTO_PKG], wto_got[WTO_PKG + 4];
static void wto_off_main(void *arg) {
  (void)arg;
  slow t;
  slow_start(&t, false, 0, 4 << 20, 0);
  for (size_t i = 0; i < WTO_PKG; i++)
    wto_pkg[i] = (uint8_t)(i * 31 + 7);
  /* One package far over the socket buffers: its rest is the writer's
   * one batch, stuck without a deadline. */
  CHECK_OK(loom_session_write(t.s, wto_pkg, WTO_PKG, 0));
  loom_sleep(50 * CHECK_MS);
  CHECK_OK(loom_session_set_write_timeout(t.s, 300 * CHECK_MS));
  raw_read_full(t.peer, wto_got, WTO_PKG + 4); /* the batch completes */
  CHECK(memcmp(wto_got + 4, wto_pkg, WTO_PKG) == 0);
  loom_session_stats st;
  for (;;) { /* the writer is idle */
    loom_session_stats_get(t.s, &st);
    if (st.wq_bytes == 0)
      break;
    loom_sleep(CHECK_MS);
  }
  CHECK_OK(loom_session_set_write_timeout(t.s, 0));
  CHECK_OK(loom_session_write(t.s, wto_pkg, WTO_PKG, 0));
  loom_sleep(600 * CHECK_MS); /* twice the old timeout, not reading */
  CHECKF(atomic_load(&E.closes) == 0, "the session closed with %s",
         loom_err_name(atomic_load(&E.err)));
  raw_read_full(t.peer, wto_got, WTO_PKG + 4);
  CHECK(memcmp(wto_got + 4, wto_pkg, WTO_PKG) == 0);
  CHECK_EQ(atomic_load(&E.closes), 0);
  slow_end(&t);
}
TEST(write_timeout_turned_off_stays_off) {
  run(wto_off_main, 2, "write timeout off");
}

/* A graceful close with bytes queued for a peer that never reads and a
 * writer parked in its write (the state of a session whose peer has
 * stalled for a while): the session ends with `linger` > 0 after writing
 * "for at most linger", with `linger` < 0 at once, dropping the queue. */
static void linger_case(int64_t linger, const char *what) {
  slow t;
  slow_start(&t, false, 0, 4 << 20, linger);
  for (int i = 0; i < 8; i++)
    CHECK_OK(loom_session_write(t.s, big, PKG, 0));
  loom_sleep(100 * CHECK_MS); /* the writer meets the full socket */
  int64_t t0 = loom_now();
  loom_session_close(t.s);
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  int64_t took = loom_now() - t0;
  printf("on_close %lld ms after close (%s), on_error %s\n",
         (long long)(took / CHECK_MS), what,
         loom_err_name(atomic_load(&E.err)));
  if (linger > 0) {
    CHECKF(took >= linger - 10 * CHECK_MS,
           "on_close %lld ms after close: linger %lld ms not spent writing",
           (long long)(took / CHECK_MS), (long long)(linger / CHECK_MS));
  } else {
    CHECKF(took < 2000 * CHECK_MS, "a dropping close took %lld ms",
           (long long)(took / CHECK_MS));
    CHECK_EQ(atomic_load(&E.errs), 0);
  }
  /* Either way the peer never took them all: what did not leave whole
   * is dropped, and counted so. */
  CHECK_GT(E.final.pkgs_dropped, 0);
  CHECK_EQ(E.final.pkgs_out + E.final.pkgs_dropped, 8);
  CHECK_EQ(E.final.pkgs_out, E.final.bytes_out / (PKG + 4));
  slow_end(&t);
}

static void linger_main(void *arg) {
  (void)arg;
  linger_case(200 * CHECK_MS, "linger 200 ms");
}
TEST(linger_bounds_graceful_close) { run(linger_main, 2, "linger"); }

static void linger_drop_main(void *arg) {
  (void)arg;
  linger_case(-1, "linger < 0");
}
TEST(linger_negative_drops_queue) { run(linger_drop_main, 2, "linger < 0"); }

/* A graceful close while on_message waits for room (timeout < 0) to a
 * peer that never reads: the wait ends within the linger with
 * LOOM_ECLOSED, and the close ends.  The reader (or the pooled handler
 * the reader waits for) was held in that wait for ever, and so was the
 * close.  On the reader, and in a task pool (arg non-NULL). */
static atomic_int flood_rc = 1;
static void flood_reply(loom_session *s, const loom_pkg *pkg) {
  (void)pkg;
  int rc = 0;
  for (int i = 0; i < 1024 && rc == 0; i++)
    rc = loom_session_write(s, big, PKG, -1);
  atomic_store(&flood_rc, rc);
}
static void close_room_main(void *arg) {
  if (arg != NULL) {
    loom_taskpool_opts po = {.queues = 1, .workers = 1};
    CHECK_OK(loom_taskpool_make(&slow_pool, &po));
  }
  slow t;
  slow_start(&t, false, 0, WQ_HIGH, 200 * CHECK_MS);
  E.msg = flood_reply;
  static const uint8_t ping[] = {0, 0, 0, 4, 'p', 'i', 'n', 'g'};
  CHECK_EQ(write(t.peer, ping, sizeof ping), (ssize_t)sizeof ping);
  loom_session_stats st;
  do { /* the reply waits for room */
    loom_sleep(10 * CHECK_MS);
    loom_session_stats_get(t.s, &st);
  } while (st.wq_bytes < (size_t)WQ_HIGH);
  loom_sleep(50 * CHECK_MS);
  CHECK_EQ(atomic_load(&flood_rc), 1);
  loom_session_close(t.s);
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  CHECK_ERR(atomic_load(&flood_rc), LOOM_ECLOSED);
  CHECK_EQ(metrics(t.srv).errors.wq_full, 0);
  E.msg = NULL;
  slow_end(&t);
  if (slow_pool != NULL) {
    loom_taskpool_close(slow_pool);
    slow_pool = NULL;
  }
}
TEST(graceful_close_bounds_a_reply_waiting_for_room) {
  run(close_room_main, 2, "close vs a reply waiting for room");
}
static void close_room_pooled_main(void *arg) {
  (void)arg;
  close_room_main(&slow_pool);
}
TEST(graceful_close_bounds_a_pooled_reply_waiting_for_room) {
  run(close_room_pooled_main, 2, "close vs a pooled reply waiting for room");
}

/* loom_server_close with a deadline, and a session that cannot finish
 * (its peer never reads what is queued): at the deadline it is aborted
 * with LOOM_ECLOSED and the close returns -ETIMEDOUT. */
static void server_deadline_main(void *arg) {
  (void)arg;
  slow t;
  slow_start(&t, false, 0, WQ_HIGH, 0);
  fill_until_stalled(t.s);
  int64_t t0 = loom_now();
  CHECK_ERR(loom_server_close(t.srv, loom_now() + 200 * CHECK_MS), -ETIMEDOUT);
  int64_t el = loom_now() - t0;
  CHECKF(el >= 100 * CHECK_MS && el < 5 * SEC, "close took %lld ms",
         (long long)(el / CHECK_MS));
  CHECK_EQ(atomic_load(&E.closes), 1);
  CHECK_EQ(atomic_load(&E.errs), 1);
  CHECK_ERR(atomic_load(&E.err), LOOM_ECLOSED);
  CHECK(loom_session_closed(t.s));
  loom_session_unref(t.s);
  close(t.peer);
}
TEST(server_close_deadline_aborts_stalled_session) {
  run(server_deadline_main, 2, "server close deadline");
}

/* A graceful close writes everything queued before the socket closes. */
static void flush_main(void *arg) {
  (void)arg;
  codecs_init();
  for (size_t i = 0; i < PKG; i++)
    big[i] = (uint8_t)(i * 13 + 5);
  loom_server_opts o = server_opts(&lenpfx);
  o.session.wq_high = 4 << 20;
  E.keep = true;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  loom_session *s = kept_session();
  for (int i = 0; i < 16; i++) {
    big[0] = (uint8_t)i;
    CHECK_OK(loom_session_write(s, big, PKG, 0));
  }
  loom_session_close(s);
  static uint8_t got[PKG + 4];
  for (int i = 0; i < 16; i++) {
    conn_read_full(peer, got, PKG + 4);
    CHECK_EQ(get_be32(got), PKG);
    CHECK_EQ(got[4], i);
    CHECK(memcmp(got + 5, big + 1, PKG - 1) == 0);
  }
  conn_expect_eof(peer);
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  CHECK_EQ(atomic_load(&E.errs), 0);
  CHECK_EQ(E.final.bytes_out, 16 * (PKG + 4));
  CHECK_EQ(E.final.pkgs_out, 16);
  CHECK_EQ(E.final.wq_bytes, 0);
  loom_session_unref(s);
  CHECK_OK(loom_close(peer));
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}
TEST(graceful_close_flushes_queue) { run(flush_main, 2, "flush"); }

/* pkgs_out counts the packages that left, not those queued: an abort
 * drops what the socket has not taken, and the packages dropped (in
 * whole or in part) are counted in pkgs_dropped instead.  Packages of 1000
 * bytes: the first ones go out from the write, one is cut short there and
 * queued, the rest wait in the queue, and the writer is parked in a batch when
 * the abort comes.  The peer then reads what left: bytes_out bytes, of which
 * pkgs_out whole packages. */
enum { CUT_PKG = 1000, CUT_N = 300 };
static void abort_counts_main(void *arg) {
  (void)arg;
  slow t;
  slow_start(&t, false, 0, 4 << 20, LONG_LINGER_S * SEC);
  for (int i = 0; i < CUT_N; i++)
    CHECK_OK(loom_session_write(t.s, big, CUT_PKG, 0));
  loom_sleep(100 * CHECK_MS); /* the writer meets the full socket */
  loom_session_stats st;
  loom_session_stats_get(t.s, &st);
  CHECK_GT(st.wq_bytes, 0);
  CHECK_LE(st.pkgs_out, CUT_N);
  loom_session_abort(t.s, -ECANCELED);
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  loom_metrics m;
  WAIT_FOR((loom_server_metrics(t.srv, &m), m.sessions_open == 0), 5);
  uint64_t whole = E.final.bytes_out / (CUT_PKG + 4);
  printf("%llu bytes left of %d packages queued: %llu whole, pkgs_out %llu\n",
         (unsigned long long)E.final.bytes_out, CUT_N,
         (unsigned long long)whole, (unsigned long long)E.final.pkgs_out);
  CHECK_GT(whole, 0);
  CHECK_LT(whole, CUT_N);
  CHECK_EQ(E.final.pkgs_out, whole);
  CHECK_EQ(E.final.pkgs_dropped, CUT_N - whole);
  CHECK_EQ(E.final.wq_bytes, 0);
  CHECK_EQ(m.pkgs_out, whole);
  CHECK_EQ(m.pkgs_dropped, CUT_N - whole);
  CHECK_EQ(m.bytes_out, E.final.bytes_out);
  /* The peer gets exactly that much, then the end of the stream. */
  static uint8_t buf[PKG];
  uint64_t got = 0;
  for (;;) {
    ssize_t k = read(t.peer, buf, sizeof buf);
    if (k > 0) {
      got += (uint64_t)k;
      continue;
    }
    if (k < 0 && errno == EAGAIN) {
      CHECK_OK(loom_fd_wait(t.peer, LOOM_FD_READ, loom_now() + 5 * SEC));
      continue;
    }
    CHECKF(k == 0, "read: %s", strerror(errno));
    break;
  }
  CHECK_EQ(got, E.final.bytes_out);
  slow_end(&t);
}
TEST(abort_leaves_dropped_packages_out_of_pkgs_out) {
  run(abort_counts_main, 2, "pkgs_out after an abort");
}

/* ------------------------------------------------------------------ */
/* 4. Oversized, malformed and truncated input.                         */

/* One on_error(want) and one on_close, and they stay at one; the peer
 * sees the end of the stream. */
static void expect_error(loom_conn *peer, int want) {
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  CHECK_EQ(atomic_load(&E.errs), 1);
  CHECK_ERR(atomic_load(&E.err), want);
  conn_expect_eof(peer);
  loom_sleep(20 * CHECK_MS);
  CHECK_EQ(atomic_load(&E.closes), 1);
  CHECK_EQ(atomic_load(&E.errs), 1);
}

static uint8_t last_msg[8192];
static atomic_size_t last_len;
static void keep_last(loom_session *s, const loom_pkg *pkg) {
  (void)s;
  CHECK_LE(pkg->len, sizeof last_msg);
  memcpy(last_msg, pkg->data, pkg->len);
  atomic_store(&last_len, pkg->len);
}

/* lenpfx, max_pkg_len 1024: a package of exactly 1024 passes; a header
 * declaring 2000 closes with -EMSGSIZE at once, without its payload. */
static void oversize_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&lenpfx);
  o.session.max_pkg_len = 1024;
  E.msg = keep_last;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  uint8_t buf[1028], payload[1024];
  memset(payload, 'p', sizeof payload);
  CHECK_EQ(loom_write(peer, buf, frame(buf, payload, 1024)), 1028);
  WAIT_FOR(atomic_load(&E.msgs) == 1, 5);
  CHECK_EQ(atomic_load(&last_len), 1024);
  uint8_t hdr[4];
  put_be32(hdr, 2000);
  CHECK_EQ(loom_write(peer, hdr, 4), 4); /* and nothing more */
  expect_error(peer, -EMSGSIZE);
  CHECK_EQ(atomic_load(&E.msgs), 1);
  loom_metrics m = metrics(srv);
  CHECK_EQ(m.errors.oversize, 1);
  CHECK_EQ(m.errors.decode, 0);
  CHECK_EQ(m.errors.other, 0);
  finish(srv, peer);
}
TEST(lenpfx_header_over_max_closes_at_once) {
  run(oversize_main, 2, "oversize header");
}

/* lenpfx with adjust -4 and a 2-byte field: a field of 2 would mean a
 * negative payload: -EBADMSG. */
static void negative_main(void *arg) {
  (void)arg;
  static loom_codec c;
  loom_lenpfx_opts lo = {.width = 2, .adjust = -4};
  CHECK_OK(loom_codec_lenpfx(&c, &lo));
  loom_server_opts o = server_opts(&c);
  E.msg = keep_last;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  const uint8_t good[] = {0, 7, 'a', 'b', 'c'}; /* 7 - 4 = 3 bytes */
  CHECK_EQ(loom_write(peer, good, sizeof good), (ssize_t)sizeof good);
  WAIT_FOR(atomic_load(&E.msgs) == 1, 5);
  CHECK_EQ(atomic_load(&last_len), 3);
  CHECK(memcmp(last_msg, "abc", 3) == 0);
  const uint8_t bad[] = {0, 2, 'x', 'y'};
  CHECK_EQ(loom_write(peer, bad, sizeof bad), (ssize_t)sizeof bad);
  expect_error(peer, -EBADMSG);
  CHECK_EQ(atomic_load(&E.msgs), 1);
  loom_metrics m = metrics(srv);
  CHECK_EQ(m.errors.decode, 1);
  CHECK_EQ(m.errors.other, 0);
  finish(srv, peer);
}
TEST(lenpfx_negative_length_is_ebadmsg) {
  run(negative_main, 2, "negative length");
}

/* Line codec (strip_cr), max_pkg_len 5000, a 1 KiB read buffer that has
 * to grow: a line of exactly 5000 bytes plus "\r\n" passes; 5002 bytes
 * without a newline close with -EMSGSIZE. */
static void line_main(void *arg) {
  (void)arg;
  static loom_codec c;
  CHECK_OK(loom_codec_line(&c, '\n', true));
  loom_server_opts o = server_opts(&c);
  o.session.max_pkg_len = 5000;
  o.session.read_buf = 1024;
  E.msg = keep_last;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  static uint8_t buf[5002];
  memset(buf, 'a', 5000);
  buf[5000] = '\r';
  buf[5001] = '\n';
  CHECK_EQ(loom_write(peer, buf, sizeof buf), (ssize_t)sizeof buf);
  WAIT_FOR(atomic_load(&E.msgs) == 1, 5);
  CHECK_EQ(atomic_load(&last_len), 5000);
  for (int i = 0; i < 5000; i++)
    CHECK_EQ(last_msg[i], 'a');
  memset(buf, 'b', sizeof buf);
  CHECK_EQ(loom_write(peer, buf, sizeof buf), (ssize_t)sizeof buf);
  expect_error(peer, -EMSGSIZE);
  CHECK_EQ(atomic_load(&E.msgs), 1);
  CHECK_EQ(metrics(srv).errors.oversize, 1);
  finish(srv, peer);
}
TEST(line_without_delimiter_is_emsgsize) { run(line_main, 2, "long line"); }

/* A whole frame, then half of one, then end of stream: the whole one is
 * delivered, the rest is -EBADMSG (truncated). */
static void truncated_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&lenpfx);
  E.msg = keep_last;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  uint8_t buf[64];
  size_t n = frame(buf, "ok", 2);
  const uint8_t part[] = {0, 0, 0, 10, 'a', 'b', 'c'};
  memcpy(buf + n, part, sizeof part);
  n += sizeof part;
  CHECK_EQ(loom_write(peer, buf, n), (ssize_t)n);
  CHECK_OK(loom_shutdown(peer, SHUT_WR));
  expect_error(peer, -EBADMSG);
  CHECK_EQ(atomic_load(&E.msgs), 1);
  CHECK_EQ(atomic_load(&last_len), 2);
  CHECK_EQ(metrics(srv).errors.decode, 1);
  finish(srv, peer);
}
TEST(truncated_frame_then_eof_is_ebadmsg) {
  run(truncated_main, 2, "truncated frame");
}

/* The peer half-closes: every package it sent is delivered and every
 * reply queued by then is written before on_close; no on_error. */
static void half_close_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&line);
  E.echo = true;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  const char req[] = "a\nbb\nccc\n";
  CHECK_EQ(loom_write(peer, req, 9), 9);
  CHECK_OK(loom_shutdown(peer, SHUT_WR));
  char back[9];
  conn_read_full(peer, back, 9);
  CHECK(memcmp(back, req, 9) == 0);
  conn_expect_eof(peer);
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  CHECK_EQ(atomic_load(&E.errs), 0);
  CHECK_EQ(atomic_load(&E.msgs), 3);
  CHECK_EQ(atomic_load(&E.echo_fail), 0);
  finish(srv, peer);
}
TEST(half_close_delivers_and_flushes) { run(half_close_main, 2, "half close"); }

/* A peer that pipelines 200 requests in one write and reads everything:
 * replies written with timeout 0 from on_message are never refused,
 * since nothing stops the socket from taking them (the queue fills only
 * if the engine holds replies back). */
static atomic_int pipe_fail_rc;
static void reply100(loom_session *s, const loom_pkg *pkg) {
  (void)pkg;
  char r[99];
  memset(r, 'r', sizeof r);
  int rc = loom_session_write(s, r, sizeof r, 0); /* + '\n': 100 bytes */
  if (rc != 0) {
    atomic_store(&pipe_fail_rc, rc);
    atomic_fetch_add(&E.echo_fail, 1);
  }
}

static void pipeline_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&line);
  o.session.wq_high = 4096;
  E.msg = reply100;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  char req[400];
  for (int i = 0; i < 200; i++)
    memcpy(req + 2 * i, "q\n", 2);
  CHECK_EQ(loom_write(peer, req, sizeof req), (ssize_t)sizeof req);
  WAIT_FOR(atomic_load(&E.msgs) == 200, 5);
  int failed = atomic_load(&E.echo_fail);
  CHECKF(failed == 0,
         "%d of 200 replies refused (%s) while the peer reads everything",
         failed, loom_err_name(atomic_load(&pipe_fail_rc)));
  static char back[200 * 100];
  conn_read_full(peer, back, sizeof back);
  finish(srv, peer);
}
TEST(pipelined_replies_timeout0_not_refused) {
  run(pipeline_main, 2, "pipelined replies");
}

/* Replies that on_message writes while the reader dispatches the
 * packages of one read wait to leave together after the batch (corked).
 * A later on_message of the batch that stops for a while — parks, or
 * enters a blocking section — must not hold up the replies before it:
 * they go out as it stops.  The peer pipelines "a" and "b" in one write;
 * on_message answers "a" at once, and for "b" waits until the peer has
 * the answer to "a" (it would wait for ever if that answer waited for
 * it), then answers "b". */
static loom_chan *held_go;    /* the test lets "b"'s handler go */
static atomic_int held_block; /* 1: "b" waits in a blocking section */
static atomic_int held_released;
static void held_reply(loom_session *s, const loom_pkg *pkg) {
  if (pkg->len != 1)
    return;
  if (pkg->data[0] == 'b') {
    if (atomic_load(&held_block)) {
      loom_block_enter();
      while (!atomic_load(&held_released))
        usleep(1000);
      loom_block_exit();
    } else {
      int v;
      CHECK_EQ(loom_chan_recv(held_go, &v), 1);
    }
  }
  char r = (char)(pkg->data[0] - 'a' + 'A');
  CHECK_OK(loom_session_write(s, &r, 1, 0));
}

static void held_case(bool block) {
  codecs_init();
  loom_server_opts o = server_opts(&line);
  E.msg = held_reply;
  atomic_store(&held_block, block);
  atomic_store(&held_released, 0);
  CHECK_OK(loom_chan_make(&held_go, sizeof(int), 1));
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  CHECK_EQ(loom_write(peer, "a\nb\n", 4), 4);
  char back[2];
  CHECK_OK(loom_set_read_deadline(peer, loom_now() + 2 * SEC));
  ssize_t k = loom_read(peer, back, 2);
  CHECKF(k == 2,
         "the answer to \"a\" waited for \"b\"'s handler (%s): read %zd "
         "(%s)",
         block ? "in a blocking section" : "parked", k, loom_err_name((int)k));
  CHECK(memcmp(back, "A\n", 2) == 0);
  CHECK_EQ(atomic_load(&E.msgs), 1); /* "b"'s handler is still waiting */
  int v = 1;
  atomic_store(&held_released, 1);
  CHECK_OK(loom_chan_send(held_go, &v));
  conn_read_full(peer, back, 2);
  CHECK(memcmp(back, "B\n", 2) == 0);
  WAIT_FOR(atomic_load(&E.msgs) == 2, 5);
  CHECK_EQ(atomic_load(&E.echo_fail), 0);
  finish(srv, peer);
  loom_chan_close(held_go);
  loom_chan_free(held_go);
}
static void held_park_main(void *arg) {
  (void)arg;
  held_case(false);
}
static void held_block_main(void *arg) {
  (void)arg;
  held_case(true);
}
TEST(corked_replies_leave_when_a_handler_parks) {
  run(held_park_main, 2, "corked replies and a parked handler");
}
TEST(corked_replies_leave_when_a_handler_blocks) {
  run(held_block_main, 2, "corked replies and a blocking handler");
}

/* Writes the codec refuses fail alone: -EMSGSIZE (counted as oversize)
 * and -EINVAL leave the session open and writable. */
static void bad_write_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&line);
  o.session.max_pkg_len = 100;
  E.keep = true;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  loom_session *s = kept_session();
  char b[101];
  memset(b, 'z', sizeof b);
  CHECK_ERR(loom_session_write(s, b, 101, 0), -EMSGSIZE);
  CHECK_ERR(loom_session_write(s, "a\nb", 3, 0), -EINVAL);
  CHECK(!loom_session_closed(s));
  CHECK_OK(loom_session_write(s, b, 100, 0));
  char back[101];
  conn_read_full(peer, back, 101);
  CHECK(memcmp(back, b, 100) == 0 && back[100] == '\n');
  WAIT_FOR(metrics(srv).pkgs_out == 1, 5); /* once the send returned */
  loom_metrics m = metrics(srv);
  CHECK_EQ(m.errors.oversize, 1);
  CHECK_EQ(m.pkgs_out, 1);
  CHECK_EQ(atomic_load(&E.errs), 0);
  CHECK_OK(loom_close(peer));
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  CHECK_EQ(atomic_load(&E.errs), 0);
  loom_session_unref(s);
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}
/* max_write_len bounds what is written, max_pkg_len what is received. */
static void write_len_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&line);
  o.session.max_pkg_len = 100;
  o.session.max_write_len = 1000;
  E.keep = true;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  loom_session *s = kept_session();
  static char b[1001], back[1001];
  memset(b, 'w', sizeof b);
  CHECK_OK(loom_session_write(s, b, 1000, 0));
  conn_read_full(peer, back, 1001);
  CHECK(memcmp(back, b, 1000) == 0 && back[1000] == '\n');
  CHECK_ERR(loom_session_write(s, b, 1001, 0), -EMSGSIZE);
  CHECK(!loom_session_closed(s));
  CHECK_EQ(loom_write(peer, b, 102), 102); /* no newline in 102 bytes */
  expect_error(peer, -EMSGSIZE);
  CHECK_EQ(atomic_load(&E.msgs), 0);
  loom_session_unref(s);
  finish(srv, peer);
}
TEST(max_write_len_separate_from_max_pkg_len) {
  run(write_len_main, 2, "max_write_len");
}

TEST(write_rejects_oversize_and_unencodable) {
  run(bad_write_main, 2, "bad writes");
}

/* ------------------------------------------------------------------ */
/* 5. Packet sessions.                                                  */

/* Reply to the sender; a plain write on the unconnected session has no
 * destination. */
static void echo_to(loom_session *s, const loom_pkg *pkg) {
  CHECK(pkg->from != NULL);
  CHECK_GT(pkg->fromlen, 0);
  CHECK_ERR(loom_session_write(s, pkg->data, pkg->len, 0), -EDESTADDRREQ);
  if (loom_session_write_to(s, pkg->data, pkg->len, pkg->from, pkg->fromlen,
                            0) != 0)
    atomic_fetch_add(&E.echo_fail, 1);
}

static loom_server *udp_server(char addr[128]) {
  codecs_init();
  loom_server_opts o = server_opts(&lenpfx);
  o.network = "udp";
  o.session.max_pkg_len = 1024;
  E.msg = echo_to;
  E.keep = true;
  return serve(&o, addr);
}

/* A malformed datagram is counted and dropped; the session goes on
 * serving the next ones. */
static void udp_main(void *arg) {
  (void)arg;
  char addr[128];
  loom_server *srv = udp_server(addr);
  loom_session *s = kept_session();
  CHECK_ERR(loom_session_write(s, "x", 1, 0), -EDESTADDRREQ);
  loom_pconn *pc;
  CHECK_OK(loom_dial_packet(&pc, "udp", addr));
  const uint8_t short_payload[] = {0, 0, 0, 10, 'a', 'b', 'c'};
  const uint8_t leftover[] = {0, 0, 0, 3, 'a', 'b', 'c', 'd', 'e', 'f'};
  const uint8_t oversize[] = {0, 0, 0x10, 0, 1, 2, 3, 4, 5, 6};
  CHECK_EQ(loom_pconn_write(pc, short_payload, sizeof short_payload), 7);
  CHECK_EQ(loom_pconn_write(pc, leftover, sizeof leftover), 10);
  CHECK_EQ(loom_pconn_write(pc, oversize, sizeof oversize), 10);
  /* Well-formed but longer than any package: the read cuts it short. */
  static uint8_t huge[2000];
  frame(huge, huge + 4, sizeof huge - 4);
  CHECK_EQ(loom_pconn_write(pc, huge, sizeof huge), (ssize_t)sizeof huge);
  uint64_t sent = 27 + sizeof huge;
  for (int round = 0; round < 2; round++) {
    uint8_t d[32], back[64];
    const char *word = round ? "world!" : "hello";
    size_t n = frame(d, word, strlen(word));
    CHECK_EQ(loom_pconn_write(pc, d, n), (ssize_t)n);
    sent += n;
    CHECK_OK(loom_pconn_set_read_deadline(pc, loom_now() + 5 * SEC));
    CHECK_EQ(loom_pconn_read(pc, back, sizeof back), (ssize_t)n);
    CHECK(memcmp(back, d, n) == 0);
  }
  WAIT_FOR(metrics(srv).pkgs_out == 2, 5); /* once the send returned */
  loom_metrics m = metrics(srv);
  CHECK_EQ(m.errors.decode, 2);
  CHECK_EQ(m.errors.oversize, 2);
  CHECK_EQ(m.pkgs_in, 2);
  CHECK_EQ(m.pkgs_out, 2);
  CHECK_EQ(m.bytes_in, sent);
  CHECK_EQ(m.sessions_open, 1);
  CHECK(!loom_session_closed(s));
  CHECK_EQ(atomic_load(&E.errs), 0);
  CHECK_EQ(atomic_load(&E.closes), 0);
  CHECK_EQ(atomic_load(&E.echo_fail), 0);
  CHECK_OK(loom_pconn_close(pc));
  loom_session_unref(s);
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
  CHECK_EQ(atomic_load(&E.closes), 1);
  CHECK_EQ(atomic_load(&E.errs), 0);
}
TEST(udp_malformed_datagram_dropped) { run(udp_main, 2, "udp"); }

/* write_to on a stream session: -EISCONN. */
static void stream_write_to_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&line);
  E.keep = true;
  char addr[128];
  loom_server *srv = serve(&o, addr);
  loom_conn *peer;
  CHECK_OK(loom_dial(&peer, "tcp", addr));
  loom_session *s = kept_session();
  struct sockaddr_in sa;
  memset(&sa, 0, sizeof sa);
  sa.sin_family = AF_INET;
  sa.sin_port = htons((uint16_t)addr_port(addr));
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  CHECK_ERR(
      loom_session_write_to(s, "x", 1, (struct sockaddr *)&sa, sizeof sa, 0),
      -EISCONN);
  CHECK(!loom_session_closed(s));
  loom_session_unref(s);
  finish(srv, peer);
  CHECK_EQ(atomic_load(&E.closes), 1);
}
TEST(stream_write_to_is_eisconn) {
  run(stream_write_to_main, 2, "write_to tcp");
}

/* A client's packet session is connected: write works, write_to is
 * -EISCONN, and on_message sees no sender. */
static void from_is_null(loom_session *s, const loom_pkg *pkg) {
  (void)s;
  CHECK(pkg->from == NULL);
  keep_last(s, pkg);
}

static void udp_client_main(void *arg) {
  (void)arg;
  char addr[128];
  loom_server *srv = udp_server(addr);
  loom_client_opts co;
  memset(&co, 0, sizeof co);
  co.network = "udp";
  co.addr = addr;
  co.session.listener = &ev_listener;
  co.session.codec = &lenpfx;
  co.session.user = &CE;
  CE.msg = from_is_null;
  loom_client *cl;
  loom_session *cs = one_session(&co, &cl);
  struct sockaddr_in sa;
  memset(&sa, 0, sizeof sa);
  sa.sin_family = AF_INET;
  sa.sin_port = htons((uint16_t)addr_port(addr));
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  CHECK_ERR(
      loom_session_write_to(cs, "x", 1, (struct sockaddr *)&sa, sizeof sa, 0),
      -EISCONN);
  CHECK_OK(loom_session_write(cs, "ping", 4, 0));
  WAIT_FOR(atomic_load(&CE.msgs) == 1, 5);
  CHECK_EQ(atomic_load(&last_len), 4);
  CHECK(memcmp(last_msg, "ping", 4) == 0);
  loom_session_unref(cs);
  CHECK_OK(loom_client_close(cl, loom_now() + 5 * SEC));
  CHECK_EQ(atomic_load(&CE.closes), 1);
  CHECK_EQ(atomic_load(&CE.errs), 0);
  loom_session_unref(kept_session());
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}
TEST(udp_client_session_is_connected) { run(udp_client_main, 2, "udp client"); }

/* A reference kept past on_close of a packet session: writes fail with
 * LOOM_ECLOSED and touch no closed socket. */
static void udp_after_close_main(void *arg) {
  (void)arg;
  char addr[128];
  loom_server *srv = udp_server(addr);
  loom_session *s = kept_session();
  struct sockaddr_in sa;
  memset(&sa, 0, sizeof sa);
  sa.sin_family = AF_INET;
  sa.sin_port = htons((uint16_t)addr_port(addr));
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
  CHECK_EQ(atomic_load(&E.closes), 1);
  CHECK(loom_session_closed(s));
  CHECK_ERR(
      loom_session_write_to(s, "x", 1, (struct sockaddr *)&sa, sizeof sa, 0),
      LOOM_ECLOSED);
  loom_session_unref(s);
}
TEST(udp_write_after_close_via_ref) {
  run(udp_after_close_main, 2, "udp after close");
}

/* ------------------------------------------------------------------ */
/* 6. Compression.                                                      */

/* A compressing server and a peer that sends bytes that are not zlib:
 * on_error(LOOM_ECOMPRESS), counted as compress. */
static void garbage_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&lenpfx);
  o.session.compress = 6;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  uint8_t junk[64];
  memset(junk, 0xff, sizeof junk);
  CHECK_EQ(loom_write(peer, junk, sizeof junk), (ssize_t)sizeof junk);
  expect_error(peer, LOOM_ECOMPRESS);
  CHECK_EQ(atomic_load(&E.msgs), 0);
  loom_metrics m = metrics(srv);
  CHECK_EQ(m.errors.compress, 1);
  CHECK_EQ(m.errors.other, 0);
  finish(srv, peer);
}
TEST(compress_garbage_is_ecompress) {
  run(garbage_main, 2, "compress garbage");
}

/* Decompression does not lift max_pkg_len: a compressing peer sends a
 * "line" of 4 MiB of 'a' (a few KiB on the wire) to a line server with
 * max_pkg_len 4096: -EMSGSIZE once max_pkg_len + 2 bytes are in. */
static void bomb_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&line);
  o.session.compress = 6;
  o.session.max_pkg_len = 4096;
  char addr[128];
  loom_server *srv = serve(&o, addr);
  loom_client_opts co =
      client_opts(addr, NULL); /* raw: the bytes as they are */
  co.session.compress = 6;
  co.reconnect_interval = -1; /* one session, never redialled */
  E.keep = true;
  loom_client *cl;
  loom_session *cs = one_session(&co, &cl);
  memset(big, 'a', PKG);
  for (int i = 0; i < 64; i++) {
    int rc = loom_session_write(cs, big, PKG, -1);
    if (rc == LOOM_ECLOSED)
      break;
    CHECK_OK(rc);
  }
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  CHECK_EQ(atomic_load(&E.opens), 1);
  CHECK_EQ(atomic_load(&E.errs), 1);
  CHECK_ERR(atomic_load(&E.err), -EMSGSIZE);
  CHECK_EQ(atomic_load(&E.msgs), 0);
  loom_session *ss = kept_session();
  CHECK(loom_session_closed(ss));
  loom_session_stats st;
  loom_session_stats_get(ss, &st);
  CHECK_LT(st.bytes_in, 1 << 20); /* compressed bytes: a few KiB */
  loom_session_unref(ss);
  CHECK_EQ(metrics(srv).errors.oversize, 1);
  loom_session_unref(cs);
  CHECK_OK(loom_client_close(cl, loom_now() + 5 * SEC));
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}
TEST(compress_does_not_lift_max_pkg_len) { run(bomb_main, 2, "compress bomb"); }

/* A compressed stream that inflates a lot from one read of the socket
 * is decoded in many reads of the zlib layer that never reach the
 * socket, so never park: they count as I/O progress and yield now and
 * then, so one session cannot hold its P for the whole burst (it did:
 * hundreds of ms on one P).  A coroutine that only yields measures it:
 * the most packages dispatched between two of its turns. */
enum { ZB_N = 2000, ZB_LEN = 50000 };
static atomic_long zb_ticks, zb_seen_tick, zb_streak, zb_max_streak,
    zb_msgs;
static atomic_int zb_stop;
static void zb_ticker(void *arg) {
  (void)arg;
  while (!atomic_load(&zb_stop)) {
    atomic_fetch_add(&zb_ticks, 1);
    loom_yield();
  }
}
static void zb_msg(loom_session *s, const loom_pkg *pkg) {
  (void)s;
  (void)pkg;
  long t = atomic_load(&zb_ticks);
  long streak = t == atomic_load(&zb_seen_tick) ? atomic_load(&zb_streak) + 1 : 1;
  atomic_store(&zb_seen_tick, t);
  atomic_store(&zb_streak, streak);
  if (streak > atomic_load(&zb_max_streak))
    atomic_store(&zb_max_streak, streak);
  atomic_fetch_add(&zb_msgs, 1);
}
static void zburst_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&lenpfx);
  o.session.compress = 6;
  E.msg = zb_msg;
  char addr[128];
  loom_server *srv = serve(&o, addr);
  loom_client_opts co = client_opts(addr, &lenpfx);
  co.session.compress = 6;
  co.reconnect_interval = -1;
  loom_client *cl;
  loom_session *cs = one_session(&co, &cl);
  CHECK_OK(loom_go(zb_ticker, NULL));
  static uint8_t zeros[ZB_LEN];
  for (int i = 0; i < ZB_N; i++)
    CHECK_OK(loom_session_write(cs, zeros, sizeof zeros, -1));
  WAIT_FOR(atomic_load(&zb_msgs) == ZB_N, 20);
  atomic_store(&zb_stop, 1);
  printf("%d packages of %d zero bytes, compressed: at most %ld dispatched "
         "between two turns of a yielding coroutine\n",
         ZB_N, ZB_LEN, atomic_load(&zb_max_streak));
  CHECKF(atomic_load(&zb_max_streak) <= 128, /* 2 x LOOM_IO_STREAK */
         "the reader held the P for %ld packages in a row",
         atomic_load(&zb_max_streak));
  loom_session_unref(cs);
  CHECK_OK(loom_client_close(cl, loom_now() + 5 * SEC));
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}
TEST(compressed_burst_does_not_hold_the_p) {
  run(zburst_main, 1, "compressed burst");
}

/* loom_client and server both compressing (level 6): an echo of 200 KiB
 * of text.  Both sessions' final stats are kept in E / CE. */
enum { CPKG = 50 * 1024, CN = 4 };
static uint8_t comp_out[CPKG * CN], comp_back[CPKG * CN];
static atomic_size_t comp_got;
static void comp_collect(loom_session *s, const loom_pkg *pkg) {
  (void)s;
  size_t at = atomic_load(&comp_got);
  CHECK_LE(at + pkg->len, sizeof comp_back);
  memcpy(comp_back + at, pkg->data, pkg->len);
  atomic_store(&comp_got, at + pkg->len);
}

/* What one end compresses with: level, compress_window_bits,
 * compress_mem_level. */
typedef struct zset {
  int level, wbits, mlevel;
} zset;
static const zset Z6 = {6, 0, 0}, ZSMALL = {6, 9, 1};

static void zset_apply(loom_session_opts *so, const zset *z) {
  so->compress = z->level;
  so->compress_window_bits = z->wbits;
  so->compress_mem_level = z->mlevel;
}

static void compress_exchange(const zset *server_z, const zset *client_z,
                              loom_session_stats *client_live) {
  codecs_init();
  for (size_t i = 0, k = 0; i < sizeof comp_out; k++) {
    char l[64];
    int n = snprintf(l, sizeof l, "line %06zu of a compressible text\n", k);
    for (int j = 0; j < n && i < sizeof comp_out; j++)
      comp_out[i++] = (uint8_t)l[j];
  }
  loom_server_opts o = server_opts(&lenpfx);
  zset_apply(&o.session, server_z);
  E.echo = true;
  char addr[128];
  loom_server *srv = serve(&o, addr);
  loom_client_opts co = client_opts(addr, &lenpfx);
  zset_apply(&co.session, client_z);
  CE.msg = comp_collect;
  loom_client *cl;
  loom_session *cs = one_session(&co, &cl);
  for (int i = 0; i < CN; i++)
    CHECK_OK(loom_session_write(cs, comp_out + i * CPKG, CPKG, -1));
  WAIT_FOR(atomic_load(&comp_got) == sizeof comp_out, 10);
  CHECK(memcmp(comp_back, comp_out, sizeof comp_out) == 0);
  /* Counted once the send returned: the echo may come first. */
  WAIT_FOR(
      (loom_session_stats_get(cs, client_live), client_live->pkgs_out == CN),
      5);
  loom_session_unref(cs);
  CHECK_OK(loom_client_close(cl, loom_now() + 5 * SEC));
  CHECK_EQ(atomic_load(&CE.closes), 1);
  CHECK_EQ(atomic_load(&CE.errs), 0);
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  CHECKF(atomic_load(&E.errs) == 0, "the server's session: %s",
         loom_err_name(atomic_load(&E.err)));
  CHECK_EQ(atomic_load(&E.echo_fail), 0);
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}

static void compress_echo_main(void *arg) {
  (void)arg;
  loom_session_stats live;
  compress_exchange(&Z6, &Z6, &live);
  CHECK_EQ(live.pkgs_out, CN);
  CHECK_EQ(live.pkgs_in, CN);
  printf("client bytes_out %llu for %zu payload bytes\n",
         (unsigned long long)CE.final.bytes_out, sizeof comp_out);
  CHECK_LT(CE.final.bytes_out, sizeof comp_out / 4);
  CHECK_EQ(E.final.pkgs_in, CN);
  CHECK_EQ(E.final.pkgs_out, CN);
}
TEST(compress_echo_both_ends) { run(compress_echo_main, 2, "compress echo"); }

/* bytes_in / bytes_out are "on the wire (compressed if it is)": what
 * one end wrote is what the other end read. */
static void compress_wire_main(void *arg) {
  (void)arg;
  loom_session_stats live;
  compress_exchange(&Z6, &Z6, &live);
  printf("client out %llu in %llu, server in %llu out %llu\n",
         (unsigned long long)CE.final.bytes_out,
         (unsigned long long)CE.final.bytes_in,
         (unsigned long long)E.final.bytes_in,
         (unsigned long long)E.final.bytes_out);
  CHECK_EQ(E.final.bytes_in, CE.final.bytes_out);
  CHECK_EQ(CE.final.bytes_in, E.final.bytes_out);
}
TEST(compress_stats_count_wire_bytes) {
  run(compress_wire_main, 2, "compress stats");
}

/* A peer that closes after the session's read deadline has passed
 * (cron ticks) while its stream sat between two blocks: a clean end,
 * no LOOM_ECOMPRESS.  (The zlib layer took it for a stream cut inside a
 * block: it called inflate with no input after each deadline, which
 * moves zlib off the block boundary it reports.) */
static void zcron_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&lenpfx);
  o.session.compress = 6;
  o.session.cron_period = 2 * CHECK_MS;
  E.echo = true;
  char addr[128];
  loom_server *srv = serve(&o, addr);
  loom_client_opts co = client_opts(addr, &lenpfx);
  co.session.compress = 6;
  co.reconnect_interval = -1;
  loom_client *cl;
  loom_session *cs = one_session(&co, &cl);
  CHECK_OK(loom_session_write(cs, "ping", 4, -1));
  WAIT_FOR(atomic_load(&CE.msgs) == 1, 5);
  WAIT_FOR(atomic_load(&E.crons) >= 5, 5);
  loom_session_unref(cs);
  CHECK_OK(loom_client_close(cl, loom_now() + 5 * SEC));
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  CHECKF(atomic_load(&E.errs) == 0, "the server's session: %s",
         loom_err_name(atomic_load(&E.err)));
  CHECK_EQ(atomic_load(&CE.errs), 0);
  CHECK_EQ(metrics(srv).errors.compress, 0);
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}
TEST(compress_peer_closes_after_cron_ticks) {
  run(zcron_main, 2, "compress close after cron");
}

/* compress_window_bits and compress_mem_level: the smallest (a 512-byte
 * window, memLevel 1) on both ends, and each end with its own — the
 * window is in the stream's header and loom's inflate takes the peer's,
 * so a small-window deflater is read by an end with the default window,
 * and a default deflater (32 KiB window) by an end whose own is small.
 * Every byte of the 200 KiB echo comes back. */
static void compress_settings_main(void *arg) {
  const zset *const *ends = arg; /* server's, client's */
  loom_session_stats live;
  compress_exchange(ends[0], ends[1], &live);
  printf("server window %d memLevel %d, client window %d memLevel %d: "
         "client out %llu in %llu for %zu payload bytes\n",
         ends[0]->wbits, ends[0]->mlevel, ends[1]->wbits, ends[1]->mlevel,
         (unsigned long long)CE.final.bytes_out,
         (unsigned long long)CE.final.bytes_in, sizeof comp_out);
  CHECK_EQ(live.pkgs_out, CN);
  CHECK_EQ(live.pkgs_in, CN);
  CHECK_EQ(E.final.pkgs_in, CN);
  CHECK_EQ(E.final.pkgs_out, CN);
  /* Still compressed, if less (the text repeats within 512 bytes). */
  CHECK_LT(CE.final.bytes_out, sizeof comp_out / 2);
  CHECK_LT(CE.final.bytes_in, sizeof comp_out / 2);
}
static void compress_settings(const zset *server_z, const zset *client_z) {
  const zset *ends[2] = {server_z, client_z};
  check_watchdog(25, "compress settings");
  check_run(compress_settings_main, (void *)ends, 2);
}
TEST(compress_small_window_both_ends) { compress_settings(&ZSMALL, &ZSMALL); }
TEST(compress_small_window_server_default_client) {
  compress_settings(&ZSMALL, &Z6);
}
TEST(compress_default_server_small_window_client) {
  compress_settings(&Z6, &ZSMALL);
}

/* Against zlib itself, at its defaults (deflateInit, inflateInit: a
 * 32 KiB window each way): a server whose deflate window is 512 bytes
 * reads a stream whose matches reach back 4 KiB, and its reply stream
 * — whose header says 512 bytes — is read by the plain inflater. */
static void zlib_peer_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&lenpfx);
  zset_apply(&o.session, &ZSMALL);
  E.echo = true;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  z_stream zo, zi;
  memset(&zo, 0, sizeof zo);
  memset(&zi, 0, sizeof zi);
  CHECK_EQ(deflateInit(&zo, Z_DEFAULT_COMPRESSION), Z_OK);
  CHECK_EQ(inflateInit(&zi), Z_OK);
  /* 16 frames of the same 4 KiB of noise: only a window of more than
   * 4 KiB finds the repeats. */
  enum { ZP_LEN = 4096, ZP_N = 16 };
  static uint8_t plain[ZP_N * (ZP_LEN + 4)], comp[2 * sizeof plain],
      back[sizeof plain];
  uint8_t noise[ZP_LEN];
  uint32_t x = 12345;
  for (size_t i = 0; i < ZP_LEN; i++) {
    x = x * 1103515245u + 12345u;
    noise[i] = (uint8_t)(x >> 24);
  }
  for (int i = 0; i < ZP_N; i++) {
    put_be32(plain + i * (ZP_LEN + 4), ZP_LEN);
    memcpy(plain + i * (ZP_LEN + 4) + 4, noise, ZP_LEN);
  }
  zo.next_in = plain;
  zo.avail_in = sizeof plain;
  zo.next_out = comp;
  zo.avail_out = sizeof comp;
  CHECK_EQ(deflate(&zo, Z_SYNC_FLUSH), Z_OK);
  size_t clen = sizeof comp - zo.avail_out;
  printf("sent %zu plain bytes as %zu\n", sizeof plain, clen);
  CHECK_LT(clen, sizeof plain / 4); /* the repeats were found */
  CHECK_EQ(loom_write(peer, comp, clen), (ssize_t)clen);
  size_t blen = 0, wire = 0;
  CHECK_OK(loom_set_read_deadline(peer, loom_now() + 10 * SEC));
  while (blen < sizeof back) {
    uint8_t in[4096];
    ssize_t n = loom_read(peer, in, sizeof in);
    CHECKF(n > 0, "read %zd (%s) with %zu of %zu bytes back", n,
           n < 0 ? loom_err_name((int)n) : "EOF", blen, sizeof back);
    if (wire == 0) /* CMF: CINFO = window bits - 8, CM = 8 (deflate) */
      CHECKF(in[0] == (((ZSMALL.wbits - 8) << 4) | 8),
             "the stream's header says %#x", in[0]);
    wire += (size_t)n;
    check_inflate(&zi, in, (size_t)n, back, sizeof back, &blen,
                  "the server's stream");
  }
  printf("got %zu plain bytes back as %zu\n", blen, wire);
  CHECK_EQ(blen, sizeof plain);
  CHECK(memcmp(back, plain, sizeof plain) == 0);
  CHECK_EQ(atomic_load(&E.msgs), ZP_N);
  CHECK_EQ(atomic_load(&E.errs), 0);
  deflateEnd(&zo);
  inflateEnd(&zi);
  finish(srv, peer);
}
TEST(compress_small_window_against_zlib_defaults) {
  run(zlib_peer_main, 2, "compress small window, zlib peer");
}

/* The settings are checked when a server or client is made: out of
 * range is -EINVAL, whether compression is on or not; the ends of the
 * ranges are taken. */
static void compress_opts_main(void *arg) {
  (void)arg;
  codecs_init();
  static const struct {
    int level, wbits, mlevel, rc;
  } cases[] = {
      {6, 8, 0, -EINVAL},  {6, 16, 0, -EINVAL}, {6, -1, 0, -EINVAL},
      {6, 0, 10, -EINVAL}, {6, 0, -1, -EINVAL}, {0, 8, 0, -EINVAL},
      {-1, 9, 1, 0},       {1, 15, 9, 0},       {9, 0, 0, 0},
      {0, 12, 5, 0},
  };
  char addr[128];
  loom_server_opts base = server_opts(&lenpfx);
  loom_server *target = serve(&base, addr);
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    zset z = {cases[i].level, cases[i].wbits, cases[i].mlevel};
    loom_server_opts o = server_opts(&lenpfx);
    zset_apply(&o.session, &z);
    loom_server *srv = NULL;
    int rc = loom_server_start(&srv, &o);
    CHECKF(rc == cases[i].rc, "server, level %d window %d memLevel %d: %s",
           z.level, z.wbits, z.mlevel, loom_err_name(rc));
    if (rc == 0)
      CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
    loom_client_opts co;
    memset(&co, 0, sizeof co);
    co.network = "tcp";
    co.addr = addr;
    co.session.listener = &ev_listener;
    co.session.user = &CE;
    co.reconnect_interval = -1;
    zset_apply(&co.session, &z);
    loom_client *cl = NULL;
    rc = loom_client_start(&cl, &co);
    CHECKF(rc == cases[i].rc, "client, level %d window %d memLevel %d: %s",
           z.level, z.wbits, z.mlevel, loom_err_name(rc));
    if (rc == 0)
      CHECK_OK(loom_client_close(cl, loom_now() + 5 * SEC));
  }
  CHECK_OK(loom_server_close(target, loom_now() + 5 * SEC));
}
TEST(compress_bad_settings_are_einval) {
  run(compress_opts_main, 2, "compress settings checked");
}

/* What compression holds, counted in loom's heap (zlib allocates through
 * it): nothing while sessions have exchanged no byte; once one package
 * has gone each way and the sessions are quiet again (a cron tick gives
 * back what a burst took; the write queue's chunk went as it drained),
 * both ends' deflate state and the peer's window — more than 512 KiB a pair of
 * sessions at the defaults, about 34 KiB with a 512-byte window and memLevel 1
 * on both ends.  bench/engine/zmem measures the same as resident
 * memory. */
enum { ZM_N = 8 };
static loom_session *_Atomic zm_client[ZM_N];
static atomic_int zm_nclient, zm_echoes;
static int zm_open(loom_session *s) {
  int i = atomic_fetch_add(&zm_nclient, 1);
  CHECK_LT(i, ZM_N);
  atomic_store(&zm_client[i], loom_session_ref(s));
  return 0;
}
static void zm_message(loom_session *s, const loom_pkg *pkg) {
  (void)s;
  CHECK_EQ(pkg->len, 64);
  atomic_fetch_add(&zm_echoes, 1);
}
static const loom_session_listener zm_listener = {.on_open = zm_open,
                                                  .on_message = zm_message};

#define ZM_CRON (5 * CHECK_MS)
static long long zm_per_pair(long long base) {
  loom_sleep(10 * ZM_CRON); /* cron ticks: every session is quiet */
  return (atomic_load(&live_bytes) - base) / ZM_N;
}

/* An echo server and a client with ZM_N sessions to it, both ends with
 * settings z and cron period `cron` (0: none), all sessions open; *base
 * is loom's heap before the client started. */
static void zm_start(const zset *z, int64_t cron, loom_server **srv,
                     loom_client **cl, long long *base) {
  codecs_init();
  loom_server_opts o = server_opts(&lenpfx);
  zset_apply(&o.session, z);
  o.session.cron_period = cron;
  E.echo = true;
  static char addr[128];
  *srv = serve(&o, addr);
  *base = atomic_load(&live_bytes);
  loom_client_opts co;
  memset(&co, 0, sizeof co);
  co.network = "tcp";
  co.addr = addr;
  co.conns = ZM_N;
  co.reconnect_interval = -1;
  co.session.listener = &zm_listener;
  co.session.codec = &lenpfx;
  co.session.cron_period = cron;
  zset_apply(&co.session, z);
  CHECK_OK(loom_client_start(cl, &co));
  CHECK_OK(loom_client_wait(*cl, ZM_N, loom_now() + 5 * SEC));
  WAIT_FOR(atomic_load(&E.opens) == ZM_N && atomic_load(&zm_nclient) == ZM_N,
           5);
}

/* Every client session sends one 64-byte package of `fill`; wait for
 * all the echoes. */
static void zm_exchange(uint8_t fill) {
  uint8_t small[64];
  memset(small, fill, sizeof small);
  int want = atomic_load(&zm_echoes) + ZM_N;
  for (int i = 0; i < ZM_N; i++)
    CHECK_OK(loom_session_write(atomic_load(&zm_client[i]), small, 64, -1));
  WAIT_FOR(atomic_load(&zm_echoes) == want, 5);
}

static void zm_stop(loom_server *srv, loom_client *cl) {
  for (int i = 0; i < ZM_N; i++)
    loom_session_unref(atomic_load(&zm_client[i]));
  CHECK_OK(loom_client_close(cl, loom_now() + 5 * SEC));
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}

static const zset *zm_z; /* both ends' settings */
static void compress_memory_main(void *arg) {
  (void)arg;
  const zset *z = zm_z;
  loom_server *srv;
  loom_client *cl;
  long long base;
  zm_start(z, ZM_CRON, &srv, &cl, &base);
  long long connected = zm_per_pair(base);
  zm_exchange('z');
  long long one = zm_per_pair(base);
  printf("window %d memLevel %d: loom's heap per pair of sessions: %lld "
         "bytes connected, %lld after one package each way, then quiet\n",
         z->wbits, z->mlevel, connected, one);
  /* No zlib state yet: a session's own struct and its owner's books. */
  CHECKF(connected < 16 * 1024, "%lld bytes a pair before any byte", connected);
  if (z == &Z6)
    CHECKF(one > 2 * 256 * 1024, "%lld bytes a pair at the defaults", one);
  else
    CHECKF(one < 48 * 1024, "%lld bytes a pair with window %d memLevel %d", one,
           z->wbits, z->mlevel);
  zm_stop(srv, cl);
}
TEST(compress_state_made_when_needed) {
  zm_z = &Z6;
  run_counted(count_realloc, count_free, compress_memory_main, 2,
              "compress memory, defaults");
}
TEST(compress_small_window_holds_less) {
  zm_z = &ZSMALL;
  run_counted(count_realloc, count_free, compress_memory_main, 2,
              "compress memory, small window");
}

/* An idle compressing session without a cron (nor a read timeout: no
 * read deadline, so no quiet moment the reader can see) holds no write
 * queue chunk: its writes all go through the writer (zlib must see every
 * byte), and the writer gives the chunk back as a batch drains the
 * queue.  Measured in loom's heap, per pair of sessions, after one
 * 64-byte package each way: what compress_small_window_holds_less
 * allows with a cron, where a chunk of 16 KiB at each end would be 32
 * KiB more.  And it costs the round trip nothing: at most one block
 * made per batch at each end, in steady request and reply, as when the
 * queue kept its chunk (the layer then made one for its output). */
static void compress_idle_main(void *arg) {
  (void)arg;
  loom_server *srv;
  loom_client *cl;
  long long base;
  zm_start(&ZSMALL, 0, &srv, &cl, &base);
  zm_exchange('i');
  long long one = zm_per_pair(base);

  enum { ROUNDS = 200 };
  uint8_t small[64];
  memset(small, 'i', sizeof small);
  loom_session *s0 = atomic_load(&zm_client[0]);
  long long blocks0 = atomic_load(&new_blocks);
  for (int r = 0; r < ROUNDS; r++) {
    int want = atomic_load(&zm_echoes) + 1;
    CHECK_OK(loom_session_write(s0, small, 64, -1));
    WAIT_FOR(atomic_load(&zm_echoes) == want, 5);
  }
  long long blocks = atomic_load(&new_blocks) - blocks0;
  long long after = zm_per_pair(base);
  printf("loom's heap per pair of idle compressing sessions without a cron: "
         "%lld bytes after one package each way, %lld after %d more round "
         "trips on one pair, which made %lld blocks (%.2f a round trip)\n",
         one, after, ROUNDS, blocks, (double)blocks / ROUNDS);
  CHECKF(one < 48 * 1024, "%lld bytes a pair, idle", one);
  CHECKF(after < one + 1024, "%lld bytes a pair, idle again (%lld before)",
         after, one);
  CHECKF(blocks <= 2 * ROUNDS + ROUNDS / 10,
         "%lld blocks made in %d round trips", blocks, ROUNDS);
  zm_stop(srv, cl);
}
TEST(compress_idle_session_holds_no_write_queue) {
  run_counted(count_realloc, count_free, compress_idle_main, 2,
              "compress idle without cron");
}

/* ------------------------------------------------------------------ */
/* 7. Refusal and connection limits.                                    */

/* on_open returns -EPERM: no on_message, no on_error, one on_close,
 * counted as refused. */
static void refuse_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&line);
  E.open_rc = -EPERM;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  ssize_t w = loom_write(peer, "hello\n", 6);
  CHECKF(w == 6 || w == -EPIPE || w == -ECONNRESET, "write %zd", w);
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  conn_expect_eof(peer);
  loom_sleep(20 * CHECK_MS);
  CHECK_EQ(atomic_load(&E.opens), 1);
  CHECK_EQ(atomic_load(&E.msgs), 0);
  CHECK_EQ(atomic_load(&E.errs), 0);
  CHECK_EQ(atomic_load(&E.closes), 1);
  WAIT_FOR(metrics(srv).sessions_open == 0, 5);
  loom_metrics m = metrics(srv);
  CHECK_EQ(m.errors.refused, 1);
  CHECK_EQ(m.errors.other, 0);
  CHECK_EQ(m.pkgs_in, 0);
  finish(srv, peer);
}
TEST(on_open_refusal) { run(refuse_main, 2, "refusal"); }

static void echo_line(loom_conn *c, const char *l) {
  size_t n = strlen(l);
  char back[64];
  CHECK_EQ(loom_write(c, l, n), (ssize_t)n);
  conn_read_full(c, back, n);
  CHECK(memcmp(back, l, n) == 0);
}

/* max_conns 2: a third connection is closed at accept (refused, no
 * callbacks); once one closes, a new one is served. */
static void max_conns_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&line);
  o.max_conns = 2;
  E.echo = true;
  char addr[128];
  loom_server *srv = serve(&o, addr);
  loom_conn *p1, *p2, *p3, *p4;
  CHECK_OK(loom_dial(&p1, "tcp", addr));
  CHECK_OK(loom_dial(&p2, "tcp", addr));
  WAIT_FOR(atomic_load(&E.opens) == 2, 5);
  CHECK_OK(loom_dial(&p3, "tcp", addr));
  conn_expect_eof(p3);
  CHECK_EQ(atomic_load(&E.opens), 2);
  CHECK_EQ(atomic_load(&E.closes), 0);
  loom_metrics m = metrics(srv);
  CHECK_EQ(m.errors.refused, 1);
  CHECK_EQ(m.sessions_open, 2);
  echo_line(p1, "one\n");
  CHECK_OK(loom_close(p1));
  WAIT_FOR(atomic_load(&E.closes) == 1 && metrics(srv).sessions_open == 1, 5);
  CHECK_OK(loom_dial(&p4, "tcp", addr));
  WAIT_FOR(atomic_load(&E.opens) == 3, 5);
  echo_line(p4, "four\n");
  echo_line(p2, "two\n");
  CHECK_EQ(metrics(srv).errors.refused, 1);
  CHECK_EQ(atomic_load(&E.errs), 0);
  CHECK_OK(loom_close(p2));
  CHECK_OK(loom_close(p3));
  CHECK_OK(loom_close(p4));
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
  CHECK_EQ(atomic_load(&E.closes), 3);
}
TEST(max_conns_refuses_third) { run(max_conns_main, 2, "max_conns"); }

/* ------------------------------------------------------------------ */
/* 8. Close semantics and references.                                   */

/* Many coroutines and the session's own on_message call close and abort
 * at once, over many sessions: each session's on_close runs exactly
 * once, on_error at most once and with one of the reasons given. */
enum { STORM_CO = 16, STORM_MAX = 64 };
typedef struct srec {
  atomic_int closes, errs, err;
} srec;
static srec recs[STORM_MAX];
static atomic_int nrec, storm_done;
static loom_session *_Atomic storm_s;

static int storm_open(loom_session *s) {
  int i = atomic_fetch_add(&nrec, 1);
  CHECK_LT(i, STORM_MAX);
  loom_session_set_user(s, &recs[i]);
  atomic_store(&storm_s, loom_session_ref(s));
  return 0;
}
static void storm_message(loom_session *s, const loom_pkg *pkg) {
  if (pkg->len == 5 && memcmp(pkg->data, "close", 5) == 0)
    loom_session_close(s);
  else if (pkg->len == 5 && memcmp(pkg->data, "abort", 5) == 0)
    loom_session_abort(s, -EIO);
}
static void storm_error(loom_session *s, int err) {
  srec *r = loom_session_user(s);
  CHECK(loom_session_closed(s));
  atomic_store(&r->err, err);
  atomic_fetch_add(&r->errs, 1);
}
static void storm_close(loom_session *s) {
  srec *r = loom_session_user(s);
  CHECK(loom_session_closed(s));
  atomic_fetch_add(&r->closes, 1);
}
static const loom_session_listener storm_listener = {
    .on_open = storm_open,
    .on_message = storm_message,
    .on_error = storm_error,
    .on_close = storm_close,
};

typedef struct storm_arg {
  loom_session *s;
  int k;
} storm_arg;
static storm_arg storm_args[STORM_CO];

static void storm_co(void *arg) {
  storm_arg *a = arg;
  for (int i = 0; i < 8; i++) {
    switch ((a->k + i) % 4) {
    case 0:
      loom_session_close(a->s);
      break;
    case 1:
      loom_session_abort(a->s, -ECONNABORTED);
      break;
    case 2: {
      int rc = loom_session_write(a->s, "x", 1, 0);
      CHECKF(rc == 0 || rc == LOOM_ECLOSED, "write: %s", loom_err_name(rc));
      break;
    }
    default:
      loom_yield();
      break;
    }
  }
  CHECK(loom_session_closed(a->s));
  loom_session_unref(a->s);
  atomic_fetch_add(&storm_done, 1);
}

static void storm_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&line);
  o.session.listener = &storm_listener;
  char addr[128];
  loom_server *srv = serve(&o, addr);
  int rounds = CHECK_SCALE(40, 20, 10);
  for (int r = 0; r < rounds; r++) {
    loom_conn *peer;
    CHECK_OK(loom_dial(&peer, "tcp", addr));
    WAIT_FOR(atomic_load(&storm_s) != NULL, 5);
    loom_session *s = atomic_exchange(&storm_s, NULL);
    CHECK_EQ(loom_write(peer, "a\nclose\nabort\n", 14), 14);
    for (int k = 0; k < STORM_CO; k++) {
      storm_args[k] = (storm_arg){loom_session_ref(s), k + r};
      CHECK_OK(loom_go(storm_co, &storm_args[k]));
    }
    WAIT_FOR(atomic_load(&storm_done) == (r + 1) * STORM_CO, 5);
    WAIT_FOR(atomic_load(&recs[r].closes) == 1, 5);
    loom_session_unref(s);
    CHECK_OK(loom_close(peer));
  }
  loom_sleep(50 * CHECK_MS);
  for (int r = 0; r < rounds; r++) {
    CHECK_EQ(atomic_load(&recs[r].closes), 1);
    CHECK_LE(atomic_load(&recs[r].errs), 1);
    int e = atomic_load(&recs[r].err);
    CHECKF(e == 0 || e == -ECONNABORTED || e == -EIO, "session %d: %s", r,
           loom_err_name(e));
  }
  CHECK_EQ(metrics(srv).sessions_total, rounds);
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}
TEST(close_abort_storm_on_close_once) { run(storm_main, 2, "close storm"); }

/* Close and abort from inside on_cron, on_error and on_close: the first
 * abort's reason is the one reported, once; on_close runs once; writes
 * from on_error / on_close fail with LOOM_ECLOSED. */
static atomic_int cb_crons, cb_errs, cb_closes, cb_err;
static int cb_open(loom_session *s) {
  CHECK_OK(loom_session_write(s, "hi", 2, 0));
  return 0;
}
static void cb_cron(loom_session *s) {
  if (atomic_fetch_add(&cb_crons, 1) != 2)
    return;
  loom_session_abort(s, -EIO);
  loom_session_close(s);
  loom_session_abort(s, -EPIPE);
}
static void cb_error(loom_session *s, int err) {
  atomic_store(&cb_err, err);
  loom_session_close(s);
  loom_session_abort(s, -EINVAL);
  CHECK_ERR(loom_session_write(s, "x", 1, 0), LOOM_ECLOSED);
  atomic_fetch_add(&cb_errs, 1);
}
static void cb_close(loom_session *s) {
  loom_session_close(s);
  loom_session_abort(s, -EINVAL);
  CHECK_ERR(loom_session_write(s, "x", 1, 0), LOOM_ECLOSED);
  CHECK(loom_session_closed(s));
  atomic_fetch_add(&cb_closes, 1);
}
static const loom_session_listener cb_listener = {
    .on_open = cb_open,
    .on_cron = cb_cron,
    .on_error = cb_error,
    .on_close = cb_close,
};

static void callbacks_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&line);
  o.session.listener = &cb_listener;
  o.session.cron_period = 10 * CHECK_MS;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  char hi[3];
  conn_read_full(peer, hi, 3);
  CHECK(memcmp(hi, "hi\n", 3) == 0);
  conn_expect_eof(peer);
  WAIT_FOR(atomic_load(&cb_closes) == 1, 5);
  loom_sleep(50 * CHECK_MS);
  CHECK_EQ(atomic_load(&cb_closes), 1);
  CHECK_EQ(atomic_load(&cb_errs), 1);
  CHECK_ERR(atomic_load(&cb_err), -EIO);
  CHECK_EQ(atomic_load(&cb_crons), 3);
  loom_metrics m = metrics(srv);
  CHECK_EQ(m.errors.other, 1);
  finish(srv, peer);
}
TEST(close_abort_from_every_callback) {
  run(callbacks_main, 2, "callbacks close");
}

/* An abort after a graceful close cuts the close short and is reported
 * (that is how a server's close deadline ends sessions); an abort decides
 * for good: a second abort, or a close, changes nothing.  One P, so the
 * calls happen before the reader runs. */
static void close_then_abort_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&line);
  E.keep = true;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  loom_session *s = kept_session();
  loom_session_close(s);
  loom_session_abort(s, -EIO);
  loom_session_abort(s, -EPIPE);
  loom_session_close(s);
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  CHECK_EQ(atomic_load(&E.errs), 1);
  CHECK_ERR(atomic_load(&E.err), -EIO);
  loom_session_unref(s);
  finish(srv, peer);
}
TEST(abort_after_close_cuts_it_short) {
  run(close_then_abort_main, 1, "close then abort");
}

/* loom_session_close and loom_session_abort from a plain thread (one the
 * application made, not a coroutine) end the session as they do from a
 * coroutine.  They used to flip the state and nothing else: moving the
 * read and write deadlines into the past, which is how a close wakes a
 * parked reader and writer, was refused off a coroutine, so an idle
 * session stayed open (loom_session_closed said otherwise), and so did
 * an aborted one whose writer was stuck on a peer that never reads. */
static void *thread_close(void *s) {
  loom_session_close(s);
  return NULL;
}
static void *thread_abort(void *s) {
  loom_session_abort(s, -ECANCELED);
  return NULL;
}
static void from_thread(void *(*fn)(void *), loom_session *s) {
  pthread_t t;
  CHECK_EQ(pthread_create(&t, NULL, fn, s), 0);
  CHECK_EQ(pthread_join(t, NULL), 0);
}
static void thread_close_main(void *arg) {
  (void)arg;
  codecs_init();
  /* An idle session: closed from a thread, it ends at once. */
  loom_server_opts o = server_opts(&lenpfx);
  E.keep = true;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  loom_session *s = kept_session();
  from_thread(thread_close, s);
  CHECK(loom_session_closed(s));
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  CHECK_EQ(atomic_load(&E.errs), 0);
  conn_expect_eof(peer);
  loom_session_unref(s);
  finish(srv, peer);

  /* A session whose writer is stuck on a peer that never reads: aborted
   * from a thread, it ends at once, not after the linger. */
  memset(&E, 0, sizeof E);
  slow t;
  slow_start(&t, false, 0, WQ_HIGH, LONG_LINGER_S * SEC);
  fill_until_stalled(t.s);
  from_thread(thread_abort, t.s);
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  CHECK_EQ(atomic_load(&E.errs), 1);
  CHECK_ERR(atomic_load(&E.err), -ECANCELED);
  slow_end(&t);
}
TEST(close_and_abort_from_a_plain_thread) {
  run(thread_close_main, 2, "close and abort from a thread");
}

/* A reference keeps the session valid after on_close: id, closed,
 * stats, attributes; writes fail with LOOM_ECLOSED; close is a no-op. */
static int attr_key, attr_val;
static void ref_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&line);
  E.keep = true;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  loom_session *s = kept_session();
  uint64_t id = atomic_load(&E.id);
  CHECK_OK(loom_session_set_attr(s, &attr_key, &attr_val));
  CHECK_OK(loom_close(peer)); /* end of stream: graceful */
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  CHECK(loom_session_closed(s));
  CHECK_EQ(loom_session_id(s), id);
  CHECK(loom_session_attr(s, &attr_key) == &attr_val);
  CHECK(loom_session_user(s) == &E);
  loom_session_stats st;
  loom_session_stats_get(s, &st);
  CHECK_EQ(st.wq_bytes, 0);
  CHECK_ERR(loom_session_write(s, "x", 1, 0), LOOM_ECLOSED);
  CHECK_ERR(loom_session_write(s, "x", 1, -1), LOOM_ECLOSED);
  loom_session_close(s);
  loom_sleep(20 * CHECK_MS);
  CHECK_EQ(atomic_load(&E.closes), 1);
  CHECK_EQ(atomic_load(&E.errs), 0);
  loom_session_unref(s);
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}
TEST(ref_outlives_on_close) { run(ref_main, 2, "ref after close"); }

/* on_free runs once per session, after on_close, where the last
 * reference goes: on the reader for an unreferenced session, in the
 * holder's loom_session_unref otherwise, even after loom_server_close. */
static void free_set_attr(loom_session *s, const loom_pkg *pkg) {
  (void)pkg;
  CHECK_OK(loom_session_set_attr(s, &free_key, loom_session_user(s)));
}

static void free_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&line);
  o.session.listener = &free_listener;
  E.keep = true;
  E.msg = free_set_attr;
  char addr[128];
  loom_server *srv = serve(&o, addr);
  loom_conn *a, *b;
  CHECK_OK(loom_dial(&a, "tcp", addr));
  loom_session *sa = kept_session(); /* the first: referenced */
  CHECK_OK(loom_session_set_attr(sa, &free_key, &E));
  CHECK_OK(loom_dial(&b, "tcp", addr));
  WAIT_FOR(atomic_load(&E.opens) == 2, 5);
  /* The second session is not referenced: its attribute is set by
   * a message. */
  CHECK_EQ(loom_write(b, "x\n", 2), 2);
  WAIT_FOR(atomic_load(&E.msgs) == 1, 5);
  CHECK_OK(loom_close(b));
  WAIT_FOR(atomic_load(&E.frees) == 1, 5);
  CHECK_EQ(atomic_load(&E.closes), 1);
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
  CHECK_EQ(atomic_load(&E.closes), 2);
  loom_sleep(20 * CHECK_MS);
  CHECK_EQ(atomic_load(&E.frees), 1); /* sa is still referenced */
  loom_session_unref(sa);
  CHECK_EQ(atomic_load(&E.frees), 2);
  conn_expect_eof(a);
  CHECK_OK(loom_close(a));
}
TEST(on_free_after_last_unref) { run(free_main, 2, "on_free"); }

/* A session nobody else references is freed before loom_server_close
 * returns: on_free runs before it, not after (the user frees what on_free
 * needs once the close has returned).  on_free spins 30 ms, so a close
 * that returned as soon as the session left its server's list, before
 * the reader's last unref, sees it not yet done.  With a task pool too:
 * a pooled package's reference must not be the last one. */
static void slow_free(loom_session *s) {
  (void)s;
  int64_t until = loom_now() + 30 * CHECK_MS;
  while (loom_now() < until) /* must not park: a busy on_free */
    ;
  atomic_fetch_add(&E.frees, 1);
}
static const loom_session_listener slow_free_listener = {
    .on_open = ev_open,
    .on_message = ev_message,
    .on_close = ev_close,
    .on_free = slow_free,
};
static void free_before_close_returns_main(void *arg) {
  codecs_init();
  loom_taskpool *pool = NULL;
  if (arg != NULL) {
    loom_taskpool_opts po = {.queues = 2, .workers = 1};
    CHECK_OK(loom_taskpool_make(&pool, &po));
  }
  loom_server_opts o = server_opts(&line);
  o.session.listener = &slow_free_listener;
  o.session.pool = pool;
  char addr[128];
  loom_server *srv = serve(&o, addr);
  enum { N = 4 };
  loom_conn *c[N];
  for (int i = 0; i < N; i++) {
    CHECK_OK(loom_dial(&c[i], "tcp", addr));
    CHECK_EQ(loom_write(c[i], "x\n", 2), 2);
  }
  WAIT_FOR(atomic_load(&E.msgs) == N, 5);
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
  CHECK_EQ(atomic_load(&E.closes), N);
  CHECK_EQ(atomic_load(&E.frees), N);
  for (int i = 0; i < N; i++)
    CHECK_OK(loom_close(c[i]));
  if (pool != NULL)
    loom_taskpool_close(pool);
}
TEST(on_free_before_server_close_returns) {
  run(free_before_close_returns_main, 2, "on_free before close returns");
}
static void free_before_close_returns_pooled_main(void *arg) {
  (void)arg;
  free_before_close_returns_main(&E); /* non-NULL: with a pool */
}
TEST(on_free_before_server_close_returns_pooled) {
  run(free_before_close_returns_pooled_main, 2,
      "on_free before close returns, pooled");
}

/* loom_session_abort through a reference after on_close: a no-op, no
 * callback, and no touch of the closed socket. */
static void abort_after_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&line);
  E.keep = true;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  loom_session *s = kept_session();
  CHECK_OK(loom_close(peer));
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  loom_session_abort(s, -EIO);
  loom_sleep(20 * CHECK_MS);
  CHECK_EQ(atomic_load(&E.closes), 1);
  CHECK_EQ(atomic_load(&E.errs), 0);
  CHECK_ERR(loom_session_write(s, "x", 1, 0), LOOM_ECLOSED);
  loom_session_unref(s);
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}
TEST(abort_via_ref_after_on_close) {
  run(abort_after_main, 2, "abort after close");
}

/* loom_session_name and loom_session_remote_addr from on_error and
 * on_close (the name never asked for before): the real addresses. */
static char err_name[300], close_name[300], close_remote[128];
static void name_on_error(loom_session *s, int err) {
  (void)err;
  snprintf(err_name, sizeof err_name, "%s", loom_session_name(s));
}
static void name_on_close(loom_session *s) {
  snprintf(close_name, sizeof close_name, "%s", loom_session_name(s));
  if (loom_session_remote_addr(s, close_remote, sizeof close_remote) < 0)
    snprintf(close_remote, sizeof close_remote, "(error)");
}

static void name_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&line);
  E.keep = true;
  E.error = name_on_error;
  E.close = name_on_close;
  char addr[128];
  loom_server *srv = serve(&o, addr);
  loom_conn *peer;
  CHECK_OK(loom_dial(&peer, "tcp", addr));
  loom_session *s = kept_session();
  char local[128], want[300];
  CHECK_OK(loom_conn_local_addr(peer, local, sizeof local));
  snprintf(want, sizeof want, "tcp %s<-%s", addr, local);
  loom_session_abort(s, -EIO);
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  CHECK_STREQ(err_name, want);
  CHECK_STREQ(close_name, want);
  CHECK_STREQ(close_remote, local);
  loom_session_unref(s);
  finish(srv, peer);
}
TEST(name_in_on_error_and_on_close) { run(name_main, 2, "name in callbacks"); }

/* A reference kept past loom_server_close: the session is closed, and
 * writes (even one the codec refuses) fail without touching the freed
 * server. */
static void ref_server_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&line);
  o.session.max_pkg_len = 100;
  E.keep = true;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  loom_session *s = kept_session();
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
  CHECK_EQ(atomic_load(&E.closes), 1);
  CHECK(loom_session_closed(s));
  CHECK_ERR(loom_session_write(s, "x", 1, 0), LOOM_ECLOSED);
  char b[200];
  memset(b, 'y', sizeof b);
  int rc = loom_session_write(s, b, sizeof b, 0);
  CHECKF(rc == LOOM_ECLOSED || rc == -EMSGSIZE, "write: %s", loom_err_name(rc));
  loom_session_unref(s);
  conn_expect_eof(peer);
  CHECK_OK(loom_close(peer));
}
TEST(ref_outlives_server) { run(ref_server_main, 2, "ref after server"); }

/* With a task pool: on_close runs after every pooled on_message has
 * returned, and replies written from the pool reach the peer first. */
static atomic_int pool_in_flight, pool_done;
static void pool_msg(loom_session *s, const loom_pkg *pkg) {
  (void)s;
  (void)pkg;
  CHECK_EQ(atomic_fetch_add(&pool_in_flight, 1),
           0); /* in order, one at a time */
  loom_sleep(20 * CHECK_MS);
  atomic_fetch_sub(&pool_in_flight, 1);
  atomic_fetch_add(&pool_done, 1);
}
static void pool_close(loom_session *s) {
  (void)s;
  CHECK_EQ(atomic_load(&pool_in_flight), 0);
  CHECK_EQ(atomic_load(&pool_done), 5);
}

static void pool_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_taskpool *pool;
  loom_taskpool_opts po = {.queues = 2, .workers = 1, .queue_len = 4};
  CHECK_OK(loom_taskpool_make(&pool, &po));
  loom_server_opts o = server_opts(&line);
  o.session.pool = pool;
  E.echo = true;
  E.msg = pool_msg;
  E.close = pool_close;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  const char req[] = "1\n2\n3\n4\n5\n";
  CHECK_EQ(loom_write(peer, req, 10), 10);
  CHECK_OK(loom_shutdown(peer, SHUT_WR));
  char back[10];
  conn_read_full(peer, back, 10);
  CHECK(memcmp(back, req, 10) == 0);
  conn_expect_eof(peer);
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  CHECK_EQ(atomic_load(&E.errs), 0);
  CHECK_EQ(atomic_load(&E.msgs), 5);
  CHECK_EQ(metrics(srv).pool_queued, 0);
  finish(srv, peer);
  loom_taskpool_close(pool);
}
TEST(pool_on_close_after_messages) { run(pool_main, 2, "pool close"); }

/* An aborted session stops waiting for room in a full task pool: the
 * package its reader was trying to queue is dropped with it, while the
 * ones already queued still run.  (The reader waited for room however
 * long the pool took, and queued the package after the abort.) */
static loom_sema pool_gate;
static atomic_int gate_entered;
static void gated_msg(loom_session *s, const loom_pkg *pkg) {
  (void)s;
  (void)pkg;
  if (atomic_fetch_add(&gate_entered, 1) == 0) /* the first holds the worker */
    CHECK_OK(loom_sema_acquire(&pool_gate, 0));
}
static void pool_abort_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_taskpool *pool;
  loom_taskpool_opts po = {.queues = 1, .workers = 1, .queue_len = 1};
  CHECK_OK(loom_taskpool_make(&pool, &po));
  loom_server_opts o = server_opts(&line);
  o.session.pool = pool;
  E.keep = true;
  E.msg = gated_msg;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  CHECK_EQ(loom_write(peer, "1\n2\n3\n", 6), 6);
  WAIT_FOR(atomic_load(&gate_entered) == 1 && loom_taskpool_queued(pool) == 1,
           5);
  loom_sleep(50 * CHECK_MS); /* the reader waits for room with package 3 */
  loom_session *ss = kept_session();
  loom_session_abort(ss, LOOM_ECLOSED);
  loom_sleep(50 * CHECK_MS);
  loom_sema_release(&pool_gate); /* package 1 ends; 2 runs */
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  CHECK_EQ(atomic_load(&E.msgs), 2);
  loom_session_unref(ss);
  finish(srv, peer);
  loom_taskpool_close(pool);
}
TEST(pool_wait_ends_at_abort) { run(pool_abort_main, 2, "pool wait vs abort"); }

/* ------------------------------------------------------------------ */
/* 9. Identity, attributes, user pointer, statistics.                   */

static char attr_keys[10];
static int attr_vals[10], other_tag;

typedef struct attr_arg {
  loom_session *s;
  int base;
} attr_arg;
static attr_arg attr_args[4];
static char conc_keys[4][8];
static int conc_vals[4][8];
static atomic_int attr_done;

/* Each coroutine sets, reads and removes its own keys, many times, at
 * the same time as the others. */
static void attr_co(void *arg) {
  attr_arg *a = arg;
  for (int it = 0; it < 200; it++) {
    for (int k = 0; k < 8; k++)
      CHECK_OK(loom_session_set_attr(a->s, &conc_keys[a->base][k],
                                     &conc_vals[a->base][k]));
    for (int k = 0; k < 8; k++)
      CHECK(loom_session_attr(a->s, &conc_keys[a->base][k]) ==
            &conc_vals[a->base][k]);
    for (int k = 0; k < 8; k += 2)
      CHECK_OK(loom_session_set_attr(a->s, &conc_keys[a->base][k], NULL));
    for (int k = 0; k < 8; k++)
      CHECK(loom_session_attr(a->s, &conc_keys[a->base][k]) ==
            (k % 2 ? &conc_vals[a->base][k] : NULL));
    if (it % 16 == 0)
      loom_yield();
  }
  atomic_fetch_add(&attr_done, 1);
}

static void ident_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&lenpfx);
  E.keep = true;
  E.echo = true;
  char addr[128];
  loom_server *srv = serve(&o, addr);
  loom_conn *peer;
  CHECK_OK(loom_dial(&peer, "tcp", addr));
  loom_session *s = kept_session();

  /* Identity. */
  CHECK_NE(loom_session_id(s), 0);
  CHECK_EQ(loom_session_id(s), atomic_load(&E.id));
  char local[128], want[300], buf[128];
  CHECK_OK(loom_conn_local_addr(peer, local, sizeof local));
  snprintf(want, sizeof want, "tcp %s<-%s", addr, local);
  CHECK_STREQ(loom_session_name(s), want);
  CHECK_OK(loom_session_remote_addr(s, buf, sizeof buf));
  CHECK_STREQ(buf, local);
  CHECK_OK(loom_session_local_addr(s, buf, sizeof buf));
  CHECK_STREQ(buf, addr);
  CHECK_OK(loom_session_set_name(s, "alice"));
  CHECK_STREQ(loom_session_name(s), "alice");
  CHECK_OK(loom_session_set_name(s, "bob"));
  CHECK_STREQ(loom_session_name(s), "bob");

  /* The user pointer: opts.user first (no callback runs meanwhile: the
   * peer is silent and there is no cron). */
  CHECK(loom_session_user(s) == &E);
  loom_session_set_user(s, &other_tag);
  CHECK(loom_session_user(s) == &other_tag);
  loom_session_set_user(s, &E);

  /* Attributes. */
  for (int i = 0; i < 10; i++)
    CHECK(loom_session_attr(s, &attr_keys[i]) == NULL);
  for (int i = 0; i < 10; i++)
    CHECK_OK(loom_session_set_attr(s, &attr_keys[i], &attr_vals[i]));
  for (int i = 0; i < 10; i++)
    CHECK(loom_session_attr(s, &attr_keys[i]) == &attr_vals[i]);
  CHECK_OK(loom_session_set_attr(s, &attr_keys[3], &other_tag));
  CHECK_OK(loom_session_set_attr(s, &attr_keys[5], NULL));
  CHECK_OK(loom_session_set_attr(s, &attr_keys[5], NULL)); /* absent */
  for (int i = 0; i < 10; i++)
    CHECK(loom_session_attr(s, &attr_keys[i]) == (i == 3 ? (void *)&other_tag
                                                  : i == 5
                                                      ? NULL
                                                      : (void *)&attr_vals[i]));
  CHECK(loom_session_attr(s, &other_tag) == NULL);
  for (int c = 0; c < 4; c++) {
    attr_args[c] = (attr_arg){s, c};
    CHECK_OK(loom_go(attr_co, &attr_args[c]));
  }
  WAIT_FOR(atomic_load(&attr_done) == 4, 10);
  for (int i = 0; i < 10; i++) /* untouched by the others */
    CHECK(loom_session_attr(s, &attr_keys[i]) == (i == 3 ? (void *)&other_tag
                                                  : i == 5
                                                      ? NULL
                                                      : (void *)&attr_vals[i]));

  /* Statistics after a known exchange: 3 packages of 10, 100, 1000
   * bytes each way. */
  static uint8_t out[1200], back[1200];
  size_t n = 0;
  for (size_t len = 10; len <= 1000; len *= 10) {
    uint8_t p[1000];
    memset(p, (int)len, len);
    n += frame(out + n, p, len);
  }
  CHECK_EQ(n, 1122);
  CHECK_EQ(loom_write(peer, out, n), (ssize_t)n);
  conn_read_full(peer, back, n);
  CHECK(memcmp(back, out, n) == 0);
  loom_session_stats st;
  WAIT_FOR(
      (loom_session_stats_get(s, &st), st.bytes_out == n && st.pkgs_out == 3),
      5);
  CHECK_EQ(st.bytes_in, n);
  CHECK_EQ(st.pkgs_in, 3);
  CHECK_EQ(st.pkgs_out, 3);
  CHECK_EQ(st.wq_bytes, 0);
  CHECK_GT(st.opened, 0);
  CHECK_LE(st.opened, atomic_load(&E.opened_at));
  CHECK_GE(st.last_read, st.opened);
  CHECK_GE(st.last_write, st.opened);
  CHECK_LE(st.last_read, loom_now());
  CHECK_LE(st.last_write, loom_now());

  CHECK_OK(loom_close(peer));
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  CHECK_EQ(E.final.bytes_in, n);
  CHECK_EQ(E.final.bytes_out, n);
  CHECK_EQ(E.final.pkgs_in, 3);
  CHECK_EQ(E.final.pkgs_out, 3);
  CHECK_EQ(atomic_load(&E.errs), 0);
  loom_session_unref(s);
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}
TEST(identity_attrs_user_stats) { run(ident_main, 2, "identity"); }

/* ------------------------------------------------------------------ */
/* 10. Metrics and their Prometheus text.                               */

static void metrics_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&lenpfx);
  E.echo = true;
  char addr[128];
  loom_server *srv = serve(&o, addr);
  loom_metrics m0 = metrics(srv);
  CHECK_EQ(m0.sessions_total, 0);
  CHECK_EQ(m0.bytes_in, 0);

  /* Peer i sends i + 1 packages of 50 * (j + 1) bytes and reads the
   * echoes; the last one then sends half a frame and ends its stream. */
  uint64_t bytes = 0, pkgs = 0;
  loom_conn *peers[3];
  for (int i = 0; i < 3; i++) {
    CHECK_OK(loom_dial(&peers[i], "tcp", addr));
    for (int j = 0; j <= i; j++) {
      uint8_t p[200], f[204], back[204];
      size_t len = 50 * (size_t)(j + 1);
      memset(p, 'a' + i, len);
      size_t n = frame(f, p, len);
      CHECK_EQ(loom_write(peers[i], f, n), (ssize_t)n);
      conn_read_full(peers[i], back, n);
      CHECK(memcmp(back, f, n) == 0);
      bytes += n;
      pkgs++;
    }
  }
  const uint8_t part[] = {0, 0, 0, 10, 'x'};
  CHECK_EQ(loom_write(peers[2], part, sizeof part), (ssize_t)sizeof part);
  CHECK_OK(loom_shutdown(peers[2], SHUT_WR));
  conn_expect_eof(peers[2]);
  for (int i = 0; i < 3; i++)
    CHECK_OK(loom_close(peers[i]));
  WAIT_FOR(atomic_load(&E.closes) == 3 && metrics(srv).sessions_open == 0, 5);

  loom_metrics m = metrics(srv);
  CHECK_EQ(m.sessions_total, 3);
  CHECK_EQ(m.sessions_open, 0);
  CHECK_EQ(m.bytes_in, bytes + sizeof part);
  CHECK_EQ(m.bytes_out, bytes);
  CHECK_EQ(m.pkgs_in, pkgs);
  CHECK_EQ(m.pkgs_out, pkgs);
  CHECK_EQ(m.wq_bytes, 0);
  CHECK_EQ(m.wq_max, 0);
  CHECK_EQ(m.pool_queued, 0);
  CHECK_EQ(m.errors.decode, 1);
#define ZERO_BUT_DECODE_(name, help)                                           \
  if (strcmp(#name, "decode") != 0)                                            \
    CHECKF(m.errors.name == 0, "errors.%s = %llu", #name,                      \
           (unsigned long long)m.errors.name);
  LOOM_METRIC_ERRORS(ZERO_BUT_DECODE_)
#undef ZERO_BUT_DECODE_
  CHECK_EQ(atomic_load(&E.errs), 1);

  static char text[8192], text2[8192], small[8192];
  int n = loom_metrics_prometheus(&m, NULL, text, sizeof text);
  CHECK_GT(n, 0);
  CHECK_EQ((size_t)n, strlen(text));
  char line_[128];
  CHECK(strstr(text, "\nloom_sessions_total 3\n") != NULL);
  CHECK(strstr(text, "\nloom_sessions_open 0\n") != NULL);
  CHECK(strstr(text, "# TYPE loom_sessions_total counter\n") != NULL);
  CHECK(strstr(text, "loom_errors_total{kind=\"decode\"} 1\n") != NULL);
  snprintf(line_, sizeof line_, "\nloom_bytes_in_total %llu\n",
           (unsigned long long)m.bytes_in);
  CHECK(strstr(text, line_) != NULL);
  snprintf(line_, sizeof line_, "\nloom_packages_out_total %llu\n",
           (unsigned long long)m.pkgs_out);
  CHECK(strstr(text, line_) != NULL);
  CHECK(strstr(text, "\nloom_packages_dropped_total 0\n") != NULL);
#define KIND_LINE_(name, help)                                                 \
  snprintf(line_, sizeof line_, "loom_errors_total{kind=\"%s\"} %llu\n",       \
           #name, (unsigned long long)m.errors.name);                          \
  CHECKF(strstr(text, line_) != NULL, "no line %s", line_);
  LOOM_METRIC_ERRORS(KIND_LINE_)
#undef KIND_LINE_

  int n2 = loom_metrics_prometheus(&m, "edge", text2, sizeof text2);
  CHECK_GT(n2, 0);
  CHECK(strstr(text2, "\nedge_sessions_total 3\n") != NULL);
  CHECK(strstr(text2, "edge_errors_total{kind=\"decode\"} 1\n") != NULL);
  CHECK(strstr(text2, "loom_") == NULL);
  /* A prefix that would make names Prometheus refuses is refused. */
  static const char *const bad[] = {"my-app", "", "9lives", "a b", "x.y"};
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
    CHECKF(loom_metrics_prometheus(&m, bad[i], small, sizeof small) == -EINVAL,
           "prefix \"%s\" taken", bad[i]);
  CHECK_GT(loom_metrics_prometheus(&m, "app:edge_2", small, sizeof small), 0);

  /* Room for the text and its NUL, not one byte less. */
  CHECK_ERR(loom_metrics_prometheus(&m, NULL, small, (size_t)n), -ENOSPC);
  CHECK_ERR(loom_metrics_prometheus(&m, NULL, small, 16), -ENOSPC);
  CHECK_EQ(loom_metrics_prometheus(&m, NULL, small, (size_t)n + 1), n);
  CHECK_STREQ(small, text);
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}
TEST(metrics_and_prometheus) { run(metrics_main, 2, "metrics"); }

/* The metrics' totals are counters (Prometheus reads a fall as a
 * restart): sampled all along while replies go out in pieces to a peer
 * that reads slowly, then is reset under a batch, bytes_out and pkgs_out
 * never go down, and end exact. */
static atomic_int flood_sent;
static void flood_replies(loom_session *s, const loom_pkg *pkg) {
  (void)pkg;
  static uint8_t reply[60000];
  for (int i = 0; i < 64; i++) {
    if (loom_session_write(s, reply, sizeof reply, -1) < 0)
      break;
    atomic_fetch_add(&flood_sent, 1);
  }
}

static loom_server *_Atomic sampled_srv;
static atomic_int sampling, sample_falls, samples;
static void sample_metrics(void *arg) {
  (void)arg;
  loom_metrics prev = metrics(atomic_load(&sampled_srv)), m;
  while (atomic_load(&sampling)) {
    m = metrics(atomic_load(&sampled_srv));
    if (m.pkgs_out < prev.pkgs_out || m.bytes_out < prev.bytes_out)
      atomic_fetch_add(&sample_falls, 1);
    prev = m;
    atomic_fetch_add(&samples, 1);
    loom_yield();
  }
  atomic_store(&sampling, -1);
}

static void counters_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&lenpfx);
  o.sndbuf = 4096;
  E.msg = flood_replies;
  char addr[128];
  loom_server *srv = serve(&o, addr);
  atomic_store(&sampled_srv, srv);
  atomic_store(&sampling, 1);
  CHECK_OK(loom_go(sample_metrics, NULL));
  int fd = raw_dial(addr, 4096);
  CHECK_EQ(write(fd, "\0\0\0\0", 4), 4);
  /* Read slowly: replies leave in pieces, a batch at a time. */
  static uint8_t sink[16384];
  int64_t end = loom_now() + 300 * CHECK_MS;
  while (loom_now() < end) {
    (void)loom_fd_wait(fd, LOOM_FD_READ, loom_now() + 10 * CHECK_MS);
    (void)read(fd, sink, 1000);
    loom_sleep(CHECK_MS);
  }
  CHECK_GT(metrics(srv).wq_bytes, 0); /* a batch waits for room */
  struct linger lg = {1, 0};          /* reset: the batch under way fails */
  CHECK_EQ(setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg), 0);
  CHECK_EQ(close(fd), 0);
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  loom_sleep(20 * CHECK_MS);
  atomic_store(&sampling, 0);
  WAIT_FOR(atomic_load(&sampling) == -1, 5);
  loom_metrics m = metrics(srv);
  printf("%d samples; %d writes accepted: pkgs_out %llu, dropped %llu\n",
         atomic_load(&samples), atomic_load(&flood_sent),
         (unsigned long long)m.pkgs_out, (unsigned long long)m.pkgs_dropped);
  CHECK_EQ(atomic_load(&sample_falls), 0);
  CHECK_EQ(m.pkgs_out + m.pkgs_dropped, (uint64_t)atomic_load(&flood_sent));
  CHECK_EQ(m.pkgs_out, E.final.pkgs_out);
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}
TEST(metrics_counters_never_go_down) { run(counters_main, 2, "counters"); }

/* ------------------------------------------------------------------ */
/* 11. The task pool on its own.                                        */

static loom_sema gate;
static atomic_int gate_started, tasks_ran;

static void blocker(void *arg) {
  (void)arg;
  atomic_fetch_add(&gate_started, 1);
  CHECK_OK(loom_sema_acquire(&gate, 0));
  atomic_fetch_add(&tasks_ran, 1);
}
static void count_task(void *arg) {
  (void)arg;
  atomic_fetch_add(&tasks_ran, 1);
}

/* A full queue: NOWAIT is -EAGAIN, a deadline is -ETIMEDOUT; the other
 * queue still takes tasks. */
static void tp_full_main(void *arg) {
  (void)arg;
  loom_taskpool *p;
  loom_taskpool_opts o = {.queues = 2, .workers = 1, .queue_len = 2};
  CHECK_OK(loom_taskpool_make(&p, &o));
  CHECK_EQ(loom_taskpool_queues(p), 2);
  CHECK_OK(loom_taskpool_submit(p, 0, blocker, NULL, 0));
  WAIT_FOR(atomic_load(&gate_started) == 1, 5); /* the worker holds it */
  CHECK_OK(loom_taskpool_submit(p, 2, count_task, NULL, 0));
  CHECK_OK(loom_taskpool_submit(p, 4, count_task, NULL, LOOM_TASKPOOL_NOWAIT));
  CHECK_EQ(loom_taskpool_queued(p), 2);
  CHECK_EQ(loom_taskpool_queue_len(p, 0), 2); /* both in queue 0 */
  CHECK_EQ(loom_taskpool_queue_len(p, 1), 0);
  CHECK_EQ(loom_taskpool_queue_len(p, 2), 0); /* no such queue */
  CHECK_EQ(loom_taskpool_queue_len(p, -1), 0);
  CHECK_ERR(loom_taskpool_submit(p, 0, count_task, NULL, LOOM_TASKPOOL_NOWAIT),
            -EAGAIN);
  CHECK_ERR(
      loom_taskpool_submit(p, 1000, count_task, NULL, LOOM_TASKPOOL_NOWAIT),
      -EAGAIN); /* 1000 % 2 == 0: the same queue */
  int64_t t0 = loom_now();
  CHECK_ERR(
      loom_taskpool_submit(p, 6, count_task, NULL, loom_now() + 50 * CHECK_MS),
      -ETIMEDOUT);
  int64_t el = loom_now() - t0;
  CHECKF(el >= 25 * CHECK_MS && el < 10 * SEC, "waited %lld ms",
         (long long)(el / CHECK_MS));
  CHECK_EQ(loom_taskpool_queued(p), 2);
  /* Queue 1 is free. */
  CHECK_OK(loom_taskpool_submit(p, 1, count_task, NULL, LOOM_TASKPOOL_NOWAIT));
  WAIT_FOR(atomic_load(&tasks_ran) == 1, 5);
  loom_sema_release(&gate);
  WAIT_FOR(atomic_load(&tasks_ran) == 4, 5);
  CHECK_EQ(loom_taskpool_queued(p), 0);
  loom_taskpool_close(p);
  CHECK_EQ(atomic_load(&tasks_ran), 4);
}
TEST(taskpool_nowait_and_deadline) { run(tp_full_main, 2, "taskpool full"); }

/* loom_taskpool_close runs every queued task, in order per queue, before
 * it returns. */
static int order_log[2][64];
static atomic_int order_n[2];
static void order_task(void *arg) {
  intptr_t v = (intptr_t)arg;
  int q = (int)(v % 2);
  int i = atomic_fetch_add(&order_n[q], 1);
  order_log[q][i] = (int)(v / 2);
  atomic_fetch_add(&tasks_ran, 1);
}
static void release_gate_later(void *arg) {
  (void)arg;
  loom_sleep(30 * CHECK_MS);
  loom_sema_release(&gate);
  loom_sema_release(&gate);
}

static void tp_close_main(void *arg) {
  (void)arg;
  loom_taskpool *p;
  loom_taskpool_opts o = {.queues = 2, .workers = 1, .queue_len = 64};
  CHECK_OK(loom_taskpool_make(&p, &o));
  CHECK_OK(loom_taskpool_submit(p, 0, blocker, NULL, 0));
  CHECK_OK(loom_taskpool_submit(p, 1, blocker, NULL, 0));
  WAIT_FOR(atomic_load(&gate_started) == 2, 5);
  for (intptr_t i = 0; i < 64; i++)
    for (int q = 0; q < 2; q++)
      CHECK_OK(loom_taskpool_submit(p, (uint64_t)q, order_task,
                                    (void *)(i * 2 + q), LOOM_TASKPOOL_NOWAIT));
  CHECK_EQ(loom_taskpool_queued(p), 128);
  CHECK_OK(loom_go(release_gate_later, NULL));
  loom_taskpool_close(p);
  CHECK_EQ(atomic_load(&tasks_ran), 130);
  for (int q = 0; q < 2; q++) {
    CHECK_EQ(atomic_load(&order_n[q]), 64);
    for (int i = 0; i < 64; i++)
      CHECK_EQ(order_log[q][i], i);
  }
}
TEST(taskpool_close_runs_queued) { run(tp_close_main, 2, "taskpool close"); }

/* A submitter waiting for room when the pool closes gets LOOM_ECLOSED,
 * and its task never runs. */
static atomic_int waiting_rc = 1, waiting_ran;
static loom_taskpool *waiting_pool;
static void never_task(void *arg) {
  (void)arg;
  atomic_store(&waiting_ran, 1);
}
static void waiting_submitter(void *arg) {
  (void)arg;
  atomic_store(&waiting_rc,
               loom_taskpool_submit(waiting_pool, 0, never_task, NULL, 0));
}

static void tp_waiting_main(void *arg) {
  (void)arg;
  loom_taskpool_opts o = {.queues = 1, .workers = 1, .queue_len = 1};
  CHECK_OK(loom_taskpool_make(&waiting_pool, &o));
  CHECK_OK(loom_taskpool_submit(waiting_pool, 0, blocker, NULL, 0));
  WAIT_FOR(atomic_load(&gate_started) == 1, 5);
  CHECK_OK(loom_taskpool_submit(waiting_pool, 0, count_task, NULL, 0));
  CHECK_OK(loom_go(waiting_submitter, NULL));
  loom_sleep(50 * CHECK_MS);
  CHECK_EQ(atomic_load(&waiting_rc), 1); /* parked for room */
  CHECK_OK(loom_go(release_gate_later, NULL));
  loom_taskpool_close(waiting_pool);
  WAIT_FOR(atomic_load(&waiting_rc) != 1, 5);
  CHECK_ERR(atomic_load(&waiting_rc), LOOM_ECLOSED);
  CHECK_EQ(atomic_load(&waiting_ran), 0);
  CHECK_EQ(atomic_load(&tasks_ran), 2);
}
TEST(taskpool_close_releases_waiting_submitter) {
  run(tp_waiting_main, 2, "taskpool waiting submitter");
}

/* Submitters whose deadline for room runs out just as the pool closes:
 * each returns -ETIMEDOUT or LOOM_ECLOSED, and none touches the pool's
 * queues once loom_taskpool_close has freed them.  (A submitter whose
 * deadline fired is woken by its timer, not by the close; it then takes
 * itself off the queue's waiters under the queue's lock, and a close
 * that ran meanwhile has freed that queue.) */
static loom_taskpool *race_pool;
static loom_sema race_gate;
static atomic_int race_started, race_done, race_bad;
static _Atomic int64_t race_deadline;
static void race_blocker(void *arg) {
  (void)arg;
  CHECK_OK(loom_sema_acquire(&race_gate, 0));
}
static void race_submitter(void *arg) {
  (void)arg;
  /* From here to inside the submit there is no scheduling point. */
  atomic_fetch_add(&race_started, 1);
  int rc = loom_taskpool_submit(race_pool, 0, count_task, NULL,
                                atomic_load(&race_deadline));
  if (rc != -ETIMEDOUT && rc != LOOM_ECLOSED)
    atomic_fetch_add(&race_bad, 1);
  atomic_fetch_add(&race_done, 1);
}
static void tp_deadline_race_main(void *arg) {
  (void)arg;
  enum { SUBS = 32 };
  int rounds = CHECK_SCALE(400, 300, 100);
  for (int r = 0; r < rounds; r++) {
    loom_taskpool_opts o = {.queues = 1, .workers = 1, .queue_len = 1};
    CHECK_OK(loom_taskpool_make(&race_pool, &o));
    CHECK_OK(loom_taskpool_submit(race_pool, 0, race_blocker, NULL, 0));
    /* The worker holds the blocker; one more task fills the queue. */
    WAIT_FOR(loom_taskpool_queued(race_pool) == 0, 5);
    CHECK_OK(loom_taskpool_submit(race_pool, 0, count_task, NULL,
                                  LOOM_TASKPOOL_NOWAIT));
    atomic_store(&race_done, 0);
    atomic_store(&race_started, 0);
    int64_t wait = (int64_t)(r % 5) * 500000 + 1000000; /* 1..3 ms */
    atomic_store(&race_deadline, loom_now() + wait);
    for (int i = 0; i < SUBS; i++)
      CHECK_OK(loom_go(race_submitter, NULL));
    /* A submit must have begun before the close does (taskpool.h): a
     * submitter that had not run yet when a slow machine reached the
     * close called into a freed pool. */
    WAIT_FOR(atomic_load(&race_started) == SUBS, 5);
    int64_t left = atomic_load(&race_deadline) - loom_now();
    if (left > 0)
      loom_sleep(left);
    loom_sema_release(&race_gate);
    loom_taskpool_close(race_pool);
    WAIT_FOR(atomic_load(&race_done) == SUBS, 5);
  }
  CHECK_EQ(atomic_load(&race_bad), 0);
}
TEST(taskpool_close_vs_submit_deadline) {
  run(tp_deadline_race_main, 2, "taskpool close vs submit deadline");
}

/* Per-key order with one worker per queue: 8 submitters x 5000 tasks on
 * keys 0..15 over 4 queues (small, so submitters wait for room).  Each
 * task checks that its (submitter, key) sequence goes up by one and that
 * no other task of its queue runs at the same time. */
enum { KO_SUBS = 8, KO_KEYS = 16, KO_QUEUES = 4 };
typedef struct ko_task {
  uint16_t sub, key;
  uint32_t seq;
} ko_task;
static ko_task *ko_tasks[KO_SUBS];
static int ko_per_sub;
static int64_t ko_last[KO_SUBS][KO_KEYS];
static atomic_int ko_busy[KO_QUEUES], ko_ran, ko_subs_done;
static loom_taskpool *ko_pool;

static void ko_run(void *arg) {
  ko_task *t = arg;
  int q = t->key % KO_QUEUES;
  CHECK_EQ(atomic_fetch_add(&ko_busy[q], 1), 0);
  CHECK_EQ(ko_last[t->sub][t->key] + 1, (int64_t)t->seq);
  ko_last[t->sub][t->key] = t->seq;
  if (t->seq % 64 == 0)
    loom_yield(); /* give another worker the chance to break the rule */
  atomic_fetch_sub(&ko_busy[q], 1);
  atomic_fetch_add(&ko_ran, 1);
}

static void ko_submitter(void *arg) {
  int sub = (int)(intptr_t)arg;
  uint32_t seq[KO_KEYS] = {0};
  uint64_t x = (uint64_t)sub * 0x9e3779b97f4a7c15u + 1;
  for (int i = 0; i < ko_per_sub; i++) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    uint16_t key = (uint16_t)(x % KO_KEYS);
    ko_task *t = &ko_tasks[sub][i];
    *t = (ko_task){(uint16_t)sub, key, seq[key]++};
    CHECK_OK(loom_taskpool_submit(ko_pool, key, ko_run, t, 0));
  }
  atomic_fetch_add(&ko_subs_done, 1);
}

static void ko_main(void *arg) {
  (void)arg;
  ko_per_sub = CHECK_SCALE(5000, 5000, 2000);
  for (int s = 0; s < KO_SUBS; s++) {
    ko_tasks[s] = calloc((size_t)ko_per_sub, sizeof(ko_task));
    CHECK(ko_tasks[s] != NULL);
    for (int k = 0; k < KO_KEYS; k++)
      ko_last[s][k] = -1;
  }
  loom_taskpool_opts o = {.queues = KO_QUEUES, .workers = 1, .queue_len = 16};
  CHECK_OK(loom_taskpool_make(&ko_pool, &o));
  for (intptr_t s = 0; s < KO_SUBS; s++)
    CHECK_OK(loom_go(ko_submitter, (void *)s));
  WAIT_FOR(atomic_load(&ko_subs_done) == KO_SUBS, 20);
  loom_taskpool_close(ko_pool);
  CHECK_EQ(atomic_load(&ko_ran), KO_SUBS * ko_per_sub);
  for (int s = 0; s < KO_SUBS; s++)
    free(ko_tasks[s]);
}
TEST(taskpool_key_order) { run(ko_main, 2, "taskpool key order"); }

/* loom_taskpool_close frees the pool once its workers are done: again
 * and again, with the last worker on another thread finishing as close
 * looks.  (A worker still inside its loom_wg_done when the pool is freed
 * is a use after free; ASan may miss the window, TSan sees it.) */
static void tp_churn_main(void *arg) {
  (void)arg;
  int rounds = CHECK_SCALE(2000, 2000, 2000);
  for (int i = 0; i < rounds; i++) {
    loom_taskpool *p;
    loom_taskpool_opts o = {.queues = 2, .workers = 1, .queue_len = 4};
    CHECK_OK(loom_taskpool_make(&p, &o));
    CHECK_OK(loom_taskpool_submit(p, (uint64_t)i, count_task, NULL, 0));
    if (i % 2)
      loom_yield();
    loom_taskpool_close(p);
    CHECK_EQ(atomic_load(&tasks_ran), i + 1);
  }
}
TEST(taskpool_close_churn) { run(tp_churn_main, 2, "taskpool churn"); }

/* Submitting from a plain thread blocks that thread for room. */
static atomic_int thread_done;
static void *thread_submitter(void *arg) {
  loom_taskpool *p = arg;
  for (intptr_t i = 0; i < 1000; i++)
    CHECK_OK(loom_taskpool_submit(p, 0, count_task, NULL, 0));
  atomic_store(&thread_done, 1);
  return NULL;
}

static void tp_thread_main(void *arg) {
  (void)arg;
  loom_taskpool *p;
  loom_taskpool_opts o = {.queues = 1, .workers = 1, .queue_len = 4};
  CHECK_OK(loom_taskpool_make(&p, &o));
  pthread_t t;
  CHECK_EQ(pthread_create(&t, NULL, thread_submitter, p), 0);
  WAIT_FOR(atomic_load(&thread_done), 10);
  CHECK_EQ(pthread_join(t, NULL), 0);
  loom_taskpool_close(p);
  CHECK_EQ(atomic_load(&tasks_ran), 1000);
}
TEST(taskpool_submit_from_thread) { run(tp_thread_main, 2, "taskpool thread"); }

/* ------------------------------------------------------------------ */
/* 12. Many coroutines writing to one session.                          */

/* Package of writer w, number seq: [w][seq, 4 bytes BE][len bytes]. */
enum { MW_MAX = 32, MW_WQ = 64 * 1024 };
static int mw_writers, mw_per;
static uint32_t mw_next[MW_MAX];
static atomic_int mw_got, mw_written;
static loom_session *mw_s;

static size_t mw_len(int w, uint32_t seq) {
  return ((size_t)seq * 131 + (size_t)w * 17) % 3000;
}
static uint8_t mw_byte(int w, uint32_t seq, size_t i) {
  return (uint8_t)(w * 31 + seq * 7 + i);
}

static void mw_check(const uint8_t *p, size_t n) {
  CHECK_GE(n, 5);
  int w = p[0];
  uint32_t seq = get_be32(p + 1);
  CHECK_LT(w, mw_writers);
  CHECKF(seq == mw_next[w], "writer %d: package %u after %u", w, seq,
         mw_next[w]);
  mw_next[w]++;
  size_t len = mw_len(w, seq);
  CHECK_EQ(n, 5 + len);
  for (size_t i = 0; i < len; i++)
    if (p[5 + i] != mw_byte(w, seq, i))
      CHECK_FAIL("writer %d package %u: byte %zu differs", w, seq, i);
  atomic_fetch_add(&mw_got, 1);
}

static void mw_writer(void *arg) {
  int w = (int)(intptr_t)arg;
  uint8_t p[5 + 3000];
  for (uint32_t seq = 0; seq < (uint32_t)mw_per; seq++) {
    size_t len = mw_len(w, seq);
    p[0] = (uint8_t)w;
    put_be32(p + 1, seq);
    for (size_t i = 0; i < len; i++)
      p[5 + i] = mw_byte(w, seq, i);
    CHECK_OK(loom_session_write(mw_s, p, 5 + len, -1));
    if (seq % 32 == 0)
      loom_yield();
  }
  atomic_fetch_add(&mw_written, 1);
}

/* Until the writers are done: the queue stays under wq_high + one
 * package. */
static atomic_int mw_sampler_done;
static void mw_sampler(void *arg) {
  (void)arg;
  while (atomic_load(&mw_written) < mw_writers) {
    loom_session_stats st;
    loom_session_stats_get(mw_s, &st);
    CHECKF(st.wq_bytes <= MW_WQ + 4 + 5 + 3000, "wq_bytes %zu", st.wq_bytes);
    loom_sleep(CHECK_MS / 4);
  }
  atomic_store(&mw_sampler_done, 1);
}

static void mw_start(loom_session *s) {
  mw_s = s;
  for (intptr_t w = 0; w < mw_writers; w++)
    CHECK_OK(loom_go(mw_writer, (void *)w));
  CHECK_OK(loom_go(mw_sampler, NULL));
}

/* A raw peer reads the stream and checks every frame. */
static void mw_plain_main(void *arg) {
  (void)arg;
  codecs_init();
  mw_writers = CHECK_SCALE(16, 16, 8);
  mw_per = CHECK_SCALE(400, 200, 100);
  loom_server_opts o = server_opts(&lenpfx);
  o.session.wq_high = MW_WQ;
  E.keep = true;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  mw_start(kept_session());
  static uint8_t buf[1 << 16];
  size_t have = 0;
  int total = mw_writers * mw_per;
  CHECK_OK(loom_set_read_deadline(peer, loom_now() + 20 * SEC));
  while (atomic_load(&mw_got) < total) {
    ssize_t k = loom_read(peer, buf + have, sizeof buf - have);
    CHECKF(k > 0, "read %zd after %d packages", k, atomic_load(&mw_got));
    have += (size_t)k;
    size_t off = 0;
    while (have - off >= 4) {
      uint32_t len = get_be32(buf + off);
      CHECK_LE(len, 5 + 3000);
      if (have - off < 4 + (size_t)len)
        break;
      mw_check(buf + off + 4, len);
      off += 4 + len;
    }
    memmove(buf, buf + off, have - off);
    have -= off;
  }
  CHECK_EQ(have, 0);
  WAIT_FOR(atomic_load(&mw_sampler_done), 5);
  loom_session_stats st;
  /* Counted once the send returned: the peer may have read it first. */
  WAIT_FOR((loom_session_stats_get(mw_s, &st), st.pkgs_out == (uint64_t)total),
           5);
  CHECK_EQ(st.pkgs_out, total);
  CHECK_EQ(atomic_load(&E.errs), 0);
  CHECK_OK(loom_close(peer));
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  loom_session_unref(mw_s);
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}
TEST(many_writers_one_session) { run(mw_plain_main, 2, "many writers"); }

/* A graceful close while many coroutines write: every write that
 * returned 0 reaches the peer, in order per writer, and the others fail
 * with LOOM_ECLOSED (loom_session_write: "queued: it will be written
 * unless the session dies first"; nothing dies here). */
static atomic_int gcw_ok[16], gcw_done;
static void gcw_writer(void *arg) {
  int w = (int)(intptr_t)arg;
  uint8_t p[5 + 3000];
  for (uint32_t seq = 0;; seq++) {
    size_t len = mw_len(w, seq);
    p[0] = (uint8_t)w;
    put_be32(p + 1, seq);
    for (size_t i = 0; i < len; i++)
      p[5 + i] = mw_byte(w, seq, i);
    int rc = loom_session_write(mw_s, p, 5 + len, (seq & 1) ? -1 : 0);
    if (rc == -EAGAIN)
      rc = loom_session_write(mw_s, p, 5 + len, -1);
    if (rc != 0) {
      CHECKF(rc == LOOM_ECLOSED, "writer %d: %s", w, loom_err_name(rc));
      break;
    }
    atomic_fetch_add(&gcw_ok[w], 1);
    if (seq % 16 == 0)
      loom_yield();
  }
  atomic_fetch_add(&gcw_done, 1);
}

static void gcw_main(void *arg) {
  (void)arg;
  codecs_init();
  mw_writers = 8;
  for (int round = 0; round < CHECK_SCALE(20, 8, 4); round++) {
    memset(&E, 0, sizeof E);
    memset(mw_next, 0, sizeof mw_next);
    for (int w = 0; w < 16; w++)
      atomic_store(&gcw_ok[w], 0);
    atomic_store(&gcw_done, 0);
    atomic_store(&mw_got, 0);
    loom_server_opts o = server_opts(&lenpfx);
    o.session.wq_high = 32 * 1024;
    E.keep = true;
    loom_conn *peer;
    loom_server *srv = serve_dial(&o, &peer);
    mw_s = kept_session();
    for (intptr_t w = 0; w < mw_writers; w++)
      CHECK_OK(loom_go(gcw_writer, (void *)w));
    static uint8_t buf[1 << 16];
    size_t have = 0;
    bool closed = false;
    CHECK_OK(loom_set_read_deadline(peer, loom_now() + 20 * SEC));
    for (;;) {
      if (!closed && atomic_load(&mw_got) >= 200 + round * 37) {
        loom_session_close(mw_s);
        closed = true;
      }
      ssize_t k = loom_read(peer, buf + have, sizeof buf - have);
      if (k == 0)
        break;
      CHECKF(k > 0, "read %zd after %d packages", k, atomic_load(&mw_got));
      have += (size_t)k;
      size_t off = 0;
      while (have - off >= 4) {
        uint32_t len = get_be32(buf + off);
        CHECK_LE(len, 5 + 3000);
        if (have - off < 4 + (size_t)len)
          break;
        mw_check(buf + off + 4, len);
        off += 4 + len;
      }
      memmove(buf, buf + off, have - off);
      have -= off;
    }
    CHECK(closed);
    CHECK_EQ(have, 0);
    WAIT_FOR(atomic_load(&gcw_done) == mw_writers, 5);
    WAIT_FOR(atomic_load(&E.closes) == 1, 5);
    CHECKF(atomic_load(&E.errs) == 0, "on_error %s",
           loom_err_name(atomic_load(&E.err)));
    for (int w = 0; w < mw_writers; w++)
      CHECKF((uint32_t)atomic_load(&gcw_ok[w]) == mw_next[w],
             "round %d writer %d: %d writes returned 0, %u arrived", round, w,
             atomic_load(&gcw_ok[w]), mw_next[w]);
    loom_session_unref(mw_s);
    CHECK_OK(loom_close(peer));
    CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
  }
}
TEST(graceful_close_under_writers_delivers_every_accepted_write) {
  run(gcw_main, 2, "graceful close under writers");
}

/* The same through compression, read by a compressing loom_client. */
static void mw_client_msg(loom_session *s, const loom_pkg *pkg) {
  (void)s;
  mw_check(pkg->data, pkg->len);
}

static void mw_compressed_main(void *arg) {
  (void)arg;
  codecs_init();
  mw_writers = CHECK_SCALE(16, 16, 8);
  mw_per = CHECK_SCALE(300, 150, 60);
  loom_server_opts o = server_opts(&lenpfx);
  o.session.wq_high = MW_WQ;
  o.session.compress = 6;
  E.keep = true;
  char addr[128];
  loom_server *srv = serve(&o, addr);
  loom_client_opts co = client_opts(addr, &lenpfx);
  co.session.compress = 6;
  CE.msg = mw_client_msg;
  loom_client *cl;
  CHECK_OK(loom_client_start(&cl, &co));
  mw_start(kept_session());
  int total = mw_writers * mw_per;
  WAIT_FOR(atomic_load(&mw_got) == total, 20);
  WAIT_FOR(atomic_load(&mw_sampler_done), 5);
  CHECK_EQ(atomic_load(&E.errs), 0);
  CHECK_EQ(atomic_load(&CE.errs), 0);
  CHECK_OK(loom_client_close(cl, loom_now() + 5 * SEC));
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  loom_session_unref(mw_s);
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}
TEST(many_writers_compressed) {
  run(mw_compressed_main, 2, "many writers zlib");
}

/* ---- cron under a peer that keeps the socket full ---------------- */

/* A handler that takes a millisecond per package and a peer that keeps
 * sending: every read fills its buffer and none waits.  The cron rides
 * on the read deadline, which stops a read even when bytes are there,
 * so on_cron still runs every cron_period (engine.h). */
static void slow_msg(loom_session *s, const loom_pkg *pkg) {
  (void)s;
  (void)pkg;
  loom_sleep(CHECK_MS);
}

static void cron_busy_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(NULL); /* raw: every read a package */
  o.session.cron_period = 20 * CHECK_MS;
  E.msg = slow_msg;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  WAIT_FOR(atomic_load(&E.opens) == 1, 5);
  static uint8_t chunk[65536];
  int64_t t0 = loom_now(), end = t0 + 600 * CHECK_MS;
  while (loom_now() < end)
    CHECK_EQ(loom_write(peer, chunk, sizeof chunk), (ssize_t)sizeof chunk);
  int n = atomic_load(&E.crons);
  /* About 30 are due; before, a busy peer got none. */
  CHECKF(n >= 5, "%d crons in %lld ms of a busy peer (cron every 20 ms)", n,
         (long long)((loom_now() - t0) / CHECK_MS));
  finish(srv, peer);
}
TEST(cron_runs_under_a_busy_peer) { run(cron_busy_main, 2, "cron busy"); }

/* ---- a server or a client closed from its own session's callback ---- */

/* Closing from inside a callback of one of its own sessions cannot wait
 * for that session (it ends after the callback returns): the close goes
 * on in a coroutine of its own, and every session still gets on_close. */
/* Atomic: the callback learns of the close through the socket, which
 * TSan does not see as an order between threads. */
static loom_server *_Atomic self_srv;
static loom_client *_Atomic self_cl;
static atomic_int self_called, self_returned, self_rc;

/* Close the client if the case made one, else the server; once. */
static void close_self_once(void) {
  if (atomic_exchange(&self_called, 1) != 0)
    return;
  int64_t deadline = loom_now() + 200 * CHECK_MS;
  loom_client *cl = atomic_load(&self_cl);
  atomic_store(&self_rc, cl != NULL ? loom_client_close(cl, deadline)
                                    : loom_server_close(atomic_load(&self_srv), deadline));
  atomic_store(&self_returned, 1);
}

static void close_server_in_cb(loom_session *s) {
  (void)s;
  close_self_once();
}

/* on_closed, recorded: how often, with what, and how many of the
 * sessions' on_close had run by then. */
typedef struct closed_rec {
  ev *e;
  atomic_int calls, rc, closes;
} closed_rec;
static void record_closed(void *arg, int rc) {
  closed_rec *c = arg;
  atomic_store(&c->closes, atomic_load(&c->e->closes));
  atomic_store(&c->rc, rc);
  atomic_fetch_add(&c->calls, 1);
}
/* Wait for it, then check it came once, after `closes` on_close calls. */
static void check_closed(closed_rec *c, int closes) {
  WAIT_FOR(atomic_load(&c->calls) > 0, 5);
  loom_sleep(20 * CHECK_MS);
  CHECK_EQ(atomic_load(&c->calls), 1);
  CHECK_OK(atomic_load(&c->rc));
  CHECK_EQ(atomic_load(&c->closes), closes);
}

static void close_from_on_close_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&line);
  static closed_rec done = {.e = &E};
  o.on_closed = record_closed;
  o.closed_arg = &done;
  E.close = close_server_in_cb;
  loom_conn *peer;
  atomic_store(&self_srv, serve_dial(&o, &peer));
  WAIT_FOR(atomic_load(&E.opens) == 1, 5);
  CHECK_OK(loom_close(peer)); /* end of stream: graceful close, on_close */
  WAIT_FOR(atomic_load(&self_returned), 5);
  CHECK_OK(atomic_load(&self_rc));
  check_closed(&done, 1);
}
TEST(server_closed_from_on_close) {
  run(close_from_on_close_main, 2, "server closed from on_close");
}

/* From a pooled on_message, with the pool's only worker, while a second
 * session has packages queued behind it in the same pool: a close that
 * waited there would wait for itself. */
static void close_server_in_msg(loom_session *s, const loom_pkg *pkg) {
  if (pkg->len == 4 && memcmp(pkg->data, "quit", 4) == 0)
    close_server_in_cb(s);
}

static void close_from_pool_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_taskpool_opts po = {.queues = 1, .workers = 1, .queue_len = 64};
  loom_taskpool *pool;
  CHECK_OK(loom_taskpool_make(&pool, &po));
  loom_server_opts o = server_opts(&line);
  o.session.pool = pool;
  static closed_rec done = {.e = &E};
  o.on_closed = record_closed;
  o.closed_arg = &done;
  E.msg = close_server_in_msg;
  char addr[128];
  atomic_store(&self_srv, serve(&o, addr));
  loom_conn *a, *b;
  CHECK_OK(loom_dial(&a, "tcp", addr));
  CHECK_OK(loom_dial(&b, "tcp", addr));
  WAIT_FOR(atomic_load(&E.opens) == 2, 5);
  CHECK_EQ(loom_write(b, "x\nx\nx\n", 6), 6);
  CHECK_EQ(loom_write(a, "quit\n", 5), 5);
  WAIT_FOR(atomic_load(&self_returned), 5);
  CHECK_OK(atomic_load(&self_rc));
  check_closed(&done, 2); /* after both on_close, the caller's too */
  char c;
  CHECK_OK(loom_set_read_deadline(a, loom_now() + 5 * SEC));
  CHECK_EQ(loom_read(a, &c, 1), 0); /* the server closed them */
  CHECK_OK(loom_close(a));
  CHECK_OK(loom_close(b));
  loom_taskpool_close(pool);
}
TEST(server_closed_from_pooled_message) {
  run(close_from_pool_main, 2, "server closed from a pooled on_message");
}

/* From a pooled on_message of another server that shares the pool (a
 * gateway's admin port), with the pool's only worker, while the closed
 * server has a package queued behind that message: a close that waited
 * there would wait, past its deadline, for a package only this worker
 * can run. */
static atomic_int admin_in_msg;
static void close_other_in_msg(loom_session *s, const loom_pkg *pkg) {
  (void)s;
  (void)pkg;
  atomic_store(&admin_in_msg, 1);
  WAIT_FOR(loom_taskpool_queued(atomic_load(&E.pool)) > 0, 5);
  close_self_once();
}

static void close_other_from_pool_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_taskpool_opts po = {.queues = 1, .workers = 1, .queue_len = 64};
  loom_taskpool *pool;
  CHECK_OK(loom_taskpool_make(&pool, &po));
  atomic_store(&E.pool, pool);
  loom_server_opts ao = server_opts(&line); /* the admin server */
  ao.session.pool = pool;
  ao.session.user = &CE;
  CE.msg = close_other_in_msg;
  loom_server_opts o = server_opts(&line); /* the one it closes */
  o.session.pool = pool;
  static closed_rec done = {.e = &E};
  o.on_closed = record_closed;
  o.closed_arg = &done;
  char aaddr[128], addr[128];
  loom_server *admin = serve(&ao, aaddr);
  atomic_store(&self_srv, serve(&o, addr));
  loom_conn *a, *b;
  CHECK_OK(loom_dial(&a, "tcp", aaddr));
  CHECK_OK(loom_dial(&b, "tcp", addr));
  WAIT_FOR(atomic_load(&CE.opens) == 1 && atomic_load(&E.opens) == 1, 5);
  CHECK_EQ(loom_write(a, "quit\n", 5), 5);
  WAIT_FOR(atomic_load(&admin_in_msg), 5);
  CHECK_EQ(loom_write(b, "x\n", 2), 2); /* queued behind the quit */
  WAIT_FOR(atomic_load(&self_returned), 5);
  CHECK_OK(atomic_load(&self_rc));
  check_closed(&done, 1);
  CHECK_EQ(atomic_load(&E.msgs), 1); /* handled, not dropped */
  CHECK_OK(loom_close(a));
  CHECK_OK(loom_close(b));
  CHECK_OK(loom_server_close(admin, loom_now() + 5 * SEC));
  loom_taskpool_close(pool);
}
TEST(server_closed_from_a_pooled_message_of_another_server) {
  run(close_other_from_pool_main, 2,
      "server closed from another server's pooled on_message");
}

static void close_client_in_msg(loom_session *s, const loom_pkg *pkg) {
  (void)s;
  (void)pkg;
  close_self_once();
}

static void close_client_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts so = server_opts(&line);
  static closed_rec sdone = {.e = &E}, cdone = {.e = &CE};
  so.on_closed = record_closed;
  so.closed_arg = &sdone;
  E.echo = true;
  char addr[128];
  loom_server *srv = serve(&so, addr);
  loom_client_opts co;
  memset(&co, 0, sizeof co);
  co.network = "tcp";
  co.addr = addr;
  co.on_closed = record_closed;
  co.closed_arg = &cdone;
  co.session.listener = &ev_listener;
  co.session.codec = &line;
  co.session.user = &CE;
  CE.msg = close_client_in_msg;
  CE.keep = true;
  loom_client *cl;
  CHECK_OK(loom_client_start(&cl, &co));
  atomic_store(&self_cl, cl);
  WAIT_FOR(atomic_load(&CE.opens) == 1, 5);
  CHECK_OK(loom_session_write(atomic_load(&CE.s), "hi", 2, -1));
  WAIT_FOR(atomic_load(&self_returned), 5); /* the echo's on_message */
  CHECK_OK(atomic_load(&self_rc));
  check_closed(&cdone, 1);
  loom_session_unref(atomic_load(&CE.s));
  WAIT_FOR(atomic_load(&E.closes) == 1, 5); /* the server saw it go */
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
  CHECK_EQ(atomic_load(&sdone.calls), 1); /* before the close returned */
  check_closed(&sdone, 1);
}
TEST(client_closed_from_on_message) {
  run(close_client_main, 2, "client closed from on_message");
}

/* ------------------------------------------------------------------ */
/* Limits at their extremes; packet sessions; a client wait and close. */

/* max_pkg_len = SIZE_MAX means no limit: the read buffer grows for a
 * package of 200 KB (max_pkg_len + 64 used to wrap to 63). */
static void size_max_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&lenpfx);
  o.session.max_pkg_len = SIZE_MAX;
  E.echo = true;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  static uint8_t p[200000], f[200004], back[200004];
  memset(p, 'z', sizeof p);
  size_t n = frame(f, p, sizeof p);
  CHECK_EQ(loom_write(peer, f, n), (ssize_t)n);
  WAIT_FOR(atomic_load(&E.msgs) == 1 || atomic_load(&E.errs) == 1, 5);
  CHECKF(atomic_load(&E.errs) == 0, "session closed with %s",
         loom_err_name(atomic_load(&E.err)));
  conn_read_full(peer, back, n);
  finish(srv, peer);
}
TEST(max_pkg_len_size_max_means_no_limit) {
  run(size_max_main, 2, "max_pkg_len SIZE_MAX");
}

/* engine.h: "Unless noted, calls must be made on a coroutine
 * (LOOM_ENOTCO)".  The calls that may wait answered a plain thread as
 * if it were one: a stream session's write queued (and could wait for
 * room on a futex), a packet session's failed only when it had to wait,
 * and the closes ran.  Now each refuses at once and does nothing. */
typedef struct plain_calls {
  loom_server *srv;
  loom_client *cl;
  loom_session *s;
} plain_calls;
static void *plain_caller(void *arg) {
  plain_calls *p = arg;
  CHECK_ERR(loom_session_write(p->s, "x", 1, -1), LOOM_ENOTCO);
  CHECK_ERR(loom_session_write(p->s, "x", 1, 0), LOOM_ENOTCO);
  struct sockaddr_in to = {.sin_family = AF_INET};
  CHECK_ERR(
      loom_session_write_to(p->s, "x", 1, (struct sockaddr *)&to, sizeof to, 0),
      LOOM_ENOTCO);
  CHECK_ERR(loom_client_wait(p->cl, 1, 0), LOOM_ENOTCO);
  CHECK_ERR(loom_client_close(p->cl, 0), LOOM_ENOTCO);
  CHECK_ERR(loom_server_close(p->srv, 0), LOOM_ENOTCO);
  loom_session *any;
  CHECK_OK(loom_client_session(p->cl, &any)); /* any thread */
  loom_session_unref(any);
  return NULL;
}
static void plain_calls_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&lenpfx);
  char addr[128];
  loom_server *srv = serve(&o, addr);
  loom_client_opts co = client_opts(addr, &lenpfx);
  loom_client *cl;
  plain_calls p = {srv, NULL, NULL};
  p.s = one_session(&co, &cl);
  p.cl = cl;
  pthread_t t;
  CHECK_EQ(pthread_create(&t, NULL, plain_caller, &p), 0);
  loom_block_enter();
  CHECK_EQ(pthread_join(t, NULL), 0);
  loom_block_exit();
  loom_session_stats st;
  loom_session_stats_get(p.s, &st);
  CHECK_EQ(st.pkgs_out, 0); /* nothing was written */
  loom_session_unref(p.s);
  CHECK_OK(loom_client_close(cl, loom_now() + 5 * SEC));
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}
TEST(calls_that_may_wait_refuse_a_plain_thread) {
  run(plain_calls_main, 2, "engine calls from a plain thread");
}

/* A packet server's one session is unconnected: it has no remote
 * address (each package names its sender), and says so with -ENOTCONN
 * (engine.h), as loom_session_name shows it with "-"; its local address
 * is the server's. */
static void udp_addrs_main(void *arg) {
  (void)arg;
  loom_server_opts o = server_opts(NULL);
  o.network = "udp";
  E.keep = true;
  char addr[128], buf[128] = "untouched";
  loom_server *srv = serve(&o, addr);
  loom_session *s = kept_session();
  CHECK_ERR(loom_session_remote_addr(s, buf, sizeof buf), -ENOTCONN);
  CHECK_STREQ(buf, "untouched");
  CHECK_OK(loom_session_local_addr(s, buf, sizeof buf));
  CHECK_STREQ(buf, addr);
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
  CHECK_ERR(loom_session_remote_addr(s, buf, sizeof buf), LOOM_ECLOSED);
  loom_session_unref(s);
}
TEST(udp_server_session_has_no_remote_address) {
  run(udp_addrs_main, 2, "udp session addresses");
}

/* A UDP server with the raw codec: a datagram longer than max_pkg_len
 * counts as oversize, not as malformed (decode). */
static void udp_raw_oversize_main(void *arg) {
  (void)arg;
  loom_server_opts o = server_opts(NULL);
  o.network = "udp";
  o.addr = "127.0.0.1:0";
  o.session.max_pkg_len = 8;
  char addr[128];
  loom_server *srv = serve(&o, addr);
  loom_pconn *pc;
  CHECK_OK(loom_dial_packet(&pc, "udp", addr));
  CHECK_EQ(loom_pconn_write(pc, "0123456789abcdef", 16), 16);
  WAIT_FOR(metrics(srv).bytes_in == 16, 5);
  loom_metrics m = metrics(srv);
  printf("decode=%llu oversize=%llu msgs=%d\n",
         (unsigned long long)m.errors.decode,
         (unsigned long long)m.errors.oversize, atomic_load(&E.msgs));
  CHECK_EQ(m.errors.oversize, 1);
  CHECK_EQ(m.errors.decode, 0);
  CHECK_OK(loom_pconn_close(pc));
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}
TEST(udp_raw_oversize_counted_as_oversize) {
  run(udp_raw_oversize_main, 2, "udp raw oversize");
}

/* A UDP server with the length-prefixed codec and max_pkg_len 16: a
 * datagram of 21 bytes (a 3-byte package and 14 bytes left over) and one
 * of 18 bytes (a header for 16 bytes, 14 of them there) are malformed
 * (-EBADMSG, counted as decode), not oversized: neither is longer than
 * max_pkg_len plus 64 bytes of framing, and neither header asks for more
 * than max_pkg_len. */
static void udp_malformed_not_oversize_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&lenpfx);
  o.network = "udp";
  o.session.max_pkg_len = 16;
  char addr[128];
  loom_server *srv = serve(&o, addr);
  loom_pconn *pc;
  CHECK_OK(loom_dial_packet(&pc, "udp", addr));
  uint8_t leftover[21] = {0, 0, 0, 3, 'a', 'b', 'c'};
  memset(leftover + 7, 'x', 14);
  uint8_t truncated[18] = {0, 0, 0, 16};
  memset(truncated + 4, 'y', 14);
  CHECK_EQ(loom_pconn_write(pc, leftover, sizeof leftover), 21);
  CHECK_EQ(loom_pconn_write(pc, truncated, sizeof truncated), 18);
  WAIT_FOR(metrics(srv).bytes_in == 39, 5);
  loom_metrics m = metrics(srv);
  CHECKF(m.errors.decode == 2 && m.errors.oversize == 0,
         "decode=%llu oversize=%llu", (unsigned long long)m.errors.decode,
         (unsigned long long)m.errors.oversize);
  CHECK_EQ(atomic_load(&E.msgs), 0);
  CHECK_OK(loom_pconn_close(pc));
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}
TEST(udp_malformed_over_max_pkg_len_is_decode) {
  run(udp_malformed_not_oversize_main, 2, "udp malformed, not oversize");
}

/* The descriptor of this process's socket bound to 127.0.0.1:port, or -1. */
static int bound_socket_fd(int port) {
  for (int fd = 3; fd < 1024; fd++) {
    struct sockaddr_in sa;
    socklen_t sl = sizeof sa;
    if (getsockname(fd, (struct sockaddr *)&sa, &sl) == 0 &&
        sa.sin_family == AF_INET && ntohs(sa.sin_port) == port)
      return fd;
  }
  return -1;
}

/* A packet server's rcvbuf and sndbuf size its socket, as they do an
 * accepted connection's: a UDP server is where a receive buffer matters
 * most (datagrams that find it full are lost). */
static void udp_buffers_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&lenpfx);
  o.network = "udp";
  o.rcvbuf = 4096;
  o.sndbuf = 4096;
  char addr[128];
  loom_server *srv = serve(&o, addr);
  int fd = bound_socket_fd(addr_port(addr));
  CHECK(fd >= 0);
  int rcv = 0, snd = 0;
  socklen_t sl = sizeof rcv;
  CHECK(getsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcv, &sl) == 0);
  sl = sizeof snd;
  CHECK(getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &snd, &sl) == 0);
  /* Linux doubles what is asked for; the defaults are far larger. */
  CHECKF(rcv <= 2 * 4096 && snd <= 2 * 4096, "SO_RCVBUF %d, SO_SNDBUF %d", rcv,
         snd);
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}
TEST(udp_server_buffer_sizes_apply) {
  run(udp_buffers_main, 2, "udp server buffer sizes");
}

/* reuseport on a packet server: a second UDP server binds the port of
 * the first, as a second TCP server does (SO_REUSEPORT is how UDP
 * servers spread over sockets). */
static void udp_reuseport_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&lenpfx);
  o.network = "udp";
  o.reuseport = true;
  char addr[128];
  loom_server *a = serve(&o, addr);
  o.addr = addr;
  loom_server *b = NULL;
  int rc = loom_server_start(&b, &o);
  CHECKF(rc == 0, "second server on %s: %s", addr, loom_err_name(rc));
  CHECK_OK(loom_server_close(b, loom_now() + 5 * SEC));
  CHECK_OK(loom_server_close(a, loom_now() + 5 * SEC));
}
TEST(udp_server_reuseport_applies) {
  run(udp_reuseport_main, 2, "udp server reuseport");
}

/* A UDP server whose on_message runs in a task pool, round-robin: the
 * pooled package keeps its sender's address (copied with the package),
 * so each of several peers gets its own replies. */
static void udp_pooled_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_taskpool *pool;
  loom_taskpool_opts po = {.queues = 4, .workers = 2};
  CHECK_OK(loom_taskpool_make(&pool, &po));
  loom_server_opts o = server_opts(&lenpfx);
  o.network = "udp";
  o.session.pool = pool;
  o.session.dispatch = LOOM_DISPATCH_ROUND_ROBIN;
  E.msg = echo_to;
  char addr[128];
  loom_server *srv = serve(&o, addr);
  enum { PEERS = 4, ROUNDS = 20 };
  loom_pconn *pc[PEERS];
  for (int i = 0; i < PEERS; i++)
    CHECK_OK(loom_dial_packet(&pc[i], "udp", addr));
  for (int r = 0; r < ROUNDS; r++) {
    for (int i = 0; i < PEERS; i++) {
      uint8_t d[16], back[32];
      char word[8];
      snprintf(word, sizeof word, "p%dr%d", i, r);
      size_t n = frame(d, word, strlen(word));
      CHECK_EQ(loom_pconn_write(pc[i], d, n), (ssize_t)n);
      CHECK_OK(loom_pconn_set_read_deadline(pc[i], loom_now() + 5 * SEC));
      CHECK_EQ(loom_pconn_read(pc[i], back, sizeof back), (ssize_t)n);
      CHECK(memcmp(back, d, n) == 0);
    }
  }
  WAIT_FOR(metrics(srv).pkgs_out == PEERS * ROUNDS, 5); /* sends returned */
  loom_metrics m = metrics(srv);
  CHECK_EQ(m.pkgs_in, PEERS * ROUNDS);
  CHECK_EQ(m.pkgs_out, PEERS * ROUNDS);
  CHECK_EQ(atomic_load(&E.echo_fail), 0);
  for (int i = 0; i < PEERS; i++)
    CHECK_OK(loom_pconn_close(pc[i]));
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
  CHECK_EQ(atomic_load(&E.closes), 1);
  loom_taskpool_close(pool);
}
TEST(udp_pooled_replies_reach_each_sender) {
  run(udp_pooled_main, 2, "udp pooled replies");
}

/* A CRLF line codec over a stream, fed one byte at a time: a line of
 * exactly max_pkg_len (its '\r' and '\n' beyond it) and empty lines are
 * delivered; a line one byte longer closes the session with -EMSGSIZE. */
static loom_codec crlf;
static atomic_size_t crlf_lens[8];
static void crlf_msg(loom_session *s, const loom_pkg *pkg) {
  (void)s;
  int i = atomic_load(&E.msgs);
  if (i < 8)
    atomic_store(&crlf_lens[i], pkg->len);
  for (size_t k = 0; k < pkg->len; k++)
    CHECK(pkg->data[k] == 'L');
}
static void crlf_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_codec_line(&crlf, '\n', true));
  loom_server_opts o = server_opts(&crlf);
  o.session.max_pkg_len = 600; /* beyond the reader's stack buffer */
  E.msg = crlf_msg;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  static char in[2000];
  size_t n = 0;
  memset(in + n, 'L', 600);
  n += 600;
  memcpy(in + n, "\r\n\r\n\n", 5);
  n += 5;
  memset(in + n, 'L', 599);
  n += 599;
  memcpy(in + n, "\n", 1);
  n += 1;
  for (size_t i = 0; i < n; i++) {
    CHECK_EQ(loom_write(peer, in + i, 1), 1);
    if (i % 64 == 0)
      loom_sleep(CHECK_MS / 10);
  }
  WAIT_FOR(atomic_load(&E.msgs) == 4, 5);
  CHECK_EQ(atomic_load(&crlf_lens[0]), 600);
  CHECK_EQ(atomic_load(&crlf_lens[1]), 0);
  CHECK_EQ(atomic_load(&crlf_lens[2]), 0);
  CHECK_EQ(atomic_load(&crlf_lens[3]), 599);
  CHECK_EQ(atomic_load(&E.errs), 0);
  memset(in, 'L', 601);
  memcpy(in + 601, "\r\n", 2);
  CHECK_EQ(loom_write(peer, in, 603), 603);
  WAIT_FOR(atomic_load(&E.closes) == 1, 5);
  CHECK_ERR(atomic_load(&E.err), -EMSGSIZE);
  CHECK_EQ(atomic_load(&E.msgs), 4);
  CHECK_EQ(metrics(srv).errors.oversize, 1);
  finish(srv, peer);
}
TEST(line_crlf_at_max_pkg_len_byte_by_byte) {
  run(crlf_main, 2, "crlf lines at max_pkg_len");
}

/* Session timeouts of INT64_MAX (read_timeout, cron_period, linger)
 * mean "never": the session echoes, gets no cron and does not time out,
 * and a graceful close still flushes its queue. */
static void huge_opts_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&lenpfx);
  o.session.read_timeout = INT64_MAX;
  o.session.cron_period = INT64_MAX;
  o.session.linger = INT64_MAX;
  o.session.write_timeout = INT64_MAX;
  E.echo = true;
  loom_conn *peer;
  loom_server *srv = serve_dial(&o, &peer);
  uint8_t f[64], back[64];
  size_t n = frame(f, "ping", 4);
  for (int i = 0; i < 3; i++) {
    CHECK_EQ(loom_write(peer, f, n), (ssize_t)n);
    conn_read_full(peer, back, n);
    CHECK(memcmp(back, f, n) == 0);
    loom_sleep(20 * CHECK_MS);
  }
  CHECK_EQ(atomic_load(&E.crons), 0);
  CHECK_EQ(atomic_load(&E.errs), 0);
  CHECK_EQ(atomic_load(&E.closes), 0);
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
  conn_expect_eof(peer);
  CHECK_EQ(atomic_load(&E.closes), 1);
  CHECK_EQ(atomic_load(&E.errs), 0);
  CHECK_OK(loom_close(peer));
}
TEST(session_timeouts_of_int64_max_mean_never) {
  run(huge_opts_main, 2, "huge session timeouts");
}

/* unixgram: a datagram within max_pkg_len (default 1 MiB) but over
 * 64 KiB (UDP's limit) is delivered whole. */
static void big_dgram_main(void *arg) {
  (void)arg;
  loom_server_opts o = server_opts(NULL);
  char path[64];
  snprintf(path, sizeof path, "/tmp/loom-test-bigdgram-%d.sock", (int)getpid());
  unlink(path);
  o.network = "unixgram";
  o.addr = path;
  char addr[128];
  loom_server *srv = serve(&o, addr);
  loom_pconn *pc;
  CHECK_OK(loom_dial_packet(&pc, "unixgram", path));
  int sz = 1 << 20;
  setsockopt(loom_pconn_fd(pc), SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
  static uint8_t d[100000];
  memset(d, 'q', sizeof d);
  CHECK_EQ(loom_pconn_write(pc, d, sizeof d), (ssize_t)sizeof d);
  WAIT_FOR(metrics(srv).bytes_in == sizeof d, 5);
  loom_sleep(50 * CHECK_MS);
  loom_metrics m = metrics(srv);
  printf("pkgs_in=%llu oversize=%llu bytes seen=%zu\n",
         (unsigned long long)m.pkgs_in, (unsigned long long)m.errors.oversize,
         atomic_load(&E.bytes));
  CHECK_EQ(atomic_load(&E.bytes), sizeof d);
  CHECK_OK(loom_pconn_close(pc));
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
  unlink(path);
}
TEST(unixgram_takes_datagrams_over_64k) {
  run(big_dgram_main, 2, "unixgram big datagram");
}

/* A UDP server with read_timeout: its one session serves every peer
 * and does not idle out, so the server still answers after a quiet
 * period longer than the timeout. */
static void udp_idle_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts o = server_opts(&lenpfx);
  o.network = "udp";
  o.session.read_timeout = 100 * CHECK_MS;
  E.echo = false;
  char addr[128];
  loom_server *srv = serve(&o, addr);
  loom_sleep(400 * CHECK_MS);
  loom_metrics m = metrics(srv);
  printf("sessions_open=%llu closes=%d err=%s timeouts=%llu\n",
         (unsigned long long)m.sessions_open, atomic_load(&E.closes),
         loom_err_name(atomic_load(&E.err)),
         (unsigned long long)m.errors.timeout);
  loom_pconn *pc;
  CHECK_OK(loom_dial_packet(&pc, "udp", addr));
  uint8_t f[16];
  size_t n = frame(f, "hello", 5);
  CHECK_EQ(loom_pconn_write(pc, f, n), (ssize_t)n);
  loom_sleep(200 * CHECK_MS);
  printf("msgs after idle: %d\n", atomic_load(&E.msgs));
  CHECK_EQ(atomic_load(&E.msgs), 1);
  CHECK_OK(loom_pconn_close(pc));
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}
TEST(udp_server_outlives_its_read_timeout) {
  run(udp_idle_main, 2, "udp read timeout");
}

/* loom_client_wait parked while loom_client_close runs returns
 * LOOM_ECLOSED, and the close frees the client only after it has (it
 * used to free it under the waiter).  A wait must begin before the close
 * does: main waits until the waiter is on its way in (no scheduling point
 * lies between that mark and the wait's count of waiters, unless the
 * client's lock is contended), then gives it 2 ms to park.  Waiting only
 * the 2 ms, a waiter not yet run on a loaded machine called into a freed
 * client.  Two Ps: with one, the close runs after the waiter has left
 * whatever the close does, and the test no longer guards the bug. */
static atomic_int wait_close_rc = 1, wait_close_in;
static loom_client *wait_close_cl;
static void wait_close_waiter(void *arg) {
  (void)arg;
  atomic_store(&wait_close_in, 1);
  atomic_store(&wait_close_rc, loom_client_wait(wait_close_cl, 1, 0));
}
static void wait_close_main(void *arg) {
  (void)arg;
  /* A port nobody listens on: dials fail, the supervisor backs off. */
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sa = {.sin_family = AF_INET,
                           .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  CHECK(bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0);
  socklen_t sl = sizeof sa;
  CHECK(getsockname(fd, (struct sockaddr *)&sa, &sl) == 0);
  char addr[64];
  snprintf(addr, sizeof addr, "127.0.0.1:%d", ntohs(sa.sin_port));
  for (int round = 0; round < 200; round++) {
    loom_client_opts co;
    memset(&co, 0, sizeof co);
    co.network = "tcp";
    co.addr = addr;
    co.session.listener = &ev_listener;
    co.session.user = &E;
    co.reconnect_interval = 10 * SEC; /* stays in its back-off */
    CHECK_OK(loom_client_start(&wait_close_cl, &co));
    atomic_store(&wait_close_rc, 1);
    atomic_store(&wait_close_in, 0);
    CHECK_OK(loom_go(wait_close_waiter, NULL));
    WAIT_FOR(atomic_load(&wait_close_in) == 1, 5);
    loom_sleep(2 * CHECK_MS); /* the waiter parks, the dial fails */
    CHECK_OK(loom_client_close(wait_close_cl, loom_now() + SEC));
    WAIT_FOR(atomic_load(&wait_close_rc) != 1, 5);
    CHECK_ERR(atomic_load(&wait_close_rc), LOOM_ECLOSED);
  }
  close(fd);
}
TEST(client_wait_during_close) { run(wait_close_main, 2, "wait vs close"); }

/* Redials are paced.  A server that refuses every session in on_open
 * (accepts, then drops): the client's two sessions are lost again and
 * again, and each is replaced by a redial at most once per
 * reconnect_interval, so in 600 ms at 50 ms the server sees the first
 * two dials and about a dozen more, not a storm.
 * Then the server goes away: failed dials back off, doubling from the
 * interval up to reconnect_max.  Every client session gets one on_open
 * and one on_close, and on_closed comes once. */
static void paced_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts so = server_opts(&line);
  E.open_rc = -ECONNREFUSED;
  char addr[128];
  loom_server *srv = serve(&so, addr);
  static closed_rec cdone = {.e = &CE};
  loom_client_opts co;
  memset(&co, 0, sizeof co);
  co.network = "tcp";
  co.addr = addr;
  co.conns = 2;
  co.reconnect_interval = 50 * CHECK_MS;
  co.reconnect_max = 200 * CHECK_MS;
  co.on_closed = record_closed;
  co.closed_arg = &cdone;
  co.session.listener = &ev_listener;
  co.session.codec = &line;
  co.session.user = &CE;
  loom_client *cl;
  int64_t t0 = loom_now();
  CHECK_OK(loom_client_start(&cl, &co));
  loom_sleep(600 * CHECK_MS);
  int64_t el = loom_now() - t0;
  uint64_t dials = metrics(srv).sessions_total;
  printf("%llu sessions accepted in %lld ms at a 50 ms interval\n",
         (unsigned long long)dials, (long long)(el / CHECK_MS));
  CHECK_GE(dials, 4);
  CHECK_LE(dials, 2 + (uint64_t)(el / (50 * CHECK_MS)) + 1);
  /* The server goes; the dials that follow fail and back off. */
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
  loom_metrics m0;
  loom_client_metrics(cl, &m0);
  loom_sleep(1000 * CHECK_MS);
  loom_metrics m1;
  loom_client_metrics(cl, &m1);
  uint64_t failed = m1.errors.accept - m0.errors.accept;
  printf("%llu failed dials in 1 s (interval 50 ms, max 200 ms)\n",
         (unsigned long long)failed);
  /* 50, 100, 200, 200, ...: at most 1 + 1000 / 200 + 3 of them. */
  CHECK_GE(failed, 3);
  CHECK_LE(failed, 9);
  CHECK_OK(loom_client_close(cl, loom_now() + 5 * SEC));
  check_closed(&cdone, atomic_load(&CE.closes));
  CHECK_EQ(atomic_load(&CE.opens), atomic_load(&CE.closes));
  CHECK_GE(atomic_load(&CE.opens), 1);
}
TEST(client_redials_are_paced) { run(paced_main, 2, "client redial pacing"); }

/* The first redial waits too: one session, a 200 ms interval, and a
 * server that drops every session at once sees dials at 0, 200 and 400
 * ms in half a second — not a second one at once after the first. */
static void first_redial_main(void *arg) {
  (void)arg;
  codecs_init();
  loom_server_opts so = server_opts(&line);
  E.open_rc = -ECONNREFUSED;
  char addr[128];
  loom_server *srv = serve(&so, addr);
  loom_client_opts co = client_opts(addr, &line);
  co.reconnect_interval = 200 * CHECK_MS;
  loom_client *cl;
  int64_t t0 = loom_now();
  CHECK_OK(loom_client_start(&cl, &co));
  loom_sleep(500 * CHECK_MS);
  CHECK_OK(loom_client_close(cl, loom_now() + 5 * SEC));
  int64_t el = loom_now() - t0;
  uint64_t dials = metrics(srv).sessions_total;
  printf("%llu sessions in %lld ms at a 200 ms interval\n",
         (unsigned long long)dials, (long long)(el / CHECK_MS));
  CHECK_GE(dials, 2);
  CHECK_LE(dials, 1 + (uint64_t)(el / (200 * CHECK_MS)));
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}
TEST(client_first_redial_waits_an_interval) {
  run(first_redial_main, 2, "client first redial");
}

/* max_pkg_len = SIZE_MAX on a packet session: datagrams of any size
 * UDP carries get through (the read buffer was 63 bytes). */
static void udp_size_max_main(void *arg) {
  (void)arg;
  loom_server_opts o = server_opts(NULL);
  o.network = "udp";
  o.session.max_pkg_len = SIZE_MAX;
  char addr[128];
  loom_server *srv = serve(&o, addr);
  loom_pconn *pc;
  CHECK_OK(loom_dial_packet(&pc, "udp", addr));
  static uint8_t d[100];
  memset(d, 'u', sizeof d);
  CHECK_EQ(loom_pconn_write(pc, d, sizeof d), (ssize_t)sizeof d);
  WAIT_FOR(metrics(srv).bytes_in == sizeof d, 5);
  loom_sleep(20 * CHECK_MS);
  printf("bytes seen=%zu oversize=%llu\n", atomic_load(&E.bytes),
         (unsigned long long)metrics(srv).errors.oversize);
  CHECK_EQ(atomic_load(&E.bytes), sizeof d);
  CHECK_OK(loom_pconn_close(pc));
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
}
TEST(udp_max_pkg_len_size_max_means_no_limit) {
  run(udp_size_max_main, 2, "udp SIZE_MAX");
}

/* A packet write whose encoding is in many pieces (a codec that appends
 * piece by piece) goes out whole, not cut to the first 8 pieces. */
static ssize_t pieces_decode(const loom_codec *c, const uint8_t *buf, size_t len,
                         size_t max_len, loom_pkg *pkg) {
  (void)c;
  (void)max_len;
  if (len == 0)
    return 0;
  pkg->data = buf;
  pkg->len = len;
  return (ssize_t)len;
}
static int pieces_encode(const loom_codec *c, const void *data, size_t len,
                     size_t max_len, loom_buf *out) {
  (void)c;
  (void)max_len;
  const uint8_t *p = data;
  for (size_t i = 0; i < len; i += 1000) { /* a header per 1000 bytes, say */
    size_t k = len - i < 1000 ? len - i : 1000;
    if (loom_buf_append(out, p + i, k) < 0)
      return -ENOMEM;
  }
  return 0;
}
static const loom_codec pieces_codec = {
    .name = "pieces", .decode = pieces_decode, .encode = pieces_encode};
enum { PIECES_LEN = 150000 };
static uint8_t pieces_big[PIECES_LEN];
static void pieces_reply(loom_session *s, const loom_pkg *pkg) {
  CHECK_OK(
      loom_session_write_to(s, pieces_big, PIECES_LEN, pkg->from, pkg->fromlen, -1));
}
static void pieces_main(void *arg) {
  (void)arg;
  loom_server_opts o = server_opts(&pieces_codec);
  char path[64];
  snprintf(path, sizeof path, "/tmp/loom-test-pieces-%d.sock", (int)getpid());
  unlink(path);
  o.network = "unixgram";
  o.addr = path;
  E.msg = pieces_reply;
  char addr[128];
  loom_server *srv = serve(&o, addr);
  loom_pconn *pc;
  CHECK_OK(loom_dial_packet(&pc, "unixgram", path));
  int sz = 1 << 20;
  setsockopt(loom_pconn_fd(pc), SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
  CHECK_EQ(loom_pconn_write(pc, "go", 2), 2);
  static uint8_t back[PIECES_LEN + 1000];
  CHECK_OK(loom_pconn_set_read_deadline(pc, loom_now() + 5 * SEC));
  ssize_t n = loom_pconn_read(pc, back, sizeof back);
  loom_metrics m = metrics(srv);
  printf("sent %d, received %zd, bytes_out %llu\n", PIECES_LEN, n,
         (unsigned long long)m.bytes_out);
  CHECK_EQ(n, (ssize_t)PIECES_LEN);
  CHECK_OK(loom_pconn_close(pc));
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
  unlink(path);
}
TEST(packet_write_in_many_pieces_goes_whole) { run(pieces_main, 2, "8 chunks"); }

/* A connected packet session (a unixgram client) whose peer never
 * reads: once the peer's queue is full, `timeout` bounds the wait for
 * room as it does for a stream session's full queue — 0 fails at once,
 * a positive one times out, a negative or huge one waits until there is
 * room or the session is aborted — and the counts keep only the
 * datagrams that left. */
enum { PKW_LEN = 200 };
static uint8_t pkw_data[PKW_LEN];

typedef struct pkw_writer {
  loom_session *s;
  int64_t timeout;
  atomic_int rc;        /* 1 while the call has not returned */
  _Atomic int64_t took; /* how long it took */
} pkw_writer;

static void pkw_write(void *arg) {
  pkw_writer *w = arg;
  int64_t t0 = loom_now();
  int rc = loom_session_write(w->s, pkw_data, PKW_LEN, w->timeout);
  atomic_store(&w->took, loom_now() - t0);
  atomic_store(&w->rc, rc);
}

static void pkw_start(pkw_writer *w, loom_session *s, int64_t timeout) {
  w->s = s;
  w->timeout = timeout;
  atomic_store(&w->rc, 1);
  atomic_store(&w->took, 0);
  CHECK_OK(loom_go(pkw_write, w));
}

/* One write on its own coroutine, waited for at most 5 s: a write that
 * parks when it should not fails here, not by the watchdog. */
static int pkw_call(loom_session *s, int64_t timeout, int64_t *took) {
  static pkw_writer w;
  pkw_start(&w, s, timeout);
  WAIT_FOR(atomic_load(&w.rc) != 1, 5);
  *took = atomic_load(&w.took);
  return atomic_load(&w.rc);
}

static void pkw_check_counts(loom_session *s, uint64_t left) {
  loom_session_stats st;
  loom_session_stats_get(s, &st);
  CHECK_EQ(st.pkgs_out, left);
  CHECK_EQ(st.bytes_out, left * PKW_LEN);
}

static void pkw_main(void *arg) {
  (void)arg;
  memset(pkw_data, 'p', sizeof pkw_data);
  char path[64];
  snprintf(path, sizeof path, "@loom-test-pkw-%d", (int)getpid());
  loom_pconn *sink; /* never reads */
  CHECK_OK(loom_listen_packet(&sink, "unixgram", path));
  loom_client_opts co;
  memset(&co, 0, sizeof co);
  co.network = "unixgram";
  co.addr = path;
  co.reconnect_interval = -1;
  co.session.listener = &ev_listener;
  co.session.user = &CE;
  loom_client *cl;
  CHECK_OK(loom_client_start(&cl, &co));
  CHECK_OK(loom_client_wait(cl, 1, loom_now() + 5 * SEC));
  loom_session *s;
  CHECK_OK(loom_client_session(cl, &s));

  /* Timeout 0 fills the peer, then fails at once with -EAGAIN. */
  uint64_t sent = 0;
  int64_t took;
  int rc;
  while ((rc = pkw_call(s, 0, &took)) == 0)
    CHECK_LT(++sent, 100000);
  printf("the peer took %llu datagrams\n", (unsigned long long)sent);
  CHECK_ERR(rc, -EAGAIN);
  CHECK_GT(sent, 0);
  CHECK_LT(took, 1 * SEC);
  CHECK_ERR(pkw_call(s, 0, &took), -EAGAIN);
  CHECK_LT(took, 1 * SEC);
  pkw_check_counts(s, sent);

  /* A positive timeout: -ETIMEDOUT, not before it. */
  CHECK_ERR(pkw_call(s, 50 * CHECK_MS, &took), -ETIMEDOUT);
  printf("50 ms timeout: %.3f ms\n", took / 1e6);
  CHECK_GE(took, 45 * CHECK_MS);
  CHECK_LT(took, 3 * SEC);
  pkw_check_counts(s, sent);

  /* Three writers that wait without limit (-1, and a timeout too large
   * to add to now): one waits on the socket, two for their turn. */
  static pkw_writer w[3];
  pkw_start(&w[0], s, -1);
  pkw_start(&w[1], s, INT64_MAX);
  pkw_start(&w[2], s, -1);
  loom_sleep(50 * CHECK_MS);
  for (int i = 0; i < 3; i++)
    CHECK_EQ(atomic_load(&w[i].rc), 1);
  /* A bounded writer behind them times out on its own and leaves them
   * waiting; timeout 0 still fails at once. */
  CHECK_ERR(pkw_call(s, 50 * CHECK_MS, &took), -ETIMEDOUT);
  CHECK_GE(took, 45 * CHECK_MS);
  CHECK_LT(took, 3 * SEC);
  CHECK_ERR(pkw_call(s, 0, &took), -EAGAIN);
  loom_sleep(20 * CHECK_MS);
  for (int i = 0; i < 3; i++)
    CHECK_EQ(atomic_load(&w[i].rc), 1);
  pkw_check_counts(s, sent);

  /* Room for one datagram: exactly one of them sends it.  (The first
   * datagram in the peer is the client's empty dial probe.) */
  uint8_t b[512];
  CHECK_OK(loom_pconn_set_read_deadline(sink, loom_now() + 5 * SEC));
  ssize_t got = loom_pconn_read_from(sink, b, sizeof b, NULL, NULL);
  CHECK(got == 0 || got == PKW_LEN);
  WAIT_FOR(atomic_load(&w[0].rc) == 0 || atomic_load(&w[1].rc) == 0 ||
               atomic_load(&w[2].rc) == 0,
           5);
  loom_sleep(50 * CHECK_MS);
  int done = 0;
  for (int i = 0; i < 3; i++)
    done += atomic_load(&w[i].rc) == 0;
  CHECK_EQ(done, 1);
  sent++;
  pkw_check_counts(s, sent);

  /* An abort wakes the other two, waiting on the socket or for their
   * turn, with LOOM_ECLOSED. */
  loom_session_abort(s, LOOM_ECLOSED);
  int closed = 0;
  for (int i = 0; i < 3; i++) {
    WAIT_FOR(atomic_load(&w[i].rc) != 1, 5);
    int r = atomic_load(&w[i].rc);
    CHECKF(r == 0 || r == LOOM_ECLOSED, "writer %d: %s", i, loom_err_name(r));
    closed += r == LOOM_ECLOSED;
  }
  CHECK_EQ(closed, 2);
  WAIT_FOR(atomic_load(&CE.closes) == 1, 5);
  CHECK_EQ(CE.final.pkgs_out, sent);
  CHECK_EQ(CE.final.bytes_out, sent * PKW_LEN);
  /* The client's totals: the same datagrams, and every write refused
   * for want of room (three at timeout 0, two at 50 ms) as wq_full. */
  loom_metrics m;
  WAIT_FOR((loom_client_metrics(cl, &m), m.sessions_open == 0), 5);
  CHECK_EQ(m.pkgs_out, sent);
  CHECK_EQ(m.bytes_out, sent * PKW_LEN);
  CHECK_EQ(m.errors.wq_full, 5);
  loom_session_unref(s);
  CHECK_OK(loom_client_close(cl, loom_now() + 5 * SEC));
  CHECK_OK(loom_pconn_close(sink));
}
TEST(packet_write_honours_timeout) {
  run(pkw_main, 2, "packet write on a full peer");
}

/* An unconnected unixgram socket has room per peer: a server's one packet
 * session writing to a peer A that never reads must not hold up a write
 * to a peer B that has drained.  The poller cannot say when a peer makes
 * room there (epoll sees the socket's own buffer), so such writes try
 * again on their own: a write to B with a 5 s timeout goes through soon
 * after B drains, while one to A with -1 still waits, and one to A with
 * 50 ms times out.  An abort ends the one to A with LOOM_ECLOSED. */
typedef struct hol_writer {
  loom_session *s;
  const struct sockaddr *to;
  socklen_t tolen;
  int64_t timeout;
  atomic_int rc; /* 1 while the call has not returned */
} hol_writer;

static void hol_write(void *arg) {
  hol_writer *w = arg;
  atomic_store(&w->rc, loom_session_write_to(w->s, pkw_data, PKW_LEN, w->to,
                                             w->tolen, w->timeout));
}

static void hol_start(hol_writer *w, loom_session *s,
                      const struct sockaddr_storage *to, socklen_t tolen,
                      int64_t timeout) {
  *w = (hol_writer){s, (const struct sockaddr *)to, tolen, timeout, 1};
  CHECK_OK(loom_go(hol_write, w));
}

static int fill_peer(loom_session *s, const struct sockaddr_storage *to,
                     socklen_t tolen) {
  int n = 0;
  while (loom_session_write_to(s, pkw_data, PKW_LEN,
                               (const struct sockaddr *)to, tolen, 0) == 0)
    CHECK_LT(++n, 100000);
  return n;
}

static void hol_main(void *arg) {
  (void)arg;
  memset(pkw_data, 'h', sizeof pkw_data);
  char path[64], pa[64], pb[64];
  snprintf(path, sizeof path, "@loom-test-hol-srv-%d", (int)getpid());
  snprintf(pa, sizeof pa, "@loom-test-hol-a-%d", (int)getpid());
  snprintf(pb, sizeof pb, "@loom-test-hol-b-%d", (int)getpid());
  loom_server_opts o = server_opts(NULL);
  o.network = "unixgram";
  o.addr = path;
  E.keep = true;
  char addr[128];
  loom_server *srv = serve(&o, addr);
  loom_session *s = kept_session();
  loom_pconn *A, *B;
  CHECK_OK(loom_listen_packet(&A, "unixgram", pa));
  CHECK_OK(loom_listen_packet(&B, "unixgram", pb));
  struct sockaddr_storage sa, sb;
  socklen_t la, lb;
  CHECK_OK(loom_resolve_addr("unixgram", pa, &sa, &la));
  CHECK_OK(loom_resolve_addr("unixgram", pb, &sb, &lb));
  int na = fill_peer(s, &sa, la), nb = fill_peer(s, &sb, lb);
  printf("A took %d datagrams, B %d\n", na, nb);
  CHECK_GT(na, 0);
  CHECK_GT(nb, 0);

  static hol_writer ha, ha50, hb;
  hol_start(&ha, s, &sa, la, -1);
  loom_sleep(20 * CHECK_MS);
  hol_start(&hb, s, &sb, lb, 5 * SEC);
  int64_t t0 = loom_now();
  hol_start(&ha50, s, &sa, la, 50 * CHECK_MS);
  WAIT_FOR(atomic_load(&ha50.rc) != 1, 5);
  CHECK_ERR(atomic_load(&ha50.rc), -ETIMEDOUT);
  CHECK_GE(loom_now() - t0, 45 * CHECK_MS);
  CHECK_EQ(atomic_load(&hb.rc), 1); /* B is still full */

  /* B drains: the write to it goes, though the one to A still waits. */
  uint8_t b[512];
  int drained = 0;
  CHECK_OK(loom_pconn_set_read_deadline(B, loom_now() + 2 * SEC));
  while (drained < nb) {
    CHECK_EQ(loom_pconn_read_from(B, b, sizeof b, NULL, NULL), PKW_LEN);
    drained++;
  }
  t0 = loom_now();
  WAIT_FOR(atomic_load(&hb.rc) != 1, 5);
  printf("the write to B went %.1f ms after B drained\n",
         (double)(loom_now() - t0) / 1e6);
  CHECK_OK(atomic_load(&hb.rc));
  CHECK_EQ(loom_pconn_read_from(B, b, sizeof b, NULL, NULL), PKW_LEN);
  CHECK_EQ(atomic_load(&ha.rc), 1);

  loom_session_abort(s, LOOM_ECLOSED);
  WAIT_FOR(atomic_load(&ha.rc) != 1, 5);
  CHECK_ERR(atomic_load(&ha.rc), LOOM_ECLOSED);
  loom_session_unref(s);
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
  CHECK_OK(loom_pconn_close(A));
  CHECK_OK(loom_pconn_close(B));
}
TEST(packet_write_to_a_stuck_peer_spares_the_others) {
  run(hol_main, 2, "a unixgram server writing to a stuck peer and another");
}

CHECK_MAIN()
