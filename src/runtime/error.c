/* error.c — loom_strerror and loom_err_name over one X-macro table. */
#include <limits.h>
#include <string.h>

#include "loom/error.h"

const char *loom_strerror(int err) {
  switch (err) {
#define LOOM_ERR_MSG_(name, value, msg)                                      \
  case value:                                                                \
    return msg;
    LOOM_ERRNO_MAP(LOOM_ERR_MSG_)
#undef LOOM_ERR_MSG_
  default:
    break;
  }
  if (err == 0)
    return "success";
  if (err == INT_MIN)
    return "unknown error";
  const char *s = strerrordesc_np(err < 0 ? -err : err);
  return s != NULL ? s : "unknown error";
}

const char *loom_err_name(int err) {
  switch (err) {
#define LOOM_ERR_NAME_(name, value, msg)                                     \
  case value:                                                                \
    return #name;
    LOOM_ERRNO_MAP(LOOM_ERR_NAME_)
#undef LOOM_ERR_NAME_
  default:
    break;
  }
  if (err == 0)
    return "OK";
  if (err == INT_MIN)
    return "UNKNOWN";
  const char *s = strerrorname_np(err < 0 ? -err : err);
  return s != NULL ? s : "UNKNOWN";
}
