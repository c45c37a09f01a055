/* alloc.c — the allocator hook (see loom/alloc.h). */
#include "runtime/alloc.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "loom/alloc.h"

static void *libc_realloc(void *ud, void *p, size_t size) {
  (void)ud;
  return realloc(p, size);
}

static void libc_free(void *ud, void *p) {
  (void)ud;
  free(p);
}

static loom_allocator current = {libc_realloc, libc_free, NULL};

void loom_set_allocator(const loom_allocator *a) {
  if (a == NULL || a->realloc == NULL || a->free == NULL) {
    current = (loom_allocator){libc_realloc, libc_free, NULL};
    return;
  }
  current = *a;
}

void *loom__malloc(size_t size) {
  return current.realloc(current.ud, NULL, size ? size : 1);
}

void *loom__calloc(size_t n, size_t size) {
  if (size != 0 && n > SIZE_MAX / size)
    return NULL;
  void *p = loom__malloc(n * size);
  if (p != NULL)
    memset(p, 0, n * size);
  return p;
}

void *loom__realloc(void *p, size_t size) {
  return current.realloc(current.ud, p, size ? size : 1);
}

void loom__free(void *p) {
  if (p != NULL)
    current.free(current.ud, p);
}

char *loom__strdup(const char *s) {
  size_t n = strlen(s) + 1;
  char *d = loom__malloc(n);
  if (d != NULL)
    memcpy(d, s, n);
  return d;
}
