/*
 * netpoll.h — the contract every poller backend implements.
 *
 * The scheduler owns one poller per runtime.  At most one M at a time
 * blocks in loom__netpoll_poll (the scheduler guarantees it through
 * rt->lastpoll); any thread may call loom__netpoll_break to cut that wait
 * short, when new work or an earlier timer appears.  Breaks coalesce: many
 * breaks before the next poll cost one wake-up.
 *
 *   loom__netpoll_init(np)       create the poller.  0 or -errno.
 *   loom__netpoll_close(np)      destroy it; nobody may be polling.
 *   loom__netpoll_poll(np, delay, out)
 *                                wait up to `delay` ns (<0: until an event
 *                                or a break; 0: do not wait), then store
 *                                every G made runnable by I/O readiness in
 *                                `out` (room for LOOM__NETPOLL_MAX Gs).
 *                                Returns how many it stored.  An array,
 *                                not a list through the Gs: each G sits in
 *                                its own stack page, and every touch of
 *                                one is a TLB miss.
 *   loom__netpoll_break(np)      make a current or next poll return soon.
 *                                Only a poll that may wait (delay != 0)
 *                                takes a break in: a non-blocking poll of
 *                                another M at the same moment must not
 *                                swallow the break meant for the blocked
 *                                one.
 *   loom__netpoll_add(np, fd, cookie)
 *                                start watching fd for read, write, peer
 *                                hang-up and urgent data, edge-triggered:
 *                                one notification per change of
 *                                readiness, reported with `cookie`.
 *                                0 or -errno.
 *   loom__netpoll_del(np, fd)    stop watching fd (before it is closed).
 *
 * A backend reports readiness by calling loom__pd_ready(cookie, mode,
 * hangup) (pollfd.h) for each event; that turns it into runnable Gs.  It never
 * blocks a coroutine itself.  The backend in this build is
 * netpoll_epoll.c.
 */
#ifndef LOOM_NETPOLL_NETPOLL_H
#define LOOM_NETPOLL_NETPOLL_H

#include <stdint.h>

typedef struct loom__netpoll {
  int epfd;
  int evfd;                       /* eventfd that breaks a blocked wait */
  _Atomic uint32_t break_pending; /* a break is written and not yet read */
} loom__netpoll;

struct loom__g;

/* Events taken per poll, and so at most twice as many Gs (a reader and
 * a writer per fd). */
#define LOOM__NETPOLL_EVENTS 128
#define LOOM__NETPOLL_MAX (2 * LOOM__NETPOLL_EVENTS)

int loom__netpoll_init(loom__netpoll *np);
void loom__netpoll_close(loom__netpoll *np);
int loom__netpoll_poll(loom__netpoll *np, int64_t delay_ns,
                       struct loom__g **out);
void loom__netpoll_break(loom__netpoll *np);
int loom__netpoll_add(loom__netpoll *np, int fd, uintptr_t cookie);
void loom__netpoll_del(loom__netpoll *np, int fd);

#endif
