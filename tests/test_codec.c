/*
 * test_codec.c — the chunked byte queue (loom/buf.h) and the ready-made
 * codecs (loom/codec.h), each case against the contract its header
 * states.
 *
 * loom_buf is checked against a reference stream: the byte at stream
 * offset k is ref_byte(k), so a buffer that has taken bytes [lo, hi) of
 * the stream must hold exactly those, whatever its chunking.  Allocation
 * goes through a counting hook that can fail a chosen allocation and
 * refuses to free caller storage.
 *
 * The codecs are pure functions over bytes: every decode case hands in a
 * byte array and checks the return value, the package and, where the
 * header says so, that nothing was written.
 */
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "loom.h"

/* ------------------------------------------------------------------ */
/* Helpers: PRNG, reference stream, counting allocator.                 */

/* splitmix64: deterministic, so a failure replays. */
static uint64_t rng_state;
static uint64_t rng(void) {
  uint64_t z = (rng_state += 0x9e3779b97f4a7c15u);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
  return z ^ (z >> 31);
}
static size_t rng_below(size_t n) { return n ? (size_t)(rng() % n) : 0; }

static uint8_t ref_byte(uint64_t k) {
  k = (k ^ (k >> 33)) * 0xff51afd7ed558ccdu;
  return (uint8_t)(k ^ (k >> 29));
}
static void ref_fill(uint8_t *p, uint64_t from, size_t n) {
  for (size_t i = 0; i < n; i++)
    p[i] = ref_byte(from + i);
}

static long nalloc;       /* realloc-hook calls so far */
static long nlive;        /* blocks handed out and not yet freed */
static long fail_at = -1; /* the hook call that fails; -1: none */
static const uint8_t *forbid_lo, *forbid_hi; /* caller storage */

static void *hook_realloc(void *ud, void *p, size_t n) {
  (void)ud;
  if (nalloc++ == fail_at)
    return NULL;
  void *q = realloc(p, n);
  if (q != NULL && p == NULL)
    nlive++;
  return q;
}

static void hook_free(void *ud, void *p) {
  (void)ud;
  const uint8_t *b = p;
  CHECKF(forbid_lo == NULL || b < forbid_lo || b >= forbid_hi,
         "caller storage freed");
  nlive--;
  free(p);
}

static const loom_allocator hook = {hook_realloc, hook_free, NULL};

/* Install the counting hook; `lo`/`hi` bound storage it must never free. */
static void hook_install(const void *lo, size_t n) {
  nalloc = nlive = 0;
  fail_at = -1;
  forbid_lo = lo;
  forbid_hi = lo ? (const uint8_t *)lo + n : NULL;
  loom_set_allocator(&hook);
}

/* The whole content of `b` must be bytes [lo, lo + len(b)) of the
 * reference stream, through both peek and copyout. */
static void check_buf_ref(const loom_buf *b, uint64_t lo) {
  size_t len = loom_buf_len(b);
  uint8_t *want = malloc(len + 1), *got = malloc(len + 1);
  CHECK(want != NULL && got != NULL);
  ref_fill(want, lo, len);
  loom_buf_copyout(b, got, len);
  CHECK(memcmp(got, want, len) == 0);

  struct iovec iov[256];
  int n = loom_buf_peek(b, iov, 256);
  size_t off = 0;
  for (int i = 0; i < n; i++) {
    CHECK_GT(iov[i].iov_len, 0); /* empty chunks are skipped */
    CHECK_LE(off + iov[i].iov_len, len);
    CHECK(memcmp(iov[i].iov_base, want + off, iov[i].iov_len) == 0);
    off += iov[i].iov_len;
  }
  if (n < 256)
    CHECK_EQ(off, len); /* all of it, unless iov ran out */
  free(want);
  free(got);
}

/* Append bytes [at, at + n) of the reference stream. */
static int append_ref(loom_buf *b, uint64_t at, size_t n) {
  uint8_t *p = malloc(n + 1);
  CHECK(p != NULL);
  ref_fill(p, at, n);
  int r = loom_buf_append(b, p, n);
  free(p);
  return r;
}

/* ------------------------------------------------------------------ */
/* loom_buf                                                             */

TEST(buf_empty) {
  loom_buf b = LOOM_BUF_INIT;
  struct iovec iov[4];
  CHECK_EQ(loom_buf_len(&b), 0);
  CHECK_EQ(loom_buf_peek(&b, iov, 4), 0);
  loom_buf_consume(&b, 0);
  loom_buf_copyout(&b, iov, 0);
  CHECK_OK(loom_buf_append(&b, "", 0));
  CHECK_EQ(loom_buf_len(&b), 0);
  loom_buf_reset(&b);
  loom_buf_reset(&b); /* twice: still fine */
  CHECK_EQ(loom_buf_len(&b), 0);
}

/* Random appends, consumes, peeks and partial copyouts, with chunks
 * small enough that nearly every operation crosses a chunk boundary. */
TEST(buf_random_ops_small_chunks) {
  static const size_t chunks[] = {64, 100, 257, 0};
  for (size_t ci = 0; ci < sizeof chunks / sizeof chunks[0]; ci++) {
    hook_install(NULL, 0);
    rng_state = 42 + ci;
    loom_buf b;
    loom_buf_init(&b, chunks[ci]);
    uint64_t lo = 0, hi = 0; /* the buffer holds stream bytes [lo, hi) */
    for (int op = 0; op < 20000; op++) {
      size_t len = (size_t)(hi - lo);
      switch (rng_below(4)) {
      case 0:
      case 1: { /* append: mostly small, sometimes several chunks' worth */
        size_t n = rng_below(8) == 0 ? rng_below(600) : rng_below(70);
        if (len + n > 8000)
          break;
        CHECK_OK(append_ref(&b, hi, n));
        hi += n;
        break;
      }
      case 2: { /* consume: sometimes all of it */
        size_t n = rng_below(4) == 0 ? len : rng_below(len + 1);
        loom_buf_consume(&b, n);
        lo += n;
        break;
      }
      case 3: { /* copyout a prefix without removing it */
        uint8_t got[1024], want[1024];
        size_t n = rng_below((len < sizeof got ? len : sizeof got) + 1);
        loom_buf_copyout(&b, got, n);
        ref_fill(want, lo, n);
        CHECK(memcmp(got, want, n) == 0);
        break;
      }
      }
      CHECK_EQ(loom_buf_len(&b), hi - lo);
      if (op % 16 == 0)
        check_buf_ref(&b, lo);
    }
    check_buf_ref(&b, lo);
    CHECK_GT(hi, 100000); /* the mix did move a lot of bytes */
    loom_buf_reset(&b);
    CHECK_EQ(loom_buf_len(&b), 0);
    CHECK_EQ(nlive, 0);
    loom_set_allocator(NULL);
  }
}

/* peek fills at most `max` iovecs, head first. */
TEST(buf_peek_max) {
  loom_buf b;
  loom_buf_init(&b, 64);
  for (int i = 0; i < 5; i++)
    CHECK_OK(append_ref(&b, 64 * (uint64_t)i, 64)); /* five chunks */
  struct iovec iov[8];
  CHECK_EQ(loom_buf_peek(&b, iov, 8), 5);
  CHECK_EQ(loom_buf_peek(&b, iov, 2), 2);
  CHECK_EQ(iov[0].iov_len, 64);
  CHECK_EQ(((uint8_t *)iov[1].iov_base)[0], ref_byte(64));
  CHECK_EQ(loom_buf_peek(&b, iov, 0), 0);
  loom_buf_consume(&b, 10);
  CHECK_EQ(loom_buf_peek(&b, iov, 1), 1);
  CHECK_EQ(iov[0].iov_len, 54);
  CHECK_EQ(((uint8_t *)iov[0].iov_base)[0], ref_byte(10));
  loom_buf_reset(&b);
}

/* An append larger than a chunk fills the tail and puts the rest in one
 * chunk of its own size: the queued bytes never move. */
TEST(buf_large_append) {
  loom_buf b;
  loom_buf_init(&b, 64);
  CHECK_OK(append_ref(&b, 0, 40));
  struct iovec iov[4];
  CHECK_EQ(loom_buf_peek(&b, iov, 4), 1);
  void *first = iov[0].iov_base;
  CHECK_OK(append_ref(&b, 40, 1000));
  CHECK_EQ(loom_buf_peek(&b, iov, 4), 2);
  CHECK(iov[0].iov_base == first);
  CHECK_EQ(iov[0].iov_len, 64);
  CHECK_EQ(iov[1].iov_len, 1040 - 64);
  check_buf_ref(&b, 0);
  loom_buf_reset(&b);
}

TEST(buf_reserve_commit) {
  loom_buf b;
  loom_buf_init(&b, 64);
  CHECK_OK(append_ref(&b, 0, 10));
  /* Room in the tail. */
  uint8_t *p = loom_buf_reserve(&b, 20);
  CHECK(p != NULL);
  ref_fill(p, 10, 20);
  loom_buf_commit(&b, 15); /* m < n: only 15 count */
  CHECK_EQ(loom_buf_len(&b), 25);
  check_buf_ref(&b, 0);
  /* More than the tail has left: contiguous room elsewhere. */
  p = loom_buf_reserve(&b, 60);
  CHECK(p != NULL);
  ref_fill(p, 25, 60);
  loom_buf_commit(&b, 60);
  CHECK_EQ(loom_buf_len(&b), 85);
  check_buf_ref(&b, 0);
  /* More than a chunk. */
  p = loom_buf_reserve(&b, 500);
  CHECK(p != NULL);
  ref_fill(p, 85, 500);
  loom_buf_commit(&b, 500);
  check_buf_ref(&b, 0);
  /* Commit 0 leaves nothing behind; appending goes on seamlessly. */
  CHECK(loom_buf_reserve(&b, 100) != NULL);
  loom_buf_commit(&b, 0);
  CHECK_EQ(loom_buf_len(&b), 585);
  CHECK_OK(append_ref(&b, 585, 30));
  check_buf_ref(&b, 0);
  loom_buf_consume(&b, 600);
  check_buf_ref(&b, 600);
  CHECK_EQ(loom_buf_len(&b), 15);
  loom_buf_reset(&b);
}

/* A size no chunk can have is out of memory, not a wrapped allocation. */
TEST(buf_reserve_huge) {
  loom_buf b;
  loom_buf_init(&b, 64);
  CHECK_OK(append_ref(&b, 0, 10));
  CHECK(loom_buf_reserve(&b, SIZE_MAX) == NULL);
  CHECK(loom_buf_reserve(&b, SIZE_MAX - 8) == NULL);
  CHECK_EQ(loom_buf_len(&b), 10);
  check_buf_ref(&b, 0);
  loom_buf_reset(&b);
}

/* Caller storage: short appends allocate nothing, longer ones spill into
 * heap chunks, and reset frees every heap chunk but never the storage
 * (the hook checks; ASan would report a bad free as well). */
TEST(buf_init_on_spills_and_reset) {
  _Alignas(8) uint8_t mem[128] = {0};
  hook_install(mem, sizeof mem);
  loom_buf b;
  loom_buf_init_on(&b, mem, sizeof mem);
  CHECK_OK(append_ref(&b, 0, 30));
  CHECK_OK(append_ref(&b, 30, 20));
  CHECK_EQ(nalloc, 0);
  struct iovec iov[4];
  CHECK_EQ(loom_buf_peek(&b, iov, 4), 1);
  CHECK((uint8_t *)iov[0].iov_base >= mem &&
        (uint8_t *)iov[0].iov_base + iov[0].iov_len <= mem + sizeof mem);
  CHECK_OK(append_ref(&b, 50, 1000)); /* spills over */
  CHECK_GT(nalloc, 0);
  CHECK_GT(nlive, 0);
  CHECK_EQ(loom_buf_len(&b), 1050);
  check_buf_ref(&b, 0);
  CHECK_OK(append_ref(&b, 1050, 70000)); /* a default-size chunk and more */
  check_buf_ref(&b, 0);
  loom_buf_reset(&b);
  CHECK_EQ(loom_buf_len(&b), 0);
  CHECK_EQ(nlive, 0);
  /* Still usable. */
  CHECK_OK(append_ref(&b, 7, 300));
  check_buf_ref(&b, 7);
  loom_buf_reset(&b);
  CHECK_EQ(nlive, 0);
  loom_set_allocator(NULL);
}

/* Consumed past the caller storage, and reset while on it. */
TEST(buf_init_on_consume_past) {
  _Alignas(8) uint8_t mem[64] = {0};
  hook_install(mem, sizeof mem);
  loom_buf b;
  loom_buf_init_on(&b, mem, sizeof mem);
  CHECK_OK(append_ref(&b, 0, 10));
  loom_buf_consume(&b, 10);
  CHECK_OK(append_ref(&b, 10, 15)); /* into the storage again */
  CHECK_EQ(nalloc, 0);
  CHECK_OK(append_ref(&b, 25, 200));
  loom_buf_consume(&b, 100); /* past the storage */
  check_buf_ref(&b, 110);
  CHECK_OK(append_ref(&b, 225, 50));
  check_buf_ref(&b, 110);
  loom_buf_reset(&b);
  CHECK_EQ(nlive, 0);
  long before = nalloc;
  loom_buf_init_on(&b, mem, sizeof mem);
  CHECK_OK(append_ref(&b, 0, 5));
  loom_buf_reset(&b); /* nothing on the heap: nothing freed */
  CHECK_EQ(nalloc, before);
  loom_set_allocator(NULL);
}

/* heap -> heap: the chunks change hands; no byte copied, nothing
 * allocated; src is left empty and usable. */
TEST(buf_move_heap) {
  hook_install(NULL, 0);
  loom_buf src, dst;
  loom_buf_init(&src, 64);
  loom_buf_init(&dst, 64);
  CHECK_OK(append_ref(&dst, 0, 100));
  for (int i = 0; i < 6; i++)
    CHECK_OK(append_ref(&src, 90 + 50 * (uint64_t)i, 50));
  loom_buf_consume(&src, 10); /* src holds [100, 390) in five chunks */
  struct iovec before[16], after[16];
  int ns = loom_buf_peek(&src, before, 16);
  CHECK_EQ(ns, 5);
  long allocs = nalloc;
  CHECK_OK(loom_buf_move(&dst, &src));
  CHECK_EQ(nalloc, allocs);
  CHECK_EQ(loom_buf_len(&src), 0);
  CHECK_EQ(loom_buf_len(&dst), 390);
  check_buf_ref(&dst, 0);
  int nd = loom_buf_peek(&dst, after, 16);
  CHECK_GE(nd, ns);
  for (int i = 0; i < ns; i++) /* the same memory, now at dst's tail */
    CHECK(after[nd - ns + i].iov_base == before[i].iov_base);
  /* Both keep working. */
  CHECK_OK(append_ref(&dst, 390, 77));
  CHECK_OK(append_ref(&src, 5, 77));
  check_buf_ref(&dst, 0);
  check_buf_ref(&src, 5);
  /* Into an empty dst, and from an empty src. */
  loom_buf empty;
  loom_buf_init(&empty, 64);
  CHECK_OK(loom_buf_move(&dst, &empty));
  CHECK_EQ(loom_buf_len(&dst), 467);
  loom_buf_consume(&dst, 467); /* dst: empty, one chunk left */
  CHECK_OK(loom_buf_move(&dst, &src));
  CHECK_EQ(loom_buf_len(&dst), 77);
  check_buf_ref(&dst, 5);
  CHECK_OK(loom_buf_move(&empty, &dst));
  check_buf_ref(&empty, 5);
  CHECK_EQ(loom_buf_len(&dst), 0);
  loom_buf_reset(&src);
  loom_buf_reset(&dst);
  loom_buf_reset(&empty);
  CHECK_EQ(nlive, 0);
  loom_set_allocator(NULL);
}

/* borrowed -> heap: the caller storage's bytes are copied, the heap
 * chunks after them move; src ends empty and the storage is never
 * handed to dst (resetting dst must not free it). */
TEST(buf_move_borrowed) {
  _Alignas(8) uint8_t mem[128] = {0};
  hook_install(mem, sizeof mem);
  for (int spill = 0; spill < 2; spill++) {
    loom_buf src, dst;
    loom_buf_init_on(&src, mem, sizeof mem);
    loom_buf_init(&dst, 64);
    CHECK_OK(append_ref(&dst, 0, 50));
    size_t n = spill ? 600 : 40;
    CHECK_OK(append_ref(&src, 47, n));
    loom_buf_consume(&src, 3); /* src holds [50, 47 + n) */
    CHECK_OK(loom_buf_move(&dst, &src));
    CHECK_EQ(loom_buf_len(&src), 0);
    CHECK_EQ(loom_buf_len(&dst), 47 + n);
    check_buf_ref(&dst, 0);
    struct iovec iov[32];
    int k = loom_buf_peek(&dst, iov, 32);
    for (int i = 0; i < k; i++)
      CHECK(!((uint8_t *)iov[i].iov_base >= mem &&
              (uint8_t *)iov[i].iov_base < mem + sizeof mem));
    CHECK_OK(append_ref(&src, 1, 20)); /* src still usable */
    check_buf_ref(&src, 1);
    loom_buf_reset(&dst);
    loom_buf_reset(&src);
  }
  CHECK_EQ(nlive, 0);
  loom_set_allocator(NULL);
}

/* Every allocation of a scenario fails in turn: each call that fails
 * returns -ENOMEM (NULL for reserve) with the buffers unchanged, and the
 * scenario then carries on from there. */
TEST(buf_enomem_each_allocation) {
  _Alignas(8) uint8_t mem[128] = {0};
  long clean = -1;
  for (long at = 0; clean < 0 || at <= clean; at++) {
    hook_install(mem, sizeof mem);
    fail_at = at;
    long failures = 0;
    loom_buf a, src, dst;
    loom_buf_init(&a, 64);
    uint64_t hi = 0;
    for (int i = 0; i < 12; i++) { /* appends of assorted sizes */
      size_t n = (size_t)(i * 37 % 150);
      int r = append_ref(&a, hi, n);
      if (r == -ENOMEM) {
        failures++;
        CHECK_EQ(loom_buf_len(&a), hi);
        check_buf_ref(&a, 0);
        CHECK_OK(append_ref(&a, hi, n)); /* one failure only */
      } else {
        CHECK_OK(r);
      }
      hi += n;
      check_buf_ref(&a, 0);
    }
    uint8_t *p = loom_buf_reserve(&a, 200);
    if (p == NULL) {
      failures++;
      CHECK_EQ(loom_buf_len(&a), hi);
      check_buf_ref(&a, 0);
      p = loom_buf_reserve(&a, 200);
      CHECK(p != NULL);
    }
    ref_fill(p, hi, 200);
    loom_buf_commit(&a, 200);
    hi += 200;
    check_buf_ref(&a, 0);

    /* Move from caller storage with a heap chunk behind it into a dst
     * whose tail has room for the storage's bytes but not for all. */
    loom_buf_init_on(&src, mem, sizeof mem);
    loom_buf_init(&dst, 64);
    int r = append_ref(&dst, 0, 10);
    if (r == -ENOMEM) {
      failures++;
      CHECK_EQ(loom_buf_len(&dst), 0);
      r = append_ref(&dst, 0, 10);
    }
    CHECK_OK(r);
    CHECK_OK(append_ref(&src, 10, 40)); /* in the storage */
    r = append_ref(&src, 50, 150);      /* spills */
    if (r == -ENOMEM) {
      failures++;
      CHECK_EQ(loom_buf_len(&src), 40);
      r = append_ref(&src, 50, 150);
    }
    CHECK_OK(r);
    r = loom_buf_move(&dst, &src);
    if (r == -ENOMEM) {
      failures++;
      CHECK_EQ(loom_buf_len(&dst), 10); /* nothing moved */
      CHECK_EQ(loom_buf_len(&src), 190);
      check_buf_ref(&dst, 0);
      check_buf_ref(&src, 10);
      r = loom_buf_move(&dst, &src);
    }
    CHECK_OK(r);
    CHECK_EQ(loom_buf_len(&src), 0);
    check_buf_ref(&dst, 0);
    CHECK_EQ(loom_buf_len(&dst), 200);

    loom_buf_reset(&a);
    loom_buf_reset(&src);
    loom_buf_reset(&dst);
    CHECK_EQ(nlive, 0);
    CHECKF(failures == (at < nalloc ? 1 : 0), "allocation %ld: %ld failures",
           at, failures);
    if (clean < 0 && failures == 0)
      clean = nalloc; /* the first run without a failure counts them */
    if (clean < 0)
      CHECK_LT(at, 1000);
    loom_set_allocator(NULL);
  }
}

/* A queue that fills and drains in turn stops allocating: consume to
 * empty keeps the last chunk to append into, and one emptied chunk is
 * kept as a spare. */
TEST(buf_reuse_after_consume) {
  hook_install(NULL, 0);
  loom_buf b;
  loom_buf_init(&b, 64);
  uint64_t lo = 0, hi = 0;
  long after_first = -1;
  for (int round = 0; round < 50; round++) {
    CHECK_OK(append_ref(&b, hi, 60));
    CHECK_OK(append_ref(&b, hi + 60, 60)); /* two chunks */
    hi += 120;
    check_buf_ref(&b, lo);
    loom_buf_consume(&b, 50);
    loom_buf_consume(&b, 70); /* to empty, across the boundary */
    lo += 120;
    CHECK_EQ(loom_buf_len(&b), 0);
    if (round == 1)
      after_first = nalloc;
  }
  CHECK_EQ(nalloc, after_first); /* rounds 2..49 allocated nothing */
  CHECK_LE(nalloc, 3);
  loom_buf_reset(&b);
  CHECK_EQ(nlive, 0);
  loom_set_allocator(NULL);
}

/* ------------------------------------------------------------------ */
/* Codec helpers.                                                       */

static const loom_pkg pkg_sentinel = {(const uint8_t *)"sentinel", 12345, NULL,
                                      99};

/* decode must return `want` and leave *pkg untouched unless it is > 0. */
static ssize_t decode_chk(const loom_codec *c, const void *buf, size_t len,
                          size_t max_len, loom_pkg *pkg, ssize_t want) {
  *pkg = pkg_sentinel;
  ssize_t r = c->decode(c, buf, len, max_len, pkg);
  CHECKF(r == want, "%s decode of %zu bytes (max_len %zu): %zd, want %zd",
         c->name, len, max_len, r, want);
  if (r <= 0) {
    CHECK(pkg->data == pkg_sentinel.data && pkg->len == pkg_sentinel.len);
  } else {
    const uint8_t *b = buf;
    CHECK(pkg->data >= b && pkg->data + pkg->len <= b + r);
    CHECKF(pkg->len <= max_len, "%zu > %zu", pkg->len, max_len);
  }
  return r;
}

/* The whole of `b` in one malloc'd block (caller frees). */
static uint8_t *buf_flat(const loom_buf *b) {
  uint8_t *p = malloc(loom_buf_len(b) + 1);
  CHECK(p != NULL);
  loom_buf_copyout(b, p, loom_buf_len(b));
  return p;
}

static void field_put(uint8_t *p, unsigned w, bool le, uint64_t v) {
  for (unsigned i = 0; i < w; i++)
    p[i] = (uint8_t)(v >> (8 * (le ? i : w - 1 - i)));
}

static const unsigned widths[] = {1, 2, 4, 8};

/* ------------------------------------------------------------------ */
/* Length-prefixed                                                      */

TEST(lenpfx_default) {
  loom_codec c;
  CHECK_OK(loom_codec_lenpfx(&c, NULL));
  CHECK_STREQ(c.name, "lenpfx");
  loom_buf b;
  loom_buf_init(&b, 64);
  CHECK_OK(c.encode(&c, "hello", 5, 100, &b));
  CHECK_EQ(loom_buf_len(&b), 9);
  uint8_t *p = buf_flat(&b);
  CHECK(memcmp(p, "\0\0\0\5hello", 9) == 0); /* 4 bytes, big-endian */
  loom_pkg pkg;
  decode_chk(&c, p, 9, 100, &pkg, 9);
  CHECK_EQ(pkg.len, 5);
  CHECK(pkg.data == p + 4);
  free(p);
  /* Options of all zeros are the same codec. */
  loom_lenpfx_opts o = {0, false, 0};
  loom_codec c2;
  CHECK_OK(loom_codec_lenpfx(&c2, &o));
  decode_chk(&c2, "\0\0\0\2hi", 6, 100, &pkg, 6);
  loom_buf_reset(&b);
}

/* Each width, each byte order: the header bytes are exactly the field,
 * and decoding them gives the payload back. */
TEST(lenpfx_widths_and_byte_order) {
  static const size_t lens[] = {0, 1, 200, 255, 256, 300, 70000};
  uint8_t payload[70000];
  ref_fill(payload, 0, sizeof payload);
  for (size_t wi = 0; wi < 4; wi++) {
    for (int le = 0; le < 2; le++) {
      unsigned w = widths[wi];
      loom_lenpfx_opts o = {w, le != 0, 0};
      loom_codec c;
      CHECK_OK(loom_codec_lenpfx(&c, &o));
      for (size_t li = 0; li < sizeof lens / sizeof lens[0]; li++) {
        size_t n = lens[li];
        loom_buf b;
        loom_buf_init(&b, 64);
        int r = c.encode(&c, payload, n, SIZE_MAX, &b);
        if (w < 8 && (uint64_t)n >> (8 * w)) {
          CHECK_ERR(r, -EMSGSIZE);
          CHECK_EQ(loom_buf_len(&b), 0);
          continue;
        }
        CHECK_OK(r);
        CHECK_EQ(loom_buf_len(&b), w + n);
        uint8_t *p = buf_flat(&b);
        uint8_t want[8];
        field_put(want, w, le, n);
        CHECK(memcmp(p, want, w) == 0);
        if (w > 1 && n == 300) /* 0x012c: the byte order is visible */
          CHECK_EQ(p[le ? 0 : w - 1], 0x2c);
        loom_pkg pkg;
        decode_chk(&c, p, w + n, SIZE_MAX, &pkg, (ssize_t)(w + n));
        CHECK_EQ(pkg.len, n);
        CHECK(pkg.data == p + w);
        CHECK(memcmp(pkg.data, payload, n) == 0);
        free(p);
        loom_buf_reset(&b);
      }
    }
  }
}

/* adjust -4 with a 4-byte field that counts itself. */
TEST(lenpfx_adjust_negative) {
  loom_lenpfx_opts o = {4, false, -4};
  loom_codec c;
  CHECK_OK(loom_codec_lenpfx(&c, &o));
  loom_buf b;
  loom_buf_init(&b, 64);
  CHECK_OK(c.encode(&c, "abc", 3, 100, &b));
  CHECK_OK(c.encode(&c, "", 0, 100, &b));
  uint8_t *p = buf_flat(&b);
  CHECK(memcmp(p, "\0\0\0\7abc\0\0\0\4", 11) == 0);
  loom_pkg pkg;
  decode_chk(&c, p, 11, 100, &pkg, 7);
  CHECK_EQ(pkg.len, 3);
  CHECK(memcmp(pkg.data, "abc", 3) == 0);
  decode_chk(&c, p + 7, 4, 100, &pkg, 4);
  CHECK_EQ(pkg.len, 0);
  free(p);
  /* A field smaller than what it counts cannot start a package. */
  for (uint8_t f = 0; f < 4; f++) {
    uint8_t h[4] = {0, 0, 0, f};
    decode_chk(&c, h, 4, 100, &pkg, -EBADMSG);
  }
  /* Width 1, adjust -1: the smallest case. */
  loom_lenpfx_opts o1 = {1, false, -1};
  CHECK_OK(loom_codec_lenpfx(&c, &o1));
  decode_chk(&c, "\0", 1, 100, &pkg, -EBADMSG);
  decode_chk(&c, "\1", 1, 100, &pkg, 1);
  CHECK_EQ(pkg.len, 0);
  /* The field's limit applies to field = len + 1: 254 fits, 255 not. */
  uint8_t big[255] = {0};
  loom_buf_reset(&b);
  CHECK_OK(c.encode(&c, big, 254, 1000, &b));
  CHECK_ERR(c.encode(&c, big, 255, 1000, &b), -EMSGSIZE);
  CHECK_EQ(loom_buf_len(&b), 255);
  loom_buf_reset(&b);
}

/* adjust > 0: the field says less than the payload. */
TEST(lenpfx_adjust_positive) {
  loom_lenpfx_opts o = {2, true, 3};
  loom_codec c;
  CHECK_OK(loom_codec_lenpfx(&c, &o));
  loom_pkg pkg;
  decode_chk(&c, "\0\0xyz", 5, 100, &pkg, 5);
  CHECK_EQ(pkg.len, 3);
  CHECK(memcmp(pkg.data, "xyz", 3) == 0);
  decode_chk(&c, "\0\0xy", 4, 100, &pkg, 0);
  decode_chk(&c, "\2\0", 2, 4, &pkg, -EMSGSIZE); /* 5 > 4 */
  loom_buf b;
  loom_buf_init(&b, 64);
  CHECK_OK(c.encode(&c, "hello", 5, 100, &b));
  uint8_t *p = buf_flat(&b);
  CHECK(memcmp(p, "\2\0hello", 7) == 0);
  free(p);
  /* A package shorter than adjust has no field that says it. */
  CHECK_ERR(c.encode(&c, "hi", 2, 100, &b), -EINVAL);
  CHECK_EQ(loom_buf_len(&b), 7);
  loom_buf_reset(&b);
  /* Width 8: a field near 2^64 plus adjust is too long, not a wrap. */
  loom_lenpfx_opts o8 = {8, false, 5};
  CHECK_OK(loom_codec_lenpfx(&c, &o8));
  uint8_t h[8];
  memset(h, 0xff, 8);
  decode_chk(&c, h, 8, SIZE_MAX, &pkg, -EMSGSIZE);
  field_put(h, 8, false, UINT64_MAX - 5);
  decode_chk(&c, h, 8, SIZE_MAX, &pkg, -EMSGSIZE);
}

/* Every proper prefix of a frame needs more bytes; the frame itself, and
 * the frame with the next one's bytes behind it, span exactly it. */
TEST(lenpfx_needs_more_every_prefix) {
  static const int64_t adjusts[] = {0, -1, 7};
  uint8_t frame[8 + 300 + 5];
  for (size_t wi = 0; wi < 4; wi++) {
    for (int le = 0; le < 2; le++) {
      for (size_t ai = 0; ai < 3; ai++) {
        unsigned w = widths[wi];
        int64_t adj = adjusts[ai];
        loom_lenpfx_opts o = {w, le != 0, adj};
        loom_codec c;
        CHECK_OK(loom_codec_lenpfx(&c, &o));
        size_t n = w == 1 ? 200 : 300;
        field_put(frame, w, le, (uint64_t)((int64_t)n - adj));
        ref_fill(frame + w, 0, n + 5);
        loom_pkg pkg;
        for (size_t k = 0; k < w + n; k++)
          decode_chk(&c, frame, k, n, &pkg, 0);
        decode_chk(&c, frame, w + n, n, &pkg, (ssize_t)(w + n));
        CHECK_EQ(pkg.len, n);
        CHECK(pkg.data == frame + w);
        decode_chk(&c, frame, w + n + 5, n, &pkg, (ssize_t)(w + n));
        CHECK_EQ(pkg.len, n);
        /* One byte over max_len: refused from the header alone. */
        decode_chk(&c, frame, w, n - 1, &pkg, -EMSGSIZE);
      }
    }
  }
}

TEST(lenpfx_zero_length_and_back_to_back) {
  loom_lenpfx_opts o = {2, false, 0};
  loom_codec c;
  CHECK_OK(loom_codec_lenpfx(&c, &o));
  static const uint8_t in[] = {0, 0, 0, 3, 'a', 'b', 'c', 0, 0, 0, 1, 'z'};
  loom_pkg pkg;
  size_t off = 0;
  static const char *const want[] = {"", "abc", "", "z"};
  for (int i = 0; i < 4; i++) {
    size_t n = strlen(want[i]);
    ssize_t r =
        decode_chk(&c, in + off, sizeof in - off, 10, &pkg, (ssize_t)(2 + n));
    CHECK_EQ(pkg.len, n);
    CHECK(pkg.data == in + off + 2);
    CHECK(memcmp(pkg.data, want[i], n) == 0);
    off += (size_t)r;
  }
  CHECK_EQ(off, sizeof in);
  /* Zero-length package with max_len 0. */
  decode_chk(&c, in, 2, 0, &pkg, 2);
  decode_chk(&c, in + 2, 2, 0, &pkg, -EMSGSIZE);
}

/* A package longer than max_len is refused as soon as the header is
 * there, without its payload; one of exactly max_len waits for it. */
TEST(lenpfx_emsgsize_from_header) {
  loom_codec c;
  CHECK_OK(loom_codec_lenpfx(&c, NULL));
  loom_pkg pkg;
  decode_chk(&c, "\0\0\1\0", 4, 255, &pkg, -EMSGSIZE);
  decode_chk(&c, "\0\0\1\0", 4, 256, &pkg, 0);
  decode_chk(&c, "\xff\xff\xff\xff", 4, 1 << 20, &pkg, -EMSGSIZE);
  decode_chk(&c, "\0\0\1\0", 3, 0, &pkg, 0); /* header incomplete */
  /* Width 8: lengths no ssize_t can return. */
  loom_lenpfx_opts o = {8, true, 0};
  CHECK_OK(loom_codec_lenpfx(&c, &o));
  uint8_t h[8];
  field_put(h, 8, true, (uint64_t)SSIZE_MAX);
  decode_chk(&c, h, 8, SIZE_MAX, &pkg, -EMSGSIZE);
  field_put(h, 8, true, UINT64_MAX);
  decode_chk(&c, h, 8, SIZE_MAX, &pkg, -EMSGSIZE);
  field_put(h, 8, true, 1u << 30);
  decode_chk(&c, h, 8, SIZE_MAX, &pkg, 0);
}

TEST(lenpfx_encode_emsgsize) {
  uint8_t data[70000] = {0};
  loom_buf b;
  loom_buf_init(&b, 64);
  loom_codec c;
  CHECK_OK(loom_codec_lenpfx(&c, NULL));
  CHECK_ERR(c.encode(&c, data, 11, 10, &b), -EMSGSIZE); /* > max_len */
  CHECK_OK(c.encode(&c, data, 10, 10, &b));
  CHECK_EQ(loom_buf_len(&b), 14);
  loom_lenpfx_opts o1 = {1, false, 0};
  CHECK_OK(loom_codec_lenpfx(&c, &o1));
  CHECK_ERR(c.encode(&c, data, 300, 1000, &b), -EMSGSIZE); /* > 255 */
  CHECK_ERR(c.encode(&c, data, 256, 1000, &b), -EMSGSIZE);
  CHECK_OK(c.encode(&c, data, 255, 1000, &b));
  loom_lenpfx_opts o2 = {2, true, 0};
  CHECK_OK(loom_codec_lenpfx(&c, &o2));
  CHECK_ERR(c.encode(&c, data, 65536, 100000, &b), -EMSGSIZE);
  CHECK_EQ(loom_buf_len(&b), 14 + 256); /* nothing appended */
  CHECK_OK(c.encode(&c, data, 65535, 100000, &b));
  loom_buf_reset(&b);
}

/* A length no frame can carry — its frame would be longer than a decode
 * can return (SSIZE_MAX), or its field plus a negative adjust would pass
 * 2^64 — is -EMSGSIZE before anything is reserved or read: `data` here
 * is one byte long, so a copy would be reported by ASan (and crash the
 * plain build). */
TEST(lenpfx_encode_refuses_lengths_no_frame_can_carry) {
  static const int64_t adjusts[] = {0, -8, 8, -((INT64_C(1) << 62) - 1),
                                    (INT64_C(1) << 62) - 1};
  static const size_t lens[] = {SIZE_MAX,
                                SIZE_MAX - 3,
                                SIZE_MAX - 8,
                                (size_t)SSIZE_MAX,
                                (size_t)SSIZE_MAX - 7,
                                (size_t)1 << 63,
                                SIZE_MAX - ((size_t)1 << 61)};
  const uint8_t one = 'x';
  for (size_t wi = 0; wi < 4; wi++) {
    for (size_t ai = 0; ai < sizeof adjusts / sizeof adjusts[0]; ai++) {
      loom_lenpfx_opts o = {widths[wi], false, adjusts[ai]};
      loom_codec c;
      CHECK_OK(loom_codec_lenpfx(&c, &o));
      for (size_t li = 0; li < sizeof lens / sizeof lens[0]; li++) {
        loom_buf b;
        loom_buf_init(&b, 64);
        CHECK_OK(loom_buf_append(&b, "ab", 2));
        CHECKF(c.encode(&c, &one, lens[li], SIZE_MAX, &b) == -EMSGSIZE,
               "width %u adjust %lld len %zu", widths[wi],
               (long long)adjusts[ai], lens[li]);
        CHECK_EQ(loom_buf_len(&b), 2); /* nothing appended */
        loom_buf_reset(&b);
      }
    }
  }
  /* The bound is the decoder's: a width-8 field of SSIZE_MAX - 8 makes
   * a frame of SSIZE_MAX bytes (it waits for them), one more is refused. */
  loom_lenpfx_opts o8 = {8, false, 0};
  loom_codec c;
  CHECK_OK(loom_codec_lenpfx(&c, &o8));
  loom_pkg pkg;
  uint8_t h[8];
  field_put(h, 8, false, (uint64_t)SSIZE_MAX - 8);
  decode_chk(&c, h, 8, SIZE_MAX, &pkg, 0); /* a frame: needs its bytes */
  field_put(h, 8, false, (uint64_t)SSIZE_MAX - 7);
  decode_chk(&c, h, 8, SIZE_MAX, &pkg, -EMSGSIZE);
}

/* Bad options: -EINVAL and the codec untouched. */
TEST(lenpfx_invalid_options) {
  loom_codec c, saved;
  memset(&c, 0x5a, sizeof c);
  saved = c;
  static const unsigned bad_w[] = {3, 5, 6, 7, 9, 16, 256 + 4};
  for (size_t i = 0; i < sizeof bad_w / sizeof bad_w[0]; i++) {
    loom_lenpfx_opts o = {bad_w[i], false, 0};
    CHECK_ERR(loom_codec_lenpfx(&c, &o), -EINVAL);
    CHECK(memcmp(&c, &saved, sizeof c) == 0);
  }
  static const int64_t bad_adj[] = {INT64_C(1) << 62, -(INT64_C(1) << 62),
                                    INT64_MAX, INT64_MIN};
  for (size_t i = 0; i < sizeof bad_adj / sizeof bad_adj[0]; i++) {
    loom_lenpfx_opts o = {4, false, bad_adj[i]};
    CHECK_ERR(loom_codec_lenpfx(&c, &o), -EINVAL);
    CHECK(memcmp(&c, &saved, sizeof c) == 0);
  }
  loom_lenpfx_opts ok = {8, false, (INT64_C(1) << 62) - 1};
  CHECK_OK(loom_codec_lenpfx(&c, &ok));
  ok.adjust = -ok.adjust;
  CHECK_OK(loom_codec_lenpfx(&c, &ok));
  loom_pkg pkg;
  uint8_t h[8] = {0};
  decode_chk(&c, h, 8, SIZE_MAX, &pkg, -EBADMSG);
}

/* Random packages through every option: encode a batch into one
 * small-chunked buffer, then decode them back one after another. */
TEST(lenpfx_round_trip) {
  static const int64_t adjusts[] = {0, -1, -4, -8, 2};
  rng_state = 7;
  uint8_t data[3000];
  for (int iter = 0; iter < 200; iter++) {
    unsigned w = widths[rng_below(4)];
    bool le = rng_below(2) != 0;
    int64_t adj = adjusts[rng_below(5)];
    loom_lenpfx_opts o = {w, le, adj};
    loom_codec c;
    CHECK_OK(loom_codec_lenpfx(&c, &o));
    size_t max_len = w == 1 ? 200 : 3000;
    loom_buf b;
    loom_buf_init(&b, 64);
    size_t lens[20];
    uint64_t at[20], pos = 0;
    for (int i = 0; i < 20; i++) {
      lens[i] = rng_below(max_len + 1);
      if (adj > 0 && lens[i] < (size_t)adj)
        lens[i] = (size_t)adj;
      at[i] = pos;
      ref_fill(data, pos, lens[i]);
      pos += lens[i];
      CHECK_OK(c.encode(&c, data, lens[i], max_len, &b));
    }
    uint8_t *p = buf_flat(&b);
    size_t off = 0, total = loom_buf_len(&b);
    for (int i = 0; i < 20; i++) {
      loom_pkg pkg;
      ssize_t r = decode_chk(&c, p + off, total - off, max_len, &pkg,
                             (ssize_t)(w + lens[i]));
      CHECK_EQ(pkg.len, lens[i]);
      ref_fill(data, at[i], lens[i]);
      CHECK(memcmp(pkg.data, data, lens[i]) == 0);
      off += (size_t)r;
    }
    CHECK_EQ(off, total);
    free(p);
    loom_buf_reset(&b);
  }
}

TEST(lenpfx_encode_enomem) {
  loom_codec c;
  CHECK_OK(loom_codec_lenpfx(&c, NULL));
  hook_install(NULL, 0);
  loom_buf b;
  loom_buf_init(&b, 64);
  CHECK_OK(c.encode(&c, "x", 1, 100, &b));
  fail_at = nalloc; /* the next one: the tail has no room for 104 */
  uint8_t data[100] = {0};
  CHECK_ERR(c.encode(&c, data, 100, 100, &b), -ENOMEM);
  CHECK_EQ(loom_buf_len(&b), 5);
  CHECK_OK(c.encode(&c, data, 100, 100, &b));
  CHECK_EQ(loom_buf_len(&b), 109);
  loom_buf_reset(&b);
  CHECK_EQ(nlive, 0);
  loom_set_allocator(NULL);
}

/* ------------------------------------------------------------------ */
/* Lines                                                                */

TEST(line_lf) {
  loom_codec c;
  CHECK_OK(loom_codec_line(&c, '\n', false));
  CHECK_STREQ(c.name, "line");
  loom_pkg pkg;
  const char *in = "abc\n\nxy\r\nrest";
  size_t len = strlen(in);
  decode_chk(&c, in, len, 100, &pkg, 4);
  CHECK_EQ(pkg.len, 3);
  CHECK((const char *)pkg.data == in);
  decode_chk(&c, in + 4, len - 4, 100, &pkg, 1); /* empty line */
  CHECK_EQ(pkg.len, 0);
  decode_chk(&c, in + 5, len - 5, 100, &pkg, 4);
  CHECK_EQ(pkg.len, 3); /* the '\r' stays without strip_cr */
  CHECK(memcmp(pkg.data, "xy\r", 3) == 0);
  decode_chk(&c, in + 9, len - 9, 100, &pkg, 0); /* "rest": no delimiter */
  decode_chk(&c, in, 0, 100, &pkg, 0);
}

TEST(line_crlf_strip) {
  loom_codec c;
  CHECK_OK(loom_codec_line(&c, '\n', true));
  loom_pkg pkg;
  decode_chk(&c, "abc\r\n", 5, 100, &pkg, 5);
  CHECK_EQ(pkg.len, 3);
  CHECK(memcmp(pkg.data, "abc", 3) == 0);
  decode_chk(&c, "abc\n", 4, 100, &pkg, 4); /* a bare '\n' is fine too */
  CHECK_EQ(pkg.len, 3);
  decode_chk(&c, "\r\n", 2, 100, &pkg, 2);
  CHECK_EQ(pkg.len, 0);
  decode_chk(&c, "\n", 1, 100, &pkg, 1);
  CHECK_EQ(pkg.len, 0);
  decode_chk(&c, "a\r\r\n", 4, 100, &pkg, 4); /* one '\r' dropped */
  CHECK_EQ(pkg.len, 2);
  CHECK(memcmp(pkg.data, "a\r", 2) == 0);
  decode_chk(&c, "a\rb\n", 4, 100, &pkg, 4); /* only before the delim */
  CHECK_EQ(pkg.len, 3);
  decode_chk(&c, "abc\r", 4, 100, &pkg, 0);
  /* The '\r' is not counted against max_len. */
  decode_chk(&c, "abc\r\n", 5, 3, &pkg, 5);
  decode_chk(&c, "abcd\r\n", 6, 3, &pkg, -EMSGSIZE);
}

/* Without a delimiter in the first max_len + 1 bytes (+ 1 for the '\r'
 * with strip_cr) the line is too long; with fewer bytes, wait. */
TEST(line_max_len) {
  uint8_t in[64];
  memset(in, 'a', sizeof in);
  for (int strip = 0; strip < 2; strip++) {
    loom_codec c;
    CHECK_OK(loom_codec_line(&c, '\n', strip != 0));
    for (size_t max_len = 0; max_len < 8; max_len++) {
      size_t limit = max_len + 1 + (size_t)strip;
      loom_pkg pkg;
      for (size_t k = 0; k < limit; k++)
        decode_chk(&c, in, k, max_len, &pkg, 0);
      decode_chk(&c, in, limit, max_len, &pkg, -EMSGSIZE);
      decode_chk(&c, in, limit + 10, max_len, &pkg, -EMSGSIZE);
      /* A line of exactly max_len fits; one more byte does not. */
      uint8_t line[16];
      memset(line, 'b', sizeof line);
      line[max_len] = '\n';
      decode_chk(&c, line, max_len + 1, max_len, &pkg, (ssize_t)max_len + 1);
      CHECK_EQ(pkg.len, max_len);
      line[max_len] = 'b';
      line[max_len + 1] = '\n';
      decode_chk(&c, line, max_len + 2, max_len, &pkg, -EMSGSIZE);
    }
    /* max_len near SIZE_MAX: the limit does not wrap. */
    loom_pkg pkg;
    decode_chk(&c, in, sizeof in, SIZE_MAX, &pkg, 0);
    decode_chk(&c, in, sizeof in, SIZE_MAX - 1, &pkg, 0);
    decode_chk(&c, "x\n", 2, SIZE_MAX, &pkg, 2);
  }
}

TEST(line_encode) {
  loom_codec c;
  CHECK_OK(loom_codec_line(&c, '\n', true));
  loom_buf b;
  loom_buf_init(&b, 64);
  CHECK_OK(c.encode(&c, "abc", 3, 10, &b));
  CHECK_OK(c.encode(&c, "", 0, 10, &b));
  CHECK_EQ(loom_buf_len(&b), 5);
  uint8_t *p = buf_flat(&b);
  CHECK(memcmp(p, "abc\n\n", 5) == 0);
  free(p);
  CHECK_ERR(c.encode(&c, "a\nb", 3, 10, &b), -EINVAL);
  CHECK_ERR(c.encode(&c, "\n", 1, 10, &b), -EINVAL);
  CHECK_ERR(c.encode(&c, "abcdefghijk", 11, 10, &b), -EMSGSIZE);
  CHECK_EQ(loom_buf_len(&b), 5); /* nothing appended */
  CHECK_OK(c.encode(&c, "abcdefghij", 10, 10, &b));
  CHECK_EQ(loom_buf_len(&b), 16);
  loom_buf_reset(&b);
  /* Another delimiter: '\n' is then ordinary data. */
  CHECK_OK(loom_codec_line(&c, ';', false));
  CHECK_OK(c.encode(&c, "a\nb", 3, 10, &b));
  CHECK_ERR(c.encode(&c, "a;b", 3, 10, &b), -EINVAL);
  p = buf_flat(&b);
  CHECK(memcmp(p, "a\nb;", 4) == 0);
  loom_pkg pkg;
  decode_chk(&c, p, 4, 10, &pkg, 4);
  CHECK_EQ(pkg.len, 3);
  free(p);
  loom_buf_reset(&b);
}

/* Line `k` of the round trip: reference bytes, with each delimiter
 * replaced and, with strip_cr, a trailing '\r' too (decoding drops it;
 * see line_crlf_strip). */
static void line_fill(uint8_t *p, uint64_t at, size_t n, char delim,
                      bool strip) {
  ref_fill(p, at, n);
  for (size_t k = 0; k < n; k++)
    if (p[k] == (uint8_t)delim)
      p[k] = 'x';
  if (strip && n > 0 && p[n - 1] == '\r')
    p[n - 1] = 'x';
}

TEST(line_round_trip) {
  static const char delims[] = {'\n', '\0', ';'};
  rng_state = 11;
  uint8_t line[600];
  for (int iter = 0; iter < 150; iter++) {
    char delim = delims[rng_below(3)];
    bool strip = rng_below(2) != 0;
    loom_codec c;
    CHECK_OK(loom_codec_line(&c, delim, strip));
    size_t max_len = 1 + rng_below(sizeof line - 1);
    loom_buf b;
    loom_buf_init(&b, 64);
    size_t lens[20];
    uint64_t at[20], pos = (uint64_t)iter << 20;
    for (int i = 0; i < 20; i++) {
      lens[i] = rng_below(max_len + 1);
      at[i] = pos;
      line_fill(line, pos, lens[i], delim, strip);
      pos += lens[i];
      CHECK_OK(c.encode(&c, line, lens[i], max_len, &b));
    }
    uint8_t *p = buf_flat(&b);
    size_t off = 0, total = loom_buf_len(&b);
    for (int i = 0; i < 20; i++) {
      loom_pkg pkg;
      ssize_t r = decode_chk(&c, p + off, total - off, max_len, &pkg,
                             (ssize_t)lens[i] + 1);
      CHECK_EQ(pkg.len, lens[i]);
      line_fill(line, at[i], lens[i], delim, strip);
      CHECK(memcmp(pkg.data, line, lens[i]) == 0);
      off += (size_t)r;
    }
    CHECK_EQ(off, total);
    free(p);
    loom_buf_reset(&b);
  }
}

/* ------------------------------------------------------------------ */
/* Raw                                                                  */

TEST(raw_split_at_max_len) {
  loom_codec c;
  CHECK_OK(loom_codec_raw(&c));
  CHECK_STREQ(c.name, "raw");
  const char *in = "0123456789";
  loom_pkg pkg;
  decode_chk(&c, in, 10, 4, &pkg, 4);
  CHECK((const char *)pkg.data == in);
  CHECK_EQ(pkg.len, 4);
  decode_chk(&c, in + 8, 2, 4, &pkg, 2);
  CHECK_EQ(pkg.len, 2);
  decode_chk(&c, in, 10, 100, &pkg, 10);
  decode_chk(&c, in, 0, 100, &pkg, 0);
  decode_chk(&c, in, 0, 0, &pkg, 0);
  decode_chk(&c, in, 1, 0, &pkg, -EMSGSIZE); /* no byte fits in 0 */
}

TEST(raw_round_trip) {
  loom_codec c;
  CHECK_OK(loom_codec_raw(&c));
  uint8_t data[1000];
  ref_fill(data, 0, sizeof data);
  loom_buf b;
  loom_buf_init(&b, 64);
  CHECK_OK(c.encode(&c, data, 600, 600, &b));
  CHECK_OK(c.encode(&c, data + 600, 400, 600, &b));
  CHECK_OK(c.encode(&c, data, 0, 600, &b));
  CHECK_ERR(c.encode(&c, data, 601, 600, &b), -EMSGSIZE);
  CHECK_EQ(loom_buf_len(&b), 1000);
  check_buf_ref(&b, 0); /* unchanged bytes */
  uint8_t *p = buf_flat(&b);
  size_t off = 0;
  while (off < 1000) {
    loom_pkg pkg;
    size_t want = 1000 - off < 300 ? 1000 - off : 300;
    ssize_t r = decode_chk(&c, p + off, 1000 - off, 300, &pkg, (ssize_t)want);
    CHECK(memcmp(pkg.data, data + off, want) == 0);
    off += (size_t)r;
  }
  free(p);
  loom_buf_reset(&b);
}

CHECK_MAIN()
