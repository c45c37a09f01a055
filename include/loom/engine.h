/*
 * loom/engine.h — the engine: servers, clients and sessions (getty's).
 *
 * A long-lived connection server is written by supplying a codec
 * (loom/codec.h) and a listener — a few callbacks — and starting a
 * server; the engine runs the sockets.
 *
 * Session.  One connection.  Its reader coroutine reads, decodes as many
 * packages as the bytes hold and hands each to on_message (or to a task
 * pool, which when full holds the reader back until it has room or the
 * session is aborted, which drops that package); a writer coroutine,
 * started the first time the socket does not
 * take a write at once, drains the write queue with writev.  A session
 * also has a name, attributes, statistics, read and write timeouts, a
 * cron period and a maximum package length.
 *
 * Callbacks.  on_open, on_message (without a pool), on_cron and on_error
 * run on the session's reader coroutine, so they never run at the same
 * time for one session; with a task pool, on_message runs on a pool
 * worker.  on_close runs once per session, last: after every on_message
 * of the session has returned, never under an engine lock.  Callbacks
 * may call anything in loom, including loom_session_close and writes to
 * any session, and may park (a parked on_message holds up only its
 * session, or its pool queue).
 *
 * Write queue.  loom_session_write encodes the package and queues its
 * bytes.  When the queue is empty and the socket takes them, the bytes
 * go out at once from the caller (no wake-up of the writer); the rest
 * waits for the writer.  Replies that on_message writes while the reader
 * dispatches several packages of one read leave together, in one send
 * after the batch — unless a callback of the batch parks or enters a
 * blocking section (loom_block_enter): then the replies written so far
 * leave as it stops, not after it, and the batch's later replies as
 * they are written.  The queue is bounded by two watermarks: once it
 * holds `wq_high` bytes, a write waits (up to its timeout) until the
 * writer has drained it below `wq_low`; a write with timeout 0 fails at
 * once with -EAGAIN.  With close_on_full, a write that cannot be queued
 * closes the session (-ENOBUFS).  Queued bytes count until the socket
 * has taken them; the writer offers them in batches of at most half of
 * wq_high (and of 64 KiB with a write_timeout), so a write is refused
 * or waits only while at least wq_high / 2 queued bytes have not even
 * been offered to the socket.  So a peer that reads slowly or never
 * holds at most wq_high + one package of our memory (with compression,
 * plus the compressed copy of the batch being written, which at zlib's
 * default settings is no larger than that batch and zlib's few bytes of
 * framing; see Compression), and 4 bytes for each queued package past
 * the eighth: its length, so that pkgs_out counts only what leaves (see
 * loom_session_stats).
 *
 * Close.  loom_session_close is graceful and idempotent: the reader
 * stops (bytes read but not yet handed to on_message or to the pool are
 * dropped), packages already handed over are handled, queued bytes are
 * written (for at most `linger`), then on_close runs and the socket
 * closes.  A write waiting for room in the queue (its own timeout
 * aside), or a packet session's for room in its socket, waits at most
 * `linger` from the close (none with a negative linger), then fails with
 * LOOM_ECLOSED: a reply that waits for a peer that never reads does not
 * hold the close for ever.  An error — a
 * reset, a timeout, a malformed or oversized package — closes at once,
 * dropping the queue, after on_error.  When the peer half-closes,
 * every package it sent is delivered and every reply queued by then is
 * written before on_close (within `linger`; a negative linger drops
 * them, as for any graceful close).
 *
 * Cron.  Every cron_period the reader calls on_cron (heartbeats, idle
 * checks, with loom_session_stats' last-activity times).  The period is
 * the read's own deadline, so an idle session costs no wake-up beyond
 * its cron.
 *
 * Compression.  With `compress` on, a stream session's bytes pass
 * through zlib: one deflate stream for what it writes and one inflate
 * stream for what it reads, each kept for the session's life so that
 * its window spans packages; every batch the writer sends ends with a
 * sync flush.  Per session, zlib holds:
 *   deflate  (1 << (compress_window_bits + 2)) +
 *            (1 << (compress_mem_level + 9)) bytes and about 6 KiB:
 *            262 KiB at the defaults (15, 8), 70 KiB at (13, 6), 38 KiB
 *            at (12, 5), 9 KiB at (9, 1); made at the session's first
 *            write.
 *   inflate  the peer's window (2^its window bits: 32 KiB for zlib's
 *            default) and about 7 KiB; made when its first bytes come.
 * and the layer reads compressed bytes into 512 bytes on the reader's
 * stack and compresses a batch into 512 bytes on the writer's, taking a
 * 16 KiB buffer only for what outgrows them; the write queue's chunk is
 * given back each time the queue drains.  So a session that has
 * exchanged no byte holds none of it, and 10 000 sessions idle after one
 * exchange each hold about 3.1 GB at the defaults, 0.58 GB at (12, 5)
 * and 0.26 GB at (9, 1) on both ends (bench/engine/zmem, resident
 * memory).  Once made, the streams stay until the session ends: a window
 * is the history the other end's stream refers to.  A smaller window or
 * memLevel costs ratio, and a small memLevel speed (bench/README.md has
 * figures).  The window is in the stream's header, and loom's inflate
 * takes any window the peer declares, so the ends need not agree on
 * these two settings (any zlib inflater with windowBits 15, or 0, reads
 * loom's stream).
 * With settings other than the defaults, deflate may make incompressible
 * bytes a few percent larger (at worst an eighth, zlib's deflateBound),
 * which adds to the write-queue bound above.
 *
 * Packet sessions (udp, unixgram).  A server on a packet network has one
 * session for its socket; each datagram is decoded on its own (bytes left
 * over are -EBADMSG, counted and dropped: one bad datagram does not close
 * the session), and on_message sees the sender in pkg->from; reply with
 * loom_session_write_to.  A datagram longer than max_pkg_len (plus 64
 * bytes of framing; with the raw codec, plus none) is counted as
 * oversize and dropped; so is one whose header asks for more than
 * max_pkg_len, and one over 64 KiB on udp or 16 MiB on unixgram.
 * read_timeout does not apply to that one session (it serves every
 * peer): it never idles out.  A client's packet session is connected.
 * Writes go out at once, one datagram per package; there is no write
 * queue.
 *
 * Unless noted, calls must be made on a coroutine: those that may wait
 * (the writes, loom_client_wait, the closes of a server or a client)
 * return LOOM_ENOTCO from a plain thread and do nothing.  (Inside
 * loom_block_enter/exit a packet session's write that must wait for
 * room on its socket fails with LOOM_ENOTCO too, as the net calls do.)
 */
#ifndef LOOM_ENGINE_H
#define LOOM_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "loom/codec.h"
#include "loom/common.h"
#include "loom/error.h"
#include "loom/taskpool.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct loom_session loom_session;
typedef struct loom_server loom_server;
typedef struct loom_client loom_client;

/* The user's callbacks; any may be NULL. */
typedef struct loom_session_listener {
  /* A new session, before any package: return 0 to accept it, or a
   * negative code to refuse (the session closes; on_close still runs).
   * It may run for a session already closing (its server or client is
   * being closed): its writes are then queued and sent as the close
   * drains the queue, unless the session was aborted (they fail). */
  int (*on_open)(loom_session *s);
  /* One package; pkg->data is valid until the call returns. */
  void (*on_message)(loom_session *s, const loom_pkg *pkg);
  /* Every cron_period. */
  void (*on_cron)(loom_session *s);
  /* The session is closing because of `err` (then on_close follows). */
  void (*on_error)(loom_session *s, int err);
  /* The session is closed; exactly once, last.  Its socket closes right
   * after this returns (so its addresses can still be read here).  It
   * runs for a session that on_open refused, and for one that ended
   * before on_open (no memory for its buffers): then on_open has not
   * run. */
  void (*on_close)(loom_session *s);
  /* The last reference is gone: free what loom_session_user() or the
   * attributes point to.  Runs wherever the last loom_session_unref is
   * (the reader after on_close, or a holder of a reference); it must not
   * park.  A server or client close returns after the on_free of every
   * session nobody else still references.  A session whose coroutine
   * could not be started gets no callback at all. */
  void (*on_free)(loom_session *s);
} loom_session_listener;

/* How a session spreads its packages over a task pool. */
typedef enum loom_dispatch {
  LOOM_DISPATCH_SESSION = 0, /* by session: its packages stay in order
                                (with one worker per queue) */
  LOOM_DISPATCH_ROUND_ROBIN, /* any queue: no order */
  LOOM_DISPATCH_KEY,         /* by a hash of dispatch_key(pkg): in
                                order per key (with one worker per
                                queue), keys spread over the queues
                                whatever their pattern */
} loom_dispatch;

/* Everything a session is configured with.  Zero means the default. */
typedef struct loom_session_opts {
  const loom_session_listener *listener;
  const loom_codec *codec; /* NULL: raw bytes */
  void *user;              /* initial loom_session_user() */
  int64_t read_timeout;    /* ns without a byte from the peer before the
                              session closes with -ETIMEDOUT; 0: none */
  int64_t write_timeout;   /* ns the socket may take to accept the next
                              64 KiB of queued bytes (all of them if
                              fewer) before the session closes with
                              -ETIMEDOUT; 0: none */
  int64_t cron_period;     /* ns between on_cron calls; 0: no cron */
  int64_t linger;          /* ns a graceful close may spend writing what is
                              queued (0: 5 s; negative: drop it) */
  size_t max_pkg_len;      /* larger packages received close the session
                              with -EMSGSIZE (0: 1 MiB; SIZE_MAX: no
                              limit; packet sessions drop them) */
  size_t max_write_len;    /* larger packages written fail with -EMSGSIZE
                              (0: max_pkg_len) */
  size_t read_buf;         /* heap read buffer (0: 4 KiB), taken when a
                              read leaves part of a package or fills the
                              512 bytes read on the reader's stack; it
                              grows to hold one package, and is given
                              back once it is handled, or, if part of
                              the next is pending, when reads are small
                              again, at a cron tick or an idle check */
  size_t wq_high;          /* write queue high watermark (0: 1 MiB) */
  size_t wq_low;           /* low watermark (0: wq_high / 2) */
  bool close_on_full;      /* a write that cannot be queued closes */
  loom_taskpool *pool;     /* NULL: on_message runs on the reader */
  loom_dispatch dispatch;
  uint64_t (*dispatch_key)(loom_session *s, const loom_pkg *pkg);
  size_t pool_high;         /* bytes of the session's packages handed to
                               its pool and not yet handled past which
                               its reader waits before it reads on (0:
                               1 MiB); one package goes whatever its
                               length when none of the session's are
                               there.  A flooding peer holds this and one
                               package of the pool's memory, not its
                               queue's worth of copies */
  int compress;             /* zlib level 1..9 for both directions,
                               -1: zlib's default, 0: off; TCP and Unix
                               only, and both ends must have it on (the
                               levels may differ).  A peer's stream that
                               zlib cannot parse, or that ends inside a
                               deflate block, closes with LOOM_ECOMPRESS.
                               Memory: see Compression above */
  int compress_window_bits; /* our deflate window: 2^bits bytes, 9..15
                               (0: 15, zlib's default); the peer need
                               not agree */
  int compress_mem_level;   /* deflate's memLevel 1..9 (0: 8, zlib's
                               default); the peer need not agree */
} loom_session_opts;

/* ---- sessions ---------------------------------------------------------- */

/*
 * loom_session_write — encode the package data[0..len) with the session's
 * codec and queue it.  `timeout` (ns) bounds the wait when the write queue
 * is above its high watermark: 0 fails at once, negative waits without
 * limit.  Returns 0 (queued: it will be written unless the session dies
 * first; it counts in pkgs_out once it has left whole, in pkgs_dropped
 * if a close drops it); -EAGAIN (full, timeout 0), -ETIMEDOUT, -ENOBUFS (full,
 * and close_on_full closed the session), -EMSGSIZE, -EINVAL (the codec cannot
 * encode it), LOOM_ECLOSED (the session was aborted, or its graceful close
 * has queued its last bytes; while a graceful close is still handling
 * packages already received, their replies are accepted, and one that
 * waits for room waits at most `linger` from the close), -ENOMEM;
 * -EDESTADDRREQ on an unconnected packet session (use
 * loom_session_write_to).  Any coroutine; parks only when the queue is
 * full, or others wait for room: writes that wait are served in the order
 * they came, as a Go channel's blocked senders (when the queue falls to
 * wq_low the first goes, then the next while there is room); a write with
 * a timeout that comes while others wait queues behind them, one with
 * timeout 0, or from a callback of the session's server or client (on its
 * reader or in its task pool), takes room that is there.  A packet session has
 * no queue: its write sends the datagram at once, and `timeout` bounds the wait
 * when the socket has no room for it (a unixgram peer that does not read, a
 * full send buffer): 0 fails with -EAGAIN at once, a positive timeout with
 * -ETIMEDOUT, a negative one waits until there is room; an abort ends the wait
 * with LOOM_ECLOSED, and so does a graceful close once `linger` has passed
 * since it began (at once with a negative linger; an unconnected unixgram
 * socket's retries may see it up to 16 ms late).  Such a refusal is counted as
 * wq_full; close_on_full does not apply (a server's one packet session serves
 * every peer).  A datagram counts in bytes_out and pkgs_out once sent; one that
 * does not leave is not in them.  An unconnected unixgram socket
 * has room per peer, and the poller does not say whose: a write waiting there
 * tries again after 1, 2, 4 ... up to 16 ms, so one peer that never reads holds
 * up no write to another.
 */
LOOM_API int loom_session_write(loom_session *s, const void *data, size_t len,
                                int64_t timeout);

/* For unconnected packet sessions: send one package to `to`.  Returns 0
 * or an error as loom_session_write, plus -EISCONN on a stream or
 * connected session. */
LOOM_API int loom_session_write_to(loom_session *s, const void *data,
                                   size_t len, const struct sockaddr *to,
                                   socklen_t tolen, int64_t timeout);

/* Close gracefully (see above).  Idempotent; any thread (a coroutine, a
 * callback, or a thread of the application's own); returns at once. */
LOOM_API void loom_session_close(loom_session *s);
/* Close at once because of `err` (< 0): on_error(err), the queue is
 * dropped.  It also cuts short a graceful close under way (which then
 * reports err); the first abort decides, later aborts and closes change
 * nothing.  Packages already handed to a task pool are still handled
 * (their writes fail with LOOM_ECLOSED), and on_close follows them.
 * Any thread; returns at once. */
LOOM_API void loom_session_abort(loom_session *s, int err);
/* True once the session is closing. Any thread. */
LOOM_API bool loom_session_closed(loom_session *s);

/* Keep `s` valid past on_close (e.g. in a chat room's member list); every
 * ref needs an unref.  Writes to a closed session fail with
 * LOOM_ECLOSED.  Any thread. */
LOOM_API loom_session *loom_session_ref(loom_session *s);
LOOM_API void loom_session_unref(loom_session *s);

/* A number unique among this process's sessions. Any thread. */
LOOM_API uint64_t loom_session_id(loom_session *s);
/* The name ("tcp 127.0.0.1:7000<-127.0.0.1:51234" until set; made on
 * first use, from addresses that stay readable until on_close returns,
 * even after the peer has reset the connection). */
LOOM_API const char *loom_session_name(loom_session *s);
/* Copies `name`; -ENOMEM.  Not safe against a concurrent name read. */
LOOM_API int loom_session_set_name(loom_session *s, const char *name);
LOOM_API void *loom_session_user(loom_session *s);
LOOM_API void loom_session_set_user(loom_session *s, void *user);

/* Change a running session's timeouts (a gateway that tightens them
 * once a peer has logged in, say), with the meaning and units of the
 * loom_session_opts fields of the same names; 0 turns one off.  A new
 * read timeout and a new cron period count from the change (the next
 * on_cron comes one period later); a new write timeout bounds the
 * writer's batch under way too (set from a plain thread: the next
 * batch).  Safe from any coroutine or
 * thread, the session's own callbacks included.  0; -EINVAL (a negative
 * value); LOOM_ECLOSED once the session is closing. */
LOOM_API int loom_session_set_read_timeout(loom_session *s, int64_t ns);
LOOM_API int loom_session_set_write_timeout(loom_session *s, int64_t ns);
LOOM_API int loom_session_set_cron_period(loom_session *s, int64_t ns);

/* Attributes: user values under pointer keys (a NULL value removes the
 * key).  Safe from any coroutine.  set: 0 or -ENOMEM. */
LOOM_API int loom_session_set_attr(loom_session *s, const void *key,
                                   void *value);
LOOM_API void *loom_session_attr(loom_session *s, const void *key);

/* The socket's addresses as "host:port" (or a path): 0, -ENOSPC, or
 * LOOM_ECLOSED once the socket is closed (after on_close).  A packet
 * server's session is unconnected and has no remote address: -ENOTCONN
 * (pkg->from names each package's sender). */
LOOM_API int loom_session_remote_addr(loom_session *s, char *buf, size_t len);
LOOM_API int loom_session_local_addr(loom_session *s, char *buf, size_t len);

typedef struct loom_session_stats {
  uint64_t bytes_in, bytes_out; /* on the wire (compressed if it is): every
                                   byte the socket took, those of a
                                   package cut short by a close too */
  uint64_t pkgs_in;
  uint64_t pkgs_out;     /* packages that left whole: a stream package
                            counts once the send that gave the socket
                            its last byte has returned (so the count
                            lags the wire by a send under way, and never
                            falls), a datagram once sent */
  uint64_t pkgs_dropped; /* packages written (loom_session_write returned
                            0) that a close dropped from the write queue
                            before they left whole: an abort, a negative
                            linger, a write that failed.  Every package
                            written ends in pkgs_out or here */
  int64_t last_read, last_write; /* loom_now() of the last byte each way */
  int64_t opened;                /* loom_now() at accept or connect */
  size_t wq_bytes;               /* queued, not yet written */
} loom_session_stats;
/* A snapshot (each field read atomically). Any thread. */
LOOM_API void loom_session_stats_get(loom_session *s, loom_session_stats *out);

/* ---- metrics ----------------------------------------------------------- */

/* Errors by kind, as counted in loom_metrics. */
#define LOOM_METRIC_ERRORS(X)                                                  \
  X(decode, "malformed packages (-EBADMSG)")                                   \
  X(oversize, "packages over max_pkg_len (-EMSGSIZE)")                         \
  X(timeout, "read or write timeouts")                                         \
  X(reset, "connections reset or broken by the peer")                          \
  X(wq_full, "writes refused by a full write queue")                           \
  X(compress, "corrupt compressed streams")                                    \
  X(refused, "sessions refused (connection limit, on_open)")                   \
  X(accept, "accept or dial failures")                                         \
  X(other, "other errors")

typedef struct loom_metrics {
  uint64_t sessions_open;  /* now */
  uint64_t sessions_total; /* ever started, on_open's refusals included
                              (connections refused at max_conns never
                              became sessions: see errors.refused; nor
                              did a connection whose reader coroutine
                              could not be started, which no callback
                              sees: a server counts it in errors.other,
                              a client as a failed dial) */
  /* Traffic, as in loom_session_stats. */
  uint64_t bytes_in, bytes_out, pkgs_in, pkgs_out, pkgs_dropped;
  uint64_t wq_bytes;    /* queued now, over all sessions */
  uint64_t wq_max;      /* the longest queue now */
  uint64_t pool_queued; /* tasks waiting in the task pool, if any */
  struct {
#define LOOM_METRIC_FIELD_(name, help) uint64_t name;
    LOOM_METRIC_ERRORS(LOOM_METRIC_FIELD_)
#undef LOOM_METRIC_FIELD_
  } errors;
} loom_metrics;

/*
 * loom_metrics_prometheus — `m` in Prometheus' text format, each name
 * prefixed with `prefix` ("loom" if NULL), errors as one counter with a
 * `kind` label.  Returns the length written (without the NUL), -ENOSPC
 * if `len` is too small, or -EINVAL if `prefix` is not a valid start of
 * a metric name ([a-zA-Z_:][a-zA-Z0-9_:]*: "my-app" is not; nothing is
 * written).  Any thread.
 */
LOOM_API int loom_metrics_prometheus(const loom_metrics *m, const char *prefix,
                                     char *buf, size_t len);

/* ---- servers ----------------------------------------------------------- */

typedef struct loom_server_opts {
  const char *network; /* "tcp", "tcp4", "tcp6", "unix", "udp", ...,
                          "unixgram" */
  const char *addr;    /* "host:port" or a path */
  loom_session_opts session;
  int max_conns; /* sessions open at once; more are closed at
                    accept (counted as refused); 0: no limit */
  int backlog;   /* 0: SOMAXCONN */
  bool reuseport;     /* SO_REUSEPORT, stream and packet servers alike
                         (tcp and udp; unix paths ignore it) */
  bool no_delay_off;  /* leave Nagle on (TCP_NODELAY is set by default) */
  int keepalive;      /* seconds of idle before keep-alive probes, at
                         most 32767 (Linux's limit); 0: the system
                         default (negative or more: -EINVAL) */
  int rcvbuf, sndbuf; /* socket buffer sizes (each accepted connection's,
                         or a packet server's socket); 0: the system
                         default (negative: -EINVAL) */
  /* Called once loom_server_close has finished — every session's
   * on_close has run and the server is freed — with what the close
   * returns (0 or -ETIMEDOUT) and closed_arg, on the coroutine that ran
   * the close.  A close begun in a session's callback returns at once:
   * this is how to learn that it is over (before closing the task pool
   * the sessions used, say).  NULL: not called. */
  void (*on_closed)(void *closed_arg, int rc);
  void *closed_arg;
} loom_server_opts;

/*
 * loom_server_start — listen and serve: each accepted connection becomes
 * a session.  Returns once listening: 0 and *srv; or the listen error
 * (-EADDRINUSE, LOOM_EBADADDR, ...), -EINVAL (no listener or bad
 * options: a value out of its range in loom_session_opts, such as
 * compress_window_bits outside 9..15; compression on a packet network),
 * -ENOMEM.  On a coroutine.
 */
LOOM_API int loom_server_start(loom_server **srv, const loom_server_opts *o);

/* The listening address ("127.0.0.1:7000", a path): after port 0. */
LOOM_API int loom_server_addr(loom_server *srv, char *buf, size_t len);

/*
 * loom_server_close — shut down gracefully and free the server: stop
 * accepting, close every session gracefully (received packages are
 * handled and their replies written), wait for them until `deadline`
 * (loom_now() time; 0: no limit), then abort what is left with
 * LOOM_ECLOSED and wait for every on_close.  Returns 0, or -ETIMEDOUT if
 * some sessions had to be aborted.  Parks.
 *
 * Called where it cannot wait — from a callback of one of the server's
 * own sessions (an admin "shutdown" message, an on_close), which ends
 * only after the callback returns, or from a worker of the server's task
 * pool (a pooled callback of any session sharing the pool, or any task
 * of it), whose queue may hold the packages the close waits for — the
 * same close runs in a coroutine of its own: the call returns 0 at once
 * (-ENOMEM if that coroutine cannot be started; nothing is closed then),
 * and on_closed (in the options) says when it is over.  Either way `srv`
 * must not be used after the call.
 *
 * Close servers and clients before the main coroutine returns.  One
 * still running when loom_run ends is not closed: its coroutines are
 * abandoned (runtime.h), its sockets closed with the runtime (net.h),
 * no on_close runs, the memory of the server, its sessions and its pool
 * is not freed, and `srv` must not be used after.
 */
LOOM_API int loom_server_close(loom_server *srv, int64_t deadline);

/* A snapshot of the server's metrics (closed sessions included). */
LOOM_API void loom_server_metrics(loom_server *srv, loom_metrics *out);

/* ---- clients ----------------------------------------------------------- */

typedef struct loom_client_opts {
  const char *network;
  const char *addr;
  loom_session_opts session;
  int conns;                  /* sessions kept connected (0: 1) */
  int64_t reconnect_interval; /* redials come at most this often, and a
                                 failed dial is retried after it (0: 100
                                 ms; negative: never redial — each session
                                 is dialled once) */
  int64_t reconnect_max;      /* the wait doubles up to this (0: 5 s) */
  int64_t dial_timeout;       /* 0: 5 s.  A packet dial does not wait
                                 (udp: at most 10 ms for a refusal) */
  /* Socket options of each dialled connection, as loom_server_opts'
   * (buffer sizes: a packet session's socket's too). */
  bool no_delay_off;
  int keepalive;
  int rcvbuf, sndbuf;
  /* As loom_server_opts': called once loom_client_close has finished. */
  void (*on_closed)(void *closed_arg, int rc);
  void *closed_arg;
} loom_client_opts;

/*
 * loom_client_start — start keeping opts->conns sessions connected to the
 * server.  Dialling happens on the client's own coroutine, never from
 * inside a callback: the first conns dials go out at once; a session that
 * closes is replaced by a redial, at most one per reconnect_interval; a
 * failed dial is retried after a back-off (interval, doubling up to
 * reconnect_max, back to interval after a success).  Returns 0 and *cl at once,
 * connected or not; -EINVAL (bad options, as loom_server_start's), -ENOMEM.
 * On a coroutine.
 */
LOOM_API int loom_client_start(loom_client **cl, const loom_client_opts *o);

/* Wait until at least `n` sessions are connected: 0; at `deadline` (0:
 * none) the error of a dial that failed during the wait
 * (-ECONNREFUSED, ...) or else -ETIMEDOUT; for a client that never
 * redials, as soon as it cannot get there, the last dial error;
 * LOOM_ECLOSED once the client is closing (loom_client_close frees the
 * client only after every wait under way has returned); -ENOMEM when a
 * deadline ahead finds no memory for its timer.  Parks.  A
 * session counts until its reader has ended, after on_close: a wait in
 * one of a session's own callbacks for the session that replaces it
 * cannot succeed (with deadline 0 it never returns). */
LOOM_API int loom_client_wait(loom_client *cl, int n, int64_t deadline);

/* A connected session, round-robin, with a reference the caller must
 * drop with loom_session_unref.  0, or -ENOTCONN when none is.  Any
 * thread. */
LOOM_API int loom_client_session(loom_client *cl, loom_session **s);

/* Stop reconnecting, close every session as loom_server_close does, and
 * free the client.  0 or -ETIMEDOUT.  Parks.  From a callback of one of
 * its own sessions or a worker of its task pool, as loom_server_close:
 * the close goes on in its own coroutine and the call returns 0 (or
 * -ENOMEM) at once; on_closed says when it is over. */
LOOM_API int loom_client_close(loom_client *cl, int64_t deadline);

LOOM_API void loom_client_metrics(loom_client *cl, loom_metrics *out);

#ifdef __cplusplus
}
#endif
#endif /* LOOM_ENGINE_H */
