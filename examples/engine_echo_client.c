/*
 * engine_echo_client — talks to engine_echo through loom's engine client.
 *
 *   engine_echo_client [--connect URL] [--conns N] [--count M]
 *                      [--size BYTES] [--compress LEVEL]
 *                      [--compress-window BITS] [--compress-mem LEVEL]
 *                      [--timeout S]
 *
 * Keeps N sessions to the server (loom_client), sends M frames spread
 * over them (payload sizes cycle up to --size; each payload is a pattern
 * derived from its frame number), and checks that every frame comes back
 * exactly once and unchanged.  Prints the round-trip rate and exits 0, or
 * 1 on a wrong, missing or late reply.  Default: tcp://127.0.0.1:7001,
 * 4 sessions, 10000 frames of up to 1000 bytes.
 *
 * The frame number travels in the first 4 bytes of each payload, so a
 * reply can be checked without remembering what was sent.  Over UDP a
 * lost datagram is a missing reply; the client keeps at most 64 frames in
 * flight there so loopback does not drop them.
 */
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "echo_url.h"
#include "loom.h"

#define PROG "engine_echo_client"

static struct {
  echo_url url;
  int conns, count;
  cli_zopts z;
  size_t size;
  int64_t timeout;
  atomic_int got, bad;
  unsigned char *seen;
  int status;
} app = {.conns = 4, .count = 10000, .size = 1000, .timeout = 10};

static size_t frame_len(uint32_t i) {
  return 4 + (size_t)(i * 7919u) % (app.size - 3);
}

static uint8_t frame_byte(uint32_t i, size_t k) {
  return (uint8_t)(i * 31u + k * 7u);
}

static void on_message(loom_session *s, const loom_pkg *pkg) {
  (void)s;
  uint32_t i = 0;
  bool ok = pkg->len >= 4;
  if (ok) {
    i = (uint32_t)pkg->data[0] << 24 | (uint32_t)pkg->data[1] << 16 |
        (uint32_t)pkg->data[2] << 8 | pkg->data[3];
    ok = i < (uint32_t)app.count && pkg->len == frame_len(i) && !app.seen[i];
  }
  for (size_t k = 4; ok && k < pkg->len; k++)
    ok = pkg->data[k] == frame_byte(i, k);
  if (!ok) {
    if (atomic_fetch_add(&app.bad, 1) == 0)
      fprintf(stderr, "%s: bad reply (%zu bytes)\n", PROG, pkg->len);
    return;
  }
  app.seen[i] = 1; /* one reader coroutine per session: i is ours */
  atomic_fetch_add(&app.got, 1);
}

static void on_error(loom_session *s, int err) {
  fprintf(stderr, "%s: %s: %s\n", PROG, loom_session_name(s),
          loom_strerror(err));
}

static const loom_session_listener listener = {
    .on_message = on_message,
    .on_error = on_error,
};

static void app_main(void *arg) {
  (void)arg;
  loom_codec codec;
  loom_codec_lenpfx(&codec, NULL);
  loom_client_opts o = {
      .network = app.url.network,
      .addr = app.url.addr,
      .conns = app.conns,
      .session = {.listener = &listener,
                  .codec = &codec,
                  .compress = app.url.packet ? 0 : app.z.level,
                  .compress_window_bits = app.z.window,
                  .compress_mem_level = app.z.mem},
  };
  loom_client *cl;
  int rc = loom_client_start(&cl, &o);
  if (rc < 0) {
    fprintf(stderr, "%s: %s\n", PROG, loom_strerror(rc));
    app.status = 1;
    return;
  }
  int64_t t0 = loom_now(), deadline = t0 + app.timeout * INT64_C(1000000000);
  rc = loom_client_wait(cl, app.conns, deadline);
  if (rc < 0) {
    fprintf(stderr, "%s: connecting to %s://%s: %s\n", PROG, app.url.network,
            app.url.addr, loom_strerror(rc));
    app.status = 1;
    loom_client_close(cl, 0);
    return;
  }
  uint8_t *buf = malloc(app.size);
  int sent = 0; /* frames written: only those can come back */
  for (uint32_t i = 0; i < (uint32_t)app.count && rc == 0; i++) {
    size_t n = frame_len(i);
    buf[0] = (uint8_t)(i >> 24);
    buf[1] = (uint8_t)(i >> 16);
    buf[2] = (uint8_t)(i >> 8);
    buf[3] = (uint8_t)i;
    for (size_t k = 4; k < n; k++)
      buf[k] = frame_byte(i, k);
    loom_session *s;
    rc = loom_client_session(cl, &s);
    if (rc == 0) {
      rc = loom_session_write(s, buf, n, app.timeout * INT64_C(1000000000));
      loom_session_unref(s);
      sent += rc == 0;
    }
    while (app.url.packet && rc == 0 && (int)i - atomic_load(&app.got) > 64 &&
           loom_now() < deadline)
      loom_sleep(50000);
  }
  free(buf);
  if (rc < 0)
    fprintf(stderr, "%s: write: %s\n", PROG, loom_strerror(rc));
  while (atomic_load(&app.got) + atomic_load(&app.bad) < sent &&
         loom_now() < deadline)
    loom_sleep(1000000);
  double secs = (double)(loom_now() - t0) / 1e9;
  int got = atomic_load(&app.got), bad = atomic_load(&app.bad);
  loom_metrics m;
  loom_client_metrics(cl, &m);
  loom_client_close(cl, loom_now() + INT64_C(2000000000));
  printf("%s: %d of %d frames back intact over %d sessions in %.3f s "
         "(%.0f/s); %llu bytes out on the wire\n",
         PROG, got, app.count, app.conns, secs, got / secs,
         (unsigned long long)m.bytes_out);
  if (got != app.count || bad != 0 || rc < 0)
    app.status = 1;
}

static void usage(FILE *f) {
  fprintf(f,
          "usage: %s [--connect URL] [--conns N] [--count M] "
          "[--size BYTES] [--compress LEVEL]\n"
          "          [--compress-window BITS] [--compress-mem LEVEL] "
          "[--timeout S]\n",
          PROG);
}

int main(int argc, char **argv) {
  const char *url = "tcp://127.0.0.1:7001";
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v;
    bool missing = false;
    if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
      usage(stdout);
      return 0;
    } else if ((v = cli_option(argc, argv, &i, "--connect", &missing))) {
      url = v;
    } else if ((v = cli_option(argc, argv, &i, "--conns", &missing))) {
      app.conns = (int)cli_number(PROG, "--conns", v, 1, 10000);
    } else if ((v = cli_option(argc, argv, &i, "--count", &missing))) {
      app.count = (int)cli_number(PROG, "--count", v, 1, 100000000);
    } else if ((v = cli_option(argc, argv, &i, "--size", &missing))) {
      app.size = (size_t)cli_number(PROG, "--size", v, 8, 1 << 20);
    } else if (cli_zoption(PROG, argc, argv, &i, &missing, &app.z)) {
    } else if ((v = cli_option(argc, argv, &i, "--timeout", &missing))) {
      app.timeout = cli_number(PROG, "--timeout", v, 1, 3600);
    } else {
      return cli_bad_arg(PROG, a, missing, usage);
    }
  }
  char err[300];
  if (echo_url_parse(url, &app.url, err, sizeof err) != 0) {
    fprintf(stderr, "%s: --connect %s: %s\n", PROG, url, err);
    return 2;
  }
  if (app.url.packet && app.size > 65507) { /* the largest UDP payload */
    fprintf(stderr, "%s: --size: a datagram frame has at most 65507 bytes\n",
            PROG);
    return 2;
  }
  app.seen = calloc((size_t)app.count, 1);
  if (app.seen == NULL)
    return 1;
  int rc = cli_run(PROG, app_main, NULL, 0);
  free(app.seen);
  return rc != 0 ? rc : app.status;
}
