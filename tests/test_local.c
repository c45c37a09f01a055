/*
 * test_local.c — coroutine-local storage (src/runtime/local.c): values
 * are per coroutine, survive parks and moves between threads, and
 * destructors run on the coroutine when it returns.
 */
#include <stdatomic.h>

#include "check.h"

struct value {
  uint64_t owner; /* loom_id() of the coroutine that set it */
  int magic;
};

static loom_local_key key, key2;
static atomic_long dtor_calls, dtor_wrong_owner, done;

static void dtor(void *p) {
  struct value *v = (struct value *)p;
  CHECK(v != NULL);
  CHECK_EQ(v->magic, 0x10ca1);
  if (v->owner != loom_id())
    atomic_fetch_add(&dtor_wrong_owner, 1);
  v->magic = 0;
  free(v);
  atomic_fetch_add(&dtor_calls, 1);
}

static void user(void *arg) {
  struct value *v;
  int i;
  (void)arg;
  CHECK(loom_local_get(key) == NULL);
  v = (struct value *)malloc(sizeof *v);
  CHECK(v != NULL);
  v->owner = loom_id();
  v->magic = 0x10ca1;
  CHECK_OK(loom_local_set(key, v));
  CHECK_OK(loom_local_set(key2, (void *)(uintptr_t)loom_id()));
  for (i = 0; i < 20; i++) {
    if (i % 4 == 0)
      loom_sleep(100000);
    else
      loom_yield();
    CHECK(loom_local_get(key) == v);
    CHECK_EQ((uintptr_t)loom_local_get(key2), loom_id());
  }
  atomic_fetch_add(&done, 1);
}

/* A coroutine that sets NULL or never sets gets no destructor call. */
static void setter_of_null(void *arg) {
  (void)arg;
  CHECK_OK(loom_local_set(key, NULL));
  atomic_fetch_add(&done, 1);
}

/* Replacing a value does not call the destructor on the old one (the
 * caller owns it); only the value present at return is destroyed. */
static void replacer(void *arg) {
  struct value *a = (struct value *)malloc(sizeof *a), *b = (struct value *)malloc(sizeof *b);
  (void)arg;
  CHECK(a && b);
  a->owner = b->owner = loom_id();
  a->magic = b->magic = 0x10ca1;
  CHECK_OK(loom_local_set(key, a));
  CHECK_OK(loom_local_set(key, b));
  CHECK(loom_local_get(key) == b);
  free(a);
  atomic_fetch_add(&done, 1);
}

static void local_main(void *arg) {
  long i, n = check_under_valgrind() ? 200 : 2000;
  int64_t end;
  (void)arg;
  CHECK(loom_local_get(key) == NULL);
  for (i = 0; i < n; i++)
    CHECK_OK(loom_go(user, NULL));
  for (i = 0; i < 10; i++)
    CHECK_OK(loom_go(setter_of_null, NULL));
  for (i = 0; i < 10; i++)
    CHECK_OK(loom_go(replacer, NULL));
  end = loom_now() + 20000 * CHECK_MS;
  while (atomic_load(&done) < n + 20 || atomic_load(&dtor_calls) < n + 10) {
    CHECKF(loom_now() < end, "%ld coroutines done, %ld destructor calls", atomic_load(&done),
           atomic_load(&dtor_calls));
    loom_sleep(CHECK_MS);
  }
  loom_sleep(10 * CHECK_MS);
  CHECK_EQ(atomic_load(&dtor_calls), n + 10);
  CHECKF(atomic_load(&dtor_wrong_owner) == 0, "%ld destructors ran on another coroutine",
         atomic_load(&dtor_wrong_owner));
  CHECK(loom_local_get(key) == NULL); /* main's slot was never set */
}

TEST(destructors_run) {
  CHECK_OK(loom_local_key_create(&key, dtor));
  CHECK_OK(loom_local_key_create(&key2, NULL));
  CHECK_NE(key.idx, key2.idx);
  check_run(local_main, NULL, 2);
}

/* Outside a coroutine: set fails, get is NULL; bad keys are refused. */
static void bad_key_main(void *arg) {
  loom_local_key bad;
  (void)arg;
  bad.idx = LOOM_LOCAL_KEYS + 7;
  CHECK_ERR(loom_local_set(bad, (void *)1), -EINVAL);
  CHECK(loom_local_get(bad) == NULL);
  bad.idx = (unsigned)-1;
  CHECK_ERR(loom_local_set(bad, (void *)1), -EINVAL);
  CHECK(loom_local_get(bad) == NULL);
}
TEST(outside_and_bad_key) {
  CHECK_OK(loom_local_key_create(&key, NULL));
  CHECK_ERR(loom_local_set(key, (void *)1), LOOM_ENOTCO);
  CHECK(loom_local_get(key) == NULL);
  check_run(bad_key_main, NULL, 1);
  CHECK_ERR(loom_local_set(key, (void *)1), LOOM_ENOTCO);
}

/* Keys run out at LOOM_LOCAL_KEYS with -EAGAIN; all are distinct. */
TEST(keys_run_out) {
  static loom_local_key keys[LOOM_LOCAL_KEYS + 1];
  int n = 0, r, i, j;
  for (;;) {
    CHECK_LE(n, LOOM_LOCAL_KEYS);
    r = loom_local_key_create(&keys[n], NULL);
    if (r != 0)
      break;
    n++;
  }
  CHECK_ERR(r, -EAGAIN);
  CHECK_EQ(n, LOOM_LOCAL_KEYS);
  for (i = 0; i < n; i++)
    for (j = i + 1; j < n; j++)
      CHECK_NE(keys[i].idx, keys[j].idx);
}

/* Coroutines abandoned at shutdown run no destructor. */
static struct value abandoned_values[100];
static atomic_long sleepers_set;
static void abandoned(void *arg) {
  struct value *v = &abandoned_values[(uintptr_t)arg];
  v->owner = loom_id();
  v->magic = 0x10ca1;
  CHECK_OK(loom_local_set(key, v));
  atomic_fetch_add(&sleepers_set, 1);
  loom_sleep((int64_t)3600 * 1000 * CHECK_MS);
}
static void no_dtor(void *p) {
  (void)p;
  atomic_fetch_add(&dtor_calls, 1);
}
static void abandon_main(void *arg) {
  uintptr_t i;
  (void)arg;
  for (i = 0; i < 100; i++)
    CHECK_OK(loom_go(abandoned, (void *)i));
  while (atomic_load(&sleepers_set) < 100)
    loom_sleep(CHECK_MS);
}
TEST(abandoned_run_no_destructor) {
  CHECK_OK(loom_local_key_create(&key, no_dtor));
  check_run(abandon_main, NULL, 2);
  CHECK_EQ(atomic_load(&dtor_calls), 0);
}

/* A destructor that enters a blocking section and returns without
 * leaving it: its coroutine returns inside the section, which it leaves
 * as any coroutine returning there does (the M has no P meanwhile). */
static atomic_long enter_dtors;
static void enter_dtor(void *p) {
  (void)p;
  loom_block_enter();
  atomic_fetch_add(&enter_dtors, 1);
}
static void enter_user(void *arg) {
  (void)arg;
  CHECK_OK(loom_local_set(key, (void *)1));
  loom_yield();
}
static void enter_main(void *arg) {
  int64_t end = loom_now() + 10000 * CHECK_MS;
  long i;
  (void)arg;
  for (i = 0; i < 8; i++)
    CHECK_OK(loom_go(enter_user, NULL));
  while (atomic_load(&enter_dtors) < 8) {
    CHECKF(loom_now() < end, "%ld destructors ran", atomic_load(&enter_dtors));
    loom_sleep(CHECK_MS);
  }
  /* and the runtime goes on: the same Ps and stacks serve new ones */
  atomic_store(&done, 0);
  for (i = 0; i < 8; i++)
    CHECK_OK(loom_go(setter_of_null, NULL));
  while (atomic_load(&done) < 8) {
    CHECKF(loom_now() < end, "%ld coroutines done", atomic_load(&done));
    loom_sleep(CHECK_MS);
  }
}
TEST(destructor_returns_inside_block_section) {
  check_watchdog(20, "destructors that enter a blocking section");
  CHECK_OK(loom_local_key_create(&key, enter_dtor));
  check_run(enter_main, NULL, 2);
}

CHECK_MAIN()
