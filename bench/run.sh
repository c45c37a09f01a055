#!/usr/bin/env bash
# bench/run.sh — run loom's runtime microbenchmarks side by side with their
# Go peers and print medians, loom/Go ratios and 1P-vs-2P speed-ups.
#
#   cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j2
#   bench/run.sh [build-dir]            # default: $BUILD_DIR, else build
#
# Each round runs every case once for loom, then once for Go (A/B/A/B...),
# so slow drift on a noisy machine hits both sides alike; the table shows
# the median and the range of ROUNDS runs.  Every run has a time limit and
# the whole script stops adding rounds when its budget is spent.
#
# Environment (all optional):
#   ROUNDS=7            rounds (runs per case and side); at least 5 is sane
#   BUDGET_S=260        start no round that would end after this many seconds
#                       (judged by the longest round so far); no run
#                       goes on past BUDGET_S + 20 s either
#   RUN_TIMEOUT_S=60    time limit of a single run
#   YIELD_ITERS=5000000 SPAWN_N=1000000 PARKED_N=1000000 CHAN_N=1000000
#   CPU_TASKS=400 CPU_ITERS=1000000
#   SPAWN_YIELD_EVERY=256  the spawner yields every k spawns in case spawnk
#   CASES="switch yield spawn spawnk parked cpu chan sync"   which cases to run
#   GO=go               the Go toolchain (Go 1.19+, standard library only)
#
# The shell helpers it shares with the other bench scripts are in bench/lib.sh.
set -u -o pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh" || exit 2

# A build directory given as an argument or in BUILD_DIR is taken relative
# to the caller's directory; the default, build/, to the repository root.
# bench_init also unsets LOOM_PROCS, GOMAXPROCS and the like: the programs
# choose their processor counts themselves.
bench_init "${1:-}"
ROUNDS=${ROUNDS:-7}
BUDGET_S=${BUDGET_S:-260}
RUN_TIMEOUT_S=${RUN_TIMEOUT_S:-60}
YIELD_ITERS=${YIELD_ITERS:-5000000}
SPAWN_N=${SPAWN_N:-1000000}
CHAN_N=${CHAN_N:-1000000}
PARKED_N=${PARKED_N:-1000000}
CPU_TASKS=${CPU_TASKS:-400}
CPU_ITERS=${CPU_ITERS:-1000000}
GO=${GO:-go}
SPAWN_YIELD_EVERY=${SPAWN_YIELD_EVERY:-256}
CASES=${CASES:-switch yield spawn spawnk parked cpu chan sync}

LOOM_BIN=$BUILD/bench
GO_BIN=$BUILD/bench/go

# ---- loom binaries -------------------------------------------------------
have_loom=1
for b in yield spawn parked cpu chan sync; do
  if [[ ! -x $LOOM_BIN/$b ]]; then
    have_loom=0
  fi
done
if ((!have_loom)); then
  echo "run.sh: no loom benchmarks in $LOOM_BIN/ — build first:" >&2
  echo "  cmake -S . -B $BUILD -DCMAKE_BUILD_TYPE=Release && cmake --build $BUILD -j2" >&2
  echo "run.sh: running the Go side only" >&2
fi
warn_build_type

# ---- Go binaries ---------------------------------------------------------
need_go
make_tmp # the Go cache
for b in yield spawn parked cpu chan sync; do
  go_build "$GO_BIN/$b" "bench/go/$b.go"
done

# ---- running -------------------------------------------------------------
# run SIDE CASE CMD...: run once, store the fields this case reports.
run() {
  local side=$1 case=$2 out line rc
  shift 2
  # Hard stop: no run may end later than BUDGET_S + 20 s after the start.
  time_left 20 "$RUN_TIMEOUT_S" || return
  out=$(timeout -k 5 "$LIMIT" "$@" 2>&1)
  rc=$?
  line=$(grep -m1 '^RESULT ' <<<"$out")
  if ((rc != 0)) || [[ -z $line ]]; then
    # A result printed before a crash or a hang at exit still counts as a
    # sample, but the run is reported and the script fails.
    count_fail "$side:$case"
    echo "  $side $case FAILED (exit $rc$( ((rc == 124)) && echo ", timed out after ${LIMIT}s")):" \
      "$(grep -v '^RESULT ' <<<"$out" | tail -n 3 | tr '\n' ' ')" >&2
    [[ -z $line ]] && return
  fi
  keep_fields "$side:$case" "$line" ns_per_op cold_ns_per_op recycled_ns_per_op \
    close_ns_per_op recycled_close_ns_per_op kib_per_op ms
  printf '  %-7s %-7s %s\n' "$side" "$case" "${line#RESULT }"
  grep '^INFO ' <<<"$out" | sed 's/^/       /'
}

sides=(go)
((have_loom)) && sides=(loom go)
want() { [[ " $CASES " == *" $1 "* ]]; }
bin() { if [[ $1 == loom ]]; then echo "$LOOM_BIN/$2"; else echo "$GO_BIN/$2"; fi; }

one_round() {
  local s n m
  if want switch && ((have_loom)) && [[ -x $LOOM_BIN/switch ]]; then
    run loom switch "$LOOM_BIN/switch" # no Go peer: the floor under yield
  fi
  if want yield; then
    for s in "${sides[@]}"; do run "$s" yield "$(bin "$s" yield)" "$YIELD_ITERS"; done
  fi
  if want spawn; then
    for s in "${sides[@]}"; do run "$s" spawn "$(bin "$s" spawn)" "$SPAWN_N"; done
  fi
  if want spawnk; then
    for s in "${sides[@]}"; do run "$s" spawnk "$(bin "$s" spawn)" "$SPAWN_N" 0 "$SPAWN_YIELD_EVERY"; done
  fi
  if want parked; then
    for s in "${sides[@]}"; do run "$s" parked "$(bin "$s" parked)" "$PARKED_N"; done
  fi
  if want cpu; then
    # "threads": the same load on plain pthreads, the machine's own speed-up.
    for n in 1 2; do
      for s in "${sides[@]}"; do run "$s" cpu$n "$(bin "$s" cpu)" $n "$CPU_TASKS" "$CPU_ITERS"; done
      if ((have_loom)) && [[ -x $LOOM_BIN/cpu_threads ]]; then
        run threads cpu$n "$LOOM_BIN/cpu_threads" $n "$CPU_TASKS" "$CPU_ITERS"
      fi
    done
  fi
  if want chan; then
    # Channels: unbuffered round trip (1 P, as Go's GOMAXPROCS=1), 4
    # producers and 4 consumers over a 128-slot buffer, and a select over
    # 4 channels fed by 4 senders (2 Ps).
    for m in pingpong mpmc select; do
      for s in "${sides[@]}"; do run "$s" "chan$m" "$(bin "$s" chan)" "$m" "$CHAN_N"; done
    done
  fi
  if want sync; then
    # A contended mutex (8 coroutines, 2 Ps) and cancelling 10,000
    # coroutines blocked on one context: a first crowd on fresh stacks,
    # and crowds on stacks recycled 10 to 20 times.
    for m in mutex cancel; do
      for s in "${sides[@]}"; do run "$s" "sync$m" "$(bin "$s" sync)" "$m"; done
    done
  fi
}

echo "loom vs Go microbenchmarks: $(nproc) CPUs, $ROUNDS rounds, $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
run_rounds one_round

# ---- summary -------------------------------------------------------------
echo
echo "medians of $rounds_done rounds [min..max]; ratio = loom/Go (lower is better for loom"
echo "except the speed-up rows); target and 'met' judge the loom median"
printf '%-25s %-7s %-26s %-26s %-7s %-8s %s\n' case unit "loom" "go" "loom/go" target met
row() { # row LABEL UNIT CASE FIELD TARGET_OP TARGET
  local label=$1 unit=$2 case=$3 f=$4 op=${5:-} lim=${6:-}
  local lm gm tgt="-" met="-"
  lm=$(med loom "$case" "$f")
  gm=$(med go "$case" "$f")
  if [[ -n $op ]]; then tgt="$op $lim"; met=$(meets "$lm" "$op" "$lim"); fi
  printf '%-25s %-7s %-26s %-26s %-7s %-8s %s\n' "$label" "$unit" "$(cell loom "$case" "$f")" \
    "$(cell go "$case" "$f")" "$(div "$lm" "$gm")" "$tgt" "$met"
}
row "bare context switch" ns/op switch ns_per_op
row "yield" ns/op yield ns_per_op "<=" 10
row "spawn+run+exit (warm)" ns/op spawn ns_per_op "<=" 100
row "spawn+run+exit (cold)" ns/op spawn cold_ns_per_op
row "spawn, yield/$SPAWN_YIELD_EVERY (warm)" ns/op spawnk ns_per_op "<=" 100
row "spawn, yield/$SPAWN_YIELD_EVERY (cold)" ns/op spawnk cold_ns_per_op
row "parked coroutine" KiB parked kib_per_op "<=" 4.5
row "chan round trip, unbuf." ns/op chanpingpong ns_per_op "<=" 80
row "chan 4x4 producers, buf." ns/op chanmpmc ns_per_op
row "select over 4 channels" ns/op chanselect ns_per_op
row "contended mutex, 8 co." ns/op syncmutex ns_per_op
row "cancel 10,000 waiters" ns/op synccancel ns_per_op
row "cancel 10,000, recycled" ns/op synccancel recycled_ns_per_op
row "  of which the close" ns/op synccancel close_ns_per_op
row "  of which, recycled" ns/op synccancel recycled_close_ns_per_op
row "cpu-bound, 1 P" ms cpu1 ms
row "cpu-bound, 2 P" ms cpu2 ms

# Speed-up: per round, ms(1 P) / ms(2 P) from runs made seconds apart,
# then the median of those ratios.
speedups() {
  local -a one two
  read -ra one <<<"${SAMPLES[$1:cpu1:ms]:-}"
  read -ra two <<<"${SAMPLES[$1:cpu2:ms]:-}"
  local i n=${#one[@]}
  ((${#two[@]} < n)) && n=${#two[@]}
  for ((i = 0; i < n; i++)); do div "${one[i]}" "${two[i]}"; done
}
mapfile -t sp < <(speedups loom)
read -r lsm lsmin lsmax _ <<<"$(summ "${sp[@]}")"
mapfile -t sp < <(speedups go)
read -r gsm gsmin gsmax _ <<<"$(summ "${sp[@]}")"
lcell="-" gcell="-"
[[ $lsm != - ]] && lcell="${lsm}x [$lsmin..$lsmax]"
[[ $gsm != - ]] && gcell="${gsm}x [$gsmin..$gsmax]"
printf '%-25s %-7s %-26s %-26s %-7s %-8s %s\n' "speed-up 2 P / 1 P" x "$lcell" "$gcell" \
  "$(div "$lsm" "$gsm")" ">= 1.8" "$(meets "$lsm" ">=" 1.8)"

mapfile -t sp < <(speedups threads)
read -r tsm tsmin tsmax _ <<<"$(summ "${sp[@]}")"
if [[ $tsm != - ]]; then
  printf '%-25s %-7s %-26s %s\n' "  same load, pthreads" x "${tsm}x [$tsmin..$tsmax]" \
    "(no runtime: what 2 cores gave at the time; the ceiling)"
  if [[ $(meets "$tsm" ">=" 1.8) == NO ]]; then
    echo "  note: plain threads did not get 2 cores' worth either; the host is busy, so the"
    echo "        speed-up verdict says more about the machine than about loom: run again"
  fi
fi

finish
