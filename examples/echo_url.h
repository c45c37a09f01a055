/*
 * echo_url.h — the URLs echo_server and echo_client take.
 *
 *   tcp://host:port   tcp4://host:port   tcp6://[v6addr]:port
 *   udp://host:port   udp4://host:port   udp6://[v6addr]:port
 *   unix:///path      unix://@abstract   (stream)
 *   unixgram:///path  unixgram://@abstract
 *
 * A URL becomes loom's (network, address) pair: "tcp://127.0.0.1:7000"
 * is ("tcp", "127.0.0.1:7000"), "unix:///tmp/s" is ("unix", "/tmp/s").
 * Parsing does no I/O and resolves nothing: a host name is checked only
 * for shape, loom resolves it when listening or dialing.
 */
#ifndef LOOM_EXAMPLES_ECHO_URL_H
#define LOOM_EXAMPLES_ECHO_URL_H

#include <stdbool.h>
#include <stddef.h>

typedef struct echo_url {
  char network[16]; /* "tcp", "tcp6", "udp", "unix", "unixgram", ... */
  char addr[256];   /* "host:port", "[v6]:port", "/path" or "@name" */
  bool packet;      /* udp* or unixgram: datagrams, not a stream */
  bool local;       /* unix or unixgram */
  int port;         /* for tcp* and udp*; -1 otherwise */
} echo_url;

/*
 * echo_url_parse — parse `s` into *u.  Returns 0, or -1 with a message
 * for a person in err[0..errlen) ("unknown scheme \"http\"; ...").
 * *u is left untouched on failure.
 */
int echo_url_parse(const char *s, echo_url *u, char *err, size_t errlen);

/* echo_url_format — "scheme://addr" for a network and the address loom
 * reports (loom_listener_addr and friends).  Truncates to fit. */
void echo_url_format(char *buf, size_t len, const char *network,
                     const char *addr);

#endif
