/*
 * test_block.c — loom_block_enter / loom_block_exit (src/runtime/block.c,
 * the hand-off in sysmon.c): a coroutine stuck in a blocking call does
 * not stop the others, and shutdown waits for it.
 */
#include <stdatomic.h>

#include "check.h"
#include "runtime/export_test.h"

static atomic_long progress;
static atomic_int stop_flag;
static atomic_long during; /* progress made while the blocker blocked */
static atomic_int blocker_done;

static void ticker(void *arg) {
  (void)arg;
  while (!atomic_load(&stop_flag)) {
    atomic_fetch_add(&progress, 1);
    loom_sleep(CHECK_MS);
  }
}

static void blocker(void *arg) {
  long p0, p1;
  int p_before = loom__test_proc_id();
  (void)arg;
  CHECK_EQ(p_before, 0);
  p0 = atomic_load(&progress);
  loom_block_enter();
  usleep(200 * 1000);
  p1 = atomic_load(&progress);
  loom_block_exit();
  CHECK_EQ(loom__test_proc_id(), 0); /* it holds the (only) P again */
  atomic_store(&during, p1 - p0);
  /* and it can park and run as usual afterwards */
  loom_sleep(CHECK_MS);
  loom_yield();
  atomic_store(&blocker_done, 1);
}

static void one_proc_main(void *arg) {
  int64_t end;
  (void)arg;
  CHECK_OK(loom_go(ticker, NULL));
  while (atomic_load(&progress) < 3)
    loom_sleep(CHECK_MS);
  CHECK_OK(loom_go(blocker, NULL));
  end = loom_now() + 5000 * CHECK_MS;
  while (!atomic_load(&blocker_done)) {
    CHECKF(loom_now() < end, "blocker did not come back from its blocking section");
    loom_sleep(CHECK_MS);
  }
  atomic_store(&stop_flag, 1);
  printf("the ticker made %ld steps (1 ms sleeps) while the blocker spent 200 ms blocked\n",
         atomic_load(&during));
  CHECKF(atomic_load(&during) >= 10,
         "only %ld ticks during a 200 ms blocking call on a 1-P runtime: "
         "the P was not handed off",
         atomic_load(&during));
}

TEST(blocking_call_does_not_stop_others) {
  check_watchdog(20, "blocking call test");
  check_run(one_proc_main, NULL, 1);
}

/* Many coroutines block at once on one P: they block in parallel on
 * their own threads (serially this would take 16 x 50 ms = 800 ms). */
#define BLOCKERS 16
static atomic_long blocked_done;
static void short_blocker(void *arg) {
  (void)arg;
  loom_block_enter();
  usleep(50 * 1000);
  loom_block_exit();
  atomic_fetch_add(&blocked_done, 1);
}
static void parallel_main(void *arg) {
  int i;
  int64_t t0 = loom_now(), took;
  (void)arg;
  for (i = 0; i < BLOCKERS; i++)
    CHECK_OK(loom_go(short_blocker, NULL));
  while (atomic_load(&blocked_done) < BLOCKERS)
    loom_sleep(CHECK_MS);
  took = loom_now() - t0;
  printf("%d blockers of 50 ms on one P took %.1f ms\n", BLOCKERS, took / 1e6);
  CHECKF(took < 600 * CHECK_MS, "%d blocking calls of 50 ms took %.1f ms on one P", BLOCKERS,
         took / 1e6);
}
TEST(blockers_run_in_parallel) {
  check_watchdog(20, "parallel blockers");
  check_run(parallel_main, NULL, 1);
}

/* Short blocking sections, many of them, on every P at once (the fast
 * path: the P is not taken; TSan watches the hand-off race). */
static atomic_long quick_done;
static void quick(void *arg) {
  int i;
  (void)arg;
  for (i = 0; i < 20000; i++) {
    loom_block_enter();
    if (i % 1000 == 0)
      usleep(100); /* sometimes long enough for sysmon to retake the P */
    loom_block_exit();
    if (i % 100 == 0)
      loom_yield();
  }
  atomic_fetch_add(&quick_done, 1);
}
static void quick_main(void *arg) {
  int i;
  (void)arg;
  for (i = 0; i < 8; i++)
    CHECK_OK(loom_go(quick, NULL));
  while (atomic_load(&quick_done) < 8)
    loom_sleep(CHECK_MS);
}
TEST(quick_sections) {
  check_watchdog(25, "quick blocking sections");
  check_run(quick_main, NULL, 2);
}

/* Outside a coroutine the pair does nothing: before the runtime, and
 * on a foreign thread while it runs (no P is marked blocked or handed
 * off; the runtime's one P keeps running its coroutines). */
static atomic_int foreign_done;
static void *foreign_sections(void *arg) {
  int i;
  (void)arg;
  for (i = 0; i < 10000; i++) {
    loom_block_enter();
    if (i % 1000 == 0)
      usleep(1000);
    loom_block_exit();
  }
  atomic_store(&foreign_done, 1);
  return NULL;
}
static void outside_main(void *arg) {
  pthread_t t;
  loom_stats st;
  long p0;
  (void)arg;
  CHECK_OK(loom_go(ticker, NULL));
  CHECK_EQ(pthread_create(&t, NULL, foreign_sections, NULL), 0);
  p0 = atomic_load(&progress);
  while (!atomic_load(&foreign_done))
    loom_sleep(CHECK_MS);
  loom_block_enter();
  pthread_join(t, NULL);
  loom_block_exit();
  CHECK_OK(loom_stats_get(&st));
  CHECK_EQ(st.procs, 1);
  CHECK_GT(atomic_load(&progress), p0);
  CHECK_EQ(loom__test_proc_id(), 0);
  atomic_store(&stop_flag, 1);
}
TEST(outside_coroutine) {
  int i;
  for (i = 0; i < 10; i++) {
    loom_block_enter();
    loom_block_exit();
  }
  CHECK_EQ(loom_id(), 0);
  check_run(outside_main, NULL, 1);
}

/* loom_run waits for a coroutine inside a blocking section. */
static atomic_int in_section, left_usleep;
static void long_section(void *arg) {
  (void)arg;
  loom_block_enter();
  atomic_store(&in_section, 1);
  usleep(150 * 1000);
  atomic_store(&left_usleep, 1);
  loom_block_exit();
}
static void shutdown_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_go(long_section, NULL));
  while (!atomic_load(&in_section))
    loom_sleep(CHECK_MS);
}
TEST(shutdown_waits_for_section) {
  check_watchdog(20, "shutdown with a coroutine in a blocking section");
  check_run(shutdown_main, NULL, 2);
  CHECKF(atomic_load(&left_usleep) == 1,
         "loom_run returned while a coroutine was inside loom_block_enter/exit");
}

/* A coroutine that returns inside loom_block_enter leaves the section,
 * as one that returns pinned is unpinned (it used to crash the thread's
 * scheduler, which has no P there). */
static atomic_int ret_done;
static void returns_blocked(void *arg) {
  (void)arg;
  loom_block_enter();
  atomic_store(&ret_done, 1);
}
static void ret_blocked_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_go(returns_blocked, NULL));
  while (!atomic_load(&ret_done))
    loom_sleep(CHECK_MS);
  for (int i = 0; i < 20; i++) /* the scheduler goes on, on every P */
    loom_sleep(CHECK_MS);
}
TEST(return_inside_block_section) {
  check_watchdog(20, "a coroutine returned inside a block section");
  check_run(ret_blocked_main, NULL, 2);
}

/* A listener on loopback and a connection to it: *a dialled, *b accepted. */
static void tcp_pair(loom_listener **l, loom_conn **a, loom_conn **b) {
  char addr[64];
  CHECK_OK(loom_listen(l, "tcp", "127.0.0.1:0"));
  CHECK_OK(loom_listener_addr(*l, addr, sizeof addr));
  CHECK_OK(loom_dial(a, "tcp", addr));
  CHECK_OK(loom_accept(*l, b));
}

/* Setting a deadline inside a blocking section: 0 or a passed deadline
 * needs no timer; one ahead goes to the runtime's timers for threads
 * without a P (the section has given its P up) and fires there.  (It
 * aborted the process once: "pd_set_deadline: not on a coroutine"; then
 * it returned LOOM_ENOTCO.) */
static void deadline_in_section_main(void *arg) {
  (void)arg;
  loom_listener *l;
  loom_conn *a, *b;
  tcp_pair(&l, &a, &b);
  loom_block_enter();
  int ahead = loom_set_read_deadline(a, loom_now() + 30 * CHECK_MS);
  int passed = loom_set_write_deadline(a, 1);
  loom_block_exit();
  CHECK_OK(ahead);
  CHECK_OK(passed);
  char c;
  CHECK_ERR(loom_read(a, &c, 1), -ETIMEDOUT);   /* the timer fired */
  CHECK_ERR(loom_write(a, "x", 1), -ETIMEDOUT); /* the passed one holds */
  loom_block_enter();
  int none = loom_set_deadline(a, 0, 0);
  loom_block_exit();
  CHECK_OK(none);
  CHECK_EQ(loom_write(a, "x", 1), 1);
  CHECK_EQ(loom_read(b, &c, 1), 1);
  CHECK_OK(loom_close(a));
  CHECK_OK(loom_close(b));
  CHECK_OK(loom_listener_close(l));
}
TEST(deadline_set_inside_block_section) {
  check_run(deadline_in_section_main, NULL, 2);
}

/* The sync layer inside a blocking section waits as a plain thread does:
 * the thread blocks, the P goes to another thread, and the coroutines
 * that complete the waits run there — on a runtime with one P too.  (A
 * channel wait with a deadline crashed on the section's missing P.) */
static loom_chan *sec_ch;
static loom_mutex sec_mu = LOOM_MUTEX_INIT;
static loom_wg sec_wg = LOOM_WG_INIT;
static atomic_int sec_sent;
static void sec_sender(void *arg) {
  (void)arg;
  loom_sleep(20 * CHECK_MS); /* the receiver is in its section by then */
  long v = 7;
  CHECK_OK(loom_chan_send(sec_ch, &v));
  v = 8;
  CHECK_OK(loom_chan_send(sec_ch, &v));
  loom_sleep(20 * CHECK_MS);
  loom_mutex_unlock(&sec_mu);
  loom_sleep(20 * CHECK_MS);
  loom_wg_done(&sec_wg);
  atomic_store(&sec_sent, 1);
}
static void sync_in_section_main(void *arg) {
  (void)arg;
  long v = 0;
  CHECK_OK(loom_chan_make(&sec_ch, sizeof v, 0));
  loom_mutex_lock(&sec_mu); /* the sender unlocks it */
  loom_wg_add(&sec_wg, 1);
  CHECK_OK(loom_go(sec_sender, NULL));
  loom_block_enter();
  int r1 = loom_chan_recv(sec_ch, &v);
  long v1 = v;
  int r2 = loom_chan_recv_until(sec_ch, &v, loom_now() + 5000 * CHECK_MS);
  long v2 = v;
  int r3 = loom_chan_recv_until(sec_ch, &v, loom_now() + 10 * CHECK_MS);
  loom_mutex_lock(&sec_mu);
  int r4 = loom_wg_wait(&sec_wg, 0);
  loom_block_exit();
  CHECK_EQ(r1, 1);
  CHECK_EQ(v1, 7);
  CHECK_EQ(r2, 1);
  CHECK_EQ(v2, 8);
  CHECK_ERR(r3, -ETIMEDOUT);
  CHECK_OK(r4);
  CHECK(atomic_load(&sec_sent));
  loom_mutex_unlock(&sec_mu);
  loom_chan_free(sec_ch);
}
TEST(sync_waits_inside_block_section) {
  check_watchdog(20, "sync waits inside a blocking section");
  check_run(sync_in_section_main, NULL, 1);
}

/* Two different deadlines at once inside a section, one of them ahead:
 * both apply (the read deadline is cleared, the write deadline is
 * armed on the timers for threads without a P). */
static void two_deadlines_in_section_main(void *arg) {
  (void)arg;
  loom_listener *l;
  loom_conn *a, *b;
  tcp_pair(&l, &a, &b);
  CHECK_OK(loom_set_read_deadline(a, 1)); /* passed */
  CHECK_EQ(loom_write(b, "x", 1), 1);
  loom_block_enter();
  int r = loom_set_deadline(a, 0, loom_now() + 1000 * CHECK_MS);
  loom_block_exit();
  CHECK_OK(r);
  char c;
  CHECK_EQ(loom_read(a, &c, 1), 1); /* the read deadline is gone */
  CHECK_OK(loom_set_deadline(a, 0, 0));
  CHECK_OK(loom_close(a));
  CHECK_OK(loom_close(b));
  CHECK_OK(loom_listener_close(l));
}
TEST(two_deadlines_inside_block_section_apply_both) {
  check_run(two_deadlines_in_section_main, NULL, 2);
}

CHECK_MAIN()
