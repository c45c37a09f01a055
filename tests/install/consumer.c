/*
 * consumer — a program built against an installed loom, the way a user
 * builds one: with pkg-config or with CMake's find_package(loom).
 *
 * It runs the runtime, spawns coroutines that yield and sleep, and checks
 * what came back; it exits 0 only if every check held.
 */
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <loom.h>

#ifndef CONSUMER_LINK
#define CONSUMER_LINK "unknown"
#endif

#define N 1000
#define MS (INT64_C(1000000))

static atomic_long sum;
static atomic_int done;
static int failures;

static void expect(int ok, const char *what) {
  if (!ok) {
    fprintf(stderr, "consumer (%s): FAILED: %s\n", CONSUMER_LINK, what);
    failures++;
  }
}

static void worker(void *arg) {
  long i = (long)(intptr_t)arg;
  loom_yield();
  loom_sleep(1 * MS);
  atomic_fetch_add(&sum, i);
  atomic_fetch_add(&done, 1);
}

struct result {
  int spawn_errors;
  int timed_out;
  uint64_t main_id;
  int procs;
};

static void main_coroutine(void *arg) {
  struct result *r = arg;
  r->main_id = loom_id();
  r->procs = loom_procs();
  for (long i = 1; i <= N; i++)
    if (loom_go(worker, (void *)(intptr_t)i) != 0)
      r->spawn_errors++;
  int64_t deadline = loom_now() + 10000 * MS;
  while (atomic_load(&done) < N - r->spawn_errors) {
    if (loom_now() > deadline) {
      r->timed_out = 1;
      break;
    }
    loom_sleep(1 * MS);
  }
}

int main(void) {
  expect(loom_go(worker, NULL) == LOOM_ENORUNTIME,
         "loom_go outside a runtime returns LOOM_ENORUNTIME");
  expect(strcmp(loom_err_name(LOOM_ENORUNTIME), "LOOM_ENORUNTIME") == 0,
         "loom_err_name names loom's codes");

  struct result r = {0};
  int rc = loom_run(main_coroutine, &r, NULL);
  if (rc != 0)
    fprintf(stderr, "consumer: loom_run: %s\n", loom_strerror(rc));
  expect(rc == 0, "loom_run returns 0");
  expect(r.main_id == 1, "the main coroutine has id 1");
  expect(r.procs >= 1, "the runtime has at least one processor");
  expect(r.spawn_errors == 0, "every loom_go succeeds");
  expect(!r.timed_out, "every coroutine finishes within 10 s");
  expect(atomic_load(&done) == N, "every coroutine ran");
  expect(atomic_load(&sum) == (long)N * (N + 1) / 2, "the sum is right");
  expect(loom_procs() == 0, "no runtime after loom_run returns");

  if (failures)
    return 1;
  printf("consumer (%s): ok: %d coroutines on %d processors, sum %ld\n",
         CONSUMER_LINK, N, r.procs, atomic_load(&sum));
  return 0;
}
