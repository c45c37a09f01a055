/*
 * test_stack.c — coroutine stacks (src/runtime/stack.c): a million
 * coroutines parked at once within the default vm.max_map_count, deep
 * use within the limit, and overflow caught and reported with the
 * coroutine's id instead of corrupting a neighbour.
 */
#include <stdatomic.h>

#include "check.h"
#include "runtime/export_test.h"

/* ------------------------------------------------------------------ */
/* A million coroutines parked at once.                                 */

static long parked_n;
static atomic_long started, woken;
static atomic_uchar *finished;   /* per coroutine: ran to the end once */
static atomic_llong release_at; /* every coroutine sleeps until then */

static loom_chan *release_gate; /* closed by main at the release */

/* Sleeps until release_at.  main pushes release_at later while it is
 * still spawning (spawning a million parked coroutines takes seconds,
 * more under load), so an early coroutine may wake, see a later
 * release, and park again.  main pushes it only when it runs, and a
 * loaded machine can keep it off its P for longer than the slack
 * (behind a run queue of fresh coroutines): a coroutine that finds
 * release_at passed parks on release_gate, which main closes at the
 * release.  So none finishes before main releases them, however slow
 * main is, and the timers still wake nearly all of them. */
static void parker(void *arg) {
  uintptr_t i = (uintptr_t)arg;
  volatile char touch[512]; /* a little real stack use per coroutine */
  int64_t r;
  touch[0] = (char)i;
  touch[511] = (char)(i >> 8);
  atomic_fetch_add_explicit(&started, 1, memory_order_relaxed);
  while (loom_now() < (r = atomic_load(&release_at)))
    CHECK_OK(loom_sleep_until(r));
  CHECK_EQ(loom_chan_recv(release_gate, NULL), 0);
  CHECK_EQ(touch[0], (char)i);
  CHECK_EQ(touch[511], (char)(i >> 8));
  atomic_fetch_add_explicit(&finished[i], 1, memory_order_relaxed);
  atomic_fetch_add(&woken, 1);
}

static long read_max_map_count(void) {
  long v = -1;
  FILE *f = fopen("/proc/sys/vm/max_map_count", "r");
  if (f != NULL) {
    if (fscanf(f, "%ld", &v) != 1)
      v = -1;
    fclose(f);
  }
  return v;
}

#define HOLD (2000 * CHECK_MS)

static void million_parked_main(void *arg) {
  long i;
  int64_t t0 = loom_now(), spawned_at, all_parked_at, released;
  loom_stats st;
  (void)arg;
  atomic_store(&release_at, t0 + 2 * HOLD);
  CHECK_OK(loom_chan_make(&release_gate, 0, 0));
  printf("guard pages: %s\n",
         loom__test_stack_guard_pages() ? "MADV_GUARD_INSTALL" : "canary fallback");
  for (i = 0; i < parked_n; i++) {
    int r = loom_go(parker, (void *)(uintptr_t)i);
    CHECKF(r == 0, "loom_go #%ld: %d (%s), rss %ld MiB", i, r, loom_err_name(r), check_rss_mib());
    if (i % 1024 == 0 && loom_now() > atomic_load(&release_at) - HOLD)
      atomic_store(&release_at, loom_now() + 2 * HOLD);
  }
  spawned_at = loom_now();
  while (atomic_load(&started) < parked_n) {
    CHECKF(loom_now() < spawned_at + 60000 * CHECK_MS,
           "only %ld of %ld coroutines started 60 s after they were spawned",
           atomic_load(&started), parked_n);
    if (loom_now() > atomic_load(&release_at) - HOLD)
      atomic_store(&release_at, loom_now() + 2 * HOLD);
    loom_sleep(5 * CHECK_MS);
  }
  all_parked_at = loom_now();
  CHECK_OK(loom_stats_get(&st));
  /* Nobody finished yet: all parked_n coroutines were alive at once. */
  CHECK_EQ(atomic_load(&woken), 0);
  CHECK_GE(st.coroutines, (uint64_t)parked_n);
  printf("%ld coroutines parked at once: spawned in %.0f ms, all parked after %.0f ms, "
         "rss %ld MiB, max_map_count %ld\n",
         parked_n, (spawned_at - t0) / 1e6, (all_parked_at - t0) / 1e6, check_rss_mib(),
         read_max_map_count());
  /* Release them: nobody pushes release_at any more. */
  released = atomic_load(&release_at);
  loom_sleep_until(released);
  CHECK_OK(loom_chan_close(release_gate));
  while (atomic_load(&woken) < parked_n) {
    CHECKF(loom_now() < released + 60000 * CHECK_MS, "only %ld of %ld coroutines woke",
           atomic_load(&woken), parked_n);
    loom_sleep(5 * CHECK_MS);
  }
  printf("all woke and finished %.0f ms after the release\n", (loom_now() - released) / 1e6);
  for (i = 0; i < parked_n; i++)
    CHECKF(atomic_load(&finished[i]) == 1, "coroutine %ld finished %d times", i,
           (int)atomic_load(&finished[i]));
  loom_chan_free(release_gate);
}

/* The full million with the default configuration (64 KiB stacks), on
 * this machine's default vm.max_map_count (65530), also under ASan (its
 * shadow makes each parked coroutine cost about 12 KiB there: 12 GiB in
 * all, 35 s).  TSan keeps a fiber per coroutine with two mappings of its
 * own (a 512 KiB shadow stack and a 256 KiB trace part) that merge with
 * their neighbours only when the kernel happens to place them side by
 * side: 50,000 fibers took 43,000-66,000 mappings from run to run and
 * failed (ENOMEM) in some, so 25,000 there, under the limit however
 * they fall. */
TEST(million_parked) {
  loom_config cfg;
  parked_n = CHECK_SCALE(1000000, 1000000, 25000);
  finished = (atomic_uchar *)calloc((size_t)parked_n, sizeof *finished);
  CHECK(finished != NULL);
  loom_config_init(&cfg);
  CHECK_OK(loom_run(million_parked_main, NULL, &cfg));
  free(finished);
}

/* ------------------------------------------------------------------ */
/* Deep use within the limit is fine; stacks are reused cleanly.        */

static atomic_long deep_done;
__attribute__((noinline)) static int deep(int n) {
  volatile char buf[1024];
  int r;
  buf[0] = (char)n;
  buf[1023] = (char)n;
  if (n == 0)
    return buf[0];
  r = deep(n - 1);
  return r + buf[0] + buf[1023] - 2 * (char)n;
}
static void deep_user(void *arg) {
  int n = (int)(uintptr_t)arg;
  CHECK_EQ(deep(n), 0);
  loom_yield();
  CHECK_EQ(deep(n), 0);
  atomic_fetch_add(&deep_done, 1);
}
static void deep_main(void *arg) {
  long i, rounds = CHECK_SCALE(20000, 5000, 2000);
  (void)arg;
  /* ~40 KiB of a 64 KiB stack (ASan frames are bigger: 20 levels) */
  for (i = 0; i < rounds; i++)
    CHECK_OK(loom_go(deep_user, (void *)(uintptr_t)CHECK_SCALE(40, 20, 30)));
  while (atomic_load(&deep_done) < rounds)
    loom_sleep(CHECK_MS);
}
TEST(deep_use_within_limit) { check_run(deep_main, NULL, 2); }

/* ------------------------------------------------------------------ */
/* Stack overflow: the child dies with a report naming the coroutine.   */

static unsigned long sink;
static volatile int never; /* keeps the compiler from calling it endless */
__attribute__((noinline)) static unsigned long recurse(unsigned long n, int yield_every) {
  volatile char frame[256];
  if (never)
    return 0;
  /* Every byte written, as a frame of real locals would be: a canary
   * cannot be stepped over. */
  for (int i = 0; i < 256; i++)
    frame[i] = (char)n;
  if (yield_every > 0 && n % (unsigned long)yield_every == 0)
    loom_yield();
  /* not a tail call: the result is used after the call returns */
  return recurse(n + 1, yield_every) + (unsigned long)frame[0] + frame[255];
}

static int overflow_yield_every;
static void overflower(void *arg) {
  (void)arg;
  fprintf(stderr, "overflowing coroutine id %llu\n", (unsigned long long)loom_id());
  fflush(stderr);
  sink = recurse(0, overflow_yield_every);
}

/* Neighbours with canaries on their stacks: they must not be corrupted
 * before the process dies. */
static atomic_long neighbours_ready;
static void neighbour(void *arg) {
  volatile unsigned char mark[2048];
  size_t i;
  (void)arg;
  for (i = 0; i < sizeof mark; i++)
    mark[i] = 0x5a;
  atomic_fetch_add(&neighbours_ready, 1);
  for (;;) {
    loom_sleep(CHECK_MS);
    for (i = 0; i < sizeof mark; i++)
      if (mark[i] != 0x5a) {
        fprintf(stderr, "neighbour coroutine %llu: stack corrupted\n",
                (unsigned long long)loom_id());
        fflush(stderr);
        _exit(3);
      }
  }
}

static void overflow_main(void *arg) {
  loom_go_opts o;
  int i;
  memset(&o, 0, sizeof o);
  o.stack_size = (size_t)(uintptr_t)arg;
  fprintf(stderr, "guard pages: %d\n", loom__test_stack_guard_pages());
  for (i = 0; i < 64; i++)
    CHECK_OK(loom_go_with(neighbour, NULL, &o));
  while (atomic_load(&neighbours_ready) < 64)
    loom_sleep(CHECK_MS);
  CHECK_OK(loom_go_with(overflower, NULL, &o));
  loom_sleep((int64_t)20000 * CHECK_MS);
  fprintf(stderr, "overflow was not caught within 20 s\n");
  fflush(stderr);
  _exit(4);
}

/* Child: argv = yield_every:stack_size[:fallback] (stack_size 0: the
 * runtime's, a slot of an arena; fallback: loom__test_stack_fallback's
 * mode, as on a kernel without MADV_GUARD_INSTALL). */
HELPER(overflow_child) {
  unsigned long stack = 0;
  int mode = 0;
  CHECK_EQ(check_argc, 1);
  CHECK_GE(
      sscanf(check_argv[0], "%d:%lu:%d", &overflow_yield_every, &stack, &mode),
      2);
  loom__test_stack_fallback(mode);
  check_run(overflow_main, (void *)(uintptr_t)stack, 2);
  fprintf(stderr, "loom_run returned after an overflow\n");
  _exit(5);
}

static void expect_overflow_report_where(const char *spec,
                                         bool want_spawn_site) {
  struct check_child c;
  char how[128], want[96];
  unsigned long long id = 0;
  const char *p;
  int sanitizer_report = 0;
  check_spawn_self(&c, 40, "overflow_child", spec);
  printf("child (%s) %s; its output:\n%s\n", spec, check_child_how(&c, how, sizeof how), c.out);
  CHECKF(!c.timed_out, "the overflowing child hung");
  CHECKF(!(WIFEXITED(c.status) && WEXITSTATUS(c.status) == 0), "the overflowing child exited 0");
  CHECKF(strstr(c.out, "stack corrupted") == NULL, "a neighbour's stack was corrupted");
  p = strstr(c.out, "overflowing coroutine id ");
  CHECKF(p != NULL, "the overflowing coroutine never started");
  CHECK_EQ(sscanf(p, "overflowing coroutine id %llu", &id), 1);
  CHECK_GT(id, 1);
  /* The runtime's report: one line with "stack overflow" and
   * "coroutine <id>".  Under ASan or TSan the sanitizer's SEGV handler
   * may get there first ("AddressSanitizer: stack-overflow",
   * "ThreadSanitizer: stack-overflow"): accepted there. */
  if (CHECK_ASAN && strstr(c.out, "AddressSanitizer: stack-overflow") != NULL)
    sanitizer_report = 1;
  if (CHECK_TSAN && strstr(c.out, "ThreadSanitizer: stack-overflow") != NULL)
    sanitizer_report = 1;
  if (!sanitizer_report) {
    const char *line = c.out, *found = NULL;
    snprintf(want, sizeof want, "coroutine %llu", id);
    while (line != NULL && *line != '\0') {
      const char *end = strchr(line, '\n');
      size_t len = end ? (size_t)(end - line) : strlen(line);
      char buf[1024];
      if (len >= sizeof buf)
        len = sizeof buf - 1;
      memcpy(buf, line, len);
      buf[len] = '\0';
      if (strstr(buf, "stack overflow") != NULL && strstr(buf, "overflowing coroutine") == NULL) {
        const char *q = strstr(buf, want);
        /* "coroutine 12" must not match inside "coroutine 123" */
        if (q != NULL && (q[strlen(want)] < '0' || q[strlen(want)] > '9') &&
            (!want_spawn_site || strstr(buf, "spawned at ") != NULL))
          found = line;
      }
      line = end ? end + 1 : NULL;
    }
    CHECKF(found != NULL, "no line with \"stack overflow\" and \"%s\" in the child's output", want);
  }
  CHECKF(WIFSIGNALED(c.status) || (WIFEXITED(c.status) && WEXITSTATUS(c.status) != 3 &&
                                   WEXITSTATUS(c.status) != 4 && WEXITSTATUS(c.status) != 5),
         "child %s", how);
}

static void expect_overflow_report(const char *spec) {
  expect_overflow_report_where(spec, false);
}

/* Unbounded recursion with no scheduling point in it (only a guard page
 * can catch this one). */
TEST(overflow_reported) { expect_overflow_report("0:65536"); }
/* The same on the smallest stack. */
TEST(overflow_reported_small_stack) { expect_overflow_report("0:16384"); }
/* Recursion that yields every 4 frames (a canary checked at each switch
 * can catch this one too). */
TEST(overflow_reported_with_yields) { expect_overflow_report("4:65536"); }
/* A slot of an arena (the runtime's stack size) on a kernel without
 * MADV_GUARD_INSTALL: an mprotect guard catches what has no scheduling
 * point, and no neighbour is damaged. */
TEST(overflow_reported_mprotect_guard) { expect_overflow_report("0:0:1"); }
TEST(overflow_reported_mprotect_guard_with_yields) {
  expect_overflow_report("4:0:1");
}
/* Beyond the mprotect budget, the canary: caught at a switch, and the
 * report names where the coroutine was spawned.  A yield every frame:
 * a canary is checked only then, and what the coroutine writes past it
 * before must stay inside its own guard page (with frames as large as
 * under a sanitizer, four frames may not). */
TEST(overflow_reported_canary_names_spawn_site) {
  expect_overflow_report_where("1:0:2", true);
}

CHECK_MAIN()
