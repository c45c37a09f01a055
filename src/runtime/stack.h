/*
 * stack.h — coroutine stacks: arenas of equal slots, guard pages without
 * a mapping each, lazily committed memory.  See stack.c.
 */
#ifndef LOOM_RUNTIME_STACK_H
#define LOOM_RUNTIME_STACK_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A stack slot: [base, base + size).  The lowest page is the guard; the
 * runtime keeps its G in the top bytes and runs the coroutine below it. */
typedef struct loom__stack {
  char *base;
  size_t size;
  unsigned vg_id; /* valgrind stack id, 0 when not under valgrind */
  bool canary;    /* no guard page: a canary word guards it (checked at
                     every switch) */
} loom__stack;

typedef struct loom__arena {
  struct loom__arena *next;
  char *base;
  uint32_t nslots;
  _Atomic uint32_t ncarved; /* slots handed out; read by the debugger */
} loom__arena;

typedef struct loom__stacks {
  pthread_mutex_t lock; /* protects arenas, the free list, custom list */
  size_t slot_size;     /* default stack size, page-rounded */
  size_t page;
  uint32_t arena_slots;
  loom__arena *arenas;  /* newest first */
  void **gfree;         /* global free Gs (loom__g *): the Ps' caches
                           spill here, LIFO so the warmest go first */
  size_t ngfree, capfree;
  void **gclean;        /* free Gs whose stacks sysmon trimmed */
  size_t nclean, capclean;
  void *custom;         /* live custom-stack Gs (loom__g *), by alllink */
  bool guard_pages;     /* MADV_GUARD_INSTALL works on this kernel */
  _Atomic long mprotect_left; /* else: slots that may still get an
                                 mprotect guard (then: a canary) */
} loom__stacks;

#define LOOM_STACK_CANARY 0x6c6f6f6d5354434bULL /* "loomSTCK" */

int loom__stacks_init(loom__stacks *s, size_t stack_size);
/* Unmaps every arena.  Every G living in them is gone afterwards. */
void loom__stacks_destroy(loom__stacks *s);
/* Append to a pointer array, growing it; -ENOMEM. */
int loom__ptrs_push(void ***v, size_t *len, size_t *cap, void *x);
/* Up to n fresh slots from the arenas, consecutive in one arena
 * (s->lock must be held): the number carved, at least 1, or -ENOMEM.
 * Only addresses are handed out; each slot must then go through
 * loom__stack_prepare, which may run after the lock is dropped. */
int loom__stack_carve(loom__stacks *s, loom__stack *out, int n);
/* Sets up a freshly carved slot: its guard, valgrind's registration. */
void loom__stack_prepare(loom__stacks *s, loom__stack *st);
/* A slot in a mapping of its own, of `size` bytes (page-rounded). */
int loom__stack_map(loom__stacks *s, size_t size, loom__stack *out);
void loom__stack_unmap(loom__stack *st);
/* Give back to the kernel the memory of a free stack below its top
 * `keep` bytes (which hold the G). */
void loom__stack_trim(loom__stacks *s, const loom__stack *st, size_t keep);
/* True if `addr` is in the guard page of `st` (or just below it). */
bool loom__stack_guard_hit(const loom__stacks *s, const loom__stack *st,
                           const void *addr);

#endif
