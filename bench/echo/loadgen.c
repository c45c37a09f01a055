/*
 * loadgen.c — the one load generator of the echo bench (bench/echo/run.sh):
 * the same client, byte for byte, for the loom, Go and C epoll servers;
 * with --frame 4, also of the engine bench (bench/engine/run.sh).
 *
 * Plain C, one thread, one epoll instance, non-blocking sockets.  One
 * thread keeps the load generator's own cost the same whatever the server
 * does (it cannot steal the server's second core unevenly), and on this
 * 2-CPU machine one core is all it should take.
 *
 * Every byte is checked.  Connection i sends the bytes of a fixed random
 * table starting at its own offset (off0(i)), so an echo that comes back
 * short, reordered, or from another connection is caught at the first
 * wrong byte, and the program stops with exit status 1.
 *
 * Framing (--frame 4, for servers that decode messages, bench/engine/):
 * each message of S bytes goes out as a 4-byte big-endian length S, then
 * the S payload bytes, and the echo must be the same S + 4 bytes.  The
 * table is then built of whole frames (header, then S bytes of the random
 * table) and every connection starts on a frame of its own, so the
 * sending and checking code is the same as without framing: a header
 * that comes back changed is a wrong byte like any other.  Every count
 * (messages, CPU per message) is of whole frames; --size stays the
 * payload.  Framing holds in every mode but wait; without --frame
 * nothing changes.
 *
 * Modes (one RESULT line each, as bench/run.sh's programs print):
 *
 *   wait      connect until the server accepts (start-up handshake).
 *   pingpong  C connections, each keeping P messages of S bytes in flight:
 *             a new message goes out when one has come back whole.
 *             Warm up W s, then measure D s: messages completed, the
 *             latency of each (from when it was queued for sending to
 *             when its last byte came back), the server's CPU time, and
 *             how evenly the connections were served (finish_result).
 *   rate      open loop: C connections share a fixed offered load of R
 *             messages/s, sent on a schedule that does not wait for the
 *             echoes (message s is due at start + s/R, on connection
 *             s mod C), so a server that falls behind sees its queue grow
 *             and its latency with it, as it would in production, instead
 *             of being sent less (the closed loop of pingpong measures how
 *             requests queue at whichever side is the bottleneck; below
 *             saturation this measures how the server schedules).  Latency
 *             runs from the send() of a message to its last echoed byte.
 *             A connection holds at most --inflight messages unanswered;
 *             a message due on a full connection is not sent and counted
 *             as skipped: any skip means the server did not keep up for
 *             a while (a stall of the server or of the host), and the
 *             run's latencies describe that stall more than the server.
 *             Between sends the thread sleeps in epoll_pwait2 with a 1 ns
 *             timer slack, so it wakes on time without spinning a core.
 *   storm     N connect-write-read-close cycles, K at a time; a cycle's
 *             latency runs from socket() to the echo's last byte.  The
 *             "message" of the CPU figure is one whole cycle.
 *   idle      open N connections (at most 256 handshakes at a time), echo
 *             one message on each so the server has surely accepted and
 *             read, settle, read the server's VmRSS: (RSS - RSS before the
 *             first connection) / N.  Then echo once more on every
 *             connection to show the server still holds them all.
 *
 * Server CPU time: utime+stime of /proc/<pid>/stat (clock ticks, 10 ms)
 * and, for precision, the sum of the on-CPU nanoseconds in
 * /proc/<pid>/task/<tid>/schedstat over the server's threads.  The latter
 * is the figure reported as cpu_us_per_msg (cpu_src=sched) unless a thread
 * went away during the interval (its time would be lost): then the tick
 * figure is used (cpu_src=stat).  Both are printed.
 *
 * The read side assumes that a read() returning less than asked for
 * emptied the socket: with edge-triggered epoll, data arriving after that
 * read raises a new edge, so nothing is missed, and the loop saves the
 * extra read() that would only say EAGAIN.  (The servers do not take this
 * shortcut; the load generator's cost is the same for all three.)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

/* ---- the pattern ----------------------------------------------------- */

#define TABLE_BITS 20
#define TABLE_SIZE ((size_t)1 << TABLE_BITS)
#define TABLE_MASK (TABLE_SIZE - 1)
#define CHUNK ((size_t)64 * 1024) /* the largest read or write */

static size_t payload = 64; /* --size: bytes of a message's payload */
static size_t frame_hdr;    /* --frame: 0, or 4 (the length header) */
static size_t msg_size;     /* a message on the wire: header + payload */

/* What the connections send: table_len bytes (the period) plus a copy of
 * the first CHUNK at the end, so that any CHUNK-long window starting
 * inside the table is contiguous.  Unframed, the TABLE_SIZE random bytes;
 * framed, nframes whole frames of msg_size bytes, frame k being the
 * header and then payload bytes k * payload onwards of the random table. */
static unsigned char *table;
static size_t table_len;
static uint64_t nframes; /* a power of two; >= TABLE_SIZE / payload */

static void *xmalloc(size_t n) {
  void *p = malloc(n);
  if (p == NULL) {
    perror("loadgen: malloc");
    exit(2);
  }
  return p;
}

static void table_init(void) {
  unsigned char *rnd = xmalloc(TABLE_SIZE + CHUNK);
  uint64_t x = 0x9e3779b97f4a7c15u;
  for (size_t i = 0; i < TABLE_SIZE; i++) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    rnd[i] = (unsigned char)(x >> 24);
  }
  memcpy(rnd + TABLE_SIZE, rnd, CHUNK);
  if (frame_hdr == 0) {
    table = rnd;
    table_len = TABLE_SIZE;
    return;
  }
  for (nframes = 1; nframes * payload < TABLE_SIZE; nframes *= 2)
    ;
  table_len = nframes * msg_size; /* >= TABLE_SIZE > CHUNK */
  table = xmalloc(table_len + CHUNK);
  for (uint64_t k = 0; k < nframes; k++) {
    unsigned char *f = table + k * msg_size;
    f[0] = (unsigned char)(payload >> 24); /* big-endian length */
    f[1] = (unsigned char)(payload >> 16);
    f[2] = (unsigned char)(payload >> 8);
    f[3] = (unsigned char)payload;
    /* payload <= CHUNK, so this window of rnd is contiguous */
    memcpy(f + frame_hdr, rnd + ((k * payload) & TABLE_MASK), payload);
  }
  memcpy(table + table_len, table, CHUNK);
  free(rnd);
}

/* Where connection number i starts in the table: distinct for every i
 * below TABLE_SIZE / 2 (odd multiplier), far apart for neighbours.
 * Framed: the start of a frame, distinct for every i below nframes. */
static uint64_t off0(uint64_t i) {
  uint64_t k = i * 40503u * 2 + 1;
  if (frame_hdr == 0)
    return k & TABLE_MASK;
  return (k & (nframes - 1)) * msg_size;
}

/* Where byte `pos` of connection id's stream is in the table. */
static const unsigned char *pattern(uint64_t id, uint64_t pos) {
  return table + (off0(id) + pos) % table_len;
}

/* ---- clocks, histogram, server accounting ------------------------------ */

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Log-linear latency histogram: exact below 256 ns, then 128 sub-buckets
 * per power of two (< 0.8 % error). */
#define SUB_BITS 7
#define NBUCKETS (64 << SUB_BITS)
static uint64_t hist[NBUCKETS];
static uint64_t hist_n;

static void hist_add(int64_t v) {
  uint64_t u = v < 0 ? 0 : (uint64_t)v;
  unsigned b;
  if (u < (1u << (SUB_BITS + 1))) {
    b = (unsigned)u;
  } else {
    int msb = 63 - __builtin_clzll(u);
    int shift = msb - SUB_BITS;
    b = ((unsigned)(shift + 1) << SUB_BITS) +
        (unsigned)((u >> shift) & ((1u << SUB_BITS) - 1));
  }
  hist[b]++;
  hist_n++;
}

static void hist_reset(void) {
  memset(hist, 0, sizeof hist);
  hist_n = 0;
}

/* The q-quantile in microseconds (the middle of its bucket). */
static double hist_quantile_us(double q) {
  if (hist_n == 0)
    return 0;
  uint64_t want = (uint64_t)(q * (double)hist_n);
  if (want < 1)
    want = 1;
  uint64_t cum = 0;
  for (unsigned b = 0; b < NBUCKETS; b++) {
    cum += hist[b];
    if (cum >= want) {
      if (b < (2u << SUB_BITS))
        return (double)b / 1000.0;
      unsigned shift = (b >> SUB_BITS) - 1;
      uint64_t lo = (uint64_t)((b & ((1u << SUB_BITS) - 1)) |
                               (1u << SUB_BITS))
                    << shift;
      return ((double)lo + (double)((uint64_t)1 << shift) / 2) / 1000.0;
    }
  }
  return 0;
}

static pid_t server_pid;

struct cpu_sample {
  uint64_t ticks;    /* utime + stime, clock ticks */
  uint64_t sched_ns; /* sum over threads of schedstat's on-CPU time */
  int threads;
  uint64_t csw;      /* voluntary context switches of those threads */
  int64_t t;         /* when taken */
  uint64_t self_ns;  /* the load generator's own CPU time */
  uint64_t host_busy, host_total, host_steal; /* /proc/stat "cpu", ticks */
};

/* Busy, total and stolen ticks of all CPUs of this (virtual) machine:
 * how loaded it was.  Steal is time the hypervisor ran someone else on
 * our virtual CPUs: the shared host's load. */
static void read_host(uint64_t *busy, uint64_t *total, uint64_t *steal) {
  FILE *f = fopen("/proc/stat", "r");
  unsigned long long v[8] = {0};
  *busy = *total = *steal = 0;
  if (f == NULL)
    return;
  if (fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1],
             &v[2], &v[3], &v[4], &v[5], &v[6], &v[7]) == 8) {
    for (int i = 0; i < 8; i++)
      *total += v[i];
    *busy = *total - v[3] - v[4] - v[7]; /* not idle, iowait, steal */
    *steal = v[7];
  }
  fclose(f);
}

static uint64_t read_ticks(pid_t pid) {
  char path[64], buf[1024];
  snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
  FILE *f = fopen(path, "r");
  if (f == NULL)
    return 0;
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = '\0';
  /* Fields after the ")" that closes comm: state is field 3, utime 14. */
  char *p = strrchr(buf, ')');
  if (p == NULL)
    return 0;
  unsigned long long ut = 0, st = 0;
  if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu",
             &ut, &st) != 2)
    return 0;
  return ut + st;
}

/* The server's on-CPU ns summed over its threads; with `csw`, adds their
 * voluntary context switches (a thread going to sleep) to *csw. */
static uint64_t read_sched_ns(pid_t pid, int *threads, uint64_t *csw) {
  char path[96];
  snprintf(path, sizeof path, "/proc/%d/task", (int)pid);
  DIR *d = opendir(path);
  uint64_t sum = 0;
  int n = 0;
  if (d == NULL) {
    *threads = 0;
    return 0;
  }
  struct dirent *e;
  while ((e = readdir(d)) != NULL) {
    if (e->d_name[0] == '.')
      continue;
    snprintf(path, sizeof path, "/proc/%d/task/%.20s/schedstat", (int)pid,
             e->d_name);
    FILE *f = fopen(path, "r");
    if (f == NULL)
      continue;
    unsigned long long ns;
    if (fscanf(f, "%llu", &ns) == 1) {
      sum += ns;
      n++;
    }
    fclose(f);
    if (csw == NULL)
      continue;
    snprintf(path, sizeof path, "/proc/%d/task/%.20s/status", (int)pid,
             e->d_name);
    if ((f = fopen(path, "r")) == NULL)
      continue;
    char line[128];
    while (fgets(line, sizeof line, f))
      if (strncmp(line, "voluntary_ctxt_switches:", 24) == 0)
        *csw += strtoull(line + 24, NULL, 10);
    fclose(f);
  }
  closedir(d);
  *threads = n;
  return sum;
}

static struct cpu_sample cpu_sample(void) {
  struct cpu_sample s;
  s.ticks = read_ticks(server_pid);
  s.csw = 0;
  s.sched_ns = read_sched_ns(server_pid, &s.threads, &s.csw);
  struct timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  s.self_ns = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
  read_host(&s.host_busy, &s.host_total, &s.host_steal);
  s.t = now_ns();
  return s;
}

/* " frame=4" in a RESULT line when framing (nothing otherwise). */
static void print_frame(void) {
  if (frame_hdr > 0)
    printf(" frame=%zu", frame_hdr);
}

/* Print the CPU and latency fields of a RESULT line for `msgs` messages
 * between samples a and b. */
static void print_cpu(const struct cpu_sample *a, const struct cpu_sample *b,
                      uint64_t msgs) {
  double m = msgs > 0 ? (double)msgs : 1;
  double secs = (double)(b->t - a->t) / 1e9;
  double tck = (double)sysconf(_SC_CLK_TCK);
  double stat_us = (double)(b->ticks - a->ticks) * 1e6 / tck;
  double sched_us = (double)(b->sched_ns - a->sched_ns) / 1e3;
  /* A thread that exited took its schedstat time with it. */
  bool sched_ok = server_pid > 0 && b->threads >= a->threads &&
                  b->sched_ns >= a->sched_ns;
  double cpu_us = sched_ok ? sched_us : stat_us;
  printf(" msgs=%" PRIu64 " secs=%.3f msgs_per_s=%.0f p50_us=%.1f"
         " p99_us=%.1f p999_us=%.1f cpu_us_per_msg=%.3f cpu_src=%s"
         " stat_us_per_msg=%.3f sched_us_per_msg=%.3f server_cpu_util=%.2f"
         " server_threads=%d sleeps_per_msg=%.3f lg_us_per_msg=%.3f"
         " lg_cpu_util=%.2f"
         " host_cpu_util=%.2f steal_cpu_util=%.2f",
         msgs, secs, (double)msgs / secs, hist_quantile_us(0.50),
         hist_quantile_us(0.99), hist_quantile_us(0.999), cpu_us / m,
         sched_ok ? "sched" : "stat", stat_us / m, sched_us / m,
         cpu_us / 1e6 / secs, b->threads, (double)(b->csw - a->csw) / m,
         (double)(b->self_ns - a->self_ns) / 1e3 / m,
         (double)(b->self_ns - a->self_ns) / 1e9 / secs,
         b->host_total > a->host_total
             ? (double)(b->host_busy - a->host_busy) /
                   (double)(b->host_total - a->host_total) *
                   (double)sysconf(_SC_NPROCESSORS_ONLN)
             : -1.0,
         b->host_total > a->host_total
             ? (double)(b->host_steal - a->host_steal) /
                   (double)(b->host_total - a->host_total) *
                   (double)sysconf(_SC_NPROCESSORS_ONLN)
             : -1.0);
}

/* ---- sockets --------------------------------------------------------- */

static struct sockaddr_in server_addr;
static int ep;

static void die(const char *what) {
  fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
  exit(1);
}

static void parse_addr(const char *s) {
  char host[64];
  const char *colon = strrchr(s, ':');
  if (colon == NULL || (size_t)(colon - s) >= sizeof host) {
    fprintf(stderr, "loadgen: address must be host:port, not '%s'\n", s);
    exit(2);
  }
  memcpy(host, s, (size_t)(colon - s));
  host[colon - s] = '\0';
  memset(&server_addr, 0, sizeof server_addr);
  server_addr.sin_family = AF_INET;
  server_addr.sin_port = htons((uint16_t)atoi(colon + 1));
  if (inet_pton(AF_INET, host[0] ? host : "127.0.0.1",
                &server_addr.sin_addr) != 1) {
    fprintf(stderr, "loadgen: bad IPv4 address '%s'\n", host);
    exit(2);
  }
}

/* A non-blocking socket connecting to the server (0 or EINPROGRESS). */
static int start_connect(void) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0)
    die("socket");
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (connect(fd, (struct sockaddr *)&server_addr, sizeof server_addr) != 0 &&
      errno != EINPROGRESS)
    die("connect");
  return fd;
}

static void raise_nofile(void) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
}

/* ---- connections ----------------------------------------------------- */

enum cstate { C_CONNECTING, C_OPEN, C_DONE };

struct conn {
  int fd;
  enum cstate state;
  uint64_t id;       /* pattern offset: off0(id) */
  uint64_t queued;   /* bytes queued for sending so far */
  uint64_t written;  /* bytes written */
  uint64_t received; /* bytes echoed back and verified */
  int64_t t0;        /* storm: start of the cycle */
  uint64_t rx0;      /* pingpong, rate: received when measuring began */
  int64_t *ts;       /* ring of `inflight` queue times, by message number */
};

static unsigned inflight = 1;
static bool measuring;
static uint64_t done_msgs;
static unsigned char rbuf[CHUNK];

static void conn_register(struct conn *c) {
  struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                           .data.ptr = c};
  if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) != 0)
    die("epoll_ctl");
}

static void queue_msg(struct conn *c, int64_t now) {
  c->ts[(c->queued / msg_size) % inflight] = now;
  c->queued += msg_size;
}

/* Write what is queued, as far as the socket takes it; exits on error. */
static void flush(struct conn *c) {
  while (c->written < c->queued) {
    size_t n = c->queued - c->written;
    if (n > CHUNK)
      n = CHUNK;
    ssize_t w = send(c->fd, pattern(c->id, c->written), n, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR)
        continue;
      if (errno == EAGAIN)
        return; /* EPOLLOUT will say when */
      fprintf(stderr, "loadgen: conn %" PRIu64 ": write: %s\n", c->id,
              strerror(errno));
      exit(1);
    }
    c->written += (uint64_t)w;
  }
}

static void verify_fail(struct conn *c, const unsigned char *got, size_t n) {
  const unsigned char *want = pattern(c->id, c->received);
  size_t i = 0;
  while (i < n && got[i] == want[i])
    i++;
  uint64_t at = c->received + i;
  fprintf(stderr,
          "loadgen: conn %" PRIu64 ": wrong byte at stream offset %" PRIu64
          ": got 0x%02x, want 0x%02x",
          c->id, at, got[i], want[i]);
  if (frame_hdr > 0)
    fprintf(stderr, " (message %" PRIu64 ", %s byte %" PRIu64 ")",
            at / msg_size, at % msg_size < frame_hdr ? "header" : "payload",
            at % msg_size < frame_hdr ? at % msg_size
                                      : at % msg_size - frame_hdr);
  fprintf(stderr, "\n");
  exit(1);
}

/* Read and verify everything available; returns messages completed.
 * Each completed message's latency goes to the histogram if measuring. */
static unsigned drain(struct conn *c, int64_t now) {
  unsigned completed = 0;
  for (;;) {
    ssize_t r = read(c->fd, rbuf, sizeof rbuf);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      if (errno == EAGAIN)
        break;
      fprintf(stderr, "loadgen: conn %" PRIu64 ": read: %s\n", c->id,
              strerror(errno));
      exit(1);
    }
    if (r == 0) {
      fprintf(stderr,
              "loadgen: conn %" PRIu64 ": server closed the connection "
              "after %" PRIu64 " of %" PRIu64 " bytes\n",
              c->id, c->received, c->written);
      exit(1);
    }
    size_t n = (size_t)r;
    if (c->received + n > c->written) {
      fprintf(stderr,
              "loadgen: conn %" PRIu64 ": %zu bytes echoed, only %" PRIu64
              " sent\n",
              c->id, (size_t)(c->received + n), c->written);
      exit(1);
    }
    if (memcmp(rbuf, pattern(c->id, c->received), n) != 0)
      verify_fail(c, rbuf, n);
    uint64_t m0 = c->received / msg_size;
    c->received += n;
    uint64_t m1 = c->received / msg_size;
    for (uint64_t m = m0; m < m1; m++) {
      if (measuring)
        hist_add(now - c->ts[m % inflight]);
      completed++;
    }
    if (n < sizeof rbuf)
      break; /* emptied: see the top of the file */
  }
  return completed;
}

static struct conn *conns_alloc(size_t n) {
  struct conn *cs = calloc(n, sizeof *cs);
  int64_t *ts = calloc(n * inflight, sizeof *ts);
  if (cs == NULL || ts == NULL) {
    perror("loadgen: calloc");
    exit(2);
  }
  for (size_t i = 0; i < n; i++) {
    cs[i].fd = -1;
    cs[i].ts = ts + i * inflight;
  }
  return cs;
}

/* ---- modes ----------------------------------------------------------- */

static int mode_wait(long timeout_ms) {
  int64_t end = now_ns() + timeout_ms * 1000000;
  for (;;) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
      die("socket");
    if (connect(fd, (struct sockaddr *)&server_addr, sizeof server_addr) ==
        0) {
      close(fd);
      return 0;
    }
    close(fd);
    if (now_ns() > end) {
      fprintf(stderr, "loadgen: nothing accepts on the server address\n");
      return 1;
    }
    usleep(10000);
  }
}

static void check_events(uint32_t e, struct conn *c) {
  if (e & (EPOLLERR | EPOLLHUP)) {
    int err = 0;
    socklen_t l = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
    fprintf(stderr, "loadgen: conn %" PRIu64 ": %s\n", c->id,
            err ? strerror(err) : "hang-up");
    exit(1);
  }
}

/* The measuring window of pingpong and rate: returns 1 when it opens at
 * `now` (a taken), -1 when it closes (b taken: stop), else 0. */
static int window(int64_t now, int64_t t_measure, int64_t t_end,
                  struct conn *cs, long nconns, struct cpu_sample *a,
                  struct cpu_sample *b) {
  if (!measuring && now >= t_measure && now < t_end) {
    measuring = true;
    hist_reset();
    done_msgs = 0;
    for (long i = 0; i < nconns; i++)
      cs[i].rx0 = cs[i].received;
    *a = cpu_sample();
    return 1;
  }
  if (measuring && now >= t_end) {
    *b = cpu_sample();
    measuring = false;
    return -1;
  }
  return 0;
}

/* Take in what epoll reported; with `echo_more` (closed loop) every
 * message that came back sends the next. */
static void handle_events(const struct epoll_event *evs, int n, int64_t now,
                          bool echo_more) {
  for (int i = 0; i < n; i++) {
    struct conn *c = evs[i].data.ptr;
    check_events(evs[i].events, c);
    if (evs[i].events & (EPOLLIN | EPOLLRDHUP)) {
      unsigned k = drain(c, now);
      if (measuring)
        done_msgs += k;
      while (echo_more && k-- > 0)
        queue_msg(c, now);
    }
    flush(c);
  }
}

/* The end of a pingpong or rate RESULT line (after its own fields), then
 * the connections closed.  How evenly the connections were served while
 * measuring: Jain's index of their byte counts, (sum x)^2 / (n sum x^2),
 * 1 when all got the same and 1/n when one got everything; and the
 * least-served connection's count over the mean.  In a closed loop every
 * connection asks again as soon as it is answered, so these say directly
 * whether the server serves its connections in turn, which a closed
 * loop's p99 says only through queueing. */
static void finish_result(struct conn *cs, long nconns,
                          const struct cpu_sample *a,
                          const struct cpu_sample *b) {
  uint64_t back = 0;
  double sum = 0, sumsq = 0, least = -1;
  for (long i = 0; i < nconns; i++) {
    back += cs[i].received;
    double x = (double)(cs[i].received - cs[i].rx0);
    sum += x;
    sumsq += x * x;
    if (least < 0 || x < least)
      least = x;
  }
  print_frame();
  print_cpu(a, b, done_msgs);
  printf(" fairness=%.4f least_share=%.3f verified_bytes=%" PRIu64 "\n",
         sumsq > 0 ? sum * sum / ((double)nconns * sumsq) : 0,
         sum > 0 ? least * (double)nconns / sum : 0, back);
  fflush(stdout);
  for (long i = 0; i < nconns; i++)
    close(cs[i].fd);
}

static int mode_pingpong(const char *name, const char *impl, long nconns,
                         double warmup_s, double secs) {
  struct conn *cs = conns_alloc((size_t)nconns);
  int64_t start = now_ns();
  for (long i = 0; i < nconns; i++) {
    cs[i].id = (uint64_t)i;
    cs[i].fd = start_connect();
    cs[i].state = C_OPEN; /* writes before the handshake ends just wait */
    conn_register(&cs[i]);
    for (unsigned k = 0; k < inflight; k++)
      queue_msg(&cs[i], start);
  }
  struct epoll_event evs[512];
  int64_t t_measure = start + (int64_t)(warmup_s * 1e9);
  int64_t t_end = t_measure + (int64_t)(secs * 1e9);
  struct cpu_sample a = {0}, b = {0};
  for (;;) {
    int n = epoll_wait(ep, evs, 512, 20);
    if (n < 0 && errno != EINTR)
      die("epoll_wait");
    int64_t now = now_ns();
    if (window(now, t_measure, t_end, cs, nconns, &a, &b) < 0)
      break;
    handle_events(evs, n, now, true);
  }
  printf("RESULT name=%s impl=%s conns=%ld size=%zu inflight=%u", name, impl,
         nconns, payload, inflight);
  finish_result(cs, nconns, &a, &b);
  return done_msgs > 0 ? 0 : 1;
}

/* rate: see the top of the file.  Measures from warmup_s to
 * warmup_s + secs; sends stop at the end of the window. */
static int mode_rate(const char *name, const char *impl, long nconns,
                     double rate, double warmup_s, double secs) {
  if (rate <= 0) {
    fprintf(stderr, "loadgen: rate needs --rate > 0 (messages/s)\n");
    return 2;
  }
  (void)prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
  struct conn *cs = conns_alloc((size_t)nconns);
  for (long i = 0; i < nconns; i++) {
    cs[i].id = (uint64_t)i;
    cs[i].fd = start_connect();
    cs[i].state = C_OPEN;
    conn_register(&cs[i]);
  }
  struct epoll_event evs[512];
  int64_t start = now_ns();
  int64_t t_measure = start + (int64_t)(warmup_s * 1e9);
  int64_t t_end = t_measure + (int64_t)(secs * 1e9);
  double gap_ns = 1e9 / rate;
  uint64_t s = 0, sent = 0, skipped = 0;
  struct cpu_sample a = {0}, b = {0};
  for (;;) {
    int64_t now = now_ns();
    int w = window(now, t_measure, t_end, cs, nconns, &a, &b);
    if (w < 0)
      break;
    if (w > 0)
      sent = skipped = 0;
    /* Every message due by now, each stamped when it goes out. */
    int64_t due;
    while ((due = start + (int64_t)((double)s * gap_ns)) <= now) {
      struct conn *c = &cs[s++ % (uint64_t)nconns];
      if ((c->queued - c->received) / msg_size >= inflight) {
        skipped++;
        continue;
      }
      queue_msg(c, now_ns());
      flush(c);
      sent++;
    }
    int64_t wait = due - now_ns();
    struct timespec ts = {0, 0};
    if (wait > 0) {
      ts.tv_sec = wait / 1000000000;
      ts.tv_nsec = wait % 1000000000;
    }
    int n = epoll_pwait2(ep, evs, 512, &ts, NULL);
    if (n < 0 && errno != EINTR)
      die("epoll_pwait2");
    handle_events(evs, n, now_ns(), false);
  }
  printf("RESULT name=%s impl=%s conns=%ld size=%zu inflight=%u rate=%.0f"
         " sent=%" PRIu64 " skipped=%" PRIu64,
         name, impl, nconns, payload, inflight, rate, sent, skipped);
  finish_result(cs, nconns, &a, &b);
  return done_msgs > 0 ? 0 : 1;
}

/* storm: `total` cycles, `parallel` at a time; returns when all are done. */
static void storm_run(struct conn *slots, long parallel, uint64_t *next_id,
                      long total) {
  long started = 0, finished = 0;
  struct epoll_event evs[512];
  int64_t now = now_ns();
  for (long i = 0; i < parallel && started < total; i++, started++) {
    struct conn *c = &slots[i];
    c->id = (*next_id)++;
    c->queued = c->written = c->received = 0;
    c->t0 = now;
    c->fd = start_connect();
    c->state = C_CONNECTING;
    conn_register(c);
  }
  while (finished < total) {
    int n = epoll_wait(ep, evs, 512, 5000);
    if (n < 0 && errno != EINTR)
      die("epoll_wait");
    if (n == 0) {
      fprintf(stderr, "loadgen: storm: no progress for 5 s (%ld of %ld)\n",
              finished, total);
      exit(1);
    }
    now = now_ns();
    for (int i = 0; i < n; i++) {
      struct conn *c = evs[i].data.ptr;
      if (c->state == C_DONE)
        continue;
      check_events(evs[i].events, c);
      if (c->state == C_CONNECTING) {
        if (!(evs[i].events & EPOLLOUT))
          continue;
        c->state = C_OPEN;
        queue_msg(c, c->t0);
        flush(c);
      }
      if (evs[i].events & (EPOLLIN | EPOLLRDHUP))
        drain(c, now); /* records the cycle's latency (ts = t0) */
      flush(c);
      if (c->received == msg_size) {
        close(c->fd);
        c->fd = -1;
        c->state = C_DONE;
        finished++;
        if (measuring)
          done_msgs++;
        if (started < total) {
          started++;
          c->id = (*next_id)++;
          c->queued = c->written = c->received = 0;
          c->t0 = now;
          c->fd = start_connect();
          c->state = C_CONNECTING;
          conn_register(c);
        }
      }
    }
  }
}

static int mode_storm(const char *name, const char *impl, long total,
                      long parallel, long warm) {
  inflight = 1;
  struct conn *slots = conns_alloc((size_t)parallel);
  uint64_t next_id = 0;
  if (warm > 0)
    storm_run(slots, parallel, &next_id, warm);
  usleep(100000); /* let the server finish closing the warm-up's */
  hist_reset();
  done_msgs = 0;
  measuring = true;
  struct cpu_sample a = cpu_sample();
  storm_run(slots, parallel, &next_id, total);
  /* The server closes its side after our close: give it time to see the
   * last end-of-streams, so their cost is in the interval. */
  usleep(50000);
  struct cpu_sample b = cpu_sample();
  printf("RESULT name=%s impl=%s count=%ld parallel=%ld size=%zu", name,
         impl, total, parallel, payload);
  print_frame();
  /* msgs_per_s over the storm itself, not the 50 ms tail */
  b.t -= 50000000;
  print_cpu(&a, &b, done_msgs);
  printf("\n");
  fflush(stdout);
  return done_msgs == (uint64_t)total ? 0 : 1;
}

static long read_rss_kib(pid_t pid) {
  char path[64], line[256];
  snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
  FILE *f = fopen(path, "r");
  long kib = -1;
  if (f == NULL)
    return -1;
  while (fgets(line, sizeof line, f))
    if (strncmp(line, "VmRSS:", 6) == 0) {
      kib = strtol(line + 6, NULL, 10);
      break;
    }
  fclose(f);
  return kib;
}

/* Pages of memory held by all TCP sockets of the host (both ends). */
static long tcp_mem_pages(void) {
  FILE *f = fopen("/proc/net/sockstat", "r");
  char line[256];
  long pages = -1;
  if (f == NULL)
    return -1;
  while (fgets(line, sizeof line, f)) {
    char *p = strstr(line, "TCP:");
    char *m = p ? strstr(p, " mem ") : NULL;
    if (m != NULL)
      pages = strtol(m + 5, NULL, 10);
  }
  fclose(f);
  return pages;
}

/* One echo on each of cs[0..n), at most `window` unanswered at a time,
 * connecting first those not connected yet. */
static void echo_each(struct conn *cs, long n, long window) {
  long next = 0, pending = 0, finished = 0;
  struct epoll_event evs[512];
  while (finished < n) {
    while (pending < window && next < n) {
      struct conn *c = &cs[next++];
      int64_t now = now_ns();
      if (c->fd < 0) {
        c->fd = start_connect();
        c->state = C_CONNECTING;
        conn_register(c);
      }
      c->t0 = now;
      queue_msg(c, now);
      flush(c);
      pending++;
    }
    int k = epoll_wait(ep, evs, 512, 5000);
    if (k < 0 && errno != EINTR)
      die("epoll_wait");
    if (k == 0) {
      fprintf(stderr, "loadgen: idle: no progress for 5 s (%ld of %ld)\n",
              finished, n);
      exit(1);
    }
    int64_t now = now_ns();
    for (int i = 0; i < k; i++) {
      struct conn *c = evs[i].data.ptr;
      check_events(evs[i].events, c);
      c->state = C_OPEN;
      if (evs[i].events & (EPOLLIN | EPOLLRDHUP)) {
        unsigned got = drain(c, now);
        if (got > 0) {
          pending -= got;
          finished += got;
        }
      }
      flush(c);
    }
  }
}

static int mode_idle(const char *name, const char *impl, long n,
                     long settle_ms) {
  inflight = 1;
  struct conn *cs = conns_alloc((size_t)n);
  for (long i = 0; i < n; i++)
    cs[i].id = (uint64_t)i;
  long rss0 = read_rss_kib(server_pid);
  long mem0 = tcp_mem_pages();
  int64_t t0 = now_ns();
  echo_each(cs, n, 256);
  int64_t t1 = now_ns();
  /* Settle: let lazily freed memory and the server's housekeeping land.
   * Watch the connections meanwhile (a server closing one is an error). */
  struct epoll_event evs[64];
  int64_t until = now_ns() + settle_ms * 1000000;
  while (now_ns() < until) {
    int k = epoll_wait(ep, evs, 64, 50);
    for (int i = 0; i < k; i++)
      check_events(evs[i].events, evs[i].data.ptr);
  }
  long rss1 = read_rss_kib(server_pid);
  long mem1 = tcp_mem_pages();
  int threads;
  (void)read_sched_ns(server_pid, &threads, NULL);
  echo_each(cs, n, 256); /* all still there, all still echo */
  long page_kib = sysconf(_SC_PAGESIZE) / 1024;
  printf("RESULT name=%s impl=%s conns=%ld rss_base_kib=%ld rss_kib=%ld"
         " kib_per_conn=%.3f kernel_tcp_kib_per_conn=%.3f"
         " connect_s=%.3f server_threads=%d",
         name, impl, n, rss0, rss1, (double)(rss1 - rss0) / (double)n,
         mem0 >= 0 && mem1 >= 0
             ? (double)((mem1 - mem0) * page_kib) / (double)n
             : -1.0,
         (double)(t1 - t0) / 1e9, threads);
  print_frame();
  printf("\n");
  fflush(stdout);
  for (long i = 0; i < n; i++)
    close(cs[i].fd);
  return rss0 > 0 && rss1 > 0 ? 0 : 1;
}

/* ---- main ------------------------------------------------------------ */

static void usage(void) {
  fprintf(stderr,
          "usage: loadgen MODE --addr HOST:PORT [options]\n"
          "  wait     [--timeout-ms 5000]\n"
          "  pingpong --pid PID [--conns 64] [--size 64] [--inflight 1]\n"
          "           [--warmup 0.5] [--secs 3]\n"
          "  rate     --pid PID --rate MSGS_PER_S [--conns 64] [--size 64]\n"
          "           [--inflight 16] [--warmup 0.5] [--secs 3]\n"
          "  storm    --pid PID [--count 5000] [--parallel 64] [--size 64]\n"
          "           [--warm 500]\n"
          "  idle     --pid PID [--conns 10000] [--settle-ms 1000]\n"
          "  common:  [--name CASE] [--impl SERVER]  (labels for RESULT)\n"
          "           [--frame 4]  (each message: 4-byte big-endian length,\n"
          "                        then --size bytes; not for wait)\n");
  exit(2);
}

static double num(const char *opt, const char *s) {
  char *end;
  double v = strtod(s, &end);
  if (*s == '\0' || *end != '\0' || v < 0) {
    fprintf(stderr, "loadgen: %s wants a number >= 0, not '%s'\n", opt, s);
    exit(2);
  }
  return v;
}

int main(int argc, char **argv) {
  if (argc < 2)
    usage();
  const char *mode = argv[1], *addr = NULL, *name = NULL, *impl = "?";
  long conns = -1, count = 5000, parallel = 64, warm = 500, timeout_ms = 5000;
  long settle_ms = 1000;
  double warmup = 0.5, secs = 3, rate = 0;
  bool inflight_set = false;
  for (int i = 2; i < argc; i++) {
    const char *o = argv[i];
    if (i + 1 >= argc)
      usage();
    const char *v = argv[++i];
    if (strcmp(o, "--addr") == 0)
      addr = v;
    else if (strcmp(o, "--pid") == 0)
      server_pid = (pid_t)num(o, v);
    else if (strcmp(o, "--conns") == 0)
      conns = (long)num(o, v);
    else if (strcmp(o, "--size") == 0)
      payload = (size_t)num(o, v);
    else if (strcmp(o, "--frame") == 0)
      frame_hdr = (size_t)num(o, v);
    else if (strcmp(o, "--inflight") == 0) {
      inflight = (unsigned)num(o, v);
      inflight_set = true;
    }
    else if (strcmp(o, "--rate") == 0)
      rate = num(o, v);
    else if (strcmp(o, "--warmup") == 0)
      warmup = num(o, v);
    else if (strcmp(o, "--secs") == 0)
      secs = num(o, v);
    else if (strcmp(o, "--count") == 0)
      count = (long)num(o, v);
    else if (strcmp(o, "--parallel") == 0)
      parallel = (long)num(o, v);
    else if (strcmp(o, "--warm") == 0)
      warm = (long)num(o, v);
    else if (strcmp(o, "--timeout-ms") == 0)
      timeout_ms = (long)num(o, v);
    else if (strcmp(o, "--settle-ms") == 0)
      settle_ms = (long)num(o, v);
    else if (strcmp(o, "--name") == 0)
      name = v;
    else if (strcmp(o, "--impl") == 0)
      impl = v;
    else
      usage();
  }
  if (addr == NULL)
    usage();
  if (frame_hdr != 0 && frame_hdr != 4) {
    fprintf(stderr, "loadgen: --frame is 0 or 4 (bytes of length header)\n");
    return 2;
  }
  msg_size = frame_hdr + payload;
  if (strcmp(mode, "rate") == 0 && !inflight_set)
    inflight = 16; /* room for a server that lags; more is overload */
  /* A sanity bound on the payload in flight (flush and drain go in
   * CHUNKs, so the headers may take it over: pipe4k's 16 frames of 4 KiB
   * are 65 600 bytes). */
  if (payload < 1 || inflight < 1 || (size_t)inflight * payload > CHUNK) {
    fprintf(stderr, "loadgen: need size >= 1, inflight >= 1 and "
                    "size * inflight <= %zu\n", CHUNK);
    return 2;
  }
  parse_addr(addr);
  raise_nofile();
  signal(SIGPIPE, SIG_IGN);
  if (strcmp(mode, "wait") == 0)
    return mode_wait(timeout_ms);
  if (server_pid <= 0) {
    fprintf(stderr, "loadgen: %s needs --pid of the server\n", mode);
    return 2;
  }
  table_init();
  ep = epoll_create1(EPOLL_CLOEXEC);
  if (ep < 0)
    die("epoll_create1");
  if (strcmp(mode, "pingpong") == 0)
    return mode_pingpong(name ? name : "pingpong", impl,
                         conns < 0 ? 64 : conns, warmup, secs);
  if (strcmp(mode, "rate") == 0)
    return mode_rate(name ? name : "rate", impl, conns < 0 ? 64 : conns, rate,
                     warmup, secs);
  if (strcmp(mode, "storm") == 0)
    return mode_storm(name ? name : "storm", impl, count,
                      parallel < 1 ? 1 : parallel, warm);
  if (strcmp(mode, "idle") == 0)
    return mode_idle(name ? name : "idle", impl, conns < 0 ? 10000 : conns,
                     settle_ms);
  usage();
}
