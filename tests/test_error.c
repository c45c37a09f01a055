/* test_error.c — loom_strerror / loom_err_name (src/runtime/error.c). */
#include <limits.h>

#include "check.h"

/* loom's own codes: the X-macro table gives each its message and name. */
TEST(loom_codes) {
#define X(name, value, msg)                                                                        \
  CHECK_EQ(name, value);                                                                           \
  CHECK_STREQ(loom_strerror(name), msg);                                                           \
  CHECK_STREQ(loom_err_name(name), #name);
  LOOM_ERRNO_MAP(X)
#undef X
  CHECK_STREQ(loom_err_name(LOOM_ENORUNTIME), "LOOM_ENORUNTIME");
  CHECK_STREQ(loom_err_name(LOOM_ERUNNING), "LOOM_ERUNNING");
  CHECK_STREQ(loom_strerror(LOOM_ENOTCO), "not called from a loom coroutine");
}

/* Negated errno values name the errno; a positive errno means the same. */
TEST(errno_codes) {
  static const struct {
    int err;
    const char *name;
  } cases[] = {
      {ENOMEM, "ENOMEM"},         {EINVAL, "EINVAL"},     {EAGAIN, "EAGAIN"},
      {ETIMEDOUT, "ETIMEDOUT"},   {ECANCELED, "ECANCELED"}, {ECONNRESET, "ECONNRESET"},
      {EPIPE, "EPIPE"},           {EMFILE, "EMFILE"},     {EINTR, "EINTR"},
      {ECONNREFUSED, "ECONNREFUSED"},
  };
  size_t i;
  for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    const char *msg = loom_strerror(-cases[i].err);
    CHECK_STREQ(loom_err_name(-cases[i].err), cases[i].name);
    CHECK_STREQ(loom_err_name(cases[i].err), cases[i].name);
    CHECK(msg != NULL);
    CHECKF(strcmp(msg, "unknown error") != 0, "%s", cases[i].name);
    CHECK_STREQ(msg, strerror(cases[i].err));
    CHECK_STREQ(loom_strerror(cases[i].err), msg);
  }
}

/* Every errno the C library knows gets a name and a message. */
TEST(every_errno_named) {
  int e;
  for (e = 1; e < 134; e++) {
    const char *n = loom_err_name(-e), *m = loom_strerror(-e);
    CHECK(n != NULL);
    CHECK(m != NULL);
    if (strcmp(strerror(e), "Unknown error") == 0 || strncmp(strerror(e), "Unknown error ", 14) == 0)
      continue; /* a hole in the errno numbering */
    CHECKF(strcmp(n, "UNKNOWN") != 0, "errno %d (%s) has no name", e, strerror(e));
    CHECKF(strcmp(m, "unknown error") != 0, "errno %d has no message", e);
  }
}

/* Unknown codes, including the extremes of int, never crash (the
 * negation of INT_MIN is undefined: UBSan watches this one). */
TEST(unknown_codes) {
  /* one below loom's lowest code: the table grows as layers add codes */
  int lowest = 0;
  int codes[] = {-99999, -30000, 0 /* below the lowest */, -29999, INT_MIN, INT_MIN + 1, INT_MAX,
                 99999};
  size_t i;
#define X(name, value, msg)                                                                        \
  if ((value) < lowest)                                                                            \
    lowest = (value);
  LOOM_ERRNO_MAP(X)
#undef X
  codes[2] = lowest - 1;
  for (i = 0; i < sizeof codes / sizeof codes[0]; i++) {
    CHECKF(strcmp(loom_strerror(codes[i]), "unknown error") == 0, "loom_strerror(%d) = \"%s\"",
           codes[i], loom_strerror(codes[i]));
    CHECKF(strcmp(loom_err_name(codes[i]), "UNKNOWN") == 0, "loom_err_name(%d) = \"%s\"", codes[i],
           loom_err_name(codes[i]));
  }
  CHECK(loom_strerror(0) != NULL);
  CHECK(loom_err_name(0) != NULL);
}

static void *hammer(void *p) {
  int i, sum = 0;
  (void)p;
  for (i = 0; i < 20000; i++) {
    sum += (int)strlen(loom_strerror(-(i % 140)));
    sum += (int)strlen(loom_err_name(LOOM_ENORUNTIME - (i % 5)));
  }
  return (void *)(intptr_t)sum;
}

/* Thread-safe: four threads at once give the same answers (TSan watches). */
TEST(thread_safe) {
  pthread_t t[4];
  void *r[4];
  int i;
  for (i = 0; i < 4; i++)
    CHECK_EQ(pthread_create(&t[i], NULL, hammer, NULL), 0);
  for (i = 0; i < 4; i++)
    CHECK_EQ(pthread_join(t[i], &r[i]), 0);
  for (i = 1; i < 4; i++)
    CHECK(r[i] == r[0]);
}

CHECK_MAIN()
