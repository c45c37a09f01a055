/*
 * stack.c — where coroutine stacks come from.
 *
 * A million coroutines must fit in a default Linux (vm.max_map_count
 * 65 530) and cost about one page each while parked.  So:
 *
 *  - Stacks are slots carved from arenas: one mmap of many slots
 *    (MAP_NORESERVE: nothing is committed until touched), so the mapping
 *    count grows by one per arena, not per stack.  Adjacent arenas with
 *    the same protection even merge into one kernel VMA.
 *  - The lowest page of each slot is a guard.  MADV_GUARD_INSTALL (Linux
 *    6.13) marks it without splitting the VMA; a touch raises SIGSEGV,
 *    which proc.c turns into a report naming the coroutine.  Older
 *    kernels get an mprotect(PROT_NONE) guard instead, which splits the
 *    arena's VMA (two more per stack), for as many slots as an eighth of
 *    vm.max_map_count allows (8 191 by default: a quarter of the limit);
 *    slots beyond that fall back to a canary word at the bottom of the
 *    usable stack, checked whenever the coroutine switches out, which
 *    catches an overflow late (the slot below may be damaged by then)
 *    rather than never.
 *  - Slots are never unmapped while the runtime runs.  A free slot keeps
 *    its G header in its top page and goes to a P's cache (proc.c); when
 *    caches spill into the global list, the rest of the slot is handed
 *    back to the kernel with MADV_DONTNEED, so a burst of deep stacks does
 *    not pin memory forever.
 *  - A coroutine asking for another stack size gets a mapping of its own,
 *    unmapped when it returns.
 */
#include "runtime/stack.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

#include "runtime/alloc.h"
#include "runtime/export_test.h"
#include "runtime/runtime.h"

#ifdef LOOM_HAVE_VALGRIND_H
#include <valgrind/valgrind.h>
#endif

#ifndef MADV_GUARD_INSTALL
#define MADV_GUARD_INSTALL 102
#endif

#define ARENA_BYTES ((size_t)64 << 20)

/* Tests make the runtime act as on an older kernel (export_test.h). */
static _Atomic int test_fallback;
void loom__test_stack_fallback(int mode) { atomic_store(&test_fallback, mode); }

static bool install_guard(loom__stacks *s, char *base) {
  if (s->guard_pages)
    return madvise(base, s->page, MADV_GUARD_INSTALL) == 0;
  /* One guard of the budget; given back if mprotect fails (no VMA left
   * under the limit: ENOMEM). */
  if (atomic_fetch_sub_explicit(&s->mprotect_left, 1, memory_order_relaxed) >
          0 &&
      mprotect(base, s->page, PROT_NONE) == 0)
    return true;
  atomic_fetch_add_explicit(&s->mprotect_left, 1, memory_order_relaxed);
  return false;
}

/* How many slots may have an mprotect guard: an eighth of the kernel's
 * limit on mappings (each guarded slot costs about two). */
static long mprotect_budget(void) {
  long max = 65530; /* the kernel's default */
  FILE *f = fopen("/proc/sys/vm/max_map_count", "re");
  if (f != NULL) {
    if (fscanf(f, "%ld", &max) != 1 || max < 0)
      max = 65530;
    fclose(f);
  }
  return max / 8;
}

void loom__stack_prepare(loom__stacks *s, loom__stack *st) {
  /* The canary is written only when guards are not kernel guard pages:
   * writing it commits a second page per stack. */
  st->canary = !install_guard(s, st->base);
  if (st->canary)
    *(uint64_t *)(void *)(st->base + s->page) = LOOM_STACK_CANARY;
  st->vg_id = 0;
#ifdef LOOM_HAVE_VALGRIND_H
  if (RUNNING_ON_VALGRIND)
    st->vg_id = VALGRIND_STACK_REGISTER(st->base + s->page,
                                        st->base + st->size);
#endif
}

int loom__stacks_init(loom__stacks *s, size_t stack_size) {
  long pg = sysconf(_SC_PAGESIZE);
  s->page = pg > 0 ? (size_t)pg : 4096;
  s->slot_size = (stack_size + s->page - 1) & ~(s->page - 1);
  s->arena_slots = (uint32_t)(ARENA_BYTES / s->slot_size);
  if (s->arena_slots < 16)
    s->arena_slots = 16;
  s->arenas = NULL;
  s->gfree = s->gclean = NULL;
  s->ngfree = s->capfree = s->nclean = s->capclean = 0;
  s->custom = NULL;
  /* Probe once: does this kernel have guard markers? */
  char *probe = mmap(NULL, s->page * 2, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (probe == MAP_FAILED)
    return -errno;
  s->guard_pages = madvise(probe, s->page, MADV_GUARD_INSTALL) == 0;
  munmap(probe, s->page * 2);
  int mode = atomic_load(&test_fallback);
  if (mode != 0)
    s->guard_pages = false;
  atomic_init(&s->mprotect_left,
              s->guard_pages || mode == 2 ? 0 : mprotect_budget());
  return loom__mutex_init(&s->lock);
}

void loom__stacks_destroy(loom__stacks *s) {
  loom__arena *a = s->arenas;
  while (a != NULL) {
    loom__arena *next = a->next;
    munmap(a->base, (size_t)a->nslots * s->slot_size);
    loom__free(a);
    a = next;
  }
  s->arenas = NULL;
  loom__free(s->gfree);
  loom__free(s->gclean);
  s->gfree = s->gclean = NULL;
  pthread_mutex_destroy(&s->lock);
}

int loom__ptrs_push(void ***v, size_t *len, size_t *cap, void *x) {
  if (*len == *cap) {
    size_t ncap = *cap ? *cap * 2 : 256;
    void **nv = loom__realloc(*v, ncap * sizeof *nv);
    if (nv == NULL)
      return -ENOMEM;
    *v = nv;
    *cap = ncap;
  }
  (*v)[(*len)++] = x;
  return 0;
}

int loom__stack_carve(loom__stacks *s, loom__stack *out, int n) {
  loom__arena *a = s->arenas;
  if (a == NULL ||
      atomic_load_explicit(&a->ncarved, memory_order_relaxed) == a->nslots) {
    a = loom__malloc(sizeof *a);
    if (a == NULL)
      return -ENOMEM;
    size_t bytes = (size_t)s->arena_slots * s->slot_size;
    a->base = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (a->base == MAP_FAILED) {
      loom__free(a);
      return -ENOMEM;
    }
    /* A transparent huge page would commit 2 MiB for the first touched
     * stack in it: a parked coroutine must cost one small page. */
    madvise(a->base, bytes, MADV_NOHUGEPAGE);
    a->nslots = s->arena_slots;
    atomic_init(&a->ncarved, 0);
    a->next = s->arenas;
    s->arenas = a;
  }
  uint32_t i = atomic_load_explicit(&a->ncarved, memory_order_relaxed);
  if ((uint32_t)n > a->nslots - i)
    n = (int)(a->nslots - i);
  for (int k = 0; k < n; k++) {
    out[k].base = a->base + (size_t)(i + (uint32_t)k) * s->slot_size;
    out[k].size = s->slot_size;
    out[k].vg_id = 0;
    out[k].canary = false; /* loom__stack_prepare decides */
  }
  atomic_store_explicit(&a->ncarved, i + (uint32_t)n, memory_order_release);
  return n;
}

int loom__stack_map(loom__stacks *s, size_t size, loom__stack *out) {
  size = (size + s->page - 1) & ~(s->page - 1);
  char *p = mmap(NULL, size, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED)
    return -ENOMEM;
  madvise(p, size, MADV_NOHUGEPAGE);
  out->base = p;
  out->size = size;
  out->canary = false;
  if (!s->guard_pages || madvise(p, s->page, MADV_GUARD_INSTALL) != 0) {
    /* A mapping of its own can afford an mprotect guard. */
    if (mprotect(p, s->page, PROT_NONE) != 0) {
      *(uint64_t *)(void *)(p + s->page) = LOOM_STACK_CANARY;
      out->canary = true;
    }
  }
  out->vg_id = 0;
#ifdef LOOM_HAVE_VALGRIND_H
  if (RUNNING_ON_VALGRIND)
    out->vg_id = VALGRIND_STACK_REGISTER(p + s->page, p + size);
#endif
  return 0;
}

void loom__stack_unmap(loom__stack *st) {
#ifdef LOOM_HAVE_VALGRIND_H
  if (st->vg_id != 0)
    VALGRIND_STACK_DEREGISTER(st->vg_id);
#endif
  munmap(st->base, st->size);
  st->base = NULL;
}

void loom__stack_trim(loom__stacks *s, const loom__stack *st, size_t keep) {
  size_t top = (keep + s->page - 1) & ~(s->page - 1);
  if (st->size <= top + 2 * s->page)
    return;
  /* Keep the guard page (and its canary page in fallback mode). */
  char *from = st->base + 2 * s->page;
  size_t len = st->size - top - 2 * s->page;
  madvise(from, len, MADV_DONTNEED);
}

bool loom__stack_guard_hit(const loom__stacks *s, const loom__stack *st,
                           const void *addr) {
  const char *a = addr;
  /* A frame that jumps over the guard lands at most a few pages below. */
  return st->base != NULL && a >= st->base - 16 * s->page &&
         a < st->base + s->page;
}
