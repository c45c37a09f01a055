/*
 * fuzz_addr.c — fuzz target for network-address parsing (src/net/addr.c).
 *
 * Input: byte 0 picks the network, byte 1 bit 0 the passive flag, the
 * rest is the address string.  Properties checked beyond "no crash, no
 * sanitizer report":
 *   - a parse that succeeds gives 1..LOOM_ADDRS_MAX addresses of the
 *     network's family, each of which formats without overflow;
 *   - formatting an IP address and parsing the result again gives the
 *     same socket address (the two are inverses).
 *
 * Built twice: with libFuzzer (clang) for fuzzing, and with replay.c's
 * main, which ctest runs over fuzz/corpus/addr in every build.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "net/addr.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *const networks[] = {"tcp",  "tcp4", "tcp6",     "udp",
                                       "udp4", "udp6", "unix",     "unixgram",
                                       "ip",   "",     "tcp4 "};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 2)
    return 0;
  const char *net = networks[data[0] % (sizeof networks / sizeof *networks)];
  bool passive = data[1] & 1;
  char *addr = malloc(size - 1);
  if (addr == NULL)
    return 0;
  memcpy(addr, data + 2, size - 2);
  addr[size - 2] = '\0';

  loom__addrs as;
  char host[256];
  int family = 0, port = 0;
  int r = loom__parse_addr(net, addr, passive, &as, host, sizeof host,
                           &family, &port);
  if (r == LOOM__NEED_LOOKUP) {
    if (host[0] == '\0' || port < 0 || port > 65535)
      abort();
  } else if (r == 0) {
    if (as.n < 1 || as.n > LOOM_ADDRS_MAX)
      abort();
    for (int i = 0; i < as.n; i++) {
      char text[300];
      const struct sockaddr *sa = (const struct sockaddr *)&as.a[i];
      if (loom__format_addr(sa, as.len[i], text, sizeof text) != 0)
        abort();
      if (sa->sa_family != AF_INET && sa->sa_family != AF_INET6)
        continue;
      /* Round trip: the formatted form parses to the same address. */
      loom__addrs back;
      char h2[256];
      int f2, p2;
      const char *n2 = sa->sa_family == AF_INET ? "tcp4" : "tcp6";
      if (loom__parse_addr(n2, text, false, &back, h2, sizeof h2, &f2, &p2) !=
              0 ||
          back.len[0] != as.len[i] || memcmp(&back.a[0], &as.a[i],
                                             as.len[i]) != 0)
        abort();
    }
  } else if (r >= 0) {
    abort(); /* errors are negative */
  }
  free(addr);
  return 0;
}
