/*
 * fuzz_inflate.c — fuzz target for the inflate side of the zlib layer
 * (src/engine/compress.c): a peer's compressed bytes, whatever they are,
 * read the way a compressing session's reader reads them.
 *
 * Input: a 4-byte header, then the peer's stream.
 *   byte 0: bits 0-3 max_pkg_len, 16 << n bytes (16 B .. 512 KiB);
 *           bits 4-5 read_buf, 64 << 2n (64, 256, 1024, 4096);
 *           bit 6 the raw codec (else 4-byte big-endian length prefix);
 *           bit 7 sips: reads now and then offer less than the room;
 *   byte 1: the seed of the cuts: how the bytes arrive from the socket
 *           (1 to 20 000 at a time) and where the read deadline passes
 *           (-ETIMEDOUT, after which the session reads on);
 *   byte 2: the seed of the sips;
 *   byte 3: 0xf0 | i: the layer's allocation i (from 0) through loom's
 *           hook fails; 0xe0 | i: the reader's allocation or growth i
 *           fails; anything else: none does.
 * The layer sits over a scripted layer that hands out the stream (as
 * tests/test_compress.c does, through engine/export_test.h), and a
 * model of session.c's read_stream loop calls it, with the session's
 * own read buffer (engine/readbuf.h): reads into 512 bytes on the
 * stack, then into a heap buffer of read_buf that doubles while reads
 * fill it (to 64 KiB) and grows for a long package up to max_pkg_len +
 * 64, decoding packages with the session's codec after each read.
 *
 * Properties checked beyond "no crash, no sanitizer report":
 *   - a read returns at most the bytes asked for, and -ETIMEDOUT exactly
 *     when the layer below did;
 *   - what comes out is what zlib makes of the whole stream inflated in
 *     one call (the reference): every byte, in order, never a byte the
 *     stream does not hold — also not on the way to an error;
 *   - the end: 0 (a clean end) only if the reference took the whole
 *     stream without error and stopped between two blocks, and then
 *     after every byte it made; LOOM_ECOMPRESS only if zlib refused the
 *     stream (corrupt, finished, a preset dictionary) or the stream was
 *     cut inside a block, and only after every byte zlib made of the
 *     stream before it broke, however it was cut; -ENOMEM only after
 *     an injected failure (a failed allocation is never reported as a
 *     corrupt stream, nor lost by the reader);
 *   - a package is at most max_pkg_len, and the reader's buffer never
 *     grows past max_pkg_len + 64: a bomb is an oversized package, not
 *     memory;
 *   - what the layer holds through loom's allocator stays under
 *     LAYER_MAX whatever the stream (zlib's state and window, the 16 KiB
 *     input buffer, the layer), and all of it is freed with the layer;
 *     the reader's buffer is all freed with it too.
 * The reference sees at most REF_CAP bytes of output; past them nothing
 * is compared and the run stops.
 *
 * One thing zlib decides by how its output is cut: a match that reaches
 * further back than the window the stream's header declares is refused
 * ("invalid distance too far back") only if those bytes are neither in
 * the window nor written by the same inflate call.  The reference, one
 * call into one buffer, has all of them at hand and takes such a match;
 * the layer, in reads, may not.  A stream that does this is corrupt, and
 * the layer must say so somewhere between where inflating one byte per
 * call refuses it (the strictest cut: strict_len) and where the
 * reference does: there, and only for such a stream, LOOM_ECOMPRESS
 * after fewer bytes than the reference made, or of a stream it takes
 * whole, is right.
 *
 * Built twice: with libFuzzer (clang) for fuzzing, and with replay.c's
 * main, which ctest runs over fuzz/corpus/inflate in every build.  The
 * seeds come from fuzz/inflate_seeds.py.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "engine/export_test.h"
#include "loom/alloc.h"
#include "loom/codec.h"
#include "loom/error.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FAIL(...)                                                              \
  do {                                                                         \
    fprintf(stderr, "fuzz_inflate: " __VA_ARGS__);                             \
    fputc('\n', stderr);                                                       \
    abort();                                                                   \
  } while (0)

#define REF_CAP ((size_t)1 << 20)
#define LAYER_MAX ((size_t)64 << 10)
#define AT_CAP 1 /* the reader's end: REF_CAP bytes compared */

static uint32_t next_rand(uint32_t *x) {
  *x ^= *x << 13;
  *x ^= *x >> 17;
  *x ^= *x << 5;
  return *x;
}

/* ---- loom's allocator: sizes, a peak, one failure ------------------------ */

/* Whose allocations: the layer's (zlib's included) or the reader's
 * buffer, counted apart: the layer's bound says nothing of a buffer
 * that holds a long package. */
enum { LAYER, READER };

typedef struct hdr {
  size_t size;
  size_t who; /* also keeps what follows aligned to 16 */
} hdr;

static int who;              /* whose allocations the code running now makes */
static size_t live[2], peak; /* peak: of the layer's */
static long nalloc[2], fail_at[2];
static bool failed;

/* The layer's new allocations count, as they did when only the layer
 * used the hook; the reader's growths count too: the reader's -ENOMEM
 * paths are the ones it has. */
static void *hook_realloc(void *ud, void *p, size_t n) {
  (void)ud;
  hdr *h = p ? (hdr *)p - 1 : NULL;
  int w = h ? (int)h->who : who;
  if ((!h || w == READER) && nalloc[w]++ == fail_at[w]) {
    failed = true;
    return NULL;
  }
  size_t old = h ? h->size : 0;
  hdr *q = realloc(h, sizeof *q + n);
  if (!q)
    return NULL;
  q->size = n;
  q->who = (size_t)w;
  live[w] = live[w] - old + n;
  if (live[LAYER] > peak)
    peak = live[LAYER];
  return q + 1;
}

static void hook_free(void *ud, void *p) {
  (void)ud;
  hdr *h = (hdr *)p - 1;
  live[h->who] -= h->size;
  free(h);
}

/* ---- the reference ------------------------------------------------------- */

typedef struct ref {
  uint8_t *out;
  size_t len;  /* bytes made */
  bool bad;    /* zlib refused the stream, or it finished */
  bool clean;  /* all of it taken, stopping between two blocks */
  bool capped; /* REF_CAP bytes came out: nothing is known past them */
} ref;

/* The whole stream in one buffer into one buffer, with the layer's
 * reading of "between two blocks": data_type bit 7 after the last call
 * that took or gave a byte (zlib's own allocator, not loom's). */
static void ref_inflate(const uint8_t *in, size_t n, ref *r) {
  r->len = 0;
  r->bad = r->capped = false;
  r->clean = n == 0;
  if (n == 0)
    return;
  z_stream z;
  memset(&z, 0, sizeof z);
  if (inflateInit2(&z, 0) != Z_OK)
    FAIL("reference: inflateInit2");
  z.next_in = (Bytef *)(uintptr_t)in;
  z.avail_in = (uInt)n;
  z.next_out = r->out;
  z.avail_out = (uInt)REF_CAP;
  bool boundary = false;
  for (;;) {
    uInt in0 = z.avail_in, out0 = z.avail_out;
    int rc = inflate(&z, Z_BLOCK);
    if (rc != Z_OK && rc != Z_BUF_ERROR) {
      r->bad = true;
      break;
    }
    if (z.avail_in != in0 || z.avail_out != out0)
      boundary = (z.data_type & 128) != 0;
    if (z.avail_out == 0) {
      r->capped = true;
      break;
    }
    if (z.avail_in == 0 || rc == Z_BUF_ERROR)
      break;
  }
  r->len = REF_CAP - z.avail_out;
  r->clean = !r->bad && !r->capped && z.avail_in == 0 && boundary;
  inflateEnd(&z);
}

/* How many bytes zlib makes before it refuses the stream when every call
 * may write one byte (the window holds all the history there is), or
 * SIZE_MAX if it does not refuse it within REF_CAP bytes.  Slow (a call
 * a byte): only for a run the reference disagrees with. */
static size_t strict_len(const uint8_t *in, size_t n) {
  z_stream z;
  memset(&z, 0, sizeof z);
  if (inflateInit2(&z, 0) != Z_OK)
    FAIL("strict reference: inflateInit2");
  static uint8_t out[REF_CAP];
  z.next_in = (Bytef *)(uintptr_t)in;
  z.avail_in = (uInt)n;
  size_t made = 0, len = SIZE_MAX;
  while (made < REF_CAP) {
    z.next_out = out + made;
    z.avail_out = 1;
    int rc = inflate(&z, Z_NO_FLUSH);
    made += 1 - z.avail_out;
    if (rc != Z_OK && rc != Z_BUF_ERROR) {
      if (rc == Z_DATA_ERROR)
        len = made;
      break;
    }
    if (rc == Z_BUF_ERROR && z.avail_out == 1)
      break; /* input gone */
  }
  inflateEnd(&z);
  return len;
}

/* ---- the socket: the stream in cuts, with deadlines ---------------------- */

typedef struct script {
  loom__layer l;
  const uint8_t *p;
  size_t len, off;
  size_t seg;    /* bytes left in this cut */
  uint32_t x;    /* the cuts' generator */
  long timeouts; /* -ETIMEDOUT handed out */
} script;

static ssize_t script_read(loom__layer *l, void *buf, size_t len) {
  script *s = (script *)l;
  if (s->off == s->len)
    return 0;
  if (s->seg == 0) {
    uint32_t r = next_rand(&s->x);
    if (r % 16 == 0) {
      s->timeouts++;
      return -ETIMEDOUT;
    }
    static const uint32_t most[] = {8, 700, 20000};
    s->seg = 1 + (r >> 12) % most[(r >> 8) % 3];
  }
  size_t n = s->len - s->off;
  if (n > s->seg)
    n = s->seg;
  if (n > len)
    n = len;
  memcpy(buf, s->p + s->off, n);
  s->off += n;
  s->seg -= n;
  return (ssize_t)n;
}

static ssize_t script_writev(loom__layer *l, const struct iovec *iov, int n) {
  (void)l, (void)iov, (void)n;
  FAIL("the reader wrote");
}

static const loom__layer_ops script_ops = {"script", script_read, script_writev,
                                           NULL};

/* ---- the session's reader (session.c, read_stream) ----------------------- */

typedef struct reader {
  loom__readbuf b; /* the session's, as the session uses it */
  loom_codec codec;
} reader;

/* Every whole package in the buffer: 0, or the codec's error. */
static int drain(reader *r) {
  loom__readbuf *b = &r->b;
  while (b->len > b->off) {
    loom_pkg pkg = {0};
    ssize_t k = r->codec.decode(&r->codec, b->buf + b->off, b->len - b->off,
                                b->max_pkg_len, &pkg);
    if (k <= 0)
      return (int)k;
    if (pkg.len > b->max_pkg_len)
      FAIL("a package of %zu > max_pkg_len %zu", pkg.len, b->max_pkg_len);
    b->off += (size_t)k;
  }
  return 0;
}

/* ---- the target ---------------------------------------------------------- */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static uint8_t refout[REF_CAP];
  if (size < 4)
    return 0;
  const uint8_t *in = data + 4;
  size_t len = size - 4;

  reader r;
  memset(&r, 0, sizeof r);
  loom__readbuf *b = &r.b;
  loom__readbuf_init(b, (size_t)64 << 2 * (data[0] >> 4 & 3),
                     (size_t)16 << (data[0] & 15));
  if (data[0] & 0x40)
    loom_codec_raw(&r.codec);
  else if (loom_codec_lenpfx(&r.codec, NULL) != 0)
    FAIL("lenpfx");
  bool sips = data[0] & 0x80;
  uint32_t sip = (0x9e3779b9u ^ data[2]) | 1;

  ref want = {refout, 0, false, false, false};
  ref_inflate(in, len, &want);

  script s;
  memset(&s, 0, sizeof s);
  s.l.ops = &script_ops;
  s.p = in;
  s.len = len;
  s.x = (0x85ebca6bu ^ data[1] ^ ((uint32_t)len << 8)) | 1;

  static const loom_allocator hook = {hook_realloc, hook_free, NULL};
  loom_set_allocator(&hook);
  who = LAYER;
  live[LAYER] = live[READER] = peak = 0;
  nalloc[LAYER] = nalloc[READER] = 0;
  fail_at[LAYER] = (data[3] & 0xf0) == 0xf0 ? data[3] & 0x0f : -1;
  fail_at[READER] = (data[3] & 0xf0) == 0xe0 ? data[3] & 0x0f : -1;
  failed = false;

  loom__layer *z = NULL;
  int rc = loom__zlib_layer_new(&z, &s.l, 6, 15, 8);
  if (rc < 0) {
    if (rc != -ENOMEM || !failed)
      FAIL("layer: %d", rc);
    loom_set_allocator(NULL);
    return 0;
  }

  _Alignas(16) uint8_t stack_buf[LOOM__STACK_READ];
  size_t got = 0; /* bytes the layer gave, checked against want */
  long timeouts = 0;
  int end; /* why the reader stopped */
  who = READER;
  for (;;) {
    if (b->cap == 0)
      loom__readbuf_stack(b, stack_buf);
    else if ((end = loom__readbuf_room(b)) < 0)
      break;
    if (b->cap > loom__readbuf_limit(b->max_pkg_len) &&
        b->cap > LOOM__READ_BURST)
      FAIL("a read buffer of %zu for max_pkg_len %zu", b->cap, b->max_pkg_len);
    size_t room = b->cap - b->len, ask = room;
    if (sips && next_rand(&sip) % 4 == 0)
      ask = 1 + next_rand(&sip) % room;
    who = LAYER;
    ssize_t n = z->ops->read(z, b->buf + b->len, ask);
    who = READER;
    if (n > (ssize_t)ask)
      FAIL("%zd bytes for a read of %zu", n, ask);
    if (n == -ETIMEDOUT)
      timeouts++;
    if (timeouts != s.timeouts)
      FAIL("%ld deadlines below, %ld came up", s.timeouts, timeouts);
    if (n > 0) {
      size_t k = (size_t)n;
      if (!want.capped && k > want.len - got)
        FAIL("%zu bytes out, the stream holds %zu", got + k, want.len);
      size_t cmp = got < want.len ? want.len - got : 0;
      if (memcmp(b->buf + b->len, want.out + got, k < cmp ? k : cmp) != 0)
        FAIL("bytes %zu..%zu differ from zlib's", got, got + k);
      got += k;
      loom__readbuf_took(b, k, room);
      end = drain(&r);
      if (b->on_stack) {
        int e = loom__readbuf_unstack(b, b->filled);
        if (end == 0)
          end = e;
      }
      if (end < 0)
        break;
      if (want.capped && got >= REF_CAP) {
        end = AT_CAP;
        break;
      }
      if (loom__readbuf_quiet(b))
        loom__readbuf_shed(b, loom__readbuf_quiet_to_stack(b));
      continue;
    }
    if (b->on_stack)
      (void)loom__readbuf_unstack(b, false);
    if (n == -ETIMEDOUT) {
      loom__readbuf_shed(b, true); /* a cron tick: a quiet moment */
      continue;
    }
    end = (int)n;
    break;
  }
  loom__readbuf_free(b);
  who = LAYER;
  if (live[READER] != 0)
    FAIL("%zu bytes of the reader's left after its free", live[READER]);

  if (peak > LAYER_MAX)
    FAIL("the layer held %zu bytes", peak);
  switch (end) {
  case 0:
    if (!want.clean || got != want.len)
      FAIL("a clean end after %zu of %zu bytes (zlib: %s)", got, want.len,
           want.bad     ? "refused"
           : want.clean ? "clean"
                        : "cut in a block");
    break;
  case LOOM_ECOMPRESS:
    if ((want.clean || (!want.capped && got != want.len)) &&
        got < strict_len(in, len)) /* not a match beyond the window */
      FAIL("LOOM_ECOMPRESS after %zu of the %zu bytes zlib makes first%s", got,
           want.len, want.clean ? " (of a stream it takes whole)" : "");
    break;
  case -ENOMEM:
    if (!failed)
      FAIL("-ENOMEM, no allocation failed");
    break;
  case -EMSGSIZE: /* a package over max_pkg_len: the session closes */
  case AT_CAP:
    break;
  default:
    FAIL("the reader ends with %d (%s)", end, loom_err_name(end));
  }
  z->ops->free(z);
  if (live[LAYER] != 0)
    FAIL("%zu bytes left after the layer's free", live[LAYER]);
  loom_set_allocator(NULL);
  return 0;
}
