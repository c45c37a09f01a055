/* netfd.c — the reference-counted close protocol (see netfd.h). */
#include "net/netfd.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "loom/error.h"
#include "net/export_test.h"
#include "runtime/alloc.h"
#include "runtime/runtime.h"

#define CLOSED ((uint64_t)1 << 63)

static void abandon(loom__rtobj *o);

int loom__netfd_init(loom__netfd *f, int fd, int family, int type) {
  loom__rt *rt = loom__rt_get();
  if (rt == NULL)
    return LOOM_ENORUNTIME;
  memset(f, 0, sizeof *f);
  f->fd = fd;
  f->family = family;
  f->type = type;
  f->rt = rt;
  atomic_init(&f->ref, 0);
  int err = loom__pd_open(rt, fd, &f->pd);
  if (err != 0)
    return err;
  f->obj.abandon = abandon;
  loom__rt_track(rt, &f->obj);
  return 0;
}

/* Remove the file bind() made, once: at the close (as Go's Close), so
 * the path is free when loom_close returns even while a blocked call is
 * still on its way out, and so that call's leaving cannot remove a file
 * a new socket has bound since; or at teardown if nobody closed f. */
static void unlink_bound(loom__netfd *f) {
  if (f->unlink_path != NULL) {
    int saved = errno;
    unlink(f->unlink_path);
    errno = saved;
    loom__free(f->unlink_path);
    f->unlink_path = NULL;
  }
}

static void release_fd(loom__netfd *f) {
  unlink_bound(f);
  int saved = errno;
  close(f->fd);
  errno = saved;
  f->free_fn(f);
}

/* Runtime teardown: the coroutines that would have closed f are gone. */
static void abandon(loom__rtobj *o) {
  loom__netfd *f = (loom__netfd *)(void *)o; /* obj is the first member */
  release_fd(f);
}

static void destroy(loom__netfd *f) {
  loom__rt_untrack(f->rt, &f->obj);
  /* The fd is ours and closed next, which drops its registration; a
   * late event for it finds the pd's tag changed. */
  loom__pd_close(f->pd, false);
  loom__sema *closed = f->closed;
  release_fd(f);
  if (closed != NULL)
    loom__sema_release(closed); /* the closer may go on: f is gone */
}

/* The path to remove the file by: a relative one made absolute, so that
 * a chdir between the bind and the close cannot leave the socket's file
 * and remove another one of that name.  As given if the working directory
 * has no name to read (removed, or too long); NULL without memory. */
static char *path_to_remove(const char *path) {
  char cwd[PATH_MAX];
  if (path[0] == '/' || getcwd(cwd, sizeof cwd) == NULL)
    return loom__strdup(path);
  size_t nc = strlen(cwd), np = strlen(path);
  char *abs = loom__malloc(nc + 1 + np + 1);
  if (abs != NULL) {
    memcpy(abs, cwd, nc);
    abs[nc] = '/';
    memcpy(abs + nc + 1, path, np + 1);
  }
  return abs;
}

int loom__netfd_init_bound(loom__netfd *f, int fd, int family, int type,
                           const char *path) {
  bool file = path != NULL && path[0] != '@';
  char *copy = file ? path_to_remove(path) : NULL;
  int err = f == NULL || (file && copy == NULL)
                ? -ENOMEM
                : loom__netfd_init(f, fd, family, type);
  if (err != 0) {
    loom__free(copy);
    close(fd);
    if (file)
      unlink(path);
    return err;
  }
  f->unlink_path = copy;
  return 0;
}

bool loom__netfd_acquire(loom__netfd *f) {
  uint64_t v = atomic_fetch_add(&f->ref, 1);
  if (v & CLOSED) {
    loom__netfd_release(f);
    return false;
  }
  return true;
}

void loom__netfd_release(loom__netfd *f) {
  if (atomic_fetch_sub(&f->ref, 1) - 1 == CLOSED)
    destroy(f);
}

bool loom__netfd_closed(loom__netfd *f) {
  return (atomic_load(&f->ref) & CLOSED) != 0;
}

int loom__netfd_check(loom__netfd *f, int mode) {
  if (loom__netfd_closed(f))
    return LOOM_ECLOSED;
  return loom__pd_expired(f->pd, mode) ? -ETIMEDOUT : 0;
}

/* ---- a call: reference, turn, cut ------------------------------------ */

void (*loom__test_ctx_op_done)(loom_ctx *ctx, ssize_t r);

/* The call's hook: a cancel that finds the call waiting for its turn
 * ends that wait; once the turn is the call's, it is cut: the
 * direction's deadline expires. */
static void cancel_fire(void *arg) {
  loom__netfd_call *call = arg;
  if (!loom__sema_cancel(call->turn, &call->sw))
    loom__pd_cancel_fire(&call->pc);
}

/* Hook the call on its context: 0, or the reason of one done already. */
static int arm(loom__netfd_call *call) {
  call->hook = (loom__ctx_hook){.fn = cancel_fire, .arg = call};
  call->armed = loom__ctx_hook_add(call->ctx, &call->hook, loom__getg());
  return call->armed ? 0 : loom__ctx_reason(call->ctx);
}

/* Unhook: afterwards cancel_fire is not running and will not run. */
static void disarm(loom__netfd_call *call) {
  if (call->armed) {
    loom__ctx_unhook(call->ctx, &call->hook);
    call->armed = false;
  }
}

static ssize_t finish(loom__netfd_call *call, ssize_t r);

int loom__netfd_enter_ctx(loom__netfd_call *call, int mode) {
  int e = loom__ctx_reason(call->ctx);
  if (e != 0)
    return e;
  if (!loom__netfd_acquire(call->f))
    return LOOM_ECLOSED;
  call->armed = false;
  call->sw.state = LOOM__SEMA_IDLE;
  call->pc = (loom__pd_cancel){.pd = call->f->pd, .mode = mode};
  e = loom__netfd_resume(call);
  return e != 0 ? (int)finish(call, e) : 0;
}

ssize_t loom__netfd_leave_ctx(loom__netfd_call *call, ssize_t r) {
  if (call->armed && loom__test_ctx_op_done != NULL)
    loom__test_ctx_op_done(call->ctx, r);
  return finish(call, r);
}

static ssize_t finish(loom__netfd_call *call, ssize_t r) {
  disarm(call);
  if (call->pc.fired) {
    if (r == -ETIMEDOUT) {
      r = loom__ctx_reason(call->ctx);
      loom__pd_cancel_clear(&call->pc); /* the deadline stays passed */
    } else {
      (void)loom__pd_cancel_undo(&call->pc); /* failing, it stays passed */
    }
  } else if (r == -ETIMEDOUT && loom__ctx_reason(call->ctx) != 0) {
    r = loom__ctx_reason(call->ctx);
  }
  /* Unhooked, nothing else changes sw: no lock needed to read it. */
  if (call->sw.state == LOOM__SEMA_HELD)
    loom__sema_release_c(call->turn, &call->sw);
  loom__netfd_release(call->f);
  return r;
}

int loom__netfd_pause(loom__netfd_call *call) {
  if (call->ctx == NULL) {
    loom__sema_release(call->turn);
    return 0;
  }
  disarm(call);
  /* Cut short: the deadline has passed, and the call fails as it would
   * at its next check, which leave reports as the context's reason,
   * leaving the deadline passed (an error of another kind would undo
   * the cut as if the call had completed). */
  if (call->pc.fired)
    return -ETIMEDOUT;
  loom__sema_release_c(call->turn, &call->sw);
  return 0;
}

int loom__netfd_resume(loom__netfd_call *call) {
  if (call->ctx == NULL) {
    loom__sema_acquire(call->turn);
    return 0;
  }
  int e = arm(call);
  if (e != 0)
    return e;
  return loom__sema_acquire_c(call->turn, &call->sw)
             ? 0
             : loom__ctx_reason(call->ctx);
}

int loom__netfd_close(loom__netfd *f) {
  /* Hold a reference while evicting, so nobody frees f under us. */
  atomic_fetch_add(&f->ref, 1);
  uint64_t v = atomic_fetch_or(&f->ref, CLOSED);
  if (v & CLOSED) {
    loom__netfd_release(f);
    return LOOM_ECLOSED;
  }
  /* Only this first closer gets here; destroy, which reads unlink_path
   * too, runs after our release below. */
  unlink_bound(f);
  /* On a coroutine, wait for whoever drops the last reference to close
   * the fd, as Go's Close does: when this returns, the descriptor is
   * closed and its address (a port a parked accept held) free.  A sema
   * on our stack, taken now, that destroy releases (its last touch of
   * it); elsewhere (a plain thread, a blocking section) nothing waits. */
  loom__m *m = loom__getm();
  loom__sema closed = {0};
  bool wait = loom__getg() != NULL && m != NULL && m->p != NULL;
  if (wait) {
    loom__sema_acquire(&closed);
    f->closed = &closed;
  }
  loom__pd_evict(f->pd);
  loom__netfd_release(f);
  if (wait)
    loom__sema_acquire(&closed); /* released by destroy */
  return 0;
}

/* rd for reads and wd for writes, of the directions in `mode`. */
static int set_deadlines(loom__netfd *f, int mode, int64_t rd, int64_t wd) {
  if (f == NULL)
    return -EINVAL;
  /* Any thread: one without a P arms a deadline ahead on the runtime's
   * heap for such threads (loom__arm_begin). */
  if (!loom__netfd_acquire(f))
    return LOOM_ECLOSED;
  int err = loom__pd_set_deadlines(f->pd, mode, rd, wd);
  loom__netfd_release(f);
  return err;
}

int loom__netfd_set_deadline(loom__netfd *f, int mode, int64_t d) {
  return set_deadlines(f, mode, d, d);
}

int loom__netfd_set_buffers(loom__netfd *f, int rcvbuf, int sndbuf) {
  if (rcvbuf > 0 &&
      setsockopt(f->fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf) != 0)
    return -loom__errno();
  if (sndbuf > 0 &&
      setsockopt(f->fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf) != 0)
    return -loom__errno();
  return 0;
}

int loom__netfd_set_deadlines(loom__netfd *f, int64_t rd, int64_t wd) {
  return set_deadlines(f, 'r' + 'w', rd, wd);
}
