/*
 * loom/chan.h — channels and select, with Go's semantics.
 *
 * A channel carries fixed-size elements (copied in and out).  Unbuffered
 * (cap 0): a send completes when a receiver takes the element, handed
 * directly from one to the other.  Buffered: a send waits only while the
 * buffer is full.  Waiters queue in arrival order (FIFO) on both sides.
 * Closing wakes everybody: receivers drain what is buffered and then see
 * "closed"; a send on a closed channel fails with -EPIPE (no crash).
 * A NULL channel: sends, receives and close fail with -EINVAL at once
 * (Go blocks for ever or panics there); a NULL case of loom_select is
 * never ready, as a nil channel in Go's select.
 *
 * Channels work from coroutines (which park) and from plain threads of
 * the process (which block in the kernel, without a runtime, too); the
 * two can talk to each other.  Every call is thread-safe.  Coroutines
 * still blocked on a channel when their loom_run returns leave it as if
 * they had never waited (runtime.h): it can go on being used, and freed.
 *
 * Deadlines are absolute loom_now() times; 0 means none.  A wait with a
 * deadline ahead needs a timer: when none can be had, it returns -ENOMEM
 * at once (besides the results each call lists).
 */
#ifndef LOOM_CHAN_H
#define LOOM_CHAN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "loom/common.h"
#include "loom/error.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct loom_chan loom_chan;

/*
 * loom_chan_make — a channel of elements of `elem_size` bytes (0 is
 * allowed: a channel of signals) buffering up to `cap` of them.
 * Returns 0 and *c, -EINVAL (elem_size * cap overflows), -ENOMEM.
 * The caller owns the channel and frees it with loom_chan_free.
 */
LOOM_API int loom_chan_make(loom_chan **c, size_t elem_size, size_t cap);

/* Free a channel nobody waits on any more (waiters: the process stops
 * with a message).  NULL is a no-op. */
LOOM_API void loom_chan_free(loom_chan *c);

/*
 * loom_chan_send — copy *elem into the channel, waiting while it has no
 * room (unbuffered: until a receiver takes it).  Returns 0, -EPIPE if the
 * channel is or becomes closed (the element was not sent), -EINVAL for a
 * NULL channel or a NULL elem (allowed only when elem_size is 0).  Parks.
 * loom_chan_send_until gives up at `deadline` with -ETIMEDOUT.
 */
LOOM_API int loom_chan_send(loom_chan *c, const void *elem);
LOOM_API int loom_chan_send_until(loom_chan *c, const void *elem,
                                  int64_t deadline);

/*
 * loom_chan_recv — take the next element into *elem (elem may be NULL to
 * drop it).  Returns 1 with an element; 0 when the channel is closed and
 * drained (*elem untouched); -EINVAL for a NULL channel.  Parks.
 * loom_chan_recv_until gives up at `deadline` with -ETIMEDOUT.
 */
LOOM_API int loom_chan_recv(loom_chan *c, void *elem);
LOOM_API int loom_chan_recv_until(loom_chan *c, void *elem, int64_t deadline);

/* Without waiting: 0 / 1 as above, or -EAGAIN when the call would wait. */
LOOM_API int loom_chan_try_send(loom_chan *c, const void *elem);
LOOM_API int loom_chan_try_recv(loom_chan *c, void *elem);

/* Close: wakes every waiter.  Returns 0, -EPIPE if already closed, or
 * -EINVAL for NULL.
 * Once every other call on the channel has returned, the channel may be
 * freed even while the close itself has not (the waiter it woke frees
 * it): close touches it no more after the last waiter is released. */
LOOM_API int loom_chan_close(loom_chan *c);

/* Elements buffered now, and the capacity.  Any thread; a snapshot.
 * Both are 0 for a NULL channel (Go's len and cap of a nil channel). */
LOOM_API size_t loom_chan_len(loom_chan *c);
LOOM_API size_t loom_chan_cap(loom_chan *c);

/* One case of loom_select. */
typedef enum { LOOM_SEND = 1, LOOM_RECV = 2 } loom_case_dir;
typedef struct loom_case {
  loom_chan *chan;   /* NULL: the case is never ready (as a nil channel) */
  loom_case_dir dir;
  void *elem;        /* send: the element; recv: where to put it (or NULL) */
  bool ok;           /* out: true if the element moved; false if the
                        channel was closed (recv: drained; send: nothing
                        was sent) */
} loom_case;

/* A deadline for loom_select meaning "do not wait" (Go's default case). */
#define LOOM_SELECT_NOWAIT INT64_C(-1)

/*
 * loom_select — wait until one of `n` cases can proceed, do it, and
 * return its index.  Among cases ready at the same time one is chosen
 * uniformly at random.  A case on a closed channel is ready: a receive
 * returns with ok false once the buffer is drained, a send returns with
 * ok false and nothing sent (Go panics there; loom reports).  Returns the
 * index; -ETIMEDOUT at
 * `deadline` (0: none); -EAGAIN with LOOM_SELECT_NOWAIT when no case is
 * ready; -EINVAL for n < 0, n > 1024, a bad case (a direction that is
 * neither, a send with a NULL elem on a channel whose elem_size is not
 * 0), or no channel and no deadline (which would wait forever); -ENOMEM. Parks.
 * Two selects over the same channels in different orders never deadlock
 * (channels are locked in address order).
 */
LOOM_API int loom_select(loom_case *cases, int n, int64_t deadline);

#ifdef __cplusplus
}
#endif
#endif /* LOOM_CHAN_H */
