/*
 * note.h — one-shot sleep/wake-up for OS threads (Go's note), on a futex.
 *
 * A note is cleared (0) or signalled (1).  One thread sleeps on it until
 * another signals it; a signal that comes first is not lost.  Only the
 * sleeper clears it (loom__note_clear) before the next use.  Idle Ms park
 * on their note; sysmon parks on its own.
 */
#ifndef LOOM_RUNTIME_NOTE_H
#define LOOM_RUNTIME_NOTE_H

#include <stdbool.h>
#include <stdint.h>

typedef struct loom__note {
  uint32_t key; /* 0 clear, 1 signalled; the futex word (accessed with
                   __atomic builtins: the futex call needs a plain word) */
} loom__note;

void loom__note_clear(loom__note *n);
void loom__note_wakeup(loom__note *n);
void loom__note_sleep(loom__note *n);
/* Sleeps at most `ns` (<0: no limit; any ns >= 0 works, INT64_MAX
 * included); returns true if signalled. */
bool loom__note_tsleep(loom__note *n, int64_t ns);

#endif
