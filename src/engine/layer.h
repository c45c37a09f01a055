/*
 * layer.h — the layers a session's bytes pass through (internal).
 *
 * A stream session reads and writes through a stack of layers: the
 * socket at the bottom, and above it the transforms the configuration
 * asks for — zlib today; TLS and WebSocket framing are the next ones.
 * Each layer is a small vtable over the layer below (curl's connection
 * filters), so the session's reader and writer never ask which
 * transforms are on: they call the top layer.
 *
 * The contract every layer keeps:
 *   read   — bytes for the layer above: a count > 0, 0 at the end of the
 *            stream, or a negative error; may park.  It may read more
 *            from below than it returns (buffering is its own business)
 *            but must return what it holds before reading again.
 *   writev — take all of iov[0..n) or fail: the count of bytes of iov
 *            (not of what went below), or a negative error; may park.
 *            Bytes are handed below in order, and before returning.
 *            A writev that fails may have handed part of what it made
 *            below: a layer with a stream of its own (zlib's window)
 *            is then broken, and every later writev fails with an
 *            error of its own (zlib: LOOM_ECOMPRESS) and writes
 *            nothing.
 *   free   — release the layer (not the one below).  The session frees
 *            the stack top down, after both of its coroutines are done.
 * One reader and one writer may use a stack at the same time; a layer
 * with state shared by both directions protects it itself.
 */
#ifndef LOOM_ENGINE_LAYER_H
#define LOOM_ENGINE_LAYER_H

#include <sys/types.h>
#include <sys/uio.h>

typedef struct loom__layer loom__layer;

typedef struct loom__layer_ops {
  const char *name;
  ssize_t (*read)(loom__layer *l, void *buf, size_t len);
  ssize_t (*writev)(loom__layer *l, const struct iovec *iov, int n);
  void (*free)(loom__layer *l);
} loom__layer_ops;

struct loom__layer {
  const loom__layer_ops *ops;
  loom__layer *below; /* NULL for the socket */
};

/* zlib streams over `below` (compress.c): one deflate stream for what is
 * written, one inflate stream for what is read, each made when first
 * needed and kept for the session's life (a stream that cannot be made
 * then fails that read or writev with -ENOMEM).  Deflate's parameters,
 * checked by the caller: level 1..9, or -1 for zlib's default;
 * window_bits 9..15; mem_level 1..9.  The inflate stream takes the
 * peer's window, whatever it is.  0 or -ENOMEM. */
int loom__zlib_layer_new(loom__layer **out, loom__layer *below, int level,
                         int window_bits, int mem_level);

#endif
