/*
 * readbuf.h — a stream session's read buffer (internal): where the
 * reader reads the next bytes, and how the buffer grows, compacts and
 * shrinks.  Bytes and sizes only — no socket, no session — so the
 * session's reader (session.c, read_stream) and the tests and fuzz
 * targets (through engine/export_test.h) run the same code.
 *
 * The buffer adapts to the traffic.  A read that filled all the room
 * offered doubles it (up to LOOM__READ_BURST, or read_buf if larger), so
 * a pipelining peer is read in large gulps and its replies leave corked,
 * a few syscalls per many packages; after LOOM__QUIET_READS small reads
 * in a row (or a cron tick) the reader sheds it, so a quiet session
 * holds none — and a busy one does not flap between sizes.  A package
 * longer than the buffer grows it to fit, up to loom__readbuf_limit, and
 * the buffer goes back to read_buf as soon as that package is handled,
 * or, if part of the next one is pending by then, when the reader sheds
 * (quiet reads, a cron tick, an idle check).
 *
 * A reader without a heap buffer (cap 0) reads into LOOM__STACK_READ
 * bytes on its own stack, in the page its frames use anyway: small
 * requests and replies never need the heap, and an idle session parks
 * holding no read buffer at all.  What a stack read leaves pending (part
 * of a package), or a stack read that filled its room (more is coming),
 * moves the reader to a heap buffer (loom__readbuf_unstack).
 *
 * The functions are static inline: read_stream calls them once per read
 * and must not pay a call for them.  The two sizes they work with live
 * in the struct rather than arrive as arguments, so that each is loaded
 * only on the path that uses it (an argument is loaded at the call,
 * before the inlined body's stores, where the compiler may not sink it).
 * All memory goes through loom's allocator (runtime/alloc.h).  A failed
 * allocation leaves the buffer as it was, except where a function says
 * otherwise.
 */
#ifndef LOOM_ENGINE_READBUF_H
#define LOOM_ENGINE_READBUF_H

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "runtime/alloc.h"

/* How far the buffer grows for throughput (a long package may take it
 * further, up to loom__readbuf_limit). */
#define LOOM__READ_BURST ((size_t)65536)
/* Small reads in a row after which a session counts as quiet. */
#define LOOM__QUIET_READS 16
/* The reader's stack buffer: with the frames below it while the reader
 * is parked, it stays within one page. */
#define LOOM__STACK_READ ((size_t)512)

typedef struct loom__readbuf {
  uint8_t *buf;
  size_t cap, off, len; /* unconsumed bytes are buf[off, len) */
  size_t read_buf;      /* the heap buffer's usual size (> 0) */
  size_t max_pkg_len;   /* the longest package the codec may take */
  int small;            /* reads in a row that used < 1/4 of the room */
  size_t small_max;     /* the longest of those reads */
  bool filled;          /* the last read filled all the room offered */
  bool on_stack;        /* buf is the reader's stack buffer */
} loom__readbuf;

/* The most a package and its framing may take: max_pkg_len plus 64
 * bytes, saturated (SIZE_MAX says "no limit"). */
static inline size_t loom__readbuf_limit(size_t max_pkg_len) {
  return max_pkg_len > SIZE_MAX - 64 ? SIZE_MAX : max_pkg_len + 64;
}

/* An empty b, no buffer yet, for the session's read_buf (> 0) and
 * max_pkg_len. */
static inline void loom__readbuf_init(loom__readbuf *b, size_t read_buf,
                                      size_t max_pkg_len) {
  memset(b, 0, sizeof *b);
  b->read_buf = read_buf;
  b->max_pkg_len = max_pkg_len;
}

/* b has no buffer (cap 0): read into stack, LOOM__STACK_READ bytes that
 * must stay valid until loom__readbuf_unstack or _leave_stack. */
static inline void loom__readbuf_stack(loom__readbuf *b, uint8_t *stack) {
  b->buf = stack;
  b->cap = b->read_buf < LOOM__STACK_READ ? b->read_buf : LOOM__STACK_READ;
  b->on_stack = true;
}

/* Move what is pending of b's heap buffer into a new one of read_buf
 * bytes (pending < read_buf); on no memory b stays as it was. */
static inline void loom__readbuf_back_to_usual(loom__readbuf *b) {
  size_t pending = b->len - b->off;
  uint8_t *nb = loom__malloc(b->read_buf);
  if (!nb)
    return;
  memcpy(nb, b->buf + b->off, pending);
  loom__free(b->buf);
  b->buf = nb;
  b->cap = b->read_buf;
  b->off = 0;
  b->len = pending;
}

static inline int loom__readbuf_resize(loom__readbuf *b, size_t cap) {
  uint8_t *nb = loom__realloc(b->buf, cap);
  if (!nb)
    return -ENOMEM;
  b->buf = nb;
  b->cap = cap;
  return 0;
}

/*
 * Room at the end of b's heap buffer (cap > 0, not on the stack) for the
 * next read: gives back a buffer grown for one long package once it is
 * handled, doubles it after a read that filled it, moves pending bytes
 * to the front, grows it for a package that does not fit.
 * Returns 0 (cap > len), -ENOMEM, or -EMSGSIZE: a partial package fills
 * loom__readbuf_limit(max_pkg_len) bytes.
 */
static inline int loom__readbuf_room(loom__readbuf *b) {
  size_t read_buf = b->read_buf;
  size_t burst = LOOM__READ_BURST > read_buf ? LOOM__READ_BURST : read_buf;
  if (b->off == b->len) {
    b->off = b->len = 0;
    /* Grown for one long package: give it back now that it is handled.
     * Not while part of the next one is pending: a peer streaming long
     * packages would have the buffer shrink and grow again for each
     * (the reader's shed, at quiet reads and cron ticks, gives it back
     * then). */
    if (b->cap > burst)
      loom__readbuf_back_to_usual(b);
  }
  if (b->filled && b->cap < burst) {
    b->filled = false;
    if (loom__readbuf_resize(b, b->cap * 2 < burst ? b->cap * 2 : burst) < 0)
      return -ENOMEM;
  }
  if (b->len < b->cap)
    return 0;
  if (b->off > 0) {
    memmove(b->buf, b->buf + b->off, b->len - b->off);
    b->len -= b->off;
    b->off = 0;
    return 0;
  }
  /* A partial package fills the buffer.  The codec has not refused it,
   * so it fits max_pkg_len plus framing; a codec that never decides is
   * cut off at max_pkg_len plus 64 bytes of framing. */
  size_t limit = loom__readbuf_limit(b->max_pkg_len);
  if (b->cap >= limit)
    return -EMSGSIZE;
  return loom__readbuf_resize(b, b->cap * 2 > limit ? limit : b->cap * 2);
}

/* A read put n > 0 bytes at buf + len, where room bytes were offered. */
static inline void loom__readbuf_took(loom__readbuf *b, size_t n, size_t room) {
  b->filled = n == room;
  if (n >= room / 4) {
    b->small = 0;
    b->small_max = 0;
  } else if (b->small <= LOOM__QUIET_READS) {
    b->small++; /* stops past LOOM__QUIET_READS: a shed happens once */
    if (n > b->small_max)
      b->small_max = n;
  }
  b->len += n;
}

/* After a read into the stack buffer: back to no buffer if everything
 * was handled, else onto the heap with what is pending.  A read that
 * filled the stack buffer (filled) moves to the heap too, for larger
 * gulps.  0, or -ENOMEM with b left without a buffer (the pending
 * bytes lost). */
static inline int loom__readbuf_unstack(loom__readbuf *b, bool filled) {
  size_t pending = b->len - b->off;
  b->on_stack = false;
  if (pending == 0 && !filled) {
    b->buf = NULL;
    b->cap = b->off = b->len = 0;
    return 0;
  }
  size_t cap = pending > b->read_buf ? pending : b->read_buf;
  uint8_t *nb = loom__malloc(cap);
  if (!nb) {
    b->buf = NULL;
    b->cap = b->off = b->len = 0;
    return -ENOMEM;
  }
  memcpy(nb, b->buf + b->off, pending);
  b->buf = nb;
  b->cap = cap;
  b->off = 0;
  b->len = pending;
  b->filled = false; /* the heap buffer starts at read_buf */
  return 0;
}

/* The reader leaves the frame that holds the stack buffer. */
static inline void loom__readbuf_leave_stack(loom__readbuf *b) {
  if (b->on_stack) {
    b->buf = NULL;
    b->cap = b->off = b->len = 0;
    b->on_stack = false;
  }
}

/* The session has gone quiet: with nothing pending, give back the heap
 * buffer entirely (reads go to the stack again) when to_stack — the
 * reads lately would fit there with room to spare, or a cron tick —
 * else cut it back to read_buf; with part of a package pending, cut it
 * back to read_buf if that holds what is pending. */
static inline void loom__readbuf_shed(loom__readbuf *b, bool to_stack) {
  if (b->on_stack)
    return;
  if (b->off == b->len && to_stack) {
    loom__free(b->buf); /* nothing to keep */
    b->buf = NULL;
    b->cap = b->off = b->len = 0;
  } else if (b->cap > b->read_buf && b->len - b->off < b->read_buf) {
    loom__readbuf_back_to_usual(b);
  }
}

/* Whether the last LOOM__QUIET_READS reads were all small: shed now,
 * to the stack if they would fit there with room to spare. */
static inline bool loom__readbuf_quiet(const loom__readbuf *b) {
  return b->small == LOOM__QUIET_READS;
}

static inline bool loom__readbuf_quiet_to_stack(const loom__readbuf *b) {
  return b->small_max <= LOOM__STACK_READ / 2;
}

/* Free b's heap buffer (not a stack one): b has none after. */
static inline void loom__readbuf_free(loom__readbuf *b) {
  loom__readbuf_leave_stack(b);
  loom__free(b->buf);
  b->buf = NULL;
  b->cap = b->off = b->len = 0;
}

#endif
