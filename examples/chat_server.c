/*
 * chat_server — a chat room on loom's engine: every line a member says
 * goes to every other member.
 *
 *   chat_server [--listen URL]... [--procs N] [--duration SECONDS]
 *               [--idle SECONDS] [--max-line BYTES] [--max-queue BYTES]
 *
 * The protocol is lines of text ('\n'; a '\r' before it is dropped), so
 * nc or socat can join as well as chat_client.  A member starts as
 * "guest<ID>" and sends:
 *
 *   /nick NAME   take a name: 1 to 32 of A-Z a-z 0-9 _ - ., unique, not
 *                starting with "guest"; everyone sees "* OLD is now NAME"
 *   /who         the reply "* here (N): NAME NAME ...", in joining order
 *   /quit        the reply "* bye NAME", then the server closes
 *   TEXT         every other member gets "NAME: TEXT", byte for byte
 *
 * Lines the server makes up start with "* " ("* NAME joined", "* NAME
 * left", the replies above, complaints); a member's line starts with its
 * name, which holds no '*' or space, so a client can tell them apart.
 * One room spans every --listen URL (tcp://, unix://, as engine_echo's;
 * port 0 picks a free one and the bound address is printed).  Default:
 * tcp://127.0.0.1:7002.
 *
 * The room is a list of members (a name and a reference to the session)
 * under one mutex.  A broadcast copies the list — taking a session
 * reference per member — unlocks, then writes; so the lock is never held
 * across a write, and a member that leaves meanwhile is still valid
 * memory (its writes fail with LOOM_ECLOSED).
 *
 * Slow members.  A broadcast never waits for anyone: every write has
 * timeout 0.  A member's write queue absorbs a burst of --max-queue
 * bytes (default 256 KiB) beyond its socket buffers; a member whose
 * queue is full when a line comes has fallen that far behind and is cut
 * off on the spot (close_on_full: the write fails with -ENOBUFS, the
 * line is counted as dropped, the session is aborted and its queue
 * freed; the room sees "* NAME left").  Rejected: waiting for room (one
 * stalled reader would stall every speaker, and through them the room)
 * and skipping lines for the slow member (its view of the conversation
 * would have holes it cannot see).
 *
 * Limits.  A line longer than --max-line bytes (default 4096) closes its
 * session at once and says so in the log: the engine refuses it after
 * max-line + 2 bytes without a '\n', so a peer cannot make the server
 * buffer more.  A member that sends nothing for --idle seconds (default
 * 300; 0: never) gets "* bye NAME: idle" and is closed: on_cron runs
 * every idle/4 and compares loom_session_stats' last_read with the clock.
 *
 * It stops at SIGINT/SIGTERM (or after --duration) gracefully: "* server
 * stopping" to everyone, then loom_server_close (what members sent is
 * handled and what they are owed is written), a summary, exit 0.
 */

#include <errno.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "echo_url.h"
#include "loom.h"

#define PROG "chat_server"
#define MAX_URLS 8
#define DEFAULT_URL "tcp://127.0.0.1:7002"
#define NICK_MAX 32

typedef struct member {
  loom_session *s;         /* a reference, dropped as it leaves */
  char nick[NICK_MAX + 1]; /* written by the member's own reader under
                              room.mu; read by that reader without the
                              lock, by every other under it */
} member;

static struct {
  loom_mutex mu; /* protects m, n, cap */
  member **m;    /* in joining order */
  size_t n, cap;
  _Atomic uint64_t said;    /* lines broadcast (relaxed: a statistic) */
  _Atomic uint64_t dropped; /* writes refused by a full queue (relaxed) */
} room;

static struct {
  echo_url urls[MAX_URLS];
  int nurls, procs;
  size_t max_line, max_queue;
  size_t max_out; /* the longest line the server sends: max_line and a
                     name, or a /who list (1 MiB holds 30 000 names) */
  int64_t idle, duration;
  int sigfd, status;
  loom_codec codec;
} app = {.sigfd = -1};

/* ---- the room ------------------------------------------------------------ */

static void log_line(FILE *f, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void log_line(FILE *f, const char *fmt, ...) {
  char line[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  fprintf(f, "%s: %s\n", PROG, line);
}

/* Write one line to `s` without waiting (see "Slow members"). */
static void send_line(loom_session *s, const char *line, size_t len) {
  int rc = loom_session_write(s, line, len, 0);
  if (rc == -ENOBUFS || rc == -EAGAIN) /* EAGAIN: without close_on_full */
    atomic_fetch_add_explicit(&room.dropped, 1, memory_order_relaxed);
  else if (rc < 0 && rc != LOOM_ECLOSED)
    log_line(stderr, "%s: write: %s", loom_session_name(s), loom_strerror(rc));
}

/* Format a line into buf[0..cap); its length (cut to fit). */
static size_t vline(char *buf, size_t cap, const char *fmt, va_list ap)
    __attribute__((format(printf, 3, 0)));
static size_t vline(char *buf, size_t cap, const char *fmt, va_list ap) {
  int n = vsnprintf(buf, cap, fmt, ap);
  return n < 0 ? 0 : (size_t)n < cap ? (size_t)n : cap - 1;
}

/* A notice ("* ...") for one session. */
static void notice(loom_session *s, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void notice(loom_session *s, const char *fmt, ...) {
  char line[256];
  va_list ap;
  va_start(ap, fmt);
  size_t n = vline(line, sizeof line, fmt, ap);
  va_end(ap);
  send_line(s, line, n);
}

/* Send a line to every member but `except` (NULL: to everyone). */
static void broadcast(loom_session *except, const char *line, size_t len) {
  loom_mutex_lock(&room.mu);
  loom_session **to = malloc((room.n + 1) * sizeof *to);
  size_t n = 0;
  for (size_t i = 0; to != NULL && i < room.n; i++)
    if (room.m[i]->s != except)
      to[n++] = loom_session_ref(room.m[i]->s);
  loom_mutex_unlock(&room.mu);
  if (to == NULL) {
    log_line(stderr, "broadcast: out of memory, line lost");
    return;
  }
  for (size_t i = 0; i < n; i++) {
    send_line(to[i], line, len);
    loom_session_unref(to[i]);
  }
  free(to);
}

static void broadcastf(loom_session *except, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void broadcastf(loom_session *except, const char *fmt, ...) {
  char line[256];
  va_list ap;
  va_start(ap, fmt);
  size_t n = vline(line, sizeof line, fmt, ap);
  va_end(ap);
  broadcast(except, line, n);
}

/* room.mu held. */
static member *find_nick(const char *nick, size_t len) {
  for (size_t i = 0; i < room.n; i++)
    if (strlen(room.m[i]->nick) == len && !memcmp(room.m[i]->nick, nick, len))
      return room.m[i];
  return NULL;
}

/* ---- commands ------------------------------------------------------------ */

static bool valid_nick(const char *p, size_t len) {
  static const char ok[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                           "abcdefghijklmnopqrstuvwxyz0123456789_-.";
  if (len == 0 || len > NICK_MAX || (len >= 5 && !memcmp(p, "guest", 5)))
    return false;
  for (size_t i = 0; i < len; i++)
    if (p[i] == '\0' || strchr(ok, p[i]) == NULL)
      return false;
  return true;
}

static void cmd_nick(member *me, const char *p, size_t len) {
  if (!valid_nick(p, len)) {
    notice(me->s, "* a name is 1 to %d of A-Z a-z 0-9 _ - . (not guest...)",
           NICK_MAX);
    return;
  }
  char old[NICK_MAX + 1];
  loom_mutex_lock(&room.mu);
  member *owner = find_nick(p, len);
  bool taken = owner != NULL && owner != me;
  if (owner == NULL) {
    memcpy(old, me->nick, sizeof old);
    memcpy(me->nick, p, len);
    me->nick[len] = '\0';
  }
  loom_mutex_unlock(&room.mu);
  if (owner == me)
    notice(me->s, "* you are %.*s already", (int)len, p);
  else if (taken)
    notice(me->s, "* the name %.*s is taken", (int)len, p);
  else
    broadcastf(NULL, "* %s is now %s", old, me->nick);
}

static void cmd_who(member *me) {
  loom_mutex_lock(&room.mu);
  size_t cap = 32 + room.n * (NICK_MAX + 1);
  char *line = malloc(cap);
  size_t len = 0;
  if (line != NULL) {
    len = (size_t)snprintf(line, cap, "* here (%zu):", room.n);
    for (size_t i = 0; i < room.n; i++)
      len += (size_t)snprintf(line + len, cap - len, " %s", room.m[i]->nick);
  }
  loom_mutex_unlock(&room.mu);
  if (line != NULL)
    send_line(me->s, line, len);
  free(line);
}

/* "NAME: TEXT" to everyone else. */
static void cmd_say(member *me, const char *text, size_t len) {
  size_t nl = strlen(me->nick);
  char *line = malloc(nl + 2 + len);
  if (line == NULL) {
    notice(me->s, "* out of memory, line lost");
    return;
  }
  memcpy(line, me->nick, nl);
  memcpy(line + nl, ": ", 2);
  memcpy(line + nl + 2, text, len);
  broadcast(me->s, line, nl + 2 + len);
  atomic_fetch_add_explicit(&room.said, 1, memory_order_relaxed);
  free(line);
}

static bool is_cmd(const char *p, size_t len, const char *cmd) {
  size_t n = strlen(cmd);
  return len >= n && !memcmp(p, cmd, n) && (len == n || p[n] == ' ');
}

/* ---- the listener -------------------------------------------------------- */

static int on_open(loom_session *s) {
  member *me = calloc(1, sizeof *me);
  if (me == NULL)
    return -ENOMEM;
  snprintf(me->nick, sizeof me->nick, "guest%llu",
           (unsigned long long)loom_session_id(s));
  loom_mutex_lock(&room.mu);
  if (room.n == room.cap) {
    size_t cap = room.cap ? room.cap * 2 : 16;
    member **m = realloc(room.m, cap * sizeof *m);
    if (m == NULL) {
      loom_mutex_unlock(&room.mu);
      free(me);
      return -ENOMEM; /* on_close finds no member */
    }
    room.m = m;
    room.cap = cap;
  }
  me->s = loom_session_ref(s);
  room.m[room.n++] = me;
  loom_mutex_unlock(&room.mu);
  loom_session_set_user(s, me);
  log_line(stdout, "%s joined (%s)", me->nick, loom_session_name(s));
  broadcastf(s, "* %s joined", me->nick);
  return 0;
}

static void on_message(loom_session *s, const loom_pkg *pkg) {
  member *me = loom_session_user(s);
  const char *p = (const char *)pkg->data;
  size_t len = pkg->len;
  while (len > 0 && p[len - 1] == '\r')
    len--; /* the codec took one; a line ending in '\r' cannot be sent */
  if (len == 0)
    return;
  if (p[0] != '/') {
    cmd_say(me, p, len);
  } else if (is_cmd(p, len, "/nick") && len > 6) {
    cmd_nick(me, p + 6, len - 6);
  } else if (is_cmd(p, len, "/who")) {
    cmd_who(me);
  } else if (is_cmd(p, len, "/quit")) {
    notice(s, "* bye %s", me->nick);
    loom_session_close(s); /* the goodbye is queued: it goes out first */
  } else {
    notice(s, "* commands: /nick NAME, /who, /quit");
  }
}

static void on_cron(loom_session *s) {
  member *me = loom_session_user(s);
  loom_session_stats st;
  loom_session_stats_get(s, &st);
  int64_t idle = loom_now() - st.last_read;
  if (idle < app.idle)
    return;
  log_line(stdout, "%s idle for %lld s, closing", me->nick,
           (long long)(idle / 1000000000));
  notice(s, "* bye %s: idle for %lld s", me->nick,
         (long long)(idle / 1000000000));
  loom_session_close(s);
}

static void on_error(loom_session *s, int err) {
  member *me = loom_session_user(s);
  const char *nick = me != NULL ? me->nick : "?";
  const char *name = loom_session_name(s);
  if (err == -EMSGSIZE)
    log_line(stderr, "%s (%s): a line longer than %zu bytes, closing", nick,
             name, app.max_line);
  else if (err == -ENOBUFS)
    log_line(stderr, "%s (%s): %zu bytes behind, cut off", nick, name,
             app.max_queue);
  else
    log_line(stderr, "%s (%s): %s", nick, name, loom_strerror(err));
}

static void on_close(loom_session *s) {
  member *me = loom_session_user(s);
  if (me == NULL)
    return; /* on_open refused it */
  loom_mutex_lock(&room.mu);
  for (size_t i = 0; i < room.n; i++)
    if (room.m[i] == me) {
      memmove(&room.m[i], &room.m[i + 1], (room.n - i - 1) * sizeof *room.m);
      room.n--;
      break;
    }
  loom_mutex_unlock(&room.mu);
  broadcastf(s, "* %s left", me->nick);
  log_line(stdout, "%s left", me->nick);
  loom_session_set_user(s, NULL);
  loom_session_unref(me->s);
  free(me);
}

static const loom_session_listener listener = {
    .on_open = on_open,
    .on_message = on_message,
    .on_cron = on_cron,
    .on_error = on_error,
    .on_close = on_close,
};

/* ---- main ---------------------------------------------------------------- */

static void summary(const char *network, const loom_metrics *m) {
  char errs[512] = "";
  size_t n = 0;
#define ERR_(name, help)                                                       \
  if (m->errors.name && n < sizeof errs)                                       \
    n += (size_t)snprintf(errs + n, sizeof errs - n, ", %llu " #name,          \
                          (unsigned long long)m->errors.name);
  LOOM_METRIC_ERRORS(ERR_)
#undef ERR_
  printf("%s: %s: %llu sessions, %llu lines in, %llu out%s\n", PROG, network,
         (unsigned long long)m->sessions_total, (unsigned long long)m->pkgs_in,
         (unsigned long long)m->pkgs_out, errs);
}

static void app_main(void *arg) {
  (void)arg;
  loom_server *srv[MAX_URLS];
  int n = 0;
  for (; n < app.nurls; n++) {
    loom_server_opts o = {
        .network = app.urls[n].network,
        .addr = app.urls[n].addr,
        .session = {.listener = &listener,
                    .codec = &app.codec,
                    .cron_period = app.idle / 4,
                    .max_pkg_len = app.max_line,
                    /* what it sends is longer: "NAME: " in front, or a
                     * long /who list */
                    .max_write_len = app.max_out,
                    .wq_high = app.max_queue,
                    .close_on_full = true},
    };
    if (cli_serve(PROG, &srv[n], &o) < 0) {
      app.status = 1;
      break;
    }
  }
  if (app.status == 0) {
    printf("%s: %d procs; SIGINT or SIGTERM stops it\n", PROG, loom_procs());
    cli_wait_for_stop(PROG, app.sigfd, app.duration);
    broadcastf(NULL, "* server stopping");
  }
  for (int i = 0; i < n; i++) {
    loom_metrics m;
    loom_server_metrics(srv[i], &m);
    if (loom_server_close(srv[i], loom_now() + INT64_C(2000000000)) < 0)
      fprintf(stderr, "%s: some sessions did not finish in 2 s\n", PROG);
    summary(app.urls[i].network, &m);
  }
  if (app.status == 0)
    printf("%s: room: %llu lines said, %llu dropped for slow members\n", PROG,
           (unsigned long long)atomic_load(&room.said),
           (unsigned long long)atomic_load(&room.dropped));
  free(room.m);
}

static void usage(FILE *f) {
  fprintf(f,
          "usage: %s [--listen URL]... [--procs N] [--duration SECONDS]\n"
          "          [--idle SECONDS] [--max-line BYTES] [--max-queue BYTES]\n"
          "A chat room over lines of text on each URL (tcp://HOST:PORT,\n"
          "unix:///PATH, unix://@NAME).  Default: --listen " DEFAULT_URL ",\n"
          "--idle 300 (0: never), --max-line 4096, --max-queue 262144.\n",
          PROG);
}

int main(int argc, char **argv) {
  app.max_line = 4096;
  app.max_queue = 256 << 10;
  app.idle = INT64_C(300) * 1000000000;
  char err[300];
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v;
    bool missing = false;
    if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
      usage(stdout);
      return 0;
    } else if ((v = cli_option(argc, argv, &i, "--listen", &missing))) {
      cli_url(PROG, "--listen", v, app.urls, &app.nurls, MAX_URLS);
      if (app.urls[app.nurls - 1].packet) {
        fprintf(stderr, "%s: --listen %s: a chat needs a stream\n", PROG, v);
        return 2;
      }
    } else if ((v = cli_option(argc, argv, &i, "--procs", &missing))) {
      app.procs = (int)cli_number(PROG, "--procs", v, 1, 1024);
    } else if ((v = cli_option(argc, argv, &i, "--duration", &missing))) {
      app.duration =
          cli_number(PROG, "--duration", v, 0, 1000000) * INT64_C(1000000000);
    } else if ((v = cli_option(argc, argv, &i, "--idle", &missing))) {
      app.idle =
          cli_number(PROG, "--idle", v, 0, 1000000) * INT64_C(1000000000);
    } else if ((v = cli_option(argc, argv, &i, "--max-line", &missing))) {
      app.max_line = (size_t)cli_number(PROG, "--max-line", v, 16, 1L << 20);
    } else if ((v = cli_option(argc, argv, &i, "--max-queue", &missing))) {
      app.max_queue =
          (size_t)cli_number(PROG, "--max-queue", v, 1024, 1L << 30);
    } else {
      return cli_bad_arg(PROG, a, missing, usage);
    }
  }
  if (app.nurls == 0 &&
      echo_url_parse(DEFAULT_URL, &app.urls[app.nurls++], err, sizeof err) != 0)
    return 1;
  app.max_out = app.max_line + ((size_t)1 << 20);
  loom_codec_line(&app.codec, '\n', true);
  setvbuf(stdout, NULL, _IOLBF, 0);

  app.sigfd = cli_stop_signals(PROG);
  if (app.sigfd < 0)
    return 1;
  int rc = cli_run(PROG, app_main, NULL, app.procs);
  close(app.sigfd);
  return rc != 0 ? rc : app.status;
}
