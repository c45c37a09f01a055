/*
 * test_netpoll.c — the poller and loom_fd_wait, against real pipes and
 * eventfds: readiness wakes a parked coroutine (and only then), deadlines,
 * many waiters at once, bad input, waiting outside a coroutine.
 */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "check.h"
#include "loom.h"
#include "netpoll/netpoll.h"
#include "netpoll/pollfd.h"
#include "runtime/runtime.h"

static void make_pipe(int p[2]) {
  CHECK_EQ(pipe2(p, O_NONBLOCK | O_CLOEXEC), 0);
}

/* ------------------------------------------------------------------ */
/* A reader parks until a writer writes; others run meanwhile.          */

static int rw_pipe[2];
static atomic_long ticks;
static atomic_int reader_done, writer_wrote;
static int64_t reader_waited;

static void reader(void *arg) {
  (void)arg;
  int64_t t0 = loom_now();
  CHECK_OK(loom_fd_wait(rw_pipe[0], LOOM_FD_READ, 0));
  reader_waited = loom_now() - t0;
  CHECK(atomic_load(&writer_wrote));
  char c;
  CHECK_EQ(read(rw_pipe[0], &c, 1), 1);
  CHECK_EQ(c, 'x');
  atomic_store(&reader_done, 1);
}

static void ticker(void *arg) {
  (void)arg;
  while (!atomic_load(&reader_done)) {
    atomic_fetch_add(&ticks, 1);
    loom_sleep(CHECK_MS);
  }
}

static void read_main(void *arg) {
  (void)arg;
  make_pipe(rw_pipe);
  CHECK_OK(loom_go(reader, NULL));
  CHECK_OK(loom_go(ticker, NULL));
  loom_sleep(30 * CHECK_MS);
  CHECK(!atomic_load(&reader_done)); /* nothing to read: still parked */
  atomic_store(&writer_wrote, 1);
  CHECK_EQ(write(rw_pipe[1], "x", 1), 1);
  while (!atomic_load(&reader_done))
    loom_sleep(CHECK_MS);
  close(rw_pipe[0]);
  close(rw_pipe[1]);
}

TEST(read_wakes_on_write) {
  check_run(read_main, NULL, 1);
  CHECK_GE(reader_waited, 25 * CHECK_MS);
  /* One P: the ticker ran while the reader waited, so the reader parked
   * its coroutine, not the thread. */
  CHECK_GE(atomic_load(&ticks), 5);
}

/* ------------------------------------------------------------------ */
/* Deadlines.                                                           */

static void deadline_main(void *arg) {
  (void)arg;
  int p[2];
  make_pipe(p);
  int64_t t0 = loom_now();
  CHECK_ERR(loom_fd_wait(p[0], LOOM_FD_READ, t0 + 30 * CHECK_MS), -ETIMEDOUT);
  int64_t el = loom_now() - t0;
  CHECK_GE(el, 30 * CHECK_MS);
  CHECK_LT(el, 2000 * CHECK_MS);
  /* Passed deadline, nothing ready: at once. */
  CHECK_ERR(loom_fd_wait(p[0], LOOM_FD_READ, loom_now() - 1), -ETIMEDOUT);
  /* Passed deadline, but ready: ready wins. */
  CHECK_EQ(write(p[1], "y", 1), 1);
  CHECK_OK(loom_fd_wait(p[0], LOOM_FD_READ, loom_now() - 1));
  /* Ready before the deadline: 0, and the deadline timer is harmless
   * afterwards (it fires into a pd that has moved on). */
  char c;
  CHECK_EQ(read(p[0], &c, 1), 1);
  CHECK_OK(loom_fd_wait(p[1], LOOM_FD_WRITE, loom_now() + 5 * CHECK_MS));
  loom_sleep(10 * CHECK_MS);
  close(p[0]);
  close(p[1]);
}

TEST(deadlines) { check_run(deadline_main, NULL, 2); }

/* ------------------------------------------------------------------ */
/* A writer parks on a full pipe until the reader drains some.          */

static int full_pipe[2];
static atomic_int wrote_after_full;

static void blocked_writer(void *arg) {
  (void)arg;
  CHECK_OK(loom_fd_wait(full_pipe[1], LOOM_FD_WRITE, 0));
  CHECK_EQ(write(full_pipe[1], "z", 1), 1);
  atomic_store(&wrote_after_full, 1);
}

static void write_main(void *arg) {
  (void)arg;
  static char buf[65536];
  make_pipe(full_pipe);
  while (write(full_pipe[1], buf, sizeof buf) > 0)
    ;
  while (write(full_pipe[1], buf, 1) > 0)
    ;
  CHECK_EQ(errno, EAGAIN);
  CHECK_OK(loom_go(blocked_writer, NULL));
  loom_sleep(20 * CHECK_MS);
  CHECK(!atomic_load(&wrote_after_full));
  /* Drain a page: the pipe becomes writable. */
  while (read(full_pipe[0], buf, sizeof buf) > 0)
    ;
  while (!atomic_load(&wrote_after_full))
    loom_sleep(CHECK_MS);
  close(full_pipe[0]);
  close(full_pipe[1]);
}

TEST(write_waits_for_room) { check_run(write_main, NULL, 2); }

/* ------------------------------------------------------------------ */
/* Many waiters at once, woken in a shuffled order, each exactly once.  */

#define MANY 1000
static int many_fds[MANY][2];
static atomic_int many_woke[MANY];
static atomic_int many_done;

static void many_reader(void *arg) {
  long i = (long)arg;
  CHECK_OK(loom_fd_wait(many_fds[i][0], LOOM_FD_READ,
                        loom_now() + 20000 * CHECK_MS));
  char c;
  CHECK_EQ(read(many_fds[i][0], &c, 1), 1);
  CHECK_EQ(c, (char)(i & 0x7f));
  atomic_fetch_add(&many_woke[i], 1);
  atomic_fetch_add(&many_done, 1);
}

static void many_main(void *arg) {
  (void)arg;
  long order[MANY];
  for (long i = 0; i < MANY; i++) {
    make_pipe(many_fds[i]);
    order[i] = i;
    CHECK_OK(loom_go(many_reader, (void *)i));
  }
  loom_sleep(20 * CHECK_MS); /* all parked */
  CHECK_EQ(atomic_load(&many_done), 0);
  srand(7);
  for (long i = MANY - 1; i > 0; i--) {
    long j = rand() % (i + 1), t = order[i];
    order[i] = order[j];
    order[j] = t;
  }
  for (long k = 0; k < MANY; k++) {
    char c = (char)(order[k] & 0x7f);
    CHECK_EQ(write(many_fds[order[k]][1], &c, 1), 1);
    if (k % 50 == 0)
      loom_yield();
  }
  while (atomic_load(&many_done) < MANY)
    loom_sleep(CHECK_MS);
  loom_sleep(5 * CHECK_MS);
  for (long i = 0; i < MANY; i++) {
    CHECK_EQ(atomic_load(&many_woke[i]), 1);
    close(many_fds[i][0]);
    close(many_fds[i][1]);
  }
}

TEST(many_waiters_one_proc) { check_run(many_main, NULL, 1); }
TEST(many_waiters_two_procs) { check_run(many_main, NULL, 2); }

/* ------------------------------------------------------------------ */
/* eventfd, bad input, a second waiter, outside a coroutine.            */

static int efd;
static atomic_int ev_woke;
static void ev_waiter(void *arg) {
  (void)arg;
  CHECK_OK(loom_fd_wait(efd, LOOM_FD_READ, 0));
  atomic_store(&ev_woke, 1);
}
static void ev_second(void *arg) {
  (void)arg;
  /* The first waiter holds the fd's registration. */
  CHECK_ERR(loom_fd_wait(efd, LOOM_FD_READ, 0), -EBUSY);
}

static void misc_main(void *arg) {
  (void)arg;
  efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  CHECK_GE(efd, 0);
  CHECK_OK(loom_go(ev_waiter, NULL));
  loom_sleep(10 * CHECK_MS);
  CHECK_OK(loom_go(ev_second, NULL));
  loom_sleep(10 * CHECK_MS);
  CHECK(!atomic_load(&ev_woke));
  uint64_t one = 1;
  CHECK_EQ(write(efd, &one, sizeof one), (ssize_t)sizeof one);
  while (!atomic_load(&ev_woke))
    loom_sleep(CHECK_MS);
  close(efd);

  int p[2];
  make_pipe(p);
  CHECK_ERR(loom_fd_wait(p[0], 0, 0), -EINVAL);
  CHECK_ERR(loom_fd_wait(p[0], 4, 0), -EINVAL);
  CHECK_ERR(loom_fd_wait(p[0], LOOM_FD_READ | 4, 0), -EINVAL);
  CHECK_ERR(loom_fd_wait(-1, LOOM_FD_READ, 0), -EBADF);
  close(p[0]);
  close(p[1]);
  CHECK_ERR(loom_fd_wait(p[0], LOOM_FD_READ, 0), -EBADF); /* closed */

  char path[] = "/tmp/loom-netpoll-XXXXXX";
  int f = mkstemp(path);
  CHECK_GE(f, 0);
  unlink(path);
  /* A regular file is always ready for poll(2): 0 at once. */
  CHECK_OK(loom_fd_wait(f, LOOM_FD_READ, 0));
  close(f);
}

TEST(eventfd_busy_and_bad_input) { check_run(misc_main, NULL, 2); }

TEST(outside_coroutine) {
  int p[2];
  make_pipe(p);
  int64_t t0 = loom_now();
  CHECK_ERR(loom_fd_wait(p[0], LOOM_FD_READ, t0 + 20 * CHECK_MS), -ETIMEDOUT);
  CHECK_GE(loom_now() - t0, 20 * CHECK_MS);
  CHECK_EQ(write(p[1], "q", 1), 1);
  CHECK_OK(loom_fd_wait(p[0], LOOM_FD_READ, 0));
  CHECK_OK(loom_fd_wait(p[1], LOOM_FD_WRITE, 0));
  close(p[0]);
  close(p[1]);
}

/* ------------------------------------------------------------------ */
/* A runtime whose only coroutine waits on a pipe sleeps: ~0% CPU.       */

static int64_t idle_cpu;
static int idle_pipe[2];
static void idle_waiter(void *arg) {
  (void)arg;
  CHECK_OK(loom_fd_wait(idle_pipe[0], LOOM_FD_READ, 0));
}
static void *idle_poker(void *arg) {
  (void)arg;
  usleep(400 * 1000);
  CHECK_EQ(write(idle_pipe[1], "w", 1), 1);
  return NULL;
}
static void idle_main(void *arg) {
  (void)arg;
  pthread_t t;
  make_pipe(idle_pipe);
  CHECK_OK(loom_go(idle_waiter, NULL));
  loom_sleep(50 * CHECK_MS);
  int64_t c0 = check_cpu_ns();
  CHECK_EQ(pthread_create(&t, NULL, idle_poker, NULL), 0);
  loom_block_enter();
  pthread_join(t, NULL); /* the main coroutine blocks its thread */
  loom_block_exit();
  idle_cpu = check_cpu_ns() - c0;
  loom_sleep(20 * CHECK_MS); /* the waiter has run */
  close(idle_pipe[0]);
  close(idle_pipe[1]);
}

TEST(waiting_costs_no_cpu) {
  check_run(idle_main, NULL, 2);
  printf("400 ms with a coroutine in loom_fd_wait: %.2f ms of CPU\n",
         idle_cpu / 1e6);
  CHECKF(idle_cpu < 60 * CHECK_MS, "waiting burned %.1f ms of CPU",
         idle_cpu / 1e6);
}

/* ------------------------------------------------------------------ */
/* Inside loom_block_enter/exit the thread waits in poll(2), and a      */
/* cancel of the context still ends the wait.                            */

/* poll(2), counted per thread: how often a blocked thread woke. */
static _Thread_local unsigned poll_calls;
int poll(struct pollfd *fds, nfds_t n, int timeout) {
  typedef int (*poll_fn)(struct pollfd *, nfds_t, int);
  static _Atomic(poll_fn) real_once; /* threads poll at once */
  poll_fn real = atomic_load(&real_once);
  if (real == NULL) {
    *(void **)&real = dlsym(RTLD_NEXT, "poll");
    atomic_store(&real_once, real);
  }
  poll_calls++;
  return real(fds, n, timeout);
}

/* Holds its own reference (ctx.h's ownership note): the waiter, woken as
 * the cancel begins, may release the context before the cancel is over. */
static void bctx_canceller(void *arg) {
  loom_sleep(30 * CHECK_MS);
  loom_ctx_cancel(arg);
  loom_ctx_unref(arg);
}

static void bctx_main(void *arg) {
  (void)arg;
  int p[2];
  make_pipe(p);
  loom_ctx *ctx;
  CHECK_OK(loom_ctx_with_cancel(&ctx, loom_ctx_background()));
  CHECK_OK(loom_go(bctx_canceller, loom_ctx_ref(ctx)));
  int64_t t0 = loom_now();
  loom_block_enter();
  unsigned polls = poll_calls; /* the section keeps its thread */
  int r = loom_fd_wait_ctx(p[0], LOOM_FD_READ, t0 + 2000 * CHECK_MS, ctx);
  polls = poll_calls - polls;
  loom_block_exit();
  int64_t took = loom_now() - t0;
  CHECKF(r == -ECANCELED, "the wait ended with %s after %.0f ms",
         loom_strerror(r), took / 1e6);
  CHECKF(took < 1000 * CHECK_MS, "the cancel took %.0f ms to end the wait",
         took / 1e6);
  /* The thread slept until the cancel woke it: it did not poll the
   * context in slices (30 ms of them would be 6 calls or more). */
  CHECKF(polls <= 3, "the waiting thread called poll %u times", polls);
  /* A context done before the call: its reason, at once. */
  loom_block_enter();
  r = loom_fd_wait_ctx(p[0], LOOM_FD_READ, 0, ctx);
  loom_block_exit();
  CHECK_EQ(r, -ECANCELED);
  loom_ctx_release(ctx);
  close(p[0]);
  close(p[1]);
}

TEST(fd_wait_ctx_in_blocking_section) { check_run(bctx_main, NULL, 2); }

/* ------------------------------------------------------------------ */
/* Undoing a context's cancel (loom__pd_cancel): the deadline it        */
/* overwrote comes back, unless something changed it since.             */

static loom__pd_cancel undo_fire(loom__pd *pd, int64_t want_was) {
  loom__pd_cancel x = {.pd = pd, .mode = 'r', .fired = false};
  loom__pd_cancel_fire(&x);
  CHECK(x.fired);
  CHECK_EQ(x.was, want_was);
  CHECK_ERR(loom__pd_check(pd, 'r'), -ETIMEDOUT);
  return x;
}

static void undo_main(void *arg) {
  (void)arg;
  int p[2];
  make_pipe(p);
  loom__pd *pd;
  CHECK_OK(loom__pd_open(loom__rt_get(), p[0], &pd));

  /* A deadline ahead: back, with its timer. */
  int64_t d = loom_now() + 60 * CHECK_MS;
  CHECK_OK(loom__pd_set_deadline(pd, 'r', d));
  loom__pd_cancel x = undo_fire(pd, d);
  CHECK_OK(loom__pd_cancel_undo(&x));
  CHECK_OK(loom__pd_check(pd, 'r'));
  CHECK_ERR(loom__pd_wait(pd, 'r'), -ETIMEDOUT);
  CHECK_GE(loom_now(), d);

  /* No deadline: none again. */
  CHECK_OK(loom__pd_set_deadline(pd, 'r', 0));
  x = undo_fire(pd, 0);
  CHECK_OK(loom__pd_cancel_undo(&x));
  CHECK_OK(loom__pd_check(pd, 'r'));

  /* A deadline that passed meanwhile: passed. */
  CHECK_OK(loom__pd_set_deadline(pd, 'r', loom_now() + 10 * CHECK_MS));
  x = undo_fire(pd, pd->rd);
  loom_sleep(20 * CHECK_MS);
  CHECK_OK(loom__pd_cancel_undo(&x));
  CHECK_ERR(loom__pd_check(pd, 'r'), -ETIMEDOUT);

  /* A deadline set after the expire stands. */
  d = loom_now() + 5000 * CHECK_MS;
  CHECK_OK(loom__pd_set_deadline(pd, 'r', d));
  x = undo_fire(pd, d);
  CHECK_OK(loom__pd_set_deadline(pd, 'r', 0));
  CHECK_OK(loom__pd_cancel_undo(&x));
  CHECK_EQ(pd->rd, 0);

  /* So does a second expire (which overwrote the first's -1). */
  CHECK_OK(loom__pd_set_deadline(pd, 'r', d));
  x = undo_fire(pd, d);
  loom__pd_cancel y = undo_fire(pd, -1);
  CHECK_OK(loom__pd_cancel_undo(&x));
  CHECK_OK(loom__pd_cancel_undo(&y));
  CHECK_EQ(pd->rd, -1);

  /* And a close: no deadline, no timer armed. */
  CHECK_OK(loom__pd_set_deadline(pd, 'r', d));
  x = undo_fire(pd, d);
  loom__pd_evict(pd);
  CHECK_OK(loom__pd_cancel_undo(&x));
  CHECK_EQ(pd->rd, -1);
  CHECK_NE(pd->rseq_armed, pd->rseq);
  CHECK_ERR(loom__pd_check(pd, 'r'), LOOM_ECLOSED);

  loom__pd_close(pd, true);
  close(p[0]);
  close(p[1]);
}

TEST(undone_cancel_yields_to_later_changes) { check_run(undo_main, NULL, 1); }

/* A TCP socket never connected is reported hung up (EPOLLHUP alone), and
 * a dial registers its socket before connect(): if a poll harvests that
 * event first, it is not the peer's hang-up or an error, which a read
 * must see (pd->hangup; conn.c, wait_first), and a dialed connection
 * would read first for good, an EAGAIN per message (a peer's FIN after
 * a short read: net/dialed_connection_reads_wait_first). */
static void fresh_main(void *arg) {
  (void)arg;
  loom__rt *rt = loom__rt_get();
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  CHECK(fd >= 0);
  loom__pd *pd;
  CHECK_OK(loom__pd_open(rt, fd, &pd));
  struct loom__g *gs[LOOM__NETPOLL_MAX];
  (void)loom__netpoll_poll(&rt->np, 0, gs); /* nobody waits: no Gs */
  CHECK_OK(loom__pd_wait(pd, 'w'));         /* the event was taken in */
  CHECK(!loom__pd_hungup(pd));
  loom__pd_close(pd, true);
  close(fd);
}
TEST(never_connected_socket_is_not_hung_up) { check_run(fresh_main, NULL, 1); }

/* ------------------------------------------------------------------ */
/* Both directions at once: ready when either is, whichever comes.      */

static int both_sp[2];
static atomic_int both_rc = 1;
static void both_waiter(void *arg) {
  (void)arg;
  atomic_store(&both_rc, loom_fd_wait(both_sp[0], LOOM_FD_READ | LOOM_FD_WRITE,
                                      loom_now() + 10000 * CHECK_MS));
}
static int both_result(void) {
  int64_t end = loom_now() + 10000 * CHECK_MS;
  while (atomic_load(&both_rc) == 1 && loom_now() < end)
    loom_sleep(CHECK_MS);
  return atomic_load(&both_rc);
}
static void both_main(void *arg) {
  (void)arg;
  static char buf[65536];
  CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, both_sp), 0);
  /* Ready already: writable, at once. */
  CHECK_OK(loom_fd_wait(both_sp[0], LOOM_FD_READ | LOOM_FD_WRITE, 0));
  /* Neither: nothing to read, no room to write. */
  while (write(both_sp[0], buf, sizeof buf) > 0)
    ;
  while (write(both_sp[0], buf, 1) > 0)
    ;
  CHECK_EQ(errno, EAGAIN);
  int64_t t0 = loom_now();
  CHECK_ERR(loom_fd_wait(both_sp[0], LOOM_FD_READ | LOOM_FD_WRITE,
                         t0 + 20 * CHECK_MS),
            -ETIMEDOUT);
  CHECK_GE(loom_now() - t0, 20 * CHECK_MS);
  /* The peer speaks: readable wakes it. */
  CHECK_OK(loom_go(both_waiter, NULL));
  loom_sleep(20 * CHECK_MS);
  CHECK_EQ(atomic_load(&both_rc), 1); /* parked */
  CHECK_EQ(write(both_sp[1], "x", 1), 1);
  CHECK_OK(both_result());
  char c;
  CHECK_EQ(read(both_sp[0], &c, 1), 1);
  /* The peer drains: writable wakes it. */
  atomic_store(&both_rc, 1);
  CHECK_OK(loom_go(both_waiter, NULL));
  loom_sleep(20 * CHECK_MS);
  CHECK_EQ(atomic_load(&both_rc), 1); /* parked */
  while (read(both_sp[1], buf, sizeof buf) > 0)
    ;
  CHECK_OK(both_result());
  close(both_sp[0]);
  close(both_sp[1]);
}
TEST(fd_wait_either_direction) { check_run(both_main, NULL, 2); }

/* loom_fd_wait_ctx on a plain thread: the cancel ends its poll(2). */
static int tctx_pipe[2];
static atomic_int tctx_rc = 1;
static void *tctx_thread(void *arg) {
  atomic_store(&tctx_rc, loom_fd_wait_ctx(tctx_pipe[0], LOOM_FD_READ, 0, arg));
  return NULL;
}
static void tctx_main(void *arg) {
  (void)arg;
  make_pipe(tctx_pipe);
  loom_ctx *ctx;
  CHECK_OK(loom_ctx_with_cancel(&ctx, loom_ctx_background()));
  pthread_t th;
  CHECK_EQ(pthread_create(&th, NULL, tctx_thread, ctx), 0);
  loom_sleep(20 * CHECK_MS);
  CHECK_EQ(atomic_load(&tctx_rc), 1); /* waiting */
  loom_ctx_cancel(ctx);
  loom_block_enter();
  pthread_join(th, NULL);
  loom_block_exit();
  CHECK_ERR(atomic_load(&tctx_rc), -ECANCELED);
  loom_ctx_release(ctx);
  close(tctx_pipe[0]);
  close(tctx_pipe[1]);
}
TEST(fd_wait_ctx_on_a_plain_thread) { check_run(tctx_main, NULL, 2); }

/* A reader and a writer wait on one foreign fd at once, each woken by
 * its own direction; a second waiter in a taken direction is -EBUSY. */
static int duo_sp[2];
static atomic_int duo_r = 1, duo_w = 1;
static void duo_reader(void *arg) {
  (void)arg;
  atomic_store(&duo_r, loom_fd_wait(duo_sp[0], LOOM_FD_READ,
                                    loom_now() + 10000 * CHECK_MS));
}
static void duo_writer(void *arg) {
  (void)arg;
  atomic_store(&duo_w, loom_fd_wait(duo_sp[0], LOOM_FD_WRITE,
                                    loom_now() + 10000 * CHECK_MS));
}
static int duo_result(atomic_int *v) {
  int64_t end = loom_now() + 10000 * CHECK_MS;
  while (atomic_load(v) == 1 && loom_now() < end)
    loom_sleep(CHECK_MS);
  return atomic_load(v);
}
static void duo_main(void *arg) {
  (void)arg;
  static char buf[65536];
  CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, duo_sp), 0);
  while (write(duo_sp[0], buf, sizeof buf) > 0)
    ;
  while (write(duo_sp[0], buf, 1) > 0)
    ;
  CHECK_OK(loom_go(duo_reader, NULL));
  CHECK_OK(loom_go(duo_writer, NULL));
  loom_sleep(20 * CHECK_MS);
  CHECK_EQ(atomic_load(&duo_r), 1); /* both parked */
  CHECK_EQ(atomic_load(&duo_w), 1);
  CHECK_ERR(loom_fd_wait(duo_sp[0], LOOM_FD_READ, 0), -EBUSY);
  CHECK_ERR(loom_fd_wait(duo_sp[0], LOOM_FD_WRITE, 0), -EBUSY);
  CHECK_ERR(loom_fd_wait(duo_sp[0], LOOM_FD_READ | LOOM_FD_WRITE, 0), -EBUSY);
  CHECK_EQ(write(duo_sp[1], "x", 1), 1); /* the reader's turn */
  CHECK_OK(duo_result(&duo_r));
  CHECK_EQ(atomic_load(&duo_w), 1); /* still waiting for room */
  while (read(duo_sp[1], buf, sizeof buf) > 0)
    ;
  CHECK_OK(duo_result(&duo_w));
  /* Both gone: the registration went with the last; any wait works. */
  char c;
  CHECK_EQ(read(duo_sp[0], &c, 1), 1);
  CHECK_ERR(loom_fd_wait(duo_sp[0], LOOM_FD_READ, loom_now() + CHECK_MS),
            -ETIMEDOUT);
  close(duo_sp[0]);
  close(duo_sp[1]);
}
TEST(fd_wait_reader_and_writer_at_once) { check_run(duo_main, NULL, 2); }

/* One foreign fd, a writer waiting for room with no deadline, and
 * readers coming and going with deadlines of their own: one that passes,
 * one in the past, a context cancelled from a plain thread.  Each reader
 * ends as its own bound says and leaves the writer waiting; then the
 * other way round: a writer's deadline passes under a waiting reader.
 * Room and bytes still wake the one that waits for them. */
static int dl_sp[2];
static atomic_int dl_w = 1, dl_r = 1;
static loom_ctx *dl_ctx;
static void dl_writer(void *arg) {
  int64_t d = (int64_t)(intptr_t)arg;
  atomic_store(&dl_w,
               loom_fd_wait(dl_sp[0], LOOM_FD_WRITE, d ? loom_now() + d : 0));
}
static void dl_reader(void *arg) {
  (void)arg;
  atomic_store(&dl_r, loom_fd_wait(dl_sp[0], LOOM_FD_READ, 0));
}
static void *dl_cancel(void *arg) {
  (void)arg;
  usleep(10 * 1000);
  loom_ctx_cancel(dl_ctx);
  return NULL;
}
static void dl_main(void *arg) {
  (void)arg;
  static char buf[65536];
  CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, dl_sp), 0);
  while (write(dl_sp[0], buf, sizeof buf) > 0)
    ;
  while (write(dl_sp[0], buf, 1) > 0)
    ;
  CHECK_OK(loom_go(dl_writer, NULL));
  loom_sleep(10 * CHECK_MS);
  int64_t t0 = loom_now();
  CHECK_ERR(loom_fd_wait(dl_sp[0], LOOM_FD_READ, t0 + 20 * CHECK_MS),
            -ETIMEDOUT);
  CHECK_GE(loom_now() - t0, 20 * CHECK_MS);
  CHECK_ERR(loom_fd_wait(dl_sp[0], LOOM_FD_READ, -1), -ETIMEDOUT);
  CHECK_ERR(loom_fd_wait(dl_sp[0], LOOM_FD_READ, 1), -ETIMEDOUT);
  CHECK_OK(loom_ctx_with_cancel(&dl_ctx, loom_ctx_background()));
  pthread_t t;
  CHECK_EQ(pthread_create(&t, NULL, dl_cancel, NULL), 0);
  CHECK_ERR(loom_fd_wait_ctx(dl_sp[0], LOOM_FD_READ, INT64_MAX, dl_ctx),
            -ECANCELED);
  pthread_join(t, NULL);
  loom_ctx_release(dl_ctx);
  CHECK_ERR(loom_fd_wait(dl_sp[0], LOOM_FD_READ, loom_now() + CHECK_MS),
            -ETIMEDOUT);
  loom_sleep(10 * CHECK_MS);
  CHECK_EQ(atomic_load(&dl_w), 1); /* none of that touched the writer */
  while (read(dl_sp[1], buf, sizeof buf) > 0)
    ;
  int64_t end = loom_now() + 5000 * CHECK_MS;
  while (atomic_load(&dl_w) == 1 && loom_now() < end)
    loom_sleep(CHECK_MS);
  CHECK_OK(atomic_load(&dl_w));

  /* The other way: a reader without a deadline, writers timing out. */
  while (write(dl_sp[0], buf, sizeof buf) > 0)
    ;
  while (write(dl_sp[0], buf, 1) > 0)
    ;
  CHECK_OK(loom_go(dl_reader, NULL));
  for (int i = 0; i < 3; i++) {
    atomic_store(&dl_w, 1);
    CHECK_OK(loom_go(dl_writer, (void *)(intptr_t)(5 * CHECK_MS)));
    end = loom_now() + 5000 * CHECK_MS;
    while (atomic_load(&dl_w) == 1 && loom_now() < end)
      loom_sleep(CHECK_MS);
    CHECK_ERR(atomic_load(&dl_w), -ETIMEDOUT);
  }
  CHECK_EQ(atomic_load(&dl_r), 1);
  while (read(dl_sp[1], buf, sizeof buf) > 0)
    ;
  CHECK_EQ(write(dl_sp[1], "x", 1), 1);
  end = loom_now() + 5000 * CHECK_MS;
  while (atomic_load(&dl_r) == 1 && loom_now() < end)
    loom_sleep(CHECK_MS);
  CHECK_OK(atomic_load(&dl_r));
  close(dl_sp[0]);
  close(dl_sp[1]);
}
TEST(fd_wait_deadlines_of_a_reader_and_a_writer_are_their_own) {
  check_run(dl_main, NULL, 2);
}

/* An eventfd waited on for both directions and for each, with deadlines
 * that collide: many coroutines, each on its own eventfd, all with the
 * same deadline; half get a write first.  Every wait ends, the right way.
 * The writes come a few milliseconds in, the deadline long after: a
 * process that loses its CPUs in between (a loaded machine) runs the
 * deadlines and the readiness at once, and either may come first. */
#define EV_N 200
static int ev_fds[EV_N];
static atomic_int ev_res[EV_N];
static atomic_int ev_left;
static int64_t ev_deadline;
static void ev_one(void *arg) {
  int i = (int)(intptr_t)arg;
  atomic_store(&ev_res[i], loom_fd_wait(ev_fds[i], LOOM_FD_READ, ev_deadline));
  atomic_fetch_sub(&ev_left, 1);
}
static void ev_main(void *arg) {
  (void)arg;
  atomic_store(&ev_left, EV_N);
  ev_deadline = loom_now() + 400 * CHECK_MS;
  for (int i = 0; i < EV_N; i++) {
    ev_fds[i] = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    CHECK_GE(ev_fds[i], 0);
    atomic_store(&ev_res[i], 1);
    CHECK_OK(loom_go(ev_one, (void *)(intptr_t)i));
  }
  loom_sleep(5 * CHECK_MS);
  uint64_t one = 1;
  for (int i = 0; i < EV_N; i += 2)
    CHECK_EQ(write(ev_fds[i], &one, sizeof one), (ssize_t)sizeof one);
  int64_t end = loom_now() + 5000 * CHECK_MS;
  while (atomic_load(&ev_left) > 0 && loom_now() < end)
    loom_sleep(CHECK_MS);
  CHECK_EQ(atomic_load(&ev_left), 0);
  for (int i = 0; i < EV_N; i++) {
    if (i % 2 == 0)
      CHECK_OK(atomic_load(&ev_res[i]));
    else
      CHECK_ERR(atomic_load(&ev_res[i]), -ETIMEDOUT);
    /* both directions: writable at once */
    CHECK_OK(loom_fd_wait(ev_fds[i], LOOM_FD_READ | LOOM_FD_WRITE, -1));
    close(ev_fds[i]);
  }
}
TEST(fd_wait_colliding_deadlines) { check_run(ev_main, NULL, 2); }

/* A deadline long past — as far back as INT64_MIN — ends a wait at once
 * on a plain thread (and inside a blocking section) as on a coroutine,
 * with -ETIMEDOUT: it is not taken for one far ahead. */
static void *past_thread(void *arg) {
  int *p = arg;
  int64_t t0 = check_mono_ns();
  CHECK_ERR(loom_fd_wait(p[0], LOOM_FD_READ, INT64_MIN), -ETIMEDOUT);
  CHECK_ERR(loom_fd_wait(p[0], LOOM_FD_READ, INT64_MIN + 1), -ETIMEDOUT);
  CHECK_ERR(loom_fd_wait(p[0], LOOM_FD_READ, -1), -ETIMEDOUT);
  CHECK_LT(check_mono_ns() - t0, 5000 * CHECK_MS);
  return NULL;
}
static void past_main(void *arg) {
  int *p = arg;
  CHECK_ERR(loom_fd_wait(p[0], LOOM_FD_READ, INT64_MIN), -ETIMEDOUT);
  int64_t t0 = loom_now();
  loom_block_enter();
  int r = loom_fd_wait(p[0], LOOM_FD_READ, INT64_MIN);
  loom_block_exit();
  CHECK_ERR(r, -ETIMEDOUT);
  CHECK_LT(loom_now() - t0, 5000 * CHECK_MS);
}
TEST(fd_wait_deadline_long_past) {
  check_watchdog(20, "a wait with a deadline of INT64_MIN");
  int p[2];
  make_pipe(p);
  pthread_t t;
  CHECK_EQ(pthread_create(&t, NULL, past_thread, p), 0);
  CHECK_EQ(pthread_join(t, NULL), 0);
  check_run(past_main, p, 2);
  close(p[0]);
  close(p[1]);
}

/* A break for the poller blocked in epoll_wait is not taken by another
 * M's non-blocking poll at the same moment: only a poll that may block
 * takes it in, so the blocked one still returns (an earlier timer armed
 * while it sleeps is on time).  On the backend alone: a thread blocks
 * for 3 s, a break comes, and a non-blocking poll runs at once. */
static loom__netpoll rb_np;
static atomic_int rb_blocked;
static int64_t rb_took;
static void *rb_blocker(void *arg) {
  (void)arg;
  struct loom__g *gs[LOOM__NETPOLL_MAX];
  atomic_store(&rb_blocked, 1);
  int64_t t0 = check_mono_ns();
  (void)loom__netpoll_poll(&rb_np, 3000 * CHECK_MS, gs);
  rb_took = check_mono_ns() - t0;
  return NULL;
}
TEST(break_survives_a_nonblocking_poll) {
  CHECK_OK(loom__netpoll_init(&rb_np));
  pthread_t t;
  CHECK_EQ(pthread_create(&t, NULL, rb_blocker, NULL), 0);
  while (!atomic_load(&rb_blocked))
    sched_yield();
  usleep(50 * 1000); /* in epoll_wait by now */
  struct loom__g *gs[LOOM__NETPOLL_MAX];
  loom__netpoll_break(&rb_np);
  CHECK_EQ(loom__netpoll_poll(&rb_np, 0, gs), 0); /* another M's look */
  pthread_join(t, NULL);
  CHECKF(rb_took < 1000 * CHECK_MS,
         "the blocked poll slept on for %lld ms: the break was taken by the "
         "non-blocking poll",
         (long long)(rb_took / CHECK_MS));
  /* Taken in by a poll that may block, it is gone: the next one sleeps. */
  int64_t t0 = check_mono_ns();
  CHECK_EQ(loom__netpoll_poll(&rb_np, 20 * CHECK_MS, gs), 0);
  CHECK_GE(check_mono_ns() - t0, 15 * CHECK_MS);
  loom__netpoll_close(&rb_np);
}

CHECK_MAIN()
