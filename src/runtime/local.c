/*
 * local.c — coroutine-local storage (see loom/runtime.h).
 *
 * Keys are indices into a per-G array of LOOM_LOCAL_KEYS pointers that is
 * allocated on the first loom_local_set of that G, so a coroutine that
 * never uses locals pays one NULL pointer.
 */
#include <errno.h>
#include <stdatomic.h>

#include "runtime/alloc.h"
#include "runtime/runtime.h"

static _Atomic unsigned nkeys;
static void (*_Atomic dtors[LOOM_LOCAL_KEYS])(void *);

int loom_local_key_create(loom_local_key *key, void (*dtor)(void *)) {
  unsigned i = atomic_load(&nkeys);
  do {
    if (i >= LOOM_LOCAL_KEYS)
      return -EAGAIN;
  } while (!atomic_compare_exchange_weak(&nkeys, &i, i + 1));
  atomic_store(&dtors[i], dtor);
  key->idx = i + 1; /* 0 is never a valid key */
  return 0;
}

int loom_local_set(loom_local_key key, void *value) {
  loom__g *g = loom__getg();
  if (g == NULL)
    return LOOM_ENOTCO;
  if (key.idx == 0 || key.idx > atomic_load(&nkeys))
    return -EINVAL;
  if (g->locals == NULL) {
    if (value == NULL)
      return 0;
    g->locals = loom__calloc(LOOM_LOCAL_KEYS, sizeof(void *));
    if (g->locals == NULL)
      return -ENOMEM;
  }
  g->locals[key.idx - 1] = value;
  return 0;
}

void *loom_local_get(loom_local_key key) {
  loom__g *g = loom__getg();
  if (g == NULL || g->locals == NULL || key.idx == 0 ||
      key.idx > LOOM_LOCAL_KEYS)
    return NULL;
  return g->locals[key.idx - 1];
}

void loom__locals_destroy(loom__g *g, bool run_dtors) {
  /* A destructor may set other keys (even park): repeat until clean, a
   * bounded number of rounds as POSIX does for thread keys. */
  for (int round = 0; run_dtors && round < 4; round++) {
    bool any = false;
    for (unsigned i = 0; i < LOOM_LOCAL_KEYS && g->locals != NULL; i++) {
      void *v = g->locals[i];
      void (*d)(void *) = atomic_load(&dtors[i]);
      if (v != NULL && d != NULL) {
        g->locals[i] = NULL;
        d(v);
        any = true;
      }
    }
    if (!any)
      break;
  }
  loom__free(g->locals);
  g->locals = NULL;
}
