/*
 * test_engine_focus.c — focused engine cases, each a small reproduction
 * of a bug a randomized stress of the engine found: a close against a
 * packet session parked in write_to, half-close on a compressed session,
 * writers waiting for room while others drain the queue, and read_timeout
 * against slow handlers and a full task pool.
 */
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <zlib.h>

#include "check.h"
#include "check_rng.h"
#include "check_zlib.h"
#include "loom.h"

#define SEC INT64_C(1000000000)

#define HDR 17
static size_t mk_payload(uint8_t *p, char type, uint64_t tag, size_t body) {
  static const char hex[] = "0123456789abcdef";
  p[0] = (uint8_t)type;
  for (int i = 0; i < 16; i++)
    p[1 + i] = (uint8_t)hex[(tag >> (60 - 4 * i)) & 15];
  for (size_t i = 0; i < body; i++)
    p[HDR + i] = (uint8_t)('a' + (tag * 31 + i) % 26);
  return HDR + body;
}

/* How a session ended, for the cases that only watch that (each case
 * runs in a process of its own). */
static atomic_int end_closes, end_err;
static void end_error(loom_session *s, int err) {
  (void)s;
  atomic_store(&end_err, err);
}
static void end_close(loom_session *s) {
  (void)s;
  atomic_fetch_add(&end_closes, 1);
}

/* ---- focused: a packet session parked in write_to ------------------- */

static atomic_int ug_msgs, ug_closes, ug_blocked, ug_fail;
/* Replies with no limit on the wait (timeout -1): once the peer's queue
 * is full it parks, and only the close can end it. */
static void ug_message(loom_session *s, const loom_pkg *pkg) {
  atomic_fetch_add(&ug_msgs, 1);
  atomic_fetch_add(&ug_blocked, 1);
  int rc = loom_session_write_to(s, pkg->data, pkg->len, pkg->from,
                                 pkg->fromlen, -1);
  atomic_fetch_sub(&ug_blocked, 1);
  if (rc != 0)
    atomic_fetch_add(&ug_fail, 1);
}
static void ug_close(loom_session *s) {
  (void)s;
  atomic_fetch_add(&ug_closes, 1);
}
static const loom_session_listener ug_listener = {.on_message = ug_message,
                                                  .on_close = ug_close};

static void ug_main(void *arg) {
  (void)arg;
  char path[96];
  snprintf(path, sizeof path, "/tmp/loom-test-ugslow-%d.sock", (int)getpid());
  unlink(path);
  loom_server_opts o = {.network = "unixgram",
                        .addr = path,
                        .session = {.listener = &ug_listener}};
  loom_server *srv;
  CHECK_OK(loom_server_start(&srv, &o));
  /* A peer that sends and never reads (a plain socket: sends that do
   * not fit are dropped here, not waited for). */
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  CHECK(fd >= 0);
  struct sockaddr_un me = {.sun_family = AF_UNIX};
  snprintf(me.sun_path, sizeof me.sun_path, "%s.peer", path);
  unlink(me.sun_path);
  CHECK_EQ(bind(fd, (struct sockaddr *)&me, sizeof me), 0);
  struct sockaddr_un to = {.sun_family = AF_UNIX};
  snprintf(to.sun_path, sizeof to.sun_path, "%s", path);
  int sent = 0;
  for (int i = 0; i < 100; i++) {
    char b[1024];
    memset(b, 'x', sizeof b);
    if (sendto(fd, b, sizeof b, MSG_DONTWAIT, (struct sockaddr *)&to,
               sizeof to) == (ssize_t)sizeof b)
      sent++;
    loom_sleep(CHECK_MS);
  }
  fprintf(stderr, "peer sent %d datagrams\n", sent);
  loom_sleep(50 * CHECK_MS);
  fprintf(stderr, "failed writes %d\n", atomic_load(&ug_fail));
  fprintf(stderr, "messages handled %d, on_message parked in write_to: %d\n",
          atomic_load(&ug_msgs), atomic_load(&ug_blocked));
  int64_t t0 = loom_now();
  int rc = loom_server_close(srv, loom_now() + 200 * CHECK_MS);
  fprintf(stderr, "loom_server_close: %d (%s) after %lld ms\n", rc,
          loom_err_name(rc), (long long)((loom_now() - t0) / CHECK_MS));
  CHECK_EQ(atomic_load(&ug_closes), 1);
  close(fd);
  unlink(me.sun_path);
  unlink(path);
}
TEST(unixgram_write_to_slow_peer_vs_close) {
  check_watchdog(10, "server close with a packet session parked in write_to");
  check_run(ug_main, NULL, 2);
}

/* A graceful close without a deadline, of a packet session whose handler
 * waits (timeout -1) to reply to a peer that never reads: the close
 * bounds that wait by the linger, as it does a stream's wait for room,
 * and the reply fails with LOOM_ECLOSED; without that bound the close
 * waited for the handler, and the handler for the end of the close, for
 * ever.  A server's unconnected unixgram socket (its sends retry on
 * their own), with a linger of 100 ms and with a negative one (at
 * once); then a client's connected unixgram socket (its sends take the
 * socket's turn, and wait in it). */
static atomic_int pg_blocked, pg_rc, pg_replies;
static int64_t pg_timeout = -1;      /* the replies' timeout */
static _Atomic int64_t pg_failed_ns; /* how long the failed reply waited */
static void pg_message(loom_session *s, const loom_pkg *pkg) {
  atomic_fetch_add(&pg_blocked, 1);
  int64_t t0 = loom_now();
  int rc = pkg->from != NULL
               ? loom_session_write_to(s, pkg->data, pkg->len, pkg->from,
                                       pkg->fromlen, pg_timeout)
               : loom_session_write(s, pkg->data, pkg->len, pg_timeout);
  if (rc != 0) {
    atomic_store(&pg_rc, rc);
    atomic_store(&pg_failed_ns, loom_now() - t0);
  } else {
    atomic_fetch_add(&pg_replies, 1);
  }
  atomic_fetch_sub(&pg_blocked, 1);
}
static const loom_session_listener pg_listener = {.on_message = pg_message,
                                                  .on_close = end_close};
/* A client's session says hello, so its peer learns where it is. */
static int pg_hello(loom_session *s) {
  CHECK_OK(loom_session_write(s, "hi", 2, 0));
  return 0;
}
static const loom_session_listener pg_client_listener = {
    .on_open = pg_hello, .on_message = pg_message, .on_close = end_close};

/* Send 1 KiB datagrams from fd to `to` (never reading) until a handler
 * waits to reply: one found in its write is waiting once it is still
 * there 20 ms later (a reply that finds room is in it only briefly). */
static void pg_flood(int fd, const struct sockaddr *to, socklen_t tolen) {
  char b[1024];
  memset(b, 'x', sizeof b);
  for (int i = 0;; i++) {
    CHECK(i < 5000);
    if (atomic_load(&pg_blocked) == 1) {
      loom_sleep(20 * CHECK_MS);
      if (atomic_load(&pg_blocked) == 1)
        break;
    }
    (void)sendto(fd, b, sizeof b, MSG_DONTWAIT, to, tolen);
    loom_sleep(CHECK_MS);
  }
  CHECK_EQ(atomic_load(&pg_rc), 0); /* none failed before the close */
}

/* A bound plain unixgram socket at `path`.peer. */
static int pg_peer(const char *path, struct sockaddr_un *me) {
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  CHECK(fd >= 0);
  *me = (struct sockaddr_un){.sun_family = AF_UNIX};
  snprintf(me->sun_path, sizeof me->sun_path, "%s.peer", path);
  unlink(me->sun_path);
  CHECK_EQ(bind(fd, (struct sockaddr *)me, sizeof *me), 0);
  return fd;
}

/* linger, the replies' timeout, and what the waiting reply must get. */
typedef struct pg_case {
  int64_t linger, timeout;
  int rc;
} pg_case;

/* Checks what the waiting reply got, and how long the close took. */
static void pg_check(const pg_case *pc, int64_t took) {
  CHECK_EQ(atomic_load(&end_closes), 1);
  CHECK_ERR(atomic_load(&pg_rc), pc->rc);
  if (pc->rc == LOOM_ECLOSED && pc->linger > 0)
    CHECK_GE(took, pc->linger - 5 * CHECK_MS); /* it waited that long */
  if (pc->rc == -ETIMEDOUT) /* its own, not cut short by the close */
    CHECK_GE(atomic_load(&pg_failed_ns), pc->timeout - 5 * CHECK_MS);
  CHECK_LT(took, 2000 * CHECK_MS);
}

static void pg_server_main(void *arg) {
  const pg_case *pc = arg;
  pg_timeout = pc->timeout;
  char path[96];
  snprintf(path, sizeof path, "/tmp/loom-test-pgsrv-%d.sock", (int)getpid());
  unlink(path);
  loom_server_opts o = {
      .network = "unixgram",
      .addr = path,
      .session = {.listener = &pg_listener, .linger = pc->linger}};
  loom_server *srv;
  CHECK_OK(loom_server_start(&srv, &o));
  struct sockaddr_un me, to = {.sun_family = AF_UNIX};
  int fd = pg_peer(path, &me);
  snprintf(to.sun_path, sizeof to.sun_path, "%s", path);
  pg_flood(fd, (struct sockaddr *)&to, sizeof to);
  int64_t t0 = loom_now();
  CHECK_OK(loom_server_close(srv, 0)); /* no deadline: graceful to the end */
  pg_check(pc, loom_now() - t0);
  close(fd);
  unlink(me.sun_path);
  unlink(path);
}
TEST(packet_server_close_bounds_a_reply_waiting_for_room) {
  static pg_case c = {100 * CHECK_MS, -1, LOOM_ECLOSED};
  check_watchdog(10, "graceful close of a packet server, reply waiting");
  check_run(pg_server_main, &c, 2);
}
TEST(packet_server_close_without_linger_ends_a_waiting_reply_at_once) {
  static pg_case c = {-1, -1, LOOM_ECLOSED};
  check_watchdog(10, "graceful close of a packet server, reply waiting");
  check_run(pg_server_main, &c, 2);
}
/* The reply's own timeout comes before the close's bound (a linger of
 * 5 s): the close's wake-up of the reply's retries does not cut it
 * short; it waits out its timeout, and fails with -ETIMEDOUT. */
TEST(packet_server_close_leaves_a_reply_its_own_timeout) {
  static pg_case c = {5000 * CHECK_MS, 300 * CHECK_MS, -ETIMEDOUT};
  check_watchdog(10, "graceful close of a packet server, reply with timeout");
  check_run(pg_server_main, &c, 2);
}

static void pg_client_main(void *arg) {
  const pg_case *pc = arg;
  pg_timeout = pc->timeout;
  char path[96];
  snprintf(path, sizeof path, "/tmp/loom-test-pgcl-%d.sock", (int)getpid());
  unlink(path);
  struct sockaddr_un me;
  int fd = pg_peer(path, &me); /* the client's server: never reads */
  loom_client_opts o = {
      .network = "unixgram",
      .addr = me.sun_path,
      .session = {.listener = &pg_client_listener, .linger = pc->linger}};
  loom_client *cl;
  CHECK_OK(loom_client_start(&cl, &o));
  CHECK_OK(loom_client_wait(cl, 1, loom_now() + 5 * 1000 * CHECK_MS));
  /* Learn the client's (autobound) address from its hello. */
  struct sockaddr_un from;
  socklen_t fl = 0;
  char b[64];
  for (int i = 0; i < 5000 && fl == 0; i++) {
    fl = sizeof from;
    ssize_t k =
        recvfrom(fd, b, sizeof b, MSG_DONTWAIT, (struct sockaddr *)&from, &fl);
    if (k < 0) {
      fl = 0;
      loom_sleep(CHECK_MS);
    }
  }
  pg_flood(fd, (struct sockaddr *)&from, fl);
  int64_t t0 = loom_now();
  CHECK_OK(loom_client_close(cl, 0));
  pg_check(pc, loom_now() - t0);
  close(fd);
  unlink(me.sun_path);
}
TEST(packet_client_close_bounds_a_reply_waiting_for_room) {
  static pg_case c = {100 * CHECK_MS, -1, LOOM_ECLOSED};
  check_watchdog(10, "graceful close of a packet client, reply waiting");
  check_run(pg_client_main, &c, 2);
}
/* The reply's own timeout comes before the close's bound (a linger of
 * 5 s): the close's wake-up of the reply in the send turn does not cut
 * it short; it waits out its timeout, and fails with -ETIMEDOUT. */
TEST(packet_client_close_leaves_a_reply_its_own_timeout) {
  static pg_case c = {5000 * CHECK_MS, 300 * CHECK_MS, -ETIMEDOUT};
  check_watchdog(10, "graceful close of a packet client, reply with timeout");
  check_run(pg_client_main, &c, 2);
}

/* ---- focused: half-close on a compressed session ------------------------- */

static void zh_message(loom_session *s, const loom_pkg *pkg) {
  int rc = loom_session_write(s, pkg->data, pkg->len, -1);
  CHECK(rc == 0 || rc == LOOM_ECLOSED);
}
static const loom_session_listener zh_listener = {
    .on_message = zh_message, .on_error = end_error, .on_close = end_close};

static void zh_main(void *arg) {
  int nframes = (int)(intptr_t)arg;
  loom_codec lp;
  loom_codec_lenpfx(&lp, NULL);
  loom_server_opts o = {
      .network = "tcp",
      .addr = "127.0.0.1:0",
      .session = {.listener = &zh_listener, .codec = &lp, .compress = -1}};
  loom_server *srv;
  CHECK_OK(loom_server_start(&srv, &o));
  char addr[64];
  CHECK_OK(loom_server_addr(srv, addr, sizeof addr));
  loom_conn *c;
  CHECK_OK(loom_dial(&c, "tcp", addr));
  z_stream zo = {0}, zi = {0};
  CHECK_EQ(deflateInit(&zo, Z_DEFAULT_COMPRESSION), Z_OK);
  CHECK_EQ(inflateInit(&zi), Z_OK);
  static uint8_t plain[1 << 20], comp[1 << 20], back[4 << 20];
  size_t plen = 0;
  for (int i = 0; i < nframes; i++) {
    uint8_t pl[600];
    size_t n = mk_payload(pl, 'E', (uint64_t)i + 1, (size_t)(i * 37) % 500);
    plain[plen] = (uint8_t)(n >> 24);
    plain[plen + 1] = (uint8_t)(n >> 16);
    plain[plen + 2] = (uint8_t)(n >> 8);
    plain[plen + 3] = (uint8_t)n;
    memcpy(plain + plen + 4, pl, n);
    plen += n + 4;
  }
  zo.next_in = plain;
  zo.avail_in = (uInt)plen;
  zo.next_out = comp;
  zo.avail_out = sizeof comp;
  CHECK_EQ(deflate(&zo, Z_SYNC_FLUSH), Z_OK);
  size_t clen = sizeof comp - zo.avail_out;
  CHECK_EQ(loom_write(c, comp, clen), (ssize_t)clen);
  CHECK_OK(loom_shutdown(c, SHUT_WR));
  /* Read and inflate everything until the end of stream. */
  size_t blen = 0;
  loom_set_read_deadline(c, loom_now() + 5 * SEC);
  ssize_t n;
  uint8_t in[8192];
  while ((n = loom_read(c, in, sizeof in)) > 0) {
    CHECK_EQ(check_inflate(&zi, in, (size_t)n, back, sizeof back, &blen,
                           "the server's stream"),
             (size_t)n);
  }
  fprintf(stderr,
          "compressed half-close: sent %zu plain bytes in %d frames, got %zu "
          "back, last read %zd (%s), on_close %d, error %s\n",
          plen, nframes, blen, n, n < 0 ? loom_err_name((int)n) : "EOF",
          atomic_load(&end_closes), loom_err_name(atomic_load(&end_err)));
  CHECK_EQ(n, 0);
  CHECK_EQ(blen, plen);
  CHECK(memcmp(plain, back, plen) == 0);
  deflateEnd(&zo);
  inflateEnd(&zi);
  loom_close(c);
  CHECK_OK(loom_server_close(srv, loom_now() + SEC));
}
TEST(compressed_half_close_delivers_everything) {
  check_watchdog(15, "compressed half close");
  check_run(zh_main, (void *)(intptr_t)200, 2);
}
TEST(compressed_half_close_delivers_everything_big) {
  check_watchdog(15, "compressed half close");
  check_run(zh_main, (void *)(intptr_t)3000, 2);
}

/* ---- focused: producers waiting for room while others drain the queue --- */

#define LW_PROD 6
static loom_session *_Atomic lw_s;
static _Atomic int64_t lw_since[LW_PROD]; /* in a write since (0: not) */
static atomic_int lw_stop;
static atomic_long lw_writes;
static int lw_open(loom_session *s) {
  atomic_store(&lw_s, loom_session_ref(s));
  return 0;
}
static const loom_session_listener lw_listener = {.on_open = lw_open};

static void lw_producer(void *arg) {
  int id = (int)(intptr_t)arg;
  loom_session *s = atomic_load(&lw_s);
  uint8_t b[300];
  memset(b, 'a' + id, sizeof b);
  rng_t r;
  rng_seed(&r, (uint64_t)id + 1);
  while (!atomic_load(&lw_stop)) {
    atomic_store(&lw_since[id], loom_now());
    int rc = loom_session_write(s, b, 50 + rn(&r, 250), -1);
    atomic_store(&lw_since[id], 0);
    if (rc != 0)
      break;
    atomic_fetch_add(&lw_writes, 1);
    if (rn(&r, 4) == 0)
      loom_yield();
  }
}

static void *lw_reader(void *arg) {
  int fd = (int)(intptr_t)arg;
  rng_t r;
  rng_seed(&r, 99);
  char buf[8192];
  while (!atomic_load(&lw_stop)) {
    ssize_t n = recv(fd, buf, 1 + rn(&r, sizeof buf), MSG_DONTWAIT);
    if (n == 0)
      break;
    if (rn(&r, 3) == 0)
      usleep(rn(&r, 2000));
  }
  return NULL;
}

/* The server's end of the connection whose other end is `fd`. */
static int lw_server_fd(int fd) {
  struct sockaddr_in me, srv;
  socklen_t l = sizeof me;
  CHECK_EQ(getsockname(fd, (struct sockaddr *)&me, &l), 0);
  l = sizeof srv;
  CHECK_EQ(getpeername(fd, (struct sockaddr *)&srv, &l), 0);
  for (int f = 3; f < 4096; f++) {
    struct sockaddr_in a, b;
    socklen_t la = sizeof a, lb = sizeof b;
    if (f == fd || getsockname(f, (struct sockaddr *)&a, &la) != 0 ||
        a.sin_family != AF_INET ||
        getpeername(f, (struct sockaddr *)&b, &lb) != 0)
      continue;
    if (a.sin_port == srv.sin_port && b.sin_port == me.sin_port)
      return f;
  }
  return -1;
}

/* Bytes the server's socket holds, sent or not, that the peer has not
 * acknowledged. */
static int lw_outq(int sfd) {
  int q = 0;
  CHECK_EQ(ioctl(sfd, SIOCOUTQ, &q), 0);
  return q;
}

static void lw_main(void *arg) {
  (void)arg;
  loom_server_opts o = {.network = "tcp",
                        .addr = "127.0.0.1:0",
                        .sndbuf = 4096,
                        .session = {.listener = &lw_listener, .wq_high = 1024}};
  loom_server *srv;
  CHECK_OK(loom_server_start(&srv, &o));
  char addr[64];
  CHECK_OK(loom_server_addr(srv, addr, sizeof addr));
  /* The peer is a plain socket read by a plain thread, its receive
   * buffer made small before it connects: shrunk after the handshake,
   * the window it has already offered cannot shrink with it, segments
   * beyond the buffer are dropped, and the sender waits out a
   * retransmission timeout (200 ms and up) with nothing to send: a
   * stall of TCP's that looked like a lost wake-up here. */
  const char *colon = strrchr(addr, ':');
  CHECK(colon != NULL);
  struct sockaddr_in sa = {.sin_family = AF_INET,
                           .sin_port = htons((uint16_t)atoi(colon + 1)),
                           .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  CHECK(fd >= 0);
  int rcv = 4096;
  CHECK_EQ(setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof rcv), 0);
  loom_block_enter();
  int crc = connect(fd, (struct sockaddr *)&sa, sizeof sa);
  loom_block_exit();
  CHECK_EQ(crc, 0);
  while (atomic_load(&lw_s) == NULL)
    loom_sleep(CHECK_MS);
  int sfd = lw_server_fd(fd);
  CHECK(sfd >= 0);
  int sndbuf = 0;
  socklen_t sl = sizeof sndbuf;
  CHECK_EQ(getsockopt(sfd, SOL_SOCKET, SO_SNDBUF, &sndbuf, &sl), 0);
  pthread_t th;
  CHECK_EQ(pthread_create(&th, NULL, lw_reader, (void *)(intptr_t)fd), 0);
  for (int i = 0; i < LW_PROD; i++)
    CHECK_OK(loom_go(lw_producer, (void *)(intptr_t)i));
  int64_t end =
      loom_now() +
      (int64_t)(getenv("LW_MS") ? atoi(getenv("LW_MS")) : 3000) * CHECK_MS;
  bool stuck = false;
  while (loom_now() < end && !stuck) {
    loom_sleep(10 * CHECK_MS);
    loom_session_stats st;
    loom_session_stats_get(atomic_load(&lw_s), &st);
    int q1 = lw_outq(sfd);
    for (int i = 0; i < LW_PROD; i++) {
      int64_t since = atomic_load(&lw_since[i]);
      if (since && loom_now() - since > 500 * CHECK_MS) {
        /* A write that waits this long may only be unlucky: the woken
         * producers race for the room, and under TSan one can lose for
         * over a second while the others' bytes flow.  A lost wake-up
         * is different: the queue stays below wq_high and nothing moves
         * (every producer waits, the writer has nothing to write) while
         * the socket has sent everything and had it acknowledged (under
         * 1 KiB outstanding).  A socket full of bytes the peer has not
         * acknowledged is TCP waiting out a retransmission timeout (the
         * peer's tiny buffer drops segments now and then): not ours. */
        loom_sleep(200 * CHECK_MS);
        loom_session_stats st2;
        loom_session_stats_get(atomic_load(&lw_s), &st2);
        int q2 = lw_outq(sfd);
        if (atomic_load(&lw_since[i]) == since && st.wq_bytes < 1024 &&
            st2.wq_bytes < 1024 && st2.bytes_out == st.bytes_out && q1 < 1024 &&
            q2 < 1024) {
          fprintf(stderr,
                  "producer %d parked in loom_session_write for %lld ms with "
                  "%zu bytes queued (wq_high 1024), no byte sent for 200 ms, "
                  "and %d of the socket's %d bytes unacknowledged\n",
                  i, (long long)((loom_now() - since) / CHECK_MS), st2.wq_bytes,
                  q2, sndbuf);
          check_dump_hang(); /* where it waits */
          stuck = true;
        }
      }
    }
  }
  fprintf(stderr, "%ld writes\n", atomic_load(&lw_writes));
  atomic_store(&lw_stop, 1);
  loom_session_abort(atomic_load(&lw_s), LOOM_ECLOSED); /* frees the stuck */
  loom_block_enter();
  pthread_join(th, NULL);
  loom_block_exit();
  close(fd);
  CHECK_OK(loom_server_close(srv, loom_now() + SEC));
  loom_sleep(20 * CHECK_MS);
  loom_session_unref(atomic_load(&lw_s));
  CHECK(!stuck);
}
TEST(write_wait_lost_wakeup) {
  check_watchdog(20, "lost wake-up of writers waiting for room");
  check_run(lw_main, NULL, 2);
}

/* ---- focused, deterministic: a waiting writer's wake-up is lost when
 * another producer empties the queue before the writer coroutine runs -- */

static loom_session *_Atomic lx_s;
static loom_sema lx_qgo, lx_pdone_sema;
static atomic_int lx_drained, lx_pdone, lx_qdone, lx_stop;
static atomic_int lx_prc = 1;
static int lx_peer = -1;
static int lx_open(loom_session *s) {
  atomic_store(&lx_s, loom_session_ref(s));
  return 0;
}
static const loom_session_listener lx_listener = {.on_open = lx_open};

#define LX_PKG (256 * 1024)
static uint8_t lx_buf[LX_PKG];

/* Q: readied by P (taking the writer's turn), waits until the peer has
 * drained the socket, then writes once. */
static void lx_q(void *arg) {
  (void)arg;
  loom_sema_acquire(&lx_qgo, 0);
  while (!atomic_load(&lx_drained)) {
  } /* spin: parking here would let the writer coroutine run */
  int rc = loom_session_write(atomic_load(&lx_s), "q", 1, -1);
  atomic_store(&lx_qdone, rc == 0 ? 1 : rc);
}

static void *lx_drainer(void *arg) {
  (void)arg;
  usleep(100000); /* P is parked by now */
  char b[65536];
  int64_t end = check_mono_ns() + 200 * CHECK_MS;
  while (check_mono_ns() < end) /* drain what is in flight */
    (void)recv(lx_peer, b, sizeof b, MSG_DONTWAIT);
  atomic_store(&lx_drained, 1);
  while (!atomic_load(&lx_stop)) /* keep reading */
    if (recv(lx_peer, b, sizeof b, MSG_DONTWAIT) <= 0)
      usleep(1000);
  return NULL;
}

static void lx_p(void *arg) {
  (void)arg;
  loom_session *s = atomic_load(&lx_s);
  loom_session_stats st;
  int w = 0;
  /* Fill the socket until a write leaves bytes queued: the writer
   * coroutine is spawned then (and runs next). */
  do {
    CHECK_OK(loom_session_write(s, lx_buf, LX_PKG, -1));
    w++;
    loom_session_stats_get(s, &st);
  } while (st.wq_bytes == 0 && w < 60);
  CHECK_GT(st.wq_bytes, 0);
  loom_sema_release(&lx_qgo); /* Q takes the next turn, before the writer */
  /* Queue up to wq_high and wait for room. */
  int rc = 0;
  for (int i = 0; i < 8 && rc == 0; i++)
    rc = loom_session_write(s, lx_buf, LX_PKG, -1);
  atomic_store(&lx_prc, rc);
  atomic_store(&lx_pdone, 1);
  loom_sema_release(&lx_pdone_sema);
}

static void lx_main(void *arg) {
  (void)arg;
  loom_server_opts o = {
      .network = "tcp",
      .addr = "127.0.0.1:0",
      .session = {.listener = &lx_listener, .wq_high = 2 * LX_PKG}};
  loom_server *srv;
  CHECK_OK(loom_server_start(&srv, &o));
  char addr[64];
  CHECK_OK(loom_server_addr(srv, addr, sizeof addr));
  int port = atoi(strrchr(addr, ':') + 1);
  lx_peer = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_in sa = {.sin_family = AF_INET,
                           .sin_port = htons((uint16_t)port)};
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  CHECK_EQ(connect(lx_peer, (struct sockaddr *)&sa, sizeof sa), 0);
  while (atomic_load(&lx_s) == NULL)
    loom_sleep(CHECK_MS);
  pthread_t th;
  CHECK_EQ(pthread_create(&th, NULL, lx_drainer, NULL), 0);
  CHECK_OK(loom_go(lx_q, NULL));
  loom_sleep(10 * CHECK_MS); /* Q parks on its semaphore */
  CHECK_OK(loom_go(lx_p, NULL));
  int rc = loom_sema_acquire(&lx_pdone_sema, loom_now() + 1500 * CHECK_MS);
  loom_session_stats st;
  loom_session_stats_get(atomic_load(&lx_s), &st);
  fprintf(stderr,
          "Q's write returned %d; P's write waiting for room: %s; %zu bytes "
          "queued, %llu bytes out\n",
          atomic_load(&lx_qdone) == 1 ? 0 : atomic_load(&lx_qdone),
          rc == 0 ? "returned" : "still parked after 1.5 s", st.wq_bytes,
          (unsigned long long)st.bytes_out);
  loom_session_abort(atomic_load(&lx_s), LOOM_ECLOSED); /* let P go */
  loom_sema_acquire(&lx_pdone_sema, loom_now() + SEC);
  atomic_store(&lx_stop, 1);
  loom_block_enter();
  pthread_join(th, NULL);
  loom_block_exit();
  close(lx_peer);
  CHECK_OK(loom_server_close(srv, loom_now() + SEC));
  loom_session_unref(atomic_load(&lx_s));
  CHECKF(rc == 0, "a write waiting for room was never woken (queue: %zu bytes)",
         st.wq_bytes);
}
TEST(write_wait_lost_wakeup_1p) {
  check_watchdog(20, "lost wake-up (1 P)");
  check_run(lx_main, NULL, 1);
}

/* ---- focused: read_timeout vs a handler that takes a while ------------ */

static atomic_int bh_msgs;
static void bh_message(loom_session *s, const loom_pkg *pkg) {
  (void)s;
  (void)pkg;
  if (atomic_fetch_add(&bh_msgs, 1) == 5)
    loom_sleep(150 * CHECK_MS); /* one slow package */
}
static const loom_session_listener bh_listener = {
    .on_message = bh_message, .on_error = end_error, .on_close = end_close};

static void bh_main(void *arg) {
  loom_taskpool *pool = NULL;
  if (arg) {
    loom_taskpool_opts po = {.queues = 1, .workers = 1, .queue_len = 1};
    CHECK_OK(loom_taskpool_make(&pool, &po));
  }
  loom_codec line;
  loom_codec_line(&line, '\n', false);
  loom_server_opts o = {.network = "tcp",
                        .addr = "127.0.0.1:0",
                        .session = {.listener = &bh_listener,
                                    .codec = &line,
                                    .read_timeout = 100 * CHECK_MS,
                                    .pool = pool}};
  loom_server *srv;
  CHECK_OK(loom_server_start(&srv, &o));
  char addr[64];
  CHECK_OK(loom_server_addr(srv, addr, sizeof addr));
  loom_conn *c;
  CHECK_OK(loom_dial(&c, "tcp", addr));
  /* A line every 10 ms for 400 ms: never 100 ms without a byte. */
  int sent = 0;
  int64_t end = loom_now() + 400 * CHECK_MS;
  while (loom_now() < end && atomic_load(&end_closes) == 0) {
    CHECK_EQ(loom_write(c, "x\n", 2), 2);
    sent++;
    loom_sleep(10 * CHECK_MS);
  }
  fprintf(stderr, "%s: sent %d lines, handled %d, on_close %d, error %s\n",
          pool ? "pooled" : "plain", sent, atomic_load(&bh_msgs),
          atomic_load(&end_closes), loom_err_name(atomic_load(&end_err)));
  CHECK_EQ(atomic_load(&end_closes), 0);
  loom_close(c);
  CHECK_OK(loom_server_close(srv, loom_now() + SEC));
  if (pool)
    loom_taskpool_close(pool);
}
TEST(read_timeout_vs_slow_handler) {
  check_watchdog(10, "read timeout vs slow handler");
  check_run(bh_main, NULL, 2);
}
TEST(read_timeout_vs_pool_backpressure) {
  check_watchdog(10, "read timeout vs pool backpressure");
  check_run(bh_main, (void *)1, 2);
}

/* ---- focused: a compressed stream cut in the middle of a block ---------- */

/* The compressed analogue of truncated_frame_then_eof_is_ebadmsg: a peer
 * sends one whole frame (flushed), then the first bytes of the deflate
 * block that carries a second frame — bytes that inflate takes in without
 * producing any output yet — and ends its stream.  The second frame was
 * sent and is lost: the session must end with an error (LOOM_ECOMPRESS
 * or -EBADMSG), not as a clean half-close. */
static atomic_int zt_msgs;
static void zt_message(loom_session *s, const loom_pkg *pkg) {
  (void)s;
  (void)pkg;
  atomic_fetch_add(&zt_msgs, 1);
}
static const loom_session_listener zt_listener = {
    .on_message = zt_message, .on_error = end_error, .on_close = end_close};

static void zt_main(void *arg) {
  (void)arg;
  loom_codec lp;
  loom_codec_lenpfx(&lp, NULL);
  loom_server_opts o = {
      .network = "tcp",
      .addr = "127.0.0.1:0",
      .session = {.listener = &zt_listener, .codec = &lp, .compress = -1}};
  loom_server *srv;
  CHECK_OK(loom_server_start(&srv, &o));
  char addr[64];
  CHECK_OK(loom_server_addr(srv, addr, sizeof addr));
  loom_conn *c;
  CHECK_OK(loom_dial(&c, "tcp", addr));
  z_stream zo = {0};
  CHECK_EQ(deflateInit(&zo, Z_DEFAULT_COMPRESSION), Z_OK);
  static uint8_t plain[8192], comp[16384];
  /* Frame 1: "hello", flushed. */
  size_t plen = 0;
  plain[plen++] = 0, plain[plen++] = 0, plain[plen++] = 0, plain[plen++] = 5;
  memcpy(plain + plen, "hello", 5);
  plen += 5;
  zo.next_in = plain;
  zo.avail_in = (uInt)plen;
  zo.next_out = comp;
  zo.avail_out = sizeof comp;
  CHECK_EQ(deflate(&zo, Z_SYNC_FLUSH), Z_OK);
  size_t first = sizeof comp - zo.avail_out;
  /* Frame 2: 4000 bytes of varied text (a dynamic-Huffman block). */
  uint64_t x = 88172645463325252u;
  size_t body = 4000;
  plain[0] = 0, plain[1] = 0, plain[2] = (uint8_t)(body >> 8),
  plain[3] = (uint8_t)body;
  for (size_t i = 0; i < body; i++) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    plain[4 + i] = (uint8_t)("etaoinshrdlucmfwypvbgkqjxz .,"[x % 29]);
  }
  zo.next_in = plain;
  zo.avail_in = (uInt)(body + 4);
  CHECK_EQ(deflate(&zo, Z_SYNC_FLUSH), Z_OK);
  size_t second = sizeof comp - zo.avail_out - first;
  CHECK_GT(second, 64);
  /* How much of the second block inflates to nothing yet: feed a fresh
   * inflater the first block, then the second a byte at a time. */
  z_stream zi = {0};
  CHECK_EQ(inflateInit(&zi), Z_OK);
  static uint8_t out[16384];
  size_t olen = 0;
  check_inflate(&zi, comp, first, out, sizeof out, &olen, "the first block");
  CHECK_EQ(olen, 9);
  size_t cut = 0;
  while (cut < 8) {
    check_inflate(&zi, comp + first + cut, 1, out, sizeof out, &olen,
                  "the second block");
    if (olen != 9)
      break;
    cut++;
  }
  inflateEnd(&zi);
  CHECKF(cut >= 2, "the second block gives output after %zu bytes", cut);
  size_t n = first + cut;
  CHECK_EQ(loom_write(c, comp, n), (ssize_t)n);
  CHECK_OK(loom_shutdown(c, SHUT_WR));
  /* The server's end: EOF within a few seconds. */
  uint8_t in[256];
  loom_set_read_deadline(c, loom_now() + 5 * SEC);
  ssize_t k;
  while ((k = loom_read(c, in, sizeof in)) > 0)
    ;
  int64_t end = loom_now() + 5 * SEC;
  while (atomic_load(&end_closes) == 0 && loom_now() < end)
    loom_sleep(CHECK_MS);
  fprintf(stderr,
          "compressed stream cut %zu bytes into a block: messages %d, "
          "on_close %d, on_error %s\n",
          cut, atomic_load(&zt_msgs), atomic_load(&end_closes),
          loom_err_name(atomic_load(&end_err)));
  CHECK_EQ(atomic_load(&end_closes), 1);
  CHECK_EQ(atomic_load(&zt_msgs), 1);
  CHECKF(atomic_load(&end_err) == LOOM_ECOMPRESS ||
             atomic_load(&end_err) == -EBADMSG,
         "a frame was lost in a cut compressed stream, yet the session "
         "closed cleanly (on_error: %s)",
         loom_err_name(atomic_load(&end_err)));
  deflateEnd(&zo);
  loom_close(c);
  CHECK_OK(loom_server_close(srv, loom_now() + SEC));
}
TEST(compressed_stream_cut_in_a_block_is_an_error) {
  check_watchdog(15, "compressed stream cut in a block");
  check_run(zt_main, NULL, 2);
}

/* ---- focused: compressed bytes that inflate to nothing are still bytes --- */

/* read_timeout is "ns without a byte from the peer", and last_read the
 * time of the last byte read.  A zlib peer that sends an empty flush
 * (00 00 ff ff: bytes on the wire, no output) every 40 ms is not idle:
 * a session with read_timeout 200 ms must not time out on it. */
static void zi_main(void *arg) {
  (void)arg;
  loom_codec lp;
  loom_codec_lenpfx(&lp, NULL);
  loom_server_opts o = {.network = "tcp",
                        .addr = "127.0.0.1:0",
                        .session = {.listener = &zt_listener,
                                    .codec = &lp,
                                    .compress = -1,
                                    .read_timeout = 200 * CHECK_MS}};
  loom_server *srv;
  CHECK_OK(loom_server_start(&srv, &o));
  char addr[64];
  CHECK_OK(loom_server_addr(srv, addr, sizeof addr));
  loom_conn *c;
  CHECK_OK(loom_dial(&c, "tcp", addr));
  z_stream zo = {0};
  CHECK_EQ(deflateInit(&zo, Z_DEFAULT_COMPRESSION), Z_OK);
  uint8_t comp[64];
  int sent = 0;
  for (int i = 0; i < 15 && atomic_load(&end_closes) == 0; i++) {
    size_t n;
    if (i == 0) { /* the header and a first empty flush */
      zo.next_in = NULL;
      zo.avail_in = 0;
      zo.next_out = comp;
      zo.avail_out = sizeof comp;
      CHECK_EQ(deflate(&zo, Z_SYNC_FLUSH), Z_OK);
      n = sizeof comp - zo.avail_out;
    } else { /* zlib says nothing more with no input: an empty stored
                block, byte-aligned after the last flush, as it would */
      static const uint8_t empty[] = {0x00, 0x00, 0x00, 0xff, 0xff};
      memcpy(comp, empty, sizeof empty);
      n = sizeof empty;
    }
    if (n > 0 && loom_write(c, comp, n) == (ssize_t)n)
      sent += (int)n;
    loom_sleep(40 * CHECK_MS);
  }
  loom_metrics m;
  loom_server_metrics(srv, &m);
  fprintf(stderr,
          "sent %d bytes of empty flushes over 600 ms: on_close %d, "
          "on_error %s, bytes_in %llu\n",
          sent, atomic_load(&end_closes), loom_err_name(atomic_load(&end_err)),
          (unsigned long long)m.bytes_in);
  CHECKF(atomic_load(&end_closes) == 0,
         "the session idled out (%s) while its peer kept sending",
         loom_err_name(atomic_load(&end_err)));
  deflateEnd(&zo);
  loom_close(c);
  CHECK_OK(loom_server_close(srv, loom_now() + SEC));
}
TEST(compressed_empty_flushes_keep_the_session_alive) {
  check_watchdog(15, "compressed empty flushes vs read_timeout");
  check_run(zi_main, NULL, 2);
}

CHECK_MAIN()
