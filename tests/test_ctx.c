/*
 * test_ctx.c — context trees against Go's context semantics: a tree of
 * 10,000 nodes cancelled from the root wakes every blocked waiter, each
 * node is cancelled exactly once with the right reason; deadlines, values,
 * release while others hold references; the _ctx forms of blocking calls.
 */
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

#include "check.h"
#include "loom.h"

#define NODES 10000
static loom_ctx *nodes[NODES];
static atomic_int woke, woke_right;
static loom_chan *never; /* nobody ever sends on it */

static void waiter(void *arg) {
  loom_ctx *c = arg;
  long v;
  int r = loom_chan_recv_ctx(never, &v, c);
  if (r == -ECANCELED)
    atomic_fetch_add(&woke_right, 1);
  atomic_fetch_add(&woke, 1);
  loom_ctx_unref(c);
}

static void tree_main(void *arg) {
  (void)arg;
  CHECK_OK(loom_chan_make(&never, sizeof(long), 0));
  CHECK_OK(loom_ctx_with_cancel(&nodes[0], loom_ctx_background()));
  /* Half a chain (depth 5,000: no recursion may follow it), half a
   * fan-out under random earlier nodes. */
  srand(3);
  for (int i = 1; i < NODES; i++) {
    loom_ctx *parent = i < NODES / 2 ? nodes[i - 1] : nodes[rand() % i];
    CHECK_OK(loom_ctx_with_cancel(&nodes[i], parent));
  }
  int nw = CHECK_SCALE(2000, 1000, 300);
  for (int i = 0; i < nw; i++)
    CHECK_OK(loom_go(waiter, loom_ctx_ref(nodes[(i * 7919) % NODES])));
  loom_sleep(20 * CHECK_MS);
  CHECK_EQ(atomic_load(&woke), 0);
  for (int i = 0; i < NODES; i++)
    CHECK_EQ(loom_ctx_err(nodes[i]), 0);
  loom_ctx_cancel(nodes[0]);
  for (int i = 0; i < NODES; i++)
    CHECK_EQ(loom_ctx_err(nodes[i]), -ECANCELED);
  int64_t end = loom_now() + 10000 * CHECK_MS;
  while (atomic_load(&woke) < nw) {
    CHECKF(loom_now() < end, "only %d of %d waiters woke", atomic_load(&woke),
           nw);
    loom_sleep(CHECK_MS);
  }
  CHECK_EQ(atomic_load(&woke_right), nw);
  /* Cancelling again, or a leaf, changes nothing. */
  loom_ctx_cancel(nodes[0]);
  loom_ctx_cancel(nodes[NODES - 1]);
  /* Release children before parents and parents before children alike. */
  for (int i = NODES - 1; i >= NODES / 2; i--)
    loom_ctx_release(nodes[i]);
  for (int i = 0; i < NODES / 2; i++)
    loom_ctx_release(nodes[i]);
  loom_chan_free(never);
}
TEST(tree_of_10000_cancelled_from_root) { check_run(tree_main, NULL, 2); }

static int key1, key2;
static void misc_main(void *arg) {
  (void)arg;
  loom_ctx *bg = loom_ctx_background();
  CHECK_EQ(loom_ctx_err(bg), 0);
  CHECK(loom_ctx_done(bg) == NULL);
  loom_ctx_release(bg); /* no-op */

  /* Values toward the root; the nearest wins. */
  loom_ctx *v1, *v2, *c;
  CHECK_OK(loom_ctx_with_value(&v1, bg, &key1, (void *)"one"));
  CHECK_OK(loom_ctx_with_value(&v2, v1, &key2, (void *)"two"));
  CHECK_OK(loom_ctx_with_cancel(&c, v2));
  CHECK_STREQ((const char *)loom_ctx_value(c, &key1), "one");
  CHECK_STREQ((const char *)loom_ctx_value(c, &key2), "two");
  CHECK(loom_ctx_value(v1, &key2) == NULL);

  /* Deadlines: own, inherited, already passed. */
  loom_ctx *d, *dc, *past;
  int64_t t0 = loom_now();
  CHECK_OK(loom_ctx_with_timeout(&d, c, 30 * CHECK_MS));
  CHECK_OK(loom_ctx_with_cancel(&dc, d));
  CHECK_EQ(loom_ctx_deadline(dc), loom_ctx_deadline(d));
  CHECK_EQ(loom_sleep_ctx(dc, 5000 * CHECK_MS), -ETIMEDOUT);
  CHECK_GE(loom_now() - t0, 30 * CHECK_MS);
  CHECK_EQ(loom_ctx_err(d), -ETIMEDOUT);
  CHECK_EQ(loom_ctx_err(dc), -ETIMEDOUT); /* the subtree, same reason */
  CHECK_EQ(loom_ctx_err(c), 0);           /* not the parent */
  CHECK_OK(loom_ctx_with_deadline(&past, c, loom_now() - 1));
  CHECK_EQ(loom_ctx_err(past), -ETIMEDOUT);

  /* A child of a cancelled context is born cancelled. */
  loom_ctx *late;
  CHECK_OK(loom_ctx_with_cancel(&late, d));
  CHECK_EQ(loom_ctx_err(late), -ETIMEDOUT);

  /* sleep_ctx that is not cancelled sleeps its time; a cancelled one
   * returns at once. */
  t0 = loom_now();
  CHECK_OK(loom_sleep_ctx(c, 10 * CHECK_MS));
  CHECK_GE(loom_now() - t0, 10 * CHECK_MS);
  CHECK_OK(loom_sleep_ctx(bg, CHECK_MS));

  /* A reference outlives the creator's release. */
  loom_ctx *held = loom_ctx_ref(c);
  loom_ctx_release(late);
  loom_ctx_release(past);
  loom_ctx_release(dc);
  loom_ctx_release(d);
  loom_ctx_release(c);
  CHECK_EQ(loom_ctx_err(held), -ECANCELED); /* released = cancelled */
  CHECK_STREQ((const char *)loom_ctx_value(held, &key1), "one");
  loom_ctx_unref(held);
  loom_ctx_release(v2);
  loom_ctx_release(v1);

  /* Channel operations under a context. */
  loom_chan *ch;
  CHECK_OK(loom_chan_make(&ch, sizeof(int), 1));
  loom_ctx *cc;
  CHECK_OK(loom_ctx_with_cancel(&cc, bg));
  int x = 7, y = 0;
  CHECK_OK(loom_chan_send_ctx(ch, &x, cc));
  CHECK_EQ(loom_chan_recv_ctx(ch, &y, cc), 1);
  CHECK_EQ(y, 7);
  loom_ctx_cancel(cc);
  CHECK_EQ(loom_chan_recv_ctx(ch, &y, cc), -ECANCELED);
  loom_ctx_release(cc);
  loom_chan_free(ch);
}
TEST(deadlines_values_release) { check_run(misc_main, NULL, 2); }

TEST(deadline_needs_a_coroutine) {
  loom_ctx *d;
  CHECK_ERR(loom_ctx_with_deadline(&d, loom_ctx_background(), 1), LOOM_ENOTCO);
  loom_ctx *c;
  CHECK_OK(loom_ctx_with_cancel(&c, loom_ctx_background()));
  loom_ctx_cancel(c);
  CHECK_EQ(loom_ctx_err(c), -ECANCELED);
  loom_ctx_release(c);
}

CHECK_MAIN()
