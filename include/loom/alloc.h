/*
 * loom/alloc.h — the allocator hook.
 *
 * Every allocation loom makes for its own objects goes through one hook.
 * Replace it (before loom_run, or while no loom object is alive) to route
 * loom's memory to your allocator, or — in tests — to make a chosen
 * allocation fail.  Coroutine stacks are mapped with mmap, not allocated
 * here.
 */
#ifndef LOOM_ALLOC_H
#define LOOM_ALLOC_H

#include <stddef.h>

#include "loom/common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct loom_allocator {
  /* Like malloc/realloc/free; `ud` is passed back unchanged.  `realloc`
   * is called with ptr NULL for a fresh block; free with NULL is a no-op
   * the hook need not handle (loom never passes NULL). */
  void *(*realloc)(void *ud, void *ptr, size_t size);
  void (*free)(void *ud, void *ptr);
  void *ud;
} loom_allocator;

/*
 * loom_set_allocator — install `a` (copied), or the C library's allocator
 * when `a` is NULL.  Not thread-safe: call it while no loom object exists.
 */
LOOM_API void loom_set_allocator(const loom_allocator *a);

#ifdef __cplusplus
}
#endif
#endif /* LOOM_ALLOC_H */
