/*
 * loom_echo.c — the loom echo server of the echo bench (bench/echo/run.sh):
 * the code a loom user writes, Go's shape in C.
 *
 * One listener, one accept loop on the main coroutine, one coroutine per
 * connection that writes back what it reads, until end of stream or an
 * error.  It waits for input holding no buffer (loom_read of 0 bytes, as
 * net.h shows), then reads into a 16 KiB buffer from malloc, freed when
 * a read comes back short: an idle connection is its coroutine's one
 * stack page.  Nothing tuned: default stack size, loom_listen's defaults
 * (no SO_REUSEPORT).
 *
 * Usage: loom_echo [--addr HOST:PORT] [--procs N]   (default
 * 127.0.0.1:7000; procs 0 or absent: loom's default, every CPU this
 * process may run on).  Runs until killed.
 */
#define _GNU_SOURCE
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "loom/net.h"
#include "loom/runtime.h"

#define BUF_SIZE 16384

static const char *addr = "127.0.0.1:7000";

static void serve(void *arg) {
  loom_conn *c = arg;
  /* Wait with no buffer; take one only to read what has come. */
  while (loom_read(c, NULL, 0) == 0) {
    char *buf = malloc(BUF_SIZE);
    if (buf == NULL)
      break;
    ssize_t n;
    bool ok;
    do { /* a full buffer: there may be more */
      n = loom_read(c, buf, BUF_SIZE);
      ok = n > 0 && loom_write(c, buf, (size_t)n) == n;
    } while (ok && n == BUF_SIZE);
    free(buf);
    if (!ok)
      break;
  }
  loom_close(c);
}

static void accept_loop(void *arg) {
  (void)arg;
  loom_listener *l;
  int err = loom_listen(&l, "tcp", addr);
  if (err != 0) {
    fprintf(stderr, "loom_echo: listen %s: %s\n", addr, loom_strerror(err));
    exit(1);
  }
  for (;;) {
    loom_conn *c;
    err = loom_accept(l, &c);
    if (err != 0) {
      fprintf(stderr, "loom_echo: accept: %s\n", loom_strerror(err));
      exit(1);
    }
    if (loom_go(serve, c) != 0)
      loom_close(c);
  }
}

int main(int argc, char **argv) {
  loom_config cfg;
  loom_config_init(&cfg);
  for (int i = 1; i + 1 < argc; i += 2) {
    if (strcmp(argv[i], "--addr") == 0)
      addr = argv[i + 1];
    else if (strcmp(argv[i], "--procs") == 0)
      cfg.procs = atoi(argv[i + 1]);
    else
      break;
  }
  if (argc % 2 == 0 || cfg.procs < 0) {
    fprintf(stderr, "usage: loom_echo [--addr HOST:PORT] [--procs N]\n");
    return 2;
  }
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
  int err = loom_run(accept_loop, NULL, &cfg);
  if (err != 0) {
    fprintf(stderr, "loom_echo: loom_run: %s\n", loom_strerror(err));
    return 1;
  }
  return 0;
}
