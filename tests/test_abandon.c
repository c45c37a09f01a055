/*
 * test_abandon.c — what loom_run leaves behind when its main coroutine
 * returns while others still wait: every object they waited on, if it
 * outlives the runtime (a channel, a context, a static sync object), must
 * hold nothing of theirs afterwards, and be usable from plain threads as
 * if they had never waited — or, for a wait that had completed but not
 * yet returned, as if they had then given back the lock they got (a
 * unit, a signal or an element handed to them is gone with them).
 *
 * Each case runs one P, so "parked" and "readied but never run" are
 * certain: the main coroutine yields once to let the others run until
 * they park, and it returns right after it wakes one, which then never
 * runs.  Under ASan a queue entry left on a freed stack is a
 * use-after-free; in the plain build the checks on the objects' state
 * fail.
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "check.h"
#include "check_rng.h"
#include "loom.h"
#include "runtime/export_test.h"

static int parked;
static void run1(void (*fn)(void *), void *arg) { check_run(fn, arg, 1); }

/* Let every coroutine spawned so far run until it parks (one P). */
static void settle(int n) {
  loom_yield();
  CHECK_EQ(parked, n);
}

/* ---- channels ---------------------------------------------------- */

static loom_chan *ca, *cb, *cc;

static void recv_a(void *arg) {
  (void)arg;
  int v;
  parked++;
  loom_chan_recv(ca, &v);
  CHECK_FAIL("a receiver abandoned at the end of loom_run ran on");
}
static void send_b(void *arg) {
  (void)arg;
  int v = 7;
  parked++;
  loom_chan_send(cb, &v);
  CHECK_FAIL("a sender abandoned at the end of loom_run ran on");
}
static void select_abc(void *arg) {
  (void)arg;
  int r1, s = 9, r2;
  loom_case cs[3] = {{.chan = ca, .dir = LOOM_RECV, .elem = &r1},
                     {.chan = cb, .dir = LOOM_SEND, .elem = &s},
                     {.chan = cc, .dir = LOOM_RECV, .elem = &r2}};
  parked++;
  loom_select(cs, 3, loom_now() + 3600 * 1000 * CHECK_MS);
  CHECK_FAIL("a select abandoned at the end of loom_run ran on");
}

static void make_abc(void) {
  parked = 0;
  CHECK_OK(loom_chan_make(&ca, sizeof(int), 0));
  CHECK_OK(loom_chan_make(&cb, sizeof(int), 0));
  CHECK_OK(loom_chan_make(&cc, sizeof(int), 0));
}

/* Nobody waits on a, b or c any more: a plain thread finds no partner,
 * and the channels close and free cleanly. */
static void check_abc_empty(void) {
  int v = 1;
  CHECK_ERR(loom_chan_try_send(ca, &v), -EAGAIN);
  CHECK_ERR(loom_chan_try_recv(cb, &v), -EAGAIN);
  CHECK_ERR(loom_chan_try_send(cc, &v), -EAGAIN);
  CHECK_OK(loom_chan_close(ca));
  CHECK_OK(loom_chan_close(cb));
  CHECK_OK(loom_chan_close(cc));
  loom_chan_free(ca);
  loom_chan_free(cb);
  loom_chan_free(cc);
}

static void chan_parked_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_go(recv_a, NULL));
  CHECK_OK(loom_go(send_b, NULL));
  CHECK_OK(loom_go(select_abc, NULL));
  settle(3);
}

TEST(chan_waiters_parked) {
  make_abc();
  run1(chan_parked_main, NULL);
  check_abc_empty();
}

/* The select is woken through a, and abandoned before it runs: its
 * entries on b and c are still queued until it would have taken them
 * off itself. */
static void select_woken_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_go(select_abc, NULL));
  settle(1);
  int v = 5;
  CHECK_OK(loom_chan_try_send(ca, &v)); /* to the select: now runnable */
}

TEST(select_readied_not_run) {
  make_abc();
  run1(select_woken_main, NULL);
  check_abc_empty();
}

/* Past 8 cases a select's scratch is on the heap: abandoned, it is
 * freed (valgrind runs this case). */
#define NMANY 12
static loom_chan *many[NMANY];

static void select_many(void *arg) {
  (void)arg;
  int v[NMANY];
  loom_case cs[NMANY];
  for (int i = 0; i < NMANY; i++)
    cs[i] = (loom_case){.chan = many[i], .dir = LOOM_RECV, .elem = &v[i]};
  parked++;
  loom_select(cs, NMANY, 0);
  CHECK_FAIL("ran on");
}

static void select_many_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_go(select_many, NULL));
  CHECK_OK(loom_go(select_many, NULL));
  settle(2);
  int v = 1;
  CHECK_OK(loom_chan_try_send(many[3], &v)); /* one of them: readied */
}

TEST(select_many_cases) {
  parked = 0;
  for (int i = 0; i < NMANY; i++)
    CHECK_OK(loom_chan_make(&many[i], sizeof(int), 0));
  run1(select_many_main, NULL);
  for (int i = 0; i < NMANY; i++) {
    int v = 1;
    CHECK_ERR(loom_chan_try_send(many[i], &v), -EAGAIN);
    loom_chan_free(many[i]);
  }
}

/* ---- contexts ------------------------------------------------------ */

static loom_ctx *ctx;
static loom_mutex held_mu = LOOM_MUTEX_INIT;
static loom_sema zero_sema = LOOM_SEMA_INIT(0);
static int pipefd[2];

static void wait_done(void *arg) {
  (void)arg;
  parked++;
  loom_chan_recv(loom_ctx_done(ctx), NULL);
  CHECK_FAIL("ran on");
}
static void sleep_ctx(void *arg) {
  (void)arg;
  parked++;
  loom_sleep_ctx(ctx, 3600 * 1000 * CHECK_MS);
  CHECK_FAIL("ran on");
}
static void lock_ctx(void *arg) {
  (void)arg;
  parked++;
  loom_mutex_lock_ctx(&held_mu, ctx);
  CHECK_FAIL("ran on");
}
static void sema_ctx(void *arg) {
  (void)arg;
  parked++;
  loom_sema_acquire_ctx(&zero_sema, ctx);
  CHECK_FAIL("ran on");
}
static void fd_ctx(void *arg) {
  (void)arg;
  parked++;
  loom_fd_wait_ctx(pipefd[0], POLLIN, 0, ctx);
  CHECK_FAIL("ran on");
}
static void recv_ctx(void *arg) {
  (void)arg;
  int v;
  parked++;
  loom_chan_recv_ctx(ca, &v, ctx);
  CHECK_FAIL("ran on");
}

static void ctx_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_go(wait_done, NULL));
  CHECK_OK(loom_go(sleep_ctx, NULL));
  CHECK_OK(loom_go(lock_ctx, NULL));
  CHECK_OK(loom_go(sema_ctx, NULL));
  CHECK_OK(loom_go(fd_ctx, NULL));
  CHECK_OK(loom_go(recv_ctx, NULL));
  settle(6);
}

/* Every kind of wait a context can cut, abandoned: the cancel and the
 * release afterwards find none of their hooks. */
TEST(ctx_waiters_parked) {
  parked = 0;
  CHECK_OK(pipe2(pipefd, O_CLOEXEC));
  CHECK_OK(loom_chan_make(&ca, sizeof(int), 0));
  CHECK_OK(loom_ctx_with_cancel(&ctx, loom_ctx_background()));
  CHECK_OK(loom_mutex_trylock(&held_mu));
  run1(ctx_main, NULL);
  loom_ctx_cancel(ctx);
  loom_ctx_release(ctx);
  loom_mutex_unlock(&held_mu);
  CHECK_EQ(held_mu.state_, 0u);
  CHECK_ERR(loom_sema_tryacquire(&zero_sema), -EAGAIN);
  int v = 1;
  CHECK_ERR(loom_chan_try_send(ca, &v), -EAGAIN);
  loom_chan_free(ca);
  close(pipefd[0]);
  close(pipefd[1]);
}

/* ---- mutex ---------------------------------------------------------- */

static loom_mutex mu = LOOM_MUTEX_INIT;

static void locker(void *arg) {
  (void)arg;
  parked++;
  loom_mutex_lock(&mu);
  CHECK_FAIL("ran on");
}

static void mutex_parked_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_go(locker, NULL));
  CHECK_OK(loom_go(locker, NULL));
  settle(2);
}

/* Two waiters abandoned: unlocked afterwards, the mutex is free and
 * counts no waiter. */
TEST(mutex_waiters_parked) {
  parked = 0;
  CHECK_OK(loom_mutex_trylock(&mu)); /* held by this thread throughout */
  run1(mutex_parked_main, NULL);
  loom_mutex_unlock(&mu);
  CHECK_EQ(mu.state_, 0u);
  CHECK_OK(loom_mutex_trylock(&mu));
  loom_mutex_unlock(&mu);
}

static void mutex_woken_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_mutex_trylock(&mu));
  CHECK_OK(loom_go(locker, NULL));
  settle(1);
  loom_mutex_unlock(&mu); /* wakes the locker, which never runs */
}

/* The unlock woke the waiter to contend, and set the bit that tells the
 * next unlocks someone is awake: left set, a plain thread queued later
 * would never be woken. */
TEST(mutex_waiter_woken_not_run) {
  parked = 0;
  run1(mutex_woken_main, NULL);
  CHECK_EQ(mu.state_, 0u);
}

/* ---- semaphore, wait group, condition variable -------------------- */

static loom_sema sem = LOOM_SEMA_INIT(0);
static loom_wg wg = LOOM_WG_INIT;
static loom_cond cond = LOOM_COND_INIT;
static loom_mutex cond_mu = LOOM_MUTEX_INIT;

static void sem_taker(void *arg) {
  (void)arg;
  parked++;
  loom_sema_acquire(&sem, 0);
  CHECK_FAIL("ran on");
}
static void wg_waiter(void *arg) {
  (void)arg;
  parked++;
  loom_wg_wait(&wg, 0);
  CHECK_FAIL("ran on");
}
static void cond_waiter(void *arg) {
  (void)arg;
  loom_mutex_lock(&cond_mu);
  parked++;
  loom_cond_wait(&cond, &cond_mu, 0);
  CHECK_FAIL("ran on");
}

static void sema_wg_cond_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_go(sem_taker, NULL));
  CHECK_OK(loom_go(sem_taker, NULL));
  CHECK_OK(loom_go(wg_waiter, NULL));
  CHECK_OK(loom_go(cond_waiter, NULL));
  settle(4);
  loom_sema_release(&sem); /* handed to the first taker, never run */
}

/* The unit handed to a taker that never ran is gone with it (its
 * releaser may have freed the semaphore since); the parked taker, the
 * wait group's waiter and the condition's are gone, and take nothing. */
TEST(sema_wg_cond_waiters) {
  parked = 0;
  CHECK_OK(loom_wg_add(&wg, 1));
  run1(sema_wg_cond_main, NULL);
  CHECK_ERR(loom_sema_tryacquire(&sem), -EAGAIN);
  loom_sema_release(&sem);
  CHECK_OK(loom_sema_tryacquire(&sem));
  CHECK_OK(loom_wg_done(&wg));
  CHECK_OK(loom_wg_wait(&wg, 0));
  loom_cond_signal(&cond);
  loom_cond_broadcast(&cond);
  CHECK_EQ(cond_mu.state_, 0u);
}

/* Crowds: past the first, a queue's waiters wait on records from the
 * P's cache (sync/wait.h), not on their stacks; abandoned, each is taken
 * off its queue before the records go with the runtime, woken or not. */
static void crowds_main(void *arg) {
  (void)arg;
  for (int i = 0; i < 5; i++) {
    CHECK_OK(loom_go(recv_a, NULL));
    CHECK_OK(loom_go(select_abc, NULL));
    CHECK_OK(loom_go(sem_taker, NULL));
    CHECK_OK(loom_go(wg_waiter, NULL));
    CHECK_OK(loom_go(cond_waiter, NULL));
  }
  settle(25);
  int v = 5;
  CHECK_OK(loom_chan_try_send(ca, &v)); /* to a receiver, never run */
  CHECK_OK(loom_chan_try_send(ca, &v));
  CHECK_OK(loom_chan_try_send(cc, &v)); /* to a select */
  loom_sema_release(&sem);
  loom_sema_release(&sem);
}

TEST(crowds_on_every_queue) {
  make_abc();
  CHECK_OK(loom_wg_add(&wg, 1));
  run1(crowds_main, NULL);
  check_abc_empty();
  CHECK_ERR(loom_sema_tryacquire(&sem), -EAGAIN);
  CHECK_OK(loom_wg_done(&wg));
  CHECK_OK(loom_wg_wait(&wg, 0));
  loom_cond_broadcast(&cond);
  CHECK_EQ(cond_mu.state_, 0u);
}

/* ---- rwmutex ------------------------------------------------------- */

static loom_rwmutex rw = LOOM_RWMUTEX_INIT;

static void reader(void *arg) {
  (void)arg;
  parked++;
  loom_rwmutex_rlock(&rw);
  CHECK_FAIL("ran on");
}
static void writer(void *arg) {
  (void)arg;
  parked++;
  loom_rwmutex_lock(&rw);
  CHECK_FAIL("ran on");
}

static void readers_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_go(reader, NULL));
  CHECK_OK(loom_go(reader, NULL));
  settle(2);
}

/* Readers abandoned behind a writer (this thread): the writer's unlock
 * lets nobody in, and a writer after it gets the lock at once. */
TEST(rwmutex_readers_parked) {
  parked = 0;
  CHECK_OK(loom_rwmutex_trylock(&rw));
  run1(readers_main, NULL);
  loom_rwmutex_unlock(&rw);
  CHECK_OK(loom_rwmutex_trylock(&rw));
  loom_rwmutex_unlock(&rw);
  CHECK_EQ((uint32_t)rw.state_, 0u); /* no reader counted */
}

static void reader_handed_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_rwmutex_trylock(&rw));
  CHECK_OK(loom_go(reader, NULL));
  settle(1);
  loom_rwmutex_unlock(&rw); /* lets the reader in: it never runs */
}

/* A reader let in but never run holds a read lock nobody will drop: its
 * undo drops it. */
TEST(rwmutex_reader_let_in_not_run) {
  parked = 0;
  run1(reader_handed_main, NULL);
  CHECK_OK(loom_rwmutex_trylock(&rw));
  loom_rwmutex_unlock(&rw);
  CHECK_EQ((uint32_t)rw.state_, 0u);
}

static void writer_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_go(writer, NULL));
  CHECK_OK(loom_go(writer, NULL));
  settle(2);
}

/* A writer abandoned while it waits for a reader (this thread) to leave,
 * and one behind it: once the reader leaves, the lock is free. */
TEST(rwmutex_writers_parked) {
  parked = 0;
  CHECK_OK(loom_rwmutex_tryrlock(&rw));
  run1(writer_main, NULL);
  loom_rwmutex_runlock(&rw);
  CHECK_OK(loom_rwmutex_trylock(&rw));
  loom_rwmutex_unlock(&rw);
  CHECK_OK(loom_rwmutex_tryrlock(&rw));
  loom_rwmutex_runlock(&rw);
  CHECK_EQ((uint32_t)rw.state_, 0u);
  CHECK_EQ(rw.w_.state_, 0u);
}

static void writer_handed_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_rwmutex_tryrlock(&rw));
  CHECK_OK(loom_go(writer, NULL));
  settle(1);
  loom_rwmutex_runlock(&rw); /* the last reader: the writer's turn */
}

/* The writer the last reader let in never runs: its undo unlocks. */
TEST(rwmutex_writer_let_in_not_run) {
  parked = 0;
  run1(writer_handed_main, NULL);
  CHECK_OK(loom_rwmutex_tryrlock(&rw));
  loom_rwmutex_runlock(&rw);
  CHECK_OK(loom_rwmutex_trylock(&rw));
  loom_rwmutex_unlock(&rw);
  CHECK_EQ((uint32_t)rw.state_, 0u);
  CHECK_EQ(rw.w_.state_, 0u);
}

/* ---- sockets ---------------------------------------------------------- */

static char tcp_addr[64], unix_path[64];
static int conn_fds[2];

static void read_forever(void *arg) {
  char b[16];
  parked++;
  (void)loom_read(arg, b, sizeof b);
  CHECK_FAIL("ran on");
}

static void sockets_main(void *arg) {
  (void)arg;
  loom_listener *tl, *ul;
  loom_conn *c1, *c2;
  CHECK_OK(loom_listen(&tl, "tcp", "127.0.0.1:0"));
  CHECK_OK(loom_listener_addr(tl, tcp_addr, sizeof tcp_addr));
  CHECK_OK(loom_listen(&ul, "unix", unix_path));
  CHECK_OK(loom_dial(&c1, "tcp", tcp_addr));
  CHECK_OK(loom_accept(tl, &c2));
  conn_fds[0] = loom_conn_fd(c1);
  conn_fds[1] = loom_conn_fd(c2);
  CHECK_OK(loom_go(read_forever, c1));
  CHECK_OK(loom_go(read_forever, c2));
  settle(2);
} /* nothing closed */

/* Sockets left open are closed and freed when loom_run ends, a Unix
 * listener's path removed (net.h). */
TEST(sockets_left_open) {
  parked = 0;
  snprintf(unix_path, sizeof unix_path, "/tmp/loom-abandon-%d.sock",
           (int)getpid());
  unlink(unix_path);
  run1(sockets_main, NULL);
  for (int i = 0; i < 2; i++) {
    errno = 0;
    CHECK_EQ(fcntl(conn_fds[i], F_GETFD), -1);
    CHECK_EQ(errno, EBADF);
  }
  CHECK_EQ(access(unix_path, F_OK), -1);
  CHECK_EQ(errno, ENOENT);
  /* The TCP listener's port is free again. */
  int port = atoi(strrchr(tcp_addr, ':') + 1);
  int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  CHECK_GE(s, 0);
  struct sockaddr_in sa = {.sin_family = AF_INET,
                           .sin_port = htons((uint16_t)port),
                           .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  CHECK_EQ(connect(s, (struct sockaddr *)&sa, sizeof sa), -1);
  CHECK_EQ(errno, ECONNREFUSED);
  close(s);
}

/* ---- the end racing plain threads ----------------------------------- */

/*
 * While loom_run ends, a plain thread goes on using the objects its
 * coroutines wait on: it sends and receives on two channels, locks the
 * mutex, releases the semaphore, and at some point closes a third
 * channel (a close wakes its waiters a batch at a time) and cancels the
 * context.
 * The coroutines wait on all of them, in every way (a select with a
 * deadline and the context among them), on two Ps, and main returns at a
 * random moment.  So the end's undo may meet the thread at any point of a
 * wake-up: claiming a waiter as teardown does, holding one claimed and
 * not yet woken.  (Before the third channel: in 60 rounds the end
 * withdrew about 1 100 pending waits and found about 340 completed ones
 * that never ran; a waker caught between its claim and its wake-up is
 * rarer.)  Afterwards, with the
 * thread stopped, nothing is left on the objects, and the mutex is free.
 * The checks are those of the cases above; ASan and TSan do the rest.
 */
struct race {
  loom_chan *c, *d, *e; /* unbuffered, buffered (2), closed by the thread */
  loom_mutex mu;
  loom_sema sem;
  loom_ctx *ctx;
  atomic_int stop;
  uint64_t seed;
};

static void *race_thread(void *arg) {
  struct race *r = arg;
  rng_t g;
  rng_seed(&g, r->seed);
  int v = 0;
  bool cancelled = false, closed = false;
  /* Main returns within 2 ms: the close comes before, or during the end. */
  int64_t close_at = loom_now() + (int64_t)rn(&g, 3000) * 1000;
  while (!atomic_load(&r->stop)) {
    switch (rn(&g, 7)) {
    case 0:
      (void)loom_chan_try_send(r->c, &v);
      break;
    case 1:
      (void)loom_chan_try_recv(r->d, &v);
      break;
    case 2:
      loom_mutex_lock(&r->mu);
      loom_mutex_unlock(&r->mu);
      break;
    case 3:
      loom_sema_release(&r->sem);
      break;
    case 4:
      (void)loom_chan_send_until(r->c, &v, loom_now() + 20000);
      break;
    case 5:
      if (!closed && loom_now() >= close_at) {
        CHECK_OK(loom_chan_close(r->e));
        closed = true;
      }
      break;
    default:
      if (!cancelled && rn(&g, 200) == 0) {
        loom_ctx_cancel(r->ctx);
        cancelled = true;
      }
    }
  }
  return NULL;
}

static struct race race;

static void race_worker(void *arg) {
  rng_t g;
  rng_seed(&g, race.seed + (uintptr_t)arg);
  int v = 0;
  for (;;) {
    switch (rn(&g, 7)) {
    case 0:
      (void)loom_chan_recv(race.c, &v);
      break;
    case 6:
      (void)loom_chan_recv(race.e, &v);
      break;
    case 1:
      (void)loom_chan_send(race.d, &v);
      break;
    case 2:
      loom_mutex_lock(&race.mu);
      loom_mutex_unlock(&race.mu);
      break;
    case 3:
      (void)loom_sema_acquire_ctx(&race.sem, race.ctx);
      break;
    case 4: {
      loom_case cs[3] = {{.chan = race.c, .dir = LOOM_RECV, .elem = &v},
                         {.chan = race.d, .dir = LOOM_SEND, .elem = &v},
                         {.chan = loom_ctx_done(race.ctx), .dir = LOOM_RECV}};
      (void)loom_select(cs, 3, loom_now() + (int64_t)rn(&g, 200000));
      break;
    }
    default:
      if (loom_mutex_lock_ctx(&race.mu, race.ctx) == 0)
        loom_mutex_unlock(&race.mu);
    }
    if (rn(&g, 4) == 0)
      loom_yield();
  }
}

static void race_main(void *arg) {
  rng_t *g = arg;
  for (uintptr_t i = 0; i < 24; i++)
    CHECK_OK(loom_go(race_worker, (void *)i));
  loom_sleep((int64_t)rn(g, 2000) * 1000);
}

TEST(end_races_plain_threads) {
  int rounds = CHECK_SCALE(60, 30, 20);
  for (int i = 0; i < rounds; i++) {
    rng_t g;
    rng_seed(&g, (uint64_t)i);
    race.seed = (uint64_t)i;
    CHECK_OK(loom_chan_make(&race.c, sizeof(int), 0));
    CHECK_OK(loom_chan_make(&race.d, sizeof(int), 2));
    CHECK_OK(loom_chan_make(&race.e, sizeof(int), 0));
    race.mu = (loom_mutex)LOOM_MUTEX_INIT;
    race.sem = (loom_sema)LOOM_SEMA_INIT(0);
    CHECK_OK(loom_ctx_with_cancel(&race.ctx, loom_ctx_background()));
    atomic_store(&race.stop, 0);
    pthread_t t;
    CHECK(pthread_create(&t, NULL, race_thread, &race) == 0);
    check_run(race_main, &g, 2);
    atomic_store(&race.stop, 1);
    pthread_join(t, NULL);
    int v = 0;
    CHECK_ERR(loom_chan_try_send(race.c, &v), -EAGAIN);
    while (loom_chan_try_recv(race.d, &v) == 1)
      ;
    CHECK_ERR(loom_chan_try_send(race.c, &v), -EAGAIN);
    CHECK_EQ(race.mu.state_, 0u);
    loom_ctx_cancel(race.ctx);
    loom_ctx_release(race.ctx);
    CHECK_OK(loom_chan_close(race.c));
    CHECK_OK(loom_chan_close(race.d));
    int r = loom_chan_close(race.e); /* the thread's, or now */
    CHECK(r == 0 || r == -EPIPE);
    loom_chan_free(race.c);
    loom_chan_free(race.d);
    loom_chan_free(race.e); /* aborts if anyone were left on it */
  }
}

/* ---- a plain thread's hand-off racing the end ----------------------- */

/* A plain thread hands an element to a receiver that loom_run's end is
 * abandoning.  The element is large, so the copy, under the channel's
 * lock and before the wake-up, spans the runtime's end; and every thread
 * shares one CPU, so teardown, finding the lock held, yields it to the
 * sender.  Either the hand-off completed the wait (the element is gone
 * with the coroutine) or teardown took the wait back first (the send
 * finds no receiver); either way the channel is left with nobody on it,
 * and, as runtime.h asks, is freed only once loom_run has returned. */
#define BIG ((size_t)128 << 20)
static loom_chan *bigc;
static char *bigsrc, *bigdst;
static atomic_int big_go, big_started, big_result;

static void big_recv(void *arg) {
  (void)arg;
  parked++;
  loom_chan_recv(bigc, bigdst);
  CHECK_FAIL("a receiver abandoned at the end of loom_run ran on");
}

static void *big_sender(void *arg) {
  (void)arg;
  while (!atomic_load(&big_go))
    sched_yield();
  atomic_store(&big_started, 1);
  atomic_store(&big_result, loom_chan_try_send(bigc, bigsrc));
  return NULL;
}

static void big_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_go(big_recv, NULL));
  settle(1);
  atomic_store(&big_go, 1);
  while (!atomic_load(&big_started))
    sched_yield();
  usleep(2000); /* the sender is in its copy */
}

/* This thread, and every thread it starts from now on, on one CPU. */
static void pin_to_one_cpu(void) {
  cpu_set_t set;
  CHECK_OK(sched_getaffinity(0, sizeof set, &set));
  int first = 0;
  while (!CPU_ISSET(first, &set))
    first++;
  CPU_ZERO(&set);
  CPU_SET(first, &set);
  CHECK_OK(sched_setaffinity(0, sizeof set, &set));
}

TEST(plain_handoff_races_the_end) {
  pin_to_one_cpu();
  parked = 0;
  bigsrc = malloc(BIG);
  bigdst = malloc(BIG);
  CHECK(bigsrc != NULL && bigdst != NULL);
  memset(bigsrc, 1, BIG);
  memset(bigdst, 2, BIG);
  CHECK_OK(loom_chan_make(&bigc, BIG, 0));
  atomic_store(&big_go, 0);
  atomic_store(&big_started, 0);
  pthread_t t;
  CHECK(pthread_create(&t, NULL, big_sender, NULL) == 0);
  run1(big_main, NULL);
  pthread_join(t, NULL);
  int r = atomic_load(&big_result);
  CHECK(r == 0 || r == -EAGAIN);
  CHECK_ERR(loom_chan_try_send(bigc, bigsrc), -EAGAIN); /* nobody on it */
  loom_chan_free(bigc);
  free(bigsrc);
  free(bigdst);
}

/* ---- a later runtime, started while this one ends ------------------ */

/* Another thread's loom_run waits until this runtime has undone what its
 * coroutines left: a wake-up of one of them meanwhile, from a plain
 * thread, must not make it runnable in the new runtime.  slow_recv's
 * undo waits out a long hand-off, holding teardown up while the victim,
 * in the next slot, still waits. */
static loom_chan *slowc, *vc;
static char *slowsrc, *slowdst;
static atomic_int rt1_up, slow_started, victim_ran;

/* The next runtime: a thread that, once *start is set, tries loom_run
 * until it may, and whose main sets next_up and stays a while, time for
 * a misplaced G to be run. */
static atomic_int next_up;
static void next_main(void *arg) {
  (void)arg;
  atomic_store(&next_up, 1);
  loom_sleep(100 * CHECK_MS);
}
static void *next_runtime(void *start) {
  loom_config cfg;
  loom_config_init(&cfg);
  cfg.procs = 1;
  while (!atomic_load((atomic_int *)start))
    sched_yield();
  int r;
  while ((r = loom_run(next_main, NULL, &cfg)) == LOOM_ERUNNING)
    sched_yield();
  CHECK_OK(r);
  return NULL;
}

static void slow_recv(void *arg) {
  (void)arg;
  parked++;
  loom_chan_recv(slowc, slowdst);
}
/* Parked in a receive on arg, abandoned: it must never run again. */
static void victim(void *arg) {
  parked++;
  int v;
  loom_chan_recv(arg, &v);
  atomic_store(&victim_ran, 1);
  CHECK_FAIL("an abandoned coroutine of the first runtime ran in the next");
}
static void *slow_sender(void *arg) {
  (void)arg;
  atomic_store(&slow_started, 1);
  (void)loom_chan_try_send(slowc, slowsrc); /* handed off, or taken back */
  return NULL;
}
static void *late_sender(void *arg) {
  (void)arg;
  while (!atomic_load(&next_up))
    sched_yield();
  int v = 1;
  (void)loom_chan_try_send(vc, &v); /* no receiver: -EAGAIN */
  return NULL;
}
static void rt1_main(void *arg) {
  pthread_t *th = arg;
  atomic_store(&rt1_up, 1);
  CHECK_OK(loom_go(slow_recv, NULL));
  CHECK_OK(loom_go(victim, vc));
  settle(2);
  CHECK(pthread_create(&th[0], NULL, slow_sender, NULL) == 0);
  while (!atomic_load(&slow_started))
    sched_yield();
  usleep(1000);
}

TEST(later_runtime_gets_no_abandoned_coroutine) {
  parked = 0;
  atomic_store(&victim_ran, 0);
  slowsrc = malloc(2 * BIG);
  slowdst = malloc(2 * BIG);
  CHECK(slowsrc != NULL && slowdst != NULL);
  memset(slowsrc, 1, 2 * BIG);
  memset(slowdst, 2, 2 * BIG);
  CHECK_OK(loom_chan_make(&slowc, 2 * BIG, 0));
  CHECK_OK(loom_chan_make(&vc, sizeof(int), 0));
  pthread_t th[3];
  atomic_store(&next_up, 0);
  CHECK(pthread_create(&th[1], NULL, next_runtime, &rt1_up) == 0);
  CHECK(pthread_create(&th[2], NULL, late_sender, NULL) == 0);
  run1(rt1_main, th);
  for (int i = 0; i < 3; i++)
    pthread_join(th[i], NULL);
  CHECK_EQ(atomic_load(&victim_ran), 0);
  int v = 1;
  CHECK_ERR(loom_chan_try_send(vc, &v), -EAGAIN); /* nobody waits on it */
  loom_chan_free(vc);
  loom_chan_free(slowc);
  free(slowsrc);
  free(slowdst);
}

/* ---- a plain thread's wake-up, held while the runtime ends ---------- */

/* A plain thread completes a coroutine's wait, and is held (a test hook)
 * just before its wake-up takes the runtime's lock, while main returns
 * and another thread keeps trying loom_run.  The wake-up must not land
 * in the next runtime: the G it readies belongs to the one ending, whose
 * stacks are about to go.  The hook lets the waker go once the next
 * runtime runs, or after 300 ms if it cannot start meanwhile. */
static loom_chan *hc;
static atomic_int h_held;

static void h_hold(void) {
  atomic_store(&h_held, 1);
  int64_t until = loom_now() + 300 * CHECK_MS;
  while (!atomic_load(&next_up) && loom_now() < until)
    usleep(1000);
}
static void *h_waker(void *arg) {
  (void)arg;
  int v = 1;
  CHECK_OK(loom_chan_try_send(hc, &v)); /* a hand-off: the victim waits */
  return NULL;
}
static void h_main(void *arg) {
  pthread_t *th = arg;
  CHECK_OK(loom_go(victim, hc));
  settle(1);
  CHECK(pthread_create(&th[0], NULL, h_waker, NULL) == 0);
  while (!atomic_load(&h_held))
    sched_yield();
}

TEST(held_wakeup_does_not_reach_the_next_runtime) {
  parked = 0;
  atomic_store(&victim_ran, 0);
  CHECK_OK(loom_chan_make(&hc, sizeof(int), 0));
  (void)loom__test_hold_foreign_ready(h_hold);
  pthread_t th[2];
  atomic_store(&next_up, 0);
  CHECK(pthread_create(&th[1], NULL, next_runtime, &h_held) == 0);
  run1(h_main, th);
  for (int i = 0; i < 2; i++)
    pthread_join(th[i], NULL);
  (void)loom__test_hold_foreign_ready(NULL);
  CHECK_EQ(atomic_load(&victim_ran), 0);
  int v = 1;
  CHECK_ERR(loom_chan_try_send(hc, &v), -EAGAIN); /* nobody waits on it */
  loom_chan_free(hc);
}

/* ---- a mutex handed over in starvation mode, never run ------------- */

static loom_mutex smu = LOOM_MUTEX_INIT;
static void s_locker(void *arg) {
  (void)arg;
  parked++;
  loom_mutex_lock(&smu);
  CHECK_FAIL("a locker abandoned at the end of loom_run ran on");
}
static void starve_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_mutex_trylock(&smu));
  CHECK_OK(loom_go(s_locker, NULL));
  settle(1);
  /* Wake it to contend and barge in ahead of it until, waiting over
   * 1 ms, it puts the mutex in starvation mode. */
  for (int i = 0; i < 5 && !(smu.state_ & 2u); i++) {
    usleep(2000);
    loom_mutex_unlock(&smu);
    CHECK_OK(loom_mutex_trylock(&smu));
    loom_yield(); /* it runs, finds the mutex taken, queues again */
  }
  CHECK(smu.state_ & 2u);  /* starving */
  loom_mutex_unlock(&smu); /* handed to it; it never runs */
}
TEST(mutex_handed_over_not_run) {
  parked = 0;
  run1(starve_main, NULL);
  CHECK_EQ(smu.state_, 0u);
  CHECK_OK(loom_mutex_trylock(&smu));
  loom_mutex_unlock(&smu);
}

/* ---- rwmutex waits a cancel ended, never run ----------------------- */

static loom_rwmutex rwc = LOOM_RWMUTEX_INIT;
static loom_ctx *rwctx;
static void rlock_ctx(void *arg) {
  (void)arg;
  parked++;
  (void)loom_rwmutex_rlock_ctx(&rwc, rwctx);
  CHECK_FAIL("a reader abandoned at the end of loom_run ran on");
}
static void wlock_ctx(void *arg) {
  (void)arg;
  parked++;
  (void)loom_rwmutex_lock_ctx(&rwc, rwctx);
  CHECK_FAIL("a writer abandoned at the end of loom_run ran on");
}
static void rw_cancel_main(void *arg) {
  CHECK_OK(loom_go(arg == NULL ? rlock_ctx : wlock_ctx, NULL));
  settle(1);
  loom_ctx_cancel(rwctx); /* readied, never run */
}
TEST(rwmutex_reader_cancelled_not_run) {
  parked = 0;
  CHECK_OK(loom_ctx_with_cancel(&rwctx, loom_ctx_background()));
  CHECK_OK(loom_rwmutex_trylock(&rwc));
  run1(rw_cancel_main, NULL);
  loom_rwmutex_unlock(&rwc);
  CHECK_EQ(rwc.state_ & 0xffffffffu, 0u);
  CHECK_OK(loom_rwmutex_trylock(&rwc));
  loom_rwmutex_unlock(&rwc);
  loom_ctx_release(rwctx);
}
TEST(rwmutex_writer_cancelled_not_run) {
  parked = 0;
  CHECK_OK(loom_ctx_with_cancel(&rwctx, loom_ctx_background()));
  CHECK_OK(loom_rwmutex_tryrlock(&rwc));
  run1(rw_cancel_main, (void *)1);
  loom_rwmutex_runlock(&rwc);
  CHECK_EQ(rwc.state_ & 0xffffffffu, 0u);
  CHECK_EQ(rwc.w_.state_, 0u);
  CHECK_OK(loom_rwmutex_trylock(&rwc));
  loom_rwmutex_unlock(&rwc);
  loom_ctx_release(rwctx);
}

CHECK_MAIN()
