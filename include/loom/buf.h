/*
 * loom/buf.h — a byte queue made of chunks.
 *
 * A loom_buf is what codecs encode into and what an engine session's
 * write queue is: bytes are appended at the tail (copied into chunks of
 * `chunk` bytes, a larger chunk for a larger append) and taken from the
 * head, without ever moving what is already queued.  Its length is the
 * number of bytes queued.
 *
 * A loom_buf may start on caller-provided storage (loom_buf_init_on): the
 * first chunk is then that memory, never freed, so a short encode costs no
 * allocation.  All memory comes from loom's allocator hook.
 *
 * Not thread-safe: one owner at a time.  Nothing here parks.
 */
#ifndef LOOM_BUF_H
#define LOOM_BUF_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "loom/common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct loom_buf_chunk loom_buf_chunk;

/* Fields are private; the struct is public so a loom_buf can live on the
 * stack or inside another object. */
typedef struct loom_buf {
  loom_buf_chunk *head, *tail;
  size_t len;            /* bytes queued */
  size_t chunk;          /* size of a new chunk (0: 16 KiB) */
  loom_buf_chunk *spare; /* one emptied chunk kept for reuse */
} loom_buf;

#define LOOM_BUF_INIT                                                          \
  { 0, 0, 0, 0, 0 }

/* An empty buffer whose chunks hold `chunk` bytes (0: 16 KiB). */
LOOM_API void loom_buf_init(loom_buf *b, size_t chunk);

/* An empty buffer whose first chunk is `mem` (`size` bytes, at least 64,
 * aligned to 8; about 40 of them hold the chunk's header); `mem` must
 * outlive the buffer and is never freed.  The buffer uses it until it
 * is reset or consumed past it, then allocates like any other. */
LOOM_API void loom_buf_init_on(loom_buf *b, void *mem, size_t size);

/* Drop everything queued and free the chunks (not caller storage).  The
 * buffer stays usable, empty. */
LOOM_API void loom_buf_reset(loom_buf *b);

/* Bytes queued. */
static inline size_t loom_buf_len(const loom_buf *b) { return b->len; }

/* Append `n` bytes.  0, or -ENOMEM with nothing appended. */
LOOM_API int loom_buf_append(loom_buf *b, const void *p, size_t n);

/*
 * loom_buf_reserve — room for `n` contiguous bytes at the tail, to be
 * filled and then counted with loom_buf_commit(b, m), m <= n.  Returns
 * the pointer, or NULL (out of memory).  Appending anything else between
 * the two calls is not allowed.
 */
LOOM_API void *loom_buf_reserve(loom_buf *b, size_t n);
LOOM_API void loom_buf_commit(loom_buf *b, size_t n);

/* Fill up to `max` iovecs with the queued bytes, head first; returns how
 * many were filled.  The memory stays valid until it is consumed. */
LOOM_API int loom_buf_peek(const loom_buf *b, struct iovec *iov, int max);

/* Remove `n` bytes (n <= length) from the head. */
LOOM_API void loom_buf_consume(loom_buf *b, size_t n);

/* Copy the first `n` bytes (n <= length) to `dst` without removing them. */
LOOM_API void loom_buf_copyout(const loom_buf *b, void *dst, size_t n);

/* Move everything queued in `src` to the tail of `dst`, leaving `src`
 * empty; no byte is copied unless `src` lives on caller storage. 0 or
 * -ENOMEM (then nothing moved). */
LOOM_API int loom_buf_move(loom_buf *dst, loom_buf *src);

#ifdef __cplusplus
}
#endif
#endif /* LOOM_BUF_H */
