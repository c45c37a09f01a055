/*
 * epoll_echo.c — the C reference of the echo bench: what a hand-written
 * event loop costs, the practical limit for loom's echo server.
 *
 * N threads (default 2), each with its own epoll instance and its own
 * listening socket on the same port (SO_REUSEPORT: the kernel spreads new
 * connections over the listeners), so the threads share nothing.  Sockets
 * are non-blocking and registered once, edge-triggered, for input and
 * output (no epoll_ctl per message — the same registration loom's and
 * Go's pollers make).  On input the loop reads into the thread's 16 KiB
 * buffer and writes it straight back, until read says EAGAIN (the
 * canonical edge-triggered loop: the same read, write, read-EAGAIN
 * sequence per message as the loom and Go servers).  What the socket does
 * not take goes to the connection's pending-output buffer; while it is not
 * empty the connection reads nothing more (back-pressure), and once
 * EPOLLOUT has drained it, reading resumes.
 *
 * Usage: epoll_echo [--addr HOST:PORT] [--threads N]   (default
 * 127.0.0.1:7000, 2 threads).  Runs until killed.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF_SIZE 16384

struct conn {
  int fd;
  bool read_blocked; /* input waits until `pend` is drained */
  char *pend;        /* output the socket did not take yet */
  size_t poff, plen, pcap;
};

static struct sockaddr_in addr;
static char listener_tag; /* epoll data.ptr of the listening socket */

static int listen_reuseport(void) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  int one = 1;
  if (fd < 0 ||
      setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
      setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0 ||
      bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0 ||
      listen(fd, SOMAXCONN) != 0) {
    perror("epoll_echo: listen");
    exit(1);
  }
  return fd;
}

static void conn_close(struct conn *c) {
  close(c->fd); /* also leaves the epoll set */
  free(c->pend);
  free(c);
}

/* Keep buf[0..n) for later; false if out of memory. */
static bool pend_add(struct conn *c, const char *buf, size_t n) {
  if (c->plen + n > c->pcap) {
    size_t cap = c->pcap ? c->pcap : BUF_SIZE;
    while (cap < c->plen + n)
      cap *= 2;
    char *p = realloc(c->pend, cap);
    if (p == NULL)
      return false;
    c->pend = p;
    c->pcap = cap;
  }
  memcpy(c->pend + c->plen, buf, n);
  c->plen += n;
  return true;
}

/* Write out the pending buffer: 1 drained, 0 not yet, -1 error. */
static int pend_flush(struct conn *c) {
  while (c->poff < c->plen) {
    ssize_t w = send(c->fd, c->pend + c->poff, c->plen - c->poff,
                     MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR)
        continue;
      return errno == EAGAIN ? 0 : -1;
    }
    c->poff += (size_t)w;
  }
  c->poff = c->plen = 0;
  return 1;
}

/* Echo until the socket has nothing more to read: false if c is closed. */
static bool on_input(struct conn *c, char *buf) {
  if (c->plen > 0) {
    c->read_blocked = true;
    return true;
  }
  for (;;) {
    ssize_t r = read(c->fd, buf, BUF_SIZE);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      if (errno == EAGAIN)
        return true;
      break;
    }
    if (r == 0)
      break;
    ssize_t w = send(c->fd, buf, (size_t)r, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno != EAGAIN)
        break;
      w = 0;
    }
    if (w < r) {
      if (!pend_add(c, buf + w, (size_t)(r - w)))
        break;
      c->read_blocked = true; /* EPOLLOUT resumes us */
      return true;
    }
  }
  conn_close(c);
  return false;
}

/* Accept everything in the backlog; true if out of descriptors (the
 * caller retries in 10 ms rather than spin: nothing wakes it otherwise,
 * the backlog edge has passed). */
static bool accept_all(int lfd, int ep) {
  for (;;) {
    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED)
        continue;
      return errno == EMFILE || errno == ENFILE || errno == ENOMEM ||
             errno == ENOBUFS;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct conn *c = calloc(1, sizeof *c);
    struct epoll_event ev = {
        .events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = c};
    if (c == NULL) {
      close(fd);
      continue;
    }
    c->fd = fd;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) != 0)
      conn_close(c);
  }
}

static void *loop(void *arg) {
  (void)arg;
  char *buf = malloc(BUF_SIZE);
  int ep = epoll_create1(EPOLL_CLOEXEC);
  int lfd = listen_reuseport();
  struct epoll_event ev = {.events = EPOLLIN | EPOLLET,
                           .data.ptr = &listener_tag};
  if (buf == NULL || ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev) != 0) {
    perror("epoll_echo: setup");
    exit(1);
  }
  struct epoll_event evs[256];
  bool starved = false;
  for (;;) {
    int n = epoll_wait(ep, evs, 256, starved ? 10 : -1);
    if (n < 0) {
      if (errno == EINTR)
        continue;
      perror("epoll_echo: epoll_wait");
      exit(1);
    }
    if (starved)
      starved = accept_all(lfd, ep);
    for (int i = 0; i < n; i++) {
      if (evs[i].data.ptr == &listener_tag) {
        starved = accept_all(lfd, ep);
        continue;
      }
      struct conn *c = evs[i].data.ptr;
      uint32_t e = evs[i].events;
      if ((e & EPOLLOUT) && c->plen > 0) {
        int f = pend_flush(c);
        if (f < 0) {
          conn_close(c);
          continue;
        }
        if (f > 0 && c->read_blocked) {
          c->read_blocked = false;
          on_input(c, buf); /* reads whatever came meanwhile */
          continue;
        }
      }
      if (e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        on_input(c, buf);
    }
  }
  return NULL;
}

int main(int argc, char **argv) {
  const char *a = "127.0.0.1:7000";
  int threads = 2;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (strcmp(argv[i], "--addr") == 0)
      a = argv[i + 1];
    else if (strcmp(argv[i], "--threads") == 0)
      threads = atoi(argv[i + 1]);
    else
      break;
  }
  if (argc % 2 == 0 || threads < 1) {
    fprintf(stderr, "usage: epoll_echo [--addr HOST:PORT] [--threads N]\n");
    return 2;
  }
  char host[64];
  const char *colon = strrchr(a, ':');
  if (colon == NULL || (size_t)(colon - a) >= sizeof host) {
    fprintf(stderr, "epoll_echo: bad address '%s'\n", a);
    return 2;
  }
  memcpy(host, a, (size_t)(colon - a));
  host[colon - a] = '\0';
  addr.sin_family = AF_INET;
  addr.sin_port = htons((uint16_t)atoi(colon + 1));
  if (inet_pton(AF_INET, host[0] ? host : "0.0.0.0", &addr.sin_addr) != 1) {
    fprintf(stderr, "epoll_echo: bad IPv4 address '%s'\n", host);
    return 2;
  }
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
  signal(SIGPIPE, SIG_IGN);
  for (int i = 1; i < threads; i++) {
    pthread_t t;
    if (pthread_create(&t, NULL, loop, NULL) != 0) {
      fprintf(stderr, "epoll_echo: cannot start thread %d\n", i);
      return 1;
    }
  }
  loop(NULL);
  return 0;
}
