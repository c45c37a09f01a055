/* loom.h — everything loom offers, in one include. */
#ifndef LOOM_H
#define LOOM_H

#include "loom/alloc.h"
#include "loom/buf.h"
#include "loom/chan.h"
#include "loom/codec.h"
#include "loom/ctx.h"
#include "loom/engine.h"
#include "loom/error.h"
#include "loom/fd.h"
#include "loom/net.h"
#include "loom/runtime.h"
#include "loom/sync.h"
#include "loom/taskpool.h"

#endif /* LOOM_H */
