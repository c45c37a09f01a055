/*
 * compress.c — the zlib layer (layer.h): what a compressing session's
 * bytes pass through.
 *
 * A stream, not a message at a time: one deflate stream for the session's
 * writes and one inflate stream for its reads, for its whole life, so the
 * window spans packages.  Each writev — the writer's batch — is
 * compressed and ended with Z_SYNC_FLUSH, so the peer can decode
 * everything sent so far without waiting for more.  zlib's own format (a
 * 2-byte header, then deflate blocks), never finished: a peer's stream
 * that ends (Z_STREAM_END), that zlib cannot parse, or that the peer's
 * EOF cuts inside a block is LOOM_ECOMPRESS and the session closes with
 * that error.  zlib allocates through loom's hook.
 *
 * Memory.  A stream's state is most of what a compressing session costs
 * (deflate's is 256 KiB at zlib's defaults), so each is made when first
 * needed: the deflate stream at the first writev, the inflate stream
 * when the first compressed bytes arrive.  A session that never sends
 * holds no deflate state, one that never receives no inflate state, and
 * an idle session that never exchanged a byte holds only this struct.
 * The inflate stream takes the window the peer's zlib header declares
 * (inflateInit2 with windowBits 0): any peer's stream is accepted, and a
 * peer that compresses with a small window costs a small window here.
 *
 * Deflate's memory is the user's choice (compress_window_bits and
 * compress_mem_level, loom/engine.h): (1 << (window_bits + 2)) + (1 <<
 * (mem_level + 9)) bytes and about 6 KiB, at the cost of ratio.  The
 * peer learns our window from the header and needs no setting.
 *
 * Once made, the streams live as long as the session.  The inflate
 * window cannot go: the peer's deflater may refer back to anything in
 * it.  The deflate state could, between two batches: each ends with a
 * sync flush, on a block boundary, and a fresh raw deflate stream (no
 * header) with the same window could go on from there, its blocks
 * referring only to what it has sent itself — the wire format allows
 * it and the peer cannot tell.  Not done: it needs a rule for when a
 * session is idle (the writer would have to learn of the reader's
 * deadlines), and each wake-up would then cost a deflateInit and the
 * ratio of an empty window.
 */
#include <errno.h>
#include <limits.h>
#include <stdbool.h>
#include <string.h>
#include <zlib.h>

#include "engine/layer.h"
#include "loom/buf.h"
#include "loom/error.h"
#include "runtime/alloc.h"
#include "runtime/runtime.h"

/* Compressed bytes are read into ZIN_STACK bytes on the reader's stack
 * while reads are small, as the session's reader does (session.c):
 * what zlib does not take at once, and the reads after one that filled
 * the stack buffer, go to a heap buffer of ZIN_BUF bytes, which is given
 * back after ZIN_QUIET reads in a row of at most ZIN_STACK / 2 bytes, or
 * when the session's read deadline passes with nothing pending. */
#define ZIN_BUF 16384
#define ZIN_STACK ((size_t)512)
#define ZIN_QUIET 16

/* A writer batch is compressed into ZOUT_STACK bytes on the writer's
 * stack, and written below from there: a small batch (a reply) costs no
 * allocation.  Output that does not fit goes to outbuf, 16 KiB chunks on
 * the heap, given back when the batch is written.  With the 16 iovecs
 * zwritev hands below at a time (256 bytes), the buffer takes less of
 * the writer's stack than the 64 iovecs it used to (1 KiB).  The
 * session's write queue counts on this: a compressing session's queue is given
 * back as it drains (session.c, writer_main), and its next write makes a chunk
 * — in place of the one this layer made for every batch when all output went to
 * outbuf. */
#define ZOUT_STACK ((size_t)512)

/* Fields marked reader's are only touched by the reader, writer's only by
 * the writer (layer.h: one of each at a time); free sees both after they
 * are done. */
typedef struct zlayer {
  loom__layer l;
  z_stream in;     /* reader's; made when in_ready */
  z_stream out;    /* writer's; made when out_ready */
  bool in_ready;   /* reader's: inflateInit2 has run */
  bool out_ready;  /* writer's: deflateInit2 has run */
  bool owed;       /* reader's: inflate stopped with its output full, so
                      it may have more to give without more input */
  bool boundary;   /* reader's: the last inflate call that took or gave a
                      byte stopped between two blocks (data_type bit 7) */
  int err;         /* reader's: LOOM_ECOMPRESS once the peer's stream is
                      broken; every read after returns it */
  int werr;        /* writer's: LOOM_ECOMPRESS once a writev has failed
                      after deflate ran (see zwritev); every writev after
                      returns it */
  int level, window_bits, mem_level; /* deflate's, for deflateInit2 */
  uint8_t *inbuf;  /* reader's: compressed bytes read, on the heap (NULL
                      while reads are small); what in.next_in points
                      into between two reads */
  unsigned quiet;  /* reader's: small reads in a row into inbuf */
  loom_buf outbuf; /* writer's: a batch's compressed bytes for below,
                      once they outgrow the stack (zwritev) */
} zlayer;

static voidpf zalloc(voidpf opaque, uInt items, uInt size) {
  (void)opaque;
  return loom__calloc(items, size);
}

static void zfree(voidpf opaque, voidpf p) {
  (void)opaque;
  loom__free(p);
}

/* Inflate what is buffered into out[0..len): the count (0: needs more
 * input), LOOM_ECOMPRESS, or -ENOMEM.  A stream that breaks after
 * giving bytes in this call gives those first, and the error waits in
 * z->err for the next read: what the reader gets before the error does
 * not depend on how the stream was cut into reads.  Z_BLOCK stops at
 * every block boundary, so that when the input runs out, data_type
 * says whether it ran out between two blocks (see at_boundary); a
 * boundary is passed, not taken for "needs more input", until the
 * output is full or the input gone — so the empty block of a sync
 * flush that follows a batch's data is taken with it, and a small read
 * leaves nothing to keep. */
static ssize_t inflate_some(zlayer *z, void *out, size_t len) {
  uInt room = len > UINT_MAX ? UINT_MAX : (uInt)len;
  z->in.next_out = out;
  z->in.avail_out = room;
  for (;;) {
    uInt in0 = z->in.avail_in, out0 = z->in.avail_out;
    int rc = inflate(&z->in, Z_BLOCK);
    /* Z_BUF_ERROR: no progress was possible — input ran out.  Z_MEM_ERROR:
     * the window (made at the first output) could not be: the stream is
     * fine, the session is out of memory. */
    if (rc == Z_MEM_ERROR)
      return -ENOMEM;
    if (rc != Z_OK && rc != Z_BUF_ERROR) {
      /* Z_DATA_ERROR, Z_NEED_DICT, Z_STREAM_END... */
      z->err = LOOM_ECOMPRESS;
      size_t got = room - z->in.avail_out;
      return got ? (ssize_t)got : LOOM_ECOMPRESS;
    }
    /* A call that moved nothing says nothing: at a boundary it moves
     * zlib's mode from TYPE to TYPEDO without reading a bit, and
     * data_type stops saying "between two blocks" although the stream
     * still is. */
    if (z->in.avail_in != in0 || z->in.avail_out != out0)
      z->boundary = (z->in.data_type & 128) != 0;
    if (z->in.avail_out == 0 || z->in.avail_in == 0 || rc == Z_BUF_ERROR) {
      z->owed = z->in.avail_out == 0;
      return (ssize_t)(room - z->in.avail_out);
    }
  }
}

/* Whether the peer's stream may end here without losing a byte: nothing
 * came at all, or inflate stopped between two blocks (after a block's
 * end, or after the header: `boundary`) and holds no input it has not
 * decoded.  Every batch of a loom writer ends with a flush, so its
 * stream always stops between blocks; a stream cut inside one lost what
 * that block carried, which inflate cannot tell from "more is coming". */
static bool at_boundary(zlayer *z) {
  return !z->in_ready || z->in.total_in == 0 ||
         (z->boundary && z->in.avail_in == 0);
}

/* Move what zlib has not taken of a read into the stack buffer to the
 * heap buffer (made now if need be), where the next call finds it. */
static int unstack(zlayer *z) {
  if (z->in.avail_in == 0) {
    z->in.next_in = NULL; /* not into a frame that is going */
    return 0;
  }
  if (!z->inbuf && !(z->inbuf = loom__malloc(ZIN_BUF))) {
    z->in.next_in = NULL; /* lost, and the read fails with -ENOMEM */
    z->in.avail_in = 0;
    return -ENOMEM;
  }
  memcpy(z->inbuf, z->in.next_in, z->in.avail_in);
  z->in.next_in = z->inbuf;
  return 0;
}

/* The heap buffer is given back when nothing in it is pending. */
static void shed(zlayer *z) {
  loom__free(z->inbuf);
  z->inbuf = NULL;
  z->quiet = 0;
}

static ssize_t zread(loom__layer *l, void *buf, size_t len) {
  zlayer *z = (zlayer *)l;
  _Alignas(16) uint8_t stack_buf[ZIN_STACK];
  bool from_socket = false, on_stack = false;
  if (z->err)
    return z->err;
  for (;;) {
    /* With no input left, only if inflate may owe output of what it
     * has taken (the rest of a match, of a stored block): else the call
     * has nothing to do. */
    ssize_t got = z->in_ready && (z->in.avail_in > 0 || z->owed)
                      ? inflate_some(z, buf, len)
                      : 0;
    if (on_stack) {
      /* This frame's buffer is about to go: keep what zlib has not
       * taken, unless the stream is broken, and point nowhere into it. */
      on_stack = false;
      if (got < 0 || z->err) {
        z->in.next_in = NULL;
        z->in.avail_in = 0;
      } else {
        int rc = unstack(z);
        if (rc < 0)
          return rc;
      }
    }
    if (got > 0 && !from_socket)
      /* Inflated from what was buffered: no socket read, so no chance
       * to park.  One read of a well-compressed stream feeds thousands
       * of these; count them as I/O, which yields now and then. */
      loom__io_progress();
    if (got != 0)
      return got;
    /* Nothing more from what is buffered: read compressed bytes after
     * any zlib has not taken yet.  Pending bytes are on the heap (the
     * stack's were moved there above). */
    size_t keep = z->in.avail_in;
    if (keep == 0 && z->inbuf && z->quiet >= ZIN_QUIET)
      shed(z); /* reads have been small for a while */
    ssize_t n;
    if (!z->inbuf) {
      n = l->below->ops->read(l->below, stack_buf, ZIN_STACK);
      if (n > 0) {
        on_stack = true;
        z->in.next_in = stack_buf;
      }
    } else {
      if (keep)
        memmove(z->inbuf, z->in.next_in, keep);
      z->in.next_in = z->inbuf; /* also if the read below returns nothing */
      if (keep == ZIN_BUF)
        return z->err = LOOM_ECOMPRESS; /* a full buffer and no progress */
      n = l->below->ops->read(l->below, z->inbuf + keep, ZIN_BUF - keep);
      if (n > 0 && (size_t)n <= ZIN_STACK / 2)
        z->quiet += z->quiet < ZIN_QUIET;
      else if (n > 0)
        z->quiet = 0;
    }
    if (n == 0 && !at_boundary(z))
      return z->err = LOOM_ECOMPRESS; /* the stream ends inside a block */
    if (n == -ETIMEDOUT && keep == 0 && z->inbuf)
      shed(z); /* the session's deadline (cron, idle check): quiet */
    if (n <= 0)
      return n;
    from_socket = true; /* the socket read counted itself */
    if (!z->in_ready) {
      /* windowBits 0: the window the stream's header asks for. */
      if (inflateInit2(&z->in, 0) != Z_OK)
        return -ENOMEM; /* Z_MEM_ERROR: the arguments are right */
      z->in_ready = true;
    }
    z->in.avail_in = (uInt)(keep + (size_t)n);
    if (on_stack && (size_t)n == ZIN_STACK && !z->inbuf)
      /* A full read: more is coming, read it in larger gulps.  Without
       * memory, go on with the stack. */
      z->inbuf = loom__malloc(ZIN_BUF);
  }
}

/* Where a batch's compressed bytes go: ZOUT_STACK bytes on the writer's
 * stack while they fit, then outbuf, which takes over what the stack
 * holds.  They are in one of the two, never in both. */
typedef struct zout {
  uint8_t *st;
  size_t used; /* bytes in st */
} zout;

/* Run deflate over the current input with `flush`, output to o. */
static int deflate_into(zlayer *z, int flush, zout *o) {
  do {
    bool stack = o->used < ZOUT_STACK && loom_buf_len(&z->outbuf) == 0;
    size_t room = stack ? ZOUT_STACK - o->used : 4096;
    uint8_t *p = o->st + o->used;
    if (!stack) {
      if (o->used && loom_buf_append(&z->outbuf, o->st, o->used) < 0)
        return -ENOMEM;
      o->used = 0;
      if (!(p = loom_buf_reserve(&z->outbuf, room)))
        return -ENOMEM;
    }
    z->out.next_out = p;
    z->out.avail_out = (uInt)room;
    deflate(&z->out, flush); /* cannot fail on a valid stream */
    if (stack)
      o->used += room - z->out.avail_out;
    else
      loom_buf_commit(&z->outbuf, room - z->out.avail_out);
    /* Done when deflate left output room: it has nothing more to say. */
  } while (z->out.avail_out == 0 || z->out.avail_in > 0);
  return 0;
}

static ssize_t zwritev(loom__layer *l, const struct iovec *iov, int n) {
  zlayer *z = (zlayer *)l;
  _Alignas(16) uint8_t stack_out[ZOUT_STACK];
  zout o = {stack_out, 0};
  size_t total = 0;
  int rc = 0;
  if (z->werr)
    return z->werr;
  if (!z->out_ready) {
    if (deflateInit2(&z->out, z->level, Z_DEFLATED, z->window_bits,
                     z->mem_level, Z_DEFAULT_STRATEGY) != Z_OK)
      return -ENOMEM; /* Z_MEM_ERROR: the parameters were checked */
    z->out_ready = true;
  }
  for (int i = 0; i < n && rc == 0; i++) {
    const uint8_t *p = iov[i].iov_base;
    size_t left = iov[i].iov_len;
    total += left;
    while (left && rc == 0) {
      uInt chunk = left > UINT_MAX ? UINT_MAX : (uInt)left;
      z->out.next_in = (Bytef *)(uintptr_t)p;
      z->out.avail_in = chunk;
      rc = deflate_into(z, Z_NO_FLUSH, &o);
      p += chunk;
      left -= chunk;
    }
  }
  z->out.next_in = NULL;
  z->out.avail_in = 0;
  if (rc == 0)
    rc = deflate_into(z, Z_SYNC_FLUSH, &o);
  size_t sent = 0; /* of the stack's bytes */
  while (rc == 0 && (sent < o.used || loom_buf_len(&z->outbuf))) {
    /* 16 pieces, as the session's writer takes (loom_writev copies a
     * longer vector to the heap). */
    struct iovec zv[16];
    int zn = 1;
    if (o.used)
      zv[0] = (struct iovec){o.st + sent, o.used - sent};
    else
      zn = loom_buf_peek(&z->outbuf, zv, 16);
    ssize_t k = l->below->ops->writev(l->below, zv, zn);
    if (k < 0)
      rc = (int)k;
    else if (o.used)
      sent += (size_t)k;
    else
      loom_buf_consume(&z->outbuf, (size_t)k);
  }
  /* Drained: an idle session holds no buffer.  After a failure the
   * stream is broken: deflate has taken the batch into its history and
   * the peer missed some of what it made of it (part went below, or
   * none, for want of memory), so any block after would be read
   * against the wrong history.  What is left is dropped and no writev
   * goes on with the stream.  The session's writer never tries (it ends
   * the session at its first failed write); the layer does not count on
   * that. */
  if (rc < 0) {
    z->werr = LOOM_ECOMPRESS;
    loom_buf_reset(&z->outbuf);
  } else if (loom_buf_len(&z->outbuf) == 0) {
    loom_buf_reset(&z->outbuf);
  }
  return rc < 0 ? rc : (ssize_t)total;
}

static void zlayer_free(loom__layer *l) {
  zlayer *z = (zlayer *)l;
  if (z->in_ready)
    inflateEnd(&z->in);
  if (z->out_ready)
    deflateEnd(&z->out);
  loom_buf_reset(&z->outbuf);
  loom__free(z->inbuf);
  loom__free(z);
}

static const loom__layer_ops zlib_ops = {"zlib", zread, zwritev, zlayer_free};

int loom__zlib_layer_new(loom__layer **out, loom__layer *below, int level,
                         int window_bits, int mem_level) {
  zlayer *z = loom__calloc(1, sizeof *z);
  if (!z)
    return -ENOMEM;
  z->in.zalloc = z->out.zalloc = zalloc;
  z->in.zfree = z->out.zfree = zfree;
  z->level = level < 0 ? Z_DEFAULT_COMPRESSION : level;
  z->window_bits = window_bits;
  z->mem_level = mem_level;
  loom_buf_init(&z->outbuf, 0);
  z->l.ops = &zlib_ops;
  z->l.below = below;
  *out = &z->l;
  return 0;
}
