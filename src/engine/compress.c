/*
 * compress.c — zlib streams for sessions; see compress.h.
 *
 * zlib's own format (a 2-byte header, then deflate blocks), never
 * finished: each batch ends with Z_SYNC_FLUSH.  A peer's stream that
 * ends (Z_STREAM_END), or that zlib cannot parse, is LOOM_ECOMPRESS: the
 * session closes with that error.  zlib allocates through loom's hook.
 */
#include <errno.h>
#include <limits.h>
#include <string.h>
#include <zlib.h>

#include "engine/compress.h"
#include "loom/error.h"
#include "runtime/alloc.h"

#define ZIN_BUF 16384

struct loom__zstream {
  z_stream z;
  int deflating;
  uint8_t *in;   /* inflate: compressed bytes read, z.next_in into it */
};

static voidpf zalloc(voidpf opaque, uInt items, uInt size) {
  (void)opaque;
  return loom__calloc(items, size);
}

static void zfree(voidpf opaque, voidpf p) {
  (void)opaque;
  loom__free(p);
}

int loom__zstream_new(loom__zstream **out, int deflating, int level) {
  loom__zstream *z = loom__calloc(1, sizeof *z);
  if (!z)
    return -ENOMEM;
  z->z.zalloc = zalloc;
  z->z.zfree = zfree;
  z->deflating = deflating;
  int rc;
  if (deflating) {
    rc = deflateInit(&z->z, level < 0 ? Z_DEFAULT_COMPRESSION : level);
  } else {
    z->in = loom__malloc(ZIN_BUF);
    rc = z->in ? inflateInit(&z->z) : Z_MEM_ERROR;
  }
  if (rc != Z_OK) {
    loom__free(z->in);
    loom__free(z);
    return -ENOMEM;
  }
  *out = z;
  return 0;
}

void loom__zstream_free(loom__zstream *z) {
  if (!z)
    return;
  if (z->deflating)
    deflateEnd(&z->z);
  else
    inflateEnd(&z->z);
  loom__free(z->in);
  loom__free(z);
}

/* Run deflate over the current input with `flush`, output into `out`. */
static int deflate_into(loom__zstream *z, int flush, loom_buf *out) {
  do {
    size_t room = 4096;
    uint8_t *p = loom_buf_reserve(out, room);
    if (!p)
      return -ENOMEM;
    z->z.next_out = p;
    z->z.avail_out = (uInt)room;
    int rc = deflate(&z->z, flush);
    loom_buf_commit(out, room - z->z.avail_out);
    if (rc == Z_STREAM_ERROR)
      return -ENOMEM; /* cannot happen with a valid stream */
    /* Done when deflate left output room: it has nothing more to say. */
  } while (z->z.avail_out == 0 || z->z.avail_in > 0);
  return 0;
}

int loom__zstream_deflate(loom__zstream *z, const struct iovec *iov, int n,
                          loom_buf *out) {
  for (int i = 0; i < n; i++) {
    const uint8_t *p = iov[i].iov_base;
    size_t left = iov[i].iov_len;
    while (left) {
      uInt chunk = left > UINT_MAX ? UINT_MAX : (uInt)left;
      z->z.next_in = (Bytef *)(uintptr_t)p;
      z->z.avail_in = chunk;
      int rc = deflate_into(z, Z_NO_FLUSH, out);
      if (rc < 0)
        return rc;
      p += chunk;
      left -= chunk;
    }
  }
  z->z.next_in = NULL;
  z->z.avail_in = 0;
  return deflate_into(z, Z_SYNC_FLUSH, out);
}

/* Inflate what is buffered into out[0..len): the count (0: needs input),
 * or LOOM_ECOMPRESS. */
static ssize_t inflate_some(loom__zstream *z, void *out, size_t len) {
  uInt room = len > UINT_MAX ? UINT_MAX : (uInt)len;
  z->z.next_out = out;
  z->z.avail_out = room;
  int rc = inflate(&z->z, Z_SYNC_FLUSH);
  ssize_t got = (ssize_t)(room - z->z.avail_out);
  if (rc == Z_OK || (rc == Z_BUF_ERROR && z->z.avail_in == 0) ||
      (rc == Z_BUF_ERROR && got > 0))
    return got;
  return LOOM_ECOMPRESS; /* Z_DATA_ERROR, Z_NEED_DICT, Z_STREAM_END, ... */
}

ssize_t loom__zstream_read(loom__zstream *z, loom_conn *c, void *buf,
                           size_t len, size_t *wire) {
  for (;;) {
    ssize_t got = inflate_some(z, buf, len);
    if (got != 0)
      return got;
    /* Nothing more from what is buffered: read compressed bytes after
     * any zlib has not taken yet. */
    size_t keep = z->z.avail_in;
    if (keep)
      memmove(z->in, z->z.next_in, keep);
    if (keep == ZIN_BUF)
      return LOOM_ECOMPRESS; /* a full buffer and no progress */
    ssize_t n = loom_read(c, z->in + keep, ZIN_BUF - keep);
    if (n <= 0)
      return n;
    *wire += (size_t)n;
    z->z.next_in = z->in;
    z->z.avail_in = (uInt)(keep + (size_t)n);
  }
}

ssize_t loom__zstream_inflate_mem(loom__zstream *z, const void *in,
                                  size_t inlen, void *out, size_t outlen) {
  z->z.next_in = (Bytef *)(uintptr_t)in;
  z->z.avail_in = inlen > UINT_MAX ? UINT_MAX : (uInt)inlen;
  size_t total = 0;
  for (;;) {
    ssize_t got = inflate_some(z, (uint8_t *)out + total, outlen - total);
    if (got < 0)
      return got;
    total += (size_t)got;
    if (got == 0 || total == outlen)
      return (ssize_t)total;
  }
}
