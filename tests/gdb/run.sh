#!/usr/bin/env bash
# tests/gdb/run.sh — check tools/loom-gdb.py against a live program.
#
#   run.sh TARGET [LOOM_GDB_PY]
#
# TARGET is tests/gdb/gdb_target.c built and linked with loom (ctest
# passes $<TARGET_FILE:loom_gdb_target>); LOOM_GDB_PY defaults to
# tools/loom-gdb.py of this source tree.  gdb runs TARGET itself (no
# attach, so no ptrace permission beyond the ordinary), in batch mode with
# stdin from /dev/null: no TTY needed.  Stops at loom_gdb_test_stop(),
# runs loom-coroutines and loom-bt, and checks that
#   - the three sleepers are listed as waiting, reason "sleep";
#   - main and the spinner are listed as running, each with its thread
#     (main's is the selected one, marked *);
#   - loom-bt of a sleeper shows loom_sleep <- deep_b <- deep_a <- sleeper;
#   - loom-bt of the spinner names the thread to switch to;
#   - loom-bt all shows each sleeper's stack;
#   - the borrowed thread's registers are the same afterwards, and the
#     program then runs to a normal exit.
# Exit 0: pass; 1: fail; 77: skipped (gdb cannot run a process here).
set -u

here=$(cd "$(dirname "$0")" && pwd)
target=${1:?usage: run.sh TARGET [LOOM_GDB_PY]}
script=${2:-$here/../../tools/loom-gdb.py}
gdb=${GDB:-gdb}

work=$(mktemp -d "${TMPDIR:-/tmp}/loom-gdb-test.XXXXXX")
trap 'rm -rf "$work"' EXIT
out=$work/out.txt

cat >"$work/cmds.gdb" <<EOF
set pagination off
set confirm off
set width 0
set height 0
set print thread-events off
break loom_gdb_test_stop
run
source $script
python
import re
regs = "info registers rip rsp rbp rbx r12 r13 r14 r15"
before = gdb.execute(regs, to_string=True)
listing = gdb.execute("loom-coroutines", to_string=True)
gdb.write("==> loom-coroutines\n" + listing)
row = re.compile(r"^\s*\*?\s*(\d+)\s+(\S+)\s+(.*)$")
sleeper = spinner = None
for line in listing.splitlines():
    m = row.match(line)
    if m and m.group(2) == "waiting" and "sleeper" in line and sleeper is None:
        sleeper = m.group(1)
    if m and m.group(2) == "running" and "spinner" in line:
        spinner = m.group(1)
gdb.write("==> loom-bt %s (a sleeper)\n" % sleeper)
gdb.execute("loom-bt %s" % sleeper)
gdb.write("==> loom-bt %s (the spinner)\n" % spinner)
gdb.execute("loom-bt %s" % spinner)
gdb.write("==> loom-bt all\n")
gdb.execute("loom-bt all")
gdb.write("==> end of loom-bt all\n")
after = gdb.execute(regs, to_string=True)
gdb.write("==> registers %s\n" % ("restored" if before == after
                                   else "CHANGED:\n" + before + after))
end
info coroutines -a
continue
EOF

tmo=
command -v timeout >/dev/null && tmo="timeout 120"
$tmo "$gdb" -nx -batch -iex 'set debuginfod enabled off' \
  -x "$work/cmds.gdb" "$target" </dev/null >"$out" 2>&1
rc=$?
cat "$out"

if ! grep -q 'hit Breakpoint 1, loom_gdb_test_stop' "$out"; then
  if grep -Eqi 'ptrace|Operation not permitted|Could not trace|not supported' \
       "$out"; then
    echo "SKIP: gdb cannot run a process here"
    exit 77
  fi
  echo "FAIL: the program never reached loom_gdb_test_stop (gdb exit $rc)"
  exit 1
fi

fail=0
check() { # check DESCRIPTION COMMAND...
  local what=$1
  shift
  if "$@"; then
    echo "ok:   $what"
  else
    echo "FAIL: $what"
    fail=1
  fi
}
# The listing, up to the first loom-bt.
listing=$(sed -n '/^==> loom-coroutines/,/^==> loom-bt/p' "$out")
bt=$(sed -n '/(a sleeper)$/,/^==> loom-bt .*(the spinner)$/p' "$out")

nsleep=$(grep -Ec '^ *[0-9]+ +waiting +sleep +sleeper at gdb_target\.c:[0-9]+ +main_co at gdb_target\.c' <<<"$listing")
check "3 sleepers waiting with reason sleep (found $nsleep)" [ "$nsleep" = 3 ]
check "main listed running, on the selected thread (marked *)" \
  grep -Eq '^\* +[0-9]+ +running +[0-9]+ \(M[0-9]+, P[0-9]+\) +main_co at' <<<"$listing"
check "spinner listed running, on another thread" \
  grep -Eq '^ +[0-9]+ +running +[0-9]+ \(M[0-9]+, P[0-9]+\) +spinner at' <<<"$listing"
# shellcheck disable=SC2317  # called through check()
bt_in_order() {
  grep -Eo ' in (loom_sleep|deep_b|deep_a|sleeper) ' <<<"$bt" | tr -d '\n' |
    grep -q ' in loom_sleep  in deep_b  in deep_a  in sleeper '
}
check "backtrace: loom_sleep, deep_b, deep_a, sleeper, in that order" bt_in_order
check "backtrace reaches the coroutine entry (g_entry)" \
  grep -q ' in g_entry ' <<<"$bt"
check "running coroutine: names the thread to switch to" \
  grep -Eq 'is running on thread [0-9]+ \(M[0-9]+\): switch to it with .thread [0-9]+.' "$out"
all=$(sed -n '/^==> loom-bt all$/,/^==> end of loom-bt all$/p' "$out")
nall=$(grep -c 'in loom_sleep .* in deep_b\|in deep_b ' <<<"$all")
check "loom-bt all: a backtrace through deep_b for each of the 3 sleepers (found $nall)" \
  [ "$nall" = 3 ]
check "registers of the borrowed thread restored" \
  grep -q '^==> registers restored' "$out"
# shellcheck disable=SC2317  # called through check()
no_python_errors() {
  ! grep -Eq 'Python Exception|Error (occurred in|while executing) Python' "$out"
}
check "no Python errors" no_python_errors
check "the program then exits normally" grep -q 'exited normally' "$out"
exit $fail
