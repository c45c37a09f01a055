/*
 * chat_client — a client for chat_server on loom_client.
 *
 *   chat_client [--connect URL] [--timeout SECONDS]
 *   chat_client [--connect URL] [--nick NAME] [--peer NAME]...
 *               [--say TEXT]... [--expect COUNT] [--timeout SECONDS]
 *
 * Interactive (no --nick, --peer, --say or --expect): every line from the
 * server is printed to stdout and every line of stdin is sent.  At the
 * end of stdin the client sends "/quit" and waits for the server to say
 * "* bye ..." and close the connection: the server has then handled
 * every line sent, and every line it had for us has been printed.
 * --timeout bounds the connect and that last wait (default 5 s).
 *
 * Scripted, for tests: take the name --nick; wait until every --peer is
 * known to be in the room (listed by /who, which it asks first, renamed
 * to that name, or speaking); say each --say line; wait until COUNT
 * lines from other members ("NAME: ...", not "* ..." notices) have
 * come; /quit.  All of it within --timeout seconds (default 10).  Peers
 * that each wait for the others before speaking, and for each other's
 * lines before quitting, hear every line: nobody speaks before all are
 * in, nobody leaves before all have spoken.
 *
 * Exit status: 0 when the session ended with the server's goodbye (and,
 * scripted, every wait was met); 1 otherwise (no server, a timeout, the
 * server closed first); 2 for a bad command line.
 *
 * Reading stdin.  A plain thread reads it with blocking getline and hands
 * each line to the main coroutine over a loom channel (channels work
 * between threads and coroutines).  Rejected: loom_fd_wait on fd 0 with
 * non-blocking reads.  O_NONBLOCK is a flag of the open file, which a
 * terminal shares with the shell (a shell left with a non-blocking
 * terminal misbehaves, more so after a crash), and a redirected regular
 * file is always "ready" (loom_fd_wait returns 0 at once, as poll(2)
 * does), so that path would need a second one for files.
 *
 * One session.  loom_client replaces a session that closes; a chat
 * client must not (a server's goodbye would be followed by a new guest),
 * so the reconnect interval is negative: one dial, never redialled.
 */
#define _GNU_SOURCE /* getline */

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "echo_url.h"
#include "loom.h"

#define PROG "chat_client"
#define MAX_ARGS 64
#define SEC INT64_C(1000000000)

static struct {
  echo_url url;
  const char *nick;
  const char *peers[MAX_ARGS], *says[MAX_ARGS];
  int npeers, nsays;
  long expect;
  bool scripted;
  int64_t timeout;
  loom_codec codec;
  loom_chan *lines; /* char *, owned by the receiver; closed at EOF */
  loom_chan *done;  /* closed by on_close */
  loom_mutex mu;    /* protects the fields below */
  loom_cond changed;
  long msgs;           /* lines from other members */
  bool seen[MAX_ARGS]; /* the --peer of that index is in the room */
  bool bye;            /* the server said goodbye */
  bool closed;
} app;

static bool starts(const char *p, size_t n, const char *prefix) {
  size_t k = strlen(prefix);
  return n >= k && !memcmp(p, prefix, k);
}

/* The --peer named p[0..n), if any, is in the room.  app.mu held. */
static void saw(const char *p, size_t n) {
  for (int i = 0; i < app.npeers; i++)
    if (strlen(app.peers[i]) == n && !memcmp(app.peers[i], p, n))
      app.seen[i] = true;
}

/* Note the peers a line shows in the room: the speaker of "NAME: TEXT",
 * the new name of "* OLD is now NAME", the names of "* here (N): A B".
 * app.mu held. */
static void note_peers(const char *p, size_t n) {
  const char *end = p + n, *q;
  if (!starts(p, n, "* ")) {
    if ((q = memmem(p, n, ": ", 2)) != NULL)
      saw(p, (size_t)(q - p));
  } else if ((q = memmem(p, n, " is now ", 8)) != NULL) {
    saw(q + 8, (size_t)(end - q - 8));
  } else if (starts(p, n, "* here (") && (q = memchr(p, ':', n)) != NULL) {
    while (++q < end) {
      const char *e = memchr(q, ' ', (size_t)(end - q));
      if (e == NULL)
        e = end;
      saw(q, (size_t)(e - q));
      q = e;
    }
  }
}

static void on_message(loom_session *s, const loom_pkg *pkg) {
  (void)s;
  const char *p = (const char *)pkg->data;
  size_t n = pkg->len;
  loom_block_enter(); /* stdout may be a slow pipe */
  fwrite(p, 1, n, stdout);
  putchar('\n');
  loom_block_exit();

  loom_mutex_lock(&app.mu);
  if (!starts(p, n, "* "))
    app.msgs++;
  else if (starts(p, n, "* bye "))
    app.bye = true;
  note_peers(p, n);
  loom_cond_broadcast(&app.changed);
  loom_mutex_unlock(&app.mu);
}

static void on_error(loom_session *s, int err) {
  fprintf(stderr, "%s: %s: %s\n", PROG, loom_session_name(s),
          loom_strerror(err));
}

static void on_close(loom_session *s) {
  (void)s;
  loom_mutex_lock(&app.mu);
  app.closed = true;
  loom_cond_broadcast(&app.changed);
  loom_mutex_unlock(&app.mu);
  loom_chan_close(app.done);
}

static const loom_session_listener listener = {
    .on_message = on_message,
    .on_error = on_error,
    .on_close = on_close,
};

/* ---- scripted ------------------------------------------------------------ */

static bool send_line(loom_session *s, const char *line) {
  int rc = loom_session_write(s, line, strlen(line), -1);
  if (rc < 0)
    fprintf(stderr, "%s: cannot send \"%.40s\": %s\n", PROG, line,
            loom_strerror(rc));
  return rc == 0;
}

static bool peers_here(void) {
  for (int i = 0; i < app.npeers; i++)
    if (!app.seen[i])
      return false;
  return true;
}
static bool all_came(void) { return app.msgs >= app.expect; }
static bool closed(void) { return app.closed; }
static bool said_bye(void) { return app.bye; }

/* Wait until ok() (read under app.mu), the session closes, or the
 * deadline.  Returns ok(). */
static bool wait_for(bool (*ok)(void), int64_t deadline) {
  loom_mutex_lock(&app.mu);
  while (!ok() && !app.closed &&
         loom_cond_wait(&app.changed, &app.mu, deadline) == 0) {
  }
  bool r = ok();
  loom_mutex_unlock(&app.mu);
  return r;
}

static bool peek(bool (*ok)(void)) {
  loom_mutex_lock(&app.mu);
  bool r = ok();
  loom_mutex_unlock(&app.mu);
  return r;
}

static int script(loom_session *s, int64_t deadline) {
  char line[64];
  if (app.nick != NULL) {
    snprintf(line, sizeof line, "/nick %s", app.nick);
    if (!send_line(s, line))
      return 1;
  }
  if (app.npeers > 0 &&
      (!send_line(s, "/who") || !wait_for(peers_here, deadline))) {
    fprintf(stderr, "%s: the peers did not all come\n", PROG);
    return 1;
  }
  for (int i = 0; i < app.nsays; i++)
    if (!send_line(s, app.says[i]))
      return 1;
  if (!wait_for(all_came, deadline)) {
    loom_mutex_lock(&app.mu);
    fprintf(stderr, "%s: %ld of %ld lines came\n", PROG, app.msgs, app.expect);
    loom_mutex_unlock(&app.mu);
    return 1;
  }
  return 0;
}

/* ---- interactive --------------------------------------------------------- */

static void *stdin_main(void *arg) {
  (void)arg;
  char *line = NULL;
  size_t cap = 0;
  ssize_t n;
  while ((n = getline(&line, &cap, stdin)) >= 0) {
    while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
      line[--n] = '\0'; /* the codec cannot send a line ending in '\r' */
    if (loom_chan_send(app.lines, &line) < 0)
      break;
    line = NULL; /* the main coroutine frees it */
    cap = 0;
  }
  free(line);
  loom_chan_close(app.lines);
  return NULL;
}

static int interactive(loom_session *s) {
  pthread_t t;
  if (pthread_create(&t, NULL, stdin_main, NULL) != 0) {
    fprintf(stderr, "%s: cannot start a thread\n", PROG);
    return 1;
  }
  pthread_detach(t);
  for (;;) {
    char *line;
    loom_case cs[2] = {{app.lines, LOOM_RECV, &line, false},
                       {app.done, LOOM_RECV, NULL, false}};
    if (loom_select(cs, 2, 0) == 1)
      return 0; /* the server closed: /quit, or it cut us off */
    if (!cs[0].ok)
      break; /* end of stdin */
    send_line(s, line);
    free(line);
  }
  return 0; /* app_main says /quit */
}

/* ---- main ---------------------------------------------------------------- */

static void app_main(void *arg) {
  int *status = arg;
  *status = 1;
  int64_t deadline = loom_now() + app.timeout;
  loom_client_opts o = {
      .network = app.url.network,
      .addr = app.url.addr,
      .session = {.listener = &listener, .codec = &app.codec},
      .conns = 1,
      .reconnect_interval = -1, /* one session: no redial after /quit */
      .dial_timeout = app.timeout,
  };
  loom_client *cl;
  loom_session *s = NULL;
  int rc = loom_client_start(&cl, &o);
  if (rc < 0) {
    fprintf(stderr, "%s: %s\n", PROG, loom_strerror(rc));
    return;
  }
  rc = loom_client_wait(cl, 1, deadline);
  if (rc == 0)
    rc = loom_client_session(cl, &s);
  if (rc < 0) {
    fprintf(stderr, "%s: cannot connect to %s://%s: %s\n", PROG,
            app.url.network, app.url.addr, loom_strerror(rc));
    goto out;
  }
  int failed = app.scripted ? script(s, deadline) : interactive(s);
  if (!peek(closed)) {
    send_line(s, "/quit");
    wait_for(closed, app.scripted ? deadline : loom_now() + app.timeout);
  }
  bool bye = peek(said_bye);
  if (!failed && !bye)
    fprintf(stderr, "%s: the session ended without the server's goodbye\n",
            PROG);
  *status = failed || !bye;
  loom_session_unref(s);
out:
  loom_client_close(cl, loom_now() + SEC);
}

static void usage(FILE *f) {
  fprintf(f,
          "usage: %s [--connect URL] [--timeout SECONDS]\n"
          "       %s [--connect URL] [--nick NAME] [--peer NAME]...\n"
          "          [--say TEXT]... [--expect COUNT] [--timeout SECONDS]\n"
          "Talks to chat_server at URL (tcp://HOST:PORT, unix:///PATH;\n"
          "default tcp://127.0.0.1:7002): prints what it hears, sends stdin\n"
          "or the --say lines.\n",
          PROG, PROG);
}

int main(int argc, char **argv) {
  const char *url = "tcp://127.0.0.1:7002";
  long timeout = -1;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v;
    bool missing = false;
    if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
      usage(stdout);
      return 0;
    } else if ((v = cli_option(argc, argv, &i, "--connect", &missing))) {
      url = v;
    } else if ((v = cli_option(argc, argv, &i, "--timeout", &missing))) {
      timeout = cli_number(PROG, "--timeout", v, 1, 1000000);
    } else if ((v = cli_option(argc, argv, &i, "--nick", &missing))) {
      if (strlen(v) > 32) {
        fprintf(stderr, "%s: --nick \"%s\": at most 32 bytes\n", PROG, v);
        return 2;
      }
      app.nick = v;
      app.scripted = true;
    } else if ((v = cli_option(argc, argv, &i, "--peer", &missing))) {
      if (app.npeers == MAX_ARGS) {
        fprintf(stderr, "%s: --peer: at most %d\n", PROG, MAX_ARGS);
        return 2;
      }
      app.peers[app.npeers++] = v;
      app.scripted = true;
    } else if ((v = cli_option(argc, argv, &i, "--say", &missing))) {
      if (app.nsays == MAX_ARGS) {
        fprintf(stderr, "%s: --say: at most %d\n", PROG, MAX_ARGS);
        return 2;
      }
      app.says[app.nsays++] = v;
      app.scripted = true;
    } else if ((v = cli_option(argc, argv, &i, "--expect", &missing))) {
      app.expect = cli_number(PROG, "--expect", v, 0, 1000000);
      app.scripted = true;
    } else {
      return cli_bad_arg(PROG, a, missing, usage);
    }
  }
  char err[300];
  if (echo_url_parse(url, &app.url, err, sizeof err) != 0 || app.url.packet) {
    fprintf(stderr, "%s: --connect %s: %s\n", PROG, url,
            app.url.packet ? "a chat needs a stream" : err);
    return 2;
  }
  app.timeout = (timeout > 0 ? timeout : app.scripted ? 10 : 5) * SEC;
  loom_codec_line(&app.codec, '\n', true);
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (loom_chan_make(&app.lines, sizeof(char *), 16) < 0 ||
      loom_chan_make(&app.done, 0, 0) < 0) {
    fprintf(stderr, "%s: out of memory\n", PROG);
    return 1;
  }
  int status = 1;
  int rc = cli_run(PROG, app_main, &status, 0);
  return rc != 0 ? rc : status;
}
