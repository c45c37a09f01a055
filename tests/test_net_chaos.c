/*
 * test_net_chaos.c — randomized stress of the net layer and the poller on
 * loopback, checking invariants rather than scripts.
 *
 * Many coroutines on 2 to 4 Ps share each socket: several writers and a
 * reader per direction of a stream, while a poker moves deadlines (past,
 * near, far, none) and cancels the contexts the calls run under, and the
 * round ends gracefully (half-close, read to the end), by a close under
 * the users' feet, or by a peer that resets.  Packet sockets (UDP,
 * connected or not; unixgram by path and abstract name) get the same
 * treatment, and unconnected unixgram writers write to peers that fill,
 * drain and vanish.  loom_fd_wait is raced on pipes and eventfds, accept
 * and dial run under deadlines and cancels, and an idle wait is timed for
 * CPU.
 *
 * What must hold:
 *   - every call returns (each case runs under a watchdog) with a result
 *     the header documents for the situation;
 *   - streams are byte-exact and in order: writers send self-describing
 *     records (below), so the reader checks every byte, and at the end
 *     the records it saw whole are exactly the writes that succeeded, a
 *     failed write having sent a prefix of its record at most;
 *   - a passed deadline gives -ETIMEDOUT, never before it, and moving it
 *     makes the socket usable again; a call under a context fails with
 *     -ECANCELED only when that context was cancelled;
 *   - a close wakes every blocked call with LOOM_ECLOSED promptly;
 *   - no descriptor leaks (/proc/self/fd before and after each case; the
 *     sanitizer builds report leaked memory), no CPU while parked.
 *
 * The cases after the randomized ones pin what the randomized ones
 * found, or what they cannot reach: an empty write under a passed
 * deadline, the runtime stopping under parked calls, a Unix listener's
 * path after its close, a connected unixgram writer whose peer goes.
 *
 * A seed names a run: NET_CHAOS_SEED=n (the seed is printed); NET_CHAOS_MS
 * sets the length of each case's randomized part; NET_CHAOS_PROCS the Ps.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "check.h"
#include "check_rng.h"
#include "loom.h"
#include "loom/fd.h"
#include "net/netfd.h"

/* ---- parameters and the per-case frame ------------------------------ */

static uint64_t g_seed = 1;
static int64_t g_ms;
static int g_procs;
static int g_verbose;
static atomic_int g_uniq; /* names for Unix sockets */

static void params(const char *name) {
  const char *e;
  if ((e = getenv("NET_CHAOS_SEED")) != NULL)
    g_seed = strtoull(e, NULL, 0);
  else
    g_seed = (uint64_t)check_mono_ns() ^ (uint64_t)getpid();
  g_ms = CHECK_SCALE(2500, 2000, 1500);
  if ((e = getenv("NET_CHAOS_MS")) != NULL)
    g_ms = strtoll(e, NULL, 0);
  g_procs = 2 + (int)(g_seed % 3);
  if ((e = getenv("NET_CHAOS_PROCS")) != NULL)
    g_procs = atoi(e);
  g_verbose = getenv("NET_CHAOS_VERBOSE") != NULL;
  fprintf(stderr, "%s: NET_CHAOS_SEED=%llu ms=%lld procs=%d\n", name,
          (unsigned long long)g_seed, (long long)g_ms, g_procs);
}

static int fd_count(void) {
  DIR *d = opendir("/proc/self/fd");
  CHECK(d != NULL);
  int n = 0;
  while (readdir(d) != NULL)
    n++;
  closedir(d);
  return n;
}

/* Run fn on the runtime under a watchdog; no descriptor may be left. */
static void run_case(const char *name, void (*fn)(void *)) {
  params(name);
  check_watchdog(g_ms / 1000 + 40, name);
  int before = fd_count();
  check_run(fn, NULL, g_procs);
  int after = fd_count();
  CHECKF(before == after, "%s: %d descriptors before, %d after", name, before,
         after);
}

/* Slack for "promptly": wide, the machine is shared and sanitizers slow
 * (a loaded 2-core machine has shown 260 ms, and CI runs two test
 * processes at once); a missed wake-up waits for a far deadline (10 s)
 * or forever, so the bound only has to stay well below that. */
#define PROMPT_NS (CHECK_SCALE(2000, 3000, 4000) * CHECK_MS)

static void sleep_us(rng_t *r, uint32_t max_us) {
  loom_sleep((int64_t)rn(r, max_us + 1) * 1000);
}

/* A deadline of one of the four kinds: passed, near, far, none. */
static int64_t pick_deadline(rng_t *r) {
  switch (rn(r, 4)) {
  case 0:
    return loom_now() - 1;
  case 1:
    return loom_now() + (int64_t)rn(r, 3000) * 1000;
  case 2:
    return loom_now() + 10000 * CHECK_MS;
  default:
    return 0;
  }
}

static bool is_ctx_err(ssize_t r) { return r == -ECANCELED || r == -ETIMEDOUT; }

/* A context-bounded call's error: -ECANCELED only from a cancelled ctx. */
static void check_ctx_result(ssize_t r, loom_ctx *c, const char *what) {
  if (r == -ECANCELED)
    CHECKF(c != NULL && loom_ctx_err(c) == -ECANCELED,
           "%s: -ECANCELED with ctx err %d", what, c ? loom_ctx_err(c) : 0);
}

/* ---- a guard: closing a socket while others use it ------------------

 * loom_close wakes calls that are inside loom, but a call that starts
 * after it uses freed memory.  So users announce each call (each takes
 * one reference, from before it waits for its turn until it returns,
 * with a context or without), and the closer, having stopped new calls,
 * waits until the netfd holds at least that many: every announced call
 * is then inside, holding its reference. */
struct guard {
  loom_mutex mu;
  int stopping;
  int calls;
};

static bool g_enter(struct guard *g) {
  loom_mutex_lock(&g->mu);
  bool ok = !g->stopping;
  if (ok)
    g->calls++;
  loom_mutex_unlock(&g->mu);
  return ok;
}

static void g_leave(struct guard *g) {
  loom_mutex_lock(&g->mu);
  g->calls--;
  loom_mutex_unlock(&g->mu);
}

static uint64_t nf_refs(void *obj) {
  /* loom_conn, loom_pconn and loom_listener start with their netfd. */
  return atomic_load(&((loom__netfd *)obj)->ref) & ~((uint64_t)1 << 63);
}

/* Stop new calls on obj; return once every call announced is inside. */
static void g_stop_and_wait(struct guard *g, void *obj) {
  loom_mutex_lock(&g->mu);
  g->stopping = 1;
  loom_mutex_unlock(&g->mu);
  for (;;) {
    loom_mutex_lock(&g->mu);
    bool in = nf_refs(obj) >= (uint64_t)g->calls;
    loom_mutex_unlock(&g->mu);
    if (in)
      return;
    loom_sleep(20000);
  }
}

/* ---- records: self-describing stream data ----------------------------
 *
 * 0x00, writer | 0x80, seq in four 7-bit groups | 0x80, length in three
 * 7-bit groups | 0x80, then `length` payload bytes in 1..255 derived from
 * (writer, seq).  Only a record's first byte is 0: a record cut short (a
 * failed write sent part of it) shows as a 0 before its end. */
#define HDR 8
#define MAXW 3
#define MAXSEQ 16384
#define MAXREC (160 * 1024)

static uint64_t rec_state(unsigned w, uint32_t seq) {
  uint64_t s = (g_seed + 1) * 0x9E3779B97F4A7C15ULL ^ ((uint64_t)w << 40) ^
               ((uint64_t)seq * 0xBF58476D1CE4E5B9ULL);
  return s | 1;
}

static uint8_t rec_byte(uint64_t *s) {
  *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
  return (uint8_t)(1 + (*s >> 33) % 255);
}

static size_t rec_make(uint8_t *out, unsigned w, uint32_t seq, uint32_t len) {
  out[0] = 0;
  out[1] = (uint8_t)(0x80 | w);
  for (int i = 0; i < 4; i++)
    out[2 + i] = (uint8_t)(0x80 | ((seq >> (7 * i)) & 0x7f));
  for (int i = 0; i < 3; i++)
    out[6 + i] = (uint8_t)(0x80 | ((len >> (7 * i)) & 0x7f));
  uint64_t s = rec_state(w, seq);
  for (uint32_t i = 0; i < len; i++)
    out[HDR + 1 + i] = rec_byte(&s);
  return HDR + 1 + len;
}

/* The reader's side: what it saw of each writer's records. */
enum { SEEN_NONE, SEEN_WHOLE, SEEN_TORN };
enum { WROTE_NONE, WROTE_OK, WROTE_FAILED };

struct parser {
  int st; /* 0: between records, 1: header, 2: payload */
  uint8_t hdr[HDR];
  int hn;
  unsigned w;
  uint32_t seq, len, got;
  uint64_t s;
  int64_t next[MAXW]; /* lowest seq each writer may still show */
  uint8_t seen[MAXW][MAXSEQ];
  long whole, torn;
  const char *name;
};

static void p_torn(struct parser *p) {
  if (p->st == 2) {
    p->seen[p->w][p->seq] = SEEN_TORN;
    p->torn++;
  }
  p->st = 0;
}

static void p_feed(struct parser *p, const uint8_t *b, size_t n) {
  for (size_t i = 0; i < n; i++) {
    uint8_t c = b[i];
    if (c == 0) {
      p_torn(p); /* a record cut short, if one was open */
      p->st = 1;
      p->hn = 0;
      continue;
    }
    switch (p->st) {
    case 0:
      CHECKF(0, "%s: byte %#x outside a record", p->name, c);
      break;
    case 1:
      CHECKF(c & 0x80, "%s: header byte %#x", p->name, c);
      p->hdr[p->hn++] = c & 0x7f;
      if (p->hn < HDR)
        break;
      p->w = p->hdr[0];
      p->seq = 0;
      p->len = 0;
      for (int k = 0; k < 4; k++)
        p->seq |= (uint32_t)p->hdr[1 + k] << (7 * k);
      for (int k = 0; k < 3; k++)
        p->len |= (uint32_t)p->hdr[5 + k] << (7 * k);
      CHECKF(p->w < MAXW && p->seq < MAXSEQ && p->len <= MAXREC,
             "%s: bad header w=%u seq=%u len=%u", p->name, p->w, p->seq,
             p->len);
      CHECKF((int64_t)p->seq >= p->next[p->w],
             "%s: writer %u's record %u after %lld (out of order or twice)",
             p->name, p->w, p->seq, (long long)p->next[p->w] - 1);
      p->next[p->w] = (int64_t)p->seq + 1;
      p->got = 0;
      p->s = rec_state(p->w, p->seq);
      p->st = 2;
      if (p->len == 0) {
        p->seen[p->w][p->seq] = SEEN_WHOLE;
        p->whole++;
        p->st = 0;
      }
      break;
    default: {
      uint8_t want = rec_byte(&p->s);
      CHECKF(c == want, "%s: writer %u record %u byte %u of %u: %#x, want %#x",
             p->name, p->w, p->seq, p->got, p->len, c, want);
      if (++p->got == p->len) {
        p->seen[p->w][p->seq] = SEEN_WHOLE;
        p->whole++;
        p->st = 0;
      }
      break;
    }
    }
  }
}

/* ---- streams: pairs of connections ------------------------------------ */

enum { END_GRACEFUL, END_CLOSE, END_RESET, END_SHUTDOWN };

struct dir; /* writers on conn `from` (end i), reader on the other end */

struct stream_pair {
  loom_conn *c[2];
  struct guard g[2];
  struct dir *d[2]; /* d[i]: written on end i, read on end 1 - i */
  atomic_int stop;  /* 1: stop the chaos; 2: calm (deadlines reset) */
  atomic_int poker_done;
  atomic_int dead[2];      /* end i was closed (or reset) by the round's end */
  atomic_int broken;       /* the peer of some end went away: errors allowed */
  atomic_uint rd_epoch[2]; /* odd while the poker changes end i's rd */
  loom_mutex ctx_mu;
  loom_ctx *parent; /* the calls' contexts hang here; the poker cancels */
  int64_t closed_at;
  atomic_llong late_ns; /* the slowest return after the close */
  loom_wg wg;
  int id;
  int end_how;
  int net;
};

struct dir {
  struct stream_pair *sp;
  int from; /* the end the writers write on */
  int nw;
  atomic_int writers_left;
  uint8_t wrote[MAXW][MAXSEQ];
  struct parser p;
  bool eof;
  bool reset_seen;
  atomic_int rstate;       /* for a hang's report: what the reader does */
  atomic_int wstate[MAXW]; /* and each writer */
  atomic_llong rlast, wlast[MAXW];
};

static loom_ctx *sp_ctx(struct stream_pair *sp, rng_t *r) {
  loom_mutex_lock(&sp->ctx_mu);
  loom_ctx *parent = loom_ctx_ref(sp->parent);
  loom_mutex_unlock(&sp->ctx_mu);
  loom_ctx *c;
  int e = rn(r, 2)
              ? loom_ctx_with_timeout(&c, parent, (int64_t)rn(r, 4000) * 1000)
              : loom_ctx_with_cancel(&c, parent);
  CHECK_OK(e);
  loom_ctx_unref(parent);
  return c;
}

/* A call on end i returned r after the round's end: how late was it? */
static void note_return(struct stream_pair *sp, int i) {
  if (!atomic_load(&sp->dead[i]))
    return;
  int64_t late = loom_now() - sp->closed_at;
  long long cur = atomic_load(&sp->late_ns);
  while (late > cur && !atomic_compare_exchange_weak(&sp->late_ns, &cur, late))
    ;
}

static void sp_writer(void *arg) {
  struct dir *d = (struct dir *)((uintptr_t)arg & ~(uintptr_t)7);
  unsigned w = (unsigned)((uintptr_t)arg & 7);
  struct stream_pair *sp = d->sp;
  loom_conn *c = sp->c[d->from];
  struct guard *g = &sp->g[d->from];
  rng_t r;
  rng_seed(&r,
           g_seed ^ ((uint64_t)sp->id << 20) ^ ((uint64_t)d->from << 8) ^ w);
  uint8_t *buf = malloc(MAXREC + HDR + 1);
  CHECK(buf != NULL);
  for (uint32_t seq = 0; seq < MAXSEQ && atomic_load(&sp->stop) == 0; seq++) {
    uint32_t len = rn(&r, 20) == 0 ? rn(&r, MAXREC + 1) : rn(&r, 8192);
    size_t n = rec_make(buf, w, seq, len);
    unsigned how = rn(&r, 10);
    loom_ctx *ctx = NULL;
    if (!g_enter(g))
      break;
    ssize_t res;
    atomic_store(&d->wstate[w], 1 + (int)how);
    atomic_store(&d->wlast[w], (long long)n);
    if (how < 4) {
      res = loom_write(c, buf, n);
    } else if (how < 7) {
      struct iovec iov[40];
      int k = 1 + (int)rn(&r, 40);
      size_t off = 0;
      for (int i = 0; i < k; i++) {
        size_t part = i == k - 1 ? n - off : rn(&r, (uint32_t)(n - off + 1));
        iov[i] = (struct iovec){buf + off, part};
        off += part;
      }
      res = loom_writev(c, iov, k);
    } else {
      ctx = sp_ctx(sp, &r);
      if (rn(&r, 8) == 0)
        loom_ctx_cancel(ctx);
      res = loom_write_ctx(c, buf, n, ctx);
    }
    g_leave(g);
    atomic_store(&d->wstate[w], 100 + (int)res);
    note_return(sp, d->from);
    d->wrote[w][seq] = res == (ssize_t)n ? WROTE_OK : WROTE_FAILED;
    if (res != (ssize_t)n) {
      bool ok = res == -ETIMEDOUT || (ctx != NULL && is_ctx_err(res));
      if (atomic_load(&sp->dead[d->from]))
        ok = ok || res == LOOM_ECLOSED;
      if (atomic_load(&sp->broken))
        ok = ok || res == -EPIPE || res == -ECONNRESET;
      CHECKF(ok, "pair %d end %d: write of %zu: %zd (%s)", sp->id, d->from, n,
             res, loom_err_name((int)res));
      check_ctx_result(res, ctx, "write_ctx");
    }
    if (ctx != NULL)
      loom_ctx_release(ctx);
    if (res == LOOM_ECLOSED || res == -EPIPE || res == -ECONNRESET)
      break;
    if (res < 0) {
      sleep_us(&r, 500);
      /* A cancel leaves the write deadline passed: move it (or let the
       * poker). */
      if (rn(&r, 2) && g_enter(g)) {
        CHECK_OK(loom_set_write_deadline(c, 0));
        g_leave(g);
      }
    } else if (rn(&r, 16) == 0) {
      sleep_us(&r, 300);
    } else if (seq % 8 == 0) {
      loom_yield(); /* making records is slow under sanitizers */
    }
  }
  free(buf);
  if (atomic_fetch_sub(&d->writers_left, 1) == 1 && g_enter(g)) {
    int e = loom_shutdown(c, SHUT_WR);
    g_leave(g);
    CHECKF(e == 0 || (atomic_load(&sp->broken) && e == -ENOTCONN),
           "shutdown: %d (%s)", e, loom_err_name(e));
  }
  loom_wg_done(&sp->wg);
}

static void sp_reader(void *arg) {
  struct dir *d = arg;
  struct stream_pair *sp = d->sp;
  int me = 1 - d->from;
  loom_conn *c = sp->c[me];
  struct guard *g = &sp->g[me];
  rng_t r;
  rng_seed(&r, g_seed ^ ((uint64_t)sp->id << 24) ^ 0xabcdef ^ (uint64_t)me);
  size_t cap = 65536;
  uint8_t *buf = malloc(cap);
  CHECK(buf != NULL);
  bool calm = false;
  bool reset = false; /* this reader reset rd to 0, at epoch reset_ep */
  unsigned reset_ep = 0;
  for (;;) {
    if (!calm && atomic_load(&sp->stop) == 2) {
      calm = true; /* nobody moves the deadline now: no more timeouts */
      if (!g_enter(g))
        break;
      int e = loom_set_read_deadline(c, 0);
      g_leave(g);
      CHECK_OK(e);
    }
    unsigned how = calm || reset ? 0 : rn(&r, 10);
    size_t len = 1 + rn(&r, (uint32_t)cap);
    if (how == 1)
      len = 0;
    loom_ctx *ctx = NULL;
    int64_t own = 0; /* a deadline this reader set itself */
    unsigned ep = 0;
    if (how == 6) {
      ep = atomic_load(&sp->rd_epoch[me]);
      own = loom_now() + (int64_t)rn(&r, 2000) * 1000;
      if (!g_enter(g))
        break;
      int e = loom_set_read_deadline(c, own);
      g_leave(g);
      CHECK_OK(e);
    }
    if (!g_enter(g))
      break;
    ssize_t res;
    atomic_store(&d->rstate, 1 + (int)how);
    atomic_store(&d->rlast, (long long)len);
    if (how >= 7) {
      ctx = sp_ctx(sp, &r);
      res = loom_read_ctx(c, buf, len, ctx);
    } else {
      res = loom_read(c, buf, len);
    }
    g_leave(g);
    atomic_store(&d->rstate, res > 0 ? 99 : 100 + (int)res);
    note_return(sp, me);
    if (res > 0) {
      CHECK((size_t)res <= len);
      p_feed(&d->p, buf, (size_t)res);
    } else if (res == 0 && len > 0) {
      d->eof = true;
    } else if (res < 0) {
      bool ok = res == -ETIMEDOUT || (ctx != NULL && is_ctx_err(res));
      if (atomic_load(&sp->dead[me]))
        ok = ok || res == LOOM_ECLOSED;
      if (atomic_load(&sp->broken) && res == -ECONNRESET) {
        ok = true;
        d->reset_seen = true;
      }
      CHECKF(ok, "pair %d end %d: read of %zu: %zd (%s)", sp->id, me, len, res,
             loom_err_name((int)res));
      CHECKF(!(calm && res == -ETIMEDOUT && !atomic_load(&sp->dead[me])),
             "pair %d end %d: read timed out with no deadline", sp->id, me);
      check_ctx_result(res, ctx, "read_ctx");
      if (how == 6 && res == -ETIMEDOUT &&
          atomic_load(&sp->rd_epoch[me]) == ep && (ep & 1) == 0) {
        int64_t now = loom_now();
        CHECKF(now >= own, "read timed out %lld ns before its deadline",
               (long long)(own - now));
        CHECKF(now - own < PROMPT_NS, "read timed out %lld ms late",
               (long long)((now - own) / CHECK_MS));
      }
      if (reset && res == -ETIMEDOUT &&
          atomic_load(&sp->rd_epoch[me]) == reset_ep &&
          !atomic_load(&sp->dead[me]))
        CHECK_FAIL("pair %d end %d: read timed out after its deadline was "
                   "reset",
                   sp->id, me);
    }
    reset = false;
    if (ctx != NULL)
      loom_ctx_release(ctx);
    if (d->eof || res == LOOM_ECLOSED || res == -ECONNRESET)
      break;
    if (res < 0) {
      if (rn(&r, 2) && g_enter(g)) {
        /* Moving the deadline makes the connection usable again: the
         * next read does not time out, unless the poker moved it too. */
        unsigned e1 = atomic_load(&sp->rd_epoch[me]);
        CHECK_OK(loom_set_read_deadline(c, 0));
        g_leave(g);
        reset = (e1 & 1) == 0;
        reset_ep = e1;
      } else {
        sleep_us(&r, 300);
      }
    } else if (rn(&r, 20) == 0) {
      sleep_us(&r, 2000); /* let the writers fill the buffers */
    }
  }
  if (d->eof)
    p_torn(&d->p);
  free(buf);
  loom_wg_done(&sp->wg);
}

static void sp_poker(void *arg) {
  struct stream_pair *sp = arg;
  rng_t r;
  rng_seed(&r, g_seed ^ ((uint64_t)sp->id << 32) ^ 0x5eed);
  while (atomic_load(&sp->stop) == 0) {
    int i = (int)rn(&r, 2);
    struct guard *g = &sp->g[i];
    unsigned how = rn(&r, 10);
    int64_t dl = pick_deadline(&r);
    if (how < 8 && !g_enter(g))
      break;
    switch (how) {
    case 0:
    case 1:
    case 2:
      atomic_fetch_add(&sp->rd_epoch[i], 1);
      CHECK_OK(loom_set_read_deadline(sp->c[i], dl));
      atomic_fetch_add(&sp->rd_epoch[i], 1);
      break;
    case 3:
    case 4:
    case 5:
      CHECK_OK(loom_set_write_deadline(sp->c[i], dl));
      break;
    case 6:
      atomic_fetch_add(&sp->rd_epoch[i], 1);
      CHECK_OK(loom_set_deadline(sp->c[i], dl, dl));
      atomic_fetch_add(&sp->rd_epoch[i], 1);
      break;
    case 7:
      /* Unix only: a TCP receive buffer below loopback's 64 KiB MSS
       * makes the sender wait for its persist timer (silly window
       * avoidance), which stalls a stream for up to seconds. */
      if (sp->net >= 2)
        loom_conn_set_buffers(sp->c[i], 4096 + (int)rn(&r, 65536),
                              4096 + (int)rn(&r, 65536));
      break;
    default: {
      loom_ctx *n, *old;
      CHECK_OK(loom_ctx_with_cancel(&n, loom_ctx_background()));
      loom_mutex_lock(&sp->ctx_mu);
      old = sp->parent;
      sp->parent = n;
      loom_mutex_unlock(&sp->ctx_mu);
      loom_ctx_release(old); /* cancels every call under it */
      break;
    }
    }
    if (how < 8)
      g_leave(g);
    sleep_us(&r, 1500);
  }
  atomic_store(&sp->poker_done, 1);
  loom_wg_done(&sp->wg);
}

/* Close end i (with a reset when `reset`) under its users' feet. */
static void sp_kill(struct stream_pair *sp, int i, bool reset) {
  g_stop_and_wait(&sp->g[i], sp->c[i]);
  if (reset) {
    struct linger lg = {1, 0};
    CHECK_OK(setsockopt(loom_conn_fd(sp->c[i]), SOL_SOCKET, SO_LINGER, &lg,
                        sizeof lg));
  }
  atomic_store(&sp->broken, 1);
  sp->closed_at = loom_now();
  atomic_store(&sp->dead[i], 1);
  CHECK_OK(loom_close(sp->c[i]));
}

static const char *const sp_nets[] = {"tcp", "tcp6", "unix", "unix@"};

static int sp_connect(rng_t *r, int which, loom_conn **a, loom_conn **b) {
  loom_listener *l;
  char addr[108];
  const char *net = sp_nets[which];
  int e;
  if (which == 0) {
    e = loom_listen(&l, "tcp", "127.0.0.1:0");
  } else if (which == 1) {
    e = loom_listen(&l, "tcp6", "[::1]:0");
    if (e != 0)
      return e; /* no IPv6 here */
  } else {
    snprintf(addr, sizeof addr, "%s/loom-nc-%d-%d", which == 2 ? "/tmp" : "@",
             (int)getpid(), atomic_fetch_add(&g_uniq, 1));
    e = loom_listen(&l, "unix", addr);
    net = "unix";
  }
  CHECK_OK(e);
  if (which < 2)
    CHECK_OK(loom_listener_addr(l, addr, sizeof addr));
  loom_dial_opts o = {.deadline = loom_now() + 5000 * CHECK_MS};
  CHECK_OK(loom_dial_with(a, net, addr, &o));
  CHECK_OK(loom_accept(l, b));
  CHECK_OK(loom_listener_close(l));
  if (which >= 2 && rn(r, 3) == 0) { /* see sp_poker */
    loom_conn_set_buffers(*a, 8192, 8192);
    loom_conn_set_buffers(*b, 8192, 8192);
  }
  return 0;
}

static void sp_verify(struct dir *d, bool exact) {
  struct stream_pair *sp = d->sp;
  for (int w = 0; w < d->nw; w++) {
    for (int s = 0; s < MAXSEQ; s++) {
      uint8_t wr = d->wrote[w][s], se = d->p.seen[w][s];
      CHECKF(se != SEEN_WHOLE || wr == WROTE_OK,
             "pair %d dir %d: writer %d record %d arrived whole, write "
             "said %d",
             sp->id, d->from, w, s, wr);
      CHECKF(se != SEEN_TORN || wr == WROTE_FAILED || !exact,
             "pair %d dir %d: writer %d record %d arrived torn, write said %d",
             sp->id, d->from, w, s, wr);
      if (exact)
        CHECKF(wr != WROTE_OK || se == SEEN_WHOLE,
               "pair %d dir %d: writer %d record %d written but not read "
               "(seen %d)",
               sp->id, d->from, w, s, se);
    }
  }
}

static void sp_dump(struct stream_pair *sp) {
  fprintf(stderr, "pair %d (%s) end_how %d stop %d broken %d dead %d/%d\n",
          sp->id, sp_nets[sp->net], sp->end_how, atomic_load(&sp->stop),
          atomic_load(&sp->broken), atomic_load(&sp->dead[0]),
          atomic_load(&sp->dead[1]));
  for (int i = 0; i < 2; i++) {
    if (atomic_load(&sp->dead[i]))
      continue;
    int fd = loom_conn_fd(sp->c[i]), inq = -1, outq = -1;
    struct pollfd pf = {fd, POLLIN | POLLOUT, 0};
    poll(&pf, 1, 0);
    ioctl(fd, FIONREAD, &inq);
    ioctl(fd, TIOCOUTQ, &outq);
    fprintf(stderr, " end %d: fd %d revents %#x inq %d outq %d\n", i, fd,
            pf.revents, inq, outq);
  }
  for (int i = 0; i < 2; i++) {
    struct dir *d = sp->d[i];
    fprintf(stderr,
            " dir %d: reader state %d (len %lld) eof %d, parser st %d w %u "
            "seq %u got %u/%u; writers left %d:",
            i, atomic_load(&d->rstate), atomic_load(&d->rlast), d->eof, d->p.st,
            d->p.w, d->p.seq, d->p.got, d->p.len,
            atomic_load(&d->writers_left));
    for (int w = 0; w < d->nw; w++)
      fprintf(stderr, " [%d %lld]", atomic_load(&d->wstate[w]),
              atomic_load(&d->wlast[w]));
    fprintf(stderr, "\n");
  }
}

#define NPAIR 2

/* One round: NPAIR pairs, chaos for a while, then an ending of kind
 * `end_kind` (-1: random per pair). */
static void stream_round(rng_t *r, int end_kind, long *stats) {
  struct stream_pair *sps[NPAIR];
  int n = 0;
  for (int k = 0; k < NPAIR; k++) {
    struct stream_pair *sp = calloc(1, sizeof *sp);
    CHECK(sp != NULL);
    sp->net = (int)rn(r, 4);
    if (sp_connect(r, sp->net, &sp->c[0], &sp->c[1]) != 0 &&
        sp_connect(r, sp->net = 0, &sp->c[0], &sp->c[1]) != 0)
      CHECK_FAIL("cannot connect");
    sp->id = k;
    sp->end_how = end_kind >= 0 ? end_kind : (int)rn(r, 4);
    CHECK_OK(loom_ctx_with_cancel(&sp->parent, loom_ctx_background()));
    for (int i = 0; i < 2; i++) {
      struct dir *d = calloc(1, sizeof *d);
      CHECK(d != NULL);
      d->sp = sp;
      d->from = i;
      d->nw = 1 + (int)rn(r, MAXW);
      d->p.name = i == 0 ? "a->b" : "b->a";
      atomic_store(&d->writers_left, d->nw);
      sp->d[i] = d;
    }
    sps[n++] = sp;
  }
  for (int k = 0; k < n; k++) {
    struct stream_pair *sp = sps[k];
    CHECK_OK(loom_wg_add(&sp->wg, 1 + 2 + sp->d[0]->nw + sp->d[1]->nw));
    CHECK_OK(loom_go(sp_poker, sp));
    for (int i = 0; i < 2; i++) {
      CHECK_OK(loom_go(sp_reader, sp->d[i]));
      for (int w = 0; w < sp->d[i]->nw; w++)
        CHECK_OK(
            loom_go(sp_writer, (void *)((uintptr_t)sp->d[i] | (unsigned)w)));
    }
  }
  loom_sleep((int64_t)(100 + rn(r, 300)) * CHECK_MS);
  for (int k = 0; k < n; k++) {
    struct stream_pair *sp = sps[k];
    int victim = (int)rn(r, 2);
    switch (sp->end_how) {
    case END_CLOSE:
      sp_kill(sp, victim, false);
      break;
    case END_RESET:
      sp_kill(sp, victim, true);
      break;
    case END_SHUTDOWN:
      /* Both directions of one end shut: its reader sees the end of
       * input, its writers EPIPE; the peer reads to the end. */
      if (g_enter(&sp->g[victim])) {
        atomic_store(&sp->broken, 1);
        int e = loom_shutdown(sp->c[victim], SHUT_RDWR);
        g_leave(&sp->g[victim]);
        CHECK_OK(e);
      }
      break;
    default:
      break;
    }
    atomic_store(&sp->stop, 1);
  }
  /* Calm: once the pokers are gone, reset the write deadlines, so that
   * what is left of a stream flows to its end; a broken pair's are put
   * in the past instead, to free writers whose peer no longer reads. */
  for (int k = 0; k < n; k++) {
    struct stream_pair *sp = sps[k];
    while (!atomic_load(&sp->poker_done))
      loom_sleep(100000);
    for (int i = 0; i < 2; i++) {
      if (g_enter(&sp->g[i])) {
        int64_t wd = atomic_load(&sp->broken) ? loom_now() - 1 : 0;
        CHECK_OK(loom_set_write_deadline(sp->c[i], wd));
        g_leave(&sp->g[i]);
      }
    }
  }
  for (int k = 0; k < n; k++)
    atomic_store(&sps[k]->stop, 2);
  for (int k = 0; k < n; k++) {
    struct stream_pair *sp = sps[k];
    int64_t t0 = loom_now();
    int e = loom_wg_wait(&sp->wg, loom_now() + 500 * CHECK_MS);
    if (e != 0 && g_verbose)
      sp_dump(sp);
    if (e != 0)
      e = loom_wg_wait(&sp->wg, loom_now() + 20000 * CHECK_MS);
    if (e != 0)
      sp_dump(sp);
    CHECKF(e == 0, "pair %d (end %d): its coroutines did not finish in 20 s",
           sp->id, sp->end_how);
    if (g_verbose)
      fprintf(stderr, "pair %d end %d: drained in %lld ms\n", sp->id,
              sp->end_how, (long long)((loom_now() - t0) / CHECK_MS));
    if (sp->end_how == END_CLOSE || sp->end_how == END_RESET)
      CHECKF(atomic_load(&sp->late_ns) < PROMPT_NS,
             "pair %d: a call returned %lld ms after the close", sp->id,
             (long long)(atomic_load(&sp->late_ns) / CHECK_MS));
    for (int i = 0; i < 2; i++) {
      struct dir *d = sp->d[i];
      bool exact = sp->end_how == END_GRACEFUL;
      if (exact)
        CHECKF(d->eof, "pair %d dir %d: no end of stream", sp->id, i);
      sp_verify(d, exact);
      stats[0] += d->p.whole;
      stats[1] += d->p.torn;
    }
    for (int i = 0; i < 2; i++) {
      if (!atomic_load(&sp->dead[i]))
        CHECK_OK(loom_close(sp->c[i]));
      free(sp->d[i]);
    }
    loom_ctx_release(sp->parent);
    free(sp);
  }
}

static int g_end_kind;

static void streams_main(void *arg) {
  (void)arg;
  rng_t r;
  rng_seed(&r, g_seed);
  int64_t end = loom_now() + g_ms * CHECK_MS;
  long stats[2] = {0, 0};
  int rounds = 0;
  while (loom_now() < end) {
    stream_round(&r, g_end_kind, stats);
    rounds++;
  }
  fprintf(stderr, "%d rounds, %ld records whole, %ld torn\n", rounds, stats[0],
          stats[1]);
}

/* Graceful rounds: every write that succeeded is read, byte for byte. */
TEST(stream_exact) {
  g_end_kind = END_GRACEFUL;
  run_case("stream_exact", streams_main);
}

/* Rounds that end by a close, a reset or a shutdown under the users. */
TEST(stream_close_reset) {
  g_end_kind = -1;
  run_case("stream_close_reset", streams_main);
}

/* ---- packet sockets --------------------------------------------------
 *
 * A datagram: writer (1 byte), seq (4), length (2), then the payload of
 * rec_state(writer, seq).  Reads are whole datagrams, so several readers
 * may share a socket: each sees every writer's datagrams in order, and
 * over all of them each is seen once at most (exactly once on a Unix
 * socket, which does not drop, if its write succeeded). */
#define PW 6 /* writers per round, at most */
#define PSEQ 4096
#define DG_HDR 7

static size_t dg_make(uint8_t *out, unsigned w, uint32_t seq, uint32_t len) {
  out[0] = (uint8_t)w;
  memcpy(out + 1, &seq, 4);
  uint16_t l16 = (uint16_t)len;
  memcpy(out + 5, &l16, 2);
  uint64_t s = rec_state(w + 100, seq);
  for (uint32_t i = 0; i < len; i++)
    out[DG_HDR + i] = rec_byte(&s);
  return DG_HDR + len;
}

/* Check a datagram of full length `n` of which `got` bytes were kept. */
static void dg_check(const uint8_t *b, size_t n, size_t got, unsigned *w,
                     uint32_t *seq) {
  CHECKF(n >= DG_HDR, "datagram of %zu bytes", n);
  CHECKF(got >= DG_HDR, "datagram cut to %zu bytes", got);
  uint16_t l16;
  *w = b[0];
  memcpy(seq, b + 1, 4);
  memcpy(&l16, b + 5, 2);
  CHECKF(*w < PW && *seq < PSEQ && (size_t)l16 + DG_HDR == n,
         "bad datagram: w %u seq %u len %u of %zu", *w, *seq, l16, n);
  uint64_t s = rec_state(*w + 100, *seq);
  for (size_t i = DG_HDR; i < got; i++) {
    uint8_t want = rec_byte(&s);
    CHECKF(b[i] == want, "datagram w %u seq %u byte %zu: %#x want %#x", *w,
           *seq, i, b[i], want);
  }
}

enum { PK_UDP, PK_UDP_CONN, PK_UDP6, PK_UGRAM, PK_UGRAM_ABS, PK_UGRAM_CONN };
static const char *const pk_names[] = {"udp",       "udp connected",
                                       "udp6",      "unixgram",
                                       "unixgram@", "unixgram connected"};

struct pk_round {
  int kind;
  bool reliable; /* Unix: no datagram is dropped */
  loom_pconn *rx;
  loom_pconn *tx[2];
  int ntx;
  struct sockaddr_storage to;
  socklen_t tolen;
  int nw, nr;
  uint8_t wrote[PW][PSEQ];
  atomic_uchar seen[PW][PSEQ];
  atomic_int stop;   /* 1: writers stop; 2: calm */
  atomic_int paused; /* readers hold off (the queue fills) */
  atomic_int writers_left;
  loom_mutex ctx_mu;
  loom_ctx *parent;
  loom_wg wg, wwg;
  atomic_long sent, truncated;
};

static loom_ctx *pk_ctx(struct pk_round *pk, rng_t *r) {
  loom_mutex_lock(&pk->ctx_mu);
  loom_ctx *parent = loom_ctx_ref(pk->parent);
  loom_mutex_unlock(&pk->ctx_mu);
  loom_ctx *c;
  CHECK_OK(rn(r, 2)
               ? loom_ctx_with_timeout(&c, parent, (int64_t)rn(r, 4000) * 1000)
               : loom_ctx_with_cancel(&c, parent));
  loom_ctx_unref(parent);
  return c;
}

static void pk_writer(void *arg) {
  struct pk_round *pk = (struct pk_round *)((uintptr_t)arg & ~(uintptr_t)7);
  unsigned w = (unsigned)((uintptr_t)arg & 7);
  loom_pconn *tx = pk->tx[w % (unsigned)pk->ntx];
  bool conn = pk->kind == PK_UDP_CONN || pk->kind == PK_UGRAM_CONN;
  rng_t r;
  rng_seed(&r, g_seed ^ 0x77 ^ ((uint64_t)w << 12));
  uint8_t buf[4096];
  uint32_t maxlen = pk->kind <= PK_UDP6 ? 1400 : 3000;
  for (uint32_t seq = 0; seq < PSEQ && atomic_load(&pk->stop) == 0; seq++) {
    size_t n = dg_make(buf, w, seq, rn(&r, maxlen));
    const struct sockaddr *to = conn ? NULL : (struct sockaddr *)&pk->to;
    socklen_t tolen = conn ? 0 : pk->tolen;
    struct iovec iov[3];
    size_t a = rn(&r, (uint32_t)n + 1), b = rn(&r, (uint32_t)(n - a) + 1);
    iov[0] = (struct iovec){buf, a};
    iov[1] = (struct iovec){buf + a, b};
    iov[2] = (struct iovec){buf + a + b, n - a - b};
    loom_ctx *ctx = NULL;
    ssize_t res;
    switch (rn(&r, 4)) {
    case 0:
      res = conn ? loom_pconn_write(tx, buf, n)
                 : loom_pconn_write_to(tx, buf, n, to, tolen);
      break;
    case 1:
      res = loom_pconn_write_msg(tx, iov, 3, to, tolen);
      break;
    default:
      ctx = pk_ctx(pk, &r);
      res = loom_pconn_write_msg_ctx(tx, iov, 3, to, tolen, ctx);
      break;
    }
    pk->wrote[w][seq] = res == (ssize_t)n ? WROTE_OK : WROTE_FAILED;
    if (res != (ssize_t)n) {
      bool ok = res == -ETIMEDOUT || (ctx != NULL && is_ctx_err(res)) ||
                (!pk->reliable && res == -ENOBUFS);
      CHECKF(ok, "%s: write of %zu: %zd (%s)", pk_names[pk->kind], n, res,
             loom_err_name((int)res));
      check_ctx_result(res, ctx, "write_msg_ctx");
      if (rn(&r, 2))
        CHECK_OK(loom_pconn_set_write_deadline(tx, 0));
      else
        sleep_us(&r, 500);
    } else {
      atomic_fetch_add(&pk->sent, 1);
    }
    if (ctx != NULL)
      loom_ctx_release(ctx);
    if (!pk->reliable && rn(&r, 4) == 0)
      sleep_us(&r, 200); /* UDP: give the readers a chance */
  }
  atomic_fetch_sub(&pk->writers_left, 1);
  loom_wg_done(&pk->wwg);
}

/* A datagram read into buf[0..len) whose full length is n. */
static void pk_got(struct pk_round *pk, const uint8_t *buf, size_t len,
                   ssize_t n, int64_t *next) {
  size_t kept = (size_t)n < len ? (size_t)n : len;
  if ((size_t)n > len)
    atomic_fetch_add(&pk->truncated, 1);
  unsigned w;
  uint32_t seq;
  dg_check(buf, (size_t)n, kept, &w, &seq);
  CHECKF((int64_t)seq >= next[w], "%s: writer %u's datagram %u after %lld",
         pk_names[pk->kind], w, seq, (long long)next[w] - 1);
  next[w] = (int64_t)seq + 1;
  CHECKF(atomic_fetch_add(&pk->seen[w][seq], 1) == 0,
         "%s: writer %u's datagram %u read twice", pk_names[pk->kind], w, seq);
}

static void pk_reader(void *arg) {
  struct pk_round *pk = arg;
  rng_t r;
  rng_seed(&r, g_seed ^ 0x99 ^ (uint64_t)(uintptr_t)arg);
  uint8_t buf[4096];
  int64_t next[PW];
  for (int i = 0; i < PW; i++)
    next[i] = 0;
  for (;;) {
    if (atomic_load(&pk->stop) == 2)
      break;
    if (atomic_load(&pk->paused)) {
      loom_sleep(CHECK_MS);
      continue;
    }
    size_t len = rn(&r, 8) == 0 ? DG_HDR + rn(&r, 64) : sizeof buf;
    struct sockaddr_storage from;
    socklen_t fromlen = sizeof from;
    loom_ctx *ctx = NULL;
    ssize_t res;
    unsigned how = rn(&r, 3);
    if (how == 0) {
      res = loom_pconn_read_from(pk->rx, buf, len, &from, &fromlen);
    } else if (how == 1) {
      res = loom_pconn_read(pk->rx, buf, len);
    } else {
      ctx = pk_ctx(pk, &r);
      res = loom_pconn_read_from_ctx(pk->rx, buf, len, &from, &fromlen, ctx);
    }
    if (res >= 0) {
      pk_got(pk, buf, len, res, next);
    } else {
      CHECKF(res == -ETIMEDOUT || (ctx != NULL && is_ctx_err(res)),
             "%s: read: %zd (%s)", pk_names[pk->kind], res,
             loom_err_name((int)res));
      check_ctx_result(res, ctx, "read_from_ctx");
      if (rn(&r, 2))
        CHECK_OK(loom_pconn_set_read_deadline(pk->rx, 0));
      else
        sleep_us(&r, 300);
    }
    if (ctx != NULL)
      loom_ctx_release(ctx);
  }
  loom_wg_done(&pk->wg);
}

static void pk_poker(void *arg) {
  struct pk_round *pk = arg;
  rng_t r;
  rng_seed(&r, g_seed ^ 0x31337);
  while (atomic_load(&pk->stop) == 0) {
    int64_t dl = pick_deadline(&r);
    switch (rn(&r, 8)) {
    case 0:
    case 1:
      CHECK_OK(loom_pconn_set_read_deadline(pk->rx, dl));
      break;
    case 2:
    case 3:
      CHECK_OK(loom_pconn_set_write_deadline(pk->tx[rn(&r, 2) % pk->ntx], dl));
      break;
    case 4:
      CHECK_OK(loom_pconn_set_deadline(pk->tx[rn(&r, 2) % pk->ntx], dl, dl));
      break;
    case 5:
      /* Readers hold off: the receive queue fills and writers wait. */
      atomic_store(&pk->paused, 1);
      sleep_us(&r, 20000);
      atomic_store(&pk->paused, 0);
      break;
    default: {
      loom_ctx *n, *old;
      CHECK_OK(loom_ctx_with_cancel(&n, loom_ctx_background()));
      loom_mutex_lock(&pk->ctx_mu);
      old = pk->parent;
      pk->parent = n;
      loom_mutex_unlock(&pk->ctx_mu);
      loom_ctx_release(old);
      break;
    }
    }
    sleep_us(&r, 1500);
  }
  loom_wg_done(&pk->wg);
}

static bool pk_open(struct pk_round *pk) {
  char addr[108];
  int u = atomic_fetch_add(&g_uniq, 1);
  const char *net = "udp";
  switch (pk->kind) {
  case PK_UDP:
  case PK_UDP_CONN:
    CHECK_OK(loom_listen_packet(&pk->rx, "udp", "127.0.0.1:0"));
    CHECK_OK(loom_pconn_local_addr(pk->rx, addr, sizeof addr));
    break;
  case PK_UDP6:
    net = "udp6";
    if (loom_listen_packet(&pk->rx, "udp6", "[::1]:0") != 0)
      return false;
    CHECK_OK(loom_pconn_local_addr(pk->rx, addr, sizeof addr));
    break;
  default:
    net = "unixgram";
    snprintf(addr, sizeof addr, "%s/loom-ncg-%d-%d",
             pk->kind == PK_UGRAM_ABS ? "@" : "/tmp", (int)getpid(), u);
    CHECK_OK(loom_listen_packet(&pk->rx, "unixgram", addr));
    pk->reliable = true;
    break;
  }
  CHECK_OK(loom_resolve_addr(net, addr, &pk->to, &pk->tolen));
  pk->ntx = 1 + (int)(g_seed % 2);
  for (int i = 0; i < pk->ntx; i++) {
    if (pk->kind == PK_UDP_CONN || pk->kind == PK_UGRAM_CONN) {
      CHECK_OK(loom_dial_packet(&pk->tx[i], net, addr));
    } else if (pk->kind == PK_UDP || pk->kind == PK_UDP6) {
      CHECK_OK(loom_listen_packet(
          &pk->tx[i], net, pk->kind == PK_UDP ? "127.0.0.1:0" : "[::1]:0"));
    } else {
      char me[108];
      snprintf(me, sizeof me, "@loom-ncg-%d-%d-tx%d", (int)getpid(), u, i);
      CHECK_OK(loom_listen_packet(&pk->tx[i], "unixgram", me));
    }
  }
  return true;
}

static void pk_round_run(rng_t *r, int kind, long *tot) {
  struct pk_round *pk = calloc(1, sizeof *pk);
  CHECK(pk != NULL);
  pk->kind = kind;
  if (!pk_open(pk)) {
    free(pk);
    return;
  }
  pk->nw = 1 + (int)rn(r, PW);
  pk->nr = 1 + (int)rn(r, 3);
  atomic_store(&pk->writers_left, pk->nw);
  CHECK_OK(loom_ctx_with_cancel(&pk->parent, loom_ctx_background()));
  CHECK_OK(loom_wg_add(&pk->wg, pk->nr + 1));
  CHECK_OK(loom_wg_add(&pk->wwg, pk->nw));
  CHECK_OK(loom_go(pk_poker, pk));
  for (int i = 0; i < pk->nr; i++)
    CHECK_OK(loom_go(pk_reader, pk));
  for (int w = 0; w < pk->nw; w++)
    CHECK_OK(loom_go(pk_writer, (void *)((uintptr_t)pk | (unsigned)w)));
  loom_sleep((int64_t)(50 + rn(r, 200)) * CHECK_MS);
  atomic_store(&pk->stop, 1);
  /* Writers may wait for room (readers paused) or a passed deadline:
   * reset the write deadlines, the readers go on reading. */
  for (int i = 0; i < pk->ntx; i++)
    CHECK_OK(loom_pconn_set_write_deadline(pk->tx[i], 0));
  CHECKF(loom_wg_wait(&pk->wwg, loom_now() + 20000 * CHECK_MS) == 0,
         "%s: writers did not finish", pk_names[kind]);
  for (int i = 0; i < pk->ntx; i++)
    CHECK_OK(loom_pconn_set_write_deadline(pk->tx[i], 0));
  /* The readers leave at their next error; a reader may reset the
   * deadline after its own timeout, so pass it again until they are
   * gone. */
  atomic_store(&pk->stop, 2);
  int64_t give_up = loom_now() + 20000 * CHECK_MS;
  do {
    CHECK_OK(loom_pconn_set_read_deadline(pk->rx, loom_now() - 1));
    CHECKF(loom_now() < give_up, "%s: readers did not finish", pk_names[kind]);
  } while (loom_wg_wait(&pk->wg, loom_now() + 5 * CHECK_MS) != 0);
  /* What is left: read it here until nothing comes for a while. */
  int64_t next[PW];
  for (int i = 0; i < PW; i++)
    next[i] = 0;
  uint8_t buf[4096];
  for (;;) {
    CHECK_OK(loom_pconn_set_read_deadline(
        pk->rx, loom_now() + CHECK_SCALE(30, 80, 100) * CHECK_MS));
    ssize_t n = loom_pconn_read(pk->rx, buf, sizeof buf);
    if (n == -ETIMEDOUT)
      break;
    CHECKF(n >= 0, "drain: %zd (%s)", n, loom_err_name((int)n));
    pk_got(pk, buf, sizeof buf, n, next);
  }
  long seen = 0;
  for (int w = 0; w < pk->nw; w++)
    for (int q = 0; q < PSEQ; q++) {
      int sn = atomic_load(&pk->seen[w][q]);
      CHECKF(sn == 0 || pk->wrote[w][q] == WROTE_OK,
             "%s: writer %d's datagram %d read, write said %d", pk_names[kind],
             w, q, pk->wrote[w][q]);
      if (pk->reliable)
        CHECKF(sn == 1 || pk->wrote[w][q] != WROTE_OK,
               "%s: writer %d's datagram %d written, never read",
               pk_names[kind], w, q);
      seen += sn;
    }
  tot[0] += pk->sent;
  tot[1] += seen;
  tot[2] += pk->truncated;
  CHECK_OK(loom_pconn_close(pk->rx));
  for (int i = 0; i < pk->ntx; i++)
    CHECK_OK(loom_pconn_close(pk->tx[i]));
  loom_ctx_release(pk->parent);
  free(pk);
}

static void packets_main(void *arg) {
  (void)arg;
  rng_t r;
  rng_seed(&r, g_seed);
  int64_t end = loom_now() + g_ms * CHECK_MS;
  long tot[3] = {0, 0, 0};
  int rounds = 0;
  while (loom_now() < end) {
    pk_round_run(&r, (int)rn(&r, 6), tot);
    rounds++;
  }
  fprintf(stderr, "%d rounds, %ld datagrams sent, %ld read (%ld cut)\n", rounds,
          tot[0], tot[1], tot[2]);
}

TEST(packet_exact) { run_case("packet_exact", packets_main); }

/* ---- unconnected unixgram writers and peers that fill, drain, vanish -- */

#define VP 4 /* peers */
#define VW 6 /* writers */

struct vanish {
  loom_pconn *tx;
  loom_pconn *peer[VP];
  struct sockaddr_storage addr[VP];
  socklen_t alen[VP];
  bool abstract_[VP];
  struct guard g[VP];
  atomic_int gone[VP];
  int64_t gone_at[VP];
  atomic_int mode[VP]; /* 0 drains, 1 stuck (reads nothing) */
  atomic_int stop;
  atomic_llong late_ns;
  atomic_long ok, refused, timedout;
  loom_wg wg;
  loom_mutex ctx_mu;
  loom_ctx *parent;
};

static void v_writer(void *arg) {
  struct vanish *v = (struct vanish *)((uintptr_t)arg & ~(uintptr_t)7);
  unsigned w = (unsigned)((uintptr_t)arg & 7);
  rng_t r;
  rng_seed(&r, g_seed ^ 0xfeed ^ w);
  uint8_t buf[2048];
  uint32_t seq = 0;
  while (!atomic_load(&v->stop)) {
    int k = (int)rn(&r, VP);
    size_t n = dg_make(buf, w, seq++ % PSEQ, rn(&r, 1000));
    bool was_gone = atomic_load(&v->gone[k]);
    loom_ctx *ctx = NULL;
    ssize_t res;
    if (rn(&r, 3) == 0) {
      CHECK_OK(loom_ctx_with_timeout(&ctx, loom_ctx_background(),
                                     (int64_t)rn(&r, 20000) * 1000));
      struct iovec iov = {buf, n};
      res = loom_pconn_write_msg_ctx(
          v->tx, &iov, 1, (struct sockaddr *)&v->addr[k], v->alen[k], ctx);
    } else {
      if (rn(&r, 2))
        CHECK_OK(loom_pconn_set_write_deadline(
            v->tx, loom_now() + (int64_t)rn(&r, 30000) * 1000));
      res = loom_pconn_write_to(v->tx, buf, n, (struct sockaddr *)&v->addr[k],
                                v->alen[k]);
    }
    if (!was_gone && atomic_load(&v->gone[k])) {
      int64_t late = loom_now() - v->gone_at[k];
      long long cur = atomic_load(&v->late_ns);
      while (late > cur &&
             !atomic_compare_exchange_weak(&v->late_ns, &cur, late))
        ;
    }
    if (res == (ssize_t)n) {
      /* A datagram may land in a socket closed just after. */
      atomic_fetch_add(&v->ok, 1);
    } else if (res == -ECONNREFUSED || res == -ENOENT) {
      CHECKF(atomic_load(&v->gone[k]), "peer %d: %s while it is there", k,
             loom_err_name((int)res));
      atomic_fetch_add(&v->refused, 1);
    } else {
      CHECKF(res == -ETIMEDOUT || (ctx != NULL && is_ctx_err(res)),
             "write_to peer %d (gone %d): %zd (%s)", k, was_gone, res,
             loom_err_name((int)res));
      check_ctx_result(res, ctx, "write_msg_ctx");
      atomic_fetch_add(&v->timedout, 1);
      CHECK_OK(loom_pconn_set_write_deadline(v->tx, 0));
    }
    if (ctx != NULL)
      loom_ctx_release(ctx);
  }
  loom_wg_done(&v->wg);
}

static void v_peer(void *arg) {
  struct vanish *v = (struct vanish *)((uintptr_t)arg & ~(uintptr_t)7);
  int k = (int)((uintptr_t)arg & 7);
  uint8_t buf[2048];
  for (;;) {
    if (atomic_load(&v->mode[k]) == 1 && !atomic_load(&v->stop)) {
      loom_sleep(CHECK_MS);
      continue;
    }
    if (!g_enter(&v->g[k]))
      break;
    ssize_t res = loom_pconn_read(v->peer[k], buf, sizeof buf);
    g_leave(&v->g[k]);
    if (res == LOOM_ECLOSED)
      break;
    CHECKF(res >= 0, "peer %d read: %zd (%s)", k, res, loom_err_name((int)res));
    unsigned w;
    uint32_t seq;
    dg_check(buf, (size_t)res, (size_t)res, &w, &seq);
    CHECK(w < VW);
  }
  loom_wg_done(&v->wg);
}

static void vanish_main(void *arg) {
  (void)arg;
  rng_t r;
  rng_seed(&r, g_seed);
  int64_t end = loom_now() + g_ms * CHECK_MS;
  int rounds = 0;
  long ok = 0, refused = 0, timedout = 0;
  int64_t late = 0;
  while (loom_now() < end) {
    struct vanish *v = calloc(1, sizeof *v);
    CHECK(v != NULL);
    int u = atomic_fetch_add(&g_uniq, 1);
    char a[108];
    snprintf(a, sizeof a, "@loom-ncv-%d-%d-tx", (int)getpid(), u);
    CHECK_OK(loom_listen_packet(&v->tx, "unixgram", a));
    for (int k = 0; k < VP; k++) {
      v->abstract_[k] = rn(&r, 2);
      snprintf(a, sizeof a, "%s/loom-ncv-%d-%d-%d",
               v->abstract_[k] ? "@" : "/tmp", (int)getpid(), u, k);
      CHECK_OK(loom_listen_packet(&v->peer[k], "unixgram", a));
      CHECK_OK(loom_resolve_addr("unixgram", a, &v->addr[k], &v->alen[k]));
      atomic_store(&v->mode[k], (int)rn(&r, 2));
    }
    CHECK_OK(loom_wg_add(&v->wg, VW + VP));
    for (int k = 0; k < VP; k++)
      CHECK_OK(loom_go(v_peer, (void *)((uintptr_t)v | (unsigned)k)));
    for (int w = 0; w < VW; w++)
      CHECK_OK(loom_go(v_writer, (void *)((uintptr_t)v | (unsigned)w)));
    /* Peers switch between draining and stuck, then vanish one by one
     * (one stays, stuck or not, until the end). */
    int64_t round_end = loom_now() + (int64_t)(150 + rn(&r, 250)) * CHECK_MS;
    int vanished = 0;
    while (loom_now() < round_end) {
      loom_sleep((int64_t)(5 + rn(&r, 30)) * CHECK_MS);
      int k = (int)rn(&r, VP);
      if (atomic_load(&v->gone[k]))
        continue;
      if (rn(&r, 3) == 0 && vanished < VP - 1) {
        g_stop_and_wait(&v->g[k], v->peer[k]);
        v->gone_at[k] = loom_now();
        atomic_store(&v->gone[k], 1);
        CHECK_OK(loom_pconn_close(v->peer[k]));
        vanished++;
      } else {
        atomic_store(&v->mode[k], !atomic_load(&v->mode[k]));
      }
    }
    /* Stuck peers drain now, so writers waiting for them go on; then the
     * rest of the peers vanish under their readers and the writers. */
    atomic_store(&v->stop, 1);
    loom_sleep(40 * CHECK_MS);
    for (int k = 0; k < VP; k++)
      if (!atomic_load(&v->gone[k])) {
        g_stop_and_wait(&v->g[k], v->peer[k]);
        v->gone_at[k] = loom_now();
        atomic_store(&v->gone[k], 1);
        CHECK_OK(loom_pconn_close(v->peer[k]));
      }
    CHECKF(loom_wg_wait(&v->wg, loom_now() + 20000 * CHECK_MS) == 0,
           "vanish: writers or peers did not finish");
    ok += atomic_load(&v->ok);
    refused += atomic_load(&v->refused);
    timedout += atomic_load(&v->timedout);
    if (atomic_load(&v->late_ns) > late)
      late = atomic_load(&v->late_ns);
    CHECKF(atomic_load(&v->late_ns) < PROMPT_NS + 20 * CHECK_MS,
           "a write to a vanished peer returned %lld ms after it went",
           (long long)(atomic_load(&v->late_ns) / CHECK_MS));
    CHECK_OK(loom_pconn_close(v->tx));
    free(v);
    rounds++;
  }
  fprintf(stderr,
          "%d rounds: %ld sent, %ld refused, %ld timed out; slowest "
          "return after a peer vanished %lld ms\n",
          rounds, ok, refused, timedout, (long long)(late / CHECK_MS));
}

TEST(unixgram_peers_vanish) { run_case("unixgram_peers_vanish", vanish_main); }

/* ---- loom_fd_wait on pipes and eventfds ------------------------------
 *
 * One waiter per fd drains it (so 0 means the fd is ready now, as poll
 * says); an intruder waits on the same fds now and then (-EBUSY for one
 * of the two); feeders add from coroutines and from a plain thread.
 * Write waits: a pipe kept full by its waiter, drained by a feeder. */
#define FW 6

struct fdw {
  int fd[FW];      /* read end, or the eventfd */
  int wfd[FW];     /* write end (the eventfd itself) */
  bool write_[FW]; /* the waiter waits to write (a full pipe) */
  atomic_int stop;
  atomic_long ready, timedout, busy, cancelled, spurious;
  atomic_llong late_ns;
  loom_wg wg;
};

static void fdw_fill(int fd) {
  char b[4096];
  memset(b, 'x', sizeof b);
  while (write(fd, b, sizeof b) > 0)
    ;
}

static void fdw_drain(int fd) {
  char b[8192];
  while (read(fd, b, sizeof b) > 0)
    ;
}

static void fdw_waiter(void *arg) {
  struct fdw *x = (struct fdw *)((uintptr_t)arg & ~(uintptr_t)7);
  int i = (int)((uintptr_t)arg & 7);
  rng_t r;
  rng_seed(&r, g_seed ^ 0xfd ^ (uint64_t)i);
  int ev = x->write_[i] ? LOOM_FD_WRITE : LOOM_FD_READ;
  int fd = x->write_[i] ? x->wfd[i] : x->fd[i];
  short pev = x->write_[i] ? POLLOUT : POLLIN;
  while (!atomic_load(&x->stop)) {
    int64_t dl = pick_deadline(&r);
    if (dl == 0 && rn(&r, 2))
      dl = loom_now() + 20 * CHECK_MS; /* bound the wait for the stop */
    loom_ctx *ctx = NULL;
    int res;
    if (rn(&r, 3) == 0) {
      CHECK_OK(loom_ctx_with_timeout(&ctx, loom_ctx_background(),
                                     (int64_t)rn(&r, 3000) * 1000));
      res = loom_fd_wait_ctx(fd, ev, dl, ctx);
    } else {
      res = loom_fd_wait(fd, ev, dl);
    }
    int64_t now = loom_now();
    if (res == 0) {
      struct pollfd p = {fd, pev, 0};
      if (poll(&p, 1, 0) != 1 || !(p.revents & pev)) {
        atomic_fetch_add(&x->spurious, 1);
        if (g_verbose)
          fprintf(stderr, "fd %d (%s): ready, poll says %#x\n", i,
                  x->write_[i] ? "pipe, write"
                  : i % 3      ? "pipe"
                               : "eventfd",
                  p.revents);
      }
      atomic_fetch_add(&x->ready, 1);
      if (x->write_[i])
        fdw_fill(fd);
      else
        fdw_drain(fd);
    } else if (res == -EBUSY) {
      atomic_fetch_add(&x->busy, 1);
      loom_sleep(100000);
    } else if (res == -ETIMEDOUT && (ctx == NULL || loom_ctx_err(ctx) == 0)) {
      CHECKF(dl != 0 && now >= dl, "fd_wait timed out %lld ns early",
             (long long)(dl - now));
      if (now - dl > atomic_load(&x->late_ns))
        atomic_store(&x->late_ns, now - dl);
      atomic_fetch_add(&x->timedout, 1);
    } else {
      CHECKF(ctx != NULL && res == loom_ctx_err(ctx), "fd_wait: %d (%s)", res,
             loom_err_name(res));
      atomic_fetch_add(&x->cancelled, 1);
    }
    if (ctx != NULL)
      loom_ctx_release(ctx);
  }
  loom_wg_done(&x->wg);
}

/* Waits on any of the fds for a moment: the waiter or it gets -EBUSY. */
static void fdw_intruder(void *arg) {
  struct fdw *x = arg;
  rng_t r;
  rng_seed(&r, g_seed ^ 0x1d);
  while (!atomic_load(&x->stop)) {
    int i = (int)rn(&r, FW);
    int res = loom_fd_wait(x->write_[i] ? x->wfd[i] : x->fd[i],
                           x->write_[i] ? LOOM_FD_WRITE : LOOM_FD_READ,
                           loom_now() + (int64_t)rn(&r, 2000) * 1000);
    CHECKF(res == 0 || res == -ETIMEDOUT || res == -EBUSY,
           "intruder fd_wait: %d (%s)", res, loom_err_name(res));
    if (res == 0)
      loom_sleep(200000); /* the waiter takes it */
    sleep_us(&r, 500);
  }
  loom_wg_done(&x->wg);
}

static void fdw_feed(struct fdw *x, rng_t *r) {
  int i = (int)rn(r, FW);
  if (x->write_[i]) {
    fdw_drain(x->fd[i]);
  } else {
    uint64_t one = 1;
    ssize_t n = write(x->wfd[i], &one, sizeof one);
    (void)n;
  }
}

static void fdw_feeder(void *arg) {
  struct fdw *x = arg;
  rng_t r;
  rng_seed(&r, g_seed ^ 0xfeed1);
  while (!atomic_load(&x->stop)) {
    fdw_feed(x, &r);
    sleep_us(&r, 3000);
  }
  loom_wg_done(&x->wg);
}

static void *fdw_thread(void *arg) {
  struct fdw *x = arg;
  rng_t r;
  rng_seed(&r, g_seed ^ 0x7777);
  while (!atomic_load(&x->stop)) {
    fdw_feed(x, &r);
    struct timespec ts = {0, (long)rn(&r, 2000) * 1000};
    nanosleep(&ts, NULL);
  }
  return NULL;
}

static void fdw_main(void *arg) {
  (void)arg;
  struct fdw *x = calloc(1, sizeof *x);
  CHECK(x != NULL);
  for (int i = 0; i < FW; i++) {
    if (i % 3 == 0) {
      x->fd[i] = x->wfd[i] = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
      CHECK(x->fd[i] >= 0);
    } else {
      int p[2];
      CHECK_OK(pipe2(p, O_NONBLOCK | O_CLOEXEC));
      x->fd[i] = p[0];
      x->wfd[i] = p[1];
      x->write_[i] = i % 3 == 2;
      if (x->write_[i])
        fdw_fill(p[1]);
    }
  }
  pthread_t th;
  CHECK_OK(pthread_create(&th, NULL, fdw_thread, x));
  CHECK_OK(loom_wg_add(&x->wg, FW + 2));
  for (int i = 0; i < FW; i++)
    CHECK_OK(loom_go(fdw_waiter, (void *)((uintptr_t)x | (unsigned)i)));
  CHECK_OK(loom_go(fdw_intruder, x));
  CHECK_OK(loom_go(fdw_feeder, x));
  loom_sleep(g_ms * CHECK_MS);
  atomic_store(&x->stop, 1);
  /* Wake waiters without a deadline. */
  for (int i = 0; i < FW; i++) {
    if (x->write_[i]) {
      fdw_drain(x->fd[i]);
    } else {
      uint64_t one = 1;
      CHECK_EQ(write(x->wfd[i], &one, sizeof one), (ssize_t)sizeof one);
    }
  }
  CHECKF(loom_wg_wait(&x->wg, loom_now() + PROMPT_NS + 100 * CHECK_MS) == 0,
         "fd waiters did not see the last readiness");
  CHECK_OK(pthread_join(th, NULL));
  fprintf(stderr,
          "fd_wait: %ld ready (%ld not), %ld timed out (latest by %lld us), "
          "%ld busy, %ld cancelled\n",
          atomic_load(&x->ready), atomic_load(&x->spurious),
          atomic_load(&x->timedout), atomic_load(&x->late_ns) / 1000,
          atomic_load(&x->busy), atomic_load(&x->cancelled));
  /* Readiness is a hint (fd.h), as in Go, whose poller has the same
   * window: an event checked against the pd's tag just before the wait
   * ends may wake the pd's next user. */
  CHECKF(atomic_load(&x->spurious) <= 2 + atomic_load(&x->ready) / 100,
         "%ld of %ld readies were not", atomic_load(&x->spurious),
         atomic_load(&x->ready));
  for (int i = 0; i < FW; i++) {
    close(x->fd[i]);
    if (x->wfd[i] != x->fd[i])
      close(x->wfd[i]);
  }
  free(x);
}

TEST(fd_wait_race) { run_case("fd_wait_race", fdw_main); }

/* ---- accept and dial under deadlines and cancels ---------------------
 *
 * Dialers connect and send a token; acceptors read it.  When the chaos
 * stops, every token of a dial that succeeded must be accepted; then the
 * listener is closed under its parked acceptors (LOOM_ECLOSED, at once). */
#define AD_DIAL 6
#define AD_ACC 3

struct ad {
  loom_listener *l;
  char net[8], addr[108];
  struct guard g;
  atomic_int stop, closed;
  atomic_long dialed, accepted, dial_fail, acc_fail;
  loom_mutex ctx_mu;
  loom_ctx *parent;
  loom_wg dwg, awg;
  int64_t closed_at;
  atomic_llong late_ns;
};

static void ad_dialer(void *arg) {
  struct ad *a = (struct ad *)((uintptr_t)arg & ~(uintptr_t)7);
  rng_t r;
  rng_seed(&r, g_seed ^ 0xd1a1 ^ ((uintptr_t)arg & 7));
  while (!atomic_load(&a->stop)) {
    loom_dial_opts o = {0};
    loom_ctx *ctx = NULL;
    if (rn(&r, 2))
      o.deadline = loom_now() + (int64_t)rn(&r, 5000) * 1000;
    if (rn(&r, 3) == 0) {
      loom_mutex_lock(&a->ctx_mu);
      CHECK_OK(
          loom_ctx_with_timeout(&ctx, a->parent, (int64_t)rn(&r, 5000) * 1000));
      loom_mutex_unlock(&a->ctx_mu);
      o.ctx = ctx;
    }
    if (o.deadline == 0 && ctx == NULL)
      o.deadline = loom_now() + 200 * CHECK_MS; /* bound the round */
    loom_conn *c;
    int e = loom_dial_with(&c, a->net, a->addr, &o);
    bool closed = atomic_load(&a->closed);
    if (e == 0) {
      uint64_t tok = 1;
      ssize_t n = loom_write(c, &tok, sizeof tok);
      /* a listener closed with us in its backlog resets us */
      CHECKF(n == (ssize_t)sizeof tok ||
                 (atomic_load(&a->closed) && (n == -EPIPE || n == -ECONNRESET)),
             "token write: %zd (%s)", n, loom_err_name((int)n));
      atomic_fetch_add(&a->dialed, 1);
      CHECK_OK(loom_close(c));
    } else {
      CHECKF(e == -ETIMEDOUT || (ctx != NULL && is_ctx_err(e)) ||
                 (closed && (e == -ECONNREFUSED || e == -ENOENT ||
                             e == -ECONNRESET /* reset mid-handshake */)),
             "dial %s %s: %d (%s)", a->net, a->addr, e, loom_err_name(e));
      check_ctx_result(e, ctx, "dial ctx");
      atomic_fetch_add(&a->dial_fail, 1);
    }
    if (ctx != NULL)
      loom_ctx_release(ctx);
    sleep_us(&r, 500);
  }
  loom_wg_done(&a->dwg);
}

static void ad_acceptor(void *arg) {
  struct ad *a = (struct ad *)((uintptr_t)arg & ~(uintptr_t)7);
  rng_t r;
  rng_seed(&r, g_seed ^ 0xacc ^ ((uintptr_t)arg & 7));
  for (;;) {
    loom_ctx *ctx = NULL;
    bool calm = atomic_load(&a->stop) != 0;
    if (!calm && rn(&r, 3) == 0) {
      loom_mutex_lock(&a->ctx_mu);
      CHECK_OK(
          loom_ctx_with_timeout(&ctx, a->parent, (int64_t)rn(&r, 5000) * 1000));
      loom_mutex_unlock(&a->ctx_mu);
    }
    if (!g_enter(&a->g)) {
      if (ctx != NULL)
        loom_ctx_release(ctx);
      break;
    }
    loom_conn *c;
    int e =
        ctx != NULL ? loom_accept_ctx(a->l, &c, ctx) : loom_accept(a->l, &c);
    g_leave(&a->g);
    if (atomic_load(&a->closed)) {
      int64_t late = loom_now() - a->closed_at;
      if (late > atomic_load(&a->late_ns))
        atomic_store(&a->late_ns, late);
    }
    if (e == 0) {
      uint64_t tok = 0;
      CHECK_OK(loom_set_read_deadline(c, loom_now() + 2000 * CHECK_MS));
      ssize_t n = loom_read(c, &tok, sizeof tok);
      /* a dial that timed out after the handshake sends nothing */
      CHECKF(n == (ssize_t)sizeof tok || n == 0 || n == -ECONNRESET,
             "token read: %zd (%s)", n, loom_err_name((int)n));
      if (n == (ssize_t)sizeof tok)
        atomic_fetch_add(&a->accepted, 1);
      CHECK_OK(loom_close(c));
    } else {
      bool ok = e == -ETIMEDOUT || (ctx != NULL && is_ctx_err(e)) ||
                (atomic_load(&a->closed) && e == LOOM_ECLOSED);
      CHECKF(ok, "accept: %d (%s)", e, loom_err_name(e));
      check_ctx_result(e, ctx, "accept_ctx");
      atomic_fetch_add(&a->acc_fail, 1);
      if (e == LOOM_ECLOSED) {
        if (ctx != NULL)
          loom_ctx_release(ctx);
        break;
      }
      if (calm || rn(&r, 2)) {
        if (g_enter(&a->g)) {
          CHECK_OK(loom_listener_set_deadline(a->l, 0));
          g_leave(&a->g);
        }
      }
    }
    if (ctx != NULL)
      loom_ctx_release(ctx);
  }
  loom_wg_done(&a->awg);
}

static void ad_main(void *arg) {
  (void)arg;
  rng_t r;
  rng_seed(&r, g_seed);
  int64_t end = loom_now() + g_ms * CHECK_MS;
  int rounds = 0;
  long dialed = 0, dfail = 0, afail = 0;
  int64_t late = 0;
  while (loom_now() < end) {
    struct ad *a = calloc(1, sizeof *a);
    CHECK(a != NULL);
    int kind = (int)rn(&r, 3);
    loom_listen_opts lo = {.backlog = kind == 0 ? 0 : 1 + (int)rn(&r, 4)};
    if (kind == 0) {
      snprintf(a->net, sizeof a->net, "tcp");
      CHECK_OK(loom_listen_with(&a->l, "tcp", "127.0.0.1:0", &lo));
      CHECK_OK(loom_listener_addr(a->l, a->addr, sizeof a->addr));
    } else {
      snprintf(a->net, sizeof a->net, "unix");
      snprintf(a->addr, sizeof a->addr, "%s/loom-nca-%d-%d",
               kind == 1 ? "/tmp" : "@", (int)getpid(),
               atomic_fetch_add(&g_uniq, 1));
      CHECK_OK(loom_listen_with(&a->l, "unix", a->addr, &lo));
    }
    CHECK_OK(loom_ctx_with_cancel(&a->parent, loom_ctx_background()));
    int nd = 1 + (int)rn(&r, AD_DIAL), na = 1 + (int)rn(&r, AD_ACC);
    CHECK_OK(loom_wg_add(&a->dwg, nd));
    CHECK_OK(loom_wg_add(&a->awg, na));
    for (int i = 0; i < na; i++)
      CHECK_OK(loom_go(ad_acceptor, (void *)((uintptr_t)a | (unsigned)i)));
    for (int i = 0; i < nd; i++)
      CHECK_OK(loom_go(ad_dialer, (void *)((uintptr_t)a | (unsigned)i)));
    int64_t round_end = loom_now() + (int64_t)(100 + rn(&r, 200)) * CHECK_MS;
    while (loom_now() < round_end) {
      sleep_us(&r, 3000);
      if (rn(&r, 4) == 0) {
        loom_ctx *n, *old;
        CHECK_OK(loom_ctx_with_cancel(&n, loom_ctx_background()));
        loom_mutex_lock(&a->ctx_mu);
        old = a->parent;
        a->parent = n;
        loom_mutex_unlock(&a->ctx_mu);
        loom_ctx_release(old);
      } else {
        int64_t dl = pick_deadline(&r);
        CHECK(g_enter(&a->g));
        CHECK_OK(loom_listener_set_deadline(a->l, dl));
        g_leave(&a->g);
      }
    }
    if (rn(&r, 3) == 0) {
      /* Close the listener under dialers and acceptors alike: dials fail
       * with ECONNREFUSED (ENOENT for a path that is gone), and whoever
       * was in the backlog is reset. */
      g_stop_and_wait(&a->g, a->l);
      a->closed_at = loom_now();
      atomic_store(&a->closed, 1);
      CHECK_OK(loom_listener_close(a->l));
      loom_sleep((int64_t)rn(&r, 20) * CHECK_MS);
      atomic_store(&a->stop, 1);
      CHECKF(loom_wg_wait(&a->dwg, loom_now() + 20000 * CHECK_MS) == 0,
             "dialers did not finish");
      CHECKF(loom_wg_wait(&a->awg, loom_now() + 20000 * CHECK_MS) == 0,
             "acceptors did not finish");
      CHECK_LE(atomic_load(&a->accepted), atomic_load(&a->dialed));
      goto next;
    }
    atomic_store(&a->stop, 1);
    CHECKF(loom_wg_wait(&a->dwg, loom_now() + 20000 * CHECK_MS) == 0,
           "dialers did not finish");
    CHECK(g_enter(&a->g));
    CHECK_OK(loom_listener_set_deadline(a->l, 0));
    g_leave(&a->g);
    /* Every connection made is accepted and its token read. */
    int64_t give_up = loom_now() + 5000 * CHECK_MS;
    while (atomic_load(&a->accepted) < atomic_load(&a->dialed)) {
      CHECKF(loom_now() < give_up, "%s %s: %ld dialed, %ld accepted", a->net,
             a->addr, atomic_load(&a->dialed), atomic_load(&a->accepted));
      loom_sleep(CHECK_MS);
    }
    CHECK_EQ(atomic_load(&a->accepted), atomic_load(&a->dialed));
    loom_sleep(5 * CHECK_MS); /* the acceptors park */
    g_stop_and_wait(&a->g, a->l);
    a->closed_at = loom_now();
    atomic_store(&a->closed, 1);
    CHECK_OK(loom_listener_close(a->l));
    CHECKF(loom_wg_wait(&a->awg, loom_now() + 20000 * CHECK_MS) == 0,
           "acceptors did not finish");
    CHECKF(atomic_load(&a->late_ns) < PROMPT_NS,
           "an accept returned %lld ms after the close",
           (long long)(atomic_load(&a->late_ns) / CHECK_MS));
  next:
    if (atomic_load(&a->late_ns) > late)
      late = atomic_load(&a->late_ns);
    dialed += atomic_load(&a->dialed);
    dfail += atomic_load(&a->dial_fail);
    afail += atomic_load(&a->acc_fail);
    loom_ctx_release(a->parent);
    free(a);
    rounds++;
  }
  fprintf(stderr,
          "%d rounds: %ld connections, %ld dials and %ld accepts failed; "
          "slowest accept after close %lld us\n",
          rounds, dialed, dfail, afail, (long long)(late / 1000));
}

TEST(accept_dial_race) { run_case("accept_dial_race", ad_main); }

/* ---- parked calls cost no CPU, and a close wakes each at once ---------- */

struct idle {
  loom_conn *tcp[2], *ux[2];
  loom_conn *peer[3]; /* the other ends, closed last: no end of stream */
  loom_listener *l;
  loom_pconn *udp, *ug_tx, *ug_rx;
  struct sockaddr_storage ug_to;
  socklen_t ug_tolen;
  int pipe_[2];
  loom_ctx *ctx;
  atomic_int parked_ret[8];
  atomic_llong ret_at[8];
  char buf[8][64 * 1024]; /* not on a stack, nor lost with one */
  loom_wg wg;
};

#define IDLE_NOT_YET 12345

static void idle_op(void *arg) {
  struct idle *x = (struct idle *)((uintptr_t)arg & ~(uintptr_t)7);
  int k = (int)((uintptr_t)arg & 7);
  size_t cap = sizeof x->buf[k];
  char *buf = x->buf[k];
  memset(buf, 'y', cap);
  int res = 0;
  switch (k) {
  case 0: /* a TCP read, no deadline */
    res = (int)loom_read(x->tcp[0], buf, cap);
    break;
  case 1: /* a TCP read under a context that is not cancelled */
    res = (int)loom_read_ctx(x->tcp[1], buf, cap, x->ctx);
    break;
  case 2: /* a Unix write to a peer that does not read */
    for (;;) {
      res = (int)loom_write(x->ux[0], buf, cap);
      if (res < 0)
        break;
    }
    break;
  case 3: {
    loom_conn *c;
    res = loom_accept(x->l, &c);
    break;
  }
  case 4:
    res = (int)loom_pconn_read(x->udp, buf, cap);
    break;
  case 5: /* unconnected unixgram write to a full peer: it naps */
    for (;;) {
      res = (int)loom_pconn_write_to(x->ug_tx, buf, 100,
                                     (struct sockaddr *)&x->ug_to, x->ug_tolen);
      if (res < 0)
        break;
    }
    break;
  case 6:
    res = loom_fd_wait(x->pipe_[0], LOOM_FD_READ, 0);
    break;
  default: /* a far deadline */
    CHECK_OK(loom_set_read_deadline(x->ux[0], loom_now() + 60000 * CHECK_MS));
    res = (int)loom_read(x->ux[0], buf, cap);
    break;
  }
  atomic_store(&x->ret_at[k], loom_now());
  atomic_store(&x->parked_ret[k], res);
  loom_wg_done(&x->wg);
}

static void idle_main(void *arg) {
  (void)arg;
  struct idle *x = calloc(1, sizeof *x);
  CHECK(x != NULL);
  rng_t r;
  rng_seed(&r, g_seed);
  CHECK(sp_connect(&r, 0, &x->tcp[0], &x->peer[0]) == 0);
  CHECK(sp_connect(&r, 0, &x->tcp[1], &x->peer[1]) == 0);
  CHECK(sp_connect(&r, 2, &x->ux[0], &x->peer[2]) == 0);
  CHECK_OK(loom_listen(&x->l, "tcp", "127.0.0.1:0"));
  CHECK_OK(loom_listen_packet(&x->udp, "udp", "127.0.0.1:0"));
  char a[108];
  snprintf(a, sizeof a, "@loom-nci-%d-rx", (int)getpid());
  CHECK_OK(loom_listen_packet(&x->ug_rx, "unixgram", a));
  CHECK_OK(loom_resolve_addr("unixgram", a, &x->ug_to, &x->ug_tolen));
  snprintf(a, sizeof a, "@loom-nci-%d-tx", (int)getpid());
  CHECK_OK(loom_listen_packet(&x->ug_tx, "unixgram", a));
  CHECK_OK(pipe2(x->pipe_, O_NONBLOCK | O_CLOEXEC));
  CHECK_OK(loom_ctx_with_cancel(&x->ctx, loom_ctx_background()));
  for (int k = 0; k < 8; k++)
    atomic_store(&x->parked_ret[k], IDLE_NOT_YET);
  CHECK_OK(loom_wg_add(&x->wg, 8));
  for (int k = 0; k < 8; k++)
    CHECK_OK(loom_go(idle_op, (void *)((uintptr_t)x | (unsigned)k)));
  loom_sleep(100 * CHECK_MS); /* all parked (the writers filled up) */
  int64_t c0 = check_cpu_ns(), t0 = check_mono_ns();
  loom_sleep(400 * CHECK_MS);
  int64_t cpu = check_cpu_ns() - c0, wall = check_mono_ns() - t0;
  fprintf(stderr, "idle: %lld us of CPU over %lld ms parked\n",
          (long long)(cpu / 1000), (long long)(wall / CHECK_MS));
  CHECKF(cpu < wall / CHECK_SCALE(10, 5, 3),
         "parked calls burned %lld us of CPU in %lld ms",
         (long long)(cpu / 1000), (long long)(wall / CHECK_MS));
  for (int k = 0; k < 8; k++)
    CHECKF(atomic_load(&x->parked_ret[k]) == IDLE_NOT_YET,
           "op %d returned %d while it should be parked", k,
           atomic_load(&x->parked_ret[k]));
  /* Close each under its parked call: LOOM_ECLOSED, promptly. */
  int64_t t_close = loom_now();
  CHECK_OK(loom_close(x->tcp[0]));
  CHECK_OK(loom_close(x->tcp[1]));
  CHECK_OK(loom_close(x->ux[0]));
  CHECK_OK(loom_listener_close(x->l));
  CHECK_OK(loom_pconn_close(x->udp));
  CHECK_OK(loom_pconn_close(x->ug_tx));
  CHECK_EQ(write(x->pipe_[1], "z", 1), 1);
  CHECKF(loom_wg_wait(&x->wg, loom_now() + PROMPT_NS) == 0,
         "a parked call did not return after its close");
  for (int k = 0; k < 8; k++) {
    int want = k == 6 ? 0 : LOOM_ECLOSED;
    CHECKF(atomic_load(&x->parked_ret[k]) == want, "op %d returned %d (%s)", k,
           atomic_load(&x->parked_ret[k]),
           loom_err_name(atomic_load(&x->parked_ret[k])));
    CHECKF(atomic_load(&x->ret_at[k]) - t_close < PROMPT_NS,
           "op %d returned %lld ms after the close", k,
           (long long)((atomic_load(&x->ret_at[k]) - t_close) / CHECK_MS));
  }
  CHECK_OK(loom_pconn_close(x->ug_rx));
  for (int i = 0; i < 3; i++)
    CHECK_OK(loom_close(x->peer[i]));
  loom_ctx_release(x->ctx);
  close(x->pipe_[0]);
  close(x->pipe_[1]);
  free(x);
}

TEST(parked_idle_then_closed) {
  run_case("parked_idle_then_closed", idle_main);
}

/* ---- an empty write is an operation too ----------------------------- */

/* "A deadline that has passed stops an operation even when it would not
 * wait": a write of no bytes with a passed deadline, or on a closed
 * connection, says so as any other write does. */
static void empty_write_main(void *arg) {
  (void)arg;
  rng_t r;
  rng_seed(&r, g_seed);
  for (int net = 0; net < 4; net += 2) {
    loom_conn *a, *b;
    CHECK(sp_connect(&r, net, &a, &b) == 0);
    char byte = 'x';
    CHECK_OK(loom_set_write_deadline(a, loom_now() - 1));
    CHECK_ERR((int)loom_write(a, &byte, 1), -ETIMEDOUT);
    CHECK_ERR((int)loom_write(a, &byte, 0), -ETIMEDOUT);
    CHECK_ERR((int)loom_writev(a, NULL, 0), -ETIMEDOUT);
    CHECK_OK(loom_set_write_deadline(a, 0));
    CHECK_EQ(loom_write(a, &byte, 0), 0);
    CHECK_EQ(loom_writev(a, NULL, 0), 0);
    CHECK_OK(loom_close(a));
    CHECK_OK(loom_close(b));
  }
}

TEST(empty_write_obeys_deadline) {
  run_case("empty_write_obeys_deadline", empty_write_main);
}

/* ---- the runtime stops under parked calls ------------------------------
 *
 * main returns with every kind of call parked and nothing closed: the
 * runtime abandons the coroutines and must close every socket it made
 * (the sanitizer builds also see that nothing is left allocated). */
static int shut_pipe[2];

static void shutdown_main(void *arg) {
  (void)arg;
  struct idle *x = calloc(1, sizeof *x);
  CHECK(x != NULL);
  rng_t r;
  rng_seed(&r, g_seed);
  CHECK(sp_connect(&r, 0, &x->tcp[0], &x->peer[0]) == 0);
  CHECK(sp_connect(&r, 0, &x->tcp[1], &x->peer[1]) == 0);
  CHECK(sp_connect(&r, (int)(2 + rn(&r, 2)), &x->ux[0], &x->peer[2]) == 0);
  CHECK_OK(loom_listen(&x->l, "tcp", "127.0.0.1:0"));
  CHECK_OK(loom_listen_packet(&x->udp, "udp", "127.0.0.1:0"));
  char a[108];
  snprintf(a, sizeof a, "/tmp/loom-ncs-%d-rx", (int)getpid());
  CHECK_OK(loom_listen_packet(&x->ug_rx, "unixgram", a));
  CHECK_OK(loom_resolve_addr("unixgram", a, &x->ug_to, &x->ug_tolen));
  snprintf(a, sizeof a, "@loom-ncs-%d-tx", (int)getpid());
  CHECK_OK(loom_listen_packet(&x->ug_tx, "unixgram", a));
  x->pipe_[0] = shut_pipe[0];
  x->pipe_[1] = shut_pipe[1];
  /* x->ctx stays NULL: the background context */
  x->ctx = loom_ctx_background();
  for (int k = 0; k < 8; k++)
    CHECK_OK(loom_go(idle_op, (void *)((uintptr_t)x | (unsigned)k)));
  loom_sleep((int64_t)(20 + rn(&r, 60)) * CHECK_MS);
  /* x is abandoned with the coroutines that use it: freed after the run */
  static struct idle *keep;
  keep = x;
  (void)keep;
}

TEST(shutdown_under_parked_io) {
  params("shutdown_under_parked_io");
  check_watchdog(60, "shutdown_under_parked_io");
  CHECK_OK(pipe2(shut_pipe, O_NONBLOCK | O_CLOEXEC));
  int before = fd_count();
  check_run(shutdown_main, NULL, g_procs);
  int after = fd_count();
  char path[108];
  snprintf(path, sizeof path, "/tmp/loom-ncs-%d-rx", (int)getpid());
  CHECKF(access(path, F_OK) != 0, "%s is left behind", path);
  CHECKF(before == after, "%d descriptors before, %d after", before, after);
  close(shut_pipe[0]);
  close(shut_pipe[1]);
}

/* ---- a Unix listener's file goes with its close -----------------------
 *
 * loom_listener_close removes the socket file; a server that closes a
 * listener and listens again on the same path (a restart) must find the
 * path free, even while an accept of the old listener is still on its
 * way out. */
static loom_listener *relisten_l;
static atomic_int relisten_ret;

static void relisten_acceptor(void *arg) {
  (void)arg;
  loom_conn *c;
  atomic_store(&relisten_ret, loom_accept(relisten_l, &c));
}

static void relisten_main(void *arg) {
  (void)arg;
  char path[108];
  snprintf(path, sizeof path, "/tmp/loom-ncr-%d", (int)getpid());
  for (int round = 0; round < 2; round++) {
    CHECK_OK(loom_listen(&relisten_l, "unix", path));
    atomic_store(&relisten_ret, IDLE_NOT_YET);
    CHECK_OK(loom_go(relisten_acceptor, NULL));
    loom_sleep(10 * CHECK_MS); /* it parks in accept */
    CHECK_OK(loom_listener_close(relisten_l));
    CHECKF(access(path, F_OK) != 0,
           "round %d: %s is still there after the "
           "close",
           round, path);
    loom_listener *l2;
    CHECK_OK(loom_listen(&l2, "unix", path));
    while (atomic_load(&relisten_ret) == IDLE_NOT_YET)
      loom_sleep(CHECK_MS);
    CHECK_ERR(atomic_load(&relisten_ret), LOOM_ECLOSED);
    /* the old listener's last user is gone: the new file stays */
    CHECKF(access(path, F_OK) == 0,
           "round %d: the new listener's %s is "
           "gone",
           round, path);
    CHECK_OK(loom_listener_close(l2));
  }
}

TEST(unix_listener_close_frees_its_path) {
  run_case("unix_listener_close_frees_its_path", relisten_main);
}

/* ---- many readers on one stream, cancelled at random -----------------
 *
 * Several coroutines read one connection, each call under a context of
 * its own, which a canceller cuts at random moments (before the call,
 * while it waits for its turn behind the others, while it is parked in
 * the poller, or as it completes) or which times out; after an error a
 * reader may reset the read deadline, which a cut leaves passed, racing
 * the others' cancels.  One writer sends a random stream, then shuts
 * down.  Every byte is read exactly once (the readers' counts of each
 * byte value add up to the writer's), every error is a documented one
 * (-ECANCELED only from a cancelled context), and every reader sees the
 * end of the stream. */
#define MR_READERS 8

struct mr {
  loom_conn *rc, *wc; /* the readers' end, the writer's */
  size_t total;
  uint64_t sent[256]; /* the writer's, read after the wait */
  atomic_ullong seen[256];
  atomic_llong got;
  atomic_long cancelled, timed_out;
  atomic_int readers_left;
  loom_mutex mu;
  loom_ctx *parent; /* the readers' contexts hang here */
  loom_wg wg;
};

static void mr_writer(void *arg) {
  struct mr *m = arg;
  rng_t r;
  rng_seed(&r, g_seed ^ 0x3172);
  uint8_t *buf = malloc(65536);
  CHECK(buf != NULL);
  for (size_t off = 0; off < m->total;) {
    size_t n = 1 + rn(&r, 65536);
    if (n > m->total - off)
      n = m->total - off;
    for (size_t i = 0; i < n; i++) {
      buf[i] = (uint8_t)rnd(&r);
      m->sent[buf[i]]++;
    }
    CHECK_EQ(loom_write(m->wc, buf, n), (ssize_t)n);
    off += n;
    if (rn(&r, 8) == 0)
      sleep_us(&r, 500);
  }
  CHECK_OK(loom_shutdown(m->wc, SHUT_WR));
  free(buf);
  loom_wg_done(&m->wg);
}

static void mr_reader(void *arg) {
  struct mr *m = (struct mr *)((uintptr_t)arg & ~(uintptr_t)15);
  unsigned id = (unsigned)((uintptr_t)arg & 15);
  rng_t r;
  rng_seed(&r, g_seed ^ 0x4eade ^ ((uint64_t)id << 16));
  uint8_t *buf = malloc(16384);
  CHECK(buf != NULL);
  for (;;) {
    unsigned how = rn(&r, 8);
    loom_mutex_lock(&m->mu);
    loom_ctx *parent = loom_ctx_ref(m->parent);
    loom_mutex_unlock(&m->mu);
    loom_ctx *ctx;
    CHECK_OK(how == 0 ? loom_ctx_with_timeout(&ctx, parent,
                                              (int64_t)rn(&r, 2000) * 1000)
                      : loom_ctx_with_cancel(&ctx, parent));
    loom_ctx_unref(parent);
    if (how == 1)
      loom_ctx_cancel(ctx); /* done before the call */
    size_t len = how == 2 ? 0 : 1 + rn(&r, 16384);
    ssize_t n = loom_read_ctx(m->rc, buf, len, ctx);
    if (n > 0) {
      CHECK((size_t)n <= len);
      for (ssize_t i = 0; i < n; i++)
        atomic_fetch_add_explicit(&m->seen[buf[i]], 1, memory_order_relaxed);
      atomic_fetch_add(&m->got, n);
    } else if (n < 0) {
      CHECKF(n == -ECANCELED || n == -ETIMEDOUT, "read_ctx: %zd (%s)", n,
             loom_err_name((int)n));
      check_ctx_result(n, ctx, "read_ctx");
      atomic_fetch_add(n == -ECANCELED ? &m->cancelled : &m->timed_out, 1);
      if (rn(&r, 2))
        CHECK_OK(loom_set_read_deadline(m->rc, 0));
    }
    loom_ctx_release(ctx);
    if (n == 0 && len > 0)
      break; /* the end of the stream */
  }
  free(buf);
  atomic_fetch_sub(&m->readers_left, 1);
  loom_wg_done(&m->wg);
}

static void mr_canceller(void *arg) {
  struct mr *m = arg;
  rng_t r;
  rng_seed(&r, g_seed ^ 0xca9ce1);
  while (atomic_load(&m->readers_left) > 0) {
    sleep_us(&r, 1500);
    loom_ctx *n, *old;
    CHECK_OK(loom_ctx_with_cancel(&n, loom_ctx_background()));
    loom_mutex_lock(&m->mu);
    old = m->parent;
    m->parent = n;
    loom_mutex_unlock(&m->mu);
    loom_ctx_release(old); /* cancels every read under it */
  }
  loom_wg_done(&m->wg);
}

static void mr_main(void *arg) {
  (void)arg;
  rng_t r;
  rng_seed(&r, g_seed);
  int64_t end = loom_now() + g_ms * CHECK_MS;
  int rounds = 0;
  long long bytes = 0, cancelled = 0, timed_out = 0;
  while (loom_now() < end) {
    struct mr *m = calloc(1, sizeof *m);
    CHECK(m != NULL);
    loom_listener *l;
    char addr[128];
    if (rn(&r, 2)) {
      CHECK_OK(loom_listen(&l, "tcp", "127.0.0.1:0"));
      CHECK_OK(loom_listener_addr(l, addr, sizeof addr));
      CHECK_OK(loom_dial(&m->wc, "tcp", addr));
    } else {
      snprintf(addr, sizeof addr, "@loom-nmr-%d-%d", (int)getpid(),
               atomic_fetch_add(&g_uniq, 1));
      CHECK_OK(loom_listen(&l, "unix", addr));
      CHECK_OK(loom_dial(&m->wc, "unix", addr));
    }
    CHECK_OK(loom_accept(l, &m->rc));
    CHECK_OK(loom_listener_close(l));
    m->total =
        (size_t)CHECK_SCALE(1 << 20, 256 << 10, 128 << 10) + rn(&r, 1 << 18);
    CHECK_OK(loom_ctx_with_cancel(&m->parent, loom_ctx_background()));
    int nr = 2 + (int)rn(&r, MR_READERS - 1);
    atomic_store(&m->readers_left, nr);
    CHECK_OK(loom_wg_add(&m->wg, nr + 2));
    CHECK_OK(loom_go(mr_writer, m));
    for (int i = 0; i < nr; i++)
      CHECK_OK(loom_go(mr_reader, (void *)((uintptr_t)m | (unsigned)i)));
    CHECK_OK(loom_go(mr_canceller, m));
    CHECKF(loom_wg_wait(&m->wg, loom_now() + 20000 * CHECK_MS) == 0,
           "round %d: %lld of %zu bytes read, %d readers left", rounds,
           (long long)atomic_load(&m->got), m->total,
           atomic_load(&m->readers_left));
    CHECK_EQ(atomic_load(&m->got), (long long)m->total);
    for (int b = 0; b < 256; b++)
      CHECKF(atomic_load(&m->seen[b]) == m->sent[b],
             "round %d: byte %#x read %llu times, sent %llu", rounds, b,
             (unsigned long long)atomic_load(&m->seen[b]),
             (unsigned long long)m->sent[b]);
    bytes += (long long)m->total;
    cancelled += atomic_load(&m->cancelled);
    timed_out += atomic_load(&m->timed_out);
    loom_ctx_release(m->parent);
    CHECK_OK(loom_close(m->rc));
    CHECK_OK(loom_close(m->wc));
    free(m);
    rounds++;
  }
  fprintf(stderr,
          "%d rounds, %lld bytes; %lld reads cancelled, %lld timed "
          "out\n",
          rounds, bytes, cancelled, timed_out);
}

TEST(stream_many_readers_cancelled) {
  run_case("stream_many_readers_cancelled", mr_main);
}

/* ---- a connected unixgram writer whose full peer vanishes -------------- */

static loom_pconn *cg_tx;
static atomic_int cg_ret;
static atomic_llong cg_at;

static void cg_writer(void *arg) {
  (void)arg;
  char b[512];
  memset(b, 'q', sizeof b);
  ssize_t r;
  while ((r = loom_pconn_write(cg_tx, b, sizeof b)) == (ssize_t)sizeof b)
    ;
  atomic_store(&cg_at, loom_now());
  atomic_store(&cg_ret, (int)r);
}

static void cg_main(void *arg) {
  (void)arg;
  char path[108];
  for (int abstract_ = 0; abstract_ < 2; abstract_++) {
    snprintf(path, sizeof path, "%s/loom-ncc-%d-%d", abstract_ ? "@" : "/tmp",
             (int)getpid(), abstract_);
    loom_pconn *rx;
    CHECK_OK(loom_listen_packet(&rx, "unixgram", path));
    CHECK_OK(loom_dial_packet(&cg_tx, "unixgram", path));
    atomic_store(&cg_ret, IDLE_NOT_YET);
    CHECK_OK(loom_go(cg_writer, NULL));
    loom_sleep(30 * CHECK_MS); /* the peer is full; the writer parks */
    CHECK_EQ(atomic_load(&cg_ret), IDLE_NOT_YET);
    int64_t t0 = loom_now();
    CHECK_OK(loom_pconn_close(rx));
    while (atomic_load(&cg_ret) == IDLE_NOT_YET &&
           loom_now() - t0 < 5000 * CHECK_MS)
      loom_sleep(CHECK_MS);
    int r = atomic_load(&cg_ret);
    CHECKF(r != IDLE_NOT_YET, "the writer still waits for its vanished peer");
    CHECKF(r == -ECONNREFUSED || r == -ECONNRESET, "write: %d (%s)", r,
           loom_err_name(r));
    CHECKF(atomic_load(&cg_at) - t0 < PROMPT_NS,
           "the writer returned %lld ms after its peer went",
           (long long)((atomic_load(&cg_at) - t0) / CHECK_MS));
    CHECK_OK(loom_pconn_close(cg_tx));
  }
}

TEST(unixgram_connected_writer_peer_vanishes) {
  run_case("unixgram_connected_writer_peer_vanishes", cg_main);
}

CHECK_MAIN()
