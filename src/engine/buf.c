/*
 * buf.c — the chunked byte queue of loom/buf.h.
 *
 * A singly linked list of chunks; each holds bytes [off, len) of its
 * `cap`.  Appends fill the tail chunk and then add chunks; consumption
 * advances the head chunk's offset and unlinks chunks it empties.  One
 * emptied heap chunk of the standard size is kept as `spare`, so a queue
 * that fills and drains in turn (a session's write queue under a ping-pong
 * load) stops allocating after its first round.
 *
 * Rejected: a contiguous ring (a large package would move everything
 * queued when the ring grows, and writev gets at most two pieces anyway);
 * one chunk per append (a malloc per package, and writev's IOV_MAX would
 * bound the batch).
 */
#include <errno.h>
#include <string.h>

#include "loom/buf.h"
#include "runtime/alloc.h"

struct loom_buf_chunk {
  loom_buf_chunk *next;
  size_t off, len, cap;
  int borrowed; /* caller storage: never freed, never the spare */
  uint8_t data[];
};

#define BUF_DEFAULT_CHUNK ((size_t)16384)

static size_t chunk_size(const loom_buf *b) {
  return b->chunk ? b->chunk : BUF_DEFAULT_CHUNK;
}

void loom_buf_init(loom_buf *b, size_t chunk) {
  memset(b, 0, sizeof *b);
  b->chunk = chunk;
}

void loom_buf_init_on(loom_buf *b, void *mem, size_t size) {
  loom_buf_init(b, 0);
  loom_buf_chunk *c = mem;
  c->next = NULL;
  c->off = c->len = 0;
  c->cap = size - sizeof *c;
  c->borrowed = 1;
  b->head = b->tail = c;
}

static void chunk_drop(loom_buf *b, loom_buf_chunk *c) {
  if (c->borrowed)
    return;
  if (!b->spare && c->cap == chunk_size(b)) {
    c->next = NULL;
    b->spare = c;
    return;
  }
  loom__free(c);
}

void loom_buf_reset(loom_buf *b) {
  loom_buf_chunk *c = b->head;
  while (c) {
    loom_buf_chunk *n = c->next;
    if (!c->borrowed)
      loom__free(c);
    c = n;
  }
  if (b->spare)
    loom__free(b->spare);
  b->head = b->tail = b->spare = NULL;
  b->len = 0;
}

/* An unlinked empty chunk of at least `n` bytes: the spare, or a new one. */
static loom_buf_chunk *chunk_new(loom_buf *b, size_t n) {
  loom_buf_chunk *c;
  size_t cap = chunk_size(b);
  if (n > SIZE_MAX - sizeof *c)
    return NULL; /* sizeof *c + n would wrap to a small block */
  if (n <= cap && b->spare) {
    c = b->spare;
    b->spare = NULL;
  } else {
    if (n > cap)
      cap = n;
    c = loom__malloc(sizeof *c + cap);
    if (!c)
      return NULL;
    c->cap = cap;
    c->borrowed = 0;
  }
  c->next = NULL;
  c->off = c->len = 0;
  return c;
}

static void chunk_link(loom_buf *b, loom_buf_chunk *c) {
  if (b->tail)
    b->tail->next = c;
  else
    b->head = c;
  b->tail = c;
}

/* The tail chunk if it has `n` free bytes (rewinding it when the queue is
 * empty), else NULL. */
static loom_buf_chunk *tail_fits(loom_buf *b, size_t n) {
  loom_buf_chunk *t = b->tail;
  if (!t)
    return NULL;
  if (b->len == 0 && t->cap >= n) {
    t->off = t->len = 0;
    return t;
  }
  return t->cap - t->len >= n ? t : NULL;
}

int loom_buf_append(loom_buf *b, const void *p, size_t n) {
  if (n == 0)
    return 0;
  loom_buf_chunk *t = tail_fits(b, n);
  if (t) {
    memcpy(t->data + t->len, p, n);
    t->len += n;
    b->len += n;
    return 0;
  }
  /* Fill the tail, then one chunk for the rest; all-or-nothing, so the
   * chunk is allocated before anything is copied. */
  t = b->tail;
  size_t first = t ? t->cap - t->len : 0;
  loom_buf_chunk *c = chunk_new(b, n - first);
  if (!c)
    return -ENOMEM;
  if (first) {
    memcpy(t->data + t->len, p, first);
    t->len += first;
  }
  memcpy(c->data, (const uint8_t *)p + first, n - first);
  c->len = n - first;
  chunk_link(b, c);
  b->len += n;
  return 0;
}

void *loom_buf_reserve(loom_buf *b, size_t n) {
  loom_buf_chunk *c = tail_fits(b, n);
  if (!c) {
    c = chunk_new(b, n);
    if (!c)
      return NULL;
    chunk_link(b, c);
  }
  return c->data + c->len;
}

void loom_buf_commit(loom_buf *b, size_t n) {
  b->tail->len += n;
  b->len += n;
}

int loom_buf_peek(const loom_buf *b, struct iovec *iov, int max) {
  int i = 0;
  for (loom_buf_chunk *c = b->head; c && i < max; c = c->next) {
    if (c->len == c->off)
      continue;
    iov[i].iov_base = c->data + c->off;
    iov[i].iov_len = c->len - c->off;
    i++;
  }
  return i;
}

void loom_buf_consume(loom_buf *b, size_t n) {
  b->len -= n;
  while (n) {
    loom_buf_chunk *c = b->head;
    size_t have = c->len - c->off;
    if (n < have) {
      c->off += n;
      return;
    }
    n -= have;
    if (c == b->tail) {
      c->off = c->len = 0; /* keep the last chunk to append into */
      return;
    }
    b->head = c->next;
    chunk_drop(b, c);
  }
  /* Consumed exactly up to a chunk end: drop emptied chunks left behind. */
  while (b->head != b->tail && b->head->off == b->head->len) {
    loom_buf_chunk *c = b->head;
    b->head = c->next;
    chunk_drop(b, c);
  }
}

void loom_buf_copyout(const loom_buf *b, void *dst, size_t n) {
  uint8_t *d = dst;
  for (loom_buf_chunk *c = b->head; c && n; c = c->next) {
    size_t have = c->len - c->off;
    if (have > n)
      have = n;
    memcpy(d, c->data + c->off, have);
    d += have;
    n -= have;
  }
}

int loom_buf_move(loom_buf *dst, loom_buf *src) {
  if (src->len == 0)
    return 0;
  /* Caller storage cannot change hands: copy that chunk's bytes.  Only a
   * buffer's first chunk can be caller storage (init_on puts it there and
   * nothing is linked before it), so one append — all or nothing — copies
   * it, and the heap chunks after it move below without failing. */
  loom_buf_chunk *first = src->head;
  if (first->borrowed) {
    size_t n = first->len - first->off;
    if (loom_buf_append(dst, first->data + first->off, n) < 0)
      return -ENOMEM;
    loom_buf_consume(src, n);
    if (src->len == 0)
      return 0;
  }
  /* Unlink src's chunks, skipping empty ones at the head. */
  loom_buf_chunk *h = src->head;
  while (h->off == h->len)
    h = h->next;
  if (dst->tail && dst->tail->off == dst->tail->len && dst->head == dst->tail) {
    chunk_drop(dst, dst->head); /* an empty chunk left by consume */
    dst->head = dst->tail = NULL;
  }
  if (dst->tail)
    dst->tail->next = h;
  else
    dst->head = h;
  dst->tail = src->tail;
  dst->len += src->len;
  for (loom_buf_chunk *c = src->head; c != h;) {
    loom_buf_chunk *n = c->next;
    chunk_drop(src, c);
    c = n;
  }
  src->head = src->tail = NULL;
  src->len = 0;
  return 0;
}
