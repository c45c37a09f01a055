/*
 * loom/net.h — blocking-style sockets for coroutines: TCP, UDP, Unix.
 *
 * Every call reads as blocking code and parks only the calling coroutine:
 * a read with no data parks it until the socket is readable, its thread
 * runs other coroutines meanwhile.  Sockets are non-blocking underneath
 * and registered once with the runtime's poller.
 *
 * Networks: "tcp", "tcp4", "tcp6", "unix".  Addresses: "host:port",
 * "[v6addr]:port", ":port" (every local address, for listen).  An IPv6
 * literal may name a zone, the interface of a link-local address, by
 * name or by index: "[fe80::1%eth0]:80", "[fe80::1%2]:80" (a name first,
 * as in Go, then a decimal number).  An unknown interface name, an empty
 * zone ("[fe80::1%]:80"), or a zone on an IPv4 literal or a host name is
 * LOOM_EBADADDR.  Linux uses a zone only where an address needs one
 * (link-local fe80::/10, and multicast of interface- or link-local
 * scope) and ignores it elsewhere: dial and listen on "[::1%lo]:0" work
 * as on "[::1]:0", and the local address reads "[::1]:port" since the
 * kernel reports no zone for it (a dialed connection's remote address is
 * the one dialed, zone included).  A link-local address without a zone
 * fails in connect and bind with -EINVAL, and listening needs an address
 * of that interface (else -EADDRNOTAVAIL).  Addresses are printed with
 * their zone ("[fe80::1%eth0]:80", the number if no interface has that
 * index), so a printed address dials and listens as it reads.  An IPv4
 * literal is a dotted-decimal quad, as in Go: "127.1", "0x7f.0.0.1",
 * "0177.0.0.1" (a leading zero), "2130706433" and any other host whose
 * last label is a number are LOOM_EBADADDR, never looked up (the C
 * library would read them as inet_aton does).  A literal of the other
 * family ("[::1]:80" for "tcp4") is LOOM_EBADADDR too.  Else a host name
 * (resolved with getaddrinfo on a thread of its own while the caller
 * parks, so a slow resolver stalls no other coroutine; at most 64
 * lookups run at once, more wait for one to end), or for "unix" a path; a path
 * starting with
 * '@' names Linux's abstract namespace.  A path has at most 107 bytes, an
 * abstract name 107 after its '@' (else LOOM_EBADADDR); an abstract name
 * cannot hold a NUL byte, and one that a foreign peer bound with NUL
 * bytes in it is formatted up to the first.
 *
 * Deadlines are absolute loom_now() times (0: none).  An operation whose
 * deadline passes returns -ETIMEDOUT and leaves the connection usable:
 * move the deadline and try again.  A deadline that has passed stops an
 * operation even when it would not wait (bytes pending, room to send,
 * a connection queued), as in Go: setting it to the past is how a
 * server stops its handlers.
 *
 * Concurrency: one coroutine may read while another writes; two readers
 * (or two writers) of one connection take turns, in arrival order.
 * loom_close may be called while others are blocked on the connection:
 * they return LOOM_ECLOSED, and the descriptor is closed once the last of
 * them has left, so its number cannot be reused under them; loom_close
 * waits for that (as Go's Close does), so when it returns the descriptor
 * is closed and its address free (a port, a Unix path).  (It waits on a
 * coroutine only: called from a plain thread or inside
 * loom_block_enter/exit it returns at once, and the last blocked call to
 * leave closes the descriptor; a Unix path is removed at once either
 * way.)  But the
 * handle is gone once loom_close returns: a coroutine that may still be
 * between two calls on it must be stopped another way first (a deadline
 * in the past, or loom_shutdown, which make its calls fail and leave the
 * handle valid), and the connection closed when it has let go.
 *
 * Sockets belong to the runtime that opened them.  When loom_run
 * returns, every socket still open (connection, listener, UDP or Unix
 * socket) has been closed and freed, a bound Unix path removed, and its
 * handle is gone as if loom_close had returned: no call, loom_close
 * included, may use it after.  Nor may a plain thread's call on it (a
 * deadline, loom_shutdown, loom_close) overlap loom_run's end: the
 * coroutine such a call wakes may be freed under it.
 *
 * All calls below must run on a coroutine (else LOOM_ENOTCO) unless noted.
 * Those that may wait (reads, writes, accepts, dials) also fail with
 * LOOM_ENOTCO between loom_block_enter and loom_block_exit, where the
 * coroutine has no processor to park on, and touch nothing.
 * Calls that wait are scheduling points; so is every 64th read, write or
 * accept in a row that did not have to wait (it yields), whether it
 * succeeded or failed, so a coroutine whose socket is always ready, or
 * that retries a call failing at once (a deadline that has passed), cannot
 * starve the others on its thread.
 */
#ifndef LOOM_NET_H
#define LOOM_NET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "loom/common.h"
#include "loom/ctx.h"
#include "loom/error.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct loom_conn loom_conn;
typedef struct loom_listener loom_listener;

/*
 * loom_listen — listen on `addr` of `network` ("tcp*" or "unix").
 * TCP listeners set SO_REUSEADDR; port 0 picks a free port (see
 * loom_listener_addr).  A "unix" path must not exist yet.
 * Returns 0 and *l; LOOM_ENETWORK, LOOM_EBADADDR, LOOM_ENOHOST,
 * LOOM_EDNS, -EADDRINUSE, -EACCES, -ENOMEM, or another -errno.
 */
LOOM_API int loom_listen(loom_listener **l, const char *network,
                         const char *addr);

/* Options for loom_listen_with. */
typedef struct loom_listen_opts {
  int backlog;     /* 0: SOMAXCONN */
  bool reuseport;  /* SO_REUSEPORT: several listeners share the port
                      (tcp; a unix path cannot be shared and ignores it) */
} loom_listen_opts;
LOOM_API int loom_listen_with(loom_listener **l, const char *network,
                              const char *addr, const loom_listen_opts *o);

/*
 * loom_accept — wait for and return the next connection (TCP_NODELAY set
 * for TCP, as in Go).  With a deadline (loom_listener_set_deadline) it
 * may return -ETIMEDOUT.  When the process runs out of descriptors
 * (EMFILE, ENFILE) or memory (the kernel's, or ours to register the new
 * connection, which is then closed), it does not fail and does not spin:
 * it reports the condition once through the runtime's log, backs off
 * (5 ms doubling to 1 s) and tries again until a descriptor is free or
 * the deadline passes; a close, a deadline or a cancel ends the back-off
 * within 5 ms.  LOOM_ECLOSED once the listener is closed.  Parks.
 */
LOOM_API int loom_accept(loom_listener *l, loom_conn **c);
LOOM_API int loom_listener_set_deadline(loom_listener *l, int64_t deadline);
/* Stop listening; coroutines blocked in loom_accept return LOOM_ECLOSED.
 * For a "unix" listener the socket file is removed before it returns, so
 * the path can be listened on again at once (a relative path from the
 * directory it was bound in, whatever the working directory is by
 * then; as given only if that directory's name could not be read at the
 * bind).  `l` is freed: no
 * coroutine may call anything on it afterwards, so an accept loop is best
 * stopped by its own coroutine — e.g. run it with loom_accept_ctx and
 * cancel the context, then let the loop close the listener. */
LOOM_API int loom_listener_close(loom_listener *l);
/* The bound address as "host:port" ("[v6]:port", or the path): useful
 * after listening on port 0.  Any thread.  0, or -ENOSPC with `buf`
 * left as it was. */
LOOM_API int loom_listener_addr(loom_listener *l, char *buf, size_t len);

/* Options for loom_dial_with. */
typedef struct loom_dial_opts {
  int64_t deadline; /* for the whole dial: the name's lookup, then
                       connecting over every address tried; 0: none */
  loom_ctx *ctx;    /* NULL, or a context whose cancel ends the dial, the
                       lookup included, with its reason (-ECANCELED,
                       -ETIMEDOUT); its deadline, if earlier, acts as
                       `deadline` too.  A lookup given up on finishes
                       on its own thread, unwaited for. */
} loom_dial_opts;

/*
 * loom_dial — connect to `addr`.  Every address a host name resolves to
 * is tried in turn until one connects.  Under a deadline each address
 * gets an even share of the time left (at least 2 s, or all of it if
 * less is left), as in Go, so one that never answers does not use up
 * the time of the others; a timeout of a share moves on to the next
 * address.  It returns once the connection
 * is established (confirmed with getpeername, not only by writability),
 * so a refused or unreachable address moves on to the next one.  A Unix
 * listener whose backlog is full makes it wait, as a blocking connect
 * would (retrying every 1 to 32 ms: there is no event for room), until
 * the deadline, not fail with EAGAIN.
 * Returns 0 and *c; -ECONNREFUSED,
 * -ETIMEDOUT (deadline), -ENETUNREACH, LOOM_EBADADDR, LOOM_ENOHOST, ...
 * Parks.
 */
LOOM_API int loom_dial(loom_conn **c, const char *network, const char *addr);
LOOM_API int loom_dial_with(loom_conn **c, const char *network,
                            const char *addr, const loom_dial_opts *o);

/*
 * loom_read — read up to `len` bytes.  Returns the count (> 0), 0 at end
 * of stream (the peer shut down its writing side), -ETIMEDOUT,
 * -ECONNRESET, LOOM_ECLOSED, or another -errno.  Parks.
 *
 * With `len` 0 (`buf` may be NULL) it waits until a read would not park
 * — bytes, the end of stream or an error are pending — consumes nothing,
 * and returns 0, or the error (a pending socket error is returned here
 * or by the next read, not both), under the same deadline and context
 * rules.  Now and then, when bytes landed while the read before it was
 * running (and that read took them), it returns 0 early and the read
 * after it parks.  A server holding many idle connections waits this way first
 * and takes a read buffer only when there is something to read, so an
 * idle connection holds no buffer:
 *
 *     while (loom_read(c, NULL, 0) == 0) {
 *       char *buf = malloc(N);          // or from a pool
 *       ssize_t n;
 *       do {
 *         n = loom_read(c, buf, N);     // input is there (almost always)
 *         if (n <= 0)
 *           break;                      // 0: end of stream; < 0: error
 *         ...                           // use buf[0..n)
 *       } while (n == N);               // a full buffer: maybe more
 *       free(buf);
 *       if (n <= 0)
 *         break;                        // else the wait returns 0 again
 *     }
 *
 * After a short read the wait costs no system call.
 */
LOOM_API ssize_t loom_read(loom_conn *c, void *buf, size_t len);

/*
 * loom_write — write all `len` bytes.  Returns len, or an error and
 * nothing about how much went out: -EPIPE or -ECONNRESET (the peer is
 * gone; no SIGPIPE is raised), -ETIMEDOUT, LOOM_ECLOSED.  loom_writev
 * does the same for an iovec array (at most IOV_MAX entries).  Parks.
 */
LOOM_API ssize_t loom_write(loom_conn *c, const void *buf, size_t len);
LOOM_API ssize_t loom_writev(loom_conn *c, const struct iovec *iov,
                             int iovcnt);

/*
 * Bounded by a context: as loom_read / loom_write / loom_writev /
 * loom_accept, but a cancel of `ctx` (or of an ancestor, or its
 * deadline) wakes the call with loom_ctx_err(ctx) (-ECANCELED, -ETIMEDOUT),
 * promptly even while it is parked in the poller.  The connection stays usable,
 * in a defined state: a call the cancel cut short (it returns the context's
 * reason) leaves the deadline of that direction in the past (as after a
 * deadline of its own), so the next call in that direction returns
 * -ETIMEDOUT until a new deadline is set.  A deadline another coroutine
 * sets after the cancel does not keep it from ending the call, and
 * stands afterwards.  A `ctx` done before the call makes it return the
 * error and touch nothing; so does a cancel that finds the call still
 * waiting for its turn behind another call in the same direction, and
 * that other call goes on undisturbed: a cancel reaches its own call
 * only.  A call that returns anything else, though
 * the cancel landed while it was completing, leaves the deadline as it
 * was before the call (one that has passed meanwhile is passed), unless
 * it was changed or the connection closed in the meantime, or a deadline
 * still ahead found no memory for its timer to be armed again: then it
 * stays passed, as after a cut.  A write cut
 * short may have sent part of its bytes.  `ctx` NULL: as without a
 * context.  Parks.
 */
LOOM_API ssize_t loom_read_ctx(loom_conn *c, void *buf, size_t len,
                               loom_ctx *ctx);
LOOM_API ssize_t loom_write_ctx(loom_conn *c, const void *buf, size_t len,
                                loom_ctx *ctx);
LOOM_API ssize_t loom_writev_ctx(loom_conn *c, const struct iovec *iov,
                                 int iovcnt, loom_ctx *ctx);
LOOM_API int loom_accept_ctx(loom_listener *l, loom_conn **c, loom_ctx *ctx);

/* Deadlines for reads and writes (0: none).  Blocked calls see the new
 * deadline at once.  0, -ENOMEM (no room for the timer), LOOM_ECLOSED.
 * Any thread: a coroutine, one between loom_block_enter and
 * loom_block_exit, or a thread of the application's own (a deadline
 * ahead set from there is timed by the runtime's timers for threads
 * without a processor; LOOM_ENORUNTIME if no runtime runs), so such a
 * thread can also stop the calls blocked on a connection at once with a
 * deadline that has passed.  A call that fails changes neither deadline.
 * The same for every *_set_deadline call below. */
LOOM_API int loom_set_deadline(loom_conn *c, int64_t rd, int64_t wd);
LOOM_API int loom_set_read_deadline(loom_conn *c, int64_t rd);
LOOM_API int loom_set_write_deadline(loom_conn *c, int64_t wd);

/* Half-close: SHUT_WR sends end-of-stream, reading goes on; SHUT_RD. */
LOOM_API int loom_shutdown(loom_conn *c, int how);

/* Close: blocked calls return LOOM_ECLOSED; `c` is invalid after. */
LOOM_API int loom_close(loom_conn *c);

/* Addresses (any thread): as for loom_listener_addr. */
LOOM_API int loom_conn_local_addr(loom_conn *c, char *buf, size_t len);
LOOM_API int loom_conn_remote_addr(loom_conn *c, char *buf, size_t len);
/* The socket, for setsockopt and the like; do not read, write or close
 * it behind loom's back. */
LOOM_API int loom_conn_fd(loom_conn *c);

/* Socket options (any thread).  TCP_NODELAY is on from the start, as in
 * Go.  A Unix connection has no TCP options: nodelay, and keep-alive with
 * idle_s > 0, fail there (-EOPNOTSUPP) and change nothing. */
LOOM_API int loom_conn_set_nodelay(loom_conn *c, bool on);
/* idle_s > 0: probes after idle_s seconds, then every idle_s. */
LOOM_API int loom_conn_set_keepalive(loom_conn *c, bool on, int idle_s);
LOOM_API int loom_conn_set_buffers(loom_conn *c, int rcvbuf, int sndbuf);

/*
 * Packet sockets: UDP ("udp", "udp4", "udp6") and Unix datagram
 * ("unixgram").  The rules (Go's, as getty found them):
 *   - a connected socket (loom_dial_packet) reads and writes with
 *     loom_pconn_read / loom_pconn_write;
 *   - an unconnected one (loom_listen_packet) with loom_pconn_read_from /
 *     loom_pconn_write_to;
 *   - loom_pconn_write on an unconnected socket fails with -EDESTADDRREQ
 *     ("destination address required");
 *   - loom_pconn_write_to on a connected socket fails with -EISCONN;
 *   - loom_pconn_write_msg takes an address only when unconnected (-EISCONN
 *     with one on a connected socket, -EDESTADDRREQ without one on an
 *     unconnected socket);
 *   - loom_pconn_read_from works on both.
 * Each call moves one datagram.  Reads return the datagram's full
 * length: a result larger than `len` means the datagram was cut to `len`
 * bytes (the rest is dropped, as recv does), so truncation is never
 * silent.  Deadlines, close and addresses behave as for loom_conn.
 *
 * A write waits while the socket has no room.  On an unconnected Unix
 * datagram socket the room is the destination's receive queue, and the
 * kernel cannot say when a given peer has room: such a write tries again
 * after 1 ms, then 2, 4, ... up to 16 ms, until it is sent or its
 * deadline, a context or a close ends it (or it fails with -ENOMEM: no
 * memory for the timer), and while it waits the socket's other writes go
 * on, to other peers and to the same one: a later datagram to that peer
 * may get there first.  (Elsewhere writes to one socket go one at a
 * time, in the order they came, as in Go.)
 */
typedef struct loom_pconn loom_pconn;

/* Bind an unconnected packet socket to `addr` (port 0: any free port). */
LOOM_API int loom_listen_packet(loom_pconn **pc, const char *network,
                                const char *addr);
/* The same with options: `reuseport` (SO_REUSEPORT for udp, set before
 * the bind: several sockets share the port, the kernel spreads datagrams
 * over them; unixgram paths cannot be shared and ignore it); `backlog`
 * does not apply.  o NULL: loom_listen_packet. */
LOOM_API int loom_listen_packet_with(loom_pconn **pc, const char *network,
                                     const char *addr,
                                     const loom_listen_opts *o);

typedef struct loom_dial_packet_opts {
  /* Detect a peer that is not there (getty's probe): after connecting,
   * send `probe` (probe_len bytes; 0 is a valid, empty datagram) and wait
   * up to probe_wait ns (default 10 ms) for the ICMP "port unreachable"
   * that makes the dial fail with -ECONNREFUSED.  A reply, or silence,
   * means the dial succeeds; a reply stays queued for the next read.
   * The send is bounded by probe_wait too: a unixgram peer whose queue
   * is full is there, and the dial succeeds.  Without `probe`, nothing
   * is sent and the dial cannot tell. */
  const void *probe;
  size_t probe_len;
  int64_t probe_wait;
} loom_dial_packet_opts;

/* A connected packet socket to `addr`.  A socket that would connect to
 * itself (a local port picked equal to the destination) is refused with
 * -EADDRNOTAVAIL after retrying. */
LOOM_API int loom_dial_packet(loom_pconn **pc, const char *network,
                              const char *addr);
LOOM_API int loom_dial_packet_with(loom_pconn **pc, const char *network,
                                   const char *addr,
                                   const loom_dial_packet_opts *o);

LOOM_API ssize_t loom_pconn_read(loom_pconn *pc, void *buf, size_t len);
LOOM_API ssize_t loom_pconn_write(loom_pconn *pc, const void *buf,
                                  size_t len);
/* `from` may be NULL; *fromlen is in/out as for recvfrom. */
LOOM_API ssize_t loom_pconn_read_from(loom_pconn *pc, void *buf, size_t len,
                                      struct sockaddr_storage *from,
                                      socklen_t *fromlen);
LOOM_API ssize_t loom_pconn_write_to(loom_pconn *pc, const void *buf,
                                     size_t len, const struct sockaddr *to,
                                     socklen_t tolen);
LOOM_API ssize_t loom_pconn_write_msg(loom_pconn *pc, const struct iovec *iov,
                                      int iovcnt, const struct sockaddr *to,
                                      socklen_t tolen);

/*
 * Bounded by a context: as loom_pconn_read_from / loom_pconn_write_msg
 * (the same rules, checked first), but a cancel of `ctx` (or of an
 * ancestor, or its deadline) wakes the call with loom_ctx_err(ctx)
 * (-ECANCELED, -ETIMEDOUT), promptly even while it is parked in the
 * poller; a `ctx` that is done already returns its error without reading
 * or sending.  A call cut short has moved no datagram (a read's `from`
 * and *fromlen are left untouched).  The socket stays usable, in the
 * state loom_read_ctx leaves a connection in: after a call the cancel
 * cut short, the deadline of that direction is in the past, so the next
 * call in that direction returns -ETIMEDOUT until a new deadline is set
 * (a `ctx` done before the call touches nothing, nor does a cancel that
 * finds the call waiting for its turn, or sleeping between the tries of
 * a Unix datagram write to a full peer); a call that returns anything
 * else leaves the deadline as it was (as loom_read_ctx: unless there is
 * no memory to arm it again).  `ctx` NULL: as without.  Parks.
 */
LOOM_API ssize_t loom_pconn_read_from_ctx(loom_pconn *pc, void *buf, size_t len,
                                          struct sockaddr_storage *from,
                                          socklen_t *fromlen, loom_ctx *ctx);
LOOM_API ssize_t loom_pconn_write_msg_ctx(loom_pconn *pc,
                                          const struct iovec *iov, int iovcnt,
                                          const struct sockaddr *to,
                                          socklen_t tolen, loom_ctx *ctx);

/* Resolve "host:port" (or a path for "unixgram") for write_to. */
LOOM_API int loom_resolve_addr(const char *network, const char *addr,
                               struct sockaddr_storage *out,
                               socklen_t *outlen);
LOOM_API int loom_pconn_set_deadline(loom_pconn *pc, int64_t rd, int64_t wd);
LOOM_API int loom_pconn_set_read_deadline(loom_pconn *pc, int64_t rd);
LOOM_API int loom_pconn_set_write_deadline(loom_pconn *pc, int64_t wd);
LOOM_API int loom_pconn_close(loom_pconn *pc);
LOOM_API int loom_pconn_local_addr(loom_pconn *pc, char *buf, size_t len);
LOOM_API int loom_pconn_remote_addr(loom_pconn *pc, char *buf, size_t len);
LOOM_API int loom_pconn_fd(loom_pconn *pc);
/* SO_RCVBUF / SO_SNDBUF (0: leave as is; the kernel doubles them).  A
 * full receive buffer drops datagrams.  0 or -errno. */
LOOM_API int loom_pconn_set_buffers(loom_pconn *pc, int rcvbuf, int sndbuf);

#ifdef __cplusplus
}
#endif
#endif /* LOOM_NET_H */
