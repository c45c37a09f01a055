/*
 * echo_url.c — parsing echo URLs (see echo_url.h).
 *
 * The checks here are the ones a person gets wrong on a command line — a
 * missing port, an IPv6 address without brackets, "unix://" with nothing
 * after it — so that the programs can say so and exit with usage before
 * the runtime starts.  Whether a host exists is loom's business.
 */
#include "echo_url.h"

#include <stdio.h>
#include <string.h>

static const struct {
  const char *scheme;
  bool packet, local;
} schemes[] = {
    {"tcp", false, false}, {"tcp4", false, false},   {"tcp6", false, false},
    {"udp", true, false},  {"udp4", true, false},    {"udp6", true, false},
    {"unix", false, true}, {"unixgram", true, true},
};

#define FAIL(...)                                                              \
  do {                                                                         \
    snprintf(err, errlen, __VA_ARGS__);                                        \
    return -1;                                                                 \
  } while (0)

/* "host:port" or "[v6]:port"; host may be empty (every local address).
 * Returns the port, or -1 with a message. */
static int check_host_port(const char *a, char *err, size_t errlen) {
  const char *colon;
  if (a[0] == '[') {
    const char *end = strchr(a, ']');
    if (end == NULL)
      FAIL("\"%s\": missing ']' after the IPv6 address", a);
    if (end[1] != ':')
      FAIL("\"%s\": missing \":port\" after ']'", a);
    colon = end + 1;
  } else {
    colon = strrchr(a, ':');
    if (colon == NULL)
      FAIL("\"%s\": missing \":port\"", a);
    if (memchr(a, ':', (size_t)(colon - a)) != NULL)
      FAIL("\"%s\": an IPv6 address goes in brackets, as [::1]:7000", a);
    if (memchr(a, '/', (size_t)(colon - a)) != NULL)
      FAIL("\"%s\": a host name has no '/'", a);
  }
  const char *p = colon + 1;
  if (*p == '\0')
    FAIL("\"%s\": the port is empty", a);
  long port = 0;
  for (; *p; p++) {
    if (*p < '0' || *p > '9')
      FAIL("\"%s\": the port must be a number", a);
    port = port * 10 + (*p - '0');
    if (port > 65535)
      FAIL("\"%s\": the port must be at most 65535", a);
  }
  return (int)port;
}

int echo_url_parse(const char *s, echo_url *u, char *err, size_t errlen) {
  const char *sep = strstr(s, "://");
  if (sep == NULL)
    FAIL("\"%s\": not a URL (want scheme://address, e.g. "
         "tcp://127.0.0.1:7000)",
         s);
  size_t sl = (size_t)(sep - s);
  int k = -1;
  for (size_t i = 0; i < sizeof schemes / sizeof schemes[0]; i++)
    if (strlen(schemes[i].scheme) == sl && !strncmp(s, schemes[i].scheme, sl))
      k = (int)i;
  if (k < 0)
    FAIL("\"%s\": unknown scheme \"%.*s\" (tcp, tcp4, tcp6, udp, udp4, udp6, "
         "unix, unixgram)",
         s, (int)sl, s);
  const char *a = sep + 3;
  echo_url v = {
      .packet = schemes[k].packet, .local = schemes[k].local, .port = -1};
  snprintf(v.network, sizeof v.network, "%s", schemes[k].scheme);
  if (strlen(a) >= sizeof v.addr)
    FAIL("\"%s\": the address is too long", s);
  if (v.local) {
    /* unix:///tmp/s (an absolute path) or unix://@name (abstract). */
    if (a[0] != '/' && a[0] != '@')
      FAIL("\"%s\": want %s:///absolute/path or %s://@abstract-name", s,
           v.network, v.network);
    if (a[1] == '\0')
      FAIL("\"%s\": the %s is empty", s, a[0] == '/' ? "path" : "name");
    if (strlen(a) >= 108) /* sizeof sockaddr_un.sun_path */
      FAIL("\"%s\": a socket path has at most 107 bytes", s);
  } else {
    int port = check_host_port(a, err, errlen);
    if (port < 0)
      return -1;
    v.port = port;
  }
  snprintf(v.addr, sizeof v.addr, "%s", a);
  *u = v;
  return 0;
}

void echo_url_format(char *buf, size_t len, const char *network,
                     const char *addr) {
  snprintf(buf, len, "%s://%s", network, addr);
}
