/*
 * chan.c — channel microbenchmarks; bench/go/chan.go is the Go peer.
 *
 *   chan pingpong [n] [procs]   unbuffered round trip between two
 *                               coroutines: ns per round trip
 *   chan mpmc [n] [procs]       4 producers, 4 consumers, a channel
 *                               buffered 128: ns per element
 *   chan select [n] [procs]     one receiver selecting over 4 unbuffered
 *                               channels, 4 senders: ns per select
 * Default procs 1 for pingpong (the round trip itself, as Go's with
 * GOMAXPROCS=1), 2 for the others.
 */
#include <stdatomic.h>
#include <string.h>

#include "bench.h"
#include "loom/chan.h"

static const char *mode;
static long n;

static loom_chan *a, *b, *chs[4];
static atomic_long done_count;

static void ponger(void *arg) {
  (void)arg;
  long v;
  while (loom_chan_recv(a, &v) == 1)
    if (loom_chan_send(b, &v) != 0)
      break;
}

static void producer(void *arg) {
  long per = (long)arg;
  for (long i = 0; i < per; i++)
    loom_chan_send(a, &i);
  atomic_fetch_add(&done_count, 1);
}

static void consumer(void *arg) {
  (void)arg;
  long v;
  while (loom_chan_recv(a, &v) == 1)
    ;
  atomic_fetch_add(&done_count, 1);
}

static void sel_sender(void *arg) {
  loom_chan *c = arg;
  long per = n / 4;
  for (long i = 0; i < per; i++)
    loom_chan_send(c, &i);
  atomic_fetch_add(&done_count, 1);
}

static void bench_main(void *arg) {
  (void)arg;
  int64_t t0, el;
  long v = 0;
  if (strcmp(mode, "pingpong") == 0) {
    loom_chan_make(&a, sizeof(long), 0);
    loom_chan_make(&b, sizeof(long), 0);
    loom_go(ponger, NULL);
    for (long i = 0; i < n / 10; i++) { /* warm up */
      loom_chan_send(a, &i);
      loom_chan_recv(b, &v);
    }
    t0 = bench_now();
    for (long i = 0; i < n; i++) {
      loom_chan_send(a, &i);
      loom_chan_recv(b, &v);
    }
    el = bench_now() - t0;
    loom_chan_close(a);
    loom_yield();
  } else if (strcmp(mode, "mpmc") == 0) {
    loom_chan_make(&a, sizeof(long), 128);
    t0 = bench_now();
    for (int i = 0; i < 4; i++)
      loom_go(consumer, NULL);
    for (int i = 0; i < 4; i++)
      loom_go(producer, (void *)(n / 4));
    while (atomic_load(&done_count) < 4)
      loom_sleep(100000);
    loom_chan_close(a);
    while (atomic_load(&done_count) < 8)
      loom_sleep(100000);
    el = bench_now() - t0;
  } else {
    for (int i = 0; i < 4; i++) {
      loom_chan_make(&chs[i], sizeof(long), 0);
      loom_go(sel_sender, chs[i]);
    }
    loom_case cs[4];
    t0 = bench_now();
    for (long i = 0; i < (n / 4) * 4; i++) {
      for (int k = 0; k < 4; k++)
        cs[k] = (loom_case){chs[k], LOOM_RECV, &v, false};
      if (loom_select(cs, 4, 0) < 0)
        bench_die("select", -1);
    }
    el = bench_now() - t0;
  }
  printf("RESULT name=chan_%s impl=loom procs=%d n=%ld ns_per_op=%.1f\n", mode,
         loom_procs(), n, (double)el / (double)n);
  fflush(stdout);
}

int main(int argc, char **argv) {
  mode = argc > 1 ? argv[1] : "pingpong";
  n = bench_arg(argc, argv, 2, 1000000);
  int procs = (int)bench_arg(argc, argv, 3,
                             strcmp(mode, "pingpong") == 0 ? 1 : 2);
  bench_run(bench_main, NULL, procs);
  return 0;
}
