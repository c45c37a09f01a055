/* note.c — futex-backed notes (see note.h). */
#include "runtime/note.h"

#include <errno.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "loom/runtime.h"
#include "runtime/runtime.h"

static void futex_wait(uint32_t *addr, uint32_t val,
                       const struct timespec *ts) {
  syscall(SYS_futex, addr, FUTEX_WAIT_PRIVATE, val, ts, NULL, 0);
}

void loom__note_clear(loom__note *n) {
  __atomic_store_n(&n->key, 0, __ATOMIC_RELAXED);
}

void loom__note_wakeup(loom__note *n) {
  if (__atomic_exchange_n(&n->key, 1, __ATOMIC_RELEASE) == 0)
    syscall(SYS_futex, &n->key, FUTEX_WAKE_PRIVATE, 1, NULL,
            NULL, 0);
}

void loom__note_sleep(loom__note *n) { (void)loom__note_tsleep(n, -1); }

bool loom__note_tsleep(loom__note *n, int64_t ns) {
  int saved = errno;
  /* Saturated: a deadline of INT64_MAX (a wait "for ever") comes here
   * as INT64_MAX - now, and now + that must not overflow. */
  int64_t deadline = ns >= 0 ? loom__after(ns) : 0;
  while (__atomic_load_n(&n->key, __ATOMIC_ACQUIRE) == 0) {
    if (ns < 0) {
      futex_wait(&n->key, 0, NULL);
      continue;
    }
    int64_t left = deadline - loom_now();
    if (left <= 0)
      break;
    struct timespec ts = {left / 1000000000, left % 1000000000};
    futex_wait(&n->key, 0, &ts);
  }
  errno = saved;
  return __atomic_load_n(&n->key, __ATOMIC_ACQUIRE) != 0;
}
