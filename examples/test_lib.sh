# shellcheck shell=bash
# test_lib.sh — what the example test scripts share.  Source it as
#
#   . "$(dirname "$0")/test_lib.sh" NAME
#
# and it gives a fresh temporary directory $DIR (removed on exit), the
# list PIDS of background processes the script started (add each with
# `started $!`; forget one it has waited for with `reaped PID`, so its
# number, free again, is never killed), a trap that kills what is left
# of them by PID on exit, `fail MESSAGE` (says it, shows every *.out in
# $DIR, exits 1), and `wait_listening PROG FILE WANT PID` (until FILE
# holds WANT "PROG: listening on" lines; fails if PID dies or 10 s pass).
DIR=$(mktemp -d "${TMPDIR:-/tmp}/loom-$1-test.XXXXXX") || exit 1
PIDS=()

started() { PIDS+=("$1"); }

reaped() {
  local keep=() p
  for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

test_cleanup() {
  local p
  for p in "${PIDS[@]}"; do
    kill -KILL "$p" 2>/dev/null && wait "$p" 2>/dev/null
  done
  rm -rf "$DIR"
}
trap test_cleanup EXIT
trap 'exit 1' INT TERM

fail() {
  echo "FAIL: $*"
  local f
  for f in "$DIR"/*.out; do
    [ -f "$f" ] && { echo "--- $(basename "$f"):"; cat -A "$f" | cut -c1-200; }
  done
  exit 1
}

wait_listening() {
  local n=0
  for _ in $(seq 100); do
    n=$(grep -c "^$1: listening on " "$2")
    [ "$n" -ge "$3" ] && return
    kill -0 "$4" 2>/dev/null || fail "$1 exited at startup"
    sleep 0.1
  done
  fail "$1 did not start listening in 10 s ($n of $3 addresses)"
}
