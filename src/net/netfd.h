/*
 * netfd.h — what every loom socket has: the fd, its poll descriptor, one
 * lock per direction and the reference count that makes close safe.
 *
 * Close protocol (Go's fdMutex, simplified): every operation takes a
 * reference for its whole length; loom_close marks the netfd closed
 * (later operations fail with LOOM_ECLOSED), evicts the poll descriptor
 * (blocked operations wake and fail), and drops its own reference.  Who
 * drops the last one — the closer or the last blocked operation leaving —
 * unregisters and closes the fd and frees the object.  So the fd number
 * cannot be reused while any loom call still uses it.  The closer, on a
 * coroutine, waits for that (as Go's Close does): when loom_close
 * returns, the descriptor is closed and its address free.
 */
#ifndef LOOM_NET_NETFD_H
#define LOOM_NET_NETFD_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>

#include "ctx/ctx_internal.h"
#include "loom/error.h"
#include "loom/net.h"
#include "netpoll/pollfd.h"
#include "runtime/runtime.h"
#include "runtime/sema.h"

typedef struct loom__netfd {
  loom__rtobj obj;       /* freed by the runtime if abandoned */
  struct loom__rt *rt;
  int fd;
  int family;
  int type;
  bool drained;          /* the last read was short: see loom_read */
  loom__pd *pd;
  _Atomic uint64_t ref;  /* users; top bit: closed */
  loom__sema rturn;      /* one reader (or acceptor) at a time */
  loom__sema wturn;      /* one writer at a time (both: loom__netfd_enter) */
  char *unlink_path;     /* the socket file bind() made: removed at the
                            close, or at teardown (netfd.c) */
  void (*free_fn)(struct loom__netfd *f);
  loom__sema *closed;    /* the closer waits here for the fd's close */
} loom__netfd;

/* Wrap a non-blocking fd (registers it with the poller).  On failure the
 * fd is left open for the caller.  0 or -errno. */
int loom__netfd_init(loom__netfd *f, int fd, int family, int type);
/* Whether the caller may make a socket call that can wait: 0 on a
 * coroutine that has a P, LOOM_ENOTCO elsewhere, including inside
 * loom_block_enter/exit, where there is no P to park on (the park
 * would stop the process). */
static inline int loom__net_callable(void) {
  loom__m *m = loom__getm(); /* once: loom__getg would read it again */
  return m != NULL && m->curg != NULL && !m->curg->is_g0 && m->p != NULL
             ? 0
             : LOOM_ENOTCO;
}
/* loom_writev that also says, in *sent, how many bytes went before it
 * failed (all of them when it returns the total): for counters that
 * must match the wire. */
ssize_t loom__writev_sent(loom_conn *c, const struct iovec *iov, int iovcnt,
                          size_t *sent);
/* loom__netfd_init for a socket bound to `path` (a Unix path; NULL or
 * an '@' abstract name: no file).  The file bind() made goes when f
 * closes.  `f` NULL says the caller could not allocate it.  On any
 * failure the fd is closed and the file removed at once, so the path can
 * be bound again.  0, -ENOMEM or loom__netfd_init's error. */
int loom__netfd_init_bound(loom__netfd *f, int fd, int family, int type,
                           const char *path);
bool loom__netfd_acquire(loom__netfd *f);
void loom__netfd_release(loom__netfd *f);
bool loom__netfd_closed(loom__netfd *f);
/* Why an operation in direction `mode` ('r', 'w') must stop before its
 * next system call: LOOM_ECLOSED, -ETIMEDOUT (its deadline has passed,
 * or a context expired it), or 0.  Lock-free. */
int loom__netfd_check(loom__netfd *f, int mode);
int loom__netfd_close(loom__netfd *f);

/* Set the deadline of `mode` ('r', 'w', or 'r'+'w' for both) on f, on a
 * coroutine: -EINVAL (NULL f), LOOM_ENOTCO, LOOM_ECLOSED, -ENOMEM. */
int loom__netfd_set_deadline(loom__netfd *f, int mode, int64_t d);
/* Read and write deadlines at once (both the same: one call). */
/* SO_RCVBUF / SO_SNDBUF, each if > 0: 0 or -errno. */
int loom__netfd_set_buffers(loom__netfd *f, int rcvbuf, int sndbuf);
int loom__netfd_set_deadlines(loom__netfd *f, int64_t rd, int64_t wd);

/*
 * One call in direction `mode` ('r': reads and accepts, 'w': writes), from
 * loom__netfd_enter to loom__netfd_leave: a reference on f, the
 * direction's turn (calls in one direction take turns, in arrival
 * order), and, when the call is bounded by a context, the cut: a hook
 * that expires the direction's deadline when the context is cancelled,
 * and marks the direction cut until the call leaves (a deadline set
 * meanwhile does not clear the mark), so the call wakes from the poller
 * with -ETIMEDOUT, which leave turns into the context's reason.  The cut is
 * armed only once the turn is held, so a cancel reaches its own call alone: a
 * call still waiting for its turn leaves that wait with the reason and touches
 * nothing, and the call ahead of it goes on undisturbed.  A call that ends
 * otherwise though its cut fired (the cancel landed as it completed) gets the
 * deadline back (loom__pd_cancel_undo).
 */
typedef struct loom__netfd_call {
  loom__netfd *f;
  loom__sema *turn;
  struct loom_ctx *ctx; /* NULL: unbounded, and nothing below is used */
  bool armed;           /* the hook is on ctx */
  loom__sema_waiter sw; /* the wait for the turn, which a cancel ends */
  loom__pd_cancel pc;   /* the cut, once the turn is held */
  loom__ctx_hook hook;
} loom__netfd_call;

int loom__netfd_enter_ctx(loom__netfd_call *call, int mode);
ssize_t loom__netfd_leave_ctx(loom__netfd_call *call, ssize_t r);

/* Begin a call: 0, or the context's reason (it was done already, or was
 * cancelled while the call waited for its turn), or LOOM_ECLOSED.  On a
 * coroutine (the caller checks). */
static inline int loom__netfd_enter(loom__netfd *f, int mode,
                                    struct loom_ctx *ctx,
                                    loom__netfd_call *call) {
  call->f = f;
  call->turn = mode == 'r' ? &f->rturn : &f->wturn;
  call->ctx = ctx;
  if (ctx != NULL)
    return loom__netfd_enter_ctx(call, mode);
  if (!loom__netfd_acquire(f))
    return LOOM_ECLOSED;
  loom__sema_acquire(call->turn);
  return 0;
}

/* End it with the call's result r; returns r, or the context's reason
 * for a -ETIMEDOUT the cut caused. */
static inline ssize_t loom__netfd_leave(loom__netfd_call *call, ssize_t r) {
  if (call->ctx != NULL)
    return loom__netfd_leave_ctx(call, r);
  loom__sema_release(call->turn);
  loom__netfd_release(call->f);
  return r;
}

/* Give the turn up for a while (udp.c's retries sleep without it), and
 * take it back: 0, -ETIMEDOUT from pause when the cut fired (the call was
 * cut short and keeps its turn; leave makes it the context's reason), or
 * the context's reason from resume when the context was cancelled while
 * the call waited for its turn back.  Either way the call ends next,
 * with loom__netfd_leave.  A pause that returned 0 must be followed by a
 * resume before the leave, whatever happened between. */
int loom__netfd_pause(loom__netfd_call *call);
int loom__netfd_resume(loom__netfd_call *call);

struct loom_pconn;
struct iovec;
/* loom_pconn_write_msg whose retries on an unconnected Unix datagram
 * socket (udp.c, dgram_io) end at `until` (a loom_now() time; 0: none)
 * with -ETIMEDOUT: a bound of the caller's own, where the direction's
 * deadline is shared by every writer.  `until_too` (NULL: none) points
 * at a second such bound that another thread may set meanwhile (read
 * atomically before every retry; the earlier of the two holds); it
 * wakes the sleeping retries with loom__pconn_wake_senders.  Elsewhere
 * neither has an effect.  The engine's packet sessions use it, with
 * their graceful close's bound. */
ssize_t loom__pconn_write_msg_until(struct loom_pconn *pc,
                                    const struct iovec *iov, int iovcnt,
                                    const struct sockaddr *to, socklen_t tolen,
                                    int64_t until, const int64_t *until_too);
/* Wake the sleeping retries of loom__pconn_write_msg_until, so they look
 * at their bounds again.  Any thread. */
void loom__pconn_wake_senders(struct loom_pconn *pc);

struct loom_conn;
/* Wrap a connected non-blocking stream socket (conn.c); closes fd on
 * failure.  `peer` (NULL: unknown) is the peer's address as accept or
 * connect knew it, kept for loom_conn_remote_addr. */
int loom__conn_new(int fd, int family, const struct sockaddr *peer,
                   socklen_t peerlen, struct loom_conn **out);

#endif
