/*
 * sysmon.c — the monitor thread (Go's sysmon).
 *
 * One thread, holding no P, that wakes every 20 µs while the runtime is
 * busy and backs off to 10 ms as it finds nothing to do.  Each round it:
 *   - retakes Ps whose M has been inside loom_block_enter/exit for a whole
 *     round (>= 20 µs) and hands them to other Ms (block.c);
 *   - warns, once per occurrence, about a coroutine that has run longer
 *     than cfg.long_run_warn_ns without a scheduling point: scheduling is
 *     cooperative, so such a coroutine starves its P's queue;
 *   - polls the network itself when nobody has for 10 ms (every P busy
 *     with coroutines that never run dry) and queues what became ready;
 *   - tells a running P that switches slowly to look at its timers on
 *     every switch (watch_timers);
 *   - starts an M when a timer is overdue and nobody is looking, or when
 *     work waits behind a coroutine that keeps its P while another P is
 *     idle and nobody is looking (a lost wake-up: stuck_behind);
 *   - prints the LOOM_SCHEDTRACE line when one is due;
 *   - gives back to the kernel the memory of free stacks beyond a small
 *     reserve.
 * When every P is idle it sleeps until woken (by a P leaving the idle
 * list or a coroutine entering a blocking call), so an idle runtime costs
 * no CPU at all.  Only a blocking call brings back the 20 µs rounds: a P
 * leaving the idle list needs nothing sooner than the 10 ms duties, and
 * a server that goes idle and busy thousands of times a second would
 * otherwise pay a wake-up of this thread, and 20 µs rounds, each time.
 * For the same reason any sleep longer than a round is announced, and a
 * coroutine entering a blocking call cuts it short.
 */
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>

#include "runtime/alloc.h"
#include "runtime/runtime.h"

#define RETAKE_NS 20000
#define MAX_DELAY_NS 10000000
#define TRIM_KEEP 256
#define TRIM_BATCH 16384
#define TRIM_PERIOD_NS 100000000

void loom__sysmon_wake(loom__rt *rt) { loom__note_wakeup(&rt->sysmon_note); }

static int64_t thread_cpu(loom__p *p) {
  struct timespec ts;
  clockid_t c = (clockid_t)atomic_load_explicit(&p->mclock,
                                                memory_order_relaxed);
  if (clock_gettime(c, &ts) != 0)
    return 0;
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Returns how many Ps it retook, and in *seen whether it saw a blocking
 * call for the first time (to be retaken a round from now: the caller
 * must not sleep longer).  `delay`: how long we slept. */
static int retake(loom__rt *rt, int64_t now, int64_t delay, bool *seen) {
  int n = 0;
  *seen = false;
  for (int i = 0; i < rt->nprocs; i++) {
    loom__p *p = rt->allp[i];
    uint32_t s = atomic_load_explicit(&p->status, memory_order_acquire);
    if (s == P_BLOCKED) {
      uint32_t t = atomic_load_explicit(&p->blocktick, memory_order_relaxed);
      if (p->sm_blocktick != t) {
        p->sm_blocktick = t;
        p->sm_blockwhen = now;
        *seen = true;
        continue;
      }
      if (now - p->sm_blockwhen < RETAKE_NS)
        continue;
      /* Nothing for the P to do and someone idle to pick up new work:
       * leave it, unless the call has lasted 10 ms. */
      if (loom__runq_empty(p) && loom__timers_next(&p->timers) == 0 &&
          atomic_load(&rt->nmspinning) + atomic_load(&rt->npidle) > 0 &&
          now - p->sm_blockwhen < 10000000)
        continue;
      uint32_t want = P_BLOCKED;
      if (atomic_compare_exchange_strong(&p->status, &want, P_IDLE)) {
        n++;
        loom__handoffp(rt, p);
      }
    } else if (s == P_RUNNING && rt->cfg.long_run_warn_ns > 0) {
      uint32_t t = atomic_load_explicit(&p->schedtick, memory_order_relaxed);
      int64_t limit = rt->cfg.long_run_warn_ns;
      if (p->sm_schedtick != t) {
        p->sm_schedtick = t;
        p->sm_schedwhen = now;
        p->sm_warned = false;
        /* Rounds this long would see the half-way point late, if at
         * all: note the thread's CPU time now (a syscall; at 20 µs
         * rounds it waits for the half-way point). */
        p->sm_cpu0 = delay >= limit / 4 ? thread_cpu(p) : -1;
        continue;
      }
      uint64_t id = atomic_load_explicit(&p->run_id, memory_order_relaxed);
      if (p->sm_warned || id == 0)
        continue;
      /* Half-way, note the thread's CPU time: a thread the kernel left
       * off the CPU (a loaded machine) is not a coroutine that hogs it. */
      if (p->sm_cpu0 < 0) {
        if (now - p->sm_schedwhen > limit / 2)
          p->sm_cpu0 = thread_cpu(p);
        continue;
      }
      if (now - p->sm_schedwhen <= limit)
        continue;
      if (thread_cpu(p) - p->sm_cpu0 >= limit / 4) {
        char buf[256];
        p->sm_warned = true;
        loom__log(rt,
                  "coroutine %llu has run %lld ms without a scheduling "
                  "point (spawned at %s); it holds its thread and "
                  "processor",
                  (unsigned long long)id,
                  (long long)((now - p->sm_schedwhen) / 1000000),
                  loom__symbolize(atomic_load_explicit(&p->run_pc,
                                                       memory_order_relaxed),
                                  buf, sizeof buf));
      }
    }
  }
  return n;
}

static void schedtrace(loom__rt *rt, int64_t now) {
  loom_stats st;
  char queues[512];
  size_t off = 0;
  int i = 0;
  for (; i < rt->nprocs && off + 32 < sizeof queues; i++)
    off += (size_t)snprintf(queues + off, sizeof queues - off, "%s%u",
                            i ? " " : "", loom__runq_len(rt->allp[i]));
  if (i < rt->nprocs) /* the line has a limit: say what it left out */
    snprintf(queues + off, sizeof queues - off, " +%d more", rt->nprocs - i);
  loom_stats_get(&st);
  loom__log(rt,
            "schedtrace %lldms: procs=%d idleprocs=%d threads=%d "
            "spinningthreads=%d idlethreads=%d runqueue=%llu "
            "coroutines=%llu spawned=%llu steals=%llu netpollwakeups=%llu "
            "[%s]",
            (long long)((now - rt->start_time) / 1000000), st.procs,
            st.idle_procs, st.threads, st.spinning_threads, st.idle_threads,
            (unsigned long long)st.global_runq,
            (unsigned long long)st.coroutines,
            (unsigned long long)st.spawned, (unsigned long long)st.steals,
            (unsigned long long)st.netpoll_wakeups, queues);
}

/* Move free Gs beyond TRIM_KEEP to the clean array, their stack memory
 * returned to the kernel (allocation prefers the warm array).  The
 * oldest entries, at the bottom of the LIFO, are the coldest. */
static void trim_free_stacks(loom__rt *rt) {
  loom__stacks *s = &rt->stacks;
  pthread_mutex_lock(&s->lock);
  size_t n = s->ngfree > TRIM_KEEP ? s->ngfree - TRIM_KEEP : 0;
  if (n > TRIM_BATCH)
    n = TRIM_BATCH; /* bounded work per round; the rest waits */
  void **batch = n ? loom__malloc(n * sizeof *batch) : NULL;
  if (batch == NULL) {
    pthread_mutex_unlock(&s->lock);
    return;
  }
  memcpy(batch, s->gfree, n * sizeof *batch);
  memmove(s->gfree, s->gfree + n, (s->ngfree - n) * sizeof *batch);
  s->ngfree -= n;
  pthread_mutex_unlock(&s->lock);

  for (size_t i = 0; i < n; i++) {
    loom__g *x = batch[i];
    loom__stack_trim(s, &x->stk,
                     (size_t)((x->stk.base + x->stk.size) - (char *)x));
  }
  pthread_mutex_lock(&s->lock);
  for (size_t i = 0; i < n; i++)
    if (loom__ptrs_push(&s->gclean, &s->nclean, &s->capclean, batch[i]))
      break; /* cannot grow: the slots idle until shutdown */
  pthread_mutex_unlock(&s->lock);
  loom__free(batch);
}

/* Free stacks beyond the reserve, waiting for trim_free_stacks. */
static bool stacks_to_trim(loom__rt *rt) {
  loom__stacks *s = &rt->stacks;
  pthread_mutex_lock(&s->lock);
  bool more = s->ngfree > TRIM_KEEP;
  pthread_mutex_unlock(&s->lock);
  return more;
}

/* Every TRIM_PERIOD_NS: trim, if nothing was spawned since the last
 * look (a burst still under way would take the stacks back at once). */
static void trim_round(loom__rt *rt, int64_t now, int64_t *next_trim,
                       uint64_t *trimmed_at) {
  if (now < *next_trim)
    return;
  uint64_t spawned = loom__spawned(rt);
  if (spawned == *trimmed_at)
    trim_free_stacks(rt);
  *trimmed_at = spawned;
  *next_trim = now + TRIM_PERIOD_NS;
}

static bool any_blocked(loom__rt *rt) {
  for (int i = 0; i < rt->nprocs; i++)
    if (atomic_load(&rt->allp[i]->status) == P_BLOCKED)
      return true;
  return false;
}

/* Runnable work that no thread will take: an idle P whose run queue is
 * not empty (the thread that was to run it could not be started, out of
 * memory or threads) while nobody spins looking for work. */
static bool stranded(loom__rt *rt) {
  if (atomic_load(&rt->nmspinning) > 0)
    return false;
  for (int i = 0; i < rt->nprocs; i++) {
    loom__p *p = rt->allp[i];
    if (atomic_load_explicit(&p->status, memory_order_acquire) == P_IDLE &&
        !loom__runq_empty(p))
      return true;
  }
  return false;
}

/* Work queued behind a coroutine that has kept its P since we last
 * looked, while another P is idle and nobody spins.  Whoever queued it
 * woke a thread for the idle P (loom__wakep), which would have stolen
 * it; if that wake-up was lost, the work waits until the coroutine
 * parks, which may be never.  Go's sysmon would preempt the coroutine;
 * ours wakes a thread, which steals the work: a lost wake-up costs a
 * round or two (at most 10 ms each).  A P that switches coroutines at
 * all (one that yields in a loop, with itself queued in between) is not
 * stuck: it gets to its queue by itself. */
static bool stuck_behind(loom__rt *rt) {
  if (atomic_load(&rt->npidle) == 0 || atomic_load(&rt->nmspinning) > 0)
    return false;
  bool stuck = false;
  for (int i = 0; i < rt->nprocs; i++) {
    loom__p *p = rt->allp[i];
    uint32_t t = atomic_load_explicit(&p->schedtick, memory_order_relaxed);
    bool same = t == p->sm_runtick;
    p->sm_runtick = t;
    if (same &&
        atomic_load_explicit(&p->status, memory_order_acquire) == P_RUNNING &&
        !loom__runq_empty(p))
      stuck = true;
  }
  return stuck;
}

/* A P that entered a blocking call we have not seen yet. */
static bool new_block(loom__rt *rt) {
  for (int i = 0; i < rt->nprocs; i++) {
    loom__p *p = rt->allp[i];
    if (atomic_load(&p->status) == P_BLOCKED &&
        atomic_load_explicit(&p->blocktick, memory_order_relaxed) !=
            p->sm_blocktick)
      return true;
  }
  return false;
}

/*
 * Timers on a slow P.  A running P looks at its timers on every 8th
 * switch (proc.c, fast_next): a clock read costs more than a switch.
 * Coroutines that run for milliseconds between scheduling points make
 * that tens of milliseconds.  So a running P with a timer set that has
 * switched fewer than 8 times in the last millisecond or more (slices
 * of over 125 µs) is told to look on every switch (timer_mask 0) — a
 * clock read is nothing beside such slices — until a later look finds
 * it switching fast again or without a timer.  No round is added.
 */
static void watch_timers(loom__rt *rt, int64_t now) {
  for (int i = 0; i < rt->nprocs; i++) {
    loom__p *p = rt->allp[i];
    if (now - p->sm_timerwhen < 1000000)
      continue; /* judged over a millisecond at least */
    uint32_t t = atomic_load_explicit(&p->schedtick, memory_order_relaxed);
    bool slow = t - p->sm_timertick < 8;
    p->sm_timertick = t;
    p->sm_timerwhen = now;
    bool watch =
        slow && loom__timers_next(&p->timers) != 0 &&
        atomic_load_explicit(&p->status, memory_order_relaxed) == P_RUNNING;
    uint32_t mask = watch ? 0 : 7;
    if (atomic_load_explicit(&p->timer_mask, memory_order_relaxed) != mask)
      atomic_store_explicit(&p->timer_mask, mask, memory_order_relaxed);
  }
}

/* Sleep `delay` ns; true if woken early or cut short.  A sleep longer
 * than a retake round is announced in sysmonslow, so that a coroutine
 * entering a blocking call wakes us (block.c); one that entered just
 * before the announcement is seen here and cuts the sleep to a round. */
static bool timed_sleep(loom__rt *rt, int64_t delay) {
  bool slow = delay > RETAKE_NS, cut = false;
  if (slow) {
    atomic_store(&rt->sysmonslow, true);
    if (new_block(rt)) {
      delay = RETAKE_NS;
      cut = true;
    }
  }
  bool woken = loom__note_tsleep(&rt->sysmon_note, delay);
  if (slow)
    atomic_store(&rt->sysmonslow, false);
  if (woken)
    loom__note_clear(&rt->sysmon_note);
  return woken || cut;
}

static void *sysmon_main(void *arg) {
  loom__rt *rt = arg;
  prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
  prctl(PR_SET_NAME, "loom-sysmon", 0, 0, 0);
  int64_t delay = RETAKE_NS;
  int idle = 0;
  int64_t now = loom_now();
  int64_t next_trace = rt->cfg.schedtrace_ms > 0
                           ? now + (int64_t)rt->cfg.schedtrace_ms * 1000000
                           : 0;
  int64_t next_trim = now + TRIM_PERIOD_NS;
  uint64_t trimmed_at = 0;
  for (;;) {
    if (idle == 0)
      delay = RETAKE_NS;
    else if (idle > 50)
      delay *= 2;
    if (delay > MAX_DELAY_NS)
      delay = MAX_DELAY_NS;
    if (next_trace != 0 && next_trace - loom_now() < delay)
      delay = next_trace - loom_now() > 0 ? next_trace - loom_now() : 0;
    if (timed_sleep(rt, delay) && new_block(rt)) {
      idle = 0; /* rounds of 20 µs again, from the next one */
      delay = RETAKE_NS;
    }
    if (atomic_load(&rt->stopping))
      break;
    atomic_fetch_add_explicit(&rt->sysmon_rounds, 1, memory_order_relaxed);
    now = loom_now();
    if (next_trace == 0 && atomic_load(&rt->npidle) == rt->nprocs &&
        !any_blocked(rt) && !stranded(rt)) {
      /* Everything idle: sleep until somebody needs us, or, while free
       * stacks wait to be trimmed, until the next trim (a server that
       * goes quiet after a burst would keep their memory until its
       * next busy spell). */
      bool trim = stacks_to_trim(rt);
      atomic_store(&rt->sysmonwait, true);
      atomic_store(&rt->sysmonslow, true);
      bool woken = true;
      if (atomic_load(&rt->npidle) == rt->nprocs && !any_blocked(rt) &&
          !atomic_load(&rt->stopping)) {
        if (!trim)
          loom__note_sleep(&rt->sysmon_note);
        else
          woken = loom__note_tsleep(&rt->sysmon_note,
                                    next_trim - now > 0 ? next_trim - now : 0);
      }
      loom__note_clear(&rt->sysmon_note);
      atomic_store(&rt->sysmonwait, false);
      atomic_store(&rt->sysmonslow, false);
      if (!woken) {
        now = loom_now();
        trim_round(rt, now, &next_trim, &trimmed_at);
        continue;
      }
      /* Woken by a coroutine entering a blocking call, or by a P leaving
       * the idle list.  Only the first needs 20 µs rounds (its P is
       * retaken after one); what busy Ps need of us is on the 10 ms
       * scale (the long-run warning, polling for them, trimming).  A
       * server that goes idle and busy again thousands of times a
       * second would otherwise wake us for 20 µs rounds each time. */
      if (new_block(rt)) {
        idle = 0;
      } else {
        idle = 51;
        delay = MAX_DELAY_NS;
      }
      continue;
    }
    /* Nobody has polled for 10 ms (every P busy): poll for them, so
     * ready sockets do not wait for a P to run dry. */
    int64_t lp = atomic_load(&rt->lastpoll);
    if (atomic_load(&rt->netpoll_waiters) != 0 && lp != 0 &&
        lp < now - 10000000 &&
        atomic_compare_exchange_strong(&rt->lastpoll, &lp, now)) {
      loom__g *gs[LOOM__NETPOLL_MAX];
      int n = loom__netpoll_poll(&rt->np, 0, gs);
      if (n > 0) {
        loom__inject(rt, gs, n);
        idle = 0;
      }
    }
    /* A call seen for the first time entered it after our last sleep
     * (so after sysmonslow was cleared, and it woke nobody): new_block
     * will not count it, and only resetting here keeps the next sleep to
     * a round instead of up to 10 ms. */
    bool seen;
    if (retake(rt, now, delay, &seen) > 0 || seen)
      idle = 0;
    else
      idle++;
    watch_timers(rt, now);
    int64_t next = loom__earliest_timer(rt);
    if ((next != 0 && next < now - 1000000) || stranded(rt) || stuck_behind(rt))
      loom__wakep(rt); /* retries a thread that could not be started */
    if (next_trace != 0 && now >= next_trace) {
      schedtrace(rt, now);
      next_trace = now + (int64_t)rt->cfg.schedtrace_ms * 1000000;
    }
    trim_round(rt, now, &next_trim, &trimmed_at);
  }
  return NULL;
}

int loom__sysmon_start(loom__rt *rt) {
  loom__note_clear(&rt->sysmon_note);
  int err = pthread_create(&rt->sysmon, NULL, sysmon_main, rt);
  if (err != 0)
    return -err;
  rt->sysmon_started = true;
  return 0;
}

void loom__sysmon_stop(loom__rt *rt) {
  if (!rt->sysmon_started)
    return;
  loom__sysmon_wake(rt);
  pthread_join(rt->sysmon, NULL);
  rt->sysmon_started = false;
}
