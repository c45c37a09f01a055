/*
 * loom/fd.h — waiting for any pollable file descriptor.
 *
 * For fds loom does not own: a pipe, an eventfd, a signalfd, a foreign
 * library's socket.  The waiting coroutine parks; its thread runs other
 * coroutines meanwhile.  (loom's own sockets wait inside the net API.)
 */
#ifndef LOOM_FD_H
#define LOOM_FD_H

#include <stdint.h>

#include "loom/common.h"
#include "loom/ctx.h"
#include "loom/error.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LOOM_FD_READ 1  /* readable, or the peer hung up, or an error */
#define LOOM_FD_WRITE 2 /* writable, or an error */

/*
 * loom_fd_wait — park until `fd` is ready for `events` (LOOM_FD_READ,
 * LOOM_FD_WRITE, or both: then until it is ready for either, as a
 * library that needs one or the other asks — a TLS handshake, a database
 * client flushing while it reads) or until `deadline` (an absolute
 * loom_now() time; 0: no deadline).
 *
 * An fd that is ready already returns at once, even with a deadline in
 * the past.  Readiness is a hint, as with poll(2): the next read or write
 * may still find EAGAIN, and a caller loops.  The fd need not be
 * non-blocking, but it should be, or that read may block the thread.
 * Outside a coroutine the calling thread waits in poll(2).
 *
 * Returns 0 when ready (for both: one of them is; try each operation);
 * -ETIMEDOUT when the deadline passed first; -EINVAL for bad `events`;
 * -EBADF for a bad fd; -EPERM for an fd the poller cannot take that
 * poll(2) did not find ready (a regular file or a directory is always
 * ready, as with poll(2): 0 at once); -EBUSY when another coroutine is
 * already waiting on the same fd in the same direction through
 * loom_fd_wait (one reader and one writer may wait at once; a wait for
 * both directions excludes every other), or when the fd is one of
 * loom's own sockets (the poller watches it already: wait through the
 * net API); -ENOMEM.
 * Parks.  Thread-safe.  The fd must stay open until the call returns.
 */
LOOM_API int loom_fd_wait(int fd, int events, int64_t deadline);

/* As loom_fd_wait, but a cancel of `ctx` ends the wait with its reason
 * (-ECANCELED, -ETIMEDOUT).  Where the thread waits in poll(2) (a plain
 * thread, or inside loom_block_enter/exit), the wait takes an eventfd
 * for the cancel to wake it (or, with no descriptor left for one, looks
 * at the context every 5 ms). */
LOOM_API int loom_fd_wait_ctx(int fd, int events, int64_t deadline,
                              loom_ctx *ctx);

#ifdef __cplusplus
}
#endif
#endif /* LOOM_FD_H */
