/*
 * check.h — the test harness: CHECK macros, a test registry and a few
 * process helpers.  Header-only; every test file is one executable.
 *
 * A test file defines cases with
 *
 *     TEST(name) { ... CHECK(x == 1); ... }
 *
 * and ends with CHECK_MAIN().  The executable runs the one case named by
 * argv[1] (libuv's runner: one process per case, so a crash or a hang
 * names one test); `--list` prints the names.  tests/CMakeLists.txt finds
 * the names by reading the `TEST(` lines of the source, so a case must
 * start at the beginning of a line.
 *
 * HELPER(name) { ... } defines an entry point that is not a test: tests
 * that need a child process (a crash they expect, a failure injected
 * into a fresh process) re-execute themselves with the helper's name and
 * check what the child printed and how it died (check_spawn_self).
 *
 * A failing CHECK prints file:line, the expression (and the values, for
 * the _EQ/_OK forms) and aborts.
 */
#ifndef LOOM_TESTS_CHECK_H
#define LOOM_TESTS_CHECK_H

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "loom.h"

/* ---- sanitizers: tests scale their big numbers down under them ---- */
#if defined(__SANITIZE_THREAD__)
#define CHECK_TSAN 1
#endif
#if defined(__SANITIZE_ADDRESS__)
#define CHECK_ASAN 1
#endif
#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define CHECK_TSAN 1
#endif
#if __has_feature(address_sanitizer)
#define CHECK_ASAN 1
#endif
#endif
#ifndef CHECK_TSAN
#define CHECK_TSAN 0
#endif
#ifndef CHECK_ASAN
#define CHECK_ASAN 0
#endif

/* Pick a size by build: plain, ASan, TSan. */
#define CHECK_SCALE(plain, asan, tsan) (CHECK_TSAN ? (tsan) : CHECK_ASAN ? (asan) : (plain))

/* 1 when the ctest entry runs the binary under valgrind (it sets this). */
static inline int check_under_valgrind(void) {
  const char *v = getenv("LOOM_TEST_VALGRIND");
  return v != NULL && v[0] == '1';
}

/* ---- CHECK macros ---- */

__attribute__((noreturn, format(printf, 3, 4))) static inline void
check_fail_(const char *file, int line, const char *fmt, ...) {
  va_list ap;
  fflush(stdout);
  fprintf(stderr, "%s:%d: CHECK failed: ", file, line);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  fflush(stderr);
  abort();
}

#define CHECK_FAIL(...) check_fail_(__FILE__, __LINE__, __VA_ARGS__)

#define CHECK(cond)                                                                                \
  do {                                                                                             \
    if (!(cond))                                                                                   \
      check_fail_(__FILE__, __LINE__, "%s", #cond);                                                \
  } while (0)

/* CHECK with a printf-style explanation. */
#define CHECKF(cond, ...)                                                                          \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      fflush(stdout);                                                                              \
      fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__, #cond);                     \
      fprintf(stderr, __VA_ARGS__);                                                                \
      fputc('\n', stderr);                                                                         \
      fflush(stderr);                                                                              \
      abort();                                                                                     \
    }                                                                                              \
  } while (0)

/* Integer comparisons print both sides. */
#define CHECK_CMP_(a, op, b)                                                                       \
  do {                                                                                             \
    long long check_a_ = (long long)(a), check_b_ = (long long)(b);                                \
    if (!(check_a_ op check_b_))                                                                   \
      check_fail_(__FILE__, __LINE__, "%s %s %s (%lld vs %lld)", #a, #op, #b, check_a_, check_b_); \
  } while (0)
#define CHECK_EQ(a, b) CHECK_CMP_(a, ==, b)
#define CHECK_NE(a, b) CHECK_CMP_(a, !=, b)
#define CHECK_LT(a, b) CHECK_CMP_(a, <, b)
#define CHECK_LE(a, b) CHECK_CMP_(a, <=, b)
#define CHECK_GT(a, b) CHECK_CMP_(a, >, b)
#define CHECK_GE(a, b) CHECK_CMP_(a, >=, b)

/* A loom call that must return 0; prints the error's name otherwise. */
#define CHECK_OK(expr)                                                                             \
  do {                                                                                             \
    int check_r_ = (expr);                                                                         \
    if (check_r_ != 0)                                                                             \
      check_fail_(__FILE__, __LINE__, "%s returned %d (%s)", #expr, check_r_,                      \
                  loom_err_name(check_r_));                                                        \
  } while (0)

/* A loom call that must return exactly `want`. */
#define CHECK_ERR(expr, want)                                                                      \
  do {                                                                                             \
    int check_r_ = (expr), check_w_ = (want);                                                      \
    if (check_r_ != check_w_)                                                                      \
      check_fail_(__FILE__, __LINE__, "%s returned %d (%s), want %d (%s)", #expr, check_r_,        \
                  loom_err_name(check_r_), check_w_, loom_err_name(check_w_));                     \
  } while (0)

#define CHECK_STREQ(a, b)                                                                          \
  do {                                                                                             \
    const char *check_sa_ = (a), *check_sb_ = (b);                                                 \
    if (check_sa_ == NULL || check_sb_ == NULL || strcmp(check_sa_, check_sb_) != 0)               \
      check_fail_(__FILE__, __LINE__, "%s == %s (\"%s\" vs \"%s\")", #a, #b,                       \
                  check_sa_ ? check_sa_ : "(null)", check_sb_ ? check_sb_ : "(null)");             \
  } while (0)

/* ---- the registry ---- */

typedef void (*check_fn)(void);
struct check_case {
  const char *name;
  check_fn fn;
  int helper;
};
static struct check_case check_cases_[256];
static int check_ncases_;
static int check_argc;     /* argc/argv after the case name */
static char **check_argv;
static const char *check_self; /* argv[0] */

static inline void check_register_(const char *name, check_fn fn, int helper) {
  if (check_ncases_ == (int)(sizeof check_cases_ / sizeof check_cases_[0]))
    abort();
  check_cases_[check_ncases_].name = name;
  check_cases_[check_ncases_].fn = fn;
  check_cases_[check_ncases_].helper = helper;
  check_ncases_++;
}

#define CHECK_DEFINE_(name, helper)                                                                \
  static void check_case_##name(void);                                                             \
  __attribute__((constructor)) static void check_register_##name(void) {                           \
    check_register_(#name, check_case_##name, helper);                                             \
  }                                                                                                \
  static void check_case_##name(void)
#define TEST(name) CHECK_DEFINE_(name, 0)
#define HELPER(name) CHECK_DEFINE_(name, 1)

static inline int check_main_(int argc, char **argv) {
  int i;
  check_self = argv[0];
  if (argc < 2 || strcmp(argv[1], "--list") == 0) {
    for (i = 0; i < check_ncases_; i++)
      if (!check_cases_[i].helper)
        printf("%s\n", check_cases_[i].name);
    return argc < 2 ? 2 : 0;
  }
  for (i = 0; i < check_ncases_; i++) {
    if (strcmp(check_cases_[i].name, argv[1]) == 0) {
      check_argc = argc - 2;
      check_argv = argv + 2;
      check_cases_[i].fn();
      if (!check_cases_[i].helper) {
        printf("ok %s\n", argv[1]);
        fflush(stdout);
      }
      return 0;
    }
  }
  fprintf(stderr, "%s: no test named '%s'\n", argv[0], argv[1]);
  return 2;
}

#define CHECK_MAIN()                                                                               \
  int main(int argc, char **argv) { return check_main_(argc, argv); }

/* ---- time ---- */

static inline int64_t check_mono_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* CPU time of the whole process, all threads. */
static inline int64_t check_cpu_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

#define CHECK_MS ((int64_t)1000000)

/* Burn CPU for `ns` without any scheduling point. */
static inline void check_spin_ns(int64_t ns) {
  int64_t end = check_mono_ns() + ns;
  while (check_mono_ns() < end) {
  }
}

/* ---- watchdog: abort with a message instead of waiting for ctest ---- */

/*
 * A hung test's whole picture, printed before it aborts: gdb, attached to
 * this process, shows every thread's stack and, through
 * tools/loom-gdb.py, every coroutine and each parked one's stack (the
 * first 200).  A hang that shows once in a hundred runs is then
 * explained by the one log that has it.  Needs gdb (scripts/deps.sh
 * installs it); LOOM_TEST_HANG_DUMP=0 turns it off.  Under ASan the
 * coroutine stacks may be partial (fake stacks); thread stacks are not.
 */
static inline void check_dump_hang(void) {
#ifdef LOOM_TEST_GDB_SCRIPT
  const char *e = getenv("LOOM_TEST_HANG_DUMP");
  if ((e != NULL && e[0] == '0') || check_under_valgrind())
    return;
  char pid[24], src[sizeof LOOM_TEST_GDB_SCRIPT + 16];
  snprintf(pid, sizeof pid, "%d", (int)getpid());
  snprintf(src, sizeof src, "source %s", LOOM_TEST_GDB_SCRIPT);
  /* clang-format off */
  char *argv[] = {"gdb", "-nx", "-batch", "-p", pid,
                  "-iex", "set debuginfod enabled off",
                  "-ex", "set pagination off",
                  "-ex", "set width 0",
                  "-ex", src,
                  "-ex", "thread apply all bt 40",
                  "-ex", "loom-coroutines",
                  "-ex", "loom-bt all=200 40",
                  NULL};
  /* clang-format on */
  /* Yama's ptrace_scope 1 lets only a process's ancestors attach. */
  (void)prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, 2, 1); /* all of it on stderr */
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  extern char **environ;
  pid_t child;
  fprintf(stderr, "---- hang dump (gdb attached) ----\n");
  fflush(stderr);
  int err = posix_spawnp(&child, "gdb", &fa, NULL, argv, environ);
  posix_spawn_file_actions_destroy(&fa);
  if (err != 0) {
    fprintf(stderr, "(no hang dump: cannot run gdb: %s)\n", strerror(err));
    return;
  }
  /* gdb stops every thread while it looks; give it a minute at most. */
  int status;
  for (int i = 0; i < 600; i++) {
    pid_t r = waitpid(child, &status, WNOHANG);
    if (r == child || (r < 0 && errno != EINTR))
      break;
    if (i == 599) {
      kill(child, SIGKILL);
      waitpid(child, &status, 0);
      fprintf(stderr, "(gdb killed after 60 s)\n");
    }
    usleep(100 * 1000);
  }
  fprintf(stderr, "---- end of hang dump ----\n");
  fflush(stderr);
#endif
}

struct check_watchdog_ {
  int64_t secs;
  const char *what;
};

static inline void *check_watchdog_main_(void *p) {
  struct check_watchdog_ *w = (struct check_watchdog_ *)p;
  struct timespec ts = {(time_t)w->secs, 0};
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
  fprintf(stderr, "watchdog: still running after %lld s: %s\n", (long long)w->secs, w->what);
  fflush(stderr);
  check_dump_hang();
  abort();
  return NULL;
}

/* Start a thread that aborts the process after `secs` seconds.  `what`
 * says what the test was waiting for. */
static inline void check_watchdog(int64_t secs, const char *what) {
  static struct check_watchdog_ w;
  pthread_t t;
  pthread_attr_t a;
  if (check_under_valgrind())
    return; /* valgrind would count the live thread's memory as a leak */
  w.secs = secs;
  w.what = what;
  pthread_attr_init(&a);
  pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
  if (pthread_create(&t, &a, check_watchdog_main_, &w) != 0)
    CHECK_FAIL("watchdog: pthread_create");
  pthread_attr_destroy(&a);
}

/* ---- stalls: the host taking the CPUs away ---- */

/*
 * A shared VM stops the whole process now and then — every thread at
 * once, for tens of milliseconds — and when it comes back every clock
 * has jumped.  A test that bounds how late something happens cannot tell
 * that from a late runtime by looking at the clock alone, so it asks a
 * witness: check_stall_start() starts a plain thread that wakes every
 * millisecond and records each wake-up that came more than
 * CHECK_STALL_SLACK late (the thread did not run, so likely nothing of
 * the process did).  check_stalled_ns(t0, t1) then says how much of
 * [t0, t1] (CLOCK_MONOTONIC, loom_now's clock) such gaps covered.
 *
 * A test subtracts that from the lateness it measured, or retries a
 * round that was stalled; a runtime that is late while the process runs
 * leaves no gap, and the test still fails.  tests/stall/run.sh makes
 * such stalls on purpose.  Under valgrind the witness does not run and
 * reports no stall.
 */
#define CHECK_STALL_TICK (1 * CHECK_MS)
#define CHECK_STALL_SLACK (2 * CHECK_MS)
#define CHECK_STALL_GAPS 1024

struct check_stall_ {
  pthread_mutex_t mu; /* protects gaps, ngaps */
  struct {
    int64_t from, to; /* the witness ran at `from`, next at `to` */
  } gaps[CHECK_STALL_GAPS];
  int ngaps; /* total recorded; gaps[] keeps the last CHECK_STALL_GAPS */
  /* The witness's last wake-up: a gap that ends before it is recorded.
   * Release after recording, acquire in check_stalled_ns. */
  _Atomic int64_t last;
  atomic_int started; /* read by any thread, set once before it starts */
};
static struct check_stall_ check_stall_ = {
    PTHREAD_MUTEX_INITIALIZER, {{0, 0}}, 0, 0, 0};

static inline void *check_stall_main_(void *p) {
  (void)p;
  int64_t prev = check_mono_ns();
  for (;;) {
    struct timespec ts = {0, (long)CHECK_STALL_TICK};
    nanosleep(&ts, NULL);
    int64_t now = check_mono_ns();
    if (now - prev > CHECK_STALL_TICK + CHECK_STALL_SLACK) {
      pthread_mutex_lock(&check_stall_.mu);
      int i = check_stall_.ngaps++ % CHECK_STALL_GAPS;
      check_stall_.gaps[i].from = prev;
      check_stall_.gaps[i].to = now;
      pthread_mutex_unlock(&check_stall_.mu);
    }
    atomic_store_explicit(&check_stall_.last, now, memory_order_release);
    prev = now;
  }
  return NULL;
}

/* Start the witness (once; later calls do nothing). */
static inline void check_stall_start(void) {
  pthread_t t;
  pthread_attr_t a;
  if (atomic_load(&check_stall_.started) || check_under_valgrind())
    return;
  atomic_store(&check_stall_.last, check_mono_ns());
  atomic_store(&check_stall_.started, 1);
  pthread_attr_init(&a);
  pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
  if (pthread_create(&t, &a, check_stall_main_, NULL) != 0)
    CHECK_FAIL("stall witness: pthread_create");
  pthread_attr_destroy(&a);
}

/*
 * How many ns of [t0, t1] the process was seen stalled: the part of each
 * recorded gap inside [t0, t1], less the tick the witness meant to sleep
 * anyway.  Waits (100 ms at most) for the witness to wake after t1, so
 * that a stall still going on at t1 is counted; a witness that does not
 * wake in that time was itself stalled, and what it missed counts.
 */
static inline int64_t check_stalled_ns(int64_t t0, int64_t t1) {
  if (!atomic_load(&check_stall_.started))
    return 0;
  int64_t give_up = check_mono_ns() + 100 * CHECK_MS, last;
  while ((last = atomic_load_explicit(&check_stall_.last,
                                      memory_order_acquire)) < t1 &&
         check_mono_ns() < give_up) {
    struct timespec ts = {0, (long)(CHECK_STALL_TICK / 4)};
    nanosleep(&ts, NULL);
  }
  int64_t sum = 0;
  if (last < t1)
    sum += t1 - (last > t0 ? last : t0);
  pthread_mutex_lock(&check_stall_.mu);
  int n = check_stall_.ngaps < CHECK_STALL_GAPS ? check_stall_.ngaps
                                                : CHECK_STALL_GAPS;
  for (int i = 0; i < n; i++) {
    int64_t a = check_stall_.gaps[i].from, b = check_stall_.gaps[i].to;
    int64_t lo = a > t0 ? a : t0, hi = b < t1 ? b : t1;
    int64_t excess = b - a - CHECK_STALL_TICK;
    if (hi > lo)
      sum += hi - lo < excess ? hi - lo : excess;
  }
  pthread_mutex_unlock(&check_stall_.mu);
  return sum;
}

/* ---- running the runtime ---- */

static inline void check_run_(void (*fn)(void *), void *arg, int procs,
                              bool hog) {
  loom_config cfg;
  loom_config_init(&cfg);
  if (procs > 0)
    cfg.procs = procs;
  if (hog)
    cfg.long_run_warn_ns = -1;
  CHECK_OK(loom_run(fn, arg, &cfg));
}

/* loom_run with `procs` Ps (0: default), the rest defaults; must return 0. */
static inline void check_run(void (*fn)(void *), void *arg, int procs) {
  check_run_(fn, arg, procs, false);
}

/* The same for a test whose coroutine keeps its P on purpose: with the
 * long-run warning off. */
static inline void check_run_hog(void (*fn)(void *), void *arg, int procs) {
  check_run_(fn, arg, procs, true);
}

/* ---- child processes ---- */

struct check_child {
  int status;      /* waitpid status */
  int timed_out;   /* killed by us after the timeout */
  char out[65536]; /* stdout and stderr, interleaved, NUL-terminated */
  size_t len;
};

/*
 * Run this executable again as `self HELPER_NAME args...` with stdout and
 * stderr captured into c->out; kill it after `timeout_s` seconds.
 */
static inline void check_spawn_self(struct check_child *c, int timeout_s, const char *helper,
                                    const char *arg1) {
  int fds[2];
  pid_t pid;
  posix_spawn_file_actions_t fa;
  char *argv[4];
  extern char **environ;
  int64_t deadline = check_mono_ns() + (int64_t)timeout_s * 1000000000;

  memset(c, 0, sizeof *c);
  CHECK(pipe2(fds, O_CLOEXEC) == 0);
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, fds[1], 1);
  posix_spawn_file_actions_adddup2(&fa, fds[1], 2);
  argv[0] = (char *)(uintptr_t)check_self;
  argv[1] = (char *)(uintptr_t)helper;
  argv[2] = (char *)(uintptr_t)arg1;
  argv[3] = NULL;
  CHECK_EQ(posix_spawn(&pid, "/proc/self/exe", &fa, NULL, argv, environ), 0);
  posix_spawn_file_actions_destroy(&fa);
  close(fds[1]);
  for (;;) {
    struct pollfd p = {fds[0], POLLIN, 0};
    int64_t left = deadline - check_mono_ns();
    int r;
    ssize_t n;
    if (left <= 0) {
      c->timed_out = 1;
      kill(pid, SIGKILL);
      break;
    }
    r = poll(&p, 1, (int)(left / 1000000) + 1);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      continue;
    if (c->len + 1 >= sizeof c->out) {
      char sink[4096]; /* keep draining; keep the first 64 KiB */
      n = read(fds[0], sink, sizeof sink);
    } else {
      n = read(fds[0], c->out + c->len, sizeof c->out - 1 - c->len);
      if (n > 0)
        c->len += (size_t)n;
    }
    if (n == 0)
      break;
    if (n < 0 && errno != EINTR && errno != EAGAIN)
      break;
  }
  c->out[c->len] = '\0';
  close(fds[0]);
  while (waitpid(pid, &c->status, 0) < 0 && errno == EINTR) {
  }
}

/* Describe how a child ended, for messages. */
static inline const char *check_child_how(const struct check_child *c, char *buf, size_t n) {
  if (c->timed_out)
    snprintf(buf, n, "timed out (killed)");
  else if (WIFSIGNALED(c->status))
    snprintf(buf, n, "killed by signal %d (%s)", WTERMSIG(c->status), strsignal(WTERMSIG(c->status)));
  else if (WIFEXITED(c->status))
    snprintf(buf, n, "exited with status %d", WEXITSTATUS(c->status));
  else
    snprintf(buf, n, "status 0x%x", c->status);
  return buf;
}

/* Resident set size of this process in MiB (for information). */
static inline long check_rss_mib(void) {
  long pages = 0, rss = 0;
  FILE *f = fopen("/proc/self/statm", "r");
  if (f == NULL)
    return -1;
  if (fscanf(f, "%ld %ld", &pages, &rss) != 2)
    rss = -1;
  fclose(f);
  return rss < 0 ? -1 : rss * (sysconf(_SC_PAGESIZE) / 1024) / 1024;
}

#endif /* LOOM_TESTS_CHECK_H */
