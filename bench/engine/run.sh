#!/usr/bin/env bash
# bench/engine/run.sh — loom's engine side by side with Go on a
# length-prefixed echo (a frame = 4-byte big-endian payload length, then
# the payload; every frame echoed back unchanged), with loom's plain byte
# echo as the baseline that shows what the engine layer costs:
#
#   engine  examples/engine_echo: a loom engine server with a
#           length-prefix codec, on_message writes the package back
#   go      bench/engine/go_lenpfx_echo.go: standard library, goroutine
#           per connection, bufio reader + io.ReadFull, bufio.Writer
#           flushed when no input is buffered (GO_WRITE=frame: one Write
#           per frame)
#   plain   bench/echo/loom_echo.c: loom coroutine per connection echoing
#           bytes, no decoding (framed traffic comes back identical)
#
# All three are driven by bench/echo/loadgen.c with --frame 4, which
# checks every byte of every echoed frame, header included.
#
#   bench/engine/run.sh [build-dir]      # default: $BUILD_DIR, else build
#
# Builds what it needs: the C programs with CMake in build-dir (configured
# anew, Release if it has no CMakeCache.txt yet; targets bench_echo_loadgen,
# bench_loom_echo and, for the engine, engine_echo), go_lenpfx_echo with
# `go build` (GO111MODULE=off, a throw-away GOCACHE) into
# build-dir/bench/engine/.
#
# Each round runs every case once per server, in the order engine, go,
# plain (A/B/C/A/B/C...): each run starts its server on a fresh loopback
# port, waits until it accepts, runs the load generator, kills the server
# by its PID.  The table shows the median and [min..max] over the rounds.
#
# Environment (all optional):
#   ROUNDS=7          rounds; at least 3 (7 take about 4 minutes)
#   SECS=3            measured seconds of a run (after WARMUP_S)
#   WARMUP_S=0.5
#   PROCS=2           threads of every server: loom procs, GOMAXPROCS
#   CASES="pp64 pp1k pipe4k"    (storm also works: connect, one frame,
#                                close)
#   SERVERS="engine go plain"
#   GO_WRITE=buffered go_lenpfx_echo's -write: buffered or frame
#   STORM_N=5000 STORM_PARALLEL=64
#   PORT_BASE=19400   the servers listen on 127.0.0.1:PORT_BASE+k
#   BUDGET_S=540      start no round that would end after this; no run
#                     goes on past BUDGET_S + 30 s either
#   GO=go
set -u -o pipefail

BUILD=${1:-${BUILD_DIR:-}}
if [[ -n $BUILD && $BUILD != /* ]]; then
  BUILD=$PWD/$BUILD
fi
cd "$(dirname "$0")/../.." || exit 2
BUILD=${BUILD:-$PWD/build}
ROUNDS=${ROUNDS:-7}
SECS=${SECS:-3}
WARMUP_S=${WARMUP_S:-0.5}
PROCS=${PROCS:-2}
CASES=${CASES:-pp64 pp1k pipe4k}
SERVERS=${SERVERS:-engine go plain}
GO_WRITE=${GO_WRITE:-buffered}
STORM_N=${STORM_N:-5000}
STORM_PARALLEL=${STORM_PARALLEL:-64}
PORT_BASE=${PORT_BASE:-19400}
BUDGET_S=${BUDGET_S:-540}
GO=${GO:-go}
unset LOOM_PROCS LOOM_SCHEDTRACE LOOM_STACK_SIZE GOMAXPROCS GOGC GODEBUG
START=$SECONDS
LOADGEN=$BUILD/bench/echo/loadgen
BIN=$BUILD/bench/engine

for s in $SERVERS; do
  case $s in
    engine | go | plain) ;;
    *) echo "run.sh: unknown server '$s' (engine, go, plain)" >&2; exit 2 ;;
  esac
done
for c in $CASES; do
  case $c in
    pp64 | pp1k | pipe4k | storm) ;;
    *) echo "run.sh: unknown case '$c' (pp64, pp1k, pipe4k, storm)" >&2; exit 2 ;;
  esac
done
has() { [[ " $SERVERS " == *" $1 "* ]]; }

# ---- build -----------------------------------------------------------
targets=(bench_echo_loadgen)
has plain && targets+=(bench_loom_echo)
if has engine; then
  if [[ ! -f examples/engine_echo.c ]]; then
    echo "run.sh: examples/engine_echo.c is not in this tree; run without the engine:" \
      "SERVERS=\"go plain\" $0" >&2
    exit 2
  fi
  targets+=(engine_echo)
fi
# Configured every time (it keeps the cache's settings): a build tree set
# up before a target such as engine_echo was added does not know it.
if [[ ! -f $BUILD/CMakeCache.txt ]]; then
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release >/dev/null || exit 2
else
  cmake -S . -B "$BUILD" >/dev/null || exit 2
fi
btype=$(sed -n 's/^CMAKE_BUILD_TYPE:[A-Z]*=//p' "$BUILD/CMakeCache.txt")
san=$(sed -n 's/^LOOM_SANITIZE:[A-Z]*=//p' "$BUILD/CMakeCache.txt")
case $btype in
  Release | RelWithDebInfo | MinSizeRel) ;;
  *) echo "run.sh: warning: $BUILD is a '$btype' build; the library is not optimised" >&2 ;;
esac
[[ -n $san ]] && echo "run.sh: warning: $BUILD uses sanitizers ($san); numbers are meaningless" >&2
if ! cmake --build "$BUILD" --target "${targets[@]}" -j2 >/dev/null; then
  echo "run.sh: building ${targets[*]} in $BUILD failed" >&2
  exit 2
fi
TMP=$(mktemp -d) # the Go cache and the servers' logs
SPID=            # the server running now, killed on any exit
cleanup() {
  [[ -n $SPID ]] && kill -9 "$SPID" 2>/dev/null
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
if has go; then
  if ! command -v "$GO" >/dev/null; then
    echo "run.sh: '$GO' not found; install Go or set GO=" >&2
    exit 2
  fi
  mkdir -p "$BIN" "$TMP/gocache"
  if ! GOCACHE=$TMP/gocache GO111MODULE=off GOFLAGS='' \
    "$GO" build -o "$BIN/go_lenpfx_echo" bench/engine/go_lenpfx_echo.go; then
    echo "run.sh: go build bench/engine/go_lenpfx_echo.go failed" >&2
    exit 2
  fi
fi

# ---- running ---------------------------------------------------------
declare -A SAMPLES # "server:case:field" -> values
declare -A FAILS   # "server:case" -> count
PORT=$PORT_BASE
SKIPPED=0
LOG=$TMP/server.log

field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$2"; }

start_server() { # start_server SERVER PORT: sets SPID; output to $LOG
  local a=127.0.0.1:$2
  case $1 in
    engine) "$BUILD/examples/engine_echo" --listen "tcp://$a" --procs "$PROCS" >"$LOG" 2>&1 & ;;
    go) "$BIN/go_lenpfx_echo" -addr "$a" -procs "$PROCS" -write "$GO_WRITE" >"$LOG" 2>&1 & ;;
    plain) "$BUILD/bench/echo/loom_echo" --addr "$a" --procs "$PROCS" >"$LOG" 2>&1 & ;;
  esac
  SPID=$!
}

stop_server() {
  kill -9 "$SPID" 2>/dev/null
  wait "$SPID" 2>/dev/null
  SPID=
}

# run SERVER CASE: one run of CASE against a fresh SERVER.
run() {
  local server=$1 case=$2 out line rc limit a
  limit=$((BUDGET_S + 30 - (SECONDS - START)))
  if ((limit <= 0)); then
    SKIPPED=$((SKIPPED + 1))
    return
  fi
  ((limit > 60)) && limit=60
  PORT=$((PORT + 1))
  a=127.0.0.1:$PORT
  start_server "$server" "$PORT"
  if ! "$LOADGEN" wait --addr "$a" --timeout-ms 5000; then
    FAILS[$server:$case]=$((${FAILS[$server:$case]:-0} + 1))
    echo "  $server $case FAILED: the server did not start: $(tail -n 3 "$LOG" | tr '\n' ' ')" >&2
    stop_server
    return
  fi
  local -a args=(--addr "$a" --pid "$SPID" --name "$case" --impl "$server" --frame 4)
  case $case in
    pp64) args=(pingpong "${args[@]}" --conns 64 --size 64 --inflight 1) ;;
    pp1k) args=(pingpong "${args[@]}" --conns 1000 --size 64 --inflight 1) ;;
    pipe4k) args=(pingpong "${args[@]}" --conns 64 --size 4096 --inflight 16) ;;
    storm) args=(storm "${args[@]}" --count "$STORM_N" --parallel "$STORM_PARALLEL" --size 64) ;;
  esac
  [[ $case == pp* || $case == pipe* ]] && args+=(--secs "$SECS" --warmup "$WARMUP_S")
  out=$(timeout -k 2 "$limit" "$LOADGEN" "${args[@]}" 2>&1)
  rc=$?
  local alive=1
  kill -0 "$SPID" 2>/dev/null || alive=0
  stop_server
  line=$(grep -m1 '^RESULT ' <<<"$out")
  if ((rc != 0 || !alive)) || [[ -z $line ]]; then
    FAILS[$server:$case]=$((${FAILS[$server:$case]:-0} + 1))
    echo "  $server $case FAILED (loadgen exit $rc$( ((rc == 124)) && echo ", timed out")$( ((!alive)) && echo ", server died")):" \
      "$(grep -v '^RESULT ' <<<"$out" | tail -n 3 | tr '\n' ' ')" >&2
    [[ -s $LOG ]] && echo "    server said: $(tail -n 3 "$LOG" | tr '\n' ' ')" >&2
    [[ -z $line ]] && return
  fi
  local f v
  for f in cpu_us_per_msg msgs_per_s p50_us p99_us \
    server_cpu_util lg_cpu_util host_cpu_util steal_cpu_util sleeps_per_msg; do
    v=$(field "$f" "$line")
    [[ -n $v ]] && SAMPLES[$server:$case:$f]+="$v "
  done
  printf '  %-6s %-6s cpu_us/msg=%-7s sleeps/msg=%-6s msgs/s=%-7s p50=%-7s p99=%-8s cores: server=%s lg=%s host=%s steal=%s\n' \
    "$server" "$case" "$(field cpu_us_per_msg "$line")" "$(field sleeps_per_msg "$line")" "$(field msgs_per_s "$line")" \
    "$(field p50_us "$line")" "$(field p99_us "$line")" "$(field server_cpu_util "$line")" \
    "$(field lg_cpu_util "$line")" "$(field host_cpu_util "$line")" "$(field steal_cpu_util "$line")"
}

# Host load before we start: busy CPUs over one second, from /proc/stat.
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

echo "engine bench: length-prefixed echo, servers: $SERVERS (go: -write $GO_WRITE); $(nproc) CPUs, $ROUNDS rounds, ${SECS}s per run, $PROCS server threads; $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "before start: load average $(cut -d' ' -f1-3 /proc/loadavg); CPUs busy over 1 s: $(host_busy) of $(nproc)"
rounds_done=0
longest=0
for ((r = 1; r <= ROUNDS; r++)); do
  if ((SECONDS - START + longest > BUDGET_S)); then
    echo "run.sh: another round would overrun the ${BUDGET_S}s budget; stopping after $rounds_done rounds" >&2
    break
  fi
  round_start=$SECONDS
  echo "round $r/$ROUNDS"
  for c in $CASES; do
    for s in $SERVERS; do run "$s" "$c"; done
  done
  rounds_done=$r
  ((SECONDS - round_start > longest)) && longest=$((SECONDS - round_start))
done

# ---- summary ---------------------------------------------------------
summ() { # "median min max n"
  printf '%s\n' "$@" | awk 'NF { a[n++] = $1 }
    END {
      if (n == 0) { print "- - - 0"; exit }
      for (i = 1; i < n; i++) { v = a[i]; for (j = i - 1; j >= 0 && a[j] > v; j--) a[j+1] = a[j]; a[j+1] = v }
      m = (n % 2) ? a[(n-1)/2] : (a[n/2-1] + a[n/2]) / 2
      printf "%s %s %s %d\n", g(m), g(a[0]), g(a[n-1]), n
    }
    function g(v) { return sprintf((v >= 10000) ? "%.0f" : "%.4g", v) }  # msgs/s, µs as integers'
}
med() { # med SERVER CASE FIELD -> median or "-"
  local -a vals
  read -ra vals <<<"${SAMPLES[$1:$2:$3]:-}"
  summ "${vals[@]}" | cut -d' ' -f1
}
cell() { # cell SERVER CASE FIELD -> "median [min..max]"
  local -a vals
  local m lo hi
  read -ra vals <<<"${SAMPLES[$1:$2:$3]:-}"
  read -r m lo hi _ <<<"$(summ "${vals[@]}")"
  if [[ $m == - ]]; then echo "-"; else echo "$m [$lo..$hi]"; fi
}
div() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2f\n", a / b }'; }

echo
echo "medians of $rounds_done rounds [min..max]; CPU = server CPU time (all threads) per framed message"
echo "(storm: per connect-echo-close); latencies in µs"
printf '%-7s %-6s %-22s %-24s %-20s %-22s %s\n' case server "CPU µs/msg" "msgs/s" "p50 µs" "p99 µs" "sleeps/msg; cores server/lg/host/steal"
for c in $CASES; do
  for s in $SERVERS; do
    printf '%-7s %-6s %-22s %-24s %-20s %-22s %-6s %s/%s/%s/%s\n' "$c" "$s" "$(cell "$s" "$c" cpu_us_per_msg)" \
      "$(cell "$s" "$c" msgs_per_s)" "$(cell "$s" "$c" p50_us)" "$(cell "$s" "$c" p99_us)" \
      "$(med "$s" "$c" sleeps_per_msg)" "$(med "$s" "$c" server_cpu_util)" "$(med "$s" "$c" lg_cpu_util)" "$(med "$s" "$c" host_cpu_util)" \
      "$(med "$s" "$c" steal_cpu_util)"
  done
done

echo
echo "ratios of the medians (CPU µs/msg; p99): below 1 means the first is cheaper / faster"
printf '%-7s %-11s %-13s %-9s %-11s %s\n' case engine/go engine/plain go/plain "p99 e/go" "p99 e/plain"
for c in $CASES; do
  ce=$(med engine "$c" cpu_us_per_msg)
  cg=$(med go "$c" cpu_us_per_msg)
  cp=$(med plain "$c" cpu_us_per_msg)
  printf '%-7s %-11s %-13s %-9s %-11s %s\n' "$c" "$(div "$ce" "$cg")" "$(div "$ce" "$cp")" "$(div "$cg" "$cp")" \
    "$(div "$(med engine "$c" p99_us)" "$(med go "$c" p99_us)")" \
    "$(div "$(med engine "$c" p99_us)" "$(med plain "$c" p99_us)")"
done

echo
echo "after: load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "(cores: host = this VM's CPUs busy during a run; host - server - lg is what other"
echo " processes here took; steal = CPU the hypervisor gave to other VMs on the shared"
echo " host.  Runs with much of either were disturbed.)"
nfail=0
for k in "${!FAILS[@]}"; do
  echo "failed runs: $k x${FAILS[$k]}"
  nfail=$((nfail + FAILS[$k]))
done
((SKIPPED > 0)) && echo "runs skipped for lack of time: $SKIPPED"
echo "total time: $((SECONDS - START)) s"
((nfail == 0))
