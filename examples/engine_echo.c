/*
 * engine_echo — a length-prefixed echo service on loom's engine.
 *
 *   engine_echo [--listen URL]... [--procs N] [--duration SECONDS]
 *               [--pool QUEUES] [--compress LEVEL] [--compress-window BITS]
 *               [--compress-mem LEVEL] [--max-pkg BYTES] [--metrics]
 *               [--quiet]
 *
 * The protocol, so that a client in any language can talk to it: a frame
 * is a 4-byte big-endian payload length, then the payload; every frame
 * received is sent back unchanged.  Over UDP and unixgram a datagram is
 * one frame.  URLs as echo_server's (tcp://, udp://, unix://, ...; port 0
 * picks a free one, and the bound address is printed).  Default:
 * tcp://127.0.0.1:7001.
 *
 * This is all an engine user writes: a listener whose on_message writes
 * the package back, and a server per URL.  --pool hands messages to a
 * task pool (ordered per session), --compress turns on zlib streams
 * (stream sockets; the client must turn it on too), --compress-window and
 * --compress-mem bound what each session's deflate stream holds (the
 * client need not agree; engine.h, Compression), --metrics prints the
 * engine's metrics in Prometheus' text format when it stops (one set for
 * all the listeners, taken as the stop begins: what a graceful stop
 * still answers is not in it).
 *
 * It stops at SIGINT/SIGTERM (or after --duration) gracefully: the
 * servers stop accepting, every frame already received is answered, and
 * then the process exits 0.
 */

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "echo_url.h"
#include "loom.h"

#define PROG "engine_echo"
#define MAX_URLS 8

static struct {
  echo_url urls[MAX_URLS];
  int nurls;
  int procs, pool_queues;
  cli_zopts z;
  size_t max_pkg;
  int64_t duration;
  bool metrics, quiet;
  int sigfd;
  int status;
  loom_codec codec;
} app = {.sigfd = -1};

static void on_message(loom_session *s, const loom_pkg *pkg) {
  int rc;
  if (pkg->from != NULL)
    rc = loom_session_write_to(s, pkg->data, pkg->len, pkg->from, pkg->fromlen,
                               -1);
  else
    rc = loom_session_write(s, pkg->data, pkg->len, -1);
  if (rc < 0 && rc != LOOM_ECLOSED && !app.quiet)
    fprintf(stderr, "%s: %s: write: %s\n", PROG, loom_session_name(s),
            loom_strerror(rc));
}

static void on_error(loom_session *s, int err) {
  if (!app.quiet)
    fprintf(stderr, "%s: %s: %s\n", PROG, loom_session_name(s),
            loom_strerror(err));
}

static const loom_session_listener listener = {
    .on_message = on_message,
    .on_error = on_error,
};

/* One snapshot for every server: Prometheus' text has each metric once.
 * The servers share the task pool, so its backlog is not summed. */
static void metrics_add(loom_metrics *all, const loom_metrics *m) {
  all->sessions_open += m->sessions_open;
  all->sessions_total += m->sessions_total;
  all->bytes_in += m->bytes_in;
  all->bytes_out += m->bytes_out;
  all->pkgs_in += m->pkgs_in;
  all->pkgs_out += m->pkgs_out;
  all->pkgs_dropped += m->pkgs_dropped;
  all->wq_bytes += m->wq_bytes;
  if (m->wq_max > all->wq_max)
    all->wq_max = m->wq_max;
  all->pool_queued = m->pool_queued;
#define ADD_ERR_(name, help) all->errors.name += m->errors.name;
  LOOM_METRIC_ERRORS(ADD_ERR_)
#undef ADD_ERR_
}

static void app_main(void *arg) {
  (void)arg;
  loom_taskpool *pool = NULL;
  loom_server *srv[MAX_URLS];
  int n = 0;
  if (app.pool_queues > 0) {
    loom_taskpool_opts po = {.queues = app.pool_queues};
    int rc = loom_taskpool_make(&pool, &po);
    if (rc < 0) {
      fprintf(stderr, "%s: task pool: %s\n", PROG, loom_strerror(rc));
      app.status = 1;
      return;
    }
  }
  for (; n < app.nurls; n++) {
    loom_server_opts o = {
        .network = app.urls[n].network,
        .addr = app.urls[n].addr,
        .session = {.listener = &listener,
                    .codec = &app.codec,
                    .max_pkg_len = app.max_pkg,
                    .pool = pool,
                    .compress = app.urls[n].packet ? 0 : app.z.level,
                    .compress_window_bits = app.z.window,
                    .compress_mem_level = app.z.mem},
    };
    if (cli_serve(PROG, &srv[n], &o) < 0) {
      app.status = 1;
      break;
    }
  }
  if (app.status == 0) {
    printf("%s: %d procs; SIGINT or SIGTERM stops it\n", PROG, loom_procs());
    cli_wait_for_stop(PROG, app.sigfd, app.duration);
  }
  loom_metrics all;
  memset(&all, 0, sizeof all);
  for (int i = 0; i < n; i++) {
    loom_metrics m;
    loom_server_metrics(srv[i], &m);
    if (loom_server_close(srv[i], loom_now() + INT64_C(2000000000)) < 0)
      fprintf(stderr, "%s: some sessions did not finish in 2 s\n", PROG);
    printf("%s: %s: %llu sessions, %llu packages in, %llu out\n", PROG,
           app.urls[i].network, (unsigned long long)m.sessions_total,
           (unsigned long long)m.pkgs_in, (unsigned long long)m.pkgs_out);
    metrics_add(&all, &m);
  }
  if (app.metrics && n > 0) {
    char text[8192];
    if (loom_metrics_prometheus(&all, "engine_echo", text, sizeof text) > 0)
      fputs(text, stdout);
  }
  if (pool != NULL)
    loom_taskpool_close(pool);
}

static void usage(FILE *f) {
  fprintf(f,
          "usage: %s [--listen URL]... [--procs N] [--duration SECONDS]\n"
          "          [--pool QUEUES] [--compress LEVEL] "
          "[--compress-window BITS]\n"
          "          [--compress-mem LEVEL] [--max-pkg BYTES] [--metrics] "
          "[--quiet]\n"
          "Echoes 4-byte big-endian length-prefixed frames on each URL\n"
          "(tcp://HOST:PORT, udp://..., unix:///PATH, unixgram:///PATH).\n"
          "Default: --listen tcp://127.0.0.1:7001.\n",
          PROG);
}

int main(int argc, char **argv) {
  app.max_pkg = 1 << 20;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v;
    bool missing = false;
    if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
      usage(stdout);
      return 0;
    } else if (!strcmp(a, "--quiet")) {
      app.quiet = true;
    } else if (!strcmp(a, "--metrics")) {
      app.metrics = true;
    } else if ((v = cli_option(argc, argv, &i, "--listen", &missing))) {
      cli_url(PROG, "--listen", v, app.urls, &app.nurls, MAX_URLS);
    } else if ((v = cli_option(argc, argv, &i, "--procs", &missing))) {
      app.procs = (int)cli_number(PROG, "--procs", v, 1, 1024);
    } else if ((v = cli_option(argc, argv, &i, "--pool", &missing))) {
      app.pool_queues = (int)cli_number(PROG, "--pool", v, 0, 4096);
    } else if (cli_zoption(PROG, argc, argv, &i, &missing, &app.z)) {
    } else if ((v = cli_option(argc, argv, &i, "--max-pkg", &missing))) {
      app.max_pkg = (size_t)cli_number(PROG, "--max-pkg", v, 1, 1L << 30);
    } else if ((v = cli_option(argc, argv, &i, "--duration", &missing))) {
      app.duration =
          cli_number(PROG, "--duration", v, 0, 1000000) * INT64_C(1000000000);
    } else {
      return cli_bad_arg(PROG, a, missing, usage);
    }
  }
  if (app.nurls == 0) {
    char err[300];
    if (echo_url_parse("tcp://127.0.0.1:7001", &app.urls[0], err, sizeof err) !=
        0)
      return 1;
    app.nurls = 1;
  }
  loom_codec_lenpfx(&app.codec, NULL);
  setvbuf(stdout, NULL, _IOLBF, 0);

  app.sigfd = cli_stop_signals(PROG);
  if (app.sigfd < 0)
    return 1;
  int rc = cli_run(PROG, app_main, NULL, app.procs);
  close(app.sigfd);
  return rc != 0 ? rc : app.status;
}
