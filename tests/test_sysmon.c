/*
 * test_sysmon.c — the monitor thread and what it reports (src/runtime/
 * sysmon.c): an idle runtime costs ~no CPU, LOOM_SCHEDTRACE prints trace
 * lines, and a coroutine that runs too long without a scheduling point
 * is named in a warning.  Messages are captured through the config's log
 * hook.
 */
#include <ctype.h>
#include <stdatomic.h>

#include "check.h"
#include "runtime/export_test.h"

/* ---- a log hook that keeps every message ---- */

#define LOG_MAX 512
static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;
static char *log_lines[LOG_MAX];
static int log_n;
static int log_dropped;
static int log_bad_arg;
static int log_cookie;

static void capture(void *arg, const char *msg) {
  pthread_mutex_lock(&log_mu);
  if (arg != &log_cookie)
    log_bad_arg = 1;
  if (log_n < LOG_MAX)
    log_lines[log_n++] = strdup(msg);
  else
    log_dropped++;
  pthread_mutex_unlock(&log_mu);
}

static int log_count(void) {
  int n;
  pthread_mutex_lock(&log_mu);
  n = log_n;
  pthread_mutex_unlock(&log_mu);
  return n;
}

static void log_print_and_free(void) {
  int i;
  pthread_mutex_lock(&log_mu);
  for (i = 0; i < log_n; i++) {
    printf("log: %s\n", log_lines[i]);
    free(log_lines[i]);
    log_lines[i] = NULL;
  }
  log_n = 0;
  pthread_mutex_unlock(&log_mu);
}

/* Does `s` contain `num` as a whole decimal number? */
/* Number of captured messages that contain `num` as a whole number. */
static int log_mentions(uint64_t num) {
  int i, k = 0;
  pthread_mutex_lock(&log_mu);
  char needle[64];
  snprintf(needle, sizeof needle, "coroutine %llu ", (unsigned long long)num);
  for (i = 0; i < log_n; i++)
    if (strstr(log_lines[i], needle) != NULL)
      k++;
  pthread_mutex_unlock(&log_mu);
  return k;
}

static void cfg_with_log(loom_config *cfg, int procs) {
  loom_config_init(cfg);
  cfg->procs = procs;
  cfg->log = capture;
  cfg->log_arg = &log_cookie;
}

/* ------------------------------------------------------------------ */
/* An idle runtime uses ~0% CPU.                                         */

static int64_t idle_cpu_ns;
static void idle_main(void *arg) {
  int64_t c0;
  (void)arg;
  loom_sleep(100 * CHECK_MS); /* spinning threads settle down */
  c0 = check_cpu_ns();
  loom_sleep(500 * CHECK_MS);
  idle_cpu_ns = check_cpu_ns() - c0;
}

TEST(idle_uses_no_cpu) {
  unsetenv("LOOM_SCHEDTRACE");
  check_run(idle_main, NULL, 0);
  printf("idle runtime: %.2f ms of CPU over 500 ms\n", idle_cpu_ns / 1e6);
  CHECKF(idle_cpu_ns < 50 * CHECK_MS, "an idle runtime burned %.1f ms of CPU in 500 ms",
         idle_cpu_ns / 1e6);
}

/* Idle with coroutines parked on timers far away and one that wakes
 * every 10 ms: still cheap. */
static void sleep_long(void *arg) {
  (void)arg;
  loom_sleep((int64_t)3600 * 1000 * CHECK_MS);
}
static void idle_parked_main(void *arg) {
  int i;
  int64_t c0, end;
  (void)arg;
  for (i = 0; i < 1000; i++)
    CHECK_OK(loom_go(sleep_long, NULL));
  loom_sleep(100 * CHECK_MS);
  c0 = check_cpu_ns();
  end = loom_now() + 500 * CHECK_MS;
  while (loom_now() < end)
    loom_sleep(10 * CHECK_MS);
  idle_cpu_ns = check_cpu_ns() - c0;
}
TEST(mostly_idle_uses_little_cpu) {
  check_run(idle_parked_main, NULL, 0);
  printf("runtime waking every 10 ms: %.2f ms of CPU over 500 ms\n", idle_cpu_ns / 1e6);
  CHECKF(idle_cpu_ns < 100 * CHECK_MS, "%.1f ms of CPU in 500 ms", idle_cpu_ns / 1e6);
}

/* A runtime that goes idle and busy again thousands of times a second
 * (a coroutine sleeping 100 µs in a loop; a server answering one request
 * at a time) must not wake sysmon into 20 µs rounds at every turn: those
 * rounds cost a ping-pong server a quarter of its CPU.  sysmon's own
 * duties are on a 10 ms scale: about a hundred rounds in 500 ms. */
static void flip_main(void *arg) {
  int64_t c0, end;
  uint64_t r0, rounds;
  long turns = 0;
  (void)arg;
  loom_sleep(100 * CHECK_MS);
  c0 = check_cpu_ns();
  r0 = loom__test_sysmon_rounds();
  end = loom_now() + 500 * CHECK_MS;
  while (loom_now() < end) {
    loom_sleep(CHECK_MS / 10);
    turns++;
  }
  rounds = loom__test_sysmon_rounds() - r0;
  idle_cpu_ns = check_cpu_ns() - c0;
  printf("%ld idle-busy turns in 500 ms: %" PRIu64 " sysmon rounds, %.1f ms of CPU\n", turns,
         rounds, idle_cpu_ns / 1e6);
  CHECKF(turns > 100, "only %ld 100 us sleeps in 500 ms", turns);
  CHECKF(rounds < 400, "%" PRIu64 " sysmon rounds in 500 ms of %ld idle-busy turns", rounds,
         turns);
}
TEST(idle_busy_turns_leave_sysmon_asleep) {
  unsetenv("LOOM_SCHEDTRACE");
  check_run(flip_main, NULL, 1);
}

/* sysmon, woken from its idle sleep by the P leaving the idle list,
 * sleeps 10 ms between rounds; a coroutine that then enters a blocking
 * call must still have its P retaken after a round (20 µs), not after
 * two 10 ms rounds. */
static atomic_llong other_ran_at;
static void note_time(void *arg) {
  (void)arg;
  atomic_store(&other_ran_at, loom_now());
}
static int cmp_i64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return x < y ? -1 : x > y;
}
static void retake_main(void *arg) {
  int64_t waited[5];
  (void)arg;
  for (int i = 0; i < 5; i++) {
    loom_sleep(30 * CHECK_MS); /* every P idle: sysmon sleeps until woken */
    int64_t busy_until = loom_now() + 2 * CHECK_MS;
    while (loom_now() < busy_until)
      loom_yield(); /* busy: sysmon, woken, goes back to 10 ms rounds */
    atomic_store(&other_ran_at, 0);
    CHECK_OK(loom_go(note_time, NULL)); /* queued behind us on the only P */
    int64_t t0 = loom_now();
    loom_block_enter();
    usleep(30 * 1000);
    loom_block_exit();
    int64_t at = atomic_load(&other_ran_at);
    CHECKF(at != 0, "the queued coroutine did not run during a 30 ms blocking call");
    waited[i] = at - t0;
    printf("trial %d: the queued coroutine ran %.3f ms after the blocking call began\n", i,
           waited[i] / 1e6);
  }
  qsort(waited, 5, sizeof waited[0], cmp_i64);
  CHECKF(waited[2] < 5 * CHECK_MS,
         "the queued coroutine waited %.1f ms (median of 5): sysmon slept through the "
         "blocking call",
         waited[2] / 1e6);
}
TEST(blocking_call_right_after_idle_is_retaken) {
  unsetenv("LOOM_SCHEDTRACE");
  check_run(retake_main, NULL, 1);
}

/* ------------------------------------------------------------------ */
/* LOOM_SCHEDTRACE prints lines through the log hook.                     */

/* With tracing on, main waits (up to 3 s, for a loaded machine) for
 * three lines at one per 50 ms; with it off, it waits 330 ms. */
static int trace_on;
static int64_t trace_elapsed;
static void trace_main(void *arg) {
  int i;
  int64_t t0 = loom_now();
  (void)arg;
  for (i = 0; i < 10; i++)
    CHECK_OK(loom_go(sleep_long, NULL));
  if (trace_on)
    while (log_count() < 3 && loom_now() - t0 < 3000 * CHECK_MS)
      loom_sleep(5 * CHECK_MS);
  else
    loom_sleep(330 * CHECK_MS);
  trace_elapsed = loom_now() - t0;
}

static void check_trace_lines(void) {
  int i, n = log_count();
  printf("%d trace lines in %.0f ms\n", n, trace_elapsed / 1e6);
  CHECK_EQ(log_bad_arg, 0);
  CHECKF(n >= 3, "%d trace lines in %.0f ms at one per 50 ms", n, trace_elapsed / 1e6);
  CHECKF(n <= trace_elapsed / (50 * CHECK_MS) + 2, "%d trace lines in %.0f ms at one per 50 ms",
         n, trace_elapsed / 1e6);
  for (i = 0; i < n; i++) {
    size_t len = strlen(log_lines[i]);
    CHECK_GT(len, 0);
    CHECKF(log_lines[i][len - 1] != '\n', "trace line ends in a newline: \"%s\"", log_lines[i]);
    CHECKF(strchr(log_lines[i], '\n') == NULL, "trace message holds several lines: \"%s\"",
           log_lines[i]);
  }
  log_print_and_free();
}

TEST(schedtrace_config) {
  loom_config cfg;
  unsetenv("LOOM_SCHEDTRACE");
  cfg_with_log(&cfg, 2);
  cfg.schedtrace_ms = 50;
  trace_on = 1;
  CHECK_OK(loom_run(trace_main, NULL, &cfg));
  check_trace_lines();
}

TEST(schedtrace_env) {
  loom_config cfg;
  CHECK_EQ(setenv("LOOM_SCHEDTRACE", "50", 1), 0);
  cfg_with_log(&cfg, 2); /* loom_config_init reads the environment */
  CHECK_EQ(cfg.schedtrace_ms, 50);
  trace_on = 1;
  CHECK_OK(loom_run(trace_main, NULL, &cfg));
  check_trace_lines();
}

/* More Ps than one line can list: the list ends with how many it left
 * out, and the entries and that number add up to every P. */
static void trace_many_main(void *arg) {
  (void)arg;
  int64_t t0 = loom_now();
  while (log_count() < 1 && loom_now() - t0 < 3000 * CHECK_MS)
    loom_sleep(5 * CHECK_MS);
}
TEST(schedtrace_many_procs_says_what_it_left_out) {
  loom_config cfg;
  unsetenv("LOOM_SCHEDTRACE");
  cfg_with_log(&cfg, 300);
  cfg.schedtrace_ms = 20;
  CHECK_OK(loom_run(trace_many_main, NULL, &cfg));
  CHECK_GE(log_count(), 1);
  const char *open = strrchr(log_lines[0], '[');
  CHECK(open != NULL);
  int listed = 0, more = 0;
  const char *p = open + 1;
  while (*p != ']' && *p != '\0') {
    if (*p == '+') {
      CHECK_EQ(sscanf(p, "+%d more", &more), 1);
      break;
    }
    while (*p == ' ')
      p++;
    if (*p >= '0' && *p <= '9') {
      listed++;
      while (*p >= '0' && *p <= '9')
        p++;
    }
  }
  printf("%d Ps listed, %d more\n", listed, more);
  CHECK_GT(more, 0);
  CHECK_EQ(listed + more, 300);
  log_print_and_free();
}

/* Without tracing an idle runtime says nothing. */
TEST(schedtrace_off_is_silent) {
  loom_config cfg;
  unsetenv("LOOM_SCHEDTRACE");
  cfg_with_log(&cfg, 2);
  CHECK_EQ(cfg.schedtrace_ms, 0);
  CHECK_OK(loom_run(trace_main, NULL, &cfg));
  CHECK_EQ(log_count(), 0);
}

/* ------------------------------------------------------------------ */
/* The long-run warning names a coroutine that spins 30 ms.              */

static atomic_ullong spinner_id, polite_id;
static atomic_int spun;

static int64_t thread_cpu_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* 30 ms on the CPU (and so at least 30 ms of wall time, more when the
 * machine is loaded) without a scheduling point. */
static void spinner(void *arg) {
  int64_t end;
  (void)arg;
  atomic_store(&spinner_id, loom_id());
  end = thread_cpu_ns() + 30 * CHECK_MS;
  while (thread_cpu_ns() < end) {
  }
  atomic_store(&spun, 1);
}

/* Runs as long, but yields every millisecond.  Only informative: on a
 * loaded machine the kernel may stop its thread for 10 ms between two
 * yields, which the monitor rightly counts as running. */
static atomic_llong polite_max_gap; /* longest wall time between two yields */
static void polite(void *arg) {
  int i;
  int64_t last;
  (void)arg;
  atomic_store(&polite_id, loom_id());
  last = loom_now();
  for (i = 0; i < 30; i++) {
    int64_t now;
    check_spin_ns(CHECK_MS);
    now = loom_now();
    if (now - last > atomic_load(&polite_max_gap))
      atomic_store(&polite_max_gap, now - last);
    loom_yield();
    last = now;
  }
}

static void warn_main(void *arg) {
  int i;
  (void)arg;
  /* push the ids past small numbers that appear in any message */
  for (i = 0; i < 300; i++)
    CHECK_OK(loom_go(sleep_long, NULL));
  CHECK_OK(loom_go(polite, NULL));
  loom_sleep(50 * CHECK_MS);
  CHECK_OK(loom_go(spinner, NULL));
  while (!atomic_load(&spun))
    loom_sleep(CHECK_MS);
  loom_sleep(50 * CHECK_MS); /* let the monitor speak */
}

TEST(long_run_warning) {
  loom_config cfg;
  unsetenv("LOOM_SCHEDTRACE");
  cfg_with_log(&cfg, 2);
  CHECK_EQ(cfg.long_run_warn_ns, 10 * CHECK_MS);
  CHECK_OK(loom_run(warn_main, NULL, &cfg));
  printf("spinner is coroutine %llu, polite one %llu\n",
         (unsigned long long)atomic_load(&spinner_id), (unsigned long long)atomic_load(&polite_id));
  /* Ids are unique but not monotonic (each P hands them out in batches). */
  CHECK_NE(atomic_load(&spinner_id), 0);
  CHECK_NE(atomic_load(&spinner_id), atomic_load(&polite_id));
  if (log_mentions(atomic_load(&polite_id)) != 0) {
    /* Fine if the kernel stopped its thread for 10 ms; not if it never
     * went 5 ms (wall time, yield to yield) without yielding. */
    printf("note: coroutine %llu yielded every millisecond and was warned about; "
           "its longest gap between yields: %.1f ms\n",
           (unsigned long long)atomic_load(&polite_id), atomic_load(&polite_max_gap) / 1e6);
    CHECKF(atomic_load(&polite_max_gap) > 5 * CHECK_MS,
           "coroutine %llu never ran more than %.1f ms between two yields, yet was warned "
           "about", (unsigned long long)atomic_load(&polite_id),
           atomic_load(&polite_max_gap) / 1e6);
  }
  if (log_mentions(atomic_load(&spinner_id)) == 0)
    log_print_and_free();
  CHECKF(log_mentions(atomic_load(&spinner_id)) >= 1,
         "no message names coroutine %llu, which ran 30 ms without a scheduling point",
         (unsigned long long)atomic_load(&spinner_id));
  log_print_and_free();
}

/* A threshold above the spin, or a negative one: no warning. */
TEST(long_run_warning_threshold) {
  loom_config cfg;
  unsetenv("LOOM_SCHEDTRACE");
  cfg_with_log(&cfg, 2);
  cfg.long_run_warn_ns = 200 * CHECK_MS;
  CHECK_OK(loom_run(warn_main, NULL, &cfg));
  CHECKF(log_mentions(atomic_load(&spinner_id)) == 0, "warned below the threshold");
  log_print_and_free();
}
TEST(long_run_warning_off) {
  loom_config cfg;
  unsetenv("LOOM_SCHEDTRACE");
  cfg_with_log(&cfg, 2);
  cfg.long_run_warn_ns = -1;
  CHECK_OK(loom_run(warn_main, NULL, &cfg));
  CHECKF(log_count() == 0, "%d messages with the warning off", log_count());
}

/* A coroutine whose P was taken during a blocking call comes back on
 * whatever P loom_block_exit finds; when it then runs 30 ms without a
 * scheduling point, the warning names it, not nobody (an idle P's
 * "nothing runs here") or the coroutine that ran there before. */
static atomic_ullong returner_id;
static atomic_int returner_spun;
static void block_then_spin(void *arg) {
  (void)arg;
  atomic_store(&returner_id, loom_id());
  loom_block_enter();
  usleep(40 * 1000); /* long enough for its P to be retaken */
  loom_block_exit();
  int64_t end = thread_cpu_ns() + 30 * CHECK_MS;
  while (thread_cpu_ns() < end) {
  }
  atomic_store(&returner_spun, 1);
}
static void block_warn_main(void *arg) {
  (void)arg;
  for (int i = 0; i < 300; i++) /* ids past small numbers */
    CHECK_OK(loom_go(sleep_long, NULL));
  CHECK_OK(loom_go(block_then_spin, NULL));
  while (!atomic_load(&returner_spun))
    loom_sleep(CHECK_MS);
  loom_sleep(50 * CHECK_MS); /* let the monitor speak */
}
TEST(long_run_warning_after_blocking_call) {
  loom_config cfg;
  unsetenv("LOOM_SCHEDTRACE");
  cfg_with_log(&cfg, 2);
  CHECK_OK(loom_run(block_warn_main, NULL, &cfg));
  int n = log_mentions(atomic_load(&returner_id));
  log_print_and_free();
  CHECKF(n >= 1,
         "no message names coroutine %llu, which ran 30 ms without a "
         "scheduling point "
         "after a blocking call",
         (unsigned long long)atomic_load(&returner_id));
}

/* Free stacks beyond a reserve give their memory back once spawning has
 * calmed down: while the runtime stays busy, and also when it goes
 * idle (sysmon then used to sleep without a timeout, before trimming). */
static long rss_kib(void) {
  FILE *f = fopen("/proc/self/statm", "r");
  long pages = 0, res = 0;
  CHECK(f != NULL);
  CHECK_EQ(fscanf(f, "%ld %ld", &pages, &res), 2);
  fclose(f);
  return res * (sysconf(_SC_PAGESIZE) / 1024);
}
static atomic_long burst_up;
static atomic_int burst_go;
static void deep_user(void *arg) {
  (void)arg;
  volatile char buf[48 * 1024];
  for (size_t i = 0; i < sizeof buf; i += 512)
    buf[i] = 1;
  atomic_fetch_add(&burst_up, 1);
  while (!atomic_load(&burst_go))
    loom_sleep(CHECK_MS);
}
#define BURST 4000
static void trim_main(void *arg) {
  bool busy = arg != NULL;
  if (CHECK_ASAN) {
    /* Its frames and shadow change what a burst leaves resident. */
    printf("under ASan: not measured\n");
    return;
  }
  atomic_store(&burst_up, 0);
  atomic_store(&burst_go, 0);
  for (int i = 0; i < BURST; i++) {
    CHECK_OK(loom_go(deep_user, NULL));
    if (i % 256 == 255)
      loom_yield(); /* each spawn faults in a page: not 10 ms in a row */
  }
  while (atomic_load(&burst_up) < BURST)
    loom_sleep(CHECK_MS);
  /* Measured while every stack is in use: nothing can be trimmed yet
   * (after the burst ends, the first trim may come before any sample). */
  long r0 = rss_kib(), r1 = r0;
  atomic_store(&burst_go, 1);
  loom_sleep(50 * CHECK_MS); /* all returned */
  int64_t t0 = loom_now(), end = t0 + 3000 * CHECK_MS;
  while (loom_now() < end && r0 - r1 <= 50 * 1024) {
    int64_t slice = loom_now() + 50 * CHECK_MS;
    while (busy && loom_now() < slice)
      loom_yield();
    if (!busy)
      loom_sleep(50 * CHECK_MS); /* every P idle meanwhile */
    r1 = rss_kib();
  }
  printf("%s after a burst of %d coroutines with 48 KiB stacks: RSS %ld -> %ld "
         "KiB in %.0f ms\n",
         busy ? "busy" : "idle", BURST, r0, r1,
         (double)(loom_now() - t0) / 1e6);
  CHECKF(r0 - r1 > 50 * 1024,
         "free stacks were not trimmed (RSS %ld -> %ld KiB)", r0, r1);
}
TEST(free_stacks_trimmed_while_busy) { check_run(trim_main, (void *)1, 2); }
TEST(free_stacks_trimmed_while_idle) { check_run(trim_main, NULL, 2); }

/* ------------------------------------------------------------------ */
/* A lost wake-up costs at most a sysmon round.  A coroutine queued on a
 * busy P while another P is idle and nobody looks for work would wait
 * until the busy P's coroutine parks: the wake-up that should have come
 * with it is made to be lost here, the busy coroutine never parks, and
 * sysmon must see the work nobody takes and wake a thread for it, which
 * steals it (Go's sysmon would preempt the busy one).  The bound of 2 s
 * only keeps the test finite: sysmon rounds are 10 ms apart here. */

static atomic_int stranded_ran;
static void mark_stranded_ran(void *arg) {
  (void)arg;
  atomic_store(&stranded_ran, 1);
}

/* The other P idle and nobody spinning (the thread that woke us may
 * still be looking for work a while). */
static bool other_p_idle(void) {
  loom_stats st;
  CHECK_OK(loom_stats_get(&st));
  return st.idle_procs == 1 && st.spinning_threads == 0;
}

static void lost_wakeup_main(void *arg) {
  (void)arg;
  for (int tries = 0;; tries++) {
    CHECK(tries < 100);
    loom_sleep(CHECK_MS);
    int64_t t0 = loom_now();
    while (!other_p_idle() && loom_now() - t0 < 100 * CHECK_MS)
      loom_yield(); /* our P only */
    loom__test_lose_wakeps(1);
    CHECK_OK(loom_go(mark_stranded_ran, NULL));
    if (loom__test_lose_wakeps(0) == 0)
      break; /* the spawn's wake-up was the one lost */
    /* The other P was not idle after all: the spawn did not ask. */
    while (!atomic_load(&stranded_ran))
      loom_yield();
    atomic_store(&stranded_ran, 0);
  }
  int64_t t0 = loom_now();
  while (!atomic_load(&stranded_ran) && loom_now() - t0 < 2000 * CHECK_MS)
    ; /* busy, never parks: only a thief can run the child */
  CHECK(atomic_load(&stranded_ran));
}

TEST(lost_wakeup_is_recovered_by_sysmon) {
  check_run_hog(lost_wakeup_main, NULL, 2);
}

CHECK_MAIN()
