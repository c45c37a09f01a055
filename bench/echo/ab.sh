#!/usr/bin/env bash
# bench/echo/ab.sh — loom's echo server from two builds, side by side,
# under the same load generator: each case runs once per build per
# round, alternating, and the table shows the medians of the server's
# CPU per message and of the p99, with every run.  For "did this change
# move the server": bench/echo/run.sh compares loom with Go and the
# epoll reference, this compares loom with itself.
#
#   bench/echo/ab.sh OLD_BENCH_DIR NEW_BENCH_DIR   e.g. /tmp/old/bench build/bench
#
# Each BENCH_DIR is a build's bench/ (echo/loom_echo in it; the load
# generator is NEW's).  Environment: ROUNDS=4; CASES="pp64 pp1k rate1k"
# (as in run.sh: pp64, pp1k, pipe4k closed loop; rate64, rate1k at
# RATE=20000 a second); SECS=3 measured after WARMUP=1; PROCS=2;
# PORT_BASE=7600.  Loopback only; every server it starts it stops.
set -euo pipefail
old=${1:?usage: bench/echo/ab.sh OLD_BENCH_DIR NEW_BENCH_DIR}
new=${2:?usage: bench/echo/ab.sh OLD_BENCH_DIR NEW_BENCH_DIR}
rounds=${ROUNDS:-4}
cases=${CASES:-"pp64 pp1k rate1k"}
secs=${SECS:-3} warmup=${WARMUP:-1} procs=${PROCS:-2} rate=${RATE:-20000}
port=${PORT_BASE:-7600}
lg=$new/echo/loadgen
for f in "$old/echo/loom_echo" "$new/echo/loom_echo" "$lg"; do
  [[ -x $f ]] || { echo "ab.sh: no $f (build the bench_echo target)" >&2; exit 2; }
done

spid=
cleanup() { [[ -n $spid ]] && kill -9 "$spid" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT

# run SERVER_BIN CASE: one run; sets CPU and P99 (cpu_us_per_msg and
# p99_us of the load generator's RESULT line), "-" if it failed.
run() {
  local bin=$1 c=$2 a out
  local -a args
  CPU=- P99=-
  port=$((port + 1))
  a=127.0.0.1:$port
  "$bin" --addr "$a" --procs "$procs" >/dev/null 2>&1 &
  spid=$!
  if ! "$lg" wait --addr "$a" --timeout-ms 5000 >/dev/null 2>&1; then
    cleanup
    spid=
    return
  fi
  case $c in
    pp64) args=(pingpong --conns 64 --size 64 --inflight 1) ;;
    pp1k) args=(pingpong --conns 1000 --size 64 --inflight 1) ;;
    pipe4k) args=(pingpong --conns 64 --size 4096 --inflight 16) ;;
    rate64) args=(rate --conns 64 --size 64 --rate "$rate") ;;
    rate1k) args=(rate --conns 1000 --size 64 --rate "$rate") ;;
    *) echo "ab.sh: unknown case $c" >&2; exit 2 ;;
  esac
  out=$(timeout -k 2 60 "$lg" "${args[@]}" --addr "$a" --pid "$spid" --name "$c" \
    --impl loom --secs "$secs" --warmup "$warmup" 2>/dev/null | grep -m1 '^RESULT ' || true)
  kill -9 "$spid" 2>/dev/null; wait "$spid" 2>/dev/null || true
  spid=
  CPU=$(sed -n 's/.* cpu_us_per_msg=\([0-9.]*\).*/\1/p' <<<"$out")
  P99=$(sed -n 's/.* p99_us=\([0-9.]*\).*/\1/p' <<<"$out")
  CPU=${CPU:--} P99=${P99:--}
}

median() {
  printf '%s\n' "$@" | grep -v '^-$' | sort -g |
    awk '{a[NR] = $1} END {if (NR == 0) print "-"; else print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'
}

printf '| case | old CPU µs/msg | new CPU µs/msg | new/old | old p99 µs | new p99 µs | old runs | new runs |\n'
printf '|---|---|---|---|---|---|---|---|\n'
for c in $cases; do
  oc=() nc=() op=() np=()
  for ((i = 0; i < rounds; i++)); do
    run "$old/echo/loom_echo" "$c"
    oc+=("$CPU") op+=("$P99")
    run "$new/echo/loom_echo" "$c"
    nc+=("$CPU") np+=("$P99")
  done
  mo=$(median "${oc[@]}") mn=$(median "${nc[@]}")
  ratio=$(awk -v a="$mo" -v b="$mn" 'BEGIN {printf "%.2f", (a > 0 && b > 0) ? b / a : 0}')
  printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$c" "$mo" "$mn" "$ratio" \
    "$(median "${op[@]}")" "$(median "${np[@]}")" "${oc[*]}" "${nc[*]}"
done
