/*
 * listen.c — listeners and accept.
 *
 * Running out of descriptors (EMFILE, ENFILE) or kernel buffers is not an
 * error a server can do anything with, and retrying at once spins at
 * 100% CPU with the pending connection still in the backlog.  So accept
 * reports it once per episode, sleeps 5 ms doubling to 1 s (other
 * coroutines, serving the connections we have, keep running), and tries
 * again — Go's http.Server does the same above its net package.
 */
#include <errno.h>
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

struct loom_listener {
  loom__netfd nf; /* first: see conn.c */
  bool starved;   /* in an EMFILE episode (reported) */
};

static void listener_free(loom__netfd *f) { loom__free(f); }

static int listen_one(const struct sockaddr *sa, socklen_t len,
                      const char *network, const loom_listen_opts *o,
                      int *out) {
  int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
                  0);
  if (fd < 0)
    return -loom__errno();
  int one = 1, zero = 0;
  if (sa->sa_family != AF_UNIX)
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  /* A Unix path cannot be shared: reuseport is for TCP only, as for
   * packet sockets (and Linux 6.x refuses it on a Unix socket). */
  if (o->reuseport && sa->sa_family != AF_UNIX &&
      setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0)
    goto fail;
  if (sa->sa_family == AF_INET6)
    /* "tcp" on [::] takes IPv4 too; "tcp6" only IPv6. */
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY,
               strcmp(network, "tcp6") == 0 ? &one : &zero, sizeof one);
  if (bind(fd, sa, len) != 0)
    goto fail;
  if (listen(fd, o->backlog > 0 ? o->backlog : SOMAXCONN) != 0) {
    /* bind() made the socket file of a Unix path: it goes too. */
    const struct sockaddr_un *su = (const struct sockaddr_un *)(const void *)sa;
    int err = -loom__errno();
    close(fd);
    if (sa->sa_family == AF_UNIX && su->sun_path[0] != '\0')
      unlink(su->sun_path);
    return err;
  }
  *out = fd;
  return 0;
fail:;
  int err = -loom__errno();
  close(fd);
  return err;
}

int loom_listen_with(loom_listener **l, const char *network,
                     const char *addr, const loom_listen_opts *o) {
  static const loom_listen_opts defaults;
  if (l == NULL)
    return -EINVAL;
  if (o == NULL)
    o = &defaults;
  if (loom__getg() == NULL)
    return LOOM_ENOTCO;
  loom__addrs as;
  int err = loom__resolve_type(network, addr, true, SOCK_STREAM, &as);
  if (err != 0)
    return err;
  int fd = -1, i;
  for (i = 0; i < as.n; i++) {
    err = listen_one((struct sockaddr *)&as.a[i], as.len[i], network, o,
                     &fd);
    /* No IPv6 on this host: the IPv4 fallback for ":port". */
    if (err != -EAFNOSUPPORT && err != -EADDRNOTAVAIL)
      break;
  }
  if (err != 0)
    return err;
  int family = as.a[i].ss_family;
  loom_listener *ln = loom__calloc(1, sizeof *ln);
  err = loom__netfd_init_bound(ln ? &ln->nf : NULL, fd, family, SOCK_STREAM,
                               family == AF_UNIX ? addr : NULL);
  if (err != 0) {
    loom__free(ln);
    return err;
  }
  ln->nf.free_fn = listener_free;
  *l = ln;
  return 0;
}

int loom_listen(loom_listener **l, const char *network, const char *addr) {
  return loom_listen_with(l, network, addr, NULL);
}

static bool starving(int e) {
  return e == EMFILE || e == ENFILE || e == ENOBUFS || e == ENOMEM ||
         e == ENOSPC; /* epoll_ctl: max_user_watches */
}

/* Sleep `ns` between accepts that found no descriptor, in slices, so
 * that a close, a passed deadline or a cancel ends the wait within a
 * slice (they wake only a coroutine parked on the fd itself). */
#define BACKOFF_SLICE_NS (5 * INT64_C(1000000))
static int backoff_sleep(loom__netfd *f, int64_t ns) {
  int64_t end = loom_now() + ns;
  for (;;) {
    int r = loom__netfd_check(f, 'r');
    int64_t left = end - loom_now();
    if (r != 0 || left <= 0)
      return r;
    loom_sleep(left < BACKOFF_SLICE_NS ? left : BACKOFF_SLICE_NS);
  }
}

/* loom_accept, and loom_accept_ctx with a ctx. */
static int accept_impl(loom_listener *l, loom_conn **c, loom_ctx *ctx) {
  if (l == NULL || c == NULL)
    return -EINVAL;
  if (loom__net_callable() != 0)
    return LOOM_ENOTCO;
  loom__netfd *f = &l->nf;
  loom__netfd_call call;
  int r = loom__netfd_enter(f, 'r', ctx, &call);
  if (r != 0) {
    loom__io_progress();
    return r;
  }
  int64_t backoff = 5 * INT64_C(1000000);
  for (;;) {
    r = loom__netfd_check(f, 'r'); /* closed, or past the deadline */
    if (r != 0)
      break;
    struct sockaddr_storage peer;
    socklen_t peerlen = sizeof peer;
    int fd = accept4(f->fd, (struct sockaddr *)&peer, &peerlen,
                     SOCK_NONBLOCK | SOCK_CLOEXEC);
    int e;
    if (fd >= 0) {
      /* Wrapping it may fail for memory (ours, or the kernel's for the
       * poller's entry): the connection is closed, and that is starving
       * like EMFILE, not a failure of the listener. */
      r = loom__conn_new(fd, f->family, (struct sockaddr *)&peer, peerlen, c);
      if (r == 0 || !starving(-r)) {
        if (r == 0 && l->starved) {
          l->starved = false;
          loom__log(loom__rt_get(), "accept: descriptors available again");
        }
        break;
      }
      e = -r;
    } else {
      e = loom__errno();
    }
    if (e == EINTR || e == ECONNABORTED || e == EPROTO)
      continue;
    if (e == EAGAIN) {
      r = loom__pd_wait(f->pd, 'r');
      if (r != 0)
        break;
      continue;
    }
    if (!starving(e)) {
      r = -e;
      break;
    }
    if (!l->starved) {
      l->starved = true;
      loom__log(loom__rt_get(),
                "accept: %s; backing off and retrying (existing "
                "connections are served meanwhile)",
                loom_strerror(-e));
    }
    r = backoff_sleep(f, backoff);
    if (r != 0)
      break;
    if (backoff < 1000 * INT64_C(1000000))
      backoff *= 2;
  }
  r = (int)loom__netfd_leave(&call, r);
  loom__io_progress();
  return r;
}

int loom_accept(loom_listener *l, loom_conn **c) {
  return accept_impl(l, c, NULL);
}

int loom_listener_set_deadline(loom_listener *l, int64_t deadline) {
  return loom__netfd_set_deadline(l ? &l->nf : NULL, 'r', deadline);
}

int loom_listener_close(loom_listener *l) {
  if (l == NULL)
    return -EINVAL;
  return loom__netfd_close(&l->nf);
}

int loom_listener_addr(loom_listener *l, char *buf, size_t len) {
  return l == NULL ? -EINVAL : loom__fd_addr(l->nf.fd, false, buf, len);
}

int loom_accept_ctx(loom_listener *l, loom_conn **c, loom_ctx *ctx) {
  return accept_impl(l, c, ctx);
}
