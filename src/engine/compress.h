/*
 * compress.h — a session's zlib streams (internal).
 *
 * A compressing session has one deflate stream for what it writes and
 * one inflate stream for what it reads, for its whole life: a stream, not
 * a message at a time, so the window spans packages.  The writer
 * compresses each batch it drains and ends it with Z_SYNC_FLUSH, so the
 * peer can decode everything sent so far without waiting for more.  This
 * sits between the socket and the codec: the codec never sees compressed
 * bytes.
 */
#ifndef LOOM_ENGINE_COMPRESS_H
#define LOOM_ENGINE_COMPRESS_H

#include <sys/types.h>
#include <sys/uio.h>

#include "loom/buf.h"
#include "loom/net.h"

typedef struct loom__zstream loom__zstream;

/* A stream that deflates (deflate != 0, at `level`: 1..9, -1 default) or
 * inflates.  0 or -ENOMEM. */
int loom__zstream_new(loom__zstream **z, int deflate, int level);
void loom__zstream_free(loom__zstream *z); /* NULL: no-op */

/* Compress iov[0..n) and flush, appending to `out`.  0 or -ENOMEM. */
int loom__zstream_deflate(loom__zstream *z, const struct iovec *iov, int n,
                          loom_buf *out);

/* Bytes for the decoder: inflate what is buffered, reading compressed
 * bytes from `c` when needed (adding their count to *wire).  As
 * loom_read: a count > 0, 0 at the end of the stream, -errno;
 * LOOM_ECOMPRESS when the bytes are not a zlib stream.  Parks. */
ssize_t loom__zstream_read(loom__zstream *z, loom_conn *c, void *buf,
                           size_t len, size_t *wire);

/* The same on bytes in memory (tests, fuzzing): inflate in[0..inlen)
 * into out; returns the count or LOOM_ECOMPRESS. */
ssize_t loom__zstream_inflate_mem(loom__zstream *z, const void *in,
                                  size_t inlen, void *out, size_t outlen);

#endif
