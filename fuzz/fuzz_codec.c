/*
 * fuzz_codec.c — fuzz target for the ready-made codecs (src/engine/codec.c)
 * and the byte queue they encode into (src/engine/buf.c).
 *
 * Input: a 4-byte header, then the stream.
 *   byte 0: bits 0-1 the codec (0 lenpfx, 1 line, 2 raw, 3 lenpfx),
 *           bits 2-3 the field width (1, 2, 4, 8), bit 4 little-endian,
 *           bit 5 strip_cr, bit 6 a huge adjust (byte 1 * 2^55);
 *   byte 1: lenpfx: adjust (signed); line: the delimiter;
 *   byte 2: max_len (0..199 itself, 200..254 in thousands, 255 SIZE_MAX);
 *   byte 3: the loom_buf chunk size and the seed of its chunking.
 * Properties checked beyond "no crash, no sanitizer report":
 *   - loom_codec_lenpfx refuses exactly the |adjust| >= 2^62 options;
 *   - decode agrees with a reference decoder written independently (128-bit
 *     arithmetic for the length field, a plain scan for lines): return
 *     value, package position and length;
 *   - a package lies inside the bytes its decode spans, is at most
 *     max_len long, and a failed decode leaves the package untouched;
 *   - decoding just the bytes a package spans gives it again, and every
 *     proper prefix of a frame or a line needs more bytes;
 *   - lenpfx encode of a length taken from the input (the first 8 bytes,
 *     and two values derived from them, most beyond any real buffer)
 *     returns what a reference computes in 128-bit arithmetic, and one
 *     it refuses appends nothing and reads no byte of the data;
 *   - encoding each package gives back the bytes it was decoded from (a
 *     line decoded from "\r\n" with strip_cr re-encodes with "\n" alone),
 *     and decoding the concatenated encodings gives the packages again;
 *   - the input pushed through a loom_buf in odd-sized appends, reserves
 *     and moves, and drained by odd-sized consumes, comes out unchanged.
 *
 * Built twice: with libFuzzer (clang) for fuzzing, and with replay.c's
 * main, which ctest runs over fuzz/corpus/codec in every build.
 */
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loom/buf.h"
#include "loom/codec.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FAIL(...)                                                              \
  do {                                                                         \
    fprintf(stderr, "fuzz_codec: " __VA_ARGS__);                               \
    fputc('\n', stderr);                                                       \
    abort();                                                                   \
  } while (0)

enum { KIND_LENPFX, KIND_LINE, KIND_RAW };

struct setup {
  int kind;
  unsigned width;
  bool little;
  int64_t adjust;
  char delim;
  bool strip_cr;
  size_t max_len;
};

/* ---- reference decoders -------------------------------------------------- */

static ssize_t ref_lenpfx(const struct setup *s, const uint8_t *b, size_t len,
                          size_t *pkg_off, size_t *pkg_len) {
  unsigned w = s->width;
  if (len < w)
    return 0;
  unsigned __int128 field = 0;
  for (unsigned i = 0; i < w; i++)
    field |= (unsigned __int128)b[i] << (8 * (s->little ? i : w - 1 - i));
  __int128 payload = (__int128)field + s->adjust;
  if (payload < 0)
    return -EBADMSG;
  if (payload > (__int128)s->max_len || payload > (__int128)SSIZE_MAX - w)
    return -EMSGSIZE;
  if ((__int128)(len - w) < payload)
    return 0;
  *pkg_off = w;
  *pkg_len = (size_t)payload;
  return (ssize_t)(w + (size_t)payload);
}

static ssize_t ref_line(const struct setup *s, const uint8_t *b, size_t len,
                        size_t *pkg_off, size_t *pkg_len) {
  size_t d = 0;
  while (d < len && b[d] != (uint8_t)s->delim)
    d++;
  if (d == len) { /* no delimiter: too long once max_len (+ '\r') + 1 */
    unsigned __int128 limit =
        (unsigned __int128)s->max_len + 1 + (s->strip_cr ? 1 : 0);
    return (unsigned __int128)len >= limit ? -EMSGSIZE : 0;
  }
  size_t n = d;
  if (s->strip_cr && n > 0 && b[n - 1] == '\r')
    n--;
  if (n > s->max_len)
    return -EMSGSIZE;
  *pkg_off = 0;
  *pkg_len = n;
  return (ssize_t)(d + 1);
}

static ssize_t ref_raw(const struct setup *s, const uint8_t *b, size_t len,
                       size_t *pkg_off, size_t *pkg_len) {
  (void)b;
  if (len == 0)
    return 0;
  if (s->max_len == 0)
    return -EMSGSIZE;
  *pkg_off = 0;
  *pkg_len = len < s->max_len ? len : s->max_len;
  return (ssize_t)*pkg_len;
}

static ssize_t ref_decode(const struct setup *s, const uint8_t *b, size_t len,
                          size_t *pkg_off, size_t *pkg_len) {
  switch (s->kind) {
  case KIND_LENPFX:
    return ref_lenpfx(s, b, len, pkg_off, pkg_len);
  case KIND_LINE:
    return ref_line(s, b, len, pkg_off, pkg_len);
  default:
    return ref_raw(s, b, len, pkg_off, pkg_len);
  }
}

/* What lenpfx encode must return for a package of n bytes: 0, or the
 * error, in the order the codec checks them. */
static int ref_lenpfx_encode(const struct setup *s, uint64_t n) {
  unsigned __int128 frame = (unsigned __int128)n + s->width;
  if (n > s->max_len || frame > (unsigned __int128)SSIZE_MAX)
    return -EMSGSIZE;
  __int128 field = (__int128)n - s->adjust;
  if (field < 0)
    return -EINVAL;
  if ((unsigned __int128)field >> (8 * s->width))
    return -EMSGSIZE;
  return 0;
}

/* Encode n bytes of `in` (len of them there): refused exactly as the
 * reference says, without a byte appended; n beyond len is only tried
 * where it must be refused, and then no byte of `in` may be read. */
static void lenpfx_encode_probe(const loom_codec *c, const struct setup *s,
                                const uint8_t *in, size_t len, uint64_t n) {
  int want = ref_lenpfx_encode(s, n);
  if (want == 0 && n > len)
    return;
  loom_buf b;
  loom_buf_init(&b, 64);
  int r = c->encode(c, in, (size_t)n, s->max_len, &b);
  if (r != want)
    FAIL("lenpfx encode of %llu: %d, reference %d", (unsigned long long)n, r,
         want);
  if (r != 0 && loom_buf_len(&b) != 0)
    FAIL("lenpfx encode of %llu: refused, but appended", (unsigned long long)n);
  if (r == 0 && loom_buf_len(&b) != s->width + n)
    FAIL("lenpfx encode of %llu: %zu bytes", (unsigned long long)n,
         loom_buf_len(&b));
  loom_buf_reset(&b);
}

/* ---- decode with the invariants ------------------------------------------ */

static const uint8_t sentinel_byte = 0;

/* c->decode on b[0..len), checked against the reference and the contract;
 * returns what decode returned. */
static ssize_t decode_checked(const loom_codec *c, const struct setup *s,
                              const uint8_t *b, size_t len, loom_pkg *pkg) {
  loom_pkg p = {&sentinel_byte, 12345, NULL, 0};
  ssize_t r = c->decode(c, b, len, s->max_len, &p);
  size_t want_off = 0, want_len = 0;
  ssize_t want = ref_decode(s, b, len, &want_off, &want_len);
  if (r != want)
    FAIL("%s decode of %zu bytes: %zd, reference %zd", c->name, len, r, want);
  if (r <= 0) {
    if (r != 0 && r != -EMSGSIZE && r != -EBADMSG)
      FAIL("%s decode: error %zd", c->name, r);
    if (r == -EBADMSG && s->kind != KIND_LENPFX)
      FAIL("%s decode: -EBADMSG", c->name);
    if (p.data != &sentinel_byte || p.len != 12345)
      FAIL("%s decode: package written on %zd", c->name, r);
    return r;
  }
  if ((size_t)r > len)
    FAIL("%s decode: consumed %zd of %zu", c->name, r, len);
  if (p.data != b + want_off || p.len != want_len)
    FAIL("%s decode: package at +%td len %zu, reference +%zu len %zu", c->name,
         p.data - b, p.len, want_off, want_len);
  if (p.data < b || p.len > (size_t)r - (size_t)(p.data - b))
    FAIL("%s decode: package outside its %zd bytes", c->name, r);
  if (p.len > s->max_len)
    FAIL("%s decode: package of %zu > max_len %zu", c->name, p.len, s->max_len);
  *pkg = p;
  return r;
}

/* ---- the input through a loom_buf ---------------------------------------- */

static uint32_t next_rand(uint32_t *x) {
  *x ^= *x << 13;
  *x ^= *x >> 17;
  *x ^= *x << 5;
  return *x;
}

/* Bytes [lo, hi) of `in` must be what `b` holds. */
static void buf_matches(const loom_buf *b, const uint8_t *in, size_t lo,
                        size_t hi, uint8_t *scratch) {
  if (loom_buf_len(b) != hi - lo)
    FAIL("buf: length %zu, want %zu", loom_buf_len(b), hi - lo);
  loom_buf_copyout(b, scratch, hi - lo);
  if (memcmp(scratch, in + lo, hi - lo) != 0)
    FAIL("buf: copyout differs");
  struct iovec iov[64];
  int n = loom_buf_peek(b, iov, 64);
  size_t off = lo;
  for (int i = 0; i < n; i++) {
    if (iov[i].iov_len == 0 || off + iov[i].iov_len > hi ||
        memcmp(iov[i].iov_base, in + off, iov[i].iov_len) != 0)
      FAIL("buf: peek differs");
    off += iov[i].iov_len;
  }
  if (n < 64 && off != hi)
    FAIL("buf: peek short");
}

static void buf_exercise(const uint8_t *in, size_t len, uint8_t seed) {
  uint8_t *scratch = malloc(len + 1);
  if (scratch == NULL)
    return;
  _Alignas(8) uint8_t mem[160];
  loom_buf b, side;
  uint32_t x = (0x9e3779b9u ^ seed ^ ((uint32_t)len << 8)) | 1; /* not 0 */
  if (seed & 1)
    loom_buf_init_on(&b, mem, 64 + (seed & 0x60));
  else
    loom_buf_init(&b, 64 + (size_t)(seed >> 1));
  loom_buf_init(&side, 64 + (size_t)(seed >> 3));
  size_t lo = 0, hi = 0;
  while (lo < len) {
    uint32_t r = next_rand(&x);
    size_t n = r >> 8 & 0xff;
    if (n > len - hi)
      n = len - hi;
    switch (r % 6) {
    case 0:
    case 1:
      if (loom_buf_append(&b, in + hi, n) != 0)
        FAIL("buf: append failed");
      hi += n;
      break;
    case 2: { /* reserve, fill part of it, commit that part */
      uint8_t *p = loom_buf_reserve(&b, n + (r >> 16 & 7));
      if (p == NULL)
        FAIL("buf: reserve failed");
      memcpy(p, in + hi, n);
      loom_buf_commit(&b, n);
      hi += n;
      break;
    }
    case 3: /* by way of another buffer, or all of it there and back */
      if (loom_buf_append(&side, in + hi, n) != 0 ||
          loom_buf_move(&b, &side) != 0 || loom_buf_len(&side) != 0)
        FAIL("buf: move failed");
      hi += n;
      if ((r & 0x200) &&
          (loom_buf_move(&side, &b) != 0 || loom_buf_len(&b) != 0 ||
           loom_buf_move(&b, &side) != 0))
        FAIL("buf: move back failed");
      break;
    default: { /* consume, sometimes all of it */
      size_t have = hi - lo;
      size_t k = (r & 0x100) ? have : (r >> 9) % (have + 1);
      if (hi == len && k == 0)
        k = have; /* all appended: make progress */
      loom_buf_consume(&b, k);
      lo += k;
      break;
    }
    }
    buf_matches(&b, in, lo, hi, scratch);
  }
  loom_buf_reset(&b);
  loom_buf_reset(&side);
  free(scratch);
}

/* ---- the target ---------------------------------------------------------- */

#define MAX_PKGS 512

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 4)
    return 0;
  static const unsigned widths[] = {1, 2, 4, 8};
  struct setup s;
  memset(&s, 0, sizeof s);
  s.kind = (data[0] & 3) == 3 ? KIND_LENPFX : data[0] & 3;
  s.width = widths[data[0] >> 2 & 3];
  s.little = data[0] >> 4 & 1;
  s.strip_cr = data[0] >> 5 & 1;
  s.adjust = (int8_t)data[1];
  if (data[0] & 0x40)
    s.adjust *= INT64_C(1) << 55; /* -128 * 2^55 = -2^62: refused */
  s.delim = (char)data[1];
  s.max_len = data[2] < 200    ? data[2]
              : data[2] == 255 ? SIZE_MAX
                               : (size_t)(data[2] - 199) * 1000;
  const uint8_t *in = data + 4;
  size_t len = size - 4;

  buf_exercise(in, len, data[3]);

  loom_codec c;
  switch (s.kind) {
  case KIND_LENPFX: {
    loom_lenpfx_opts o = {s.width, s.little, s.adjust};
    int r = loom_codec_lenpfx(&c, &o);
    int64_t lim = INT64_C(1) << 62;
    if (s.adjust >= lim || s.adjust <= -lim) {
      if (r != -EINVAL)
        FAIL("lenpfx: adjust %lld accepted", (long long)s.adjust);
      return 0;
    }
    if (r != 0)
      FAIL("lenpfx: options refused: %d", r);
    break;
  }
  case KIND_LINE:
    loom_codec_line(&c, s.delim, s.strip_cr);
    break;
  default:
    loom_codec_raw(&c);
    break;
  }

  if (s.kind == KIND_LENPFX && len >= 8) {
    uint64_t n = 0;
    for (int i = 0; i < 8; i++)
      n = n << 8 | in[i];
    lenpfx_encode_probe(&c, &s, in, len, n);
    lenpfx_encode_probe(&c, &s, in, len, n >> (8 * (8 - s.width)));
    lenpfx_encode_probe(&c, &s, in, len, UINT64_MAX - (n & 0xffff));
  }

  /* Decode the stream; after an error, skip a byte and go on. */
  loom_buf enc;
  loom_buf_init(&enc, 64 + (size_t)data[3]);
  size_t pkg_off[MAX_PKGS], pkg_len[MAX_PKGS];
  int npkg = 0;
  size_t off = 0;
  while (off < len && npkg < MAX_PKGS) {
    loom_pkg pkg;
    ssize_t r = decode_checked(&c, &s, in + off, len - off, &pkg);
    if (r == 0)
      break;
    if (r < 0) {
      off++;
      continue;
    }
    size_t n = (size_t)r;
    /* The bytes it spans decode alone to it; shorter ones need more
     * (raw has no frame: any prefix is a package of its own). */
    loom_pkg again;
    if (decode_checked(&c, &s, in + off, n, &again) != r ||
        again.data != pkg.data || again.len != pkg.len)
      FAIL("%s: the package's own bytes decode differently", c.name);
    if (s.kind != KIND_RAW) {
      size_t cuts[3] = {0, n / 2, n - 1};
      for (int i = 0; i < 3; i++)
        if (decode_checked(&c, &s, in + off, cuts[i], &again) != 0)
          FAIL("%s: a %zu-byte prefix of %zu decodes", c.name, cuts[i], n);
    }

    /* Re-encode it: the bytes it came from, give or take a '\r'. */
    size_t before = loom_buf_len(&enc);
    int er = c.encode(&c, pkg.data, pkg.len, s.max_len, &enc);
    if (s.kind == KIND_LINE && s.strip_cr && pkg.len > 0 &&
        pkg.data[pkg.len - 1] == '\r') {
      /* "x\r\r\n" decodes to "x\r", which cannot be encoded: the
       * peer would take its '\r' for half of a CRLF. */
      if (er != -EINVAL)
        FAIL("%s: encoding a line ending in CR: %d", c.name, er);
      off += n;
      continue;
    }
    if (er != 0)
      FAIL("%s: encoding a decoded package of %zu: %d", c.name, pkg.len, er);
    size_t elen = loom_buf_len(&enc) - before;
    bool crlf = s.kind == KIND_LINE && n == pkg.len + 2;
    if (elen != n - (crlf ? 1 : 0))
      FAIL("%s: encoding of %zu bytes from %zu", c.name, elen, n);
    uint8_t *e = malloc(before + elen + 1);
    if (e == NULL)
      break;
    loom_buf_copyout(&enc, e, before + elen);
    if (!crlf && memcmp(e + before, in + off, n) != 0)
      FAIL("%s: encoding differs from the input", c.name);
    free(e);
    pkg_off[npkg] = (size_t)(pkg.data - in);
    pkg_len[npkg] = pkg.len;
    npkg++;
    off += n;
  }

  /* The concatenated encodings decode to the same packages. */
  size_t total = loom_buf_len(&enc);
  uint8_t *e = malloc(total + 1);
  if (e != NULL) {
    loom_buf_copyout(&enc, e, total);
    size_t at = 0;
    for (int i = 0; i < npkg; i++) {
      loom_pkg pkg;
      ssize_t r = decode_checked(&c, &s, e + at, total - at, &pkg);
      if (r <= 0)
        FAIL("%s: encoding %d does not decode: %zd", c.name, i, r);
      size_t want = pkg_len[i];
      if (pkg.len != want || memcmp(pkg.data, in + pkg_off[i], want) != 0)
        FAIL("%s: package %d comes back different", c.name, i);
      at += (size_t)r;
    }
    if (at != total)
      FAIL("%s: %zu bytes left after the encodings", c.name, total - at);
    free(e);
  }
  loom_buf_reset(&enc);
  return 0;
}
