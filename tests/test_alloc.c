/*
 * test_alloc.c — the allocator hook (src/runtime/alloc.c) and failure
 * injection over the runtime: make allocation number i fail, for every i
 * of a small scenario (nghttp2's failmalloc, curl's torture tests).  The
 * API must return -ENOMEM cleanly, never crash or hang, free everything
 * it allocated, and start again afterwards.
 */
#include <stdatomic.h>

#include "check_alloc.h"

static atomic_long nalloc; /* realloc-hook calls so far */
static long fail_at = -1;  /* the hook call that fails; -1: none */

static bool should_fail(void) { return atomic_fetch_add(&nalloc, 1) == fail_at; }

/* ---- the scenario ---- */

static loom_local_key key;
static atomic_long spawned_ok, finished, enomem_seen;
static atomic_int other_error;

static void note_result(int r) {
  if (r == -ENOMEM)
    atomic_fetch_add(&enomem_seen, 1);
  else if (r != 0)
    atomic_store(&other_error, r);
}

static void worker(void *arg) {
  int r;
  (void)arg;
  r = loom_local_set(key, (void *)(uintptr_t)0x1234);
  note_result(r);
  if (r == 0 && loom_local_get(key) != (void *)(uintptr_t)0x1234)
    atomic_store(&other_error, 1);
  loom_sleep(CHECK_MS);
  loom_yield();
  loom_block_enter();
  loom_block_exit();
  atomic_fetch_add(&finished, 1);
}

/* The burst below overflows the spawner's local run queue (256) into
 * the global one, and its sleeps grow the timer heaps. */
static void sleeper(void *arg) {
  (void)arg;
  loom_sleep(CHECK_MS);
  atomic_fetch_add(&finished, 1);
}

static void *foreign(void *arg) {
  int i, r;
  (void)arg;
  for (i = 0; i < 2; i++) {
    r = loom_go(worker, NULL);
    note_result(r);
    if (r == 0)
      atomic_fetch_add(&spawned_ok, 1);
  }
  return NULL;
}

static void scenario_main(void *arg) {
  int i, r;
  loom_go_opts o;
  pthread_t t;
  int64_t end;
  (void)arg;
  memset(&o, 0, sizeof o);
  for (i = 0; i < 10; i++) {
    o.stack_size = (i % 2) ? 32 * 1024 : 0;
    r = loom_go_with(worker, NULL, &o);
    note_result(r);
    if (r == 0)
      atomic_fetch_add(&spawned_ok, 1);
  }
  for (i = 0; i < 300; i++) {
    r = loom_go(sleeper, NULL);
    note_result(r);
    if (r == 0)
      atomic_fetch_add(&spawned_ok, 1);
  }
  if (pthread_create(&t, NULL, foreign, NULL) == 0) {
    loom_block_enter();
    pthread_join(t, NULL);
    loom_block_exit();
  }
  worker(NULL); /* main uses local storage too */
  atomic_fetch_add(&spawned_ok, 1);
  end = loom_now() + 10000 * CHECK_MS;
  while (atomic_load(&finished) < atomic_load(&spawned_ok)) {
    CHECKF(loom_now() < end, "allocation %ld failed: only %ld of %ld coroutines finished",
           fail_at, atomic_load(&finished), atomic_load(&spawned_ok));
    loom_sleep(CHECK_MS);
  }
}

/* One scenario run with allocation `at` failing; returns loom_run's
 * result.  Checks that nothing is left allocated afterwards. */
static int run_scenario(long at) {
  loom_config cfg;
  int r;
  atomic_store(&nalloc, 0);
  atomic_store(&spawned_ok, 0);
  atomic_store(&finished, 0);
  fail_at = at;
  loom_config_init(&cfg);
  cfg.procs = 2;
  r = loom_run(scenario_main, NULL, &cfg);
  CHECKF(r == 0 || r == -ENOMEM, "allocation %ld failed: loom_run returned %d (%s)", at, r,
         loom_err_name(r));
  note_result(r);
  CHECKF(atomic_load(&other_error) == 0, "allocation %ld failed: an API call returned %d (%s)",
         at, atomic_load(&other_error), loom_err_name(atomic_load(&other_error)));
  CHECKF(atomic_load(&nlive) == 0,
         "allocation %ld failed: %ld blocks still allocated after loom_run returned %d", at,
         atomic_load(&nlive), r);
  return r;
}

/* Child: argv = "first:count" — fail allocation i for i in [first,
 * first+count), one runtime after another in this process, then run a
 * clean one.  -1:1 runs clean and prints the allocation count. */
HELPER(alloc_child) {
  long first = 0, count = 0, i;
  CHECK_EQ(check_argc, 1);
  CHECK_EQ(sscanf(check_argv[0], "%ld:%ld", &first, &count), 2);
  loom_set_allocator(&hook);
  CHECK_OK(loom_local_key_create(&key, NULL));
  for (i = first; i < first + count; i++) {
    fprintf(stderr, "failing allocation %ld\n", i);
    run_scenario(i);
  }
  fail_at = -1;
  CHECK_OK(run_scenario(-1)); /* and it all works again */
  printf("allocations %ld injected %ld enomem %ld\n", atomic_load(&nalloc),
         atomic_load(&injected_count), atomic_load(&enomem_seen));
  fflush(stdout);
  loom_set_allocator(NULL);
  exit(0);
}

static void run_child(const char *spec, long *allocs, long *inj, long *enomem) {
  struct check_child c;
  char how[128];
  const char *p;
  check_spawn_self(&c, 100, "alloc_child", spec);
  if (c.timed_out || !WIFEXITED(c.status) || WEXITSTATUS(c.status) != 0) {
    size_t off = c.len > 6000 ? c.len - 6000 : 0; /* the tail names the allocation */
    CHECK_FAIL("alloc child %s %s; end of its output:\n%s", spec,
               check_child_how(&c, how, sizeof how), c.out + off);
  }
  p = strstr(c.out, "allocations ");
  CHECK(p != NULL);
  CHECK_EQ(sscanf(p, "allocations %ld injected %ld enomem %ld", allocs, inj, enomem), 3);
}

/* The hook sees loom's allocations, and all of them are freed. */
TEST(hook_used_and_balanced) {
  long allocs, inj, enomem;
  run_child("-1:0", &allocs, &inj, &enomem);
  printf("a clean scenario makes %ld allocations\n", allocs);
  CHECK_GT(allocs, 0);
  CHECK_EQ(inj, 0);
  CHECK_EQ(enomem, 0);
}

TEST(fail_each_allocation) {
  long allocs, inj, enomem, i, total_inj = 0, total_enomem = 0, limit;
  const long chunk = 16;
  char spec[64];
  run_child("-1:0", &allocs, &inj, &enomem);
  /* thread timing changes the count a little: go past it */
  limit = allocs + allocs / 4 + 8;
  printf("clean run: %ld allocations; failing each of 0..%ld\n", allocs, limit - 1);
  for (i = 0; i < limit; i += chunk) {
    long a, in, en;
    snprintf(spec, sizeof spec, "%ld:%ld", i, chunk);
    run_child(spec, &a, &in, &en);
    total_inj += in;
    total_enomem += en;
  }
  printf("%ld failures injected, %ld -ENOMEM results seen\n", total_inj, total_enomem);
  CHECK_GT(total_inj, 0);
  CHECK_GT(total_enomem, 0);
}

/* With no memory at all, a spawn from a foreign thread (which goes to
 * the global run queue) returns -ENOMEM or works: it never kills the
 * process. */
static atomic_int foreign_result = 1;
static void *foreign_spawn_one(void *arg) {
  (void)arg;
  atomic_store(&foreign_result, loom_go(worker, NULL));
  return NULL;
}
static void no_memory_main(void *arg) {
  pthread_t t;
  int r;
  int64_t end = loom_now() + 5000 * CHECK_MS;
  (void)arg;
  atomic_store(&fail_all, 1);
  CHECK_EQ(pthread_create(&t, NULL, foreign_spawn_one, NULL), 0);
  loom_block_enter();
  pthread_join(t, NULL);
  loom_block_exit();
  atomic_store(&fail_all, 0);
  r = atomic_load(&foreign_result);
  CHECKF(r == 0 || r == -ENOMEM, "loom_go from a foreign thread without memory: %d (%s)", r,
         loom_err_name(r));
  if (r == 0)
    atomic_fetch_add(&spawned_ok, 1);
  while (atomic_load(&finished) < atomic_load(&spawned_ok)) {
    CHECK(loom_now() < end);
    loom_sleep(CHECK_MS);
  }
}
TEST(foreign_spawn_without_memory) {
  loom_set_allocator(&hook);
  CHECK_OK(loom_local_key_create(&key, NULL));
  check_run(no_memory_main, NULL, 1);
  printf("loom_go from a foreign thread without memory: %d; %ld allocations refused\n",
         atomic_load(&foreign_result), atomic_load(&injected_count));
  CHECK_EQ(atomic_load(&nlive), 0);
  loom_set_allocator(NULL);
}

/* A coroutine leaving a blocking section while its P is busy queues
 * itself globally.  With no memory at that moment it must still resume
 * (loom_block_exit cannot fail), never kill the process. */
static atomic_int in_section, section_done;
static void blocked_then_out(void *arg) {
  (void)arg;
  loom_block_enter();
  atomic_store(&in_section, 1);
  usleep(30 * 1000); /* the monitor hands the P to the spinner meanwhile */
  atomic_store(&fail_all, 1);
  loom_block_exit();
  atomic_store(&fail_all, 0);
  atomic_store(&section_done, 1);
}
static void busy(void *arg) {
  (void)arg;
  check_spin_ns(100 * CHECK_MS); /* holds the only P, no scheduling point */
}
static void block_exit_main(void *arg) {
  int64_t end = loom_now() + 5000 * CHECK_MS;
  (void)arg;
  CHECK_OK(loom_go(blocked_then_out, NULL));
  while (!atomic_load(&in_section))
    loom_sleep(CHECK_MS / 10);
  CHECK_OK(loom_go(busy, NULL));
  while (!atomic_load(&section_done)) {
    CHECK(loom_now() < end);
    loom_sleep(CHECK_MS);
  }
}
TEST(block_exit_without_memory) {
  loom_set_allocator(&hook);
  check_run(block_exit_main, NULL, 1);
  printf("%ld allocations refused around loom_block_exit\n", atomic_load(&injected_count));
  CHECK_EQ(atomic_load(&nlive), 0);
  loom_set_allocator(NULL);
}

/*
 * No thread can be started, and the P's one other M is on its way into
 * the poller (nothing to poll for but a pipe that stays quiet: no timer,
 * so it blocks without limit).  A coroutine leaves a blocking section just
 * then: the P is not idle yet, so it queues itself globally and asks for
 * an M — which cannot be created.  Its own M must then take the idle P and
 * the queued coroutine itself instead of sleeping next to the blocked
 * poller: everyone asleep with a coroutine queued was a hang (seen with
 * the engine's failure injection under TSan, about once in 200 runs).
 * The window is narrow: the loop runs many short sections.
 */
static int quiet_pipe[2];
static atomic_int quiet_done;
static void quiet_waiter(void *arg) {
  (void)arg;
  /* Wakes only at the end, when the pipe is written. */
  CHECK_OK(loom_fd_wait(quiet_pipe[0], LOOM_FD_READ, 0));
  atomic_store(&quiet_done, 1);
}
static void block_exit_poller_main(void *arg) {
  (void)arg;
  CHECK_EQ(pipe2(quiet_pipe, O_CLOEXEC | O_NONBLOCK), 0);
  CHECK_OK(loom_go(quiet_waiter, NULL));
  loom_yield(); /* it registers the pipe with the poller */
  /* A second M, made while threads can still be made. */
  loom_block_enter();
  usleep(20 * 1000);
  loom_block_exit();
  atomic_store(&fail_all, 1);
  int rounds = CHECK_SCALE(3000, 1500, 1000);
  for (int i = 0; i < rounds; i++) {
    loom_block_enter();
    struct timespec ts = {0, 10000 + (i * 7919) % 90000}; /* 10-100 us */
    nanosleep(&ts, NULL);
    loom_block_exit();
  }
  atomic_store(&fail_all, 0);
  CHECK_EQ(write(quiet_pipe[1], "x", 1), 1);
  while (!atomic_load(&quiet_done))
    loom_sleep(CHECK_MS);
  close(quiet_pipe[0]);
  close(quiet_pipe[1]);
}
TEST(block_exit_races_poller_without_threads) {
  check_watchdog(60, "a coroutine queued while every M sleeps");
  loom_set_allocator(&hook);
  check_run(block_exit_poller_main, NULL, 1);
  printf("%ld allocations refused\n", atomic_load(&injected_count));
  CHECK_EQ(atomic_load(&nlive), 0);
  loom_set_allocator(NULL);
}

/* loom_sleep with no memory for its timer still sleeps, and returns 0
 * (it used to return -ENOMEM at once: a loop that sleeps to wait spun). */
static void sleep_nomem_main(void *arg) {
  (void)arg;
  atomic_store(&fail_all, 1);
  int64_t t0 = loom_now();
  int r = loom_sleep(20 * CHECK_MS);
  int64_t el = loom_now() - t0;
  atomic_store(&fail_all, 0);
  printf("loom_sleep(20 ms) with no memory: %s after %.3f ms\n",
         loom_err_name(r), (double)el / 1e6);
  CHECK_OK(r);
  CHECKF(el >= 20 * CHECK_MS, "it returned after %.3f ms", (double)el / 1e6);
}
TEST(sleep_without_memory) {
  loom_set_allocator(&hook);
  check_run(sleep_nomem_main, NULL, 1);
  CHECK_EQ(atomic_load(&nlive), 0);
  loom_set_allocator(NULL);
}

/* A context whose deadline is still armed when loom_run returns, and
 * released after: freed (the armed timer's reference on it was dropped
 * with the runtime's timers, and never given back). */
static loom_ctx *late_ctx;
static void late_ctx_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_ctx_with_timeout(&late_ctx, loom_ctx_background(),
                                 3600 * 1000 * CHECK_MS));
}
TEST(ctx_released_after_run) {
  loom_set_allocator(&hook);
  check_run(late_ctx_main, NULL, 1);
  loom_ctx_release(late_ctx);
  CHECK_EQ(atomic_load(&nlive), 0);
  loom_set_allocator(NULL);
}

/* A context with a deadline under a parent cancelled already is
 * cancelled at birth and arms no timer: released, it is freed at once
 * (its timer used to keep it, and its done channel, until the deadline:
 * an hour here). */
static long timeout_children_left(bool cancel_parent) {
  loom_ctx *parent = NULL;
  CHECK_OK(loom_ctx_with_cancel(&parent, loom_ctx_background()));
  if (cancel_parent)
    loom_ctx_cancel(parent);
  for (int i = 0; i < 10; i++) { /* warm the timer heap */
    loom_ctx *c;
    CHECK_OK(loom_ctx_with_timeout(&c, parent, 3600 * 1000 * CHECK_MS));
    loom_ctx_release(c);
  }
  long before = atomic_load(&nlive);
  for (int i = 0; i < 1000; i++) {
    loom_ctx *c;
    CHECK_OK(loom_ctx_with_timeout(&c, parent, 3600 * 1000 * CHECK_MS));
    CHECK(cancel_parent == (loom_ctx_err(c) != 0));
    loom_ctx_release(c);
  }
  long left = atomic_load(&nlive) - before;
  loom_ctx_release(parent);
  return left;
}
static void ctx_dead_parent_main(void *arg) {
  (void)arg;
  long live = timeout_children_left(false), dead = timeout_children_left(true);
  printf("blocks left by 1000 released children with a timeout: "
         "live parent %ld, cancelled parent %ld\n", live, dead);
  /* A block or two may be the runtime's own (a heap that grew). */
  CHECKF(live < 10 && dead < 10, "children of a %s parent stay allocated",
         dead >= 10 ? "cancelled" : "live");
}
TEST(ctx_timeout_under_cancelled_parent) {
  loom_set_allocator(&hook);
  check_run(ctx_dead_parent_main, NULL, 2);
  loom_set_allocator(NULL);
}

/* A cancel with no memory for its work list still cancels the whole
 * subtree: 40 children (more than it lists without allocating), each
 * with 3 children, and each of those with 20, cancelled while every
 * allocation fails.  Releasing them afterwards frees everything. */
static void ctx_cancel_nomem_main(void *arg) {
  (void)arg;
  enum { K = 40, G = 3, GG = 20 };
  static loom_ctx *kids[K], *grand[K][G], *great[K][G][GG];
  loom_ctx *root;
  CHECK_OK(loom_ctx_with_cancel(&root, loom_ctx_background()));
  for (int i = 0; i < K; i++) {
    CHECK_OK(loom_ctx_with_cancel(&kids[i], root));
    for (int j = 0; j < G; j++) {
      CHECK_OK(loom_ctx_with_cancel(&grand[i][j], kids[i]));
      for (int k = 0; k < GG; k++)
        CHECK_OK(loom_ctx_with_cancel(&great[i][j][k], grand[i][j]));
    }
  }
  long injected_before = atomic_load(&injected_count);
  atomic_store(&fail_all, 1);
  loom_ctx_cancel(root);
  atomic_store(&fail_all, 0);
  CHECK_GT(atomic_load(&injected_count), injected_before);
  for (int i = 0; i < K; i++) {
    CHECK_ERR(loom_ctx_err(kids[i]), -ECANCELED);
    for (int j = 0; j < G; j++) {
      CHECK_ERR(loom_ctx_err(grand[i][j]), -ECANCELED);
      for (int k = 0; k < GG; k++)
        CHECK_ERR(loom_ctx_err(great[i][j][k]), -ECANCELED);
    }
  }
  /* Parents first: each release finds its subtree cancelled already. */
  loom_ctx_release(root);
  for (int i = 0; i < K; i++) {
    loom_ctx_release(kids[i]);
    for (int j = 0; j < G; j++) {
      loom_ctx_release(grand[i][j]);
      for (int k = 0; k < GG; k++)
        loom_ctx_release(great[i][j][k]);
    }
  }
}
TEST(ctx_cancel_without_memory_reaches_every_node) {
  loom_set_allocator(&hook);
  long before = atomic_load(&nlive);
  check_run(ctx_cancel_nomem_main, NULL, 2);
  CHECK_EQ(atomic_load(&nlive), before);
  loom_set_allocator(NULL);
}

/* loom_set_allocator(NULL) goes back to the C library. */
static void tiny_main(void *arg) { (void)arg; }
TEST(set_allocator_null) {
  loom_set_allocator(&hook);
  check_run(tiny_main, NULL, 1);
  CHECK_GT(atomic_load(&nalloc), 0);
  CHECK_EQ(atomic_load(&nlive), 0);
  loom_set_allocator(NULL);
  atomic_store(&nalloc, 0);
  check_run(tiny_main, NULL, 1);
  CHECK_EQ(atomic_load(&nalloc), 0);
}

/* A wait whose deadline has passed needs no timer: with no memory at
 * all it times out, as it does with memory, and does not fail with
 * -ENOMEM (which sync.h reserves for a deadline ahead). */
static void past_nomem_main(void *arg) {
  (void)arg;
  loom_mutex mu = LOOM_MUTEX_INIT;
  loom_cond cv = LOOM_COND_INIT;
  loom_sema sem = LOOM_SEMA_INIT(0);
  loom_chan *ch;
  CHECK_OK(loom_chan_make(&ch, sizeof(int), 0));
  int v;
  atomic_store(&fail_all, 1);
  int64_t past = loom_now() - 1;
  loom_mutex_lock(&mu);
  int r0 = loom_cond_wait(&cv, &mu, past);
  loom_mutex_unlock(&mu);
  int r1 = loom_sema_acquire(&sem, past);
  int r2 = loom_chan_recv_until(ch, &v, past);
  atomic_store(&fail_all, 0);
  CHECK_ERR(r0, -ETIMEDOUT);
  CHECK_ERR(r1, -ETIMEDOUT);
  CHECK_ERR(r2, -ETIMEDOUT);
  loom_chan_free(ch);
}
TEST(passed_deadline_needs_no_memory) {
  loom_set_allocator(&hook);
  check_run(past_nomem_main, NULL, 1);
  CHECK_EQ(atomic_load(&nlive), 0);
  loom_set_allocator(NULL);
}

CHECK_MAIN()
