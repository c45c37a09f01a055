/*
 * test_engine_alloc.c — failure injection over the engine (src/engine):
 * make allocation number i fail, for every i of a scenario, and — the
 * harsher variant — every allocation from number i on (nghttp2's
 * failmalloc, curl's torture tests; test_alloc.c does the same for the
 * runtime).
 *
 * What must hold whatever fails: no crash and no hang; API calls fail
 * with -ENOMEM (or say the session is closing), and a session that
 * cannot go on closes with an error; every session a callback has seen
 * gets on_close exactly once, then on_free; loom_server_close,
 * loom_client_close and loom_taskpool_close return; a task submitted
 * with 0 runs exactly once, a refused one never; no byte the engine
 * delivers is wrong; and once loom_run has returned, every block
 * allocated through the hook has been freed (LeakSanitizer checks the
 * rest at exit in the ASan build).
 *
 * Counting.  The hook counts (and fails) only while armed: from the
 * start of the scenario's main coroutine to its end.  The runtime's own
 * bootstrap never fails (that is test_alloc.c's business), but what the
 * scenario makes the runtime do — spawn readers, writers and pool
 * workers, arm timers, register sockets — does.  A clean run's count
 * bounds i; threads make it vary a little, so the cases go past it.
 *
 * Peers.  Where it can be, the side under test is the only loom side:
 * the server's peer and the client's server are plain threads on
 * blocking sockets with timeouts.  They allocate nothing through the
 * hook and cannot hang, so the allocation numbers are the engine's, and
 * a peer that waits in vain for bytes the engine has accepted, on a
 * session that stays open ("stalled"), is an engine bug, not a test
 * artefact.  The compression scenario runs both ends on loom, since both
 * must speak zlib.
 *
 * Closing.  A graceful close while every peer is idle or gone has
 * nothing to wait for, so a server or client close that needs its
 * deadline fails the case: some session was never told to close.  In
 * the "from i on" variant the plain-thread peers hang up before the
 * close (closing while a peer stays connected and nothing can be
 * allocated is server_close_without_memory, on its own), and in the
 * compression scenario memory comes back before the closes.
 *
 * Processes.  As in test_alloc.c: a case re-executes itself (HELPER
 * alloc_child) for a chunk of i at a time, one loom_run per i, then one
 * clean run that must deliver everything; the sweep is made on two Ps
 * and on one.  The child names each i on stderr before running it, and
 * a watchdog thread in it aborts naming the i that makes no progress,
 * so a crash or a hang names its allocation; the case lists up to five
 * failing allocations with what went wrong.  To see who made allocation
 * i, see injected() in check_alloc.h (the child to run in gdb:
 * test_engine_alloc alloc_child server:2:0:53:1:1).
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <sys/socket.h>

#include "check_alloc.h"

#define SEC INT64_C(1000000000)

/* ------------------------------------------------------------------ */
/* The hook.                                                            */

static atomic_long nalloc; /* armed hook calls so far */
static atomic_int armed;   /* count and fail only while set */
static long fail_at = -1;  /* the armed call (1-based) that fails; -1: none */
static bool fail_from;     /* ... and every armed call after it */

static bool should_fail(void) {
  if (!atomic_load(&armed))
    return false;
  long k = atomic_fetch_add(&nalloc, 1) + 1;
  return fail_at > 0 && (k == fail_at || (fail_from && k > fail_at));
}

/* A failed check names the allocation that was failing. */
#define CHECK_AT(cond, fmt, ...)                                               \
  CHECKF(cond, "allocation %ld%s: " fmt, fail_at,                              \
         fail_from ? " and on" : "", ##__VA_ARGS__)

/* ------------------------------------------------------------------ */
/* What the scenarios record.                                           */

static atomic_long
    enomem_seen; /* -ENOMEM from a call or in on_error (all runs) */
static atomic_long errors_seen; /* sessions closed with an error (all runs) */
static atomic_long
    free_unseen; /* on_free of a session no callback saw (all runs) */

/* A result an API call may give under allocation failure.  `also` is
 * one more acceptable code (0 if none). */
static void expect_rc(const char *what, int rc, int also) {
  if (rc == -ENOMEM)
    atomic_fetch_add(&enomem_seen, 1);
  CHECK_AT(rc == 0 || rc == -ENOMEM || (also != 0 && rc == also),
           "%s returned %d (%s)", what, rc, loom_err_name(rc));
}

enum { ROLE_SERVER = 1, ROLE_CLIENT = 2 };
static int role_server = ROLE_SERVER, role_client = ROLE_CLIENT;

/* Every session a callback has seen, by id. */
typedef struct seen {
  uint64_t id;
  int role, opens, errs, closes, frees;
  long written; /* loom_session_write calls that returned 0 (the echo) */
} seen;
#define MAX_SEEN 4096
static seen tab[MAX_SEEN];
static int ntab;
static pthread_mutex_t tab_mu = PTHREAD_MUTEX_INITIALIZER;

enum { EV_OPEN, EV_MSG, EV_WRITTEN, EV_ERROR, EV_CLOSE, EV_FREE };

static void note(loom_session *s, int ev) {
  uint64_t id = loom_session_id(s);
  int role = *(int *)loom_session_user(s);
  pthread_mutex_lock(&tab_mu);
  seen *e = NULL;
  for (int i = ntab - 1; i >= 0 && !e; i--)
    if (tab[i].id == id)
      e = &tab[i];
  if (!e && ev == EV_FREE) {
    /* Freed before any callback: its start failed (loom_go of its
     * reader), so it never began; no on_close is owed. */
    pthread_mutex_unlock(&tab_mu);
    atomic_fetch_add(&free_unseen, 1);
    return;
  }
  if (!e) {
    CHECK_AT(ntab < MAX_SEEN, "more than %d sessions", MAX_SEEN);
    e = &tab[ntab++];
    memset(e, 0, sizeof *e);
    e->id = id;
    e->role = role;
  }
  switch (ev) {
  case EV_OPEN:
    CHECK_AT(e->opens == 0 && e->closes == 0,
             "session %llu: on_open again or after on_close",
             (unsigned long long)id);
    e->opens++;
    break;
  case EV_MSG:
    CHECK_AT(e->closes == 0, "session %llu: on_message after on_close",
             (unsigned long long)id);
    break;
  case EV_WRITTEN:
    e->written++;
    break;
  case EV_ERROR:
    CHECK_AT(e->errs == 0 && e->closes == 0,
             "session %llu: on_error twice or after on_close",
             (unsigned long long)id);
    e->errs++;
    break;
  case EV_CLOSE:
    CHECK_AT(e->closes == 0, "session %llu: on_close twice",
             (unsigned long long)id);
    e->closes++;
    if (role == ROLE_SERVER) {
      /* Its only writes are the echo's, on its reader, all over by now,
       * and so is its writer: every package written has left whole or
       * been dropped, and no other is counted. */
      loom_session_stats st;
      loom_session_stats_get(s, &st);
      CHECK_AT(st.pkgs_out + st.pkgs_dropped == (uint64_t)e->written,
               "session %llu: %ld writes returned 0, but pkgs_out %llu + "
               "pkgs_dropped %llu",
               (unsigned long long)id, e->written,
               (unsigned long long)st.pkgs_out,
               (unsigned long long)st.pkgs_dropped);
    }
    break;
  case EV_FREE:
    CHECK_AT(e->closes == 1 && e->frees == 0,
             "session %llu: on_free with %d on_close, %d on_free",
             (unsigned long long)id, e->closes, e->frees);
    e->frees++;
    break;
  }
  pthread_mutex_unlock(&tab_mu);
}

/* Every session of `role` has had on_close (and, with `freed`, on_free)
 * exactly once: the count of those that have not. */
static int not_done(int role, bool freed) {
  int n = 0;
  pthread_mutex_lock(&tab_mu);
  for (int i = 0; i < ntab; i++)
    if ((role == 0 || tab[i].role == role) &&
        (tab[i].closes != 1 || (freed && tab[i].frees != 1)))
      n++;
  pthread_mutex_unlock(&tab_mu);
  return n;
}

static int count_role(int role, bool closed) {
  int n = 0;
  pthread_mutex_lock(&tab_mu);
  for (int i = 0; i < ntab; i++)
    if (tab[i].role == role && (!closed || tab[i].closes))
      n++;
  pthread_mutex_unlock(&tab_mu);
  return n;
}

/* ---- the listeners ---- */

static int attr_key;
static atomic_long echo_bytes; /* payload bytes the client sessions got back */
static atomic_long echo_bad;   /* ... that were not what was sent */

/* Payload byte `off` of a package of `len` bytes: depends on both, so a
 * package cut, shifted or mixed with another shows. */
static uint8_t pat(size_t len, size_t off) {
  return (uint8_t)('a' + (len * 7 + off * 13 + (off >> 9)) % 26);
}

static int on_open(loom_session *s) {
  note(s, EV_OPEN);
  /* The session's own allocations: its name and its attributes. */
  expect_rc("loom_session_set_name", loom_session_set_name(s, "alloc test"), 0);
  expect_rc("loom_session_set_attr", loom_session_set_attr(s, &attr_key, s), 0);
  return 0;
}

static void on_message(loom_session *s, const loom_pkg *pkg) {
  note(s, EV_MSG);
  if (*(int *)loom_session_user(s) == ROLE_CLIENT) {
    for (size_t i = 0; i < pkg->len; i++)
      if (pkg->data[i] != pat(pkg->len, i)) {
        atomic_fetch_add(&echo_bad, 1);
        break;
      }
    atomic_fetch_add(&echo_bytes, (long)pkg->len);
    return;
  }
  /* The echo.  The queue never reaches its high watermark here, so the
   * write never waits; a reply that cannot be queued ends the session
   * (a lost reply would leave the peer waiting). */
  int rc = loom_session_write(s, pkg->data, pkg->len, 5 * SEC);
  if (rc == 0)
    note(s, EV_WRITTEN);
  if (rc != 0) {
    expect_rc("echo loom_session_write", rc, LOOM_ECLOSED);
    loom_session_abort(s, rc);
  }
}

static void on_error(loom_session *s, int err) {
  note(s, EV_ERROR);
  CHECK_AT(err < 0 && loom_session_closed(s), "on_error(%d)", err);
  if (err == -ENOMEM)
    atomic_fetch_add(&enomem_seen, 1);
  atomic_fetch_add(&errors_seen, 1);
}

static void on_close(loom_session *s) {
  note(s, EV_CLOSE);
  CHECK_AT(loom_session_closed(s), "on_close of an open session");
  CHECK_AT(loom_session_name(s) != NULL, "no name");
}

static void on_free(loom_session *s) {
  if (loom_session_attr(s, &attr_key) != NULL)
    CHECK_AT(loom_session_attr(s, &attr_key) == s, "attribute lost");
  note(s, EV_FREE);
}

static const loom_session_listener listener = {
    .on_open = on_open,
    .on_message = on_message,
    .on_error = on_error,
    .on_close = on_close,
    .on_free = on_free,
};

static loom_codec lenpfx;

/* ------------------------------------------------------------------ */
/* Waiting, from a coroutine.                                           */

/* A nap that works without memory too (loom_sleep needs a timer slot). */
static void nap(void) {
  if (loom_sleep(CHECK_MS) != 0)
    loom_yield();
}

#define WAIT_UNTIL(ok, cond, ns)                                               \
  do {                                                                         \
    int64_t wu_end_ = loom_now() + (ns);                                       \
    while (!((ok) = (cond)) && loom_now() < wu_end_)                           \
      nap();                                                                   \
  } while (0)

static void join_thread(pthread_t t) {
  loom_block_enter();
  CHECK_EQ(pthread_join(t, NULL), 0);
  loom_block_exit();
}

/* Peers' socket timeouts: a wait this long for bytes is a stall. */
#define PEER_TIMEOUT_S CHECK_SCALE(3, 4, 6)

/* After a server or client close: every session of `role` has had its
 * one on_close. */
static void check_all_closed(int role) {
  CHECK_AT(not_done(role, false) == 0,
           "%d sessions (role %d) without exactly one on_close",
           not_done(role, false), role);
}

/* At the end: wait for the sessions' last references to go (a reader
 * drops its own just after the close has returned) and check on_free
 * came once each. */
static void wait_all_freed(void) {
  bool ok;
  WAIT_UNTIL(ok, not_done(0, true) == 0, 5 * SEC);
  CHECK_AT(ok, "%d sessions not freed after their on_close", not_done(0, true));
}

/* A server's or client's close, begun at t0, when every peer is idle or
 * gone: a graceful close has nothing to wait for, so needing the
 * deadline (-ETIMEDOUT) means a session was not told to close. */
static void check_close(const char *what, int rc, int64_t t0) {
  CHECK_AT(rc == 0,
           "%s returned %d (%s) after %lld ms, with every peer idle or gone",
           what, rc, loom_err_name(rc),
           (long long)((loom_now() - t0) / CHECK_MS));
}

/* ------------------------------------------------------------------ */
/* Plain-socket helpers for the peers (no loom, no hook).               */

static int tcp_connect(const char *addr, int rcvbuf) {
  char host[64];
  int port;
  CHECK(sscanf(addr, "%63[^:]:%d", host, &port) == 2);
  struct sockaddr_in sa = {.sin_family = AF_INET,
                           .sin_port = htons((uint16_t)port)};
  CHECK(inet_pton(AF_INET, host, &sa.sin_addr) == 1);
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  CHECK(fd >= 0);
  if (rcvbuf)
    CHECK(setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf) == 0);
  struct timeval tv = {PEER_TIMEOUT_S, 0};
  CHECK(setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) == 0);
  CHECK(setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) == 0);
  if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
    int err = errno;
    /* With SO_SNDTIMEO set, a stop and continue ends connect with EINTR
     * (signal(7)) while the handshake goes on: wait for its end. */
    if (err == EINTR) {
      struct pollfd p = {fd, POLLOUT, 0};
      int r;
      while ((r = poll(&p, 1, PEER_TIMEOUT_S * 1000)) < 0 && errno == EINTR) {
      }
      socklen_t len = sizeof err;
      CHECK(r == 1);
      CHECK(getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0);
    }
    if (err != 0) {
      close(fd);
      return -err;
    }
  }
  return fd;
}

/* What a peer's socket call came to. */
enum { IO_OK = 0, IO_CLOSED = 1, IO_STALLED = 2 };

static int io_result(ssize_t r) {
  if (r > 0)
    return IO_OK;
  if (r == 0)
    return IO_CLOSED;
  if (errno == EAGAIN || errno == EWOULDBLOCK)
    return IO_STALLED;
  CHECK(errno == ECONNRESET || errno == EPIPE);
  return IO_CLOSED;
}

/* One blocking recv, again after EINTR: with SO_RCVTIMEO set, Linux ends
 * a recv with EINTR when the process is stopped and continued (signal(7)),
 * as job control or a debugger does. */
static ssize_t recv_once(int fd, void *p, size_t n) {
  ssize_t k;
  do
    k = recv(fd, p, n, 0);
  while (k < 0 && errno == EINTR);
  return k;
}

static int send_all(int fd, const void *p, size_t n) {
  const uint8_t *b = p;
  while (n) {
    ssize_t k = send(fd, b, n, MSG_NOSIGNAL);
    if (k < 0 && errno == EINTR)
      continue;
    int r = io_result(k);
    if (r != IO_OK)
      return r;
    b += k;
    n -= (size_t)k;
  }
  return IO_OK;
}

static int recv_all(int fd, void *p, size_t n) {
  uint8_t *b = p;
  while (n) {
    ssize_t k = recv(fd, b, n, 0);
    if (k < 0 && errno == EINTR)
      continue;
    int r = io_result(k);
    if (r != IO_OK)
      return r;
    b += k;
    n -= (size_t)k;
  }
  return IO_OK;
}

static int listen_any(char addr[64]) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  CHECK(fd >= 0);
  struct sockaddr_in sa = {.sin_family = AF_INET};
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  CHECK(bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0);
  CHECK(listen(fd, 64) == 0);
  socklen_t len = sizeof sa;
  CHECK(getsockname(fd, (struct sockaddr *)&sa, &len) == 0);
  snprintf(addr, 64, "127.0.0.1:%d", ntohs(sa.sin_port));
  return fd;
}

/* ------------------------------------------------------------------ */
/* The length-prefixed echo peer of the server scenarios.               */

typedef struct peer {
  char addr[128];
  int bursts;           /* frames written before any is read back */
  bool keep_open;       /* after the exchange, wait for the server to close */
  atomic_int exchanged; /* the exchange is over (either way) */
  int result;           /* IO_* of the exchange */
  int close_result;     /* IO_* of the wait for the server's close */
} peer;

static int send_frame(int fd, size_t len, uint8_t *buf) {
  buf[0] = (uint8_t)(len >> 24);
  buf[1] = (uint8_t)(len >> 16);
  buf[2] = (uint8_t)(len >> 8);
  buf[3] = (uint8_t)len;
  for (size_t i = 0; i < len; i++)
    buf[4 + i] = pat(len, i);
  return send_all(fd, buf, 4 + len);
}

static int recv_frame(int fd, size_t len, uint8_t *buf) {
  int r = recv_all(fd, buf, 4 + len);
  if (r != IO_OK)
    return r;
  size_t got = (size_t)buf[0] << 24 | (size_t)buf[1] << 16 |
               (size_t)buf[2] << 8 | buf[3];
  CHECK_AT(got == len, "echo frame of %zu bytes, want %zu", got, len);
  for (size_t i = 0; i < len; i++)
    CHECK_AT(buf[4 + i] == pat(len, i),
             "echo frame of %zu bytes: byte %zu wrong", len, i);
  return IO_OK;
}

#define BURST_LEN 6000

/* A ping-pong of small frames, one over the 2 KiB the server encodes on
 * its stack, then a burst written before anything is read back: with a
 * small receive buffer here and a small send buffer there, the server's
 * replies pile up in its write queue and its writer coroutine starts. */
static int exchange(int fd) {
  static const size_t sizes[] = {5, 0, 5000, 1};
  uint8_t *buf = malloc(4 + BURST_LEN);
  int r = IO_OK;
  CHECK(buf != NULL);
  for (size_t i = 0; i < sizeof sizes / sizeof sizes[0] && r == IO_OK; i++) {
    r = send_frame(fd, sizes[i], buf);
    if (r == IO_OK)
      r = recv_frame(fd, sizes[i], buf);
  }
  free(buf);
  return r;
}

static void *peer_main(void *arg) {
  peer *p = arg;
  int fd = tcp_connect(p->addr, 4096);
  CHECK(fd >= 0);
  int r = exchange(fd);
  if (r == IO_OK) {
    uint8_t *buf = malloc(4 + BURST_LEN);
    CHECK(buf != NULL);
    for (int i = 0; i < p->bursts && r == IO_OK; i++)
      r = send_frame(fd, BURST_LEN - (size_t)i, buf);
    for (int i = 0; i < p->bursts && r == IO_OK; i++)
      r = recv_frame(fd, BURST_LEN - (size_t)i, buf);
    /* A small one after the burst: the server's read buffer, grown for
     * the burst, shrinks back (an allocation of its own). */
    if (r == IO_OK)
      r = send_frame(fd, 3, buf);
    if (r == IO_OK)
      r = recv_frame(fd, 3, buf);
    free(buf);
  }
  p->result = r;
  atomic_store(&p->exchanged, 1);
  if (p->keep_open && r == IO_OK) {
    uint8_t b;
    ssize_t k = recv_once(fd, &b, 1);
    p->close_result = io_result(k);
    CHECK_AT(k <= 0, "a byte after the exchange");
  }
  close(fd);
  return NULL;
}

/* ------------------------------------------------------------------ */
/* Scenario 1: a server, one session's echo, the server's close.        */

static bool clean_run(void) { return fail_at < 0 && !atomic_load(&fail_all); }

static loom_server_opts server_opts(loom_taskpool *pool, int compress) {
  loom_server_opts o;
  memset(&o, 0, sizeof o);
  o.network = "tcp";
  o.addr = "127.0.0.1:0";
  o.session.listener = &listener;
  o.session.codec = &lenpfx;
  o.session.user = &role_server;
  o.session.pool = pool;
  o.session.compress = compress;
  o.sndbuf = 4096;
  return o;
}

/* Run the peer against `srv`, close the server, check what must hold.
 * In the "from i on" variant the peer hangs up first: closing a server
 * while a peer stays connected and no allocation succeeds is the case
 * server_close_without_memory, on its own. */
static void serve_one_peer(loom_server *srv, int bursts) {
  peer p;
  memset(&p, 0, sizeof p);
  CHECK_OK(loom_server_addr(srv, p.addr, sizeof p.addr));
  p.bursts = bursts;
  p.keep_open = !fail_from;
  pthread_t t;
  CHECK_EQ(pthread_create(&t, NULL, peer_main, &p), 0);
  bool ok;
  WAIT_UNTIL(ok, atomic_load(&p.exchanged), (int64_t)2 * PEER_TIMEOUT_S * SEC);
  CHECK_AT(ok, "the peer's exchange did not end");
  if (fail_from)
    join_thread(t);
  CHECK_AT(p.result != IO_STALLED,
           "the peer stalled: the server kept the session open "
           "but did not answer");
  CHECK_AT(!clean_run() || p.result == IO_OK,
           "the exchange failed in a clean run");
  int64_t t0 = loom_now();
  check_close("loom_server_close", loom_server_close(srv, loom_now() + 2 * SEC),
              t0);
  check_all_closed(ROLE_SERVER);
  if (!fail_from)
    join_thread(t);
  CHECK_AT(p.close_result != IO_STALLED, "the peer never saw the server close");
  CHECK_AT(!clean_run() || count_role(ROLE_SERVER, false) == 1,
           "%d server sessions", count_role(ROLE_SERVER, false));
}

static void sc_server(void) {
  loom_server_opts o = server_opts(NULL, 0);
  loom_server *srv;
  int rc = loom_server_start(&srv, &o);
  expect_rc("loom_server_start", rc, 0);
  if (rc == 0)
    serve_one_peer(srv, CHECK_SCALE(64, 48, 24));
}

/* The same with every timed option on: arming the cron's and the
 * timeouts' deadlines needs timer room, which can fail too (and must
 * end the session, not leave it without its deadlines). */
static void sc_timed_server(void) {
  loom_server_opts o = server_opts(NULL, 0);
  o.session.cron_period = 2 * INT64_C(1000000);
  o.session.read_timeout = 10 * SEC;
  o.session.write_timeout = SEC;
  o.session.linger = SEC / 5;
  loom_server *srv;
  int rc = loom_server_start(&srv, &o);
  expect_rc("loom_server_start", rc, 0);
  if (rc == 0)
    serve_one_peer(srv, CHECK_SCALE(64, 48, 24));
}

/* ------------------------------------------------------------------ */
/* Scenario 2: a client with two sessions against a plain echo server.  */

typedef struct tserver {
  int lfd;
  char addr[64];
  atomic_int stop;
  pthread_t t;
} tserver;

/* Echo every byte back on each connection, until told to stop. */
static void *tserver_main(void *arg) {
  tserver *ts = arg;
  struct pollfd fds[65];
  int n = 1;
  uint8_t *buf = malloc(65536);
  CHECK(buf != NULL);
  fds[0] = (struct pollfd){ts->lfd, POLLIN, 0};
  while (!atomic_load(&ts->stop)) {
    int r = poll(fds, (nfds_t)n, 5);
    if (r < 0 && errno == EINTR)
      continue;
    CHECK(r >= 0);
    if (fds[0].revents & POLLIN) {
      int fd = accept4(ts->lfd, NULL, NULL, SOCK_CLOEXEC);
      if (fd >= 0 && n == 65) {
        close(fd);
      } else if (fd >= 0) {
        struct timeval tv = {PEER_TIMEOUT_S, 0};
        CHECK(setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) == 0);
        fds[n++] = (struct pollfd){fd, POLLIN, 0};
      }
    }
    for (int i = 1; i < n; i++) {
      if (!fds[i].revents)
        continue;
      ssize_t k = recv(fds[i].fd, buf, 65536, MSG_DONTWAIT);
      if (k < 0 && (errno == EAGAIN || errno == EINTR))
        continue;
      if (k <= 0 || send_all(fds[i].fd, buf, (size_t)k) != IO_OK) {
        close(fds[i].fd);
        fds[i--] = fds[--n];
      }
    }
  }
  for (int i = 0; i < n; i++)
    close(fds[i].fd);
  free(buf);
  return NULL;
}

static void tserver_start(tserver *ts) {
  memset(ts, 0, sizeof *ts);
  ts->lfd = listen_any(ts->addr);
  CHECK_EQ(pthread_create(&ts->t, NULL, tserver_main, ts), 0);
}

static void tserver_stop(tserver *ts) {
  atomic_store(&ts->stop, 1);
  join_thread(ts->t);
}

static const size_t client_sizes[] = {1, 100, 3000, 20000, 7, 50000, 0, 2047};

/* Write each of client_sizes on the client's sessions (round robin) and
 * wait for the echoes, or for a session to close (then echoes may be
 * lost with it).  Returns the payload bytes accepted by writes. */
static long client_traffic(loom_client *cl) {
  long want = 0;
  uint8_t *buf = malloc(65536);
  CHECK(buf != NULL);
  for (size_t k = 0; k < sizeof client_sizes / sizeof client_sizes[0]; k++) {
    size_t len = client_sizes[k];
    for (size_t i = 0; i < len; i++)
      buf[i] = pat(len, i);
    loom_session *s;
    int rc = loom_client_session(cl, &s);
    if (rc != 0) {
      CHECK_AT(rc == -ENOTCONN && !clean_run(), "loom_client_session: %d (%s)",
               rc, loom_err_name(rc));
      continue;
    }
    rc = loom_session_write(s, buf, len, SEC);
    loom_session_unref(s);
    if (rc == 0)
      want += (long)len;
    else
      expect_rc("client loom_session_write", rc, LOOM_ECLOSED);
  }
  free(buf);
  bool ok;
  WAIT_UNTIL(
      ok, atomic_load(&echo_bytes) >= want || count_role(ROLE_CLIENT, true) > 0,
      (int64_t)PEER_TIMEOUT_S * SEC);
  CHECK_AT(
      ok, "echoes: %ld of %ld bytes, every client session still open (stalled)",
      atomic_load(&echo_bytes), want);
  CHECK_AT(atomic_load(&echo_bad) == 0, "an echo came back wrong");
  return want;
}

static loom_client_opts client_opts(const char *addr, int conns, int compress) {
  loom_client_opts o;
  memset(&o, 0, sizeof o);
  o.network = "tcp";
  o.addr = addr;
  o.conns = conns;
  o.reconnect_interval = 5 * CHECK_MS;
  o.reconnect_max = 20 * CHECK_MS;
  o.dial_timeout = 2 * SEC;
  o.session.listener = &listener;
  o.session.codec = &lenpfx;
  o.session.user = &role_client;
  o.session.compress = compress;
  return o;
}

/* Start a client, wait for its sessions, talk: the client, or NULL if
 * it could not start. */
static loom_client *client_talk(const char *addr, int conns, int compress) {
  loom_client_opts o = client_opts(addr, conns, compress);
  loom_client *cl;
  int rc = loom_client_start(&cl, &o);
  expect_rc("loom_client_start", rc, 0);
  if (rc != 0)
    return NULL;
  /* A failed dial or session is redialled within milliseconds: with one
   * failure the client gets there; from i on it may not. */
  rc = loom_client_wait(cl, conns,
                        loom_now() + (fail_from
                                          ? CHECK_SCALE(50, 100, 200) * CHECK_MS
                                          : 2 * SEC));
  if (rc != 0) {
    CHECK_AT(fail_from, "loom_client_wait: %d (%s)", rc, loom_err_name(rc));
    CHECK_AT(rc == -ETIMEDOUT || rc == -ENOMEM, "loom_client_wait: %d (%s)", rc,
             loom_err_name(rc));
  }
  long want = client_traffic(cl);
  if (clean_run()) {
    long total = 0;
    for (size_t k = 0; k < sizeof client_sizes / sizeof client_sizes[0]; k++)
      total += (long)client_sizes[k];
    CHECK_EQ(want, total);
    CHECK_EQ(atomic_load(&echo_bytes), total);
    CHECK_EQ(count_role(ROLE_CLIENT, false), conns);
  }
  return cl;
}

static void client_close(loom_client *cl) {
  int64_t t0 = loom_now();
  check_close("loom_client_close", loom_client_close(cl, loom_now() + 2 * SEC),
              t0);
  check_all_closed(ROLE_CLIENT);
}

/* In the "from i on" variant the server hangs up before the client
 * closes, as in serve_one_peer. */
static void sc_client(void) {
  tserver ts;
  tserver_start(&ts);
  loom_client *cl = client_talk(ts.addr, 2, 0);
  if (fail_from)
    tserver_stop(&ts);
  if (cl)
    client_close(cl);
  if (!fail_from)
    tserver_stop(&ts);
}

/* ------------------------------------------------------------------ */
/* Scenario 3: the task pool alone, and a server that uses one.         */

#define NTASKS 40
#define NTHREAD_TASKS 8
static atomic_int ran[NTASKS + NTHREAD_TASKS];
static int submit_rc[NTASKS + NTHREAD_TASKS];

static void task_fn(void *arg) {
  atomic_fetch_add(&ran[(intptr_t)arg], 1);
  if ((intptr_t)arg % 5 == 0)
    loom_yield();
}

typedef struct submitter {
  loom_taskpool *p;
  atomic_int done;
} submitter;

static void *thread_submit(void *arg) {
  submitter *sb = arg;
  for (intptr_t i = NTASKS; i < NTASKS + NTHREAD_TASKS; i++)
    submit_rc[i] =
        loom_taskpool_submit(sb->p, (uint64_t)i, task_fn, (void *)i, 0);
  atomic_store(&sb->done, 1);
  return NULL;
}

static void sc_taskpool(void) {
  loom_taskpool_opts po = {.queues = 3, .workers = 2, .queue_len = 4};
  loom_taskpool *p;
  memset(submit_rc, 0, sizeof submit_rc);
  for (int i = 0; i < NTASKS + NTHREAD_TASKS; i++)
    atomic_store(&ran[i], 0);
  int rc = loom_taskpool_make(&p, &po);
  expect_rc("loom_taskpool_make", rc, 0);
  if (rc != 0)
    return;
  submitter sb = {p, 0};
  pthread_t t;
  CHECK_EQ(pthread_create(&t, NULL, thread_submit, &sb), 0);
  for (intptr_t i = 0; i < NTASKS; i++) {
    submit_rc[i] = loom_taskpool_submit(p, (uint64_t)i, task_fn, (void *)i,
                                        loom_now() + 2 * SEC);
    expect_rc("loom_taskpool_submit", submit_rc[i], 0);
  }
  /* The thread waits for our workers: with memory gone for good, this
   * thread must not block in a blocking section, for the runtime could
   * not start another to run them (loom/runtime.h says so). */
  if (fail_from)
    while (!atomic_load(&sb.done))
      loom_yield();
  join_thread(t);
  for (int i = NTASKS; i < NTASKS + NTHREAD_TASKS; i++)
    expect_rc("loom_taskpool_submit from a thread", submit_rc[i], 0);
  loom_taskpool_close(p);
  for (int i = 0; i < NTASKS + NTHREAD_TASKS; i++)
    CHECK_AT(atomic_load(&ran[i]) == (submit_rc[i] == 0 ? 1 : 0),
             "task %d: submitted with %d, ran %d times", i, submit_rc[i],
             atomic_load(&ran[i]));
}

static void sc_pool_server(void) {
  loom_taskpool_opts po = {.queues = 2, .workers = 1, .queue_len = 8};
  loom_taskpool *p;
  int rc = loom_taskpool_make(&p, &po);
  expect_rc("loom_taskpool_make", rc, 0);
  if (rc != 0)
    return;
  loom_server_opts o = server_opts(p, 0);
  loom_server *srv;
  rc = loom_server_start(&srv, &o);
  expect_rc("loom_server_start", rc, 0);
  if (rc == 0)
    serve_one_peer(srv, CHECK_SCALE(24, 16, 8));
  loom_taskpool_close(p);
}

/* ------------------------------------------------------------------ */
/* Scenario 4: compression on both ends (zlib allocates through the     */
/* hook too): a loom server and a loom client.                          */

/* Both ends are loom's, so neither can hang up first: in the "from i
 * on" variant memory comes back before the closes. */
static void sc_compress(void) {
  loom_server_opts so = server_opts(NULL, -1);
  so.sndbuf = 0;
  loom_server *srv;
  int rc = loom_server_start(&srv, &so);
  expect_rc("loom_server_start", rc, 0);
  if (rc != 0)
    return;
  char addr[128];
  CHECK_OK(loom_server_addr(srv, addr, sizeof addr));
  loom_client *cl = client_talk(addr, 1, -1);
  if (fail_from)
    atomic_store(&armed, 0);
  if (cl)
    client_close(cl);
  int64_t t0 = loom_now();
  check_close("loom_server_close", loom_server_close(srv, loom_now() + 2 * SEC),
              t0);
  check_all_closed(ROLE_SERVER);
}

/* ------------------------------------------------------------------ */
/* Running a scenario with allocation i failing.                        */

typedef struct scenario {
  const char *name;
  void (*fn)(void);
} scenario;

static const scenario scenarios[] = {
    {"server", sc_server},     {"client", sc_client},
    {"taskpool", sc_taskpool}, {"pool_server", sc_pool_server},
    {"compress", sc_compress}, {"timed_server", sc_timed_server},
};

static const scenario *find_scenario(const char *name) {
  for (size_t i = 0; i < sizeof scenarios / sizeof scenarios[0]; i++)
    if (strcmp(scenarios[i].name, name) == 0)
      return &scenarios[i];
  CHECK_FAIL("no scenario '%s'", name);
}

static void scenario_main(void *arg) {
  const scenario *sc = arg;
  atomic_store(&armed, 1);
  sc->fn();
  wait_all_freed();
  atomic_store(&armed, 0);
}

/* The child's watchdog: one run that takes this long is a hang. */
#define RUN_LIMIT_S CHECK_SCALE(10, 12, 15)

/* One loom_run of `sc` on `procs` Ps with allocation `at` failing (-1:
 * none). */
static void run_once(const scenario *sc, long at, bool from, int procs) {
  pthread_mutex_lock(&tab_mu);
  ntab = 0;
  pthread_mutex_unlock(&tab_mu);
  atomic_store(&echo_bytes, 0);
  atomic_store(&echo_bad, 0);
  atomic_store(&nalloc, 0);
  fail_at = at;
  fail_from = from;
  check_alloc_loom_run(scenario_main, (void *)(uintptr_t)sc, procs, at, from);
}

/* Child: argv = "scenario:procs:from:first:count:stride" — run
 * `scenario` on `procs` Ps with allocation i failing (from: and every one
 * after it) for i = first, first+stride, ... (count runs), then once
 * clean, and print the clean run's allocation count and the totals. */
HELPER(alloc_child) {
  char name[32];
  int from = 0, procs = 0;
  long first = 0, count = 0, stride = 1;
  CHECK_EQ(check_argc, 1);
  CHECK_EQ(sscanf(check_argv[0], "%31[^:]:%d:%d:%ld:%ld:%ld", name, &procs,
                  &from, &first, &count, &stride),
           6);
  const scenario *sc = find_scenario(name);
  CHECK_OK(loom_codec_lenpfx(&lenpfx, NULL));
  loom_set_allocator(&hook);
  check_alloc_watchdog(RUN_LIMIT_S);
  for (long k = 0; k < count; k++) {
    long at = first + k * stride;
    fprintf(stderr, "%s: failing allocation %ld%s\n", name, at,
            from ? " and on" : "");
    run_once(sc, at, from != 0, procs);
  }
  fprintf(stderr, "%s: failing allocation -1 (none: a clean run)\n", name);
  run_once(sc, -1, false, procs); /* and it all works again */
  printf("allocations %ld injected %ld enomem %ld errors %ld free_unseen %ld\n",
         atomic_load(&nalloc), atomic_load(&injected_count),
         atomic_load(&enomem_seen), atomic_load(&errors_seen),
         atomic_load(&free_unseen));
  fflush(stdout);
  loom_set_allocator(NULL);
  exit(0);
}

typedef struct totals {
  long allocs, injected, enomem, errors, free_unseen;
} totals;

/* Run a child; false if it failed, with *failed_at the allocation it was
 * failing then (from its last "failing allocation" line; -1: the clean
 * run) and `why` the line that says what went wrong. */
static bool run_child(const char *name, const char *spec, totals *t,
                      long *failed_at, char *why, size_t whylen) {
  static struct check_child c; /* 64 KiB: not on the stack */
  char how[128];
  check_spawn_self(&c, CHECK_SCALE(100, 200, 400), "alloc_child", spec);
  if (c.timed_out || !WIFEXITED(c.status) || WEXITSTATUS(c.status) != 0) {
    char key[64];
    snprintf(key, sizeof key, "%s: failing allocation ", name);
    *failed_at = -1;
    for (const char *p = strstr(c.out, key); p; p = strstr(p + 1, key))
      *failed_at = strtol(p + strlen(key), NULL, 10);
    /* The first line that names the trouble, else the child's status. */
    static const char *const marks[] = {
        "CHECK failed", "watchdog:", "ERROR: ", "runtime error:", "WARNING: "};
    const char *line = NULL;
    for (size_t m = 0; m < sizeof marks / sizeof marks[0] && !line; m++)
      line = strstr(c.out, marks[m]);
    if (line) {
      size_t n = strcspn(line, "\n");
      snprintf(why, whylen, "%.*s (%s)", (int)(n < 400 ? n : 400), line,
               check_child_how(&c, how, sizeof how));
    } else {
      snprintf(why, whylen, "%s", check_child_how(&c, how, sizeof how));
    }
    /* The tail names the allocation; a hang dump is printed whole. */
    size_t off = c.len > 4000 ? c.len - 4000 : 0;
    const char *dump = strstr(c.out, "---- hang dump");
    if (dump != NULL && (size_t)(dump - c.out) < off)
      off = (size_t)(dump - c.out) > 2000 ? (size_t)(dump - c.out) - 2000 : 0;
    printf("---- child %s %s; end of its output:\n%s\n----\n", spec,
           check_child_how(&c, how, sizeof how), c.out + off);
    return false;
  }
  const char *p = strstr(c.out, "allocations ");
  CHECK(p != NULL);
  CHECK_EQ(
      sscanf(
          p,
          "allocations %ld injected %ld enomem %ld errors %ld free_unseen %ld",
          &t->allocs, &t->injected, &t->enomem, &t->errors, &t->free_unseen),
      5);
  return true;
}

/* Fail each allocation of `name` in turn (from: and all after it).
 *
 * Which allocation has number i moves by a few from run to run (threads,
 * how much a socket takes at once), so the sweep is made twice, on two
 * Ps and on one: two interleavings give each allocation near the end two
 * chances to be the one that fails.
 *
 * A failing i does not stop a sweep: the next child starts after it, so
 * one run lists the allocations that break something — up to five, and
 * within a time budget (a hang costs a watchdog period). */
static void torture(const char *name, bool from) {
  static const int procs[] = {2, 1};
  char spec[96], why[600], list[4096] = "";
  long failed_at, nfailed = 0;
  int64_t t0 = check_mono_ns();
  for (size_t pi = 0; pi < sizeof procs / sizeof procs[0] && nfailed < 5;
       pi++) {
    totals clean, sum = {0}, t;
    snprintf(spec, sizeof spec, "%s:%d:0:-1:0:1", name, procs[pi]);
    if (!run_child(name, spec, &clean, &failed_at, why, sizeof why))
      CHECK_FAIL("%s: a clean run failed: %s", name, why);
    CHECK_GT(clean.allocs, 0);
    CHECK_EQ(clean.injected, 0);
    /* Go past the count: it varies.  Under TSan every run is slow: every
     * other i (the rest is the plain build's). */
    long limit = clean.allocs + clean.allocs / 4 + 8;
    long stride = CHECK_SCALE(1, 1, 2), chunk = 16;
    printf("%s, %d Ps: a clean run makes %ld allocations; failing %seach "
           "%si of 1..%ld\n",
           name, procs[pi], clean.allocs, from ? "from i on, for " : "",
           stride > 1 ? "other " : "", limit);
    for (long i = 1; i <= limit;) {
      long count = (limit - i) / stride + 1;
      if (count > chunk)
        count = chunk;
      snprintf(spec, sizeof spec, "%s:%d:%d:%ld:%ld:%ld", name, procs[pi],
               from ? 1 : 0, i, count, stride);
      if (run_child(name, spec, &t, &failed_at, why, sizeof why)) {
        sum.injected += t.injected;
        sum.enomem += t.enomem;
        sum.errors += t.errors;
        sum.free_unseen += t.free_unseen;
        i += count * stride;
        continue;
      }
      nfailed++;
      size_t used = strlen(list);
      snprintf(list + used, sizeof list - used,
               "\n  %d Ps, allocation %ld%s: %s", procs[pi], failed_at,
               from ? " and on" : "", why);
      if (failed_at < i || nfailed == 5 ||
          check_mono_ns() - t0 > (int64_t)RUN_LIMIT_S * SEC / 2)
        break; /* the clean run failed, or enough: the budget is a ctest timeout
                */
      i = failed_at + stride;
    }
    printf("%s, %d Ps: %ld failures injected; %ld -ENOMEM results; %ld "
           "sessions closed with an "
           "error; %ld sessions freed unstarted\n",
           name, procs[pi], sum.injected, sum.enomem, sum.errors,
           sum.free_unseen);
    if (!nfailed) {
      CHECK_GT(sum.injected, 0);
      CHECK_GT(sum.enomem + sum.errors, 0);
    }
    if (check_mono_ns() - t0 > (int64_t)RUN_LIMIT_S * SEC / 2)
      break;
  }
  if (nfailed)
    CHECK_FAIL("%s: %ld failing allocations (a sweep stops after 5 or when its "
               "time is up):%s",
               name, nfailed, list);
}

/* The server: start, one session's echo (a frame over the stack encode
 * buffer; a burst that fills the write queue), graceful close. */
TEST(server_fail_each) { torture("server", false); }
TEST(server_fail_from) { torture("server", true); }

/* loom_client with two sessions against a plain echo server. */
TEST(client_fail_each) { torture("client", false); }
TEST(client_fail_from) { torture("client", true); }

/* loom_taskpool_make / submit (coroutine and thread) / close. */
TEST(taskpool_fail_each) { torture("taskpool", false); }
TEST(taskpool_fail_from) { torture("taskpool", true); }

/* A server whose on_message runs on a task pool. */
TEST(timed_server_fail_each) { torture("timed_server", false); }
TEST(timed_server_fail_from) { torture("timed_server", true); }
TEST(pool_server_fail_each) { torture("pool_server", false); }
TEST(pool_server_fail_from) { torture("pool_server", true); }

/* A compressing server and a compressing client, both on loom. */
TEST(compress_fail_each) { torture("compress", false); }
TEST(compress_fail_from) { torture("compress", true); }

/* ------------------------------------------------------------------ */
/* Server close without any memory, a peer connected and idle: closing  */
/* or aborting a session must not need an allocation, or a server could */
/* not be shut down when memory runs out.                               */

static void close_without_memory_main(void *arg) {
  (void)arg;
  loom_server_opts o = server_opts(NULL, 0);
  loom_server *srv;
  CHECK_OK(loom_server_start(&srv, &o));
  peer p;
  memset(&p, 0, sizeof p);
  CHECK_OK(loom_server_addr(srv, p.addr, sizeof p.addr));
  p.keep_open = true;
  pthread_t t;
  CHECK_EQ(pthread_create(&t, NULL, peer_main, &p), 0);
  bool ok;
  WAIT_UNTIL(ok, atomic_load(&p.exchanged), 10 * SEC);
  CHECK(ok);
  CHECK_EQ(p.result, IO_OK);
  /* The session is idle in its read: now nothing can be allocated. */
  atomic_store(&fail_all, 1);
  int64_t t0 = loom_now();
  int rc = loom_server_close(srv, loom_now() + SEC);
  int64_t took = loom_now() - t0;
  atomic_store(&fail_all, 0);
  printf("loom_server_close without memory: %d (%s) after %lld ms\n", rc,
         loom_err_name(rc), (long long)(took / CHECK_MS));
  /* Graceful, or aborted at the deadline: either way the session is
   * closed by the time the call returns, and soon after the deadline. */
  CHECKF(rc == 0 || rc == -ETIMEDOUT, "%d (%s)", rc, loom_err_name(rc));
  CHECKF(took < 2 * SEC, "loom_server_close(now + 1 s) took %lld ms",
         (long long)(took / CHECK_MS));
  check_all_closed(ROLE_SERVER);
  join_thread(t);
  CHECKF(p.close_result == IO_CLOSED,
         "the peer did not see its connection close (it waited %d s)",
         PEER_TIMEOUT_S);
  wait_all_freed();
}

TEST(server_close_without_memory) {
  CHECK_OK(loom_codec_lenpfx(&lenpfx, NULL));
  loom_set_allocator(&hook);
  check_watchdog(20, "loom_server_close without memory");
  check_run(close_without_memory_main, NULL, 2);
  printf("%ld allocations refused\n", atomic_load(&injected_count));
  CHECK_EQ(atomic_load(&nlive), 0);
  loom_set_allocator(NULL);
}

/* ------------------------------------------------------------------ */
/* sessions_total counts the sessions that started: one whose reader   */
/* coroutine could not be had is no session (no callback ever sees it), */
/* so it is in no count, only in errors.other.                          */

/* A coroutine of the runtime's next arena would be made only after an
 * allocation through the hook (the arena's record), so the case fills
 * the arena it has first: stacks of 4 MiB, 16 to an arena, taken by
 * coroutines that wait on `gate` until every allocation fails. */
static loom_wg gate = LOOM_WG_INIT, parked = LOOM_WG_INIT;

static void parker(void *arg) {
  (void)arg;
  loom_wg_wait(&gate, 0);
  loom_wg_done(&parked);
}

typedef struct started_run {
  long at;        /* the armed allocation that fails (-1: none) */
  long allocs;    /* armed allocations made */
  loom_metrics m; /* the server's, once the connection is dealt with */
  int closes;     /* sessions that had on_close */
} started_run;

static void started_main(void *arg) {
  started_run *r = arg;
  loom_server_opts o = server_opts(NULL, 0);
  loom_server *srv;
  CHECK_OK(loom_server_start(&srv, &o));
  char addr[128];
  CHECK_OK(loom_server_addr(srv, addr, sizeof addr));
  CHECK_OK(loom_wg_add(&gate, 1));
  atomic_store(&fail_all, 1);
  int n = 0;
  for (;; n++) {
    CHECK_OK(loom_wg_add(&parked, 1));
    if (loom_go(parker, NULL) < 0) {
      loom_wg_done(&parked);
      break;
    }
  }
  atomic_store(&fail_all, 0);
  CHECK_GT(n, 0);
  CHECK_LT(n, 16);
  /* Now the allocations of one connection's way in, i-th failing. */
  atomic_store(&nalloc, 0);
  fail_at = r->at;
  fail_from = false;
  atomic_store(&armed, 1);
  /* The peer ends its side and waits for the server to close the
   * connection: a session reads the end and closes; a connection that
   * could not become one is closed at once. */
  loom_block_enter();
  int fd = tcp_connect(addr, 0);
  CHECK(fd >= 0);
  CHECK(shutdown(fd, SHUT_WR) == 0);
  uint8_t b;
  ssize_t k = recv_once(fd, &b, 1);
  int result = io_result(k);
  close(fd);
  loom_block_exit();
  CHECK_AT(result == IO_CLOSED, "the peer's connection stayed open");
  bool ok;
  WAIT_UNTIL(ok, (loom_server_metrics(srv, &r->m), r->m.sessions_open == 0),
             10 * SEC);
  atomic_store(&armed, 0);
  r->allocs = atomic_load(&nalloc);
  CHECK_AT(ok, "a session still open after its peer left");
  r->closes = count_role(ROLE_SERVER, true);
  loom_wg_done(&gate);
  loom_wg_wait(&parked, 0);
  CHECK_OK(loom_server_close(srv, loom_now() + 5 * SEC));
  wait_all_freed();
}

static void started_once(started_run *r) {
  pthread_mutex_lock(&tab_mu);
  ntab = 0;
  pthread_mutex_unlock(&tab_mu);
  loom_config cfg;
  loom_config_init(&cfg);
  cfg.procs = 1; /* one P's cache of coroutines to empty */
  cfg.stack_size = (size_t)4 << 20;
  CHECK_OK(loom_run(started_main, r, &cfg));
  CHECK_AT(atomic_load(&nlive) == 0, "%ld blocks still allocated",
           atomic_load(&nlive));
}

TEST(sessions_total_counts_started_sessions) {
  CHECK_OK(loom_codec_lenpfx(&lenpfx, NULL));
  loom_set_allocator(&hook);
  check_watchdog(120, "sessions_total_counts_started_sessions");
  started_run clean = {.at = -1};
  started_once(&clean);
  CHECK_EQ(clean.closes, 1);
  CHECK_EQ(clean.m.sessions_total, 1);
  int unstarted = 0;
  for (long i = 1; i <= clean.allocs + 8; i++) {
    started_run r = {.at = i};
    started_once(&r);
    /* The session's record or its reader's coroutine failed. */
    if (r.m.errors.other > 0)
      unstarted++;
    CHECKF(r.m.sessions_total == (uint64_t)r.closes,
           "allocation %ld failing: sessions_total %llu, on_close %d", i,
           (unsigned long long)r.m.sessions_total, r.closes);
  }
  printf("%ld allocations on a connection's way in; %d runs without a "
         "session\n",
         clean.allocs, unstarted);
  /* Both ways for a session not to start were taken. */
  CHECK_GE(unstarted, 2);
  loom_set_allocator(NULL);
}

/* ------------------------------------------------------------------ */
/* Codecs: each encode fails cleanly.                                   */

/* test_codec.c fails each allocation of loom_buf and one of the
 * length-prefixed encode; here every allocation of every ready-made
 * codec's encode, into a buffer on caller storage (the session's stack
 * encode) and into a heap one (the write queue). */
TEST(codec_encode_fail_each) {
  static const size_t sizes[] = {0, 1, 60, 200, 255, 3000, 17000};
  loom_codec codecs[6];
  loom_lenpfx_opts lo[4] = {
      {1, false, 0}, {2, true, 0}, {4, false, -4}, {8, true, 0}};
  for (int i = 0; i < 4; i++)
    CHECK_OK(loom_codec_lenpfx(&codecs[i], &lo[i]));
  CHECK_OK(loom_codec_line(&codecs[4], '\n', false));
  CHECK_OK(loom_codec_raw(&codecs[5]));
  uint8_t *data = malloc(17000), *ref = malloc(64 * 1024),
          *got = malloc(64 * 1024);
  CHECK(data && ref && got);
  for (size_t i = 0; i < 17000; i++)
    data[i] = (uint8_t)('a' + i % 26);
  loom_set_allocator(&hook);
  long tried = 0;
  for (int ci = 0; ci < 6; ci++) {
    const loom_codec *c = &codecs[ci];
    for (int storage = 0; storage < 2; storage++) {
      size_t reflen = 0;
      long clean = -1;
      for (long at = 0; clean < 0 || at <= clean; at++) {
        _Alignas(16) uint8_t mem[256];
        loom_buf b;
        if (storage)
          loom_buf_init_on(&b, mem, sizeof mem);
        else
          loom_buf_init(&b, 1024);
        atomic_store(&nalloc, 0);
        fail_at = at ? at : -1; /* at 0: the clean run that counts */
        fail_from = false;
        atomic_store(&armed, 1);
        long failures = 0;
        for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
          size_t len = sizes[k];
          if (ci == 0 && len > 255)
            continue; /* more than a 1-byte field says */
          size_t before = loom_buf_len(&b);
          int rc = c->encode(c, data, len, 1 << 20, &b);
          if (rc == -ENOMEM) {
            failures++;
            CHECK_EQ(loom_buf_len(&b), before);
            loom_buf_copyout(&b, got, before);
            CHECK(at == 0 || memcmp(got, ref, before) == 0);
            rc = c->encode(c, data, len, 1 << 20, &b);
          }
          CHECKF(rc == 0,
                 "codec %d storage %d allocation %ld: encode of %zu: %d", ci,
                 storage, at, len, rc);
        }
        atomic_store(&armed, 0);
        CHECKF(failures == (at > 0 && at <= atomic_load(&nalloc) ? 1 : 0),
               "codec %d storage %d allocation %ld: %ld failures", ci, storage,
               at, failures);
        CHECK_LE(loom_buf_len(&b), 64 * 1024);
        loom_buf_copyout(&b, got, loom_buf_len(&b));
        if (at == 0) {
          reflen = loom_buf_len(&b);
          memcpy(ref, got, reflen);
          clean = atomic_load(&nalloc);
          CHECK_GT(clean, 0);
        } else {
          CHECK_EQ(loom_buf_len(&b), reflen);
          CHECK(memcmp(got, ref, reflen) == 0);
          tried++;
        }
        loom_buf_reset(&b);
        CHECK_EQ(atomic_load(&nlive), 0);
      }
    }
  }
  loom_set_allocator(NULL);
  printf("%ld encode runs with one allocation failing\n", tried);
  free(data);
  free(ref);
  free(got);
}

CHECK_MAIN()
