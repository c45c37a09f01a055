/*
 * export_test.h — sync internals the tests may reach (Go's
 * export_test.go).  Linked from the static library only; never installed.
 */
#ifndef LOOM_SYNC_EXPORT_TEST_H
#define LOOM_SYNC_EXPORT_TEST_H

/* fn (NULL: none) runs in loom_chan_close right after each waiter it
 * wakes, with no lock held: a test's way to slow the closer down just
 * where the channel may already have been freed by the woken (chan.h).
 * Returns the previous one. */
void (*loom__test_after_close_wake(void (*fn)(void)))(void);

#endif
