/* cli.c — see cli.h. */
#define _GNU_SOURCE /* signalfd */

#include "cli.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "echo_url.h"
#include "loom.h"

const char *cli_option(int argc, char **argv, int *i, const char *name,
                       bool *missing) {
  size_t n = strlen(name);
  const char *a = argv[*i];
  if (strncmp(a, name, n) != 0)
    return NULL;
  if (a[n] == '=')
    return a + n + 1;
  if (a[n] != '\0')
    return NULL;
  if (*i + 1 >= argc) {
    *missing = true;
    return NULL;
  }
  return argv[++*i];
}

int cli_bad_arg(const char *prog, const char *arg, bool missing,
                void (*usage)(FILE *f)) {
  if (missing)
    fprintf(stderr, "%s: %s needs a value\n", prog, arg);
  else
    fprintf(stderr, "%s: unknown argument: %s\n", prog, arg);
  if (usage != NULL)
    usage(stderr);
  return 2;
}

long cli_number(const char *prog, const char *opt, const char *v, long lo,
                long hi) {
  char *end;
  errno = 0;
  long n = strtol(v, &end, 10);
  if (errno != 0 || end == v || *end != '\0' || n < lo || n > hi) {
    fprintf(stderr, "%s: %s \"%s\": want %ld to %ld\n", prog, opt, v, lo, hi);
    exit(2);
  }
  return n;
}

bool cli_zoption(const char *prog, int argc, char **argv, int *i, bool *missing,
                 cli_zopts *z) {
  const char *v;
  if ((v = cli_option(argc, argv, i, "--compress", missing)))
    z->level = (int)cli_number(prog, "--compress", v, -1, 9);
  else if ((v = cli_option(argc, argv, i, "--compress-window", missing)))
    z->window = (int)cli_number(prog, "--compress-window", v, 9, 15);
  else if ((v = cli_option(argc, argv, i, "--compress-mem", missing)))
    z->mem = (int)cli_number(prog, "--compress-mem", v, 1, 9);
  return v != NULL;
}

void cli_url(const char *prog, const char *opt, const char *v, echo_url *urls,
             int *n, int max) {
  char err[300];
  if (*n == max) {
    fprintf(stderr, "%s: %s %s: more than %d\n", prog, opt, v, max);
    exit(2);
  }
  if (echo_url_parse(v, &urls[*n], err, sizeof err) != 0) {
    fprintf(stderr, "%s: %s %s: %s\n", prog, opt, v, err);
    exit(2);
  }
  (*n)++;
}

int cli_stop_signals(const char *prog) {
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGINT);
  sigaddset(&stop, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop, NULL);
  int fd = signalfd(-1, &stop, SFD_NONBLOCK | SFD_CLOEXEC);
  if (fd < 0)
    fprintf(stderr, "%s: signalfd: %s\n", prog, strerror(errno));
  return fd;
}

void cli_wait_for_stop(const char *prog, int sigfd, int64_t duration) {
  int64_t deadline = duration > 0 ? loom_now() + duration : 0;
  for (;;) {
    int rc = loom_fd_wait(sigfd, LOOM_FD_READ, deadline);
    if (rc == -ETIMEDOUT) {
      printf("%s: %.3g s elapsed, stopping\n", prog, (double)duration / 1e9);
      return;
    }
    if (rc != 0) {
      fprintf(stderr, "%s: waiting for signals: %s; stopping\n", prog,
              loom_strerror(rc));
      return;
    }
    struct signalfd_siginfo si;
    if (read(sigfd, &si, sizeof si) == (ssize_t)sizeof si) {
      printf("%s: %s, stopping\n", prog, strsignal((int)si.ssi_signo));
      return;
    }
    /* EAGAIN: readiness is a hint; wait again. */
  }
}

int cli_run(const char *prog, void (*fn)(void *), void *arg, int procs) {
  loom_config cfg;
  loom_config_init(&cfg);
  if (procs > 0)
    cfg.procs = procs;
  int rc = loom_run(fn, arg, &cfg);
  if (rc < 0) {
    fprintf(stderr, "%s: %s\n", prog, loom_strerror(rc));
    return 1;
  }
  return 0;
}

void cli_remove_stale_socket(const char *prog, const char *network,
                             const char *path) {
  struct stat st;
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  size_t n = strlen(path);
  bool dgram = !strcmp(network, "unixgram");
  if ((!dgram && strcmp(network, "unix") != 0) || path[0] != '/' ||
      n >= sizeof sa.sun_path || lstat(path, &st) != 0 || !S_ISSOCK(st.st_mode))
    return;
  int fd = socket(
      AF_UNIX,
      (dgram ? SOCK_DGRAM : SOCK_STREAM) | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return;
  memcpy(sa.sun_path, path, n + 1);
  if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0 &&
      errno == ECONNREFUSED && unlink(path) == 0)
    printf("%s: removed stale socket file %s\n", prog, path);
  close(fd);
}

int cli_serve(const char *prog, loom_server **srv, const loom_server_opts *o) {
  cli_remove_stale_socket(prog, o->network, o->addr);
  int rc = loom_server_start(srv, o);
  if (rc < 0) {
    fprintf(stderr, "%s: cannot listen on %s://%s: %s\n", prog, o->network,
            o->addr, loom_strerror(rc));
    return rc;
  }
  char addr[200], shown[300];
  loom_server_addr(*srv, addr, sizeof addr);
  echo_url_format(shown, sizeof shown, o->network, addr);
  printf("%s: listening on %s\n", prog, shown);
  return 0;
}
