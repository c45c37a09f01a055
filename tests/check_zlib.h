/*
 * check_zlib.h — the tests' end of a compressed stream: the inflate loop
 * that turns what a compressing session sent into its plain bytes,
 * shared by the tests that read the engine's zlib streams with zlib
 * itself (test_compress.c, test_engine_edge.c, test_engine_focus.c,
 * test_engine_chaos.c).
 */
#ifndef LOOM_TESTS_CHECK_ZLIB_H
#define LOOM_TESTS_CHECK_ZLIB_H

#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <zlib.h>

#include "check.h"

/*
 * Inflate in[0..n) into out[*outlen..cap) with Z_SYNC_FLUSH, as a peer
 * reads a loom writer's batches: until the input is used up or the
 * output is full, adding what comes out to *outlen.  Returns the bytes
 * of `in` taken (all n unless the output filled; call again with the
 * rest and more room).  Any zlib error fails the test, naming `what`: a
 * corrupt stream, a preset dictionary, and a stream that ends
 * (Z_STREAM_END: a loom writer never ends its stream).
 */
static inline size_t check_inflate(z_stream *zi, const void *in, size_t n,
                                   void *out, size_t cap, size_t *outlen,
                                   const char *what) {
  CHECK_LE(n, UINT_MAX);
  CHECK_LE(*outlen, cap);
  zi->next_in = (Bytef *)(uintptr_t)in;
  zi->avail_in = (uInt)n;
  while (zi->avail_in > 0 && *outlen < cap) {
    size_t room = cap - *outlen < UINT_MAX ? cap - *outlen : UINT_MAX;
    zi->next_out = (Bytef *)out + *outlen;
    zi->avail_out = (uInt)room;
    int zr = inflate(zi, Z_SYNC_FLUSH);
    CHECKF(zr == Z_OK || zr == Z_BUF_ERROR, "%s: inflate %d (%s)", what, zr,
           zi->msg ? zi->msg : "");
    *outlen += room - zi->avail_out;
    if (zr == Z_BUF_ERROR) /* no progress possible: nothing more to do */
      break;
  }
  return n - zi->avail_in;
}

#endif
