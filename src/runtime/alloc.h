/* alloc.h — loom's own allocations, all through the loom_allocator hook. */
#ifndef LOOM_RUNTIME_ALLOC_H
#define LOOM_RUNTIME_ALLOC_H

#include <stddef.h>

void *loom__malloc(size_t size);
void *loom__calloc(size_t n, size_t size);
void *loom__realloc(void *p, size_t size);
void loom__free(void *p);
/* A copy of the string s, or NULL. */
char *loom__strdup(const char *s);

#endif
