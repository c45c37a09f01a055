/*
 * codec.c — the ready-made codecs of loom/codec.h: length-prefixed, line,
 * raw.  Pure functions over bytes; see the header for the contract.
 *
 * The length-prefixed decoder rejects an oversized package from its
 * header alone, so a peer cannot make a session buffer max_len bytes of a
 * package that will be refused anyway.  The line decoder looks for the
 * delimiter only in the first max_len + 1 bytes (a line of max_len, the
 * delimiter; one more for the '\r' with strip_cr), so a peer that never
 * sends one is refused once it has sent that much.
 */
#include <errno.h>
#include <limits.h>
#include <string.h>

#include "loom/codec.h"

/* ---- length-prefixed ---------------------------------------------------- */

static uint64_t get_uint(const uint8_t *p, unsigned w, bool little) {
  uint64_t v = 0;
  for (unsigned i = 0; i < w; i++) {
    unsigned k = little ? w - 1 - i : i;
    v = (v << 8) | p[k];
  }
  return v;
}

static void put_uint(uint8_t *p, unsigned w, bool little, uint64_t v) {
  for (unsigned i = 0; i < w; i++) {
    unsigned k = little ? i : w - 1 - i;
    p[k] = (uint8_t)(v & 0xff);
    v >>= 8;
  }
}

static ssize_t lenpfx_decode(const loom_codec *c, const uint8_t *buf,
                             size_t len, size_t max_len, loom_pkg *pkg) {
  unsigned w = c->u.lenpfx.width;
  if (len < w)
    return 0;
  uint64_t field = get_uint(buf, w, c->u.lenpfx.little_endian);
  /* payload = field + adjust, in 128-bit-free arithmetic: |adjust| < 2^62
   * and field < 2^64, so compare before adding. */
  int64_t adj = c->u.lenpfx.adjust;
  uint64_t payload;
  if (adj < 0) {
    if (field < (uint64_t)-adj)
      return -EBADMSG;
    payload = field - (uint64_t)-adj;
  } else {
    if (field > UINT64_MAX - (uint64_t)adj)
      return -EMSGSIZE;
    payload = field + (uint64_t)adj;
  }
  if (payload > max_len || payload > (uint64_t)SSIZE_MAX - w)
    return -EMSGSIZE;
  if (len - w < payload)
    return 0;
  pkg->data = buf + w;
  pkg->len = (size_t)payload;
  return (ssize_t)(w + payload);
}

static int lenpfx_encode(const loom_codec *c, const void *data, size_t len,
                         size_t max_len, loom_buf *out) {
  unsigned w = c->u.lenpfx.width;
  /* A frame longer than SSIZE_MAX is one no decode can return; refusing
   * it first also keeps w + len and len + |adjust| (|adjust| < 2^62)
   * below 2^64, so neither the reserve nor the field wraps. */
  if (len > max_len || len > (size_t)SSIZE_MAX - w)
    return -EMSGSIZE;
  int64_t adj = c->u.lenpfx.adjust;
  uint64_t field;
  if (adj > 0) {
    if ((uint64_t)len < (uint64_t)adj)
      return -EINVAL; /* the field would have to be negative */
    field = (uint64_t)len - (uint64_t)adj;
  } else {
    field = (uint64_t)len + (uint64_t)-adj;
  }
  if (w < 8 && field >> (8 * w))
    return -EMSGSIZE;
  uint8_t *p = loom_buf_reserve(out, w + len);
  if (!p)
    return -ENOMEM;
  put_uint(p, w, c->u.lenpfx.little_endian, field);
  if (len)
    memcpy(p + w, data, len);
  loom_buf_commit(out, w + len);
  return 0;
}

int loom_codec_lenpfx(loom_codec *c, const loom_lenpfx_opts *o) {
  unsigned w = o && o->width ? o->width : 4;
  int64_t adj = o ? o->adjust : 0;
  if (w != 1 && w != 2 && w != 4 && w != 8)
    return -EINVAL;
  if (adj >= (INT64_C(1) << 62) || adj <= -(INT64_C(1) << 62))
    return -EINVAL;
  memset(c, 0, sizeof *c);
  c->name = "lenpfx";
  c->decode = lenpfx_decode;
  c->encode = lenpfx_encode;
  c->u.lenpfx.width = (uint8_t)w;
  c->u.lenpfx.little_endian = o ? o->little_endian : false;
  c->u.lenpfx.adjust = adj;
  return 0;
}

/* ---- line --------------------------------------------------------------- */

static ssize_t line_decode(const loom_codec *c, const uint8_t *buf, size_t len,
                           size_t max_len, loom_pkg *pkg) {
  size_t scan = len;
  size_t limit = max_len + 1 + (c->u.line.strip_cr ? 1 : 0);
  if (limit < max_len) /* overflow: max_len near SIZE_MAX */
    limit = SIZE_MAX;
  if (scan > limit)
    scan = limit;
  const uint8_t *d = memchr(buf, (unsigned char)c->u.line.delim, scan);
  if (!d)
    return len >= limit ? -EMSGSIZE : 0;
  size_t n = (size_t)(d - buf);
  if (c->u.line.strip_cr && n > 0 && buf[n - 1] == '\r')
    n--;
  if (n > max_len)
    return -EMSGSIZE;
  pkg->data = buf;
  pkg->len = n;
  return d - buf + 1;
}

static int line_encode(const loom_codec *c, const void *data, size_t len,
                       size_t max_len, loom_buf *out) {
  if (len > max_len)
    return -EMSGSIZE;
  if (len && memchr(data, (unsigned char)c->u.line.delim, len))
    return -EINVAL;
  /* A trailing '\r' would be taken for the CR of a CRLF by the peer's
   * decoder and lost. */
  if (len && c->u.line.strip_cr && ((const char *)data)[len - 1] == '\r')
    return -EINVAL;
  uint8_t *p = loom_buf_reserve(out, len + 1);
  if (!p)
    return -ENOMEM;
  if (len)
    memcpy(p, data, len);
  p[len] = (uint8_t)c->u.line.delim;
  loom_buf_commit(out, len + 1);
  return 0;
}

int loom_codec_line(loom_codec *c, char delim, bool strip_cr) {
  memset(c, 0, sizeof *c);
  c->name = "line";
  c->decode = line_decode;
  c->encode = line_encode;
  c->u.line.delim = delim;
  c->u.line.strip_cr = strip_cr;
  return 0;
}

/* ---- raw ---------------------------------------------------------------- */

static ssize_t raw_decode(const loom_codec *c, const uint8_t *buf, size_t len,
                          size_t max_len, loom_pkg *pkg) {
  (void)c;
  if (len == 0)
    return 0;
  if (max_len == 0)
    return -EMSGSIZE;
  size_t n = len < max_len ? len : max_len;
  if (n > SSIZE_MAX)
    n = SSIZE_MAX;
  pkg->data = buf;
  pkg->len = n;
  return (ssize_t)n;
}

static int raw_encode(const loom_codec *c, const void *data, size_t len,
                      size_t max_len, loom_buf *out) {
  (void)c;
  if (len > max_len)
    return -EMSGSIZE;
  return loom_buf_append(out, data, len);
}

int loom_codec_raw(loom_codec *c) {
  memset(c, 0, sizeof *c);
  c->name = "raw";
  c->decode = raw_decode;
  c->encode = raw_encode;
  return 0;
}
