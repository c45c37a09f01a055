/*
 * arch/switch.h — the context-switch contract every architecture keeps.
 *
 * A context is one word: the stack pointer of a suspended flow of control.
 * Everything else a suspended flow needs (callee-saved registers, the
 * floating-point control words, the return address) is pushed on its own
 * stack by loom__ctx_switch before the stack pointer is saved.  Caller-
 * saved registers need no saving: loom__ctx_switch is an ordinary call.
 *
 *   loom__ctx_switch(from, to)  saves the current flow into *from and
 *                               resumes the flow saved in *to.  It returns
 *                               (into `from`) when something switches back.
 *   loom__ctx_make(c, top, entry, arg)
 *                               prepares *c so that switching to it calls
 *                               entry(arg) on the stack that ends at `top`
 *                               (exclusive, any alignment), with the
 *                               floating-point control words at their ABI
 *                               defaults.  `entry` must never return.
 *
 * A port to a new architecture adds switch_<arch>.S and a
 * loom__ctx_make in this file; nothing else in loom knows the layout
 * (except tools/loom-gdb.py, which reads a parked coroutine's registers).
 */
#ifndef LOOM_ARCH_SWITCH_H
#define LOOM_ARCH_SWITCH_H

#include <stdint.h>
#include <string.h>

typedef struct loom__ctx {
  void *sp;
} loom__ctx;

void loom__ctx_switch(loom__ctx *from, const loom__ctx *to);

#if defined(__x86_64__)
/*
 * x86_64 frame, as loom__ctx_switch leaves it at the saved sp:
 *   sp+0   MXCSR (4 bytes), x87 control word (2 bytes), 2 bytes padding
 *   sp+8   r15   sp+16 r14   sp+24 r13   sp+32 r12
 *   sp+40  rbx   sp+48 rbp   sp+56 return address
 * A new context "returns" into loom__ctx_trampoline with r12 = entry and
 * r13 = arg, and rsp 16-byte aligned, so entry starts with the SysV
 * alignment (rsp + 8 a multiple of 16) after the trampoline's call.
 */
void loom__ctx_trampoline(void);

static inline void loom__ctx_make(loom__ctx *c, void *top,
                                  void (*entry)(void *), void *arg) {
  uintptr_t t = (uintptr_t)top & ~(uintptr_t)15;
  uint64_t *f = (uint64_t *)(t - 80); /* 16-aligned; 16 spare bytes above */
  memset(f, 0, 80);
  f[0] = 0x1F80u | ((uint64_t)0x037Fu << 32); /* MXCSR, x87 CW defaults */
  f[4] = (uint64_t)(uintptr_t)entry;          /* r12 */
  f[3] = (uint64_t)(uintptr_t)arg;            /* r13 */
  f[7] = (uint64_t)(uintptr_t)loom__ctx_trampoline;
  c->sp = f;
}
#else
#error "loom: no context switch for this architecture yet"
#endif

#endif /* LOOM_ARCH_SWITCH_H */
