/*
 * wrec.c — wait records: small blocks from which a coroutine's wait makes
 * the node that queues it on a sync object (Go's sudog cache).
 *
 * A node on the waiter's own stack would cost nothing to make, but each
 * sits in a page of its own, and a queue is a list through them: a walk
 * of a long queue (a close waking thousands, a broadcast) is then a chain
 * of TLB misses, each address in the node before.  Records come packed,
 * 64 to a 4 KiB block, so such a walk is a chain of cache misses instead.
 *
 * sync/wait.h says which waits take one.  Each P keeps a list of spare
 * records (owner only, no lock); a P that runs out takes a batch from
 * the runtime's list, or a new block; a P with too many gives half back.
 * Blocks are freed when the runtime ends, after the records of abandoned
 * waits have been taken off their queues.
 */
#include <stdint.h>

#include "runtime/alloc.h"
#include "runtime/export_test.h"
#include "runtime/runtime.h"

#ifdef LOOM_ASAN
void __asan_poison_memory_region(void const volatile *addr, size_t size);
void __asan_unpoison_memory_region(void const volatile *addr, size_t size);
#endif

#define PER_BLOCK 64
#define PCACHE LOOM__WREC_PCACHE
#define BATCH 32 /* what a P takes from the runtime's list */

typedef struct loom__wrec wrec;

struct loom__wrec_block { /* one allocation: this, then the records */
  struct loom__wrec_block *next;
  wrec *recs; /* aligned to a record's size */
};

/* A spare record's body is off limits (a use after loom__wrec_put). */
static void spare(wrec *r) {
#ifdef LOOM_ASAN
  __asan_poison_memory_region(r->body, sizeof r->body);
#else
  (void)r;
#endif
}

static void unspare(wrec *r) {
#ifdef LOOM_ASAN
  __asan_unpoison_memory_region(r->body, sizeof r->body);
#else
  (void)r;
#endif
}

/* Give p a batch of records: the runtime's spares, else a new block.
 * NULL if there is no memory for one. */
static wrec *refill(loom__rt *rt, loom__p *p) {
  pthread_mutex_lock(&rt->wrec_mu);
  wrec *first = rt->wrec_free, *last = NULL;
  int n = 0;
  for (wrec *r = first; r != NULL && n < BATCH; r = r->next) {
    last = r;
    n++;
  }
  if (n > 0) {
    rt->wrec_free = last->next;
    rt->nwrec_free -= n;
    pthread_mutex_unlock(&rt->wrec_mu);
    last->next = NULL;
    p->wrec_free = first;
    p->nwrec = n;
    return first;
  }
  pthread_mutex_unlock(&rt->wrec_mu);

  struct loom__wrec_block *b =
      loom__malloc(sizeof *b + LOOM__WREC_SIZE - 1 + PER_BLOCK * sizeof(wrec));
  if (b == NULL)
    return NULL;
  b->recs = (wrec *)(((uintptr_t)(b + 1) + LOOM__WREC_SIZE - 1) &
                     ~(uintptr_t)(LOOM__WREC_SIZE - 1));
  for (int i = 0; i < PER_BLOCK; i++) {
    b->recs[i].next = i + 1 < PER_BLOCK ? &b->recs[i + 1] : NULL;
    spare(&b->recs[i]);
  }
  pthread_mutex_lock(&rt->wrec_mu);
  b->next = rt->wrec_blocks;
  rt->wrec_blocks = b;
  pthread_mutex_unlock(&rt->wrec_mu);
  p->wrec_free = b->recs;
  p->nwrec = PER_BLOCK;
  return b->recs;
}

void *loom__wrec_get_slow(void) {
  loom__m *m = loom__getm();
  loom__p *p = m != NULL ? m->p : NULL;
  if (p == NULL)
    return NULL;
  wrec *r = p->wrec_free;
  if (r == NULL && (r = refill(m->rt, p)) == NULL)
    return NULL;
  p->wrec_free = r->next;
  p->nwrec--;
  unspare(r);
  return r;
}

/* Half of p's spares, the oldest, back to the runtime's list. */
static void spill(loom__rt *rt, loom__p *p) {
  wrec *keep = p->wrec_free, *last = keep;
  for (int i = 1; i < PCACHE / 2; i++)
    last = last->next;
  wrec *give = last->next, *tail = give;
  int n = 1;
  while (tail->next != NULL) {
    tail = tail->next;
    n++;
  }
  last->next = NULL;
  p->nwrec -= n;
  pthread_mutex_lock(&rt->wrec_mu);
  tail->next = rt->wrec_free;
  rt->wrec_free = give;
  rt->nwrec_free += n;
  pthread_mutex_unlock(&rt->wrec_mu);
}

void loom__wrec_put_slow(void *x) {
  wrec *r = x;
  loom__m *m = loom__getm();
  loom__p *p = m != NULL ? m->p : NULL;
  spare(r);
  if (p == NULL) {
    /* Not where a wait returns (a record is taken only with a P), but a
     * coroutine inside loom_block_enter/exit would come here: its M's
     * runtime, which it cannot outlive. */
    loom__rt *rt = m != NULL ? m->rt : NULL;
    if (rt == NULL)
      loom__throw("wrec_put: not on a runtime's thread");
    pthread_mutex_lock(&rt->wrec_mu);
    r->next = rt->wrec_free;
    rt->wrec_free = r;
    rt->nwrec_free++;
    pthread_mutex_unlock(&rt->wrec_mu);
    return;
  }
  r->next = p->wrec_free;
  p->wrec_free = r;
  if (++p->nwrec > PCACHE)
    spill(m->rt, p);
}

void loom__wrec_destroy(loom__rt *rt) {
  struct loom__wrec_block *b = rt->wrec_blocks;
  while (b != NULL) {
    struct loom__wrec_block *next = b->next;
#ifdef LOOM_ASAN
    __asan_unpoison_memory_region(b->recs, PER_BLOCK * sizeof(wrec));
#endif
    loom__free(b);
    b = next;
  }
  rt->wrec_blocks = NULL;
  rt->wrec_free = NULL;
  rt->nwrec_free = 0;
}

int loom__test_wrec_blocks(void) {
  loom__rt *rt = loom__rt_get();
  if (rt == NULL)
    return -1;
  int n = 0;
  pthread_mutex_lock(&rt->wrec_mu);
  for (struct loom__wrec_block *b = rt->wrec_blocks; b != NULL; b = b->next)
    n++;
  pthread_mutex_unlock(&rt->wrec_mu);
  return n;
}
