/*
 * hello — the smallest useful loom program (the README's example).
 *
 * The main coroutine spawns ten workers; each yields a few times and then
 * sleeps, which parks the coroutine, not the thread.  loom_run returns
 * when the main coroutine returns, so main waits for the workers first.
 */
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>

#include <loom.h>

#define WORKERS 10
#define MS INT64_C(1000000)

static atomic_int done;

static void worker(void *arg) {
  intptr_t n = (intptr_t)arg;
  for (int i = 0; i < 3; i++)
    loom_yield(); /* let the other coroutines run */
  loom_sleep(n * 10 * MS);
  printf("worker %ld (coroutine %llu) slept %ld ms\n", (long)n,
         (unsigned long long)loom_id(), (long)n * 10);
  atomic_fetch_add(&done, 1);
}

static void main_coroutine(void *arg) {
  for (intptr_t n = 1; n <= WORKERS; n++) {
    int rc = loom_go(worker, (void *)n);
    if (rc != 0) {
      fprintf(stderr, "loom_go: %s\n", loom_strerror(rc));
      return;
    }
  }
  while (atomic_load(&done) < WORKERS)
    loom_sleep(1 * MS);
}

int main(void) {
  int rc = loom_run(main_coroutine, NULL, NULL); /* NULL: defaults + env */
  if (rc != 0) {
    fprintf(stderr, "loom_run: %s\n", loom_strerror(rc));
    return 1;
  }
  return atomic_load(&done) == WORKERS ? 0 : 1;
}
