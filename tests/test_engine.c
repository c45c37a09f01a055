/*
 * test_engine.c — the engine end to end on loopback: servers, clients
 * and sessions with real sockets, every byte checked.
 *
 * The service under test is the length-prefixed echo (4-byte big-endian
 * length, then the payload; every frame comes back unchanged).  Peers
 * are plain loom connections that frame by hand, so what the engine
 * sends is checked against the protocol, not against itself; loom_client
 * is tested against the same server.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdatomic.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "check.h"
#include "runtime/runtime.h"

/* ---- the echo service ---------------------------------------------- */

static loom_codec lenpfx;
static atomic_long server_msgs, server_opens, server_closes, server_errors;
static atomic_int last_error;
static int64_t handler_sleep; /* ns each on_message sleeps first */

static void echo_message(loom_session *s, const loom_pkg *pkg) {
  atomic_fetch_add(&server_msgs, 1);
  if (handler_sleep)
    loom_sleep(handler_sleep);
  int rc = pkg->from ? loom_session_write_to(s, pkg->data, pkg->len, pkg->from,
                                             pkg->fromlen, -1)
                     : loom_session_write(s, pkg->data, pkg->len, -1);
  CHECKF(rc == 0 || rc == LOOM_ECLOSED, "write: %s", loom_err_name(rc));
}

static int echo_open(loom_session *s) {
  (void)s;
  atomic_fetch_add(&server_opens, 1);
  return 0;
}

static void echo_error(loom_session *s, int err) {
  (void)s;
  atomic_store(&last_error, err);
  atomic_fetch_add(&server_errors, 1);
}

static void echo_close(loom_session *s) {
  (void)s;
  atomic_fetch_add(&server_closes, 1);
}

static const loom_session_listener echo_listener = {
    .on_open = echo_open,
    .on_message = echo_message,
    .on_error = echo_error,
    .on_close = echo_close,
};

static loom_server *start_server(const char *network, const char *addr,
                                 loom_taskpool *pool, int compress,
                                 char *bound, size_t boundlen) {
  loom_codec_lenpfx(&lenpfx, NULL);
  loom_server_opts o = {
      .network = network,
      .addr = addr,
      .session = {.listener = &echo_listener,
                  .codec = &lenpfx,
                  .pool = pool,
                  .compress = compress},
  };
  loom_server *srv;
  CHECK_OK(loom_server_start(&srv, &o));
  CHECK_OK(loom_server_addr(srv, bound, boundlen));
  return srv;
}

/* ---- a hand-framing peer -------------------------------------------- */

static uint64_t rng_next(uint64_t *s) {
  *s ^= *s << 13;
  *s ^= *s >> 7;
  *s ^= *s << 17;
  return *s;
}

static void fill(uint8_t *p, size_t n, uint64_t seed) {
  for (size_t i = 0; i < n; i++)
    p[i] = (uint8_t)(rng_next(&seed) >> 24);
}

static void put_frame(uint8_t *p, const uint8_t *payload, size_t n) {
  p[0] = (uint8_t)(n >> 24);
  p[1] = (uint8_t)(n >> 16);
  p[2] = (uint8_t)(n >> 8);
  p[3] = (uint8_t)n;
  memcpy(p + 4, payload, n);
}

static void read_full(loom_conn *c, void *buf, size_t n) {
  size_t got = 0;
  while (got < n) {
    ssize_t k = loom_read(c, (uint8_t *)buf + got, n - got);
    CHECKF(k > 0, "read: %s after %zu of %zu bytes",
           k == 0 ? "EOF" : loom_err_name((int)k), got, n);
    got += (size_t)k;
  }
}

/* Send `frames` frames of random sizes (up to maxlen) in one write each
 * batch, then read them all back and compare byte for byte. */
static void framed_roundtrip(loom_conn *c, int frames, size_t maxlen,
                             uint64_t seed) {
  size_t cap = (size_t)frames * (maxlen + 4);
  uint8_t *out = malloc(cap), *back = malloc(cap), *payload = malloc(maxlen);
  CHECK(out && back && payload);
  size_t len = 0;
  for (int i = 0; i < frames; i++) {
    size_t n = (size_t)(rng_next(&seed) % (maxlen + 1));
    fill(payload, n, seed + (uint64_t)i);
    put_frame(out + len, payload, n);
    len += n + 4;
  }
  CHECK_EQ(loom_write(c, out, len), (ssize_t)len);
  read_full(c, back, len);
  CHECK(memcmp(out, back, len) == 0);
  free(out);
  free(back);
  free(payload);
}

/* ---- many sessions, byte-exact -------------------------------------- */

static char srv_addr[128];
static int nclients;
static atomic_int clients_done;
static loom_wg clients_wg;

static void tcp_client(void *arg) {
  uint64_t seed = (uint64_t)(uintptr_t)arg * 7919 + 1;
  loom_conn *c;
  CHECK_OK(loom_dial(&c, "tcp", srv_addr));
  framed_roundtrip(c, 16, 3000, seed);
  framed_roundtrip(c, 4, 100, seed + 1);
  CHECK_OK(loom_close(c));
  atomic_fetch_add(&clients_done, 1);
  loom_wg_done(&clients_wg);
}

static void raise_nofile(void) {
  struct rlimit rl;
  CHECK_EQ(getrlimit(RLIMIT_NOFILE, &rl), 0);
  rl.rlim_cur = rl.rlim_max;
  CHECK_EQ(setrlimit(RLIMIT_NOFILE, &rl), 0);
}

static void many_main(void *arg) {
  (void)arg;
  loom_server *srv = start_server("tcp", "127.0.0.1:0", NULL, 0, srv_addr,
                                  sizeof srv_addr);
  loom_wg_add(&clients_wg, nclients);
  for (int i = 0; i < nclients; i++)
    CHECK_OK(loom_go(tcp_client, (void *)(uintptr_t)i));
  CHECK_OK(loom_wg_wait(&clients_wg, 0));
  CHECK_OK(loom_server_close(srv, loom_now() + 5000000000));
  CHECK_EQ(atomic_load(&server_opens), nclients);
  CHECK_EQ(atomic_load(&server_closes), nclients);
  CHECK_EQ(atomic_load(&server_errors), 0);
  CHECK_EQ(atomic_load(&server_msgs), nclients * 20);
}

TEST(echo_thousands_of_sessions) {
  raise_nofile();
  nclients = 2000; /* under the sanitizers too */
  check_run(many_main, NULL, 2);
  CHECK_EQ(atomic_load(&clients_done), nclients);
}

/* ---- Unix stream and metrics ----------------------------------------- */

static void unix_main(void *arg) {
  (void)arg;
  char path[64];
  snprintf(path, sizeof path, "@loom-engine-test-%d", (int)getpid());
  loom_server *srv = start_server("unix", path, NULL, 0, srv_addr,
                                  sizeof srv_addr);
  loom_conn *c;
  CHECK_OK(loom_dial(&c, "unix", srv_addr));
  framed_roundtrip(c, 50, 5000, 42);
  CHECK_OK(loom_close(c));
  /* The session ends on the peer's close.  It leaves the server's list
   * (sessions_open) after on_close returns, so wait for that, not for
   * on_close. */
  loom_metrics m;
  int64_t give_up = loom_now() + 5000000000;
  for (;;) {
    loom_server_metrics(srv, &m);
    if (m.sessions_open == 0 || loom_now() > give_up)
      break;
    loom_sleep(1000000);
  }
  CHECK_EQ(atomic_load(&server_closes), 1);
  CHECK_EQ(m.sessions_total, 1);
  CHECK_EQ(m.sessions_open, 0);
  CHECK_EQ(m.pkgs_in, 50);
  CHECK_EQ(m.pkgs_out, 50);
  CHECK_EQ(m.bytes_in, m.bytes_out);
  CHECK_OK(loom_server_close(srv, 0));
}

TEST(unix_stream_sessions) { check_run(unix_main, NULL, 2); }

/* ---- loom_client against the server: TCP, UDP, compression ------------ */

static atomic_long client_got, client_bytes;

static void count_reply(loom_session *s, const loom_pkg *pkg) {
  (void)s;
  /* Each payload is its own index repeated: check it came back whole. */
  CHECK_GE(pkg->len, 1);
  for (size_t i = 1; i < pkg->len; i++)
    CHECK_EQ(pkg->data[i], pkg->data[0]);
  atomic_fetch_add(&client_got, 1);
  atomic_fetch_add(&client_bytes, (long)pkg->len);
}

static const loom_session_listener client_listener = {
    .on_message = count_reply,
};

typedef struct client_case {
  const char *network, *addr;
  int compress, conns, msgs;
  size_t len;
} client_case;

static void client_main(void *arg) {
  client_case *cc = arg;
  loom_server *srv = start_server(cc->network, cc->addr, NULL, cc->compress,
                                  srv_addr, sizeof srv_addr);
  loom_client_opts o = {
      .network = cc->network,
      .addr = srv_addr,
      .conns = cc->conns,
      .session = {.listener = &client_listener,
                  .codec = &lenpfx,
                  .compress = cc->compress},
  };
  loom_client *cl;
  CHECK_OK(loom_client_start(&cl, &o));
  CHECK_OK(loom_client_wait(cl, cc->conns, loom_now() + 5000000000));
  uint8_t *buf = malloc(cc->len);
  for (int i = 0; i < cc->msgs; i++) {
    loom_session *s;
    CHECK_OK(loom_client_session(cl, &s));
    memset(buf, 'a' + i % 26, cc->len);
    CHECK_OK(loom_session_write(s, buf, cc->len, -1));
    loom_session_unref(s);
    if (cc->network[0] == 'u' && i % 32 == 31) /* datagrams: pace */
      while (atomic_load(&client_got) < i - 16)
        loom_sleep(100000);
  }
  free(buf);
  int64_t give_up = loom_now() + 10000000000;
  while (atomic_load(&client_got) < cc->msgs && loom_now() < give_up)
    loom_sleep(1000000);
  CHECK_EQ(atomic_load(&client_got), cc->msgs);
  CHECK_EQ(atomic_load(&client_bytes), (long)cc->len * cc->msgs);
  loom_metrics cm, sm;
  /* pkgs_out counts once a send has returned: an echo may come first. */
  give_up = loom_now() + 5000000000;
  for (;;) {
    loom_client_metrics(cl, &cm);
    if (cm.pkgs_out >= (uint64_t)cc->msgs || loom_now() > give_up)
      break;
    loom_sleep(1000000);
  }
  loom_server_metrics(srv, &sm);
  CHECK_EQ(cm.pkgs_out, cc->msgs);
  CHECK_EQ(cm.pkgs_in, cc->msgs);
  CHECK_EQ(sm.pkgs_in, cc->msgs);
  uint64_t payload = (uint64_t)cc->msgs * (cc->len + 4);
  if (cc->compress) /* repetitive payloads: much smaller on the wire */
    CHECK_LT(sm.bytes_in * 4, payload);
  else
    CHECK_EQ(sm.bytes_in, payload);
  CHECK_OK(loom_client_close(cl, loom_now() + 5000000000));
  CHECK_OK(loom_server_close(srv, loom_now() + 5000000000));
  CHECK_EQ(atomic_load(&server_errors), 0);
}

TEST(client_tcp_sessions) {
  client_case cc = {"tcp", "127.0.0.1:0", 0, 4, 2000, 300};
  check_run(client_main, &cc, 2);
}

TEST(client_compressed_sessions) {
  client_case cc = {"tcp", "127.0.0.1:0", 6, 3, 1000, 4000};
  check_run(client_main, &cc, 2);
}

TEST(client_udp_sessions) {
  client_case cc = {"udp", "127.0.0.1:0", 0, 2, 400, 200};
  check_run(client_main, &cc, 2);
}

/* ---- task pool: order per session, order per key --------------------- */

/* Each frame carries (key, seq) as two big-endian u32; the handler checks
 * that per key the sequence only goes up, after a random pause that
 * would reorder anything not serialised per key. */
static _Atomic uint32_t key_last[64];
static atomic_long order_errors;

static void ordered_message(loom_session *s, const loom_pkg *pkg) {
  CHECK_EQ(pkg->len, 8);
  uint32_t key = (uint32_t)pkg->data[0] << 24 | (uint32_t)pkg->data[1] << 16 |
                 (uint32_t)pkg->data[2] << 8 | pkg->data[3];
  uint32_t seq = (uint32_t)pkg->data[4] << 24 | (uint32_t)pkg->data[5] << 16 |
                 (uint32_t)pkg->data[6] << 8 | pkg->data[7];
  CHECK_LT(key, 64);
  if (seq % 7 == 0)
    loom_yield();
  if (seq % 13 == 0)
    loom_sleep(50000);
  uint32_t prev = atomic_exchange(&key_last[key], seq);
  if (seq != prev + 1)
    atomic_fetch_add(&order_errors, 1);
  atomic_fetch_add(&server_msgs, 1);
  CHECK_OK(loom_session_write(s, pkg->data, pkg->len, -1));
}

static uint64_t key_of(loom_session *s, const loom_pkg *pkg) {
  (void)s;
  return pkg->data[3];
}

static const loom_session_listener ordered_listener = {
    .on_message = ordered_message,
};

typedef struct order_case {
  loom_dispatch dispatch;
  int sessions, keys_per_session, per_key;
} order_case;

static order_case ocase;

static void order_client(void *arg) {
  int idx = (int)(uintptr_t)arg;
  loom_conn *c;
  CHECK_OK(loom_dial(&c, "tcp", srv_addr));
  int keys = ocase.keys_per_session, n = keys * ocase.per_key;
  uint8_t *out = malloc((size_t)n * 12), *back = malloc((size_t)n * 12);
  for (int i = 0; i < n; i++) {
    uint32_t key = (uint32_t)(idx * keys + i % keys);
    uint32_t seq = (uint32_t)(i / keys + 1);
    uint8_t p[8] = {(uint8_t)(key >> 24), (uint8_t)(key >> 16),
                    (uint8_t)(key >> 8), (uint8_t)key,
                    (uint8_t)(seq >> 24), (uint8_t)(seq >> 16),
                    (uint8_t)(seq >> 8), (uint8_t)seq};
    put_frame(out + i * 12, p, 8);
  }
  /* In slices, so the server's queues fill and drain under load. */
  for (int i = 0; i < n; i += 100) {
    int m = n - i < 100 ? n - i : 100;
    CHECK_EQ(loom_write(c, out + i * 12, (size_t)m * 12), (ssize_t)m * 12);
  }
  read_full(c, back, (size_t)n * 12);
  if (ocase.dispatch == LOOM_DISPATCH_SESSION)
    CHECK(memcmp(out, back, (size_t)n * 12) == 0); /* exactly in order */
  CHECK_OK(loom_close(c));
  free(out);
  free(back);
  loom_wg_done(&clients_wg);
}

static void order_main(void *arg) {
  (void)arg;
  loom_taskpool *pool;
  loom_taskpool_opts po = {.queues = 4, .queue_len = 16};
  CHECK_OK(loom_taskpool_make(&pool, &po));
  loom_codec_lenpfx(&lenpfx, NULL);
  loom_server_opts o = {
      .network = "tcp",
      .addr = "127.0.0.1:0",
      .session = {.listener = &ordered_listener,
                  .codec = &lenpfx,
                  .pool = pool,
                  .dispatch = ocase.dispatch,
                  .dispatch_key = key_of},
  };
  loom_server *srv;
  CHECK_OK(loom_server_start(&srv, &o));
  CHECK_OK(loom_server_addr(srv, srv_addr, sizeof srv_addr));
  loom_wg_add(&clients_wg, ocase.sessions);
  for (int i = 0; i < ocase.sessions; i++)
    CHECK_OK(loom_go(order_client, (void *)(uintptr_t)i));
  CHECK_OK(loom_wg_wait(&clients_wg, 0));
  CHECK_OK(loom_server_close(srv, loom_now() + 5000000000));
  loom_taskpool_close(pool);
  long want = (long)ocase.sessions * ocase.keys_per_session * ocase.per_key;
  CHECK_EQ(atomic_load(&server_msgs), want);
  CHECK_EQ(atomic_load(&order_errors), 0);
}

TEST(pool_keeps_session_order) {
  /* One key per session: the session's own sequence. */
  ocase = (order_case){LOOM_DISPATCH_SESSION, 16, 1,
                       CHECK_SCALE(2000, 1000, 300)};
  check_run(order_main, NULL, 2);
}

TEST(pool_keeps_key_order) {
  /* Each session interleaves 4 keys; the keys land on different queues. */
  ocase = (order_case){LOOM_DISPATCH_KEY, 8, 4, CHECK_SCALE(800, 400, 100)};
  check_run(order_main, NULL, 2);
}

/* Keys with a pattern still spread over the pool's queues: four keys
 * that are multiples of the queue count (0, 4, 8, 12 with 4 queues of
 * one worker each) must not all wait for one worker.  Each handler
 * waits (up to 2 s) for another to run beside it. */
static atomic_int spread_running, spread_max, spread_done;
static uint64_t spread_key(loom_session *s, const loom_pkg *pkg) {
  (void)s;
  return (uint64_t)pkg->data[0] * 4;
}
static void spread_message(loom_session *s, const loom_pkg *pkg) {
  (void)s;
  (void)pkg;
  int now = atomic_fetch_add(&spread_running, 1) + 1;
  int seen = atomic_load(&spread_max);
  while (now > seen && !atomic_compare_exchange_weak(&spread_max, &seen, now))
    ;
  int64_t end = loom_now() + 2000000000;
  while (atomic_load(&spread_max) < 2 && loom_now() < end)
    loom_sleep(1000000);
  atomic_fetch_sub(&spread_running, 1);
  atomic_fetch_add(&spread_done, 1);
}
static const loom_session_listener spread_listener = {
    .on_message = spread_message,
};
static void spread_main(void *arg) {
  (void)arg;
  loom_taskpool *pool;
  loom_taskpool_opts po = {.queues = 4};
  CHECK_OK(loom_taskpool_make(&pool, &po));
  loom_codec_lenpfx(&lenpfx, NULL);
  loom_server_opts o = {
      .network = "tcp",
      .addr = "127.0.0.1:0",
      .session = {.listener = &spread_listener,
                  .codec = &lenpfx,
                  .pool = pool,
                  .dispatch = LOOM_DISPATCH_KEY,
                  .dispatch_key = spread_key},
  };
  loom_server *srv;
  CHECK_OK(loom_server_start(&srv, &o));
  CHECK_OK(loom_server_addr(srv, srv_addr, sizeof srv_addr));
  loom_conn *c;
  CHECK_OK(loom_dial(&c, "tcp", srv_addr));
  uint8_t out[4 * 5];
  for (uint8_t i = 0; i < 4; i++)
    put_frame(out + i * 5, &i, 1);
  CHECK_EQ(loom_write(c, out, sizeof out), (ssize_t)sizeof out);
  int64_t end = loom_now() + 10000000000;
  while (atomic_load(&spread_done) < 4 && loom_now() < end)
    loom_sleep(1000000);
  CHECK_EQ(atomic_load(&spread_done), 4);
  CHECKF(atomic_load(&spread_max) >= 2,
         "keys 0, 4, 8, 12 all ran on one queue of 4");
  CHECK_OK(loom_close(c));
  CHECK_OK(loom_server_close(srv, loom_now() + 5000000000));
  loom_taskpool_close(pool);
}

TEST(pool_key_dispatch_spreads_patterned_keys) {
  check_run(spread_main, NULL, 2);
}

/* ---- half-close and graceful shutdown ---------------------------------- */

static void half_main(void *arg) {
  (void)arg;
  loom_taskpool *pool = NULL;
  if (arg) {
    loom_taskpool_opts po = {.queues = 2};
    CHECK_OK(loom_taskpool_make(&pool, &po));
  }
  handler_sleep = 200000; /* replies come well after the peer's EOF */
  loom_server *srv = start_server("tcp", "127.0.0.1:0", pool, 0, srv_addr,
                                  sizeof srv_addr);
  loom_conn *c;
  CHECK_OK(loom_dial(&c, "tcp", srv_addr));
  enum { N = 100 };
  uint8_t out[N * 14], back[N * 14 + 1];
  for (int i = 0; i < N; i++) {
    uint8_t p[10];
    memset(p, i, sizeof p);
    put_frame(out + i * 14, p, sizeof p);
  }
  CHECK_EQ(loom_write(c, out, sizeof out), (ssize_t)sizeof out);
  CHECK_OK(loom_shutdown(c, SHUT_WR));
  read_full(c, back, sizeof out);
  CHECK(memcmp(out, back, sizeof out) == 0);
  CHECK_EQ(loom_read(c, back, 1), 0); /* then the server closes */
  CHECK_OK(loom_close(c));
  int64_t give_up = loom_now() + 5000000000;
  while (atomic_load(&server_closes) < 1 && loom_now() < give_up)
    loom_sleep(1000000);
  CHECK_EQ(atomic_load(&server_msgs), N);
  CHECK_EQ(atomic_load(&server_errors), 0);
  CHECK_OK(loom_server_close(srv, 0));
  if (pool)
    loom_taskpool_close(pool);
}

TEST(half_close_delivers_everything) { check_run(half_main, NULL, 2); }
TEST(half_close_delivers_everything_pooled) {
  check_run(half_main, (void *)1, 2);
}

/* Packages the server has received are answered before it closes. */
static void graceful_main(void *arg) {
  (void)arg;
  loom_taskpool *pool;
  loom_taskpool_opts po = {.queues = 2};
  CHECK_OK(loom_taskpool_make(&pool, &po));
  handler_sleep = 2000000; /* 2 ms a package: 50 of them take 100 ms */
  loom_server *srv = start_server("tcp", "127.0.0.1:0", pool, 0, srv_addr,
                                  sizeof srv_addr);
  loom_conn *c;
  CHECK_OK(loom_dial(&c, "tcp", srv_addr));
  enum { N = 50 };
  uint8_t out[N * 8], back[N * 8];
  for (int i = 0; i < N; i++) {
    uint8_t p[4] = {1, 2, 3, (uint8_t)i};
    put_frame(out + i * 8, p, 4);
  }
  CHECK_EQ(loom_write(c, out, sizeof out), (ssize_t)sizeof out);
  /* Wait until the server holds all of them (most still in the pool). */
  loom_metrics m;
  int64_t give_up = loom_now() + 5000000000;
  do {
    loom_sleep(500000);
    loom_server_metrics(srv, &m);
  } while (m.pkgs_in < N && loom_now() < give_up);
  CHECK_EQ(m.pkgs_in, N);
  CHECK_OK(loom_server_close(srv, loom_now() + 5000000000));
  read_full(c, back, sizeof out);
  CHECK(memcmp(out, back, sizeof out) == 0);
  CHECK_EQ(loom_read(c, back, 1), 0);
  CHECK_OK(loom_close(c));
  CHECK_EQ(atomic_load(&server_errors), 0);
  CHECK_EQ(atomic_load(&server_closes), 1);
  loom_taskpool_close(pool);
}

TEST(graceful_shutdown_answers_inflight) { check_run(graceful_main, NULL, 2); }

/* A close whose deadline passes aborts what is left: -ETIMEDOUT, and
 * every on_close still runs. */
static void forced_main(void *arg) {
  (void)arg;
  handler_sleep = 300000000; /* 300 ms: longer than the deadline */
  loom_server *srv = start_server("tcp", "127.0.0.1:0", NULL, 0, srv_addr,
                                  sizeof srv_addr);
  loom_conn *c;
  CHECK_OK(loom_dial(&c, "tcp", srv_addr));
  uint8_t f[8];
  put_frame(f, (const uint8_t *)"ping", 4);
  CHECK_EQ(loom_write(c, f, 8), 8);
  while (atomic_load(&server_msgs) < 1)
    loom_sleep(1000000);
  int64_t t0 = loom_now();
  CHECK_ERR(loom_server_close(srv, t0 + 20000000), -ETIMEDOUT);
  CHECK_EQ(atomic_load(&server_closes), 1);
  CHECK_EQ(atomic_load(&last_error), LOOM_ECLOSED);
  /* The reply was dropped with the session: the peer sees the end. */
  uint8_t b[8];
  CHECK_LE(loom_read(c, b, sizeof b), 0);
  CHECK_OK(loom_close(c));
}

TEST(forced_shutdown_at_deadline) { check_run(forced_main, NULL, 2); }

/* ---- reconnection -------------------------------------------------------- */

static atomic_int client_opens, client_closes;

static int cl_open(loom_session *s) {
  (void)s;
  atomic_fetch_add(&client_opens, 1);
  return 0;
}

static void cl_close(loom_session *s) {
  (void)s;
  atomic_fetch_add(&client_closes, 1);
}

static const loom_session_listener reconnect_listener = {
    .on_open = cl_open,
    .on_message = count_reply,
    .on_close = cl_close,
};

static void reconnect_main(void *arg) {
  (void)arg;
  loom_server *srv = start_server("tcp", "127.0.0.1:0", NULL, 0, srv_addr,
                                  sizeof srv_addr);
  loom_client_opts o = {
      .network = "tcp",
      .addr = srv_addr,
      .conns = 3,
      .reconnect_interval = 10000000,
      .reconnect_max = 50000000,
      .session = {.listener = &reconnect_listener, .codec = &lenpfx},
  };
  loom_client *cl;
  CHECK_OK(loom_client_start(&cl, &o));
  CHECK_OK(loom_client_wait(cl, 3, loom_now() + 5000000000));
  CHECK_EQ(atomic_load(&client_opens), 3);

  /* The server goes away: the client's sessions end, its dials fail. */
  CHECK_OK(loom_server_close(srv, loom_now() + 5000000000));
  int64_t give_up = loom_now() + 5000000000;
  while (atomic_load(&client_closes) < 3 && loom_now() < give_up)
    loom_sleep(1000000);
  CHECK_EQ(atomic_load(&client_closes), 3);
  loom_session *s;
  loom_sleep(100000000);
  loom_metrics m;
  loom_client_metrics(cl, &m);
  CHECK_GT(m.errors.accept, 0); /* it kept trying, with back-off */
  CHECK_LT(m.errors.accept, 30);

  /* Back on the same address: the client reconnects by itself. */
  srv = start_server("tcp", srv_addr, NULL, 0, srv_addr, sizeof srv_addr);
  CHECK_OK(loom_client_wait(cl, 3, loom_now() + 5000000000));
  CHECK_EQ(atomic_load(&client_opens), 6);
  CHECK_OK(loom_client_session(cl, &s));
  CHECK_OK(loom_session_write(s, "xxxx", 4, -1));
  loom_session_unref(s);
  give_up = loom_now() + 5000000000;
  while (atomic_load(&client_got) < 1 && loom_now() < give_up)
    loom_sleep(1000000);
  CHECK_EQ(atomic_load(&client_got), 1);
  CHECK_OK(loom_client_close(cl, loom_now() + 5000000000));
  CHECK_EQ(atomic_load(&client_closes), 6);
  CHECK_OK(loom_server_close(srv, loom_now() + 5000000000));
}

TEST(client_reconnects_after_server_restart) {
  check_run(reconnect_main, NULL, 2);
}

/* ---- a reference held past on_close ------------------------------------- */

static loom_session *kept;
static atomic_int kept_closed;

static int keep_open(loom_session *s) {
  kept = loom_session_ref(s);
  return 0;
}

static void keep_close(loom_session *s) {
  char a[128];
  CHECK_OK(loom_session_remote_addr(s, a, sizeof a)); /* still open here */
  atomic_store(&kept_closed, 1);
}

static const loom_session_listener keep_listener = {
    .on_open = keep_open,
    .on_message = echo_message,
    .on_close = keep_close,
};

static void kept_main(void *arg) {
  (void)arg;
  loom_codec_lenpfx(&lenpfx, NULL);
  loom_server_opts o = {
      .network = "tcp",
      .addr = "127.0.0.1:0",
      .session = {.listener = &keep_listener, .codec = &lenpfx},
  };
  loom_server *srv;
  CHECK_OK(loom_server_start(&srv, &o));
  CHECK_OK(loom_server_addr(srv, srv_addr, sizeof srv_addr));
  loom_conn *c;
  CHECK_OK(loom_dial(&c, "tcp", srv_addr));
  framed_roundtrip(c, 3, 10, 5);
  CHECK_OK(loom_close(c));
  while (!atomic_load(&kept_closed))
    loom_sleep(1000000);
  CHECK_OK(loom_server_close(srv, 0));
  /* The session is gone from the server, its socket closed and freed;
   * the struct lives on for the reference, and every call is safe. */
  CHECK(loom_session_closed(kept));
  char a[128];
  CHECK_ERR(loom_session_remote_addr(kept, a, sizeof a), LOOM_ECLOSED);
  CHECK_ERR(loom_session_write(kept, "x", 1, 0), LOOM_ECLOSED);
  loom_session_abort(kept, -EIO);
  loom_session_close(kept);
  CHECK_GT(loom_session_id(kept), 0);
  loom_session_unref(kept);
}

TEST(reference_outlives_the_session) { check_run(kept_main, NULL, 2); }

/* ---- dial errors, one-shot clients, on_free -------------------------------- */

static atomic_int freed;
static void count_free(loom_session *s) {
  CHECK_EQ((intptr_t)loom_session_user(s), 42);
  atomic_fetch_add(&freed, 1);
}

static const loom_session_listener free_listener = {
    .on_message = count_reply,
    .on_free = count_free,
};

static void dialerr_main(void *arg) {
  (void)arg;
  /* A port nobody listens on: a listener opened and closed at once. */
  loom_listener *l;
  CHECK_OK(loom_listen(&l, "tcp", "127.0.0.1:0"));
  char dead[64];
  CHECK_OK(loom_listener_addr(l, dead, sizeof dead));
  CHECK_OK(loom_listener_close(l));
  loom_codec_lenpfx(&lenpfx, NULL);
  loom_client_opts o = {
      .network = "tcp",
      .addr = dead,
      .reconnect_interval = 10000000,
      .session = {.listener = &free_listener, .codec = &lenpfx},
  };
  loom_client *cl;
  CHECK_OK(loom_client_start(&cl, &o));
  CHECK_ERR(loom_client_wait(cl, 1, loom_now() + 100000000), -ECONNREFUSED);
  CHECK_OK(loom_client_close(cl, 0));

  o.reconnect_interval = -1; /* one dial per session, no more */
  CHECK_OK(loom_client_start(&cl, &o));
  int64_t t0 = loom_now();
  CHECK_ERR(loom_client_wait(cl, 1, t0 + 5000000000), -ECONNREFUSED);
  CHECK_LT(loom_now() - t0, 2000000000); /* it did not wait for the deadline */
  loom_metrics m;
  loom_client_metrics(cl, &m);
  CHECK_EQ(m.errors.accept, 1);
  CHECK_OK(loom_client_close(cl, 0));

  /* One-shot against a live server: connected once, then not again. */
  loom_server *srv = start_server("tcp", "127.0.0.1:0", NULL, 0, srv_addr,
                                  sizeof srv_addr);
  o.addr = srv_addr;
  o.session.user = (void *)42;
  CHECK_OK(loom_client_start(&cl, &o));
  CHECK_OK(loom_client_wait(cl, 1, loom_now() + 5000000000));
  CHECK_OK(loom_server_close(srv, loom_now() + 5000000000));
  /* The client's session ends on the server's close; then give a
   * reconnect, which must not come, time to happen. */
  int64_t give_up = loom_now() + 5000000000;
  do {
    loom_sleep(1000000);
    loom_client_metrics(cl, &m);
  } while (m.sessions_open != 0 && loom_now() < give_up);
  loom_sleep(50000000);
  loom_client_metrics(cl, &m);
  CHECK_EQ(m.sessions_total, 1);
  CHECK_EQ(m.sessions_open, 0);
  CHECK_OK(loom_client_close(cl, 0));
  CHECK_EQ(atomic_load(&freed), 1);
}

TEST(client_dial_errors_and_one_shot) { check_run(dialerr_main, NULL, 2); }

/* ---- the name after a reset ------------------------------------------------ */

static char reset_name[300];
static atomic_int reset_err;

static void name_on_error(loom_session *s, int err) {
  snprintf(reset_name, sizeof reset_name, "%s", loom_session_name(s));
  atomic_store(&reset_err, err);
}

static const loom_session_listener reset_listener = {
    .on_message = echo_message,
    .on_error = name_on_error,
};

static void reset_main(void *arg) {
  (void)arg;
  loom_codec_lenpfx(&lenpfx, NULL);
  loom_server_opts o = {
      .network = "tcp",
      .addr = "127.0.0.1:0",
      .session = {.listener = &reset_listener, .codec = &lenpfx},
  };
  loom_server *srv;
  CHECK_OK(loom_server_start(&srv, &o));
  CHECK_OK(loom_server_addr(srv, srv_addr, sizeof srv_addr));
  loom_conn *c;
  CHECK_OK(loom_dial(&c, "tcp", srv_addr));
  char mine[128];
  CHECK_OK(loom_conn_local_addr(c, mine, sizeof mine));
  framed_roundtrip(c, 1, 10, 3); /* the session is open and has read */
  struct linger lg = {1, 0};     /* close with a reset */
  CHECK_EQ(setsockopt(loom_conn_fd(c), SOL_SOCKET, SO_LINGER, &lg, sizeof lg),
           0);
  CHECK_OK(loom_close(c));
  int64_t give_up = loom_now() + 5000000000;
  while (atomic_load(&reset_err) == 0 && loom_now() < give_up)
    loom_sleep(1000000);
  CHECK_ERR(atomic_load(&reset_err), -ECONNRESET);
  /* The peer's address survives the reset (getpeername would fail). */
  CHECKF(strstr(reset_name, mine) != NULL, "name \"%s\" lacks %s",
         reset_name, mine);
  CHECK_OK(loom_server_close(srv, 0));
}

TEST(name_survives_a_reset) { check_run(reset_main, NULL, 2); }

/* ---- a redial whose pause finds no memory for its timer ------------------ */

/* Allocations of exactly `nomem_size` bytes fail (0: none). */
static _Atomic size_t nomem_size;
static atomic_int nomem_hits;
static void *nomem_realloc(void *ud, void *p, size_t n) {
  (void)ud;
  if (n != 0 && n == atomic_load(&nomem_size)) {
    atomic_fetch_add(&nomem_hits, 1);
    return NULL;
  }
  return realloc(p, n);
}
static void nomem_free(void *ud, void *p) {
  (void)ud;
  free(p);
}
static const loom_allocator nomem_alloc = {nomem_realloc, nomem_free, NULL};

static loom_sema parked_gate;
static loom_wg parked_wg;
static void timer_holder(void *arg) {
  (void)arg;
  (void)loom_sema_acquire(&parked_gate, loom_now() + 30000000000);
  loom_wg_done(&parked_wg);
}

/* One P, so every timer is in one heap.  The heap is filled with parked
 * timers to its capacity, and growing it fails: the client's pause
 * before a redial has no timer then.  The client must still redial
 * once memory is back (it stopped redialling for good). */
static void nomem_pause_main(void *arg) {
  (void)arg;
  loom_server *srv =
      start_server("tcp", "127.0.0.1:0", NULL, 0, srv_addr, sizeof srv_addr);
  loom_client_opts o = {
      .network = "tcp",
      .addr = srv_addr,
      .reconnect_interval = 20000000,
      .session = {.listener = &client_listener, .codec = &lenpfx},
  };
  loom_client *cl;
  CHECK_OK(loom_client_start(&cl, &o));
  CHECK_OK(loom_client_wait(cl, 1, loom_now() + 5000000000));

  loom__timers *ts = &loom__getm()->p->timers;
  int spawned = 0;
  while (loom__timers_len(ts) < ts->cap) {
    int before = loom__timers_len(ts);
    loom_wg_add(&parked_wg, 1);
    CHECK_OK(loom_go(timer_holder, NULL));
    spawned++;
    while (loom__timers_len(ts) == before)
      loom_yield();
  }
  atomic_store(&nomem_size, (size_t)ts->cap * 2 * sizeof(loom__timer *));

  loom_session *s;
  CHECK_OK(loom_client_session(cl, &s));
  loom_session_close(s);
  loom_session_unref(s);
  /* The supervisor found no room for its pause's timer (twice: it
   * tries again). */
  int64_t give_up = loom_now() + 5000000000;
  while (atomic_load(&nomem_hits) < 2 && loom_now() < give_up)
    loom_yield();
  CHECK_GE(atomic_load(&nomem_hits), 2);
  atomic_store(&nomem_size, 0);
  for (int i = 0; i < spawned; i++)
    loom_sema_release(&parked_gate);
  CHECK_OK(loom_wg_wait(&parked_wg, 0));

  CHECK_OK(loom_client_wait(cl, 1, loom_now() + 5000000000));
  CHECK_OK(loom_client_close(cl, loom_now() + 5000000000));
  CHECK_OK(loom_server_close(srv, loom_now() + 5000000000));
}

TEST(client_redials_after_a_pause_without_memory) {
  loom_set_allocator(&nomem_alloc);
  check_run(nomem_pause_main, NULL, 1);
  loom_set_allocator(NULL);
}

/* ---- task pool: a task without a function ---------------------------------
 */

static atomic_int null_fn_ran;
static void null_fn_count(void *arg) {
  (void)arg;
  atomic_fetch_add(&null_fn_ran, 1);
}

/* A NULL function is refused with -EINVAL, with or without a wait, and
 * the queue goes on with the tasks around it (a worker used to call it). */
static void null_fn_main(void *arg) {
  (void)arg;
  loom_taskpool *p;
  loom_taskpool_opts o = {.queues = 1, .workers = 1, .queue_len = 4};
  CHECK_OK(loom_taskpool_make(&p, &o));
  CHECK_OK(loom_taskpool_submit(p, 0, null_fn_count, NULL, 0));
  CHECK_ERR(loom_taskpool_submit(p, 0, NULL, NULL, 0), -EINVAL);
  CHECK_ERR(loom_taskpool_submit(p, 1, NULL, NULL, LOOM_TASKPOOL_NOWAIT),
            -EINVAL);
  CHECK_ERR(loom_taskpool_submit(p, 2, NULL, NULL, loom_now() + 1000000000),
            -EINVAL);
  CHECK_OK(loom_taskpool_submit(p, 0, null_fn_count, NULL, 0));
  loom_taskpool_close(p);
  CHECK_EQ(atomic_load(&null_fn_ran), 2);
}

TEST(taskpool_refuses_null_function) { check_run(null_fn_main, NULL, 2); }

/* A queue length whose buffer cannot even be sized is a bad option,
 * -EINVAL, not a lack of memory; *p is left alone. */
static void huge_queue_main(void *arg) {
  (void)arg;
  static int untouched;
  loom_taskpool *p = (loom_taskpool *)(void *)&untouched;
  loom_taskpool_opts o = {.queues = 2, .workers = 1, .queue_len = SIZE_MAX};
  CHECK_ERR(loom_taskpool_make(&p, &o), -EINVAL);
  o.queue_len = SIZE_MAX / 2;
  CHECK_ERR(loom_taskpool_make(&p, &o), -EINVAL);
  CHECK(p == (loom_taskpool *)(void *)&untouched);
  o.queue_len = 8;
  CHECK_OK(loom_taskpool_make(&p, &o));
  loom_taskpool_close(p);
}

TEST(taskpool_huge_queue_len_is_einval) { check_run(huge_queue_main, NULL, 2); }

/* ---- a unixgram client against a peer that has stopped reading ------------
 */

static loom_client *stuck_cl;
static atomic_int stuck_closed;
static void stuck_close(void *arg) {
  (void)arg;
  CHECK_OK(loom_client_close(stuck_cl, loom_now() + 1000000000));
  atomic_store(&stuck_closed, 1);
}

/* The server's socket queue is full (its reader is held up, by a full
 * task pool, say).  A unixgram client still connects (connect() does
 * not need room), and its close returns; the dial used to wait for room
 * for an empty probe datagram, with no bound, so the client never
 * connected and its close waited for that dial for ever. */
static void stuck_main(void *arg) {
  (void)arg;
  char path[80];
  snprintf(path, sizeof path, "/tmp/loom-test-stuckdgram-%d.sock",
           (int)getpid());
  unlink(path);
  struct sockaddr_un un = {.sun_family = AF_UNIX};
  snprintf(un.sun_path, sizeof un.sun_path, "%s", path);
  int peer = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  CHECK(peer >= 0);
  CHECK_EQ(bind(peer, (struct sockaddr *)&un, sizeof un), 0);
  int filler = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  CHECK(filler >= 0);
  CHECK_EQ(connect(filler, (struct sockaddr *)&un, sizeof un), 0);
  int sent = 0;
  while (send(filler, "x", 1, 0) == 1)
    sent++;
  CHECK_EQ(errno, EAGAIN);
  CHECK_GT(sent, 0);

  loom_codec_lenpfx(&lenpfx, NULL);
  loom_client_opts o = {
      .network = "unixgram",
      .addr = path,
      .reconnect_interval = 50000000,
      .dial_timeout = 200000000,
      .session = {.listener = &client_listener, .codec = &lenpfx},
  };
  CHECK_OK(loom_client_start(&stuck_cl, &o));
  CHECK_OK(loom_client_wait(stuck_cl, 1, loom_now() + 2000000000));
  CHECK_OK(loom_go(stuck_close, NULL));
  int64_t give_up = loom_now() + 5000000000;
  while (!atomic_load(&stuck_closed) && loom_now() < give_up)
    loom_sleep(1000000);
  CHECK(atomic_load(&stuck_closed));
  close(filler);
  close(peer);
  unlink(path);
}

TEST(unixgram_client_of_a_stuck_peer_connects_and_closes) {
  check_run(stuck_main, NULL, 2);
}

/* ---- a client's socket options ---------------------------------------- */

/* The descriptor of this process's TCP socket bound to 127.0.0.1:port. */
static int fd_bound_to(int port) {
  for (int fd = 0; fd < 4096; fd++) {
    struct sockaddr_in a;
    socklen_t al = sizeof a;
    if (getsockname(fd, (struct sockaddr *)&a, &al) == 0 &&
        a.sin_family == AF_INET && ntohs(a.sin_port) == port)
      return fd;
  }
  return -1;
}

static int sockopt(int fd, int level, int name) {
  int v = -1;
  socklen_t l = sizeof v;
  CHECK_EQ(getsockopt(fd, level, name, &v, &l), 0);
  return v;
}

static void client_sockopts_main(void *arg) {
  (void)arg;
  loom_server *srv =
      start_server("tcp", "127.0.0.1:0", NULL, 0, srv_addr, sizeof srv_addr);
  loom_client_opts o = {
      .network = "tcp",
      .addr = srv_addr,
      .no_delay_off = true,
      .keepalive = 7,
      .rcvbuf = 32768,
      .sndbuf = 32768,
      .session = {.listener = &client_listener, .codec = &lenpfx},
  };
  loom_client *cl;
  o.keepalive = -1;
  CHECK_ERR(loom_client_start(&cl, &o), -EINVAL);
  o.keepalive = 7;
  CHECK_OK(loom_client_start(&cl, &o));
  CHECK_OK(loom_client_wait(cl, 1, loom_now() + 5000000000));
  loom_session *s;
  CHECK_OK(loom_client_session(cl, &s));
  char local[64];
  CHECK_OK(loom_session_local_addr(s, local, sizeof local));
  loom_session_unref(s);
  const char *colon = strrchr(local, ':');
  CHECK(colon != NULL);
  int fd = fd_bound_to(atoi(colon + 1));
  CHECKF(fd >= 0, "no socket bound to %s", local);
  CHECK_EQ(sockopt(fd, IPPROTO_TCP, TCP_NODELAY), 0);
  CHECK_EQ(sockopt(fd, SOL_SOCKET, SO_KEEPALIVE), 1);
  CHECK_EQ(sockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE), 7);
  CHECK_EQ(sockopt(fd, SOL_SOCKET, SO_RCVBUF), 2 * 32768); /* Linux doubles */
  CHECK_EQ(sockopt(fd, SOL_SOCKET, SO_SNDBUF), 2 * 32768);
  CHECK_OK(loom_client_close(cl, loom_now() + 5000000000));
  CHECK_OK(loom_server_close(srv, loom_now() + 5000000000));
}

TEST(client_sets_socket_options) { check_run(client_sockopts_main, NULL, 2); }

/* Linux takes at most 32767 s of idle before keep-alive probes: more is
 * refused at the start, by servers and clients alike, rather than left
 * to fail every connection a client dials (or be ignored by a server). */
static void keepalive_max_main(void *arg) {
  (void)arg;
  loom_server *srv =
      start_server("tcp", "127.0.0.1:0", NULL, 0, srv_addr, sizeof srv_addr);
  loom_client_opts o = {
      .network = "tcp",
      .addr = srv_addr,
      .keepalive = 32768,
      .reconnect_interval = -1,
      .session = {.listener = &client_listener, .codec = &lenpfx},
  };
  loom_client *cl;
  int rc = loom_client_start(&cl, &o);
  if (rc == 0) { /* how its connection fares, for the message */
    int w = loom_client_wait(cl, 1, loom_now() + 5000000000);
    CHECK_OK(loom_client_close(cl, loom_now() + 5000000000));
    CHECKF(rc != 0, "a client with keepalive 32768 started; its dial: %d", w);
  }
  CHECK_ERR(rc, -EINVAL);
  o.keepalive = 32767;
  CHECK_OK(loom_client_start(&cl, &o));
  CHECK_OK(loom_client_wait(cl, 1, loom_now() + 5000000000));
  CHECK_OK(loom_client_close(cl, loom_now() + 5000000000));
  loom_server_opts so = {
      .network = "tcp",
      .addr = "127.0.0.1:0",
      .keepalive = 32768,
      .session = {.listener = &client_listener, .codec = &lenpfx},
  };
  loom_server *srv2;
  CHECK_ERR(loom_server_start(&srv2, &so), -EINVAL);
  CHECK_OK(loom_server_close(srv, loom_now() + 5000000000));
}
TEST(keepalive_beyond_the_kernel_limit_is_refused) {
  check_run(keepalive_max_main, NULL, 2);
}

CHECK_MAIN()
