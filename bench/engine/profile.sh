#!/usr/bin/env bash
# bench/engine/profile.sh — where the engine's user-space work per message
# goes, next to loom's plain echo: each server runs under callgrind (with
# its cache simulation) while loadgen drives a ping-pong, and only a
# window in the middle of the run is counted.  Instruction and simulated
# cache-miss counts do not depend on how busy the host is, so this can
# compare the two servers when timing cannot.  The kernel's share (the
# read and send themselves) is not counted: see run.sh for CPU time.
#
#   bench/engine/profile.sh [BUILD-DIR]
#
# Environment: SERVERS ("engine plain"), CONNS (1000), SIZE (64),
# SECS (10: the counted window), PORT_BASE (19500), ENGINE (the
# engine_echo binary to run, default BUILD's: give another build's to
# compare two versions).  Needs valgrind.
# Prints, per server, user-space instructions, data reads and writes,
# and L1 / last-level data misses per message, and keeps each server's
# callgrind file (callgrind_annotate reads them) in BUILD/bench/profile/.
set -u -o pipefail
. "$(dirname "$0")/../lib.sh" || exit 2

bench_init "${1:-}"
SERVERS=${SERVERS:-engine plain}
CONNS=${CONNS:-1000}
SIZE=${SIZE:-64}
SECS=${SECS:-10}
PORT_BASE=${PORT_BASE:-19500}
LOADGEN=$BUILD/bench/echo/loadgen
OUT=$BUILD/bench/profile

for t in valgrind callgrind_control callgrind_annotate; do
  command -v "$t" >/dev/null || { echo "profile.sh: needs $t (valgrind)" >&2; exit 2; }
done
ENGINE=${ENGINE:-$BUILD/examples/engine_echo}
configure_build new
cmake_build "engine_echo bench_loom_echo bench_echo_loadgen" engine_echo bench_loom_echo bench_echo_loadgen
make_tmp
mkdir -p "$OUT"
ulimit -n "$(ulimit -Hn)"

printf '%-7s %9s %9s %9s %9s %9s %9s %9s\n' server msgs Ir/msg Dr/msg Dw/msg D1miss/msg LLmiss/msg msgs/s
port=$PORT_BASE
for s in $SERVERS; do
  port=$((port + 1))
  a=127.0.0.1:$port
  case $s in
    engine) cmd=("$ENGINE" --listen "tcp://$a" --procs 1) ;;
    plain) cmd=("$BUILD/bench/echo/loom_echo" --addr "$a" --procs 1) ;;
    *) echo "profile.sh: unknown server '$s' (engine, plain)" >&2; exit 2 ;;
  esac
  cg=$OUT/callgrind.$s
  rm -f "$cg" "$cg".*
  valgrind --tool=callgrind --cache-sim=yes --instr-atstart=no \
    --callgrind-out-file="$cg" "${cmd[@]}" >"$TMP/$s.log" 2>&1 &
  SPID=$!
  if ! "$LOADGEN" wait --addr "$a" --timeout-ms 60000; then
    echo "profile.sh: $s did not start: $(tail -n 3 "$TMP/$s.log" | tr '\n' ' ')" >&2
    exit 1
  fi
  # Counted: the window loadgen measures, after a 5 s warm-up (the
  # connections made); callgrind_control takes a moment to get through,
  # so the two windows agree to about 1 % of 10 s.
  "$LOADGEN" pingpong --addr "$a" --pid "$SPID" --conns "$CONNS" --size "$SIZE" \
    --inflight 1 --frame 4 --warmup 5 --secs "$SECS" >"$TMP/$s.lg" 2>&1 &
  lg=$!
  sleep 5
  callgrind_control -i on "$SPID" >/dev/null 2>&1
  sleep "$SECS"
  callgrind_control -i off "$SPID" >/dev/null 2>&1
  wait "$lg" || { echo "profile.sh: loadgen failed: $(tail -n 3 "$TMP/$s.lg")" >&2; exit 1; }
  callgrind_control -d "$SPID" >/dev/null 2>&1
  kill "$SPID"
  wait "$SPID" 2>/dev/null
  SPID=
  line=$(grep -m1 '^RESULT ' "$TMP/$s.lg")
  msgs=$(field msgs "$line")
  rate=$(field msgs_per_s "$line")
  dump=$(ls -t "$cg".* 2>/dev/null | head -n 1)
  [[ -n $dump ]] || { echo "profile.sh: no callgrind dump for $s" >&2; exit 1; }
  # Totals: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw.
  read -r ir dr dw _ d1r d1w _ dlr dlw < <(callgrind_annotate "$dump" 2>/dev/null |
    awk '/PROGRAM TOTALS/ {n = 0; for (i = 1; i <= NF; i++) if ($i ~ /^[0-9,]+$/) { gsub(",", "", $i); printf "%s ", $i; n++ } print ""; exit}')
  awk -v s="$s" -v m="$msgs" -v rate="$rate" -v ir="$ir" -v dr="$dr" -v dw="$dw" \
    -v d1="$((d1r + d1w))" -v dl="$((dlr + dlw))" 'BEGIN {
      printf "%-7s %9d %9.0f %9.0f %9.0f %9.1f %9.2f %9.0f\n", s, m, ir / m, dr / m, dw / m, d1 / m, dl / m, rate }'
done
echo "(messages: loadgen's count over the ${SECS} s window; under valgrind, 1 server thread; files in $OUT)"
