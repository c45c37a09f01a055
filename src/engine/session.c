/*
 * session.c — one connection of the engine: its reader, its writer, its
 * write queue and its close protocol.
 *
 * Coroutines.  A stream session runs the reader (read, decode, dispatch,
 * cron; it owns the session's life and runs every callback but pooled
 * on_message) and, from the first time its socket pushes back, the
 * writer (drains the write queue); until then its writes go out from
 * their callers and it costs one coroutine.  A packet session runs only
 * the reader; its writes always go out from the caller.
 * Stream bytes pass through the session's layer stack (layer.h): the
 * socket, and zlib above it when the session compresses.
 *
 * The write queue (wmu protects it and the w* flags).  Producers encode
 * a package into a small buffer on their own stack, outside the lock.
 * Under the lock, if the queue is empty, the writer is not writing and
 * the stack is the bare socket, they try the socket at once (a
 * non-blocking sendmsg): a reply in a request/response protocol then
 * costs no wake-up of the writer.  (A transform such as zlib must see
 * every byte through its writev, so then the writer does all writing.)
 * What the socket does not take goes into the queue (a loom_buf) and the
 * writer is signalled.  The writer peeks at the queue's chunks under the
 * lock, writes them with the lock released (wbusy tells producers not to
 * write around it, keeping the order), and consumes them under the lock
 * again.  Producers wait while the queue holds wq_high bytes or more, in
 * a line (rw_head): when it falls to wq_low the first is woken, and each
 * that takes room wakes the next while there is room, so they are
 * served in the order they came, as a Go channel serves blocked senders.
 *
 * Corking.  When one read brings several packages (a pipelining peer),
 * the reader marks the queue corked while it dispatches them: replies
 * its own on_message writes gather in the queue, and one send after the
 * batch takes them all (uncork), instead of one send per package.  A
 * callback of the batch may stop for a while (it parks on a channel,
 * sleeps, enters a blocking section); the replies held before it must
 * not wait with it.  So once the reader holds a reply, it sets its
 * coroutine's park hook (runtime.h, loom__park_hook_set), which the
 * runtime runs as the reader parks or blocks, and which hands the
 * replies to a coroutine of their own to send (cork_parked): the batch
 * ends there, and what its later callbacks write goes out as they write
 * it.  A batch whose callbacks do not stop costs two stores to the
 * coroutine; ping-pong, one package a read, never corks.  Rejected:
 * sending from the hook itself (it runs inside the park, maybe with the
 * queue's own lock in the middle of being taken: it must not take it);
 * a timer that bounds how long replies are held (a timer per batch, and
 * a delay still).
 *
 * States (`state`, seq_cst):
 *   OPEN     — reading; writes accepted.
 *   CLOSING  — graceful: the reader stops reading, waits for its pooled
 *              packages, then tells the writer to finish (`wfinal`): it
 *              writes what is queued, bounded by linger, and exits.
 *   ABORTED  — an error: the queue is dropped, both coroutines leave as
 *              soon as they notice, the first error is kept in `err`.
 * Only moves forward; the first loom_session_close / _abort decides.
 *
 * Waking the reader.  A reader parked in loom_read is woken by moving its
 * read deadline into the past after the state changed.  The reader sets
 * its own deadline (cron, read timeout) before it looks at the state, so
 * whichever of the two deadline writes comes last is seen: either the
 * reader saw the new state, or the closer's deadline came after the
 * reader's.
 *
 * End of life.  The reader, last: waits for the writer, closes the
 * socket, calls on_error (if aborted) and on_close, takes the session off
 * its owner's list and drops its reference.  Other references (pooled
 * packages, users' loom_session_ref) keep the struct alive, not the
 * socket.
 */
#include <errno.h>
#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include "engine/engine.h"
#include "engine/export_test.h"
#include "engine/layer.h"
#include "engine/readbuf.h"
#include "loom/runtime.h"
#include "net/netfd.h"
#include "runtime/alloc.h"
#include "runtime/runtime.h"

enum { S_OPEN, S_CLOSING, S_ABORTED };

typedef struct attr {
  const void *key;
  void *value;
} attr;

/* Fields in the order a package's way through the session touches them:
 * what every read and reply uses comes first, in as few cache lines as
 * it fits (with a thousand sessions taking turns, each package otherwise
 * begins with a cache miss per line), then the options, then the rest. */
struct loom_session {
  _Atomic uint64_t ref;
  loom__owner *owner;
  _Atomic int state;
  _Atomic int err; /* the abort reason */
  _Atomic unsigned retime; /* RETIME_ bits: read_timeout or cron_period
                              changed, the reader recomputes that one's
                              deadline (retime) */
  int fd;
  bool packet, connected;
  bool unix_dgram; /* "unixgram": datagrams beyond UDP's 64 KiB */
  bool opened;     /* on_open accepted it (reader only) */
  const loom_codec *codec;
  loom__layer *top;  /* what reader and writer use (layer.h) */
  loom_conn *conn;   /* stream sessions */
  loom_pconn *pc;    /* packet sessions */
  uint64_t reader_g; /* the reader's loom_id() */

  /* Statistics (relaxed): one writer each at a time — pkgs_in the
   * reader's, bytes_out and pkgs_out a stream session's under wmu. */
  _Atomic uint64_t bytes_in, bytes_out, pkgs_in, pkgs_out;
  _Atomic int64_t last_read, last_write;

  loom_mutex wmu; /* the write queue and the w* fields */
  loom_buf wq;
  struct room_waiter *rw_head, *rw_tail; /* producers waiting for room,
                                            in order (wait_room) */
  bool wbusy;             /* the writer is writing queued bytes */
  bool corked;            /* the reader is dispatching a batch: its own
                             writes wait in the queue for uncork() */
  bool wfinal;            /* no more bytes will come: drain and exit */
  bool writer_on;         /* the writer coroutine has been started */
  bool wdone;             /* the writer has exited */
  bool io_closed;         /* the socket is closed (or closing): calls
                             from outside must not touch it */
  bool psend;             /* a packet sender waits for room and owns the
                             pconn's write deadline (wait_send) */
  loom__layer sock;       /* the bottom layer: conn, counting bytes */

  loom_session_opts o;

  /* The packages in wq, oldest first (wmu; see "The write queue's
   * packages" below): a ring of pk_n lengths from pk_head in
   * pk[0..pk_cap), pk_cap a power of two; pk_off bytes of the first are
   * taken already.  Only queued packages use it: out of the lines every
   * reply touches. */
  uint32_t *pk; /* pk_mem, or the heap while more packages are queued */
  uint32_t pk_head, pk_n, pk_cap, pk_off;
  _Atomic uint64_t pkgs_dropped; /* statistics, as pkgs_out (wmu) */
  uint32_t pk_mem[8];            /* the ring while it fits */

  loom_cond wcond;        /* writer: bytes queued or wfinal */
  loom_cond wspace;       /* packet senders: psend was let go, or the
                             socket ended */
  int64_t final_deadline; /* set with wfinal: now + linger (0: none) */
  int64_t close_by;       /* set by a graceful close: writes waiting for
                             room give up then (1: at once, linger < 0);
                             written under wmu, atomically: a packet
                             sender's retries read it without wmu */
  int64_t wdl;            /* the socket's write deadline as last set by
                             the writer, loom_session_set_write_timeout
                             or the close (wmu): the writer sets a
                             batch's only when it differs */
  loom_wg io_users;       /* packet sessions: senders on the socket */
  loom_sema writer_exit;  /* released by the writer as it exits */
  loom_wg pooled;         /* packages handed to the pool, not yet done */
  _Atomic size_t pool_bytes; /* their bytes (wait_pool_room) */
  atomic_bool pool_full;     /* the reader waits for pool_room */
  loom_sema pool_room;       /* released as pool_bytes falls, if so */
  loom_wg flushing;       /* cork_flush coroutines under way */
  bool cork_armed;        /* the reader's park hook is set: it holds
                             corked replies (reader only) */
  uint64_t rr;            /* round-robin dispatch counter */
  size_t wsent;           /* the writer's: bytes the socket took in its
                             last writev, also of one that failed */

  uint64_t id;
  loom_session *prev, *next; /* on the owner's list (owner->mu) */
  loom_codec raw;            /* the codec when o.codec is NULL */
  char network[12];
  _Atomic(char *) name;
  void *user;
  loom_mutex amu; /* attrs */
  attr *attrs;
  size_t nattrs, capattrs;
  int64_t opened_at;
};

static void writer_main(void *arg);

/* The most a writer batch holds when the session has a write timeout. */
#define WRITE_GRAIN ((size_t)65536)

/* A stack buffer for encoding one package (spills to the heap). */
#define ENC_STACK 2048

static _Atomic uint64_t next_session_id = 1;

/* ---- options ------------------------------------------------------------ */

int loom__session_opts(loom_session_opts *out, const loom_session_opts *in) {
  loom_session_opts o = *in;
  if (!o.listener || o.read_timeout < 0 || o.write_timeout < 0 ||
      o.cron_period < 0 || o.compress < -1 || o.compress > 9 ||
      (o.compress_window_bits != 0 &&
       (o.compress_window_bits < 9 || o.compress_window_bits > 15)) ||
      o.compress_mem_level < 0 || o.compress_mem_level > 9 ||
      (o.dispatch == LOOM_DISPATCH_KEY && !o.dispatch_key) ||
      o.dispatch > LOOM_DISPATCH_KEY)
    return -EINVAL;
  if (o.linger == 0)
    o.linger = INT64_C(5000000000);
  if (o.max_pkg_len == 0)
    o.max_pkg_len = (size_t)1 << 20;
  if (o.max_write_len == 0)
    o.max_write_len = o.max_pkg_len;
  if (o.read_buf == 0)
    o.read_buf = 4096;
  if (o.wq_high == 0)
    o.wq_high = (size_t)1 << 20;
  if (o.wq_low == 0 || o.wq_low > o.wq_high)
    o.wq_low = o.wq_high / 2;
  if (o.pool_high == 0)
    o.pool_high = (size_t)1 << 20;
  if (o.compress_window_bits == 0)
    o.compress_window_bits = 15;
  if (o.compress_mem_level == 0)
    o.compress_mem_level = 8;
  *out = o;
  return 0;
}

/* ---- the write queue's packages ---------------------------------------- */

/* pkgs_out counts a stream package once its last byte has left — been
 * taken by the socket — and never one that a close drops from the
 * queue, even in part.  The queue is bytes, so the session keeps beside
 * it the lengths of the packages in it (pk), 4 bytes a package; bytes
 * taken off the queue are taken off these lengths too, and each length
 * used up is a package that left.
 *
 * Counted once the send that took its last byte has returned, so the
 * count only ever grows (the metrics export it as a counter, which a
 * fall would read as a restart) and lags the wire by the send under way
 * — a writer's batch, whose writev may wait for room.  Under a transform
 * (zlib), whose writev takes a batch whole or fails, a failed batch
 * counts none.
 *
 * Rejected: counting packages as they are queued (the count of a
 * session that is aborted with a full queue says packages left that
 * never did); counting those a send offers before it and taking back
 * those it did not take (the count ran ahead of the wire, so a peer's
 * answer never came before it, but fell whenever a send came up short);
 * decoding the queue with the codec to find its packages (a codec's
 * encode need not be decodable by its own decode, and the raw codec has
 * no boundaries at all). */
#define PK_PART 0x80000000u /* not the last piece of its package */
#define PK_MAX 0x7fffffffu  /* the longest piece: a package longer is cut */

static uint32_t pk_pieces(size_t n) {
  return n == 0 ? 0 : (uint32_t)((n - 1) / PK_MAX + 1);
}

/* Room for `more` entries.  0 or -ENOMEM.  wmu held. */
static int pk_reserve(loom_session *s, uint32_t more) {
  if (more <= s->pk_cap - s->pk_n)
    return 0;
  uint64_t cap = s->pk_cap;
  while (cap - s->pk_n < more)
    cap *= 2;
  if (cap > UINT32_MAX / 2 + 1)
    return -ENOMEM;
  uint32_t *a = loom__malloc((size_t)cap * sizeof *a);
  if (!a)
    return -ENOMEM;
  for (uint32_t i = 0; i < s->pk_n; i++)
    a[i] = s->pk[(s->pk_head + i) & (s->pk_cap - 1)];
  if (s->pk != s->pk_mem)
    loom__free(s->pk);
  s->pk = a;
  s->pk_cap = (uint32_t)cap;
  s->pk_head = 0;
  return 0;
}

/* A package of n > 0 bytes at the queue's tail (room reserved).  wmu
 * held. */
static void pk_push(loom_session *s, size_t n) {
  while (n > 0) {
    uint32_t piece = n > PK_MAX ? PK_MAX : (uint32_t)n;
    n -= piece;
    s->pk[(s->pk_head + s->pk_n++) & (s->pk_cap - 1)] =
        piece | (n ? PK_PART : 0);
  }
}

/* Take the queue's first n bytes off the lengths: the packages whose
 * last byte was among them.  wmu held. */
static uint64_t pk_take(loom_session *s, size_t n) {
  uint64_t done = 0;
  /* n beyond the lengths: only in a session being aborted, whose queue
   * took a package it could not count (queue_pkg). */
  while (n > 0 && s->pk_n > 0) {
    uint32_t e = s->pk[s->pk_head];
    size_t left = (e & PK_MAX) - s->pk_off;
    if (n < left) {
      s->pk_off += (uint32_t)n;
      break;
    }
    n -= left;
    s->pk_off = 0;
    s->pk_head = (s->pk_head + 1) & (s->pk_cap - 1);
    s->pk_n--;
    if (!(e & PK_PART))
      done++;
  }
  return done;
}

/* Forget the lengths, and give back their heap ring. */
static void pk_reset(loom_session *s) {
  if (s->pk != s->pk_mem)
    loom__free(s->pk);
  s->pk = s->pk_mem;
  s->pk_cap = sizeof s->pk_mem / sizeof s->pk_mem[0];
  s->pk_head = s->pk_n = s->pk_off = 0;
}

/* Drop what is queued (an abort, a negative linger, a failed write, or
 * an empty queue giving back its memory): none of its packages leaves
 * whole — each is counted as dropped.  wmu held, nobody writing. */
static void wq_drop(loom_session *s) {
  uint64_t dropped = 0;
  for (uint32_t i = 0; i < s->pk_n; i++)
    dropped += !(s->pk[(s->pk_head + i) & (s->pk_cap - 1)] & PK_PART);
  if (dropped)
    atomic_fetch_add_explicit(&s->pkgs_dropped, dropped, memory_order_relaxed);
  loom_buf_reset(&s->wq);
  pk_reset(s);
}

/* ---- references, state -------------------------------------------------- */

loom_session *loom_session_ref(loom_session *s) {
  atomic_fetch_add_explicit(&s->ref, 1, memory_order_relaxed);
  return s;
}

/* on_free: false for a session no callback has seen. */
static void session_free(loom_session *s, bool on_free) {
  if (on_free && s->o.listener->on_free)
    s->o.listener->on_free(s);
  loom_buf_reset(&s->wq);
  pk_reset(s);
  while (s->top && s->top != &s->sock) {
    loom__layer *below = s->top->below;
    s->top->ops->free(s->top);
    s->top = below;
  }
  loom__free(atomic_load(&s->name));
  loom__free(s->attrs);
  loom__free(s);
}

void loom_session_unref(loom_session *s) {
  if (atomic_fetch_sub_explicit(&s->ref, 1, memory_order_acq_rel) == 1)
    session_free(s, true);
}

/* Options that may change while the session runs (the setters below)
 * are read with this; the rest of s->o is fixed at the start. */
static int64_t opt_load(const int64_t *v) {
  return __atomic_load_n(v, __ATOMIC_RELAXED);
}

bool loom_session_closed(loom_session *s) {
  return atomic_load(&s->state) != S_OPEN;
}

/* A producer waiting for room in the write queue, on its own stack. */
typedef struct room_waiter {
  struct room_waiter *next;
  loom_cond turn; /* signalled when it may be the one to take room */
} room_waiter;

/* Wake the first producer in line (it looks whether there is room).
 * wmu held. */
static void room_wake(loom_session *s) {
  if (s->rw_head != NULL)
    loom_cond_signal(&s->rw_head->turn);
}

/* Wake every producer in line: the session takes no more bytes.  wmu
 * held. */
static void room_wake_all(loom_session *s) {
  for (room_waiter *w = s->rw_head; w != NULL; w = w->next)
    loom_cond_signal(&w->turn);
}

/* Wake the reader out of a read, and the writer out of a write: a
 * deadline in the past, which any thread may set (no timer), so close
 * and abort work from a thread of the application's own too. */
static void wake_io(loom_session *s, bool writer_too) {
  loom_mutex_lock(&s->wmu);
  if (!s->io_closed) {
    if (s->conn) {
      loom_set_read_deadline(s->conn, 1);
      if (writer_too)
        loom_set_write_deadline(s->conn, 1);
    } else {
      loom_pconn_set_read_deadline(s->pc, 1);
      if (writer_too) /* a sender parked on a full peer leaves too */
        loom_pconn_set_write_deadline(s->pc, 1);
    }
  }
  loom_mutex_unlock(&s->wmu);
}

/* A graceful close bounds the writes waiting for room by the linger,
 * counted from now: one of them may be a reply on the reader or in the
 * pool, which the close waits for before it writes the queue out, and a
 * peer that never reads would hold it (and the close) for ever.  Each
 * waiting write is woken to wait again under that bound: a stream's in
 * the line for room; a packet session's for the send turn (wspace), in
 * the turn (its write's deadline is moved to the past: it takes the
 * turn again with the new bound, see wait_send), or in an unconnected
 * unixgram socket's retries, which read close_by themselves. */
void loom_session_close(loom_session *s) {
  int st = S_OPEN;
  if (!atomic_compare_exchange_strong(&s->state, &st, S_CLOSING))
    return;
  wake_io(s, false);
  loom_mutex_lock(&s->wmu);
  __atomic_store_n(&s->close_by, s->o.linger < 0 ? 1 : loom__after(s->o.linger),
                   __ATOMIC_RELAXED);
  room_wake_all(s); /* each waits again, bounded by close_by */
  if (s->packet && !s->io_closed && atomic_load(&s->state) != S_ABORTED) {
    loom_cond_broadcast(&s->wspace);
    if (s->psend)
      loom_pconn_set_write_deadline(s->pc, 1); /* a past one: any thread */
    loom__pconn_wake_senders(s->pc);
  }
  loom_mutex_unlock(&s->wmu);
}

void loom_session_abort(loom_session *s, int err) {
  if (err >= 0)
    err = LOOM_ECLOSED;
  /* The reason first, so whoever sees ABORTED finds it; the first abort
   * keeps its reason. */
  int none = 0;
  atomic_compare_exchange_strong(&s->err, &none, err);
  if (atomic_exchange(&s->state, S_ABORTED) == S_ABORTED)
    return;
  wake_io(s, true);
  loom_mutex_lock(&s->wmu);
  if (!s->wbusy) /* else the writer is using the chunks; it drops them */
    wq_drop(s);
  loom_cond_broadcast(&s->wcond);
  loom_cond_broadcast(&s->wspace);
  room_wake_all(s);
  loom_mutex_unlock(&s->wmu);
}

/* ---- timeouts changed while the session runs ---------------------------- */

/* read_timeout and cron_period: the reader recomputes the deadline of
 * the one changed (arm), woken out of a read under the old ones. */
#define RETIME_IDLE 1u
#define RETIME_CRON 2u
static int set_reader_opt(loom_session *s, int64_t *field, unsigned what,
                          int64_t ns) {
  if (s == NULL || ns < 0)
    return -EINVAL;
  if (atomic_load(&s->state) != S_OPEN)
    return LOOM_ECLOSED;
  __atomic_store_n(field, ns, __ATOMIC_RELAXED);
  atomic_fetch_or(&s->retime, what); /* after the value: see arm */
  wake_io(s, false);
  return 0;
}

int loom_session_set_read_timeout(loom_session *s, int64_t ns) {
  return set_reader_opt(s, s ? &s->o.read_timeout : NULL, RETIME_IDLE, ns);
}

int loom_session_set_cron_period(loom_session *s, int64_t ns) {
  return set_reader_opt(s, s ? &s->o.cron_period : NULL, RETIME_CRON, ns);
}

int loom_session_set_write_timeout(loom_session *s, int64_t ns) {
  if (s == NULL || ns < 0)
    return -EINVAL;
  if (atomic_load(&s->state) != S_OPEN)
    return LOOM_ECLOSED;
  loom_mutex_lock(&s->wmu); /* the writer reads it under wmu */
  s->o.write_timeout = ns;
  /* A batch under way, bounded by the old value or by none, gets the
   * new bound now.  Not from a plain thread (a deadline ahead needs a
   * P): the next batch has it then. */
  if (s->wbusy && !s->wfinal && !s->io_closed && s->conn && loom_id() != 0) {
    int64_t d = ns ? loom__after(ns) : 0;
    if (loom_set_write_deadline(s->conn, d) == 0)
      s->wdl = d;
  }
  loom_mutex_unlock(&s->wmu);
  return 0;
}

/* ---- identity, attributes, stats ---------------------------------------- */

uint64_t loom_session_id(loom_session *s) { return s->id; }
void *loom_session_user(loom_session *s) { return s->user; }
void loom_session_set_user(loom_session *s, void *user) { s->user = user; }

/* The socket's addresses, while it is open (wmu keeps the reader from
 * closing it meanwhile). */
static int sock_addr(loom_session *s, bool remote, char *buf, size_t len) {
  int rc = LOOM_ECLOSED;
  loom_mutex_lock(&s->wmu);
  if (!s->io_closed && s->conn)
    rc = remote ? loom_conn_remote_addr(s->conn, buf, len)
                : loom_conn_local_addr(s->conn, buf, len);
  else if (!s->io_closed)
    rc = remote ? loom_pconn_remote_addr(s->pc, buf, len)
                : loom_pconn_local_addr(s->pc, buf, len);
  loom_mutex_unlock(&s->wmu);
  return rc;
}

int loom_session_remote_addr(loom_session *s, char *buf, size_t len) {
  return sock_addr(s, true, buf, len);
}

int loom_session_local_addr(loom_session *s, char *buf, size_t len) {
  return sock_addr(s, false, buf, len);
}

const char *loom_session_name(loom_session *s) {
  char *n = atomic_load(&s->name);
  if (n)
    return n;
  char local[128] = "?", remote[128] = "-", buf[300];
  loom_session_local_addr(s, local, sizeof local);
  if (!s->packet || s->connected)
    loom_session_remote_addr(s, remote, sizeof remote);
  snprintf(buf, sizeof buf, "%s %s<-%s", s->network, local, remote);
  char *d = loom__strdup(buf);
  if (!d)
    return "session";
  char *expected = NULL;
  if (!atomic_compare_exchange_strong(&s->name, &expected, d)) {
    loom__free(d);
    return expected;
  }
  return d;
}

int loom_session_set_name(loom_session *s, const char *name) {
  char *d = loom__strdup(name);
  if (!d)
    return -ENOMEM;
  loom__free(atomic_exchange(&s->name, d));
  return 0;
}

int loom_session_set_attr(loom_session *s, const void *key, void *value) {
  int rc = 0;
  loom_mutex_lock(&s->amu);
  size_t i = 0;
  while (i < s->nattrs && s->attrs[i].key != key)
    i++;
  if (i < s->nattrs) {
    if (value)
      s->attrs[i].value = value;
    else
      s->attrs[i] = s->attrs[--s->nattrs];
  } else if (value) {
    if (s->nattrs == s->capattrs) {
      size_t cap = s->capattrs ? s->capattrs * 2 : 4;
      attr *a = loom__realloc(s->attrs, cap * sizeof *a);
      if (!a) {
        rc = -ENOMEM;
        goto out;
      }
      s->attrs = a;
      s->capattrs = cap;
    }
    s->attrs[s->nattrs++] = (attr){key, value};
  }
out:
  loom_mutex_unlock(&s->amu);
  return rc;
}

void *loom_session_attr(loom_session *s, const void *key) {
  void *v = NULL;
  loom_mutex_lock(&s->amu);
  for (size_t i = 0; i < s->nattrs; i++)
    if (s->attrs[i].key == key)
      v = s->attrs[i].value;
  loom_mutex_unlock(&s->amu);
  return v;
}

#define LOAD(f) atomic_load_explicit(&s->f, memory_order_relaxed)
#define BUMP(f, n) atomic_fetch_add_explicit(&s->f, (n), memory_order_relaxed)

void loom_session_stats_get(loom_session *s, loom_session_stats *out) {
  out->bytes_in = LOAD(bytes_in);
  out->bytes_out = LOAD(bytes_out);
  out->pkgs_in = LOAD(pkgs_in);
  out->pkgs_out = LOAD(pkgs_out);
  out->pkgs_dropped = LOAD(pkgs_dropped);
  out->last_read = LOAD(last_read);
  out->last_write = LOAD(last_write);
  out->opened = s->opened_at;
  loom_mutex_lock(&s->wmu);
  out->wq_bytes = loom_buf_len(&s->wq);
  loom_mutex_unlock(&s->wmu);
}

loom_session *loom__session_next(loom_session *s) { return s->next; }
bool loom__session_opened(loom_session *s) { return s->opened; }

void loom__session_sample(loom_session *s, uint64_t v[6]) {
  v[0] = LOAD(bytes_in);
  v[1] = LOAD(bytes_out);
  v[2] = LOAD(pkgs_in);
  v[3] = LOAD(pkgs_out);
  v[5] = LOAD(pkgs_dropped);
  loom_mutex_lock(&s->wmu);
  v[4] = loom_buf_len(&s->wq);
  loom_mutex_unlock(&s->wmu);
}

/* ---- writing ------------------------------------------------------------ */

/* Bytes may still be queued: not aborted, and the writer has not been
 * told that the last ones are in.  A graceful close keeps taking writes
 * until then: the replies to packages already received.  wmu held. */
static bool writable(loom_session *s) {
  return atomic_load(&s->state) != S_ABORTED && !s->wfinal;
}

/* Send what the socket takes of b's bytes now, without waiting.  An
 * error (EAGAIN, or one the writer will meet and report) sends nothing.
 * wmu held, and nobody else writing.  b is the queue (queue: try_send_wq)
 * or a package encoded on the caller's stack (try_send); inlined into
 * each, so that a reply sent from the stack pays nothing for the
 * queue's counts. */
static inline __attribute__((always_inline)) void
stream_send(loom_session *s, loom_buf *b, bool queue) {
  /* Nothing to send, or the socket is closed (its descriptor number may
   * be another socket's by now): touch no descriptor. */
  if (s->io_closed || loom_buf_len(b) == 0)
    return;
  /* 16 pieces, as the writer takes: this runs deep in a reader's stack
   * (under on_message), which must stay within the page it parks in. */
  struct iovec iov[16];
  struct msghdr m = {.msg_iov = iov};
  m.msg_iovlen = (size_t)loom_buf_peek(b, iov, 16);
  /* One piece (a reply encoded on the stack, most often) goes by send:
   * sendmsg would first copy in and check the header and the vector. */
  ssize_t k = m.msg_iovlen == 1
                  ? send(s->fd, iov[0].iov_base, iov[0].iov_len,
                         MSG_DONTWAIT | MSG_NOSIGNAL)
                  : sendmsg(s->fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL);
  if (k > 0) {
    if (queue) /* the queue's packages this send finished */
      BUMP(pkgs_out, pk_take(s, (size_t)k));
    size_t before = loom_buf_len(b);
    loom_buf_consume(b, (size_t)k);
    BUMP(bytes_out, (uint64_t)k);
    atomic_store_explicit(&s->last_write, loom_now(), memory_order_relaxed);
    /* Room made by someone other than the writer: wake whoever waits
     * for it, as the writer would (it may find nothing left to write).
     * Only a drop through wq_low can matter to them (they wait while
     * the queue holds wq_high), so the usual direct reply, sent from an
     * almost empty queue, takes no lock here. */
    if (queue && before > s->o.wq_low && loom_buf_len(b) <= s->o.wq_low)
      room_wake(s);
  }
}

static void try_send(loom_session *s, loom_buf *b) { stream_send(s, b, false); }
static void try_send_wq(loom_session *s) { stream_send(s, &s->wq, true); }

/* Wake the writer, starting it on first use: most sessions' writes go
 * out from their callers, so a session gets its writer coroutine (and
 * its stack) only once its socket pushes back.  wmu held.  0, or
 * -ENOMEM: the caller aborts the session once it has let go of wmu. */
/* kick_writer failed: the session ends.  Its reason is set, and what is
 * queued dropped and counted, before wmu goes: a reader that ends in the
 * meantime (it waits for no writer that never started) then reports the
 * reason and finds the counts final.  The caller aborts once it has let
 * go of wmu.  wmu held, no writer. */
static void writer_failed(loom_session *s, int rc) {
  int none = 0;
  atomic_compare_exchange_strong(&s->err, &none, rc);
  wq_drop(s);
}

static int kick_writer(loom_session *s) {
  if (s->writer_on) {
    if (!s->wbusy)
      loom_cond_signal(&s->wcond);
    return 0;
  }
  if (loom_go(writer_main, s) < 0)
    return -ENOMEM;
  s->writer_on = true;
  return 0;
}

/* Leave the line of producers waiting for room; the next in line looks
 * whether there is room.  wmu held. */
static void room_leave(loom_session *s, room_waiter *me) {
  room_waiter **pp = &s->rw_head, *prev = NULL;
  while (*pp != me) {
    prev = *pp;
    pp = &prev->next;
  }
  *pp = me->next;
  if (s->rw_tail == me)
    s->rw_tail = prev;
  if (loom_buf_len(&s->wq) < s->o.wq_high)
    room_wake(s);
}

/* Whether this write may take room that is there without joining the
 * line of those waiting: timeout 0 never waits, and neither do the
 * callbacks of the session's owner, on a reader or in the pool.  A
 * callback waiting in line holds up its session: the reader stops
 * reading, a pooled handler its queue, then the reader; and a peer that
 * waits for its reply before it reads again waits for us, while the
 * line waits for the peer (the first in line goes only once the queue
 * falls to wq_low). */
static bool skips_line(loom_session *s, int64_t timeout) {
  return s->rw_head == NULL || timeout == 0 || loom__cb_tag() == s->owner;
}

/* The queue is full, or producers wait in line for room: wait for room
 * per `timeout`, at the end of the line, or apply close_on_full (only to
 * a queue that is full: a write that timed out in line below wq_high
 * just fails).  After a graceful close, the wait ends at close_by at
 * the latest, with LOOM_ECLOSED.  Called and returns with wmu held.  0:
 * room (or the state changed). */
static int wait_room(loom_session *s, int64_t timeout) {
  int64_t deadline = timeout > 0 ? loom__after(timeout) : 0;
  if (!s->wbusy) {
    /* Nobody is writing (the queue filled while corked, or the writer has
     * not run yet): what the socket takes now is room at once. */
    if (s->top == &s->sock)
      try_send_wq(s);
    if (loom_buf_len(&s->wq) < s->o.wq_high && skips_line(s, timeout))
      return 0;
    int rc = kick_writer(s);
    if (rc < 0) {
      writer_failed(s, rc);
      loom_mutex_unlock(&s->wmu);
      loom_session_abort(s, rc);
      loom_mutex_lock(&s->wmu);
      return rc;
    }
  }
  int rc = 0;
  if (loom_buf_len(&s->wq) < s->o.wq_high && skips_line(s, timeout))
    return 0;
  if (timeout == 0) {
    if (!writable(s))
      return 0;
    rc = -EAGAIN;
  } else {
    room_waiter me = {NULL, {{0}}};
    if (s->rw_tail != NULL)
      s->rw_tail->next = &me;
    else
      s->rw_head = &me;
    s->rw_tail = &me;
    bool closed = false; /* the close's bound ended the wait */
    while (writable(s) &&
           (s->rw_head != &me || loom_buf_len(&s->wq) >= s->o.wq_high)) {
      int64_t d = deadline;
      closed = s->close_by != 0 && (d == 0 || s->close_by < d);
      if (closed)
        d = s->close_by;
      rc = loom_cond_wait(&me.turn, &s->wmu, d);
      if (rc < 0)
        break;
    }
    room_leave(s, &me);
    if (rc == 0)
      return 0;
    if (closed)
      return LOOM_ECLOSED;
  }
  /* A session that ended meanwhile may have outlived its owner. */
  if (!s->io_closed)
    loom__owner_count(s->owner, LOOM__ERR_wq_full);
  if (s->o.close_on_full && loom_buf_len(&s->wq) >= s->o.wq_high) {
    loom_mutex_unlock(&s->wmu);
    loom_session_abort(s, -ENOBUFS);
    loom_mutex_lock(&s->wmu);
    return -ENOBUFS;
  }
  return rc;
}

/* The batch is over: send what the reader's callbacks queued in one go,
 * and leave the rest to the writer.  0, or -ENOMEM: the caller aborts
 * the session once it has let go of wmu.  wmu held. */
static int uncork_locked(loom_session *s) {
  s->corked = false;
  if (!s->wbusy && loom_buf_len(&s->wq) && s->top == &s->sock && writable(s))
    try_send_wq(s);
  return loom_buf_len(&s->wq) > 0 ? kick_writer(s) : 0;
}

/* The reader's batch is dispatched. */
static void uncork(loom_session *s) {
  if (s->cork_armed) { /* its callbacks did not stop: the hook goes */
    s->cork_armed = false;
    loom__park_hook_set(NULL, NULL);
  }
  loom_mutex_lock(&s->wmu);
  int rc = uncork_locked(s);
  loom_mutex_unlock(&s->wmu);
  if (rc < 0)
    loom_session_abort(s, rc);
}

/* The batch ends early: a callback stopped with replies held (see
 * Corking).  The reader waits for this before it ends (flushing), so
 * the session outlives it. */
static void cork_flush(void *arg) {
  loom_session *s = arg;
  loom_mutex_lock(&s->wmu);
  int rc = s->corked ? uncork_locked(s) : 0; /* else uncork was first */
  loom_mutex_unlock(&s->wmu);
  if (rc < 0)
    loom_session_abort(s, rc);
  loom_wg_done(&s->flushing); /* the last touch of *s */
}

/* The reader's park hook: it parks, or blocks, holding corked replies.
 * On the reader, inside the park: it must not park or take wmu, so the
 * sending is cork_flush's, on a coroutine of its own, which runs as
 * soon as the reader is off the P.  Without a coroutine, the replies
 * wait for the batch's end, as they did. */
static void cork_parked(void *arg) {
  loom_session *s = arg;
  s->cork_armed = false;
  loom_wg_add(&s->flushing, 1);
  if (loom_go(cork_flush, s) < 0)
    loom_wg_done(&s->flushing);
}

/* Encode with wmu held (codecs do no I/O and never park).  An oversized
 * package is counted on the owner only while the socket is open: the
 * owner outlives the socket, not the session, which a reference may keep. */
static int encode_locked(loom_session *s, const void *data, size_t len,
                         loom_buf *b) {
  int rc = s->codec->encode(s->codec, data, len, s->o.max_write_len, b);
  if (rc == -EMSGSIZE && !s->io_closed)
    loom__owner_count(s->owner, LOOM__ERR_oversize);
  return rc;
}

/* A stream package: sent at once when nothing is queued before it, else
 * encoded straight into the queue (one copy, no allocation but the
 * queue's chunks). */
static int queue_pkg(loom_session *s, const void *data, size_t len,
                     int64_t timeout) {
  int rc = 0;
  loom_mutex_lock(&s->wmu);
  if (loom_buf_len(&s->wq) >= s->o.wq_high || !skips_line(s, timeout))
    rc = wait_room(s, timeout);
  if (rc == 0 && !writable(s))
    rc = LOOM_ECLOSED;
  if (rc < 0)
    goto out;
  bool corked = s->corked && loom_id() == s->reader_g;
  bool kick = false;
  if (!s->wbusy && loom_buf_len(&s->wq) == 0 && s->top == &s->sock && !corked) {
    _Alignas(16) uint8_t mem[ENC_STACK];
    loom_buf b;
    loom_buf_init_on(&b, mem, sizeof mem);
    rc = encode_locked(s, data, len, &b);
    bool broken = false;
    if (rc == 0) {
      size_t whole = loom_buf_len(&b), rest;
      try_send(s, &b);
      if ((rest = loom_buf_len(&b)) == 0) {
        BUMP(pkgs_out, 1); /* it has left */
      } else {
        /* What the socket did not take is queued as a package of its
         * own, counted when its last byte leaves. */
        rc = pk_reserve(s, pk_pieces(rest));
        if (rc == 0)
          rc = loom_buf_move(&s->wq, &b);
        if (rc == 0) {
          pk_push(s, rest);
          kick = true;
        } else {
          broken = rest < whole; /* a part went out: the stream is cut */
        }
      }
    }
    loom_buf_reset(&b);
    if (broken) {
      loom_mutex_unlock(&s->wmu);
      loom_session_abort(s, rc);
      return rc;
    }
  } else {
    /* Room for its length first: the encoded bytes cannot be taken back
     * out of the queue. */
    size_t before = loom_buf_len(&s->wq), n = 0;
    rc = pk_reserve(s, 1);
    if (rc == 0)
      rc = encode_locked(s, data, len, &s->wq);
    if (rc == 0)
      n = loom_buf_len(&s->wq) - before;
    if (rc == 0 && n == 0) {
      BUMP(pkgs_out, 1); /* no byte to send: it has left */
    } else if (rc == 0 && pk_reserve(s, pk_pieces(n)) == 0) {
      pk_push(s, n); /* counted as its last byte is sent */
    } else if (rc == 0) {
      /* More than 2 GiB, and no room for its lengths: queued, but the
       * queue's count would not hold. */
      loom_mutex_unlock(&s->wmu);
      loom_session_abort(s, -ENOMEM);
      return -ENOMEM;
    }
    kick = rc == 0 && !corked;
    if (rc == 0 && corked && !s->cork_armed) { /* see Corking */
      s->cork_armed = true;
      loom__park_hook_set(cork_parked, s);
    }
  }
  if (kick && (rc = kick_writer(s)) < 0) {
    /* No writer: the session ends (on_error says why).  The package was
     * queued, so the write succeeded as any other a dying session drops:
     * 0, and it is counted in pkgs_dropped. */
    writer_failed(s, rc);
    loom_mutex_unlock(&s->wmu);
    loom_session_abort(s, rc);
    return 0;
  }
out:
  loom_mutex_unlock(&s->wmu);
  return rc;
}

/* The session's socket is closed or closing, or the session aborted: a
 * packet sender must leave it.  wmu held. */
static bool packet_ended(loom_session *s) {
  return s->io_closed || atomic_load(&s->state) == S_ABORTED;
}

/* The bound of a packet send's wait for room: the caller's `deadline`
 * (0: none), or the graceful close's close_by if that comes first
 * (*closed then: the wait that ends there fails with LOOM_ECLOSED).
 * wmu held. */
static int64_t send_bound(const loom_session *s, int64_t deadline,
                          bool *closed) {
  int64_t cb = s->close_by;
  *closed = cb != 0 && (deadline == 0 || cb < deadline);
  return *closed ? cb : deadline;
}

/* The socket is full: wait for room for one datagram until `deadline`
 * (0: none), in the pconn's write.  That write is bounded by the pconn's
 * write deadline, which belongs to the direction, not to one caller:
 * one sender's deadline would cut short another's wait, and resetting it
 * would cancel an abort's.  So senders wait for room one at a time; the
 * one in `psend` owns the deadline (set and put back under wmu, where
 * wake_io moves it for an abort), the others wait for their turn on
 * wspace, bounded by their own deadlines.  An abort or the end of the
 * socket wakes both kinds with LOOM_ECLOSED.  A graceful close bounds
 * both by close_by (send_bound): it wakes those waiting for the turn,
 * and moves the deadline of the one in it to the past, which then takes
 * the turn again under the new bound.  Returns what the write returns,
 * or -ETIMEDOUT, LOOM_ECLOSED, -ENOMEM (no timer).
 *
 * An unconnected unixgram socket has room per destination, and its
 * writes retry on their own (net/udp.c, dgram_io), each bounded by its
 * caller's `deadline` and by close_by without the shared one: no turn,
 * so one peer that never reads holds up no write to another.  An abort
 * and the end of the socket move the shared deadline to the past, which
 * ends them. */
static ssize_t wait_send(loom_session *s, const struct iovec *iov, int n,
                         const struct sockaddr *to, socklen_t tolen,
                         int64_t deadline) {
  bool closed;
  if (s->unix_dgram && !s->connected) {
    ssize_t k = loom__pconn_write_msg_until(s->pc, iov, n, to, tolen, deadline,
                                            &s->close_by);
    if (k == -ETIMEDOUT) {
      loom_mutex_lock(&s->wmu);
      (void)send_bound(s, deadline, &closed);
      if (packet_ended(s) || closed) /* the abort's or the close's, not ours */
        k = LOOM_ECLOSED;
      loom_mutex_unlock(&s->wmu);
    }
    return k;
  }
  ssize_t k;
  loom_mutex_lock(&s->wmu);
  for (;;) {
    int rc = 0;
    int64_t d = send_bound(s, deadline, &closed);
    while (rc == 0 && s->psend && !packet_ended(s)) {
      d = send_bound(s, deadline, &closed);
      rc = loom_cond_wait(&s->wspace, &s->wmu, d);
    }
    if (packet_ended(s) || (rc == -ETIMEDOUT && closed))
      rc = LOOM_ECLOSED;
    d = send_bound(s, deadline, &closed);
    if (rc == 0 && d != 0)
      rc = loom_pconn_set_write_deadline(s->pc, d);
    if (rc < 0) {
      k = rc;
      break;
    }
    s->psend = true;
    loom_mutex_unlock(&s->wmu);
    k = loom_pconn_write_msg(s->pc, iov, n, to, tolen);
    loom_mutex_lock(&s->wmu);
    s->psend = false;
    loom_cond_broadcast(&s->wspace);
    if (packet_ended(s)) {
      if (k == -ETIMEDOUT) /* the abort's deadline (or ours, as it came) */
        k = LOOM_ECLOSED;
      break;
    }
    /* No deadline for the next one (nor the past one a close set). */
    if (d != 0 || s->close_by != 0)
      loom_pconn_set_write_deadline(s->pc, 0);
    if (k != -ETIMEDOUT)
      break;
    if (d != 0 && loom_now() >= d) { /* its bound came */
      if (closed)                    /* the close's, not ours */
        k = LOOM_ECLOSED;
      break;
    }
    /* Before its bound: a graceful close came, and its move of the
     * deadline to the past woke us.  Wait again, bounded anew. */
  }
  loom_mutex_unlock(&s->wmu);
  return k;
}

/* Offer a datagram to the socket without waiting.  The count, or
 * -errno (-EAGAIN: no room now). */
static ssize_t send_now(loom_session *s, const struct iovec *iov, int n,
                        const struct sockaddr *to, socklen_t tolen) {
  socklen_t tl = to != NULL ? tolen : 0;
  ssize_t k;
  do {
    if (n == 1) { /* as try_send: no header or vector to copy in */
      k = sendto(s->fd, iov[0].iov_base, iov[0].iov_len,
                 MSG_DONTWAIT | MSG_NOSIGNAL, to, tl);
    } else {
      struct msghdr m = {.msg_name = (void *)(uintptr_t)to,
                         .msg_namelen = tl,
                         .msg_iov = (struct iovec *)(uintptr_t)iov,
                         .msg_iovlen = (size_t)n};
      k = sendmsg(s->fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL);
    }
    if (k < 0)
      k = -loom__errno();
  } while (k == -EINTR);
  return k;
}

/* One datagram, from the caller.  The socket is used under a count of
 * senders (io_users) that the reader waits out before closing it.  The
 * datagram is offered to the socket at once, without waiting (as
 * try_send does for a stream): most often that is all, and no deadline
 * is set.  Only a full socket makes `timeout` matter: 0 fails with
 * -EAGAIN, otherwise wait_send waits for room. */
static int send_packet(loom_session *s, loom_buf *b, const struct sockaddr *to,
                       socklen_t tolen, int64_t timeout) {
  /* A datagram leaves in one call: an encoding in more pieces than the
   * vector holds is copied into one piece first. */
  struct iovec iov[8];
  int n = loom_buf_peek(b, iov, 8);
  uint64_t len = loom_buf_len(b);
  size_t got = 0;
  for (int i = 0; i < n; i++)
    got += iov[i].iov_len;
  uint8_t *flat = NULL;
  if (got < len) {
    flat = loom__malloc(len);
    if (!flat)
      return -ENOMEM;
    loom_buf_copyout(b, flat, len);
    iov[0] = (struct iovec){.iov_base = flat, .iov_len = len};
    n = 1;
  }
  loom_mutex_lock(&s->wmu);
  bool closed = s->io_closed;
  if (!closed)
    loom_wg_add(&s->io_users, 1);
  loom_mutex_unlock(&s->wmu);
  if (closed) {
    loom__free(flat);
    return LOOM_ECLOSED;
  }
  ssize_t k = send_now(s, iov, n, to, tolen);
  if (k == -EAGAIN && timeout != 0)
    k = wait_send(s, iov, n, to, tolen, timeout > 0 ? loom__after(timeout) : 0);
  if (k >= 0) {
    /* Counted once sent (as a stream's packages), while the reader
     * still waits for us (io_users): once it is done, the session's
     * counts go into its owner's totals. */
    BUMP(bytes_out, len);
    BUMP(pkgs_out, 1);
  }
  /* Refused for want of room, as a stream's full queue refuses; the
   * owner is there to count it until io_users is left. */
  if (k == -EAGAIN || k == -ETIMEDOUT)
    loom__owner_count(s->owner, LOOM__ERR_wq_full);
  loom_wg_done(&s->io_users);
  loom__free(flat);
  if (k < 0)
    return (int)k;
  atomic_store_explicit(&s->last_write, loom_now(), memory_order_relaxed);
  return 0;
}

static int write_common(loom_session *s, const void *data, size_t len,
                        const struct sockaddr *to, socklen_t tolen,
                        int64_t timeout) {
  if (atomic_load(&s->state) == S_ABORTED)
    return LOOM_ECLOSED;
  if (!s->packet) {
    int rc = queue_pkg(s, data, len, timeout);
    /* A loop of writes that never wait (queue never full) is a loop
     * without a scheduling point: let others run now and then. */
    loom__io_progress();
    return rc;
  }
  _Alignas(16) uint8_t mem[ENC_STACK];
  loom_buf b;
  loom_buf_init_on(&b, mem, sizeof mem);
  loom_mutex_lock(&s->wmu);
  int rc = encode_locked(s, data, len, &b);
  loom_mutex_unlock(&s->wmu);
  if (rc == 0)
    rc = send_packet(s, &b, to, tolen, timeout);
  loom_buf_reset(&b);
  loom__io_progress(); /* as for a stream: most sends do not wait */
  return rc;
}

int loom_session_write(loom_session *s, const void *data, size_t len,
                       int64_t timeout) {
  if (loom_id() == 0)
    return LOOM_ENOTCO;
  if (s->packet && !s->connected)
    return -EDESTADDRREQ;
  return write_common(s, data, len, NULL, 0, timeout);
}

int loom_session_write_to(loom_session *s, const void *data, size_t len,
                          const struct sockaddr *to, socklen_t tolen,
                          int64_t timeout) {
  if (loom_id() == 0)
    return LOOM_ENOTCO;
  if (!s->packet || s->connected)
    return -EISCONN;
  return write_common(s, data, len, to, tolen, timeout);
}

/* The socket layer: the bottom of every stream session's stack.  Bytes
 * count as read here, as they arrive, not when a layer above turns them
 * into something (compressed bytes may inflate to nothing yet). */
static ssize_t sock_read(loom__layer *l, void *buf, size_t len) {
  loom_session *s = (loom_session *)((char *)l - offsetof(loom_session, sock));
  ssize_t n = loom_read(s->conn, buf, len);
  if (n > 0) {
    BUMP(bytes_in, (uint64_t)n);
    atomic_store_explicit(&s->last_read, loom_now(), memory_order_relaxed);
  }
  return n;
}

static ssize_t sock_writev(loom__layer *l, const struct iovec *iov, int n) {
  loom_session *s = (loom_session *)((char *)l - offsetof(loom_session, sock));
  size_t sent = 0; /* what went also when the write fails part way */
  ssize_t k = loom__writev_sent(s->conn, iov, n, &sent);
  s->wsent = sent;
  if (sent > 0) {
    BUMP(bytes_out, (uint64_t)sent);
    atomic_store_explicit(&s->last_write, loom_now(), memory_order_relaxed);
  }
  return k;
}

static const loom__layer_ops sock_ops = {"socket", sock_read, sock_writev,
                                         NULL};

static void writer_main(void *arg) {
  loom_session *s = arg;
  loom_mutex_lock(&s->wmu);
  for (;;) {
    /* Idle: a bare socket's queue keeps its chunk for the next burst
     * (most writes never use it: they go out from their callers); the
     * reader sheds it when the session goes quiet.  A transform's queue
     * has none left (below). */
    while (loom_buf_len(&s->wq) == 0 && !s->wfinal &&
           atomic_load(&s->state) != S_ABORTED)
      loom_cond_wait(&s->wcond, &s->wmu, 0);
    if (atomic_load(&s->state) == S_ABORTED || loom_buf_len(&s->wq) == 0 ||
        (s->wfinal && s->o.linger < 0))
      break;
    /* 16 pieces (256 KiB of chunks): loom_writev copies more than 16
     * iovecs to the heap, which a writer under memory pressure must not
     * depend on. */
    struct iovec iov[16];
    int n = loom_buf_peek(&s->wq, iov, 16);
    /* A batch's bytes count against wq_high until all of them are out:
     * at most half of wq_high in one, so a queue at wq_high holds at
     * least half of it that the socket has not even been offered.  With
     * a write timeout, at most WRITE_GRAIN bytes too: the timeout is how
     * long the socket may take to accept that much, so a peer that
     * reads slowly but steadily is not cut off. */
    size_t most = s->o.wq_high / 2 > 0 ? s->o.wq_high / 2 : 1;
    if (s->o.write_timeout && most > WRITE_GRAIN)
      most = WRITE_GRAIN;
    size_t total = 0;
    for (int i = 0; i < n; i++) {
      if (total + iov[i].iov_len > most) {
        iov[i].iov_len = most - total;
        n = i + 1;
      }
      total += iov[i].iov_len;
    }
    s->wbusy = true;
    /* After a graceful close, the linger deadline bounds what is left;
     * before, each batch gets write_timeout.  Set under wmu: the close
     * path (reader's end) sets the deadline of a busy writer under wmu
     * too, and must not be overwritten by an older choice made here. */
    int64_t want = s->wfinal            ? s->final_deadline
                   : s->o.write_timeout ? loom__after(s->o.write_timeout)
                                        : 0;
    if (want != s->wdl) {
      int err = loom_set_write_deadline(s->conn, want);
      if (err < 0 && err != LOOM_ECLOSED) { /* -ENOMEM: an unbounded batch */
        s->wbusy = false;
        loom_mutex_unlock(&s->wmu);
        loom_session_abort(s, err);
        loom_mutex_lock(&s->wmu);
        break;
      }
      s->wdl = want;
    }
    s->wsent = 0;
    loom_mutex_unlock(&s->wmu);

    /* After the deadline: an abort moves it to the past after its state
     * change, so either this sees ABORTED or the write sees the past. */
    ssize_t k = atomic_load(&s->state) == S_ABORTED
                    ? LOOM_ECLOSED
                    : s->top->ops->writev(s->top, iov, n);

    loom_mutex_lock(&s->wmu);
    s->wbusy = false;
    if (k < 0) {
      /* What the socket took of the batch left; under a transform, whose
       * batch goes whole or not at all, none did. */
      size_t sent = s->top == &s->sock ? s->wsent : 0;
      BUMP(pkgs_out, pk_take(s, sent));
      loom_buf_consume(&s->wq, sent);
      bool dropping = s->wfinal && s->o.linger < 0; /* cut short on purpose */
      loom_mutex_unlock(&s->wmu);
      if (!dropping)
        loom_session_abort(s, (int)k); /* no-op if already aborted */
      loom_mutex_lock(&s->wmu);
      break;
    }
    BUMP(pkgs_out, pk_take(s, total));
    loom_buf_consume(&s->wq, total);
    if (loom_buf_len(&s->wq) <= s->o.wq_low)
      room_wake(s);
    /* Under a transform (zlib) every byte goes through the queue, so
     * the session would keep the chunk of its last reply until a quiet
     * moment the reader sees — a cron tick, or 16 small reads — which a
     * session without a cron or read timeout may never have.  Given back
     * as it drains instead.  The next write makes a chunk again; what
     * pays for it is that zlib's layer compresses a batch into a stack
     * buffer (compress.c, ZOUT_STACK) where it made a chunk for every
     * batch, so a small request and reply make one block a batch, as
     * before.  A batch whose compressed bytes outgrow that buffer still
     * makes the layer's chunk: one block more than before, next to
     * deflating that much. */
    if (s->top != &s->sock && loom_buf_len(&s->wq) == 0)
      wq_drop(s); /* nothing to drop: the memory */
  }
  wq_drop(s);
  s->wdone = true;
  room_wake_all(s);
  loom_mutex_unlock(&s->wmu);
  loom_sema_release(&s->writer_exit);
}

/* ---- reading ------------------------------------------------------------ */

typedef struct ptask {
  loom_session *s;
  loom_pkg pkg;
  struct sockaddr_storage from;
  uint8_t data[];
} ptask;

#define POOL_WAIT_SLICE_NS (10 * INT64_C(1000000)) /* see dispatch */

static void pooled_message(void *arg) {
  ptask *t = arg;
  loom_session *s = t->s;
  if (s->o.listener->on_message) {
    void *tag = loom__cb_tag();
    loom__cb_tag_set(s->owner);
    s->o.listener->on_message(s, &t->pkg);
    loom__cb_tag_set(tag);
  }
  /* seq_cst, against the reader's "full, then look again"; the load
   * keeps the exchange off the common path, where nobody waits */
  atomic_fetch_sub(&s->pool_bytes, t->pkg.len);
  if (atomic_load(&s->pool_full) && atomic_exchange(&s->pool_full, false))
    loom_sema_release(&s->pool_room);
  /* Unref first: the reader keeps its own reference until the wait
   * for `pooled` is over, so this one is never the last, and on_free
   * runs on the reader, before its owner hears the session is gone. */
  loom_session_unref(s);
  loom__free(t);
  loom_wg_done(&s->pooled); /* the last touch of *s */
}

/* One step of splitmix64: every input bit moves every output bit, so
 * key % queues spreads whatever keys the user picks (the added constant
 * keeps small keys from mapping to small values). */
static uint64_t mix64(uint64_t x) {
  x += UINT64_C(0x9e3779b97f4a7c15);
  x ^= x >> 30;
  x *= UINT64_C(0xbf58476d1ce4e5b9);
  x ^= x >> 27;
  x *= UINT64_C(0x94d049bb133111eb);
  return x ^ (x >> 31);
}

/* Whether len more bytes may go to the pool while `held` are there. */
static bool pool_fits(const loom_session *s, size_t held, size_t len) {
  return held == 0 || (held <= s->o.pool_high && len <= s->o.pool_high - held);
}

/* A session's packages in its pool are bounded in bytes (pool_high), as
 * the pool's queues are in tasks: past it the reader waits, and TCP
 * pushes back on the peer, so a peer flooding a slow pool holds
 * pool_high and one package of our memory, not a queue of copies.  One
 * package goes whatever its length when none of the session's are in
 * the pool.  Waits in slices, as for a full queue (dispatch), so that
 * an abort ends the wait: LOOM_ECLOSED. */
static int wait_pool_room(loom_session *s, size_t len) {
  while (!pool_fits(s, atomic_load(&s->pool_bytes), len)) {
    if (atomic_load(&s->state) == S_ABORTED)
      return LOOM_ECLOSED;
    atomic_store(&s->pool_full, true);
    if (pool_fits(s, atomic_load(&s->pool_bytes), len)) {
      atomic_store(&s->pool_full, false);
      break;
    }
    (void)loom_sema_acquire(&s->pool_room, loom__after(POOL_WAIT_SLICE_NS));
  }
  atomic_fetch_add(&s->pool_bytes, len);
  return 0;
}

static int dispatch(loom_session *s, const loom_pkg *pkg) {
  BUMP(pkgs_in, 1);
  if (!s->o.pool) {
    if (s->o.listener->on_message)
      s->o.listener->on_message(s, pkg);
    return 0;
  }
  int rc = wait_pool_room(s, pkg->len);
  if (rc < 0)
    return rc;
  ptask *t = loom__malloc(sizeof *t + pkg->len);
  if (!t) {
    atomic_fetch_sub(&s->pool_bytes, pkg->len);
    return -ENOMEM;
  }
  t->s = loom_session_ref(s);
  memcpy(t->data, pkg->data, pkg->len);
  t->pkg = (loom_pkg){t->data, pkg->len, NULL, 0};
  if (pkg->from) {
    memcpy(&t->from, pkg->from, pkg->fromlen);
    t->pkg.from = (const struct sockaddr *)&t->from;
    t->pkg.fromlen = pkg->fromlen;
  }
  uint64_t key;
  switch (s->o.dispatch) {
  case LOOM_DISPATCH_ROUND_ROBIN:
    key = s->id + s->rr++;
    break;
  case LOOM_DISPATCH_KEY:
    /* The pool takes key % queues: mixed first, so that keys with a
     * pattern (multiples of the queue count, say) still spread. */
    key = mix64(s->o.dispatch_key(s, pkg));
    break;
  default:
    key = s->id;
    break;
  }
  loom_wg_add(&s->pooled, 1);
  /* A full pool is backpressure: wait for room, in slices, so that an
   * abort (a forced close) ends the wait and the package goes with the
   * session instead of being queued after it. */
  rc = loom_taskpool_submit(s->o.pool, key, pooled_message, t,
                            LOOM_TASKPOOL_NOWAIT);
  while ((rc == -EAGAIN || rc == -ETIMEDOUT) &&
         atomic_load(&s->state) != S_ABORTED)
    rc = loom_taskpool_submit(s->o.pool, key, pooled_message, t,
                              loom__after(POOL_WAIT_SLICE_NS));
  if (rc == -EAGAIN || rc == -ETIMEDOUT)
    rc = LOOM_ECLOSED;
  if (rc < 0) {
    atomic_fetch_sub(&s->pool_bytes, pkg->len);
    loom_wg_done(&s->pooled);
    loom_session_unref(s);
    loom__free(t);
  }
  return rc;
}

typedef struct reader {
  loom__readbuf b;      /* a packet session: buf and cap, one datagram */
  int64_t deadline;     /* the read deadline now set (0: none) */
  int64_t next_cron;    /* 0: no cron */
  int64_t idle_check;   /* when to look at last_read again; 0: never */
  int64_t read_timeout; /* the read_timeout idle_check was armed with: a
                           change lands through retime, never between
                           the two */
  int64_t handled_at;   /* when the reader last came back from handing
                           packages over: time in handlers (or waiting
                           for a full pool) is not the peer's idleness */
} reader;

/* Decode and dispatch every whole package in r's buffer. */
static int drain(loom_session *s, reader *r) {
  bool cork = false;
  int rc = 0;
  loom__readbuf *b = &r->b;
  while (b->len > b->off) {
    loom_pkg pkg = {0};
    ssize_t k = s->codec->decode(s->codec, b->buf + b->off, b->len - b->off,
                                 s->o.max_pkg_len, &pkg);
    if (k <= 0) {
      rc = (int)k;
      break;
    }
    b->off += (size_t)k;
    /* More than one package in this read (pipelining): replies written
     * by on_message gather in the queue and leave in one send after the
     * batch, instead of a send each.  A single package goes out at once
     * from on_message, as without corking. */
    if (!cork && !s->o.pool && b->len > b->off) {
      cork = true;
      loom_mutex_lock(&s->wmu);
      s->corked = true;
      loom_mutex_unlock(&s->wmu);
    }
    rc = dispatch(s, &pkg);
    if (rc < 0 || atomic_load(&s->state) != S_OPEN)
      break;
  }
  if (cork)
    uncork(s);
  return rc;
}

/* The session has gone quiet: give back the memory a burst took — the
 * read buffer (loom__readbuf_shed) and the write queue's chunks. */
static void shed(loom_session *s, reader *r, bool to_stack) {
  if (!s->packet)
    loom__readbuf_shed(&r->b, to_stack);
  loom_mutex_lock(&s->wmu);
  if (!s->wbusy && loom_buf_len(&s->wq) == 0)
    wq_drop(s); /* nothing to drop: the memory */
  loom_mutex_unlock(&s->wmu);
}

/* The idle check and the next cron from the options: at the start, and
 * after loom_session_set_read_timeout / _set_cron_period (each counts
 * from then; `what` says which changed, and only that one moves: a cron
 * period set at every tick must not defer the idle check for ever).  An
 * unconnected packet session serves every peer of its socket (a UDP
 * server's one session): no single peer to time out. */
static void retime(loom_session *s, reader *r, int64_t now, unsigned what) {
  if (what & RETIME_IDLE) {
    int64_t rt = opt_load(&s->o.read_timeout);
    r->read_timeout = rt;
    r->idle_check =
        rt && (!s->packet || s->connected) ? loom__sat_add(now, rt) : 0;
  }
  if (what & RETIME_CRON) {
    int64_t cp = opt_load(&s->o.cron_period);
    r->next_cron = cp ? loom__sat_add(now, cp) : 0;
  }
}

/* The read deadline the reader wants: the earlier of cron and idle
 * check. */
static inline int64_t wanted_deadline(const reader *r) {
  int64_t d = r->next_cron;
  if (r->idle_check && (d == 0 || r->idle_check < d))
    d = r->idle_check;
  return d;
}

/* arm's work when there is some: a change of the options, or a deadline
 * to set. */
__attribute__((noinline)) static int arm_slow(loom_session *s, reader *r) {
  for (;;) {
    /* Taken in one step: a change made between a load and a store
     * would be lost. */
    unsigned what =
        atomic_exchange_explicit(&s->retime, 0, memory_order_acquire);
    if (what != 0) {
      retime(s, r, loom_now(), what);
      r->deadline = -1; /* the change set a past one: set ours again */
    }
    int64_t d = wanted_deadline(r);
    if (d == r->deadline)
      return 0;
    /* Only -ENOMEM (no room for the timer), which ends the session: a
     * session that cannot keep its deadline would get no cron, no idle
     * check, or spin on a deadline that stays in the past. */
    int err = s->conn ? loom_set_read_deadline(s->conn, d)
                      : loom_pconn_set_read_deadline(s->pc, d);
    if (err != 0)
      return err == LOOM_ECLOSED ? 0 : err; /* closed: the read says so */
    r->deadline = d;
    /* A change made meanwhile may have had its wake-up (a past deadline)
     * overwritten by ours: look again. */
    if (!atomic_load_explicit(&s->retime, memory_order_acquire))
      return 0;
  }
}

/* Set the read deadline to the earliest of cron and idle check, after a
 * change of the options (loom_session_set_read_timeout, ...) if any.  On
 * every read: the common case, nothing to do, stays inline. */
static inline int arm(loom_session *s, reader *r) {
  if (!atomic_load_explicit(&s->retime, memory_order_acquire) &&
      wanted_deadline(r) == r->deadline)
    return 0;
  return arm_slow(s, r);
}

void (*_Atomic loom__test_idle_window)(loom_session *s); /* export_test.h */

/* A read deadline passed: run cron, check idleness.  0 or an error. */
static int on_deadline(loom_session *s, reader *r) {
  int64_t now = loom_now();
  r->deadline = -1; /* the socket's deadline is in the past: re-arm */
  if (!s->packet)
    shed(s, r, true); /* a cron tick or idle check: a quiet moment */
  /* An option changed (its wake-up may be what woke us): arm recomputes
   * its deadline first. */
  if (atomic_load_explicit(&s->retime, memory_order_acquire) != 0)
    return 0;
  if (r->idle_check && now >= r->idle_check) {
    void (*hook)(loom_session *) =
        atomic_load_explicit(&loom__test_idle_window, memory_order_relaxed);
    if (hook != NULL)
      hook(s);
    /* Measured against the read_timeout the check was armed with: one
     * changed since our look at retime (0 would close at once) is for
     * arm to apply, counted from the change. */
    int64_t since = LOAD(last_read);
    if (r->handled_at > since)
      since = r->handled_at;
    int64_t idle_until = loom__sat_add(since, r->read_timeout);
    if (now >= idle_until)
      return -ETIMEDOUT;
    r->idle_check = idle_until;
  }
  if (r->next_cron && now >= r->next_cron) {
    int64_t period = opt_load(&s->o.cron_period);
    r->next_cron = loom__sat_add(r->next_cron, period);
    if (r->next_cron <= now)
      r->next_cron = loom__sat_add(now, period);
    if (s->o.listener->on_cron)
      s->o.listener->on_cron(s);
  }
  return 0;
}

static int read_stream(loom_session *s, reader *r) {
  _Alignas(16) uint8_t stack_buf[LOOM__STACK_READ];
  loom__readbuf *b = &r->b;
  int rc = 0;
  for (;;) {
    if ((rc = arm(s, r)) < 0)
      break;
    if (atomic_load(&s->state) != S_OPEN)
      break;
    if (b->cap == 0)
      loom__readbuf_stack(b, stack_buf);
    else if ((rc = loom__readbuf_room(b)) < 0)
      break;
    size_t room = b->cap - b->len;
    ssize_t n = s->top->ops->read(s->top, b->buf + b->len, room);
    if (n > 0) {
      loom__readbuf_took(b, (size_t)n, room);
      rc = drain(s, r);
      if (r->idle_check) /* only the idle check reads it: no clock else */
        r->handled_at = loom_now();
      if (b->on_stack) {
        int e = loom__readbuf_unstack(b, b->filled);
        if (rc == 0)
          rc = e;
      }
      if (rc < 0)
        break;
      if (loom__readbuf_quiet(b))
        shed(s, r, loom__readbuf_quiet_to_stack(b));
      continue;
    }
    if (b->on_stack) /* nothing was read: nothing is pending */
      (void)loom__readbuf_unstack(b, false);
    if (n == 0) { /* the peer shut down its side: all it sent is handled */
      rc = b->len > b->off ? -EBADMSG : 1;
      break;
    }
    if (n == -ETIMEDOUT) {
      if (atomic_load(&s->state) != S_OPEN)
        break;
      rc = on_deadline(s, r);
      if (rc < 0)
        break;
      continue;
    }
    rc = (int)n;
    break;
  }
  loom__readbuf_leave_stack(b); /* it must not outlive this frame */
  return rc;
}

/* The largest datagram a packet session takes in: UDP's, and for
 * unixgram (bounded by the sender's SO_SNDBUF) a generous bound. */
#define DGRAM_UDP_MAX ((size_t)65536)
#define DGRAM_UNIX_MAX ((size_t)16 << 20)

static int read_packets(loom_session *s, reader *r) {
  for (;;) {
    int err = arm(s, r);
    if (err < 0)
      return err;
    if (atomic_load(&s->state) != S_OPEN)
      return 0;
    struct sockaddr_storage from;
    socklen_t fromlen = sizeof from;
    ssize_t n =
        loom_pconn_read_from(s->pc, r->b.buf, r->b.cap, &from, &fromlen);
    if (n == 0)
      continue; /* an empty datagram (a dial probe) carries no package */
    if (n > 0) {
      BUMP(bytes_in, (uint64_t)n);
      atomic_store_explicit(&s->last_read, loom_now(), memory_order_relaxed);
      if ((size_t)n > r->b.cap) { /* cut short: longer than any package */
        loom__owner_count(s->owner, LOOM__ERR_oversize);
        continue;
      }
      loom_pkg pkg = {0};
      ssize_t k = s->codec->decode(s->codec, r->b.buf, (size_t)n,
                                   s->o.max_pkg_len, &pkg);
      if (k != n) { /* need-more, leftovers or an error: this datagram */
        /* Too long for max_pkg_len: the codec said so, or it took a
         * package of exactly the limit with no framing, and more was
         * there (the raw codec, for which the datagram is the package).
         * A frame with bytes after it, or cut short, is malformed. */
        bool big = k == -EMSGSIZE ||
                   (k > 0 && (size_t)k == pkg.len &&
                    pkg.len == s->o.max_pkg_len);
        loom__owner_count(s->owner,
                          big ? LOOM__ERR_oversize : LOOM__ERR_decode);
        continue;
      }
      if (!s->connected) {
        pkg.from = (const struct sockaddr *)&from;
        pkg.fromlen = fromlen;
      }
      int rc = dispatch(s, &pkg);
      if (rc < 0)
        return rc;
      continue;
    }
    if (n == -ETIMEDOUT) {
      if (atomic_load(&s->state) != S_OPEN)
        return 0;
      int rc = on_deadline(s, r);
      if (rc < 0)
        return rc;
      continue;
    }
    if (n == -ECONNREFUSED && s->connected)
      continue; /* an ICMP error for an earlier datagram: not fatal */
    return (int)n;
  }
}

/* Off its owner's list, its counters into the owner's totals.  It still
 * counts as open: see owner_leave. */
static void owner_unlink(loom_session *s) {
  loom__owner *o = s->owner;
  loom_mutex_lock(&o->mu);
  if (s->prev)
    s->prev->next = s->next;
  else
    o->head = s->next;
  if (s->next)
    s->next->prev = s->prev;
  o->bytes_in += LOAD(bytes_in);
  o->bytes_out += LOAD(bytes_out);
  o->pkgs_in += LOAD(pkgs_in);
  o->pkgs_out += LOAD(pkgs_out);
  o->pkgs_dropped += LOAD(pkgs_dropped);
  loom_mutex_unlock(&o->mu);
}

/* The session is gone, on_free included if the reader's reference was
 * the last: a close of the owner waiting for it may return. */
static void owner_leave(loom__owner *o) {
  loom_mutex_lock(&o->mu);
  o->open--;
  loom_cond_broadcast(&o->changed);
  loom_mutex_unlock(&o->mu);
}

static void reader_main(void *arg) {
  loom_session *s = arg;
  const loom_session_listener *l = s->o.listener;
  reader r = {0};
  int rc = 0;
  loom__readbuf_init(&r.b, s->o.read_buf, s->o.max_pkg_len);
  /* Counted once its reader runs, before anything can end it: the total
   * is exported as a counter, which would fall if a session whose
   * reader failed to start were counted and taken back. */
  loom_mutex_lock(&s->owner->mu);
  s->owner->total++;
  loom_mutex_unlock(&s->owner->mu);
  s->reader_g = loom_id();
  loom__cb_tag_set(s->owner); /* every callback but pooled ones runs here */
  if (s->o.compress && !s->packet)
    rc = loom__zlib_layer_new(&s->top, &s->sock, s->o.compress,
                              s->o.compress_window_bits,
                              s->o.compress_mem_level);
  if (rc < 0) {
    loom_session_abort(s, rc);
    goto end;
  }
  if (s->packet) { /* a datagram must fit whole: no stack buffer */
    r.b.cap = loom__readbuf_limit(s->o.max_pkg_len);
    size_t most = s->unix_dgram ? DGRAM_UNIX_MAX : DGRAM_UDP_MAX;
    if (r.b.cap > most)
      r.b.cap = most;
    r.b.buf = loom__malloc(r.b.cap);
    if (!r.b.buf) {
      loom_session_abort(s, -ENOMEM);
      goto end;
    }
  }
  if (l->on_open) {
    rc = l->on_open(s);
    if (rc < 0) {
      loom__owner_count(s->owner, LOOM__ERR_refused);
      loom_session_abort(s, rc); /* not reported: s->opened is false */
      goto end;
    }
  }
  loom_mutex_lock(&s->owner->mu);
  s->opened = true; /* read under the owner's lock (clients) */
  loom_cond_broadcast(&s->owner->changed);
  loom_mutex_unlock(&s->owner->mu);

  int64_t now = loom_now();
  atomic_store_explicit(&s->last_read, now, memory_order_relaxed);
  (void)atomic_exchange_explicit(&s->retime, 0, memory_order_acquire);
  retime(s, &r, now, RETIME_IDLE | RETIME_CRON);
  rc = s->packet ? read_packets(s, &r) : read_stream(s, &r);
  if (rc < 0)
    loom_session_abort(s, rc);
  else
    loom_session_close(s);

end:
  /* Every pooled package of the session is handled before on_close. */
  loom_wg_wait(&s->pooled, 0);
  loom_wg_wait(&s->flushing, 0); /* they touch the queue and the socket */
  if (!s->packet) {
    loom_mutex_lock(&s->wmu);
    s->wfinal = true;
    if (s->o.linger < 0 && !s->wbusy)
      wq_drop(s);
    else if (s->o.linger > 0)
      s->final_deadline = loom__after(s->o.linger);
    /* A write under way was bounded by write_timeout at most: bound it
     * by the linger now — or cut it, with linger < 0 or after an abort
     * (whose past deadline this must not move back to the future). */
    if (s->wbusy) {
      s->wdl = s->o.linger < 0 || atomic_load(&s->state) == S_ABORTED
                   ? 1
                   : s->final_deadline;
      if (loom_set_write_deadline(s->conn, s->wdl) == -ENOMEM) {
        s->wdl = 1;
        loom_set_write_deadline(s->conn, 1); /* no timer: cut it, not hang */
      }
    }
    bool writer = s->writer_on; /* none: nothing was ever queued */
    loom_cond_signal(&s->wcond);
    loom_mutex_unlock(&s->wmu);
    if (writer)
      loom_sema_acquire(&s->writer_exit, 0);
  }
  loom__free(r.b.buf);
  int err = atomic_load(&s->err);
  if (err < 0 && s->opened) {
    loom__owner_count_error(s->owner, err);
    if (l->on_error)
      l->on_error(s, err);
  }
  /* on_close still sees the socket's addresses; then it closes, and
   * calls from those who keep a reference no longer reach it. */
  if (l->on_close)
    l->on_close(s);
  loom_mutex_lock(&s->wmu);
  s->io_closed = true;
  loom_cond_broadcast(&s->wspace); /* packet senders waiting for a turn */
  loom_mutex_unlock(&s->wmu);
  if (s->conn) {
    loom_close(s->conn);
  } else {
    loom_pconn_set_write_deadline(s->pc, 1); /* a parked sender leaves */
    loom_wg_wait(&s->io_users, 0);
    loom_pconn_close(s->pc);
  }
  /* Unreferenced by anyone else, the session is freed (on_free) before
   * its owner hears that it is gone: a server or client close that
   * returns has seen every on_free but those of users' references. */
  loom__owner *o = s->owner;
  owner_unlink(s);
  loom_session_unref(s);
  owner_leave(o);
}

/* ---- start -------------------------------------------------------------- */

int loom__session_start(loom__owner *owner, const loom_session_opts *o,
                        const char *network, loom_conn *conn, loom_pconn *pc,
                        bool connected) {
  loom_session *s = loom__calloc(1, sizeof *s);
  if (!s)
    goto fail;
  atomic_init(&s->ref, 1);
  s->id = atomic_fetch_add_explicit(&next_session_id, 1, memory_order_relaxed);
  s->owner = owner;
  s->o = *o;
  s->codec = o->codec;
  if (!s->codec) {
    loom_codec_raw(&s->raw);
    s->codec = &s->raw;
  }
  s->conn = conn;
  s->pc = pc;
  s->sock.ops = &sock_ops;
  s->top = &s->sock;
  s->packet = pc != NULL;
  s->unix_dgram = s->packet && strcmp(network, "unixgram") == 0;
  s->connected = conn != NULL || connected;
  s->fd = conn ? loom_conn_fd(conn) : loom_pconn_fd(pc);
  snprintf(s->network, sizeof s->network, "%s", network);
  s->user = o->user;
  atomic_init(&s->state, S_OPEN);
  loom_buf_init(&s->wq, 0);
  pk_reset(s);
  s->opened_at = loom_now();

  loom_mutex_lock(&owner->mu);
  s->next = owner->head;
  if (owner->head)
    owner->head->prev = s;
  owner->head = s;
  owner->open++;
  loom_mutex_unlock(&owner->mu);
  if (loom_go(reader_main, s) < 0) {
    s->conn = NULL;
    s->pc = NULL;
    owner_unlink(s);
    session_free(s, false); /* the only reference, and no on_open */
    owner_leave(owner);     /* no callback saw it; the caller counts it */
    goto fail;
  }
  return 0;
fail:
  if (conn)
    loom_close(conn);
  if (pc)
    loom_pconn_close(pc);
  return -ENOMEM;
}
