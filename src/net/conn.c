/*
 * conn.c — stream connections: dial, read, write, deadlines, close.
 *
 * Every operation is the same loop: try the system call; on EAGAIN park
 * on the poll descriptor for that direction and try again when it is
 * ready.  errno is read with loom__errno(): after a park the coroutine
 * may be on another thread, and the compiler may have kept the first
 * thread's errno address.
 * Writes use send/sendmsg with MSG_NOSIGNAL: a vanished peer is -EPIPE,
 * never a SIGPIPE.
 */
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "ctx/ctx_internal.h"
#include "loom/net.h"
#include "net/addr.h"
#include "net/export_test.h"
#include "net/netfd.h"
#include "runtime/alloc.h"
#include "runtime/runtime.h"

struct loom_conn {
  loom__netfd nf; /* first: the netfd's free_fn gets the conn back */
  /* The peer's address as accept or connect gave it (peerlen 0: not
   * known).  Set before the conn is handed out, then never changed: any
   * thread may read it, and it outlives a reset, which getpeername does
   * not.  Only its own length is allocated (16 bytes for IPv4, not a
   * sockaddr_storage's 128: an idle connection's memory counts). */
  socklen_t peerlen;
  uint64_t peer[]; /* words, for the sockaddr's alignment */
};

static void conn_free(loom__netfd *f) { loom__free(f); }

int loom__conn_new(int fd, int family, const struct sockaddr *peer,
                   socklen_t peerlen, loom_conn **out) {
  if (peer == NULL || peerlen > sizeof(struct sockaddr_storage))
    peerlen = 0;
  size_t words = ((size_t)peerlen + sizeof(uint64_t) - 1) / sizeof(uint64_t);
  loom_conn *c = loom__calloc(1, sizeof *c + words * sizeof(uint64_t));
  int err =
      c == NULL ? -ENOMEM : loom__netfd_init(&c->nf, fd, family, SOCK_STREAM);
  if (err != 0) {
    loom__free(c);
    close(fd);
    return err;
  }
  c->nf.free_fn = conn_free;
  if (peerlen > 0) {
    memcpy(c->peer, peer, peerlen);
    c->peerlen = peerlen;
  }
  if (family == AF_INET || family == AF_INET6) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  *out = c;
  return 0;
}

/* A call on c: -EINVAL, LOOM_ENOTCO, or 0 (it may go on to take c). */
static int callable(loom_conn *c) {
  if (c == NULL)
    return -EINVAL;
  return loom__net_callable();
}

/*
 * A TCP read that returned less than asked for emptied the socket's
 * receive queue, and whatever arrives after it raises a new edge-
 * triggered event.  So the next read waits for readiness first instead of
 * calling read() for an EAGAIN: one system call less per message in a
 * request-response exchange, a third of an echo server's.  If the event
 * came already, the wait returns at once.  Two short reads do not
 * empty the queue and are excluded: one that stops at the urgent mark
 * (data follows it) and one that stops at the peer's FIN (the EOF
 * follows); the events that brought those set pd->hangup before waking
 * us, and then the read goes first as before.  Unix stream sockets stop
 * short at credential and descriptor boundaries, so they always do.
 */
static bool wait_first(loom__netfd *f) {
  return f->drained && (f->family == AF_INET || f->family == AF_INET6) &&
         !loom__pd_hungup(f->pd);
}

/*
 * A read of no bytes: wait until a read would not block, and consume
 * nothing.  After a short read the poller's event says so (every read
 * forgets the readiness recorded before it began, so an event that is
 * left came later: bytes that landed while that read ran are the one
 * exception); otherwise a one-byte peek asks the socket.  A peek that
 * finds an error has taken it from the socket, so it is returned here,
 * not left for the read.
 */
static ssize_t wait_readable(loom__netfd *f) {
  if (wait_first(f)) {
    int w = loom__pd_wait(f->pd, 'r');
    if (w != 0)
      return w;
    return loom__netfd_check(f, 'r');
  }
  loom__pd_consume(f->pd, 'r'); /* the peek sees what it announced */
  for (;;) {
    int err = loom__netfd_check(f, 'r');
    if (err != 0)
      return err;
    char b;
    if (recv(f->fd, &b, 1, MSG_PEEK) >= 0)
      return 0;
    int e = loom__errno();
    if (e == EINTR)
      continue;
    if (e != EAGAIN)
      return -e;
    int w = loom__pd_wait(f->pd, 'r');
    if (w != 0)
      return w;
  }
}

/* loom_read, and loom_read_ctx with a ctx. */
static ssize_t read_impl(loom_conn *c, void *buf, size_t len, loom_ctx *ctx) {
  int err = callable(c);
  if (err != 0)
    return err;
  loom__netfd *f = &c->nf;
  loom__netfd_call call;
  err = loom__netfd_enter(f, 'r', ctx, &call);
  if (err != 0) { /* closed, a done ctx: a loop on it must yield too */
    loom__io_progress();
    return err;
  }
  ssize_t r;
  if (len == 0) {
    r = wait_readable(f);
    f->drained = false; /* the event, if any, is spent: read first */
    r = loom__netfd_leave(&call, r);
    loom__io_progress(); /* one that did not wait is no scheduling point */
    return r;
  }
  /* An error (a deadline, a close) shows in the read's own wait. */
  if (wait_first(f))
    (void)loom__pd_wait(f->pd, 'r');
  else
    loom__pd_consume(f->pd, 'r'); /* the read sees what it announced */
  for (;;) {
    r = loom__netfd_check(f, 'r'); /* closed, or past the deadline */
    if (r != 0)
      break;
    r = read(f->fd, buf, len);
    if (r >= 0)
      break;
    int e = loom__errno();
    if (e == EINTR)
      continue;
    if (e == EAGAIN) {
      int w = loom__pd_wait(f->pd, 'r');
      if (w != 0) {
        r = w;
        break;
      }
      continue;
    }
    r = -e;
    break;
  }
  f->drained = r > 0 && (size_t)r < len;
  r = loom__netfd_leave(&call, r);
  loom__io_progress(); /* failed at once or not: see net.h */
  return r;
}

ssize_t loom_read(loom_conn *c, void *buf, size_t len) {
  return read_impl(c, buf, len, NULL);
}

/* Send everything in iov[0..n), advancing it in place; *sent says how
 * much went, also when it fails part way. */
__attribute__((always_inline)) static inline ssize_t
send_all(loom__netfd *f, struct iovec *iov, int n, size_t total, size_t *sent) {
  size_t done = 0;
  /* Nothing to send still obeys a passed deadline (as Go's prepareWrite):
   * the loop below would not look. */
  if (total == 0)
    return loom__netfd_check(f, 'w');
  while (done < total) {
    int err = loom__netfd_check(f, 'w'); /* closed, or past the deadline */
    if (err != 0)
      return err;
    ssize_t w;
    if (n == 1) {
      w = send(f->fd, iov->iov_base, iov->iov_len, MSG_NOSIGNAL);
    } else {
      struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)n};
      w = sendmsg(f->fd, &mh, MSG_NOSIGNAL);
    }
    if (w < 0) {
      int e = loom__errno();
      if (e == EINTR)
        continue;
      if (e == EAGAIN) {
        int r = loom__pd_wait(f->pd, 'w');
        if (r != 0)
          return r;
        continue;
      }
      return -e;
    }
    done += (size_t)w;
    *sent = done;
    size_t k = (size_t)w;
    while (n > 0 && k >= iov->iov_len) {
      k -= iov->iov_len;
      iov++;
      n--;
    }
    if (n > 0) {
      iov->iov_base = (char *)iov->iov_base + k;
      iov->iov_len -= k;
    }
  }
  return (ssize_t)total;
}

/* loom_writev, and loom_writev_ctx / loom_write_ctx with a ctx. */
static ssize_t writev_impl(loom_conn *c, const struct iovec *iov, int iovcnt,
                           loom_ctx *ctx, size_t *sent) {
  *sent = 0;
  if (iovcnt < 0 || iovcnt > IOV_MAX || (iovcnt > 0 && iov == NULL))
    return -EINVAL;
  size_t total = 0;
  for (int i = 0; i < iovcnt; i++) {
    if (iov[i].iov_len > (size_t)SSIZE_MAX - total)
      return -EINVAL;
    total += iov[i].iov_len;
  }
  int err = callable(c);
  if (err != 0)
    return err;
  struct iovec small[16], *copy = small;
  if (iovcnt > 16 &&
      (copy = loom__malloc((size_t)iovcnt * sizeof *copy)) == NULL)
    return -ENOMEM;
  if (iovcnt > 0)
    memcpy(copy, iov, (size_t)iovcnt * sizeof *copy);
  loom__netfd_call call;
  ssize_t r = loom__netfd_enter(&c->nf, 'w', ctx, &call);
  if (r == 0)
    r = loom__netfd_leave(&call, send_all(&c->nf, copy, iovcnt, total, sent));
  if (copy != small)
    loom__free(copy);
  loom__io_progress();
  return r;
}

ssize_t loom_writev(loom_conn *c, const struct iovec *iov, int iovcnt) {
  size_t sent;
  return writev_impl(c, iov, iovcnt, NULL, &sent);
}

ssize_t loom__writev_sent(loom_conn *c, const struct iovec *iov, int iovcnt,
                          size_t *sent) {
  return writev_impl(c, iov, iovcnt, NULL, sent);
}

ssize_t loom_write(loom_conn *c, const void *buf, size_t len) {
  if (len > (size_t)SSIZE_MAX)
    return -EINVAL;
  struct iovec iov = {(void *)(uintptr_t)buf, len};
  return loom_writev(c, &iov, 1);
}

int loom_set_read_deadline(loom_conn *c, int64_t rd) {
  return loom__netfd_set_deadline(c ? &c->nf : NULL, 'r', rd);
}

int loom_set_write_deadline(loom_conn *c, int64_t wd) {
  return loom__netfd_set_deadline(c ? &c->nf : NULL, 'w', wd);
}

int loom_set_deadline(loom_conn *c, int64_t rd, int64_t wd) {
  return c == NULL ? -EINVAL : loom__netfd_set_deadlines(&c->nf, rd, wd);
}

int loom_shutdown(loom_conn *c, int how) {
  if (c == NULL || (how != SHUT_RD && how != SHUT_WR && how != SHUT_RDWR))
    return -EINVAL;
  if (!loom__netfd_acquire(&c->nf))
    return LOOM_ECLOSED;
  int r = shutdown(c->nf.fd, how) == 0 ? 0 : -loom__errno();
  loom__netfd_release(&c->nf);
  return r;
}

int loom_close(loom_conn *c) {
  if (c == NULL)
    return -EINVAL;
  return loom__netfd_close(&c->nf);
}

int loom_conn_fd(loom_conn *c) { return c ? c->nf.fd : -EINVAL; }

int loom_conn_local_addr(loom_conn *c, char *buf, size_t len) {
  return c == NULL ? -EINVAL : loom__fd_addr(c->nf.fd, false, buf, len);
}

int loom_conn_remote_addr(loom_conn *c, char *buf, size_t len) {
  if (c == NULL || buf == NULL)
    return -EINVAL;
  if (c->peerlen > 0)
    return loom__format_addr((const struct sockaddr *)c->peer, c->peerlen, buf,
                             len);
  return loom__fd_addr(c->nf.fd, true, buf, len);
}

static int opt(loom_conn *c, int level, int name, int v) {
  if (c == NULL)
    return -EINVAL;
  return setsockopt(c->nf.fd, level, name, &v, sizeof v) == 0 ? 0
                                                              : -loom__errno();
}

int loom_conn_set_nodelay(loom_conn *c, bool on) {
  return opt(c, IPPROTO_TCP, TCP_NODELAY, on);
}

int loom_conn_set_keepalive(loom_conn *c, bool on, int idle_s) {
  int err = 0;
  /* The TCP options first: a socket without them (Unix) fails before
   * keep-alive is turned on, so a failure changes nothing. */
  if (on && idle_s > 0) {
    err = opt(c, IPPROTO_TCP, TCP_KEEPIDLE, idle_s);
    if (err == 0)
      err = opt(c, IPPROTO_TCP, TCP_KEEPINTVL, idle_s);
  }
  return err != 0 ? err : opt(c, SOL_SOCKET, SO_KEEPALIVE, on);
}

int loom_conn_set_buffers(loom_conn *c, int rcvbuf, int sndbuf) {
  return c == NULL ? -EINVAL : loom__netfd_set_buffers(&c->nf, rcvbuf, sndbuf);
}

/* ---- dialing -------------------------------------------------------- */

/* After connect()'s EINPROGRESS: wait until the socket is connected or
 * has failed.  Writability alone does not say which: a socket registered
 * before connect() is reported writable and hung up at once, and if the
 * poller takes that event before the connection exists, the wait returns
 * with SO_ERROR still 0 (Go's issues 14548 and 19289).  So a 0 is
 * confirmed with getpeername, and ENOTCONN means wait again. */
static int wait_connected(loom__netfd *f) {
  for (;;) {
    int err = loom__pd_wait(f->pd, 'w');
    if (err != 0)
      return err;
    int soerr = 0;
    socklen_t sl = sizeof soerr;
    if (getsockopt(f->fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) != 0)
      return -loom__errno();
    switch (soerr) {
    case 0: {
      struct sockaddr_storage ss;
      socklen_t len = sizeof ss;
      if (getpeername(f->fd, (struct sockaddr *)&ss, &len) == 0)
        return 0;
      if (loom__errno() != ENOTCONN)
        return -loom__errno();
      break; /* not connected yet */
    }
    case EINPROGRESS:
    case EALREADY:
    case EINTR:
      break;
    case EISCONN:
      return 0;
    default:
      return -soerr;
    }
  }
}

/* A Unix listener's backlog is full: a blocking connect() would wait for
 * room, but there is no event for it, so try again, backing off from 1
 * to 32 ms, until the dial's deadline or a cancel (which expire the
 * write deadline: loom__netfd_check). */
static int wait_backlog(loom__netfd *f, const struct sockaddr *sa,
                        socklen_t len, int64_t deadline) {
  int64_t pause = 1000000;
  for (;;) {
    int err = loom__netfd_check(f, 'w');
    if (err != 0)
      return err;
    /* Compared before subtracting, as everywhere: a deadline long past
     * (INT64_MIN) minus now overflows. */
    int64_t nap = pause, now = loom_now();
    if (deadline != 0 && deadline < now + nap)
      nap = deadline > now ? deadline - now : 0;
    loom_sleep(nap);
    if (pause < 32000000)
      pause *= 2;
    if (connect(f->fd, sa, len) == 0)
      return 0;
    int e = loom__errno();
    if (e != EAGAIN)
      return e == EINPROGRESS ? wait_connected(f) : -e;
  }
}

static int dial_one(const struct sockaddr *sa, socklen_t len, int type,
                    int64_t deadline, loom_ctx *ctx, loom_conn **out) {
  int fd = socket(sa->sa_family, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return -loom__errno();
  loom_conn *c;
  int err = loom__conn_new(fd, sa->sa_family, sa, len, &c);
  if (err != 0)
    return err;
  if (deadline != 0)
    err = loom__pd_set_deadline(c->nf.pd, 'w', deadline);
  loom__ctx_hook h = {.fn = loom__pd_expire_write, .arg = c->nf.pd};
  bool hooked = false;
  if (err == 0 && ctx != NULL) {
    hooked = loom__ctx_hook_add(ctx, &h, loom__getg());
    if (!hooked)
      err = loom__ctx_reason(ctx);
  }
  if (err == 0 && connect(fd, sa, len) != 0) {
    err = -loom__errno();
    if (err == -EINPROGRESS)
      err = wait_connected(&c->nf);
    if (err == -EAGAIN && sa->sa_family == AF_UNIX)
      err = wait_backlog(&c->nf, sa, len, deadline);
  }
  if (hooked) {
    loom__ctx_unhook(ctx, &h);
    if (err == -ETIMEDOUT && loom__ctx_reason(ctx) != 0)
      err = loom__ctx_reason(ctx);
  }
  if (err == 0 && (sa->sa_family == AF_INET || sa->sa_family == AF_INET6) &&
      loom__self_connected(fd))
    err = -EADDRNOTAVAIL; /* a local port connected to itself */
  if (err == 0 && (deadline != 0 || hooked))
    err = loom__pd_set_deadline(c->nf.pd, 'w', 0);
  if (err != 0) {
    loom__netfd_close(&c->nf);
    return err;
  }
  *out = c;
  return 0;
}

/* The deadline for one of `left` addresses still to try, from `now`,
 * of a dial that must be done by `deadline` (0: none, and none for the
 * address either): an even share of the time left, so that one address
 * that never answers leaves time for the others, as Go's dial does.  A
 * share too short to connect anywhere real is raised to DIAL_MIN_NS
 * (the later addresses get less), or to all the time left if that is
 * less. */
#define DIAL_MIN_NS (2000 * INT64_C(1000000))
static int64_t share_deadline(int64_t now, int64_t deadline, int left) {
  if (deadline == 0)
    return 0;
  int64_t rest = deadline - now, part = rest / left;
  if (part < DIAL_MIN_NS)
    part = rest < DIAL_MIN_NS ? rest : DIAL_MIN_NS;
  return now + part;
}

int loom_dial_with(loom_conn **c, const char *network, const char *addr,
                   const loom_dial_opts *o) {
  if (c == NULL)
    return -EINVAL;
  if (loom__net_callable() != 0)
    return LOOM_ENOTCO;
  int64_t deadline = o != NULL ? o->deadline : 0;
  loom_ctx *ctx = o != NULL ? o->ctx : NULL;
  if (ctx != NULL && loom__ctx_reason(ctx) != 0)
    return loom__ctx_reason(ctx);
  /* The context's deadline bounds the dial as much as the dial's own,
   * and is shared out over the addresses the same way. */
  int64_t cd = ctx != NULL ? loom_ctx_deadline(ctx) : 0;
  if (cd > 0 && (deadline == 0 || cd < deadline))
    deadline = cd;
  loom__addrs as;
  /* The lookup counts against the dial's deadline and context. */
  int err = loom__resolve_type_until(network, addr, false, SOCK_STREAM, &as,
                                     deadline, ctx);
  if (err != 0)
    return err;
  err = LOOM_ENOHOST;
  for (int i = 0; i < as.n; i++) {
    int64_t now = loom_now();
    if (deadline != 0 && now >= deadline)
      return -ETIMEDOUT;
    int64_t part = share_deadline(now, deadline, as.n - i);
    for (int tries = 0; tries < 3; tries++) {
      err = dial_one((struct sockaddr *)&as.a[i], as.len[i], SOCK_STREAM, part,
                     ctx, c);
      if (err != -EADDRNOTAVAIL)
        break;
    }
    if (err == 0 || err == -ECANCELED)
      return err;
    /* A timeout of this address's share moves on to the next address;
     * one of the whole dial, or of its context, ends it. */
    if (err == -ETIMEDOUT && ((ctx != NULL && loom__ctx_reason(ctx) != 0) ||
                              (deadline != 0 && loom_now() >= deadline)))
      return err;
  }
  return err;
}

int loom_dial(loom_conn **c, const char *network, const char *addr) {
  return loom_dial_with(c, network, addr, NULL);
}

/* ---- bounded by a context ------------------------------------------- */

ssize_t loom_read_ctx(loom_conn *c, void *buf, size_t len, loom_ctx *ctx) {
  return read_impl(c, buf, len, ctx);
}

ssize_t loom_writev_ctx(loom_conn *c, const struct iovec *iov, int iovcnt,
                        loom_ctx *ctx) {
  size_t sent;
  return writev_impl(c, iov, iovcnt, ctx, &sent);
}

ssize_t loom_write_ctx(loom_conn *c, const void *buf, size_t len,
                       loom_ctx *ctx) {
  if (len > (size_t)SSIZE_MAX)
    return -EINVAL;
  struct iovec iov = {(void *)(uintptr_t)buf, len};
  size_t sent;
  return writev_impl(c, &iov, 1, ctx, &sent);
}
