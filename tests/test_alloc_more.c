/*
 * test_alloc_more.c — failure injection over the parts test_alloc.c and
 * test_engine_alloc.c do not sweep: the net API (tcp, unix, udp,
 * unixgram, loom_fd_wait), channels / select / sync waits with
 * deadlines, context trees, and the engine's packet sessions.
 *
 * One process per case; inside, one loom_run per failing allocation i
 * (armed: counted only inside the scenario's main coroutine), then a
 * clean run.  A watchdog names the i of a run that hangs.  After each
 * run every block allocated through the hook must be freed, and every
 * socket file made by bind must be gone.
 */
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "check_alloc.h"

#define SEC INT64_C(1000000000)

static atomic_long nalloc;
static atomic_int armed;
static long fail_at = -1;
static bool fail_from;

static bool should_fail(void) {
  if (!atomic_load(&armed))
    return false;
  long k = atomic_fetch_add(&nalloc, 1) + 1;
  return fail_at > 0 && (k == fail_at || (fail_from && k > fail_at));
}

#define CHECK_AT(cond, fmt, ...)                                               \
  CHECKF(cond, "allocation %ld%s: " fmt, fail_at, fail_from ? " and on" : "",  \
         ##__VA_ARGS__)

static void expect_rc(const char *what, long rc, long also1, long also2) {
  CHECK_AT(rc >= 0 || rc == -ENOMEM || (also1 && rc == also1) ||
               (also2 && rc == also2),
           "%s returned %ld (%s)", what, rc, loom_err_name((int)rc));
}

static char path_a[108], path_b[108];

static bool gone(const char *p) {
  struct stat st;
  return stat(p, &st) != 0 && errno == ENOENT;
}

/* ------------------------------------------------------------------ */
/* net                                                                  */

typedef struct echo_srv {
  loom_listener *ln;
  loom_wg done;
} echo_srv;

static void echo_conn(loom_conn *c) {
  char buf[512];
  for (;;) {
    int rc = loom_set_read_deadline(c, loom_now() + 2 * SEC);
    expect_rc("loom_set_read_deadline", rc, 0, 0);
    ssize_t n = loom_read(c, buf, sizeof buf);
    expect_rc("loom_read (server)", n, -ETIMEDOUT, -ECONNRESET);
    if (n <= 0)
      break;
    ssize_t w = loom_write(c, buf, (size_t)n);
    expect_rc("loom_write (server)", w, -EPIPE, -ECONNRESET);
    if (w < 0)
      break;
  }
  CHECK_OK(loom_close(c));
}

static void acceptor(void *arg) {
  echo_srv *e = arg;
  for (;;) {
    loom_conn *c;
    int rc = loom_accept(e->ln, &c);
    expect_rc("loom_accept", rc, -ETIMEDOUT, 0);
    if (rc != 0)
      break;
    echo_conn(c);
  }
  CHECK_OK(loom_listener_close(e->ln));
  loom_wg_done(&e->done);
}

static void client_talk(const char *network, const char *addr) {
  loom_conn *c;
  int rc = loom_dial(&c, network, addr);
  expect_rc("loom_dial", rc, 0, 0);
  if (rc != 0)
    return;
  char out[20][10], in[512];
  struct iovec iov[20];
  for (int i = 0; i < 20; i++) {
    memset(out[i], 'a' + i, sizeof out[i]);
    iov[i] = (struct iovec){out[i], sizeof out[i]};
  }
  ssize_t w = loom_writev(c, iov, 20); /* > 16: the iovec copy */
  expect_rc("loom_writev", w, -EPIPE, -ECONNRESET);
  int drc = loom_set_deadline(c, loom_now() + 2 * SEC, loom_now() + 2 * SEC);
  expect_rc("loom_set_deadline", drc, 0, 0);
  loom_ctx *ctx = NULL;
  rc = loom_ctx_with_timeout(&ctx, loom_ctx_background(), 2 * SEC);
  expect_rc("loom_ctx_with_timeout", rc, 0, 0);
  size_t got = 0;
  if (w == 200 && (drc == 0 || ctx != NULL)) {
    while (got < 200) {
      ssize_t n = ctx ? loom_read_ctx(c, in + got, sizeof in - got, ctx)
                      : loom_read(c, in + got, sizeof in - got);
      expect_rc("loom_read (client)", n, -ETIMEDOUT, -ECONNRESET);
      if (n <= 0)
        break;
      got += (size_t)n;
    }
    for (size_t i = 0; i < got; i++)
      CHECK_AT(in[i] == 'a' + (char)(i / 10), "byte %zu wrong", i);
  }
  loom_ctx_release(ctx);
  CHECK_OK(loom_close(c));
}

/* A passed deadline needs no timer: the acceptor's accept ends with
 * -ETIMEDOUT, and it closes the listener itself (a listener must not be
 * used after its close, so main cannot close it under a loop of
 * accepts).  Without a coroutine for the acceptor, main closes it. */
static void stop_acceptor(echo_srv *e) {
  CHECK_OK(loom_listener_set_deadline(e->ln, loom_now() - 1));
  CHECK_OK(loom_wg_wait(&e->done, 0));
}

/* An echo listener on `addr` with an acceptor, and a client talking to
 * it, each as far as the failures let them go. */
static void listen_and_talk(const char *network, const char *addr) {
  echo_srv e = {NULL, LOOM_WG_INIT};
  int rc = loom_listen(&e.ln, network, addr);
  expect_rc("loom_listen", rc, 0, 0);
  if (rc != 0)
    return;
  char bound[128];
  CHECK_OK(loom_listener_addr(e.ln, bound, sizeof bound));
  loom_wg_add(&e.done, 1);
  rc = loom_go(acceptor, &e);
  expect_rc("loom_go", rc, 0, 0);
  if (rc != 0) {
    loom_wg_done(&e.done);
    CHECK_OK(loom_listener_close(e.ln));
    return;
  }
  client_talk(network, bound);
  stop_acceptor(&e);
}

static void sc_net(void) {
  listen_and_talk("tcp", "127.0.0.1:0");
  listen_and_talk("unix", path_a);
  CHECK_AT(gone(path_a), "%s left behind", path_a);
  /* udp and unixgram */
  int rc;
  static const char *nets[2] = {"udp", "unixgram"};
  for (int k = 0; k < 2; k++) {
    loom_pconn *srv = NULL, *cli = NULL;
    const char *a = k ? path_b : "127.0.0.1:0";
    rc = loom_listen_packet(&srv, nets[k], a);
    expect_rc("loom_listen_packet", rc, 0, 0);
    if (rc != 0)
      continue;
    char addr[128];
    CHECK_OK(loom_pconn_local_addr(srv, addr, sizeof addr));
    rc = loom_dial_packet(&cli, nets[k], addr);
    expect_rc("loom_dial_packet", rc, 0, 0);
    if (rc == 0) {
      ssize_t w = loom_pconn_write(cli, "hello", 5);
      expect_rc("loom_pconn_write", w, 0, 0);
      rc = loom_pconn_set_read_deadline(srv, loom_now() + SEC / 2);
      expect_rc("loom_pconn_set_read_deadline", rc, 0, 0);
      if (rc == 0 && w == 5) {
        char buf[16];
        struct sockaddr_storage from;
        socklen_t fl = sizeof from;
        ssize_t n = loom_pconn_read_from(srv, buf, sizeof buf, &from, &fl);
        expect_rc("loom_pconn_read_from", n, -ETIMEDOUT, 0);
      }
      CHECK_OK(loom_pconn_close(cli));
    }
    CHECK_OK(loom_pconn_close(srv));
  }
  CHECK_AT(gone(path_b), "%s left behind", path_b);
  /* loom_fd_wait on a pipe */
  int p[2];
  CHECK_EQ(pipe2(p, O_NONBLOCK | O_CLOEXEC), 0);
  rc = loom_fd_wait(p[0], LOOM_FD_READ, loom_now() + 5 * CHECK_MS);
  expect_rc("loom_fd_wait", rc, -ETIMEDOUT, 0);
  CHECK_EQ(write(p[1], "x", 1), 1);
  rc = loom_fd_wait(p[0], LOOM_FD_READ, loom_now() + SEC);
  expect_rc("loom_fd_wait", rc, 0, 0);
  close(p[0]);
  close(p[1]);
}

/* ------------------------------------------------------------------ */
/* channels, select, sync waits, contexts                               */

static loom_mutex mu = LOOM_MUTEX_INIT;
static loom_cond cv = LOOM_COND_INIT;
static loom_rwmutex rw = LOOM_RWMUTEX_INIT;
static loom_sema sem = LOOM_SEMA_INIT(0);

typedef struct sender_arg {
  loom_chan *c;
  loom_wg *wg;
} sender_arg;

static void sender(void *arg) {
  sender_arg *a = arg;
  loom_sleep(CHECK_MS);
  int v = 7;
  int rc = loom_chan_send_until(a->c, &v, loom_now() + SEC);
  expect_rc("loom_chan_send_until", rc, -ETIMEDOUT, -EPIPE);
  loom_wg_done(a->wg);
}

typedef struct waiter_arg {
  loom_ctx *ctx;
  loom_chan *c;
  loom_wg *wg;
} waiter_arg;

static void ctx_waiter(void *arg) {
  waiter_arg *a = arg;
  int v;
  int rc = loom_chan_recv_ctx(a->c, &v, a->ctx);
  expect_rc("loom_chan_recv_ctx", rc, -ECANCELED, -ETIMEDOUT);
  rc = loom_sleep_ctx(a->ctx, SEC);
  expect_rc("loom_sleep_ctx", rc, -ECANCELED, -ETIMEDOUT);
  loom_wg_done(a->wg);
}

static void sc_sync(void) {
  loom_wg wg = LOOM_WG_INIT;
  enum { NC = 10 };
  loom_chan *ch[NC] = {0};
  int rc;
  for (int i = 0; i < NC; i++) {
    rc = loom_chan_make(&ch[i], sizeof(int), i % 3);
    expect_rc("loom_chan_make", rc, 0, 0);
    if (rc != 0)
      ch[i] = NULL;
  }
  /* select over more than 8 cases, with a sender on one */
  sender_arg sa = {ch[5], &wg};
  if (ch[5]) {
    loom_wg_add(&wg, 1);
    if (loom_go(sender, &sa) != 0)
      loom_wg_done(&wg);
  }
  int vals[NC];
  loom_case cs[NC];
  for (int i = 0; i < NC; i++)
    cs[i] = (loom_case){ch[i], LOOM_RECV, &vals[i], false};
  rc = loom_select(cs, NC, loom_now() + SEC / 2);
  expect_rc("loom_select", rc, -ETIMEDOUT, 0);
  /* a timed receive nobody answers */
  if (ch[0]) {
    int v;
    rc = loom_chan_recv_until(ch[0], &v, loom_now() + 2 * CHECK_MS);
    expect_rc("loom_chan_recv_until", rc, -ETIMEDOUT, 0);
  }
  /* timed waits on the sync objects */
  loom_mutex_lock(&mu);
  rc = loom_cond_wait(&cv, &mu, loom_now() + 2 * CHECK_MS);
  expect_rc("loom_cond_wait", rc, -ETIMEDOUT, 0);
  loom_mutex_unlock(&mu);
  rc = loom_sema_acquire(&sem, loom_now() + 2 * CHECK_MS);
  expect_rc("loom_sema_acquire", rc, -ETIMEDOUT, 0);
  loom_rwmutex_rlock(&rw);
  rc = loom_rwmutex_lock_until(&rw, loom_now() + 2 * CHECK_MS);
  expect_rc("loom_rwmutex_lock_until", rc, -ETIMEDOUT, 0);
  loom_rwmutex_runlock(&rw);
  /* a context tree: a root, 20 children (deadlines and values), a
   * waiter on each, then the root's cancel */
  loom_ctx *root = NULL, *kid[20] = {0};
  rc = loom_ctx_with_cancel(&root, loom_ctx_background());
  expect_rc("loom_ctx_with_cancel", rc, 0, 0);
  waiter_arg wa[20];
  if (root) {
    for (int i = 0; i < 20; i++) {
      if (i % 3 == 0)
        rc = loom_ctx_with_deadline(&kid[i], root, loom_now() + 20 * SEC);
      else if (i % 3 == 1)
        rc = loom_ctx_with_timeout(&kid[i], root,
                                   (i == 4) ? CHECK_MS : 30 * SEC);
      else
        rc = loom_ctx_with_value(&kid[i], root, &kid[0], &kid[1]);
      expect_rc("loom_ctx_with_*", rc, 0, 0);
      if (rc != 0) {
        kid[i] = NULL;
        continue;
      }
      wa[i] = (waiter_arg){kid[i], ch[1], &wg};
      if (ch[1]) {
        loom_wg_add(&wg, 1);
        if (loom_go(ctx_waiter, &wa[i]) != 0)
          loom_wg_done(&wg);
      }
    }
    loom_sleep(5 * CHECK_MS);
    loom_ctx_cancel(root);
  }
  rc = loom_wg_wait(&wg, loom_now() + 5 * SEC);
  CHECK_AT(rc == 0 || rc == -ENOMEM, "wg_wait %d", rc);
  if (rc != 0)
    CHECK_OK(loom_wg_wait(&wg, 0));
  for (int i = 0; i < 20; i++)
    loom_ctx_release(kid[i]);
  loom_ctx_release(root);
  for (int i = 0; i < NC; i++)
    loom_chan_free(ch[i]);
}

/* ------------------------------------------------------------------ */
/* the engine's packet sessions                                         */

static atomic_int opens, closes, frees;
static loom_codec lenpfx;

static int on_open(loom_session *s) {
  (void)s;
  atomic_fetch_add(&opens, 1);
  return 0;
}
static void on_message(loom_session *s, const loom_pkg *pkg) {
  int rc = loom_session_write_to(s, pkg->data, pkg->len, pkg->from,
                                 pkg->fromlen, SEC);
  expect_rc("loom_session_write_to", rc, LOOM_ECLOSED, 0);
  expect_rc("loom_session_set_attr", loom_session_set_attr(s, &opens, s), 0, 0);
}
static void on_close(loom_session *s) {
  (void)s;
  atomic_fetch_add(&closes, 1);
}
static void on_free(loom_session *s) {
  (void)s;
  atomic_fetch_add(&frees, 1);
}
static const loom_session_listener listener = {on_open, on_message, NULL,
                                               NULL,    on_close,   on_free};

static void packet_server(bool pooled, const char *network, const char *where) {
  atomic_store(&opens, 0);
  atomic_store(&closes, 0);
  atomic_store(&frees, 0);
  loom_taskpool *pool = NULL;
  int rc;
  if (pooled) {
    loom_taskpool_opts po;
    memset(&po, 0, sizeof po);
    rc = loom_taskpool_make(&pool, &po);
    expect_rc("loom_taskpool_make", rc, 0, 0);
    if (rc != 0)
      return;
  }
  loom_server_opts o;
  memset(&o, 0, sizeof o);
  o.network = network;
  o.addr = where;
  o.session.listener = &listener;
  o.session.codec = &lenpfx;
  o.session.pool = pool;
  loom_server *srv;
  rc = loom_server_start(&srv, &o);
  expect_rc("loom_server_start", rc, 0, 0);
  if (rc == 0) {
    char addr[128];
    CHECK_OK(loom_server_addr(srv, addr, sizeof addr));
    loom_pconn *pc;
    rc = loom_dial_packet(&pc, network, addr);
    expect_rc("loom_dial_packet", rc, 0, 0);
    if (rc == 0) {
      for (int i = 0; i < 5; i++) {
        /* A server whose session failed for want of memory has closed
         * its socket: the port refuses (for UDP, seen by a later write). */
        uint8_t m[8] = {0, 0, 0, 4, 'p', 'i', 'n', 'g'};
        ssize_t w = loom_pconn_write(pc, m, sizeof m);
        expect_rc("loom_pconn_write", w, -ECONNREFUSED, 0);
        if (w < 0)
          break;
      }
      rc = loom_pconn_set_read_deadline(pc, loom_now() + SEC / 4);
      expect_rc("loom_pconn_set_read_deadline", rc, 0, 0);
      for (int i = 0; i < 5 && rc == 0; i++) {
        uint8_t in[16];
        ssize_t n = loom_pconn_read(pc, in, sizeof in);
        expect_rc("loom_pconn_read", n, -ETIMEDOUT, -ECONNREFUSED);
        if (n < 0)
          break;
        CHECK_AT(n == 8 && memcmp(in + 4, "ping", 4) == 0, "reply %zd", n);
      }
      CHECK_OK(loom_pconn_close(pc));
    }
    int64_t t0 = loom_now();
    rc = loom_server_close(srv, loom_now() + 2 * SEC);
    CHECK_AT(rc == 0, "loom_server_close %d after %lld ms", rc,
             (long long)((loom_now() - t0) / CHECK_MS));
    CHECK_AT(atomic_load(&closes) == atomic_load(&opens) ||
                 atomic_load(&closes) == 1,
             "opens %d closes %d", atomic_load(&opens), atomic_load(&closes));
    CHECK_AT(atomic_load(&closes) <= 1, "closes %d", atomic_load(&closes));
  }
  if (pool)
    loom_taskpool_close(pool);
}

static void sc_packet(void) { packet_server(false, "udp", "127.0.0.1:0"); }
static void sc_packet_pool(void) { packet_server(true, "udp", "127.0.0.1:0"); }
static void sc_packet_unix(void) {
  packet_server(false, "unixgram", path_b);
  CHECK_AT(gone(path_b), "%s left behind", path_b);
}

/* ------------------------------------------------------------------ */
/* the sweep                                                            */

typedef struct scenario {
  const char *name;
  void (*fn)(void);
} scenario;

static const scenario scenarios[] = {
    {"net", sc_net},
    {"sync", sc_sync},
    {"packet", sc_packet},
    {"packet_pool", sc_packet_pool},
    {"packet_unix", sc_packet_unix},
};

static void scenario_main(void *arg) {
  const scenario *sc = arg;
  atomic_store(&armed, 1);
  sc->fn();
  atomic_store(&armed, 0);
}

static long run_once(const scenario *sc, long at, bool from, int procs) {
  atomic_store(&nalloc, 0);
  fail_at = at;
  fail_from = from;
  check_alloc_loom_run(scenario_main, (void *)(uintptr_t)sc, procs, at, from);
  return atomic_load(&nalloc);
}

/* Sweep: the clean count, then i = 1 .. count + count/4 + 8; env
 * ALLOC_FIRST / ALLOC_LAST narrow it. */
static void sweep(const char *name, bool from) {
  const scenario *sc = NULL;
  for (size_t i = 0; i < sizeof scenarios / sizeof scenarios[0]; i++)
    if (strcmp(scenarios[i].name, name) == 0)
      sc = &scenarios[i];
  CHECK(sc != NULL);
  snprintf(path_a, sizeof path_a, "/tmp/loom-am-%d-a.sock", (int)getpid());
  snprintf(path_b, sizeof path_b, "/tmp/loom-am-%d-b.sock", (int)getpid());
  CHECK_OK(loom_codec_lenpfx(&lenpfx, NULL));
  loom_set_allocator(&hook);
  check_alloc_watchdog(15);
  long clean = run_once(sc, -1, false, 2);
  long first = 1, last = clean + clean / 4 + 8;
  if (getenv("ALLOC_FIRST"))
    first = atol(getenv("ALLOC_FIRST"));
  if (getenv("ALLOC_LAST"))
    last = atol(getenv("ALLOC_LAST"));
  printf("%s: a clean run makes %ld allocations; failing %ld..%ld%s\n", name,
         clean, first, last, from ? " and on" : "");
  fflush(stdout);
  for (int procs = 2; procs >= 1; procs--)
    for (long i = first; i <= last; i++) {
      fprintf(stderr, "%s: %d Ps, failing allocation %ld%s\n", name, procs, i,
              from ? " and on" : "");
      run_once(sc, i, from, procs);
    }
  run_once(sc, -1, false, 2);
  printf("%s: injected %ld\n", name, atomic_load(&injected_count));
  loom_set_allocator(NULL);
  unlink(path_a);
  unlink(path_b);
}

TEST(net_fail_each) { sweep("net", false); }
TEST(net_fail_from) { sweep("net", true); }
TEST(sync_fail_each) { sweep("sync", false); }
TEST(sync_fail_from) { sweep("sync", true); }
TEST(packet_fail_each) { sweep("packet", false); }
TEST(packet_fail_from) { sweep("packet", true); }
TEST(packet_pool_fail_each) { sweep("packet_pool", false); }
TEST(packet_pool_fail_from) { sweep("packet_pool", true); }
TEST(packet_unix_fail_each) { sweep("packet_unix", false); }
TEST(packet_unix_fail_from) { sweep("packet_unix", true); }

CHECK_MAIN()
