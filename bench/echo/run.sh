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
#   CASES="pp64 pp1k pipe4k storm idle"
#   SERVERS="loom go epoll"
#   STORM_N=5000 STORM_PARALLEL=64 IDLE_N=10000
#   PORT_BASE=19100   the servers listen on 127.0.0.1:PORT_BASE+k
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
CASES=${CASES:-pp64 pp1k pipe4k storm idle}
SERVERS=${SERVERS:-loom go epoll}
STORM_N=${STORM_N:-5000}
STORM_PARALLEL=${STORM_PARALLEL:-64}
IDLE_N=${IDLE_N:-10000}
PORT_BASE=${PORT_BASE:-19100}
BUDGET_S=${BUDGET_S:-540}
GO=${GO:-go}
unset LOOM_PROCS LOOM_SCHEDTRACE LOOM_STACK_SIZE GOMAXPROCS GOGC GODEBUG
START=$SECONDS
BIN=$BUILD/bench/echo

# ---- build -----------------------------------------------------------
if [[ ! -f $BUILD/CMakeCache.txt ]]; then
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release >/dev/null || exit 2
fi
btype=$(sed -n 's/^CMAKE_BUILD_TYPE:[A-Z]*=//p' "$BUILD/CMakeCache.txt")
san=$(sed -n 's/^LOOM_SANITIZE:[A-Z]*=//p' "$BUILD/CMakeCache.txt")
case $btype in
  Release | RelWithDebInfo | MinSizeRel) ;;
  *) echo "run.sh: warning: $BUILD is a '$btype' build; the library is not optimised" >&2 ;;
esac
[[ -n $san ]] && echo "run.sh: warning: $BUILD uses sanitizers ($san); numbers are meaningless" >&2
if ! cmake --build "$BUILD" --target bench_echo -j2 >/dev/null; then
  echo "run.sh: building the echo bench in $BUILD failed" >&2
  exit 2
fi
if ! command -v "$GO" >/dev/null; then
  echo "run.sh: '$GO' not found; install Go or set GO=" >&2
  exit 2
fi
GOCACHE_TMP=$(mktemp -d)
SPID= # the server running now, killed on any exit
cleanup() {
  [[ -n $SPID ]] && kill -9 "$SPID" 2>/dev/null
  rm -rf "$GOCACHE_TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
if ! GOCACHE=$GOCACHE_TMP GO111MODULE=off GOFLAGS='' \
  "$GO" build -o "$BIN/go_echo" bench/echo/go_echo.go; then
  echo "run.sh: go build bench/echo/go_echo.go failed" >&2
  exit 2
fi

# ---- running ---------------------------------------------------------
declare -A SAMPLES # "server:case:field" -> values
declare -A FAILS   # "server:case" -> count
PORT=$PORT_BASE
SKIPPED=0

field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$2"; }

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
  if ! "$BIN/loadgen" wait --addr "$a" --timeout-ms 5000; then
    FAILS[$server:$case]=$((${FAILS[$server:$case]:-0} + 1))
    echo "  $server $case FAILED: the server did not start" >&2
    kill -9 "$SPID" 2>/dev/null
    wait "$SPID" 2>/dev/null
    SPID=
    return
  fi
  local -a args=(--addr "$a" --pid "$SPID" --name "$case" --impl "$server")
  case $case in
    pp64) args=(pingpong "${args[@]}" --conns 64 --size 64 --inflight 1) ;;
    pp1k) args=(pingpong "${args[@]}" --conns 1000 --size 64 --inflight 1) ;;
    pipe4k) args=(pingpong "${args[@]}" --conns 64 --size 4096 --inflight 16) ;;
    storm) args=(storm "${args[@]}" --count "$STORM_N" --parallel "$STORM_PARALLEL" --size 64) ;;
    idle) args=(idle "${args[@]}" --conns "$IDLE_N") ;;
  esac
  [[ $case == pp* || $case == pipe* ]] && args+=(--secs "$SECS" --warmup "$WARMUP_S")
  out=$(timeout -k 2 "$limit" "$BIN/loadgen" "${args[@]}" 2>&1)
  rc=$?
  local alive=1
  kill -0 "$SPID" 2>/dev/null || alive=0
  kill -9 "$SPID" 2>/dev/null
  wait "$SPID" 2>/dev/null
  SPID=
  line=$(grep -m1 '^RESULT ' <<<"$out")
  if ((rc != 0 || !alive)) || [[ -z $line ]]; then
    FAILS[$server:$case]=$((${FAILS[$server:$case]:-0} + 1))
    echo "  $server $case FAILED (loadgen exit $rc$( ((rc == 124)) && echo ", timed out")$( ((!alive)) && echo ", server died")):" \
      "$(grep -v '^RESULT ' <<<"$out" | tail -n 3 | tr '\n' ' ')" >&2
    [[ -z $line ]] && return
  fi
  local f v
  for f in cpu_us_per_msg msgs_per_s p50_us p99_us kib_per_conn \
    server_cpu_util lg_cpu_util host_cpu_util steal_cpu_util sleeps_per_msg; do
    v=$(field "$f" "$line")
    [[ -n $v ]] && SAMPLES[$server:$case:$f]+="$v "
  done
  if [[ $case == idle ]]; then
    printf '  %-5s %-6s kib_per_conn=%s rss_kib=%s (base %s)\n' "$server" "$case" \
      "$(field kib_per_conn "$line")" "$(field rss_kib "$line")" "$(field rss_base_kib "$line")"
  else
    printf '  %-5s %-6s cpu_us/msg=%-7s sleeps/msg=%-6s msgs/s=%-7s p50=%-7s p99=%-8s cores: server=%s lg=%s host=%s steal=%s\n' \
      "$server" "$case" "$(field cpu_us_per_msg "$line")" "$(field sleeps_per_msg "$line")" "$(field msgs_per_s "$line")" \
      "$(field p50_us "$line")" "$(field p99_us "$line")" "$(field server_cpu_util "$line")" \
      "$(field lg_cpu_util "$line")" "$(field host_cpu_util "$line")" "$(field steal_cpu_util "$line")"
  fi
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

echo "echo bench: loom vs Go vs C epoll; $(nproc) CPUs, $ROUNDS rounds, ${SECS}s per ping-pong run, $PROCS server threads; $(date -u '+%Y-%m-%d %H:%M UTC')"
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
      f = (m >= 10000) ? "%.0f" : "%.4g"  # msgs/s as an integer
      printf f " " f " " f " %d\n", m, a[0], a[n-1], n
    }'
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
meets() { awk -v v="$1" -v l="$2" 'BEGIN { if (v == "-") print "-"; else print (v + 0 <= l + 0) ? "yes" : "NO" }'; }

echo
echo "medians of $rounds_done rounds [min..max]; CPU = server CPU time (all threads) per message"
echo "(storm: per connect-echo-close); latencies in µs"
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
echo "targets (on medians): loom CPU/msg <= 1.15x epoll and <= 0.8x go; loom p99 <= go p99"
printf '%-7s %-11s %-11s %-8s %-8s %-11s %-8s %s\n' case loom/epoll "<= 1.15" loom/go "<= 0.8" "p99 l/go" "<= 1" "all"
nmiss=0
for c in $CASES; do
  [[ $c == idle ]] && continue
  le=$(div "$(med loom "$c" cpu_us_per_msg)" "$(med epoll "$c" cpu_us_per_msg)")
  lg=$(div "$(med loom "$c" cpu_us_per_msg)" "$(med go "$c" cpu_us_per_msg)")
  lp=$(div "$(med loom "$c" p99_us)" "$(med go "$c" p99_us)")
  m1=$(meets "$le" 1.15)
  m2=$(meets "$lg" 0.8)
  m3=$(meets "$lp" 1)
  all=yes
  [[ "$m1 $m2 $m3" == *NO* ]] && all=NO && nmiss=$((nmiss + 1))
  [[ "$m1 $m2 $m3" == *-* ]] && all=-
  printf '%-7s %-11s %-11s %-8s %-8s %-11s %-8s %s\n' "$c" "$le" "$m1" "$lg" "$m2" "$lp" "$m3" "$all"
done
if [[ " $CASES " == *" idle "* ]]; then
  echo
  echo "idle: $IDLE_N connections held, server RSS growth per connection (KiB; target loom <= 8)"
  for s in $SERVERS; do
    printf '  %-6s %s\n' "$s" "$(cell "$s" idle kib_per_conn)"
  done
  echo "  loom <= 8 KiB: $(meets "$(med loom idle kib_per_conn)" 8)"
fi

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
