/*
 * fd_wait.c — loom_fd_wait: a poll descriptor for the length of one wait.
 *
 * The fd is checked with poll(2) first: a ready fd costs one system call
 * and no registration.  Otherwise it is registered with the poller for the
 * wait (edge-triggered registration reports readiness that exists at the
 * moment of registration, so nothing arriving between the check and the
 * registration is missed) and unregistered after.  A registration per
 * wait is what makes the call safe for fds loom does not own: it never
 * holds a registration across the caller's close().  Two coroutines may
 * wait on one fd at once, one per direction (a reader and a writer of a
 * foreign library's socket): they share the registration, and the last
 * to leave removes it.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "ctx/ctx_internal.h"
#include "loom/fd.h"
#include "netpoll/pollfd.h"
#include "runtime/runtime.h"

static int poll_once(int fd, short ev, int timeout_ms) {
  struct pollfd p = {.fd = fd, .events = ev};
  int n;
  while ((n = poll(&p, 1, timeout_ms)) < 0 && loom__errno() == EINTR)
    ;
  if (n < 0)
    return -loom__errno();
  if (n == 0)
    return 0;
  if (p.revents & POLLNVAL)
    return -EBADF;
  return 1; /* ready, hung up or in error: the next call says which */
}

/* A cancel's hook, for a thread waiting in poll(2): it makes the
 * waiter's eventfd readable. */
static void wake_poll(void *arg) {
  int efd = *(int *)arg;
  uint64_t one = 1;
  ssize_t n;
  while ((n = write(efd, &one, sizeof one)) < 0 && errno == EINTR)
    ;
  (void)n; /* EAGAIN: the counter is full, so it is readable already */
}

/* Not on a coroutine, or inside loom_block_enter/exit: the thread waits
 * in poll(2).  With a context that can be cancelled it polls an eventfd
 * too, which the context's cancel hook makes readable.  Without one for
 * the eventfd (no descriptor left), the wait goes in slices and looks at
 * the context between them, as accept's back-off does. */
#define CTX_SLICE_MS 5
static int wait_thread(int fd, short ev, int64_t deadline, loom_ctx *ctx) {
  struct pollfd p[2] = {{.fd = fd, .events = ev},
                        {.fd = -1, .events = POLLIN}};
  loom__ctx_hook h = {.fn = wake_poll, .arg = &p[1].fd};
  bool hooked = false;
  if (ctx != NULL && loom_ctx_done(ctx) != NULL) {
    p[1].fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (p[1].fd >= 0 && !(hooked = loom__ctx_hook_add(ctx, &h, NULL))) {
      close(p[1].fd);
      return loom__ctx_reason(ctx);
    }
  }
  bool sliced = ctx != NULL && loom_ctx_done(ctx) != NULL && !hooked;
  int r;
  for (;;) {
    r = loom__ctx_reason(ctx);
    if (r != 0)
      break;
    int ms = -1;
    if (deadline != 0) {
      /* Compared before subtracting: deadline - now overflows for a
       * deadline long past (INT64_MIN), which is "at once" too. */
      int64_t now = loom_now();
      int64_t left = deadline > now ? deadline - now : 0;
      ms = left / 1000000 > 1000000000 ? 1000000000
                                       : (int)((left + 999999) / 1000000);
    }
    if (sliced && (ms < 0 || ms > CTX_SLICE_MS))
      ms = CTX_SLICE_MS;
    p[0].revents = p[1].revents = 0;
    int n = poll(p, hooked ? 2 : 1, ms);
    if (n < 0 && loom__errno() == EINTR)
      continue;
    if (n < 0) {
      r = -loom__errno();
      break;
    }
    if (p[0].revents & POLLNVAL) {
      r = -EBADF;
      break;
    }
    if (p[0].revents != 0) {
      r = 0; /* ready, hung up or in error: the next call says which */
      break;
    }
    if (p[1].revents != 0)
      continue; /* the cancel: its reason, at the top */
    if (deadline != 0 && loom_now() >= deadline) {
      r = -ETIMEDOUT;
      break;
    }
  }
  if (hooked) {
    loom__ctx_unhook(ctx, &h); /* then the hook no longer writes to it */
    close(p[1].fd);
  }
  return r;
}

static int fd_wait_impl(int fd, int events, int64_t deadline, loom_ctx *ctx);

/* ---- sharing a foreign fd between waiters ------------------------------ */

/* Over every runtime's fdw_pds list and the pds' fdw fields.  Waits on
 * foreign fds are few and slow: one lock is enough. */
static pthread_mutex_t fdw_lock = PTHREAD_MUTEX_INITIALIZER;

/* Take direction `dirs` (1 read, 2 write) of fd's shared pd, opening it
 * if nobody waits on fd yet.  -EBUSY: a direction taken, or an fd that
 * loom's net layer owns (registered already). */
static int fdw_take(loom__rt *rt, int fd, unsigned dirs, loom__pd **out) {
  pthread_mutex_lock(&fdw_lock);
  loom__pd *pd = rt->fdw_pds;
  while (pd != NULL && pd->fd != fd)
    pd = pd->fdw_next;
  int err = 0;
  if (pd != NULL) {
    if (pd->fdw_dirs & dirs)
      err = -EBUSY;
  } else {
    err = loom__pd_open(rt, fd, &pd);
    if (err == -EEXIST)
      err = -EBUSY;
    if (err == 0) {
      pd->fdw_dirs = 0;
      pd->fdw_next = rt->fdw_pds;
      rt->fdw_pds = pd;
    }
  }
  if (err == 0) {
    pd->fdw_dirs |= dirs;
    *out = pd;
  }
  pthread_mutex_unlock(&fdw_lock);
  return err;
}

/* Give direction `dirs` back: its deadline (and a wait for either
 * direction) goes with it; the last user unregisters the fd. */
static void fdw_give(loom__rt *rt, loom__pd *pd, unsigned dirs, int mode) {
  pthread_mutex_lock(&fdw_lock);
  pd->fdw_dirs &= ~dirs;
  if (pd->fdw_dirs == 0) {
    loom__pd **pp = &rt->fdw_pds;
    while (*pp != pd)
      pp = &(*pp)->fdw_next;
    *pp = pd->fdw_next;
    loom__pd_close(pd, true); /* the fd is not ours: it stays open */
  } else {
    (void)loom__pd_set_deadline(pd, mode, 0);
    if (dirs == 3)
      loom__pd_either_off(pd);
  }
  pthread_mutex_unlock(&fdw_lock);
}

int loom_fd_wait(int fd, int events, int64_t deadline) {
  return fd_wait_impl(fd, events, deadline, NULL);
}

int loom_fd_wait_ctx(int fd, int events, int64_t deadline, loom_ctx *ctx) {
  int e = loom__ctx_reason(ctx);
  if (e != 0)
    return e;
  return fd_wait_impl(fd, events, deadline, ctx);
}

static int fd_wait_impl(int fd, int events, int64_t deadline, loom_ctx *ctx) {
  if (events == 0 || (events & ~(LOOM_FD_READ | LOOM_FD_WRITE)) != 0)
    return -EINVAL;
  if (fd < 0)
    return -EBADF;
  short ev = (short)((events & LOOM_FD_READ ? POLLIN : 0) |
                     (events & LOOM_FD_WRITE ? POLLOUT : 0));
  loom__m *m = loom__getm();
  if (loom__getg() == NULL || m->p == NULL)
    return wait_thread(fd, ev, deadline, ctx);

  int r = poll_once(fd, ev, 0);
  if (r != 0)
    return r < 0 ? r : 0;
  if (deadline != 0 && deadline <= loom_now())
    return -ETIMEDOUT;

  /* Both directions: the wait takes the read side's word, which a
   * write readiness then wakes too; it excludes other waiters in either
   * direction. */
  unsigned dirs = (unsigned)events;
  int mode = events == LOOM_FD_WRITE ? 'w' : 'r';
  loom__rt *rt = m->rt; /* m may not be ours after the park; rt is */
  loom__pd *pd;
  int err = fdw_take(rt, fd, dirs, &pd);
  if (err != 0)
    return err;
  if (dirs == 3 && loom__pd_either(pd)) {
    fdw_give(rt, pd, dirs, mode);
    return 0; /* became writable since the poll */
  }
  if (deadline != 0)
    err = loom__pd_set_deadline(pd, mode, deadline);
  loom__ctx_hook h = {.fn = mode == 'r' ? loom__pd_expire_read
                                        : loom__pd_expire_write,
                      .arg = pd};
  bool hooked = false;
  if (err == 0 && ctx != NULL) {
    hooked = loom__ctx_hook_add(ctx, &h, loom__getg());
    if (!hooked)
      err = loom__ctx_reason(ctx);
  }
  if (err == 0)
    err = loom__pd_wait(pd, mode);
  if (hooked) {
    loom__ctx_unhook(ctx, &h);
    if (err == -ETIMEDOUT && loom__ctx_reason(ctx) != 0)
      err = loom__ctx_reason(ctx);
  }
  fdw_give(rt, pd, dirs, mode);
  return err;
}
