/*
 * ctx_internal.h — what lower layers' context-aware calls use: a hook
 * that runs when a context is cancelled (Go's context.AfterFunc, minus
 * the goroutine).  The net layer hooks "expire this poll descriptor's
 * deadline" for the length of one blocking call.
 */
#ifndef LOOM_CTX_INTERNAL_H
#define LOOM_CTX_INTERNAL_H

#include <stdbool.h>

#include "loom/ctx.h"
#include "runtime/runtime.h"

typedef struct loom__ctx_hook {
  void (*fn)(void *arg); /* short, may not park, takes no context lock */
  void *arg;
  struct loom__ctx_hook *next, *prev;
  bool linked;
  /* Set by loom__ctx_hook_add for a hook on a coroutine's stack: */
  loom__undo undo;
  loom_ctx *ctx;
  loom__g *g;
} loom__ctx_hook;

/* Run h->fn(h->arg) when c is cancelled.  false (nothing added) if c is
 * cancelled already.  The background context never runs hooks.  `g` is
 * the coroutine on whose stack h lives (NULL: a plain thread's): if the
 * runtime abandons it before loom__ctx_unhook, its end unhooks h
 * (loom__undo in runtime/runtime.h). */
bool loom__ctx_hook_add(loom_ctx *c, loom__ctx_hook *h, loom__g *g);
/* Remove h; once this returns, h->fn is not running and will not run. */
void loom__ctx_unhook(loom_ctx *c, loom__ctx_hook *h);

/* c's reason once a cancel has set it (0 while live), for a call that
 * learned of the cancel from a hook, fired or refused: unlike
 * loom_ctx_err, it does not report 0 in the moment between the reason
 * and the done channel's close; it waits that moment out, so that the
 * caller's user then finds loom_ctx_err agreeing. */
int loom__ctx_reason(loom_ctx *c);

#endif
