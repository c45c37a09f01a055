/*
 * test_compress.c — the zlib layer (src/engine/compress.c) on its own,
 * over a scripted layer below it (engine/export_test.h): no socket, no
 * timing, so every way the compressed bytes can be cut into reads and
 * every size of the reader's buffer can be tried.
 *
 * The script hands out its bytes in segments — one read returns at most
 * the rest of the current segment, and no more than `piece` — then end
 * of stream; a segment may instead be an error (-ETIMEDOUT: the
 * session's read deadline).  Writes are collected.  Streams come from
 * zlib itself (deflateInit2 with the settings under test, batches ended
 * with Z_SYNC_FLUSH as a loom writer does), or are made by hand where a
 * case needs an exact shape.
 *
 * What must hold: every byte comes back, in order, whatever the cuts;
 * a stream that ends between two blocks ends cleanly (0) and one cut
 * inside a block is LOOM_ECOMPRESS; the layer's writes are read by
 * zlib's own inflateInit whatever window they use, with the window in
 * the header; and the heap input buffer is held only during bursts.
 */
#include <errno.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "check.h"
#include "check_zlib.h"
#include "engine/export_test.h"
#include "loom.h"

/* ------------------------------------------------------------------ */
/* The scripted layer below.                                            */

#define MAX_SEGS 64
#define SEG_TIMEOUT ((size_t)-1) /* a segment that is -ETIMEDOUT */

typedef struct script {
  loom__layer l;
  struct {
    const uint8_t *p;
    size_t len; /* SEG_TIMEOUT: the read fails with -ETIMEDOUT */
  } seg[MAX_SEGS];
  int nseg, at;
  size_t off;   /* into seg[at] */
  size_t piece; /* the most one read returns (0: no limit) */
  int werr;     /* a write takes half of its first piece, then fails with
                   this (0: writes take everything) */
  uint8_t *out; /* what was written */
  size_t outlen, outcap;
} script;

static ssize_t script_read(loom__layer *l, void *buf, size_t len) {
  script *s = (script *)l;
  while (s->at < s->nseg && s->seg[s->at].len != SEG_TIMEOUT &&
         s->off == s->seg[s->at].len) {
    s->at++;
    s->off = 0;
  }
  if (s->at == s->nseg)
    return 0;
  if (s->seg[s->at].len == SEG_TIMEOUT) {
    s->at++;
    s->off = 0;
    return -ETIMEDOUT;
  }
  size_t n = s->seg[s->at].len - s->off;
  if (n > len)
    n = len;
  if (s->piece && n > s->piece)
    n = s->piece;
  memcpy(buf, s->seg[s->at].p + s->off, n);
  s->off += n;
  return (ssize_t)n;
}

static void script_keep(script *s, const void *p, size_t n);

static ssize_t script_writev(loom__layer *l, const struct iovec *iov, int n) {
  script *s = (script *)l;
  if (s->werr != 0) { /* cut part way, as a reset socket's write */
    script_keep(s, iov[0].iov_base, iov[0].iov_len / 2);
    return s->werr;
  }
  size_t total = 0;
  for (int i = 0; i < n; i++) {
    script_keep(s, iov[i].iov_base, iov[i].iov_len);
    total += iov[i].iov_len;
  }
  return (ssize_t)total;
}

static void script_keep(script *s, const void *p, size_t n) {
  if (s->outlen + n > s->outcap) {
    s->outcap = (s->outlen + n) * 2;
    s->out = realloc(s->out, s->outcap);
    CHECK(s->out != NULL);
  }
  memcpy(s->out + s->outlen, p, n);
  s->outlen += n;
}

static void script_free(loom__layer *l) {
  script *s = (script *)l;
  free(s->out);
  s->out = NULL;
}

static const loom__layer_ops script_ops = {"script", script_read, script_writev,
                                           script_free};

static void script_init(script *s, size_t piece) {
  memset(s, 0, sizeof *s);
  s->l.ops = &script_ops;
  s->piece = piece;
}

static void script_add(script *s, const uint8_t *p, size_t len) {
  CHECK_LT(s->nseg, MAX_SEGS);
  s->seg[s->nseg].p = p;
  s->seg[s->nseg].len = len;
  s->nseg++;
}

static loom__layer *zlayer_over(script *s) {
  loom__layer *z = NULL;
  CHECK_OK(loom__zlib_layer_new(&z, &s->l, 6, 15, 8));
  return z;
}

/* Read through `z` into out[0..cap) in reads of at most `room` bytes
 * until a read returns 0 or an error, which is returned; *got is the
 * count.  -ETIMEDOUT is read past (the session goes on after its
 * deadline). */
static int read_all(loom__layer *z, size_t room, uint8_t *out, size_t cap,
                    size_t *got) {
  *got = 0;
  for (;;) {
    size_t want = cap - *got < room ? cap - *got : room;
    CHECKF(want > 0, "more bytes than the %zu expected", cap);
    ssize_t n = z->ops->read(z, out + *got, want);
    if (n == -ETIMEDOUT)
      continue;
    if (n <= 0)
      return (int)n;
    CHECK_LE((size_t)n, want);
    *got += (size_t)n;
  }
}

/* ------------------------------------------------------------------ */
/* Streams.                                                             */

/* Text that compresses (lines that repeat with a counter), then noise
 * that does not, so both literals and long matches are in the stream. */
static void make_data(uint8_t *p, size_t n, uint32_t seed) {
  size_t i = 0;
  for (unsigned k = 0; i < n / 2; k++) {
    char l[64];
    int m = snprintf(l, sizeof l, "record %u of the stream %u\n", k % 97, seed);
    for (int j = 0; j < m && i < n / 2; j++)
      p[i++] = (uint8_t)l[j];
  }
  uint32_t x = seed * 2654435761u + 1;
  for (; i < n; i++) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    p[i] = (uint8_t)x;
  }
}

/* Compress data[0..n) as zlib (window 2^wbits, memLevel mlevel) in
 * batches of the sizes in `batch` (cycled), each ended with
 * Z_SYNC_FLUSH; ends[i] is where batch i ends in the output, and
 * dends[i] in the data.  Returns the compressed length. */
static size_t deflate_batches(const uint8_t *data, size_t n, int wbits,
                              int mlevel, const size_t *batch, int nbatch,
                              uint8_t *out, size_t cap, size_t *ends,
                              size_t *dends, int *nends) {
  z_stream d;
  memset(&d, 0, sizeof d);
  CHECK_EQ(deflateInit2(&d, 6, Z_DEFLATED, wbits, mlevel, Z_DEFAULT_STRATEGY),
           Z_OK);
  d.next_out = out;
  d.avail_out = (uInt)cap;
  size_t at = 0;
  int k = 0;
  while (at < n) {
    size_t b = batch[k % nbatch];
    if (b > n - at)
      b = n - at;
    d.next_in = (Bytef *)(uintptr_t)(data + at);
    d.avail_in = (uInt)b;
    CHECK_EQ(deflate(&d, Z_SYNC_FLUSH), Z_OK);
    CHECK_EQ(d.avail_in, 0);
    CHECK_GT(d.avail_out, 0); /* cap was enough */
    at += b;
    ends[k] = cap - d.avail_out;
    dends[k] = at;
    k++;
  }
  *nends = k;
  deflateEnd(&d);
  return cap - d.avail_out;
}

/* Run `fn` on a loom runtime: the layer counts inflated bytes that did
 * not come from a read of below as I/O, which may yield. */
static void run(void (*fn)(void *)) {
  check_watchdog(25, "zlib layer");
  check_run(fn, NULL, 1);
}

/* ------------------------------------------------------------------ */
/* Reading.                                                             */

enum { DATA = 24000 };
static uint8_t data[DATA], comp[2 * DATA], back[DATA + 1];
static size_t ends[256], dends[256];
static int nends;

/* Every piece size against every reader buffer size, for streams of
 * three settings: all bytes back, then a clean end. */
static void every_cut_main(void *arg) {
  (void)arg;
  static const int settings[][2] = {{15, 8}, {12, 5}, {9, 1}};
  static const size_t batches[] = {700, 64, 5000, 1, 3000, 13000};
  static const size_t pieces[] = {1, 2, 3, 5, 7, 64, 511, 512, 513, 4096, 0};
  static const size_t rooms[] = {1, 2, 7, 64, 511, 512, 513, 4096, 65536};
  make_data(data, DATA, 7);
  for (size_t si = 0; si < sizeof settings / sizeof settings[0]; si++) {
    size_t clen =
        deflate_batches(data, DATA, settings[si][0], settings[si][1], batches,
                        6, comp, sizeof comp, ends, dends, &nends);
    for (size_t pi = 0; pi < sizeof pieces / sizeof pieces[0]; pi++)
      for (size_t ri = 0; ri < sizeof rooms / sizeof rooms[0]; ri++) {
        script s;
        script_init(&s, pieces[pi]);
        script_add(&s, comp, clen);
        loom__layer *z = zlayer_over(&s);
        size_t got;
        int rc = read_all(z, rooms[ri], back, sizeof back, &got);
        CHECKF(rc == 0 && got == DATA && memcmp(back, data, DATA) == 0,
               "window %d memLevel %d, pieces of %zu, reads of %zu: rc %d "
               "(%s), %zu of %d bytes",
               settings[si][0], settings[si][1], pieces[pi], rooms[ri], rc,
               loom_err_name(rc), got, DATA);
        z->ops->free(z);
        script_free(&s.l);
      }
  }
}
TEST(every_piece_and_read_size) { run(every_cut_main); }

/* The stream cut at every byte, then end of stream: a cut at the end of
 * a batch (after its sync flush) is a clean end with every byte of the
 * batches before it; a clean end elsewhere (between two blocks inside a
 * batch) never loses or invents a byte; the rest is LOOM_ECOMPRESS. */
static void cut_main(void *arg) {
  (void)arg;
  static const size_t batches[] = {300, 40, 900, 1, 2000};
  make_data(data, 6000, 11);
  for (int mlevel = 1; mlevel <= 8; mlevel += 7) {
    size_t clen = deflate_batches(data, 6000, 15, mlevel, batches, 5, comp,
                                  sizeof comp, ends, dends, &nends);
    int clean = 0, corrupt = 0;
    for (size_t cut = 0; cut <= clen; cut++) {
      script s;
      script_init(&s, 0);
      script_add(&s, comp, cut);
      loom__layer *z = zlayer_over(&s);
      size_t got;
      int rc = read_all(z, 512, back, sizeof back, &got);
      size_t whole = 0; /* data of the batches the cut keeps whole */
      bool at_end = cut == 0;
      for (int k = 0; k < nends && ends[k] <= cut; k++) {
        whole = dends[k];
        at_end = at_end || ends[k] == cut;
      }
      CHECKF(rc == 0 || rc == LOOM_ECOMPRESS, "cut at %zu: %d (%s)", cut, rc,
             loom_err_name(rc));
      CHECKF(!at_end || rc == 0, "cut at %zu, the end of a batch: %s", cut,
             loom_err_name(rc));
      CHECKF(rc != 0 || got >= whole, "cut at %zu: %zu bytes, %zu whole", cut,
             got, whole);
      CHECK_LE(got, 6000);
      CHECKF(memcmp(back, data, got) == 0, "cut at %zu: wrong bytes", cut);
      if (rc == 0)
        clean++;
      else
        corrupt++;
      z->ops->free(z);
      script_free(&s.l);
    }
    printf("memLevel %d: %zu compressed bytes, %d batches: %d cuts end "
           "cleanly, %d are LOOM_ECOMPRESS\n",
           mlevel, clen, nends, clean, corrupt);
    CHECK_GT(corrupt, 0);
  }
}
TEST(cut_at_every_byte) { run(cut_main); }

/* A stream that ends right after a block that filled the reader's
 * buffer exactly, with no sync flush after it (a stored block made by
 * hand): the next read finds no input, and the end is clean — the
 * layer does not take the empty call zlib makes of it for a cut. */
static void exact_main(void *arg) {
  (void)arg;
  enum { N = 300 };
  uint8_t st[2 + 5 + N];
  st[0] = 0x78; /* CMF: deflate, 32 KiB window */
  st[1] = 0x01; /* FLG: (0x78 << 8 | 0x01) % 31 == 0 */
  st[2] = 0x00; /* BFINAL 0, BTYPE 00 (stored), padding */
  st[3] = N & 0xff;
  st[4] = N >> 8;
  st[5] = (uint8_t)~st[3];
  st[6] = (uint8_t)~st[4];
  make_data(st + 7, N, 3);
  script s;
  script_init(&s, 0);
  script_add(&s, st, sizeof st);
  loom__layer *z = zlayer_over(&s);
  uint8_t out[N];
  CHECK_EQ(z->ops->read(z, out, N), N);
  CHECK(memcmp(out, st + 7, N) == 0);
  ssize_t n = z->ops->read(z, out, N);
  CHECKF(n == 0, "read after the last block: %zd (%s)", n,
         loom_err_name((int)n));
  z->ops->free(z);
}
TEST(stream_ends_after_a_block_that_filled_the_read) { run(exact_main); }

/* What is not a stream that goes on: garbage, and a finished stream
 * (Z_STREAM_END: a loom peer never finishes). */
static void bad_main(void *arg) {
  (void)arg;
  uint8_t junk[64];
  memset(junk, 0xff, sizeof junk);
  make_data(data, 1000, 5);
  z_stream d;
  memset(&d, 0, sizeof d);
  CHECK_EQ(deflateInit(&d, 6), Z_OK);
  d.next_in = data;
  d.avail_in = 1000;
  d.next_out = comp;
  d.avail_out = sizeof comp;
  CHECK_EQ(deflate(&d, Z_FINISH), Z_STREAM_END);
  size_t clen = sizeof comp - d.avail_out;
  deflateEnd(&d);
  const uint8_t *streams[] = {junk, comp};
  size_t lens[] = {sizeof junk, clen};
  for (int i = 0; i < 2; i++) {
    script s;
    script_init(&s, 0);
    script_add(&s, streams[i], lens[i]);
    loom__layer *z = zlayer_over(&s);
    size_t got;
    int rc = read_all(z, 4096, back, sizeof back, &got);
    CHECK_ERR(rc, LOOM_ECOMPRESS);
    z->ops->free(z);
  }
}
TEST(garbage_and_finished_streams_are_ecompress) { run(bad_main); }

/* Good batches, then bytes that end the stream: junk (an invalid block
 * type), or the peer finishing it (Z_FINISH after the batches).  Every
 * byte inflated before the end comes back first, however the stream is
 * cut into reads and whatever the reader's room — as a plain session
 * handles the frames before a bad one — and then LOOM_ECOMPRESS, on
 * that read and on any after it. */
static void bytes_before_main(void *arg) {
  (void)arg;
  static const size_t batches[] = {200, 37, 900};
  static const size_t pieces[] = {0, 1, 3, 64, 511};
  static const size_t rooms[] = {1, 100, 512, 4096};
  enum { N = 1137 };
  make_data(data, N, 23);
  for (int finish = 0; finish < 2; finish++) {
    size_t clen = deflate_batches(data, N, 15, 8, batches, 3, comp, sizeof comp,
                                  ends, dends, &nends);
    size_t want = N;
    if (finish) { /* a last batch, and the end of the stream */
      z_stream d;
      memset(&d, 0, sizeof d);
      CHECK_EQ(deflateInit(&d, 6), Z_OK);
      d.next_in = data;
      d.avail_in = N;
      d.next_out = comp;
      d.avail_out = sizeof comp;
      CHECK_EQ(deflate(&d, Z_SYNC_FLUSH), Z_OK);
      make_data(data + N, 300, 29);
      d.next_in = data + N;
      d.avail_in = 300;
      CHECK_EQ(deflate(&d, Z_FINISH), Z_STREAM_END);
      clen = sizeof comp - d.avail_out;
      deflateEnd(&d);
      want = N + 300;
    } else {
      memset(comp + clen, 0xff, 16); /* BFINAL 1, BTYPE 11: invalid */
      clen += 16;
    }
    for (size_t pi = 0; pi < sizeof pieces / sizeof pieces[0]; pi++)
      for (size_t ri = 0; ri < sizeof rooms / sizeof rooms[0]; ri++) {
        script s;
        script_init(&s, pieces[pi]);
        script_add(&s, comp, clen);
        loom__layer *z = zlayer_over(&s);
        size_t got;
        int rc = read_all(z, rooms[ri], back, sizeof back, &got);
        CHECKF(rc == LOOM_ECOMPRESS && got == want &&
                   memcmp(back, data, want) == 0,
               "%s, pieces of %zu, reads of %zu: rc %d (%s), %zu of %zu "
               "bytes",
               finish ? "finished" : "junk", pieces[pi], rooms[ri], rc,
               loom_err_name(rc), got, want);
        ssize_t again = z->ops->read(z, back, sizeof back);
        CHECKF(again == LOOM_ECOMPRESS, "a read after the error: %zd (%s)",
               again, loom_err_name((int)again));
        z->ops->free(z);
      }
  }
}
TEST(bytes_before_a_broken_block_come_first) { run(bytes_before_main); }

/* ------------------------------------------------------------------ */
/* The input buffer: on the heap only during bursts.                    */

/* Blocks of exactly ZIN_BUF (compress.c's heap input buffer) live
 * through loom's allocator: no zlib allocation has that size with a
 * 32 KiB window on both ends. */
enum { ZIN_BUF = 16384 };
static atomic_long live_inbufs;

typedef struct hdr {
  size_t size;
  size_t pad;
} hdr;

static void *count_realloc(void *ud, void *p, size_t n) {
  (void)ud;
  hdr *h = p ? (hdr *)p - 1 : NULL;
  size_t old = h ? h->size : 0;
  hdr *q = realloc(h, sizeof *q + n);
  if (!q)
    return NULL;
  q->size = n;
  atomic_fetch_sub(&live_inbufs, old == ZIN_BUF);
  atomic_fetch_add(&live_inbufs, n == ZIN_BUF);
  return q + 1;
}

static void count_free(void *ud, void *p) {
  (void)ud;
  hdr *h = (hdr *)p - 1;
  atomic_fetch_sub(&live_inbufs, h->size == ZIN_BUF);
  free(h);
}

/* Small messages, each its own read: never a heap buffer.  A burst
 * (reads that fill the stack buffer): one.  It goes after 16 small reads
 * in a row, or at once at a read deadline with nothing pending; and
 * every byte comes back across all of it. */
static void inbuf_main(void *arg) {
  (void)arg;
  static const size_t batches[] = {60, 60, 60, 20000, 60,    60, 60, 60, 60,
                                   60, 60, 60, 60,    60,    60, 60, 60, 60,
                                   60, 60, 60, 60,    20000, 60, 60};
  enum { NB = sizeof batches / sizeof batches[0] };
  size_t total = 0;
  for (int i = 0; i < NB; i++)
    total += batches[i];
  static uint8_t d[45000], c[90000], b[45000];
  CHECK_LE(total, sizeof d);
  make_data(d, total, 9);
  for (size_t i = total / 2; i < total; i++) /* less noise: smaller */
    d[i] = (uint8_t)('a' + i % 7);
  size_t cends[NB], dcends[NB];
  int nc;
  deflate_batches(d, total, 15, 8, batches, NB, c, sizeof c, cends, dcends,
                  &nc);
  CHECK_EQ(nc, NB);
  /* One segment per batch; a deadline after the second burst. */
  script s;
  script_init(&s, 0);
  for (int i = 0; i < NB; i++) {
    size_t from = i ? cends[i - 1] : 0;
    script_add(&s, c + from, cends[i] - from);
    if (i == NB - 3)
      script_add(&s, NULL, SEG_TIMEOUT);
  }
  loom__layer *z = zlayer_over(&s);
  size_t got = 0;
  long most_small = 0;
  bool seen_burst = false, shed_after_quiet = false, shed_at_deadline = false;
  for (;;) {
    bool burst_done = got >= dcends[3];
    ssize_t n = z->ops->read(z, b + got, 512);
    long live = atomic_load(&live_inbufs);
    if (n == -ETIMEDOUT) {
      CHECK_EQ(live, 0); /* the deadline gave it back */
      shed_at_deadline = true;
      continue;
    }
    CHECKF(n >= 0, "read: %zd (%s)", n, loom_err_name((int)n));
    if (n == 0)
      break;
    got += (size_t)n;
    if (got <= dcends[2] && live > most_small)
      most_small = live;
    if (live)
      seen_burst = true;
    if (burst_done && got > dcends[3] && got <= dcends[21] && live == 0)
      shed_after_quiet = true;
  }
  printf("%zu bytes back; heap buffers while small: %ld; burst took one: "
         "%d; given back after quiet reads: %d, at the deadline: %d\n",
         got, most_small, seen_burst, shed_after_quiet, shed_at_deadline);
  CHECK_EQ(got, total);
  CHECK(memcmp(b, d, total) == 0);
  CHECK_EQ(most_small, 0);
  CHECK(seen_burst);
  CHECK(shed_after_quiet);
  CHECK(shed_at_deadline);
  z->ops->free(z);
  CHECK_EQ(atomic_load(&live_inbufs), 0);
}
TEST(input_buffer_only_during_bursts) {
  loom_allocator a = {count_realloc, count_free, NULL};
  loom_set_allocator(&a);
  run(inbuf_main);
  loom_set_allocator(NULL);
}

/* inflate makes its window at its first output: when that allocation
 * fails, the read is -ENOMEM — the session is out of memory, the peer's
 * stream is fine — never LOOM_ECOMPRESS. */
static void *no_window_realloc(void *ud, void *p, size_t n) {
  (void)ud;
  return p == NULL && n == 32768 ? NULL : realloc(p, n);
}

static void no_window_free(void *ud, void *p) {
  (void)ud;
  free(p);
}

static void no_window_main(void *arg) {
  (void)arg;
  static const size_t batches[] = {500};
  make_data(data, 2000, 21);
  size_t clen = deflate_batches(data, 2000, 15, 8, batches, 1, comp,
                                sizeof comp, ends, dends, &nends);
  script s;
  script_init(&s, 0);
  script_add(&s, comp, clen);
  loom__layer *z = zlayer_over(&s);
  size_t got;
  int rc = read_all(z, 512, back, sizeof back, &got);
  CHECKF(rc == -ENOMEM, "read without a window: %d (%s)", rc,
         loom_err_name(rc));
  CHECK_EQ(got, 0);
  z->ops->free(z);
}
TEST(no_memory_for_the_window_is_enomem) {
  loom_allocator a = {no_window_realloc, no_window_free, NULL};
  loom_set_allocator(&a);
  run(no_window_main);
  loom_set_allocator(NULL);
}

/* ------------------------------------------------------------------ */
/* Writing.                                                             */

/* Every window and three memLevels: batches written through the layer
 * are read back by zlib's inflateInit (a 32 KiB window, as any peer's
 * default), the header names the window, and the layer reads its own
 * stream back. */
static void write_main(void *arg) {
  (void)arg;
  make_data(data, DATA, 13);
  for (int wbits = 9; wbits <= 15; wbits++)
    for (int mlevel = 1; mlevel <= 9; mlevel += 4) {
      script s;
      script_init(&s, 0);
      loom__layer *z = NULL;
      CHECK_OK(loom__zlib_layer_new(&z, &s.l, 6, wbits, mlevel));
      static const size_t batches[] = {1, 900, 7000, 64, 16035};
      size_t at = 0;
      for (size_t k = 0; at < DATA; k++) {
        size_t n = batches[k % 5] < DATA - at ? batches[k % 5] : DATA - at;
        /* Two pieces a batch, as the writer's iovec. */
        struct iovec iov[2] = {{data + at, n / 2},
                               {data + at + n / 2, n - n / 2}};
        CHECK_EQ(z->ops->writev(z, iov, 2), (ssize_t)n);
        at += n;
      }
      CHECK_EQ(s.out[0], ((wbits - 8) << 4) | 8);
      z_stream in;
      memset(&in, 0, sizeof in);
      CHECK_EQ(inflateInit(&in), Z_OK);
      char what[64];
      snprintf(what, sizeof what, "window %d memLevel %d", wbits, mlevel);
      size_t blen = 0;
      CHECK_EQ(
          check_inflate(&in, s.out, s.outlen, back, sizeof back, &blen, what),
          s.outlen);
      CHECK_EQ(blen, DATA);
      CHECK(memcmp(back, data, DATA) == 0);
      inflateEnd(&in);
      script r;
      script_init(&r, 0);
      script_add(&r, s.out, s.outlen);
      loom__layer *rz = zlayer_over(&r);
      size_t got;
      CHECK_OK(read_all(rz, 4096, back, sizeof back, &got));
      CHECK_EQ(got, DATA);
      CHECK(memcmp(back, data, DATA) == 0);
      rz->ops->free(rz);
      z->ops->free(z);
      script_free(&s.l);
    }
}
TEST(writes_read_by_zlib_defaults_at_every_window) { run(write_main); }

/* A writev that fails part way has handed below bytes of a deflate
 * stream the peer now lacks the rest of, and deflate has gone on as if
 * they had all left: whatever it wrote after that, the peer's inflate
 * would read against the wrong history.  So the layer is broken for
 * good: every later writev fails with LOOM_ECOMPRESS and writes nothing.
 * Twice: with the layer below failing, and with deflate's own output
 * buffer failing for memory (a batch that outgrows the stack buffer). */
static bool fail_blocks; /* no_block_realloc fails new blocks */
static void *no_block_realloc(void *ud, void *p, size_t n) {
  (void)ud;
  return fail_blocks && p == NULL ? NULL : realloc(p, n);
}

static void no_block_free(void *ud, void *p) {
  (void)ud;
  free(p);
}

static void broken_write_main(void *arg) {
  (void)arg;
  make_data(data, DATA, 23);
  for (int how = 0; how < 2; how++) {
    script s;
    script_init(&s, 0);
    loom__layer *z = zlayer_over(&s);
    struct iovec one = {data, 3000};
    CHECK_EQ(z->ops->writev(z, &one, 1), 3000);
    size_t good = s.outlen;
    /* Noise from the second half: its compressed bytes outgrow the
     * stack buffer, so the batch needs a heap block. */
    struct iovec two = {data + DATA / 2, 4000};
    int want;
    if (how == 0) {
      s.werr = want = -ECONNRESET;
    } else {
      fail_blocks = true;
      want = -ENOMEM;
    }
    CHECK_ERR(z->ops->writev(z, &two, 1), want);
    s.werr = 0;
    fail_blocks = false;
    size_t cut = s.outlen;
    struct iovec three = {data + 3000, 500};
    for (int i = 0; i < 2; i++) {
      CHECK_ERR(z->ops->writev(z, &three, 1), LOOM_ECOMPRESS);
      CHECK_EQ(s.outlen, cut);
    }
    /* What left before the failure is a good stream. */
    z_stream in;
    memset(&in, 0, sizeof in);
    CHECK_EQ(inflateInit(&in), Z_OK);
    size_t blen = 0;
    CHECK_EQ(check_inflate(&in, s.out, good, back, sizeof back, &blen,
                           "the batch before the failure"),
             good);
    CHECK_EQ(blen, 3000);
    CHECK(memcmp(back, data, 3000) == 0);
    inflateEnd(&in);
    z->ops->free(z);
    script_free(&s.l);
  }
}
TEST(a_write_that_fails_breaks_the_stream) {
  loom_allocator a = {no_block_realloc, no_block_free, NULL};
  loom_set_allocator(&a);
  run(broken_write_main);
  loom_set_allocator(NULL);
}

/* A batch is compressed into 512 bytes on the writer's stack (compress.c,
 * ZOUT_STACK) and written from there: no allocation.  One whose output
 * outgrows them, by a byte or by many, goes out through heap chunks,
 * given back once it is written.  Every batch size around the edge, of
 * bytes that do not compress (stored blocks: the output is the input
 * and a few bytes) and of bytes that do; the whole stream is read back
 * by zlib. */
enum { ZOUT_STACK = 512 };
static atomic_long made_blocks, live_blocks;

static void *blocks_realloc(void *ud, void *p, size_t n) {
  (void)ud;
  void *q = realloc(p, n);
  if (q && !p) {
    atomic_fetch_add(&made_blocks, 1);
    atomic_fetch_add(&live_blocks, 1);
  }
  return q;
}

static void blocks_free(void *ud, void *p) {
  (void)ud;
  atomic_fetch_sub(&live_blocks, 1);
  free(p);
}

static void out_edge_main(void *arg) {
  (void)arg;
  static uint8_t plain[128 * 1024], sent[64 * 1024];
  make_data(plain, sizeof plain, 17); /* text, then noise */
  script s;
  script_init(&s, 0);
  loom__layer *z = NULL;
  CHECK_OK(loom__zlib_layer_new(&z, &s.l, 6, 15, 8));
  size_t at = 0;
  int on_stack = 0, spilled = 0;
  for (int pass = 0; pass < 2; pass++)
    for (size_t n = pass ? 440 : 480; n <= (pass ? 600 : 560);
         n += pass ? 8 : 1) {
      /* Noise first (the second half of plain: never the same bytes
       * twice, or deflate finds them in its window), then text. */
      const uint8_t *p =
          pass ? plain + at % 16384 : plain + sizeof plain / 2 + at;
      struct iovec iov[2] = {{(void *)(uintptr_t)p, n / 3},
                             {(void *)(uintptr_t)(p + n / 3), n - n / 3}};
      size_t out0 = s.outlen;
      long made0 = atomic_load(&made_blocks);
      long live0 = atomic_load(&live_blocks);
      CHECK_EQ(z->ops->writev(z, iov, 2), (ssize_t)n);
      size_t out = s.outlen - out0;
      long made = atomic_load(&made_blocks) - made0;
      if (at == 0) /* the first batch made the deflate state */
        made = 0;
      else if (out <= ZOUT_STACK)
        CHECKF(made == 0, "%zu bytes out of %zu: %ld blocks made", out, n,
               made);
      else
        CHECKF(made == 1, "%zu bytes out of %zu: %ld blocks made", out, n,
               made);
      CHECKF(at == 0 || atomic_load(&live_blocks) == live0,
             "%zu bytes out of %zu: %ld blocks kept", out, n,
             atomic_load(&live_blocks) - live0);
      on_stack += at > 0 && out <= ZOUT_STACK;
      spilled += out > ZOUT_STACK;
      CHECK_LE(at + n, sizeof sent);
      memcpy(sent + at, p, n); /* what must come back */
      at += n;
    }
  printf("%d batches written from the stack, %d through the heap\n", on_stack,
         spilled);
  CHECK_GT(on_stack, 20);
  CHECK_GT(spilled, 20);
  z_stream in;
  memset(&in, 0, sizeof in);
  CHECK_EQ(inflateInit(&in), Z_OK);
  static uint8_t got[64 * 1024];
  size_t glen = 0;
  CHECK_EQ(check_inflate(&in, s.out, s.outlen, got, sizeof got, &glen,
                         "batches around the stack buffer"),
           s.outlen);
  CHECK_EQ(glen, at);
  CHECK(memcmp(got, sent, at) == 0);
  inflateEnd(&in);
  z->ops->free(z);
  script_free(&s.l);
}
TEST(small_batches_compress_on_the_stack) {
  loom_allocator a = {blocks_realloc, blocks_free, NULL};
  loom_set_allocator(&a);
  run(out_edge_main);
  loom_set_allocator(NULL);
}

CHECK_MAIN()
