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
 */
#ifndef LOOM_ENGINE_EXPORT_TEST_H
#define LOOM_ENGINE_EXPORT_TEST_H

#include "engine/layer.h"
#include "engine/readbuf.h"

#endif
