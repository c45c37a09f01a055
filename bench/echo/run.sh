#!/usr/bin/env bash
# bench/echo/run.sh — the echo server side by side: loom (one coroutine per
# connection), Go (goroutine per connection, standard library) and a
# hand-written C epoll server (the practical limit), all driven by the same
# load generator (bench/echo/loadgen.c), which checks every byte.
#
#   bench/echo/run.sh [build-dir]        # default: $BUILD_DIR, else build
#
# Builds what it needs: the C programs with CMake in build-dir (configured
# Release if it has no CMakeCache.txt yet), go_echo with `go build`
# (GO111MODULE=off, a throw-away GOCACHE) into build-dir/bench/echo/.
#
# Each round runs every case once per server, in the order loom, go,
# epoll (A/B/C/A/B/C...): each run starts its server on a fresh loopback
# port, waits until it accepts, runs the load generator, kills the server
# by its PID.  The table shows the median and [min..max] over the rounds.
#
# Environment (all optional):
#   ROUNDS=7          rounds; at least 3 (7 take about 6 minutes)
#   SECS=3            measured seconds of a ping-pong run (after WARMUP_S)
#   WARMUP_S=0.5
#   PROCS=2           threads of every server: loom procs, GOMAXPROCS,
#                     epoll threads
#   CASES="pp64 pp1k pipe4k storm rate64 idle"   (rate1k also works)
#                     pp64, pp1k, pipe4k: closed loop (loadgen pingpong):
#                     each connection sends when its echo is back, so
#                     the latency is mostly queueing at whichever side
#                     (server or load generator) is the bottleneck;
#                     rate64, rate1k: open loop (loadgen rate), 64 or
#                     1,000 connections sharing RATE messages/s sent on a
#                     fixed schedule, below what any server here can
#                     take: latency as a client of a server that is not
#                     saturated sees it, and CPU per message including
#                     the cost of sleeping and waking between messages
#   RATE=20000        messages/s offered by the rate cases
#   SERVERS="loom go epoll"
#   STORM_N=5000 STORM_PARALLEL=64 IDLE_N=10000
#   PORT_BASE=19100   the servers listen on 127.0.0.1:PORT_BASE+k
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
CASES=${CASES:-pp64 pp1k pipe4k storm rate64 idle}
RATE=${RATE:-20000}
SERVERS=${SERVERS:-loom go epoll}
STORM_N=${STORM_N:-5000}
STORM_PARALLEL=${STORM_PARALLEL:-64}
IDLE_N=${IDLE_N:-10000}
PORT_BASE=${PORT_BASE:-19100}
BUDGET_S=${BUDGET_S:-540}
GO=${GO:-go}
BIN=$BUILD/bench/echo
LOADGEN=$BIN/loadgen

# ---- build -----------------------------------------------------------
configure_build new
cmake_build "the echo bench" bench_echo
need_go
make_tmp # the Go cache; the server running now is killed on any exit
go_build "$BIN/go_echo" bench/echo/go_echo.go

# ---- running ---------------------------------------------------------
start_server() { # start_server SERVER PORT: sets SPID
  local a=127.0.0.1:$2
  case $1 in
    loom) "$BIN/loom_echo" --addr "$a" --procs "$PROCS" & ;;
    go) "$BIN/go_echo" -addr "$a" -procs "$PROCS" & ;;
    epoll) "$BIN/epoll_echo" --addr "$a" --threads "$PROCS" & ;;
  esac
  SPID=$!
}

# run SERVER CASE: one run of CASE against a fresh SERVER.
run() { loadgen_run "$1" "$2" && print_run 5 "$1" "$2"; }

echo "echo bench: loom vs Go vs C epoll; $(nproc) CPUs, $ROUNDS rounds, ${SECS}s per ping-pong run, $PROCS server threads; $(date -u '+%Y-%m-%d %H:%M UTC')"
say_load_before
run_rounds cases_by_servers

# ---- summary ---------------------------------------------------------
echo
echo "medians of $rounds_done rounds [min..max]; CPU = server CPU time (all threads) per message"
echo "(storm: per connect-echo-close); latencies in µs"
table_medians

echo
echo "targets (on medians): loom CPU/msg <= 1.15x epoll and <= 0.8x go; loom p99 <= go p99"
printf '%-7s %-11s %-11s %-8s %-8s %-11s %-8s %s\n' case loom/epoll "<= 1.15" loom/go "<= 0.8" "p99 l/go" "<= 1" "all"
for c in $CASES; do
  [[ $c == idle ]] && continue
  le=$(div "$(med loom "$c" cpu_us_per_msg)" "$(med epoll "$c" cpu_us_per_msg)")
  lg=$(div "$(med loom "$c" cpu_us_per_msg)" "$(med go "$c" cpu_us_per_msg)")
  lp=$(div "$(med loom "$c" p99_us)" "$(med go "$c" p99_us)")
  m1=$(meets "$le" "<=" 1.15)
  m2=$(meets "$lg" "<=" 0.8)
  m3=$(meets "$lp" "<=" 1)
  all=yes
  [[ "$m1 $m2 $m3" == *NO* ]] && all=NO
  [[ "$m1 $m2 $m3" == *-* ]] && all=-
  printf '%-7s %-11s %-11s %-8s %-8s %-11s %-8s %s\n' "$c" "$le" "$m1" "$lg" "$m2" "$lp" "$m3" "$all"
done
table_idle "idle: $IDLE_N connections held, server RSS growth per connection (KiB; target loom <= 8)"
if [[ " $CASES " == *" idle "* ]]; then
  echo "  loom <= 8 KiB: $(meets "$(med loom idle kib_per_conn)" "<=" 8)"
fi

echo
say_load_after
finish
