/*
 * echo_server — echo over TCP, UDP and Unix sockets at once, one
 * coroutine per connection.
 *
 *   echo_server [--listen URL]... [--duration SECONDS] [--procs N] [--quiet]
 *
 * URLs: tcp://host:port, tcp4://..., tcp6://[::1]:port, udp://host:port,
 * udp4://..., udp6://..., unix:///path, unix://@abstract, unixgram:///path,
 * unixgram://@abstract.  Port 0 picks a free port; the addresses actually
 * bound are printed at startup, one "listening on URL" line each.  Without
 * --listen: tcp://127.0.0.1:7000.
 *
 * The shape is the one a Go programmer writes: a stream listener gets an
 * accept-loop coroutine that spawns one coroutine per connection, and that
 * coroutine reads and writes back until end of stream, as if the calls
 * blocked.  A packet socket gets one coroutine that reads a datagram and
 * sends it back to whoever sent it.  Every one of them parks in loom's
 * poller when it has nothing to do, so an idle server uses no CPU however
 * many connections it holds.
 *
 * Stopping: SIGINT and SIGTERM are blocked in every thread and read from a
 * signalfd, on which the main coroutine waits with loom_fd_wait (a
 * deadline on that wait implements --duration).  Then it sets a deadline
 * in the past on every socket: each coroutine that owns one wakes with
 * -ETIMEDOUT, sees that the server is stopping, closes its socket and
 * returns.  Only the owner closes: a socket closed from outside could be
 * freed between its owner's calls.  The main coroutine waits for them all
 * and returns, so loom_run returns and the process exits 0; a Unix
 * listener's socket file is removed when it closes.
 *
 * Exit status: 0 after a clean stop, 1 when a listener cannot be opened,
 * 2 for a bad command line.
 */
#define _GNU_SOURCE /* signalfd */

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <loom.h>
#include <loom/fd.h>
#include <loom/net.h>

#include "cli.h"
#include "echo_url.h"

#define PROG "echo_server"

#define MS (INT64_C(1000000))
#define SEC (1000 * MS)
#define MAX_ENDPOINTS 16
#define STREAM_BUF (32 * 1024)
#define DGRAM_BUF (64 * 1024) /* the largest UDP datagram fits */
#define STOP_WAIT (5 * SEC)   /* for coroutines to leave, when stopping */

struct server;

/* One --listen URL and the socket opened for it.  The coroutine serving
 * the socket owns it and is the only one to close it. */
struct endpoint {
  struct server *srv;
  echo_url url;
  char shown[320];   /* the URL of the bound address */
  loom_listener *ln; /* stream */
  loom_pconn *pc;    /* packet */
  bool closed;       /* under srv->mu: the owner closed the socket */
};

/* A connection, from accept until its coroutine closes it. */
struct session {
  struct server *srv;
  struct endpoint *ep;
  loom_conn *c;
  char peer[128];
  struct session *prev, *next; /* srv->sessions */
};

struct server {
  struct endpoint eps[MAX_ENDPOINTS];
  int neps;
  int64_t duration; /* ns; 0: until a signal */
  int sigfd;
  bool quiet;
  bool failed; /* a listener could not be opened */

  /* Held only around list and flag updates and loom_*_set_deadline,
   * none of which parks, so a coroutine never parks holding it. */
  pthread_mutex_t mu;
  bool stopping;            /* under mu; also read without it as a hint */
  struct session *sessions; /* under mu: every live connection */

  /* Coroutines that still own a socket; the main coroutine waits for 0. */
  atomic_int alive;
  /* Counters for the summary; relaxed is enough. */
  atomic_ulong conns, stream_bytes, datagrams, dgram_bytes;
};

static bool stopping(struct server *srv) {
  pthread_mutex_lock(&srv->mu);
  bool s = srv->stopping;
  pthread_mutex_unlock(&srv->mu);
  return s;
}

/* ---- stream: one coroutine per connection ----------------------------- */

static void session_unlink(struct session *s) {
  struct server *srv = s->srv;
  pthread_mutex_lock(&srv->mu);
  if (s->prev)
    s->prev->next = s->next;
  else
    srv->sessions = s->next;
  if (s->next)
    s->next->prev = s->prev;
  pthread_mutex_unlock(&srv->mu);
}

/* Echo until end of stream, then close. */
static void serve_conn(void *arg) {
  struct session *s = arg;
  struct server *srv = s->srv;
  unsigned long total = 0;
  const char *why = "end of stream";
  char *buf = malloc(STREAM_BUF);
  if (buf == NULL)
    why = "out of memory";
  while (buf != NULL) {
    ssize_t n = loom_read(s->c, buf, STREAM_BUF);
    if (n == 0)
      break;
    if (n > 0)
      n = loom_write(s->c, buf, (size_t)n);
    if (n < 0) {
      why = n == -ETIMEDOUT && stopping(srv) ? "server stopping"
                                             : loom_strerror((int)n);
      break;
    }
    total += (unsigned long)n;
  }
  atomic_fetch_add_explicit(&srv->stream_bytes, total, memory_order_relaxed);
  session_unlink(s);
  loom_close(s->c);
  if (!srv->quiet)
    printf("%s: %s closed (%s), %lu bytes echoed\n", s->ep->shown, s->peer, why,
           total);
  free(buf);
  free(s);
  atomic_fetch_sub(&srv->alive, 1);
}

/* Register a new connection and give it a coroutine.  Returns false and
 * closes the connection when the server is stopping or out of memory. */
static bool start_session(struct endpoint *ep, loom_conn *c) {
  struct server *srv = ep->srv;
  struct session *s = calloc(1, sizeof *s);
  if (s == NULL)
    goto fail;
  s->srv = srv;
  s->ep = ep;
  s->c = c;
  if (loom_conn_remote_addr(c, s->peer, sizeof s->peer) != 0 ||
      s->peer[0] == '\0')
    snprintf(s->peer, sizeof s->peer, "a client"); /* an unnamed Unix peer */
  pthread_mutex_lock(&srv->mu);
  if (srv->stopping) {
    pthread_mutex_unlock(&srv->mu);
    goto fail;
  }
  s->next = srv->sessions;
  if (s->next)
    s->next->prev = s;
  srv->sessions = s;
  atomic_fetch_add(&srv->alive, 1);
  pthread_mutex_unlock(&srv->mu);
  atomic_fetch_add_explicit(&srv->conns, 1, memory_order_relaxed);
  if (!srv->quiet)
    printf("%s: connection from %s\n", ep->shown, s->peer);
  int rc = loom_go(serve_conn, s);
  if (rc == 0)
    return true;
  fprintf(stderr, "echo_server: loom_go: %s\n", loom_strerror(rc));
  session_unlink(s);
  atomic_fetch_sub(&srv->alive, 1);
fail:
  loom_close(c);
  free(s);
  return false;
}

static void accept_loop(void *arg) {
  struct endpoint *ep = arg;
  struct server *srv = ep->srv;
  for (;;) {
    loom_conn *c;
    int rc = loom_accept(ep->ln, &c);
    if (rc == 0) {
      start_session(ep, c);
      continue;
    }
    if (stopping(srv))
      break;
    /* loom_accept itself waits out running out of descriptors; what
     * reaches here is unexpected.  Say so, and do not spin on it. */
    fprintf(stderr, "echo_server: %s: accept: %s\n", ep->shown,
            loom_strerror(rc));
    if (rc == LOOM_ECLOSED)
      break;
    loom_sleep(100 * MS);
  }
  pthread_mutex_lock(&srv->mu);
  ep->closed = true;
  pthread_mutex_unlock(&srv->mu);
  loom_listener_close(ep->ln);
  atomic_fetch_sub(&srv->alive, 1);
}

/* ---- packet: one coroutine per socket --------------------------------- */

static void packet_loop(void *arg) {
  struct endpoint *ep = arg;
  struct server *srv = ep->srv;
  bool told_unnamed = false;
  char *buf = malloc(DGRAM_BUF);
  if (buf == NULL)
    fprintf(stderr, "echo_server: %s: out of memory\n", ep->shown);
  while (buf != NULL) {
    struct sockaddr_storage from;
    socklen_t fromlen = sizeof from;
    ssize_t n = loom_pconn_read_from(ep->pc, buf, DGRAM_BUF, &from, &fromlen);
    if (n < 0) {
      if (stopping(srv))
        break;
      fprintf(stderr, "echo_server: %s: read: %s\n", ep->shown,
              loom_strerror((int)n));
      if (n == LOOM_ECLOSED)
        break;
      loom_sleep(10 * MS); /* do not spin on a persistent error */
      continue;
    }
    if ((size_t)n > DGRAM_BUF) {
      /* The read reports a datagram's full length: this one was cut. */
      fprintf(stderr,
              "echo_server: %s: dropped a %zd-byte datagram (the buffer "
              "holds %d)\n",
              ep->shown, n, DGRAM_BUF);
      continue;
    }
    if (fromlen <= sizeof(sa_family_t)) {
      /* A Unix datagram from a socket with no address: nowhere to send
       * the echo.  (socat and `nc -uU` bind one; a bare sendto does not.) */
      if (!told_unnamed)
        fprintf(stderr,
                "echo_server: %s: datagram from an unbound socket, cannot "
                "answer (bind the client to an address)\n",
                ep->shown);
      told_unnamed = true;
      continue;
    }
    ssize_t w = loom_pconn_write_to(ep->pc, buf, (size_t)n,
                                    (struct sockaddr *)&from, fromlen);
    if (w < 0) {
      if (stopping(srv))
        break;
      /* The sender may be gone (its Unix socket closed): not our problem. */
      if (!srv->quiet)
        fprintf(stderr, "echo_server: %s: reply: %s\n", ep->shown,
                loom_strerror((int)w));
      continue;
    }
    atomic_fetch_add_explicit(&srv->datagrams, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&srv->dgram_bytes, (unsigned long)n,
                              memory_order_relaxed);
  }
  pthread_mutex_lock(&srv->mu);
  ep->closed = true;
  pthread_mutex_unlock(&srv->mu);
  loom_pconn_close(ep->pc);
  free(buf);
  atomic_fetch_sub(&srv->alive, 1);
}

/* ---- the main coroutine ----------------------------------------------- */

static int open_endpoint(struct endpoint *ep) {
  char bound[256];
  int rc, addr_rc;
  if (ep->url.packet) {
    rc = loom_listen_packet(&ep->pc, ep->url.network, ep->url.addr);
    addr_rc = rc != 0 ? rc : loom_pconn_local_addr(ep->pc, bound, sizeof bound);
  } else {
    rc = loom_listen(&ep->ln, ep->url.network, ep->url.addr);
    addr_rc = rc != 0 ? rc : loom_listener_addr(ep->ln, bound, sizeof bound);
  }
  if (rc != 0)
    return rc;
  if (addr_rc != 0) /* cannot happen with our buffer size; show the ask */
    snprintf(bound, sizeof bound, "%s", ep->url.addr);
  echo_url_format(ep->shown, sizeof ep->shown, ep->url.network, bound);
  return 0;
}

/* Close a socket that no coroutine owns (startup failed part-way). */
static void close_unowned(struct endpoint *ep) {
  pthread_mutex_lock(&ep->srv->mu);
  ep->closed = true;
  pthread_mutex_unlock(&ep->srv->mu);
  if (ep->ln != NULL)
    loom_listener_close(ep->ln);
  if (ep->pc != NULL)
    loom_pconn_close(ep->pc);
}

/* Wait for SIGINT/SIGTERM or the end of --duration. */
static void wait_for_stop(struct server *srv) {
  int64_t deadline = srv->duration > 0 ? loom_now() + srv->duration : 0;
  for (;;) {
    int rc = loom_fd_wait(srv->sigfd, LOOM_FD_READ, deadline);
    if (rc == -ETIMEDOUT) {
      printf("echo_server: %g s elapsed, stopping\n",
             (double)srv->duration / 1e9);
      return;
    }
    if (rc != 0) {
      fprintf(stderr, "echo_server: waiting for signals: %s; stopping\n",
              loom_strerror(rc));
      return;
    }
    struct signalfd_siginfo si;
    if (read(srv->sigfd, &si, sizeof si) == (ssize_t)sizeof si) {
      printf("echo_server: %s, stopping\n", strsignal((int)si.ssi_signo));
      return;
    }
    /* EAGAIN: readiness is a hint; wait again. */
  }
}

/* Wake every socket's owner with a deadline in the past. */
static void stop_all(struct server *srv) {
  pthread_mutex_lock(&srv->mu);
  srv->stopping = true;
  for (int i = 0; i < srv->neps; i++) {
    struct endpoint *ep = &srv->eps[i];
    if (ep->closed)
      continue;
    if (ep->ln != NULL)
      loom_listener_set_deadline(ep->ln, 1);
    if (ep->pc != NULL)
      loom_pconn_set_deadline(ep->pc, 1, 1);
  }
  for (struct session *s = srv->sessions; s != NULL; s = s->next)
    loom_set_deadline(s->c, 1, 1);
  pthread_mutex_unlock(&srv->mu);
}

static void server_main(void *arg) {
  struct server *srv = arg;
  int opened = 0;
  for (; opened < srv->neps; opened++) {
    struct endpoint *ep = &srv->eps[opened];
    char want[320];
    echo_url_format(want, sizeof want, ep->url.network, ep->url.addr);
    int rc = open_endpoint(ep);
    if (rc != 0) {
      fprintf(stderr, "echo_server: cannot listen on %s: %s\n", want,
              loom_strerror(rc));
      srv->failed = true;
      break;
    }
  }
  for (int i = 0; i < opened && !srv->failed; i++)
    printf("echo_server: listening on %s\n", srv->eps[i].shown);
  /* Every socket is open before any coroutine serves one, so a failure
   * above leaves nothing running. */
  for (int i = 0; i < opened; i++) {
    struct endpoint *ep = &srv->eps[i];
    if (!srv->failed) {
      atomic_fetch_add(&srv->alive, 1);
      int rc = loom_go(ep->ln != NULL ? accept_loop : packet_loop, ep);
      if (rc == 0)
        continue;
      atomic_fetch_sub(&srv->alive, 1);
      fprintf(stderr, "echo_server: loom_go: %s\n", loom_strerror(rc));
      srv->failed = true;
    }
    close_unowned(ep);
  }
  if (!srv->failed) {
    if (srv->duration > 0)
      printf("echo_server: %d procs; stopping after %g s or at "
             "SIGINT/SIGTERM\n",
             loom_procs(), (double)srv->duration / 1e9);
    else
      printf("echo_server: %d procs; Ctrl-C (SIGINT) or SIGTERM stops it\n",
             loom_procs());
    wait_for_stop(srv);
  }
  stop_all(srv);
  int64_t give_up = loom_now() + STOP_WAIT;
  while (atomic_load(&srv->alive) > 0 && loom_now() < give_up)
    loom_sleep(2 * MS);
  if (atomic_load(&srv->alive) > 0)
    fprintf(stderr, "echo_server: %d coroutines did not stop in time\n",
            atomic_load(&srv->alive));
  if (srv->failed)
    return;
  printf("echo_server: served %lu connections (%lu bytes) and %lu datagrams "
         "(%lu bytes)\n",
         atomic_load(&srv->conns), atomic_load(&srv->stream_bytes),
         atomic_load(&srv->datagrams), atomic_load(&srv->dgram_bytes));
}

/* ---- command line ----------------------------------------------------- */

static void usage(FILE *f) {
  fprintf(f,
          "usage: %s [--listen URL]... [--duration SECONDS] [--procs N] "
          "[--quiet]\n"
          "\n"
          "Echoes everything it receives, on every URL at once:\n"
          "  tcp://HOST:PORT  tcp4://HOST:PORT  tcp6://[V6ADDR]:PORT\n"
          "  udp://HOST:PORT  udp4://HOST:PORT  udp6://[V6ADDR]:PORT\n"
          "  unix:///PATH     unix://@ABSTRACT\n"
          "  unixgram:///PATH unixgram://@ABSTRACT\n"
          "PORT 0 picks a free port; an empty HOST (tcp://:7000) listens on\n"
          "every address.  Default: --listen tcp://127.0.0.1:7000.\n"
          "\n"
          "  --listen URL        listen on URL (repeat for more, at most %d)\n"
          "  --duration SECONDS  stop after SECONDS (default 0: run until\n"
          "                      SIGINT or SIGTERM)\n"
          "  --procs N           processors (default: LOOM_PROCS or the "
          "CPUs)\n"
          "  --quiet             do not print a line per connection\n",
          PROG, MAX_ENDPOINTS);
}

static int bad_usage(const char *fmt, ...)
    __attribute__((format(printf, 1, 2)));

/* A message about the command line, the usage, and exit status 2. */
static int bad_usage(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "%s: ", PROG);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fprintf(stderr, "\n\n");
  usage(stderr);
  return 2;
}

int main(int argc, char **argv) {
  static struct server srv = {.mu = PTHREAD_MUTEX_INITIALIZER, .sigfd = -1};
  int procs = 0;
  for (int i = 1; i < argc; i++) {
    bool missing = false;
    const char *v;
    char err[300];
    if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
      usage(stdout);
      return 0;
    } else if (!strcmp(argv[i], "-q") || !strcmp(argv[i], "--quiet")) {
      srv.quiet = true;
    } else if ((v = cli_option(argc, argv, &i, "--listen", &missing)) != NULL) {
      if (srv.neps == MAX_ENDPOINTS)
        return bad_usage("more than %d --listen URLs", MAX_ENDPOINTS);
      if (echo_url_parse(v, &srv.eps[srv.neps].url, err, sizeof err) != 0)
        return bad_usage("--listen %s", err);
      srv.eps[srv.neps].srv = &srv;
      srv.neps++;
    } else if ((v = cli_option(argc, argv, &i, "--duration", &missing)) !=
               NULL) {
      char *end;
      errno = 0;
      double d = strtod(v, &end);
      if (errno != 0 || end == v || *end != '\0' || !(d >= 0) || d > 1e9)
        return bad_usage("--duration \"%s\": want seconds >= 0", v);
      srv.duration = (int64_t)(d * 1e9);
      if (d > 0 && srv.duration == 0) /* 0 would mean "until a signal" */
        srv.duration = 1;
    } else if ((v = cli_option(argc, argv, &i, "--procs", &missing)) != NULL) {
      char *end;
      long n = strtol(v, &end, 10);
      if (end == v || *end != '\0' || n < 1 || n > 1024)
        return bad_usage("--procs \"%s\": want 1 to 1024", v);
      procs = (int)n;
    } else if (missing) {
      return bad_usage("%s needs a value", argv[i]);
    } else {
      return bad_usage("unknown argument \"%s\"", argv[i]);
    }
  }
  if (srv.neps == 0) {
    char err[300];
    if (echo_url_parse("tcp://127.0.0.1:7000", &srv.eps[0].url, err,
                       sizeof err) != 0)
      return 1; /* cannot happen */
    srv.eps[0].srv = &srv;
    srv.neps = 1;
  }

  setvbuf(stdout, NULL, _IOLBF, 0); /* a line at a time, also into a pipe */
  for (int i = 0; i < srv.neps; i++)
    cli_remove_stale_socket("echo_server", srv.eps[i].url.network,
                            srv.eps[i].url.addr);

  /* Blocked here, in the thread that becomes the runtime's first, so every
   * runtime thread inherits the mask and the signals wait in the signalfd
   * instead of killing the process. */
  sigset_t stop_sigs;
  sigemptyset(&stop_sigs);
  sigaddset(&stop_sigs, SIGINT);
  sigaddset(&stop_sigs, SIGTERM);
  int rc = pthread_sigmask(SIG_BLOCK, &stop_sigs, NULL);
  if (rc == 0)
    srv.sigfd = signalfd(-1, &stop_sigs, SFD_NONBLOCK | SFD_CLOEXEC);
  if (rc != 0 || srv.sigfd < 0) {
    perror("echo_server: signalfd");
    return 1;
  }

  loom_config cfg;
  loom_config_init(&cfg); /* defaults, then LOOM_* from the environment */
  if (procs > 0)
    cfg.procs = procs;
  rc = loom_run(server_main, &srv, &cfg);
  close(srv.sigfd);
  if (rc != 0) {
    fprintf(stderr, "echo_server: loom_run: %s\n", loom_strerror(rc));
    return 1;
  }
  return srv.failed ? 1 : 0;
}
