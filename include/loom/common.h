/* loom/common.h — what every public header needs. */
#ifndef LOOM_COMMON_H
#define LOOM_COMMON_H

/* Marks the public API: the only symbols the shared library exports. */
#if defined(__GNUC__)
#define LOOM_API __attribute__((visibility("default")))
#else
#define LOOM_API
#endif

#endif /* LOOM_COMMON_H */
