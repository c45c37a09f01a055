/*
 * echo_client — load and check an echo server: every byte must come back.
 *
 *   echo_client [--connect URL] [--count N] [--size BYTES] [--conns C]
 *               [--timeout SECONDS] [--retries R] [--procs N]
 *
 * C coroutines each open their own connection (or datagram socket) to URL
 * and send N messages of BYTES bytes, one at a time: send a message, read
 * its echo back in full, compare it byte for byte with what was sent, and
 * time the round trip.  A stream connection then shuts down its writing
 * side and expects the server to end the stream too, with nothing extra.
 * At the end: throughput, and the round-trip latency's median, 99th
 * percentile and maximum over all messages.
 *
 * Every message has a different content (its connection and sequence
 * number in the first 8 bytes, a pattern derived from both after), so an
 * echo of the wrong message, a shifted or a stale one, is caught.
 *
 * Datagrams (udp://, unixgram://) may be lost: a message whose echo does
 * not come back within --timeout (default 0.25 s for datagrams) is sent
 * again, up to --retries times (default 5), each time waiting twice as
 * long, up to 8 times --timeout, give or take a random quarter; a late
 * echo of an earlier message is recognised by its sequence number and
 * skipped.  A unixgram
 * client binds an abstract address, so the server can answer it.
 *
 * A stream message larger than 64 KiB is written by a helper coroutine
 * while this one reads the echo back: writing all of it before reading
 * would fill both directions' socket buffers and stop both ends (the
 * server cannot write its echo, so it stops reading).
 *
 * Exit status: 0 when every message came back intact, 1 on any mismatch
 * or error, 2 for a bad command line.
 */
#define _GNU_SOURCE

#include <errno.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <loom.h>
#include <loom/net.h>

#include "cli.h"
#include "echo_url.h"

#define PROG "echo_client"

#define US (INT64_C(1000))
#define MS (INT64_C(1000000))
#define SEC (1000 * MS)
#define HEADER 8                 /* conn and seq, when a message has room */
#define INLINE_WRITE (64 * 1024) /* larger stream messages: helper writer */
#define MAX_DGRAM 65507          /* the largest UDP payload over IPv4 */
#define MAX_STREAM_MSG (64 * 1024 * 1024)
#define MAX_SAMPLES (UINT64_C(50000000))

struct client {
  echo_url url;
  unsigned long count;
  size_t size;
  int conns;
  int64_t timeout; /* per reply (stream) or per try (datagram) */
  int retries;

  int64_t *lat;    /* lat[conn * count + seq]: round trip, ns */
  atomic_int done; /* workers finished */
  atomic_int failed;
  atomic_ulong retried, stale;
};

struct worker {
  struct client *cl;
  int idx;
  int64_t *lat; /* cl->lat + idx * count */
};

static void fail(struct client *cl, int idx, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void fail(struct client *cl, int idx, const char *fmt, ...) {
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  /* Only the first few: a dead server fails every connection the same. */
  if (atomic_fetch_add(&cl->failed, 1) < 10)
    fprintf(stderr, "echo_client: conn %d: %s\n", idx, msg);
}

/* The content of message `seq` on connection `conn`. */
static void fill(uint8_t *buf, size_t size, uint32_t conn, uint32_t seq) {
  uint32_t x = conn * 2654435761u ^ seq * 40503u;
  for (size_t j = 0; j < size; j++) {
    x = x * 1103515245u + 12345u;
    buf[j] = (uint8_t)(x >> 16);
  }
  if (size >= HEADER) {
    memcpy(buf, &conn, 4);
    memcpy(buf + 4, &seq, 4);
  }
}

/* Compare an echo with what was sent; describe the first difference. */
static bool same(struct client *cl, int idx, unsigned long seq,
                 const uint8_t *want, const uint8_t *got, size_t n) {
  if (memcmp(want, got, n) == 0)
    return true;
  size_t j = 0;
  while (want[j] == got[j])
    j++;
  fail(cl, idx, "message %lu: byte %zu of %zu differs: sent 0x%02x, got 0x%02x",
       seq, j, n, want[j], got[j]);
  return false;
}

/* ---- stream ----------------------------------------------------------- */

struct writer {
  loom_conn *c;
  const uint8_t *buf;
  size_t len;
  ssize_t rc;
  atomic_bool done;
};

static void write_message(void *arg) {
  struct writer *w = arg;
  w->rc = loom_write(w->c, w->buf, w->len);
  atomic_store(&w->done, true);
}

/* Read exactly `len` bytes; 0, or a negative loom error, or 1 for a
 * stream that ended first (*got says how much came). */
static int read_full(loom_conn *c, uint8_t *buf, size_t len, size_t *got) {
  *got = 0;
  while (*got < len) {
    ssize_t n = loom_read(c, buf + *got, len - *got);
    if (n < 0)
      return (int)n;
    if (n == 0)
      return 1;
    *got += (size_t)n;
  }
  return 0;
}

static void run_stream(struct worker *wk, uint8_t *out, uint8_t *in) {
  struct client *cl = wk->cl;
  loom_conn *c;
  loom_dial_opts dopts = {.deadline = loom_now() + cl->timeout};
  int rc = loom_dial_with(&c, cl->url.network, cl->url.addr, &dopts);
  if (rc != 0) {
    fail(cl, wk->idx, "connect to %s://%s: %s", cl->url.network, cl->url.addr,
         loom_strerror(rc));
    return;
  }
  for (unsigned long seq = 0; seq < cl->count; seq++) {
    fill(out, cl->size, (uint32_t)wk->idx, (uint32_t)seq);
    int64_t t0 = loom_now();
    loom_set_deadline(c, t0 + cl->timeout, t0 + cl->timeout);
    struct writer w = {.c = c, .buf = out, .len = cl->size};
    bool helper = cl->size > INLINE_WRITE;
    if (helper) {
      rc = loom_go(write_message, &w);
      if (rc != 0) {
        fail(cl, wk->idx, "loom_go: %s", loom_strerror(rc));
        break;
      }
    } else {
      w.rc = loom_write(c, out, cl->size);
    }
    size_t got;
    rc = read_full(c, in, cl->size, &got);
    while (helper && !atomic_load(&w.done))
      loom_sleep(50 * US); /* it ends soon: its deadline has passed too */
    if (w.rc < 0) {
      fail(cl, wk->idx, "message %lu: write: %s", seq,
           loom_strerror((int)w.rc));
      break;
    }
    if (rc != 0) {
      if (rc == 1)
        fail(cl, wk->idx,
             "message %lu: the server ended the stream after %zu of %zu "
             "bytes",
             seq, got, cl->size);
      else
        fail(cl, wk->idx, "message %lu: read (%zu of %zu bytes came): %s", seq,
             got, cl->size, loom_strerror(rc));
      break;
    }
    wk->lat[seq] = loom_now() - t0;
    if (!same(cl, wk->idx, seq, out, in, cl->size))
      break;
    if (seq + 1 == cl->count) {
      /* Done: end our side; the server must end its side with nothing
       * more to say. */
      rc = loom_shutdown(c, SHUT_WR);
      ssize_t n = rc != 0 ? rc : loom_read(c, in, 1);
      if (n > 0)
        fail(cl, wk->idx, "the server sent bytes nobody asked for");
      else if (n < 0)
        fail(cl, wk->idx, "waiting for the end of the stream: %s",
             loom_strerror((int)n));
    }
  }
  loom_close(c);
}

/* ---- datagrams -------------------------------------------------------- */

static void run_packet(struct worker *wk, uint8_t *out, uint8_t *in) {
  struct client *cl = wk->cl;
  bool gram = cl->url.local; /* unixgram: bind, then write_to */
  struct sockaddr_storage to;
  socklen_t tolen = sizeof to;
  loom_pconn *pc;
  int rc;
  uint64_t rnd = (uint64_t)loom_now() ^ ((uint64_t)wk->idx << 32);
  if (gram) {
    char self[96];
    snprintf(self, sizeof self, "@loom-echo-client-%ld-%d", (long)getpid(),
             wk->idx);
    rc = loom_resolve_addr(cl->url.network, cl->url.addr, &to, &tolen);
    if (rc == 0)
      rc = loom_listen_packet(&pc, cl->url.network, self);
  } else {
    rc = loom_dial_packet(&pc, cl->url.network, cl->url.addr);
  }
  if (rc != 0) {
    fail(cl, wk->idx, "open a socket to %s://%s: %s", cl->url.network,
         cl->url.addr, loom_strerror(rc));
    return;
  }
  for (unsigned long seq = 0; seq < cl->count && rc == 0; seq++) {
    fill(out, cl->size, (uint32_t)wk->idx, (uint32_t)seq);
    int64_t t0 = loom_now();
    bool echoed = false;
    for (int try = 0; try <= cl->retries && !echoed && rc == 0; try++) {
      if (try > 0)
        atomic_fetch_add(&cl->retried, 1);
      /* Back off: each try waits twice as long as the one before (at
       * most 8 times --timeout), give or take a random quarter, so that
       * clients that lost datagrams together do not resend together. */
      int64_t wait = cl->timeout << (try < 3 ? try : 3);
      rnd = rnd * 6364136223846793005u + 1442695040888963407u;
      wait +=
          (int64_t)((double)wait * ((double)(rnd >> 11) / 0x1p53 - 0.5) / 2);
      int64_t dl = loom_now() + wait;
      loom_pconn_set_deadline(pc, dl, dl);
      ssize_t n = gram ? loom_pconn_write_to(pc, out, cl->size,
                                             (struct sockaddr *)&to, tolen)
                       : loom_pconn_write(pc, out, cl->size);
      if (n < 0) {
        rc = (int)n;
        fail(cl, wk->idx, "message %lu: send: %s", seq, loom_strerror(rc));
        break;
      }
      for (;;) {
        /* From the server only: a connected UDP socket takes nothing
         * else, and nobody else knows our abstract Unix name. */
        n = loom_pconn_read_from(pc, in, cl->size + 1, NULL, NULL);
        if (n == -ETIMEDOUT)
          break; /* lost, either way: send again */
        if (n < 0) {
          rc = (int)n;
          fail(cl, wk->idx, "message %lu: receive: %s%s", seq,
               loom_strerror(rc),
               rc == -ECONNREFUSED ? " (is the server running?)" : "");
          break;
        }
        uint32_t rseq;
        memcpy(&rseq, in + 4, 4);
        if ((size_t)n == cl->size && rseq < (uint32_t)seq &&
            memcmp(in, out, 4) == 0) {
          atomic_fetch_add(&cl->stale, 1); /* a late echo of a resent one */
          continue;
        }
        if ((size_t)n != cl->size) {
          rc = -EMSGSIZE;
          fail(cl, wk->idx, "message %lu: sent %zu bytes, %zd came back", seq,
               cl->size, n);
        } else if (!same(cl, wk->idx, seq, out, in, cl->size)) {
          rc = -EBADMSG;
        }
        echoed = rc == 0;
        break;
      }
    }
    if (rc == 0 && !echoed) {
      rc = -ETIMEDOUT;
      fail(cl, wk->idx, "message %lu: no echo after %d tries in %.3g s", seq,
           cl->retries + 1, (double)(loom_now() - t0) / 1e9);
    }
    if (rc == 0)
      wk->lat[seq] = loom_now() - t0;
  }
  loom_pconn_close(pc);
}

static void worker_main(void *arg) {
  struct worker *wk = arg;
  struct client *cl = wk->cl;
  /* +1: a datagram read asks for one byte more, to see an oversized one */
  uint8_t *out = malloc(cl->size + 1), *in = malloc(cl->size + 1);
  if (out == NULL || in == NULL)
    fail(cl, wk->idx, "out of memory");
  else if (cl->url.packet)
    run_packet(wk, out, in);
  else
    run_stream(wk, out, in);
  free(out);
  free(in);
  atomic_fetch_add(&cl->done, 1);
}

/* ---- the main coroutine ----------------------------------------------- */

static int cmp_i64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return (x > y) - (x < y);
}

static void print_ns(const char *label, int64_t ns) {
  if (ns < 10 * MS)
    printf("%s %.1f us", label, (double)ns / 1e3);
  else
    printf("%s %.2f ms", label, (double)ns / 1e6);
}

static void client_main(void *arg) {
  struct client *cl = arg;
  struct worker *wks = calloc((size_t)cl->conns, sizeof *wks);
  if (wks == NULL) {
    fprintf(stderr, "echo_client: out of memory\n");
    atomic_fetch_add(&cl->failed, 1);
    return;
  }
  printf("echo_client: %s://%s, %d connection%s x %lu messages x %zu bytes\n",
         cl->url.network, cl->url.addr, cl->conns, cl->conns == 1 ? "" : "s",
         cl->count, cl->size);
  int64_t t0 = loom_now();
  int started = 0;
  for (; started < cl->conns; started++) {
    wks[started] =
        (struct worker){cl, started, cl->lat + (size_t)started * cl->count};
    int rc = loom_go(worker_main, &wks[started]);
    if (rc != 0) {
      fprintf(stderr, "echo_client: loom_go: %s\n", loom_strerror(rc));
      atomic_fetch_add(&cl->failed, 1);
      break;
    }
  }
  while (atomic_load(&cl->done) < started)
    loom_sleep(1 * MS);
  int64_t elapsed = loom_now() - t0;
  free(wks);

  int failed = atomic_load(&cl->failed);
  if (failed > 0) {
    printf("echo_client: FAILED (%d error%s)\n", failed,
           failed == 1 ? "" : "s");
    return;
  }
  size_t n = (size_t)cl->conns * cl->count;
  double secs = (double)elapsed / 1e9;
  double bytes = (double)n * (double)cl->size;
  printf("  %zu messages, %.0f bytes echoed in %.3f s: %.0f msg/s, "
         "%.2f MB/s each way\n",
         n, bytes, secs, (double)n / secs, bytes / secs / 1e6);
  qsort(cl->lat, n, sizeof *cl->lat, cmp_i64);
  print_ns("  round trip: p50", cl->lat[(n - 1) / 2]);
  print_ns(", p99", cl->lat[(size_t)((double)(n - 1) * 0.99)]);
  print_ns(", max", cl->lat[n - 1]);
  printf("\n");
  if (cl->url.packet)
    printf("  datagrams resent: %lu, late echoes skipped: %lu\n",
           atomic_load(&cl->retried), atomic_load(&cl->stale));
  printf("echo_client: OK, every byte came back\n");
}

/* ---- command line ----------------------------------------------------- */

static void usage(FILE *f) {
  fprintf(f,
          "usage: %s [--connect URL] [--count N] [--size BYTES] [--conns C]\n"
          "       [--timeout SECONDS] [--retries R] [--procs N]\n"
          "\n"
          "Sends messages to an echo server and checks every byte of the\n"
          "echoes.  URL: tcp://HOST:PORT, tcp6://[V6ADDR]:PORT,\n"
          "udp://HOST:PORT, unix:///PATH, unix://@ABSTRACT, unixgram:///PATH\n"
          "(also tcp4, udp4, udp6, unixgram://@ABSTRACT).\n"
          "\n"
          "  --connect URL      the server (default tcp://127.0.0.1:7000)\n"
          "  --count N          messages per connection (default 1000)\n"
          "  --size BYTES       bytes per message (default 64; datagrams: "
          "8 to %d)\n"
          "  --conns C          connections at once, a coroutine each "
          "(default 1)\n"
          "  --timeout SECONDS  wait for an echo (default 5; datagrams: 0.25 "
          "for\n"
          "                     the first try, doubling for each retry)\n"
          "  --retries R        datagrams: sends after the first (default 5)\n"
          "  --procs N          processors (default: LOOM_PROCS or the CPUs)\n"
          "\n"
          "Exit status: 0 all echoed intact, 1 mismatch or error, 2 usage.\n",
          PROG, MAX_DGRAM);
}

static int bad_usage(const char *fmt, ...)
    __attribute__((format(printf, 1, 2)));

/* A message about the command line, the usage, and exit status 2. */
static int bad_usage(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "%s: ", PROG);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fprintf(stderr, "\n\n");
  usage(stderr);
  return 2;
}

static bool parse_ulong(const char *v, unsigned long lo, unsigned long hi,
                        unsigned long *out) {
  char *end;
  errno = 0;
  if (v[0] == '-')
    return false;
  unsigned long x = strtoul(v, &end, 10);
  if (errno != 0 || end == v || *end != '\0' || x < lo || x > hi)
    return false;
  *out = x;
  return true;
}

int main(int argc, char **argv) {
  static struct client cl;
  const char *url = "tcp://127.0.0.1:7000";
  unsigned long count = 1000, size = 64, conns = 1, retries = 5, procs = 0;
  double timeout = -1;
  for (int i = 1; i < argc; i++) {
    bool missing = false;
    const char *v;
    if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
      usage(stdout);
      return 0;
    } else if ((v = cli_option(argc, argv, &i, "--connect", &missing))) {
      url = v;
    } else if ((v = cli_option(argc, argv, &i, "--count", &missing))) {
      if (!parse_ulong(v, 1, 100000000, &count))
        return bad_usage("--count \"%s\": want 1 to 100000000", v);
    } else if ((v = cli_option(argc, argv, &i, "--size", &missing))) {
      if (!parse_ulong(v, 1, MAX_STREAM_MSG, &size))
        return bad_usage("--size \"%s\": want 1 to 67108864", v);
    } else if ((v = cli_option(argc, argv, &i, "--conns", &missing))) {
      if (!parse_ulong(v, 1, 100000, &conns))
        return bad_usage("--conns \"%s\": want 1 to 100000", v);
    } else if ((v = cli_option(argc, argv, &i, "--retries", &missing))) {
      if (!parse_ulong(v, 0, 1000, &retries))
        return bad_usage("--retries \"%s\": want 0 to 1000", v);
    } else if ((v = cli_option(argc, argv, &i, "--procs", &missing))) {
      if (!parse_ulong(v, 1, 1024, &procs))
        return bad_usage("--procs \"%s\": want 1 to 1024", v);
    } else if ((v = cli_option(argc, argv, &i, "--timeout", &missing))) {
      char *end;
      timeout = strtod(v, &end);
      if (end == v || *end != '\0' || !(timeout > 0) || timeout > 3600)
        return bad_usage("--timeout \"%s\": want 0 < seconds <= 3600", v);
    } else if (missing) {
      return bad_usage("%s needs a value", argv[i]);
    } else {
      return bad_usage("unknown argument \"%s\"", argv[i]);
    }
  }
  char err[300];
  if (echo_url_parse(url, &cl.url, err, sizeof err) != 0)
    return bad_usage("--connect %s", err);
  if (!cl.url.local && cl.url.port == 0)
    return bad_usage("--connect %s: port 0 is not a server's port", url);
  if (cl.url.packet && (size < HEADER || size > MAX_DGRAM))
    return bad_usage("--size: a datagram message has %d to %d bytes", HEADER,
                     MAX_DGRAM);
  if ((uint64_t)count * conns > MAX_SAMPLES)
    return bad_usage("--count x --conns: at most %llu messages in all",
                     (unsigned long long)MAX_SAMPLES);
  cl.count = count;
  cl.size = size;
  cl.conns = (int)conns;
  cl.retries = (int)retries;
  if (timeout < 0)
    timeout = cl.url.packet ? 0.25 : 5;
  cl.timeout = (int64_t)(timeout * 1e9);
  cl.lat = calloc(count * conns, sizeof *cl.lat);
  if (cl.lat == NULL) {
    fprintf(stderr, "echo_client: out of memory\n");
    return 1;
  }

  setvbuf(stdout, NULL, _IOLBF, 0);
  loom_config cfg;
  loom_config_init(&cfg);
  if (procs > 0)
    cfg.procs = (int)procs;
  int rc = loom_run(client_main, &cl, &cfg);
  free(cl.lat);
  if (rc != 0) {
    fprintf(stderr, "echo_client: loom_run: %s\n", loom_strerror(rc));
    return 1;
  }
  return atomic_load(&cl.failed) > 0 ? 1 : 0;
}
