/*
 * addr.h — network names and addresses: parsing "host:port", resolving
 * host names, formatting addresses back.  No socket I/O here.
 */
#ifndef LOOM_NET_ADDR_H
#define LOOM_NET_ADDR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "loom/ctx.h"

#define LOOM_ADDRS_MAX 8

typedef struct loom__addrs {
  int n;
  int type; /* SOCK_STREAM or SOCK_DGRAM */
  struct sockaddr_storage a[LOOM_ADDRS_MAX];
  socklen_t len[LOOM_ADDRS_MAX];
} loom__addrs;

/*
 * Resolve `addr` of `network` into up to LOOM_ADDRS_MAX socket addresses
 * (IPv4 first for "tcp", as the order of preference when dialing).
 * `passive`: for listening (an empty host means every local address).
 * Host names are looked up with getaddrinfo on a thread of its own,
 * which the caller waits for (a coroutine parks).  0, LOOM_ENETWORK,
 * LOOM_EBADADDR, LOOM_ENOHOST, LOOM_EDNS, -ENOMEM, or another -errno
 * (-EMFILE: a zone's interface name could not be looked up).
 */
int loom__resolve(const char *network, const char *addr, bool passive,
                  loom__addrs *out);
/* The same, a lookup bounded by `deadline` (0: none; -ETIMEDOUT) and by
 * `ctx` (NULL: none; its reason): the lookup goes on without the caller,
 * who returns at once. */
int loom__resolve_until(const char *network, const char *addr, bool passive,
                        loom__addrs *out, int64_t deadline, loom_ctx *ctx);

/*
 * The parsing half of loom__resolve: no I/O but if_nametoindex for an
 * IPv6 zone given by name (addr.c says why).  Returns 0 with `out` filled
 * for numeric addresses and paths (IPv4: dotted-decimal quads only;
 * IPv6 with an optional zone), LOOM__NEED_LOOKUP with the host name
 * in `host` (hostlen >= 64) and its family and port when a resolver must
 * be asked, or an error as loom__resolve (-errno too, if the interface
 * table cannot be read for a zone: -EMFILE).  The fuzz target's entry.
 */
#define LOOM__NEED_LOOKUP 1
int loom__parse_addr(const char *network, const char *addr, bool passive,
                     loom__addrs *out, char *host, size_t hostlen,
                     int *family, int *port);

/* loom__resolve for one socket type: LOOM_ENETWORK if `network` is of
 * the other (a "udp" address for a stream socket, say). */
int loom__resolve_type(const char *network, const char *addr, bool passive,
                       int type, loom__addrs *out);
int loom__resolve_type_until(const char *network, const char *addr,
                             bool passive, int type, loom__addrs *out,
                             int64_t deadline, loom_ctx *ctx);

/* "1.2.3.4:80", "[::1]:80", "[fe80::1%eth0]:80" (the zone by name, or
 * its number if no interface has that index), a Unix path ("@name" for
 * abstract), or -ENOSPC if `buf` is too small (and `buf` is left as it
 * was). */
int loom__format_addr(const struct sockaddr *sa, socklen_t len, char *buf,
                      size_t n);

/* The local (or, with `peer`, remote) address of socket fd, formatted as
 * above; -EINVAL for a NULL buf, -errno, -ENOSPC. */
int loom__fd_addr(int fd, bool peer, char *buf, size_t n);
/* True if a connected socket's two ends are the same address (a local
 * port picked equal to the destination port: it talks to itself). */
bool loom__self_connected(int fd);

#endif
