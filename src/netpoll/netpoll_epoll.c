/*
 * netpoll_epoll.c — the Linux poller: one epoll instance, edge-triggered,
 * and an eventfd to break a blocked epoll_wait (see netpoll.h).
 *
 * The eventfd alone is level-triggered, and only a poll that may block
 * reads it: an edge reaches one epoll_wait, and a non-blocking poll of
 * another M that took it would leave the blocked poller asleep (Go's
 * netpoll does the same).  Until then every non-blocking poll sees it,
 * and skips it.
 */
#include <errno.h>
#include <limits.h>
#include <stdatomic.h>
#include <stddef.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "netpoll/netpoll.h"
#include "netpoll/pollfd.h"

int loom__netpoll_init(loom__netpoll *np) {
  np->epfd = epoll_create1(EPOLL_CLOEXEC);
  if (np->epfd < 0)
    return -errno;
  np->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (np->evfd < 0) {
    int err = -errno;
    close(np->epfd);
    return err;
  }
  /* The break fd is registered with a NULL cookie: no poll descriptor. */
  struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 0};
  if (epoll_ctl(np->epfd, EPOLL_CTL_ADD, np->evfd, &ev) != 0) {
    int err = -errno;
    close(np->evfd);
    close(np->epfd);
    return err;
  }
  atomic_init(&np->break_pending, 0);
  return 0;
}

void loom__netpoll_close(loom__netpoll *np) {
  close(np->evfd);
  close(np->epfd);
}

void loom__netpoll_break(loom__netpoll *np) {
  uint32_t zero = 0;
  if (!atomic_compare_exchange_strong(&np->break_pending, &zero, 1))
    return; /* one already on its way */
  uint64_t one = 1;
  int saved = errno;
  while (write(np->evfd, &one, sizeof one) < 0 && errno == EINTR)
    ;
  errno = saved;
}

int loom__netpoll_poll(loom__netpoll *np, int64_t delay_ns,
                       struct loom__g **out) {
  struct epoll_event evs[LOOM__NETPOLL_EVENTS];
  struct timespec ts, *tsp = NULL;
  if (delay_ns >= 0) {
    ts.tv_sec = delay_ns / 1000000000;
    ts.tv_nsec = delay_ns % 1000000000;
    tsp = &ts;
  }
  int saved = errno;
  /* epoll_pwait2 takes a timespec: a sleep wakes on time, not rounded up
   * to the next millisecond. */
  int n = epoll_pwait2(np->epfd, evs, LOOM__NETPOLL_EVENTS, tsp, NULL);
  if (n < 0 && errno == ENOSYS) {
    /* Milliseconds, rounded up; a wait too long for an int is clamped
     * (the caller polls again when it ends early). */
    int ms = -1;
    if (delay_ns >= 0)
      ms = delay_ns / 1000000 >= INT_MAX ? INT_MAX
                                         : (int)((delay_ns + 999999) / 1000000);
    n = epoll_wait(np->epfd, evs, LOOM__NETPOLL_EVENTS, ms);
  }
  errno = saved;
  int got = 0;
  for (int i = 0; i < n; i++) {
    uint32_t e = evs[i].events;
    if (evs[i].data.u64 == 0) {
      if (delay_ns == 0)
        continue; /* the break is for a poll that waits */
      uint64_t v;
      while (read(np->evfd, &v, sizeof v) < 0 && errno == EINTR)
        ;
      errno = saved;
      atomic_store(&np->break_pending, 0);
      continue;
    }
    /* An error or a hang-up wakes both directions: the next read or
     * write reports it.  Urgent data (EPOLLPRI) wakes nobody by itself;
     * like the peer's hang-up it is remembered (pd->hangup).  EPOLLHUP
     * alone is not the peer's: a TCP socket says so while it has never
     * been connected (a dial registers its socket before connect()), and
     * the peer's FIN or reset comes with EPOLLRDHUP. */
    int mode = 0;
    if (e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
      mode += 'r';
    if (e & (EPOLLOUT | EPOLLHUP | EPOLLERR))
      mode += 'w';
    bool hangup = (e & (EPOLLRDHUP | EPOLLERR | EPOLLPRI)) != 0;
    if (mode != 0 || hangup)
      loom__pd_ready((uintptr_t)evs[i].data.u64, mode, hangup, out, &got);
  }
  return got;
}

int loom__netpoll_add(loom__netpoll *np, int fd, uintptr_t cookie) {
  struct epoll_event ev = {
      .events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLPRI | EPOLLET,
      .data.u64 = (uint64_t)cookie};
  if (epoll_ctl(np->epfd, EPOLL_CTL_ADD, fd, &ev) != 0)
    return -errno;
  return 0;
}

void loom__netpoll_del(loom__netpoll *np, int fd) {
  int saved = errno;
  struct epoll_event ev = {0};
  (void)epoll_ctl(np->epfd, EPOLL_CTL_DEL, fd, &ev);
  errno = saved;
}
