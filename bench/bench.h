/*
 * bench.h — the little the loom microbenchmarks share: a clock, the
 * process's resident set size, argument parsing, and a runtime start-up
 * that fails loudly.
 *
 * Every benchmark prints exactly one line starting with "RESULT " made of
 * key=value fields (bench/run.sh parses it); anything else goes to stderr
 * or starts with "INFO ".
 */
#ifndef LOOM_BENCH_H
#define LOOM_BENCH_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "loom/runtime.h"

/* Monotonic time in ns, independent of the runtime under test. */
static inline int64_t bench_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* VmRSS of this process in KiB, from /proc/self/status; -1 if unknown. */
static inline long bench_rss_kib(void) {
  FILE *f = fopen("/proc/self/status", "r");
  char line[256];
  long kib = -1;
  if (!f)
    return -1;
  while (fgets(line, sizeof line, f)) {
    if (strncmp(line, "VmRSS:", 6) == 0) {
      kib = strtol(line + 6, NULL, 10);
      break;
    }
  }
  fclose(f);
  return kib;
}

/* argv[i] as a non-negative long (0 means "the default" where a program
 * says so), or `def` when absent; exits on junk. */
static inline long bench_arg(int argc, char **argv, int i, long def) {
  char *end;
  long v;
  if (i >= argc)
    return def;
  v = strtol(argv[i], &end, 10);
  if (*argv[i] == '\0' || *end != '\0' || v < 0) {
    fprintf(stderr, "%s: argument %d must be an integer >= 0, not '%s'\n",
            argv[0], i, argv[i]);
    exit(2);
  }
  return v;
}

/* The CPU-bound load of cpu.c and cpu_threads.c; the same code as work()
 * in go/cpu.go.  A serial xorshift64 chain: every step depends on the one
 * before, so it cannot be vectorised, and the caller sums the result into
 * a printed checksum, so it cannot be dropped.  noinline keeps it one
 * function both compilers see the same way (`unused`: not every program
 * that includes this header calls it). */
__attribute__((noinline, unused)) static uint64_t bench_work(uint64_t seed,
                                                             long iters) {
  uint64_t x = seed | 1, acc = 0;
  for (long i = 0; i < iters; i++) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    acc += x;
  }
  return acc;
}

static inline void bench_die(const char *what, int err) {
  fprintf(stderr, "bench: %s: %s (%d)\n", what, loom_strerror(err), err);
  exit(1);
}

/* loom_run with the defaults and LOOM_* environment, except `procs` when
 * procs > 0.  Exits the process if the runtime cannot start. */
static inline void bench_run(void (*main_fn)(void *), void *arg, int procs) {
  loom_config cfg;
  int rc;
  loom_config_init(&cfg);
  if (procs > 0)
    cfg.procs = procs;
  rc = loom_run(main_fn, arg, &cfg);
  if (rc != 0)
    bench_die("loom_run", rc);
}

#endif /* LOOM_BENCH_H */
