/*
 * test_proc.c — the scheduler (src/runtime/proc.c, runq.c): spawning,
 * running every coroutine exactly once, stealing, fairness, foreign
 * threads, ids, errno across threads, pinning, per-spawn stacks,
 * configuration, and shutdown.
 */
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "check.h"
#include "runtime/export_test.h"

/* errno read through a pointer the compiler cannot keep across a park
 * (the header warns that &errno may be cached in a register). */
static int *(*volatile errno_loc)(void) = __errno_location;
#define ERRNO (*errno_loc())

static int64_t deadline_in_ms(int64_t ms) { return loom_now() + ms * CHECK_MS; }

/* Wait (by sleeping) until *v >= want; fail after `ms`. */
static void wait_for(atomic_long *v, long want, int64_t ms, const char *what) {
  int64_t end = deadline_in_ms(ms);
  while (atomic_load(v) < want) {
    CHECKF(loom_now() < end, "%s: %ld of %ld after %lld ms", what, atomic_load(v), want,
           (long long)ms);
    loom_sleep(CHECK_MS);
  }
}

/* ------------------------------------------------------------------ */
/* A million spawned coroutines all run exactly once.                  */

#define MILLION 1000000
static atomic_uchar ran_count[MILLION];
static atomic_long ran_total;
static long spawn_n;

static void count_once(void *arg) {
  uintptr_t i = (uintptr_t)arg;
  atomic_fetch_add_explicit(&ran_count[i], 1, memory_order_relaxed);
  atomic_fetch_add(&ran_total, 1);
}

static void million_main(void *arg) {
  long i;
  int64_t t0 = loom_now();
  (void)arg;
  for (i = 0; i < spawn_n; i++)
    CHECK_OK(loom_go(count_once, (void *)(uintptr_t)i));
  int64_t t1 = loom_now();
  wait_for(&ran_total, spawn_n, 120000, "spawned coroutines run");
  int64_t t2 = loom_now();
  /* Give a duplicate run the chance to happen before we look. */
  loom_sleep(20 * CHECK_MS);
  for (i = 0; i < spawn_n; i++)
    CHECKF(atomic_load(&ran_count[i]) == 1, "coroutine %ld ran %d times", i,
           (int)atomic_load(&ran_count[i]));
  CHECK_EQ(atomic_load(&ran_total), spawn_n);
  printf("%ld coroutines: spawned in %.0f ms, all ran after %.0f ms\n", spawn_n, (t1 - t0) / 1e6,
         (t2 - t0) / 1e6);
}

/* The full million, also under ASan.  Under TSan every coroutine is a
 * TSan fiber with mappings of its own, and a burst of spawns may have
 * them all alive at once (see stack/million_parked): 25,000. */
TEST(million_spawned_run_once) {
  spawn_n = CHECK_SCALE(MILLION, MILLION, 25000);
  check_run(million_main, NULL, 0);
}

/* Coroutines spawned on procs=2 as well as the default, many times over
 * a run; also what valgrind checks for leaks. */
static void spawn_finish_main(void *arg) {
  long i, n = check_under_valgrind() ? 2000 : 20000;
  (void)arg;
  for (i = 0; i < n; i++) {
    CHECK_OK(loom_go(count_once, (void *)(uintptr_t)i));
    if (i % 1000 == 999)
      loom_yield();
  }
  wait_for(&ran_total, n, 20000, "spawned coroutines run");
  for (i = 0; i < n; i++)
    CHECK_EQ(atomic_load(&ran_count[i]), 1);
}

TEST(spawn_and_finish) { check_run(spawn_finish_main, NULL, 2); }

/* Coroutines that spawn coroutines (a tree), spawned from every P. */
static atomic_long tree_done;
static void tree(void *arg) {
  uintptr_t depth = (uintptr_t)arg;
  if (depth > 0) {
    CHECK_OK(loom_go(tree, (void *)(depth - 1)));
    CHECK_OK(loom_go(tree, (void *)(depth - 1)));
  }
  atomic_fetch_add(&tree_done, 1);
}
static void tree_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_go(tree, (void *)(uintptr_t)14));
  wait_for(&tree_done, (1L << 15) - 1, 20000, "tree of coroutines");
  loom_sleep(10 * CHECK_MS);
  CHECK_EQ(atomic_load(&tree_done), (1L << 15) - 1);
}
TEST(spawn_tree) { check_run(tree_main, NULL, 0); }

/* ------------------------------------------------------------------ */
/* Stealing spreads a burst spawned on one P across all Ps.            */

#define BURST 64
static atomic_int burst_p_mask;
static atomic_long burst_done;
static atomic_int burst_bad_p;

static void burst_worker(void *arg) {
  int p = loom__test_proc_id();
  (void)arg;
  if (p < 0 || p >= 2)
    atomic_store(&burst_bad_p, 1);
  else
    atomic_fetch_or(&burst_p_mask, 1 << p);
  check_spin_ns(2 * CHECK_MS); /* CPU work, no scheduling point */
  atomic_fetch_add(&burst_done, 1);
}

static void burst_main(void *arg) {
  loom_stats st0, st1;
  int i, spawner_p = loom__test_proc_id();
  (void)arg;
  CHECK(spawner_p == 0 || spawner_p == 1);
  CHECK_OK(loom_stats_get(&st0));
  /* The burst goes to this P's queue: nothing yields in between. */
  for (i = 0; i < BURST; i++)
    CHECK_OK(loom_go(burst_worker, NULL));
  CHECK_EQ(loom__test_proc_id(), spawner_p);
  wait_for(&burst_done, BURST, 10000, "burst workers");
  CHECK_OK(loom_stats_get(&st1));
  CHECK_EQ(atomic_load(&burst_bad_p), 0);
  printf("Ps that ran the burst: mask 0x%x; steals %llu\n", atomic_load(&burst_p_mask),
         (unsigned long long)(st1.steals - st0.steals));
  CHECKF(atomic_load(&burst_p_mask) == 3,
         "all %d workers ran on P%d: no other P stole from the spawner's queue", BURST,
         spawner_p);
  CHECK_GT(st1.steals, st0.steals);
}

TEST(steal_spreads_burst) { check_run(burst_main, NULL, 2); }

/*
 * A coroutine spawned while the other P's thread is on its way to sleep
 * is run there, not left behind a coroutine that keeps its own thread
 * busy.  The spawner puts the child in its runnext and then reads
 * whether anyone spins; the thread going idle says it no longer spins
 * and then looks at the queues.  Unless each side's write is ordered
 * before its read, both can miss the other's (a store-load reordering,
 * which x86 does), and the child waits, an idle P beside it, until the
 * busy one parks.  Here the other thread runs each child and goes idle
 * again, while the spawner busy-waits a varying time and spawns the next
 * one, and then busy-waits up to 20 ms for it.  The window is a few
 * nanoseconds wide: tens of thousands of rounds catch it most of the
 * time, not always.
 *
 * A child that is only late is an overloaded machine, not a lost
 * wake-up: the other thread may hold a P or spin, or have been
 * descheduled between giving its P back and looking at the queues (the
 * stats then read idle and not spinning while it is about to take the
 * child).  A lost child stays where it is for as long as the spawner
 * keeps its P, so a late one is judged only after the spawner has left
 * the CPU to the other thread 200 times (a 1 ms sleep of its thread, not
 * of the coroutine, so the P stays busy), and only if the child is still
 * queued with a P idle and nobody spinning.
 */
static atomic_int child_ran;
static atomic_long lost_wakeups;
static void mark_ran(void *arg) {
  (void)arg;
  atomic_store(&child_ran, 1);
}
static void spawn_then_busy_main(void *arg) {
  int64_t end = loom_now() + 5000 * CHECK_MS;
  uint32_t x = 1;
  (void)arg;
  while (loom_now() < end && atomic_load(&lost_wakeups) == 0) {
    int64_t t0, spun;
    x = x * 1103515245u + 12345u;
    spun = (int64_t)((x >> 8) % 20000);
    for (t0 = loom_now(); loom_now() - t0 < spun;)
      ;
    atomic_store(&child_ran, 0);
    CHECK_OK(loom_go(mark_ran, NULL));
    for (t0 = loom_now();
         !atomic_load(&child_ran) && loom_now() - t0 < 20 * CHECK_MS;)
      ;
    if (!atomic_load(&child_ran)) {
      loom_stats st;
      for (int i = 0; i < 200 && !atomic_load(&child_ran); i++) {
        struct timespec ms = {0, CHECK_MS};
        nanosleep(&ms, NULL);
      }
      CHECK_OK(loom_stats_get(&st));
      if (st.idle_procs == 1 && st.spinning_threads == 0 &&
          !atomic_load(&child_ran))
        atomic_fetch_add(&lost_wakeups, 1);
      loom_yield(); /* let the child finish here if it is still queued */
    }
  }
}

TEST(spawn_while_other_thread_goes_idle_is_not_stranded) {
  check_run_hog(spawn_then_busy_main, NULL, 2);
  CHECK_EQ(atomic_load(&lost_wakeups), 0);
}

/* ------------------------------------------------------------------ */
/* A coroutine that yields in a loop does not starve others (procs=1). */

static atomic_int stop_flag;
static atomic_long yields;
static atomic_long sleeper_rounds;
static atomic_long plain_rounds;

static void yield_forever(void *arg) {
  (void)arg;
  while (!atomic_load(&stop_flag)) {
    atomic_fetch_add(&yields, 1);
    loom_yield();
  }
}

static void sleeper(void *arg) {
  int i;
  (void)arg;
  for (i = 0; i < 20; i++) {
    loom_sleep(CHECK_MS);
    atomic_fetch_add(&sleeper_rounds, 1);
  }
}

static atomic_long plain_yields_seen; /* yields of the loops meanwhile */

/* Yields 100 times.  In a fair run queue each of its yields lets each
 * yield loop yield about once; a scheduler that lets a yielder run again
 * ahead of the queue (its own runnext) gives the loops thousands of
 * turns per turn of ours, and ours progresses only when a timer shakes
 * the queue. */
static void plain_worker(void *arg) {
  int i;
  long y0 = atomic_load(&yields);
  (void)arg;
  for (i = 0; i < 1000; i++) {
    atomic_fetch_add(&plain_rounds, 1);
    if (i % 10 == 0)
      loom_yield();
  }
  atomic_store(&plain_yields_seen, atomic_load(&yields) - y0);
}

static void yield_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_go(yield_forever, NULL));
  CHECK_OK(loom_go(yield_forever, NULL));
  loom_yield(); /* the yielders are running now */
  CHECK_OK(loom_go(sleeper, NULL));
  CHECK_OK(loom_go(plain_worker, NULL));
  /* main waits on a timer too: timers must fire while yielders spin */
  wait_for(&plain_rounds, 1000, 5000, "a worker beside two yield loops");
  wait_for(&sleeper_rounds, 20, 5000, "a sleeper beside two yield loops");
  CHECK_GT(atomic_load(&yields), 0);
  atomic_store(&stop_flag, 1);
  printf("the two yield loops yielded %ld times during the worker's 100 yields\n",
         atomic_load(&plain_yields_seen));
  CHECKF(atomic_load(&plain_yields_seen) <= 100 * 2 * 25,
         "two yield loops yielded %ld times while a third coroutine yielded 100 times: "
         "loom_yield does not go to the back of the queue",
         atomic_load(&plain_yields_seen));
}

TEST(yield_loop_does_not_starve) {
  check_watchdog(20, "yielding coroutines starved the others");
  check_run(yield_main, NULL, 1);
}

/* A coroutine runnable on the global queue (here spawned by a plain
 * thread) runs before a yielder resumes: the local queue is looked at
 * first and the global one only every 61st switch, so a yielder that
 * went back on the local queue passed it over 60 more times. */
static atomic_int yg_ran, yg_spawned;
static void yg_queued(void *arg) {
  (void)arg;
  atomic_store(&yg_ran, 1);
}
static void *yg_spawner(void *arg) {
  (void)arg;
  CHECK_OK(loom_go(yg_queued, NULL));
  atomic_store(&yg_spawned, 1);
  return NULL;
}
static void yield_global_main(void *arg) {
  (void)arg;
  pthread_t th;
  CHECK_EQ(pthread_create(&th, NULL, yg_spawner, NULL), 0);
  while (!atomic_load(&yg_spawned)) /* no scheduling point: it stays queued */
    ;
  CHECK_EQ(pthread_join(th, NULL), 0);
  loom_stats st;
  CHECK_OK(loom_stats_get(&st));
  CHECK_EQ(st.global_runq, 1);
  int n = 0;
  while (!atomic_load(&yg_ran) && n < 1000) {
    loom_yield();
    n++;
  }
  CHECKF(n == 1, "the yielder resumed %d times before a queued coroutine ran",
         n - 1);
}
TEST(yield_lets_a_globally_queued_coroutine_run) {
  check_run(yield_global_main, NULL, 1);
}

/* ------------------------------------------------------------------ */
/* The global queue is not starved by a ping-pong pair (procs=1).      */

static atomic_int turn;
static atomic_long pingpongs;
static atomic_int foreign_ran;
static atomic_llong foreign_spawned_at, foreign_ran_at;

static void ping(void *arg) {
  int me = (int)(uintptr_t)arg;
  while (!atomic_load(&stop_flag)) {
    while (atomic_load(&turn) != me && !atomic_load(&stop_flag))
      loom_yield();
    atomic_store(&turn, 1 - me);
    atomic_fetch_add(&pingpongs, 1);
  }
}

static void from_foreign(void *arg) {
  (void)arg;
  atomic_store(&foreign_ran_at, loom_now());
  atomic_store(&foreign_ran, 1);
}

static void *foreign_spawner(void *arg) {
  (void)arg;
  CHECK_EQ(loom_id(), 0);
  CHECK_EQ(loom__test_proc_id(), -1);
  atomic_store(&foreign_spawned_at, loom_now());
  CHECK_OK(loom_go(from_foreign, NULL));
  return NULL;
}

static void pingpong_main(void *arg) {
  pthread_t t;
  int64_t end, wait_ns;
  (void)arg;
  CHECK_OK(loom_go(ping, (void *)0));
  CHECK_OK(loom_go(ping, (void *)1));
  while (atomic_load(&pingpongs) < 100)
    loom_yield();
  CHECK_EQ(pthread_create(&t, NULL, foreign_spawner, NULL), 0);
  /* main joins the ping-pong's way of waiting: it yields too, so the
   * local queue is never empty and only the global-queue check can find
   * the foreign coroutine. */
  end = deadline_in_ms(2000);
  while (!atomic_load(&foreign_ran) && loom_now() < end)
    loom_yield();
  atomic_store(&stop_flag, 1);
  loom_block_enter();
  pthread_join(t, NULL);
  loom_block_exit();
  CHECKF(atomic_load(&foreign_ran),
         "a coroutine spawned from a foreign thread did not run within 2 s "
         "while two coroutines ping-pong (%ld exchanges)",
         atomic_load(&pingpongs));
  wait_ns = atomic_load(&foreign_ran_at) - atomic_load(&foreign_spawned_at);
  printf("foreign coroutine ran %.3f ms after its spawn, %ld exchanges\n", wait_ns / 1e6,
         atomic_load(&pingpongs));
}

TEST(global_queue_not_starved_by_pingpong) {
  check_watchdog(20, "ping-pong starved the global queue");
  check_run(pingpong_main, NULL, 1);
}

/* ------------------------------------------------------------------ */
/* Nor is the local queue: a pair that hands the P back and forth       */
/* through runnext (a ping-pong over unbuffered channels, procs=1) lets */
/* the coroutines queued behind it run.                                 */

static loom_chan *rn_a, *rn_b;
static atomic_int rn_stop, rn_done;
static atomic_long rn_rounds;

static void rn_pinger(void *arg) {
  (void)arg;
  long v = 0;
  while (!atomic_load(&rn_stop)) {
    CHECK_OK(loom_chan_send(rn_a, &v));
    CHECK_EQ(loom_chan_recv(rn_b, &v), 1);
    atomic_fetch_add(&rn_rounds, 1);
  }
  CHECK_OK(loom_chan_close(rn_a));
  atomic_fetch_add(&rn_done, 1);
}

static void rn_ponger(void *arg) {
  (void)arg;
  long v;
  while (loom_chan_recv(rn_a, &v) == 1)
    CHECK_OK(loom_chan_send(rn_b, &v));
  atomic_fetch_add(&rn_done, 1);
}

static atomic_int rn_queued_ran;
static void rn_queued(void *arg) {
  (void)arg;
  atomic_store(&rn_queued_ran, 1);
}

static void runnext_pair_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_chan_make(&rn_a, sizeof(long), 0));
  CHECK_OK(loom_chan_make(&rn_b, sizeof(long), 0));
  CHECK_OK(loom_go(rn_pinger, NULL));
  CHECK_OK(loom_go(rn_ponger, NULL));
  /* A spawn goes to runnext, from where the pair's next hand-off pushes
   * it to the queue; main's own wake-up from the sleep lands there too. */
  CHECK_OK(loom_go(rn_queued, NULL));
  int64_t t0 = loom_now();
  loom_sleep(CHECK_MS);
  int64_t slept = loom_now() - t0;
  long rounds = atomic_load(&rn_rounds);
  CHECKF(atomic_load(&rn_queued_ran), "a queued coroutine did not run");
  atomic_store(&rn_stop, 1);
  printf("a 1 ms sleep took %.3f ms beside the pair (%ld rounds)\n",
         (double)slept / 1e6, rounds);
  CHECKF(rounds > 0, "the pair did not run");
  while (atomic_load(&rn_done) < 2)
    loom_yield();
  loom_chan_free(rn_a);
  loom_chan_free(rn_b);
}

TEST(local_queue_not_starved_by_runnext_pair) {
  check_watchdog(20, "a runnext ping-pong pair starved the local queue");
  check_run(runnext_pair_main, NULL, 1);
}

/* ------------------------------------------------------------------ */
/* Coroutines queued behind one that runs long without a scheduling     */
/* point, and timers on its P, are taken over by a P that is itself     */
/* busy (2 Ps).  Scheduling is cooperative, so nothing stops the long   */
/* runner; without the stall check the busy P never steals and they     */
/* wait until it is done.                                               */

#define STALL_SHORTS 8
#define STALL_HOG_MS 800
static atomic_int yielder_proc = -1;
static atomic_int shorts_ran;
static atomic_llong shorts_spawned_at, shorts_worst;

static void busy_yielder(void *arg) {
  (void)arg;
  while (!atomic_load(&stop_flag)) {
    atomic_store(&yielder_proc, loom__test_proc_id());
    loom_yield();
  }
}

static void hog(void *arg) {
  (void)arg;
  check_spin_ns(STALL_HOG_MS * CHECK_MS);
}

static void short_one(void *arg) {
  long long waited = loom_now() - atomic_load(&shorts_spawned_at);
  long long worst = atomic_load(&shorts_worst);
  (void)arg;
  while (waited > worst && !atomic_compare_exchange_weak(&shorts_worst, &worst, waited))
    ;
  atomic_fetch_add(&shorts_ran, 1);
}

static void stall_main(void *arg) {
  int i;
  int64_t slept, end = deadline_in_ms(5000);
  (void)arg;
  CHECK_OK(loom_go(busy_yielder, NULL));
  /* Wait until the yielder has the other P to itself: from then on that
   * P always has work and never looks for more the ordinary way. */
  while (atomic_load(&yielder_proc) < 0 || atomic_load(&yielder_proc) == loom__test_proc_id()) {
    CHECKF(loom_now() < end, "the yielder never moved to the other P");
    loom_sleep(CHECK_MS);
  }
  atomic_store(&shorts_spawned_at, loom_now());
  CHECK_OK(loom_go(hog, NULL));
  for (i = 0; i < STALL_SHORTS; i++)
    CHECK_OK(loom_go(short_one, NULL));
  /* Our P now runs one short coroutine, then the hog, with the other
   * shorts queued behind it and our sleep's timer in its heap. */
  slept = loom_now();
  loom_sleep(CHECK_MS);
  slept = loom_now() - slept;
  end = deadline_in_ms(5000);
  while (atomic_load(&shorts_ran) < STALL_SHORTS && loom_now() < end)
    loom_sleep(CHECK_MS);
  atomic_store(&stop_flag, 1);
  CHECK_EQ(atomic_load(&shorts_ran), STALL_SHORTS);
  printf("the last of %d queued coroutines started %.3f ms after its spawn, beside a %d ms "
         "runner\n",
         STALL_SHORTS, atomic_load(&shorts_worst) / 1e6, STALL_HOG_MS);
  CHECKF(atomic_load(&shorts_worst) < STALL_HOG_MS * CHECK_MS / 2,
         "coroutines queued behind a %d ms runner waited %.1f ms although another P "
         "was running",
         STALL_HOG_MS, atomic_load(&shorts_worst) / 1e6);
  printf("a 1 ms sleep whose timer was on the runner's P took %.3f ms\n", slept / 1e6);
  CHECKF(slept < STALL_HOG_MS * CHECK_MS / 2,
         "a 1 ms sleep took %.1f ms: its timer waited for a %d ms runner", slept / 1e6,
         STALL_HOG_MS);
}

TEST(busy_p_takes_over_a_stalled_queue) {
  check_watchdog(20, "coroutines queued behind a long runner never ran");
  check_run_hog(stall_main, NULL, 2);
}

/* ------------------------------------------------------------------ */
/* Spawn from foreign threads while the runtime runs.                   */

#define FOREIGN_THREADS 4
static long foreign_per_thread;

static void *foreign_many(void *arg) {
  long i;
  (void)arg;
  CHECK_EQ(loom_id(), 0);
  for (i = 0; i < foreign_per_thread; i++)
    CHECK_OK(loom_go(count_once, (void *)(uintptr_t)((long)(intptr_t)arg * foreign_per_thread + i)));
  return NULL;
}

static void foreign_main(void *arg) {
  pthread_t t[FOREIGN_THREADS];
  long i;
  (void)arg;
  for (i = 0; i < FOREIGN_THREADS; i++)
    CHECK_EQ(pthread_create(&t[i], NULL, foreign_many, (void *)(intptr_t)i), 0);
  loom_block_enter();
  for (i = 0; i < FOREIGN_THREADS; i++)
    pthread_join(t[i], NULL);
  loom_block_exit();
  wait_for(&ran_total, FOREIGN_THREADS * foreign_per_thread, 20000,
           "coroutines spawned by foreign threads");
  loom_sleep(5 * CHECK_MS);
  for (i = 0; i < FOREIGN_THREADS * foreign_per_thread; i++)
    CHECKF(atomic_load(&ran_count[i]) == 1, "coroutine %ld ran %d times", i,
           (int)atomic_load(&ran_count[i]));
}

TEST(spawn_from_foreign_thread) {
  foreign_per_thread = CHECK_SCALE(25000, 10000, 2000);
  CHECK_ERR(loom_go(count_once, NULL), LOOM_ENORUNTIME);
  check_run(foreign_main, NULL, 2);
  CHECK_ERR(loom_go(count_once, NULL), LOOM_ENORUNTIME);
}

/* Foreign threads spawning all along, while the runtime starts, runs
 * and stops: every call returns 0 or LOOM_ENORUNTIME, nothing crashes,
 * nothing leaks (TSan watches the start and stop races). */
static atomic_long spam_ok, spam_norun_after;
static atomic_int spam_stop; /* loom_run has returned */
static void nop(void *arg) { (void)arg; }
static void *spammer(void *arg) {
  int seen_ok = 0;
  (void)arg;
  for (;;) {
    int r = loom_go(nop, NULL);
    if (r == 0) {
      atomic_fetch_add(&spam_ok, 1);
      seen_ok = 1;
    } else {
      CHECK_ERR(r, LOOM_ENORUNTIME);
      if (seen_ok && atomic_fetch_add(&spam_norun_after, 1) > 1000)
        return NULL;
      /* A spammer that lost every race while the runtime ran. */
      if (atomic_load(&spam_stop))
        return NULL;
    }
  }
}
static void spam_main(void *arg) {
  (void)arg;
  while (atomic_load(&spam_ok) < 1000)
    loom_yield();
}
TEST(foreign_spawn_during_start_and_stop) {
  pthread_t t[2];
  int i;
  for (i = 0; i < 2; i++)
    CHECK_EQ(pthread_create(&t[i], NULL, spammer, NULL), 0);
  usleep(1000); /* they are calling loom_go already */
  check_run(spam_main, NULL, 2);
  atomic_store(&spam_stop, 1);
  for (i = 0; i < 2; i++)
    pthread_join(t[i], NULL);
  CHECK_GE(atomic_load(&spam_ok), 1000);
}

/* ------------------------------------------------------------------ */
/* Shutdown with coroutines still parked or runnable.                   */

static atomic_long parked_started;
static atomic_int parked_woke;
static int64_t main_returned_at;

static void sleep_an_hour(void *arg) {
  (void)arg;
  atomic_fetch_add(&parked_started, 1);
  loom_sleep((int64_t)3600 * 1000 * CHECK_MS);
  atomic_store(&parked_woke, 1);
}

static void parked_main(void *arg) {
  long i, n = *(long *)arg;
  for (i = 0; i < n; i++)
    CHECK_OK(loom_go(sleep_an_hour, NULL));
  wait_for(&parked_started, n, 20000, "coroutines started");
  main_returned_at = check_mono_ns();
}

TEST(shutdown_with_parked) {
  long n = check_under_valgrind() ? 500 : CHECK_SCALE(20000, 20000, 5000);
  int64_t back;
  check_run(parked_main, &n, 2);
  back = check_mono_ns();
  printf("loom_run returned %.1f ms after main with %ld coroutines parked\n",
         (back - main_returned_at) / 1e6, n);
  CHECK_EQ(atomic_load(&parked_woke), 0);
  CHECK_LT(back - main_returned_at, (check_under_valgrind() ? 20000 : 2000) * CHECK_MS);
  CHECK_ERR(loom_go(nop, NULL), LOOM_ENORUNTIME);
  CHECK_EQ(loom_procs(), 0);
}

static atomic_long spin_started;
static void yield_until_abandoned(void *arg) {
  (void)arg;
  atomic_fetch_add(&spin_started, 1);
  for (;;)
    loom_yield();
}
static void runnable_main(void *arg) {
  int i;
  (void)arg;
  for (i = 0; i < 100; i++)
    CHECK_OK(loom_go(yield_until_abandoned, NULL));
  wait_for(&spin_started, 100, 5000, "yielders started");
  main_returned_at = check_mono_ns();
}
TEST(shutdown_with_runnable) {
  check_run(runnable_main, NULL, 2);
  CHECK_LT(check_mono_ns() - main_returned_at, 2000 * CHECK_MS);
}

/* A second runtime after the first one stopped. */
static atomic_int runs;
static void run_twice_main(void *arg) {
  (void)arg;
  CHECK_EQ(loom_id(), 1);
  CHECK_OK(loom_go(count_once, (void *)(uintptr_t)atomic_load(&runs)));
  atomic_fetch_add(&runs, 1);
  wait_for(&ran_total, atomic_load(&runs), 5000, "coroutine of this run");
}
TEST(run_twice) {
  check_run(run_twice_main, NULL, 2);
  check_run(run_twice_main, NULL, 1);
  CHECK_EQ(atomic_load(&runs), 2);
  CHECK_EQ(atomic_load(&ran_count[0]), 1);
  CHECK_EQ(atomic_load(&ran_count[1]), 1);
}

/* ------------------------------------------------------------------ */
/* Errors: no runtime, runtime already running, bad configuration.      */

static int main_ran;
static void set_main_ran(void *arg) {
  (void)arg;
  main_ran = 1;
}

TEST(no_runtime) {
  loom_stats st;
  loom_go_opts o = {0};
  int64_t t0;
  CHECK_ERR(loom_go(nop, NULL), LOOM_ENORUNTIME);
  CHECK_ERR(loom_go_with(nop, NULL, &o), LOOM_ENORUNTIME);
  CHECK_ERR(loom_stats_get(&st), LOOM_ENORUNTIME);
  CHECK_EQ(loom_procs(), 0);
  CHECK_EQ(loom_id(), 0);
  CHECK_EQ(loom__test_proc_id(), -1);
  CHECK_EQ(loom__test_thread_id(), 0);
  CHECK_ERR(loom_pin(), LOOM_ENOTCO);
  loom_unpin(); /* harmless outside a coroutine */
  loom_yield();
  loom_block_enter();
  loom_block_exit();
  t0 = loom_now();
  CHECK_OK(loom_sleep(2 * CHECK_MS)); /* the thread sleeps */
  CHECK_GE(loom_now() - t0, 2 * CHECK_MS);
  t0 = loom_now();
  CHECK_OK(loom_sleep_until(t0 + 2 * CHECK_MS));
  CHECK_GE(loom_now() - t0, 2 * CHECK_MS);
}

static atomic_int second_ran;
static void second_main(void *arg) {
  (void)arg;
  atomic_store(&second_ran, 1);
}
static void *second_run(void *arg) {
  (void)arg;
  return (void *)(intptr_t)loom_run(second_main, NULL, NULL);
}
static void running_main(void *arg) {
  pthread_t t;
  void *r;
  (void)arg;
  CHECK_EQ(pthread_create(&t, NULL, second_run, NULL), 0);
  loom_block_enter();
  pthread_join(t, &r);
  loom_block_exit();
  CHECK_ERR((int)(intptr_t)r, LOOM_ERUNNING);
  CHECK_EQ(atomic_load(&second_ran), 0);
}
TEST(run_while_running) {
  check_run(running_main, NULL, 2);
  CHECK_EQ(atomic_load(&second_ran), 0);
}

TEST(bad_config) {
  loom_config cfg;
  loom_config_init(&cfg);
  cfg.procs = -1;
  CHECK_ERR(loom_run(set_main_ran, NULL, &cfg), -EINVAL);
  loom_config_init(&cfg);
  cfg.stack_size = 1024; /* below the 16 KiB minimum */
  CHECK_ERR(loom_run(set_main_ran, NULL, &cfg), -EINVAL);
  CHECK_EQ(main_ran, 0);
  /* and the runtime still starts afterwards */
  check_run(set_main_ran, NULL, 1);
  CHECK_EQ(main_ran, 1);
}

static void config_main(void *arg) {
  loom_stats st;
  (void)arg;
  CHECK_EQ(loom_procs(), 3);
  CHECK_OK(loom_stats_get(&st));
  CHECK_EQ(st.procs, 3);
  CHECK_GE(st.threads, 1);
  CHECK_GE(st.coroutines, 1);
  CHECK_GE(st.spawned, 1);
}
TEST(config_from_env) {
  loom_config cfg;
  cpu_set_t set;
  CHECK_EQ(unsetenv("LOOM_PROCS"), 0);
  CHECK_EQ(unsetenv("LOOM_STACK_SIZE"), 0);
  CHECK_EQ(unsetenv("LOOM_SCHEDTRACE"), 0);
  loom_config_init(&cfg);
  CHECK_EQ(sched_getaffinity(0, sizeof set, &set), 0);
  CHECK_EQ(cfg.procs, CPU_COUNT(&set));
  CHECK_EQ(cfg.stack_size, 64 * 1024);
  CHECK_EQ(cfg.schedtrace_ms, 0);
  CHECK_EQ(cfg.long_run_warn_ns, 10 * CHECK_MS);
  CHECK_EQ(setenv("LOOM_PROCS", "3", 1), 0);
  CHECK_EQ(setenv("LOOM_STACK_SIZE", "256k", 1), 0);
  CHECK_EQ(setenv("LOOM_SCHEDTRACE", "250", 1), 0);
  loom_config_init(&cfg);
  CHECK_EQ(cfg.procs, 3);
  CHECK_EQ(cfg.stack_size, 256 * 1024);
  CHECK_EQ(cfg.schedtrace_ms, 250);
  CHECK_EQ(setenv("LOOM_STACK_SIZE", "1m", 1), 0);
  loom_config_init(&cfg);
  CHECK_EQ(cfg.stack_size, 1024 * 1024);
  CHECK_EQ(unsetenv("LOOM_SCHEDTRACE"), 0);
  CHECK_OK(loom_run(config_main, NULL, NULL)); /* NULL: defaults + env */
}

/* ------------------------------------------------------------------ */
/* loom_id: 1 for main, unique, 0 outside.                              */

#define IDS 20000
static uint64_t ids[IDS];
static atomic_long ids_done;
static void record_id(void *arg) {
  ids[(uintptr_t)arg] = loom_id();
  loom_yield();
  CHECK_EQ(loom_id(), ids[(uintptr_t)arg]);
  atomic_fetch_add(&ids_done, 1);
}
static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}
static void *id_outside(void *arg) {
  (void)arg;
  return (void *)(uintptr_t)loom_id();
}
static void ids_main(void *arg) {
  long i;
  pthread_t t;
  void *r;
  (void)arg;
  CHECK_EQ(loom_id(), 1);
  for (i = 0; i < IDS; i++)
    CHECK_OK(loom_go(record_id, (void *)(uintptr_t)i));
  CHECK_EQ(pthread_create(&t, NULL, id_outside, NULL), 0);
  wait_for(&ids_done, IDS, 10000, "id recorders");
  loom_block_enter();
  pthread_join(t, &r);
  loom_block_exit();
  CHECK(r == NULL);
  qsort(ids, IDS, sizeof ids[0], cmp_u64);
  for (i = 0; i < IDS; i++) {
    CHECK_GT(ids[i], 1);
    if (i > 0)
      CHECKF(ids[i] != ids[i - 1], "id %llu given twice", (unsigned long long)ids[i]);
  }
  CHECK_EQ(loom_id(), 1);
}
TEST(id_unique) {
  CHECK_EQ(loom_id(), 0);
  check_run(ids_main, NULL, 2);
  CHECK_EQ(loom_id(), 0);
}

/* ------------------------------------------------------------------ */
/* errno is per coroutine and survives a park and a move to another M.  */

#define ERRNO_COS 64
static atomic_long errno_moves, errno_done;
static void errno_keeper(void *arg) {
  int mine = 1000 + (int)(uintptr_t)arg, i;
  uint64_t m = loom__test_thread_id();
  for (i = 0; i < 200; i++) {
    ERRNO = mine;
    if (i % 3 == 0)
      loom_sleep((i % 7) * 100000); /* the M may block in the poller: errno ETIMEDOUT/EINTR */
    else
      loom_yield();
    CHECKF(ERRNO == mine, "errno %d after a park, want %d", ERRNO, mine);
    if (loom__test_thread_id() != m) {
      atomic_fetch_add(&errno_moves, 1);
      m = loom__test_thread_id();
    }
    check_spin_ns(20000);
  }
  atomic_fetch_add(&errno_done, 1);
}
static void errno_main(void *arg) {
  int i;
  (void)arg;
  for (i = 0; i < ERRNO_COS; i++)
    CHECK_OK(loom_go(errno_keeper, (void *)(uintptr_t)i));
  ERRNO = 7;
  wait_for(&errno_done, ERRNO_COS, 20000, "errno keepers");
  CHECK_EQ(ERRNO, 7);
  printf("%ld moves between threads observed\n", atomic_load(&errno_moves));
  /* The test means something only if coroutines did change threads. */
  CHECK_GT(atomic_load(&errno_moves), 0);
}
TEST(errno_survives_migration) { check_run(errno_main, NULL, 2); }

/* errno of a coroutine parked on a mostly idle runtime: the M sleeps in
 * a system call that may set errno (ETIMEDOUT, EAGAIN, EINTR), and
 * another coroutine on the same (only) P sets errno meanwhile. */
static void errno_clobber(void *arg) {
  (void)arg;
  while (!atomic_load(&stop_flag)) {
    ERRNO = 999;
    loom_sleep(300000);
  }
}
static void errno_idle_main(void *arg) {
  int i;
  (void)arg;
  CHECK_OK(loom_go(errno_clobber, NULL));
  for (i = 0; i < 20; i++) {
    ERRNO = 12345 + i;
    loom_sleep(CHECK_MS);
    CHECK_EQ(ERRNO, 12345 + i);
  }
  atomic_store(&stop_flag, 1);
}
TEST(errno_survives_idle_park) { check_run(errno_idle_main, NULL, 1); }

/* ------------------------------------------------------------------ */
/* loom_pin keeps a coroutine on one thread across sleeps; the thread
 * runs nothing else; other coroutines still run.                        */

static atomic_ullong pinned_tid;
static atomic_int pinned_active;
static atomic_long pin_violations, others_progress, pinned_done;

static void pinned(void *arg) {
  int i;
  uint64_t tid;
  (void)arg;
  CHECK_OK(loom_pin());
  CHECK_OK(loom_pin()); /* nests */
  tid = loom__test_thread_id();
  CHECK_NE(tid, 0);
  atomic_store(&pinned_tid, tid);
  atomic_store(&pinned_active, 1);
  for (i = 0; i < 20; i++) {
    loom_sleep(2 * CHECK_MS);
    CHECKF(loom__test_thread_id() == tid, "pinned coroutine moved from M%llu to M%llu",
           (unsigned long long)tid, (unsigned long long)loom__test_thread_id());
    if (i == 10)
      loom_unpin(); /* one level left: still pinned */
    loom_yield();
    CHECK_EQ(loom__test_thread_id(), tid);
  }
  atomic_store(&pinned_active, 0);
  loom_unpin();
  atomic_fetch_add(&pinned_done, 1);
}

static void pin_other(void *arg) {
  (void)arg;
  while (!atomic_load(&stop_flag)) {
    if (atomic_load(&pinned_active) && loom__test_thread_id() == atomic_load(&pinned_tid))
      atomic_fetch_add(&pin_violations, 1);
    atomic_fetch_add(&others_progress, 1);
    if (atomic_load(&others_progress) % 8 == 0)
      loom_sleep(100000);
    else
      loom_yield();
  }
}

static void pin_main(void *arg) {
  int i;
  long p0;
  (void)arg;
  for (i = 0; i < 4; i++)
    CHECK_OK(loom_go(pin_other, NULL));
  CHECK_OK(loom_go(pinned, NULL));
  wait_for(&others_progress, 100, 5000, "others before the pin");
  p0 = atomic_load(&others_progress);
  wait_for(&pinned_done, 1, 10000, "pinned coroutine");
  CHECKF(atomic_load(&others_progress) > p0 + 20,
         "other coroutines made %ld steps while one was pinned",
         atomic_load(&others_progress) - p0);
  CHECKF(atomic_load(&pin_violations) == 0,
         "%ld times another coroutine ran on the pinned coroutine's thread",
         atomic_load(&pin_violations));
  atomic_store(&stop_flag, 1);
  loom_sleep(5 * CHECK_MS);
}

TEST(pin_keeps_thread) {
  check_watchdog(25, "pin test");
  check_run(pin_main, NULL, 2);
}
/* With one P the P must go to another M while the pinned coroutine
 * sleeps, and come back to the pinned M when it wakes. */
TEST(pin_one_proc) {
  check_watchdog(25, "pin test with one P");
  check_run(pin_main, NULL, 1);
}

/* A coroutine that returns while pinned: its thread is released. */
static atomic_long pin_return_done;
static void pin_and_return(void *arg) {
  (void)arg;
  CHECK_OK(loom_pin());
  loom_sleep(CHECK_MS);
  atomic_fetch_add(&pin_return_done, 1);
}
static void pin_return_main(void *arg) {
  int i;
  (void)arg;
  for (i = 0; i < 8; i++)
    CHECK_OK(loom_go(pin_and_return, NULL));
  wait_for(&pin_return_done, 8, 10000, "pinned coroutines");
  /* the runtime still runs ordinary coroutines */
  for (i = 0; i < 100; i++)
    CHECK_OK(loom_go(count_once, (void *)(uintptr_t)i));
  wait_for(&ran_total, 100, 5000, "coroutines after pinned ones returned");
}
TEST(pin_return_while_pinned) { check_run(pin_return_main, NULL, 2); }

/* Shutdown while pinned coroutines hand the P to each other's threads:
 * the hand-off's write of the P for the pinned thread raced with that
 * thread's read when shutdown woke it instead (TSan, about one run in
 * four of this loop). */
static atomic_int py_started;
static void pinned_yield_loop(void *arg) {
  (void)arg;
  CHECK_OK(loom_pin());
  atomic_fetch_add(&py_started, 1);
  for (;;)
    loom_yield();
}
static void pinned_handoff_main(void *arg) {
  (void)arg;
  for (int i = 0; i < 4; i++)
    CHECK_OK(loom_go(pinned_yield_loop, NULL));
  while (atomic_load(&py_started) < 4)
    loom_sleep(CHECK_MS / 10);
  loom_sleep(CHECK_MS / 5);
}
TEST(shutdown_amid_pinned_handoffs) {
  for (int i = 0; i < 100; i++) {
    atomic_store(&py_started, 0);
    check_run(pinned_handoff_main, NULL, 2);
  }
}

/* ------------------------------------------------------------------ */
/* Per-spawn stack size.                                                 */

static atomic_long big_done;
__attribute__((noinline)) static void use_stack(size_t bytes) {
  char buf[32 * 1024];
  size_t i;
  volatile char *v = buf;
  for (i = 0; i < sizeof buf; i += 512)
    v[i] = (char)i;
  if (bytes > sizeof buf)
    use_stack(bytes - sizeof buf);
  for (i = 0; i < sizeof buf; i += 512)
    CHECK_EQ(v[i], (char)i);
}
static void big_stack_user(void *arg) {
  use_stack((size_t)(uintptr_t)arg);
  loom_yield();
  use_stack((size_t)(uintptr_t)arg);
  atomic_fetch_add(&big_done, 1);
}
static void go_with_main(void *arg) {
  loom_go_opts o;
  (void)arg;
  memset(&o, 0, sizeof o);
  o.stack_size = 2 * 1024 * 1024; /* 1.5 MiB of frames would overflow 64 KiB */
  CHECK_OK(loom_go_with(big_stack_user, (void *)(uintptr_t)(1536 * 1024), &o));
  o.stack_size = 16 * 1024; /* the minimum */
  CHECK_OK(loom_go_with(count_once, (void *)(uintptr_t)0, &o));
  CHECK_OK(loom_go_with(count_once, (void *)(uintptr_t)1, NULL)); /* NULL: defaults */
  o.stack_size = 0;
  CHECK_OK(loom_go_with(count_once, (void *)(uintptr_t)2, &o));
  o.stack_size = 1024; /* below the minimum */
  CHECK_ERR(loom_go_with(count_once, (void *)(uintptr_t)3, &o), -EINVAL);
  o.stack_size = SIZE_MAX / 2; /* cannot be had */
  {
    int r = loom_go_with(count_once, (void *)(uintptr_t)4, &o);
    CHECKF(r == -ENOMEM || r == -EINVAL, "absurd stack size: %d (%s)", r, loom_err_name(r));
  }
  wait_for(&big_done, 1, 10000, "coroutine with a 2 MiB stack");
  wait_for(&ran_total, 3, 5000, "small-stack coroutines");
  loom_sleep(5 * CHECK_MS);
  CHECK_EQ(atomic_load(&ran_total), 3);
  CHECK_EQ(atomic_load(&ran_count[3]), 0);
  CHECK_EQ(atomic_load(&ran_count[4]), 0);
}
TEST(go_with_stack_size) { check_run(go_with_main, NULL, 2); }

/* The runtime's stack size comes from the configuration. */
static void cfg_stack_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_go(big_stack_user, (void *)(uintptr_t)(384 * 1024)));
  wait_for(&big_done, 1, 10000, "coroutine using 384 KiB of a 512 KiB stack");
}
TEST(config_stack_size) {
  loom_config cfg;
  loom_config_init(&cfg);
  cfg.stack_size = 512 * 1024;
  CHECK_OK(loom_run(cfg_stack_main, NULL, &cfg));
}

/* ------------------------------------------------------------------ */
/* Stats count what happened.                                            */

static void stats_main(void *arg) {
  loom_stats a, b;
  int i;
  (void)arg;
  CHECK_OK(loom_stats_get(&a));
  CHECK_EQ(a.procs, 2);
  CHECK_EQ(loom_procs(), 2);
  CHECK_GE(a.threads, 1);
  CHECK_GE(a.coroutines, 1);
  for (i = 0; i < 100; i++)
    CHECK_OK(loom_go(sleep_an_hour, NULL));
  wait_for(&parked_started, 100, 5000, "sleepers");
  CHECK_OK(loom_stats_get(&b));
  CHECK_EQ(b.spawned - a.spawned, 100);
  CHECK_EQ(b.coroutines, a.coroutines + 100);
  CHECK_LE(b.idle_procs, b.procs);
  CHECK_LE(b.idle_threads, b.threads);
  CHECK_LE(b.spinning_threads, b.threads);
}
TEST(stats) { check_run(stats_main, NULL, 2); }

/* ------------------------------------------------------------------ */
/* Restarting and stopping leave nothing behind.                         */

static int count_dir(const char *path) {
  int n = 0;
  struct dirent *e;
  DIR *d = opendir(path);
  if (d == NULL)
    return -1;
  while ((e = readdir(d)) != NULL)
    if (e->d_name[0] != '.')
      n++;
  closedir(d);
  return n - (strcmp(path, "/proc/self/fd") == 0); /* opendir's own fd */
}

static void restart_main(void *arg) {
  int i;
  (void)arg;
  for (i = 0; i < 20; i++)
    CHECK_OK(loom_go(sleep_an_hour, NULL));
  CHECK_OK(loom_go(count_once, (void *)(uintptr_t)0));
  loom_sleep(CHECK_MS);
}

/* Every loom_run joins its threads and closes its descriptors (epoll,
 * eventfd): run 30 runtimes one after another and count. */
TEST(restart_leaves_no_threads_or_fds) {
  int fds0, threads0, fds1, threads1, i;
  int before = count_dir("/proc/self/task"); /* 1 */
  check_run(restart_main, NULL, 2); /* first run: lazily made state */
  fds0 = count_dir("/proc/self/fd");
  threads0 = count_dir("/proc/self/task");
  CHECK_GT(fds0, 0);
  CHECK_EQ(threads0, before + CHECK_TSAN); /* TSan starts a thread of its own */
  for (i = 0; i < 30; i++)
    check_run(restart_main, NULL, 1 + i % 3);
  fds1 = count_dir("/proc/self/fd");
  threads1 = count_dir("/proc/self/task");
  CHECKF(threads1 == threads0, "%d threads after 30 runs, %d before", threads1, threads0);
  CHECKF(fds1 == fds0, "%d descriptors after 30 runs, %d before", fds1, fds0);
  CHECK_EQ(atomic_load(&ran_count[0]), 31);
}

/* loom_run gives its thread an alternate signal stack of its own (for
 * the stack overflow report) while it runs: the caller's comes back
 * afterwards, not a disabled one. */
static void signal_stack_main(void *arg) {
  (void)arg;
  loom_sleep(CHECK_MS);
}

TEST(run_restores_callers_signal_stack) {
  static char buf[1 << 16];
  stack_t ss, old;
  memset(&ss, 0, sizeof ss);
  ss.ss_sp = buf;
  ss.ss_size = sizeof buf;
  CHECK_OK(sigaltstack(&ss, NULL));
  check_run(signal_stack_main, NULL, 2);
  CHECK_OK(sigaltstack(NULL, &old));
  CHECK_EQ(old.ss_flags & SS_DISABLE, 0);
  CHECK(old.ss_sp == (void *)buf);
  CHECK_EQ(old.ss_size, sizeof buf);
  memset(&ss, 0, sizeof ss);
  ss.ss_flags = SS_DISABLE;
  CHECK_OK(sigaltstack(&ss, NULL));
}

/* Shutdown while a coroutine is pinned and asleep (its M is wired to
 * it), another pinned and spinning in yields, and one spawning more
 * coroutines in a loop. */
static atomic_long mixed_started;
static void pinned_sleeper(void *arg) {
  (void)arg;
  CHECK_OK(loom_pin());
  atomic_fetch_add(&mixed_started, 1);
  loom_sleep((int64_t)3600 * 1000 * CHECK_MS);
}
static void pinned_yielder(void *arg) {
  (void)arg;
  CHECK_OK(loom_pin());
  atomic_fetch_add(&mixed_started, 1);
  for (;;)
    loom_yield();
}
static void spawner_forever(void *arg) {
  (void)arg;
  atomic_fetch_add(&mixed_started, 1);
  for (;;) {
    int r = loom_go(nop, NULL);
    CHECKF(r == 0 || r == LOOM_ENORUNTIME, "loom_go while stopping: %d (%s)", r,
           loom_err_name(r));
    loom_yield();
  }
}
static void mixed_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_go(pinned_sleeper, NULL));
  CHECK_OK(loom_go(pinned_yielder, NULL));
  CHECK_OK(loom_go(spawner_forever, NULL));
  CHECK_OK(loom_go(sleep_an_hour, NULL));
  CHECK_OK(loom_go(yield_until_abandoned, NULL));
  wait_for(&mixed_started, 3, 5000, "pinned and spawning coroutines");
  loom_sleep(5 * CHECK_MS);
  main_returned_at = check_mono_ns();
}
TEST(shutdown_with_pinned_and_spawning) {
  int before;
  check_watchdog(20, "shutdown with pinned coroutines");
  before = count_dir("/proc/self/task");
  check_run(mixed_main, NULL, 2);
  CHECK_LT(check_mono_ns() - main_returned_at, 2000 * CHECK_MS);
  CHECK_EQ(count_dir("/proc/self/task"), before); /* every runtime thread joined */
}

/* More Ps than CPUs is allowed, and each P runs coroutines. */
static atomic_int many_p_mask;
static atomic_long many_p_done;
static void note_p(void *arg) {
  int p = loom__test_proc_id();
  (void)arg;
  CHECK(p >= 0 && p < 8);
  atomic_fetch_or(&many_p_mask, 1 << p);
  check_spin_ns(CHECK_MS);
  atomic_fetch_add(&many_p_done, 1);
}
static void many_procs_main(void *arg) {
  int i;
  (void)arg;
  CHECK_EQ(loom_procs(), 8);
  for (i = 0; i < 400; i++)
    CHECK_OK(loom_go(note_p, NULL));
  wait_for(&many_p_done, 400, 10000, "coroutines on 8 Ps");
  printf("Ps used: 0x%x\n", atomic_load(&many_p_mask));
  CHECK_GT(__builtin_popcount((unsigned)atomic_load(&many_p_mask)), 1);
}
TEST(more_procs_than_cpus) { check_run(many_procs_main, NULL, 8); }

/* loom_stats_get and loom_procs from a foreign thread while running. */
static void *stats_reader(void *arg) {
  int i;
  (void)arg;
  for (i = 0; i < 1000; i++) {
    loom_stats st;
    CHECK_OK(loom_stats_get(&st));
    CHECK_EQ(st.procs, 2);
    CHECK_EQ(loom_procs(), 2);
  }
  return NULL;
}
static void foreign_stats_main(void *arg) {
  pthread_t t;
  int i;
  (void)arg;
  CHECK_EQ(pthread_create(&t, NULL, stats_reader, NULL), 0);
  for (i = 0; i < 2000; i++) {
    CHECK_OK(loom_go(nop, NULL));
    if (i % 50 == 0)
      loom_sleep(100000);
  }
  loom_block_enter();
  pthread_join(t, NULL);
  loom_block_exit();
}
TEST(stats_from_foreign_thread) { check_run(foreign_stats_main, NULL, 2); }

/* Bad input gets a clear error, never a crash. */
static void bad_input_main(void *arg) {
  loom_go_opts o;
  (void)arg;
  memset(&o, 0, sizeof o);
  CHECK_ERR(loom_go(NULL, NULL), -EINVAL);
  CHECK_ERR(loom_go_with(NULL, NULL, &o), -EINVAL);
  CHECK_ERR(loom_stats_get(NULL), -EINVAL);
}
TEST(bad_input) {
  CHECK_ERR(loom_run(NULL, NULL, NULL), -EINVAL);
  check_run(bad_input_main, NULL, 1);
}

/* Garbage in the environment: loom_config_init never fails, and the
 * runtime then starts or refuses with -EINVAL; nothing crashes. */
TEST(config_env_garbage) {
  static const char *const procs[] = {"abc", "0", "-3", "99999999999999999999", "2x", ""};
  static const char *const stacks[] = {"abc", "0", "-5", "1", "99999999999999999999k",
                                       "18446744073709551615", "64q", ""};
  size_t i;
  loom_config cfg;
  for (i = 0; i < sizeof procs / sizeof procs[0]; i++) {
    int r;
    CHECK_EQ(setenv("LOOM_PROCS", procs[i], 1), 0);
    loom_config_init(&cfg);
    r = loom_run(set_main_ran, NULL, &cfg);
    CHECKF(r == 0 || r == -EINVAL, "LOOM_PROCS=%s: loom_run %d (%s)", procs[i], r,
           loom_err_name(r));
    printf("LOOM_PROCS=\"%s\": procs %d, loom_run %s\n", procs[i], cfg.procs, loom_err_name(r));
  }
  CHECK_EQ(unsetenv("LOOM_PROCS"), 0);
  for (i = 0; i < sizeof stacks / sizeof stacks[0]; i++) {
    int r;
    CHECK_EQ(setenv("LOOM_STACK_SIZE", stacks[i], 1), 0);
    loom_config_init(&cfg);
    r = loom_run(set_main_ran, NULL, &cfg);
    CHECKF(r == 0 || r == -EINVAL || r == -ENOMEM, "LOOM_STACK_SIZE=%s: loom_run %d (%s)",
           stacks[i], r, loom_err_name(r));
    printf("LOOM_STACK_SIZE=\"%s\": stack_size %zu, loom_run %s\n", stacks[i], cfg.stack_size,
           loom_err_name(r));
  }
}

/* A foreign thread while the runtime runs is "outside a coroutine":
 * sleep sleeps the thread, yield yields it, pin refuses, id is 0. */
static void *outsider(void *arg) {
  int64_t t0;
  loom_local_key k;
  (void)arg;
  CHECK_EQ(loom_id(), 0);
  CHECK_EQ(loom__test_proc_id(), -1);
  CHECK_EQ(loom__test_thread_id(), 0);
  CHECK_EQ(loom_procs(), 2);
  CHECK_ERR(loom_pin(), LOOM_ENOTCO);
  loom_unpin();
  loom_yield();
  t0 = loom_now();
  CHECK_OK(loom_sleep(3 * CHECK_MS));
  CHECK_GE(loom_now() - t0, 3 * CHECK_MS);
  t0 = loom_now();
  CHECK_OK(loom_sleep_until(t0 + 3 * CHECK_MS));
  CHECK_GE(loom_now() - t0, 3 * CHECK_MS);
  CHECK_OK(loom_local_key_create(&k, NULL));
  CHECK_ERR(loom_local_set(k, (void *)1), LOOM_ENOTCO);
  CHECK(loom_local_get(k) == NULL);
  return NULL;
}
static void outsider_main(void *arg) {
  pthread_t t;
  (void)arg;
  CHECK_EQ(pthread_create(&t, NULL, outsider, NULL), 0);
  loom_block_enter();
  pthread_join(t, NULL);
  loom_block_exit();
}
TEST(foreign_thread_is_outside) { check_run(outsider_main, NULL, 2); }

/* Many coroutines with their own stack size come and go as cheaply as
 * the others, give or take an mmap each (a sanity bound, not a
 * benchmark: 20,000 of them take ~70 ms with the runtime's size). */
static atomic_long custom_done;
static void custom_sleeper(void *arg) {
  (void)arg;
  loom_sleep(20 * CHECK_MS);
  atomic_fetch_add(&custom_done, 1);
}
static void custom_many_main(void *arg) {
  long i, n = *(long *)arg;
  loom_go_opts o;
  int64_t t0 = loom_now(), took;
  memset(&o, 0, sizeof o);
  o.stack_size = 128 * 1024;
  for (i = 0; i < n; i++)
    CHECK_OK(loom_go_with(custom_sleeper, NULL, &o));
  wait_for(&custom_done, n, 60000, "coroutines with 128 KiB stacks");
  took = loom_now() - t0;
  printf("%ld coroutines with 128 KiB stacks, 20 ms sleep each: %.0f ms\n", n, took / 1e6);
  CHECKF(took < 3000 * CHECK_MS, "%ld coroutines with their own stack size took %.0f ms", n,
         took / 1e6);
}
TEST(go_with_many) {
  long n = CHECK_SCALE(20000, 10000, 2000);
  check_run(custom_many_main, &n, 2);
}

/* A kernel without MADV_GUARD_INSTALL (before 6.13): arena stacks get a
 * canary, a stack of another size an mprotect guard and no canary.  The
 * test binary's madvise refuses advice 102 when told to, as such a
 * kernel does; no coroutine may then be taken for an overflow. */
static atomic_int no_guard_install;
int madvise(void *addr, size_t len, int advice) {
  if (advice == 102 && atomic_load(&no_guard_install)) {
    errno = EINVAL;
    return -1;
  }
  return (int)syscall(SYS_madvise, addr, len, advice);
}

static atomic_int old_kernel_yields;
static void yield_twice(void *arg) {
  (void)arg;
  loom_yield();
  loom_yield();
  atomic_fetch_add(&old_kernel_yields, 1);
}

static void old_kernel_main(void *arg) {
  (void)arg;
  CHECK(!loom__test_stack_guard_pages()); /* the fallback is in use */
  loom_go_opts o;
  memset(&o, 0, sizeof o);
  o.stack_size = 128 * 1024; /* not the default: a mapping of its own */
  for (int i = 0; i < 4; i++) {
    CHECK_OK(loom_go_with(yield_twice, NULL, &o));
    CHECK_OK(loom_go(yield_twice, NULL)); /* an arena slot, with a canary */
  }
  while (atomic_load(&old_kernel_yields) < 8)
    loom_sleep(CHECK_MS);
}
TEST(stacks_without_kernel_guard_pages) {
  atomic_store(&no_guard_install, 1);
  check_run(old_kernel_main, NULL, 2);
}

/* Without kernel guard pages, an overflow that overwrites the canary is
 * reported under the coroutine that did it, whether it then switches or
 * returns.  Returning was not checked: the slot went back to the cache
 * with its canary broken, and the next coroutine spawned on it was
 * reported at its first switch. */
static atomic_int smash_yield, smashed;
static __attribute__((noinline)) void smash_fn(void *arg) {
  (void)arg;
  volatile char buf[62 * 1024]; /* past the canary, within the slot */
  for (size_t i = 0; i < sizeof buf; i++)
    buf[i] = 0x41;
  atomic_store(&smashed, 1);
  if (atomic_load(&smash_yield))
    loom_yield();
}
static void innocent_fn(void *arg) {
  (void)arg;
  loom_yield();
}
static void smash_main(void *arg) {
  (void)arg;
  CHECK(!loom__test_stack_guard_pages());
  CHECK_OK(loom_go(smash_fn, NULL)); /* coroutine 2 */
  while (!atomic_load(&smashed))
    loom_sleep(CHECK_MS);
  for (int i = 0; i < 100; i++)
    loom_yield();
  CHECK_OK(loom_go(innocent_fn, NULL)); /* takes the freed slot */
  loom_sleep(50 * CHECK_MS);
}
HELPER(smash_child) {
  CHECK_EQ(check_argc, 1);
  atomic_store(&no_guard_install, 1);
  atomic_store(&smash_yield, check_argv[0][0] == 'y');
  check_run(smash_main, NULL, 1);
  _exit(0);
}
static void expect_smash_report(const char *mode) {
  struct check_child c;
  char how[128];
  check_spawn_self(&c, 20, "smash_child", mode);
  printf("child (%s) %s; its output:\n%s\n", mode,
         check_child_how(&c, how, sizeof how), c.out);
  CHECKF(strstr(c.out, "stack overflow in coroutine 2 ") != NULL,
         "coroutine 2 overwrote its canary, then %s: no report naming it",
         mode);
}
TEST(canary_overflow_then_yield) { expect_smash_report("yield"); }
TEST(canary_overflow_then_return) { expect_smash_report("return"); }

/* ------------------------------------------------------------------ */
/* One P, which takes its work without a CAS (no thief can exist), and  */
/* everything that readies Gs or moves that P between threads at once: */
/* ping-pong pairs (runnext and the ring), a coroutine whose blocking   */
/* sections sysmon retakes the P from, a foreign thread sending to a    */
/* coroutine (the global queue), a pinned coroutine (the P handed to    */
/* its M and back), timed receives whose timers race their senders,    */
/* and a contended mutex.  Every message arrives once, in order.        */

#define SOLE_PAIRS 4
static loom_chan *sole_ping[SOLE_PAIRS], *sole_pong[SOLE_PAIRS];
static loom_chan *sole_foreign, *sole_pinned, *sole_timed;
static loom_mutex sole_mu = LOOM_MUTEX_INIT;
static long sole_counter;
static atomic_int sole_stop;
static atomic_long sole_done, sole_blocks, sole_timed_got;

static void sole_ponger(void *arg) {
  long k = (long)arg, v;
  for (long i = 0;; i++) {
    int r = loom_chan_recv(sole_ping[k], &v);
    if (r == 0)
      break; /* closed */
    CHECK_EQ(r, 1);
    CHECK_EQ(v, i);
    loom_mutex_lock(&sole_mu);
    sole_counter++;
    loom_mutex_unlock(&sole_mu);
    CHECK_OK(loom_chan_send(sole_pong[k], &v));
  }
  atomic_fetch_add(&sole_done, 1);
}

static void sole_pinger(void *arg) {
  long k = (long)arg, rounds = CHECK_SCALE(40000, 10000, 3000), v;
  for (long i = 0; i < rounds; i++) {
    CHECK_OK(loom_chan_send(sole_ping[k], &i));
    CHECK_EQ(loom_chan_recv(sole_pong[k], &v), 1);
    CHECK_EQ(v, i);
    loom_mutex_lock(&sole_mu);
    sole_counter++;
    loom_mutex_unlock(&sole_mu);
  }
  CHECK_OK(loom_chan_close(sole_ping[k]));
  atomic_fetch_add(&sole_done, 1);
}

static void sole_blocker(void *arg) {
  (void)arg;
  while (!atomic_load(&sole_stop)) {
    loom_block_enter();
    struct timespec ts = {0, 200 * 1000}; /* long enough to be retaken */
    nanosleep(&ts, NULL);
    loom_block_exit();
    atomic_fetch_add(&sole_blocks, 1);
    loom_yield();
  }
  atomic_fetch_add(&sole_done, 1);
}

static void *sole_foreign_sender(void *arg) {
  long n = (long)arg;
  for (long i = 0; i < n; i++)
    CHECK_OK(loom_chan_send(sole_foreign, &i));
  return NULL;
}

static void sole_foreign_receiver(void *arg) {
  long n = (long)arg, v;
  for (long i = 0; i < n; i++) {
    CHECK_EQ(loom_chan_recv(sole_foreign, &v), 1);
    CHECK_EQ(v, i);
  }
  atomic_fetch_add(&sole_done, 1);
}

static void sole_pinned_receiver(void *arg) {
  long n = (long)arg, v;
  CHECK_OK(loom_pin());
  for (long i = 0; i < n; i++) {
    CHECK_EQ(loom_chan_recv(sole_pinned, &v), 1);
    CHECK_EQ(v, i);
  }
  loom_unpin();
  atomic_fetch_add(&sole_done, 1);
}

static void sole_pinned_sender(void *arg) {
  long n = (long)arg;
  for (long i = 0; i < n; i++)
    CHECK_OK(loom_chan_send(sole_pinned, &i));
  atomic_fetch_add(&sole_done, 1);
}

static void sole_timed_sender(void *arg) {
  long n = (long)arg;
  for (long i = 0; i < n; i++) {
    (void)loom_chan_try_send(sole_timed, &i);
    loom_sleep(CHECK_MS / 20);
  }
  atomic_store(&sole_stop, 1);
  atomic_fetch_add(&sole_done, 1);
}

static void sole_timed_receiver(void *arg) {
  (void)arg;
  long last = -1, v;
  while (!atomic_load(&sole_stop)) {
    int r = loom_chan_recv_until(sole_timed, &v, loom_now() + CHECK_MS / 20);
    CHECKF(r == 1 || r == -ETIMEDOUT, "timed receive returned %d", r);
    if (r == 1) {
      CHECK_GT(v, last);
      last = v;
      atomic_fetch_add(&sole_timed_got, 1);
    }
  }
  atomic_fetch_add(&sole_done, 1);
}

static void sole_main(void *arg) {
  (void)arg;
  long foreign_n = CHECK_SCALE(20000, 5000, 2000);
  long pinned_n = CHECK_SCALE(20000, 5000, 2000);
  long timed_n = CHECK_SCALE(4000, 1500, 600);
  for (long k = 0; k < SOLE_PAIRS; k++) {
    CHECK_OK(loom_chan_make(&sole_ping[k], sizeof(long), 0));
    CHECK_OK(loom_chan_make(&sole_pong[k], sizeof(long), 0));
  }
  CHECK_OK(loom_chan_make(&sole_foreign, sizeof(long), 0));
  CHECK_OK(loom_chan_make(&sole_pinned, sizeof(long), 0));
  CHECK_OK(loom_chan_make(&sole_timed, sizeof(long), 0));
  for (long k = 0; k < SOLE_PAIRS; k++) {
    CHECK_OK(loom_go(sole_ponger, (void *)k));
    CHECK_OK(loom_go(sole_pinger, (void *)k));
  }
  CHECK_OK(loom_go(sole_blocker, NULL));
  CHECK_OK(loom_go(sole_foreign_receiver, (void *)foreign_n));
  CHECK_OK(loom_go(sole_pinned_receiver, (void *)pinned_n));
  CHECK_OK(loom_go(sole_pinned_sender, (void *)pinned_n));
  CHECK_OK(loom_go(sole_timed_receiver, NULL));
  CHECK_OK(loom_go(sole_timed_sender, (void *)timed_n));
  pthread_t t;
  CHECK_EQ(pthread_create(&t, NULL, sole_foreign_sender, (void *)foreign_n), 0);
  long want = 2 * SOLE_PAIRS + 6;
  wait_for(&sole_done, want, 20000, "coroutines on one P");
  pthread_join(t, NULL);
  CHECK_EQ(sole_counter, 2 * SOLE_PAIRS * CHECK_SCALE(40000, 10000, 3000));
  CHECK_GT(atomic_load(&sole_blocks), 0);
  for (long k = 0; k < SOLE_PAIRS; k++) {
    loom_chan_free(sole_ping[k]);
    loom_chan_free(sole_pong[k]);
  }
  loom_chan_free(sole_foreign);
  loom_chan_free(sole_pinned);
  loom_chan_free(sole_timed);
}
TEST(sole_p_with_handoffs_foreign_wakes_and_pins) {
  check_watchdog(25, "one P, work from everywhere");
  check_run(sole_main, NULL, 1);
}

/* The main coroutine's id is 1 (runtime.h) also when plain threads spawn
 * coroutines while loom_run starts: the runtime is current, and takes
 * their spawns, before its main coroutine exists. */
static atomic_int idr_stop;
static atomic_ullong idr_main_id;
static void idr_nop(void *arg) { (void)arg; }
static void *idr_spawner(void *arg) {
  (void)arg;
  while (!atomic_load(&idr_stop))
    (void)loom_go(idr_nop, NULL);
  return NULL;
}
static void idr_main(void *arg) {
  (void)arg;
  atomic_store(&idr_main_id, loom_id());
}
TEST(main_is_1_while_plain_threads_spawn) {
  pthread_t th[2];
  for (int i = 0; i < 2; i++)
    CHECK_EQ(pthread_create(&th[i], NULL, idr_spawner, NULL), 0);
  int bad = 0, nruns = CHECK_SCALE(100, 50, 20);
  unsigned long long first = 0;
  for (int r = 0; r < nruns; r++) {
    check_run(idr_main, NULL, 2);
    if (atomic_load(&idr_main_id) != 1 && bad++ == 0)
      first = atomic_load(&idr_main_id);
  }
  atomic_store(&idr_stop, 1);
  for (int i = 0; i < 2; i++)
    pthread_join(th[i], NULL);
  CHECKF(bad == 0,
         "%d of %d runs: the main coroutine's id was not 1 (first: %llu)", bad,
         nruns, first);
}

CHECK_MAIN()
