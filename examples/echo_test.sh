#!/usr/bin/env bash
# echo_test.sh SERVER CLIENT MODE — echo_server and echo_client against
# each other on loopback, for ctest (examples/CMakeLists.txt).
#
#   MODE tcp | unix | udp | unixgram   one server socket, clients against it
#   MODE all        every kind at once, in one server, clients in parallel
#   MODE usage      bad command lines exit 2; a client with no server exits 1
#
# The server listens on port 0 (the kernel picks a free port) and on
# socket files in a fresh temporary directory, and prints the addresses it
# got; the clients connect to those.  The server runs with --duration, so
# even a killed test leaves nothing running for long, and the trap stops
# it by PID and removes the directory.  Exits 0 when every exit status and
# check is as expected.
set -u

SERVER=$1 CLIENT=$2 MODE=$3
# shellcheck source=examples/test_lib.sh
. "$(dirname "$0")/test_lib.sh" echo

# expect STATUS CMD...: run CMD (bounded), its exit status must be STATUS.
expect() {
  local want=$1
  shift
  echo "+ $* (expect exit $want)"
  timeout 40 "$@"
  local got=$?
  [ "$got" -eq "$want" ] || fail "exit status $got, expected $want: $*"
}

if [ "$MODE" = usage ]; then
  for url in http://127.0.0.1:1 tcp://127.0.0.1 'tcp://::1:7000' \
             tcp://127.0.0.1:65536 unix:// unix://relative udp://:x; do
    expect 2 "$SERVER" --listen "$url" --duration 1
    expect 2 "$CLIENT" --connect "$url"
  done
  expect 2 "$SERVER" --listen
  expect 2 "$SERVER" --duration -1
  expect 2 "$SERVER" --procs 0
  expect 2 "$CLIENT" --connect udp://127.0.0.1:7000 --size 4
  expect 2 "$CLIENT" --count 0
  expect 2 "$CLIENT" --connect tcp://127.0.0.1:0
  expect 1 "$CLIENT" --connect "unix://$DIR/nobody.sock" --count 1
  expect 1 "$CLIENT" --connect "unixgram://$DIR/nobody.sock" --count 1
  echo PASS
  exit 0
fi

case $MODE in
  tcp)      LISTEN=(--listen tcp://127.0.0.1:0) ;;
  unix)     LISTEN=(--listen "unix://$DIR/echo.sock"
                    --listen "unix://@loom-echo-test-$$") ;;
  udp)      LISTEN=(--listen udp://127.0.0.1:0) ;;
  unixgram) LISTEN=(--listen "unixgram://$DIR/echo-dgram.sock") ;;
  all)      LISTEN=(--listen tcp://127.0.0.1:0 --listen udp://127.0.0.1:0
                    --listen "unix://$DIR/echo.sock"
                    --listen "unixgram://$DIR/echo-dgram.sock") ;;
  *)        echo "usage: $0 SERVER CLIENT tcp|unix|udp|unixgram|all|usage"
            exit 2 ;;
esac
WANT=$((${#LISTEN[@]} / 2))

"$SERVER" "${LISTEN[@]}" --duration 50 --quiet >"$DIR/server.out" 2>&1 &
SERVER_PID=$!
started "$SERVER_PID"
wait_listening echo_server "$DIR/server.out" "$WANT" "$SERVER_PID"
mapfile -t URLS < <(sed -n 's/^echo_server: listening on //p' \
                      "$DIR/server.out")

# Clients, in parallel: each URL gets a many-small-messages run, and a
# stream also a run of messages larger than the socket buffers.
CLIENTS=()
for url in "${URLS[@]}"; do
  case $url in
    udp*|unixgram*)
      timeout 40 "$CLIENT" --connect "$url" --conns 4 --count 300 \
        --size 1000 &
      CLIENTS+=($!) ;;
    *)
      timeout 40 "$CLIENT" --connect "$url" --conns 8 --count 500 \
        --size 100 &
      CLIENTS+=($!)
      timeout 40 "$CLIENT" --connect "$url" --conns 2 --count 20 \
        --size 300000 &
      CLIENTS+=($!) ;;
  esac
done
for pid in "${CLIENTS[@]}"; do
  wait "$pid" || fail "a client failed (exit status $?), see above"
done

# A clean stop: SIGTERM, exit 0, the Unix socket files removed.
kill -TERM "$SERVER_PID"
wait "$SERVER_PID"
status=$?
reaped "$SERVER_PID"
[ "$status" -eq 0 ] || fail "the server exited with $status after SIGTERM"
grep -q '^echo_server: served ' "$DIR/server.out" ||
  fail "the server did not print its summary"
for f in "$DIR"/*.sock; do
  [ -e "$f" ] && fail "the server left $f behind"
done
cat "$DIR/server.out"
echo PASS
