/*
 * zmem — what a compressing session costs in memory: a loom engine
 * server's resident set per session, with a compressing loom client in
 * a child process as the peer (both ends configured alike).
 *
 *   zmem [--sessions N] [--level L] [--window-bits W] [--mem-level M]
 *        [--peer-window-bits W] [--peer-mem-level M] [--size BYTES]
 *        [--rounds R] [--procs P]
 *
 * The server, on 127.0.0.1 (port 0), measures its own VmRSS:
 *
 *   base       listening, before the client starts
 *   connected  N sessions open, not a byte exchanged (settled 0.5 s)
 *   one        each session has echoed one 64-byte package, then idle
 *   active     the most seen during R rounds in which every session
 *              echoes one package of BYTES of text-like data (a round:
 *              a write to each session, then every echo back)
 *   after      idle after the rounds: everything a session touched
 *
 * and prints, per phase, (VmRSS - base) / N in KiB: what one session
 * costs, socket buffers excluded (they are the kernel's).  --level 0 is
 * the engine without compression, the figure to subtract.  The RESULT
 * line also gives the active rounds' wire bytes over payload bytes
 * (server to client), i.e. the compression ratio the memory buys.
 *
 * --window-bits and --mem-level are the server's compress_window_bits
 * and compress_mem_level (0: the default), --peer-* the client's
 * (default: the server's).  The child is this program again (--client
 * ADDR plus the options): a loom_client keeping N sessions that echo
 * every package.
 * It is killed by its PID at the end.  Defaults: 1000 sessions, level
 * -1 (zlib's default, 6), 16 KiB packages, 8 rounds, 2 procs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../bench.h"
#include "loom.h"

#define SEC INT64_C(1000000000)
#define SMALL 64

static struct {
  long sessions, size, rounds;
  int level, procs, wbits, mlevel, peer_wbits, peer_mlevel;
  const char *client_of; /* --client ADDR: run as the peer */
  char **argv;
  loom_codec codec;
  uint8_t *payload; /* rounds x size bytes of text-like data */
  loom_session **ss;
  atomic_long nss;
  atomic_long echoes;
  atomic_long bad;
} app = {.sessions = 1000,
         .size = 16384,
         .rounds = 8,
         .level = -1,
         .procs = 2,
         .peer_wbits = -1,
         .peer_mlevel = -1};

/* ---- the peer ------------------------------------------------------------ */

static void echo_message(loom_session *s, const loom_pkg *pkg) {
  if (loom_session_write(s, pkg->data, pkg->len, -1) != 0)
    atomic_fetch_add(&app.bad, 1);
}

static const loom_session_listener echo_listener = {.on_message = echo_message};

static void session_opts(loom_session_opts *so,
                         const loom_session_listener *l) {
  memset(so, 0, sizeof *so);
  so->listener = l;
  so->codec = &app.codec;
  so->compress = app.level;
  so->compress_window_bits = app.wbits;
  so->compress_mem_level = app.mlevel;
  so->max_pkg_len = (size_t)app.size + SMALL;
}

static void client_main(void *arg) {
  (void)arg;
  loom_client_opts o;
  memset(&o, 0, sizeof o);
  o.network = "tcp";
  o.addr = app.client_of;
  o.conns = (int)app.sessions;
  o.reconnect_interval = -1;
  session_opts(&o.session, &echo_listener);
  loom_client *cl;
  int rc = loom_client_start(&cl, &o);
  if (rc < 0)
    bench_die("loom_client_start", rc);
  for (;;) /* until killed */
    loom_sleep(SEC);
}

/* ---- the server ---------------------------------------------------------- */

static int on_open(loom_session *s) {
  long i = atomic_fetch_add(&app.nss, 1);
  if (i < app.sessions)
    app.ss[i] = loom_session_ref(s);
  return 0;
}

static void on_message(loom_session *s, const loom_pkg *pkg) {
  (void)s;
  /* Every package is an echo of one the server wrote: of SMALL bytes,
   * or one round's payload, which starts with the round's bytes. */
  bool ok = pkg->len == SMALL || pkg->len == (size_t)app.size;
  if (ok && pkg->len == (size_t)app.size) {
    const uint8_t *want = NULL;
    for (long r = 0; r < app.rounds && !want; r++)
      if (memcmp(pkg->data, app.payload + r * app.size, 16) == 0)
        want = app.payload + r * app.size;
    ok = want && memcmp(pkg->data, want, pkg->len) == 0;
  }
  if (!ok)
    atomic_fetch_add(&app.bad, 1);
  atomic_fetch_add(&app.echoes, 1);
}

static void on_error(loom_session *s, int err) {
  fprintf(stderr, "zmem: %s: %s\n", loom_session_name(s), loom_strerror(err));
}

static const loom_session_listener listener = {
    .on_open = on_open, .on_message = on_message, .on_error = on_error};

/* Text-like bytes: words of a small vocabulary in a random order, so
 * that deflate finds matches, and numbers now and then, which it mostly
 * does not (about 3:1 at level 6). */
static void make_payload(void) {
  static const char *const words[] = {
      "session", "engine", "window", "stream", "deflate", "inflate",
      "memory",  "reader", "writer", "queue",  "package", "codec",
      "socket",  "loom",   "zlib",   "bytes",  "idle",    "active",
      "level",   "bits",   "the",    "a",      "of",      "and"};
  size_t n = (size_t)(app.rounds * app.size);
  app.payload = malloc(n);
  if (!app.payload)
    bench_die("malloc", -ENOMEM);
  uint64_t x = 0x9e3779b97f4a7c15u;
  for (size_t i = 0; i < n;) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    char num[16];
    const char *w = words[x % (sizeof words / sizeof words[0])];
    if ((x >> 40) % 4 == 0) { /* now and then a number: less to match */
      snprintf(num, sizeof num, "%u", (unsigned)(x >> 44) % 100000);
      w = num;
    }
    for (; *w && i < n; w++)
      app.payload[i++] = (uint8_t)*w;
    if (i < n)
      app.payload[i++] = (x >> 32) % 16 == 0 ? '\n' : ' ';
  }
  /* A round's first 16 bytes tell it apart (on_message's check). */
  for (long r = 0; r < app.rounds; r++) {
    char tag[32];
    snprintf(tag, sizeof tag, "round %09ld ", r % 1000000000);
    memcpy(app.payload + r * app.size, tag, 16);
  }
}

static void wait_echoes(long want, const char *what) {
  int64_t end = loom_now() + 60 * SEC;
  while (atomic_load(&app.echoes) < want) {
    if (loom_now() > end) {
      fprintf(stderr, "zmem: %s: %ld of %ld echoes after 60 s\n", what,
              atomic_load(&app.echoes), want);
      exit(1);
    }
    loom_sleep(SEC / 1000);
  }
}

static double per_session(long rss, long base) {
  return (double)(rss - base) / (double)app.sessions;
}

static void server_main(void *arg) {
  (void)arg;
  loom_server_opts o;
  memset(&o, 0, sizeof o);
  o.network = "tcp";
  o.addr = "127.0.0.1:0";
  o.backlog = 4096;
  session_opts(&o.session, &listener);
  loom_server *srv;
  int rc = loom_server_start(&srv, &o);
  if (rc < 0)
    bench_die("loom_server_start", rc);
  char addr[64];
  loom_server_addr(srv, addr, sizeof addr);
  loom_sleep(SEC / 2);
  long base = bench_rss_kib();

  /* The peer: this program again. */
  char n[24], lv[24], sz[24], wb[24], ml[24];
  snprintf(n, sizeof n, "%ld", app.sessions);
  snprintf(lv, sizeof lv, "%d", app.level);
  snprintf(sz, sizeof sz, "%ld", app.size);
  snprintf(wb, sizeof wb, "%d",
           app.peer_wbits < 0 ? app.wbits : app.peer_wbits);
  snprintf(ml, sizeof ml, "%d",
           app.peer_mlevel < 0 ? app.mlevel : app.peer_mlevel);
  char *cargv[] = {
      app.argv[0], "--client", addr, "--sessions",    n,  "--level",
      lv,          "--size",   sz,   "--window-bits", wb, "--mem-level",
      ml,          NULL};
  pid_t child;
  loom_block_enter();
  rc = posix_spawn(&child, "/proc/self/exe", NULL, NULL, cargv, environ);
  loom_block_exit();
  if (rc != 0)
    bench_die("posix_spawn", -rc);

  int64_t end = loom_now() + 60 * SEC;
  while (atomic_load(&app.nss) < app.sessions) {
    if (loom_now() > end) {
      fprintf(stderr, "zmem: %ld of %ld sessions after 60 s\n",
              atomic_load(&app.nss), app.sessions);
      kill(child, SIGKILL);
      exit(1);
    }
    loom_sleep(SEC / 100);
  }
  loom_sleep(SEC / 2);
  long connected = bench_rss_kib();

  uint8_t small[SMALL];
  memset(small, 'x', sizeof small);
  for (long i = 0; i < app.sessions; i++)
    if ((rc = loom_session_write(app.ss[i], small, sizeof small, -1)) < 0)
      bench_die("loom_session_write", rc);
  wait_echoes(app.sessions, "one");
  loom_sleep(SEC / 2);
  long one = bench_rss_kib();

  loom_metrics m0, m1;
  loom_server_metrics(srv, &m0);
  long peak = one;
  int64_t t0 = loom_now();
  for (long r = 0; r < app.rounds; r++) {
    for (long i = 0; i < app.sessions; i++)
      if ((rc = loom_session_write(app.ss[i], app.payload + r * app.size,
                                   (size_t)app.size, -1)) < 0)
        bench_die("loom_session_write", rc);
    wait_echoes(app.sessions * (r + 2), "round");
    long now = bench_rss_kib();
    if (now > peak)
      peak = now;
  }
  int64_t t1 = loom_now();
  loom_server_metrics(srv, &m1);
  loom_sleep(SEC / 2);
  long after = bench_rss_kib();

  double payload = (double)app.sessions * (double)app.rounds * (double)app.size;
  double ratio = (double)(m1.bytes_out - m0.bytes_out) / payload;
  printf("INFO base %ld KiB; connected %ld, one %ld, active peak %ld, after "
         "%ld KiB; rounds %.2f s\n",
         base, connected, one, peak, after, (double)(t1 - t0) / SEC);
  printf("RESULT sessions=%ld level=%d wbits=%d mlevel=%d peer_wbits=%d "
         "peer_mlevel=%d size=%ld rounds=%ld "
         "connected_kib=%.2f one_kib=%.2f active_kib=%.2f after_kib=%.2f "
         "wire_ratio=%.3f bad=%ld\n",
         app.sessions, app.level, app.wbits, app.mlevel,
         app.peer_wbits < 0 ? app.wbits : app.peer_wbits,
         app.peer_mlevel < 0 ? app.mlevel : app.peer_mlevel, app.size,
         app.rounds, per_session(connected, base), per_session(one, base),
         per_session(peak, base), per_session(after, base), ratio,
         atomic_load(&app.bad));
  fflush(stdout);

  kill(child, SIGKILL);
  loom_block_enter();
  waitpid(child, NULL, 0);
  loom_block_exit();
  for (long i = 0; i < app.sessions; i++)
    loom_session_unref(app.ss[i]);
  loom_server_close(srv, loom_now() + 2 * SEC);
  if (atomic_load(&app.bad))
    exit(1);
}

/* ---- arguments ----------------------------------------------------------- */

static long number(const char *opt, const char *v, long lo, long hi) {
  char *end;
  long x = v ? strtol(v, &end, 10) : 0;
  if (!v || *v == '\0' || *end != '\0' || x < lo || x > hi) {
    fprintf(stderr, "zmem: %s needs a number in %ld..%ld\n", opt, lo, hi);
    exit(2);
  }
  return x;
}

int main(int argc, char **argv) {
  app.argv = argv;
  for (int i = 1; i < argc; i += 2) { /* an option and its value */
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!strcmp(a, "--sessions"))
      app.sessions = number(a, v, 1, 100000);
    else if (!strcmp(a, "--level"))
      app.level = (int)number(a, v, -1, 9);
    else if (!strcmp(a, "--window-bits"))
      app.wbits = (int)number(a, v, 0, 15);
    else if (!strcmp(a, "--mem-level"))
      app.mlevel = (int)number(a, v, 0, 9);
    else if (!strcmp(a, "--peer-window-bits"))
      app.peer_wbits = (int)number(a, v, 0, 15);
    else if (!strcmp(a, "--peer-mem-level"))
      app.peer_mlevel = (int)number(a, v, 0, 9);
    else if (!strcmp(a, "--size"))
      app.size = number(a, v, SMALL + 1, 1 << 24);
    else if (!strcmp(a, "--rounds"))
      app.rounds = number(a, v, 1, 1000);
    else if (!strcmp(a, "--procs"))
      app.procs = (int)number(a, v, 1, 256);
    else if (!strcmp(a, "--client") && v)
      app.client_of = v;
    else {
      fprintf(stderr,
              "usage: zmem [--sessions N] [--level L] [--window-bits W] "
              "[--mem-level M]\n"
              "            [--peer-window-bits W] [--peer-mem-level M] "
              "[--size BYTES]\n"
              "            [--rounds R] [--procs P]\n");
      return 2;
    }
  }
  /* Each end holds a socket per session. */
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
  if ((app.wbits > 0 && app.wbits < 9) ||
      (app.peer_wbits > 0 && app.peer_wbits < 9)) {
    fprintf(stderr, "zmem: window bits: 0 or 9..15\n");
    return 2;
  }
  int rc = loom_codec_lenpfx(&app.codec, NULL);
  if (rc < 0)
    bench_die("loom_codec_lenpfx", rc);
  if (app.client_of) {
    bench_run(client_main, NULL, app.procs);
    return 0;
  }
  app.ss = calloc((size_t)app.sessions, sizeof *app.ss);
  if (!app.ss)
    bench_die("calloc", -ENOMEM);
  make_payload();
  bench_run(server_main, NULL, app.procs);
  return 0;
}
