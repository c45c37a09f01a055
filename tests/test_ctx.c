/*
 * test_ctx.c — context trees against Go's context semantics: a tree of
 * 10,000 nodes cancelled from the root wakes every blocked waiter, each
 * node is cancelled exactly once with the right reason; deadlines, values,
 * release while others hold references; the _ctx forms of blocking calls.
 */
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "check.h"
#include "ctx/ctx_internal.h"
#include "loom.h"

#define NODES 10000
static loom_ctx *nodes[NODES];
static atomic_int woke, woke_right;
static loom_chan *never; /* nobody ever sends on it */

static void waiter(void *arg) {
  loom_ctx *c = arg;
  long v;
  int r = loom_chan_recv_ctx(never, &v, c);
  if (r == -ECANCELED)
    atomic_fetch_add(&woke_right, 1);
  atomic_fetch_add(&woke, 1);
  loom_ctx_unref(c);
}

static void tree_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_chan_make(&never, sizeof(long), 0));
  CHECK_OK(loom_ctx_with_cancel(&nodes[0], loom_ctx_background()));
  /* Half a chain (depth 5,000: no recursion may follow it), half a
   * fan-out under random earlier nodes. */
  srand(3);
  for (int i = 1; i < NODES; i++) {
    loom_ctx *parent = i < NODES / 2 ? nodes[i - 1] : nodes[rand() % i];
    CHECK_OK(loom_ctx_with_cancel(&nodes[i], parent));
  }
  int nw = CHECK_SCALE(2000, 1000, 300);
  for (int i = 0; i < nw; i++)
    CHECK_OK(loom_go(waiter, loom_ctx_ref(nodes[(i * 7919) % NODES])));
  loom_sleep(20 * CHECK_MS);
  CHECK_EQ(atomic_load(&woke), 0);
  for (int i = 0; i < NODES; i++)
    CHECK_EQ(loom_ctx_err(nodes[i]), 0);
  loom_ctx_cancel(nodes[0]);
  for (int i = 0; i < NODES; i++)
    CHECK_EQ(loom_ctx_err(nodes[i]), -ECANCELED);
  int64_t end = loom_now() + 10000 * CHECK_MS;
  while (atomic_load(&woke) < nw) {
    CHECKF(loom_now() < end, "only %d of %d waiters woke", atomic_load(&woke),
           nw);
    loom_sleep(CHECK_MS);
  }
  CHECK_EQ(atomic_load(&woke_right), nw);
  /* Cancelling again, or a leaf, changes nothing. */
  loom_ctx_cancel(nodes[0]);
  loom_ctx_cancel(nodes[NODES - 1]);
  /* Release children before parents and parents before children alike. */
  for (int i = NODES - 1; i >= NODES / 2; i--)
    loom_ctx_release(nodes[i]);
  for (int i = 0; i < NODES / 2; i++)
    loom_ctx_release(nodes[i]);
  loom_chan_free(never);
}
TEST(tree_of_10000_cancelled_from_root) { check_run(tree_main, NULL, 2); }

static int key1, key2;
static void misc_main(void *arg) {
  (void)arg;
  loom_ctx *bg = loom_ctx_background();
  CHECK_EQ(loom_ctx_err(bg), 0);
  CHECK(loom_ctx_done(bg) == NULL);
  loom_ctx_release(bg); /* no-op */

  /* Values toward the root; the nearest wins. */
  loom_ctx *v1, *v2, *c;
  CHECK_OK(loom_ctx_with_value(&v1, bg, &key1, (void *)"one"));
  CHECK_OK(loom_ctx_with_value(&v2, v1, &key2, (void *)"two"));
  CHECK_OK(loom_ctx_with_cancel(&c, v2));
  CHECK_STREQ((const char *)loom_ctx_value(c, &key1), "one");
  CHECK_STREQ((const char *)loom_ctx_value(c, &key2), "two");
  CHECK(loom_ctx_value(v1, &key2) == NULL);

  /* Deadlines: own, inherited, already passed. */
  loom_ctx *d, *dc, *past;
  int64_t t0 = loom_now();
  CHECK_OK(loom_ctx_with_timeout(&d, c, 30 * CHECK_MS));
  CHECK_OK(loom_ctx_with_cancel(&dc, d));
  CHECK_EQ(loom_ctx_deadline(dc), loom_ctx_deadline(d));
  CHECK_EQ(loom_sleep_ctx(dc, 5000 * CHECK_MS), -ETIMEDOUT);
  CHECK_GE(loom_now() - t0, 30 * CHECK_MS);
  CHECK_EQ(loom_ctx_err(d), -ETIMEDOUT);
  CHECK_EQ(loom_ctx_err(dc), -ETIMEDOUT); /* the subtree, same reason */
  CHECK_EQ(loom_ctx_err(c), 0);           /* not the parent */
  CHECK_OK(loom_ctx_with_deadline(&past, c, loom_now() - 1));
  CHECK_EQ(loom_ctx_err(past), -ETIMEDOUT);

  /* A child of a cancelled context is born cancelled. */
  loom_ctx *late;
  CHECK_OK(loom_ctx_with_cancel(&late, d));
  CHECK_EQ(loom_ctx_err(late), -ETIMEDOUT);

  /* sleep_ctx that is not cancelled sleeps its time; a cancelled one
   * returns at once. */
  t0 = loom_now();
  CHECK_OK(loom_sleep_ctx(c, 10 * CHECK_MS));
  CHECK_GE(loom_now() - t0, 10 * CHECK_MS);
  CHECK_OK(loom_sleep_ctx(bg, CHECK_MS));

  /* A reference outlives the creator's release. */
  loom_ctx *held = loom_ctx_ref(c);
  loom_ctx_release(late);
  loom_ctx_release(past);
  loom_ctx_release(dc);
  loom_ctx_release(d);
  loom_ctx_release(c);
  CHECK_EQ(loom_ctx_err(held), -ECANCELED); /* released = cancelled */
  CHECK_STREQ((const char *)loom_ctx_value(held, &key1), "one");
  loom_ctx_unref(held);
  loom_ctx_release(v2);
  loom_ctx_release(v1);

  /* Channel operations under a context. */
  loom_chan *ch;
  CHECK_OK(loom_chan_make(&ch, sizeof(int), 1));
  loom_ctx *cc;
  CHECK_OK(loom_ctx_with_cancel(&cc, bg));
  int x = 7, y = 0;
  CHECK_OK(loom_chan_send_ctx(ch, &x, cc));
  CHECK_EQ(loom_chan_recv_ctx(ch, &y, cc), 1);
  CHECK_EQ(y, 7);
  loom_ctx_cancel(cc);
  CHECK_EQ(loom_chan_recv_ctx(ch, &y, cc), -ECANCELED);
  loom_ctx_release(cc);
  loom_chan_free(ch);
}
TEST(deadlines_values_release) { check_run(misc_main, NULL, 2); }

/* Without a runtime a deadline of its own that is still ahead has no
 * timer to fire it: LOOM_ENORUNTIME, *out untouched.  One already passed
 * (or none) needs no timer. */
TEST(deadline_without_a_runtime) {
  loom_ctx *d = (loom_ctx *)&d;
  CHECK_ERR(loom_ctx_with_timeout(&d, loom_ctx_background(), 1000 * CHECK_MS),
            LOOM_ENORUNTIME);
  CHECK(d == (loom_ctx *)&d);
  CHECK_OK(loom_ctx_with_deadline(&d, loom_ctx_background(), 1));
  CHECK_EQ(loom_ctx_err(d), -ETIMEDOUT); /* passed: cancelled at once */
  loom_ctx *k;
  CHECK_OK(loom_ctx_with_deadline(&k, d, loom_now() + 1000 * CHECK_MS));
  CHECK_EQ(loom_ctx_err(k), -ETIMEDOUT); /* its parent's passed first */
  loom_ctx_release(k);
  loom_ctx_release(d);
  CHECK_OK(loom_ctx_with_deadline(&d, loom_ctx_background(), 0));
  CHECK_EQ(loom_ctx_err(d), 0);
  CHECK_EQ(loom_ctx_deadline(d), 0);
  loom_ctx_release(d);
  loom_ctx *c;
  CHECK_OK(loom_ctx_with_cancel(&c, loom_ctx_background()));
  loom_ctx_cancel(c);
  CHECK_EQ(loom_ctx_err(c), -ECANCELED);
  loom_ctx_release(c);
}

/* A plain thread of a process whose runtime runs (and a coroutine inside
 * loom_block_enter/exit) makes contexts with deadlines: they fire on
 * time, not early, whether the Ps are busy or idle; released earlier,
 * they leave nothing behind; and they bound the thread's own waits. */
static int64_t fthr_timeout = 20 * CHECK_MS;
static atomic_int fthr_fired;
static void *fthr_one(void *arg) {
  (void)arg;
  int64_t t0 = loom_now();
  loom_ctx *c;
  CHECK_OK(loom_ctx_with_timeout(&c, loom_ctx_background(), fthr_timeout));
  CHECK_EQ(loom_ctx_deadline(c) >= t0 + fthr_timeout, 1);
  CHECK_EQ(loom_ctx_err(c), 0);
  long v;
  CHECK_EQ(loom_chan_recv(loom_ctx_done(c), &v), 0); /* closed */
  int64_t took = loom_now() - t0;
  CHECK_GE(took, fthr_timeout);
  CHECKF(took < fthr_timeout + 2000 * CHECK_MS, "fired after %lld ms",
         (long long)(took / CHECK_MS));
  CHECK_EQ(loom_ctx_err(c), -ETIMEDOUT);
  loom_ctx_release(c);
  /* A wait bounded by one: a mutex nobody unlocks. */
  static loom_mutex held = LOOM_MUTEX_INIT;
  (void)loom_mutex_trylock(&held);
  CHECK_OK(loom_ctx_with_timeout(&c, loom_ctx_background(), 5 * CHECK_MS));
  CHECK_ERR(loom_mutex_lock_ctx(&held, c), -ETIMEDOUT);
  loom_ctx_release(c);
  /* Released long before its deadline: the timer goes with it. */
  CHECK_OK(
      loom_ctx_with_timeout(&c, loom_ctx_background(), 3600000 * CHECK_MS));
  loom_ctx_release(c);
  atomic_fetch_add(&fthr_fired, 1);
  return NULL;
}
/* Many threads at once, with deadlines spread over a few ms. */
static void *fthr_many(void *arg) {
  long id = (long)arg;
  for (int i = 0; i < CHECK_SCALE(200, 100, 50); i++) {
    loom_ctx *c;
    int64_t ns = (int64_t)((id * 7 + i) % 13) * 100000;
    CHECK_OK(loom_ctx_with_timeout(&c, loom_ctx_background(), ns));
    if (i % 3 == 0) {
      loom_ctx_release(c); /* before it fires, or as it does */
      continue;
    }
    long v;
    CHECK_EQ(loom_chan_recv(loom_ctx_done(c), &v), 0);
    CHECK_EQ(loom_ctx_err(c), -ETIMEDOUT);
    loom_ctx_release(c);
  }
  atomic_fetch_add(&fthr_fired, 1);
  return NULL;
}
static void fthr_join(pthread_t t) {
  loom_block_enter(); /* this P is left to sysmon, or idle */
  pthread_join(t, NULL);
  loom_block_exit();
}
static void fthr_busy(void *arg) {
  atomic_int *stop = arg;
  while (!atomic_load(stop))
    loom_yield();
}
static void fthr_main(void *arg) {
  (void)arg;
  pthread_t t;
  /* Every P idle (this one blocked in the join). */
  CHECK_EQ(pthread_create(&t, NULL, fthr_one, NULL), 0);
  fthr_join(t);
  CHECK_EQ(atomic_load(&fthr_fired), 1);
  /* Every P busy with coroutines that only yield. */
  static atomic_int stop;
  for (int i = 0; i < 4; i++)
    CHECK_OK(loom_go(fthr_busy, &stop));
  CHECK_EQ(pthread_create(&t, NULL, fthr_one, NULL), 0);
  fthr_join(t);
  atomic_store(&stop, 1);
  CHECK_EQ(atomic_load(&fthr_fired), 2);
  /* A coroutine inside a blocking section. */
  loom_block_enter();
  fthr_one(NULL);
  loom_block_exit();
  CHECK_EQ(atomic_load(&fthr_fired), 3);
  /* Many threads at once. */
  pthread_t ts[4];
  for (long i = 0; i < 4; i++)
    CHECK_EQ(pthread_create(&ts[i], NULL, fthr_many, (void *)i), 0);
  for (int i = 0; i < 4; i++)
    fthr_join(ts[i]);
  CHECK_EQ(atomic_load(&fthr_fired), 7);
}
TEST(deadline_from_a_plain_thread) {
  check_watchdog(60, "deadlines armed from plain threads");
  check_run(fthr_main, NULL, 2);
}
/* With one P, which the blocking section leaves to sysmon. */
TEST(deadline_from_a_plain_thread_one_p) {
  check_watchdog(60, "deadlines armed from plain threads, one P");
  check_run(fthr_main, NULL, 1);
}

/* A plain thread makes children with deadlines of a context that a
 * second plain thread cancels while coroutines wait on it.  The cancel
 * runs the waiters' hooks under the parent's lock, and each wakes its
 * coroutine from a thread without an M, which takes the lock that keeps
 * the runtime alive; the maker must not hold that lock while it waits
 * for the parent's (to hang the child under it), or neither moves. */
#define XC_WAITERS 64
static loom_ctx *xc_parent;
static atomic_int xc_stop;
static loom_sema xc_never = LOOM_SEMA_INIT(0);
static loom_wg xc_wg = LOOM_WG_INIT;
static void xc_waiter(void *arg) {
  (void)arg;
  CHECK_ERR(loom_sema_acquire_ctx(&xc_never, xc_parent), -ECANCELED);
  loom_wg_done(&xc_wg);
}
static void *xc_maker(void *arg) {
  (void)arg;
  while (!atomic_load(&xc_stop)) {
    loom_ctx *c;
    CHECK_OK(loom_ctx_with_timeout(&c, xc_parent, 3600000 * CHECK_MS));
    loom_ctx_release(c);
  }
  return NULL;
}
static void *xc_canceller(void *arg) {
  (void)arg;
  loom_ctx_cancel(xc_parent);
  return NULL;
}
static void xc_main(void *arg) {
  (void)arg;
  for (int round = 0; round < CHECK_SCALE(50, 20, 10); round++) {
    CHECK_OK(loom_ctx_with_cancel(&xc_parent, loom_ctx_background()));
    CHECK_OK(loom_wg_add(&xc_wg, XC_WAITERS));
    for (int i = 0; i < XC_WAITERS; i++)
      CHECK_OK(loom_go(xc_waiter, NULL));
    loom_sleep(CHECK_MS); /* most of them parked, hooked on the parent */
    atomic_store(&xc_stop, 0);
    pthread_t m, k;
    CHECK_EQ(pthread_create(&m, NULL, xc_maker, NULL), 0);
    CHECK_EQ(pthread_create(&k, NULL, xc_canceller, NULL), 0);
    fthr_join(k);
    atomic_store(&xc_stop, 1);
    fthr_join(m);
    CHECK_OK(loom_wg_wait(&xc_wg, 0));
    loom_ctx_release(xc_parent);
  }
}
TEST(deadline_child_from_a_thread_while_another_cancels_the_parent) {
  check_watchdog(60, "a plain thread's deadline child against a cancel");
  check_run(xc_main, NULL, 2);
}

/* A context a thread armed outlives the runtime: its timer goes with the
 * runtime, and the context is still the thread's to use and release. */
static loom_ctx *outlive;
static void *outlive_thread(void *arg) {
  (void)arg;
  CHECK_OK(loom_ctx_with_timeout(&outlive, loom_ctx_background(),
                                 3600000 * CHECK_MS));
  return NULL;
}
static void outlive_main(void *arg) {
  (void)arg;
  pthread_t t;
  CHECK_EQ(pthread_create(&t, NULL, outlive_thread, NULL), 0);
  fthr_join(t);
}
TEST(deadline_from_a_thread_outlives_the_runtime) {
  check_run(outlive_main, NULL, 2);
  CHECK_EQ(loom_ctx_err(outlive), 0);
  loom_ctx *k;
  CHECK_OK(loom_ctx_with_cancel(&k, outlive));
  loom_ctx_release(outlive);
  CHECK_EQ(loom_ctx_err(k), -ECANCELED);
  loom_ctx_release(k);
}

/* Plain threads make and release contexts with deadlines ahead while
 * runtimes start and end under them: a release that stops its timer as
 * the runtime ends takes its timer's reference back once, or finds the
 * timer gone with the runtime (whose end gave the reference back), never
 * both; and it never touches the heap of a runtime that is gone. */
static atomic_int churn_stop;
static atomic_long churn_made;
static void *churn_thread(void *arg) {
  (void)arg;
  while (!atomic_load(&churn_stop)) {
    loom_ctx *c;
    int r =
        loom_ctx_with_timeout(&c, loom_ctx_background(), 3600000 * CHECK_MS);
    if (r == LOOM_ENORUNTIME) {
      usleep(20); /* between runtimes: let the next one start */
      continue;
    }
    CHECK_OK(r);
    atomic_fetch_add(&churn_made, 1);
    loom_ctx_release(c);
  }
  return NULL;
}
static void churn_main(void *arg) {
  (void)arg;
  loom_sleep(CHECK_MS / 5);
}
TEST(deadlines_from_threads_as_runtimes_end) {
  check_watchdog(25, "contexts released as runtimes end");
  pthread_t ts[3];
  for (int i = 0; i < 3; i++)
    CHECK_EQ(pthread_create(&ts[i], NULL, churn_thread, NULL), 0);
  for (int i = 0; i < CHECK_SCALE(1000, 300, 50); i++)
    check_run(churn_main, NULL, 2);
  atomic_store(&churn_stop, 1);
  for (int i = 0; i < 3; i++)
    pthread_join(ts[i], NULL);
  printf("%ld contexts made\n", (long)atomic_load(&churn_made));
}

/* ------------------------------------------------------------------ */
/* A read parked in the netpoller is woken by a cancel; the connection  */
/* stays usable once a new deadline is set.                             */

static loom_conn *_Atomic peer_slot;
static void acceptor(void *arg) {
  loom_conn *c;
  CHECK_OK(loom_accept(arg, &c));
  atomic_store(&peer_slot, c);
}
static atomic_int read_result = 1;
static atomic_long read_at;
static void reader(void *arg) {
  void **a = arg;
  char b[16];
  ssize_t r = loom_read_ctx(a[0], b, sizeof b, a[1]);
  atomic_store(&read_at, loom_now());
  atomic_store(&read_result, (int)r);
}
static void net_main(void *arg) {
  (void)arg;
  loom_listener *l;
  char addr[64];
  CHECK_OK(loom_listen(&l, "tcp", "127.0.0.1:0"));
  CHECK_OK(loom_listener_addr(l, addr, sizeof addr));
  CHECK_OK(loom_go(acceptor, l));
  loom_conn *c, *peer;
  CHECK_OK(loom_dial(&c, "tcp", addr));
  while ((peer = atomic_load(&peer_slot)) == NULL)
    loom_sleep(CHECK_MS);
  loom_ctx *ctx, *child;
  CHECK_OK(loom_ctx_with_cancel(&ctx, loom_ctx_background()));
  CHECK_OK(loom_ctx_with_cancel(&child, ctx));
  void *args[2] = {c, child};
  CHECK_OK(loom_go(reader, args));
  loom_sleep(20 * CHECK_MS);
  CHECK_EQ(atomic_load(&read_result), 1); /* parked in the poller */
  int64_t t0 = loom_now();
  loom_ctx_cancel(ctx); /* the parent: the child goes with it */
  while (atomic_load(&read_result) == 1)
    loom_sleep(CHECK_MS / 10);
  CHECK_EQ(atomic_load(&read_result), -ECANCELED);
  printf("cancel to wake-up: %.3f ms\n", (atomic_load(&read_at) - t0) / 1e6);
  CHECK_LT(atomic_load(&read_at) - t0, 500 * CHECK_MS);
  /* Defined state: reads time out until a new deadline is set. */
  char b[16];
  CHECK_ERR(loom_read(c, b, sizeof b), -ETIMEDOUT);
  CHECK_OK(loom_set_read_deadline(c, 0));
  CHECK_EQ(loom_write(peer, "after", 5), 5);
  CHECK_EQ(loom_read(c, b, sizeof b), 5);
  /* A cancelled context refuses at once; a deadline context times out. */
  CHECK_ERR(loom_read_ctx(c, b, sizeof b, ctx), -ECANCELED);
  loom_ctx *d;
  CHECK_OK(loom_ctx_with_timeout(&d, loom_ctx_background(), 20 * CHECK_MS));
  CHECK_ERR(loom_read_ctx(c, b, sizeof b, d), -ETIMEDOUT);
  loom_ctx_release(d);
  CHECK_OK(loom_set_read_deadline(c, 0));
  /* accept, cancelled */
  loom_ctx *ac;
  CHECK_OK(loom_ctx_with_timeout(&ac, loom_ctx_background(), 20 * CHECK_MS));
  loom_conn *none;
  CHECK_ERR(loom_accept_ctx(l, &none, ac), -ETIMEDOUT);
  loom_ctx_release(ac);
  /* dial, cancelled while the SYN goes unanswered (a full backlog) */
  loom_listen_opts lo = {.backlog = 1};
  loom_listener *full;
  char faddr[64];
  CHECK_OK(loom_listen_with(&full, "tcp", "127.0.0.1:0", &lo));
  CHECK_OK(loom_listener_addr(full, faddr, sizeof faddr));
  loom_ctx *dc;
  CHECK_OK(loom_ctx_with_timeout(&dc, loom_ctx_background(), 200 * CHECK_MS));
  loom_dial_opts dopts = {.ctx = dc};
  loom_conn *held[64];
  int nheld = 0, r = 0;
  while (nheld < 64 && (r = loom_dial_with(&held[nheld], "tcp", faddr,
                                            &dopts)) == 0)
    nheld++;
  /* The context's deadline, not a dial error.  (The kernel may still
   * complete a few handshakes on a full backlog; if all 64 did, this
   * run could not tell, and says so.) */
  if (r == 0)
    printf("note: 64 dials to a full backlog connected; dial-cancel not "
           "exercised this run\n");
  else
    CHECK_ERR(r, -ETIMEDOUT);
  for (int i = 0; i < nheld; i++)
    CHECK_OK(loom_close(held[i]));
  loom_ctx_release(dc);
  CHECK_OK(loom_listener_close(full));
  /* write_ctx with a live context works */
  CHECK_EQ(loom_write_ctx(c, "x", 1, loom_ctx_background()), 1);
  loom_ctx_release(child);
  loom_ctx_release(ctx);
  CHECK_OK(loom_close(c));
  CHECK_OK(loom_close(peer));
  CHECK_OK(loom_listener_close(l));
}
TEST(cancelled_read_on_a_socket) { check_run(net_main, NULL, 2); }

/* loom_writev_ctx: all of it with a live context; the context's reason,
 * touching nothing, with a done one; cut short by a cancel while the
 * peer does not read. */
static loom_ctx *wv_ctx;
/* Holds its own reference (ctx.h's ownership note): the writer, woken
 * as the cancel begins, may release the context before it is over. */
static void wv_cancel(void *arg) {
  loom_sleep(30 * CHECK_MS);
  loom_ctx_cancel(arg);
  loom_ctx_unref(arg);
}
static void writev_ctx_main(void *arg) {
  (void)arg;
  loom_listener *l;
  char addr[64];
  CHECK_OK(loom_listen(&l, "tcp", "127.0.0.1:0"));
  CHECK_OK(loom_listener_addr(l, addr, sizeof addr));
  loom_conn *c, *peer;
  CHECK_OK(loom_dial(&c, "tcp", addr));
  CHECK_OK(loom_accept(l, &peer));
  struct iovec iov[3] = {{"ab", 2}, {"", 0}, {"cde", 3}};
  CHECK_EQ(loom_writev_ctx(c, iov, 3, loom_ctx_background()), 5);
  char b[8];
  CHECK_EQ(loom_read(peer, b, sizeof b), 5);
  CHECK(memcmp(b, "abcde", 5) == 0);
  CHECK_OK(loom_ctx_with_cancel(&wv_ctx, loom_ctx_background()));
  CHECK_OK(loom_go(wv_cancel, loom_ctx_ref(wv_ctx)));
  static char big[1 << 20];
  struct iovec biov[2] = {{big, sizeof big}, {big, sizeof big}};
  ssize_t r;
  do /* until the socket buffers are full and the cancel cuts a write */
    r = loom_writev_ctx(c, biov, 2, wv_ctx);
  while (r == (ssize_t)(2 * sizeof big));
  CHECK_ERR(r, -ECANCELED);
  CHECK_ERR(loom_writev_ctx(c, iov, 3, wv_ctx), -ECANCELED);
  loom_ctx_release(wv_ctx);
  CHECK_OK(loom_close(c));
  CHECK_OK(loom_close(peer));
  CHECK_OK(loom_listener_close(l));
}
TEST(writev_bounded_by_a_context) { check_run(writev_ctx_main, NULL, 2); }

/* loom_fd_wait bounded by a context. */
static atomic_int fdw_result = 1;
static int fdw_pipe[2];
static void fd_waiter(void *arg) {
  atomic_store(&fdw_result, loom_fd_wait_ctx(fdw_pipe[0], LOOM_FD_READ, 0, arg));
}
static void fdw_main(void *arg) {
  (void)arg;
  CHECK_EQ(pipe2(fdw_pipe, O_NONBLOCK | O_CLOEXEC), 0);
  loom_ctx *c;
  CHECK_OK(loom_ctx_with_cancel(&c, loom_ctx_background()));
  CHECK_OK(loom_go(fd_waiter, c));
  loom_sleep(20 * CHECK_MS);
  CHECK_EQ(atomic_load(&fdw_result), 1);
  loom_ctx_cancel(c);
  while (atomic_load(&fdw_result) == 1)
    loom_sleep(CHECK_MS);
  CHECK_EQ(atomic_load(&fdw_result), -ECANCELED);
  CHECK_ERR(loom_fd_wait_ctx(fdw_pipe[0], LOOM_FD_READ, 0, c), -ECANCELED);
  CHECK_EQ(write(fdw_pipe[1], "z", 1), 1);
  CHECK_OK(loom_fd_wait_ctx(fdw_pipe[0], LOOM_FD_READ, 0,
                            loom_ctx_background()));
  loom_ctx_release(c);
  close(fdw_pipe[0]);
  close(fdw_pipe[1]);
}
TEST(fd_wait_cancelled) { check_run(fdw_main, NULL, 2); }

/* Mutex, semaphore and wait group waits bounded by a context. */
static loom_mutex cmu2 = LOOM_MUTEX_INIT;
static loom_sema csem = LOOM_SEMA_INIT(0);
static loom_wg cwg2 = LOOM_WG_INIT;
static loom_mutex cvmu = LOOM_MUTEX_INIT;
static loom_cond cv = LOOM_COND_INIT;
static atomic_int r_mu = 1, r_sem = 1, r_wg = 1, r_cv = 1;
static void cv_waiter(void *c) {
  loom_mutex_lock(&cvmu);
  int r = loom_cond_wait_ctx(&cv, &cvmu, c);
  CHECK_ERR(loom_mutex_trylock(&cvmu), -EBUSY); /* returned holding it */
  loom_mutex_unlock(&cvmu);
  atomic_store(&r_cv, r);
}
static void mu_waiter(void *c) { atomic_store(&r_mu, loom_mutex_lock_ctx(&cmu2, c)); }
static void sem_waiter(void *c) { atomic_store(&r_sem, loom_sema_acquire_ctx(&csem, c)); }
static void wg_waiter(void *c) { atomic_store(&r_wg, loom_wg_wait_ctx(&cwg2, c)); }
static void syncctx_main(void *arg) {
  (void)arg;
  loom_ctx *c;
  CHECK_OK(loom_ctx_with_cancel(&c, loom_ctx_background()));
  loom_mutex_lock(&cmu2);
  CHECK_OK(loom_wg_add(&cwg2, 1));
  CHECK_OK(loom_go(mu_waiter, c));
  CHECK_OK(loom_go(sem_waiter, c));
  CHECK_OK(loom_go(wg_waiter, c));
  CHECK_OK(loom_go(cv_waiter, c));
  loom_sleep(20 * CHECK_MS);
  CHECK_EQ(atomic_load(&r_mu) + atomic_load(&r_sem) + atomic_load(&r_wg) +
               atomic_load(&r_cv),
           4);
  loom_ctx_cancel(c);
  while (atomic_load(&r_mu) == 1 || atomic_load(&r_sem) == 1 ||
         atomic_load(&r_wg) == 1 || atomic_load(&r_cv) == 1)
    loom_sleep(CHECK_MS);
  CHECK_EQ(atomic_load(&r_cv), -ECANCELED);
  CHECK_EQ(atomic_load(&r_mu), -ECANCELED);
  CHECK_EQ(atomic_load(&r_sem), -ECANCELED);
  CHECK_EQ(atomic_load(&r_wg), -ECANCELED);
  /* The primitives carry on as if those waiters had never been. */
  loom_mutex_unlock(&cmu2);
  CHECK_OK(loom_mutex_lock_ctx(&cmu2, loom_ctx_background()));
  loom_mutex_unlock(&cmu2);
  loom_sema_release(&csem);
  CHECK_OK(loom_sema_tryacquire(&csem));
  CHECK_OK(loom_wg_done(&cwg2));
  CHECK_OK(loom_wg_wait_ctx(&cwg2, loom_ctx_background()));
  CHECK_ERR(loom_mutex_lock_ctx(&cmu2, c), -ECANCELED); /* cancelled: at once */
  /* A done context comes first in every one of them, over a wait that
   * would not wait: an unlocked mutex, a unit free, a count of zero. */
  loom_sema_release(&csem);
  CHECK_ERR(loom_sema_acquire_ctx(&csem, c), -ECANCELED);
  CHECK_OK(loom_sema_tryacquire(&csem)); /* the unit stayed */
  CHECK_ERR(loom_wg_wait_ctx(&cwg2, c), -ECANCELED);
  loom_mutex_lock(&cvmu);
  CHECK_ERR(loom_cond_wait_ctx(&cv, &cvmu, c), -ECANCELED);
  loom_mutex_unlock(&cvmu);
  loom_ctx_release(c);
}
TEST(sync_waits_cancelled) { check_run(syncctx_main, NULL, 2); }

/* A deadline's timer must not free its own context.  R has a deadline
 * and a child K.  R's timer fires, and while its cancel walk is inside K
 * (here: K's cancel hook), the creators drop R and K.  The walk's unref
 * of K then freed K, then R, from inside R's own timer: loom__timer_del
 * on that running timer waited for itself forever.  The armed deadline
 * now holds a reference of its own. */
static loom_ctx *selffree_r, *selffree_k;
static atomic_int selffree_in_hook, selffree_dropped, selffree_done;
static void selffree_hook(void *arg) {
  (void)arg;
  atomic_store(&selffree_in_hook, 1);
  while (!atomic_load(&selffree_dropped))
    sched_yield();
}
static void *selffree_thread(void *arg) {
  (void)arg;
  while (!atomic_load(&selffree_in_hook))
    sched_yield();
  /* The creators' references: both are cancelled already (a release
   * would wait for R's walk to be through with K, which this hook holds
   * on purpose). */
  loom_ctx_unref(selffree_r);
  loom_ctx_unref(selffree_k);
  atomic_store(&selffree_dropped, 1);
  return NULL;
}
static void selffree_main(void *arg) {
  (void)arg;
  static loom__ctx_hook h = {.fn = selffree_hook};
  /* R's deadline must come after K's hook is in: a machine that stalls
   * us longer than the timeout (TSan at -j3 did) makes the setup again. */
  for (int tries = 0;; tries++) {
    CHECK(tries < 20);
    CHECK_OK(loom_ctx_with_timeout(&selffree_r, loom_ctx_background(),
                                   20 * CHECK_MS));
    CHECK_OK(loom_ctx_with_cancel(&selffree_k, selffree_r));
    if (loom__ctx_hook_add(selffree_k, &h, NULL)) /* not on a stack */
      break;
    loom_ctx_release(selffree_k);
    loom_ctx_release(selffree_r);
  }
  pthread_t t;
  CHECK(pthread_create(&t, NULL, selffree_thread, NULL) == 0);
  while (!atomic_load(&selffree_dropped))
    loom_sleep(CHECK_MS);
  pthread_join(t, NULL);
  loom_sleep(20 * CHECK_MS);
  atomic_store(&selffree_done, 1);
}
TEST(deadline_timer_survives_its_context_release) {
  check_watchdog(10, "a context's deadline timer waiting for itself");
  check_run(selffree_main, NULL, 2);
  CHECK(atomic_load(&selffree_done));
}

/* A timeout too large to add to the clock means "never", not "already". */
static int huge_timeout_err = 1;
static void huge_timeout_main(void *arg) {
  (void)arg;
  loom_ctx *c;
  CHECK_OK(loom_ctx_with_timeout(&c, loom_ctx_background(), INT64_MAX));
  huge_timeout_err = loom_ctx_err(c);
  loom_ctx_release(c);
}
TEST(huge_timeout_saturates) {
  check_run(huge_timeout_main, NULL, 1);
  CHECK_EQ(huge_timeout_err, 0);
}

/* A parent cancelled on another thread while a child with a deadline is
 * being made: the child's timer is armed under the child's lock, and
 * only while it is live (TSan reported the cancel reading has_timer
 * while it was being set). */
static loom_ctx *_Atomic race_parent;
static atomic_int race_round, race_ack, race_done;
/* The two sides spin for each other, possibly on two Ps.  Give up the
 * CPU too, not only the P: on a CPU shared by more threads than it can
 * run, a spinner with nothing else on its P would otherwise hold the CPU
 * for its whole time slice, once per round. */
static void race_spin(void) {
  loom_yield();
  sched_yield();
}
static void race_canceller(void *arg) {
  (void)arg;
  int seen = 0;
  while (!atomic_load(&race_done)) {
    int r = atomic_load(&race_round);
    if (r == seen) {
      race_spin();
      continue;
    }
    seen = r;
    for (int i = 0; i < (r % 13) * 20; i++)
      __builtin_ia32_pause();
    loom_ctx_cancel(atomic_load(&race_parent));
    atomic_store(&race_ack, r);
  }
}
static void deadline_race_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_go(race_canceller, NULL));
  int rounds = (int)CHECK_SCALE(20000, 5000, 5000);
  for (int round = 1; round <= rounds; round++) {
    loom_ctx *p, *c;
    CHECK_OK(loom_ctx_with_cancel(&p, loom_ctx_background()));
    atomic_store(&race_parent, p);
    atomic_store(&race_round, round);
    /* Long enough that only the cancel can end it, even on a machine
     * that stalls the canceller (50 ms did, once, under ASan at -j2). */
    CHECK_OK(loom_ctx_with_timeout(&c, p, 3600 * 1000 * CHECK_MS));
    while (atomic_load(&race_ack) != round)
      race_spin();
    CHECK_ERR(loom_ctx_err(c), -ECANCELED);
    loom_ctx_release(c);
    loom_ctx_release(p);
  }
  atomic_store(&race_done, 1);
}
TEST(deadline_child_vs_parent_cancel) { check_run(deadline_race_main, NULL, 2); }

/* Two cancels race: one on a parent, the other on its child, on another
 * thread.  Whichever returns, the child's whole subtree is cancelled and
 * the child's done channel is closed (Go: cancel() returns only once its
 * subtree is done, and Err() != nil implies Done() is closed).  Plain
 * threads: contexts need no runtime without deadlines. */
#define CS_KIDS 2000
static loom_ctx *cs_mid;
static atomic_int cs_go;
static void *cs_cancel_mid(void *arg) {
  (void)arg;
  while (!atomic_load(&cs_go))
    ;
  loom_ctx_cancel(cs_mid);
  return NULL;
}
TEST(cancel_returns_with_the_subtree_cancelled) {
  check_watchdog(60, "concurrent subtree cancels");
  int bad_rounds = 0;
  for (int round = 0; round < 20; round++) {
    loom_ctx *root, *kids[CS_KIDS];
    CHECK_OK(loom_ctx_with_cancel(&root, loom_ctx_background()));
    CHECK_OK(loom_ctx_with_cancel(&cs_mid, root));
    for (int i = 0; i < CS_KIDS; i++)
      CHECK_OK(loom_ctx_with_cancel(&kids[i], cs_mid));
    atomic_store(&cs_go, 0);
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, cs_cancel_mid, NULL), 0);
    atomic_store(&cs_go, 1);
    while (loom_ctx_err(cs_mid) == 0)
      ;
    loom_ctx_cancel(root); /* cancels root and its subtree: all of it */
    int live = 0;
    for (int i = 0; i < CS_KIDS; i++)
      live += loom_ctx_err(kids[i]) == 0;
    int open = loom_chan_try_recv(loom_ctx_done(cs_mid), NULL) != 0;
    if (live != 0 || open) {
      bad_rounds++;
      printf("round %d: after loom_ctx_cancel(root) returned, %d of %d "
             "grandchildren were live; the child's done channel was %s\n",
             round, live, CS_KIDS, open ? "open" : "closed");
    }
    pthread_join(t, NULL);
    for (int i = 0; i < CS_KIDS; i++)
      loom_ctx_release(kids[i]);
    loom_ctx_release(cs_mid);
    loom_ctx_release(root);
  }
  CHECK_EQ(bad_rounds, 0);
}

/* Go: "If Done is not yet closed, Err returns nil".  A context whose err
 * is already visible must have its done channel closed — also while the
 * cancel is still waking the waiters hooked on it (plain threads blocked
 * in loom_sema_acquire_ctx here), and after a second loom_ctx_cancel of
 * it returned. */
#define EC_WAITERS 64
static loom_ctx *ec_ctx;
static loom_sema ec_sem = LOOM_SEMA_INIT(0);
static atomic_int ec_queued, ec_go;
static void *ec_waiter(void *arg) {
  (void)arg;
  atomic_fetch_add(&ec_queued, 1);
  CHECK_ERR(loom_sema_acquire_ctx(&ec_sem, ec_ctx), -ECANCELED);
  return NULL;
}
static void *ec_canceller(void *arg) {
  (void)arg;
  while (!atomic_load(&ec_go))
    ;
  loom_ctx_cancel(ec_ctx);
  return NULL;
}
TEST(err_set_means_done_closed) {
  check_watchdog(60, "err and done of a cancelled context");
  int bad_rounds = 0;
  for (int round = 0; round < 20; round++) {
    CHECK_OK(loom_ctx_with_cancel(&ec_ctx, loom_ctx_background()));
    atomic_store(&ec_queued, 0);
    atomic_store(&ec_go, 0);
    pthread_t w[EC_WAITERS], t;
    for (int i = 0; i < EC_WAITERS; i++)
      CHECK_EQ(pthread_create(&w[i], NULL, ec_waiter, NULL), 0);
    while (atomic_load(&ec_queued) < EC_WAITERS)
      sched_yield();
    struct timespec ts = {0, 20 * 1000 * 1000}; /* let them all park */
    nanosleep(&ts, NULL);
    CHECK_EQ(pthread_create(&t, NULL, ec_canceller, NULL), 0);
    atomic_store(&ec_go, 1);
    while (loom_ctx_err(ec_ctx) == 0)
      ;
    int open1 = loom_chan_try_recv(loom_ctx_done(ec_ctx), NULL) != 0;
    loom_ctx_cancel(ec_ctx); /* cancelled already: a no-op that returns */
    int open2 = loom_chan_try_recv(loom_ctx_done(ec_ctx), NULL) != 0;
    if (open1 || open2) {
      bad_rounds++;
      printf("round %d: err was %d but done was open (%s)\n", round,
             loom_ctx_err(ec_ctx),
             open2 ? "also after a second cancel returned" : "at first");
    }
    pthread_join(t, NULL);
    for (int i = 0; i < EC_WAITERS; i++)
      pthread_join(w[i], NULL);
    loom_ctx_release(ec_ctx);
  }
  CHECK_EQ(bad_rounds, 0);
}

/* A child made while its parent's cancel is under way is cancelled at
 * once, with the parent's reason; it is done no sooner than its parent
 * (Go: a parent's Err is non-nil once a child's Done has closed for its
 * sake).  Plain threads blocked on the parent's done channel make the
 * cancel spend a while waking them between setting the reason and
 * finishing the close; another thread makes children of the parent all
 * along, and checks the parent each time a child is born cancelled. */
#define BC_WAITERS 64
static loom_ctx *bc_parent;
static atomic_int bc_queued, bc_go, bc_early;
static void *bc_waiter(void *arg) {
  (void)arg;
  atomic_fetch_add(&bc_queued, 1);
  CHECK_EQ(loom_chan_recv(loom_ctx_done(bc_parent), NULL), 0);
  return NULL;
}
static void *bc_canceller(void *arg) {
  (void)arg;
  while (!atomic_load(&bc_go))
    ;
  loom_ctx_cancel(bc_parent);
  return NULL;
}
static void *bc_births(void *arg) {
  (void)arg;
  for (;;) {
    loom_ctx *g;
    CHECK_OK(loom_ctx_with_cancel(&g, bc_parent));
    int ge = loom_ctx_err(g), pe = loom_ctx_err(bc_parent);
    loom_ctx_release(g);
    if (ge != 0 && pe == 0)
      atomic_fetch_add(&bc_early, 1);
    if (ge != 0 && pe != 0)
      return NULL;
    atomic_store(&bc_go, 1); /* after the first child: both race from here */
  }
}
TEST(child_born_cancelled_after_its_parent) {
  check_watchdog(60, "children of a context being cancelled");
  int bad_rounds = 0;
  for (int round = 0; round < 50; round++) {
    CHECK_OK(loom_ctx_with_cancel(&bc_parent, loom_ctx_background()));
    atomic_store(&bc_queued, 0);
    atomic_store(&bc_go, 0);
    atomic_store(&bc_early, 0);
    pthread_t w[BC_WAITERS], t, b;
    for (int i = 0; i < BC_WAITERS; i++)
      CHECK_EQ(pthread_create(&w[i], NULL, bc_waiter, NULL), 0);
    while (atomic_load(&bc_queued) < BC_WAITERS)
      sched_yield();
    struct timespec ts = {0, 20 * 1000 * 1000}; /* let them all block */
    nanosleep(&ts, NULL);
    CHECK_EQ(pthread_create(&t, NULL, bc_canceller, NULL), 0);
    CHECK_EQ(pthread_create(&b, NULL, bc_births, NULL), 0);
    pthread_join(b, NULL);
    pthread_join(t, NULL);
    for (int i = 0; i < BC_WAITERS; i++)
      pthread_join(w[i], NULL);
    if (atomic_load(&bc_early) != 0) {
      bad_rounds++;
      printf("round %d: %d children were born cancelled while their "
             "parent's loom_ctx_err was still 0\n",
             round, atomic_load(&bc_early));
    }
    loom_ctx_release(bc_parent);
  }
  CHECK_EQ(bad_rounds, 0);
}

/* A ctx-bounded call that returns the cancel's reason returns it only
 * once loom_ctx_err agrees (Go: Err() != nil once the call has seen
 * Done).  A plain thread spins in loom_mutex_lock_ctx on a free mutex
 * (its entry check is loom__ctx_reason) while another cancels; the
 * context has many children, so the cancel spends a while listing them
 * between setting the reason and closing the done channel. */
#define RA_KIDS 5000
static loom_ctx *ra_ctx;
static loom_mutex ra_mu = LOOM_MUTEX_INIT;
static atomic_int ra_spinning, ra_bad_rc, ra_bad_err;
static void *ra_spinner(void *arg) {
  (void)arg;
  for (;;) {
    atomic_store(&ra_spinning, 1);
    int r = loom_mutex_lock_ctx(&ra_mu, ra_ctx);
    if (r == 0) {
      loom_mutex_unlock(&ra_mu);
      continue;
    }
    int e = loom_ctx_err(ra_ctx);
    if (e != r) {
      atomic_store(&ra_bad_rc, r);
      atomic_store(&ra_bad_err, e);
    }
    return NULL;
  }
}
TEST(call_reason_agrees_with_err) {
  check_watchdog(60, "a ctx call's reason against loom_ctx_err");
  static loom_ctx *kids[RA_KIDS];
  int bad_rounds = 0;
  for (int round = 0; round < 50; round++) {
    CHECK_OK(loom_ctx_with_cancel(&ra_ctx, loom_ctx_background()));
    for (int i = 0; i < RA_KIDS; i++)
      CHECK_OK(loom_ctx_with_cancel(&kids[i], ra_ctx));
    atomic_store(&ra_spinning, 0);
    atomic_store(&ra_bad_rc, 0);
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, ra_spinner, NULL), 0);
    while (!atomic_load(&ra_spinning))
      sched_yield();
    loom_ctx_cancel(ra_ctx);
    pthread_join(t, NULL);
    if (atomic_load(&ra_bad_rc) != 0) {
      bad_rounds++;
      printf("round %d: loom_mutex_lock_ctx returned %d while loom_ctx_err "
             "said %d\n",
             round, atomic_load(&ra_bad_rc), atomic_load(&ra_bad_err));
    }
    for (int i = 0; i < RA_KIDS; i++)
      loom_ctx_release(kids[i]);
    loom_ctx_release(ra_ctx);
  }
  CHECK_EQ(bad_rounds, 0);
}

/* The channel calls bounded by a context return what the plain call
 * returns (ctx.h): on a NULL channel that is -EINVAL, at once, whatever
 * the context.  They waited for the context's cancel instead, as a
 * select on a nil channel and Done would, and then reported the cancel's
 * reason; with the background context they returned -EINVAL. */
static void nullch_main(void *arg) {
  (void)arg;
  loom_ctx *c;
  CHECK_OK(loom_ctx_with_timeout(&c, loom_ctx_background(), 50 * CHECK_MS));
  long v = 1;
  CHECK_ERR(loom_chan_send_ctx(NULL, &v, c), -EINVAL);
  CHECK_ERR(loom_chan_recv_ctx(NULL, &v, c), -EINVAL);
  CHECK_EQ(loom_ctx_err(c), 0); /* answered before the deadline */
  CHECK_ERR(loom_chan_send_ctx(NULL, &v, loom_ctx_background()), -EINVAL);
  CHECK_ERR(loom_chan_recv_ctx(NULL, &v, loom_ctx_background()), -EINVAL);
  loom_ctx_release(c);
}
TEST(chan_calls_on_a_null_channel) { check_run(nullch_main, NULL, 2); }

/* A context done before the call wins over a channel that is ready, as
 * in every other call that takes one (sync.h: "as the other *_ctx calls
 * put a done context first"): the call fails and moves nothing.  The
 * channel calls made a select of the channel and the done channel, both
 * ready, and so sent or received about half the time. */
static void donefirst_calls(void) {
  loom_chan *full, *empty;
  CHECK_OK(loom_chan_make(&full, sizeof(int), 64));
  CHECK_OK(loom_chan_make(&empty, sizeof(int), 64));
  for (int i = 0; i < 64; i++)
    CHECK_OK(loom_chan_try_send(full, &i));
  loom_ctx *c;
  CHECK_OK(loom_ctx_with_cancel(&c, loom_ctx_background()));
  loom_ctx_cancel(c);
  for (int i = 0; i < 64; i++) {
    int v = -1;
    CHECK_ERR(loom_chan_recv_ctx(full, &v, c), -ECANCELED);
    CHECK_EQ(v, -1);
    CHECK_ERR(loom_chan_send_ctx(empty, &i, c), -ECANCELED);
  }
  CHECK_EQ(loom_chan_len(full), (size_t)64);
  CHECK_EQ(loom_chan_len(empty), (size_t)0);
  loom_ctx_release(c);
  loom_chan_free(full);
  loom_chan_free(empty);
}
static void donefirst_main(void *arg) {
  (void)arg;
  donefirst_calls();
}
TEST(chan_calls_with_a_done_context_move_nothing) {
  donefirst_calls(); /* a plain thread */
  check_run(donefirst_main, NULL, 2);
}

/* loom_ctx_deadline is "the earliest deadline of c and its ancestors, 0
 * if none", and a context that timed out has one.  A deadline of 0 (loom's
 * "none" everywhere else) made a child cancelled at once with -ETIMEDOUT
 * that reported no deadline, or, under a parent with a deadline, hid the
 * parent's.  0 now means none here too: the parent's deadline, if any,
 * is the child's. */
static void dl0_main(void *arg) {
  (void)arg;
  loom_ctx *none, *p, *kid;
  CHECK_OK(loom_ctx_with_deadline(&none, loom_ctx_background(), 0));
  CHECK_EQ(loom_ctx_err(none), 0);
  CHECK_EQ(loom_ctx_deadline(none), 0);
  int64_t at = loom_now() + 60000 * CHECK_MS;
  CHECK_OK(loom_ctx_with_deadline(&p, loom_ctx_background(), at));
  CHECK_OK(loom_ctx_with_deadline(&kid, p, 0));
  CHECK_EQ(loom_ctx_err(kid), 0);
  CHECK_EQ(loom_ctx_deadline(kid), at);
  loom_ctx_cancel(p); /* and it still goes with its parent */
  CHECK_EQ(loom_ctx_err(kid), -ECANCELED);
  loom_ctx_release(kid);
  loom_ctx_release(p);
  loom_ctx_release(none);
}
TEST(deadline_zero_means_none) { check_run(dl0_main, NULL, 2); }

/* A child whose deadline comes from its parent is not done before its
 * parent, even when that deadline has passed and the parent's timer has
 * not run yet (Go's WithDeadline hands back a WithCancel child then):
 * on one P, a coroutine that runs past its parent's deadline without a
 * scheduling point makes children of it.  A deadline of the child's
 * own, earlier than the parent's and passed, still cancels it at once
 * (as Go's does). */
static void inh_main(void *arg) {
  (void)arg;
  loom_ctx *p, *inherited, *later, *own;
  CHECK_OK(loom_ctx_with_timeout(&p, loom_ctx_background(), CHECK_MS));
  check_spin_ns(3 * CHECK_MS); /* past it; the timer waits for a switch */
  CHECK_OK(loom_ctx_with_deadline(&inherited, p, 0));
  CHECK_OK(loom_ctx_with_timeout(&later, p, 60000 * CHECK_MS));
  CHECK_OK(loom_ctx_with_deadline(&own, p, loom_ctx_deadline(p) - 1));
  int pe = loom_ctx_err(p);
  if (pe == 0) { /* as it should be: nothing switched yet */
    CHECK_EQ(loom_ctx_err(inherited), 0);
    CHECK_EQ(loom_ctx_err(later), 0);
  }
  CHECK_ERR(loom_ctx_err(own), -ETIMEDOUT);
  CHECK_EQ(loom_chan_recv(loom_ctx_done(inherited), NULL), 0); /* closed */
  CHECK_ERR(loom_ctx_err(p), -ETIMEDOUT);
  CHECK_ERR(loom_ctx_err(inherited), -ETIMEDOUT);
  CHECK_ERR(loom_ctx_err(later), -ETIMEDOUT);
  loom_ctx_release(own);
  loom_ctx_release(later);
  loom_ctx_release(inherited);
  loom_ctx_release(p);
}
TEST(inherited_deadline_passed_waits_for_the_parent) {
  check_run(inh_main, NULL, 1);
}

/* A cancel needs no memory: loom_ctx_release cannot fail, and it
 * cancels.  A cancel that could not get memory for its work list fell
 * back to recursion, one level per node of a chain: a chain of 10,000
 * cancelled on a coroutine (64 KiB of stack) with the allocator failing
 * overflowed the stack.  Every allocation made on the cancelling thread
 * fails here, while the cancel runs (it never parks). */
static _Thread_local int nomem_here;
static void *nomem_realloc(void *ud, void *p, size_t n) {
  (void)ud;
  return nomem_here ? NULL : realloc(p, n);
}
static void nomem_free(void *ud, void *p) {
  (void)ud;
  free(p);
}
#define NM_CHAIN 10000
#define NM_FAN 40
static loom_ctx *nm_nodes[NM_CHAIN + NM_FAN];
static void nomem_cancel_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_ctx_with_cancel(&nm_nodes[0], loom_ctx_background()));
  for (int i = 1; i < NM_CHAIN; i++)
    CHECK_OK(loom_ctx_with_cancel(&nm_nodes[i], nm_nodes[i - 1]));
  /* A fan-out too wide for the on-stack list, under a node mid-chain. */
  for (int i = 0; i < NM_FAN; i++)
    CHECK_OK(
        loom_ctx_with_cancel(&nm_nodes[NM_CHAIN + i], nm_nodes[NM_CHAIN / 2]));
  nomem_here = 1;
  loom_ctx_cancel(nm_nodes[0]);
  nomem_here = 0;
  for (int i = 0; i < NM_CHAIN + NM_FAN; i++)
    CHECK_EQ(loom_ctx_err(nm_nodes[i]), -ECANCELED);
  for (int i = NM_CHAIN + NM_FAN - 1; i >= 0; i--)
    loom_ctx_release(nm_nodes[i]);
}
TEST(cancel_without_memory) {
  static const loom_allocator a = {nomem_realloc, nomem_free, NULL};
  loom_set_allocator(&a);
  check_run(nomem_cancel_main, NULL, 1);
  loom_set_allocator(NULL);
}

CHECK_MAIN()
