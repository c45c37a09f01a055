/*
 * loom/codec.h — codecs: where a byte stream becomes packages.
 *
 * A codec (getty's ReadWriter) is two pure functions.  `decode` looks at
 * the bytes received so far and finds the first package in them; `encode`
 * appends one package's bytes to a loom_buf.  Codecs do no I/O, never
 * park and keep no per-connection state, so one codec value serves every
 * session of a server, from any thread, and each can be tested and
 * fuzzed on bytes alone.
 *
 * A package is a view of bytes (loom_pkg): for the ready-made codecs it
 * points into the caller's input buffer, so decoding copies nothing.  A
 * user codec whose packages are richer than bytes embeds loom_codec in
 * its own struct and parses the view in on_message.
 *
 * Ready-made codecs:
 *   - length-prefixed frames: a 1, 2, 4 or 8 byte length field, big- or
 *     little-endian, then the payload; `adjust` is added to the field to
 *     get the payload length (e.g. -4 when a 4-byte field counts itself);
 *   - lines: bytes up to a delimiter ("\n" by default; a '\r' before it is
 *     dropped when strip_cr is set);
 *   - raw: whatever bytes arrived, up to the maximum package length.
 */
#ifndef LOOM_CODEC_H
#define LOOM_CODEC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>

#include "loom/buf.h"
#include "loom/common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One decoded package.  `data` is valid until the callback it is handed
 * to returns (copy it to keep it).  `from` is the sender of a datagram
 * on an unconnected packet session, else NULL. */
typedef struct loom_pkg {
  const uint8_t *data;
  size_t len;
  const struct sockaddr *from;
  socklen_t fromlen;
} loom_pkg;

typedef struct loom_codec loom_codec;

struct loom_codec {
  const char *name;
  /*
   * decode — find the first package in buf[0..len).
   * Returns the number of bytes it spans (> 0; header included) and sets
   * pkg->data / pkg->len; 0 when more bytes are needed; -EMSGSIZE when
   * the package would be longer than `max_len` (decided as early as the
   * header allows, without waiting for the payload); -EBADMSG when the
   * bytes cannot start a package.
   */
  ssize_t (*decode)(const loom_codec *c, const uint8_t *buf, size_t len,
                    size_t max_len, loom_pkg *pkg);
  /*
   * encode — append the encoding of the package data[0..len) to `out`.
   * Returns 0; -EMSGSIZE (len > max_len, or more than the length field
   * can say), -EINVAL (the package cannot be encoded, e.g. a line that
   * holds the delimiter) or -ENOMEM, each with nothing appended.
   */
  int (*encode)(const loom_codec *c, const void *data, size_t len,
                size_t max_len, loom_buf *out);
  /* Parameters of the ready-made codecs (private). */
  union {
    struct {
      uint8_t width;
      bool little_endian;
      int64_t adjust;
    } lenpfx;
    struct {
      char delim;
      bool strip_cr;
    } line;
  } u;
};

typedef struct loom_lenpfx_opts {
  unsigned width;     /* bytes in the length field: 1, 2, 4 or 8 (0: 4) */
  bool little_endian; /* default: big-endian (network order) */
  int64_t adjust;     /* payload length = field + adjust; a package
                         shorter than a positive adjust cannot be encoded
                         (-EINVAL) */
} loom_lenpfx_opts;

/*
 * loom_codec_lenpfx — a length-prefixed codec.  `o` NULL: 4-byte
 * big-endian length of the payload alone.  Decoding a field whose
 * payload length (field + adjust) is negative is -EBADMSG.  A frame
 * longer than SSIZE_MAX bytes (header included) is -EMSGSIZE both ways:
 * no decode could return it, so encode refuses such a length before it
 * reserves or reads anything.
 * Returns 0, or -EINVAL (bad width, or |adjust| of 2^62 or more) with *c
 * untouched.
 */
LOOM_API int loom_codec_lenpfx(loom_codec *c, const loom_lenpfx_opts *o);

/* loom_codec_line — a line codec with delimiter `delim` (usually '\n');
 * strip_cr drops one '\r' before the delimiter when decoding.  Encoding
 * appends the delimiter; it refuses (-EINVAL) a line holding the
 * delimiter, or, with strip_cr, ending in '\r'.  Always 0. */
LOOM_API int loom_codec_line(loom_codec *c, char delim, bool strip_cr);

/* loom_codec_raw — every read is a package (split at max_len); encoding
 * appends the bytes unchanged.  Always 0. */
LOOM_API int loom_codec_raw(loom_codec *c);

#ifdef __cplusplus
}
#endif
#endif /* LOOM_CODEC_H */
