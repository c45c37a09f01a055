/*
 * proc.c — the scheduler: Go's G/M/P in C.
 *
 * Gs (coroutines) run on Ms (threads) that hold Ps (processors).  Each P
 * has a local run queue; a global queue takes overflow and work from
 * threads that hold no P.  An M looking for work (findrunnable) tries, in
 * order: its P's due timers, the global queue every 61st tick (so a
 * ping-pong pair on the local queue cannot starve it), the local queue,
 * the global queue, the poller without blocking, and stealing half of a
 * random victim's queue (and its due timers).  Finding nothing, it gives
 * its P back and sleeps; exactly one sleeping M blocks in the poller,
 * with the earliest timer of all Ps as its timeout.
 *
 * Spinning (Go's "worker thread parking/unparking"): an M that is looking
 * for work is "spinning"; while one spins, nobody wakes another (wakep is
 * a no-op), and the spinner, when it finds work, wakes a replacement.  A
 * spinner that gives up re-checks every queue after it stops counting as
 * spinning, so work submitted in between is never stranded.  At most half
 * the busy Ps' worth of Ms spin at once.
 *
 * Switching.  Go switches from a parking G to the M's g0 stack, decides
 * there, and switches to the next G: two switches.  Here a G that parks
 * or yields picks the next G itself (runnext or the local queue) and
 * switches to it directly, one switch, going through g0 only when the
 * decision needs more (global queue, stealing, sleeping, pinned Gs).  The
 * catch is that the parking G's context is not saved until the switch
 * happens, so whatever must happen "after it is off its stack" (marking it
 * waiting, queueing it, recycling a dead G) is a post-switch action
 * stored on the M and run by whichever context the switch lands in.
 * That is the park contract:
 *
 *   loom__park(commit, arg): the G switches away; then, on the next
 *   context, its status becomes G_WAITING and commit(g, arg) runs (this
 *   is where a timer is armed or a wait-queue lock released); if commit
 *   returns false the G is readied at once.  From G_WAITING only
 *   loom__ready() moves it on.  So a wake-up can never race ahead of the
 *   save: whoever can wake the G learns about it only in commit.  Before
 *   the switch, the G's park hook runs if it has one (loom__park_hook_set:
 *   the engine's corked replies), on the G, under the caller's locks.
 *
 * Thread-local state.  A G that parks on one M may resume on another, and
 * a compiler may keep the address of a __thread variable in a register
 * across the call that switched (brpc's years-long bug).  The scheduler's
 * one thread-local, the current M, is read only through loom__getm(),
 * whose every call reads the thread pointer afresh (a volatile asm with a
 * memory clobber on x86_64, runtime.h; an opaque call elsewhere), and is
 * re-read after every switch.  errno is saved and restored per G
 * through the address the M took of it on its own thread.
 *
 * Rejected: ucontext (a signal-mask system call per switch); a single
 * global queue (every switch contends); one thread per P with no hand-off
 * (a blocking call would stall the whole P); asynchronous preemption (C
 * has no safe points).
 */
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "netpoll/pollfd.h"
#include "runtime/alloc.h"
#include "runtime/export_test.h"
#include "runtime/runtime.h"

#ifdef LOOM_ASAN
void __sanitizer_start_switch_fiber(void **fake_stack_save, const void *bottom,
                                    size_t size);
void __sanitizer_finish_switch_fiber(void *fake_stack_save,
                                     const void **bottom_old,
                                     size_t *size_old);
void __asan_unpoison_memory_region(void const volatile *addr, size_t size);
#endif
#ifdef LOOM_TSAN
void *__tsan_get_current_fiber(void);
void *__tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void *fiber);
void __tsan_switch_to_fiber(void *fiber, unsigned flags);
#endif

#define DEFAULT_STACK ((size_t)64 << 10)
#define MIN_STACK ((size_t)16 << 10)
#define PCACHE_MAX 64
#define SIGSTACK_SIZE ((size_t)64 << 10)

__thread loom__m *loom__tls_m; /* read through loom__getm() only */
static _Atomic(loom__rt *) current_rt;
/* Serialises foreign threads' use of current_rt against teardown. */
static pthread_mutex_t rt_mu = PTHREAD_MUTEX_INITIALIZER;
static struct sigaction old_segv, old_bus;

/* ---- thread-local access that survives switches -------------------- */

#if defined(__clang__)
#define LOOM_NOIPA __attribute__((noinline))
#else
#define LOOM_NOIPA __attribute__((noinline, noipa))
#endif

#if !defined(__x86_64__)
LOOM_NOIPA loom__m *loom__getm(void) {
  __asm__ volatile("" ::: "memory");
  return loom__tls_m;
}
#endif

LOOM_NOIPA static void set_tls_m(loom__m *m) {
  __asm__ volatile("" ::: "memory");
  loom__tls_m = m;
}

/* The scheduler's locks are held for a few hundred instructions at most:
 * spin briefly before sleeping in the kernel (glibc's adaptive mutex). */
int loom__mutex_init(pthread_mutex_t *mu) {
  pthread_mutexattr_t attr;
  pthread_mutexattr_init(&attr);
  pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ADAPTIVE_NP);
  int err = pthread_mutex_init(mu, &attr);
  pthread_mutexattr_destroy(&attr);
  return -err;
}

/* The current runtime for a plain thread, or NULL: a stopping one is as
 * good as gone (its end may be undoing its coroutines' waits, taking its
 * timers apart; see rt_undo).  Under rt_mu, unless a stale answer does
 * no harm. */
static loom__rt *live_rt(void) {
  loom__rt *rt = atomic_load(&current_rt);
  return rt != NULL && !atomic_load(&rt->stopping) ? rt : NULL;
}

loom__rt *loom__rt_get(void) {
  loom__m *m = loom__getm();
  return m != NULL ? m->rt : live_rt();
}

int64_t loom_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

void loom__throw(const char *msg) {
  char buf[256];
  int n = snprintf(buf, sizeof buf, "loom: fatal: %s\n", msg);
  if (n > 0)
    (void)!write(2, buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf);
  abort();
}

static void default_log(void *arg, const char *msg) {
  (void)arg;
  char buf[1100];
  int n = snprintf(buf, sizeof buf, "loom: %s\n", msg);
  if (n > 0)
    (void)!write(2, buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf);
}

void loom__log(loom__rt *rt, const char *fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  rt->cfg.log(rt->cfg.log_arg, buf);
}

static uint32_t xorshift32(uint32_t x) {
  x ^= x << 13;
  x ^= x >> 17;
  x ^= x << 5;
  return x;
}

static uint32_t fastrand(loom__m *m) {
  return m->fastrand = xorshift32(m->fastrand);
}

uint32_t loom__fastrand(void) {
  loom__m *m = loom__getm();
  if (m != NULL)
    return fastrand(m);
  static __thread uint32_t state; /* a plain thread never switches */
  if (state == 0)
    state = (uint32_t)(uintptr_t)&state | 1;
  return state = xorshift32(state);
}

/* ---- Gs: allocation, stacks, switching ---------------------------- */

static inline char *g_stack_lo(const loom__rt *rt, const loom__g *g) {
  return g->stk.base + rt->stacks.page;
}

/* The G lives in the top bytes of its stack slot. */
static loom__g *g_place(loom__rt *rt, const loom__stack *st) {
  uintptr_t top = (uintptr_t)(st->base + st->size);
  loom__g *g = (loom__g *)((top - sizeof(loom__g)) & ~(uintptr_t)63);
  memset(g, 0, sizeof *g);
  g->stk = *st;
#ifdef LOOM_TSAN
  g->tsan_fiber = __tsan_create_fiber(0);
#endif
  (void)rt;
  return g;
}

static void g_entry(void *arg);

static loom__g *g_alloc(loom__rt *rt, loom__p *p, size_t stack_size) {
  loom__stacks *s = &rt->stacks;
  loom__g *g = NULL;
  if (stack_size != 0 && stack_size != s->slot_size) {
    loom__stack st;
    if (loom__stack_map(s, stack_size, &st) != 0)
      return NULL;
    g = g_place(rt, &st);
    g->custom_stack = true;
    pthread_mutex_lock(&s->lock);
    g->alllink = s->custom;
    g->allprev = NULL;
    if (g->alllink != NULL)
      g->alllink->allprev = g;
    s->custom = g;
    pthread_mutex_unlock(&s->lock);
    return g;
  }
  if (p != NULL && p->ngfree > 0)
    return p->gfree[--p->ngfree];
  /* The P's cache is empty (or there is no P): take a batch for it from
   * the global lists, or else carve one.  Only pointers move under the
   * lock; fresh slots are set up after it (a guard to install, a page
   * to fault in), so a spawner does not hold up the Ps that spill dead
   * Gs here. */
  int want = p != NULL ? LOOM_PCACHE / 2 : 1, got = 0;
  loom__g *batch[LOOM_PCACHE / 2];
  loom__stack fresh[LOOM_PCACHE / 2];
  pthread_mutex_lock(&s->lock);
  while (got < want && s->ngfree > 0)
    batch[got++] = s->gfree[--s->ngfree];
  while (got < want && s->nclean > 0)
    batch[got++] = s->gclean[--s->nclean];
  int nfresh = got == 0 ? loom__stack_carve(s, fresh, want) : 0;
  pthread_mutex_unlock(&s->lock);
  for (int i = 0; i < nfresh; i++) {
    loom__stack_prepare(s, &fresh[i]);
    batch[got++] = g_place(rt, &fresh[i]);
  }
  if (got == 0)
    return NULL;
  /* The warmest (the first taken: the lists are LIFO) runs now; the rest
   * go to the cache so that the next warmest is popped next. */
  for (int i = got - 1; i > 0; i--)
    p->gfree[p->ngfree++] = batch[i];
  return batch[0];
}

static void custom_unlink(loom__rt *rt, loom__g *g) {
  loom__stacks *s = &rt->stacks;
  pthread_mutex_lock(&s->lock);
  if (g->allprev != NULL)
    g->allprev->alllink = g->alllink;
  else
    s->custom = g->alllink;
  if (g->alllink != NULL)
    g->alllink->allprev = g->allprev;
  pthread_mutex_unlock(&s->lock);
}

/* Recycle a dead G.  Runs on another stack than g's. */
static void g_free(loom__rt *rt, loom__p *p, loom__g *g) {
  atomic_store_explicit(&g->status, G_IDLE, memory_order_relaxed);
  if (g->custom_stack) {
    /* The timer that woke g may still be finishing on another thread
     * (timers_run clears `running` after its fn returns): the G, and so
     * the timer, must outlive that before the mapping goes. */
    while (atomic_load_explicit(&g->timer.running, memory_order_acquire))
      sched_yield();
    custom_unlink(rt, g);
#ifdef LOOM_TSAN
    __tsan_destroy_fiber(g->tsan_fiber);
#endif
    loom__stack st = g->stk;
    loom__stack_unmap(&st);
    return;
  }
  if (p->ngfree < LOOM_PCACHE) {
    p->gfree[p->ngfree++] = g;
    return;
  }
  /* Full: spill the older half to the global array (sysmon trims what
   * stays there).  If the array cannot grow, the slot just idles until
   * shutdown; nothing is lost. */
  loom__stacks *s = &rt->stacks;
  pthread_mutex_lock(&s->lock);
  int half = LOOM_PCACHE / 2, i;
  for (i = 0; i < half; i++)
    if (loom__ptrs_push(&s->gfree, &s->ngfree, &s->capfree, p->gfree[i]))
      break;
  pthread_mutex_unlock(&s->lock);
  memmove(p->gfree, p->gfree + i, (size_t)(LOOM_PCACHE - i) * sizeof g);
  p->ngfree = LOOM_PCACHE - i;
  if (p->ngfree < LOOM_PCACHE)
    p->gfree[p->ngfree++] = g;
}

LOOM_NOIPA static void after_switch(loom__g *g);

/* The canary word at the bottom of g's usable stack.  Not instrumented:
 * ASan may have poisoned that word as the redzone of a frame of the very
 * overflow the check is there to catch. */
#if defined(__clang__) || defined(__GNUC__)
__attribute__((no_sanitize_address))
#endif
static uint64_t
stack_canary(loom__rt *rt, loom__g *g) {
  return *(const volatile uint64_t *)(const void *)g_stack_lo(rt, g);
}

/* Run on g0 (see gswitch) for a coroutine whose canary was overwritten:
 * report and stop. */
static void canary_broken(loom__m *m, loom__g *g, void *arg) {
  (void)arg;
  char where[160];
  loom__log(m->rt,
            "stack overflow in coroutine %llu (stack %zu KiB, canary "
            "overwritten, spawned at %s)",
            (unsigned long long)g->id, g->stk.size >> 10,
            loom__symbolize(g->spawn_pc, where, sizeof where));
  loom__throw("stack overflow");
}

/* Switch from `from` (running on m) to `to`.  Returns when something
 * switches back to `from`, possibly on another M. */
static void gswitch(loom__m *m, loom__g *from, loom__g *to, bool dying) {
  loom__rt *rt = m->rt;
  from->err = *m->errno_addr; /* before the switch: this thread's errno */
  /* A dying G too: its slot goes back to the cache, and a broken canary
   * left there would be blamed on the next coroutine to use it. */
  if (!from->is_g0 && from->stk.canary &&
      stack_canary(rt, from) != LOOM_STACK_CANARY) {
    /* The report is made on the thread's own stack: this one has no
     * room left, and the log and the symbolizer would run on into the
     * slot below (a neighbour's stack). */
    m->post_fn = canary_broken;
    m->post_g = from;
    m->post_arg = NULL;
    to = &m->g0;
  }
  m->curg = to;
  if (m->p != NULL) {
    atomic_store_explicit(&m->p->run_id, to->id, memory_order_relaxed);
    atomic_store_explicit(&m->p->run_pc, to->spawn_pc, memory_order_relaxed);
  }
#ifdef LOOM_ASAN
  const void *bottom;
  size_t size;
  if (to->is_g0) {
    bottom = to->stk.base;
    size = to->stk.size;
  } else {
    bottom = g_stack_lo(rt, to);
    size = (size_t)((const char *)to - (const char *)bottom);
  }
  __sanitizer_start_switch_fiber(dying ? NULL : &from->asan_fake, bottom,
                                 size);
#endif
#ifdef LOOM_TSAN
  __tsan_switch_to_fiber(to->tsan_fiber, 0);
#endif
  loom__ctx_switch(&from->ctx, &to->ctx);
  after_switch(from);
}

/* First thing a context runs when it is switched (back) in.  Never
 * inlined: the M, and with it the address of errno, must be computed
 * afresh here, on the thread we resumed on. */
static void run_deferred_timers(loom__m *m);

LOOM_NOIPA static void after_switch(loom__g *g) {
#ifdef LOOM_ASAN
  __sanitizer_finish_switch_fiber(g->asan_fake, NULL, NULL);
#endif
  loom__m *m = loom__getm();
  if (m->post_fn != NULL) {
    loom__post_fn fn = m->post_fn;
    m->post_fn = NULL;
    fn(m, m->post_g, m->post_arg);
  }
  if (m->timers_due || m->stalled_timers != NULL)
    run_deferred_timers(m);
  *m->errno_addr = g->err;
}

static inline void tick(loom__p *p) {
  uint32_t t = atomic_load_explicit(&p->schedtick, memory_order_relaxed);
  atomic_store_explicit(&p->schedtick, t + 1, memory_order_relaxed);
}

/* The clock is read only when a heap has a timer, once. */
static void run_due(loom__timers *ts, int64_t *now) {
  int64_t next = loom__timers_next(ts);
  if (next == 0)
    return;
  if (*now == 0)
    *now = loom_now();
  if (next <= *now)
    loom__timers_run(ts, *now);
}

/* This P's due timers, and those armed without a P (any M runs them). */
static void run_due_timers(loom__p *p) {
  int64_t now = 0;
  run_due(&p->timers, &now);
  run_due(&p->rt->nop_timers, &now);
}

/*
 * The fast path (switch_out) only notes that timers are to be looked at;
 * they run here, after the switch and after the post-switch action.  A
 * parking G's commit is that action, and until it runs the G may hold a
 * lock a timer's function needs: a receive on a context's done channel
 * holds the channel's lock, and the context's deadline timer closes that
 * channel.  Run before the switch, it would spin on its own thread's lock.
 */
__attribute__((noinline)) static void run_deferred_timers(loom__m *m) {
  loom__p *v = m->stalled_timers;
  bool own = m->timers_due;
  m->timers_due = false;
  m->stalled_timers = NULL;
  if (m->p == NULL)
    return; /* g0 looks at timers itself */
  if (own)
    run_due_timers(m->p);
  if (v != NULL)
    loom__timers_run(&v->timers, loom_now());
}

/*
 * A P that makes no progress.  Scheduling is cooperative: while one of a
 * P's Gs runs long without a scheduling point, the Gs queued behind it
 * and the timers in its heap wait for as long as it runs.  An idle P would
 * steal them, but a busy M steals only when its own queue, the global
 * queue and the poller are all empty, which under steady load never
 * happens.  So a P that has switched no G for LOOM_STALL_NS (10 ms: when
 * Go would preempt, and when sysmon warns) while it had Gs queued or
 * timers set counts as stalled: we run its due timers (the Gs they ready
 * land on our P) and steal half its queue, runnext included, and again at
 * every check until it moves.  Checked on every 61st switch, with the
 * global queue (a P whose queue runs dry steals from a stalled one anyway,
 * unless the global queue or the poller keeps it busy).
 */
static loom__g *steal_stalled(loom__m *m, loom__p *p) {
  loom__rt *rt = m->rt;
  /* A steal copies up to half a ring to our tail: it needs the room. */
  if (loom__runq_len(p) > LOOM_RUNQ_SIZE / 2)
    return NULL;
  for (int i = 0; i < rt->nprocs; i++) {
    loom__p *v = rt->allp[i];
    struct loom__pwatch *w = &p->watch[i];
    if (v == p)
      continue;
    uint32_t t = atomic_load_explicit(&v->schedtick, memory_order_relaxed);
    int64_t timer = loom__timers_next(&v->timers);
    if (t != w->tick ||
        atomic_load_explicit(&v->status, memory_order_relaxed) != P_RUNNING ||
        (timer == 0 && loom__runq_empty(v))) {
      w->tick = t;
      w->since = 0;
      continue;
    }
    /* Still, with Gs queued or timers set: the clock is read only now. */
    int64_t now = loom_now();
    if (w->since == 0)
      w->since = now;
    if (now - w->since < LOOM_STALL_NS)
      continue;
    /* Its due timers too, after the switch (run_deferred_timers): the
     * Gs they ready land on our P. */
    if (timer != 0 && timer <= now)
      m->stalled_timers = v;
    loom__g *g = loom__runq_steal(p, v, LOOM__STEAL_NEXT_NOW);
    if (g != NULL) {
      atomic_fetch_add_explicit(&rt->steals, 1, memory_order_relaxed);
      return g;
    }
  }
  return NULL;
}

/* The next G this P should run without consulting g0, or NULL. */
static loom__g *fast_next(loom__m *m, loom__p *p) {
  loom__rt *rt = m->rt;
  uint32_t t = atomic_load_explicit(&p->schedtick, memory_order_relaxed);
  loom__g *g = NULL;
  if (t % 61 == 0) {
    if (atomic_load_explicit(&rt->runqsize, memory_order_relaxed) != 0)
      return NULL;
    if (rt->nprocs > 1)
      g = steal_stalled(m, p);
  }
  /* Reading the clock costs more than the rest of a switch, so the fast
   * path looks at timers every 8th switch (after it: see
   * run_deferred_timers), or every switch while sysmon says this P
   * switches slowly (watch_timers: eight switches of coroutines that run
   * for milliseconds each are tens of them); g0 looks every time. */
  if ((t & atomic_load_explicit(&p->timer_mask, memory_order_relaxed)) == 0)
    m->timers_due = true;
  if (g == NULL)
    g = loom__runq_get(p);
  if (g != NULL && g->lockedm != NULL) {
    m->handoff = g; /* g0 hands the P to g's M */
    return NULL;
  }
  return g;
}

/* The running G `g` gives up its M.  The post action is already set. */
static void switch_out(loom__m *m, loom__g *g, bool dying) {
  loom__p *p = m->p;
  loom__g *next = NULL;
  if (p != NULL && m->lockedg == NULL &&
      !atomic_load_explicit(&m->rt->stopping, memory_order_relaxed))
    next = fast_next(m, p);
  if (next == NULL) {
    next = &m->g0;
  } else {
    atomic_store_explicit(&next->status, G_RUNNING, memory_order_relaxed);
    tick(p);
  }
  gswitch(m, g, next, dying);
}

void loom__switch_to_g0(loom__m *m, loom__g *g, loom__post_fn fn,
                        void *arg) {
  m->post_fn = fn;
  m->post_g = g;
  m->post_arg = arg;
  gswitch(m, g, &m->g0, false);
}

/* ---- post-switch actions ----------------------------------------- */

struct park_req {
  bool (*commit)(loom__g *g, void *arg);
  void *arg;
};

static void post_park(loom__m *m, loom__g *g, void *arg) {
  (void)m;
  struct park_req *r = arg;
  atomic_store_explicit(&g->status, G_WAITING, memory_order_release);
  if (r->commit != NULL && !r->commit(g, r->arg))
    loom__ready(g);
}

static void post_yield(loom__m *m, loom__g *g, void *arg) {
  (void)arg;
  atomic_store_explicit(&g->status, G_RUNNABLE, memory_order_relaxed);
  loom__runq_put(m->rt, m->p, g, false);
}

static void post_yield_global(loom__m *m, loom__g *g, void *arg) {
  (void)arg;
  atomic_store_explicit(&g->status, G_RUNNABLE, memory_order_relaxed);
  pthread_mutex_lock(&m->rt->lock);
  loom__globrunq_put(m->rt, g);
  pthread_mutex_unlock(&m->rt->lock);
}

/* The frames a coroutine left on its stack when it stopped for good
 * never returned, so ASan still has their redzones poisoned; the next
 * coroutine on that stack would trip over them. */
static void unpoison_dead_frames(loom__g *g) {
#ifdef LOOM_ASAN
  char *sp = g->ctx.sp; /* NULL: never ran */
  if (sp > g->stk.base && sp < (char *)g)
    __asan_unpoison_memory_region(sp, (size_t)((char *)g - sp));
#else
  (void)g;
#endif
}

static void post_exit(loom__m *m, loom__g *g, void *arg) {
  (void)arg;
  unpoison_dead_frames(g);
  atomic_store_explicit(&g->status, G_DEAD, memory_order_relaxed);
  g_free(m->rt, m->p, g);
}

__attribute__((noinline)) void loom__park_hook_run(loom__g *g) {
  void (*fn)(void *) = g->park_hook;
  g->park_hook = NULL; /* once; and fn must not park, but if it did */
  fn(g->park_hook_arg);
}

void loom__park(bool (*commit)(loom__g *g, void *arg), void *arg,
                const char *reason) {
  loom__m *m = loom__getm();
  loom__g *g = m->curg;
  if (g == NULL || g->is_g0)
    loom__throw("park: not on a coroutine");
  if (m->p == NULL)
    loom__throw("park: inside loom_block_enter/exit");
  if (g->park_hook != NULL)
    loom__park_hook_run(g); /* it does not park: still this M, this P */
  struct park_req r = {commit, arg};
  g->wait_reason = reason;
  m->post_fn = post_park;
  m->post_g = g;
  m->post_arg = &r;
  switch_out(m, g, false);
  g->wait_reason = NULL;
}

static void ready_global(loom__rt *rt, loom__g *g);
static void ready_foreign(loom__g *g);

void loom__ready(loom__g *g) {
  /* The caller owns the wake-up (G_WAITING's contract), so a store does;
   * the check catches a second waker, not a racing one.  A release (a
   * plain store here too): an abandoned G's undo (loom__waiter_undo)
   * waits for it, then reads what the waker wrote before. */
  if (atomic_load_explicit(&g->status, memory_order_relaxed) != G_WAITING)
    loom__throw("ready: bad g status");
  loom__m *m = loom__getm();
  if (m == NULL) {
    ready_foreign(g);
    return;
  }
  atomic_store_explicit(&g->status, G_RUNNABLE, memory_order_release);
  if (m->p == NULL) {
    ready_global(m->rt, g);
    return;
  }
  loom__runq_put(m->rt, m->p, g, true);
  loom__wakep(m->rt);
}

/* loom__ready from a plain thread (a channel send, a context cancel).
 * The status changes under rt_mu, as loom_go spawns: the runtime cannot
 * be torn down meanwhile, and the runtime's end, which waits for the
 * status of a G whose wait it undoes (loom__waiter_undo) and only then
 * moves on to take current_rt down (under rt_mu), cannot let another
 * runtime become current before this thread has looked.  If the runtime
 * is stopping, or gone, so is the G's chance to run: it is not queued.
 * (Its status is still written: teardown keeps the G until then when a
 * plain thread has claimed its sync wait, but a socket wait leaves no
 * record to wait on, hence net.h's rule for plain threads' socket calls
 * at loom_run's end.) */
static void (*_Atomic hold_foreign_ready)(void); /* export_test.h */

__attribute__((noinline)) static void ready_foreign(loom__g *g) {
  void (*hold)(void) =
      atomic_load_explicit(&hold_foreign_ready, memory_order_relaxed);
  if (hold != NULL)
    hold();
  pthread_mutex_lock(&rt_mu);
  atomic_store_explicit(&g->status, G_RUNNABLE, memory_order_release);
  loom__rt *rt = live_rt();
  if (rt != NULL)
    ready_global(rt, g);
  pthread_mutex_unlock(&rt_mu);
}

/* loom__ready from an M without a P, or from a plain thread: g on rt's
 * global queue. */
__attribute__((noinline)) static void ready_global(loom__rt *rt, loom__g *g) {
  pthread_mutex_lock(&rt->lock);
  loom__globrunq_put(rt, g);
  pthread_mutex_unlock(&rt->lock);
  loom__wakep(rt);
}

/* ---- Ps and Ms ---------------------------------------------------- */

static void pidleput(loom__rt *rt, loom__p *p) {
  atomic_store_explicit(&p->status, P_IDLE, memory_order_release);
  atomic_store_explicit(&p->run_id, 0, memory_order_relaxed);
  p->link = rt->pidle;
  rt->pidle = p;
  atomic_fetch_add(&rt->npidle, 1);
}

/* Take the idle P at *pp off the list.  rt->lock held. */
static loom__p *pidle_take(loom__rt *rt, loom__p **pp) {
  loom__p *p = *pp;
  *pp = p->link;
  /* Against sysmon's "sysmonwait = true, then read npidle" before it
   * sleeps: each side writes, then reads the other's word, so both reads
   * are seq_cst, or both could miss the other's write (on x86_64 the
   * locked decrement orders them anyway; weaker CPUs need the load). */
  atomic_fetch_sub(&rt->npidle, 1);
  if (atomic_load(&rt->sysmonwait))
    loom__sysmon_wake(rt);
  return p;
}

loom__p *loom__pidleget(loom__rt *rt) {
  return rt->pidle != NULL ? pidle_take(rt, &rt->pidle) : NULL;
}

/* An idle P for work that waits with no M coming for it: Gs in the
 * global queue, or in an idle P's own queue (startm puts a P back with
 * its Gs when no thread can be started for it).  NULL: no such work, or
 * no idle P.  rt->lock held. */
static loom__p *pidleget_stranded(loom__rt *rt) {
  if (atomic_load(&rt->runqsize) != 0)
    return loom__pidleget(rt);
  for (loom__p **pp = &rt->pidle; *pp != NULL; pp = &(*pp)->link)
    if (!loom__runq_empty(*pp))
      return pidle_take(rt, pp);
  return NULL;
}

void loom__acquirep(loom__m *m, loom__p *p) {
  atomic_store_explicit(&p->mclock, m->cpuclock, memory_order_relaxed);
  atomic_store_explicit(&p->status, P_RUNNING, memory_order_release);
  m->p = p;
}

static loom__p *releasep(loom__m *m) {
  loom__p *p = m->p;
  m->p = NULL;
  return p;
}

static loom__m *mget(loom__rt *rt) {
  loom__m *m = rt->midle;
  if (m != NULL) {
    rt->midle = m->link;
    rt->nmidle--;
    atomic_store_explicit(&rt->nmidle_pub, rt->nmidle, memory_order_relaxed);
  }
  return m;
}

static void *m_main(void *arg);

/* Create an M that starts with `p`.  rt->lock held (so teardown, which
 * joins every M in allm under the same lock, never sees a half-made M). */
static int newm_locked(loom__rt *rt, loom__p *p, bool spinning) {
  loom__m *m = loom__calloc(1, sizeof *m);
  if (m == NULL)
    return -ENOMEM;
  m->rt = rt;
  m->id = atomic_fetch_add(&rt->mnext, 1) + 1;
  m->fastrand = (uint32_t)(m->id * 0x9E3779B9u) | 1;
  m->nextp = p;
  m->spinning = spinning;
  m->g0.is_g0 = true;
  loom__note_clear(&m->park);
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, (size_t)1 << 20);
  int err = pthread_create(&m->thread, &attr, m_main, m);
  pthread_attr_destroy(&attr);
  if (err != 0) {
    loom__free(m);
    return -err;
  }
  m->alllink = rt->allm;
  rt->allm = m;
  rt->mcount++;
  atomic_store_explicit(&rt->mcount_pub, rt->mcount, memory_order_relaxed);
  return 0;
}

void loom__startm(loom__rt *rt, loom__p *p, bool spinning) {
  pthread_mutex_lock(&rt->lock);
  if (p == NULL) {
    p = loom__pidleget(rt);
    if (p == NULL) {
      pthread_mutex_unlock(&rt->lock);
      if (spinning)
        atomic_fetch_sub(&rt->nmspinning, 1);
      return;
    }
  }
  if (atomic_load(&rt->stopping)) {
    pidleput(rt, p);
    pthread_mutex_unlock(&rt->lock);
    if (spinning)
      atomic_fetch_sub(&rt->nmspinning, 1);
    return;
  }
  loom__m *nm = mget(rt);
  if (nm == NULL) {
    int err = newm_locked(rt, p, spinning);
    /* Said once per spell: sysmon retries every few milliseconds. */
    bool say = (err != 0) != rt->newm_failing;
    rt->newm_failing = err != 0;
    if (err != 0) {
      /* The work this M was for waits for one already running: each
       * looks for it before it sleeps (stopm), and the poller is woken
       * to look now — or, if its M is only on its way there, its wait
       * returns at once (it may have no deadline). */
      pidleput(rt, p);
      pthread_mutex_unlock(&rt->lock);
      if (spinning)
        atomic_fetch_sub(&rt->nmspinning, 1);
      loom__netpoll_break(&rt->np);
      if (say)
        loom__log(rt, "cannot start a thread: %s (retrying)",
                  loom_strerror(err));
      return;
    }
    pthread_mutex_unlock(&rt->lock);
    if (say)
      loom__log(rt, "threads can be started again");
    return;
  }
  /* Set under the lock: begin_shutdown takes it before waking every
   * parked M, so an M that wakes to exit instead sees these writes done
   * (they were a race with its last reads, TSan saw). */
  nm->spinning = spinning;
  nm->nextp = p;
  pthread_mutex_unlock(&rt->lock);
  loom__note_wakeup(&nm->park);
}

static _Atomic int lose_wakeps; /* loom__test_lose_wakeps */

void loom__wakep(loom__rt *rt) {
  /* seq_cst loads: after the caller's seq_cst write of the work (see
   * loom__runq_put), against a spinning M that stops (findrunnable). */
  if (atomic_load_explicit(&rt->npidle, memory_order_seq_cst) == 0)
    return;
  int zero = 0;
  if (atomic_load_explicit(&rt->nmspinning, memory_order_seq_cst) != 0 ||
      !atomic_compare_exchange_strong(&rt->nmspinning, &zero, 1))
    return;
  /* A test's lost wake-up (export_test.h), here where a thread is about
   * to be started anyway, off the path of every wakep that finds one
   * spinning. */
  int lose = atomic_load_explicit(&lose_wakeps, memory_order_relaxed);
  while (lose > 0)
    if (atomic_compare_exchange_weak(&lose_wakeps, &lose, lose - 1)) {
      atomic_fetch_sub(&rt->nmspinning, 1);
      return;
    }
  loom__startm(rt, NULL, true);
}

/* Hand off a P whose M is blocked or pinned: start an M for it if there
 * is anything it could do, else put it on the idle list. */
void loom__handoffp(loom__rt *rt, loom__p *p) {
  if (!loom__runq_empty(p) || atomic_load(&rt->runqsize) != 0) {
    loom__startm(rt, p, false);
    return;
  }
  int zero = 0;
  if (atomic_load(&rt->nmspinning) + atomic_load(&rt->npidle) == 0 &&
      atomic_compare_exchange_strong(&rt->nmspinning, &zero, 1)) {
    loom__startm(rt, p, true);
    return;
  }
  pthread_mutex_lock(&rt->lock);
  if (atomic_load(&rt->runqsize) != 0) {
    pthread_mutex_unlock(&rt->lock);
    loom__startm(rt, p, false);
    return;
  }
  /* The last P going idle while nobody polls: someone must poll. */
  if (atomic_load(&rt->npidle) == rt->nprocs - 1 &&
      atomic_load(&rt->lastpoll) != 0 &&
      (loom__timers_next(&p->timers) != 0 ||
       loom__timers_next(&rt->nop_timers) != 0 ||
       atomic_load(&rt->netpoll_waiters) != 0)) {
    pthread_mutex_unlock(&rt->lock);
    loom__startm(rt, p, false);
    return;
  }
  int64_t when = loom__timers_next(&p->timers);
  pidleput(rt, p);
  pthread_mutex_unlock(&rt->lock);
  if (when != 0)
    loom__wake_netpoller(rt, when);
}

void loom__wake_netpoller(loom__rt *rt, int64_t when) {
  if (atomic_load(&rt->lastpoll) == 0) {
    int64_t until = atomic_load(&rt->polluntil);
    if (until == 0 || until > when)
      loom__netpoll_break(&rt->np);
  } else {
    loom__wakep(rt);
  }
}

int loom__arm_begin(loom__arm *a, int n) {
  loom__m *m = loom__getm();
  loom__rt *rt;
  a->nop = false;
  if (m != NULL && m->p != NULL) {
    if (loom__timers_reserve(&m->p->timers, n) != 0)
      return -ENOMEM;
    a->rt = m->rt;
    a->heap = &m->p->timers;
    return 0;
  }
  if (m != NULL) {
    rt = m->rt; /* lives while its M does */
  } else {
    /* A foreign thread: rt_mu keeps the runtime from being torn down
     * under us until loom__arm_end, as in go_impl; a stopping one is
     * taking its timers apart. */
    pthread_mutex_lock(&rt_mu);
    rt = live_rt();
    if (rt == NULL) {
      pthread_mutex_unlock(&rt_mu);
      return LOOM_ENORUNTIME;
    }
  }
  pthread_mutex_lock(&rt->nop_timers_mu);
  if (loom__timers_reserve(&rt->nop_timers, n) != 0) {
    pthread_mutex_unlock(&rt->nop_timers_mu);
    if (m == NULL)
      pthread_mutex_unlock(&rt_mu);
    return -ENOMEM;
  }
  a->rt = rt;
  a->heap = &rt->nop_timers;
  a->nop = true;
  return 0;
}

void loom__arm_end(loom__arm *a, int64_t when) {
  loom__rt *rt = a->rt;
  if (!a->nop) {
    if (when != 0)
      loom__wake_netpoller(rt, when);
    return;
  }
  pthread_mutex_unlock(&rt->nop_timers_mu);
  if (when != 0) {
    /* The heap's new earliest before the poller's and the spinners'
     * state, against an M that is about to sleep: either it sees our
     * timer, or we see it still polling or spinning (loom__wakep's
     * seq_cst loads; a runq put does the same with a seq_cst store). */
    atomic_thread_fence(memory_order_seq_cst);
    loom__wake_netpoller(rt, when);
  }
  if (loom__getm() == NULL)
    pthread_mutex_unlock(&rt_mu);
}

/* Mark the Gs a poll made ready runnable.  Each sits in its own stack
 * page, so each first touch is a TLB miss: start them all, then write. */
static void poll_runnable(loom__g *const *gs, int n) {
  for (int i = 0; i < n; i++)
    __builtin_prefetch(gs[i], 1);
  for (int i = 0; i < n; i++)
    atomic_store_explicit(&gs[i]->status, G_RUNNABLE, memory_order_relaxed);
}

void loom__inject(loom__rt *rt, loom__g *const *gs, int n) {
  if (n <= 0)
    return;
  poll_runnable(gs, n);
  pthread_mutex_lock(&rt->lock);
  loom__globrunq_putbatch(rt, gs, (uint64_t)n);
  pthread_mutex_unlock(&rt->lock);
  for (int i = 0; i < n && atomic_load(&rt->npidle) > 0; i++)
    loom__startm(rt, NULL, false);
}

/* A poll's Gs: the first one to run now, the rest to the global queue. */
static loom__g *take_polled(loom__rt *rt, loom__g *const *gs, int n) {
  poll_runnable(gs, 1);
  loom__inject(rt, gs + 1, n - 1);
  return gs[0];
}

static void stopm(loom__m *m) {
  loom__rt *rt = m->rt;
  if (m->p != NULL)
    loom__throw("stopm: holding a P");
  if (m->spinning)
    loom__throw("stopm: spinning");
  pthread_mutex_lock(&rt->lock);
  if (atomic_load(&rt->stopping)) {
    pthread_mutex_unlock(&rt->lock);
    return;
  }
  /* Work no M is coming for (a thread could not be started for it):
   * ours, rather than sleeping next to it. */
  loom__p *p = pidleget_stranded(rt);
  if (p != NULL) {
    pthread_mutex_unlock(&rt->lock);
    loom__acquirep(m, p);
    return;
  }
  m->link = rt->midle;
  rt->midle = m;
  rt->nmidle++;
  atomic_store_explicit(&rt->nmidle_pub, rt->nmidle, memory_order_relaxed);
  pthread_mutex_unlock(&rt->lock);
  loom__note_sleep(&m->park);
  loom__note_clear(&m->park);
  if (m->nextp != NULL) {
    loom__acquirep(m, m->nextp);
    m->nextp = NULL;
  }
}

static void resetspinning(loom__m *m) {
  m->spinning = false;
  if (atomic_fetch_sub(&m->rt->nmspinning, 1) <= 0)
    loom__throw("resetspinning: negative nmspinning");
  loom__wakep(m->rt);
}

/* Run `m`'s pinned G: wait, P-less, until someone hands us a P with it. */
static void stoplockedm(loom__m *m) {
  loom__rt *rt = m->rt;
  if (m->p != NULL) {
    loom__p *p = releasep(m);
    loom__handoffp(rt, p);
  }
  /* nextp is handed over under rt->lock, which begin_shutdown also
   * takes before it wakes us to exit: either way we read it there. */
  for (;;) {
    loom__note_sleep(&m->park);
    loom__note_clear(&m->park);
    pthread_mutex_lock(&rt->lock);
    loom__p *p = m->nextp;
    m->nextp = NULL;
    bool stop = atomic_load(&rt->stopping);
    pthread_mutex_unlock(&rt->lock);
    if (p != NULL) {
      loom__acquirep(m, p);
      return;
    }
    if (stop)
      return;
  }
}

/* Give our P to the M that `g` is pinned to, and go idle. */
static void startlockedm(loom__m *m, loom__g *g) {
  loom__rt *rt = m->rt;
  loom__m *lm = g->lockedm;
  loom__p *p = releasep(m);
  pthread_mutex_lock(&rt->lock);
  lm->nextp = p;
  pthread_mutex_unlock(&rt->lock);
  loom__note_wakeup(&lm->park);
  stopm(m);
}

/* ---- finding work -------------------------------------------------- */

static loom__g *steal_work(loom__m *m) {
  loom__rt *rt = m->rt;
  loom__p *p = m->p;
  for (int round = 0; round < 4; round++) {
    bool last = round == 3;
    uint32_t start = fastrand(m) % (uint32_t)rt->nprocs;
    for (int j = 0; j < rt->nprocs; j++) {
      if (atomic_load_explicit(&rt->stopping, memory_order_relaxed))
        return NULL;
      loom__p *v = rt->allp[(start + (uint32_t)j) % (uint32_t)rt->nprocs];
      if (v == p)
        continue;
      if (last) {
        /* Run the victim's due timers; what they ready lands on our P. */
        int64_t next = loom__timers_next(&v->timers);
        if (next != 0 && next <= loom_now()) {
          loom__timers_run(&v->timers, loom_now());
          loom__g *g = loom__runq_get(p);
          if (g != NULL)
            return g;
        }
      }
      if (!loom__runq_empty(v)) {
        loom__g *g =
            loom__runq_steal(p, v, last ? LOOM__STEAL_NEXT : LOOM__STEAL_RING);
        if (g != NULL) {
          atomic_fetch_add_explicit(&rt->steals, 1, memory_order_relaxed);
          return g;
        }
      }
    }
  }
  return NULL;
}

int64_t loom__earliest_timer(loom__rt *rt) {
  int64_t best = loom__timers_next(&rt->nop_timers);
  for (int i = 0; i < rt->nprocs; i++) {
    int64_t w = loom__timers_next(&rt->allp[i]->timers);
    if (w != 0 && (best == 0 || w < best))
      best = w;
  }
  return best;
}

/* Find a runnable G for m; blocks the M until there is one.  Returns NULL
 * when the runtime stops.  On return with a G, m holds a P. */
/* Long, on purpose: it follows Go's findrunnable step by step, and the
 * order of the steps is the algorithm. */
static loom__g *findrunnable(loom__m *m) { // NOLINT(readability-function-cognitive-complexity)
  loom__rt *rt = m->rt;
top:
  if (atomic_load(&rt->stopping))
    return NULL;
  if (m->p == NULL) {
    stopm(m);
    goto top;
  }
  loom__p *p = m->p;
  run_due_timers(p);
  loom__g *g;
  bool tick61 =
      atomic_load_explicit(&p->schedtick, memory_order_relaxed) % 61 == 0;
  if (tick61 && atomic_load(&rt->runqsize) != 0) {
    pthread_mutex_lock(&rt->lock);
    g = loom__globrunq_get(rt, p, 1);
    pthread_mutex_unlock(&rt->lock);
    if (g != NULL)
      return g;
  }
  if (tick61 && rt->nprocs > 1 && (g = steal_stalled(m, p)) != NULL)
    return g;
  g = loom__runq_get(p);
  if (g != NULL)
    return g;
  if (atomic_load(&rt->runqsize) != 0) {
    pthread_mutex_lock(&rt->lock);
    g = loom__globrunq_get(rt, p, 0);
    pthread_mutex_unlock(&rt->lock);
    if (g != NULL)
      return g;
  }
  /* Non-blocking poll, if there is anything to poll for. */
  if (atomic_load(&rt->netpoll_waiters) != 0 &&
      atomic_load(&rt->lastpoll) != 0) {
    loom__g *gs[LOOM__NETPOLL_MAX];
    int n = loom__netpoll_poll(&rt->np, 0, gs);
    if (n > 0)
      return take_polled(rt, gs, n);
  }
  /* Steal, if spinning is allowed. */
  int busy = rt->nprocs - atomic_load(&rt->npidle);
  if (m->spinning || 2 * atomic_load(&rt->nmspinning) < busy) {
    if (!m->spinning) {
      m->spinning = true;
      atomic_fetch_add(&rt->nmspinning, 1);
    }
    g = steal_work(m);
    if (g != NULL)
      return g;
  }

  /* Nothing: give the P back. */
  pthread_mutex_lock(&rt->lock);
  if (atomic_load(&rt->stopping)) {
    pthread_mutex_unlock(&rt->lock);
    return NULL;
  }
  if (atomic_load(&rt->runqsize) != 0) {
    g = loom__globrunq_get(rt, p, 0);
    pthread_mutex_unlock(&rt->lock);
    return g;
  }
  releasep(m);
  pidleput(rt, p);
  pthread_mutex_unlock(&rt->lock);

  if (m->spinning) {
    m->spinning = false;
    if (atomic_fetch_sub(&rt->nmspinning, 1) <= 0)
      loom__throw("findrunnable: negative nmspinning");
    /* Re-check everything now that we no longer count as spinning: a
     * producer that saw us spinning did not wake anyone. */
    for (int i = 0; i < rt->nprocs; i++) {
      if (!loom__runq_empty(rt->allp[i]) || atomic_load(&rt->runqsize)) {
        pthread_mutex_lock(&rt->lock);
        loom__p *p2 = loom__pidleget(rt);
        pthread_mutex_unlock(&rt->lock);
        if (p2 != NULL) {
          loom__acquirep(m, p2);
          m->spinning = true;
          atomic_fetch_add(&rt->nmspinning, 1);
          goto top;
        }
        break;
      }
    }
  }

  /* Sleep.  One M blocks in the poller until the earliest timer. */
  int64_t until = loom__earliest_timer(rt);
  if ((atomic_load(&rt->netpoll_waiters) != 0 || until != 0) &&
      atomic_exchange(&rt->lastpoll, 0) != 0) {
    atomic_store(&rt->polluntil, until);
    int64_t delay = -1;
    if (until != 0) {
      delay = until - loom_now();
      if (delay < 0)
        delay = 0;
    }
    loom__g *gs[LOOM__NETPOLL_MAX];
    int n = loom__netpoll_poll(&rt->np, delay, gs);
    atomic_store(&rt->polluntil, 0);
    atomic_store(&rt->lastpoll, loom_now());
    atomic_fetch_add_explicit(&rt->netpoll_wakeups, 1, memory_order_relaxed);
    pthread_mutex_lock(&rt->lock);
    loom__p *p2 = loom__pidleget(rt);
    pthread_mutex_unlock(&rt->lock);
    if (p2 == NULL) {
      loom__inject(rt, gs, n);
    } else {
      loom__acquirep(m, p2);
      if (n > 0)
        return take_polled(rt, gs, n);
      /* Look again with the P: timers may be due (ours or a victim's). */
      goto top;
    }
  } else if (until != 0) {
    int64_t pu = atomic_load(&rt->polluntil);
    if (pu == 0 || pu > until)
      loom__netpoll_break(&rt->np);
  }
  stopm(m);
  goto top;
}

/* The scheduler loop; runs on g0.  Returns when the runtime stops. */
static void schedule(loom__m *m) {
  for (;;) {
    if (atomic_load(&m->rt->stopping))
      return;
    loom__g *g = NULL;
    if (m->lockedg != NULL) {
      stoplockedm(m);
      if (atomic_load(&m->rt->stopping))
        return;
      g = m->lockedg;
    } else if (m->handoff != NULL) {
      g = m->handoff;
      m->handoff = NULL;
    } else {
      g = findrunnable(m);
      if (g == NULL)
        return;
      if (m->spinning)
        resetspinning(m);
    }
    if (g->lockedm != NULL && g->lockedm != m) {
      startlockedm(m, g);
      continue;
    }
    atomic_store_explicit(&g->status, G_RUNNING, memory_order_relaxed);
    tick(m->p);
    gswitch(m, &m->g0, g, false);
  }
}

/* ---- the coroutine's life ------------------------------------------ */

static void begin_shutdown(loom__rt *rt);

/* +1 on a P's own counter (only its owner writes it: a plain add, no
 * lock prefix), or on the shared one when there is no P. */
static void count_one(_Atomic uint64_t *mine, _Atomic uint64_t *shared) {
  if (mine != NULL)
    atomic_store_explicit(
        mine, atomic_load_explicit(mine, memory_order_relaxed) + 1,
        memory_order_relaxed);
  else
    atomic_fetch_add_explicit(shared, 1, memory_order_relaxed);
}

uint64_t loom__spawned(loom__rt *rt) {
  uint64_t n = atomic_load_explicit(&rt->nspawned_nop, memory_order_relaxed);
  for (int i = 0; i < rt->nprocs; i++)
    n += atomic_load_explicit(&rt->allp[i]->nspawned, memory_order_relaxed);
  return n;
}

uint64_t loom__gcount(loom__rt *rt) {
  uint64_t out =
      atomic_load_explicit(&rt->nexited_nop, memory_order_relaxed);
  for (int i = 0; i < rt->nprocs; i++)
    out += atomic_load_explicit(&rt->allp[i]->nexited, memory_order_relaxed);
  uint64_t in = loom__spawned(rt); /* after the exits: never below them */
  return in > out ? in - out : 0;
}

LOOM_NORETURN static void g_exit(loom__g *g) {
  /* Returned inside loom_block_enter: leave the section (the M has no P
   * there), as a return while pinned unpins. */
  if (loom__getm()->in_block)
    loom_block_exit();
  if (g->locals != NULL) {
    loom__locals_destroy(g, true);
    /* A destructor may have entered one and returned: the dead G goes
     * back to a P's cache, so its M needs the P again. */
    if (loom__getm()->in_block)
      loom_block_exit();
  }
  loom__m *m = loom__getm();
  loom__rt *rt = m->rt;
  if (g->lockcount != 0) {
    g->lockcount = 0;
    g->lockedm = NULL;
    m->lockedg = NULL;
  }
  count_one(m->p != NULL ? &m->p->nexited : NULL, &rt->nexited_nop);
  if (g->is_main)
    begin_shutdown(rt);
  m->post_fn = post_exit;
  m->post_g = g;
  switch_out(m, g, true);
  loom__throw("g_exit: dead coroutine resumed");
}

static void g_entry(void *arg) {
  loom__g *g = arg;
  after_switch(g);
  g->fn(g->arg);
  g_exit(g);
}

static uint64_t new_goid(loom__rt *rt, loom__p *p) {
  if (p == NULL)
    return atomic_fetch_add(&rt->goidgen, 1) + 1;
  if (p->goid_next == p->goid_end) {
    p->goid_next = atomic_fetch_add(&rt->goidgen, 16) + 1;
    p->goid_end = p->goid_next + 16;
  }
  return p->goid_next++;
}

static int spawn(loom__rt *rt, loom__m *m, void (*fn)(void *), void *arg,
                 size_t stack_size, const void *pc, bool is_main) {
  loom__p *p = m != NULL ? m->p : NULL;
  loom__g *g = g_alloc(rt, p, stack_size);
  if (g == NULL)
    return -ENOMEM;
  g->id = is_main ? 1 : new_goid(rt, p); /* 1 is kept for it: loom_run */
  g->spawn_pc = pc;
  g->fn = fn;
  g->arg = arg;
  g->err = 0;
  g->io_streak = 0;
  g->lockedm = NULL;
  g->lockcount = 0;
  g->locals = NULL;
  g->asan_fake = NULL;
  g->wait_reason = NULL;
  g->cb_tag = NULL;
  g->pool_tag = NULL;
  g->park_hook = NULL;
  g->undo = NULL;
  g->wait_undo = NULL;
  loom__ctx_make(&g->ctx, (char *)g, g_entry, g);
  atomic_store_explicit(&g->status, G_RUNNABLE, memory_order_relaxed);
  count_one(p != NULL ? &p->nspawned : NULL, &rt->nspawned_nop);
  g->is_main = is_main; /* before the G is visible to any other M */
  if (p != NULL) {
    loom__runq_put(rt, p, g, true);
  } else {
    pthread_mutex_lock(&rt->lock);
    loom__globrunq_put(rt, g);
    pthread_mutex_unlock(&rt->lock);
  }
  loom__wakep(rt);
  return 0;
}

static int go_impl(void (*fn)(void *), void *arg, size_t stack_size,
                   const void *pc) {
  if (fn == NULL)
    return -EINVAL;
  if (stack_size != 0 && stack_size < MIN_STACK)
    return -EINVAL;
  loom__m *m = loom__getm();
  if (m != NULL) {
    if (atomic_load_explicit(&m->rt->stopping, memory_order_relaxed))
      return LOOM_ENORUNTIME;
    return spawn(m->rt, m, fn, arg, stack_size, pc, false);
  }
  /* A foreign thread: hold rt_mu so the runtime cannot be torn down
   * under us. */
  pthread_mutex_lock(&rt_mu);
  loom__rt *rt = live_rt();
  int err = LOOM_ENORUNTIME;
  if (rt != NULL)
    err = spawn(rt, NULL, fn, arg, stack_size, pc, false);
  pthread_mutex_unlock(&rt_mu);
  return err;
}

int loom_go(void (*fn)(void *), void *arg) {
  return go_impl(fn, arg, 0, __builtin_return_address(0));
}

int loom_go_with(void (*fn)(void *), void *arg, const loom_go_opts *opts) {
  return go_impl(fn, arg, opts ? opts->stack_size : 0,
                 __builtin_return_address(0));
}

void loom_yield(void) {
  loom__m *m = loom__getm();
  if (m == NULL || m->curg == NULL || m->curg->is_g0 || m->p == NULL) {
    sched_yield();
    return;
  }
  loom__g *g = m->curg;
  /* Coroutines wait on the global queue (spawned or readied by a plain
   * thread, back from a blocking call with no P, a full ring's overflow):
   * the caller goes behind them there, as Go's Gosched does.  Back on
   * its own ring it would be found first, for 60 more switches until
   * the global queue's turn (fast_next). */
  if (atomic_load_explicit(&m->rt->runqsize, memory_order_relaxed) != 0)
    m->post_fn = post_yield_global;
  else
    m->post_fn = post_yield;
  m->post_g = g;
  m->post_arg = NULL;
  switch_out(m, g, false);
}

void loom__io_progress(void) {
  loom__g *g = loom__getg();
  if (g != NULL && ++g->io_streak >= LOOM_IO_STREAK) {
    g->io_streak = 0;
    loom_yield();
  }
}

static void sleep_fire(loom__timer *t, void *arg) {
  (void)t;
  loom__ready(arg);
}

static bool sleep_commit(loom__g *g, void *arg) {
  loom__m *m = loom__getm();
  int64_t when = *(int64_t *)arg;
  loom__timer_add(&m->p->timers, &g->timer, when);
  loom__wake_netpoller(m->rt, when);
  return true;
}

#define SLEEP_SLICE_NS 1000000 /* see loom_sleep_until */

static void thread_sleep_until(int64_t deadline) {
  int64_t now = loom_now();
  int64_t left = deadline > now ? deadline - now : 0;
  if (left > 0) {
    struct timespec ts = {left / 1000000000, left % 1000000000};
    while (nanosleep(&ts, &ts) != 0 && loom__errno() == EINTR)
      ;
  }
}

int loom_sleep_until(int64_t deadline) {
  loom__m *m = loom__getm();
  if (m == NULL || m->curg == NULL || m->curg->is_g0 || m->p == NULL) {
    thread_sleep_until(deadline);
    return 0;
  }
  if (deadline <= loom_now()) {
    loom_yield();
    return 0;
  }
  while (loom__timers_reserve(&m->p->timers, 1) != 0) {
    /* No memory for the timer: sleep the thread instead, as a blocking
     * call, so that the P goes on with its other coroutines if another
     * thread can take it; in slices with a yield between them, so that
     * they run anyway when none can (no memory for one either). */
    int64_t now = loom_now();
    if (now >= deadline)
      return 0;
    loom_block_enter();
    thread_sleep_until(deadline - now > SLEEP_SLICE_NS ? now + SLEEP_SLICE_NS
                                                       : deadline);
    loom_block_exit();
    loom_yield();
    m = loom__getm();
  }
  loom__g *g = m->curg;
  g->timer.fn = sleep_fire;
  g->timer.arg = g;
  loom__park(sleep_commit, &deadline, "sleep");
  return 0;
}

int loom_sleep(int64_t ns) {
  if (ns <= 0) {
    loom_yield();
    return 0;
  }
  return loom_sleep_until(loom__after(ns));
}

uint64_t loom_id(void) {
  loom__g *g = loom__getg();
  return g ? g->id : 0;
}

int loom_procs(void) {
  loom__m *m = loom__getm();
  if (m != NULL)
    return m->rt->nprocs;
  pthread_mutex_lock(&rt_mu);
  loom__rt *rt = atomic_load(&current_rt);
  int n = rt ? rt->nprocs : 0;
  pthread_mutex_unlock(&rt_mu);
  return n;
}

int loom_pin(void) {
  loom__m *m = loom__getm();
  loom__g *g = loom__getg();
  if (g == NULL)
    return LOOM_ENOTCO;
  g->lockcount++;
  g->lockedm = m;
  m->lockedg = g;
  return 0;
}

void loom_unpin(void) {
  loom__m *m = loom__getm();
  loom__g *g = loom__getg();
  if (g == NULL || g->lockcount == 0)
    return;
  if (--g->lockcount == 0) {
    g->lockedm = NULL;
    m->lockedg = NULL;
  }
}

/* ---- stack overflow report ----------------------------------------- */

const char *loom__symbolize(const void *pc, char *buf, size_t len) {
  Dl_info di;
  if (pc != NULL && dladdr(pc, &di) != 0 && di.dli_sname != NULL) {
    snprintf(buf, len, "%s+0x%lx", di.dli_sname,
             (unsigned long)((uintptr_t)pc - (uintptr_t)di.dli_saddr));
  } else if (pc != NULL && dladdr(pc, &di) != 0 && di.dli_fname != NULL) {
    /* No exported name (a static function, no -rdynamic): give the
     * object and offset, which addr2line understands. */
    const char *base = strrchr(di.dli_fname, '/');
    snprintf(buf, len, "%s+0x%lx", base ? base + 1 : di.dli_fname,
             (unsigned long)((uintptr_t)pc - (uintptr_t)di.dli_fbase));
  } else {
    snprintf(buf, len, "%p", pc);
  }
  return buf;
}

static void overflow_report(loom__m *m, loom__g *g, const void *addr) {
  char buf[512], where[160];
  int n = snprintf(buf, sizeof buf,
                   "loom: fatal: stack overflow in coroutine %llu "
                   "(stack %zu KiB, fault at %p, spawned at %s)\n",
                   (unsigned long long)g->id, g->stk.size >> 10, addr,
                   loom__symbolize(g->spawn_pc, where, sizeof where));
  if (n > 0)
    (void)!write(2, buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf);
  (void)m;
}

/* Reset `sig` to its default action with the raw system call: a
 * sanitizer's signal() interceptor may take a lock the faulting thread
 * already holds (the overflow can happen inside the sanitizer). */
static void default_action(int sig) {
  struct {
    void *handler;
    unsigned long flags;
    void *restorer;
    uint64_t mask;
  } ksa = {SIG_DFL, 0, NULL, 0};
  syscall(SYS_rt_sigaction, sig, &ksa, NULL, sizeof ksa.mask);
}

static void chain(struct sigaction *old, int sig, siginfo_t *si, void *uc) {
  if (old->sa_flags & SA_SIGINFO) {
    if (old->sa_sigaction != NULL) {
      old->sa_sigaction(sig, si, uc);
      return;
    }
  } else if (old->sa_handler != SIG_DFL && old->sa_handler != SIG_IGN) {
    old->sa_handler(sig);
    return;
  }
  /* Default action: reinstall it and let the fault happen again. */
  default_action(sig);
}

static void fault_handler(int sig, siginfo_t *si, void *uc) {
  loom__m *m = loom__getm();
  if (m != NULL && m->curg != NULL && !m->curg->is_g0 &&
      loom__stack_guard_hit(&m->rt->stacks, &m->curg->stk, si->si_addr)) {
    overflow_report(m, m->curg, si->si_addr);
    default_action(SIGSEGV);
    default_action(SIGBUS);
    return; /* the fault repeats and kills the process */
  }
  chain(sig == SIGSEGV ? &old_segv : &old_bus, sig, si, uc);
}

static void install_fault_handler(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = fault_handler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &old_segv);
  sigaction(SIGBUS, &sa, &old_bus);
}

static void restore_fault_handler(void) {
  sigaction(SIGSEGV, &old_segv, NULL);
  sigaction(SIGBUS, &old_bus, NULL);
}

/* ---- Ms: thread setup --------------------------------------------- */

static void m_thread_init(loom__m *m) {
  set_tls_m(m);
  m->errno_addr = &errno;
  pthread_attr_t attr;
  void *lo = NULL;
  size_t size = 0;
  if (pthread_getattr_np(pthread_self(), &attr) == 0) {
    pthread_attr_getstack(&attr, &lo, &size);
    pthread_attr_destroy(&attr);
  }
  m->g0.stk.base = lo;
  m->g0.stk.size = size;
  clockid_t cid;
  m->cpuclock = pthread_getcpuclockid(pthread_self(), &cid) == 0
                    ? (int)cid
                    : (int)CLOCK_MONOTONIC;
#ifdef LOOM_TSAN
  m->g0.tsan_fiber = __tsan_get_current_fiber();
#endif
  m->sigstack = mmap(NULL, SIGSTACK_SIZE, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m->sigstack != MAP_FAILED) {
    stack_t ss = {.ss_sp = m->sigstack, .ss_size = SIGSTACK_SIZE};
    if (sigaltstack(&ss, &m->old_sigstack) != 0)
      m->old_sigstack.ss_flags = SS_DISABLE;
    m->sigstack_size = SIGSTACK_SIZE;
  } else {
    m->sigstack = NULL;
  }
}

static void m_thread_fini(loom__m *m) {
  if (m->sigstack != NULL) {
    /* The thread's own again: m0 is the caller's thread, which may have
     * had one (a disabled one is "none", as it was). */
    stack_t ss = m->old_sigstack;
    ss.ss_flags &= ~SS_ONSTACK; /* a state, not a flag to set */
    if (ss.ss_flags & SS_DISABLE)
      ss = (stack_t){.ss_flags = SS_DISABLE};
    sigaltstack(&ss, NULL);
    munmap(m->sigstack, m->sigstack_size);
    m->sigstack = NULL;
  }
  set_tls_m(NULL);
}

static void *m_main(void *arg) {
  loom__m *m = arg;
  m_thread_init(m);
  if (m->nextp != NULL) {
    loom__acquirep(m, m->nextp);
    m->nextp = NULL;
  }
  schedule(m);
  /* Stopping: a P we hold stays with us; teardown frees them all. */
  m_thread_fini(m);
  return NULL;
}

/* ---- starting and stopping the runtime ---------------------------- */

/* A decimal number with an optional k/m suffix (when `suffix`), nothing
 * else; false for junk, a sign, or overflow. */
static bool parse_num(const char *s, bool suffix, unsigned long long *out) {
  unsigned long long v = 0;
  const char *p = s;
  if (*p < '0' || *p > '9')
    return false;
  for (; *p >= '0' && *p <= '9'; p++) {
    if (v > (ULLONG_MAX - 9) / 10)
      return false;
    v = v * 10 + (unsigned)(*p - '0');
  }
  int shift = 0;
  if (suffix && (*p == 'k' || *p == 'K'))
    shift = 10, p++;
  else if (suffix && (*p == 'm' || *p == 'M'))
    shift = 20, p++;
  if (*p != '\0' || v > (ULLONG_MAX >> shift))
    return false;
  *out = v << shift;
  return true;
}

void loom_config_init(loom_config *cfg) {
  memset(cfg, 0, sizeof *cfg);
  cpu_set_t set;
  cfg->procs = 1;
  if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0)
    cfg->procs = CPU_COUNT(&set);
  cfg->stack_size = DEFAULT_STACK;
  cfg->long_run_warn_ns = 10 * INT64_C(1000000);
  const char *e;
  unsigned long long v;
  /* getenv races only with setenv in another thread, which a program
   * does not do while it configures its runtime. */
  /* Unparseable values are ignored (the default stays); parseable but
   * out-of-range ones are kept, and loom_run refuses them (-EINVAL). */
  if ((e = getenv("LOOM_PROCS")) /* NOLINT(concurrency-mt-unsafe) */ != NULL && parse_num(e, false, &v) && v > 0)
    cfg->procs = v > INT_MAX ? INT_MAX : (int)v;
  if ((e = getenv("LOOM_STACK_SIZE")) /* NOLINT(concurrency-mt-unsafe) */ != NULL && parse_num(e, true, &v) &&
      v > 0)
    cfg->stack_size = v > SIZE_MAX ? SIZE_MAX : (size_t)v;
  if ((e = getenv("LOOM_SCHEDTRACE")) /* NOLINT(concurrency-mt-unsafe) */ != NULL &&
      parse_num(e, false, &v) && v > 0)
    cfg->schedtrace_ms = v > INT_MAX ? INT_MAX : (int)v;
}

static void begin_shutdown(loom__rt *rt) {
  atomic_store(&rt->stopping, true);
  pthread_mutex_lock(&rt->lock);
  for (loom__m *m = rt->allm; m != NULL; m = m->alllink)
    loom__note_wakeup(&m->park);
  pthread_mutex_unlock(&rt->lock);
  loom__netpoll_break(&rt->np);
  loom__sysmon_wake(rt);
}

/* Join an M that has been told to stop.  It may be about to block in
 * the poller with no timeout, after another poll drained the break that
 * begin_shutdown sent (the eventfd's event comes once): break again
 * until it has gone. */
static void join_m(loom__rt *rt, pthread_t th) {
  for (;;) {
    loom__netpoll_break(&rt->np);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += 10000000;
    if (ts.tv_nsec >= 1000000000) {
      ts.tv_sec++;
      ts.tv_nsec -= 1000000000;
    }
    if (pthread_timedjoin_np(th, NULL, &ts) != ETIMEDOUT)
      return;
  }
}

static void destroy_g(loom__rt *rt, loom__g *g) {
  if (g->locals != NULL)
    loom__locals_destroy(g, false);
  unpoison_dead_frames(g);
#ifdef LOOM_TSAN
  if (g->tsan_fiber != NULL)
    __tsan_destroy_fiber(g->tsan_fiber);
#endif
  (void)rt;
}

/* Every timer heap of the runtime closed (loom__timers_close): under
 * rt_mu, with every M gone.  A plain thread stops a context's timer
 * under it too (loom__timer_stop_any: a context may outlive the runtime
 * and be released as it ends), so it either stops one still in its heap
 * or finds it out of any — never touching a heap as it is taken apart,
 * or after it is freed.  A connection's deadline timers are stopped
 * without it (from loom__pd_set_deadlines or a cancel's expire, where
 * rt_mu may be held already, by loom__arm_begin): a connection does
 * not outlive its runtime, whose end frees its poll descriptor.  The
 * done hooks run later, in rt_undo, without rt_mu: one may free a
 * context, which takes its parent's lock, and a plain thread that holds
 * that lock to cancel the parent may be waiting for rt_mu to wake a
 * coroutine. */
static void timers_close(loom__rt *rt) {
  for (int i = 0; i < rt->nprocs; i++)
    loom__timers_close(&rt->allp[i]->timers);
  loom__timers_close(&rt->nop_timers);
}

bool loom__timer_stop_any(loom__timer *t) {
  if (loom__getm() != NULL)
    return loom__timer_stop(t); /* an M's runtime outlives its threads */
  pthread_mutex_lock(&rt_mu);
  bool stopped = loom__timer_stop(t);
  pthread_mutex_unlock(&rt_mu);
  return stopped;
}

/* An abandoned G's undo records (loom__undo), then its runtime state. */
static void undo_destroy_g(loom__rt *rt, loom__g *g) {
  uint32_t st = atomic_load(&g->status);
  if (st == G_WAITING || st == G_RUNNABLE) {
    loom__undo *u;
    while ((u = g->undo) != NULL) {
      g->undo = u->next;
      u->fn(u, g);
    }
    if ((u = g->wait_undo) != NULL) {
      g->wait_undo = NULL;
      u->fn(u, g);
    }
  }
  destroy_g(rt, g);
}

/* The runtime's end, while it is still current (stopping): plain threads
 * leave it alone (ready_foreign, loom__arm_begin, loom__rt_get), and no
 * other loom_run starts.  So a plain thread's wake-up of a G whose wait
 * is being undone readies it nowhere, as it would have once the runtime
 * was gone. */
static void rt_undo(loom__rt *rt) {
  /* Timers first (closed already: timers_close): pending ones live in
   * Gs, which the stacks hold. */
  for (int i = 0; i < rt->nprocs; i++)
    loom__timers_destroy(&rt->allp[i]->timers);
  loom__timers_destroy(&rt->nop_timers);
  /* Every G that ever had a slot, alive or cached, in one pass; no stack
   * goes before it is over: an undo may touch an object on another G's
   * stack (and a socket, which goes last). */
  loom__stacks *s = &rt->stacks;
  for (loom__arena *a = s->arenas; a != NULL; a = a->next) {
    uint32_t n = atomic_load(&a->ncarved);
    for (uint32_t i = 0; i < n; i++) {
      uintptr_t top = (uintptr_t)(a->base + (size_t)(i + 1) * s->slot_size);
      undo_destroy_g(rt, (loom__g *)((top - sizeof(loom__g)) & ~(uintptr_t)63));
    }
  }
  for (loom__g *g = s->custom; g != NULL; g = g->alllink)
    undo_destroy_g(rt, g);
}

/* Everything else, once the runtime is no longer current. */
static void rt_free(loom__rt *rt) {
  loom__stacks *s = &rt->stacks;
  while (s->custom != NULL) {
    loom__g *g = s->custom;
    s->custom = g->alllink;
    loom__stack st = g->stk;
    loom__stack_unmap(&st); /* g with it */
  }
  loom__stacks_destroy(s);
  for (int i = 0; i < rt->nprocs; i++) {
    loom__free(rt->allp[i]);
  }
  loom__free(rt->allp);
  loom__free(rt->gq);
  loom__m *m = rt->allm;
  while (m != NULL) {
    loom__m *next = m->alllink;
    loom__free(m);
    m = next;
  }
  /* Sockets whose coroutines were abandoned: close and free them. */
  while (rt->objs != NULL) {
    loom__rtobj *o = rt->objs;
    rt->objs = o->next;
    o->abandon(o);
  }
  pthread_mutex_destroy(&rt->objs_lock);
  pthread_mutex_destroy(&rt->nop_timers_mu);
  loom__wrec_destroy(rt); /* abandoned waits' too: rt_undo dequeued them */
  pthread_mutex_destroy(&rt->wrec_mu);
  loom__pd_pool_destroy(rt);
  loom__netpoll_close(&rt->np);
  pthread_mutex_destroy(&rt->pd_lock);
  pthread_mutex_destroy(&rt->lock);
  loom__free(rt);
}

int loom_run(void (*main_fn)(void *), void *arg, const loom_config *cfg) {
  if (main_fn == NULL)
    return -EINVAL;
  if (loom__getm() != NULL)
    return LOOM_ERUNNING;
  loom_config c;
  if (cfg != NULL) {
    c = *cfg;
    loom_config d;
    loom_config_init(&d);
    if (c.procs == 0)
      c.procs = d.procs;
    if (c.stack_size == 0)
      c.stack_size = d.stack_size;
    if (c.long_run_warn_ns == 0)
      c.long_run_warn_ns = d.long_run_warn_ns;
  } else {
    loom_config_init(&c);
  }
  if (c.procs < 1 || c.procs > 1024 || c.stack_size < MIN_STACK ||
      c.stack_size > ((size_t)1 << 30) || c.schedtrace_ms < 0)
    return -EINVAL;
  if (c.log == NULL)
    c.log = default_log;

  pthread_mutex_lock(&rt_mu);
  if (atomic_load(&current_rt) != NULL) {
    pthread_mutex_unlock(&rt_mu);
    return LOOM_ERUNNING;
  }
  int err = -ENOMEM;
  loom__rt *rt = loom__calloc(1, sizeof *rt);
  if (rt == NULL)
    goto fail_unlock;
  rt->cfg = c;
  rt->nprocs = c.procs;
  loom__mutex_init(&rt->lock);
  loom__mutex_init(&rt->pd_lock);
  loom__mutex_init(&rt->wrec_mu);
  loom__mutex_init(&rt->objs_lock);
  loom__mutex_init(&rt->nop_timers_mu);
  loom__timers_init(&rt->nop_timers);
  rt->start_time = loom_now();
  atomic_store(&rt->lastpoll, rt->start_time);
  err = loom__stacks_init(&rt->stacks, c.stack_size);
  if (err != 0)
    goto fail_rt;
  err = loom__netpoll_init(&rt->np);
  if (err != 0)
    goto fail_stacks;
  err = -ENOMEM;
  if (loom__globrunq_init(rt) != 0)
    goto fail_np;
  rt->allp = loom__calloc((size_t)rt->nprocs, sizeof *rt->allp);
  if (rt->allp == NULL)
    goto fail_np;
  for (int i = 0; i < rt->nprocs; i++) {
    loom__p *p = loom__calloc(
        1, sizeof *p + (size_t)rt->nprocs * sizeof p->watch[0]);
    if (p == NULL)
      goto fail_ps;
    p->id = i;
    p->rt = rt;
    p->sole = rt->nprocs == 1;
    atomic_init(&p->timer_mask, 7); /* every 8th switch (fast_next) */
    loom__timers_init(&p->timers);
    rt->allp[i] = p;
  }
  loom__m *m0 = loom__calloc(1, sizeof *m0);
  if (m0 == NULL)
    goto fail_ps;
  m0->rt = rt;
  m0->id = atomic_fetch_add(&rt->mnext, 1) + 1;
  m0->fastrand = 0x9E3779B9u | 1;
  m0->is_m0 = true;
  m0->g0.is_g0 = true;
  m0->thread = pthread_self();
  rt->allm = m0;
  rt->mcount = 1;
  atomic_store(&rt->mcount_pub, 1);
  for (int i = rt->nprocs - 1; i >= 1; i--)
    pidleput(rt, rt->allp[i]);
  /* Id 1 is the main coroutine's (runtime.h), which is spawned only
   * after plain threads can spawn theirs. */
  atomic_store(&rt->goidgen, 1);
  atomic_store(&current_rt, rt);
  pthread_mutex_unlock(&rt_mu);

  m_thread_init(m0);
  loom__acquirep(m0, rt->allp[0]);
  install_fault_handler();
  err = spawn(rt, m0, main_fn, arg, 0, __builtin_return_address(0), true);
  if (err == 0)
    err = loom__sysmon_start(rt);
  if (err != 0) {
    begin_shutdown(rt);
  } else {
    schedule(m0);
  }

  /* Stopping.  Join every other M (one inside a block section finishes
   * its call first), then the monitor. */
  begin_shutdown(rt);
  for (;;) {
    pthread_mutex_lock(&rt->lock);
    loom__m *victim = NULL;
    for (loom__m *m = rt->allm; m != NULL; m = m->alllink)
      if (m != m0 && m->thread != 0) {
        victim = m;
        break;
      }
    pthread_t th = victim ? victim->thread : 0;
    if (victim != NULL) {
      victim->thread = 0;
      loom__note_wakeup(&victim->park);
    }
    pthread_mutex_unlock(&rt->lock);
    if (victim == NULL)
      break;
    join_m(rt, th);
  }
  loom__sysmon_stop(rt);
  restore_fault_handler();
  m_thread_fini(m0);

  pthread_mutex_lock(&rt_mu);
  timers_close(rt);
  pthread_mutex_unlock(&rt_mu);
  rt_undo(rt);
  pthread_mutex_lock(&rt_mu);
  atomic_store(&current_rt, NULL);
  pthread_mutex_unlock(&rt_mu);
  rt_free(rt);
  return err;

fail_ps:
  for (int i = 0; i < rt->nprocs; i++)
    loom__free(rt->allp[i]);
  loom__free(rt->allp);
fail_np:
  loom__free(rt->gq);
  loom__netpoll_close(&rt->np);
fail_stacks:
  loom__stacks_destroy(&rt->stacks);
fail_rt:
  pthread_mutex_destroy(&rt->nop_timers_mu);
  pthread_mutex_destroy(&rt->objs_lock);
  pthread_mutex_destroy(&rt->wrec_mu);
  pthread_mutex_destroy(&rt->pd_lock);
  pthread_mutex_destroy(&rt->lock);
  loom__free(rt);
fail_unlock:
  pthread_mutex_unlock(&rt_mu);
  return err;
}

void loom__rt_track(loom__rt *rt, loom__rtobj *o) {
  pthread_mutex_lock(&rt->objs_lock);
  o->prev = NULL;
  o->next = rt->objs;
  if (o->next != NULL)
    o->next->prev = o;
  rt->objs = o;
  pthread_mutex_unlock(&rt->objs_lock);
}

void loom__rt_untrack(loom__rt *rt, loom__rtobj *o) {
  pthread_mutex_lock(&rt->objs_lock);
  if (o->prev != NULL)
    o->prev->next = o->next;
  else
    rt->objs = o->next;
  if (o->next != NULL)
    o->next->prev = o->prev;
  pthread_mutex_unlock(&rt->objs_lock);
}

/* ---- statistics and test hooks ------------------------------------- */

static void stats_fill(loom__rt *rt, loom_stats *out) {
  memset(out, 0, sizeof *out);
  out->procs = rt->nprocs;
  out->idle_procs = atomic_load(&rt->npidle);
  out->threads = atomic_load(&rt->mcount_pub);
  out->idle_threads = atomic_load(&rt->nmidle_pub);
  out->spinning_threads = atomic_load(&rt->nmspinning);
  out->global_runq = atomic_load(&rt->runqsize);
  out->coroutines = loom__gcount(rt);
  out->spawned = loom__spawned(rt);
  out->steals = atomic_load(&rt->steals);
  out->netpoll_wakeups = atomic_load(&rt->netpoll_wakeups);
}

int loom_stats_get(loom_stats *out) {
  if (out == NULL)
    return -EINVAL;
  loom__m *m = loom__getm();
  if (m != NULL) {
    stats_fill(m->rt, out);
    return 0;
  }
  pthread_mutex_lock(&rt_mu);
  loom__rt *rt = atomic_load(&current_rt);
  if (rt != NULL)
    stats_fill(rt, out);
  pthread_mutex_unlock(&rt_mu);
  return rt != NULL ? 0 : LOOM_ENORUNTIME;
}

int loom__test_proc_id(void) {
  loom__m *m = loom__getm();
  if (m == NULL || m->p == NULL || loom__getg() == NULL)
    return -1;
  return m->p->id;
}

uint64_t loom__test_thread_id(void) {
  loom__m *m = loom__getm();
  return m ? m->id : 0;
}

int loom__test_stack_guard_pages(void) {
  loom__rt *rt = loom__rt_get();
  return rt != NULL && rt->stacks.guard_pages;
}

int loom__test_lose_wakeps(int n) {
  return atomic_exchange(&lose_wakeps, n > 0 ? n : 0);
}

void (*loom__test_hold_foreign_ready(void (*fn)(void)))(void) {
  return atomic_exchange(&hold_foreign_ready, fn);
}

uint64_t loom__test_sysmon_rounds(void) {
  loom__rt *rt = loom__rt_get();
  return rt != NULL ? atomic_load(&rt->sysmon_rounds) : 0;
}
