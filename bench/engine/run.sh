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
#   CASES="pp64 pp1k pipe4k idle"   (storm also works: connect, one
#                                frame, close; idle: IDLE_N connections
#                                that each echo one frame, then wait:
#                                the server's RSS growth per connection;
#                                rate64 and rate1k: an open loop of RATE
#                                frames/s over 64 or 1,000 connections,
#                                as in bench/echo/run.sh)
#   RATE=20000
#   SERVERS="engine go plain"
#   GO_WRITE=buffered go_lenpfx_echo's -write: buffered or frame
#   STORM_N=5000 STORM_PARALLEL=64 IDLE_N=10000
#   PORT_BASE=19400   the servers listen on 127.0.0.1:PORT_BASE+k
#   BUDGET_S=540      start no round that would end after this; no run
#                     goes on past BUDGET_S + 30 s either
#   GO=go
#
# The shell helpers it shares with the other bench scripts are in bench/lib.sh.
set -u -o pipefail
# shellcheck source-path=SCRIPTDIR source=../lib.sh
. "$(dirname "$0")/../lib.sh" || exit 2

bench_init "${1:-}"
ROUNDS=${ROUNDS:-7}
SECS=${SECS:-3}
WARMUP_S=${WARMUP_S:-0.5}
PROCS=${PROCS:-2}
CASES=${CASES:-pp64 pp1k pipe4k idle}
SERVERS=${SERVERS:-engine go plain}
RATE=${RATE:-20000}
GO_WRITE=${GO_WRITE:-buffered}
STORM_N=${STORM_N:-5000}
STORM_PARALLEL=${STORM_PARALLEL:-64}
IDLE_N=${IDLE_N:-10000}
PORT_BASE=${PORT_BASE:-19400}
BUDGET_S=${BUDGET_S:-540}
GO=${GO:-go}
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
    pp64 | pp1k | pipe4k | storm | idle | rate64 | rate1k) ;;
    *) echo "run.sh: unknown case '$c' (pp64, pp1k, pipe4k, storm, idle, rate64, rate1k)" >&2; exit 2 ;;
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
configure_build always
cmake_build "${targets[*]}" "${targets[@]}"
make_tmp # the Go cache and the servers' logs; the server running now is killed on any exit
if has go; then
  need_go
  go_build "$BIN/go_lenpfx_echo" bench/engine/go_lenpfx_echo.go
fi

# ---- running ---------------------------------------------------------
LOG=$TMP/server.log

start_server() { # start_server SERVER PORT: sets SPID; output to $LOG
  local a=127.0.0.1:$2
  case $1 in
    engine) "$BUILD/examples/engine_echo" --listen "tcp://$a" --procs "$PROCS" >"$LOG" 2>&1 & ;;
    go) "$BIN/go_lenpfx_echo" -addr "$a" -procs "$PROCS" -write "$GO_WRITE" >"$LOG" 2>&1 & ;;
    plain) "$BUILD/bench/echo/loom_echo" --addr "$a" --procs "$PROCS" >"$LOG" 2>&1 & ;;
  esac
  SPID=$!
}

# The idle case holds IDLE_N connections; the servers inherit the limit.
[[ " $CASES " == *" idle "* ]] && ulimit -n "$(ulimit -Hn)"

# run SERVER CASE: one run of CASE against a fresh SERVER, framed.
run() { loadgen_run "$1" "$2" --frame 4 && print_run 6 "$1" "$2"; }

echo "engine bench: length-prefixed echo, servers: $SERVERS (go: -write $GO_WRITE); $(nproc) CPUs, $ROUNDS rounds, ${SECS}s per run, $PROCS server threads; $(date -u '+%Y-%m-%d %H:%M UTC')"
say_load_before
run_rounds cases_by_servers

# ---- summary ---------------------------------------------------------
echo
echo "medians of $rounds_done rounds [min..max]; CPU = server CPU time (all threads) per framed message"
echo "(storm: per connect-echo-close); latencies in µs"
table_medians

echo
echo "ratios of the medians (CPU µs/msg; p99): below 1 means the first is cheaper / faster"
printf '%-7s %-11s %-13s %-9s %-11s %s\n' case engine/go engine/plain go/plain "p99 e/go" "p99 e/plain"
for c in $CASES; do
  [[ $c == idle ]] && continue
  ce=$(med engine "$c" cpu_us_per_msg)
  cg=$(med go "$c" cpu_us_per_msg)
  cp=$(med plain "$c" cpu_us_per_msg)
  printf '%-7s %-11s %-13s %-9s %-11s %s\n' "$c" "$(div "$ce" "$cg")" "$(div "$ce" "$cp")" "$(div "$cg" "$cp")" \
    "$(div "$(med engine "$c" p99_us)" "$(med go "$c" p99_us)")" \
    "$(div "$(med engine "$c" p99_us)" "$(med plain "$c" p99_us)")"
done
table_idle "idle: $IDLE_N connections, each echoed one frame, then held: server RSS growth per connection (KiB)"

echo
say_load_after
finish
