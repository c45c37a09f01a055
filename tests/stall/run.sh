#!/usr/bin/env bash
#
# tests/stall/run.sh — run test cases while the host "takes the CPUs away".
#
#     tests/stall/run.sh BUILD_DIR [REGEX] [ROUNDS]
#
# A shared VM loses its vCPUs now and then: the whole process stops for
# tens of milliseconds, then every clock has jumped and every timer that
# was due fires at once.  A test that asserts "X happens before a deadline
# N ms away" fails then, though nothing is wrong; a runtime that loses a
# wake-up when many things become due at the same moment hangs.  This
# script reproduces it on purpose: it runs each ctest case of BUILD_DIR
# whose name (module/name, as `ctest -N` prints it) matches the
# extended regular expression REGEX (default: all), ROUNDS times each
# (default 3), and while a case runs it freezes the case's process — and
# every process it forked — with SIGSTOP for a random 20-80 ms, then
# SIGCONT, again and again at random gaps of 30-300 ms.
#
# It only ever signals processes it started: the case's process, and the
# descendants found under it while it is stopped (a stopped parent cannot
# reap a child, so a child's pid cannot be reused while we look).  A case
# runs with ctest's command, environment and working directory, and is
# killed (with its descendants) after twice its ctest timeout plus 30 s,
# so a hang is reported as a timeout and the run stays bounded.
#
# A stop is a little more than a VM's stall: on Linux, some blocking
# calls end with EINTR after a stop and a continue even with no signal
# handler (signal(7): epoll_wait, and recv/send/connect on a socket with
# SO_RCVTIMEO or SO_SNDTIMEO, among others).  Code that does not retry
# them fails here as it would under a debugger or Ctrl-Z: a bug too, but
# not one of timing.  Each case runs in a process group of its own (its
# parent, this script, in another), so the group is never orphaned and
# the kernel sends it no SIGHUP for having stopped members.
#
# At the end it prints, for each case that failed, how often and how (the
# last lines of its output); the full output of every failing round is
# kept in the log directory it names.  Exit status: 0 when every round of
# every case passed, 1 otherwise.
#
# Knobs (environment):
#   STALL_JOBS=2          cases run side by side (RESOURCE_LOCKs are kept)
#   STALL_MIN_MS=20 STALL_MAX_MS=80    length of one freeze
#   STALL_GAP_MIN_MS=30 STALL_GAP_MAX_MS=300    running time between freezes
#   STALL_SEED=N          seed of the random schedule (printed; default: time)
#   STALL_BUDGET_S=N      start no new case after N seconds (default: none)
#   STALL_LOGDIR=DIR      where failing rounds' output goes (default: mktemp)
#   STALL_EXCLUDE=REGEX   cases to leave out
#                         (default: ^(valgrind|install|gdb)/ — not loom's timing)
#
# Examples:
#   tests/stall/run.sh build                         # everything, 3 rounds
#   tests/stall/run.sh build '^netpoll/' 10          # one module, 10 rounds
#   tests/stall/run.sh build-asan '^chaos/ctx_tree$' 50
#
# A developer's tool: it is not part of `make test` or CI.

set -euo pipefail
if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  sed -n '3,54p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
exec python3 "$(dirname "$0")/stall.py" "$@"
