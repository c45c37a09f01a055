# bench/lib.sh — shell helpers shared by bench/run.sh, bench/echo/run.sh and
# bench/engine/run.sh; sourced (`. bench/lib.sh`), not run.  Bash only.
#
# Offers:
#   bench_init [BUILD-DIR]   sets BUILD (an argument or $BUILD_DIR, taken
#                            relative to the caller's directory; default
#                            build/ in the repository), cds to the repository
#                            root, unsets the LOOM_* / GO* settings that would
#                            change what is compared, sets START=$SECONDS
#   configure_build new|always   CMake-configures BUILD (Release) if it
#                            has no CMakeCache.txt yet; with "always",
#                            re-configures an existing tree too (keeping its
#                            settings); then warn_build_type
#   warn_build_type          warns (stderr) of a non-optimised or sanitizer
#                            build, if BUILD has a CMakeCache.txt
#   cmake_build WHAT TARGET... builds the targets; exits 2 on failure
#   need_go; go_build OUT SRC  Go toolchain ($GO) check; GO111MODULE=off build
#                            with the throw-away cache $TMP/gocache; exit 2
#   make_tmp                 TMP (a temporary directory) and SPID (the server
#                            running now); on exit kills SPID, removes TMP;
#                            SIGINT/SIGTERM exit 130
#   field NAME LINE          the value of ` NAME=` in a RESULT line
#   time_left SLACK CAP      sets LIMIT: the seconds a run may take, at most
#                            CAP and ending by BUDGET_S + SLACK after START;
#                            returns 1 (and counts the run in SKIPPED) when
#                            no time is left
#   count_fail KEY; keep_fields KEY LINE FIELD...   FAILS / SAMPLES
#   run_rounds FUNC          up to ROUNDS rounds, each calling FUNC, none
#                            started that would overrun BUDGET_S (judged by
#                            the longest round so far); sets rounds_done
#   cases_by_servers         a FUNC for run_rounds: `run SERVER CASE` for
#                            every case in CASES, every server in SERVERS
#   host_busy                busy CPUs over one second, from /proc/stat
#   summ VALUES...           "median min max n" ("- - - 0" for none); each
#                            number %.4g, or %.0f from 10000 up (so msgs/s
#                            and large µs print as integers, not 1.2e+04)
#   med / cell SIDE CASE FIELD   the median / "median [min..max]" or "-"
#   div A B; meets VALUE OP LIMIT  A/B to 2 decimals; yes/NO (OP <= or >=);
#                            "-" when a value is missing
#   finish                   prints failed and skipped runs and the total
#                            time; returns 1 if any run failed
# For the echo load generator (bench/echo/loadgen.c):
#   loadgen_run SERVER CASE [LOADGEN-ARG...]   one run on a fresh server
#                            (see there); stop_server kills SPID
#   print_run WIDTH SERVER CASE, say_load_before, say_load_after,
#   table_medians, table_idle TITLE   the lines both echo benches print
#
# A script calls bench_init first (it sets BUILD and START and the working
# directory), then defines before the calls that use them: ROUNDS and
# BUDGET_S (run_rounds, time_left), CASES and SERVERS (cases_by_servers,
# table_medians), GO (need_go, go_build), a function `run SERVER CASE`
# (cases_by_servers; run_rounds takes any FUNC); for loadgen_run also LOADGEN,
# PORT_BASE, SECS, WARMUP_S, STORM_N, STORM_PARALLEL, IDLE_N (case idle),
# RATE (cases rate64 and rate1k: the offered messages/s),
# a function `start_server SERVER PORT` that starts it in the background
# and sets SPID, and optionally LOG (set after sourcing this), the file the
# servers write to: its tail is shown when a run fails.

BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || exit 2
declare -A SAMPLES # "side:case:field" -> space-separated values
declare -A FAILS   # "side:case" -> count
SKIPPED=0          # runs not started: the time budget was spent
SPID=              # the server running now, if any
PORT=              # loadgen_run: the port of the last server (PORT_BASE + k)
LOG=               # loadgen_run: the file the servers write to, if any

bench_init() {
  BUILD=${1:-${BUILD_DIR:-}}
  if [[ -n $BUILD && $BUILD != /* ]]; then
    BUILD=$PWD/$BUILD
  fi
  cd "$BENCH_ROOT" || exit 2
  BUILD=${BUILD:-$PWD/build}
  # The programs choose their processor counts themselves; do not let a
  # stray setting in the caller's environment change what is compared.
  unset LOOM_PROCS LOOM_SCHEDTRACE LOOM_STACK_SIZE GOMAXPROCS GOGC GODEBUG
  START=$SECONDS
}

# ---- building --------------------------------------------------------
warn_build_type() {
  [[ -f $BUILD/CMakeCache.txt ]] || return 0
  local btype san
  btype=$(sed -n 's/^CMAKE_BUILD_TYPE:[A-Z]*=//p' "$BUILD/CMakeCache.txt")
  san=$(sed -n 's/^LOOM_SANITIZE:[A-Z]*=//p' "$BUILD/CMakeCache.txt")
  case $btype in
    Release | RelWithDebInfo | MinSizeRel) ;;
    *) echo "run.sh: warning: $BUILD is a '$btype' build; the library is not optimised" >&2 ;;
  esac
  if [[ -n $san ]]; then
    echo "run.sh: warning: $BUILD is built with sanitizers ($san); numbers are meaningless" >&2
  fi
}

configure_build() { # configure_build new|always
  if [[ ! -f $BUILD/CMakeCache.txt ]]; then
    cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release >/dev/null || exit 2
  elif [[ $1 == always ]]; then
    cmake -S . -B "$BUILD" >/dev/null || exit 2
  fi
  warn_build_type
}

cmake_build() { # cmake_build WHAT TARGET...: WHAT names them in the error
  local what=$1
  shift
  if ! cmake --build "$BUILD" --target "$@" -j2 >/dev/null; then
    echo "run.sh: building $what in $BUILD failed" >&2
    exit 2
  fi
}

need_go() {
  if ! command -v "$GO" >/dev/null; then
    echo "run.sh: '$GO' not found; install Go or set GO=" >&2
    exit 2
  fi
}

go_build() { # go_build OUT SRC (standard library only)
  mkdir -p "$(dirname "$1")" "$TMP/gocache"
  if ! GOCACHE=$TMP/gocache GO111MODULE=off GOFLAGS='' "$GO" build -o "$1" "$2"; then
    echo "run.sh: go build $2 failed" >&2
    exit 2
  fi
}

cleanup() {
  [[ -n $SPID ]] && kill -9 "$SPID" 2>/dev/null
  rm -rf "$TMP"
}

make_tmp() {
  TMP=$(mktemp -d) || exit 2
  trap cleanup EXIT
  trap 'exit 130' INT TERM
}

# ---- running ---------------------------------------------------------
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$2"; }

time_left() {
  LIMIT=$((BUDGET_S + $1 - (SECONDS - START)))
  if ((LIMIT <= 0)); then
    SKIPPED=$((SKIPPED + 1))
    return 1
  fi
  ((LIMIT > $2)) && LIMIT=$2
  return 0
}

count_fail() { FAILS[$1]=$((${FAILS[$1]:-0} + 1)); }

keep_fields() {
  local key=$1 line=$2 f v
  shift 2
  for f; do
    v=$(field "$f" "$line")
    [[ -n $v ]] && SAMPLES[$key:$f]+="$v "
  done
  return 0
}

run_rounds() {
  local r round_start longest=0 # the longest round so far, in seconds
  rounds_done=0
  for ((r = 1; r <= ROUNDS; r++)); do
    if ((SECONDS - START + longest > BUDGET_S)); then
      echo "run.sh: another round would overrun the ${BUDGET_S}s budget; stopping after $rounds_done rounds" >&2
      break
    fi
    round_start=$SECONDS
    echo "round $r/$ROUNDS"
    "$1"
    rounds_done=$r
    ((SECONDS - round_start > longest)) && longest=$((SECONDS - round_start))
  done
}

cases_by_servers() {
  local c s
  for c in $CASES; do
    for s in $SERVERS; do run "$s" "$c"; done
  done
}

host_busy() {
  local a b
  a=$(head -1 /proc/stat)
  sleep 1
  b=$(head -1 /proc/stat)
  awk -v a="$a" -v b="$b" -v n="$(nproc)" 'BEGIN {
    na = split(a, x); split(b, y); t = 0; i = 0
    for (k = 2; k <= na; k++) t += y[k] - x[k]
    i = (y[5] - x[5]) + (y[6] - x[6])
    printf("%.2f", (t > 0) ? (t - i) / t * n : 0) }'
}

# ---- summary ---------------------------------------------------------
summ() {
  printf '%s\n' "$@" | awk 'NF { a[n++] = $1 }
    END {
      if (n == 0) { print "- - - 0"; exit }
      # insertion sort: n is small
      for (i = 1; i < n; i++) { v = a[i]; for (j = i - 1; j >= 0 && a[j] > v; j--) a[j+1] = a[j]; a[j+1] = v }
      m = (n % 2) ? a[(n-1)/2] : (a[n/2-1] + a[n/2]) / 2
      printf "%s %s %s %d\n", g(m), g(a[0]), g(a[n-1]), n
    }
    function g(v) { return sprintf((v >= 10000) ? "%.0f" : "%.4g", v) }'
}
med() {
  local -a vals
  read -ra vals <<<"${SAMPLES[$1:$2:$3]:-}"
  summ "${vals[@]}" | cut -d' ' -f1
}
cell() {
  local -a vals
  local m lo hi
  read -ra vals <<<"${SAMPLES[$1:$2:$3]:-}"
  read -r m lo hi _ <<<"$(summ "${vals[@]}")"
  if [[ $m == - ]]; then echo "-"; else echo "$m [$lo..$hi]"; fi
}
div() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2f\n", a / b }'; }
meets() { awk -v v="$1" -v op="$2" -v l="$3" 'BEGIN {
  if (v == "-") { print "-"; exit }
  ok = (op == "<=") ? (v + 0 <= l + 0) : (v + 0 >= l + 0); print ok ? "yes" : "NO" }'; }

finish() {
  local k nfail=0
  for k in "${!FAILS[@]}"; do
    echo "failed runs: $k x${FAILS[$k]}"
    nfail=$((nfail + FAILS[$k]))
  done
  ((SKIPPED > 0)) && echo "runs skipped for lack of time: $SKIPPED"
  echo "total time: $((SECONDS - START)) s"
  ((nfail == 0))
}

# ---- the echo load generator -----------------------------------------
stop_server() {
  kill -9 "$SPID" 2>/dev/null
  wait "$SPID" 2>/dev/null
  SPID=
}

# loadgen_run SERVER CASE [LOADGEN-ARG...]: start SERVER on the next port
# after PORT_BASE, wait until it accepts, run CASE against it with the
# load generator (at most 60 s, and not past BUDGET_S + 30 s), kill it.
# A failure is counted and told on stderr.  Keeps the RESULT line's
# fields in SAMPLES and the line in LINE; returns 1 when there is none.
loadgen_run() {
  local server=$1 case=$2 out rc a alive=1
  LINE=
  time_left 30 60 || return 1
  PORT=$((${PORT:-$PORT_BASE} + 1))
  a=127.0.0.1:$PORT
  start_server "$server" "$PORT"
  if ! "$LOADGEN" wait --addr "$a" --timeout-ms 5000; then
    count_fail "$server:$case"
    echo "  $server $case FAILED: the server did not start$([[ -n ${LOG:-} ]] && echo ": $(tail -n 3 "$LOG" | tr '\n' ' ')")" >&2
    stop_server
    return 1
  fi
  local -a args=(--addr "$a" --pid "$SPID" --name "$case" --impl "$server" "${@:3}")
  case $case in
    pp64) args=(pingpong "${args[@]}" --conns 64 --size 64 --inflight 1) ;;
    pp1k) args=(pingpong "${args[@]}" --conns 1000 --size 64 --inflight 1) ;;
    pipe4k) args=(pingpong "${args[@]}" --conns 64 --size 4096 --inflight 16) ;;
    storm) args=(storm "${args[@]}" --count "$STORM_N" --parallel "$STORM_PARALLEL" --size 64) ;;
    idle) args=(idle "${args[@]}" --conns "$IDLE_N") ;;
    rate64) args=(rate "${args[@]}" --conns 64 --size 64 --rate "$RATE") ;;
    rate1k) args=(rate "${args[@]}" --conns 1000 --size 64 --rate "$RATE") ;;
  esac
  [[ $case == pp* || $case == pipe* || $case == rate* ]] && args+=(--secs "$SECS" --warmup "$WARMUP_S")
  out=$(timeout -k 2 "$LIMIT" "$LOADGEN" "${args[@]}" 2>&1)
  rc=$?
  kill -0 "$SPID" 2>/dev/null || alive=0
  stop_server
  LINE=$(grep -m1 '^RESULT ' <<<"$out")
  if ((rc != 0 || !alive)) || [[ -z $LINE ]]; then
    count_fail "$server:$case"
    echo "  $server $case FAILED (loadgen exit $rc$( ((rc == 124)) && echo ", timed out")$( ((!alive)) && echo ", server died")):" \
      "$(grep -v '^RESULT ' <<<"$out" | tail -n 3 | tr '\n' ' ')" >&2
    [[ -n ${LOG:-} && -s $LOG ]] && echo "    server said: $(tail -n 3 "$LOG" | tr '\n' ' ')" >&2
    [[ -z $LINE ]] && return 1
  fi
  keep_fields "$server:$case" "$LINE" cpu_us_per_msg msgs_per_s p50_us p99_us p999_us fairness least_share kib_per_conn \
    server_cpu_util lg_cpu_util host_cpu_util steal_cpu_util sleeps_per_msg
}

# print_run WIDTH SERVER CASE: the line of one run (LINE), the server's
# name WIDTH wide: CPU, rate and latency, or for idle the RSS figures.
print_run() {
  if [[ $3 == idle ]]; then
    printf "  %-${1}s %-6s kib_per_conn=%s rss_kib=%s (base %s)\n" "$2" "$3" \
      "$(field kib_per_conn "$LINE")" "$(field rss_kib "$LINE")" "$(field rss_base_kib "$LINE")"
    return
  fi
  printf "  %-${1}s %-6s cpu_us/msg=%-7s sleeps/msg=%-6s msgs/s=%-7s p50=%-7s p99=%-8s cores: server=%s lg=%s host=%s steal=%s%s\n" \
    "$2" "$3" "$(field cpu_us_per_msg "$LINE")" "$(field sleeps_per_msg "$LINE")" "$(field msgs_per_s "$LINE")" \
    "$(field p50_us "$LINE")" "$(field p99_us "$LINE")" "$(field server_cpu_util "$LINE")" \
    "$(field lg_cpu_util "$LINE")" "$(field host_cpu_util "$LINE")" "$(field steal_cpu_util "$LINE")" \
    "$([[ $(field skipped "$LINE") =~ ^[1-9] ]] && echo " SKIPPED=$(field skipped "$LINE") (fell behind)")"
}

say_load_before() {
  echo "before start: load average $(cut -d' ' -f1-3 /proc/loadavg); CPUs busy over 1 s: $(host_busy) of $(nproc)"
}

say_load_after() {
  echo "after: load average $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "(cores: host = this VM's CPUs busy during a run; host - server - lg is what other"
  echo " processes here took; steal = CPU the hypervisor gave to other VMs on the shared"
  echo " host.  Runs with much of either were disturbed.)"
}

# table_idle TITLE: if CASES has idle, TITLE and each server's median
# [min..max] RSS growth per connection.
table_idle() {
  local s
  [[ " $CASES " == *" idle "* ]] || return 0
  echo
  echo "$1"
  for s in $SERVERS; do
    printf '  %-6s %s\n' "$s" "$(cell "$s" idle kib_per_conn)"
  done
}

# table_medians: "median [min..max]" of every server and case but idle.
table_medians() {
  local c s
  printf '%-7s %-6s %-22s %-24s %-20s %-22s %s\n' case server "CPU µs/msg" "msgs/s" "p50 µs" "p99 µs" "sleeps/msg; cores server/lg/host/steal"
  for c in $CASES; do
    [[ $c == idle ]] && continue
    for s in $SERVERS; do
      printf '%-7s %-6s %-22s %-24s %-20s %-22s %-6s %s/%s/%s/%s\n' "$c" "$s" "$(cell "$s" "$c" cpu_us_per_msg)" \
        "$(cell "$s" "$c" msgs_per_s)" "$(cell "$s" "$c" p50_us)" "$(cell "$s" "$c" p99_us)" \
        "$(med "$s" "$c" sleeps_per_msg)" "$(med "$s" "$c" server_cpu_util)" "$(med "$s" "$c" lg_cpu_util)" "$(med "$s" "$c" host_cpu_util)" \
        "$(med "$s" "$c" steal_cpu_util)"
    done
  done
  echo
  echo "how evenly each server served its connections (closed-loop cases): Jain's"
  echo "index of bytes per connection (1 = all alike) and the least-served one's share of the mean"
  printf '%-7s %-6s %-26s %s\n' case server fairness least_share
  for c in $CASES; do
    [[ $c == pp* || $c == pipe* ]] || continue
    for s in $SERVERS; do
      printf '%-7s %-6s %-26s %s\n' "$c" "$s" "$(cell "$s" "$c" fairness)" "$(cell "$s" "$c" least_share)"
    done
  done
}
