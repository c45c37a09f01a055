#!/usr/bin/env bash
# chat_test.sh SERVER CLIENT — chat_server and chat_clients on loopback,
# for ctest (examples/CMakeLists.txt).
#
#   1. alice (over Unix), bob and carol (over TCP) at once: each waits for
#      the other two, says /who and its lines (spaces, a tab, UTF-8, "* "
#      and "/" inside, one of exactly --max-line bytes), and must receive
#      every line of the other two exactly once, byte for byte, in the
#      order said; the /who reply lists all three (nobody leaves before
#      hearing everyone).
#   2. An interactive client (stdin from a pipe): /nick, /who, end of
#      input, the server's goodbye, exit 0.
#   3. big sends a line over --max-line: the server logs it and closes
#      big alone; dave, in the room all along, gets frank's lines after.
#      A member that never reads is cut off when its queue is full.
#   4. A second server with --idle 1 closes a silent member (and stops at
#      SIGINT); a client with no server exits 1, bad options exit 2.
#   5. SIGTERM stops the main server: exit 0, a summary, no socket left.
#
# Servers listen on port 0 and print the address they got.  Every process
# is bounded (--duration, --timeout, timeout(1)) and the trap stops what
# is left by PID and removes the temporary directory.
set -u
export LC_ALL=C # bytes, whatever the locale

SERVER=$1 CLIENT=$2
# shellcheck source=examples/test_lib.sh
. "$(dirname "$0")/test_lib.sh" chat

# start_server NAME ARGS...: start a server in the background, set $SPID
# and wait for its "listening on" lines.
start_server() {
  local name=$1
  shift
  "$SERVER" "$@" --duration 50 >"$DIR/$name.out" 2>&1 &
  SPID=$!
  started "$SPID"
  wait_listening chat_server "$DIR/$name.out" \
    "$(printf '%s\n' "$@" | grep -c -- '--listen')" "$SPID"
}

# stop_server PID SIGNAL NAME: the server must exit 0 with its summary.
stop_server() {
  kill "-$2" "$1"
  wait "$1"
  local status=$?
  reaped "$1"
  [ "$status" -eq 0 ] || fail "$3 exited with $status after SIG$2"
  grep -q '^chat_server: room: ' "$DIR/$3.out" || fail "$3: no summary"
}

start_server server --listen tcp://127.0.0.1:0 --listen "unix://$DIR/chat.sock"
SERVER_PID=$SPID
TCP=$(sed -n 's|^chat_server: listening on \(tcp://.*\)|\1|p' "$DIR/server.out")
UNIX=$(sed -n 's|^chat_server: listening on \(unix://.*\)|\1|p' "$DIR/server.out")

# ---- 1. three at once -------------------------------------------------------
NICKS=(alice bob carol)
declare -A URL=([alice]=$UNIX [bob]=$TCP [carol]=$TCP)
lines_of() { # the last one is exactly --max-line (4096) bytes long
  printf '%s\n' /who "$1 says hello" "  spaces  around  " $'a\ttab' \
    "naïve café ☕ — $1" "* not a notice from $1" "a/b: c" "/$1" \
    "$1 $(head -c $((4096 - ${#1} - 1)) /dev/zero | tr '\0' L)"
}
PER=$(lines_of x | grep -vc "^/") # messages each says (not "/x")
CPIDS=()
for me in "${NICKS[@]}"; do
  args=(--connect "${URL[$me]}" --nick "$me" --expect $((2 * PER))
        --timeout 10)
  for peer in "${NICKS[@]}"; do
    [ "$peer" != "$me" ] && args+=(--peer "$peer")
  done
  mapfile -t says < <(lines_of "$me")
  for s in "${says[@]}"; do
    args+=(--say "$s")
  done
  timeout 20 "$CLIENT" "${args[@]}" >"$DIR/$me.out" 2>"$DIR/$me.err" &
  CPIDS+=($!)
  started $!
done
for i in "${!NICKS[@]}"; do
  wait "${CPIDS[$i]}" ||
    fail "${NICKS[$i]} exited with $?: $(cat "$DIR/${NICKS[$i]}.err")"
  reaped "${CPIDS[$i]}"
done
for me in "${NICKS[@]}"; do
  for peer in "${NICKS[@]}"; do
    [ "$peer" = "$me" ] && continue
    # "/who" and "/alice" (unknown) are commands, not messages.
    diff <(lines_of "$peer" | grep -v '^/' | sed "s/^/$peer: /") \
         <(grep -a "^$peer: " "$DIR/$me.out") >/dev/null ||
      fail "$me did not get $peer's lines exactly once, in order"
  done
  n=$(grep -avc '^\* ' "$DIR/$me.out")
  [ "$n" -eq $((2 * PER)) ] || fail "$me got $n messages"
  grep -a '^\* here (3): ' "$DIR/$me.out" | grep -w alice | grep -w bob |
    grep -qw carol || fail "$me: no /who reply listing all three"
  grep -qx "\* bye $me" "$DIR/$me.out" || fail "$me: no goodbye"
done
echo "ok: three clients, every line exactly once"

# ---- 2. interactive ---------------------------------------------------------
printf '/nick erin\r\n/who\n/nick no spaces\n' |
  timeout 20 "$CLIENT" --connect "$UNIX" >"$DIR/erin.out" 2>&1 ||
  fail "the interactive client exited with $?"
grep -a '^\* here (' "$DIR/erin.out" | grep -qw erin ||
  fail "erin: /who did not list erin"
grep -q '^\* a name is 1 to 32' "$DIR/erin.out" || fail "erin: bad nick taken"
grep -qx '\* bye erin' "$DIR/erin.out" || fail "erin: no goodbye"
echo "ok: interactive client"

# ---- 3. an oversized line closes only its sender ----------------------------
timeout 20 "$CLIENT" --connect "$TCP" --nick dave --peer frank --expect 2 \
  --timeout 10 >"$DIR/dave.out" 2>&1 &
DAVE=$!
started "$DAVE"
timeout 20 "$CLIENT" --connect "$TCP" --nick big --peer dave \
  --say "$(head -c 5000 /dev/zero | tr '\0' B)" --timeout 10 \
  >"$DIR/big.out" 2>&1
status=$?
[ "$status" -eq 1 ] || fail "big exited with $status, expected 1"
timeout 20 "$CLIENT" --connect "$UNIX" --nick frank --peer dave \
  --say "still" --say "here" --timeout 10 >"$DIR/frank.out" 2>&1 ||
  fail "frank exited with $?"
wait "$DAVE" || fail "dave exited with $?"
reaped "$DAVE"
[ "$(grep -av '^\* ' "$DIR/dave.out")" = $'frank: still\nfrank: here' ] ||
  fail "dave's messages are not frank's two lines"
grep -qx '\* big left' "$DIR/dave.out" || fail "dave did not see big leave"
grep -q '^chat_server: big (.*): a line longer than 4096 bytes, closing$' \
  "$DIR/server.out" || fail "the server did not log the oversized line"
echo "ok: an oversized line closes its sender only"

# ---- 3b. a member that never reads is cut off ------------------------------
joins() { grep -c ' joined (' "$DIR/server.out"; }
n=$(joins)
HOSTPORT=${TCP#tcp://}
exec 3<>"/dev/tcp/${HOSTPORT%:*}/${HOSTPORT##*:}" || fail "cannot connect"
for _ in $(seq 100); do [ "$(joins)" -gt "$n" ] && break; sleep 0.1; done
# 30 MB of lines: far more than the socket buffers and the 256 KiB queue.
head -c 30000000 /dev/zero | tr '\0' x | fold -w 1000 |
  timeout 20 cat >"/dev/tcp/${HOSTPORT%:*}/${HOSTPORT##*:}" ||
  fail "the flood did not go through"
exec 3<&-
grep -q '^chat_server: guest[0-9]* (.*): 262144 bytes behind, cut off$' \
  "$DIR/server.out" || fail "the member that never reads was not cut off"
echo "ok: a member that never reads is cut off"

# ---- 4. idle members, usage -------------------------------------------------
start_server idle --listen tcp://127.0.0.1:0 --idle 1
IDLE_PID=$SPID
IDLE_TCP=$(sed -n 's|^chat_server: listening on \(tcp://.*\)|\1|p' \
  "$DIR/idle.out")
timeout 20 "$CLIENT" --connect "$IDLE_TCP" --nick sleepy --expect 1 \
  --timeout 10 >"$DIR/sleepy.out" 2>&1
status=$?
[ "$status" -eq 1 ] || fail "sleepy exited with $status, expected 1"
grep -q '^\* bye sleepy: idle for 1 s$' "$DIR/sleepy.out" ||
  fail "sleepy was not closed for idleness"
stop_server "$IDLE_PID" INT idle
timeout 20 "$CLIENT" --connect "unix://$DIR/nobody.sock" --nick x \
  >"$DIR/nobody.out" 2>&1
[ $? -eq 1 ] || fail "a client with no server did not exit 1"
for bad in "--listen udp://127.0.0.1:0" "--idle -1" "--max-line 1" "--listen"
do
  # shellcheck disable=SC2086 # $bad is several words on purpose
  timeout 20 "$SERVER" $bad >/dev/null 2>&1
  [ $? -eq 2 ] || fail "chat_server $bad did not exit 2"
done
echo "ok: idle members, usage"

# ---- 5. a clean stop --------------------------------------------------------
stop_server "$SERVER_PID" TERM server
grep -q '^chat_server: tcp: .* 1 oversize' "$DIR/server.out" ||
  fail "the summary does not count the oversized line"
grep -q '^chat_server: room: .* [1-9][0-9]* dropped for slow members$' \
  "$DIR/server.out" || fail "the summary does not count the dropped line"
[ -e "$DIR/chat.sock" ] && fail "the server left its socket file behind"
# A sanitizer's report (an instrumented build) may hide behind exit 1.
grep -l -e 'Sanitizer' -e 'runtime error:' "$DIR"/*.out "$DIR"/*.err &&
  fail "a sanitizer complained"
cat "$DIR/server.out"
echo PASS
