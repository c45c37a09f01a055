/*
 * loom/error.h — error codes.
 *
 * Every loom function that can fail returns an int: 0 (or a non-negative
 * count) on success and a negative value on failure.  A negative value is
 * either a negated errno (-ETIMEDOUT, -ECANCELED, -ENOMEM, ...) or one of
 * loom's own codes below, which live in a range no errno reaches.
 */
#ifndef LOOM_ERROR_H
#define LOOM_ERROR_H

#include "loom/common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* X(name, value, message) — loom's own codes. */
#define LOOM_ERRNO_MAP(X)                                                    \
  X(LOOM_ENORUNTIME, -30001, "no loom runtime is running")                   \
  X(LOOM_ERUNNING, -30002, "a loom runtime is already running")             \
  X(LOOM_ENOTCO, -30003, "not called from a loom coroutine")                 \
  X(LOOM_ECLOSED, -30004, "use of a closed object")                        \
  X(LOOM_EBADADDR, -30005, "malformed network address")                     \
  X(LOOM_ENETWORK, -30006, "unknown network")                               \
  X(LOOM_ENOHOST, -30007, "no such host")                                   \
  X(LOOM_EDNS, -30008, "host name lookup failed")                          \
  X(LOOM_ECOMPRESS, -30009, "corrupt compressed stream")

enum loom_errno {
#define LOOM_ERR_ENUM_(name, value, msg) name = (value),
  LOOM_ERRNO_MAP(LOOM_ERR_ENUM_)
#undef LOOM_ERR_ENUM_
};

/*
 * loom_strerror — a human-readable message for `err`.
 *
 * `err` is a loom code or a negated errno; a positive errno is accepted too.
 * Returns a static string, never NULL ("unknown error" for an unknown
 * code).  Thread-safe; never parks.
 */
LOOM_API const char *loom_strerror(int err);

/*
 * loom_err_name — the symbolic name of `err` ("ETIMEDOUT",
 * "LOOM_ENORUNTIME"), or "UNKNOWN".  Static string; thread-safe.
 */
LOOM_API const char *loom_err_name(int err);

#ifdef __cplusplus
}
#endif
#endif /* LOOM_ERROR_H */
