/*
 * test_chan.c — channels and select against the Go behaviour each case
 * mirrors: hand-off order, close with buffered data, select fairness,
 * select with deadline and nowait, no deadlock among selects over the
 * same channels in different orders, and threads talking to coroutines.
 */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "check.h"
#include "loom.h"
#include "sync/export_test.h"

/* ------------------------------------------------------------------ */
/* Unbuffered: FIFO among waiting senders; the hand-off is direct.      */

static loom_chan *uc;
static void sender(void *arg) {
  long v = (long)arg;
  CHECK_OK(loom_chan_send(uc, &v));
}

static void unbuffered_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_chan_make(&uc, sizeof(long), 0));
  CHECK_EQ(loom_chan_cap(uc), 0);
  long v;
  CHECK_ERR(loom_chan_try_recv(uc, &v), -EAGAIN);
  CHECK_ERR(loom_chan_try_send(uc, &v), -EAGAIN); /* nobody receives */
  /* Senders park in spawn order (1 P, each runs until it parks). */
  for (long i = 0; i < 100; i++) {
    CHECK_OK(loom_go(sender, (void *)i));
    loom_yield();
  }
  for (long i = 0; i < 100; i++) {
    CHECK_EQ(loom_chan_recv(uc, &v), 1);
    CHECK_EQ(v, i); /* FIFO */
  }
  CHECK_EQ(loom_chan_len(uc), 0);
  loom_chan_free(uc);
}

TEST(unbuffered_fifo_handoff) { check_run(unbuffered_main, NULL, 1); }

/* Ping-pong across Ps: every value arrives exactly once, in order. */
static loom_chan *ping, *pong;
static void ponger(void *arg) {
  long n = (long)arg, v;
  for (long i = 0; i < n; i++) {
    CHECK_EQ(loom_chan_recv(ping, &v), 1);
    CHECK_EQ(v, i);
    CHECK_OK(loom_chan_send(pong, &v));
  }
}
static void pingpong_main(void *arg) {
  (void)arg;
  long n = CHECK_SCALE(200000, 50000, 20000), v;
  CHECK_OK(loom_chan_make(&ping, sizeof(long), 0));
  CHECK_OK(loom_chan_make(&pong, sizeof(long), 0));
  CHECK_OK(loom_go(ponger, (void *)n));
  for (long i = 0; i < n; i++) {
    CHECK_OK(loom_chan_send(ping, &i));
    CHECK_EQ(loom_chan_recv(pong, &v), 1);
    CHECK_EQ(v, i);
  }
  loom_sleep(CHECK_MS);
  loom_chan_free(ping);
  loom_chan_free(pong);
}
TEST(pingpong_two_procs) { check_run(pingpong_main, NULL, 2); }

/* ------------------------------------------------------------------ */
/* Buffered: FIFO through a full buffer with waiting senders; close     */
/* with buffered data drains, then reports closed; send after close.    */

static loom_chan *bc;
static void bsender(void *arg) {
  long v = (long)arg;
  CHECK_OK(loom_chan_send(bc, &v));
}
static void buffered_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_chan_make(&bc, sizeof(long), 4));
  for (long i = 0; i < 4; i++)
    CHECK_OK(loom_chan_try_send(bc, &i));
  long v = 99;
  CHECK_ERR(loom_chan_try_send(bc, &v), -EAGAIN);
  CHECK_EQ(loom_chan_len(bc), 4);
  for (long i = 4; i < 10; i++) { /* these wait for room, in order */
    CHECK_OK(loom_go(bsender, (void *)i));
    loom_yield();
  }
  for (long i = 0; i < 10; i++) {
    CHECK_EQ(loom_chan_recv(bc, &v), 1);
    CHECK_EQ(v, i);
  }
  /* close with data buffered */
  for (long i = 0; i < 3; i++)
    CHECK_OK(loom_chan_send(bc, &i));
  CHECK_OK(loom_chan_close(bc));
  CHECK_ERR(loom_chan_close(bc), -EPIPE);
  CHECK_ERR(loom_chan_send(bc, &v), -EPIPE);
  for (long i = 0; i < 3; i++) {
    CHECK_EQ(loom_chan_recv(bc, &v), 1);
    CHECK_EQ(v, i);
  }
  v = 77;
  CHECK_EQ(loom_chan_recv(bc, &v), 0); /* closed and drained */
  CHECK_EQ(v, 77);                     /* untouched */
  CHECK_EQ(loom_chan_try_recv(bc, &v), 0);
  loom_chan_free(bc);
}
TEST(buffered_fifo_and_close) { check_run(buffered_main, NULL, 1); }

/* Close wakes every waiter: receivers see closed, senders -EPIPE. */
static loom_chan *cc;
static atomic_int closed_recv, closed_send;
static void crecv(void *arg) {
  (void)arg;
  long v;
  if (loom_chan_recv(cc, &v) == 0)
    atomic_fetch_add(&closed_recv, 1);
}
static void csend(void *arg) {
  (void)arg;
  long v = 1;
  if (loom_chan_send(cc, &v) == -EPIPE)
    atomic_fetch_add(&closed_send, 1);
}
static void close_main(void *arg) {
  (void)arg;
  loom_chan *c2;
  CHECK_OK(loom_chan_make(&cc, sizeof(long), 0));
  CHECK_OK(loom_chan_make(&c2, sizeof(long), 0));
  for (int i = 0; i < 50; i++)
    CHECK_OK(loom_go(crecv, NULL));
  loom_sleep(10 * CHECK_MS);
  CHECK_OK(loom_chan_close(cc));
  while (atomic_load(&closed_recv) < 50)
    loom_sleep(CHECK_MS);
  loom_chan_free(cc);
  cc = c2;
  for (int i = 0; i < 50; i++)
    CHECK_OK(loom_go(csend, NULL));
  loom_sleep(10 * CHECK_MS);
  CHECK_OK(loom_chan_close(cc));
  while (atomic_load(&closed_send) < 50)
    loom_sleep(CHECK_MS);
  loom_chan_free(cc);
}
TEST(close_wakes_everyone) { check_run(close_main, NULL, 2); }

/* A crowd on each queue, of every kind of wait: plain, select (the
 * channel first or second, the other case never ready) and with a
 * deadline that falls around the close.  Close takes the waiters a batch
 * at a time from both ends of the queue while the deadlines withdraw
 * theirs; each waiter must see exactly its one outcome.  The last one to
 * return frees the channel, as chan.h allows even while the close has
 * not returned. */
enum { CROWD = 400, CROWD_ROUNDS = 10 };
static loom_chan *cr_c, *cr_never;
static atomic_int cr_left, cr_started, cr_closed, cr_timedout;
static int64_t cr_close_at;

/* c, not cr_c: once the count is 0 the main coroutine goes on to the
 * next round, and its next channel. */
static void cr_done(loom_chan *c) {
  if (atomic_fetch_sub(&cr_left, 1) == 1)
    loom_chan_free(c);
}

static void cr_waiter(void *arg) {
  long i = (long)arg, v = 7;
  bool send = i & 1;
  loom_chan *c = cr_c;
  atomic_fetch_add(&cr_started, 1);
  int r;
  switch ((i >> 1) % 4) {
  case 0:
    r = send ? loom_chan_send(c, &v) : loom_chan_recv(c, &v);
    CHECK_EQ(r, send ? -EPIPE : 0);
    atomic_fetch_add(&cr_closed, 1);
    break;
  case 1:
  case 2: {
    int mine = (i >> 1) % 4 - 1;
    loom_case cs[2];
    cs[mine] = (loom_case){c, send ? LOOM_SEND : LOOM_RECV, &v, true};
    cs[1 - mine] = (loom_case){cr_never, LOOM_RECV, NULL, true};
    CHECK_EQ(loom_select(cs, 2, 0), mine);
    CHECK(!cs[mine].ok);
    atomic_fetch_add(&cr_closed, 1);
    break;
  }
  default: { /* a deadline within 1 ms either side of the close */
    int64_t dl = cr_close_at - CHECK_MS + (i % 21) * (CHECK_MS / 10);
    r = send ? loom_chan_send_until(c, &v, dl)
             : loom_chan_recv_until(c, &v, dl);
    if (r == -ETIMEDOUT) {
      atomic_fetch_add(&cr_timedout, 1);
    } else {
      CHECK_EQ(r, send ? -EPIPE : 0);
      atomic_fetch_add(&cr_closed, 1);
    }
  }
  }
  CHECK_EQ(v, 7); /* nothing received, nothing sent */
  cr_done(c);
}

static void crowd_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_chan_make(&cr_never, sizeof(long), 0));
  for (int round = 0; round < CROWD_ROUNDS; round++) {
    /* Even rounds: receivers on an unbuffered channel.  Odd rounds:
     * senders on a full one. */
    bool senders = round & 1;
    long v = 1;
    CHECK_OK(loom_chan_make(&cr_c, sizeof(long), senders ? 1 : 0));
    if (senders)
      CHECK_OK(loom_chan_send(cr_c, &v));
    atomic_store(&cr_left, CROWD);
    atomic_store(&cr_started, 0);
    atomic_store(&cr_closed, 0);
    atomic_store(&cr_timedout, 0);
    cr_close_at = loom_now() + 30 * CHECK_MS;
    for (long i = 0; i < CROWD; i++)
      CHECK_OK(loom_go(cr_waiter, (void *)(2 * i + senders)));
    while (atomic_load(&cr_started) < CROWD)
      loom_sleep(CHECK_MS);
    loom_sleep(cr_close_at - loom_now());
    CHECK_OK(loom_chan_close(cr_c)); /* cr_c may be gone on return */
    while (atomic_load(&cr_left) != 0)
      loom_sleep(CHECK_MS);
    CHECK_EQ(atomic_load(&cr_closed) + atomic_load(&cr_timedout), CROWD);
    CHECK(atomic_load(&cr_closed) >= CROWD / 4 * 3); /* all but deadlines */
  }
  loom_chan_free(cr_never);
}
TEST(close_wakes_a_crowd_each_once) { check_run(crowd_main, NULL, 2); }

/* Crowds of the sizes around close's batch (32): each waiter woken once,
 * none left behind.  Receivers, then senders on a full channel. */
static atomic_int bs_done;
static void bs_waiter(void *arg) {
  loom_chan *c = arg;
  long v = 5;
  int r = loom_chan_cap(c) == 0 ? loom_chan_recv(c, &v) : loom_chan_send(c, &v);
  CHECK_EQ(r, loom_chan_cap(c) == 0 ? 0 : -EPIPE);
  atomic_fetch_add(&bs_done, 1);
}
static void batch_sizes_main(void *arg) {
  (void)arg;
  static const int sizes[] = {1, 2, 31, 32, 33, 63, 64, 65, 97};
  for (int senders = 0; senders < 2; senders++) {
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
      loom_chan *c;
      long v = 1;
      CHECK_OK(loom_chan_make(&c, sizeof(long), (size_t)senders));
      if (senders)
        CHECK_OK(loom_chan_send(c, &v)); /* full: senders wait */
      atomic_store(&bs_done, 0);
      for (int i = 0; i < sizes[k]; i++)
        CHECK_OK(loom_go(bs_waiter, c));
      loom_sleep(5 * CHECK_MS); /* all parked (one P) */
      CHECK_OK(loom_chan_close(c));
      while (atomic_load(&bs_done) < sizes[k])
        loom_sleep(CHECK_MS / 10);
      CHECK_EQ(atomic_load(&bs_done), sizes[k]);
      loom_chan_free(c);
    }
  }
}
TEST(close_wakes_crowds_of_every_batch_size) {
  check_run(batch_sizes_main, NULL, 1);
}

/* ------------------------------------------------------------------ */
/* Deadlines and nowait.                                                */

static void deadline_main(void *arg) {
  (void)arg;
  loom_chan *c;
  long v = 0;
  CHECK_OK(loom_chan_make(&c, sizeof(long), 0));
  int64_t t0 = loom_now();
  CHECK_ERR(loom_chan_recv_until(c, &v, t0 + 20 * CHECK_MS), -ETIMEDOUT);
  CHECK_GE(loom_now() - t0, 20 * CHECK_MS);
  CHECK_ERR(loom_chan_send_until(c, &v, loom_now() + 5 * CHECK_MS),
            -ETIMEDOUT);
  loom_case cs[2] = {{c, LOOM_RECV, &v, false}, {NULL, LOOM_SEND, &v, false}};
  CHECK_ERR(loom_select(cs, 2, LOOM_SELECT_NOWAIT), -EAGAIN);
  t0 = loom_now();
  CHECK_ERR(loom_select(cs, 2, t0 + 20 * CHECK_MS), -ETIMEDOUT);
  CHECK_GE(loom_now() - t0, 20 * CHECK_MS);
  CHECK_ERR(loom_select(NULL, 0, 0), -EINVAL); /* would wait forever */
  /* A timed-out waiter left no trace: the next exchange works. */
  uc = c; /* the sender sends on uc */
  CHECK_OK(loom_go(sender, (void *)5L));
  CHECK_EQ(loom_select(cs, 2, loom_now() + 5000 * CHECK_MS), 0);
  CHECK(cs[0].ok);
  CHECK_EQ(v, 5);
  loom_chan_free(c);
}
TEST(deadlines_and_nowait) { check_run(deadline_main, NULL, 2); }

/* A send with no element on a channel of elements is refused, not a
 * copy from NULL; on a channel of signals (elem_size 0) it is the way
 * to send. */
static void null_elem_main(void *arg) {
  (void)arg;
  loom_chan *c, *sig;
  CHECK_OK(loom_chan_make(&c, sizeof(long), 1));
  CHECK_OK(loom_chan_make(&sig, 0, 1));
  CHECK_ERR(loom_chan_send(c, NULL), -EINVAL);
  CHECK_ERR(loom_chan_try_send(c, NULL), -EINVAL);
  CHECK_ERR(loom_chan_send_until(c, NULL, loom_now() + CHECK_MS), -EINVAL);
  loom_case cs[1] = {{c, LOOM_SEND, NULL, false}};
  CHECK_ERR(loom_select(cs, 1, LOOM_SELECT_NOWAIT), -EINVAL);
  CHECK_EQ(loom_chan_len(c), 0);
  CHECK_OK(loom_chan_send(sig, NULL));
  loom_case ss[1] = {{sig, LOOM_RECV, NULL, false}};
  CHECK_EQ(loom_select(ss, 1, 0), 0);
  CHECK(ss[0].ok);
  loom_chan_free(c);
  loom_chan_free(sig);
}
TEST(send_of_null_elem_is_einval) { check_run(null_elem_main, NULL, 1); }

/* ------------------------------------------------------------------ */
/* Select fairness: two always-ready cases, each chosen 50% ± 1%.       */

static void fair_main(void *arg) {
  (void)arg;
  loom_chan *a, *b;
  CHECK_OK(loom_chan_make(&a, 0, 1));
  CHECK_OK(loom_chan_make(&b, 0, 1));
  int rounds = 100000, hits[2] = {0, 0};
  for (int i = 0; i < rounds; i++) {
    (void)loom_chan_try_send(a, NULL); /* -EAGAIN if still full */
    (void)loom_chan_try_send(b, NULL);
    loom_case cs[2] = {{a, LOOM_RECV, NULL, false}, {b, LOOM_RECV, NULL, false}};
    int r = loom_select(cs, 2, 0);
    CHECK(r == 0 || r == 1);
    CHECK(cs[r].ok);
    hits[r]++;
  }
  double share = (double)hits[0] / rounds;
  printf("case 0 chosen %.3f%% of %d rounds\n", share * 100, rounds);
  CHECK(share > 0.49 && share < 0.51);
  loom_chan_free(a);
  loom_chan_free(b);
}
TEST(select_fairness) { check_run(fair_main, NULL, 1); }

/* ------------------------------------------------------------------ */
/* No deadlock: many coroutines select over the same channels in        */
/* different orders, sending and receiving, on all Ps.                  */

#define NCH 4
static loom_chan *chs[NCH];
static atomic_long moved;
static atomic_int stress_done;
static void selector(void *arg) {
  long id = (long)arg;
  long v = id;
  int iters = CHECK_SCALE(5000, 2000, 500);
  for (int i = 0; i < iters; i++) {
    loom_case cs[NCH];
    for (int k = 0; k < NCH; k++) {
      int ch = (int)((id + k) % NCH); /* a different order each */
      cs[k] = (loom_case){chs[ch], ((id + k + i) & 1) ? LOOM_SEND : LOOM_RECV,
                          &v, false};
    }
    /* Near the end nobody may be left to pair with: a deadline. */
    int r = loom_select(cs, NCH, loom_now() + 50 * CHECK_MS);
    CHECKF(r >= 0 || r == -ETIMEDOUT, "select %ld/%d: %s", id, i,
           loom_strerror(r));
    if (r >= 0)
      atomic_fetch_add(&moved, 1);
  }
  atomic_fetch_add(&stress_done, 1);
}
static void stress_main(void *arg) {
  (void)arg;
  for (int k = 0; k < NCH; k++)
    CHECK_OK(loom_chan_make(&chs[k], sizeof(long), (size_t)k)); /* 0..3 */
  int n = 16;
  for (long i = 0; i < n; i++)
    CHECK_OK(loom_go(selector, (void *)i));
  int64_t end = loom_now() + 20000 * CHECK_MS;
  while (atomic_load(&stress_done) < n) {
    CHECKF(loom_now() < end, "selects made no progress: deadlock?");
    loom_sleep(5 * CHECK_MS);
  }
  printf("%ld select operations completed\n", atomic_load(&moved));
  CHECK_GT(atomic_load(&moved), n * CHECK_SCALE(5000, 2000, 500) / 2);
  for (int k = 0; k < NCH; k++)
    loom_chan_free(chs[k]);
}
TEST(select_stress_no_deadlock) { check_run(stress_main, NULL, 2); }

/* ------------------------------------------------------------------ */
/* Plain threads and coroutines on the same channel.                    */

static loom_chan *tc;
static void *thread_producer(void *arg) {
  (void)arg;
  for (long i = 0; i < 10000; i++)
    CHECK_OK(loom_chan_send(tc, &i));
  CHECK_OK(loom_chan_close(tc));
  return NULL;
}
static atomic_long consumed;
static atomic_int consumer_done;
static void co_consumer(void *arg) {
  (void)arg;
  long v, last = -1;
  while (loom_chan_recv(tc, &v) == 1) {
    CHECK_EQ(v, last + 1);
    last = v;
    atomic_fetch_add(&consumed, 1);
  }
  atomic_store(&consumer_done, 1); /* out of the channel: it may go */
}
static void thread_main(void *arg) {
  (void)arg;
  pthread_t t;
  CHECK_OK(loom_chan_make(&tc, sizeof(long), 8));
  CHECK_OK(loom_go(co_consumer, NULL));
  CHECK_EQ(pthread_create(&t, NULL, thread_producer, NULL), 0);
  while (!atomic_load(&consumer_done))
    loom_sleep(CHECK_MS);
  CHECK_EQ(atomic_load(&consumed), 10000);
  loom_block_enter();
  pthread_join(t, NULL);
  loom_block_exit();
  loom_chan_free(tc);
}
TEST(thread_to_coroutine) { check_run(thread_main, NULL, 2); }

/* Without any runtime: two threads, a deadline. */
static loom_chan *nc;
static void *thread_echo(void *arg) {
  (void)arg;
  long v;
  while (loom_chan_recv(nc, &v) == 1)
    (void)loom_chan_send(nc, &v);
  return NULL;
}
TEST(threads_without_runtime) {
  loom_chan *c;
  long v = 1;
  CHECK_OK(loom_chan_make(&c, sizeof(long), 0));
  int64_t t0 = loom_now();
  CHECK_ERR(loom_chan_recv_until(c, &v, t0 + 20 * CHECK_MS), -ETIMEDOUT);
  CHECK_GE(loom_now() - t0, 20 * CHECK_MS);
  nc = c;
  pthread_t t;
  CHECK_EQ(pthread_create(&t, NULL, thread_echo, NULL), 0);
  for (long i = 0; i < 1000; i++) {
    CHECK_OK(loom_chan_send(c, &i));
    CHECK_EQ(loom_chan_recv(c, &v), 1);
    CHECK_EQ(v, i);
  }
  CHECK_OK(loom_chan_close(c));
  pthread_join(t, NULL);
  loom_chan_free(c);
}

/* A NULL channel is Go's nil channel: its length and capacity are 0
 * (Go's len and cap of a nil channel), and the calls that take one
 * report -EINVAL instead of crashing.  Plain thread, no runtime. */
TEST(null_channel_len_cap_and_errors) {
  long v = 1;
  CHECK_EQ(loom_chan_len(NULL), 0);
  CHECK_EQ(loom_chan_cap(NULL), 0);
  CHECK_ERR(loom_chan_send(NULL, &v), -EINVAL);
  CHECK_ERR(loom_chan_recv(NULL, &v), -EINVAL);
  CHECK_ERR(loom_chan_try_send(NULL, &v), -EINVAL);
  CHECK_ERR(loom_chan_try_recv(NULL, &v), -EINVAL);
  CHECK_ERR(loom_chan_send_until(NULL, &v, loom_now() + CHECK_MS), -EINVAL);
  CHECK_ERR(loom_chan_recv_until(NULL, &v, loom_now() + CHECK_MS), -EINVAL);
  CHECK_ERR(loom_chan_close(NULL), -EINVAL);
  loom_chan_free(NULL);
}

/* A sender waiting when the channel closes fails with -EPIPE, and no
 * receive gets an element from it after the close (chan.h; Go releases
 * every waiter under the lock).  loom_chan_close drops the lock between
 * wake-ups; a receive that came in then paired with a sender close had
 * not reached yet.  Plain threads, no runtime. */
#define CW_SENDERS 32
static loom_chan *cw_c;
static atomic_int cw_sent_ok, cw_queued, cw_after_close;
static void *cw_sender(void *arg) {
  long v = (long)(intptr_t)arg;
  atomic_fetch_add(&cw_queued, 1);
  if (loom_chan_send(cw_c, &v) == 0)
    atomic_fetch_add(&cw_sent_ok, 1);
  return NULL;
}
static void *cw_receiver(void *arg) {
  (void)arg;
  long probe = -1, v;
  while (loom_chan_try_send(cw_c, &probe) != -EPIPE) /* until closed */
    ;
  int r;
  while ((r = loom_chan_try_recv(cw_c, &v)) != 0)
    if (r == 1)
      atomic_fetch_add(&cw_after_close, 1);
  return NULL;
}
TEST(close_fails_every_waiting_sender) {
  check_watchdog(20, "close with waiting senders");
  int bad_rounds = 0;
  for (int round = 0; round < 20; round++) {
    CHECK_OK(loom_chan_make(&cw_c, sizeof(long), 0));
    atomic_store(&cw_sent_ok, 0);
    atomic_store(&cw_after_close, 0);
    atomic_store(&cw_queued, 0);
    pthread_t s[CW_SENDERS], r;
    for (long i = 0; i < CW_SENDERS; i++)
      CHECK_EQ(pthread_create(&s[i], NULL, cw_sender, (void *)(intptr_t)i), 0);
    while (atomic_load(&cw_queued) < CW_SENDERS)
      sched_yield();
    struct timespec ts = {0, 20 * 1000 * 1000}; /* let them all queue */
    nanosleep(&ts, NULL);
    CHECK_EQ(pthread_create(&r, NULL, cw_receiver, NULL), 0);
    CHECK_OK(loom_chan_close(cw_c));
    pthread_join(r, NULL);
    for (int i = 0; i < CW_SENDERS; i++)
      pthread_join(s[i], NULL);
    if (atomic_load(&cw_sent_ok) != 0 || atomic_load(&cw_after_close) != 0) {
      bad_rounds++;
      printf("round %d: %d sends returned 0 although the channel closed while "
             "they waited; %d receives got an element after the close\n",
             round, atomic_load(&cw_sent_ok), atomic_load(&cw_after_close));
    }
    loom_chan_free(cw_c);
  }
  CHECK_EQ(bad_rounds, 0);
}

/* A channel closed to signal "done" is freed by the receiver as soon as
 * its receive reports the close: nobody waits on it any more (chan.h).
 * loom_chan_close must not touch the channel after the wake-up that lets
 * that receive return.  Both threads share one CPU, so the woken receiver
 * usually runs (and frees) before the closer's next instruction.  Plain
 * threads, no runtime. */
static loom_chan *cf_c;
static atomic_int cf_waiting;
static void cf_pin(void) {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) != 0)
    return;
  int first = -1;
  for (int i = 0; i < CPU_SETSIZE && first < 0; i++)
    if (CPU_ISSET(i, &set))
      first = i;
  CPU_ZERO(&set);
  CPU_SET(first, &set);
  (void)sched_setaffinity(0, sizeof set, &set);
}
static void *cf_receiver(void *arg) {
  (void)arg;
  cf_pin();
  loom_chan *c = cf_c;
  atomic_store(&cf_waiting, 1);
  CHECK_EQ(loom_chan_recv(c, NULL), 0); /* closed */
  loom_chan_free(c);                    /* nobody waits on it any more */
  return NULL;
}
TEST(close_then_free_by_the_woken_receiver) {
  check_watchdog(30, "close, then free by the woken receiver");
  cf_pin();
  for (int round = 0; round < 200; round++) {
    CHECK_OK(loom_chan_make(&cf_c, 0, 0));
    atomic_store(&cf_waiting, 0);
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, cf_receiver, NULL), 0);
    while (!atomic_load(&cf_waiting))
      sched_yield();
    struct timespec ts = {0, 1000 * 1000}; /* let it park */
    nanosleep(&ts, NULL);
    CHECK_OK(loom_chan_close(cf_c));
    pthread_join(t, NULL);
  }
}

/* The same with a crowd, and the closer held after every wake-up (a test
 * hook) until the channel is gone, or 20 ms: the last waiter to return
 * frees it while close is still between its last wake-up and its
 * return, so a touch of the channel there is a use-after-free (ASan).
 * 1 waiter, and 33: a full batch, then one more. */
static loom_chan *ct_c;
static atomic_int ct_left, ct_freed;
static void ct_hold(void) {
  int64_t until = loom_now() + 20 * CHECK_MS;
  while (!atomic_load(&ct_freed) && loom_now() < until)
    sched_yield();
}
static void *ct_receiver(void *arg) {
  (void)arg;
  loom_chan *c = ct_c;
  CHECK_EQ(loom_chan_recv(c, NULL), 0); /* closed */
  if (atomic_fetch_sub(&ct_left, 1) == 1) {
    loom_chan_free(c); /* every other call on it has returned */
    atomic_store(&ct_freed, 1);
  }
  return NULL;
}
TEST(close_touches_nothing_after_its_last_wakeup) {
  check_watchdog(30, "close, held after each wake-up");
  static const int crowds[] = {1, 33};
  for (size_t k = 0; k < 2; k++) {
    int n = crowds[k];
    CHECK_OK(loom_chan_make(&ct_c, 0, 0));
    atomic_store(&ct_left, n);
    atomic_store(&ct_freed, 0);
    pthread_t t[33];
    for (int i = 0; i < n; i++)
      CHECK_EQ(pthread_create(&t[i], NULL, ct_receiver, NULL), 0);
    struct timespec ts = {0, 20 * 1000 * 1000}; /* let them all queue */
    nanosleep(&ts, NULL);
    (void)loom__test_after_close_wake(ct_hold);
    CHECK_OK(loom_chan_close(ct_c)); /* ct_c is gone when it returns */
    (void)loom__test_after_close_wake(NULL);
    for (int i = 0; i < n; i++)
      pthread_join(t[i], NULL);
    CHECK_EQ(atomic_load(&ct_freed), 1);
  }
}

/* ------------------------------------------------------------------ */
/* A wait without a deadline right after one with a deadline whose     */
/* timer raced the wake-up.  The plain wait leaves the coroutine's wait */
/* word as the timed wait left it (claimed, same sequence): that wait's */
/* timer, if it fires late, must still fail its claim, or it would end */
/* the plain wait with -ETIMEDOUT and the real wake-up would find the   */
/* coroutine running.                                                   */

static loom_chan *tp_go, *tp_a, *tp_b;
static atomic_long tp_won, tp_lost;

static void tp_helper(void *arg) {
  long rounds = (long)arg;
  for (long i = 0; i < rounds; i++) {
    int64_t when;
    CHECK_EQ(loom_chan_recv(tp_go, &when), 1);
    while (loom_now() < when) /* meet the deadline's timer */
      ;
    if (loom_chan_try_send(tp_a, &i) == 0)
      atomic_fetch_add(&tp_won, 1);
    else
      atomic_fetch_add(&tp_lost, 1);
    loom_sleep(CHECK_MS / 10); /* the plain wait parks meanwhile */
    CHECK_OK(loom_chan_send(tp_b, &i));
  }
}

static void timed_then_plain_main(void *arg) {
  (void)arg;
  long rounds = CHECK_SCALE(3000, 1000, 300);
  CHECK_OK(loom_chan_make(&tp_go, sizeof(int64_t), 1));
  CHECK_OK(loom_chan_make(&tp_a, sizeof(long), 0));
  CHECK_OK(loom_chan_make(&tp_b, sizeof(long), 0));
  CHECK_OK(loom_go(tp_helper, (void *)rounds));
  for (long i = 0; i < rounds; i++) {
    int64_t when = loom_now() + 50000 + (i % 7) * 5000;
    CHECK_OK(loom_chan_send(tp_go, &when));
    long v = -1;
    int r;
    switch (i % 3) {
    case 0:
      r = loom_chan_recv_until(tp_a, &v, when);
      break;
    case 1: {
      loom_case cs[1] = {{tp_a, LOOM_RECV, &v, false}};
      r = loom_select(cs, 1, when);
      r = r == 0 ? 1 : r;
      break;
    }
    default: {
      loom_ctx *c;
      CHECK_OK(loom_ctx_with_deadline(&c, loom_ctx_background(), when));
      r = loom_chan_recv_ctx(tp_a, &v, c);
      r = r == -ECANCELED || r == -ETIMEDOUT ? -ETIMEDOUT : r;
      loom_ctx_release(c);
      break;
    }
    }
    CHECKF(r == 1 || r == -ETIMEDOUT, "timed wait returned %d", r);
    if (r == 1)
      CHECK_EQ(v, i);
    /* The plain wait: exclusive, short path, sequence left alone. */
    v = -1;
    CHECK_EQ(loom_chan_recv(tp_b, &v), 1);
    CHECK_EQ(v, i);
  }
  /* The helper met every round (the race went both ways in practice:
   * about 3 in 4 sends beat the timer). */
  CHECK_EQ(atomic_load(&tp_won) + atomic_load(&tp_lost), rounds);
  loom_sleep(CHECK_MS);
  loom_chan_free(tp_go);
  loom_chan_free(tp_a);
  loom_chan_free(tp_b);
}
TEST(plain_wait_after_raced_timed_wait) {
  check_watchdog(25, "plain waits after timed waits");
  check_run(timed_then_plain_main, NULL, 2);
}

/* ------------------------------------------------------------------ */
/* One channel in several cases of a select (two receives and a send),
 * with another channel's receive, from 40 coroutines on two Ps and two
 * plain threads, with short deadlines that end many of them: every
 * value sent is received once (a coroutine's nodes, one per case, may
 * come from its P's wait records; a thread's are on its stack).       */
static loom_chan *sd_c, *sd_d;
static atomic_long sd_sent, sd_recvd, sd_nsent, sd_nrecvd;
static loom_wg sd_wg = LOOM_WG_INIT;
static int sd_iters;

static void sd_one(unsigned *seed) {
  long out = (long)(rand_r(seed) % 1000) + 1, in1 = 0, in2 = 0, in3 = 0;
  loom_case cs[4] = {{sd_c, LOOM_RECV, &in1, false},
                     {sd_c, LOOM_SEND, &out, false},
                     {sd_c, LOOM_RECV, &in2, false},
                     {sd_d, LOOM_RECV, &in3, false}};
  int64_t dl =
      rand_r(seed) % 3 == 0 ? 0 : loom_now() + (rand_r(seed) % 50) * 1000;
  int r = loom_select(cs, 4, dl == 0 ? loom_now() + 2000000 : dl);
  if (r == 0 || r == 2) {
    CHECK(cs[r].ok);
    atomic_fetch_add(&sd_recvd, r == 0 ? in1 : in2);
    atomic_fetch_add(&sd_nrecvd, 1);
  } else if (r == 1) {
    CHECK(cs[1].ok);
    atomic_fetch_add(&sd_sent, out);
    atomic_fetch_add(&sd_nsent, 1);
  } else {
    CHECK(r == -ETIMEDOUT);
  }
}

static void sd_co(void *arg) {
  unsigned seed = (unsigned)(uintptr_t)arg;
  for (int i = 0; i < sd_iters; i++)
    sd_one(&seed);
  loom_wg_done(&sd_wg);
}
static void *sd_thread(void *arg) {
  unsigned seed = (unsigned)(uintptr_t)arg;
  for (int i = 0; i < sd_iters; i++)
    sd_one(&seed);
  loom_wg_done(&sd_wg);
  return NULL;
}
static void sd_main(void *arg) {
  (void)arg;
  sd_iters = CHECK_SCALE(3000, 1000, 300);
  CHECK_OK(loom_chan_make(&sd_c, sizeof(long), 0));
  CHECK_OK(loom_chan_make(&sd_d, sizeof(long), 0));
  enum { NCO = 40, NTH = 2 };
  CHECK_OK(loom_wg_add(&sd_wg, NCO + NTH));
  pthread_t t[NTH];
  for (int i = 0; i < NTH; i++)
    CHECK_EQ(
        pthread_create(&t[i], NULL, sd_thread, (void *)(uintptr_t)(100 + i)),
        0);
  for (int i = 0; i < NCO; i++)
    CHECK_OK(loom_go(sd_co, (void *)(uintptr_t)(1 + i)));
  CHECK_OK(loom_wg_wait(&sd_wg, 0));
  loom_block_enter();
  for (int i = 0; i < NTH; i++)
    pthread_join(t[i], NULL);
  loom_block_exit();
  printf("%ld sent, %ld received\n", atomic_load(&sd_nsent),
         atomic_load(&sd_nrecvd));
  CHECK_EQ(atomic_load(&sd_nsent), atomic_load(&sd_nrecvd));
  CHECK_EQ(atomic_load(&sd_sent), atomic_load(&sd_recvd));
  loom_chan_free(sd_c);
  loom_chan_free(sd_d);
}
TEST(select_same_channel_many_cases) {
  check_watchdog(60, "selects with one channel in several cases");
  check_run(sd_main, NULL, 2);
}

CHECK_MAIN()
