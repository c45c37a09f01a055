/*
 * cli.h — what the engine examples share around their real work: number
 * options, and stopping at SIGINT/SIGTERM (or after a duration) through a
 * signalfd that a coroutine waits on.
 */
#ifndef LOOM_EXAMPLES_CLI_H
#define LOOM_EXAMPLES_CLI_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

/* "--name VALUE" or "--name=VALUE" at argv[*i]: the value, advancing *i
 * past it; NULL when argv[*i] is another option.  *missing is set when
 * the option is there but its value is not. */
const char *cli_option(int argc, char **argv, int *i, const char *name,
                       bool *missing);

/* The end of an option loop: argv's `arg` is unknown, or (missing) an
 * option without its value.  A message, usage(stderr) if given; returns
 * exit status 2. */
int cli_bad_arg(const char *prog, const char *arg, bool missing,
                void (*usage)(FILE *f));

/* The integer value of option `opt` ("--procs"), lo..hi; otherwise a
 * message and exit status 2. */
long cli_number(const char *prog, const char *opt, const char *v, long lo,
                long hi);

/* The engine examples' compression options: --compress LEVEL (-1..9),
 * --compress-window BITS (9..15), --compress-mem LEVEL (1..9); 0 leaves
 * the engine's default (loom/engine.h). */
typedef struct cli_zopts {
  int level, window, mem;
} cli_zopts;

/* If argv[*i] is one of those options, store its value in *z and return
 * true (as cli_option: *i advanced, *missing set when the value is not
 * there); else false.  A bad value: a message and exit status 2. */
bool cli_zoption(const char *prog, int argc, char **argv, int *i, bool *missing,
                 cli_zopts *z);

struct echo_url;
/* Parse the URL of option `opt` into urls[*n] and count it, at most max;
 * otherwise a message and exit status 2. */
void cli_url(const char *prog, const char *opt, const char *v,
             struct echo_url *urls, int *n, int max);

/* Block SIGINT and SIGTERM in the calling thread — before loom_run, so
 * every runtime thread inherits the mask — and return a non-blocking
 * signalfd for them, or -1 with a message. */
int cli_stop_signals(const char *prog);

/* On a coroutine: wait until a signal arrives on `sigfd` or `duration`
 * ns have passed (0: no limit); says which. */
void cli_wait_for_stop(const char *prog, int sigfd, int64_t duration);

typedef struct loom_server loom_server;
typedef struct loom_server_opts loom_server_opts;

/* A Unix socket file (network "unix" or "unixgram", a path) that a
 * server killed before it could remove it left behind: nobody listens
 * on it, so binding would fail with "address in use".  Remove it — but
 * only a socket, and only when connecting to it is refused.  cli_serve
 * does this first. */
void cli_remove_stale_socket(const char *prog, const char *network,
                             const char *path);

/* On a coroutine: loom_server_start(srv, o) and print "PROG: listening
 * on URL" with the address bound (or a message).  0 or the error. */
int cli_serve(const char *prog, loom_server **srv, const loom_server_opts *o);

/* loom_run(fn, arg) with `procs` Ps (0: the default); 0, or 1 with a
 * message. */
int cli_run(const char *prog, void (*fn)(void *), void *arg, int procs);

#endif
