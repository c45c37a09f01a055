/*
 * export_test.h — engine internals the tests may use (the engine's
 * counterpart of runtime/export_test.h).  Never installed.
 *
 * The layer stack (layer.h): a test puts a layer of its own under the
 * zlib layer — one that hands out scripted bytes, errors and end of
 * stream, and keeps what is written — and checks compress.c's reads and
 * writes byte by byte, with no socket and no timing.
 *
 * The stream reader's buffer (readbuf.h): a test or fuzz target reads
 * through a layer into a loom__readbuf with read_stream's own calls
 * (stack, room, took, unstack, shed), so it checks the buffer the
 * session uses, not a copy of it.
 *
 * A hook in the reader's idle check (below).
 */
#ifndef LOOM_ENGINE_EXPORT_TEST_H
#define LOOM_ENGINE_EXPORT_TEST_H

#include "engine/layer.h"
#include "engine/readbuf.h"
#include "loom/engine.h"

/* Called by a session's reader when its idle check comes due, between
 * its look at pending option changes and the check (NULL: nothing; one
 * relaxed load per check): a test changes read_timeout there, in the
 * window a reader preempted at that point would leave open. */
extern void (*_Atomic loom__test_idle_window)(loom_session *s);

#endif
