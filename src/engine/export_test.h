/*
 * export_test.h — engine internals the tests may use (the engine's
 * counterpart of runtime/export_test.h).  Never installed.
 *
 * The layer stack (layer.h): a test puts a layer of its own under the
 * zlib layer — one that hands out scripted bytes, errors and end of
 * stream, and keeps what is written — and checks compress.c's reads and
 * writes byte by byte, with no socket and no timing.
 */
#ifndef LOOM_ENGINE_EXPORT_TEST_H
#define LOOM_ENGINE_EXPORT_TEST_H

#include "engine/layer.h"

#endif
