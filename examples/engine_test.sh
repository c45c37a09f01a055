#!/usr/bin/env bash
# engine_test.sh SERVER CLIENT MODE — engine_echo and engine_echo_client
# against each other on loopback, for ctest (examples/CMakeLists.txt).
#
#   MODE plain     tcp, udp and unix listeners in one server; a client on
#                  each, then a Python client that frames by hand (the
#                  protocol, not our client, is what is checked)
#   MODE compress  the server and the clients with zlib streams, each end
#                  with its own window and memLevel, then a Python client
#                  that speaks zlib itself
#   MODE pool      the server hands messages to a task pool
#
# The server listens on port 0 and a socket file in a fresh temporary
# directory, prints the addresses it got, and is stopped with SIGTERM:
# it must stop gracefully and exit 0.  --duration bounds it even if this
# script is killed; the trap stops it by PID and removes the directory.
set -u

SERVER=$1 CLIENT=$2 MODE=$3
# shellcheck source=examples/test_lib.sh
. "$(dirname "$0")/test_lib.sh" engine

EXTRA=()
case $MODE in
  plain) ;;
  compress) EXTRA=(--compress 6 --compress-window 10 --compress-mem 2) ;;
  pool) EXTRA=(--pool 4) ;;
  *) echo "usage: $0 SERVER CLIENT plain|compress|pool"; exit 2 ;;
esac

"$SERVER" --listen tcp://127.0.0.1:0 --listen udp://127.0.0.1:0 \
  --listen "unix://$DIR/engine.sock" --duration 60 --metrics "${EXTRA[@]}" \
  >"$DIR/server.out" 2>&1 &
SERVER_PID=$!
started "$SERVER_PID"
wait_listening engine_echo "$DIR/server.out" 3 "$SERVER_PID"
TCP=$(sed -n 's/.*listening on \(tcp:\/\/.*\)/\1/p' "$DIR/server.out")
UDP=$(sed -n 's/.*listening on \(udp:\/\/.*\)/\1/p' "$DIR/server.out")
UNIX=$(sed -n 's/.*listening on \(unix:\/\/.*\)/\1/p' "$DIR/server.out")
if [ -z "$TCP" ] || [ -z "$UDP" ] || [ -z "$UNIX" ]; then fail "server did not listen"; fi

run() {
  echo "+ $*"
  timeout 40 "$@" || fail "exit status $?: $*"
}

# The client's own deadline (10 s by default) under the 40 s above: 5000
# compressed 70 KB frames took 11 s under TSan on a loaded machine.
CEXTRA=(--timeout 30)
[ "$MODE" = compress ] && CEXTRA+=(--compress 6)
run "$CLIENT" --connect "$TCP" --conns 8 --count 20000 --size 2000 "${CEXTRA[@]}"
run "$CLIENT" --connect "$UNIX" --conns 2 --count 5000 --size 70000 "${CEXTRA[@]}"
[ "$MODE" = compress ] &&
  run "$CLIENT" --connect "$TCP" --conns 2 --count 2000 --size 5000 "${CEXTRA[@]}" \
    --compress-window 9 --compress-mem 1
[ "$MODE" = compress ] || run "$CLIENT" --connect "$UDP" --conns 2 --count 2000 --size 1200 "${CEXTRA[@]}"

if [ "$MODE" = plain ] && command -v python3 >/dev/null; then
  # A client in another language: frames built by hand, pipelined, with
  # a zero-length frame and one split across many small writes.
  PORT=${TCP##*:}
  run python3 - "$PORT" <<'PY'
import os, socket, struct, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
frames = [b"", b"x"] + [os.urandom(n) for n in (3, 100, 4096, 65536, 300000)]
wire = b"".join(struct.pack(">I", len(f)) + f for f in frames)
half = len(wire) // 2
s.sendall(wire[:half])
for i in range(half, len(wire), 7):   # the rest dribbled in
    s.send(wire[i:i + 7])
s.shutdown(socket.SHUT_WR)            # half-close: the replies still come
got = b""
while True:
    c = s.recv(1 << 16)
    if not c:
        break
    got += c
assert got == wire, "echo differs: %d vs %d bytes" % (len(got), len(wire))
print("python client: %d frames, %d bytes intact" % (len(frames), len(wire)))
PY
fi

if [ "$MODE" = compress ] && command -v python3 >/dev/null; then
  # Another zlib user as the peer: Python's zlib with its defaults
  # (a 32 KiB window), a sync flush after each batch of frames, as
  # loom's writer does; the server compresses with a 1 KiB window.
  PORT=${TCP##*:}
  run python3 - "$PORT" <<'PY'
import os, socket, struct, sys, zlib
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
frames = [b"", b"x"] + [os.urandom(n) for n in (3, 100, 4096)] + \
         [bytes(range(256)) * 400, b"loom " * 20000]
wire = b"".join(struct.pack(">I", len(f)) + f for f in frames)
comp, dec = zlib.compressobj(6), zlib.decompressobj()
for i in range(0, len(wire), 3000):
    s.sendall(comp.compress(wire[i:i + 3000]) + comp.flush(zlib.Z_SYNC_FLUSH))
got = b""
while len(got) < len(wire):
    c = s.recv(1 << 16)
    assert c, "server closed after %d of %d bytes" % (len(got), len(wire))
    got += dec.decompress(c)
assert got == wire, "echo differs: %d vs %d bytes" % (len(got), len(wire))
assert dec.eof is False  # loom's stream never ends
print("python zlib client: %d frames, %d bytes intact" % (len(frames), len(wire)))
PY
fi

kill -TERM "$SERVER_PID"
wait "$SERVER_PID"
rc=$?
reaped "$SERVER_PID"
[ $rc -eq 0 ] || fail "server exit status $rc"
grep -q 'engine_echo_errors_total{kind="decode"} 0' "$DIR/server.out" ||
  fail "server counted decode errors"
echo PASS
