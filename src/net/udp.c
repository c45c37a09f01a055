/*
 * udp.c — packet sockets: UDP and Unix datagram (rules in loom/net.h).
 *
 * Connected or not is decided once, at creation: loom_dial_packet
 * connects, loom_listen_packet binds.  The read/write/write_to rules are
 * checked before any system call, so a misuse fails the same way on
 * every kernel (Linux itself would let send() on a connected socket take
 * an address).  The context-bounded forms are the same calls with a
 * context for the call's turn and cut (netfd.h, loom__netfd_enter), as
 * loom_read_ctx is.
 */
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "loom/net.h"
#include "net/addr.h"
#include "net/netfd.h"
#include "runtime/alloc.h"
#include "runtime/runtime.h"

struct loom_pconn {
  loom__netfd nf; /* first: see conn.c */
  bool connected;
};

static void pconn_free(loom__netfd *f) { loom__free(f); }

/* Wrap a datagram socket; closes fd on failure.  `path`: the socket
 * file bind() made (NULL: none), removed on close, or now on failure. */
static int pconn_new(int fd, int family, bool connected, const char *path,
                     loom_pconn **out) {
  loom_pconn *pc = loom__calloc(1, sizeof *pc);
  int err = loom__netfd_init_bound(pc ? &pc->nf : NULL, fd, family,
                                   SOCK_DGRAM, path);
  if (err != 0) {
    loom__free(pc);
    return err;
  }
  pc->nf.free_fn = pconn_free;
  pc->connected = connected;
  *out = pc;
  return 0;
}

struct dgram_op {
  bool send;
  struct msghdr mh;
  int flags;
  int64_t until; /* the retries' own bound (0: none): see dgram_io */
  const int64_t *until_too; /* another, that may change (NULL: none) */
};

/* The earlier of op's two bounds, as they are now (0: none). */
static int64_t op_until(const struct dgram_op *op) {
  int64_t u = op->until;
  if (op->until_too != NULL) {
    int64_t v = __atomic_load_n(op->until_too, __ATOMIC_RELAXED);
    if (v != 0 && (u == 0 || v < u))
      u = v;
  }
  return u;
}

#define RETRY_FIRST_NS INT64_C(1000000) /* see dgram_io */
#define RETRY_MAX_NS (16 * INT64_C(1000000))

/* One datagram in or out, parking on EAGAIN.  A send from an unconnected
 * Unix datagram socket cannot wait for write space: it is full for one
 * destination (that peer's receive queue), the poller does not say for
 * whom, and the failed send itself reports write space (pollfd.h,
 * loom__pd_sleep).  So such a sender tries again after 1 ms, then 2, 4,
 * ... up to 16 ms, and sleeps without the direction's lock: one peer
 * that never reads does not hold up the socket's writes to others.
 * op->until, when set, ends those retries with -ETIMEDOUT: a bound of
 * the caller's own, beside the direction's deadline; so does
 * *op->until_too, looked at again before every retry (a sleep it moves
 * earlier is woken with loom__pconn_wake_senders). */
static ssize_t dgram_io(loom_pconn *pc, struct dgram_op *op, loom_ctx *ctx) {
  if (pc == NULL)
    return -EINVAL;
  if (loom__net_callable() != 0)
    return LOOM_ENOTCO;
  loom__netfd *f = &pc->nf;
  int mode = op->send ? 'w' : 'r';
  bool retry = op->send && !pc->connected && f->family == AF_UNIX;
  int64_t slice = RETRY_FIRST_NS;
  loom__netfd_call call;
  ssize_t r = loom__netfd_enter(f, mode, ctx, &call);
  if (r != 0) {
    loom__io_progress();
    return r;
  }
  for (;;) {
    r = loom__netfd_check(f, mode); /* closed, or past the deadline */
    if (r != 0)
      break;
    r = op->send ? sendmsg(f->fd, &op->mh, op->flags | MSG_NOSIGNAL)
                 : recvmsg(f->fd, &op->mh, op->flags | MSG_TRUNC);
    if (r >= 0)
      break;
    int e = loom__errno();
    if (e == EINTR)
      continue;
    if (e == EAGAIN && retry) {
      int64_t now = loom_now(), wake = loom__sat_add(now, slice);
      int64_t until = op_until(op);
      if (until != 0 && now >= until) {
        r = -ETIMEDOUT;
        break;
      }
      if (until != 0 && until < wake)
        wake = until;
      int w = loom__netfd_pause(&call);
      if (w == 0) {
        w = loom__pd_sleep(f->pd, wake, ctx);
        /* The turn back whatever the sleep said, as leave expects
         * (with a cancelled ctx, resume fails at once, turnless).  A
         * passed deadline is looked at again with the turn: the call
         * holding it may have expired the deadline by a cancel that it
         * undoes, having completed all the same, before it lets go. */
        int back = loom__netfd_resume(&call);
        if (w == 0 || w == -ETIMEDOUT)
          w = back;
      }
      if (w != 0) {
        r = w;
        break;
      }
      if (slice < RETRY_MAX_NS)
        slice *= 2;
      continue;
    }
    if (e == EAGAIN) {
      int w = loom__pd_wait(f->pd, mode);
      if (w != 0) {
        r = w;
        break;
      }
      continue;
    }
    r = -e;
    break;
  }
  r = loom__netfd_leave(&call, r);
  loom__io_progress();
  return r; /* reads: the datagram's full length, even if truncated */
}

static ssize_t read_from(loom_pconn *pc, void *buf, size_t len,
                         struct sockaddr_storage *from, socklen_t *fromlen,
                         loom_ctx *ctx) {
  struct iovec iov = {buf, len};
  struct dgram_op op = {.send = false};
  op.mh.msg_iov = &iov;
  op.mh.msg_iovlen = 1;
  if (from != NULL) {
    op.mh.msg_name = from;
    op.mh.msg_namelen = fromlen != NULL ? *fromlen : sizeof *from;
  }
  ssize_t r = dgram_io(pc, &op, ctx);
  if (r >= 0 && from != NULL && fromlen != NULL)
    *fromlen = op.mh.msg_namelen;
  return r;
}

ssize_t loom_pconn_read_from(loom_pconn *pc, void *buf, size_t len,
                             struct sockaddr_storage *from,
                             socklen_t *fromlen) {
  return read_from(pc, buf, len, from, fromlen, NULL);
}

ssize_t loom_pconn_read_from_ctx(loom_pconn *pc, void *buf, size_t len,
                                 struct sockaddr_storage *from,
                                 socklen_t *fromlen, loom_ctx *ctx) {
  return read_from(pc, buf, len, from, fromlen, ctx);
}

ssize_t loom_pconn_read(loom_pconn *pc, void *buf, size_t len) {
  return loom_pconn_read_from(pc, buf, len, NULL, NULL);
}

/* The rules are checked before the context: a misuse fails the same
 * way whatever the context's state. */
static ssize_t write_msg(loom_pconn *pc, const struct iovec *iov, int iovcnt,
                         const struct sockaddr *to, socklen_t tolen,
                         loom_ctx *ctx, int64_t until,
                         const int64_t *until_too) {
  if (pc == NULL || iovcnt < 0 || iovcnt > IOV_MAX ||
      (iovcnt > 0 && iov == NULL))
    return -EINVAL;
  if (pc->connected && to != NULL)
    return -EISCONN;
  if (!pc->connected && to == NULL)
    return -EDESTADDRREQ;
  struct dgram_op op = {.send = true};
  op.mh.msg_iov = (struct iovec *)(uintptr_t)iov;
  op.mh.msg_iovlen = (size_t)iovcnt;
  op.mh.msg_name = (void *)(uintptr_t)to;
  op.mh.msg_namelen = to != NULL ? tolen : 0;
  op.until = until;
  op.until_too = until_too;
  return dgram_io(pc, &op, ctx);
}

ssize_t loom_pconn_write_msg(loom_pconn *pc, const struct iovec *iov,
                             int iovcnt, const struct sockaddr *to,
                             socklen_t tolen) {
  return write_msg(pc, iov, iovcnt, to, tolen, NULL, 0, NULL);
}

ssize_t loom__pconn_write_msg_until(loom_pconn *pc, const struct iovec *iov,
                                    int iovcnt, const struct sockaddr *to,
                                    socklen_t tolen, int64_t until,
                                    const int64_t *until_too) {
  return write_msg(pc, iov, iovcnt, to, tolen, NULL, until, until_too);
}

void loom__pconn_wake_senders(loom_pconn *pc) { loom__pd_wake(pc->nf.pd); }

ssize_t loom_pconn_write_msg_ctx(loom_pconn *pc, const struct iovec *iov,
                                 int iovcnt, const struct sockaddr *to,
                                 socklen_t tolen, loom_ctx *ctx) {
  return write_msg(pc, iov, iovcnt, to, tolen, ctx, 0, NULL);
}

ssize_t loom_pconn_write(loom_pconn *pc, const void *buf, size_t len) {
  if (pc != NULL && !pc->connected)
    return -EDESTADDRREQ;
  struct iovec iov = {(void *)(uintptr_t)buf, len};
  return loom_pconn_write_msg(pc, &iov, 1, NULL, 0);
}

ssize_t loom_pconn_write_to(loom_pconn *pc, const void *buf, size_t len,
                            const struct sockaddr *to, socklen_t tolen) {
  if (pc != NULL && pc->connected)
    return -EISCONN;
  if (to == NULL)
    return -EINVAL;
  struct iovec iov = {(void *)(uintptr_t)buf, len};
  return loom_pconn_write_msg(pc, &iov, 1, to, tolen);
}

int loom_resolve_addr(const char *network, const char *addr,
                      struct sockaddr_storage *out, socklen_t *outlen) {
  if (out == NULL || outlen == NULL)
    return -EINVAL;
  loom__addrs as;
  int err = loom__resolve(network, addr, false, &as);
  if (err != 0)
    return err;
  memcpy(out, &as.a[0], sizeof *out);
  *outlen = as.len[0];
  return 0;
}

static int dgram_socket(int family) {
  int fd = socket(family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  return fd < 0 ? -loom__errno() : fd;
}

int loom_listen_packet(loom_pconn **pc, const char *network,
                       const char *addr) {
  return loom_listen_packet_with(pc, network, addr, NULL);
}

int loom_listen_packet_with(loom_pconn **pc, const char *network,
                            const char *addr, const loom_listen_opts *o) {
  if (pc == NULL)
    return -EINVAL;
  if (loom__getg() == NULL)
    return LOOM_ENOTCO;
  loom__addrs as;
  int err = loom__resolve_type(network, addr, true, SOCK_DGRAM, &as);
  if (err != 0)
    return err;
  for (int i = 0; i < as.n; i++) {
    const struct sockaddr *sa = (const struct sockaddr *)&as.a[i];
    int fd = dgram_socket(sa->sa_family);
    if (fd < 0) {
      err = fd;
      continue;
    }
    if (sa->sa_family == AF_INET6) {
      int v6only = strcmp(network, "udp6") == 0;
      setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, sizeof v6only);
    }
    int one = 1;
    if (o != NULL && o->reuseport && sa->sa_family != AF_UNIX &&
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0) {
      err = -loom__errno();
      close(fd);
      return err;
    }
    if (bind(fd, sa, as.len[i]) != 0) {
      err = -loom__errno();
      close(fd);
      if (err == -EAFNOSUPPORT || err == -EADDRNOTAVAIL)
        continue;
      return err;
    }
    return pconn_new(fd, sa->sa_family, false,
                     sa->sa_family == AF_UNIX ? addr : NULL, pc);
  }
  return err;
}

/* getty's probe: send, then wait briefly for an ICMP-born ECONNREFUSED. */
static int probe(loom_pconn *pc, const loom_dial_packet_opts *o) {
  int64_t wait = o->probe_wait > 0 ? o->probe_wait : 10 * INT64_C(1000000);
  loom__netfd *f = &pc->nf;
  /* The send waits no longer than the answer: a unixgram peer whose
   * queue is full is there, and would keep it waiting for room. */
  int err = loom__pd_set_deadline(f->pd, 'w', loom__sat_add(loom_now(), wait));
  if (err != 0)
    return err;
  struct iovec iov = {(void *)(uintptr_t)o->probe, o->probe_len};
  ssize_t w = loom_pconn_write_msg(pc, &iov, 1, NULL, 0);
  err = loom__pd_set_deadline(f->pd, 'w', 0);
  if (w == -ETIMEDOUT)
    return err; /* no room: someone is there, not reading */
  if (w < 0)
    return (int)w;
  if (err != 0)
    return err;
  err = loom__pd_set_deadline(f->pd, 'r', loom__sat_add(loom_now(), wait));
  for (int tries = 0; err == 0 && tries < 64; tries++) {
    char b;
    ssize_t r = recv(f->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
    if (r >= 0)
      break; /* a reply: the peer is there; leave it queued */
    int e = loom__errno();
    if (e == ECONNREFUSED) {
      err = -ECONNREFUSED;
      break;
    }
    if (e != EAGAIN && e != EINTR) {
      err = -e;
      break;
    }
    int w2 = loom__pd_wait(f->pd, 'r');
    if (w2 == -ETIMEDOUT)
      break; /* silence: assume the peer is there */
    if (w2 != 0)
      err = w2;
  }
  int err2 = loom__pd_set_deadline(f->pd, 'r', 0);
  return err != 0 ? err : err2;
}

int loom_dial_packet_with(loom_pconn **pc, const char *network,
                          const char *addr, const loom_dial_packet_opts *o) {
  if (pc == NULL)
    return -EINVAL;
  if (loom__getg() == NULL)
    return LOOM_ENOTCO;
  loom__addrs as;
  int err = loom__resolve_type(network, addr, false, SOCK_DGRAM, &as);
  if (err != 0)
    return err;
  const struct sockaddr *sa = (const struct sockaddr *)&as.a[0];
  for (int tries = 0; tries < 3; tries++) {
    int fd = dgram_socket(sa->sa_family);
    if (fd < 0)
      return fd;
    if (sa->sa_family == AF_UNIX) {
      /* Autobind to an abstract name, so the peer can answer. */
      struct sockaddr_un un = {.sun_family = AF_UNIX};
      if (bind(fd, (struct sockaddr *)&un, sizeof(sa_family_t)) != 0) {
        err = -loom__errno();
        close(fd);
        return err;
      }
    }
    if (connect(fd, sa, as.len[0]) != 0) {
      err = -loom__errno();
      close(fd);
      return err;
    }
    if (sa->sa_family != AF_UNIX && loom__self_connected(fd)) {
      close(fd);
      err = -EADDRNOTAVAIL;
      continue;
    }
    loom_pconn *p;
    err = pconn_new(fd, sa->sa_family, true, NULL, &p);
    if (err != 0)
      return err;
    if (o != NULL && o->probe != NULL)
      err = probe(p, o);
    if (err != 0) {
      loom__netfd_close(&p->nf);
      return err;
    }
    *pc = p;
    return 0;
  }
  return err;
}

int loom_dial_packet(loom_pconn **pc, const char *network, const char *addr) {
  return loom_dial_packet_with(pc, network, addr, NULL);
}

int loom_pconn_set_read_deadline(loom_pconn *pc, int64_t rd) {
  return loom__netfd_set_deadline(pc ? &pc->nf : NULL, 'r', rd);
}

int loom_pconn_set_write_deadline(loom_pconn *pc, int64_t wd) {
  return loom__netfd_set_deadline(pc ? &pc->nf : NULL, 'w', wd);
}

int loom_pconn_set_deadline(loom_pconn *pc, int64_t rd, int64_t wd) {
  return pc == NULL ? -EINVAL : loom__netfd_set_deadlines(&pc->nf, rd, wd);
}

int loom_pconn_close(loom_pconn *pc) {
  return pc == NULL ? -EINVAL : loom__netfd_close(&pc->nf);
}

int loom_pconn_fd(loom_pconn *pc) { return pc ? pc->nf.fd : -EINVAL; }

int loom_pconn_set_buffers(loom_pconn *pc, int rcvbuf, int sndbuf) {
  return pc == NULL ? -EINVAL
                    : loom__netfd_set_buffers(&pc->nf, rcvbuf, sndbuf);
}

int loom_pconn_local_addr(loom_pconn *pc, char *buf, size_t len) {
  return pc == NULL ? -EINVAL : loom__fd_addr(pc->nf.fd, false, buf, len);
}

int loom_pconn_remote_addr(loom_pconn *pc, char *buf, size_t len) {
  return pc == NULL ? -EINVAL : loom__fd_addr(pc->nf.fd, true, buf, len);
}
