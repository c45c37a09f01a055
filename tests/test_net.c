/*
 * test_net.c — the net API against real peers on loopback: byte-exact
 * echo over many connections, deadlines, close under a blocked reader,
 * half-close, a peer that resets mid-write, EMFILE, Unix and abstract
 * sockets, IPv6, address parsing, a slow resolver, and packet sockets
 * (their rules, and reads and writes bounded by a context).
 */
#include <arpa/inet.h>
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "loom.h"
#include "net/addr.h"
#include "net/export_test.h"
#include "net/netfd.h"

/* ------------------------------------------------------------------ */
/* An echo server: one coroutine per connection.                        */

static atomic_int echo_conns;

static void echo_conn(void *arg) {
  loom_conn *c = arg;
  char buf[16384];
  for (;;) {
    ssize_t n = loom_read(c, buf, sizeof buf);
    if (n <= 0)
      break;
    if (loom_write(c, buf, (size_t)n) != n)
      break;
  }
  loom_close(c);
  atomic_fetch_sub(&echo_conns, 1);
}

/* The accept loop owns its listener and is the one to close it: a
 * listener is freed by its close, so no other coroutine may touch it
 * then (loom/net.h).  stop_echo asks it to stop and wakes it with a
 * connection. */
static atomic_int echo_stop, echo_done;
static char echo_net[16];

static void echo_server(void *arg) {
  loom_listener *l = arg;
  for (;;) {
    loom_conn *c;
    CHECK_OK(loom_accept(l, &c));
    if (atomic_load(&echo_stop)) {
      CHECK_OK(loom_close(c));
      CHECK_OK(loom_listener_close(l));
      atomic_store(&echo_done, 1);
      return;
    }
    atomic_fetch_add(&echo_conns, 1);
    CHECK_OK(loom_go(echo_conn, c));
  }
}

static char echo_addr[128];
static loom_listener *start_echo(const char *network, const char *addr) {
  loom_listener *l;
  CHECK_OK(loom_listen(&l, network, addr));
  CHECK_OK(loom_listener_addr(l, echo_addr, sizeof echo_addr));
  snprintf(echo_net, sizeof echo_net, "%s", network);
  atomic_store(&echo_stop, 0);
  atomic_store(&echo_done, 0);
  CHECK_OK(loom_go(echo_server, l));
  return l;
}

static void stop_echo(loom_listener *l) {
  (void)l; /* the accept loop closes it */
  atomic_store(&echo_stop, 1);
  loom_conn *c;
  CHECK_OK(loom_dial(&c, echo_net, echo_addr));
  while (!atomic_load(&echo_done))
    loom_sleep(CHECK_MS);
  CHECK_OK(loom_close(c));
}

struct echo_writer {
  loom_conn *c;
  const unsigned char *buf;
  size_t len;
  atomic_int done;
};

static void echo_write_all(void *arg) {
  struct echo_writer *w = arg;
  CHECK_EQ(loom_write(w->c, w->buf, w->len), (ssize_t)w->len);
  atomic_store(&w->done, 1);
}

/* Send `len` pseudo-random bytes through the echo and check them. */
static void echo_roundtrip(const char *network, const char *addr, size_t len,
                           unsigned seed) {
  loom_conn *c;
  CHECK_OK(loom_dial(&c, network, addr));
  unsigned char *out = malloc(len), *in = malloc(len);
  CHECK(out != NULL && in != NULL);
  for (size_t i = 0; i < len; i++) {
    seed = seed * 1103515245u + 12345u;
    out[i] = (unsigned char)(seed >> 16);
  }
  /* Write from another coroutine: the echo writes back while we write,
   * and if we did not read meanwhile both sides' buffers would fill. */
  struct echo_writer w = {c, out, len, 0};
  CHECK_OK(loom_go(echo_write_all, &w));
  size_t got = 0;
  while (got < len) {
    ssize_t n = loom_read(c, in + got, len - got);
    CHECKF(n > 0, "read %zd after %zu of %zu bytes", n, got, len);
    got += (size_t)n;
  }
  CHECK(memcmp(in, out, len) == 0);
  while (!atomic_load(&w.done))
    loom_yield();
  CHECK_OK(loom_close(c));
  free(out);
  free(in);
}

static int nclients;
static atomic_int clients_done;
static void echo_client(void *arg) {
  long i = (long)arg;
  echo_roundtrip("tcp", echo_addr, 1 + (size_t)(i * 7919) % 100000,
                 (unsigned)i);
  atomic_fetch_add(&clients_done, 1);
}

static void many_main(void *arg) {
  (void)arg;
  loom_listener *l = start_echo("tcp", "127.0.0.1:0");
  for (long i = 0; i < nclients; i++)
    CHECK_OK(loom_go(echo_client, (void *)i));
  while (atomic_load(&clients_done) < nclients)
    loom_sleep(CHECK_MS);
  while (atomic_load(&echo_conns) > 0)
    loom_sleep(CHECK_MS);
  stop_echo(l);
}

TEST(echo_many_connections) {
  nclients = 1000; /* under the sanitizers too */
  check_run(many_main, NULL, 2);
  CHECK_EQ(atomic_load(&clients_done), nclients);
}

/* writev with many pieces, and a big write against a reading peer. */
static void writev_main(void *arg) {
  (void)arg;
  loom_listener *l = start_echo("tcp", "127.0.0.1:0");
  loom_conn *c;
  CHECK_OK(loom_dial(&c, "tcp", echo_addr));
  static char pieces[200][37];
  struct iovec iov[200];
  for (int i = 0; i < 200; i++) {
    memset(pieces[i], 'a' + i % 26, sizeof pieces[i]);
    iov[i].iov_base = pieces[i];
    iov[i].iov_len = sizeof pieces[i];
  }
  CHECK_EQ(loom_writev(c, iov, 200), (ssize_t)(200 * 37));
  char back[200 * 37];
  size_t got = 0;
  while (got < sizeof back) {
    ssize_t n = loom_read(c, back + got, sizeof back - got);
    CHECK_GT(n, 0);
    got += (size_t)n;
  }
  for (int i = 0; i < 200; i++)
    CHECK_EQ(back[i * 37 + 36], 'a' + i % 26);
  CHECK_OK(loom_close(c));
  echo_roundtrip("tcp", echo_addr, 8 << 20, 99); /* 8 MiB */
  stop_echo(l);
}

TEST(writev_and_big_write) { check_run(writev_main, NULL, 2); }

/* ------------------------------------------------------------------ */
/* Deadlines: read, write, accept, dial.                                */

static loom_conn *_Atomic silent_peer_slot;
static loom_conn *silent_peer;
static void silent_accept(void *arg) {
  loom_listener *l = arg;
  loom_conn *c;
  CHECK_OK(loom_accept(l, &c));
  atomic_store(&silent_peer_slot, c);
}

static void deadline_main(void *arg) {
  (void)arg;
  loom_listener *l;
  char addr[128];
  CHECK_OK(loom_listen(&l, "tcp", "127.0.0.1:0"));
  CHECK_OK(loom_listener_addr(l, addr, sizeof addr));

  /* accept */
  int64_t t0 = loom_now();
  CHECK_OK(loom_listener_set_deadline(l, t0 + 30 * CHECK_MS));
  loom_conn *c;
  CHECK_ERR(loom_accept(l, &c), -ETIMEDOUT);
  CHECK_GE(loom_now() - t0, 30 * CHECK_MS);
  CHECK_OK(loom_listener_set_deadline(l, 0));

  /* read: times out, then works once the deadline moves */
  CHECK_OK(loom_go(silent_accept, l));
  CHECK_OK(loom_dial(&c, "tcp", addr));
  while ((silent_peer = atomic_load(&silent_peer_slot)) == NULL)
    loom_sleep(CHECK_MS);
  char b[64];
  t0 = loom_now();
  CHECK_OK(loom_set_read_deadline(c, t0 + 30 * CHECK_MS));
  CHECK_ERR(loom_read(c, b, sizeof b), -ETIMEDOUT);
  CHECK_GE(loom_now() - t0, 30 * CHECK_MS);
  CHECK_ERR(loom_read(c, b, sizeof b), -ETIMEDOUT); /* still passed */
  CHECK_OK(loom_set_read_deadline(c, loom_now() + 5000 * CHECK_MS));
  CHECK_EQ(loom_write(silent_peer, "hello", 5), 5);
  CHECK_EQ(loom_read(c, b, sizeof b), 5);
  CHECK(memcmp(b, "hello", 5) == 0);

  /* write: the peer does not read; the buffers fill; the deadline ends
   * the wait, and the connection still reads fine afterwards */
  CHECK_OK(loom_conn_set_buffers(c, 0, 4096));
  CHECK_OK(loom_set_write_deadline(c, loom_now() + 50 * CHECK_MS));
  static char big[1 << 20];
  ssize_t w;
  int rounds = 0;
  while ((w = loom_write(c, big, sizeof big)) == (ssize_t)sizeof big)
    CHECK_LT(++rounds, 64);
  CHECK_ERR(w, -ETIMEDOUT);
  CHECK_OK(loom_set_deadline(c, 0, 0));
  CHECK_EQ(loom_write(silent_peer, "again", 5), 5);
  CHECK_EQ(loom_read(c, b, 5), 5);

  CHECK_OK(loom_close(c));
  CHECK_OK(loom_close(silent_peer));
  CHECK_OK(loom_listener_close(l));
}

TEST(read_write_accept_deadlines) { check_run(deadline_main, NULL, 2); }

static void dial_main(void *arg) {
  (void)arg;
  /* Refused: a port nobody listens on (listen, learn it, close). */
  loom_listener *l;
  char addr[128];
  CHECK_OK(loom_listen(&l, "tcp", "127.0.0.1:0"));
  CHECK_OK(loom_listener_addr(l, addr, sizeof addr));
  CHECK_OK(loom_listener_close(l));
  loom_conn *c;
  CHECK_ERR(loom_dial(&c, "tcp", addr), -ECONNREFUSED);

  /* Timed out: a listener whose backlog is full and that never accepts
   * drops further SYNs, so connect waits until the deadline. */
  loom_listen_opts lo = {.backlog = 1};
  CHECK_OK(loom_listen_with(&l, "tcp", "127.0.0.1:0", &lo));
  CHECK_OK(loom_listener_addr(l, addr, sizeof addr));
  /* A SYN-ACK can still go out while the queue fills, so a few dials may
   * "connect" (the server drops their last ACK); keep dialing. */
  loom_conn *held[64];
  int nheld = 0, timed_out = 0;
  for (int i = 0; i < 64 && !timed_out; i++) {
    loom_dial_opts o = {.deadline = loom_now() + 200 * CHECK_MS};
    int r = loom_dial_with(&c, "tcp", addr, &o);
    if (r == 0)
      held[nheld++] = c;
    else if (r == -ETIMEDOUT)
      timed_out = 1;
    else
      CHECK_FAIL("dial: %s", loom_strerror(r));
  }
  CHECKF(timed_out, "%d dials to a full backlog all connected", nheld);
  for (int i = 0; i < nheld; i++)
    CHECK_OK(loom_close(held[i]));
  CHECK_OK(loom_listener_close(l));
}

TEST(dial_refused_and_timeout) { check_run(dial_main, NULL, 2); }

/* A dial to a name with several addresses gives each its share of the
 * deadline: an address that never answers (a listener whose backlog is
 * full drops the SYNs) leaves time for the next one, as in Go, whether
 * the deadline is the dial's own or its context's.  "two.loom.test"
 * resolves to 127.0.0.1, where nothing answers, then ::1. */
static void dial_share_main(void *arg) {
  (void)arg;
  loom_listener *full, *good;
  char addr[128];
  loom_listen_opts lo = {.backlog = 1};
  CHECK_OK(loom_listen_with(&full, "tcp4", "127.0.0.1:0", &lo));
  CHECK_OK(loom_listener_addr(full, addr, sizeof addr));
  const char *port = strrchr(addr, ':') + 1;
  char a6[64], two[64];
  snprintf(a6, sizeof a6, "[::1]:%s", port);
  snprintf(two, sizeof two, "two.loom.test:%s", port);
  CHECK_OK(loom_listen(&good, "tcp6", a6));
  loom_conn *held[64], *c;
  int nheld = 0, timed_out = 0;
  for (int i = 0; i < 64 && !timed_out; i++) {
    loom_dial_opts o = {.deadline = loom_now() + 200 * CHECK_MS};
    int r = loom_dial_with(&c, "tcp4", addr, &o);
    if (r == 0)
      held[nheld++] = c;
    else if (r == -ETIMEDOUT)
      timed_out = 1;
    else
      CHECK_FAIL("dial: %s", loom_strerror(r));
  }
  CHECKF(timed_out, "%d dials to a full backlog all connected", nheld);
  for (int round = 0; round < 2; round++) {
    /* 4 s over two addresses: 2 s for 127.0.0.1, the rest for ::1. */
    int64_t at = loom_now() + 4000 * CHECK_MS;
    loom_ctx *ctx = NULL;
    loom_dial_opts o = {.deadline = at};
    if (round == 1) {
      CHECK_OK(loom_ctx_with_deadline(&ctx, loom_ctx_background(), at));
      o = (loom_dial_opts){.ctx = ctx};
    }
    int r = loom_dial_with(&c, "tcp", two, &o);
    CHECKF(r == 0, "round %d: dial %s: %s", round, two, loom_err_name(r));
    char peer[128];
    CHECK_OK(loom_conn_remote_addr(c, peer, sizeof peer));
    CHECK_STREQ(peer, a6);
    loom_conn *s;
    CHECK_OK(loom_accept(good, &s));
    CHECK_OK(loom_close(s));
    CHECK_OK(loom_close(c));
    if (ctx != NULL)
      loom_ctx_release(ctx);
  }
  for (int i = 0; i < nheld; i++)
    CHECK_OK(loom_close(held[i]));
  CHECK_OK(loom_listener_close(full));
  CHECK_OK(loom_listener_close(good));
}

TEST(dial_gives_each_address_its_share_of_the_deadline) {
  check_run(dial_share_main, NULL, 2);
}

/* ------------------------------------------------------------------ */
/* Close while another coroutine is blocked reading.                    */

static atomic_int blocked_result = 1;
static void blocked_reader(void *arg) {
  char b[16];
  ssize_t r = loom_read(arg, b, sizeof b);
  atomic_store(&blocked_result, (int)r);
}

static atomic_int one_accept_result = 1;
static void one_accept(void *arg) {
  loom_conn *c;
  atomic_store(&one_accept_result, loom_accept(arg, &c));
}

static void close_main(void *arg) {
  (void)arg;
  loom_listener *l = start_echo("tcp", "127.0.0.1:0");
  loom_conn *c;
  CHECK_OK(loom_dial(&c, "tcp", echo_addr));
  CHECK_OK(loom_go(blocked_reader, c));
  loom_sleep(20 * CHECK_MS);
  CHECK_EQ(atomic_load(&blocked_result), 1); /* still blocked */
  CHECK_OK(loom_close(c));
  while (atomic_load(&blocked_result) == 1)
    loom_sleep(CHECK_MS);
  CHECK_EQ(atomic_load(&blocked_result), LOOM_ECLOSED);
  stop_echo(l);
  /* A listener closed under a blocked accept: LOOM_ECLOSED. */
  loom_listener *l2;
  CHECK_OK(loom_listen(&l2, "tcp", "127.0.0.1:0"));
  char addr2[128];
  CHECK_OK(loom_listener_addr(l2, addr2, sizeof addr2));
  CHECK_OK(loom_go(one_accept, l2));
  loom_sleep(20 * CHECK_MS); /* parked in its only accept */
  CHECK_OK(loom_listener_close(l2));
  /* The close returns once the descriptor is closed (as Go's): the port
   * is free at once, though the accept it woke may not have run yet. */
  CHECK_OK(loom_listen(&l2, "tcp", addr2));
  while (atomic_load(&one_accept_result) == 1)
    loom_sleep(CHECK_MS);
  CHECK_EQ(atomic_load(&one_accept_result), LOOM_ECLOSED);
  CHECK_OK(loom_listener_close(l2));
}

TEST(close_wakes_blocked_reader) { check_run(close_main, NULL, 2); }


/* ------------------------------------------------------------------ */
/* Half-close: the peer shuts its writing side; we still deliver all.   */

static void upper_server(void *arg) {
  loom_listener *l = arg;
  loom_conn *c;
  CHECK_OK(loom_accept(l, &c));
  /* Read to end of stream, then answer with everything upper-cased. */
  size_t cap = 1 << 20, len = 0;
  char *all = malloc(cap);
  for (;;) {
    ssize_t n = loom_read(c, all + len, cap - len);
    CHECK_GE(n, 0);
    if (n == 0)
      break;
    len += (size_t)n;
  }
  for (size_t i = 0; i < len; i++)
    all[i] = (char)(all[i] - 32);
  CHECK_EQ(loom_write(c, all, len), (ssize_t)len);
  CHECK_OK(loom_close(c));
  free(all);
}

static void half_main(void *arg) {
  (void)arg;
  loom_listener *l;
  char addr[128];
  CHECK_OK(loom_listen(&l, "tcp", "127.0.0.1:0"));
  CHECK_OK(loom_listener_addr(l, addr, sizeof addr));
  CHECK_OK(loom_go(upper_server, l));
  loom_conn *c;
  CHECK_OK(loom_dial(&c, "tcp", addr));
  static char msg[300000];
  memset(msg, 'q', sizeof msg);
  CHECK_EQ(loom_write(c, msg, sizeof msg), (ssize_t)sizeof msg);
  CHECK_OK(loom_shutdown(c, SHUT_WR));
  size_t got = 0;
  static char back[sizeof msg];
  for (;;) {
    ssize_t n = loom_read(c, back + got, sizeof back - got + 1);
    CHECK_GE(n, 0);
    if (n == 0)
      break;
    got += (size_t)n;
  }
  CHECK_EQ(got, sizeof msg);
  for (size_t i = 0; i < got; i++)
    CHECK_EQ(back[i], 'Q');
  CHECK_OK(loom_close(c));
  CHECK_OK(loom_listener_close(l));
}

TEST(half_close_delivers_everything) { check_run(half_main, NULL, 2); }

/* ------------------------------------------------------------------ */
/* Short reads.  After a read that returned less than asked, the next one
 * waits for readiness before calling read() (conn.c).  Two short reads
 * leave data behind, and no new event will come for it: one that stops
 * at the peer's FIN and one that stops at the urgent mark.  On one P the
 * peer's writes land while nobody polls, so the reader is woken by a
 * single event that carried everything; its second read must still see
 * what is left.                                                         */

static loom_conn *short_srv;
static atomic_int short_step;
static char short_got[2][8];
static ssize_t short_n[2];
static int64_t short_took; /* the second read */

static void short_reader(void *arg) {
  (void)arg;
  short_n[0] = loom_read(short_srv, short_got[0], sizeof short_got[0]);
  /* Waiting for an event that will not come ends at this deadline (and
   * then the read finds the data): a wait, not a hang, but a bug. */
  int64_t t0 = loom_now();
  CHECK_OK(loom_set_read_deadline(short_srv, t0 + 1000 * CHECK_MS));
  short_n[1] = loom_read(short_srv, short_got[1], sizeof short_got[1]);
  short_took = loom_now() - t0;
  atomic_store(&short_step, 1);
}

static void short_pair(loom_listener *l, const char *addr, loom_conn **c) {
  CHECK_OK(loom_dial(c, "tcp", addr));
  CHECK_OK(loom_accept(l, &short_srv));
  atomic_store(&short_step, 0);
  memset(short_got, 0, sizeof short_got);
  CHECK_OK(loom_go(short_reader, NULL));
  loom_sleep(2 * CHECK_MS); /* the reader parks in its first read */
}

static void short_wait(void) {
  while (!atomic_load(&short_step))
    loom_sleep(CHECK_MS);
  CHECK_OK(loom_close(short_srv));
}

static void short_main(void *arg) {
  (void)arg;
  loom_listener *l;
  char addr[128];
  CHECK_OK(loom_listen(&l, "tcp", "127.0.0.1:0"));
  CHECK_OK(loom_listener_addr(l, addr, sizeof addr));
  for (int i = 0; i < 10; i++) {
    loom_conn *c;
    /* Data and FIN back to back: "abc", then end of stream. */
    short_pair(l, addr, &c);
    CHECK_EQ(loom_write(c, "abc", 3), 3);
    CHECK_OK(loom_shutdown(c, SHUT_WR));
    short_wait();
    CHECK_EQ(short_n[0], 3);
    CHECKF(short_n[1] == 0, "trial %d: after \"abc\" and the FIN, the second read gave %zd", i,
           short_n[1]);
    CHECKF(short_took < 500 * CHECK_MS, "trial %d: the EOF after a short read took %.0f ms", i,
           short_took / 1e6);
    CHECK_OK(loom_close(c));

    /* "ab", an urgent "X" (out of band), "cd": the first read stops at
     * the urgent mark, the second reads past it. */
    short_pair(l, addr, &c);
    int fd = loom_conn_fd(c);
    CHECK_EQ(send(fd, "ab", 2, 0), 2);
    CHECK_EQ(send(fd, "X", 1, MSG_OOB), 1);
    CHECK_EQ(send(fd, "cd", 2, 0), 2);
    short_wait();
    CHECK_EQ(short_n[0], 2);
    CHECK(memcmp(short_got[0], "ab", 2) == 0);
    CHECKF(short_n[1] == 2, "trial %d: after the urgent mark the second read gave %zd", i,
           short_n[1]);
    CHECK(memcmp(short_got[1], "cd", 2) == 0);
    CHECKF(short_took < 500 * CHECK_MS,
           "trial %d: the data after the urgent mark took %.0f ms", i, short_took / 1e6);
    CHECK_OK(loom_close(c));
  }
  CHECK_OK(loom_listener_close(l));
}

TEST(short_read_before_fin_or_urgent_mark) { check_run(short_main, NULL, 1); }

/* A dialed connection saves the read that would find nothing, as an
 * accepted one does: after a short read the next waits for the poller's
 * event first.  A socket is registered before connect(), and epoll
 * reports a socket that was never connected as hung up (EPOLLHUP alone);
 * taken for the peer's hang-up, that made every read of a dialed
 * connection go first and find EAGAIN.  read(2) is wrapped to count the
 * EAGAINs on the watched descriptor.  The peer's FIN after a short read
 * is still seen at once. */
static atomic_int read_watch_fd = -1, read_eagains;
ssize_t read(int fd, void *buf, size_t n) {
  typedef ssize_t (*read_fn)(int, void *, size_t);
  static _Atomic(read_fn) real_once;
  read_fn real = atomic_load(&real_once);
  if (real == NULL) {
    *(void **)&real = dlsym(RTLD_NEXT, "read");
    atomic_store(&real_once, real);
  }
  ssize_t r = real(fd, buf, n);
  if (r < 0 && errno == EAGAIN && fd == atomic_load(&read_watch_fd))
    atomic_fetch_add(&read_eagains, 1);
  return r;
}

enum { WF_ROUNDS = 200 };
static void wf_echo(void *arg) {
  loom_conn *s = arg;
  char b[64];
  for (int i = 0; i < WF_ROUNDS; i++) {
    CHECK_EQ(loom_read(s, b, sizeof b), (ssize_t)sizeof b);
    loom_sleep(CHECK_MS / 10); /* the client reads before the answer */
    CHECK_EQ(loom_write(s, b, sizeof b), (ssize_t)sizeof b);
  }
  CHECK_EQ(loom_read(s, b, 1), 1); /* the last echo has been read */
  CHECK_EQ(loom_write(s, "abc", 3), 3);
  CHECK_OK(loom_shutdown(s, SHUT_WR));
}

static void pair(loom_listener **l, loom_conn **c, loom_conn **s);

static void wait_first_main(void *arg) {
  (void)arg;
  loom_listener *l;
  loom_conn *c, *s;
  pair(&l, &c, &s);
  CHECK_OK(loom_go(wf_echo, s));
  atomic_store(&read_watch_fd, loom_conn_fd(c));
  char b[4096];
  memset(b, 'q', 64);
  for (int i = 0; i < WF_ROUNDS; i++) {
    CHECK_EQ(loom_write(c, b, 64), 64);
    CHECK_EQ(loom_read(c, b, sizeof b), 64); /* short: the queue is empty */
  }
  int eagains = atomic_load(&read_eagains);
  CHECK_EQ(loom_write(c, "x", 1), 1);
  CHECK_OK(loom_set_read_deadline(c, loom_now() + 2000 * CHECK_MS));
  ssize_t n = 0, r;
  while ((r = loom_read(c, b, sizeof b)) > 0)
    n += r;
  CHECK_EQ(r, 0); /* the FIN after "abc", before the deadline */
  CHECK_EQ(n, 3);
  atomic_store(&read_watch_fd, -1);
  printf("%d of %d reads of a dialed connection found nothing\n", eagains,
         WF_ROUNDS);
  CHECKF(eagains < WF_ROUNDS / 10, "%d of %d reads found EAGAIN", eagains,
         WF_ROUNDS);
  CHECK_OK(loom_close(c));
  CHECK_OK(loom_close(s));
  CHECK_OK(loom_listener_close(l));
}
TEST(dialed_connection_reads_wait_first) {
  check_run(wait_first_main, NULL, 2);
}

/* ------------------------------------------------------------------ */
/* A read of no bytes waits for readability and consumes nothing: on a
 * fresh connection (the peek), after a short read (the poller's event),
 * until a deadline, at end of stream, under a close and under a cancel. */

static loom_conn *zr_srv;
static atomic_int zr_step;
static ssize_t zr_got;

static void zr_waiter(void *arg) {
  (void)arg;
  zr_got = loom_read(zr_srv, NULL, 0);
  atomic_store(&zr_step, 1);
}

/* Start zr_waiter, see it still parked after a while, and return. */
static void zr_parked(void) {
  atomic_store(&zr_step, 0);
  CHECK_OK(loom_go(zr_waiter, NULL));
  loom_sleep(20 * CHECK_MS);
  CHECKF(!atomic_load(&zr_step), "a read of no bytes returned %zd with nothing to read",
         zr_got);
}

static void zr_done(ssize_t want) {
  for (int i = 0; i < 1000 && !atomic_load(&zr_step); i++)
    loom_sleep(CHECK_MS);
  CHECK(atomic_load(&zr_step));
  CHECKF(zr_got == want, "a read of no bytes gave %s, not %s", loom_strerror((int)zr_got),
         loom_strerror((int)want));
}

static void zero_read_main(void *arg) {
  (void)arg;
  loom_listener *l;
  char addr[128], b[64];
  CHECK_OK(loom_listen(&l, "tcp", "127.0.0.1:0"));
  CHECK_OK(loom_listener_addr(l, addr, sizeof addr));
  loom_conn *c;
  CHECK_OK(loom_dial(&c, "tcp", addr));
  CHECK_OK(loom_accept(l, &zr_srv));

  /* Readiness the poller recorded while nobody waited announced bytes
   * that the next read takes: after that read, it is not new input. */
  CHECK_EQ(loom_write(c, "ab", 2), 2);
  loom_sleep(20 * CHECK_MS); /* the event comes; nobody waits */
  CHECK_EQ(loom_read(zr_srv, b, sizeof b), 2);
  CHECK_OK(loom_set_read_deadline(zr_srv, loom_now() + 30 * CHECK_MS));
  CHECKF(loom_read(zr_srv, NULL, 0) == -ETIMEDOUT,
         "a read of no bytes took the event of bytes already read for new input");
  CHECK_OK(loom_set_read_deadline(zr_srv, 0));

  /* Nothing pending: it parks until the peer writes. */
  zr_parked();
  CHECK_EQ(loom_write(c, "hello", 5), 5);
  zr_done(0);
  /* Nothing was consumed, and ready stays ready. */
  CHECK_EQ(loom_read(zr_srv, NULL, 0), 0);
  CHECK_EQ(loom_read(zr_srv, b, sizeof b), 5); /* short: drained */
  CHECK(memcmp(b, "hello", 5) == 0);

  /* After the short read: the event path.  Parks again. */
  zr_parked();
  CHECK_EQ(loom_write(c, "world!", 6), 6);
  zr_done(0);
  CHECK_EQ(loom_read(zr_srv, b, sizeof b), 6);
  CHECK(memcmp(b, "world!", 6) == 0);

  /* A deadline ends it, and moving the deadline makes it usable again. */
  CHECK_OK(loom_set_read_deadline(zr_srv, loom_now() + 30 * CHECK_MS));
  CHECK_EQ(loom_read(zr_srv, NULL, 0), -ETIMEDOUT);
  CHECK_OK(loom_set_read_deadline(zr_srv, 0));
  CHECK_EQ(loom_write(c, "x", 1), 1);
  CHECK_EQ(loom_read(zr_srv, NULL, 0), 0);
  CHECK_EQ(loom_read(zr_srv, b, sizeof b), 1);

  /* A cancelled context ends it with the context's reason. */
  loom_ctx *ctx;
  CHECK_OK(loom_ctx_with_timeout(&ctx, loom_ctx_background(), 30 * CHECK_MS));
  CHECK_EQ(loom_read_ctx(zr_srv, NULL, 0, ctx), -ETIMEDOUT);
  loom_ctx_cancel(ctx);
  loom_ctx_release(ctx);
  CHECK_OK(loom_set_read_deadline(zr_srv, 0));

  /* End of stream is readable: the wait returns, the read says EOF. */
  zr_parked();
  CHECK_OK(loom_shutdown(c, SHUT_WR));
  zr_done(0);
  CHECK_EQ(loom_read(zr_srv, b, sizeof b), 0);
  CHECK_OK(loom_close(c));
  CHECK_OK(loom_close(zr_srv));

  /* A close from another coroutine wakes it with LOOM_ECLOSED. */
  CHECK_OK(loom_dial(&c, "tcp", addr));
  CHECK_OK(loom_accept(l, &zr_srv));
  zr_parked();
  CHECK_OK(loom_close(zr_srv));
  zr_done(LOOM_ECLOSED);
  CHECK_OK(loom_close(c));
  CHECK_OK(loom_listener_close(l));
}

TEST(zero_length_read_waits_for_data) { check_run(zero_read_main, NULL, 2); }

/* ------------------------------------------------------------------ */
/* A peer that resets mid-write: an error, no SIGPIPE.                  */

static void resetter(void *arg) {
  loom_listener *l = arg;
  loom_conn *c;
  CHECK_OK(loom_accept(l, &c));
  char b[1024];
  CHECK_GT(loom_read(c, b, sizeof b), 0); /* the writer has started */
  struct linger lg = {1, 0};               /* close sends RST */
  CHECK_EQ(setsockopt(loom_conn_fd(c), SOL_SOCKET, SO_LINGER, &lg, sizeof lg),
           0);
  CHECK_OK(loom_close(c));
}

static void reset_main(void *arg) {
  (void)arg;
  loom_listener *l;
  char addr[128];
  CHECK_OK(loom_listen(&l, "tcp", "127.0.0.1:0"));
  CHECK_OK(loom_listener_addr(l, addr, sizeof addr));
  CHECK_OK(loom_go(resetter, l));
  loom_conn *c;
  CHECK_OK(loom_dial(&c, "tcp", addr));
  static char chunk[1 << 16];
  ssize_t r;
  int i = 0;
  while ((r = loom_write(c, chunk, sizeof chunk)) > 0)
    CHECKF(++i < 10000, "writes to a reset peer keep succeeding");
  CHECKF(r == -ECONNRESET || r == -EPIPE, "got %s", loom_strerror((int)r));
  CHECK_OK(loom_close(c));
  CHECK_OK(loom_listener_close(l));
}

TEST(peer_reset_mid_write) {
  /* SIGPIPE at its default (terminate): a raised one would kill us. */
  signal(SIGPIPE, SIG_DFL);
  check_run(reset_main, NULL, 2);
}

/* ------------------------------------------------------------------ */
/* EMFILE: the accept loop backs off instead of spinning, reports once, */
/* and accepts again when descriptors come back.                        */

static atomic_int emfile_logs, emfile_accepted;
static void emfile_log(void *arg, const char *msg) {
  (void)arg;
  if (strstr(msg, "accept:") != NULL && strstr(msg, "open files") != NULL)
    atomic_fetch_add(&emfile_logs, 1);
}

static void emfile_acceptor(void *arg) {
  loom_listener *l = arg;
  loom_conn *c;
  CHECK_OK(loom_accept(l, &c));
  atomic_store(&emfile_accepted, 1);
  CHECK_OK(loom_close(c));
}

static int64_t emfile_cpu;
static void emfile_main(void *arg) {
  (void)arg;
  loom_listener *l;
  char addr[128];
  CHECK_OK(loom_listen(&l, "tcp", "127.0.0.1:0"));
  CHECK_OK(loom_listener_addr(l, addr, sizeof addr));
  loom_conn *c;
  CHECK_OK(loom_dial(&c, "tcp", addr)); /* queued in the backlog */
  /* Use up every descriptor. */
  static int fillers[30000];
  int nf = 0;
  int fd;
  while (nf < 30000 && (fd = dup(0)) >= 0)
    fillers[nf++] = fd;
  CHECK_EQ(errno, EMFILE);
  CHECK_OK(loom_go(emfile_acceptor, l));
  loom_sleep(50 * CHECK_MS);
  int64_t c0 = check_cpu_ns();
  loom_sleep(300 * CHECK_MS);
  emfile_cpu = check_cpu_ns() - c0;
  CHECK(!atomic_load(&emfile_accepted));
  for (int i = 0; i < nf; i++)
    close(fillers[i]);
  while (!atomic_load(&emfile_accepted))
    loom_sleep(5 * CHECK_MS);
  CHECK_OK(loom_close(c));
  CHECK_OK(loom_listener_close(l));
}

TEST(emfile_backs_off) {
  struct rlimit rl;
  CHECK_EQ(getrlimit(RLIMIT_NOFILE, &rl), 0);
  rl.rlim_cur = 256; /* a small table fills quickly */
  CHECK_EQ(setrlimit(RLIMIT_NOFILE, &rl), 0);
  loom_config cfg;
  loom_config_init(&cfg);
  cfg.procs = 2;
  cfg.log = emfile_log;
  CHECK_OK(loom_run(emfile_main, NULL, &cfg));
  printf("300 ms of EMFILE: %.1f ms of CPU, %d report(s)\n", emfile_cpu / 1e6,
         atomic_load(&emfile_logs));
  CHECKF(emfile_cpu < 60 * CHECK_MS, "accept spun: %.1f ms of CPU in 300 ms",
         emfile_cpu / 1e6);
  CHECK_EQ(atomic_load(&emfile_logs), 1);
}

/* ------------------------------------------------------------------ */
/* Unix stream (a path and the abstract namespace) and IPv6.            */

static void unix_main(void *arg) {
  (void)arg;
  char path[64];
  snprintf(path, sizeof path, "/tmp/loom-test-%d.sock", (int)getpid());
  unlink(path);
  loom_listener *l = start_echo("unix", path);
  CHECK_STREQ(echo_addr, path);
  echo_roundtrip("unix", path, 200000, 1);
  stop_echo(l);
  loom_sleep(5 * CHECK_MS);
  CHECK(access(path, F_OK) != 0); /* the socket file is gone */

  char abs[64];
  snprintf(abs, sizeof abs, "@loom-test-%d", (int)getpid());
  l = start_echo("unix", abs);
  CHECK_STREQ(echo_addr, abs);
  echo_roundtrip("unix", abs, 50000, 2);
  stop_echo(l);
}

TEST(unix_path_and_abstract) { check_run(unix_main, NULL, 2); }

static void v6_main(void *arg) {
  (void)arg;
  loom_listener *l = start_echo("tcp6", "[::1]:0");
  CHECK(strncmp(echo_addr, "[::1]:", 6) == 0);
  echo_roundtrip("tcp6", echo_addr, 100000, 3);
  echo_roundtrip("tcp", echo_addr, 1000, 4);
  stop_echo(l);
  /* "tcp" on ":port" takes IPv4 and IPv6. */
  l = start_echo("tcp", ":0");
  const char *port = strrchr(echo_addr, ':') + 1;
  char a4[64], a6[64];
  snprintf(a4, sizeof a4, "127.0.0.1:%s", port);
  snprintf(a6, sizeof a6, "[::1]:%s", port);
  echo_roundtrip("tcp", a4, 1000, 5);
  echo_roundtrip("tcp", a6, 1000, 6);
  char lh[64];
  snprintf(lh, sizeof lh, "localhost:%s", port);
  echo_roundtrip("tcp", lh, 1000, 7); /* a name, through the resolver */
  stop_echo(l);
}

TEST(ipv6_and_dual_stack) { check_run(v6_main, NULL, 2); }

/* ------------------------------------------------------------------ */
/* Bad input.                                                           */

static void bad_main(void *arg) {
  (void)arg;
  loom_listener *l;
  loom_conn *c;
  CHECK_ERR(loom_listen(&l, "bogus", ":0"), LOOM_ENETWORK);
  CHECK_ERR(loom_listen(&l, "tcp", "127.0.0.1"), LOOM_EBADADDR);
  CHECK_ERR(loom_listen(&l, "tcp", "::1:80"), LOOM_EBADADDR);
  CHECK_ERR(loom_listen(&l, "tcp", "127.0.0.1:70000"), LOOM_EBADADDR);
  CHECK_ERR(loom_listen(&l, "tcp", "127.0.0.1:8x"), LOOM_EBADADDR);
  CHECK_ERR(loom_listen(&l, "tcp", "[::1:80"), LOOM_EBADADDR);
  CHECK_ERR(loom_listen(&l, "tcp", "999.1.1.1:80"), LOOM_EBADADDR);
  CHECK_ERR(loom_listen(&l, "unix", ""), LOOM_EBADADDR);
  /* Zones that name no interface (loom/net.h). */
  CHECK_ERR(loom_listen(&l, "tcp6", "[::1%]:0"), LOOM_EBADADDR);
  CHECK_ERR(loom_dial(&c, "tcp6", "[fe80::1%no-such-if]:80"), LOOM_EBADADDR);
  CHECK_ERR(loom_dial(&c, "tcp", "no-such-host.invalid:80") < 0, 1);
  CHECK_ERR(loom_read(NULL, NULL, 0), -EINVAL);
  CHECK_ERR(loom_close(NULL), -EINVAL);
  /* A listener address in use. */
  char addr[128];
  CHECK_OK(loom_listen(&l, "tcp", "127.0.0.1:0"));
  CHECK_OK(loom_listener_addr(l, addr, sizeof addr));
  loom_listener *l2;
  CHECK_ERR(loom_listen(&l2, "tcp", addr), -EADDRINUSE);
  /* loom_fd_wait on a socket loom polls already (loom/fd.h). */
  loom_conn *s;
  CHECK_OK(loom_dial(&c, "tcp", addr));
  CHECK_OK(loom_accept(l, &s));
  CHECK_ERR(loom_fd_wait(loom_conn_fd(s), LOOM_FD_READ, 0), -EBUSY);
  CHECK_OK(loom_close(c));
  CHECK_OK(loom_close(s));
  CHECK_OK(loom_listener_close(l));
}

TEST(bad_input) {
  loom_conn *c;
  CHECK_ERR(loom_dial(&c, "tcp", "127.0.0.1:1"), LOOM_ENOTCO);
  check_run(bad_main, NULL, 1);
}

/* ------------------------------------------------------------------ */
/* A slow resolver stalls no other coroutine.                            */

/* The test binary's getaddrinfo wraps the C library's: a lookup of
 * "slow.loom.test" takes 300 ms ("slower.loom.test" 3 s), then resolves
 * as "localhost".  It
 * counts its calls, for the tests of what never reaches it. */
static atomic_int gai_calls;
int getaddrinfo(const char *node, const char *service,
                const struct addrinfo *hints, struct addrinfo **res) {
  typedef int (*gai_fn)(const char *, const char *, const struct addrinfo *,
                        struct addrinfo **);
  static _Atomic(gai_fn) real_once; /* lookups run on threads at once */
  gai_fn real = atomic_load(&real_once);
  if (real == NULL) {
    *(void **)&real = dlsym(RTLD_NEXT, "getaddrinfo");
    atomic_store(&real_once, real);
  }
  atomic_fetch_add(&gai_calls, 1);
  if (node != NULL && strcmp(node, "two.loom.test") == 0) {
    /* Two addresses, 127.0.0.1 then ::1: one list after the other (each
     * node is freed on its own by freeaddrinfo). */
    struct addrinfo h = {.ai_socktype = hints ? hints->ai_socktype : 0,
                         .ai_flags = AI_NUMERICHOST};
    struct addrinfo *a, *b;
    int r = real("127.0.0.1", service, &h, &a);
    if (r != 0)
      return r;
    if ((r = real("::1", service, &h, &b)) != 0) {
      freeaddrinfo(a);
      return r;
    }
    struct addrinfo *t = a;
    while (t->ai_next != NULL)
      t = t->ai_next;
    t->ai_next = b;
    *res = a;
    return 0;
  }
  if (node != NULL && strcmp(node, "slow.loom.test") == 0) {
    usleep(300 * 1000);
    node = "localhost";
  }
  if (node != NULL && strcmp(node, "slower.loom.test") == 0) {
    usleep(3000 * 1000);
    node = "localhost";
  }
  return real(node, service, hints, res);
}

static atomic_long slow_ticks;
static atomic_int slow_done;
static void slow_ticker(void *arg) {
  (void)arg;
  while (!atomic_load(&slow_done)) {
    atomic_fetch_add(&slow_ticks, 1);
    loom_sleep(CHECK_MS);
  }
}

static void slow_main(void *arg) {
  (void)arg;
  loom_listener *l = start_echo("tcp4", "127.0.0.1:0");
  const char *port = strrchr(echo_addr, ':') + 1;
  char a[64];
  snprintf(a, sizeof a, "slow.loom.test:%s", port);
  CHECK_OK(loom_go(slow_ticker, NULL));
  loom_sleep(5 * CHECK_MS);
  /* The ticker ticks about once a millisecond while the process runs;
   * time the host froze the process in (check_stalled_ns) it cannot.  A
   * lookup that left it less than 150 ms to run is too short to judge:
   * again (a few times at most). */
  for (int attempt = 1;; attempt++) {
    long t0 = atomic_load(&slow_ticks);
    int64_t s0 = loom_now();
    echo_roundtrip("tcp4", a, 100, 8);
    int64_t s1 = loom_now(), took = s1 - s0;
    long ticks = atomic_load(&slow_ticks) - t0;
    int64_t ran = took - check_stalled_ns(s0, s1);
    printf("lookup took %.0f ms (%.0f ms of it not stalled); the other "
           "coroutine ticked %ld times\n",
           took / 1e6, ran / 1e6, ticks);
    CHECK_GE(took, 300 * CHECK_MS);
    if (ran < 150 * CHECK_MS && attempt < 10)
      continue;
    /* One P: the ticker only runs if the lookup does not hold it. */
    CHECKF(ticks >= 50 && ticks >= ran / (3 * CHECK_MS),
           "only %ld ticks during a 300 ms lookup (%.0f ms of it not stalled)",
           ticks, ran / 1e6);
    break;
  }
  atomic_store(&slow_done, 1);
  stop_echo(l);
}

TEST(slow_dns_stalls_nobody) {
  check_stall_start();
  check_run(slow_main, NULL, 1);
}

/* A dial's deadline and context bound its lookup too: a 3 s lookup
 * does not hold a dial of 50 ms, nor one whose context is cancelled.
 * (The lookups go on, unwaited for, on their own threads.) */
static loom_ctx *slower_ctx;
/* Holds its own reference (ctx.h's ownership note): the dial, ended as
 * the cancel begins, may release the context before it is over. */
static void slower_cancel(void *arg) {
  loom_sleep(30 * CHECK_MS);
  loom_ctx_cancel(arg);
  loom_ctx_unref(arg);
}
static void slower_main(void *arg) {
  (void)arg;
  loom_conn *c;
  int64_t t0 = loom_now();
  loom_dial_opts o = {.deadline = t0 + 50 * CHECK_MS};
  CHECK_ERR(loom_dial_with(&c, "tcp", "slower.loom.test:1", &o), -ETIMEDOUT);
  int64_t took = loom_now() - t0;
  CHECKF(took < 2000 * CHECK_MS, "the dial waited %.0f ms for its lookup",
         took / 1e6);
  CHECK_OK(loom_ctx_with_cancel(&slower_ctx, loom_ctx_background()));
  CHECK_OK(loom_go(slower_cancel, loom_ctx_ref(slower_ctx)));
  t0 = loom_now();
  o = (loom_dial_opts){.ctx = slower_ctx};
  CHECK_ERR(loom_dial_with(&c, "tcp", "slower.loom.test:1", &o), -ECANCELED);
  took = loom_now() - t0;
  CHECKF(took < 2000 * CHECK_MS, "the dial waited %.0f ms for its lookup",
         took / 1e6);
  loom_ctx_release(slower_ctx);
  /* A context with a deadline, the same way. */
  loom_ctx *d;
  CHECK_OK(loom_ctx_with_timeout(&d, loom_ctx_background(), 50 * CHECK_MS));
  o = (loom_dial_opts){.ctx = d};
  t0 = loom_now();
  CHECK_ERR(loom_dial_with(&c, "tcp", "slower.loom.test:1", &o), -ETIMEDOUT);
  CHECK_LT(loom_now() - t0, 2000 * CHECK_MS);
  loom_ctx_release(d);
}
TEST(dial_deadline_and_context_bound_the_lookup) {
  check_run(slower_main, NULL, 2);
}

/* A runtime that stops while a coroutine waits for a lookup abandons
 * that coroutine; the lookup, finishing on its own thread afterwards,
 * leaves no descriptor (nor memory) behind. */
static void abandoned_lookup(void *arg) {
  (void)arg;
  loom_conn *c;
  (void)loom_dial(&c, "tcp", "slow.loom.test:1");
  CHECK_FAIL("the runtime stopped before the lookup ended");
}
static void abandon_lookup_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_go(abandoned_lookup, NULL));
  loom_sleep(50 * CHECK_MS); /* it waits for its lookup (300 ms) */
}
static int open_fds(void) {
  int n = 0;
  DIR *d = opendir("/proc/self/fd");
  CHECK(d != NULL);
  for (struct dirent *e; (e = readdir(d)) != NULL;)
    n += e->d_name[0] != '.';
  closedir(d);
  return n - 1; /* opendir's own */
}
TEST(lookup_abandoned_at_shutdown_leaves_nothing) {
  int fds0 = open_fds();
  check_run(abandon_lookup_main, NULL, 1);
  /* The lookup ends 300 ms after it began: 3 s is plenty. */
  int fds1 = open_fds();
  for (int i = 0; i < 30 && fds1 != fds0; i++) {
    usleep(100 * 1000);
    fds1 = open_fds();
  }
  CHECKF(fds1 == fds0, "%d descriptors after the lookup ended, %d before", fds1,
         fds0);
}

/* ------------------------------------------------------------------ */
/* IPv4 literals: dotted-decimal quads only, as Go's ParseIP.           */

/* inet_aton's other forms (fewer parts, hex, octal, leading zeros), and
 * anything else whose last label is a number.  getaddrinfo would take
 * most of them (it tries inet_aton first), so none may reach it. */
static const char *const v4_refused[] = {
    "127.1",        "0x7f.1",      "0x7f.0.0.1", "0X7F.0.0.1", "0177.0.0.1",
    "127.0.0.01",   "127.000.0.1", "00.0.0.0",   "2130706433", "0x7f000001",
    "0x7f.0x0.0.1", "127.0.0.1.",  "1.2.3.4.5",  "1.2.3",      "256.0.0.1",
    "1.2.3.4.",     "a.1",         "host.0x10",  "1..2.3",     ".1.2.3.4",
    "1.2.3.0x",     "0x",          "01"};
static const char *const v4_accepted[] = {"127.0.0.1", "0.0.0.0",
                                          "255.255.255.255", "10.20.3.40"};
/* Names, not literals: they go to the resolver. */
static const char *const v4_names[] = {"localhost", "a1.example", "1.2.3.com",
                                       "0xfoo",     "123abc",     "x.0a",
                                       "localhost."};

static void v4_literal_main(void *arg) {
  (void)arg;
  loom_listener *l;
  CHECK_OK(loom_listen(&l, "tcp4", "127.0.0.1:0"));
  char addr[64];
  CHECK_OK(loom_listener_addr(l, addr, sizeof addr));
  const char *port = strrchr(addr, ':') + 1;
  int calls = atomic_load(&gai_calls);
  for (size_t i = 0; i < sizeof v4_refused / sizeof *v4_refused; i++) {
    char a[64];
    loom_conn *c;
    snprintf(a, sizeof a, "%s:%s", v4_refused[i], port);
    int r = loom_dial(&c, "tcp", a);
    CHECKF(r == LOOM_EBADADDR, "dial %s: %s", a, loom_err_name(r));
    r = loom_dial(&c, "tcp4", a);
    CHECKF(r == LOOM_EBADADDR, "dial tcp4 %s: %s", a, loom_err_name(r));
  }
  CHECK_EQ(atomic_load(&gai_calls), calls);
  snprintf(addr, sizeof addr, "127.0.0.1:%s", port);
  loom_conn *c, *s;
  CHECK_OK(loom_dial(&c, "tcp", addr));
  CHECK_OK(loom_accept(l, &s));
  CHECK_OK(loom_close(c));
  CHECK_OK(loom_close(s));
  CHECK_OK(loom_listener_close(l));
}

TEST(ipv4_literals_are_dotted_decimal_only) {
  static const char *const nets[] = {"tcp", "tcp4", "udp", "udp4"};
  for (size_t n = 0; n < sizeof nets / sizeof *nets; n++) {
    for (size_t i = 0; i < sizeof v4_refused / sizeof *v4_refused; i++) {
      char a[64], host[256];
      loom__addrs as;
      int family = 0, port = 0;
      snprintf(a, sizeof a, "%s:80", v4_refused[i]);
      int r = loom__parse_addr(nets[n], a, false, &as, host, sizeof host,
                               &family, &port);
      CHECKF(r == LOOM_EBADADDR, "%s %s: %d", nets[n], a, r);
      r = loom__parse_addr(nets[n], a, true, &as, host, sizeof host, &family,
                           &port);
      CHECKF(r == LOOM_EBADADDR, "%s %s (passive): %d", nets[n], a, r);
      struct sockaddr_storage ss;
      socklen_t sl;
      r = loom_resolve_addr(nets[n], a, &ss, &sl);
      CHECKF(r == LOOM_EBADADDR, "resolve %s %s: %s", nets[n], a,
             loom_err_name(r));
    }

    for (size_t i = 0; i < sizeof v4_accepted / sizeof *v4_accepted; i++) {
      char a[64], back[64];
      struct sockaddr_storage ss;
      socklen_t sl;
      snprintf(a, sizeof a, "%s:80", v4_accepted[i]);
      CHECK_OK(loom_resolve_addr(nets[n], a, &ss, &sl));
      CHECK_EQ(ss.ss_family, AF_INET);
      CHECK_OK(
          loom__format_addr((struct sockaddr *)&ss, sl, back, sizeof back));
      CHECK_STREQ(back, a);
    }
    for (size_t i = 0; i < sizeof v4_names / sizeof *v4_names; i++) {
      char a[64], host[256];
      loom__addrs as;
      int family = 0, port = 0;
      snprintf(a, sizeof a, "%s:80", v4_names[i]);
      int r = loom__parse_addr(nets[n], a, false, &as, host, sizeof host,
                               &family, &port);
      CHECKF(r == LOOM__NEED_LOOKUP, "%s %s: %d", nets[n], a, r);
      CHECK_STREQ(host, v4_names[i]);
    }
  }
  CHECK_EQ(atomic_load(&gai_calls), 0);
  /* An IPv4 literal is no IPv6 address, and the other way round. */
  struct sockaddr_storage ss;
  socklen_t sl;
  CHECK_ERR(loom_resolve_addr("tcp6", "127.0.0.1:80", &ss, &sl), LOOM_EBADADDR);
  CHECK_ERR(loom_resolve_addr("udp6", "127.0.0.1:80", &ss, &sl), LOOM_EBADADDR);
  CHECK_ERR(loom_resolve_addr("tcp4", "[::1]:80", &ss, &sl), LOOM_EBADADDR);
  CHECK_ERR(loom_resolve_addr("udp4", "[fe80::1]:80", &ss, &sl), LOOM_EBADADDR);
  CHECK_ERR(loom_resolve_addr("tcp", "[fe80::zz]:80", &ss, &sl), LOOM_EBADADDR);
  CHECK_EQ(atomic_load(&gai_calls), 0);
  /* And through dial, on a coroutine: 0x7f.1 is not 127.0.0.1 to loom. */
  check_run(v4_literal_main, NULL, 1);
}

/* The network names the socket type: a call on the wrong kind is refused
 * before any name is looked up, with the error a literal address gets —
 * not the lookup's, and not after a slow resolver has answered. */
static void wrong_net_main(void *arg) {
  (void)arg;
  loom_conn *c;
  loom_listener *l;
  loom_pconn *p;
  int calls = atomic_load(&gai_calls);
  CHECK_ERR(loom_dial(&c, "udp", "127.0.0.1:1"), LOOM_ENETWORK);
  int r = loom_dial(&c, "udp", "no-such-host.invalid:1");
  CHECKF(r == LOOM_ENETWORK, "dial udp: %s", loom_err_name(r));
  r = loom_listen(&l, "udp", "no-such-host.invalid:0");
  CHECKF(r == LOOM_ENETWORK, "listen udp: %s", loom_err_name(r));
  r = loom_listen_packet(&p, "tcp", "no-such-host.invalid:0");
  CHECKF(r == LOOM_ENETWORK, "listen_packet tcp: %s", loom_err_name(r));
  r = loom_dial_packet(&p, "tcp", "no-such-host.invalid:1");
  CHECKF(r == LOOM_ENETWORK, "dial_packet tcp: %s", loom_err_name(r));
  CHECK_EQ(atomic_load(&gai_calls), calls); /* nothing was looked up */
}
TEST(wrong_network_refused_before_lookup) {
  check_run(wrong_net_main, NULL, 1);
}

/* A dial whose deadline has passed, or whose context is done, starts no
 * lookup thread for a name nobody would wait for. */
static void over_main(void *arg) {
  (void)arg;
  loom_conn *c;
  int calls = atomic_load(&gai_calls);
  loom_dial_opts o = {.deadline = loom_now() - 1};
  CHECK_ERR(loom_dial_with(&c, "tcp", "localhost:1", &o), -ETIMEDOUT);
  loom_ctx *ctx;
  CHECK_OK(loom_ctx_with_cancel(&ctx, loom_ctx_background()));
  loom_ctx_cancel(ctx);
  o = (loom_dial_opts){.ctx = ctx};
  CHECK_ERR(loom_dial_with(&c, "tcp", "localhost:1", &o), -ECANCELED);
  loom_ctx_release(ctx);
  CHECK_EQ(atomic_load(&gai_calls), calls);
}
TEST(dial_already_over_looks_nothing_up) { check_run(over_main, NULL, 1); }

/* ------------------------------------------------------------------ */
/* IPv6 zones: parsed, printed back, and dialed on loopback.            */

/* Parse `a` for `net` as one IPv6 address; its scope id, or fail. */
static uint32_t zone_of(const char *net, const char *a, const char *ip,
                        int port) {
  loom__addrs as;
  char host[256];
  int family = 0, p = 0;
  int r = loom__parse_addr(net, a, false, &as, host, sizeof host, &family, &p);
  CHECKF(r == 0, "%s %s: %s", net, a, loom_err_name(r));
  CHECK_EQ(as.n, 1);
  CHECK_EQ(as.len[0], sizeof(struct sockaddr_in6));
  const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)&as.a[0];
  CHECK_EQ(s6->sin6_family, AF_INET6);
  CHECK_EQ(ntohs(s6->sin6_port), port);
  struct in6_addr want;
  CHECK_EQ(inet_pton(AF_INET6, ip, &want), 1);
  CHECK(memcmp(&s6->sin6_addr, &want, sizeof want) == 0);
  return s6->sin6_scope_id;
}

/* Format `a` as parsed and check the text, then parse that again. */
static void zone_prints(const char *a, const char *want) {
  struct sockaddr_storage ss;
  socklen_t sl;
  CHECK_OK(loom_resolve_addr("tcp6", a, &ss, &sl));
  char text[128];
  CHECK_OK(loom__format_addr((struct sockaddr *)&ss, sl, text, sizeof text));
  CHECK_STREQ(text, want);
  struct sockaddr_storage back;
  socklen_t bl;
  CHECK_OK(loom_resolve_addr("tcp6", text, &back, &bl));
  CHECK_EQ(bl, sl);
  CHECK(memcmp(&back, &ss, sl) == 0);
}

TEST(ipv6_zones_parse_and_print) {
  uint32_t lo = if_nametoindex("lo");
  CHECK(lo != 0);
  char byindex[64];
  snprintf(byindex, sizeof byindex, "[fe80::1%%%u]:80", (unsigned)lo);
  static const char *const nets[] = {"tcp", "tcp6", "udp", "udp6"};
  for (size_t n = 0; n < sizeof nets / sizeof *nets; n++) {
    CHECK_EQ(zone_of(nets[n], "[fe80::1%lo]:80", "fe80::1", 80), lo);
    CHECK_EQ(zone_of(nets[n], byindex, "fe80::1", 80), lo);
    CHECK_EQ(zone_of(nets[n], "[::1%lo]:0", "::1", 0), lo);
    CHECK_EQ(zone_of(nets[n], "[ff02::1%lo]:9", "ff02::1", 9), lo);
    CHECK_EQ(zone_of(nets[n], "[::ffff:127.0.0.1%lo]:1", "::ffff:127.0.0.1", 1),
             lo);
    /* A number no interface has is taken as it is (the kernel judges). */
    CHECK_EQ(zone_of(nets[n], "[fe80::1%4294967295]:80", "fe80::1", 80),
             4294967295u);
    CHECK_EQ(zone_of(nets[n], "[fe80::1%0]:80", "fe80::1", 80), 0);
    CHECK_EQ(zone_of(nets[n], "[fe80::1%00001]:80", "fe80::1", 80), 1);
  }
  /* Printed by name, or by number when no interface has the index; and
   * what is printed parses back to the same address. */
  zone_prints("[fe80::1%lo]:80", "[fe80::1%lo]:80");
  zone_prints(byindex, "[fe80::1%lo]:80");
  zone_prints("[FE80::0:1%lo]:443", "[fe80::1%lo]:443");
  zone_prints("[fe80::1%4294967295]:80", "[fe80::1%4294967295]:80");
  zone_prints("[fe80::1%0]:80", "[fe80::1]:80");
  zone_prints("[::1%lo]:7", "[::1%lo]:7");
  struct sockaddr_in6 s6 = {
      .sin6_family = AF_INET6, .sin6_port = htons(8080), .sin6_scope_id = lo};
  CHECK_EQ(inet_pton(AF_INET6, "fe80::abcd", &s6.sin6_addr), 1);
  char text[128];
  CHECK_OK(
      loom__format_addr((struct sockaddr *)&s6, sizeof s6, text, sizeof text));
  CHECK_STREQ(text, "[fe80::abcd%lo]:8080");
  /* The longest an address prints (39 bytes), with a 10-digit zone. */
  s6.sin6_scope_id = 4000000000u;
  memset(&s6.sin6_addr, 0xff, sizeof s6.sin6_addr);
  CHECK_OK(
      loom__format_addr((struct sockaddr *)&s6, sizeof s6, text, sizeof text));
  CHECK_STREQ(text,
              "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%4000000000]:8080");
  /* Refused, and never looked up. */
  static const char *const bad[] = {
      "[fe80::1%]:80",                         /* empty zone */
      "[fe80::1%no-such-if]:80",               /* no such interface */
      "[fe80::1%aaaaaaaaaaaaaaaaaaaaaaaa]:80", /* longer than a name */
      "[fe80::1%4294967296]:80",               /* more than 32 bits */
      "[fe80::1%-1]:80",
      "[fe80::1%+1]:80",
      "[fe80::1%1x]:80",
      "[fe80::1%lo%lo]:80",
      "[fe80::1%lo ]:80",
      "[%lo]:80",
      "[fe80::1%lo]:",
      "fe80::1%lo:80",     /* an IPv6 address needs [] */
      "[127.0.0.1%lo]:80", /* a zone on IPv4 */
      "127.0.0.1%lo:80",
      "[127.0.0.1%1]:80",
      "localhost%lo:80", /* a zone on a name */
      "[localhost%lo]:80",
      "[fe80::zz%lo]:80",
      "[0123456789012345678901234567890123456789012345678%lo]:80"};
  int calls = atomic_load(&gai_calls);
  for (size_t n = 0; n < sizeof nets / sizeof *nets; n++)
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
      struct sockaddr_storage ss;
      socklen_t sl;
      int r = loom_resolve_addr(nets[n], bad[i], &ss, &sl);
      CHECKF(r == LOOM_EBADADDR, "%s %s: %s", nets[n], bad[i],
             loom_err_name(r));
    }
  /* A zoned IPv6 literal is no address for tcp4 or udp4. */
  struct sockaddr_storage ss;
  socklen_t sl;
  CHECK_ERR(loom_resolve_addr("tcp4", "[fe80::1%lo]:80", &ss, &sl),
            LOOM_EBADADDR);
  CHECK_ERR(loom_resolve_addr("udp4", "[::1%lo]:80", &ss, &sl), LOOM_EBADADDR);
  CHECK_EQ(atomic_load(&gai_calls), calls);
}

static void zone_loop_main(void *arg) {
  (void)arg;
  /* Linux ignores a zone on ::1 (it needs none): the listener works and
   * its address reads without one. */
  loom_listener *l = start_echo("tcp6", "[::1%lo]:0");
  CHECKF(strncmp(echo_addr, "[::1]:", 6) == 0, "%s", echo_addr);
  const char *port = strrchr(echo_addr, ':') + 1;
  char a[64];
  snprintf(a, sizeof a, "[::1%%lo]:%s", port);
  echo_roundtrip("tcp", a, 1000, 11);
  echo_roundtrip("tcp6", a, 1000, 12);
  snprintf(a, sizeof a, "[::1%%%u]:%s", if_nametoindex("lo"), port);
  echo_roundtrip("tcp6", a, 1000, 13);
  /* The dialed address is the remote address, zone and all, and it
   * dials again as it reads. */
  snprintf(a, sizeof a, "[::1%%lo]:%s", port);
  loom_conn *c;
  CHECK_OK(loom_dial(&c, "tcp6", a));
  char remote[128], local[128];
  CHECK_OK(loom_conn_remote_addr(c, remote, sizeof remote));
  CHECK_STREQ(remote, a);
  CHECK_OK(loom_conn_local_addr(c, local, sizeof local));
  CHECKF(strncmp(local, "[::1]:", 6) == 0, "%s", local);
  CHECK_OK(loom_close(c));
  echo_roundtrip("tcp6", remote, 1000, 14);
  stop_echo(l);

  /* UDP: bind, connect and send to a zoned ::1. */
  loom_pconn *srv, *cli;
  CHECK_OK(loom_listen_packet(&srv, "udp6", "[::1%lo]:0"));
  char sa[128];
  CHECK_OK(loom_pconn_local_addr(srv, sa, sizeof sa));
  CHECKF(strncmp(sa, "[::1]:", 6) == 0, "%s", sa);
  snprintf(a, sizeof a, "[::1%%lo]:%s", strrchr(sa, ':') + 1);
  CHECK_OK(loom_dial_packet(&cli, "udp", a));
  CHECK_OK(loom_pconn_remote_addr(cli, remote, sizeof remote));
  CHECK_EQ(loom_pconn_write(cli, "ping", 4), 4);
  char buf[16];
  struct sockaddr_storage from;
  socklen_t fromlen = sizeof from;
  CHECK_EQ(loom_pconn_read_from(srv, buf, sizeof buf, &from, &fromlen), 4);
  CHECK(memcmp(buf, "ping", 4) == 0);
  CHECK_EQ(
      loom_pconn_write_to(srv, "pong", 4, (struct sockaddr *)&from, fromlen),
      4);
  CHECK_EQ(loom_pconn_read(cli, buf, sizeof buf), 4);
  CHECK(memcmp(buf, "pong", 4) == 0);
  struct sockaddr_storage to;
  socklen_t tolen;
  CHECK_OK(loom_resolve_addr("udp6", a, &to, &tolen));
  CHECK_EQ(((struct sockaddr_in6 *)&to)->sin6_scope_id, if_nametoindex("lo"));
  CHECK_EQ(loom_pconn_write_to(srv, "zone", 4, (struct sockaddr *)&to, tolen),
           4);
  CHECK_EQ(loom_pconn_read_from(srv, buf, sizeof buf, NULL, NULL), 4);
  CHECK(memcmp(buf, "zone", 4) == 0);
  CHECK_OK(loom_pconn_close(cli));
  CHECK_OK(loom_pconn_close(srv));

  /* Link-local addresses are the kernel's to judge: lo has none, and
   * one without a zone is refused before any packet could leave. */
  CHECK_ERR(loom_listen(&l, "tcp6", "[fe80::1%lo]:0"), -EADDRNOTAVAIL);
  CHECK_ERR(loom_listen(&l, "tcp6", "[fe80::1]:0"), -EINVAL);
  CHECK_ERR(loom_dial(&c, "tcp6", "[fe80::1]:9"), -EINVAL);
}

TEST(ipv6_zone_dial_and_listen_on_loopback) {
  check_run(zone_loop_main, NULL, 2);
}

/* ------------------------------------------------------------------ */
/* Packet sockets: every rule of loom/net.h, UDP and unixgram.          */

static void udp_echo(void *arg) {
  loom_pconn *pc = arg;
  for (;;) {
    char buf[2048];
    struct sockaddr_storage from;
    socklen_t fl = sizeof from;
    ssize_t n = loom_pconn_read_from(pc, buf, sizeof buf, &from, &fl);
    if (n < 0)
      return; /* closed */
    CHECK_EQ(loom_pconn_write_to(pc, buf, (size_t)n, (struct sockaddr *)&from,
                                 fl),
             n);
  }
}

static void udp_rules(const char *network, const char *listen_addr,
                      const char *dial_addr) {
  loom_pconn *srv, *cli;
  char addr[128];
  CHECK_OK(loom_listen_packet(&srv, network, listen_addr));
  CHECK_OK(loom_pconn_local_addr(srv, addr, sizeof addr));
  if (dial_addr == NULL)
    dial_addr = addr;
  CHECK_OK(loom_go(udp_echo, srv));

  /* Connected: read and write. */
  CHECK_OK(loom_dial_packet(&cli, network, dial_addr));
  CHECK_EQ(loom_pconn_write(cli, "ping", 4), 4);
  char b[64];
  CHECK_OK(loom_pconn_set_deadline(cli, loom_now() + 5000 * CHECK_MS, 0));
  CHECK_EQ(loom_pconn_read(cli, b, sizeof b), 4);
  CHECK(memcmp(b, "ping", 4) == 0);
  /* read_from works on a connected socket too */
  CHECK_EQ(loom_pconn_write(cli, "pong!", 5), 5);
  struct sockaddr_storage from;
  socklen_t fl = sizeof from;
  CHECK_EQ(loom_pconn_read_from(cli, b, sizeof b, &from, &fl), 5);
  CHECK_GT(fl, 0);
  /* write_to on a connected socket: -EISCONN; write_msg with an address:
   * -EISCONN; without: fine. */
  struct sockaddr_storage to;
  socklen_t tl;
  CHECK_OK(loom_resolve_addr(network, addr, &to, &tl));
  CHECK_ERR(loom_pconn_write_to(cli, "x", 1, (struct sockaddr *)&to, tl),
            -EISCONN);
  struct iovec iov[2] = {{(void *)"ab", 2}, {(void *)"cd", 2}};
  CHECK_ERR(loom_pconn_write_msg(cli, iov, 2, (struct sockaddr *)&to, tl),
            -EISCONN);
  CHECK_EQ(loom_pconn_write_msg(cli, iov, 2, NULL, 0), 4);
  CHECK_EQ(loom_pconn_read(cli, b, sizeof b), 4);
  CHECK(memcmp(b, "abcd", 4) == 0);
  /* A datagram larger than the buffer: cut to what fits, and the result
   * says how long it was. */
  CHECK_EQ(loom_pconn_write(cli, "0123456789", 10), 10);
  char small[5] = "....";
  CHECK_EQ(loom_pconn_read(cli, small, 4), 10);
  CHECK(memcmp(small, "0123", 5) == 0); /* small[4] untouched */
  CHECK_OK(loom_pconn_close(cli));

  /* Unconnected: read_from and write_to; write alone is refused, and
   * write_msg needs an address. */
  loom_pconn *un;
  if (strcmp(network, "unixgram") == 0) {
    char p2[64];
    snprintf(p2, sizeof p2, "@loom-test-ucli-%d", (int)getpid());
    CHECK_OK(loom_listen_packet(&un, network, p2));
  } else {
    CHECK_OK(loom_listen_packet(&un, network,
                                strchr(addr, '[') ? "[::1]:0" : "127.0.0.1:0"));
  }
  CHECK_ERR(loom_pconn_write(un, "x", 1), -EDESTADDRREQ);
  CHECK_ERR(loom_pconn_write_msg(un, iov, 2, NULL, 0), -EDESTADDRREQ);
  CHECK_EQ(loom_pconn_write_to(un, "hey", 3, (struct sockaddr *)&to, tl), 3);
  fl = sizeof from;
  CHECK_OK(loom_pconn_set_deadline(un, loom_now() + 5000 * CHECK_MS, 0));
  CHECK_EQ(loom_pconn_read_from(un, b, sizeof b, &from, &fl), 3);
  CHECK_EQ(loom_pconn_write_msg(un, iov, 2, (struct sockaddr *)&to, tl), 4);
  CHECK_EQ(loom_pconn_read(un, b, sizeof b), 4);
  /* A read deadline on a quiet socket. */
  CHECK_OK(loom_pconn_set_read_deadline(un, loom_now() + 20 * CHECK_MS));
  CHECK_OK(loom_pconn_set_write_deadline(un, 0));
  CHECK_ERR(loom_pconn_read(un, b, sizeof b), -ETIMEDOUT);
  CHECK_OK(loom_pconn_close(un));
  CHECK_OK(loom_pconn_close(srv)); /* the echo coroutine's read returns */
  loom_sleep(5 * CHECK_MS);
}

static void udp_main(void *arg) {
  (void)arg;
  udp_rules("udp", "127.0.0.1:0", NULL);
  udp_rules("udp6", "[::1]:0", NULL);
  char path[64];
  snprintf(path, sizeof path, "/tmp/loom-test-dgram-%d.sock", (int)getpid());
  unlink(path);
  udp_rules("unixgram", path, NULL);
  CHECK(access(path, F_OK) != 0); /* removed at close */
  char abs[64];
  snprintf(abs, sizeof abs, "@loom-test-dgram-%d", (int)getpid());
  udp_rules("unixgram", abs, NULL);
}

TEST(packet_socket_rules) { check_run(udp_main, NULL, 2); }

/* A connected dial with a probe learns that nobody listens. */
static void probe_main(void *arg) {
  (void)arg;
  loom_pconn *pc;
  char addr[128];
  CHECK_OK(loom_listen_packet(&pc, "udp", "127.0.0.1:0"));
  CHECK_OK(loom_pconn_local_addr(pc, addr, sizeof addr));
  loom_dial_packet_opts o = {.probe = "ping", .probe_len = 4};
  /* Someone there (silent): the dial succeeds. */
  loom_pconn *c;
  CHECK_OK(loom_dial_packet_with(&c, "udp", addr, &o));
  CHECK_OK(loom_pconn_close(c));
  char b[8];
  CHECK_EQ(loom_pconn_read(pc, b, sizeof b), 4); /* the probe arrived */
  CHECK_OK(loom_pconn_close(pc));
  /* Nobody there now: refused. */
  CHECK_ERR(loom_dial_packet_with(&c, "udp", addr, &o), -ECONNREFUSED);
  /* Without a probe a UDP dial cannot tell. */
  CHECK_OK(loom_dial_packet(&c, "udp", addr));
  CHECK_OK(loom_pconn_close(c));
  /* Networks that are not packet networks. */
  CHECK_ERR(loom_dial_packet(&c, "tcp", addr), LOOM_ENETWORK);
  CHECK_ERR(loom_listen_packet(&pc, "unix", "@x"), LOOM_ENETWORK);
}

TEST(packet_dial_probe) { check_run(probe_main, NULL, 2); }

/* ------------------------------------------------------------------ */
/* Packet sockets bounded by a context: loom_pconn_read_from_ctx and    */
/* loom_pconn_write_msg_ctx, as loom_read_ctx for a stream.             */

static atomic_long pctx_res = 1; /* 1: still parked */
static _Atomic int64_t pctx_at;

typedef struct pctx_call {
  loom_pconn *pc;
  loom_ctx *ctx;
  struct sockaddr_storage from;
  socklen_t fromlen;
} pctx_call;

static void pctx_reader(void *arg) {
  pctx_call *c = arg;
  char b[64];
  ssize_t r = loom_pconn_read_from_ctx(c->pc, b, sizeof b, &c->from,
                                       &c->fromlen, c->ctx);
  atomic_store(&pctx_at, loom_now());
  atomic_store(&pctx_res, (long)r);
}

static void pctx_writer(void *arg) {
  pctx_call *c = arg;
  struct iovec iov[2] = {{(void *)"ab", 2}, {(void *)"cd", 2}};
  ssize_t r = loom_pconn_write_msg_ctx(c->pc, iov, 2, NULL, 0, c->ctx);
  atomic_store(&pctx_at, loom_now());
  atomic_store(&pctx_res, (long)r);
}

/* Start fn(c), check that it parks, cancel `cancel` (c's context or an
 * ancestor) and return what the call returned, checking it was prompt. */
static long pctx_cancel_parked(void (*fn)(void *), pctx_call *c,
                               loom_ctx *cancel) {
  atomic_store(&pctx_res, 1);
  CHECK_OK(loom_go(fn, c));
  loom_sleep(20 * CHECK_MS);
  CHECK_EQ(atomic_load(&pctx_res), 1); /* parked in the poller */
  int64_t t0 = loom_now();
  loom_ctx_cancel(cancel);
  for (int i = 0; i < 5000 && atomic_load(&pctx_res) == 1; i++)
    loom_sleep(CHECK_MS);
  printf("cancel to wake-up: %.3f ms\n", (atomic_load(&pctx_at) - t0) / 1e6);
  CHECK_NE(atomic_load(&pctx_res), 1);
  CHECK_LT(atomic_load(&pctx_at) - t0, 500 * CHECK_MS);
  return atomic_load(&pctx_res);
}

static void pctx_read_main(void *arg) {
  (void)arg;
  loom_pconn *srv, *cli;
  char addr[128];
  CHECK_OK(loom_listen_packet(&srv, "udp", "127.0.0.1:0"));
  CHECK_OK(loom_pconn_local_addr(srv, addr, sizeof addr));
  CHECK_OK(loom_dial_packet(&cli, "udp", addr));
  loom_ctx *parent, *child, *live;
  CHECK_OK(loom_ctx_with_cancel(&parent, loom_ctx_background()));
  CHECK_OK(loom_ctx_with_cancel(&child, parent));
  CHECK_OK(loom_ctx_with_cancel(&live, loom_ctx_background()));

  /* Parked for a datagram, woken by the parent's cancel; a failed read
   * leaves its address arguments alone. */
  pctx_call c = {.pc = srv, .ctx = child, .fromlen = 7};
  CHECK_EQ(pctx_cancel_parked(pctx_reader, &c, parent), -ECANCELED);
  CHECK_EQ(c.fromlen, 7);
  /* Defined state, as loom_read_ctx: reads time out until a new read
   * deadline is set. */
  char b[64];
  CHECK_ERR(loom_pconn_read(srv, b, sizeof b), -ETIMEDOUT);
  CHECK_OK(loom_pconn_set_read_deadline(srv, 0));

  /* A context cancelled already: its error at once, and no I/O — the
   * datagram is still there for the next read. */
  CHECK_EQ(loom_pconn_write(cli, "one", 3), 3);
  struct sockaddr_storage from;
  socklen_t fl = sizeof from;
  CHECK_ERR(loom_pconn_read_from_ctx(srv, b, sizeof b, &from, &fl, child),
            -ECANCELED);
  CHECK_EQ(fl, sizeof from);
  CHECK_OK(loom_pconn_set_read_deadline(srv, loom_now() + 5000 * CHECK_MS));
  CHECK_EQ(loom_pconn_read_from_ctx(srv, b, sizeof b, &from, &fl, live), 3);
  CHECK(memcmp(b, "one", 3) == 0);
  CHECK_EQ(from.ss_family, AF_INET);
  CHECK_EQ(fl, sizeof(struct sockaddr_in));

  /* A context with a deadline: -ETIMEDOUT, not before it. */
  CHECK_OK(loom_pconn_set_read_deadline(srv, 0));
  int64_t t0 = loom_now();
  loom_ctx *d;
  CHECK_OK(loom_ctx_with_timeout(&d, loom_ctx_background(), 30 * CHECK_MS));
  CHECK_ERR(loom_pconn_read_from_ctx(srv, b, sizeof b, NULL, NULL, d),
            -ETIMEDOUT);
  int64_t took = loom_now() - t0;
  printf("deadline context: %.3f ms\n", took / 1e6);
  CHECK_GE(took, 25 * CHECK_MS);
  CHECK_LT(took, 5000 * CHECK_MS);
  loom_ctx_release(d);

  /* And the socket still reads, with a context and without. */
  CHECK_OK(loom_pconn_set_read_deadline(srv, loom_now() + 5000 * CHECK_MS));
  CHECK_EQ(loom_pconn_write(cli, "two!", 4), 4);
  CHECK_EQ(loom_pconn_read_from_ctx(srv, b, sizeof b, NULL, NULL, live), 4);
  CHECK(memcmp(b, "two!", 4) == 0);
  CHECK_EQ(loom_pconn_write(cli, "3", 1), 1);
  CHECK_EQ(loom_pconn_read(srv, b, sizeof b), 1);
  CHECK_ERR(loom_pconn_read_from_ctx(NULL, b, sizeof b, NULL, NULL, live),
            -EINVAL);

  loom_ctx_release(live);
  loom_ctx_release(child);
  loom_ctx_release(parent);
  CHECK_OK(loom_pconn_close(cli));
  CHECK_OK(loom_pconn_close(srv));
}

TEST(packet_read_bounded_by_context) { check_run(pctx_read_main, NULL, 2); }

/* A datagram write waits for room in a unixgram peer that never reads
 * (its queue holds a handful of datagrams). */
static void pctx_write_main(void *arg) {
  (void)arg;
  char path[64], upath[64];
  snprintf(path, sizeof path, "@loom-test-pctxw-%d", (int)getpid());
  snprintf(upath, sizeof upath, "@loom-test-pctxu-%d", (int)getpid());
  loom_pconn *sink, *cli, *un;
  CHECK_OK(loom_listen_packet(&sink, "unixgram", path));
  CHECK_OK(loom_dial_packet(&cli, "unixgram", path));
  CHECK_OK(loom_listen_packet(&un, "unixgram", upath));
  loom_ctx *parent, *child, *live;
  CHECK_OK(loom_ctx_with_cancel(&parent, loom_ctx_background()));
  CHECK_OK(loom_ctx_with_cancel(&child, parent));
  CHECK_OK(loom_ctx_with_cancel(&live, loom_ctx_background()));

  /* Fill the sink, each write bounded by a deadline context: the first
   * that finds no room times out.  Not too short: a context that expires
   * before its write even starts (a stalled machine) leaves the socket's
   * deadline alone and the sink not full, and the checks below fail. */
  char d[256];
  memset(d, 'd', sizeof d);
  struct iovec one = {d, sizeof d};
  int sent = 0;
  ssize_t r;
  for (;;) {
    loom_ctx *t;
    CHECK_OK(loom_ctx_with_timeout(&t, loom_ctx_background(), 250 * CHECK_MS));
    r = loom_pconn_write_msg_ctx(cli, &one, 1, NULL, 0, t);
    loom_ctx_release(t);
    if (r != (ssize_t)sizeof d)
      break;
    CHECK_LT(++sent, 100000);
  }
  printf("the sink took %d datagrams\n", sent);
  CHECK_ERR(r, -ETIMEDOUT);
  CHECK_GT(sent, 0);
  CHECK_ERR(loom_pconn_write(cli, "x", 1), -ETIMEDOUT); /* defined state */
  CHECK_OK(loom_pconn_set_write_deadline(cli, 0));

  /* Parked for room, woken by the parent's cancel. */
  pctx_call c = {.pc = cli, .ctx = child};
  CHECK_EQ(pctx_cancel_parked(pctx_writer, &c, parent), -ECANCELED);
  CHECK_ERR(loom_pconn_write(cli, "x", 1), -ETIMEDOUT);
  CHECK_OK(loom_pconn_set_write_deadline(cli, 0));

  /* Room again: the sink holds exactly what was sent, nothing of the
   * writes that timed out or were cancelled. */
  char b[512];
  CHECK_OK(loom_pconn_set_read_deadline(sink, loom_now() + 5000 * CHECK_MS));
  for (int i = 0; i < sent; i++)
    CHECK_EQ(loom_pconn_read_from(sink, b, sizeof b, NULL, NULL),
             (ssize_t)sizeof d);
  CHECK_OK(loom_pconn_set_read_deadline(sink, loom_now() + 20 * CHECK_MS));
  CHECK_ERR(loom_pconn_read_from(sink, b, sizeof b, NULL, NULL), -ETIMEDOUT);
  CHECK_OK(loom_pconn_set_read_deadline(sink, loom_now() + 5000 * CHECK_MS));

  /* A context cancelled already: its error, and nothing sent though
   * there is room. */
  struct iovec iov[2] = {{(void *)"ab", 2}, {(void *)"cd", 2}};
  CHECK_ERR(loom_pconn_write_msg_ctx(cli, iov, 2, NULL, 0, parent), -ECANCELED);
  CHECK_EQ(loom_pconn_write_msg_ctx(cli, iov, 2, NULL, 0, live), 4);
  CHECK_EQ(loom_pconn_read_from(sink, b, sizeof b, NULL, NULL), 4);
  CHECK(memcmp(b, "abcd", 4) == 0);
  CHECK_OK(loom_pconn_set_read_deadline(sink, loom_now() + 20 * CHECK_MS));
  CHECK_ERR(loom_pconn_read_from(sink, b, sizeof b, NULL, NULL), -ETIMEDOUT);
  CHECK_OK(loom_pconn_set_read_deadline(sink, loom_now() + 5000 * CHECK_MS));

  /* The argument rules of loom_pconn_write_msg, checked before the
   * context; an unconnected socket writes to an address. */
  struct sockaddr_storage to;
  socklen_t tl;
  CHECK_OK(loom_resolve_addr("unixgram", path, &to, &tl));
  CHECK_ERR(
      loom_pconn_write_msg_ctx(cli, iov, 2, (struct sockaddr *)&to, tl, parent),
      -EISCONN);
  CHECK_ERR(loom_pconn_write_msg_ctx(un, iov, 2, NULL, 0, parent),
            -EDESTADDRREQ);
  CHECK_ERR(loom_pconn_write_msg_ctx(cli, NULL, 1, NULL, 0, live), -EINVAL);
  CHECK_ERR(loom_pconn_write_msg_ctx(NULL, iov, 2, NULL, 0, live), -EINVAL);
  CHECK_EQ(
      loom_pconn_write_msg_ctx(un, iov, 2, (struct sockaddr *)&to, tl, live),
      4);
  struct sockaddr_storage from;
  socklen_t fl = sizeof from;
  CHECK_EQ(loom_pconn_read_from_ctx(sink, b, sizeof b, &from, &fl, live), 4);
  CHECK_EQ(from.ss_family, AF_UNIX);

  loom_ctx_release(live);
  loom_ctx_release(child);
  loom_ctx_release(parent);
  CHECK_OK(loom_pconn_close(un));
  CHECK_OK(loom_pconn_close(cli));
  CHECK_OK(loom_pconn_close(sink));
}

TEST(packet_write_bounded_by_context) { check_run(pctx_write_main, NULL, 2); }

/* An unconnected unixgram socket writing to a peer whose queue is full
 * of its datagrams waits, and its datagram goes once the peer reads them
 * (it tries again on its own: see net/udp.c's dgram_io). */
typedef struct ugram_call {
  loom_pconn *pc;
  const struct sockaddr_storage *to;
  socklen_t tolen;
  atomic_long rc; /* 1 while the call has not returned */
} ugram_call;
static void ugram_writer(void *arg) {
  ugram_call *c = arg;
  char d[256];
  memset(d, 'u', sizeof d);
  atomic_store(&c->rc, (long)loom_pconn_write_to(c->pc, d, sizeof d,
                                                 (const struct sockaddr *)c->to,
                                                 c->tolen));
}
static void ugram_drain_main(void *arg) {
  (void)arg;
  char path[64], upath[64];
  snprintf(path, sizeof path, "@loom-test-ugram-drain-%d", (int)getpid());
  snprintf(upath, sizeof upath, "@loom-test-ugram-src-%d", (int)getpid());
  loom_pconn *sink, *un;
  CHECK_OK(loom_listen_packet(&sink, "unixgram", path));
  CHECK_OK(loom_listen_packet(&un, "unixgram", upath));
  struct sockaddr_storage to;
  socklen_t tl;
  CHECK_OK(loom_resolve_addr("unixgram", path, &to, &tl));
  char d[256];
  memset(d, 'u', sizeof d);
  int sent = 0;
  CHECK_OK(loom_pconn_set_write_deadline(un, loom_now() + 200 * CHECK_MS));
  while (loom_pconn_write_to(un, d, sizeof d, (struct sockaddr *)&to, tl) ==
         (ssize_t)sizeof d)
    CHECK_LT(++sent, 100000);
  CHECK_GT(sent, 0);
  /* Full.  One more, with 5 s to go, while the sink drains. */
  CHECK_OK(loom_pconn_set_write_deadline(un, loom_now() + 5 * CHECK_MS * 1000));
  static ugram_call c;
  c.pc = un;
  c.to = &to;
  c.tolen = tl;
  atomic_store(&c.rc, 1);
  CHECK_OK(loom_go(ugram_writer, &c));
  loom_sleep(50 * CHECK_MS);
  CHECK_EQ(atomic_load(&c.rc), 1);
  char b[512];
  for (int i = 0; i < sent; i++)
    CHECK_EQ(loom_pconn_read(sink, b, sizeof b), (ssize_t)sizeof d);
  int64_t t0 = loom_now();
  while (atomic_load(&c.rc) == 1 && loom_now() - t0 < 10 * CHECK_MS * 1000)
    loom_sleep(CHECK_MS);
  int64_t took = loom_now() - t0;
  printf("the parked write went %.1f ms after the peer drained\n",
         (double)took / 1e6);
  CHECK_EQ(atomic_load(&c.rc), (long)sizeof d);
  CHECKF(took < 2000 * CHECK_MS, "it went only after %.0f ms",
         (double)took / 1e6);
  CHECK_EQ(loom_pconn_read(sink, b, sizeof b), (ssize_t)sizeof d);
  CHECK_OK(loom_pconn_close(un));
  CHECK_OK(loom_pconn_close(sink));
}
TEST(unixgram_write_to_wakes_when_peer_drains) {
  check_run(ugram_drain_main, NULL, 2);
}

/* Fill `sink`'s receive queue from `pc`, without waiting; the count. */
static int ugram_fill(loom_pconn *pc, const struct sockaddr_storage *to,
                      socklen_t tl) {
  char d[256];
  memset(d, 'o', sizeof d);
  int sent = 0;
  CHECK_OK(loom_pconn_set_write_deadline(pc, loom_now() + 200 * CHECK_MS));
  while (loom_pconn_write_to(pc, d, sizeof d, (const struct sockaddr *)to,
                             tl) == (ssize_t)sizeof d)
    CHECK_LT(++sent, 100000);
  CHECK_OK(loom_pconn_set_write_deadline(pc, 0));
  CHECK_GT(sent, 0);
  return sent;
}

/* Wait up to 10 s for a ugram_call to return; its result. */
static long ugram_result(ugram_call *c) {
  int64_t t0 = loom_now();
  while (atomic_load(&c->rc) == 1 && loom_now() - t0 < 10 * CHECK_MS * 1000)
    loom_sleep(CHECK_MS);
  return atomic_load(&c->rc);
}

/* The peer's queue is full of another socket's datagrams: reading them
 * frees nothing of ours, so the poller reports nothing to our socket
 * then.  The waiting write_to must still go once the peer has drained
 * (it tries again on its own), well before its deadline. */
static void ugram_others_main(void *arg) {
  (void)arg;
  char path[64], upath[64], opath[64];
  snprintf(path, sizeof path, "@loom-test-ugram-oth-sink-%d", (int)getpid());
  snprintf(upath, sizeof upath, "@loom-test-ugram-oth-un-%d", (int)getpid());
  snprintf(opath, sizeof opath, "@loom-test-ugram-oth-o-%d", (int)getpid());
  loom_pconn *sink, *un, *other;
  CHECK_OK(loom_listen_packet(&sink, "unixgram", path));
  CHECK_OK(loom_listen_packet(&un, "unixgram", upath));
  CHECK_OK(loom_listen_packet(&other, "unixgram", opath));
  struct sockaddr_storage to;
  socklen_t tl;
  CHECK_OK(loom_resolve_addr("unixgram", path, &to, &tl));
  int sent = ugram_fill(other, &to, tl);

  CHECK_OK(loom_pconn_set_write_deadline(un, loom_now() + 8000 * CHECK_MS));
  static ugram_call c;
  c = (ugram_call){.pc = un, .to = &to, .tolen = tl};
  atomic_store(&c.rc, 1);
  CHECK_OK(loom_go(ugram_writer, &c));
  loom_sleep(50 * CHECK_MS);
  /* Waiting, it does not spin: each failed send reports write space on
   * our socket (its buffer, allocated and freed), so a write that waited
   * for that retried at once, forever, taking a whole CPU. */
  int64_t c0 = check_cpu_ns();
  loom_sleep(300 * CHECK_MS);
  int64_t cpu = check_cpu_ns() - c0;
  printf("300 ms waiting for a full peer: %.1f ms of CPU\n", cpu / 1e6);
  CHECKF(cpu < 60 * CHECK_MS, "the write spun: %.1f ms of CPU in 300 ms",
         cpu / 1e6);
  CHECK_EQ(atomic_load(&c.rc), 1); /* parked: the peer is full */
  char b[512];
  for (int i = 0; i < sent; i++)
    CHECK_EQ(loom_pconn_read(sink, b, sizeof b), 256);
  int64_t t0 = loom_now();
  long rc = ugram_result(&c);
  printf("the write went %.1f ms after the peer drained\n",
         (double)(loom_now() - t0) / 1e6);
  CHECK_EQ(rc, 256); /* before its deadline: not -ETIMEDOUT */
  CHECK_EQ(loom_pconn_read(sink, b, sizeof b), 256);
  CHECK(b[0] == 'u');
  CHECK_OK(loom_pconn_close(other));
  CHECK_OK(loom_pconn_close(un));
  CHECK_OK(loom_pconn_close(sink));
}
TEST(unixgram_write_to_resumes_when_a_peer_full_of_others_drains) {
  check_run(ugram_others_main, NULL, 2);
}

typedef struct ugram_ctx_call {
  ugram_call c;
  loom_ctx *ctx;
} ugram_ctx_call;
static void ugram_ctx_writer(void *arg) {
  ugram_ctx_call *w = arg;
  struct iovec iov = {.iov_base = "ctx", .iov_len = 3};
  atomic_store(&w->c.rc, (long)loom_pconn_write_msg_ctx(
                             w->c.pc, &iov, 1, (const struct sockaddr *)w->c.to,
                             w->c.tolen, w->ctx));
}

/* Four unixgram sockets named after `tag`: `stuck` is a peer whose
 * queue `other` has filled (to: its address), `fine` one with room (to2),
 * and `un` the unconnected socket under test. */
typedef struct ugram_four {
  loom_pconn *stuck, *fine, *un, *other;
  struct sockaddr_storage to, to2;
  socklen_t tl, tl2;
} ugram_four;

static void ugram_four_open(const char *tag, ugram_four *q) {
  static const char *const role[] = {"stuck", "free", "un", "o"};
  loom_pconn **pc[] = {&q->stuck, &q->fine, &q->un, &q->other};
  char path[4][64];
  for (int i = 0; i < 4; i++) {
    snprintf(path[i], sizeof path[i], "@loom-test-%s-%s-%d", tag, role[i],
             (int)getpid());
    CHECK_OK(loom_listen_packet(pc[i], "unixgram", path[i]));
  }
  CHECK_OK(loom_resolve_addr("unixgram", path[0], &q->to, &q->tl));
  CHECK_OK(loom_resolve_addr("unixgram", path[1], &q->to2, &q->tl2));
  ugram_fill(q->other, &q->to, q->tl);
}

/* Close all but `un` (the tests close it themselves, to see what its
 * waiting calls get). */
static void ugram_four_close(ugram_four *q) {
  CHECK_OK(loom_pconn_close(q->other));
  CHECK_OK(loom_pconn_close(q->fine));
  CHECK_OK(loom_pconn_close(q->stuck));
}

/* One write_to waits, without a deadline, for a peer that never reads:
 * the socket's writes to other peers still go; a context's cancel and a
 * close end the waiting ones at once. */
static void ugram_spare_main(void *arg) {
  (void)arg;
  static ugram_four q;
  ugram_four_open("ugram-sp", &q);
  loom_pconn *fine = q.fine, *un = q.un;
  struct sockaddr_storage to = q.to, to2 = q.to2;
  socklen_t tl = q.tl, tl2 = q.tl2;

  static ugram_call w1, w2;
  w1 = (ugram_call){.pc = un, .to = &to, .tolen = tl};
  atomic_store(&w1.rc, 1);
  CHECK_OK(loom_go(ugram_writer, &w1));
  loom_sleep(50 * CHECK_MS);
  CHECK_EQ(atomic_load(&w1.rc), 1);
  /* Several, each after the one before is queued behind w1. */
  for (int i = 0; i < 3; i++) {
    w2 = (ugram_call){.pc = un, .to = &to2, .tolen = tl2};
    atomic_store(&w2.rc, 1);
    CHECK_OK(loom_go(ugram_writer, &w2));
    CHECK_EQ(ugram_result(&w2), 256);
    char b[512];
    CHECK_EQ(loom_pconn_read(fine, b, sizeof b), 256);
  }
  CHECK_EQ(atomic_load(&w1.rc), 1); /* still waiting for the stuck one */
  /* A context's cancel ends a waiting write_msg_ctx, and that one alone:
   * the other writes go on waiting, the direction's deadline untouched. */
  static ugram_ctx_call w3;
  w3 = (ugram_ctx_call){.c = {.pc = un, .to = &to, .tolen = tl}};
  atomic_store(&w3.c.rc, 1);
  CHECK_OK(loom_ctx_with_cancel(&w3.ctx, loom_ctx_background()));
  CHECK_OK(loom_go(ugram_ctx_writer, &w3));
  loom_sleep(30 * CHECK_MS);
  CHECK_EQ(atomic_load(&w3.c.rc), 1);
  loom_ctx_cancel(w3.ctx);
  CHECK_EQ(ugram_result(&w3.c), -ECANCELED);
  loom_ctx_release(w3.ctx);
  loom_sleep(30 * CHECK_MS);
  CHECK_EQ(atomic_load(&w1.rc), 1);
  w2 = (ugram_call){.pc = un, .to = &to2, .tolen = tl2};
  atomic_store(&w2.rc, 1);
  CHECK_OK(loom_go(ugram_writer, &w2));
  CHECK_EQ(ugram_result(&w2), 256); /* no deadline passed */
  char b2[512];
  CHECK_EQ(loom_pconn_read(fine, b2, sizeof b2), 256);
  /* A close ends a waiting one with LOOM_ECLOSED. */
  CHECK_OK(loom_pconn_close(un));
  CHECK_EQ(ugram_result(&w1), LOOM_ECLOSED);
  ugram_four_close(&q);
}
TEST(unixgram_write_to_a_stuck_peer_spares_the_others) {
  check_run(ugram_spare_main, NULL, 2);
}

/* A write_to that sleeps for a full peer gives the direction's turn up
 * while it sleeps.  When the sleep ends in an error (here its deadline)
 * the turn may be another call's: the write must not give it up again,
 * or a second write gets in beside that call. */
static atomic_int turn_held; /* 1: the holder has it; 2: let it go */
static void turn_holder(void *arg) {
  loom__netfd *f = arg;
  loom__sema_acquire(&f->wturn);
  /* At once, while the sleeper sleeps (it cannot be queued for the
   * turn yet unless its sleep ended just now): its deadline ends it. */
  CHECK_OK(loom_pconn_set_write_deadline(arg, loom_now() - 1));
  atomic_store(&turn_held, 1);
  while (atomic_load(&turn_held) == 1)
    loom_sleep(CHECK_MS);
  loom__sema_release(&f->wturn);
}
static void ugram_once_main(void *arg) {
  (void)arg;
  static ugram_four q;
  ugram_four_open("ugram-once", &q);
  loom_pconn *fine = q.fine, *un = q.un;
  struct sockaddr_storage to = q.to, to2 = q.to2;
  socklen_t tl = q.tl, tl2 = q.tl2;

  static ugram_call w1, w2;
  w1 = (ugram_call){.pc = un, .to = &to, .tolen = tl};
  atomic_store(&w1.rc, 1);
  CHECK_OK(loom_go(ugram_writer, &w1));
  loom_sleep(30 * CHECK_MS);
  CHECK_EQ(atomic_load(&w1.rc), 1); /* sleeping, without the turn */
  atomic_store(&turn_held, 0);
  CHECK_OK(loom_go(turn_holder, un));
  while (atomic_load(&turn_held) != 1)
    loom_sleep(CHECK_MS);
  loom_sleep(30 * CHECK_MS);
  CHECK_OK(loom_pconn_set_write_deadline(un, 0));
  /* The holder still has the turn: a write to the free peer waits. */
  w2 = (ugram_call){.pc = un, .to = &to2, .tolen = tl2};
  atomic_store(&w2.rc, 1);
  CHECK_OK(loom_go(ugram_writer, &w2));
  loom_sleep(30 * CHECK_MS);
  CHECK_EQ(atomic_load(&w2.rc), 1);
  atomic_store(&turn_held, 2);
  CHECK_EQ(ugram_result(&w2), 256);
  char b[512];
  CHECK_EQ(loom_pconn_read(fine, b, sizeof b), 256);
  CHECK_OK(loom_pconn_close(un));
  long r1 = ugram_result(&w1);
  CHECK(r1 == -ETIMEDOUT || r1 == LOOM_ECLOSED);
  ugram_four_close(&q);
}
TEST(unixgram_write_to_whose_sleep_fails_gives_its_turn_up_once) {
  check_run(ugram_once_main, NULL, 2);
}

/* A cancel that lands as a context-bounded write_to finds its peer full,
 * before the write gives its turn up to sleep, cuts the call short: it
 * returns the context's reason, and the write deadline is left passed,
 * as after any call the cancel cut short (loom/net.h).  The sendmsg
 * below lands the cancel there. */
static _Atomic(loom_ctx *) cut_on_eagain;
ssize_t sendmsg(int fd, const struct msghdr *mh, int flags) {
  static _Atomic(void *) real;
  void *p = atomic_load(&real);
  if (p == NULL) {
    p = dlsym(RTLD_NEXT, "sendmsg");
    atomic_store(&real, p);
  }
  ssize_t (*fn)(int, const struct msghdr *, int);
  *(void **)&fn = p;
  ssize_t r = fn(fd, mh, flags);
  int e = errno;
  loom_ctx *c;
  if (r < 0 && e == EAGAIN && (c = atomic_exchange(&cut_on_eagain, NULL)))
    loom_ctx_cancel(c);
  errno = e;
  return r;
}
static void ugram_cut_main(void *arg) {
  (void)arg;
  static ugram_four q;
  ugram_four_open("ugram-cut", &q);
  loom_pconn *fine = q.fine, *un = q.un;
  struct sockaddr_storage to = q.to, to2 = q.to2;
  socklen_t tl = q.tl, tl2 = q.tl2;

  loom_ctx *ctx;
  CHECK_OK(loom_ctx_with_cancel(&ctx, loom_ctx_background()));
  atomic_store(&cut_on_eagain, ctx);
  struct iovec iov = {.iov_base = "cut", .iov_len = 3};
  CHECK_ERR(
      loom_pconn_write_msg_ctx(un, &iov, 1, (struct sockaddr *)&to, tl, ctx),
      -ECANCELED);
  CHECK(atomic_load(&cut_on_eagain) == NULL); /* it landed */
  loom_ctx_release(ctx);
  /* Cut short: the next write, to a peer with room, finds the deadline
   * passed until a new one is set. */
  CHECK_ERR(loom_pconn_write_to(un, "x", 1, (struct sockaddr *)&to2, tl2),
            -ETIMEDOUT);
  CHECK_OK(loom_pconn_set_write_deadline(un, 0));
  CHECK_EQ(loom_pconn_write_to(un, "y", 1, (struct sockaddr *)&to2, tl2), 1);
  char b[8];
  CHECK_EQ(loom_pconn_read(fine, b, sizeof b), 1);
  CHECK(b[0] == 'y');
  CHECK_OK(loom_pconn_close(un));
  ugram_four_close(&q);
}
TEST(unixgram_write_to_cut_before_its_sleep_leaves_the_deadline_passed) {
  check_run(ugram_cut_main, NULL, 2);
}

/* A probing dial to a unixgram peer whose queue is full: the probe's
 * send is bounded by probe_wait like its wait for an answer, and a full
 * queue means someone is there, so the dial succeeds (it used to wait
 * for room with no bound and no way out). */
static atomic_int pfull_rc = 1;
static void pfull_dialer(void *arg) {
  loom_dial_packet_opts o = {.probe = "", .probe_len = 0};
  loom_pconn *c;
  int rc = loom_dial_packet_with(&c, "unixgram", arg, &o);
  if (rc == 0)
    CHECK_OK(loom_pconn_close(c));
  atomic_store(&pfull_rc, rc);
}
static void ugram_probe_full_main(void *arg) {
  (void)arg;
  static ugram_four q;
  ugram_four_open("ugram-pf", &q);
  static char path[64];
  snprintf(path, sizeof path, "@loom-test-ugram-pf-stuck-%d", (int)getpid());
  CHECK_OK(loom_go(pfull_dialer, path));
  int64_t end = loom_now() + 5000 * CHECK_MS;
  while (atomic_load(&pfull_rc) == 1 && loom_now() < end)
    loom_sleep(CHECK_MS);
  CHECKF(atomic_load(&pfull_rc) != 1, "the dial still waits after 5 s");
  CHECK_OK(atomic_load(&pfull_rc));
  CHECK_OK(loom_pconn_close(q.un));
  ugram_four_close(&q);
}
TEST(unixgram_probing_dial_to_a_full_peer_does_not_wait) {
  check_run(ugram_probe_full_main, NULL, 2);
}

/* ------------------------------------------------------------------ */
/* Deadlines that have passed stop calls that would not have waited.    */

/* A listener on `addr` and a connection to it: the dialled end *c, the
 * accepted one *s. */
static void pair_on(const char *network, const char *addr, loom_listener **l,
                    loom_conn **c, loom_conn **s) {
  char bound[128];
  CHECK_OK(loom_listen(l, network, addr));
  CHECK_OK(loom_listener_addr(*l, bound, sizeof bound));
  CHECK_OK(loom_dial(c, network, bound));
  CHECK_OK(loom_accept(*l, s));
}

static void pair(loom_listener **l, loom_conn **c, loom_conn **s) {
  pair_on("tcp", "127.0.0.1:0", l, c, s);
}

static void passed_main(void *arg) {
  (void)arg;
  loom_listener *l;
  loom_conn *c, *s;
  pair(&l, &c, &s);
  CHECK_EQ(loom_write(s, "hi", 2), 2);
  loom_sleep(10 * CHECK_MS); /* the bytes are there to read */
  CHECK_OK(loom_set_deadline(c, loom_now() - 1, loom_now() - 1));
  char b[8];
  CHECK_EQ(loom_read(c, b, sizeof b), -ETIMEDOUT);
  CHECK_EQ(loom_read(c, NULL, 0), -ETIMEDOUT);
  CHECK_EQ(loom_write(c, "yo", 2), -ETIMEDOUT); /* room to send */
  /* Moved: the same calls go through, and nothing was lost. */
  CHECK_OK(loom_set_deadline(c, 0, 0));
  CHECK_EQ(loom_read(c, b, sizeof b), 2);
  CHECK(memcmp(b, "hi", 2) == 0);
  CHECK_EQ(loom_write(c, "yo", 2), 2);
  CHECK_EQ(loom_read(s, b, sizeof b), 2);
  /* A listener's too, with a connection waiting in its backlog. */
  loom_conn *c2, *s2;
  char addr[128];
  CHECK_OK(loom_listener_addr(l, addr, sizeof addr));
  CHECK_OK(loom_dial(&c2, "tcp", addr));
  loom_sleep(10 * CHECK_MS);
  CHECK_OK(loom_listener_set_deadline(l, loom_now() - 1));
  CHECK_EQ(loom_accept(l, &s2), -ETIMEDOUT);
  CHECK_OK(loom_listener_set_deadline(l, 0));
  CHECK_OK(loom_accept(l, &s2));
  CHECK_OK(loom_close(c2));
  CHECK_OK(loom_close(s2));
  CHECK_OK(loom_close(c));
  CHECK_OK(loom_close(s));
  CHECK_OK(loom_listener_close(l));
}

TEST(passed_deadline_stops_ready_io) { check_run(passed_main, NULL, 2); }

/* ------------------------------------------------------------------ */
/* A deadline timer that is already running, waiting for the poll       */
/* descriptor's lock while the deadline is moved later and re-armed,    */
/* must not expire the new deadline.  A thread holds the lock (as any   */
/* deadline call does, briefly) so that both wait for it.               */

struct lock_hold {
  loom__pd *pd;
  atomic_int held;
};

static void *hold_pd_lock(void *arg) {
  struct lock_hold *h = arg;
  int zero = 0;
  while (!atomic_compare_exchange_weak(&h->pd->lock, &zero, 1))
    zero = 0;
  atomic_store(&h->held, 1);
  usleep(30000);
  atomic_store(&h->pd->lock, 0);
  return NULL;
}

static void late_writer(void *arg) {
  loom_sleep(50 * CHECK_MS);
  CHECK_EQ(loom_write(arg, "x", 1), 1);
}

static void rearm_main(void *arg) {
  (void)arg;
  int bad = 0, trials = 12;
  for (int i = 0; i < trials; i++) {
    loom_listener *l;
    loom_conn *c, *s;
    pair(&l, &c, &s);
    loom__pd *pd = ((loom__netfd *)(void *)c)->pd;
    CHECK_OK(loom_set_read_deadline(c, loom_now() + 5 * CHECK_MS));
    struct lock_hold h = {pd, 0};
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, hold_pd_lock, &h), 0);
    while (!atomic_load(&h.held))
      usleep(100);
    usleep(12000); /* the old deadline passes; its timer waits for the lock */
    CHECK_OK(loom_set_read_deadline(c, loom_now() + 10000 * CHECK_MS));
    pthread_join(t, NULL);
    CHECK_OK(loom_go(late_writer, s));
    char b[4];
    ssize_t r = loom_read(c, b, sizeof b);
    if (r != 1) {
      printf("trial %d: deadline moved 10 s ahead, read gave %s\n", i,
             loom_strerror((int)r));
      bad++;
    }
    loom_sleep(60 * CHECK_MS);
    CHECK_OK(loom_close(c));
    CHECK_OK(loom_close(s));
    CHECK_OK(loom_listener_close(l));
  }
  CHECKF(bad == 0, "%d of %d reads timed out after their deadline was moved ahead", bad,
         trials);
}

TEST(moved_deadline_survives_running_timer) { check_run(rearm_main, NULL, 2); }

/* ------------------------------------------------------------------ */
/* A dial returns only once the connection exists.  A socket registered  */
/* before connect() is reported writable and hung up at once; an idle M  */
/* in epoll_wait takes that event, and the dial must not mistake it for  */
/* a connection.  The listener's backlog is full, so the SYN is dropped  */
/* and the dial must time out; a slow TCP_NODELAY (set between the       */
/* registration and connect()) widens the window.                        */

static atomic_int slow_nodelay;
int setsockopt(int fd, int level, int name, const void *v, socklen_t len) {
  static int (*real)(int, int, int, const void *, socklen_t);
  if (real == NULL)
    *(void **)&real = dlsym(RTLD_NEXT, "setsockopt");
  if (atomic_load(&slow_nodelay) && level == IPPROTO_TCP && name == TCP_NODELAY)
    usleep(3000);
  return real(fd, level, name, v, len);
}

static void park_in_accept(void *arg) {
  loom_conn *c;
  (void)loom_accept(arg, &c); /* a waiter: the idle M blocks in epoll */
}

static void dial_state_main(void *arg) {
  (void)arg;
  loom_listener *full_l, *other;
  char addr[128];
  loom_listen_opts lo = {.backlog = 1};
  CHECK_OK(loom_listen_with(&full_l, "tcp", "127.0.0.1:0", &lo));
  CHECK_OK(loom_listener_addr(full_l, addr, sizeof addr));
  loom_conn *held[64], *c;
  int nheld = 0;
  bool full = false;
  for (int i = 0; i < 60 && !full; i++) {
    loom_dial_opts o = {.deadline = loom_now() + 100 * CHECK_MS};
    int r = loom_dial_with(&c, "tcp", addr, &o);
    if (r == 0)
      held[nheld++] = c;
    else
      full = r == -ETIMEDOUT;
  }
  CHECK(full);
  CHECK_OK(loom_listen(&other, "tcp", "127.0.0.1:0"));
  CHECK_OK(loom_go(park_in_accept, other));
  loom_sleep(10 * CHECK_MS);
  atomic_store(&slow_nodelay, 1);
  int early = 0;
  for (int i = 0; i < 5; i++) {
    loom_dial_opts o = {.deadline = loom_now() + 100 * CHECK_MS};
    int r = loom_dial_with(&c, "tcp", addr, &o);
    if (r != 0)
      continue; /* -ETIMEDOUT: the SYN was dropped */
    struct tcp_info ti;
    socklen_t tl = sizeof ti;
    CHECK_EQ(getsockopt(loom_conn_fd(c), IPPROTO_TCP, TCP_INFO, &ti, &tl), 0);
    if (ti.tcpi_state != TCP_ESTABLISHED)
      early++;
    held[nheld++] = c;
  }
  atomic_store(&slow_nodelay, 0);
  for (int i = 0; i < nheld; i++)
    CHECK_OK(loom_close(held[i]));
  CHECK_OK(loom_listener_close(full_l));
  CHECK_OK(loom_listener_close(other));
  CHECKF(early == 0, "%d of 5 dials returned before their connection existed", early);
}

TEST(dial_returns_once_connected) { check_run(dial_state_main, NULL, 2); }

/* ------------------------------------------------------------------ */
/* A cancel ends an accept that backs off under EMFILE promptly, not    */
/* when the back-off's sleep ends (up to a second).                     */

static atomic_int backoff_res = 1;
static loom_ctx *backoff_ctx;
static void backoff_acceptor(void *arg) {
  loom_conn *c;
  atomic_store(&backoff_res, loom_accept_ctx(arg, &c, backoff_ctx));
}

static int64_t backoff_lag;
static void backoff_main(void *arg) {
  (void)arg;
  loom_listener *l;
  char addr[128];
  CHECK_OK(loom_listen(&l, "tcp", "127.0.0.1:0"));
  CHECK_OK(loom_listener_addr(l, addr, sizeof addr));
  loom_conn *c;
  CHECK_OK(loom_dial(&c, "tcp", addr)); /* queued: accept gets EMFILE */
  static int fillers[1024];
  int nf = 0, fd;
  while (nf < 1024 && (fd = dup(0)) >= 0)
    fillers[nf++] = fd;
  CHECK_OK(loom_ctx_with_cancel(&backoff_ctx, loom_ctx_background()));
  CHECK_OK(loom_go(backoff_acceptor, l));
  loom_sleep(700 * CHECK_MS); /* backed off 5+10+...+320 ms; 640 next */
  int64_t t0 = loom_now();
  loom_ctx_cancel(backoff_ctx);
  while (atomic_load(&backoff_res) == 1)
    loom_sleep(CHECK_MS);
  backoff_lag = loom_now() - t0;
  for (int i = 0; i < nf; i++)
    close(fillers[i]);
  CHECK_EQ(atomic_load(&backoff_res), -ECANCELED);
  loom_ctx_release(backoff_ctx);
  CHECK_OK(loom_close(c));
  CHECK_OK(loom_listener_close(l));
}

TEST(emfile_backoff_ends_on_cancel) {
  struct rlimit rl;
  CHECK_EQ(getrlimit(RLIMIT_NOFILE, &rl), 0);
  rl.rlim_cur = 256;
  CHECK_EQ(setrlimit(RLIMIT_NOFILE, &rl), 0);
  check_run(backoff_main, NULL, 2);
  /* Before, the cancel waited out the 640 ms sleep; now one 5 ms slice. */
  CHECKF(backoff_lag < 250 * CHECK_MS, "the cancel took %.0f ms to end the accept",
         backoff_lag / 1e6);
}

/* ------------------------------------------------------------------ */
/* A Unix listen that fails after bind() removes the socket file it     */
/* made, so the path can be listened on again.                          */

static atomic_int fail_epoll_add;
int epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev) {
  static int (*real)(int, int, int, struct epoll_event *);
  if (real == NULL)
    *(void **)&real = dlsym(RTLD_NEXT, "epoll_ctl");
  if (op == EPOLL_CTL_ADD && atomic_exchange(&fail_epoll_add, 0)) {
    errno = ENOSPC;
    return -1;
  }
  return real(epfd, op, fd, ev);
}

static void unix_fail_main(void *arg) {
  (void)arg;
  const char *net[] = {"unix", "unixgram"};
  for (int k = 0; k < 2; k++) {
    char path[64];
    snprintf(path, sizeof path, "/tmp/loom-test-%d-%d.sock", (int)getpid(), k);
    unlink(path);
    atomic_store(&fail_epoll_add, 1);
    int r;
    if (k == 0) {
      loom_listener *l;
      r = loom_listen(&l, net[k], path);
    } else {
      loom_pconn *pc;
      r = loom_listen_packet(&pc, net[k], path);
    }
    CHECKF(r == -ENOSPC, "%s: %s", net[k], loom_strerror(r));
    CHECKF(access(path, F_OK) != 0, "%s: a failed listen left %s behind", net[k], path);
    if (k == 0) {
      loom_listener *l;
      CHECK_OK(loom_listen(&l, net[k], path));
      CHECK_OK(loom_listener_close(l));
    } else {
      loom_pconn *pc;
      CHECK_OK(loom_listen_packet(&pc, net[k], path));
      CHECK_OK(loom_pconn_close(pc));
    }
    CHECK(access(path, F_OK) != 0); /* and a close removes it */
  }
}

TEST(failed_unix_listen_removes_its_file) { check_run(unix_fail_main, NULL, 1); }

/* A socket bound at a relative path is removed at its close from where
 * it was bound (net.h: the file is removed, so the path can be listened
 * on again at once), not relative to the working directory of the
 * moment: that left the socket file behind and removed another file of
 * that name in the new directory. */
static void unix_rel_main(void *arg) {
  (void)arg;
  char a[64], b[64], keep[4096];
  CHECK(getcwd(keep, sizeof keep) != NULL);
  snprintf(a, sizeof a, "/tmp/loom-test-rel-a-%d", (int)getpid());
  snprintf(b, sizeof b, "/tmp/loom-test-rel-b-%d", (int)getpid());
  CHECK(mkdir(a, 0700) == 0 && mkdir(b, 0700) == 0);
  for (int k = 0; k < 2; k++) {
    CHECK(chdir(a) == 0);
    loom_listener *l = NULL;
    loom_pconn *pc = NULL;
    if (k == 0)
      CHECK_OK(loom_listen(&l, "unix", "rel.sock"));
    else
      CHECK_OK(loom_listen_packet(&pc, "unixgram", "rel.sock"));
    CHECK(chdir(b) == 0);
    int fd = open("rel.sock", O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
    CHECK(fd >= 0);
    close(fd);
    if (k == 0)
      CHECK_OK(loom_listener_close(l));
    else
      CHECK_OK(loom_pconn_close(pc));
    CHECKF(access("rel.sock", F_OK) == 0,
           "k=%d: another directory's file removed", k);
    CHECK(unlink("rel.sock") == 0);
    CHECK(chdir(a) == 0);
    CHECKF(access("rel.sock", F_OK) != 0, "k=%d: the socket file left behind",
           k);
  }
  CHECK(chdir(keep) == 0);
  CHECK(rmdir(a) == 0 && rmdir(b) == 0);
}

TEST(unix_relative_path_removed_where_it_was_bound) {
  check_run(unix_rel_main, NULL, 1);
}

/* An accepted connection that cannot be registered with the poller (the
 * kernel's memory, max_user_watches) is closed, and accept backs off and
 * goes on: the listener does not fail. */
static atomic_int reg_res = 1;
static void reg_acceptor(void *arg) {
  loom_conn *c;
  int r = loom_accept(arg, &c);
  if (r == 0)
    CHECK_OK(loom_close(c));
  atomic_store(&reg_res, r);
}

static void reg_fail_main(void *arg) {
  (void)arg;
  loom_listener *l;
  char addr[128];
  CHECK_OK(loom_listen(&l, "tcp", "127.0.0.1:0"));
  CHECK_OK(loom_listener_addr(l, addr, sizeof addr));
  loom_conn *c1, *c2;
  CHECK_OK(loom_dial(&c1, "tcp", addr));
  atomic_store(&fail_epoll_add, 1); /* the accepted side's registration */
  CHECK_OK(loom_go(reg_acceptor, l));
  loom_sleep(30 * CHECK_MS);
  CHECKF(atomic_load(&reg_res) == 1, "accept returned %s",
         loom_strerror(atomic_load(&reg_res)));
  char b;
  CHECK_OK(loom_set_read_deadline(c1, loom_now() + 5000 * CHECK_MS));
  CHECK_EQ(loom_read(c1, &b, 1), 0); /* dropped: closed by the server */
  CHECK_OK(loom_dial(&c2, "tcp", addr));
  for (int i = 0; i < 5000 && atomic_load(&reg_res) == 1; i++)
    loom_sleep(CHECK_MS);
  CHECK_EQ(atomic_load(&reg_res), 0);
  CHECK_OK(loom_close(c1));
  CHECK_OK(loom_close(c2));
  CHECK_OK(loom_listener_close(l));
}

TEST(accept_survives_a_failed_registration) { check_run(reg_fail_main, NULL, 2); }

/* A Unix dial to a listener whose backlog is full waits for room, as a
 * blocking connect() does, until its deadline; it does not fail with
 * EAGAIN. */
static char ub_path[64];
static atomic_int ub_res = 1;
static void ub_dialer(void *arg) {
  (void)arg;
  loom_conn *c;
  loom_dial_opts o = {.deadline = loom_now() + 5000 * CHECK_MS};
  int r = loom_dial_with(&c, "unix", ub_path, &o);
  if (r == 0)
    CHECK_OK(loom_close(c));
  atomic_store(&ub_res, r);
}

static void unix_backlog_main(void *arg) {
  (void)arg;
  snprintf(ub_path, sizeof ub_path, "/tmp/loom-test-backlog-%d.sock",
           (int)getpid());
  unlink(ub_path);
  loom_listener *l;
  loom_listen_opts lo = {.backlog = 1};
  CHECK_OK(loom_listen_with(&l, "unix", ub_path, &lo));
  loom_conn *held[16];
  int n = 0, r = 0;
  while (n < 16) { /* fill the backlog */
    loom_dial_opts o = {.deadline = loom_now() + 30 * CHECK_MS};
    r = loom_dial_with(&held[n], "unix", ub_path, &o);
    if (r != 0)
      break;
    n++;
  }
  CHECKF(r == -ETIMEDOUT, "a dial to a full backlog gave %s", loom_strerror(r));
  CHECK_OK(loom_go(ub_dialer, NULL));
  loom_sleep(50 * CHECK_MS);
  CHECK_EQ(atomic_load(&ub_res), 1); /* still waiting for room */
  loom_conn *s;
  CHECK_OK(loom_accept(l, &s)); /* room */
  for (int i = 0; i < 5000 && atomic_load(&ub_res) == 1; i++)
    loom_sleep(CHECK_MS);
  CHECK_EQ(atomic_load(&ub_res), 0);
  CHECK_OK(loom_close(s));
  for (int i = 0; i < n; i++)
    CHECK_OK(loom_close(held[i]));
  CHECK_OK(loom_listener_close(l));
}

TEST(unix_dial_waits_for_backlog_room) {
  check_run(unix_backlog_main, NULL, 2);
}

/* reuseport applies to TCP; a Unix listener ignores it, as a unixgram
 * socket does, instead of failing where the kernel refuses SO_REUSEPORT
 * on a Unix socket (Linux 6.x: EOPNOTSUPP). */
static void unix_reuseport_main(void *arg) {
  (void)arg;
  char path[64];
  snprintf(path, sizeof path, "/tmp/loom-test-rp-%d.sock", (int)getpid());
  unlink(path);
  const char *addrs[2] = {path, "@loom-test-rp"};
  loom_listen_opts lo = {.reuseport = true};
  for (int i = 0; i < 2; i++) {
    loom_listener *l;
    int r = loom_listen_with(&l, "unix", addrs[i], &lo);
    CHECKF(r == 0, "listen unix %s with reuseport: %s", addrs[i],
           loom_strerror(r));
    loom_conn *c, *s;
    CHECK_OK(loom_dial(&c, "unix", addrs[i]));
    CHECK_OK(loom_accept(l, &s));
    CHECK_OK(loom_close(c));
    CHECK_OK(loom_close(s));
    CHECK_OK(loom_listener_close(l));
  }
  /* Still applied to TCP: two listeners share a port. */
  loom_listener *a, *b;
  char addr[64];
  CHECK_OK(loom_listen_with(&a, "tcp4", "127.0.0.1:0", &lo));
  CHECK_OK(loom_listener_addr(a, addr, sizeof addr));
  CHECK_OK(loom_listen_with(&b, "tcp4", addr, &lo));
  CHECK_OK(loom_listener_close(b));
  CHECK_OK(loom_listener_close(a));
}

TEST(unix_listen_ignores_reuseport) { check_run(unix_reuseport_main, NULL, 1); }

/* Unix names at the limits of sun_path (108 bytes): a path of 107 bytes
 * (its NUL fills the rest), an abstract name of 107 bytes after the '@'
 * (it has no NUL: the leading 0 byte is the '@'); one byte more is
 * LOOM_EBADADDR. */
static void unix_limits_main(void *arg) {
  (void)arg;
  char path[128], abs[128];
  int n = snprintf(path, sizeof path, "/tmp/loom-test-lim-%d-", (int)getpid());
  memset(path + n, 'p', 107 - (size_t)n);
  path[107] = '\0';
  n = snprintf(abs, sizeof abs, "@loom-test-lim-%d-", (int)getpid());
  memset(abs + n, 'a', 108 - (size_t)n);
  abs[108] = '\0';
  unlink(path);
  const char *names[2] = {path, abs};
  for (int i = 0; i < 2; i++) {
    loom_listener *l;
    int r = loom_listen(&l, "unix", names[i]);
    CHECKF(r == 0, "listen on a %zu-byte name: %s", strlen(names[i]),
           loom_strerror(r));
    char got[128];
    CHECK_OK(loom_listener_addr(l, got, sizeof got));
    CHECK_STREQ(got, names[i]);
    loom_conn *c, *s;
    CHECK_OK(loom_dial(&c, "unix", names[i]));
    CHECK_OK(loom_accept(l, &s));
    CHECK_OK(loom_conn_remote_addr(c, got, sizeof got));
    CHECK_STREQ(got, names[i]);
    CHECK_OK(loom_close(c));
    CHECK_OK(loom_close(s));
    CHECK_OK(loom_listener_close(l));
    loom_pconn *pc;
    CHECK_OK(loom_listen_packet(&pc, "unixgram", names[i]));
    CHECK_OK(loom_pconn_local_addr(pc, got, sizeof got));
    CHECK_STREQ(got, names[i]);
    CHECK_OK(loom_pconn_close(pc));
  }
  /* One byte longer each. */
  char path2[130], abs2[130];
  snprintf(path2, sizeof path2, "%sp", path);
  snprintf(abs2, sizeof abs2, "%sa", abs);
  loom_listener *l;
  CHECK_ERR(loom_listen(&l, "unix", path2), LOOM_EBADADDR);
  CHECK_ERR(loom_listen(&l, "unix", abs2), LOOM_EBADADDR);
  struct sockaddr_storage ss;
  socklen_t sl;
  CHECK_ERR(loom_resolve_addr("unixgram", abs2, &ss, &sl), LOOM_EBADADDR);
}

TEST(unix_names_at_sun_path_limit) { check_run(unix_limits_main, NULL, 1); }

/* An address that does not fit in the caller's buffer is -ENOSPC, and
 * the buffer is left as it was (a failed call touches no out-parameter). */
static void addr_nospace_main(void *arg) {
  (void)arg;
  loom_listener *l;
  CHECK_OK(loom_listen(&l, "tcp4", "127.0.0.1:0"));
  char full[64];
  CHECK_OK(loom_listener_addr(l, full, sizeof full));
  loom_conn *c, *s;
  CHECK_OK(loom_dial(&c, "tcp4", full));
  CHECK_OK(loom_accept(l, &s));
  loom_pconn *pc;
  CHECK_OK(loom_listen_packet(&pc, "udp4", "127.0.0.1:0"));
  for (size_t len = 1; len <= strlen(full); len++) {
    char buf[64];
    memset(buf, 'X', sizeof buf);
    CHECK_ERR(loom_listener_addr(l, buf, len), -ENOSPC);
    CHECK_ERR(loom_conn_local_addr(s, buf, len), -ENOSPC);
    CHECK_ERR(loom_conn_remote_addr(c, buf, len), -ENOSPC);
    CHECK_ERR(loom_conn_remote_addr(s, buf, len), -ENOSPC);
    CHECK_ERR(loom_pconn_local_addr(pc, buf, len), -ENOSPC);
    for (size_t i = 0; i < sizeof buf; i++)
      CHECKF(buf[i] == 'X', "a %zu-byte buffer: byte %zu written on -ENOSPC",
             len, i);
  }
  char buf[64];
  CHECK_OK(loom_conn_remote_addr(c, buf, strlen(full) + 1));
  CHECK_STREQ(buf, full);
  CHECK_OK(loom_pconn_close(pc));
  CHECK_OK(loom_close(c));
  CHECK_OK(loom_close(s));
  CHECK_OK(loom_listener_close(l));
}

TEST(addr_too_long_leaves_the_buffer) { check_run(addr_nospace_main, NULL, 1); }

/* A Unix listen whose listen() fails after bind() made the socket file
 * removes it: the path can be listened on again. */
static atomic_int fail_listen;
int listen(int fd, int backlog) {
  static int (*real)(int, int);
  if (real == NULL)
    *(void **)&real = dlsym(RTLD_NEXT, "listen");
  if (atomic_exchange(&fail_listen, 0)) {
    errno = ENOBUFS;
    return -1;
  }
  return real(fd, backlog);
}

static void listen_fail_main(void *arg) {
  (void)arg;
  char path[64];
  snprintf(path, sizeof path, "/tmp/loom-test-lf-%d.sock", (int)getpid());
  unlink(path);
  loom_listener *l;
  atomic_store(&fail_listen, 1);
  CHECK_ERR(loom_listen(&l, "unix", path), -ENOBUFS);
  CHECKF(access(path, F_OK) != 0, "a failed listen left %s behind", path);
  CHECK_OK(loom_listen(&l, "unix", path));
  CHECK_OK(loom_listener_close(l));
  /* A bind that fails (the path is another socket's) removes nothing. */
  CHECK_OK(loom_listen(&l, "unix", path));
  loom_listener *l2;
  CHECK_ERR(loom_listen(&l2, "unix", path), -EADDRINUSE);
  CHECK_EQ(access(path, F_OK), 0);
  CHECK_OK(loom_listener_close(l));
}

TEST(unix_listen_failing_after_bind_removes_its_file) {
  check_run(listen_fail_main, NULL, 1);
}

/* A probe wait too long to add to the clock (INT64_MAX: wait as long as
 * it takes) waits for the reply, not for nothing. */
static void late_replier(void *arg) {
  loom_pconn *pc = arg;
  char b[8];
  struct sockaddr_storage from;
  socklen_t fl = sizeof from;
  CHECK_EQ(loom_pconn_read_from(pc, b, sizeof b, &from, &fl), 4);
  loom_sleep(50 * CHECK_MS);
  CHECK_EQ(loom_pconn_write_to(pc, "pong", 4, (struct sockaddr *)&from, fl), 4);
}

static void probe_forever_main(void *arg) {
  (void)arg;
  loom_pconn *pc, *c;
  char addr[128];
  CHECK_OK(loom_listen_packet(&pc, "udp4", "127.0.0.1:0"));
  CHECK_OK(loom_pconn_local_addr(pc, addr, sizeof addr));
  CHECK_OK(loom_go(late_replier, pc));
  loom_dial_packet_opts o = {
      .probe = "ping", .probe_len = 4, .probe_wait = INT64_MAX};
  int64_t t0 = loom_now();
  CHECK_OK(loom_dial_packet_with(&c, "udp4", addr, &o));
  int64_t took = loom_now() - t0;
  CHECKF(took >= 40 * CHECK_MS,
         "the dial returned after %.1f ms, before the reply", took / 1e6);
  char b[8];
  CHECK_OK(loom_pconn_set_read_deadline(c, loom_now() + 5000 * CHECK_MS));
  CHECK_EQ(loom_pconn_read(c, b, sizeof b), 4); /* the reply, queued */
  CHECK_OK(loom_pconn_close(c));
  CHECK_OK(loom_pconn_close(pc));
}

TEST(packet_dial_probe_waits_without_limit) {
  check_run(probe_forever_main, NULL, 2);
}

/* ------------------------------------------------------------------ */
/* A cancel that lands while a context-bounded call completes: the call */
/* succeeded, so the connection's deadline is left as the user set it.  */
/* The cancel is made certain through net/export_test.h's hook, which   */
/* runs between the operation and the removal of the cancel hook.       */

static loom_ctx *late_ctx;      /* the context the hook cancels */
static void (*late_then)(void); /* then runs this, still in the window */
static int late_fired;

static void late_cancel(loom_ctx *ctx, ssize_t r) {
  if (ctx != late_ctx || r < 0)
    return;
  loom_ctx_cancel(ctx);
  late_fired++;
  if (late_then != NULL)
    late_then();
}

/* op(c) bounded by a fresh context that is cancelled once op has
 * succeeded; returns op's result. */
static ssize_t late_call(ssize_t (*op)(void *a, loom_ctx *ctx), void *a,
                         void (*then)(void)) {
  loom_ctx *ctx;
  CHECK_OK(loom_ctx_with_cancel(&ctx, loom_ctx_background()));
  late_ctx = ctx;
  late_then = then;
  late_fired = 0;
  loom__test_ctx_op_done = late_cancel;
  ssize_t r = op(a, ctx);
  loom__test_ctx_op_done = NULL;
  late_ctx = NULL;
  CHECK_EQ(late_fired, 1);
  CHECK_EQ(loom_ctx_err(ctx), -ECANCELED);
  loom_ctx_release(ctx);
  return r;
}

static char late_buf[64];
static ssize_t late_read(void *a, loom_ctx *ctx) {
  return loom_read_ctx(a, late_buf, sizeof late_buf, ctx);
}

static loom_conn *late_c;
static void late_sleep(void) { loom_sleep(40 * CHECK_MS); }
static void late_move(void) {
  CHECK_OK(loom_set_read_deadline(late_c, loom_now() - 1));
}
static atomic_int late_closed = 1;
static void late_closer(void *arg) {
  atomic_store(&late_closed, loom_close(arg));
}
static void late_close(void) {
  atomic_store(&late_closed, 1);
  CHECK_OK(loom_go(late_closer, late_c));
  /* The close marks the conn and wakes its users at once, then waits for
   * our call to leave. */
  while (!loom__netfd_closed((loom__netfd *)late_c))
    loom_sleep(CHECK_MS);
}

static void late_read_main(void *arg) {
  (void)arg;
  loom_listener *l;
  loom_conn *c, *s;
  pair(&l, &c, &s);
  char b[64];

  /* No deadline: the next read waits for data, as if no cancel. */
  CHECK_EQ(loom_write(s, "ab", 2), 2);
  CHECK_EQ(late_call(late_read, c, NULL), 2);
  CHECK(memcmp(late_buf, "ab", 2) == 0);
  CHECK_EQ(loom_write(s, "cd", 2), 2);
  CHECK_EQ(loom_read(c, b, sizeof b), 2);
  CHECK(memcmp(b, "cd", 2) == 0);

  /* The user's deadline ahead: kept, and it ends a read at its time. */
  int64_t t0 = loom_now();
  CHECK_OK(loom_set_read_deadline(c, t0 + 100 * CHECK_MS));
  CHECK_EQ(loom_write(s, "ef", 2), 2);
  CHECK_EQ(late_call(late_read, c, NULL), 2);
  CHECK_EQ(loom_write(s, "gh", 2), 2);
  CHECK_EQ(loom_read(c, b, sizeof b), 2);
  CHECK(memcmp(b, "gh", 2) == 0);
  CHECK_ERR(loom_read(c, b, sizeof b), -ETIMEDOUT);
  CHECK_GE(loom_now() - t0, 100 * CHECK_MS);

  /* The user's deadline passed while the cancel held it: passed, as it
   * would be without the cancel (data waiting is not read). */
  CHECK_OK(loom_set_read_deadline(c, loom_now() + 20 * CHECK_MS));
  CHECK_EQ(loom_write(s, "ij", 2), 2);
  CHECK_EQ(late_call(late_read, c, late_sleep), 2);
  CHECK_EQ(loom_write(s, "kl", 2), 2);
  loom_sleep(5 * CHECK_MS);
  CHECK_ERR(loom_read(c, b, sizeof b), -ETIMEDOUT);
  CHECK_OK(loom_set_read_deadline(c, 0));
  CHECK_EQ(loom_read(c, b, sizeof b), 2);

  /* A deadline the user set in between wins over the one before. */
  late_c = c;
  CHECK_OK(loom_set_read_deadline(c, loom_now() + 5000 * CHECK_MS));
  CHECK_EQ(loom_write(s, "mn", 2), 2);
  CHECK_EQ(late_call(late_read, c, late_move), 2);
  CHECK_EQ(loom_write(s, "op", 2), 2);
  loom_sleep(5 * CHECK_MS);
  CHECK_ERR(loom_read(c, b, sizeof b), -ETIMEDOUT);
  CHECK_OK(loom_set_read_deadline(c, 0));
  CHECK_EQ(loom_read(c, b, sizeof b), 2);

  /* A close in between wins: the call returns its bytes, the close
   * completes once it has left. */
  CHECK_OK(loom_set_read_deadline(c, loom_now() + 5000 * CHECK_MS));
  CHECK_EQ(loom_write(s, "qr", 2), 2);
  CHECK_EQ(late_call(late_read, c, late_close), 2);
  while (atomic_load(&late_closed) == 1)
    loom_sleep(CHECK_MS);
  CHECK_OK(atomic_load(&late_closed));

  CHECK_OK(loom_close(s));
  CHECK_OK(loom_listener_close(l));
}

TEST(late_cancel_leaves_the_read_deadline) {
  check_run(late_read_main, NULL, 2);
}

static ssize_t late_write(void *a, loom_ctx *ctx) {
  return loom_write_ctx(a, "st", 2, ctx);
}

static loom_conn *late_accepted;
static ssize_t late_accept(void *a, loom_ctx *ctx) {
  return loom_accept_ctx(a, &late_accepted, ctx);
}

static ssize_t late_pread(void *a, loom_ctx *ctx) {
  return loom_pconn_read_from_ctx(a, late_buf, sizeof late_buf, NULL, NULL,
                                  ctx);
}

static ssize_t late_pwrite(void *a, loom_ctx *ctx) {
  struct iovec iov = {(void *)"uv", 2};
  return loom_pconn_write_msg_ctx(a, &iov, 1, NULL, 0, ctx);
}

static void late_others_main(void *arg) {
  (void)arg;
  loom_listener *l;
  loom_conn *c, *s, *c2, *s2;
  char addr[128], b[64];
  pair(&l, &c, &s);

  /* write */
  CHECK_EQ(late_call(late_write, c, NULL), 2);
  CHECK_EQ(loom_write(c, "wx", 2), 2);
  CHECK_EQ(loom_read(s, b, 4), 4);
  CHECK(memcmp(b, "stwx", 4) == 0);

  /* accept */
  CHECK_OK(loom_listener_addr(l, addr, sizeof addr));
  CHECK_OK(loom_dial(&c2, "tcp", addr));
  CHECK_EQ(late_call(late_accept, l, NULL), 0);
  CHECK_OK(loom_close(late_accepted));
  CHECK_OK(loom_close(c2));
  CHECK_OK(loom_dial(&c2, "tcp", addr));
  CHECK_OK(loom_accept(l, &s2));
  CHECK_OK(loom_close(s2));
  CHECK_OK(loom_close(c2));

  /* packet read and write */
  loom_pconn *ps, *pc;
  CHECK_OK(loom_listen_packet(&ps, "udp", "127.0.0.1:0"));
  CHECK_OK(loom_pconn_local_addr(ps, addr, sizeof addr));
  CHECK_OK(loom_dial_packet(&pc, "udp", addr));
  CHECK_EQ(late_call(late_pwrite, pc, NULL), 2);
  CHECK_EQ(loom_pconn_write(pc, "yz", 2), 2);
  CHECK_EQ(late_call(late_pread, ps, NULL), 2);
  CHECK(memcmp(late_buf, "uv", 2) == 0);
  CHECK_EQ(loom_pconn_read(ps, b, sizeof b), 2);
  CHECK(memcmp(b, "yz", 2) == 0);

  CHECK_OK(loom_pconn_close(pc));
  CHECK_OK(loom_pconn_close(ps));
  CHECK_OK(loom_close(c));
  CHECK_OK(loom_close(s));
  CHECK_OK(loom_listener_close(l));
}

TEST(late_cancel_leaves_write_accept_and_packet_deadlines) {
  check_run(late_others_main, NULL, 2);
}

/* A cancel that lands as a write_to completes expires the write deadline
 * until that call, having succeeded, puts it back; meanwhile it wakes
 * the socket's writes that sleep for a full peer.  Those are other
 * calls: they go on waiting, they do not fail with -ETIMEDOUT. */
static struct sockaddr_storage late_to;
static socklen_t late_tolen;
static ssize_t late_pwrite_to(void *a, loom_ctx *ctx) {
  struct iovec iov = {(void *)"wt", 2};
  return loom_pconn_write_msg_ctx(a, &iov, 1, (struct sockaddr *)&late_to,
                                  late_tolen, ctx);
}

static void late_sleeper_main(void *arg) {
  (void)arg;
  static ugram_four q;
  ugram_four_open("late-sl", &q);
  loom_pconn *fine = q.fine, *un = q.un;
  struct sockaddr_storage to = q.to;
  socklen_t tl = q.tl;
  late_to = q.to2;
  late_tolen = q.tl2;

  static ugram_call w1;
  w1 = (ugram_call){.pc = un, .to = &to, .tolen = tl};
  atomic_store(&w1.rc, 1);
  CHECK_OK(loom_go(ugram_writer, &w1));
  loom_sleep(30 * CHECK_MS);
  CHECK_EQ(atomic_load(&w1.rc), 1); /* sleeping for the stuck peer */
  /* The cancel lands, and the sleeper runs, before the call undoes it. */
  CHECK_EQ(late_call(late_pwrite_to, un, late_sleep), 2);
  loom_sleep(30 * CHECK_MS);
  CHECK_EQ(atomic_load(&w1.rc), 1);
  CHECK_EQ(
      loom_pconn_write_to(un, "z", 1, (struct sockaddr *)&late_to, late_tolen),
      1);
  char b[8];
  CHECK_EQ(loom_pconn_read(fine, b, sizeof b), 2);
  CHECK_EQ(loom_pconn_read(fine, b, sizeof b), 1);
  CHECK_OK(loom_pconn_close(un));
  CHECK_EQ(ugram_result(&w1), LOOM_ECLOSED);
  ugram_four_close(&q);
}

TEST(late_cancel_leaves_sleeping_unixgram_writes_alone) {
  check_run(late_sleeper_main, NULL, 2);
}

/* Writers sharing one context on an unconnected Unix datagram socket
 * whose peer is full: one holds the write turn, the others sleep for
 * the peer (loom__pd_sleep).  The cancel runs the turn holder's hook,
 * which wakes the sleepers under the context's lock, while a sleeper
 * that is parking hooks the same context: the sleeper's commit must not
 * hold the sleepers' lock as it does, or the two wait for each other
 * for good.  A plain thread cancels at a moment the sleepers' lock is
 * held, most often by a sleeper in that commit, while one of the 32
 * writers holds the turn (it only reads the lock word). */
static loom_pconn *shared_un;
static struct sockaddr_storage shared_to;
static socklen_t shared_tl;
static loom_ctx *shared_ctx;
static atomic_int shared_left;

static void shared_writer(void *arg) {
  (void)arg;
  struct iovec iov = {(void *)"w", 1};
  ssize_t r = loom_pconn_write_msg_ctx(
      shared_un, &iov, 1, (struct sockaddr *)&shared_to, shared_tl, shared_ctx);
  CHECK(r == -ECANCELED || r == -ETIMEDOUT);
  atomic_fetch_sub(&shared_left, 1);
}

static void *shared_canceller(void *arg) {
  (void)arg;
  loom__netfd *f = (loom__netfd *)(void *)shared_un; /* nf comes first */
  int64_t end = loom_now() + 50 * CHECK_MS;
  while (loom_now() < end &&
         !__atomic_load_n(&f->pd->slock, __ATOMIC_RELAXED))
    ;
  loom_ctx_cancel(shared_ctx);
  return NULL;
}

static void shared_cancel_main(void *arg) {
  (void)arg;
  static ugram_four q;
  ugram_four_open("shared", &q);
  shared_un = q.un;
  shared_to = q.to;
  shared_tl = q.tl;
  for (int i = 0; i < 100; i++) {
    /* A cut leaves the deadline passed: clear it for the next round. */
    CHECK_OK(loom_pconn_set_write_deadline(shared_un, 0));
    CHECK_OK(loom_ctx_with_cancel(&shared_ctx, loom_ctx_background()));
    atomic_store(&shared_left, 32);
    for (int k = 0; k < 32; k++)
      CHECK_OK(loom_go(shared_writer, NULL));
    pthread_t t;
    CHECK_OK(pthread_create(&t, NULL, shared_canceller, NULL));
    loom_block_enter();
    pthread_join(t, NULL);
    loom_block_exit();
    while (atomic_load(&shared_left) > 0)
      loom_sleep(CHECK_MS);
    loom_ctx_release(shared_ctx);
  }
  CHECK_OK(loom_pconn_close(shared_un));
  ugram_four_close(&q);
}

TEST(cancel_of_writers_sharing_a_context_while_they_sleep) {
  check_watchdog(30, "writers sharing a cancelled context (a deadlock?)");
  check_run(shared_cancel_main, NULL, 2);
}

/* Socket options: TCP_NODELAY is on from the start (as in Go), keep-alive
 * sets its three options, and on a Unix socket, which has no TCP
 * options, a keep-alive with an idle time fails and changes nothing. */
static int sockopt(loom_conn *c, int level, int name) {
  int v = -1;
  socklen_t n = sizeof v;
  CHECK_OK(getsockopt(loom_conn_fd(c), level, name, &v, &n));
  return v;
}
static void sockopts_main(void *arg) {
  (void)arg;
  loom_listener *l;
  loom_conn *a, *b;
  pair(&l, &a, &b);
  CHECK_EQ(sockopt(a, IPPROTO_TCP, TCP_NODELAY), 1);
  CHECK_EQ(sockopt(b, IPPROTO_TCP, TCP_NODELAY), 1);
  CHECK_OK(loom_conn_set_nodelay(a, false));
  CHECK_EQ(sockopt(a, IPPROTO_TCP, TCP_NODELAY), 0);
  CHECK_OK(loom_conn_set_keepalive(a, true, 7));
  CHECK_EQ(sockopt(a, SOL_SOCKET, SO_KEEPALIVE), 1);
  CHECK_EQ(sockopt(a, IPPROTO_TCP, TCP_KEEPIDLE), 7);
  CHECK_EQ(sockopt(a, IPPROTO_TCP, TCP_KEEPINTVL), 7);
  CHECK_OK(loom_conn_set_keepalive(a, false, 0));
  CHECK_EQ(sockopt(a, SOL_SOCKET, SO_KEEPALIVE), 0);
  CHECK_OK(loom_close(a));
  CHECK_OK(loom_close(b));
  CHECK_OK(loom_listener_close(l));

  char abs[64];
  snprintf(abs, sizeof abs, "@loom-test-opts-%d", (int)getpid());
  pair_on("unix", abs, &l, &a, &b);
  CHECK_ERR(loom_conn_set_keepalive(a, true, 7), -EOPNOTSUPP);
  CHECK_EQ(sockopt(a, SOL_SOCKET, SO_KEEPALIVE), 0); /* not half set */
  CHECK_ERR(loom_conn_set_nodelay(a, true), -EOPNOTSUPP);
  CHECK_OK(loom_close(a));
  CHECK_OK(loom_close(b));
  CHECK_OK(loom_listener_close(l));
}
TEST(socket_options) { check_run(sockopts_main, NULL, 1); }

/* A thread that is not a coroutine stops a blocked read with a deadline
 * in the past (no timer needed); one still ahead is timed by the
 * runtime's timers for threads without a P. */
static loom_conn *thr_conn;
static atomic_int thr_res[4];
static void *deadline_thread(void *arg) {
  (void)arg;
  usleep(30 * 1000); /* the reader is parked by then */
  atomic_store(&thr_res[0],
               loom_set_read_deadline(thr_conn, loom_now() + 60 * 1000 *
                                                    CHECK_MS));
  atomic_store(&thr_res[1], loom_set_read_deadline(thr_conn, 1));
  return NULL;
}

static void *clear_deadline_thread(void *arg) {
  (void)arg;
  atomic_store(&thr_res[2], loom_set_deadline(thr_conn, 0, 0));
  return NULL;
}

static void thr_deadline_main(void *arg) {
  (void)arg;
  loom_listener *l;
  loom_conn *c, *s;
  pair(&l, &c, &s);
  thr_conn = c;
  pthread_t t;
  CHECK_OK(pthread_create(&t, NULL, deadline_thread, NULL));
  char b[8];
  int64_t t0 = loom_now();
  CHECK_ERR(loom_read(c, b, sizeof b), -ETIMEDOUT);
  CHECK_LT(loom_now() - t0, 10000 * CHECK_MS);
  pthread_join(t, NULL);
  CHECK_OK(atomic_load(&thr_res[0]));
  CHECK_OK(atomic_load(&thr_res[1]));
  /* 0 from a thread clears it: the connection reads again. */
  CHECK_OK(pthread_create(&t, NULL, clear_deadline_thread, NULL));
  pthread_join(t, NULL);
  CHECK_OK(atomic_load(&thr_res[2]));
  CHECK_EQ(loom_write(s, "ok", 2), 2);
  CHECK_EQ(loom_read(c, b, sizeof b), 2);
  CHECK_OK(loom_close(c));
  CHECK_OK(loom_close(s));
  CHECK_OK(loom_listener_close(l));
}
TEST(deadline_in_the_past_from_a_plain_thread) {
  check_run(thr_deadline_main, NULL, 2);
}

/* ---- a cancel of a call waiting for its turn ------------------------ */
/* Two calls in one direction take turns.  A context-bounded call that
 * waits for its turn behind another, when its context is cancelled,
 * returns the context's reason at once, and the call ahead of it goes on
 * as if nothing happened: not woken, not timed out, its bytes intact. */

enum { TURN_READ, TURN_WRITE, TURN_ACCEPT, TURN_PACKET };

static struct {
  int kind;
  loom_conn *c;
  loom_listener *l;
  loom_pconn *pc;
  char buf[1 << 20];
  atomic_int ahead_res, behind_res;
  atomic_int ahead_in, behind_done;
  loom_ctx *ctx;
} turn;

/* The call ahead, without a context: it holds the direction's turn. */
static void turn_ahead(void *arg) {
  (void)arg;
  ssize_t r = -1;
  loom_conn *acc = NULL;
  struct sockaddr_storage from;
  socklen_t fl = sizeof from;
  atomic_store(&turn.ahead_in, 1);
  switch (turn.kind) {
  case TURN_READ:
    r = loom_read(turn.c, turn.buf, 3);
    break;
  case TURN_WRITE: /* more than the socket buffers take: it waits */
    r = loom_write(turn.c, turn.buf, sizeof turn.buf);
    break;
  case TURN_ACCEPT:
    r = loom_accept(turn.l, &acc);
    if (r == 0)
      CHECK_OK(loom_close(acc));
    break;
  case TURN_PACKET:
    r = loom_pconn_read_from(turn.pc, turn.buf, 3, &from, &fl);
    break;
  }
  atomic_store(&turn.ahead_res, (int)r);
}

static void turn_behind(void *arg) {
  (void)arg;
  char b[8];
  ssize_t r = -1;
  loom_conn *acc = NULL;
  struct sockaddr_storage from;
  socklen_t fl = sizeof from;
  switch (turn.kind) {
  case TURN_READ:
    r = loom_read_ctx(turn.c, b, sizeof b, turn.ctx);
    break;
  case TURN_WRITE:
    r = loom_write_ctx(turn.c, "xy", 2, turn.ctx);
    break;
  case TURN_ACCEPT:
    r = loom_accept_ctx(turn.l, &acc, turn.ctx);
    break;
  case TURN_PACKET:
    r = loom_pconn_read_from_ctx(turn.pc, b, sizeof b, &from, &fl, turn.ctx);
    break;
  }
  atomic_store(&turn.behind_res, (int)r);
  atomic_store(&turn.behind_done, 1);
}

/* Start the call ahead, then the one behind; cancel the second. */
static void turn_race(int kind) {
  turn.kind = kind;
  atomic_store(&turn.ahead_res, 1000);
  atomic_store(&turn.ahead_in, 0);
  atomic_store(&turn.behind_done, 0);
  CHECK_OK(loom_ctx_with_cancel(&turn.ctx, loom_ctx_background()));
  CHECK_OK(loom_go(turn_ahead, NULL));
  while (!atomic_load(&turn.ahead_in))
    loom_sleep(CHECK_MS);
  loom_sleep(20 * CHECK_MS); /* parked in its call, holding the turn */
  CHECK_OK(loom_go(turn_behind, NULL));
  loom_sleep(20 * CHECK_MS); /* waiting for its turn */
  CHECK_EQ(atomic_load(&turn.ahead_res), 1000);
  CHECK(!atomic_load(&turn.behind_done));
  loom_ctx_cancel(turn.ctx);
  int64_t t0 = loom_now();
  while (!atomic_load(&turn.behind_done) && loom_now() - t0 < 2000 * CHECK_MS)
    loom_sleep(CHECK_MS);
  CHECK(atomic_load(&turn.behind_done)); /* promptly, not after the first */
  CHECK_EQ(atomic_load(&turn.behind_res), -ECANCELED);
  loom_sleep(20 * CHECK_MS);
  CHECK_EQ(atomic_load(&turn.ahead_res), 1000); /* still in its call */
  loom_ctx_release(turn.ctx);
}

static void turn_finish(void) {
  int64_t t0 = loom_now();
  while (atomic_load(&turn.ahead_res) == 1000 &&
         loom_now() - t0 < 5000 * CHECK_MS)
    loom_sleep(CHECK_MS);
}

static void turn_main(void *arg) {
  (void)arg;
  loom_listener *l;
  loom_conn *c, *s;
  char b[8], addr[128];

  /* read */
  pair(&l, &c, &s);
  turn.c = c;
  turn_race(TURN_READ);
  CHECK_EQ(loom_write(s, "abc", 3), 3);
  turn_finish();
  CHECK_EQ(atomic_load(&turn.ahead_res), 3);
  CHECK(memcmp(turn.buf, "abc", 3) == 0);
  /* The direction is as it was: the next read waits for bytes. */
  CHECK_EQ(loom_write(s, "d", 1), 1);
  CHECK_EQ(loom_read(c, b, sizeof b), 1);

  /* write: the peer reads nothing until the race is over */
  CHECK_OK(loom_conn_set_buffers(c, 4096, 4096));
  memset(turn.buf, 'w', sizeof turn.buf);
  turn_race(TURN_WRITE);
  size_t got = 0;
  char *sink = malloc(sizeof turn.buf);
  CHECK(sink != NULL);
  while (got < sizeof turn.buf) {
    ssize_t n = loom_read(s, sink + got, sizeof turn.buf - got);
    CHECK_GT(n, 0);
    got += (size_t)n;
  }
  turn_finish();
  CHECK_EQ(atomic_load(&turn.ahead_res), (int)sizeof turn.buf);
  for (size_t i = 0; i < got; i++)
    CHECK_EQ(sink[i], 'w'); /* nothing of the cancelled write among them */
  free(sink);
  CHECK_EQ(loom_write(c, "e", 1), 1);
  CHECK_EQ(loom_read(s, b, sizeof b), 1);
  CHECK_OK(loom_close(c));
  CHECK_OK(loom_close(s));

  /* accept */
  turn.l = l;
  turn_race(TURN_ACCEPT);
  CHECK_OK(loom_listener_addr(l, addr, sizeof addr));
  CHECK_OK(loom_dial(&c, "tcp", addr));
  turn_finish();
  CHECK_OK(atomic_load(&turn.ahead_res));
  CHECK_OK(loom_close(c));
  CHECK_OK(loom_listener_close(l));

  /* packet read */
  loom_pconn *srv, *cli;
  CHECK_OK(loom_listen_packet(&srv, "udp", "127.0.0.1:0"));
  CHECK_OK(loom_pconn_local_addr(srv, addr, sizeof addr));
  CHECK_OK(loom_dial_packet(&cli, "udp", addr));
  turn.pc = srv;
  turn_race(TURN_PACKET);
  CHECK_EQ(loom_pconn_write(cli, "fgh", 3), 3);
  turn_finish();
  CHECK_EQ(atomic_load(&turn.ahead_res), 3);
  CHECK(memcmp(turn.buf, "fgh", 3) == 0);
  CHECK_OK(loom_pconn_close(cli));
  CHECK_OK(loom_pconn_close(srv));
}
TEST(cancel_behind_another_call_ends_that_call_alone) {
  check_run(turn_main, NULL, 2);
}

/* ---- a cancel, then a new deadline before the call looks ------------- */
/* A cancel ends a call parked in the poller by expiring the direction's
 * deadline.  If another coroutine sets a deadline of its own before the
 * woken call looks (one P: the call runs only after the setter), the
 * call must still end with the context's reason: it must not go back
 * to sleep with its context done and nothing left to wake it. */

static struct {
  loom_conn *c;
  loom_listener *l;
  loom_ctx *ctx;
  atomic_long res; /* 1000 while the call has not returned */
  int kind;        /* 0: read, 1: accept */
} moved;

static void moved_call(void *arg) {
  (void)arg;
  char b[8];
  loom_conn *acc;
  long r = moved.kind == 0
               ? (long)loom_read_ctx(moved.c, b, sizeof b, moved.ctx)
               : (long)loom_accept_ctx(moved.l, &acc, moved.ctx);
  atomic_store(&moved.res, r);
}

static long moved_race(int kind) {
  moved.kind = kind;
  atomic_store(&moved.res, 1000);
  CHECK_OK(loom_ctx_with_cancel(&moved.ctx, loom_ctx_background()));
  CHECK_OK(loom_go(moved_call, NULL));
  loom_sleep(20 * CHECK_MS); /* parked in the poller */
  CHECK_EQ(atomic_load(&moved.res), 1000);
  loom_ctx_cancel(moved.ctx);
  if (kind == 0)
    CHECK_OK(loom_set_read_deadline(moved.c, 0));
  else
    CHECK_OK(loom_listener_set_deadline(moved.l, 0));
  int64_t t0 = loom_now();
  while (atomic_load(&moved.res) == 1000 && loom_now() - t0 < 500 * CHECK_MS)
    loom_sleep(CHECK_MS);
  long r = atomic_load(&moved.res);
  loom_ctx_release(moved.ctx);
  return r;
}

static void moved_main(void *arg) {
  (void)arg;
  loom_listener *l;
  loom_conn *c, *s;
  char b[8], addr[128];
  pair(&l, &c, &s);
  moved.c = c;
  moved.l = l;
  long r = moved_race(0);
  if (r == 1000) /* still parked: let it go before failing */
    CHECK_EQ(loom_write(s, "!", 1), 1);
  CHECK_EQ(r, -ECANCELED);
  /* The deadline set after the cancel stands: a read waits for bytes. */
  CHECK_EQ(loom_write(s, "ok", 2), 2);
  CHECK_EQ(loom_read(c, b, sizeof b), 2);

  r = moved_race(1);
  CHECK_OK(loom_listener_addr(l, addr, sizeof addr));
  loom_conn *c2, *s2;
  if (r == 1000) {
    CHECK_OK(loom_dial(&c2, "tcp", addr));
    CHECK_OK(loom_close(c2));
  }
  CHECK_EQ(r, -ECANCELED);
  CHECK_OK(loom_dial(&c2, "tcp", addr));
  CHECK_OK(loom_accept(l, &s2));
  CHECK_OK(loom_close(s2));
  CHECK_OK(loom_close(c2));
  CHECK_OK(loom_close(c));
  CHECK_OK(loom_close(s));
  CHECK_OK(loom_listener_close(l));
}
TEST(cancel_ends_a_call_whose_deadline_is_reset_before_it_wakes) {
  check_run(moved_main, NULL, 1);
}

/* ------------------------------------------------------------------ */
/* Between loom_block_enter and loom_block_exit a coroutine has no P to */
/* park on: a socket call there fails with LOOM_ENOTCO and touches      */
/* nothing, instead of stopping the process when it would wait.         */

static void block_section_main(void *arg) {
  (void)arg;
  loom_listener *l;
  loom_conn *c, *s, *x;
  pair(&l, &c, &s);
  char addr[128], b[8];
  CHECK_OK(loom_listener_addr(l, addr, sizeof addr));
  loom_pconn *pc;
  CHECK_OK(loom_listen_packet(&pc, "udp4", "127.0.0.1:0"));
  struct sockaddr_storage from;
  socklen_t fl = sizeof from;
  loom_ctx *ctx;
  CHECK_OK(loom_ctx_with_cancel(&ctx, loom_ctx_background()));
  ssize_t r[8];
  loom_block_enter();
  r[0] = loom_read(c, b, sizeof b); /* nothing to read: it would wait */
  r[1] = loom_read_ctx(c, NULL, 0, ctx);
  r[2] = loom_accept(l, &x); /* nobody dialing */
  r[3] = loom_pconn_read_from(pc, b, sizeof b, &from, &fl);
  r[4] = loom_write(c, "x", 1); /* room, but the same rule */
  r[5] = loom_dial(&x, "tcp", addr);
  loom_block_exit();
  for (int i = 0; i < 6; i++)
    CHECKF(r[i] == LOOM_ENOTCO, "call %d: %s", i, loom_err_name((int)r[i]));
  /* Nothing was taken or sent: the connection goes on. */
  CHECK_EQ(loom_write(s, "hi", 2), 2);
  CHECK_EQ(loom_read(c, b, sizeof b), 2);
  CHECK_EQ(loom_write(c, "yo", 2), 2);
  CHECK_EQ(loom_read(s, b, sizeof b), 2);
  CHECK(memcmp(b, "yo", 2) == 0);
  loom_ctx_release(ctx);
  CHECK_OK(loom_pconn_close(pc));
  CHECK_OK(loom_close(c));
  CHECK_OK(loom_close(s));
  CHECK_OK(loom_listener_close(l));
}

TEST(socket_calls_in_a_blocking_section_fail_with_enotco) {
  check_run(block_section_main, NULL, 2);
}

/* A host name looked up inside the caller's own blocking section (a
 * resolve, a listen) leaves that section as it was (the lookup waits
 * for its thread in poll(2) there, and opens no section of its own that
 * would end the caller's early), so the caller's next blocking call
 * still hands its processor on.  A deadline ahead can be set there
 * before and after the lookup (the timers for threads without a P). */
static void block_lookup_main(void *arg) {
  (void)arg;
  loom_listener *l;
  loom_conn *c, *s;
  pair(&l, &c, &s);
  struct sockaddr_storage ss;
  socklen_t sl;
  int r[4];
  loom_block_enter();
  r[0] = loom_set_read_deadline(c, loom_now() + 60000 * CHECK_MS);
  r[1] = loom_resolve_addr("tcp4", "localhost:80", &ss, &sl);
  r[2] = loom_set_read_deadline(c, loom_now() + 60000 * CHECK_MS);
  loom_block_exit();
  r[3] = loom_set_read_deadline(c, loom_now() + 60000 * CHECK_MS);
  CHECK_OK(r[0]);
  CHECK_OK(r[1]);
  CHECK_OK(r[2]);
  CHECK_OK(r[3]);
  CHECK_OK(loom_close(c));
  CHECK_OK(loom_close(s));
  CHECK_OK(loom_listener_close(l));
}

TEST(lookup_inside_a_blocking_section_keeps_it) {
  check_run(block_lookup_main, NULL, 1);
}

/* ---- moving a deadline under a blocked call -------------------------- */
/* A read, a write and an accept are blocked; the deadline of their
 * direction is moved later, to "never" (INT64_MAX), to none and back,
 * from a coroutine and from a plain thread: none of those ends the
 * call.  A deadline in the past (negative too) ends it at once with
 * -ETIMEDOUT, and the connection goes on once the deadline is cleared. */

enum { MV_READ, MV_WRITE, MV_ACCEPT };
static struct {
  int kind;
  loom_conn *c;
  loom_listener *l;
  char buf[1 << 20];
  atomic_long res; /* 1000 while the call is blocked */
  atomic_int in;
} mv;

static void mv_call(void *arg) {
  (void)arg;
  long r = -1;
  loom_conn *acc;
  atomic_store(&mv.in, 1);
  switch (mv.kind) {
  case MV_READ:
    r = (long)loom_read(mv.c, mv.buf, 16);
    break;
  case MV_WRITE: /* more than the buffers take: it waits for room */
    for (;;) {
      r = (long)loom_write(mv.c, mv.buf, sizeof mv.buf);
      if (r != (long)sizeof mv.buf)
        break;
    }
    break;
  case MV_ACCEPT:
    r = loom_accept(mv.l, &acc);
    if (r == 0)
      CHECK_OK(loom_close(acc));
    break;
  }
  atomic_store(&mv.res, r);
}

static int mv_set(int64_t d) {
  switch (mv.kind) {
  case MV_READ:
    return loom_set_read_deadline(mv.c, d);
  case MV_WRITE:
    return loom_set_write_deadline(mv.c, d);
  default:
    return loom_listener_set_deadline(mv.l, d);
  }
}

static atomic_int mv_thread_res[4];
static void *mv_thread(void *arg) {
  (void)arg;
  atomic_store(&mv_thread_res[0], mv_set(0));
  atomic_store(&mv_thread_res[1], mv_set(INT64_MAX)); /* ahead: no P's */
  atomic_store(&mv_thread_res[2], mv_set(0));
  return NULL;
}

static void mv_wait_done(void) {
  int64_t t0 = loom_now();
  while (atomic_load(&mv.res) == 1000 && loom_now() - t0 < 2000 * CHECK_MS)
    loom_sleep(CHECK_MS);
}

/* Start the call; move its deadline around without ending it; then end
 * it with `past`. */
static void mv_round(int kind, int64_t past) {
  mv.kind = kind;
  atomic_store(&mv.res, 1000);
  atomic_store(&mv.in, 0);
  CHECK_OK(loom_go(mv_call, NULL));
  while (!atomic_load(&mv.in))
    loom_sleep(CHECK_MS);
  loom_sleep(10 * CHECK_MS); /* parked */
  CHECK_OK(mv_set(loom_now() + 60000 * CHECK_MS));
  CHECK_OK(mv_set(INT64_MAX));
  CHECK_OK(mv_set(0));
  CHECK_OK(mv_set(loom_now() + 30000 * CHECK_MS));
  pthread_t t;
  CHECK_EQ(pthread_create(&t, NULL, mv_thread, NULL), 0);
  pthread_join(t, NULL);
  CHECK_OK(atomic_load(&mv_thread_res[0]));
  CHECK_OK(atomic_load(&mv_thread_res[1]));
  CHECK_OK(atomic_load(&mv_thread_res[2]));
  CHECK_OK(mv_set(INT64_MAX));
  loom_sleep(20 * CHECK_MS);
  CHECKF(atomic_load(&mv.res) == 1000, "kind %d: the call ended with %s", kind,
         loom_err_name((int)atomic_load(&mv.res)));
  CHECK_OK(mv_set(past));
  mv_wait_done();
  CHECK_EQ(atomic_load(&mv.res), -ETIMEDOUT);
}

/* Reads s to its end; the last byte it saw. */
static atomic_int mv_last;
static void mv_drain(void *arg) {
  char *b = malloc(65536);
  CHECK(b != NULL);
  ssize_t n;
  while ((n = loom_read(arg, b, 65536)) > 0)
    atomic_store(&mv_last, b[n - 1]);
  CHECK_EQ(n, 0);
  free(b);
  atomic_store(&mv_last, -atomic_load(&mv_last));
}

static void mv_main(void *arg) {
  (void)arg;
  static const int64_t pasts[] = {-1, INT64_MIN, 1};
  loom_listener *l;
  loom_conn *c, *s;
  char b[16], addr[128];
  for (int k = 0; k < 3; k++) {
    int64_t past = pasts[k];
    pair(&l, &c, &s);
    mv.c = c;
    mv.l = l;
    CHECK_OK(loom_listener_addr(l, addr, sizeof addr));
    /* read */
    mv_round(MV_READ, past);
    CHECK_ERR(loom_read(c, b, sizeof b), -ETIMEDOUT); /* it stays passed */
    CHECK_OK(loom_set_read_deadline(c, 0));
    CHECK_EQ(loom_write(s, "abc", 3), 3);
    CHECK_EQ(loom_read(c, b, sizeof b), 3);
    /* write; then the peer reads it all, and a last byte goes through */
    CHECK_OK(loom_conn_set_buffers(c, 0, 4096));
    mv_round(MV_WRITE, past);
    CHECK_ERR(loom_write(c, "x", 1), -ETIMEDOUT);
    CHECK_OK(loom_set_write_deadline(c, 0));
    atomic_store(&mv_last, 0);
    CHECK_OK(loom_go(mv_drain, s));
    CHECK_EQ(loom_write(c, "y", 1), 1);
    CHECK_OK(loom_shutdown(c, SHUT_WR));
    while (atomic_load(&mv_last) >= 0)
      loom_sleep(CHECK_MS);
    CHECK_EQ(atomic_load(&mv_last), -'y');
    CHECK_OK(loom_close(c));
    CHECK_OK(loom_close(s));
    /* accept */
    mv_round(MV_ACCEPT, past);
    loom_conn *x, *y;
    CHECK_OK(loom_dial(&x, "tcp", addr));
    CHECK_ERR(loom_accept(l, &y), -ETIMEDOUT);
    CHECK_OK(loom_listener_set_deadline(l, 0));
    CHECK_OK(loom_accept(l, &y));
    CHECK_OK(loom_close(x));
    CHECK_OK(loom_close(y));
    CHECK_OK(loom_listener_close(l));
  }
  /* Earlier: a deadline brought in from "never" to soon ends the call. */
  pair(&l, &c, &s);
  mv.c = c;
  mv.kind = MV_READ;
  atomic_store(&mv.res, 1000);
  CHECK_OK(loom_set_read_deadline(c, INT64_MAX));
  CHECK_OK(loom_go(mv_call, NULL));
  loom_sleep(10 * CHECK_MS);
  CHECK_OK(loom_set_read_deadline(c, loom_now() + 10 * CHECK_MS));
  mv_wait_done();
  CHECK_EQ(atomic_load(&mv.res), -ETIMEDOUT);
  CHECK_OK(loom_close(c));
  CHECK_OK(loom_close(s));
  CHECK_OK(loom_listener_close(l));
}
TEST(deadline_moved_under_blocked_calls) { check_run(mv_main, NULL, 2); }

/* ---- a deadline flipped under a stream ------------------------------ */
/* A plain thread flips the read deadline between passed and none as
 * fast as it can, and a coroutine moves it ahead now and then, while a
 * reader takes a stream of bytes: every read returns bytes, in order,
 * or -ETIMEDOUT; none is lost, and the reader never stays asleep once
 * the deadline is cleared for good. */

static struct {
  loom_conn *c, *s;
  atomic_int stop, mover_done;
  atomic_long timeouts, flips;
} flip;

static void *flip_thread(void *arg) {
  (void)arg;
  while (!atomic_load(&flip.stop)) {
    CHECK_OK(loom_set_read_deadline(flip.c, -1));
    CHECK_OK(loom_set_read_deadline(flip.c, 0));
    atomic_fetch_add(&flip.flips, 1);
  }
  return NULL;
}

static void flip_mover(void *arg) {
  (void)arg;
  while (!atomic_load(&flip.stop)) {
    CHECK_OK(loom_set_read_deadline(flip.c, loom_now() + 200000));
    loom_yield();
  }
  atomic_store(&flip.mover_done, 1);
}

#define FLIP_BYTES (1 << 20)
static void flip_writer(void *arg) {
  (void)arg;
  unsigned char b[1000];
  for (int i = 0; i < FLIP_BYTES; i += (int)sizeof b) {
    for (size_t j = 0; j < sizeof b; j++)
      b[j] = (unsigned char)((i + (int)j) * 7);
    size_t n =
        FLIP_BYTES - i < (int)sizeof b ? (size_t)(FLIP_BYTES - i) : sizeof b;
    CHECK_EQ(loom_write(flip.s, b, n), (ssize_t)n);
    if (i % 20000 == 0)
      loom_sleep(100000); /* let the reader park now and then */
  }
}

static void flip_main(void *arg) {
  (void)arg;
  loom_listener *l;
  pair(&l, &flip.c, &flip.s);
  pthread_t t;
  CHECK_EQ(pthread_create(&t, NULL, flip_thread, NULL), 0);
  CHECK_OK(loom_go(flip_mover, NULL));
  CHECK_OK(loom_go(flip_writer, NULL));
  unsigned char b[4096];
  int got = 0;
  int64_t end = loom_now() + 20000 * CHECK_MS;
  while (got < FLIP_BYTES) {
    CHECK(loom_now() < end);
    if (got > FLIP_BYTES / 2 && !atomic_load(&flip.stop)) {
      /* second half: the deadline is left alone */
      atomic_store(&flip.stop, 1);
      pthread_join(t, NULL);
      while (!atomic_load(&flip.mover_done))
        loom_sleep(CHECK_MS);
      CHECK_OK(loom_set_read_deadline(flip.c, 0));
    }
    ssize_t n = loom_read(flip.c, b, sizeof b);
    if (n == -ETIMEDOUT) {
      CHECK(!atomic_load(&flip.stop) || got <= FLIP_BYTES / 2);
      atomic_fetch_add(&flip.timeouts, 1);
      loom_yield(); /* a passed deadline does not wait: let others run */
      continue;
    }
    CHECKF(n > 0, "read: %s", loom_err_name((int)n));
    for (ssize_t j = 0; j < n; j++)
      CHECK_EQ(b[j], (unsigned char)((got + j) * 7));
    got += (int)n;
  }
  printf("%ld flips, %ld reads timed out\n", atomic_load(&flip.flips),
         atomic_load(&flip.timeouts));
  CHECK_OK(loom_close(flip.c));
  CHECK_OK(loom_close(flip.s));
  CHECK_OK(loom_listener_close(l));
}
TEST(deadline_flipped_from_a_thread_under_a_stream) {
  check_run(flip_main, NULL, 2);
}

/* ---- a cancel, a passed deadline and bytes at once ------------------- */
/* A read bounded by a context is parked; at the same moment its context
 * is cancelled, a plain thread sets the read deadline in the past and
 * the peer sends a byte.  The read returns the byte, -ECANCELED or
 * -ETIMEDOUT; whatever it returned, the deadline set last (passed)
 * stands, the next read says so, and no byte is lost. */

static struct {
  loom_conn *c, *s;
  loom_ctx *ctx;
  atomic_int go, ready;
} tri;

static void *tri_thread(void *arg) {
  (void)arg;
  atomic_fetch_add(&tri.ready, 1);
  while (!atomic_load(&tri.go)) {
  }
  CHECK_OK(loom_set_read_deadline(tri.c, -1));
  return NULL;
}

static void *tri_cancel(void *arg) {
  (void)arg;
  atomic_fetch_add(&tri.ready, 1);
  while (!atomic_load(&tri.go)) {
  }
  loom_ctx_cancel(tri.ctx);
  return NULL;
}

static void tri_main(void *arg) {
  (void)arg;
  loom_listener *l;
  pair(&l, &tri.c, &tri.s);
  long outcome[3] = {0, 0, 0};
  int trials = CHECK_SCALE(60, 40, 20);
  int sent = 0, got = 0;
  for (int i = 0; i < trials; i++) {
    CHECK_OK(loom_ctx_with_cancel(&tri.ctx, loom_ctx_background()));
    atomic_store(&tri.go, 0);
    atomic_store(&tri.ready, 0);
    pthread_t t1, t2;
    CHECK_EQ(pthread_create(&t1, NULL, tri_thread, NULL), 0);
    CHECK_EQ(pthread_create(&t2, NULL, tri_cancel, NULL), 0);
    while (atomic_load(&tri.ready) < 2)
      loom_yield();
    /* the reader is us: the byte and the two threads at once */
    atomic_store(&tri.go, 1);
    CHECK_EQ(loom_write(tri.s, "z", 1), 1);
    sent++;
    char b[4];
    ssize_t r = loom_read_ctx(tri.c, b, sizeof b, tri.ctx);
    pthread_join(t1, NULL);
    pthread_join(t2, NULL);
    if (r > 0) {
      got += (int)r;
      outcome[0]++;
    } else if (r == -ECANCELED) {
      outcome[1]++;
    } else {
      CHECKF(r == -ETIMEDOUT, "read_ctx: %s", loom_err_name((int)r));
      outcome[2]++;
    }
    CHECK_ERR(loom_read(tri.c, b, sizeof b), -ETIMEDOUT);
    CHECK_OK(loom_set_read_deadline(tri.c, 0));
    while (got < sent) {
      r = loom_read(tri.c, b, sizeof b);
      CHECK_GT(r, 0);
      got += (int)r;
    }
    loom_ctx_release(tri.ctx);
  }
  printf("bytes %ld, cancelled %ld, timed out %ld\n", outcome[0], outcome[1],
         outcome[2]);
  CHECK_OK(loom_close(tri.c));
  CHECK_OK(loom_close(tri.s));
  CHECK_OK(loom_listener_close(l));
}
TEST(cancel_passed_deadline_and_bytes_at_once) { check_run(tri_main, NULL, 2); }

/* ---- the runtime stops with deadlines and timers pending ------------- */
/* main returns while coroutines wait under deadlines of every kind: a
 * read, a write and an accept with deadlines far ahead, a unixgram write
 * sleeping between its tries for a full peer, a dial waiting for room in
 * a Unix backlog, a loom_fd_wait on a pipe, sleeps short and endless,
 * and a context whose deadline timer is armed though its owner has
 * released it.  loom_run returns promptly, nothing runs late, and
 * everything is freed (ASan's leak check, valgrind). */

static atomic_int sd_parked, sd_woke;
static loom_conn *sd_c[2];
static loom_listener *sd_l;
static loom_pconn *sd_un;
static struct sockaddr_storage sd_to;
static socklen_t sd_tolen;
static char sd_path[64];
static int sd_pipe[2];

static void sd_waiter(void *arg) {
  int k = (int)(intptr_t)arg;
  static char big[1 << 20];
  char b[8];
  loom_conn *x;
  atomic_fetch_add(&sd_parked, 1);
  switch (k) {
  case 0:
    (void)loom_read(sd_c[0], b, sizeof b);
    break;
  case 1:
    while (loom_write(sd_c[0], big, sizeof big) == (ssize_t)sizeof big) {
    }
    break;
  case 2:
    (void)loom_accept(sd_l, &x);
    break;
  case 3:
    while (loom_pconn_write_to(sd_un, b, sizeof b, (struct sockaddr *)&sd_to,
                               sd_tolen) == (ssize_t)sizeof b) {
    }
    break;
  case 4: {
    loom_dial_opts o = {.deadline = loom_now() + 60000 * CHECK_MS};
    for (;;)
      if (loom_dial_with(&x, "unix", sd_path, &o) != 0)
        break;
    break;
  }
  case 5:
    (void)loom_fd_wait(sd_pipe[0], LOOM_FD_READ, loom_now() + 60000 * CHECK_MS);
    break;
  case 6:
    loom_sleep(INT64_MAX);
    break;
  case 7:
    loom_sleep(3000 * CHECK_MS);
    break;
  }
  atomic_fetch_add(&sd_woke, 1);
}

static int64_t sd_returned;
static void sd_main(void *arg) {
  (void)arg;
  int64_t far = loom_now() + 60000 * CHECK_MS;
  loom_listener *l;
  pair(&l, &sd_c[0], &sd_c[1]);
  sd_l = l;
  CHECK_OK(loom_set_deadline(sd_c[0], far, far));
  CHECK_OK(loom_set_deadline(sd_c[1], far, far));
  CHECK_OK(loom_conn_set_buffers(sd_c[0], 0, 4096)); /* s never reads */
  CHECK_OK(loom_listener_set_deadline(l, far));
  char path[64];
  snprintf(path, sizeof path, "@loom-test-sd-sink-%d", (int)getpid());
  loom_pconn *sink;
  CHECK_OK(loom_listen_packet(&sink, "unixgram", path));
  CHECK_OK(loom_resolve_addr("unixgram", path, &sd_to, &sd_tolen));
  snprintf(path, sizeof path, "@loom-test-sd-un-%d", (int)getpid());
  CHECK_OK(loom_listen_packet(&sd_un, "unixgram", path));
  CHECK_OK(loom_pconn_set_deadline(sd_un, far, far));
  snprintf(sd_path, sizeof sd_path, "@loom-test-sd-backlog-%d", (int)getpid());
  loom_listener *ul;
  loom_listen_opts lo = {.backlog = 1};
  CHECK_OK(loom_listen_with(&ul, "unix", sd_path, &lo));
  CHECK_EQ(pipe2(sd_pipe, O_NONBLOCK | O_CLOEXEC), 0);
  loom_ctx *ctx;
  CHECK_OK(loom_ctx_with_deadline(&ctx, loom_ctx_background(), far));
  loom_ctx_release(ctx); /* the armed timer keeps it */
  for (int k = 0; k < 8; k++)
    CHECK_OK(loom_go(sd_waiter, (void *)(intptr_t)k));
  while (atomic_load(&sd_parked) < 8)
    loom_sleep(CHECK_MS);
  loom_sleep(50 * CHECK_MS); /* every one of them parked, the dials full */
  CHECK_EQ(atomic_load(&sd_woke), 0);
  sd_returned = check_mono_ns();
}

TEST(shutdown_with_deadlines_and_timers_pending) {
  check_watchdog(30, "loom_run returning with deadlines pending");
  check_run(sd_main, NULL, 2);
  int64_t took = check_mono_ns() - sd_returned;
  printf("loom_run returned %.1f ms after main\n", took / 1e6);
  CHECK_LT(took, 2000 * CHECK_MS);
  CHECK_EQ(atomic_load(&sd_woke), 0);
  close(sd_pipe[0]);
  close(sd_pipe[1]);
}

/* ---- deadlines of pinned coroutines ---------------------------------- */
/* Coroutines pinned to their threads (more of them than Ps) wait under
 * deadlines of every kind: a read's, a context's, loom_fd_wait's and a
 * sleep's.  Each ends when its deadline passes, on its own thread. */
static atomic_int pin_done;
static void pin_waiter(void *arg) {
  loom_conn *c = arg;
  CHECK_OK(loom_pin());
  pthread_t self = pthread_self();
  int p[2];
  CHECK_EQ(pipe2(p, O_NONBLOCK | O_CLOEXEC), 0);
  char b[8];
  for (int i = 0; i < 5; i++) {
    CHECK_OK(loom_set_read_deadline(c, loom_now() + 3 * CHECK_MS));
    CHECK_ERR(loom_read(c, b, sizeof b), -ETIMEDOUT);
    CHECK(pthread_equal(self, pthread_self()));
    CHECK_OK(loom_set_read_deadline(c, 0));
    loom_ctx *ctx;
    CHECK_OK(loom_ctx_with_timeout(&ctx, loom_ctx_background(), 3 * CHECK_MS));
    CHECK_ERR(loom_read_ctx(c, b, sizeof b, ctx), -ETIMEDOUT);
    loom_ctx_release(ctx);
    CHECK_OK(loom_set_read_deadline(c, 0)); /* the cut left it passed */
    CHECK(pthread_equal(self, pthread_self()));
    CHECK_ERR(loom_fd_wait(p[0], LOOM_FD_READ, loom_now() + 3 * CHECK_MS),
              -ETIMEDOUT);
    CHECK(pthread_equal(self, pthread_self()));
    CHECK_OK(loom_sleep(CHECK_MS));
    CHECK(pthread_equal(self, pthread_self()));
  }
  close(p[0]);
  close(p[1]);
  loom_unpin();
  atomic_fetch_add(&pin_done, 1);
}
static void pin_main(void *arg) {
  (void)arg;
  loom_listener *l[3];
  loom_conn *c[3], *s[3];
  for (int i = 0; i < 3; i++) {
    pair(&l[i], &c[i], &s[i]);
    CHECK_OK(loom_go(pin_waiter, c[i]));
  }
  int64_t end = loom_now() + 10000 * CHECK_MS;
  while (atomic_load(&pin_done) < 3) {
    CHECK(loom_now() < end);
    loom_sleep(CHECK_MS);
  }
  for (int i = 0; i < 3; i++) {
    CHECK_OK(loom_close(c[i]));
    CHECK_OK(loom_close(s[i]));
    CHECK_OK(loom_listener_close(l[i]));
  }
}
TEST(deadlines_of_pinned_coroutines) { check_run(pin_main, NULL, 2); }

/* ---- packet sockets under moved deadlines ---------------------------- */
/* A passed deadline stops a packet read with a datagram queued and a
 * write with room, as on a stream; a read blocked on an empty socket
 * and a unixgram write sleeping for a full peer are both ended by a
 * deadline moved into the past from a plain thread, and left alone by
 * one moved to "never" or cleared; nothing queued is lost. */
static loom_pconn *pk_pc, *pk_un;
static struct sockaddr_storage pk_to;
static socklen_t pk_tolen;
static atomic_long pk_rres, pk_wres;
static void pk_reader(void *arg) {
  (void)arg;
  char b[16];
  atomic_store(&pk_rres, (long)loom_pconn_read(pk_pc, b, sizeof b));
}
static void pk_writer(void *arg) {
  (void)arg;
  char b[256];
  memset(b, 'p', sizeof b);
  ssize_t r;
  while ((r = loom_pconn_write_to(pk_un, b, sizeof b, (struct sockaddr *)&pk_to,
                                  pk_tolen)) == (ssize_t)sizeof b) {
  }
  atomic_store(&pk_wres, (long)r);
}
static void *pk_past(void *arg) {
  (void)arg;
  CHECK_OK(loom_pconn_set_deadline(pk_pc, -1, 0));
  CHECK_OK(loom_pconn_set_write_deadline(pk_un, INT64_MIN));
  return NULL;
}
static void pk_main(void *arg) {
  (void)arg;
  loom_pconn *cli;
  char addr[128], b[16];
  CHECK_OK(loom_listen_packet(&pk_pc, "udp", "127.0.0.1:0"));
  CHECK_OK(loom_pconn_local_addr(pk_pc, addr, sizeof addr));
  CHECK_OK(loom_dial_packet(&cli, "udp", addr));
  CHECK_EQ(loom_pconn_write(cli, "one", 3), 3);
  loom_sleep(10 * CHECK_MS);
  CHECK_OK(loom_pconn_set_deadline(pk_pc, loom_now() - 1, 1));
  CHECK_OK(loom_pconn_set_deadline(cli, 1, -1));
  CHECK_ERR(loom_pconn_read(pk_pc, b, sizeof b), -ETIMEDOUT);
  CHECK_ERR(loom_pconn_write(cli, "two", 3), -ETIMEDOUT);
  CHECK_ERR(loom_pconn_write(cli, "", 0), -ETIMEDOUT);
  CHECK_OK(loom_pconn_set_deadline(pk_pc, 0, 0));
  CHECK_OK(loom_pconn_set_deadline(cli, 0, 0));
  CHECK_EQ(loom_pconn_read(pk_pc, b, sizeof b), 3); /* still there */
  /* A blocked read, and a unixgram write sleeping for a full peer. */
  char path[64];
  loom_pconn *sink;
  snprintf(path, sizeof path, "@loom-test-pk-sink-%d", (int)getpid());
  CHECK_OK(loom_listen_packet(&sink, "unixgram", path));
  CHECK_OK(loom_resolve_addr("unixgram", path, &pk_to, &pk_tolen));
  snprintf(path, sizeof path, "@loom-test-pk-un-%d", (int)getpid());
  CHECK_OK(loom_listen_packet(&pk_un, "unixgram", path));
  atomic_store(&pk_rres, 1000);
  atomic_store(&pk_wres, 1000);
  CHECK_OK(loom_go(pk_reader, NULL));
  CHECK_OK(loom_go(pk_writer, NULL));
  loom_sleep(30 * CHECK_MS);
  CHECK_OK(loom_pconn_set_deadline(pk_pc, INT64_MAX, INT64_MAX));
  CHECK_OK(loom_pconn_set_deadline(pk_un, INT64_MAX, INT64_MAX));
  loom_sleep(20 * CHECK_MS);
  CHECK_OK(loom_pconn_set_deadline(pk_pc, 0, 0));
  CHECK_OK(loom_pconn_set_write_deadline(pk_un, loom_now() + 60000 * CHECK_MS));
  loom_sleep(20 * CHECK_MS);
  CHECK_EQ(atomic_load(&pk_rres), 1000);
  CHECK_EQ(atomic_load(&pk_wres), 1000);
  pthread_t t;
  CHECK_EQ(pthread_create(&t, NULL, pk_past, NULL), 0);
  pthread_join(t, NULL);
  int64_t end = loom_now() + 2000 * CHECK_MS;
  while ((atomic_load(&pk_rres) == 1000 || atomic_load(&pk_wres) == 1000) &&
         loom_now() < end)
    loom_sleep(CHECK_MS);
  CHECK_ERR(atomic_load(&pk_rres), -ETIMEDOUT);
  CHECK_ERR(atomic_load(&pk_wres), -ETIMEDOUT);
  /* Cleared: the unixgram write goes once the sink reads one datagram,
   * and the read takes the next one sent. */
  CHECK_OK(loom_pconn_set_deadline(pk_pc, 0, 0));
  CHECK_OK(loom_pconn_set_write_deadline(pk_un, 0));
  CHECK_EQ(loom_pconn_read(sink, b, sizeof b), 256);
  CHECK_EQ(loom_pconn_write_to(pk_un, "last", 4, (struct sockaddr *)&pk_to,
                               pk_tolen),
           4);
  CHECK_EQ(loom_pconn_write(cli, "three", 5), 5);
  CHECK_EQ(loom_pconn_read(pk_pc, b, sizeof b), 5);
  CHECK_OK(loom_pconn_close(cli));
  CHECK_OK(loom_pconn_close(pk_pc));
  CHECK_OK(loom_pconn_close(pk_un));
  CHECK_OK(loom_pconn_close(sink));
}
TEST(packet_deadlines_moved_under_blocked_calls) {
  check_run(pk_main, NULL, 2);
}

CHECK_MAIN()

/* ------------------------------------------------------------------ */
/* A call that fails at once is no more a scheduling point than one that
 * succeeds at once: a coroutine retrying a read past its deadline, a
 * write past its deadline, an accept past its deadline or a read under a
 * cancelled context must still let the others on its (only) processor
 * run. */

static atomic_int fr_stop;
static atomic_long fr_calls;

static void fr_stopper(void *arg) {
  (void)arg;
  loom_sleep(5 * CHECK_MS); /* a timer: runs only if the spinner yields */
  atomic_store(&fr_stop, 1);
}

static void fr_main(void *arg) {
  int which = (int)(intptr_t)arg;
  loom_listener *l;
  loom_conn *c, *s;
  pair(&l, &c, &s);
  int64_t past = loom_now() - 1;
  CHECK_OK(loom_set_deadline(c, past, past));
  CHECK_OK(loom_listener_set_deadline(l, past));
  atomic_store(&fr_stop, 0);
  atomic_store(&fr_calls, 0);
  loom_ctx *done; /* which == 3: a read under a cancelled context */
  CHECK_OK(loom_ctx_with_cancel(&done, loom_ctx_background()));
  loom_ctx_cancel(done);
  CHECK_OK(loom_go(fr_stopper, NULL));
  char b[1] = {0};
  while (!atomic_load(&fr_stop)) {
    ssize_t r;
    loom_conn *x = NULL;
    if (which == 0)
      r = loom_read(c, b, 1);
    else if (which == 1)
      r = loom_write(c, b, 1);
    else if (which == 2)
      r = loom_accept(l, &x);
    else
      r = loom_read_ctx(c, b, 1, done) == -ECANCELED ? -ETIMEDOUT : -1;
    CHECK_EQ(r, -ETIMEDOUT);
    atomic_fetch_add(&fr_calls, 1);
  }
  CHECK_GT(atomic_load(&fr_calls), 0);
  loom_ctx_release(done);
  CHECK_OK(loom_close(c));
  CHECK_OK(loom_close(s));
  CHECK_OK(loom_listener_close(l));
}
TEST(failing_calls_in_a_row_yield) {
  check_watchdog(20, "a loop of calls past their deadline starves the P");
  for (int which = 0; which < 4; which++)
    check_run(fr_main, (void *)(intptr_t)which, 1);
}

/* The same for the 0-byte read (net.h's way to wait for readability): in
 * a row, failing at once past its deadline, or succeeding at once with
 * bytes pending, it yields too. */
static void zr_main(void *arg) {
  int which = (int)(intptr_t)arg;
  loom_listener *l;
  loom_conn *c, *s;
  pair(&l, &c, &s);
  if (which == 0) {
    int64_t past = loom_now() - 1;
    CHECK_OK(loom_set_deadline(c, past, past));
  } else {
    CHECK_EQ(loom_write(s, "x", 1), 1);
    CHECK_EQ(loom_read(c, NULL, 0), 0); /* it has come */
  }
  atomic_store(&fr_stop, 0);
  CHECK_OK(loom_go(fr_stopper, NULL));
  while (!atomic_load(&fr_stop))
    CHECK_EQ(loom_read(c, NULL, 0), which == 0 ? -ETIMEDOUT : 0);
  CHECK_OK(loom_close(c));
  CHECK_OK(loom_close(s));
  CHECK_OK(loom_listener_close(l));
}
TEST(zero_length_reads_in_a_row_yield) {
  check_watchdog(20, "a loop of 0-byte reads starves the P");
  for (int which = 0; which < 2; which++)
    check_run(zr_main, (void *)(intptr_t)which, 1);
}

/* A deadline ahead set from a plain thread fires: a read, a write and an
 * accept blocked on coroutines end with -ETIMEDOUT after it, on one P
 * and on two, and the connection reads again once it is cleared. */
static loom_conn *ft_c;
static loom_listener *ft_l;
static atomic_int ft_res[3];
static void *ft_thread(void *arg) {
  (void)arg;
  int64_t d = loom_now() + 30 * CHECK_MS;
  atomic_store(&ft_res[0], loom_set_deadline(ft_c, d, d));
  atomic_store(&ft_res[1], loom_listener_set_deadline(ft_l, d));
  return NULL;
}
static atomic_long ft_ended[3];
static void ft_reader(void *arg) {
  (void)arg;
  char b[8];
  atomic_store(&ft_ended[0], loom_read(ft_c, b, sizeof b));
}
static void ft_acceptor(void *arg) {
  (void)arg;
  loom_conn *x;
  atomic_store(&ft_ended[2], loom_accept(ft_l, &x));
}
static loom_conn *ft_s;
static atomic_int ft_drained;
static void ft_drain(void *arg) {
  (void)arg;
  static char b[4096];
  for (;;) {
    ssize_t k = loom_read(ft_s, b, sizeof b);
    CHECK_GT(k, 0);
    if (b[k - 1] == 'x')
      break;
  }
  atomic_store(&ft_drained, 1);
}
static void ft_main(void *arg) {
  (void)arg;
  loom_conn *s;
  pair(&ft_l, &ft_c, &s);
  for (int i = 0; i < 3; i++)
    atomic_store(&ft_ended[i], 1);
  CHECK_OK(loom_conn_set_buffers(ft_c, 4096, 4096));
  CHECK_OK(loom_conn_set_buffers(s, 4096, 4096));
  CHECK_OK(loom_go(ft_reader, NULL));
  CHECK_OK(loom_go(ft_acceptor, NULL));
  loom_sleep(10 * CHECK_MS); /* both parked */
  pthread_t t;
  CHECK_EQ(pthread_create(&t, NULL, ft_thread, NULL), 0);
  loom_block_enter();
  pthread_join(t, NULL);
  loom_block_exit();
  CHECK_OK(atomic_load(&ft_res[0]));
  CHECK_OK(atomic_load(&ft_res[1]));
  /* The writer: a peer that never reads fills the buffers, then the
   * write waits until the deadline. */
  static char big[1 << 20];
  atomic_store(&ft_ended[1], loom_write(ft_c, big, sizeof big));
  int64_t give_up = loom_now() + 10000 * CHECK_MS;
  while ((atomic_load(&ft_ended[0]) == 1 || atomic_load(&ft_ended[2]) == 1) &&
         loom_now() < give_up)
    loom_sleep(CHECK_MS);
  CHECK_EQ(atomic_load(&ft_ended[0]), -ETIMEDOUT);
  CHECK_EQ(atomic_load(&ft_ended[1]), -ETIMEDOUT);
  CHECK_EQ(atomic_load(&ft_ended[2]), -ETIMEDOUT);
  /* Cleared, the connection works again: what of big got through, then
   * "x", reach the peer. */
  CHECK_OK(loom_set_deadline(ft_c, 0, 0));
  ft_s = s;
  atomic_store(&ft_drained, 0);
  CHECK_OK(loom_go(ft_drain, NULL));
  CHECK_EQ(loom_write(ft_c, "x", 1), 1);
  while (!atomic_load(&ft_drained))
    loom_sleep(CHECK_MS);
  CHECK_OK(loom_close(ft_c));
  CHECK_OK(loom_close(s));
  CHECK_OK(loom_listener_close(ft_l));
}
TEST(deadline_ahead_from_a_plain_thread_fires) {
  check_watchdog(30, "a deadline set from a plain thread never fired");
  check_run(ft_main, NULL, 1);
  check_run(ft_main, NULL, 2);
}
