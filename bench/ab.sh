#!/usr/bin/env bash
# bench/ab.sh — two builds of the micro benchmarks side by side: each case
# runs once per build per round, alternating, and the table shows the
# medians and every run.  For "did this change move anything": the host
# is noisy, so compare only numbers taken in the same run.
#
#   bench/ab.sh OLD_BENCH_DIR NEW_BENCH_DIR     e.g. /tmp/old/bench build/bench
#
# Environment: ROUNDS=6; CASES, a ';'-separated list of "binary args..."
# (default: the yield, chan and sync cases of bench/run.sh); FIELD, the
# RESULT field compared (default ns_per_op; e.g. cold_ns_per_op for
# spawn, recycled_ns_per_op for sync cancel).
set -euo pipefail
old=${1:?usage: bench/ab.sh OLD_BENCH_DIR NEW_BENCH_DIR}
new=${2:?usage: bench/ab.sh OLD_BENCH_DIR NEW_BENCH_DIR}
rounds=${ROUNDS:-6}
field=${FIELD:-ns_per_op}
cases=${CASES:-"yield;chan pingpong 2000000 1;chan select 1000000 2;chan mpmc 2000000 2;sync mutex 2000000 2;sync cancel 10000 2"}

ns() { # the $field of a RESULT line (the field itself, not one ending so)
  "$@" 2>/dev/null | sed -n "s/.* $field=\([0-9.]*\).*/\1/p" | tail -1
}
median() {
  printf '%s\n' "$@" | sort -g |
    awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'
}

printf '| case | old ns/op | new ns/op | new/old | old runs | new runs |\n'
printf '|---|---|---|---|---|---|\n'
IFS=';' read -ra list <<<"$cases"
for c in "${list[@]}"; do
  read -ra argv <<<"$c"
  bin=${argv[0]}
  args=("${argv[@]:1}")
  o=() n=()
  for ((i = 0; i < rounds; i++)); do
    o+=("$(ns "$old/$bin" "${args[@]}")")
    n+=("$(ns "$new/$bin" "${args[@]}")")
  done
  mo=$(median "${o[@]}") mn=$(median "${n[@]}")
  ratio=$(awk -v a="$mo" -v b="$mn" 'BEGIN {printf "%.2f", (a > 0) ? b / a : 0}')
  printf '| %s | %s | %s | %s | %s | %s |\n' "$c" "$mo" "$mn" "$ratio" "${o[*]}" "${n[*]}"
done
