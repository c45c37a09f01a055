/*
 * addr.c — parsing and resolving network addresses (see addr.h).
 *
 * Numeric addresses never reach the resolver.  Names go to getaddrinfo on
 * a thread of its own: glibc's resolver may use far more stack than a
 * coroutine has, and it blocks, for seconds when a name server is gone.
 * The caller waits on an eventfd the thread writes when it is done,
 * bounded by the caller's deadline and context (a dial's), and a caller
 * that gives up leaves the lookup to finish on its own: the lookup is
 * shared by the two, and whoever is done last frees it.  At most
 * LOOKUP_MAX lookups run at once; more wait for one to end (a name
 * server that hangs must not cost a thread per dial for ever).
 *
 * Which hosts are literals is Go's rule, not the C library's.  An IPv4
 * literal is a dotted-decimal quad and nothing else: four parts of 0 to
 * 255, no leading zeros (Go's ParseIP since 1.17).  inet_aton also reads
 * "127.1", "0x7f.0.0.1", "0177.0.0.1" and "2130706433", and getaddrinfo
 * tries inet_aton before it looks a name up, so such a host must never
 * reach it: it would connect somewhere the caller may not have meant
 * (and "0177" is octal there, 127, where a reader sees 177).  So a host
 * that is no quad but whose last label is a number as inet_aton reads
 * one (decimal, octal or 0x hex; the WHATWG URL parser's "ends in a
 * number") is LOOM_EBADADDR; no top-level domain is numeric, so no real
 * name is lost.  A host with a ':' that is no IPv6 address is refused
 * too (a name has none).  Rejected: passing these forms to inet_aton
 * and accepting them all, which Go does not, and which makes one host
 * string mean two addresses depending on the reader.
 *
 * An IPv6 literal may carry a zone, "fe80::1%eth0" or "fe80::1%2": the
 * interface a link-local address belongs to, which becomes sin6_scope_id.
 * As in Go, a zone is first an interface name, and a decimal index only
 * if no interface has that name; unlike Go (which makes it 0, no zone),
 * an unknown name is LOOM_EBADADDR, as are an empty zone and a zone on
 * an IPv4 literal or a host name.  Looking the name up (if_nametoindex)
 * is the one system call of the parser: a read of the kernel's
 * interface table that never blocks, without which the fuzz target could
 * not check that a formatted zone parses back.  Formatting prints the
 * zone by name when the index still names an interface, else the number,
 * which parses back to the same index.
 */
#include "net/addr.h"

#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/un.h>
#include <unistd.h>

#include "ctx/ctx_internal.h"
#include "loom/fd.h"
#include "loom/runtime.h"
#include "runtime/runtime.h"

static int parse_port(const char *s, int *port) {
  if (*s == '\0')
    return LOOM_EBADADDR;
  long v = 0;
  for (const char *p = s; *p; p++) {
    if (*p < '0' || *p > '9')
      return LOOM_EBADADDR;
    v = v * 10 + (*p - '0');
    if (v > 65535)
      return LOOM_EBADADDR;
  }
  *port = (int)v;
  return 0;
}

/* Split "host:port", "[v6]:port" or ":port" into host and port. */
static int split_host_port(const char *addr, char *host, size_t hostlen,
                           int *port) {
  const char *colon;
  size_t hl;
  if (addr[0] == '[') {
    const char *end = strchr(addr, ']');
    if (end == NULL || end[1] != ':')
      return LOOM_EBADADDR;
    hl = (size_t)(end - addr - 1);
    if (hl >= hostlen)
      return LOOM_EBADADDR;
    memcpy(host, addr + 1, hl);
    host[hl] = '\0';
    colon = end + 1;
  } else {
    colon = strrchr(addr, ':');
    if (colon == NULL || memchr(addr, ':', (size_t)(colon - addr)) != NULL)
      return LOOM_EBADADDR; /* no port, or an IPv6 address without [] */
    hl = (size_t)(colon - addr);
    if (hl >= hostlen)
      return LOOM_EBADADDR;
    memcpy(host, addr, hl);
    host[hl] = '\0';
  }
  return parse_port(colon + 1, port);
}

static void add(loom__addrs *out, const void *sa, socklen_t len) {
  if (out->n == LOOM_ADDRS_MAX)
    return;
  memset(&out->a[out->n], 0, sizeof out->a[out->n]);
  memcpy(&out->a[out->n], sa, len);
  out->len[out->n++] = len;
}

/* A dotted-decimal quad: four parts 0..255, no leading zeros. */
static bool parse_ipv4(const char *s, struct in_addr *a) {
  unsigned char b[4];
  for (int i = 0; i < 4; i++) {
    if (i > 0 && *s++ != '.')
      return false;
    if (*s < '0' || *s > '9')
      return false;
    if (s[0] == '0' && s[1] >= '0' && s[1] <= '9')
      return false; /* a leading zero: octal to inet_aton */
    unsigned v = 0;
    for (; *s >= '0' && *s <= '9'; s++) {
      v = v * 10 + (unsigned)(*s - '0');
      if (v > 255)
        return false;
    }
    b[i] = (unsigned char)v;
  }
  if (*s != '\0')
    return false;
  memcpy(a, b, sizeof b);
  return true;
}

static bool is_hex(char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') ||
         (c >= 'A' && c <= 'F');
}

/* True if the last label of `host` (a trailing dot aside) is a number as
 * inet_aton reads one: decimal or octal digits, or 0x and hex digits. */
static bool ends_in_number(const char *host) {
  size_t n = strlen(host);
  if (n > 0 && host[n - 1] == '.')
    n--;
  size_t i = n;
  while (i > 0 && host[i - 1] != '.')
    i--;
  const char *l = host + i;
  size_t ll = n - i;
  if (ll == 0)
    return false;
  size_t j = 0;
  if (ll >= 2 && l[0] == '0' && (l[1] == 'x' || l[1] == 'X')) {
    for (j = 2; j < ll && is_hex(l[j]); j++)
      ;
  } else {
    for (j = 0; j < ll && l[j] >= '0' && l[j] <= '9'; j++)
      ;
  }
  return j == ll;
}

/* An IPv6 zone: an interface name, else a decimal index (Go's order).
 * 0, LOOM_EBADADDR, or -errno if the interface table cannot be read
 * (-EMFILE: if_nametoindex needs a socket). */
static int parse_zone(const char *zone, uint32_t *scope) {
  size_t n = strlen(zone);
  if (n == 0)
    return LOOM_EBADADDR;
  if (n < IF_NAMESIZE) {
    unsigned idx = if_nametoindex(zone);
    if (idx != 0) {
      *scope = idx;
      return 0;
    }
    int e = errno;
    if (e != ENODEV && e != 0)
      return -e;
  }
  uint64_t v = 0;
  for (const char *p = zone; *p; p++) {
    if (*p < '0' || *p > '9')
      return LOOM_EBADADDR; /* no interface of that name */
    v = v * 10 + (uint64_t)(*p - '0');
    if (v > UINT32_MAX)
      return LOOM_EBADADDR;
  }
  *scope = (uint32_t)v;
  return 0;
}

/* A numeric host of `family` (AF_UNSPEC: either): 0 with the address
 * added to `out`, 1 if `host` is a name, or an error: LOOM_EBADADDR (a
 * malformed literal or zone, or a literal of the other family), or
 * parse_zone's -errno. */
static int literal(int family, const char *host, int port, loom__addrs *out) {
  struct sockaddr_in s4 = {.sin_family = AF_INET,
                           .sin_port = htons((uint16_t)port)};
  struct sockaddr_in6 s6 = {.sin6_family = AF_INET6,
                            .sin6_port = htons((uint16_t)port)};
  char ip[INET6_ADDRSTRLEN];
  const char *zone = strchr(host, '%');
  if (zone != NULL) {
    size_t n = (size_t)(zone - host);
    if (n >= sizeof ip)
      return LOOM_EBADADDR; /* longer than any IPv6 literal */
    memcpy(ip, host, n);
    ip[n] = '\0';
    host = ip;
    zone++;
  }
  if (parse_ipv4(host, &s4.sin_addr)) {
    if (family == AF_INET6 || zone != NULL)
      return LOOM_EBADADDR;
    add(out, &s4, sizeof s4);
    return 0;
  }
  if (inet_pton(AF_INET6, host, &s6.sin6_addr) == 1) {
    if (family == AF_INET)
      return LOOM_EBADADDR;
    if (zone != NULL) {
      int err = parse_zone(zone, &s6.sin6_scope_id);
      if (err != 0)
        return err;
    }
    add(out, &s6, sizeof s6);
    return 0;
  }
  if (zone != NULL || strchr(host, ':') != NULL || ends_in_number(host))
    return LOOM_EBADADDR; /* looks numeric but is not a valid address */
  return 1;
}

/* One lookup, shared by its caller and its thread (refs). */
struct lookup {
  loom__rtobj obj; /* first: a coroutine's share, dropped by the runtime
                      if it stops while the coroutine waits */
  _Atomic int refs;
  _Atomic int done; /* set (release) before the eventfd is written */
  int efd;          /* written once when the answer is in */
  int family, socktype, port;
  int err;
  loom__addrs out;
  char host[]; /* a copy: the caller may be gone when it is read */
};

#define LOOKUP_MAX 64
static _Atomic int lookups_running;

static void lookup_put(struct lookup *lk) {
  if (atomic_fetch_sub_explicit(&lk->refs, 1, memory_order_acq_rel) == 1) {
    close(lk->efd);
    free(lk); /* see lookup() for why not loom__free */
  }
}

static void lookup_abandon(loom__rtobj *o) {
  lookup_put((struct lookup *)(void *)o); /* obj is the first member */
}

static void resolve_host(struct lookup *lk) {
  struct addrinfo hints = {.ai_family = lk->family,
                           .ai_socktype = lk->socktype,
                           .ai_flags = AI_ADDRCONFIG};
  struct addrinfo *res = NULL;
  int r = getaddrinfo(lk->host, NULL, &hints, &res);
  /* AI_ADDRCONFIG ignores loopback: on a host with only "lo" (a
   * container without a network) it makes "localhost" unknown.  Ask
   * again without it. */
  if (r == EAI_NONAME || r == EAI_NODATA || r == EAI_ADDRFAMILY) {
    hints.ai_flags = 0;
    r = getaddrinfo(lk->host, NULL, &hints, &res);
  }
  if (r != 0) {
    lk->err = r == EAI_NONAME || r == EAI_NODATA
                  ? LOOM_ENOHOST
                  : r == EAI_MEMORY ? -ENOMEM : LOOM_EDNS;
    return;
  }
  /* IPv4 first, then IPv6 (what dialing "localhost" expects here). */
  for (int pass = 0; pass < 2; pass++)
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
      if ((pass == 0) != (ai->ai_family == AF_INET))
        continue;
      if (ai->ai_family == AF_INET) {
        struct sockaddr_in s4;
        memcpy(&s4, ai->ai_addr, sizeof s4);
        s4.sin_port = htons((uint16_t)lk->port);
        add(&lk->out, &s4, sizeof s4);
      } else if (ai->ai_family == AF_INET6) {
        struct sockaddr_in6 s6;
        memcpy(&s6, ai->ai_addr, sizeof s6);
        s6.sin6_port = htons((uint16_t)lk->port);
        add(&lk->out, &s6, sizeof s6);
      }
    }
  freeaddrinfo(res);
  lk->err = lk->out.n > 0 ? 0 : LOOM_ENOHOST;
}

static void *lookup_main(void *arg) {
  struct lookup *lk = arg;
  resolve_host(lk);
  atomic_fetch_sub_explicit(&lookups_running, 1, memory_order_relaxed);
  atomic_store_explicit(&lk->done, 1, memory_order_release);
  uint64_t one = 1;
  while (write(lk->efd, &one, sizeof one) < 0 && errno == EINTR)
    ;
  lookup_put(lk);
  return NULL;
}

/* Wait for a free lookup slot, in 1 ms slices, until the deadline or the
 * context's end. */
static int lookup_slot(int64_t deadline, loom_ctx *ctx) {
  for (;;) {
    int n = atomic_load_explicit(&lookups_running, memory_order_relaxed);
    if (n < LOOKUP_MAX && atomic_compare_exchange_weak_explicit(
                              &lookups_running, &n, n + 1, memory_order_relaxed,
                              memory_order_relaxed))
      return 0;
    if (n < LOOKUP_MAX)
      continue;
    int err = loom__ctx_reason(ctx);
    if (err != 0)
      return err;
    if (deadline != 0 && loom_now() >= deadline)
      return -ETIMEDOUT;
    loom_sleep(1000000);
  }
}

static int lookup(const char *host, int family, int socktype, int port,
                  loom__addrs *out, int64_t deadline, loom_ctx *ctx) {
  /* Over already: no thread for an answer nobody would wait for. */
  int err = loom__ctx_reason(ctx);
  if (err == 0 && deadline != 0 && loom_now() >= deadline)
    err = -ETIMEDOUT;
  if (err == 0)
    err = lookup_slot(deadline, ctx);
  if (err != 0)
    return err;
  size_t hl = strlen(host) + 1;
  /* From the C library, not loom_set_allocator's: the lookup's thread
   * may free it after loom_run has returned and another allocator (or
   * none) has been set. */
  struct lookup *lk = malloc(sizeof *lk + hl);
  if (lk == NULL) {
    atomic_fetch_sub_explicit(&lookups_running, 1, memory_order_relaxed);
    return -ENOMEM;
  }
  memset(lk, 0, sizeof *lk);
  memcpy(lk->host, host, hl);
  lk->family = family;
  lk->socktype = socktype;
  lk->port = port;
  atomic_init(&lk->refs, 2);
  atomic_init(&lk->done, 0);
  lk->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  pthread_attr_t attr;
  pthread_t t;
  int r = lk->efd < 0 ? errno : pthread_attr_init(&attr);
  if (r == 0) {
    pthread_attr_setstacksize(&attr, (size_t)256 << 10);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    r = pthread_create(&t, &attr, lookup_main, lk);
    pthread_attr_destroy(&attr);
  }
  if (r != 0) {
    atomic_fetch_sub_explicit(&lookups_running, 1, memory_order_relaxed);
    if (lk->efd >= 0)
      close(lk->efd);
    free(lk);
    return -r;
  }
  /* A coroutine the runtime abandons at shutdown never comes back for
   * its share: the runtime drops it then. */
  loom__m *m = loom__getm();
  loom__rt *rt = m != NULL ? m->rt : NULL;
  if (rt != NULL) {
    lk->obj.abandon = lookup_abandon;
    loom__rt_track(rt, &lk->obj);
  }
  /* Parks a coroutine; a plain thread (or one in a blocking section,
   * which stays its own) waits in poll(2). */
  do {
    err = loom_fd_wait_ctx(lk->efd, LOOM_FD_READ, deadline, ctx);
  } while (err == 0 && !atomic_load_explicit(&lk->done, memory_order_acquire));
  if (err == 0) {
    *out = lk->out;
    err = lk->err;
  }
  if (rt != NULL)
    loom__rt_untrack(rt, &lk->obj);
  lookup_put(lk);
  return err;
}

/* A path takes its NUL within sun_path, so 107 bytes at most; an
 * abstract name has none (its '@' becomes the leading 0 byte), so all
 * 108 bytes. */
static int resolve_unix(const char *path, loom__addrs *out) {
  struct sockaddr_un su = {.sun_family = AF_UNIX};
  size_t n = strlen(path);
  size_t max = sizeof su.sun_path - (path[0] == '@' ? 0 : 1);
  if (n == 0 || n > max)
    return LOOM_EBADADDR;
  memcpy(su.sun_path, path, n);
  if (path[0] == '@')
    su.sun_path[0] = '\0'; /* abstract namespace: no file */
  add(out, &su, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n +
                            (path[0] == '@' ? 0 : 1)));
  return 0;
}

int loom__parse_addr(const char *network, const char *addr, bool passive,
                     loom__addrs *out, char *host, size_t hostlen,
                     int *family_out, int *port_out) {
  if (network == NULL || addr == NULL || hostlen < 64)
    return LOOM_EBADADDR;
  memset(out, 0, sizeof *out);
  int family;
  if (!strcmp(network, "tcp") || !strcmp(network, "udp"))
    family = AF_UNSPEC;
  else if (!strcmp(network, "tcp4") || !strcmp(network, "udp4"))
    family = AF_INET;
  else if (!strcmp(network, "tcp6") || !strcmp(network, "udp6"))
    family = AF_INET6;
  else if (!strcmp(network, "unix") || !strcmp(network, "unixgram"))
    family = AF_UNIX;
  else
    return LOOM_ENETWORK;
  out->type = network[0] == 'u' && network[1] == 'd' ? SOCK_DGRAM
              : !strcmp(network, "unixgram")        ? SOCK_DGRAM
                                                    : SOCK_STREAM;
  if (family == AF_UNIX)
    return resolve_unix(addr, out);

  int port;
  int err = split_host_port(addr, host, hostlen, &port);
  if (err != 0)
    return err;
  if (host[0] == '\0') {
    if (passive) {
      /* Every local address: dual-stack [::] where IPv6 exists. */
      if (family != AF_INET)
        literal(AF_INET6, "::", port, out);
      if (family != AF_INET6)
        literal(AF_INET, "0.0.0.0", port, out); /* fallback for "tcp" */
      return 0;
    }
    snprintf(host, hostlen, "%s", family == AF_INET6 ? "::1" : "127.0.0.1");
  }
  err = literal(family, host, port, out);
  if (err <= 0)
    return err;
  *family_out = family;
  *port_out = port;
  return LOOM__NEED_LOOKUP;
}

/* As loom__resolve_until, and the network must name sockets of `type`
 * (0: any).  The network says which before any name is looked up, so a
 * wrong one is refused at once, as it is for a literal address. */
static int resolve(const char *network, const char *addr, bool passive,
                   int type, loom__addrs *out, int64_t deadline,
                   loom_ctx *ctx) {
  char host[256];
  int family = 0, port = 0;
  int err = loom__parse_addr(network, addr, passive, out, host, sizeof host,
                             &family, &port);
  if (err != 0 && err != LOOM__NEED_LOOKUP)
    return err;
  if (type != 0 && out->type != type)
    return LOOM_ENETWORK;
  if (err == 0)
    return 0;
  type = out->type;
  err = lookup(host, family, type, port, out, deadline, ctx);
  out->type = type;
  return err;
}

int loom__resolve_until(const char *network, const char *addr, bool passive,
                        loom__addrs *out, int64_t deadline, loom_ctx *ctx) {
  return resolve(network, addr, passive, 0, out, deadline, ctx);
}

int loom__resolve(const char *network, const char *addr, bool passive,
                  loom__addrs *out) {
  return resolve(network, addr, passive, 0, out, 0, NULL);
}

int loom__resolve_type_until(const char *network, const char *addr,
                             bool passive, int type, loom__addrs *out,
                             int64_t deadline, loom_ctx *ctx) {
  return resolve(network, addr, passive, type, out, deadline, ctx);
}

int loom__resolve_type(const char *network, const char *addr, bool passive,
                       int type, loom__addrs *out) {
  return loom__resolve_type_until(network, addr, passive, type, out, 0, NULL);
}

int loom__format_addr(const struct sockaddr *sa, socklen_t len, char *buf,
                      size_t n) {
  /* Formatted here first: a buffer too small is left untouched. */
  char out[sizeof(struct sockaddr_un) + 8];
  char ip[INET6_ADDRSTRLEN];
  int w;
  if (sa->sa_family == AF_INET) {
    const struct sockaddr_in *s4 = (const struct sockaddr_in *)(const void *)sa;
    inet_ntop(AF_INET, &s4->sin_addr, ip, sizeof ip);
    w = snprintf(out, sizeof out, "%s:%u", ip, ntohs(s4->sin_port));
  } else if (sa->sa_family == AF_INET6) {
    const struct sockaddr_in6 *s6 =
        (const struct sockaddr_in6 *)(const void *)sa;
    inet_ntop(AF_INET6, &s6->sin6_addr, ip, sizeof ip);
    if (s6->sin6_scope_id == 0) {
      w = snprintf(out, sizeof out, "[%s]:%u", ip, ntohs(s6->sin6_port));
    } else {
      char zone[IF_NAMESIZE]; /* also holds any uint32_t in decimal */
      if (if_indextoname(s6->sin6_scope_id, zone) == NULL)
        snprintf(zone, sizeof zone, "%u", (unsigned)s6->sin6_scope_id);
      w = snprintf(out, sizeof out, "[%s%%%s]:%u", ip, zone,
                   ntohs(s6->sin6_port));
    }
  } else if (sa->sa_family == AF_UNIX) {
    const struct sockaddr_un *su = (const struct sockaddr_un *)(const void *)sa;
    size_t pl = len > offsetof(struct sockaddr_un, sun_path)
                    ? len - offsetof(struct sockaddr_un, sun_path)
                    : 0;
    if (pl > sizeof su->sun_path)
      pl = sizeof su->sun_path;
    if (pl > 0 && su->sun_path[0] == '\0')
      w = snprintf(out, sizeof out, "@%.*s", (int)(pl - 1), su->sun_path + 1);
    else
      w = snprintf(out, sizeof out, "%.*s", (int)strnlen(su->sun_path, pl),
                   su->sun_path);
  } else {
    w = snprintf(out, sizeof out, "?");
  }
  if (w < 0 || (size_t)w >= sizeof out || (size_t)w >= n)
    return -ENOSPC;
  memcpy(buf, out, (size_t)w + 1);
  return 0;
}

int loom__fd_addr(int fd, bool peer, char *buf, size_t n) {
  if (buf == NULL)
    return -EINVAL;
  struct sockaddr_storage ss = {0};
  socklen_t sl = sizeof ss;
  int r = peer ? getpeername(fd, (struct sockaddr *)&ss, &sl)
               : getsockname(fd, (struct sockaddr *)&ss, &sl);
  if (r != 0)
    return -errno;
  return loom__format_addr((struct sockaddr *)&ss, sl, buf, n);
}

bool loom__self_connected(int fd) {
  struct sockaddr_storage a, b;
  socklen_t al = sizeof a, bl = sizeof b;
  if (getsockname(fd, (struct sockaddr *)&a, &al) != 0 ||
      getpeername(fd, (struct sockaddr *)&b, &bl) != 0)
    return false;
  return al == bl && memcmp(&a, &b, al) == 0;
}
