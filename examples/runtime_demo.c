/*
 * runtime_demo — a short tour of loom's runtime.
 *
 * Each step uses one part of include/loom/runtime.h, prints what it did,
 * and checks the result: spawning many coroutines, keeping many of them
 * asleep at once, two coroutines taking turns, a blocking call that does
 * not stop the others, a coroutine pinned to its thread, coroutine-local
 * storage, and the scheduler's statistics.  The whole tour takes a few
 * seconds; the program exits 0 when every check held and 1 otherwise.
 *
 *   runtime_demo [N]        N coroutines per step (default 100000)
 *
 * The runtime's environment variables apply: LOOM_PROCS (processors),
 * LOOM_STACK_SIZE (bytes per coroutine stack), LOOM_SCHEDTRACE (ms between
 * scheduler trace lines).
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <loom.h>

#define MS (INT64_C(1000000))
#define STEP_TIMEOUT (20000 * MS) /* a step that takes longer has failed */

static unsigned long n_coroutines = 100000;
static atomic_int failures;

static void check(int ok, const char *what) {
  if (!ok) {
    printf("  FAILED: %s\n", what);
    atomic_fetch_add(&failures, 1);
  }
}

static double ms_since(int64_t t0) { return (double)(loom_now() - t0) / 1e6; }

/* Parks the caller in 1 ms naps until *counter reaches `want`.  Returns 0,
 * or -ETIMEDOUT after STEP_TIMEOUT. */
static int wait_for(atomic_ulong *counter, unsigned long want) {
  int64_t deadline = loom_now() + STEP_TIMEOUT;
  while (atomic_load(counter) < want) {
    if (loom_now() > deadline)
      return -ETIMEDOUT;
    loom_sleep(1 * MS);
  }
  return 0;
}

/* ---- 1. spawn: N short coroutines ------------------------------------- */

static atomic_ulong spawn_done;
static atomic_ulong spawn_sum;
static atomic_ulong spawn_bad_id;

static void spawn_fn(void *arg) {
  uint64_t id = loom_id();
  if (id <= 1) /* 1 is the main coroutine */
    atomic_fetch_add(&spawn_bad_id, 1);
  atomic_fetch_add(&spawn_sum, (unsigned long)(uintptr_t)arg);
  atomic_fetch_add(&spawn_done, 1);
}

static void step_spawn(void) {
  unsigned long n = n_coroutines;
  printf("\n[1] spawn: %lu coroutines, each adds its index to a sum\n", n);
  int64_t t0 = loom_now();
  for (unsigned long i = 0; i < n; i++) {
    int rc = loom_go(spawn_fn, (void *)(uintptr_t)i);
    if (rc != 0) {
      printf("  loom_go: %s\n", loom_strerror(rc));
      check(0, "loom_go succeeds");
      return;
    }
    if (i % 1024 == 1023)
      loom_yield(); /* a scheduling point now and then */
  }
  double spawn_ms = ms_since(t0);
  check(wait_for(&spawn_done, n) == 0, "all coroutines ran");
  double all_ms = ms_since(t0);
  unsigned long want = n * (n - 1) / 2;
  printf("  spawned in %.1f ms (%.0f ns each), all finished after %.1f ms\n",
         spawn_ms, spawn_ms * 1e6 / (double)n, all_ms);
  printf("  sum = %lu (expected %lu)\n", atomic_load(&spawn_sum), want);
  check(atomic_load(&spawn_sum) == want, "the sum is right");
  check(atomic_load(&spawn_bad_id) == 0, "every coroutine has its own id");
}

/* ---- 2. sleep: N coroutines asleep at the same time ------------------- */

static int64_t wake_at; /* written before the sleepers are spawned */
static atomic_ulong sleep_done;
static atomic_ulong sleep_early;
static atomic_long sleep_max_late_ns;

static void sleep_fn(void *arg) {
  loom_sleep_until(wake_at);
  long late = (long)(loom_now() - wake_at);
  if (late < 0)
    atomic_fetch_add(&sleep_early, 1);
  long prev = atomic_load(&sleep_max_late_ns);
  while (late > prev &&
         !atomic_compare_exchange_weak(&sleep_max_late_ns, &prev, late))
    ;
  atomic_fetch_add(&sleep_done, 1);
}

static void step_sleep(void) {
  unsigned long n = n_coroutines;
  /* Time enough to spawn them all (a few microseconds each). */
  int64_t nap = 300 * MS + (int64_t)n * 5000;
  printf("\n[2] sleep: %lu coroutines sleep until the same moment, %.0f ms "
         "from now\n",
         n, (double)nap / 1e6);
  int64_t t0 = loom_now();
  wake_at = t0 + nap;
  for (unsigned long i = 0; i < n; i++) {
    int rc = loom_go(sleep_fn, NULL);
    if (rc != 0) {
      printf("  loom_go: %s\n", loom_strerror(rc));
      check(0, "loom_go succeeds");
      return;
    }
    /* Let them start.  Each needs a stack page of its own (they are all
     * alive at once), faulted in here: a longer stretch would hold the
     * thread past the runtime's 10 ms long-run warning. */
    if (i % 256 == 255)
      loom_yield();
  }
  printf("  spawned in %.1f ms\n", ms_since(t0));
  loom_sleep_until(wake_at - 50 * MS);
  loom_stats st;
  if (loom_stats_get(&st) == 0 && loom_now() < wake_at) {
    printf("  just before: %llu coroutines alive on %d threads\n",
           (unsigned long long)st.coroutines, st.threads);
    check(st.coroutines >= n, "all sleepers are alive at once");
  }
  check(wait_for(&sleep_done, n) == 0, "every sleeper woke up");
  printf("  all awake %.1f ms after the moment; the last one woke %.2f ms "
         "late\n",
         ms_since(wake_at), (double)atomic_load(&sleep_max_late_ns) / 1e6);
  check(atomic_load(&sleep_early) == 0, "no sleeper woke early");
}

/* ---- 3. ping-pong: two coroutines take turns with loom_yield ---------- */

static atomic_int turn;
static atomic_ulong pp_done;
static unsigned long pp_rounds;

static void player(void *arg) {
  int me = (int)(intptr_t)arg;
  for (unsigned long i = 0; i < pp_rounds; i++) {
    while (atomic_load(&turn) != me)
      loom_yield();
    atomic_store(&turn, 1 - me);
  }
  atomic_fetch_add(&pp_done, 1);
}

static void step_pingpong(void) {
  pp_rounds = n_coroutines < 20000 ? n_coroutines : 20000;
  printf("\n[3] ping-pong: two coroutines pass a turn back and forth %lu "
         "times\n",
         pp_rounds);
  int64_t t0 = loom_now();
  check(loom_go(player, (void *)(intptr_t)0) == 0, "spawn ping");
  check(loom_go(player, (void *)(intptr_t)1) == 0, "spawn pong");
  check(wait_for(&pp_done, 2) == 0, "both players finished");
  double ms = ms_since(t0);
  printf("  %lu round trips in %.1f ms (%.0f ns per round trip)\n", pp_rounds,
         ms, ms * 1e6 / (double)pp_rounds);
}

/* ---- 4. blocking: a blocking call does not stop the others ----------- */

static atomic_ulong ticks;
static atomic_int tick_stop;
static atomic_ulong tickers_done;

static void ticker(void *arg) {
  while (!atomic_load(&tick_stop)) {
    loom_sleep(1 * MS);
    atomic_fetch_add(&ticks, 1);
  }
  atomic_fetch_add(&tickers_done, 1);
}

static void step_block(void) {
  int nt = loom_procs() * 2;
  printf("\n[4] blocking: the main coroutine blocks its thread for 100 ms in\n"
         "    nanosleep (inside loom_block_enter/exit) while %d coroutines "
         "tick\n",
         nt);
  for (int i = 0; i < nt; i++)
    check(loom_go(ticker, NULL) == 0, "spawn ticker");
  loom_sleep(5 * MS); /* let the tickers start */
  unsigned long before = atomic_load(&ticks);
  struct timespec ts = {0, 100 * MS};
  loom_block_enter();
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
    ;
  loom_block_exit();
  unsigned long during = atomic_load(&ticks) - before;
  atomic_store(&tick_stop, 1);
  check(wait_for(&tickers_done, (unsigned long)nt) == 0, "tickers stopped");
  printf("  the other coroutines ticked %lu times meanwhile\n", during);
  check(during > 0, "other coroutines ran during the blocking call");
}

/* ---- 5. pin: a coroutine wired to its thread -------------------------- */

static atomic_int pin_moved;
static atomic_ulong pin_done;

static void pinned_fn(void *arg) {
  if (loom_pin() != 0) {
    atomic_store(&pin_moved, -1);
  } else {
    pthread_t self = pthread_self();
    for (int i = 0; i < 20; i++) {
      if (i % 2)
        loom_yield();
      else
        loom_sleep(1 * MS);
      if (!pthread_equal(self, pthread_self()))
        atomic_store(&pin_moved, 1);
    }
    loom_unpin();
  }
  atomic_fetch_add(&pin_done, 1);
}

static void step_pin(void) {
  printf("\n[5] pin: a pinned coroutine sleeps and yields 20 times, on one "
         "thread\n");
  check(loom_go(pinned_fn, NULL) == 0, "spawn pinned coroutine");
  check(wait_for(&pin_done, 1) == 0, "pinned coroutine finished");
  int moved = atomic_load(&pin_moved);
  if (moved < 0)
    printf("  loom_pin failed\n");
  else
    printf("  it %s its thread\n", moved ? "LEFT" : "never left");
  check(moved == 0, "pinned coroutine stays on its thread");
}

/* ---- 6. local: coroutine-local storage -------------------------------- */

#define LOCALS 1000

static loom_local_key local_key;
static atomic_ulong local_done;
static atomic_ulong local_wrong;
static atomic_ulong local_dtors;

static void local_dtor(void *value) {
  free(value);
  atomic_fetch_add(&local_dtors, 1);
}

static void local_fn(void *arg) {
  unsigned long *mine = malloc(sizeof *mine);
  if (mine == NULL || loom_local_set(local_key, mine) != 0) {
    free(mine);
    atomic_fetch_add(&local_wrong, 1);
    atomic_fetch_add(&local_dtors, 1); /* keep the count whole */
    atomic_fetch_add(&local_done, 1);
    return;
  }
  *mine = (unsigned long)(uintptr_t)arg;
  for (int i = 0; i < 10; i++) {
    if (i % 2)
      loom_yield();
    else
      loom_sleep(1 * MS);
    unsigned long *got = loom_local_get(local_key);
    if (got != mine || *got != (unsigned long)(uintptr_t)arg)
      atomic_fetch_add(&local_wrong, 1);
  }
  atomic_fetch_add(&local_done, 1);
}

static void step_local(void) {
  printf("\n[6] local: %d coroutines keep their own value under one key\n",
         LOCALS);
  int rc = loom_local_key_create(&local_key, local_dtor);
  if (rc != 0) {
    printf("  loom_local_key_create: %s\n", loom_strerror(rc));
    check(0, "create a key");
    return;
  }
  for (uintptr_t i = 0; i < LOCALS; i++)
    check(loom_go(local_fn, (void *)i) == 0, "spawn");
  check(wait_for(&local_done, LOCALS) == 0, "all finished");
  /* The destructor runs as each coroutine returns, after it counted. */
  check(wait_for(&local_dtors, LOCALS) == 0, "all destructors ran");
  printf("  wrong values seen: %lu; destructors run: %lu\n",
         atomic_load(&local_wrong), atomic_load(&local_dtors));
  check(atomic_load(&local_wrong) == 0, "every coroutine saw its own value");
}

/* ---- 7. stats ---------------------------------------------------------- */

static void step_stats(void) {
  loom_stats st;
  int rc = loom_stats_get(&st);
  printf("\n[7] loom_stats_get\n");
  if (rc != 0) {
    printf("  loom_stats_get: %s\n", loom_strerror(rc));
    check(0, "loom_stats_get succeeds");
    return;
  }
  printf("  procs %d (idle %d), threads %d (idle %d, spinning %d)\n", st.procs,
         st.idle_procs, st.threads, st.idle_threads, st.spinning_threads);
  printf("  coroutines alive %llu, spawned %llu, global queue %llu\n",
         (unsigned long long)st.coroutines, (unsigned long long)st.spawned,
         (unsigned long long)st.global_runq);
  printf("  steals %llu, netpoll wake-ups %llu\n",
         (unsigned long long)st.steals, (unsigned long long)st.netpoll_wakeups);
  unsigned long long want = 2ull * n_coroutines + 2 + LOCALS + 1;
  check(st.spawned >= want, "spawned counts every loom_go");
  check(st.procs == loom_procs(), "stats agree with loom_procs");
}

static void tour(void *arg) {
  int64_t t0 = loom_now();
  printf("main coroutine: id %llu; %d processors\n",
         (unsigned long long)loom_id(), loom_procs());
  step_spawn();
  step_sleep();
  step_pingpong();
  step_block();
  step_pin();
  step_local();
  step_stats();
  printf("\ntour done in %.0f ms\n", ms_since(t0));
}

int main(int argc, char **argv) {
  if (argc == 2)
    n_coroutines = strtoul(argv[1], NULL, 10);
  if (argc > 2 || n_coroutines < 2 || n_coroutines > 10000000) {
    fprintf(stderr, "usage: %s [N]   (2 <= N <= 10000000, default 100000)\n",
            argv[0]);
    return 2;
  }

  setvbuf(stdout, NULL, _IOLBF, 0); /* a line at a time, also into a pipe */
  loom_config cfg;
  loom_config_init(&cfg); /* defaults, then LOOM_* from the environment */
  printf("loom runtime demo: %lu coroutines per step\n", n_coroutines);
  if (cfg.schedtrace_ms == 0)
    printf("(LOOM_SCHEDTRACE=1000 prints a scheduler trace line a second)\n");

  int rc = loom_run(tour, NULL, &cfg);
  if (rc != 0) {
    fprintf(stderr, "loom_run: %s (%s)\n", loom_strerror(rc),
            loom_err_name(rc));
    return 1;
  }
  int failed = atomic_load(&failures);
  printf("%s\n", failed ? "SOME CHECKS FAILED" : "all checks passed");
  return failed ? 1 : 0;
}
