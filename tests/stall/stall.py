"""The stall injector behind tests/stall/run.sh (which says what it does)."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time


def env_int(name, default):
    v = os.environ.get(name)
    return int(v) if v else default


STALL_MIN = env_int("STALL_MIN_MS", 20) / 1000.0
STALL_MAX = env_int("STALL_MAX_MS", 80) / 1000.0
GAP_MIN = env_int("STALL_GAP_MIN_MS", 30) / 1000.0
GAP_MAX = env_int("STALL_GAP_MAX_MS", 300) / 1000.0
QUIT = threading.Event()  # Ctrl-C: kill the running cases and stop


def children(pid):
    """Direct children of pid, read from /proc (empty if it is gone)."""
    out = []
    try:
        tasks = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return out
    for t in tasks:
        try:
            with open("/proc/%d/task/%s/children" % (pid, t)) as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            pass
    return out


def signal_tree(root, sig, stopped=None):
    """Send sig to root, then to its descendants, parents first.

    With SIGSTOP, each parent is stopped before its children are listed,
    so none of them can be reaped (and its pid reused) while we look; the
    list of stopped pids is returned for the SIGCONT that follows.
    """
    if stopped is not None:
        for pid in reversed(stopped):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return stopped
    done = []
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            continue
        done.append(pid)
        todo.extend(children(pid))
    return done


def exited(pid):
    """True once pid has exited; does not reap it (WNOWAIT keeps the pid ours)."""
    try:
        r = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return r is not None


def run_case(case, rng, logf):
    """Run one case under stalls; returns (rc or 'timeout', stalls, stalled_s, secs)."""
    env = dict(os.environ)
    for kv in case["env"]:
        k, _, v = kv.partition("=")
        env[k] = v
    t0 = time.monotonic()
    # A process group of its own, whose parent (we) is in another group
    # of the same session: never an orphaned group, which the kernel
    # would send SIGHUP when a member exits while another is stopped
    # (another case's exit, in our group, would do).
    p = subprocess.Popen(case["cmd"], cwd=case["cwd"], env=env, stdout=logf,
                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         process_group=0)
    limit = t0 + case["timeout"]
    stalls = 0
    stalled = 0.0
    timed_out = False
    first = True
    while True:
        # Run freely for a gap, watching for the exit; the first gap may
        # be short, so that a case's first milliseconds get frozen too.
        until = time.monotonic() + rng.uniform(0 if first else GAP_MIN, GAP_MAX)
        first = False
        while not exited(p.pid) and time.monotonic() < until:
            time.sleep(0.002)
        if exited(p.pid):
            break
        if time.monotonic() > limit or QUIT.is_set():
            timed_out = not QUIT.is_set()
            pids = signal_tree(p.pid, signal.SIGSTOP)
            signal_tree(p.pid, signal.SIGKILL, pids)
            break
        d = rng.uniform(STALL_MIN, STALL_MAX)
        s0 = time.monotonic()
        pids = signal_tree(p.pid, signal.SIGSTOP)
        try:
            time.sleep(d)
        finally:
            signal_tree(p.pid, signal.SIGCONT, pids)
        stalls += 1
        stalled += time.monotonic() - s0
    rc = p.wait()
    return ("timeout" if timed_out else rc), stalls, stalled, time.monotonic() - t0


def load_cases(build, regex, exclude):
    out = subprocess.run(["ctest", "--show-only=json-v1"], cwd=build, check=True,
                         stdout=subprocess.PIPE).stdout
    cases = []
    for t in json.loads(out)["tests"]:
        name = t["name"]
        if not re.search(regex, name) or (exclude and re.search(exclude, name)):
            continue
        props = {p["name"]: p["value"] for p in t.get("properties", [])}
        cases.append({
            "name": name,
            "cmd": t["command"],
            "cwd": props.get("WORKING_DIRECTORY", build),
            "env": props.get("ENVIRONMENT", []),
            "timeout": 2 * float(props.get("TIMEOUT", 1500)) + 30,
            "locks": sorted(props.get("RESOURCE_LOCK", [])),
        })
    return cases


def tail(path, n=6):
    try:
        with open(path, errors="replace") as f:
            lines = [l.rstrip("\n") for l in f if l.strip()]
    except OSError:
        return []
    keep = [l for l in lines if "CHECK failed" in l or "watchdog" in l or "ERROR" in l]
    return (keep or lines)[-n:]


def main():
    build = os.path.abspath(sys.argv[1])
    regex = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] else ""
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    exclude = os.environ.get("STALL_EXCLUDE", r"^(valgrind|install|gdb)/")
    jobs = env_int("STALL_JOBS", 2)
    seed = env_int("STALL_SEED", int(time.time() * 1000) % 1000000007)
    budget = env_int("STALL_BUDGET_S", 0)
    logdir = os.environ.get("STALL_LOGDIR") or tempfile.mkdtemp(prefix="loom-stall.")
    os.makedirs(logdir, exist_ok=True)

    cases = load_cases(build, regex, exclude)
    if not cases:
        print("stall: no case matches %r in %s" % (regex, build), file=sys.stderr)
        return 2
    work = [(c, r) for r in range(rounds) for c in cases]
    print("stall: %d cases x %d rounds, %d jobs, seed %d, freezes %d-%d ms every %d-%d ms, "
          "logs in %s" % (len(cases), rounds, jobs, seed, STALL_MIN * 1000, STALL_MAX * 1000,
                          GAP_MIN * 1000, GAP_MAX * 1000, logdir), flush=True)

    lock = threading.Lock()
    resource = {}
    results = {c["name"]: [] for c in cases}
    t_start = time.monotonic()
    state = {"next": 0, "done": 0, "skipped": 0}

    def worker(wid):
        rng = random.Random(seed * 1000 + wid)
        while True:
            with lock:
                if state["next"] >= len(work) or QUIT.is_set():
                    return
                if budget and time.monotonic() - t_start > budget:
                    state["skipped"] = len(work) - state["next"]
                    state["next"] = len(work)
                    return
                case, rnd = work[state["next"]]
                state["next"] += 1
                held = [resource.setdefault(l, threading.Lock()) for l in case["locks"]]
            for l in held:
                l.acquire()
            log = os.path.join(logdir, "%s.%d.log" % (case["name"].replace("/", "."), rnd))
            try:
                with open(log, "w") as f:
                    res = run_case(case, rng, f)
            finally:
                for l in reversed(held):
                    l.release()
            rc, stalls, stalled, secs = res
            ok = rc == 0
            with lock:
                results[case["name"]].append((rc, stalls, stalled, secs, log))
                state["done"] += 1
                if not ok:
                    print("FAIL %-50s round %d: %s after %.1f s, %d stalls (%.0f ms)  %s"
                          % (case["name"], rnd, rc if rc == "timeout" else "exit %s" % rc,
                             secs, stalls, stalled * 1000, log), flush=True)
                elif state["done"] % 50 == 0:
                    print("stall: %d/%d rounds done, %.0f s" % (state["done"], len(work),
                                                               time.monotonic() - t_start),
                          flush=True)
            if ok:
                os.unlink(log)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(max(1, jobs))]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.5)
    except KeyboardInterrupt:
        QUIT.set()
        for t in threads:
            t.join()
        print("stall: interrupted", file=sys.stderr)

    failed = {n: r for n, r in results.items() if any(x[0] != 0 for x in r)}
    total_stalls = sum(x[1] for r in results.values() for x in r)
    print("\nstall: %d rounds in %.0f s, %d freezes, seed %d%s" %
          (state["done"], time.monotonic() - t_start, total_stalls, seed,
           ", %d rounds skipped (budget)" % state["skipped"] if state["skipped"] else ""))
    if not failed:
        print("stall: every round passed")
        return 0
    print("stall: %d of %d cases failed:" % (len(failed), len(cases)))
    for name in sorted(failed):
        r = failed[name]
        bad = [x for x in r if x[0] != 0]
        print("  %-50s %d/%d failed" % (name, len(bad), len(r)))
        for line in tail(bad[0][4]):
            print("      " + line)
    return 1


if __name__ == "__main__":
    sys.exit(main())
