/*
 * test_engine_chaos.c — randomized stress of the engine (loom/engine.h)
 * against real peers on loopback that keep to the protocol or do not,
 * with the engine's contracts checked as it runs and at the end.
 *
 * A round starts a server with a configuration drawn from the seeded
 * generator — TCP or Unix, length-prefixed frames, no task pool or one
 * dispatching by session, key or round-robin, zlib or not, small
 * write-queue watermarks under a policy (block, block with a timeout,
 * timeout 0, close_on_full), small socket buffers, cron, idle and write
 * timeouts — and lets peers at it:
 *
 *   echo     keeps a window of frames out and checks every echo byte for
 *            byte, in order (per session, or per key with key dispatch,
 *            or just once each with round-robin); ends by half-closing,
 *            by asking the server to close it, by waiting for its echoes
 *            and closing, or abruptly
 *   stop     sends and never reads          slow   reads a little, slowly
 *   reset    resets (SO_LINGER 0) mid-frame oversize  a header over the
 *            limit                          trunc  half a frame, then EOF
 *   garbage  bytes that are no zlib stream (or no sane frame)
 *   vanish   connects and goes              idle   connects and waits
 *   chat     joins a room; the server broadcasts each of its messages to
 *            the other members from the sender's handler
 *
 * Rounds may also close the server at a random moment: from the test's
 * main coroutine, or from inside on_open, on_message, on_cron or
 * on_close.  A client round keeps loom_client sessions in ping-pong with
 * a server that restarts under them.
 *
 * Checked: on_close once per session and last (nothing after it, nothing
 * overlapping it); a well-behaved echo peer gets every echo exactly once
 * and in order; a peer that must be cut off is; a session's write queue
 * never holds more than wq_high plus one package; the metrics add up to
 * what the test counted (sessions, packages, errors by kind); every
 * coroutine the round started is gone at its end; every wait is bounded,
 * under a watchdog.  The sanitizer builds add leaks and races.
 *
 * ENGINE_CHAOS_SEED picks the run (default 1; printed), ENGINE_CHAOS_MS
 * how long each case runs (default about 3 s, less under sanitizers).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
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
#include "check_rng.h"
#include "check_zlib.h"
#include "loom.h"

#define SEC INT64_C(1000000000)
#define MS CHECK_MS

/* Wait (polling every millisecond) until `cond`, at most `secs` seconds. */
#define WAIT_FOR(cond, secs)                                                   \
  do {                                                                         \
    int64_t wf_end_ = loom_now() + (int64_t)(secs)*SEC;                        \
    while (!(cond)) {                                                          \
      if (loom_now() > wf_end_)                                                \
        CHECK_FAIL("seed %llu: waited %d s for: %s",                           \
                   (unsigned long long)g_seed, (int)(secs), #cond);            \
      loom_sleep(MS);                                                          \
    }                                                                          \
  } while (0)

static uint64_t g_seed = 1;
static int64_t g_ms;
static bool g_verbose;

static void params(const char *name) {
  const char *e = getenv("ENGINE_CHAOS_SEED");
  if (e != NULL)
    g_seed = strtoull(e, NULL, 0);
  g_ms = CHECK_SCALE(3000, 2000, 2000);
  if ((e = getenv("ENGINE_CHAOS_MS")) != NULL)
    g_ms = strtoll(e, NULL, 0);
  g_verbose = getenv("ENGINE_CHAOS_VERBOSE") != NULL;
  fprintf(stderr, "engine_chaos %s: seed=%llu ms=%lld\n", name,
          (unsigned long long)g_seed, (long long)g_ms);
}

/* A seed for one case: the run's seed mixed with the case's name. */
static uint64_t case_seed(const char *name) {
  uint64_t h = g_seed * 0x9E3779B97F4A7C15ULL;
  for (const char *p = name; *p; p++)
    h = (h ^ (uint8_t)*p) * 0x100000001B3ULL;
  return h;
}

/* ------------------------------------------------------------------ */
/* Frames.  Payload: type, pid (4), seq (4), key, then a body whose     */
/* length and bytes follow from (pid, seq): any echo can be checked     */
/* byte for byte from its own header.                                   */

enum { HDR = 10, BODY_MAX = 32 * 1024, FRAME_MAX = 4 + HDR + BODY_MAX };
enum { MAX_PKG = 64 * 1024 };

static uint64_t mix64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return x;
}

static uint64_t fhash(uint32_t pid, uint32_t seq) {
  return mix64(((uint64_t)pid << 32 | seq) ^ g_seed);
}

static size_t body_len(uint32_t pid, uint32_t seq) {
  uint64_t h = fhash(pid, seq);
  unsigned r = (unsigned)(h % 100);
  if (r < 70)
    return (size_t)(h >> 8) % 64;
  if (r < 96)
    return 64 + (size_t)(h >> 8) % 3000;
  return 3000 + (size_t)(h >> 8) % (BODY_MAX - 3000);
}

static uint8_t frame_key(uint32_t pid, uint32_t seq) {
  return (uint8_t)((fhash(pid, seq) >> 40) % 4);
}

static void put32(uint8_t *p, uint32_t v) {
  p[0] = (uint8_t)(v >> 24);
  p[1] = (uint8_t)(v >> 16);
  p[2] = (uint8_t)(v >> 8);
  p[3] = (uint8_t)v;
}

static uint32_t get32(const uint8_t *p) {
  return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 |
         p[3];
}

/* The payload of frame (type, pid, seq) into out; its length. */
static size_t mk_payload(uint8_t *out, uint8_t type, uint32_t pid,
                         uint32_t seq) {
  size_t n = body_len(pid, seq);
  out[0] = type;
  put32(out + 1, pid);
  put32(out + 5, seq);
  out[9] = frame_key(pid, seq);
  for (size_t i = 0; i < n; i++)
    out[HDR + i] = (uint8_t)(pid * 131 + seq * 31 + i * 7);
  return HDR + n;
}

/* The whole frame (4-byte length, then the payload); its length. */
static size_t mk_frame(uint8_t *out, uint8_t type, uint32_t pid, uint32_t seq) {
  size_t n = mk_payload(out + 4, type, pid, seq);
  put32(out, (uint32_t)n);
  return n + 4;
}

static size_t frame_len(uint32_t pid, uint32_t seq) {
  return 4 + HDR + body_len(pid, seq);
}

/* Whether payload[0..len) is exactly frame (type, pid, seq); says how
 * it is not. */
static bool payload_ok(const uint8_t *p, size_t len) {
  static _Thread_local uint8_t want[HDR + BODY_MAX];
  if (len < HDR) {
    fprintf(stderr, "payload of %zu bytes\n", len);
    return false;
  }
  size_t n = mk_payload(want, p[0], get32(p + 1), get32(p + 5));
  if (n == len && memcmp(want, p, len) == 0)
    return true;
  size_t i = 0;
  while (i < n && i < len && want[i] == p[i])
    i++;
  fprintf(stderr,
          "payload type %c pid %u seq %u: %zu bytes, want %zu; first "
          "difference at %zu\n",
          p[0], get32(p + 1), get32(p + 5), len, n, i);
  return false;
}

/* ------------------------------------------------------------------ */
/* The server under test and what it records.                          */

enum pool_kind { P_NONE, P_SESSION, P_KEY, P_RR };
enum policy { W_BLOCK, W_TIMED, W_ZERO };
enum closer { C_MAIN, C_OPEN, C_MESSAGE, C_CRON, C_CLOSE, C_KINDS };

static const char *pool_names[] = {"none", "session", "key", "rr"};
static const char *policy_names[] = {"block", "timed", "zero"};
static const char *closer_names[] = {"main", "on_open", "on_message", "on_cron",
                                     "on_close"};

typedef struct cfg {
  bool unix_sock;
  enum pool_kind pool;
  int pool_queues, pool_workers;
  int compress;
  enum policy policy;
  int64_t wtimeout; /* the timeout echo writes use (W_TIMED) */
  bool close_on_full;
  size_t wq_high, wq_low;
  int sndbuf;
  int64_t cron, read_timeout, write_timeout, linger;
  bool refuse; /* on_open refuses TCP peers whose port % 7 == 0 */
} cfg;

/* Error kinds as the metrics count them. */
enum {
  K_DECODE,
  K_OVERSIZE,
  K_TIMEOUT,
  K_RESET,
  K_COMPRESS,
  K_OTHER,
  K_NOBUFS,
  K_N
};

typedef struct srvctx {
  cfg c;
  loom_server *srv;
  char addr[128];
  char path[108];
  loom_taskpool *pool;
  loom_codec codec;
  /* Counted by the callbacks. */
  atomic_int opens, closes, refused, msgs, crons, errs;
  atomic_int errk[K_N];
  atomic_int wr_ok, wr_full, wr_closed; /* write results */
  atomic_int bcast_ok;                  /* broadcast writes that took */
  atomic_int aborted;                   /* on_error seen */
  atomic_uchar pid_err[4096];           /* on_error seen by peer pid (& 4095) */
  /* Closing the server: once. */
  atomic_bool closing;
  atomic_int close_started;
  atomic_int close_from; /* -1, or the callback that closes (enum closer) */
  atomic_int close_rc;
  int64_t close_deadline_ns; /* relative, for the callback that closes */
  /* The chat room. */
  loom_mutex room_mu;
  loom_session *room[64];
  int nroom;
} srvctx;

/* One session's record (its user pointer from on_open on). */
typedef struct srec {
  srvctx *sc;
  atomic_int closed;
  atomic_int in_cb; /* on_message (or on_cron) under way */
  atomic_int cb_after_close;
  atomic_uint pid; /* the peer's, from its first frame (0: none yet) */
  bool in_room;
} srec;

static int err_kind(int err) {
  switch (err) {
  case -EBADMSG:
    return K_DECODE;
  case -EMSGSIZE:
    return K_OVERSIZE;
  case -ETIMEDOUT:
    return K_TIMEOUT;
  case -ECONNRESET:
  case -EPIPE:
  case -ECONNABORTED:
  case -ECONNREFUSED:
  case -ENOTCONN:
    return K_RESET;
  case -ENOBUFS:
    return K_NOBUFS;
  case LOOM_ECOMPRESS:
    return K_COMPRESS;
  default:
    return K_OTHER;
  }
}

/* The bound on a session's write queue: wq_high plus one package. */
static void check_wq(loom_session *s, const srvctx *sc) {
  loom_session_stats st;
  loom_session_stats_get(s, &st);
  CHECKF(st.wq_bytes <= sc->c.wq_high + FRAME_MAX,
         "seed %llu: wq_bytes %zu, wq_high %zu", (unsigned long long)g_seed,
         st.wq_bytes, sc->c.wq_high);
}

static void count_write(srvctx *sc, int rc) {
  if (rc == 0)
    atomic_fetch_add(&sc->wr_ok, 1);
  else if (rc == -EAGAIN || rc == -ETIMEDOUT || rc == -ENOBUFS)
    atomic_fetch_add(&sc->wr_full, 1);
  else if (rc == LOOM_ECLOSED)
    atomic_fetch_add(&sc->wr_closed, 1);
  else
    CHECK_FAIL("seed %llu: write returned %d (%s)", (unsigned long long)g_seed,
               rc, loom_err_name(rc));
}

static int64_t echo_timeout(const srvctx *sc) {
  switch (sc->c.policy) {
  case W_BLOCK:
    return -1;
  case W_TIMED:
    return sc->c.wtimeout;
  default:
    return 0;
  }
}

static int server_close_now(srvctx *sc, int64_t deadline);

/* Close the server from callback `where` if the round asked for it. */
static void maybe_close_from(srvctx *sc, enum closer where) {
  if (atomic_load(&sc->close_from) != (int)where)
    return;
  (void)server_close_now(sc, loom_now() + sc->close_deadline_ns);
}

static int port_of(const char *addr) {
  const char *c = strrchr(addr, ':');
  return c ? atoi(c + 1) : 0;
}

static int s_open(loom_session *s) {
  srvctx *sc = loom_session_user(s);
  srec *r = calloc(1, sizeof *r);
  CHECK(r != NULL);
  r->sc = sc;
  loom_session_set_user(s, r);
  atomic_fetch_add(&sc->opens, 1);
  maybe_close_from(sc, C_OPEN);
  if (sc->c.refuse && !sc->c.unix_sock) {
    char ra[128];
    if (loom_session_remote_addr(s, ra, sizeof ra) == 0 &&
        port_of(ra) % 7 == 0) {
      atomic_fetch_add(&sc->refused, 1);
      return -ECONNREFUSED;
    }
  }
  return 0;
}

static void cb_enter(srec *r) {
  if (atomic_load(&r->closed))
    atomic_fetch_add(&r->cb_after_close, 1);
  CHECKF(!atomic_load(&r->closed), "seed %llu: a callback after on_close",
         (unsigned long long)g_seed);
  atomic_fetch_add(&r->in_cb, 1);
}

static void cb_leave(srec *r) { atomic_fetch_sub(&r->in_cb, 1); }

static void room_join(srvctx *sc, loom_session *s, srec *r) {
  loom_mutex_lock(&sc->room_mu);
  if (!r->in_room && sc->nroom < 64) {
    sc->room[sc->nroom++] = loom_session_ref(s);
    r->in_room = true;
  }
  loom_mutex_unlock(&sc->room_mu);
}

static void room_leave(srvctx *sc, loom_session *s, srec *r) {
  loom_session *drop = NULL;
  loom_mutex_lock(&sc->room_mu);
  if (r->in_room) {
    for (int i = 0; i < sc->nroom; i++)
      if (sc->room[i] == s) {
        drop = s;
        sc->room[i] = sc->room[--sc->nroom];
        break;
      }
    r->in_room = false;
  }
  loom_mutex_unlock(&sc->room_mu);
  if (drop)
    loom_session_unref(drop);
}

static void broadcast(srvctx *sc, loom_session *from, const loom_pkg *pkg) {
  loom_session *to[64];
  int n = 0;
  loom_mutex_lock(&sc->room_mu);
  for (int i = 0; i < sc->nroom; i++)
    if (sc->room[i] != from)
      to[n++] = loom_session_ref(sc->room[i]);
  loom_mutex_unlock(&sc->room_mu);
  for (int i = 0; i < n; i++) {
    int rc = loom_session_write(to[i], pkg->data, pkg->len, echo_timeout(sc));
    count_write(sc, rc);
    if (rc == 0)
      atomic_fetch_add(&sc->bcast_ok, 1);
    check_wq(to[i], sc);
    loom_session_unref(to[i]);
  }
}

static void s_message(loom_session *s, const loom_pkg *pkg) {
  srec *r = loom_session_user(s);
  srvctx *sc = r->sc;
  cb_enter(r);
  atomic_fetch_add(&sc->msgs, 1);
  uint8_t type = pkg->len >= HDR ? pkg->data[0] : 0;
  if (type != 0)
    atomic_store(&r->pid, get32(pkg->data + 1));
  if (type == 'E' || type == 'C' || type == 'J') {
    if (type == 'J')
      room_join(sc, s, r);
    int rc = loom_session_write(s, pkg->data, pkg->len, echo_timeout(sc));
    count_write(sc, rc);
    check_wq(s, sc);
    if (type == 'C')
      loom_session_close(s);
  } else if (type == 'B') {
    broadcast(sc, s, pkg);
  }
  cb_leave(r);
  maybe_close_from(sc, C_MESSAGE);
}

static void s_cron(loom_session *s) {
  srec *r = loom_session_user(s);
  cb_enter(r);
  atomic_fetch_add(&r->sc->crons, 1);
  check_wq(s, r->sc);
  cb_leave(r);
  maybe_close_from(r->sc, C_CRON);
}

static void s_error(loom_session *s, int err) {
  srec *r = loom_session_user(s);
  srvctx *sc = r->sc;
  CHECK(!atomic_load(&r->closed));
  CHECK(loom_session_closed(s));
  CHECK_LT(err, 0);
  CHECKF(err == -EBADMSG || err == -EMSGSIZE || err == -ETIMEDOUT ||
             err == -ECONNRESET || err == -EPIPE || err == -ENOBUFS ||
             err == LOOM_ECOMPRESS || err == LOOM_ECLOSED,
         "seed %llu: on_error %d (%s)", (unsigned long long)g_seed, err,
         loom_err_name(err));
  atomic_fetch_add(&sc->errk[err_kind(err)], 1);
  atomic_fetch_add(&sc->errs, 1);
  atomic_store(&sc->aborted, 1);
  uint32_t pid = atomic_load(&r->pid);
  if (pid != 0)
    atomic_store(&sc->pid_err[pid & 4095], 1);
}

static void s_close(loom_session *s) {
  srec *r = loom_session_user(s);
  srvctx *sc = r->sc;
  CHECK(loom_session_closed(s));
  CHECKF(atomic_fetch_add(&r->closed, 1) == 0, "seed %llu: on_close twice",
         (unsigned long long)g_seed);
  CHECKF(atomic_load(&r->in_cb) == 0,
         "seed %llu: on_close while a callback runs",
         (unsigned long long)g_seed);
  room_leave(sc, s, r);
  atomic_fetch_add(&sc->closes, 1);
  maybe_close_from(sc, C_CLOSE);
}

static void s_free(loom_session *s) {
  srec *r = loom_session_user(s);
  CHECK_EQ(atomic_load(&r->closed), 1);
  CHECK_EQ(atomic_load(&r->cb_after_close), 0);
  free(r);
}

static const loom_session_listener s_listener = {
    .on_open = s_open,
    .on_message = s_message,
    .on_cron = s_cron,
    .on_error = s_error,
    .on_close = s_close,
    .on_free = s_free,
};

static uint64_t s_key(loom_session *s, const loom_pkg *pkg) {
  (void)s;
  return pkg->len >= HDR ? pkg->data[9] : 0;
}

static int unix_seq;

static void cfg_draw(cfg *c, rng_t *g) {
  memset(c, 0, sizeof *c);
  c->unix_sock = rn(g, 3) == 0;
  c->pool = (enum pool_kind)rn(g, 4);
  c->pool_queues = 1 + (int)rn(g, 4);
  c->pool_workers = c->pool == P_RR ? 1 + (int)rn(g, 3) : 1;
  static const int levels[] = {-1, 1, 6, 9};
  c->compress = rn(g, 3) == 0 ? levels[rn(g, 4)] : 0;
  c->policy = (enum policy)rn(g, 3);
  c->wtimeout = (100 + rn(g, 500)) * MS;
  c->close_on_full = c->policy != W_BLOCK && rn(g, 3) == 0;
  static const size_t highs[] = {4096, 16384, 65536, 262144};
  c->wq_high = highs[rn(g, 4)];
  c->wq_low = rn(g, 2) ? c->wq_high / 4 : 0;
  c->sndbuf = rn(g, 2) ? 4096 + (int)rn(g, 16384) : 0;
  c->cron = rn(g, 2) ? (5 + rn(g, 40)) * MS : 0;
  c->write_timeout = rn(g, 3) == 0 ? 2 * SEC : 0;
  c->read_timeout = 0;
  c->linger = 0;
}

static void cfg_print(const cfg *c, const char *what) {
  if (!g_verbose)
    return;
  fprintf(stderr,
          "  %s: %s pool=%s/%dx%d z=%d policy=%s%s(%lldms) wq=%zu/%zu "
          "sndbuf=%d cron=%lldms rt=%lldms wt=%lldms linger=%lld%s\n",
          what, c->unix_sock ? "unix" : "tcp", pool_names[c->pool],
          c->pool_queues, c->pool_workers, c->compress, policy_names[c->policy],
          c->close_on_full ? "+close_on_full" : "",
          (long long)(c->wtimeout / MS), c->wq_high, c->wq_low, c->sndbuf,
          (long long)(c->cron / MS), (long long)(c->read_timeout / MS),
          (long long)(c->write_timeout / MS), (long long)c->linger,
          c->refuse ? " refuse" : "");
}

/* Start (or restart, on the same address) the server of sc->c. */
static int server_start(srvctx *sc, bool same_addr) {
  loom_server_opts o;
  memset(&o, 0, sizeof o);
  o.network = sc->c.unix_sock ? "unix" : "tcp";
  if (!same_addr) {
    if (sc->c.unix_sock) {
      snprintf(sc->path, sizeof sc->path, "/tmp/loom_echaos_%d_%d",
               (int)getpid(), unix_seq++);
      unlink(sc->path);
      snprintf(sc->addr, sizeof sc->addr, "%s", sc->path);
    } else {
      snprintf(sc->addr, sizeof sc->addr, "127.0.0.1:0");
    }
  }
  o.addr = sc->addr;
  o.sndbuf = sc->c.sndbuf;
  o.session.listener = &s_listener;
  o.session.codec = &sc->codec;
  o.session.user = sc;
  o.session.read_timeout = sc->c.read_timeout;
  o.session.write_timeout = sc->c.write_timeout;
  o.session.cron_period = sc->c.cron;
  o.session.linger = sc->c.linger;
  o.session.max_pkg_len = MAX_PKG;
  o.session.wq_high = sc->c.wq_high;
  o.session.wq_low = sc->c.wq_low;
  o.session.close_on_full = sc->c.close_on_full;
  o.session.pool = sc->pool;
  o.session.dispatch = sc->c.pool == P_KEY  ? LOOM_DISPATCH_KEY
                       : sc->c.pool == P_RR ? LOOM_DISPATCH_ROUND_ROBIN
                                            : LOOM_DISPATCH_SESSION;
  o.session.dispatch_key = s_key;
  o.session.compress = sc->c.compress;
  atomic_store(&sc->closing, false);
  atomic_store(&sc->close_started, 0);
  atomic_store(&sc->close_from, -1);
  int rc = loom_server_start(&sc->srv, &o);
  if (rc < 0)
    return rc;
  CHECK_OK(loom_server_addr(sc->srv, sc->addr, sizeof sc->addr));
  return 0;
}

static void srvctx_init(srvctx *sc, const cfg *c) {
  memset(sc, 0, sizeof *sc);
  sc->c = *c;
  CHECK_OK(loom_codec_lenpfx(&sc->codec, NULL));
  if (c->pool != P_NONE) {
    loom_taskpool_opts po = {.queues = c->pool_queues,
                             .workers = c->pool_workers,
                             .queue_len = 4 + (size_t)c->pool_queues * 3};
    CHECK_OK(loom_taskpool_make(&sc->pool, &po));
  }
  atomic_store(&sc->close_from, -1);
}

/* Close the server (once; later calls return 1).  From a callback it
 * returns at once, and the close goes on on its own. */
static int server_close_now(srvctx *sc, int64_t deadline) {
  int none = 0;
  if (!atomic_compare_exchange_strong(&sc->close_started, &none, 1))
    return 1;
  atomic_store(&sc->closing, true);
  int rc = loom_server_close(sc->srv, deadline);
  atomic_store(&sc->close_rc, rc);
  return rc;
}

/* The metrics add up to what the callbacks counted.  Only when no
 * session is left (each has run on_close and left the list). */
static void check_metrics(srvctx *sc) {
  loom_metrics m;
  loom_server_metrics(sc->srv, &m);
  CHECK_EQ(m.sessions_open, 0);
  CHECK_EQ(m.sessions_total, atomic_load(&sc->opens));
  CHECK_EQ(m.errors.refused, atomic_load(&sc->refused));
  if (sc->c.pool == P_NONE)
    CHECK_EQ(m.pkgs_in, atomic_load(&sc->msgs));
  else
    CHECK_GE(m.pkgs_in, atomic_load(&sc->msgs));
  /* Every package written left whole or was dropped by a close. */
  CHECK_EQ(m.pkgs_out + m.pkgs_dropped, atomic_load(&sc->wr_ok));
  CHECK_EQ(m.errors.wq_full, atomic_load(&sc->wr_full));
  CHECK_EQ(m.errors.decode, atomic_load(&sc->errk[K_DECODE]));
  CHECK_EQ(m.errors.oversize, atomic_load(&sc->errk[K_OVERSIZE]));
  CHECK_EQ(m.errors.timeout, atomic_load(&sc->errk[K_TIMEOUT]));
  CHECK_EQ(m.errors.reset, atomic_load(&sc->errk[K_RESET]));
  CHECK_EQ(m.errors.compress, atomic_load(&sc->errk[K_COMPRESS]));
  CHECK_EQ(m.errors.other, atomic_load(&sc->errk[K_OTHER]));
  CHECK_EQ(m.wq_bytes, 0);
  CHECK_EQ(m.errors.accept, 0);
}

/* ------------------------------------------------------------------ */
/* Peers: a loom_conn, through zlib when the server compresses.        */

typedef struct peer {
  loom_conn *c;
  bool z;
  z_stream zi, zo;
  uint8_t raw[16384]; /* compressed bytes read, not yet inflated */
  size_t raw_off, raw_len;
  uint8_t *buf; /* the plain stream read, not yet taken */
  size_t off, len, cap;
  uint64_t wire_out;
} peer;

static int peer_dial(peer *p, const srvctx *sc) {
  memset(p, 0, sizeof *p);
  int rc = loom_dial(&p->c, sc->c.unix_sock ? "unix" : "tcp", sc->addr);
  if (rc < 0)
    return rc;
  p->z = sc->c.compress != 0;
  if (p->z) {
    CHECK_EQ(deflateInit(&p->zo, Z_DEFAULT_COMPRESSION), Z_OK);
    CHECK_EQ(inflateInit(&p->zi), Z_OK);
  }
  p->cap = 2 * FRAME_MAX;
  p->buf = malloc(p->cap);
  CHECK(p->buf != NULL);
  return 0;
}

static void peer_free(peer *p) {
  if (p->c)
    loom_close(p->c);
  p->c = NULL;
  if (p->z) {
    deflateEnd(&p->zo);
    inflateEnd(&p->zi);
  }
  free(p->buf);
  p->buf = NULL;
}

static int write_all(loom_conn *c, const uint8_t *d, size_t n) {
  while (n > 0) {
    ssize_t k = loom_write(c, d, n);
    if (k < 0)
      return (int)k;
    d += k;
    n -= (size_t)k;
  }
  return 0;
}

/* Send bytes of the plain stream (compressed, ending in a sync flush,
 * when the session compresses). */
static int peer_send(peer *p, const void *d, size_t n) {
  if (!p->z) {
    p->wire_out += n;
    return write_all(p->c, d, n);
  }
  uint8_t out[8192];
  p->zo.next_in = (Bytef *)(uintptr_t)d;
  p->zo.avail_in = (uInt)n;
  do {
    p->zo.next_out = out;
    p->zo.avail_out = sizeof out;
    int zr = deflate(&p->zo, Z_SYNC_FLUSH);
    CHECK(zr == Z_OK || zr == Z_BUF_ERROR);
    size_t got = sizeof out - p->zo.avail_out;
    int rc = write_all(p->c, out, got);
    if (rc < 0)
      return rc;
  } while (p->zo.avail_out == 0 || p->zo.avail_in > 0);
  return 0;
}

/* Read more of the plain stream: > 0, 0 at the end, < 0 an error. */
static ssize_t peer_fill(peer *p, size_t most) {
  if (p->off > 0 && p->off == p->len)
    p->off = p->len = 0;
  if (p->len == p->cap) {
    memmove(p->buf, p->buf + p->off, p->len - p->off);
    p->len -= p->off;
    p->off = 0;
  }
  size_t room = p->cap - p->len;
  if (room > most)
    room = most;
  if (!p->z) {
    ssize_t k = loom_read(p->c, p->buf + p->len, room);
    if (k > 0)
      p->len += (size_t)k;
    return k;
  }
  for (;;) {
    if (p->raw_off < p->raw_len) {
      size_t got = 0;
      p->raw_off += check_inflate(&p->zi, p->raw + p->raw_off,
                                  p->raw_len - p->raw_off, p->buf + p->len,
                                  room, &got, "the server's zlib stream");
      if (got > 0) {
        p->len += got;
        return (ssize_t)got;
      }
    }
    ssize_t k = loom_read(p->c, p->raw, sizeof p->raw);
    if (k <= 0)
      return k;
    p->raw_off = 0;
    p->raw_len = (size_t)k;
  }
}

/* The next frame's payload (valid until the next call): its length, 0
 * at the end of the stream, < 0 an error (-EBADMSG: the stream ended
 * inside a frame).  `most` caps each read (a
 * slow reader's sip). */
static ssize_t peer_frame(peer *p, const uint8_t **data, size_t most) {
  for (;;) {
    size_t have = p->len - p->off;
    if (have >= 4) {
      size_t n = get32(p->buf + p->off);
      CHECKF(n <= HDR + BODY_MAX, "seed %llu: echoed frame of %zu bytes",
             (unsigned long long)g_seed, n);
      if (have >= 4 + n) {
        *data = p->buf + p->off + 4;
        p->off += 4 + n;
        return (ssize_t)n;
      }
    }
    ssize_t k = peer_fill(p, most);
    if (k == 0 && p->len > p->off)
      return -EBADMSG; /* cut inside a frame: only an abort may do that */
    if (k <= 0)
      return k;
  }
}

/* Reset the connection (SO_LINGER 0), not a FIN. */
static void peer_reset(peer *p) {
  struct linger lg = {1, 0};
  setsockopt(loom_conn_fd(p->c), SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
  loom_close(p->c);
  p->c = NULL;
}

/* ------------------------------------------------------------------ */
/* A round's peers.                                                     */

enum ptype {
  T_ECHO,
  T_STOP,
  T_SLOW,
  T_RESET,
  T_OVERSIZE,
  T_TRUNC,
  T_GARBAGE,
  T_VANISH,
  T_IDLE,
  T_CHAT,
  T_KINDS
};
static const char *ptype_names[] = {"echo",     "stop",  "slow",    "reset",
                                    "oversize", "trunc", "garbage", "vanish",
                                    "idle",     "chat"};

enum endmode { E_HALF, E_CMD, E_WAIT, E_ABRUPT, E_MODES };

typedef struct round round;

typedef struct pstate {
  round *rd;
  srvctx *sc;
  enum ptype type;
  enum endmode end;
  uint32_t pid;
  uint32_t n;  /* frames to send */
  rng_t g, rg; /* the peer's, its reader's */
  peer p;
  /* The echo peer's reader and its window. */
  loom_mutex mu;
  loom_cond cv;
  uint32_t sent, got;
  uint32_t next;     /* in send order: the next echo due */
  int64_t out_bytes; /* framed bytes sent, not yet echoed */
  int64_t window;
  bool reader_done;
  ssize_t reader_end; /* what ended the read: 0 EOF, < 0 error */
  bool refused;
  uint32_t last_key[4]; /* per key: 1 + the last seq echoed (0: none) */
  uint8_t *seen;        /* round-robin: echoed already */
  loom_sema reader_exit;
  int chat_got; /* broadcasts received */
  uint8_t *fb;  /* frames to send (FB_LEN bytes; not on a thread: the
                   coroutine may park and move while it sends them) */
} pstate;
#define FB_LEN (4 * FRAME_MAX + 64)

struct round {
  srvctx *sc;
  rng_t g;
  atomic_int live; /* peers still running */
  atomic_int echo_done, echo_strict;
  atomic_int echo_missing; /* echoes strict peers did not get */
  atomic_int echo_loose;   /* some echo peer could not count them */
  atomic_int chat_got, chat_sending;
  atomic_int dial_fail;
  int kinds[T_KINDS];
  bool echo_only;
};

/* Whether echoes of this server come in send order (per session), per
 * key, or in any order. */
static int order_of(const srvctx *sc) {
  if (sc->c.pool == P_RR)
    return 2;
  if (sc->c.pool == P_KEY)
    return 1;
  return 0;
}

/* Check one echo against what was sent and the order promised. */
static void check_echo(pstate *ps, const uint8_t *d, size_t len) {
  CHECKF(payload_ok(d, len), "seed %llu: echo corrupted (peer %u, %zu bytes)",
         (unsigned long long)g_seed, ps->pid, len);
  uint32_t pid = get32(d + 1), seq = get32(d + 5);
  CHECKF(pid == ps->pid, "seed %llu: peer %u got peer %u's frame",
         (unsigned long long)g_seed, ps->pid, pid);
  CHECKF(seq < ps->sent, "seed %llu: echo of seq %u never sent (sent %u)",
         (unsigned long long)g_seed, seq, ps->sent);
  /* Timeout 0 may refuse an echo (the queue still counts the bytes
   * the writer is sending): then there are gaps, but no disorder. */
  bool gaps = ps->sc->c.policy == W_ZERO;
  switch (order_of(ps->sc)) {
  case 0:
    CHECKF(gaps ? seq >= ps->next : seq == ps->next,
           "seed %llu: peer %u: echo %u, want %u", (unsigned long long)g_seed,
           ps->pid, seq, ps->next);
    ps->next = seq + 1;
    break;
  case 1: {
    uint8_t k = frame_key(pid, seq);
    uint32_t next = ps->last_key[k];
    while (next < ps->sent && frame_key(pid, next) != k)
      next++;
    CHECKF(gaps ? seq >= next : seq == next,
           "seed %llu: peer %u key %u: echo %u, want %u",
           (unsigned long long)g_seed, ps->pid, k, seq, next);
    ps->last_key[k] = seq + 1;
    break;
  }
  default:
    CHECKF(!ps->seen[seq], "seed %llu: peer %u: echo %u twice",
           (unsigned long long)g_seed, ps->pid, seq);
    ps->seen[seq] = 1;
    break;
  }
  ps->got++;
  ps->out_bytes -= (int64_t)frame_len(pid, seq);
}

static void echo_reader(void *arg) {
  pstate *ps = arg;
  ssize_t k;
  for (;;) {
    const uint8_t *d;
    k = peer_frame(&ps->p, &d, SIZE_MAX);
    if (k <= 0)
      break;
    loom_mutex_lock(&ps->mu);
    check_echo(ps, d, (size_t)k);
    loom_cond_broadcast(&ps->cv);
    loom_mutex_unlock(&ps->mu);
  }
  loom_mutex_lock(&ps->mu);
  ps->reader_done = true;
  ps->reader_end = k;
  loom_cond_broadcast(&ps->cv);
  loom_mutex_unlock(&ps->mu);
  loom_sema_release(&ps->reader_exit);
}

/* Whether this peer's session was refused by on_open (by its port). */
static bool peer_refused(pstate *ps) {
  if (!ps->sc->c.refuse || ps->sc->c.unix_sock)
    return false;
  char la[128];
  if (loom_conn_local_addr(ps->p.c, la, sizeof la) < 0)
    return false;
  return port_of(la) % 7 == 0;
}

static void run_echo(pstate *ps) {
  srvctx *sc = ps->sc;
  ps->refused = peer_refused(ps);
  /* A window that keeps the server's queue below wq_high, so no echo
   * may be refused; under the blocking policy, more. */
  ps->window = (int64_t)(sc->c.policy == W_BLOCK ? 4 * sc->c.wq_high
                                                 : sc->c.wq_high / 2);
  bool gaps = sc->c.policy == W_ZERO;
  if (gaps && ps->end == E_WAIT)
    ps->end = E_HALF; /* refused echoes never come */
  ps->seen = calloc(ps->n + 1, 1);
  CHECK(ps->seen != NULL);
  CHECK_OK(loom_go(echo_reader, ps));
  uint8_t *batch = ps->fb;
  int64_t deadline = loom_now() + 20 * SEC;
  bool broken = false;
  while (ps->sent < ps->n && !broken) {
    /* A batch of frames in one send (pipelining), within the window. */
    size_t blen = 0;
    int want = 1 + (int)rn(&ps->g, 4);
    loom_mutex_lock(&ps->mu);
    while (!ps->reader_done && ps->out_bytes >= ps->window) {
      /* With timeout 0, what is not back soon was refused: the window
       * is a courtesy then, not the proof that no echo is refused. */
      int64_t until = gaps ? loom_now() + 20 * MS : deadline;
      if (loom_cond_wait(&ps->cv, &ps->mu, until) < 0) {
        if (gaps) {
          ps->out_bytes = 0;
          continue;
        }
        CHECK_FAIL("seed %llu: peer %u: window stuck (%u sent, %u echoed)",
                   (unsigned long long)g_seed, ps->pid, ps->sent, ps->got);
      }
    }
    if (ps->reader_done) {
      loom_mutex_unlock(&ps->mu);
      break;
    }
    while (want-- > 0 && ps->sent < ps->n && ps->out_bytes < ps->window &&
           blen + FRAME_MAX <= FB_LEN) {
      uint8_t type = ps->sent + 1 == ps->n && ps->end == E_CMD ? 'C' : 'E';
      size_t fl = mk_frame(batch + blen, type, ps->pid, ps->sent);
      blen += fl;
      ps->out_bytes += (int64_t)fl;
      ps->sent++;
    }
    loom_mutex_unlock(&ps->mu);
    if (peer_send(&ps->p, batch, blen) < 0)
      broken = true;
    if (rn(&ps->g, 8) == 0)
      loom_sleep((int64_t)rn(&ps->g, 3) * MS);
  }
  /* A linger of its own may cut the replies short: not strict then. */
  bool strict = !broken && !ps->refused && sc->c.linger == 0;
  bool exact = !gaps; /* every echo, or only those not refused */
  switch (ps->end) {
  case E_HALF:
    if (!broken)
      loom_shutdown(ps->p.c, SHUT_WR);
    /* all echoes, then the end of the stream */
    __attribute__((fallthrough));
  case E_CMD:
    loom_set_read_deadline(ps->p.c, loom_now() + 20 * SEC);
    loom_sema_acquire(&ps->reader_exit, 0);
    strict = strict && !atomic_load(&sc->closing) &&
             !atomic_load(&sc->pid_err[ps->pid & 4095]);
    if (strict) {
      CHECKF(ps->reader_end == 0 && (ps->got == ps->sent || !exact),
             "seed %llu: peer %u (%s end): %u sent, %u echoed, end %zd (%s)",
             (unsigned long long)g_seed, ps->pid,
             ps->end == E_HALF ? "half-close" : "close command", ps->sent,
             ps->got, ps->reader_end, loom_err_name((int)ps->reader_end));
      atomic_fetch_add(&ps->rd->echo_strict, 1);
      atomic_fetch_add(&ps->rd->echo_missing, (int)(ps->sent - ps->got));
    } else {
      atomic_store(&ps->rd->echo_loose, 1);
    }
    break;
  case E_WAIT:
    loom_mutex_lock(&ps->mu);
    while (!ps->reader_done && ps->got < ps->sent)
      if (loom_cond_wait(&ps->cv, &ps->mu, loom_now() + 20 * SEC) < 0)
        CHECK_FAIL("seed %llu: peer %u: %u echoes missing",
                   (unsigned long long)g_seed, ps->pid, ps->sent - ps->got);
    bool all = ps->got == ps->sent;
    loom_mutex_unlock(&ps->mu);
    if (strict && !atomic_load(&sc->closing) &&
        !atomic_load(&sc->pid_err[ps->pid & 4095])) {
      CHECKF(all, "seed %llu: peer %u: the server ended it, %u of %u echoed",
             (unsigned long long)g_seed, ps->pid, ps->got, ps->sent);
      atomic_fetch_add(&ps->rd->echo_strict, 1);
    } else {
      atomic_store(&ps->rd->echo_loose, 1);
    }
    loom_shutdown(ps->p.c, SHUT_RDWR); /* ends the reader */
    loom_sema_acquire(&ps->reader_exit, 0);
    break;
  default:
    atomic_store(&ps->rd->echo_loose, 1);
    if (rn(&ps->g, 2)) { /* reset: the close below sends an RST */
      struct linger lg = {1, 0};
      setsockopt(loom_conn_fd(ps->p.c), SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    }
    loom_shutdown(ps->p.c, SHUT_RDWR); /* ends the reader */
    loom_sema_acquire(&ps->reader_exit, 0);
    break;
  }
  free(ps->seen);
  atomic_fetch_add(&ps->rd->echo_done, 1);
}

/* Send frames and never read (stop), or read a sip at a time (slow). */
static void run_stop_slow(pstate *ps, bool slow) {
  uint8_t *f = ps->fb;
  int64_t end = loom_now() + (int64_t)(100 + rn(&ps->g, 300)) * MS;
  uint32_t next = 0;
  loom_set_write_deadline(ps->p.c, end);
  for (uint32_t i = 0; i < ps->n && loom_now() < end; i++) {
    size_t fl = mk_frame(f, 'E', ps->pid, i);
    if (peer_send(&ps->p, f, fl) < 0)
      break;
    ps->sent++;
    if (slow) {
      const uint8_t *d;
      loom_set_read_deadline(ps->p.c, loom_now() + 2 * MS);
      ssize_t k = peer_frame(&ps->p, &d, 64);
      if (k > 0) {
        /* Echoes come whole and in order; some may be missing. */
        CHECK(payload_ok(d, (size_t)k));
        uint32_t seq = get32(d + 5);
        CHECK_EQ(get32(d + 1), ps->pid);
        if (order_of(ps->sc) == 0) {
          CHECKF(seq >= next, "seed %llu: slow peer: echo %u after %u",
                 (unsigned long long)g_seed, seq, next);
          next = seq + 1;
        }
      } else if (k == 0 || (k < 0 && k != -ETIMEDOUT)) {
        break;
      }
      loom_sleep((int64_t)rn(&ps->g, 3) * MS);
    }
  }
  if (!slow && ps->p.c != NULL)
    loom_sleep((int64_t)rn(&ps->g, 200) * MS); /* hold the queue full */
  if (rn(&ps->g, 2))
    peer_reset(&ps->p);
}

/* Misbehaving senders: cut off mid-frame, too long, truncated, garbage,
 * gone at once, or silent. */
static void run_bad(pstate *ps) {
  uint8_t *f = ps->fb;
  srvctx *sc = ps->sc;
  uint32_t good = rn(&ps->g, 4);
  for (uint32_t i = 0; i < good && ps->type != T_VANISH; i++) {
    size_t fl = mk_frame(f, 'E', ps->pid, i);
    if (peer_send(&ps->p, f, fl) < 0)
      return;
  }
  bool must_end = false; /* the server must close it, on its own */
  switch (ps->type) {
  case T_RESET: {
    size_t fl = mk_frame(f, 'E', ps->pid, good);
    (void)peer_send(&ps->p, f, 1 + rn(&ps->g, (uint32_t)fl - 1));
    loom_sleep((int64_t)rn(&ps->g, 5) * MS);
    peer_reset(&ps->p);
    return;
  }
  case T_OVERSIZE:
    put32(f, MAX_PKG + 1 + rn(&ps->g, 1 << 20));
    memset(f + 4, 'x', 60);
    (void)peer_send(&ps->p, f, 4 + rn(&ps->g, 60));
    must_end = true;
    break;
  case T_TRUNC: {
    size_t fl = mk_frame(f, 'E', ps->pid, good);
    (void)peer_send(&ps->p, f, 1 + rn(&ps->g, (uint32_t)fl - 1));
    loom_shutdown(ps->p.c, SHUT_WR);
    must_end = true;
    break;
  }
  case T_GARBAGE: {
    size_t n = 1 + rn(&ps->g, 200);
    for (size_t i = 0; i < n; i++)
      f[i] = (uint8_t)rnd(&ps->g);
    if (ps->p.z) {
      /* After a sync flush the stream is at a block boundary: a block
       * of type 3 does not exist. */
      f[0] = 0x07;
      must_end = true;
    } else if (n >= 4 && get32(f) > MAX_PKG) {
      must_end = true;
    }
    (void)write_all(ps->p.c, f, n);
    break;
  }
  case T_VANISH:
    if (rn(&ps->g, 2))
      peer_reset(&ps->p);
    return;
  default: /* idle: the server's read timeout ends it, if it has one */
    must_end = sc->c.read_timeout > 0;
    break;
  }
  int64_t wait =
      must_end ? sc->c.read_timeout + 10 * SEC : (int64_t)rn(&ps->g, 100) * MS;
  int64_t t0 = loom_now();
  loom_set_read_deadline(ps->p.c, t0 + wait);
  ssize_t k;
  uint8_t sink[4096];
  while ((k = loom_read(ps->p.c, sink, sizeof sink)) > 0) {
  }
  if (must_end && !atomic_load(&sc->closing))
    CHECKF(k == 0 || k == -ECONNRESET,
           "seed %llu: %s peer: the server did not close it: %zd (%s)",
           (unsigned long long)g_seed, ptype_names[ps->type], k,
           loom_err_name((int)k));
}

/* A chat member: joins, broadcasts, and reads the others' messages. */
static void chat_reader(void *arg) {
  pstate *ps = arg;
  uint32_t last[256];
  memset(last, 0, sizeof last);
  ssize_t k;
  const uint8_t *d;
  for (;;) {
    k = peer_frame(&ps->p, &d, SIZE_MAX);
    if (k <= 0)
      break;
    CHECKF(payload_ok(d, (size_t)k), "seed %llu: chat frame corrupted",
           (unsigned long long)g_seed);
    if (d[0] == 'J') {
      loom_mutex_lock(&ps->mu);
      ps->got = 1; /* joined */
      loom_cond_broadcast(&ps->cv);
      loom_mutex_unlock(&ps->mu);
      continue;
    }
    CHECK_EQ(d[0], 'B');
    uint32_t from = get32(d + 1) % 256, seq = get32(d + 5);
    CHECKF(get32(d + 1) != ps->pid, "seed %llu: own broadcast came back",
           (unsigned long long)g_seed);
    /* In order per sender, unless the pool spreads its packages. */
    CHECKF(seq + 1 > last[from] || order_of(ps->sc) != 0,
           "seed %llu: chat from %u: %u after %u", (unsigned long long)g_seed,
           from, seq, last[from] - 1);
    last[from] = seq + 1;
    ps->chat_got++;
    if (rn(&ps->rg, 64) == 0)
      loom_sleep(MS); /* a slowish reader now and then */
  }
  loom_mutex_lock(&ps->mu);
  ps->reader_done = true;
  ps->reader_end = k;
  loom_cond_broadcast(&ps->cv);
  loom_mutex_unlock(&ps->mu);
  loom_sema_release(&ps->reader_exit);
}

static void run_chat(pstate *ps) {
  uint8_t *f = ps->fb;
  CHECK_OK(loom_go(chat_reader, ps));
  size_t fl = mk_frame(f, 'J', ps->pid, 0);
  bool ok = peer_send(&ps->p, f, fl) == 0;
  loom_mutex_lock(&ps->mu);
  while (ok && ps->got == 0 && !ps->reader_done)
    if (loom_cond_wait(&ps->cv, &ps->mu, loom_now() + 10 * SEC) < 0)
      CHECK_FAIL("seed %llu: chat join not answered",
                 (unsigned long long)g_seed);
  loom_mutex_unlock(&ps->mu);
  for (uint32_t i = 1; ok && i <= ps->n; i++) {
    fl = mk_frame(f, 'B', ps->pid, i);
    ok = peer_send(&ps->p, f, fl) == 0;
    loom_sleep((int64_t)rn(&ps->g, 4) * MS);
  }
  atomic_fetch_sub(&ps->rd->chat_sending, 1);
  /* Read until the server closes us (the round closes the server). */
  loom_set_read_deadline(ps->p.c, loom_now() + 30 * SEC);
  loom_sema_acquire(&ps->reader_exit, 0);
  /* A reset: the server stopped reading before it had all our bytes
   * (refused, aborted, closed). */
  CHECKF(ps->reader_end == 0 || atomic_load(&ps->sc->aborted) ||
             atomic_load(&ps->sc->closing) || peer_refused(ps),
         "seed %llu: chat peer ended by %zd (%s)", (unsigned long long)g_seed,
         ps->reader_end, loom_err_name((int)ps->reader_end));
  atomic_fetch_add(&ps->rd->chat_got, ps->chat_got);
}

static void peer_main(void *arg) {
  pstate *ps = arg;
  ps->fb = malloc(FB_LEN);
  CHECK(ps->fb != NULL);
  int rc = peer_dial(&ps->p, ps->sc);
  if (rc < 0) {
    /* Only a server that is closing (or restarting) refuses us. */
    CHECKF(atomic_load(&ps->sc->closing), "seed %llu: dial: %d (%s)",
           (unsigned long long)g_seed, rc, loom_err_name(rc));
    atomic_fetch_add(&ps->rd->dial_fail, 1);
    if (ps->type == T_CHAT)
      atomic_fetch_sub(&ps->rd->chat_sending, 1);
    goto out;
  }
  switch (ps->type) {
  case T_ECHO:
    run_echo(ps);
    break;
  case T_STOP:
  case T_SLOW:
    run_stop_slow(ps, ps->type == T_SLOW);
    break;
  case T_CHAT:
    run_chat(ps);
    break;
  default:
    run_bad(ps);
    break;
  }
  peer_free(&ps->p);
out:
  free(ps->fb);
  atomic_fetch_sub(&ps->rd->live, 1);
}

/* ------------------------------------------------------------------ */
/* Rounds.                                                              */

static uint64_t coroutines(void) {
  loom_stats st;
  CHECK_OK(loom_stats_get(&st));
  return st.coroutines;
}

enum { MAX_PEERS = 48 };
static uint32_t next_pid = 1;

static pstate *spawn_peer(round *rd, enum ptype type) {
  pstate *ps = calloc(1, sizeof *ps);
  CHECK(ps != NULL);
  ps->rd = rd;
  ps->sc = rd->sc;
  ps->type = type;
  ps->pid = next_pid++;
  ps->end = (enum endmode)rn(&rd->g, E_MODES);
  ps->n = 1 + rn(&rd->g, CHECK_SCALE(300, 120, 80));
  rng_seed(&ps->g, rnd(&rd->g));
  rng_seed(&ps->rg, rnd(&rd->g));
  rd->kinds[type]++;
  if (type == T_CHAT)
    atomic_fetch_add(&rd->chat_sending, 1);
  atomic_fetch_add(&rd->live, 1);
  CHECK_OK(loom_go(peer_main, ps));
  return ps;
}

/* The end of a round: peers gone, the server closed (unless it closed
 * itself), every session closed once, every coroutine gone. */
static void round_end(round *rd, pstate **ps, int np, uint64_t base) {
  srvctx *sc = rd->sc;
  WAIT_FOR(atomic_load(&rd->live) == 0, 40);
  if (!atomic_load(&sc->close_started)) {
    loom_metrics m;
    int64_t until = loom_now() + 20 * SEC;
    for (;;) {
      loom_server_metrics(sc->srv, &m);
      CHECK_LE(m.wq_max, sc->c.wq_high + FRAME_MAX);
      if (m.sessions_open == 0 || loom_now() > until)
        break;
      loom_sleep(MS);
    }
    CHECKF(m.sessions_open == 0, "seed %llu: %llu sessions outlive their peers",
           (unsigned long long)g_seed, (unsigned long long)m.sessions_open);
    check_metrics(sc);
    /* Every echo a strict peer missed was refused, and counted so. */
    if (rd->echo_only && !atomic_load(&rd->echo_loose))
      CHECK_EQ(atomic_load(&rd->echo_missing), atomic_load(&sc->wr_full));
    CHECK_EQ(server_close_now(sc, loom_now() + 5 * SEC), 0);
  }
  WAIT_FOR(atomic_load(&sc->closes) == atomic_load(&sc->opens), 20);
  /* A close from a callback goes on in its own coroutine: it is done
   * when every coroutine of the round is. */
  uint64_t workers =
      sc->pool ? (uint64_t)(sc->c.pool_queues * sc->c.pool_workers) : 0;
  WAIT_FOR(coroutines() <= base + workers, 20);
  if (sc->pool)
    loom_taskpool_close(sc->pool);
  sc->pool = NULL;
  WAIT_FOR(coroutines() <= base, 5);
  for (int i = 0; i < np; i++)
    free(ps[i]);
  if (sc->c.unix_sock)
    unlink(sc->path);
}

static const char *round_kinds(const round *rd, char *buf, size_t len) {
  size_t o = 0;
  buf[0] = 0;
  for (int t = 0; t < T_KINDS; t++)
    if (rd->kinds[t] && o < len)
      o += (size_t)snprintf(buf + o, len - o, "%s%s=%d", o ? " " : "",
                            ptype_names[t], rd->kinds[t]);
  return buf;
}

typedef struct totals {
  int rounds, sessions, msgs, strict, errs, closes_in_cb;
} totals;

static void round_report(const round *rd, totals *t) {
  srvctx *sc = rd->sc;
  t->rounds++;
  t->sessions += atomic_load(&sc->opens);
  t->msgs += atomic_load(&sc->msgs);
  t->strict += atomic_load(&rd->echo_strict);
  t->errs += atomic_load(&sc->errs);
  if (g_verbose) {
    char k[256];
    fprintf(stderr,
            "  round: sessions %d msgs %d writes ok/full/closed %d/%d/%d "
            "errs %d strict %d crons %d [%s]\n",
            atomic_load(&sc->opens), atomic_load(&sc->msgs),
            atomic_load(&sc->wr_ok), atomic_load(&sc->wr_full),
            atomic_load(&sc->wr_closed), atomic_load(&sc->errs),
            atomic_load(&rd->echo_strict), atomic_load(&sc->crons),
            round_kinds(rd, k, sizeof k));
  }
}

/* One server, a random crowd of peers of the given kinds (a bitmask),
 * and optionally a close at a random moment. */
static void one_round(rng_t *g, unsigned kinds, bool random_close, totals *t) {
  round rd;
  memset(&rd, 0, sizeof rd);
  rng_seed(&rd.g, rnd(g));
  cfg c;
  cfg_draw(&c, &rd.g);
  if (kinds & (1u << T_IDLE))
    c.read_timeout = (int64_t)(200 + rn(&rd.g, 300)) * MS;
  c.refuse = (kinds & ~(1u << T_ECHO)) != 0 && rn(&rd.g, 3) == 0;
  if (random_close && rn(&rd.g, 2))
    c.linger = rn(&rd.g, 2) ? -1 : (int64_t)(1 + rn(&rd.g, 100)) * MS;
  cfg_print(&c, "server");
  uint64_t base = coroutines();
  static srvctx sc;
  srvctx_init(&sc, &c);
  rd.sc = &sc;
  rd.echo_only = kinds == (1u << T_ECHO);
  CHECK_OK(server_start(&sc, false));

  pstate *ps[MAX_PEERS];
  int np = 0;
  int want = 2 + (int)rn(&rd.g, CHECK_SCALE(24, 12, 10));
  unsigned ntypes = 0;
  enum ptype types[T_KINDS];
  for (int ty = 0; ty < T_KINDS; ty++)
    if (kinds & (1u << ty))
      types[ntypes++] = (enum ptype)ty;
  int64_t close_at =
      random_close ? loom_now() + (int64_t)rn(&rd.g, 400) * MS : INT64_MAX;
  enum closer closer = (enum closer)rn(&rd.g, C_KINDS);
  if (closer == C_CRON && c.cron == 0)
    closer = C_MESSAGE;
  sc.close_deadline_ns = (int64_t)rn(&rd.g, 300) * MS;
  bool armed = false;
  int64_t armed_at = 0;
  while (np < want || (random_close && !atomic_load(&sc.close_started) &&
                       loom_now() < close_at + SEC)) {
    if (np < want) {
      ps[np++] = spawn_peer(&rd, types[rn(&rd.g, ntypes)]);
      loom_sleep((int64_t)rn(&rd.g, 20) * MS);
    } else {
      loom_sleep(MS);
    }
    if (random_close && !armed && loom_now() >= close_at) {
      armed = true;
      armed_at = loom_now();
      if (g_verbose)
        fprintf(stderr, "  close from %s, deadline %lld ms\n",
                closer_names[closer], (long long)(sc.close_deadline_ns / MS));
      if (closer == C_MAIN)
        (void)server_close_now(&sc, loom_now() + sc.close_deadline_ns);
      else
        atomic_store(&sc.close_from, (int)closer);
    }
    /* No callback came to close it: close it from here. */
    if (armed && loom_now() > armed_at + 300 * MS)
      (void)server_close_now(&sc, loom_now() + sc.close_deadline_ns);
  }
  round_end(&rd, ps, np, base);
  round_report(&rd, t);
}

/* A chat room: every broadcast that a write took reaches its member,
 * once, in order per sender (when the pool keeps order). */
static void chat_round(rng_t *g, totals *t) {
  round rd;
  memset(&rd, 0, sizeof rd);
  rng_seed(&rd.g, rnd(g));
  cfg c;
  cfg_draw(&c, &rd.g);
  cfg_print(&c, "chat server");
  uint64_t base = coroutines();
  static srvctx sc;
  srvctx_init(&sc, &c);
  rd.sc = &sc;
  CHECK_OK(server_start(&sc, false));
  pstate *ps[MAX_PEERS];
  int np = 2 + (int)rn(&rd.g, CHECK_SCALE(10, 6, 5));
  for (int i = 0; i < np; i++)
    ps[i] = spawn_peer(&rd, T_CHAT);
  WAIT_FOR(atomic_load(&rd.chat_sending) == 0, 30);
  loom_sleep((int64_t)rn(&rd.g, 20) * MS);
  int rc = server_close_now(&sc, loom_now() + 10 * SEC);
  round_end(&rd, ps, np, base);
  if (rc == 0 && !atomic_load(&sc.aborted))
    CHECK_EQ(atomic_load(&rd.chat_got), atomic_load(&sc.bcast_ok));
  if (g_verbose)
    fprintf(stderr, "  chat: %d members, %d broadcasts taken, %d received\n",
            np, atomic_load(&sc.bcast_ok), atomic_load(&rd.chat_got));
  round_report(&rd, t);
}

/* ---- a client in ping-pong with a server that restarts ---- */

typedef struct cctx {
  loom_client *cl;
  atomic_int opens, closes, msgs, errs, wr_ok;
  atomic_int echoes;        /* ping-pong replies that checked out */
  atomic_int close_from_cb; /* close the client from its next callback */
  atomic_int close_started;
  int64_t close_deadline;
  int limit; /* pings per session */
} cctx;

typedef struct crec {
  cctx *cc;
  atomic_int closed, in_cb;
  uint32_t pid, next;
} crec;

static atomic_uint client_pid = 0x10000;

static void c_close_client(cctx *cc) {
  int none = 0;
  if (atomic_compare_exchange_strong(&cc->close_started, &none, 1))
    (void)loom_client_close(cc->cl, loom_now() + cc->close_deadline);
}

static void c_ping(loom_session *s, crec *r) {
  uint8_t *f = malloc(HDR + BODY_MAX);
  CHECK(f != NULL);
  size_t n = mk_payload(f, 'E', r->pid, r->next);
  int rc = loom_session_write(s, f, n, -1);
  free(f);
  CHECKF(rc == 0 || rc == LOOM_ECLOSED, "seed %llu: client write: %d (%s)",
         (unsigned long long)g_seed, rc, loom_err_name(rc));
  if (rc == 0)
    atomic_fetch_add(&r->cc->wr_ok, 1);
}

static int c_open(loom_session *s) {
  cctx *cc = loom_session_user(s);
  crec *r = calloc(1, sizeof *r);
  CHECK(r != NULL);
  r->cc = cc;
  r->pid = atomic_fetch_add(&client_pid, 1);
  loom_session_set_user(s, r);
  atomic_fetch_add(&cc->opens, 1);
  c_ping(s, r);
  return 0;
}

static void c_message(loom_session *s, const loom_pkg *pkg) {
  crec *r = loom_session_user(s);
  cctx *cc = r->cc;
  CHECKF(!atomic_load(&r->closed), "seed %llu: client callback after close",
         (unsigned long long)g_seed);
  atomic_fetch_add(&r->in_cb, 1);
  atomic_fetch_add(&cc->msgs, 1);
  CHECK(payload_ok(pkg->data, pkg->len));
  CHECK_EQ(get32(pkg->data + 1), r->pid);
  CHECKF(get32(pkg->data + 5) == r->next, "seed %llu: ping-pong: %u, want %u",
         (unsigned long long)g_seed, get32(pkg->data + 5), r->next);
  atomic_fetch_add(&cc->echoes, 1);
  r->next++;
  if ((int)r->next < cc->limit)
    c_ping(s, r);
  else
    loom_session_close(s); /* the client dials a new one */
  atomic_fetch_sub(&r->in_cb, 1);
  if (atomic_load(&cc->close_from_cb))
    c_close_client(cc);
}

static void c_error(loom_session *s, int err) {
  crec *r = loom_session_user(s);
  CHECK(!atomic_load(&r->closed));
  CHECK_LT(err, 0);
  atomic_fetch_add(&r->cc->errs, 1);
}

static void c_close(loom_session *s) {
  crec *r = loom_session_user(s);
  CHECKF(atomic_fetch_add(&r->closed, 1) == 0, "seed %llu: on_close twice",
         (unsigned long long)g_seed);
  CHECK_EQ(atomic_load(&r->in_cb), 0);
  atomic_fetch_add(&r->cc->closes, 1);
  if (atomic_load(&r->cc->close_from_cb))
    c_close_client(r->cc);
}

static void c_free(loom_session *s) {
  crec *r = loom_session_user(s);
  CHECK_EQ(atomic_load(&r->closed), 1);
  free(r);
}

static const loom_session_listener c_listener = {
    .on_open = c_open,
    .on_message = c_message,
    .on_error = c_error,
    .on_close = c_close,
    .on_free = c_free,
};

/* Close the server (from here or from a callback) and wait until its
 * address can be listened on again: the restart. */
static void restart(srvctx *sc, rng_t *g) {
  enum closer closer = (enum closer)rn(g, C_KINDS);
  if (closer == C_CRON && sc->c.cron == 0)
    closer = C_MESSAGE;
  sc->close_deadline_ns = (int64_t)rn(g, 200) * MS;
  if (closer == C_MAIN) {
    (void)server_close_now(sc, loom_now() + sc->close_deadline_ns);
  } else {
    atomic_store(&sc->close_from, (int)closer);
    int64_t until = loom_now() + 300 * MS;
    while (!atomic_load(&sc->close_started) && loom_now() < until)
      loom_sleep(MS);
    (void)server_close_now(sc, loom_now() + sc->close_deadline_ns);
  }
  loom_sleep((int64_t)rn(g, 100) * MS); /* the clients find nobody */
  int64_t until = loom_now() + 10 * SEC;
  int rc;
  while ((rc = server_start(sc, true)) == -EADDRINUSE && loom_now() < until)
    loom_sleep(MS); /* a close from a callback is still under way */
  CHECK_OK(rc);
}

static void client_round(rng_t *g, totals *t) {
  round rd;
  memset(&rd, 0, sizeof rd);
  rng_seed(&rd.g, rnd(g));
  cfg c;
  cfg_draw(&c, &rd.g);
  c.policy = W_BLOCK; /* ping-pong never fills a queue anyway */
  cfg_print(&c, "restarting server");
  uint64_t base = coroutines();
  static srvctx sc;
  srvctx_init(&sc, &c);
  rd.sc = &sc;
  CHECK_OK(server_start(&sc, false));

  static cctx cc;
  memset(&cc, 0, sizeof cc);
  cc.limit = 1 + (int)rn(&rd.g, 400); /* then the session closes itself */
  cc.close_deadline = (int64_t)rn(&rd.g, 200) * MS;
  loom_codec codec;
  CHECK_OK(loom_codec_lenpfx(&codec, NULL));
  loom_client_opts co;
  memset(&co, 0, sizeof co);
  co.network = c.unix_sock ? "unix" : "tcp";
  co.addr = sc.addr;
  co.conns = 1 + (int)rn(&rd.g, 3);
  co.reconnect_interval = (int64_t)(1 + rn(&rd.g, 30)) * MS;
  co.reconnect_max = 100 * MS;
  co.dial_timeout = SEC;
  co.session.listener = &c_listener;
  co.session.codec = &codec;
  co.session.user = &cc;
  co.session.compress = c.compress;
  co.session.max_pkg_len = MAX_PKG;
  CHECK_OK(loom_client_start(&cc.cl, &co));

  int restarts = 1 + (int)rn(&rd.g, CHECK_SCALE(4, 3, 2));
  for (int i = 0; i <= restarts; i++) {
    /* Connected again, and talking. */
    /* One at least: sessions that close themselves after a few pings
     * may never all be up at once (a redial waits for its interval). */
    int wrc = loom_client_wait(cc.cl, 1, loom_now() + 10 * SEC);
    if (wrc != 0) {
      loom_metrics m, sm;
      loom_client_metrics(cc.cl, &m);
      loom_server_metrics(sc.srv, &sm);
      CHECK_FAIL("seed %llu: the client did not reconnect: %d (%s); client: "
                 "%llu open, %llu total, %llu dial errors; server: %llu "
                 "open, %llu total; restart %d",
                 (unsigned long long)g_seed, wrc, loom_err_name(wrc),
                 (unsigned long long)m.sessions_open,
                 (unsigned long long)m.sessions_total,
                 (unsigned long long)m.errors.accept,
                 (unsigned long long)sm.sessions_open,
                 (unsigned long long)sm.sessions_total, i);
    }
    int before = atomic_load(&cc.echoes);
    WAIT_FOR(atomic_load(&cc.echoes) > before, 10);
    loom_sleep((int64_t)rn(&rd.g, 100) * MS);
    if (i < restarts)
      restart(&sc, &rd.g);
  }
  /* The client goes first (from here or from its own callback), then
   * the server. */
  if (rn(&rd.g, 2)) {
    atomic_store(&cc.close_from_cb, 1);
    int64_t until = loom_now() + 300 * MS;
    while (!atomic_load(&cc.close_started) && loom_now() < until)
      loom_sleep(MS);
  }
  c_close_client(&cc);
  WAIT_FOR(atomic_load(&cc.closes) == atomic_load(&cc.opens), 20);
  /* Its counts span several servers: no metrics to hold them to. */
  (void)server_close_now(&sc, loom_now() + 5 * SEC);
  round_end(&rd, NULL, 0, base);
  if (g_verbose)
    fprintf(stderr,
            "  client: %d conns, %d restarts, %d sessions, %d echoes, %d "
            "errors\n",
            co.conns, restarts, atomic_load(&cc.opens), atomic_load(&cc.echoes),
            atomic_load(&cc.errs));
  round_report(&rd, t);
}

#define CHAT_ROUNDS 0x10000u
#define CLIENT_ROUNDS 0x20000u

/* Run rounds for the case's time. */
static void rounds(const char *name, unsigned kinds, bool random_close) {
  rng_t g;
  rng_seed(&g, case_seed(name));
  totals t = {0};
  int64_t end = loom_now() + g_ms * MS;
  do {
    if (kinds == CHAT_ROUNDS)
      chat_round(&g, &t);
    else if (kinds == CLIENT_ROUNDS)
      client_round(&g, &t);
    else
      one_round(&g, kinds, random_close, &t);
  } while (loom_now() < end);
  fprintf(stderr,
          "engine_chaos %s: %d rounds, %d sessions, %d packages, %d strict "
          "echo peers, %d session errors\n",
          name, t.rounds, t.sessions, t.msgs, t.strict, t.errs);
}

typedef struct casearg {
  const char *name;
  unsigned kinds;
  bool random_close;
} casearg;

static void case_main(void *arg) {
  casearg *a = arg;
  rounds(a->name, a->kinds, a->random_close);
}

static void run_case(const char *name, unsigned kinds, bool random_close) {
  params(name);
  check_watchdog(g_ms / 1000 + 100, name);
  casearg a = {name, kinds, random_close};
  check_run(case_main, &a, 2 + (int)(g_seed % 2));
}

#define BIT(t) (1u << (t))

/* Well-behaved echo peers only: every echo, exactly once, in order. */
TEST(echo) { run_case("echo", BIT(T_ECHO), false); }

/* Echo peers among peers that misbehave every way. */
TEST(misbehaving) {
  run_case("misbehaving",
           BIT(T_ECHO) | BIT(T_STOP) | BIT(T_SLOW) | BIT(T_RESET) |
               BIT(T_OVERSIZE) | BIT(T_TRUNC) | BIT(T_GARBAGE) | BIT(T_VANISH) |
               BIT(T_IDLE),
           false);
}

/* Everything, and the server closed at a random moment, from the main
 * coroutine or from inside a callback. */
TEST(server_close) {
  run_case("server_close",
           BIT(T_ECHO) | BIT(T_STOP) | BIT(T_SLOW) | BIT(T_RESET) |
               BIT(T_TRUNC) | BIT(T_VANISH) | BIT(T_CHAT),
           true);
}

/* A chat room under each write policy: broadcasts from the sender's
 * handler to every other member, all delivered when nothing failed. */
TEST(chat) { run_case("chat", CHAT_ROUNDS, false); }

/* loom_client sessions in ping-pong while the server restarts, closed
 * from the main coroutine or from inside its callbacks; the client is
 * closed from outside or from its own callbacks. */
TEST(client_restart) { run_case("client_restart", CLIENT_ROUNDS, false); }

CHECK_MAIN()
