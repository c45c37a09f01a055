/*
 * check_rng.h — the tests' small deterministic generator (xorshift64*):
 * a seed names a whole randomized run, so a failure is replayed by
 * running it again with the seed it printed.  Not for anything that
 * needs good randomness.
 */
#ifndef LOOM_TESTS_CHECK_RNG_H
#define LOOM_TESTS_CHECK_RNG_H

#include <stdint.h>

typedef struct {
  uint64_t s;
} rng_t;

static inline uint64_t rnd(rng_t *r) {
  uint64_t x = r->s;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  r->s = x;
  return x * 0x2545F4914F6CDD1DULL;
}

/* Uniform enough in [0, n); 0 when n is 0. */
static inline uint32_t rn(rng_t *r, uint32_t n) {
  return n ? (uint32_t)(rnd(r) % n) : 0;
}

/* Any seed, 0 included, gives a well-mixed non-zero state. */
static inline void rng_seed(rng_t *r, uint64_t s) {
  r->s = (s * 0x9E3779B97F4A7C15ULL) ^ 0xD1B54A32D192ED03ULL;
  if (r->s == 0)
    r->s = 1;
  for (int i = 0; i < 4; i++)
    rnd(r);
}

#endif
