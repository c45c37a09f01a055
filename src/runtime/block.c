/*
 * block.c — handing the P over around calls that block the thread.
 *
 * loom_block_enter marks the M's P as P_BLOCKED and keeps nothing else:
 * two atomic stores.  If the call returns quickly, loom_block_exit takes
 * the P back with one CAS and nothing else happened.  If the call lasts,
 * sysmon CASes the P from P_BLOCKED to P_IDLE (retake, sysmon.c) and hands
 * it to another M, so the P's other coroutines keep running.  Then
 * loom_block_exit's CAS fails; it tries any idle P, and failing that,
 * queues its G globally and parks its M (Go's entersyscall/exitsyscall).
 */
#include "runtime/runtime.h"

static void post_globrunq(loom__m *m, loom__g *g, void *arg) {
  (void)arg;
  loom__rt *rt = m->rt;
  atomic_store_explicit(&g->status, G_RUNNABLE, memory_order_relaxed);
  pthread_mutex_lock(&rt->lock);
  loom__globrunq_put(rt, g);
  pthread_mutex_unlock(&rt->lock);
  /* An idle P may have appeared since loom_block_exit looked. */
  loom__wakep(rt);
}

static void post_abandon(loom__m *m, loom__g *g, void *arg) {
  (void)m;
  (void)arg;
  atomic_store_explicit(&g->status, G_WAITING, memory_order_relaxed);
}

/* The P now runs g, for sysmon's long-run warning (gswitch does this for
 * a G switched in; a G leaving a section resumes without a switch).  The
 * P may come from the idle list, which left "nothing runs here" (0), or
 * from another M's section, which left that M's coroutine. */
static void run_here(loom__p *p, const loom__g *g) {
  atomic_store_explicit(&p->run_id, g->id, memory_order_relaxed);
  atomic_store_explicit(&p->run_pc, g->spawn_pc, memory_order_relaxed);
}

void loom_block_enter(void) {
  loom__m *m = loom__getm();
  if (m == NULL || m->p == NULL || m->curg == NULL || m->curg->is_g0)
    return;
  if (m->curg->park_hook != NULL) /* while the P is ours: it may loom_go */
    loom__park_hook_run(m->curg);
  loom__p *p = m->p;
  m->oldp = p;
  m->p = NULL;
  m->in_block = true;
  uint32_t t = atomic_load_explicit(&p->blocktick, memory_order_relaxed);
  atomic_store_explicit(&p->blocktick, t + 1, memory_order_relaxed);
  /* seq_cst: sysmon stores sysmonslow and then reads the Ps' status; we
   * store the status and then read sysmonslow.  With weaker orders both
   * loads may see the old values (store-load reordering) and sysmon would
   * sleep through a long blocking call. */
  atomic_store_explicit(&p->status, P_BLOCKED, memory_order_seq_cst);
  if (atomic_load_explicit(&m->rt->sysmonslow, memory_order_seq_cst))
    loom__sysmon_wake(m->rt);
}

void loom_block_exit(void) {
  loom__m *m = loom__getm();
  if (m == NULL || !m->in_block)
    return;
  loom__rt *rt = m->rt;
  loom__p *p = m->oldp;
  loom__g *g = m->curg;
  m->oldp = NULL;
  m->in_block = false;
  uint32_t s = P_BLOCKED;
  if (atomic_compare_exchange_strong_explicit(&p->status, &s, P_RUNNING,
                                              memory_order_acq_rel,
                                              memory_order_relaxed)) {
    /* Not always the P as we left it: sysmon may have handed it to
     * another M, which then entered a section of its own (BLOCKED
     * again, and our CAS took it).  So it gets our thread's CPU clock,
     * as acquirep would give it, and our coroutine, for the long-run
     * warning. */
    atomic_store_explicit(&p->mclock, m->cpuclock, memory_order_relaxed);
    run_here(p, g);
    m->p = p;
    if (!atomic_load_explicit(&rt->stopping, memory_order_relaxed))
      return;
    m->p = NULL; /* stopping: this coroutine will not run again */
  }
  if (!atomic_load(&rt->stopping)) {
    pthread_mutex_lock(&rt->lock);
    loom__p *idle = loom__pidleget(rt);
    pthread_mutex_unlock(&rt->lock);
    if (idle != NULL) {
      loom__acquirep(m, idle);
      run_here(idle, g);
      return;
    }
    /* No P: queue g globally; this M goes idle on g0. */
    loom__switch_to_g0(m, g, post_globrunq, NULL);
    return;
  }
  loom__switch_to_g0(m, g, post_abandon, NULL);
  loom__throw("block_exit: abandoned coroutine resumed");
}
