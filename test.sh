#!/usr/bin/env bash
# The project's one test command: ./test.sh
#
#   1. cargo test                      (the whole Rust suite; its totals are counted)
#   2. cargo build --release, start the binary on a free loopback port and
#      smoke-test it with curl and wscat (every REST endpoint, subscribe,
#      publish -> event, unsubscribe, ping/pong, an error, SIGTERM); then
#      the black-box Python clients of tests/clients against it (pytest)
#   3. operate it and try it: a second server with API_KEY set; the console
#      in headless Chromium (tests/browser/console.mjs, when Chromium and
#      playwright-core are installed); a real scrape of /metrics through
#      `promtool check metrics` (when promtool is installed); the key on
#      /metrics; the binary's own `healthcheck` subcommand
#   4. docker-compose config           (when docker-compose is installed)
#   5. Docker (when an engine answers): an image from the Dockerfile's final
#      stage around a musl binary built here; the same smoke test against it;
#      image metadata and size; the image's HEALTHCHECK turning `healthy`;
#      `docker stop` timing and exit code
#
# Every check prints `ok - NAME` or `not ok - NAME: DETAIL`; the last line is
# `N passed, M failed` and the exit status is non-zero when M > 0. Logs of the
# builds, the server and the container stay in target/test-sh/ for a look
# after a failure.
#
# Needs: cargo, curl, node + wscat (installed with npm when missing), python3
# with the packages of tests/clients/requirements.txt (pytest, requests,
# websockets), and for the Docker part a running engine plus the
# x86_64-unknown-linux-musl target.
# Optional outside CI (a clear SKIP line when missing, a failure when CI=true):
# promtool (Debian's prometheus), Debian's chromium and playwright-core in
# tests/browser/node_modules (npm install --prefix tests/browser).
# .ci/run installs all of that on a fresh Debian machine.

set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

# ---- settings ---------------------------------------------------------------

TARGET_DIR=${CARGO_TARGET_DIR:-target}
LOG_DIR=$TARGET_DIR/test-sh
MUSL_TARGET=x86_64-unknown-linux-musl
BIN_NAME=pubsub-backend

# Deadlines, in seconds. Nothing here sleeps for a fixed time: every wait
# polls for its condition and gives up at its deadline.
START_DEADLINE=20   # server start-up until the "listening on" line
REPLY_DEADLINE=10   # one WebSocket reply
EXIT_DEADLINE=15    # process exit after SIGTERM (the verdict uses STOP_BOUND)
HEALTH_DEADLINE=30  # a new container until its HEALTHCHECK says healthy
BROWSER_TIMEOUT=120 # the whole browser test, Chromium's start included
# A hung test must not hang CI: the whole suite, build included, normally
# takes one to two minutes on a cold 2-core machine.
CARGO_TEST_TIMEOUT=300
CLIENTS_TIMEOUT=600  # the Python client suite (tests/clients), about a minute

# The server flushes queues for at most SHUTDOWN_GRACE_SEC on shutdown. The
# stop checks below run with nothing queued, so a correct server needs no
# flushing at all and exits at once; 3 s is "well within" the 5 s grace and
# still leaves room for docker's own bookkeeping on a busy 2-core machine. A
# server that ignored SIGTERM (easy to do as PID 1) would instead hit docker's
# kill timeout (DOCKER_STOP_TIMEOUT) and be SIGKILLed with exit code 137.
SHUTDOWN_GRACE_SEC=5
STOP_BOUND=3
DOCKER_STOP_TIMEOUT=10

# A scratch image holds the static binary and nothing else; a few MiB is
# expected, so anything beyond this means something else slipped in.
IMAGE_MAX_BYTES=$((20 * 1024 * 1024))

# The browser test (a Node script) and the browser it drives.
BROWSER_DIR=tests/browser
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}

IMAGE_TAG=$BIN_NAME:test-sh-$$
CONTAINER=$BIN_NAME-test-sh-$$

# ---- bookkeeping ------------------------------------------------------------

PASSED=0
FAILED=0
TMP=$(mktemp -d "${TMPDIR:-/tmp}/pubsub-test.XXXXXX")
SERVER_PID=""
CONTAINER_STARTED=""
CONTAINER_RUN_AT=""
IMAGE_BUILT=""
declare -A WS_PID=() WS_FD=()

pass() { PASSED=$((PASSED + 1)); echo "ok - $1"; }
# fail NAME DETAIL: a DETAIL of several lines (a build log's tail) goes on
# "#   " lines under the verdict, so that every line keeps its meaning.
fail() {
  FAILED=$((FAILED + 1))
  echo "not ok - $1: ${2%%$'\n'*}"
  local line
  if [[ $2 == *$'\n'* ]]; then
    while IFS= read -r line; do echo "#   $line"; done <<<"${2#*$'\n'}"
  fi
}
skip() { echo "SKIP $1"; }
note() { echo "# $*"; }

# check NAME DETAIL CMD...: run CMD; pass or fail NAME with DETAIL on failure.
check() {
  local name=$1 detail=$2
  shift 2
  if "$@"; then pass "$name"; else fail "$name" "$detail"; fi
}

# Stop whatever this run started, on any exit (success, failure, Ctrl-C).
cleanup() {
  local name
  for name in "${!WS_PID[@]}"; do kill "${WS_PID[$name]}" 2>/dev/null || true; done
  if [[ -n $SERVER_PID ]]; then kill -KILL "$SERVER_PID" 2>/dev/null || true; fi
  if [[ -n $CONTAINER_STARTED ]]; then docker rm -f "$CONTAINER" >/dev/null 2>&1 || true; fi
  if [[ -n $IMAGE_BUILT ]]; then docker rmi -f "$IMAGE_TAG" >/dev/null 2>&1 || true; fi
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

now() { date +%s.%N; }
elapsed_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
less_than() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a < b) }'; }

# wait_until SECONDS CMD...: poll CMD every 0.1 s until it succeeds or time is up.
wait_until() {
  local deadline
  deadline=$(awk -v t="$(now)" -v d="$1" 'BEGIN { printf "%.3f", t + d }')
  shift
  until "$@"; do
    less_than "$(now)" "$deadline" || return 1
    sleep 0.1
  done
}

# ---- JSON matching ----------------------------------------------------------

# json_count FILE PATH=VALUE...: how many JSON objects in FILE have every
# PATH (dotted, e.g. error.code) equal to VALUE (objects compare as their JSON
# text; VALUE * matches any value that is present). FILE is either one JSON
# document (a REST body) or one per line (wscat's output). Node does the
# parsing because it is here anyway: wscat runs on it.
JSON_COUNT_JS='
const fs = require("fs");
const [file, ...conds] = process.argv.slice(1);
let text = "";
try { text = fs.readFileSync(file, "utf8"); } catch (e) { console.log(0); process.exit(0); }
let docs;
try { docs = [JSON.parse(text)]; } catch (e) {
  // wscat also writes its "> " input prompt to stdout, in front of a
  // message line: parse each line from its first "{".
  docs = text.split("\n").map(l => { try { return JSON.parse(l.slice(l.indexOf("{"))); } catch (e) { return undefined; } });
}
const get = (o, p) => p.split(".").reduce((v, k) => (v == null ? undefined : v[k]), o);
const show = v => (v !== null && typeof v === "object" ? JSON.stringify(v) : String(v));
const ok = o => o !== null && typeof o === "object" && conds.every(c => {
  const i = c.indexOf("=");
  const v = get(o, c.slice(0, i));
  const want = c.slice(i + 1);
  return v !== undefined && (want === "*" || show(v) === want);
});
console.log(docs.filter(ok).length);
'
json_count() { node -e "$JSON_COUNT_JS" "$@"; }
json_has() { [[ $(json_count "$@") -ge 1 ]]; }

# ---- HTTP -------------------------------------------------------------------

BASE=""          # http://127.0.0.1:PORT of the server under test
HTTP_STATUS=""

# http METHOD PATH [BODY]: one request; status in HTTP_STATUS, body in
# $TMP/body, headers in $TMP/headers.
http() {
  local args=(-sS -X "$1" -o "$TMP/body" -D "$TMP/headers" -w '%{http_code}' --max-time 5)
  if [[ $# -ge 3 ]]; then args+=(-H 'Content-Type: application/json' --data-binary "$3"); fi
  HTTP_STATUS=$(curl "${args[@]}" "$BASE$2" 2>"$TMP/curl.err") || HTTP_STATUS="curl failed: $(tr '\n' ' ' <"$TMP/curl.err")"
}

header_has() { grep -qiE "^$1:[[:space:]]*$2" "$TMP/headers"; }

# expect_http NAME STATUS [PATH=VALUE...]: judge the last http call: status,
# Content-Type: application/json (every response has it), body fields.
expect_http() {
  local name=$1 status=$2
  shift 2
  if [[ $HTTP_STATUS != "$status" ]]; then
    fail "$name" "expected $status, got $HTTP_STATUS, body: $(head -c 300 "$TMP/body" 2>/dev/null)"
  elif ! header_has Content-Type 'application/json'; then
    fail "$name" "no 'Content-Type: application/json' header"
  elif [[ $# -gt 0 ]] && ! json_has "$TMP/body" "$@"; then
    fail "$name" "body lacks $*: $(head -c 300 "$TMP/body")"
  else
    pass "$name"
  fi
}

# ---- WebSocket sessions with wscat ------------------------------------------
#
# A session is a wscat process whose stdin is a fifo that this script keeps
# open (so it never sees EOF, which would make wscat quit) and whose stdout
# (one received message per line when stdout is not a terminal) goes to
# $TMP/NAME.out. wscat drops lines typed before the connection is open and
# prints nothing when it opens, so ws_open pings until the pong arrives.

# ws_open NAME: connect a session to $BASE's /ws.
ws_open() {
  local name=$1 fd
  mkfifo "$TMP/$name.in"
  : >"$TMP/$name.out"
  # timeout: a hard upper bound, should the trap ever miss this process.
  timeout 300 wscat --no-color -c "${BASE/http:/ws:}/ws" \
    <"$TMP/$name.in" >"$TMP/$name.out" 2>"$TMP/$name.err" &
  WS_PID[$name]=$!
  exec {fd}<>"$TMP/$name.in"    # read-write: opening never blocks
  WS_FD[$name]=$fd
  wait_until "$REPLY_DEADLINE" ws_ready "$name"
}

ws_ready() {
  kill -0 "${WS_PID[$1]}" 2>/dev/null || return 2
  ws_send "$1" "{\"type\":\"ping\",\"request_id\":\"ready-$1\"}"
  sleep 0.1
  json_has "$TMP/$1.out" type=pong "request_id=ready-$1"
}

# ws_send NAME JSON: send one text frame.
ws_send() { printf '%s\n' "$2" >&"${WS_FD[$1]}"; }

# ws_expect NAME PATH=VALUE...: wait until the session received a matching message.
ws_expect() {
  local name=$1
  shift
  wait_until "$REPLY_DEADLINE" json_has "$TMP/$name.out" "$@"
}

ws_close() {
  [[ -n ${WS_PID[$1]:-} ]] || return 0
  local fd=${WS_FD[$1]}
  kill "${WS_PID[$1]}" 2>/dev/null || true
  wait "${WS_PID[$1]}" 2>/dev/null || true
  exec {fd}>&-
  unset "WS_PID[$1]" "WS_FD[$1]"
}

# ws_tail NAME: the last messages and any wscat error, on one line.
ws_tail() { tail -c 300 "$TMP/$1.out" | tr '\n' ' '; tr '\n' ' ' <"$TMP/$1.err" 2>/dev/null || true; }

# ws_check NAME SESSION PATH=VALUE...: a check that waits for a message.
ws_check() {
  local name=$1 session=$2
  shift 2
  if ws_expect "$session" "$@"; then pass "$name"; else fail "$name" "no message with $* within ${REPLY_DEADLINE}s; got: $(ws_tail "$session")"; fi
}

# ---- tools ------------------------------------------------------------------

ensure_wscat() {
  command -v wscat >/dev/null && return 0
  note "wscat missing: npm install -g wscat"
  npm install -g wscat >"$LOG_DIR/npm-wscat.log" 2>&1 && command -v wscat >/dev/null
}

# ---- 1. cargo test ----------------------------------------------------------

# The suite's own totals count: each Rust test is one passed or failed check.
# A build failure or a time-out, which leave no complete totals, counts as
# one more failure.
step_cargo_test() {
  local log=$LOG_DIR/cargo-test.log rc=0 passed failed ignored totals
  note "cargo test (log: $log)"
  # timeout kills cargo's whole process group, test binaries included.
  timeout -k 10 "$CARGO_TEST_TIMEOUT" cargo test --no-fail-fast </dev/null >"$log" 2>&1 || rc=$?
  read -r passed failed ignored < <(awk '
    /^test result:/ { for (i = 1; i <= NF; i++) {
      if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) g += $i } }
    END { print p + 0, f + 0, g + 0 }' "$log")
  totals="$passed passed, $failed failed, $ignored ignored"
  PASSED=$((PASSED + passed))
  FAILED=$((FAILED + failed))
  if [[ $rc -eq 0 ]]; then
    echo "ok - cargo test: $totals"
    return 0
  fi
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    fail "cargo test" "timed out after ${CARGO_TEST_TIMEOUT}s ($totals before that)"
  elif [[ $failed -gt 0 ]]; then
    echo "not ok - cargo test: $totals; failing:"
    grep -E '^test .* FAILED$' "$log" | sed 's/^/#   /' || true
  else
    fail "cargo test" "exit code $rc with no failed test counted (a build error?)"
  fi
  print_cargo_failures "$log"
}

# print_cargo_failures LOG: the failures section (each failing test's output,
# without stack backtraces, long lines cut) or, when there is none (a build
# error), the end of the log. The whole story stays in LOG.
print_cargo_failures() {
  note "from $1:"
  if grep -qx 'failures:' "$1"; then
    awk '
      /^failures:$/ { f = 1 }
      /^stack backtrace:/ { skip = 1; print "(stack backtrace omitted)"; next }
      /^---- |^failures:$/ { skip = 0 }
      f && !skip' "$1" | cut -c 1-400 | head -n 120 | sed 's/^/#   /'
  else
    tail -n 40 "$1" | sed 's/^/#   /'
  fi
}

# ---- 2. the release binary on loopback --------------------------------------

# The server under test runs with a clean environment, so that settings in
# the caller's shell (API_KEY, RING_SIZE, ...) cannot change the outcome.
# `exec`: run in the background, this function is a subshell, and $! must be
# the server itself, or SIGTERM would hit the subshell and orphan the server.
server_env() {
  exec env -i PATH="$PATH" RUST_BACKTRACE=1 LOG_LEVEL=INFO SHUTDOWN_GRACE_SEC="$SHUTDOWN_GRACE_SEC" "$@"
}

# listening_port LOGFILE: the port of the start-up line
# "... listening on 127.0.0.1:NNNNN ..." (PORT=0 lets the OS pick a free one).
listening_port() {
  grep -oE 'listening on [^ ]*:[0-9]+' "$1" 2>/dev/null | head -n 1 | grep -oE '[0-9]+$'
}

# server_listening LOGFILE
server_listening() {
  kill -0 "$SERVER_PID" 2>/dev/null || return 2
  [[ -n $(listening_port "$1") ]]
}

# start_server LABEL LOGFILE [NAME=VALUE...]: the release binary on a free
# loopback port, with the given settings on top of the clean environment.
# LABEL prefixes the check's name; BASE becomes the server's URL.
start_server() {
  local label=$1 log=$2 bin=$TARGET_DIR/release/$BIN_NAME
  shift 2
  server_env HOST=127.0.0.1 PORT=0 "$@" "$bin" </dev/null 2>"$log" >&2 &
  SERVER_PID=$!
  if wait_until "$START_DEADLINE" server_listening "$log"; then
    BASE=http://127.0.0.1:$(listening_port "$log")
    pass "${label}server starts and logs its address ($BASE)"
  else
    fail "${label}server starts" "no 'listening on 127.0.0.1:PORT' line within ${START_DEADLINE}s; log: $(tail -c 500 "$log")"
    return 1
  fi
}

# smoke LABEL SESSION: every REST endpoint and the WebSocket basics against
# $BASE. LABEL prefixes the check names, SESSION the wscat session names.
smoke() {
  local p=$1 s=$2 topic="smoke-test:1" id sub_events pub_events
  id=$(cat /proc/sys/kernel/random/uuid)

  http POST /topics "{\"name\":\"$topic\"}"
  expect_http "${p}POST /topics creates a topic (201)" 201 status=created "topic=$topic"
  http POST /topics "{\"name\":\"$topic\"}"
  expect_http "${p}POST /topics again is 409 TOPIC_EXISTS" 409 error.code=TOPIC_EXISTS
  http POST /topics '{"name":"bad name!"}'
  expect_http "${p}POST /topics with a bad name is 400 BAD_REQUEST" 400 error.code=BAD_REQUEST
  http GET /topics
  expect_http "${p}GET /topics lists the topic" 200 "topics.0.name=$topic" topics.0.subscribers=0
  http GET /health
  expect_http "${p}GET /health" 200 topics=1 subscribers=0
  check "${p}GET /health uptime_sec is an integer" "body: $(cat "$TMP/body")" \
    grep -qE '"uptime_sec": *[0-9]+[,}]' "$TMP/body"
  http GET /no-such-route
  expect_http "${p}unknown route is 404 NOT_FOUND" 404 error.code=NOT_FOUND
  http PUT /topics '{}'
  expect_http "${p}wrong method is 405 METHOD_NOT_ALLOWED" 405 error.code=METHOD_NOT_ALLOWED
  check "${p}405 carries an Allow header naming GET and POST" "headers: $(tr '\r\n' '  ' <"$TMP/headers")" \
    header_has Allow '(.*GET.*POST|.*POST.*GET)'

  if ! ws_open "${s}sub"; then
    fail "${p}WebSocket connects and answers a ping" "no pong within ${REPLY_DEADLINE}s; got: $(ws_tail "${s}sub")"
    return 0
  fi
  ws_open "${s}pub" || true
  ws_send "${s}sub" '{"type":"ping","request_id":"p1"}'
  ws_check "${p}ws ping -> pong" "${s}sub" type=pong request_id=p1
  ws_send "${s}sub" "{\"type\":\"subscribe\",\"topic\":\"$topic\",\"client_id\":\"smoke-sub\",\"request_id\":\"s1\"}"
  ws_check "${p}ws subscribe -> ack" "${s}sub" type=ack request_id=s1 status=ok "topic=$topic"

  ws_send "${s}pub" "{\"type\":\"publish\",\"topic\":\"$topic\",\"request_id\":\"m1\",\"message\":{\"id\":\"$id\",\"payload\":{\"n\":1,\"text\":\"hello\"}}}"
  ws_check "${p}ws publish -> ack to the publisher" "${s}pub" type=ack request_id=m1 status=ok
  ws_check "${p}ws publish -> event to the subscriber" "${s}sub" type=event "topic=$topic" \
    "message.id=$id" 'message.payload={"n":1,"text":"hello"}'
  sub_events=$(json_count "$TMP/${s}sub.out" type=event)
  pub_events=$(json_count "$TMP/${s}pub.out" type=event)
  check "${p}the event arrives once, and not at the (unsubscribed) publisher" \
    "subscriber got $sub_events events, publisher $pub_events" \
    test "$sub_events:$pub_events" = 1:0

  http GET /stats
  expect_http "${p}GET /stats counts the message and the subscriber" 200 \
    "topics.$topic.messages=1" "topics.$topic.subscribers=1"

  # HTTP publish reaches the WebSocket subscriber like a WebSocket publish.
  http POST "/topics/$topic/messages" '{"payload":{"n":2,"via":"http"}}'
  expect_http "${p}POST /topics/{name}/messages publishes (201)" 201 status=published "topic=$topic" seq=2
  ws_check "${p}HTTP publish -> event to the WebSocket subscriber" "${s}sub" type=event "topic=$topic" \
    seq=2 'message.payload={"n":2,"via":"http"}'
  http GET "/topics/$topic/messages?since_seq=1"
  expect_http "${p}GET /topics/{name}/messages?since_seq=1 returns it" 200 "topic=$topic" \
    messages.0.seq=2 'messages.0.payload={"n":2,"via":"http"}'

  ws_send "${s}sub" "{\"type\":\"unsubscribe\",\"topic\":\"$topic\",\"client_id\":\"smoke-sub\",\"request_id\":\"u1\"}"
  ws_check "${p}ws unsubscribe -> ack" "${s}sub" type=ack request_id=u1 status=ok
  http GET /stats
  expect_http "${p}GET /stats after unsubscribe" 200 "topics.$topic.subscribers=0"

  ws_send "${s}pub" "{\"type\":\"publish\",\"topic\":\"no-such-topic\",\"request_id\":\"e1\",\"message\":{\"id\":\"$id\",\"payload\":1}}"
  ws_check "${p}ws publish to a missing topic -> error TOPIC_NOT_FOUND" "${s}pub" \
    type=error request_id=e1 error.code=TOPIC_NOT_FOUND
  ws_close "${s}pub"
  ws_close "${s}sub"

  http DELETE "/topics/$topic"
  expect_http "${p}DELETE /topics/{name} (200)" 200 status=deleted "topic=$topic"
  http DELETE "/topics/$topic"
  expect_http "${p}DELETE of an unknown topic is 404" 404 'error.code=*'
}

# watch_shutdown SESSION: leave a subscribed connection open, to see that a
# stop tells it (info server_shutdown) before the process ends.
watch_shutdown() {
  http POST /topics '{"name":"shutdown-watch"}'
  ws_open "$1watch" || return 0
  ws_send "$1watch" '{"type":"subscribe","topic":"shutdown-watch","client_id":"watch","request_id":"w1"}'
  ws_expect "$1watch" type=ack request_id=w1 || true
}

# check_shutdown_notice LABEL SESSION
check_shutdown_notice() {
  if [[ -z ${WS_PID[$2watch]:-} ]]; then
    fail "$1an open WebSocket gets info server_shutdown" "the watching connection never opened"
    return 0
  fi
  ws_check "$1an open WebSocket gets info server_shutdown" "$2watch" type=info msg=server_shutdown
  ws_close "$2watch"
}

process_gone() { ! kill -0 "$1" 2>/dev/null; }

# quick_clean_exit CODE SECONDS: exit code 0 and faster than STOP_BOUND.
quick_clean_exit() { [[ $1 == 0 ]] && less_than "$2" "$STOP_BOUND"; }

stop_server() {
  local start took rc=0
  start=$(now)
  kill -TERM "$SERVER_PID"
  if ! wait_until "$EXIT_DEADLINE" process_gone "$SERVER_PID"; then
    fail "SIGTERM stops the server" "still running after ${EXIT_DEADLINE}s"
    return 0
  fi
  took=$(elapsed_since "$start")
  wait "$SERVER_PID" || rc=$?
  SERVER_PID=""
  check "SIGTERM: server exits 0 within ${STOP_BOUND}s (took ${took}s, exit $rc)" "took ${took}s, exit code $rc" \
    quick_clean_exit "$rc" "$took"
}

step_release_smoke() {
  note "cargo build --release (log: $LOG_DIR/build-release.log)"
  if ! cargo build --release </dev/null >"$LOG_DIR/build-release.log" 2>&1; then
    fail "cargo build --release" "see $LOG_DIR/build-release.log, its end:"$'\n'"$(tail -n 20 "$LOG_DIR/build-release.log")"
    return 0
  fi
  pass "cargo build --release"
  if ! command -v curl >/dev/null; then fail "curl" "not installed; smoke test not run"; return 0; fi
  if ! ensure_wscat; then fail "wscat" "missing and npm install -g wscat failed; smoke test not run"; return 0; fi
  start_server "" "$LOG_DIR/server.log" || return 0
  smoke "" host-
  watch_shutdown host-
  stop_server
  check_shutdown_notice "" host-
}

# ---- 2b. black-box clients ----------------------------------------------------

# tests/clients: pytest drives the release binary with independent Python
# clients (websockets, requests, raw sockets); each test starts its own
# servers on free loopback ports. Each pytest test counts as one check.
step_clients() {
  local log=$LOG_DIR/clients.log rc=0 bin=$TARGET_DIR/release/$BIN_NAME passed failed
  if [[ ! -x $bin ]]; then
    fail "client suite" "no release binary (see cargo build --release above)"
    return 0
  fi
  if ! python3 -c 'import pytest, requests, websockets' 2>/dev/null; then
    fail "client suite" "python3 lacks pytest, requests or websockets: python3 -m pip install -r tests/clients/requirements.txt"
    return 0
  fi
  note "python3 -m pytest -q tests/clients (log: $log)"
  # -p no:cacheprovider and no bytecode: the run leaves the work tree clean.
  PUBSUB_BIN=$bin PYTHONDONTWRITEBYTECODE=1 timeout -k 10 "$CLIENTS_TIMEOUT" \
    python3 -m pytest -q -rfE -p no:cacheprovider tests/clients </dev/null >"$log" 2>&1 || rc=$?
  # pytest's last line: "2 failed, 50 passed, 1 error in 41.3s"
  read -r passed failed < <(tail -n 1 "$log" | awk '{ for (i = 1; i < NF; i++) {
    if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^(failed|errors?)/) f += $i } }
    END { print p + 0, f + 0 }')
  PASSED=$((PASSED + passed))
  FAILED=$((FAILED + failed))
  if [[ $rc -eq 0 ]]; then
    echo "ok - client suite: $passed passed"
  elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
    fail "client suite" "timed out after ${CLIENTS_TIMEOUT}s"
  elif [[ $failed -gt 0 ]]; then
    echo "not ok - client suite: $passed passed, $failed failed:"
    grep -E '^(FAILED|ERROR) ' "$log" | cut -c 1-300 | sed 's/^/#   /' || true
  else
    fail "client suite" "pytest exit code $rc with no failed test counted; its log ends with:"$'\n'"$(tail -n 15 "$log")"
  fi
}

# ---- 3. operate it and try it ----------------------------------------------
#
# A second release server, with API_KEY set as in production: the browser
# test drives its console and leaves real traffic behind, which the scrape
# then shows and promtool checks.

OPS_KEY=""        # the API key of that server
BROWSER_RAN=""    # 1 once the browser test passed: its traffic is in the scrape

# browser_missing: what the browser test needs and is not installed, or nothing.
browser_missing() {
  local missing=()
  [[ -x $CHROMIUM ]] || missing+=("$CHROMIUM (apt-get install chromium)")
  command -v node >/dev/null || missing+=("node")
  [[ -f $BROWSER_DIR/node_modules/playwright-core/package.json ]] ||
    missing+=("playwright-core (npm install --prefix $BROWSER_DIR)")
  local IFS=","
  echo "${missing[*]}"
}

# browser_test: tests/browser/console.mjs against $BASE. Its `ok - ` and
# `not ok - ` lines are this script's checks; it saves the console's
# screenshot to $LOG_DIR/console.png (so a test run leaves the work tree
# clean; copy it over tests/browser/console.png, which README.md shows, to
# refresh that one), and on a failure one of each page to $LOG_DIR.
browser_test() {
  local missing rc=0 line oks=0 not_oks=0 log=$LOG_DIR/browser.log
  missing=$(browser_missing)
  if [[ -n $missing ]]; then
    if [[ ${CI:-} == true ]]; then
      fail "browser test" "missing ${missing//,/, }, and CI=true: .ci/run should have installed it"
    else
      skip "browser test: missing ${missing//,/, }"
    fi
    return 0
  fi
  note "headless Chromium drives the console (log: $log)"
  SCREENSHOT=$LOG_DIR/console.png ARTIFACTS_DIR=$LOG_DIR CHROMIUM=$CHROMIUM timeout -k 5 "$BROWSER_TIMEOUT" \
    node "$BROWSER_DIR/console.mjs" "$BASE" "$OPS_KEY" </dev/null >"$log" 2>&1 || rc=$?
  while IFS= read -r line; do
    case $line in
      "ok - "*)
        PASSED=$((PASSED + 1)) oks=$((oks + 1))
        echo "$line"
        ;;
      "not ok - "*)
        FAILED=$((FAILED + 1)) not_oks=$((not_oks + 1))
        echo "$line"
        ;;
      "# "*) echo "$line" ;;
    esac
  done <"$log"
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    fail "browser test" "timed out after ${BROWSER_TIMEOUT}s; its log ends with:"$'\n'"$(tail -n 10 "$log")"
  elif [[ $rc -ne 0 && $not_oks -eq 0 ]]; then
    fail "browser test" "exit code $rc without a failed check; its log ends with:"$'\n'"$(tail -n 10 "$log")"
  elif [[ $rc -eq 0 && $oks -eq 0 ]]; then
    fail "browser test" "exited 0 without a single check; see $log"
  elif [[ $rc -eq 0 ]]; then
    BROWSER_RAN=1
  fi
}

# scrape_metrics [CURL ARGS...]: GET /metrics; status in HTTP_STATUS, body in
# $TMP/metrics.txt, headers in $TMP/metrics.headers.
scrape_metrics() {
  HTTP_STATUS=$(curl -sS -o "$TMP/metrics.txt" -D "$TMP/metrics.headers" -w '%{http_code}' \
    --max-time 5 "$@" "$BASE/metrics" 2>"$TMP/curl.err") ||
    HTTP_STATUS="curl failed: $(tr '\n' ' ' <"$TMP/curl.err")"
}

# sample NAME: the value of the unlabelled series NAME in the last scrape.
sample() { awk -v name="$1" '$1 == name { print $2 }' "$TMP/metrics.txt"; }

metrics_checks() {
  scrape_metrics
  check "operate: GET /metrics without the key is 401" "got $HTTP_STATUS: $(head -c 200 "$TMP/metrics.txt")" \
    test "$HTTP_STATUS" = 401
  scrape_metrics -H "Authorization: Bearer $OPS_KEY"
  if [[ $HTTP_STATUS != 200 ]]; then
    fail "operate: GET /metrics with Authorization: Bearer KEY" "got $HTTP_STATUS: $(head -c 300 "$TMP/metrics.txt")"
    return 0
  fi
  cp "$TMP/metrics.txt" "$LOG_DIR/metrics.txt"
  check "operate: GET /metrics with Authorization: Bearer KEY is text/plain; version=0.0.4" \
    "headers: $(tr '\r\n' '  ' <"$TMP/metrics.headers")" \
    grep -qiE '^Content-Type:[[:space:]]*text/plain;[[:space:]]*version=0\.0\.4' "$TMP/metrics.headers"
  if command -v promtool >/dev/null; then
    local samples name
    samples=$(grep -vc '^#' "$LOG_DIR/metrics.txt")
    name="operate: promtool check metrics accepts a real scrape ($samples samples, $LOG_DIR/metrics.txt)"
    if promtool check metrics <"$TMP/metrics.txt" >"$TMP/promtool.out" 2>&1; then
      pass "$name"
    else
      fail "$name" "promtool says:"$'\n'"$(head -n 10 "$TMP/promtool.out")"
    fi
  elif [[ ${CI:-} == true ]]; then
    fail "promtool check metrics" "promtool is not installed, and CI=true: .ci/run should have installed Debian's prometheus"
  else
    skip "promtool: not installed (apt-get install prometheus); the scrape was not checked with promtool"
  fi
  [[ -n $BROWSER_RAN ]] || return 0
  # The browser published 3 messages, every subscriber read every event: each
  # event delivered was written and timed.
  local published delivered timed
  published=$(sample pubsub_messages_published_total)
  delivered=$(sample pubsub_events_delivered_total)
  timed=$(sample pubsub_publish_to_write_seconds_count)
  check "operate: the scrape counts the browser's 3 publishes and times each of its $delivered events" \
    "published $published, delivered $delivered, histogram count $timed" \
    test "$published:$timed" = "3:$delivered"
}

# healthcheck_rc PORT: exit code of the binary's probe of 127.0.0.1:PORT in
# HC_RC, its stderr in $TMP/healthcheck.err.
healthcheck_rc() {
  HC_RC=0
  env -i PATH="$PATH" HOST=127.0.0.1 PORT="$1" timeout 10 "$TARGET_DIR/release/$BIN_NAME" healthcheck \
    </dev/null >/dev/null 2>"$TMP/healthcheck.err" || HC_RC=$?
}

# quiet_stop_server: SIGTERM and reap, without a verdict (step 2 judges that).
quiet_stop_server() {
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  wait_until "$EXIT_DEADLINE" process_gone "$SERVER_PID" || kill -KILL "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
}

step_operate() {
  local port
  if [[ ! -x $TARGET_DIR/release/$BIN_NAME ]]; then
    fail "operate" "no release binary (see cargo build --release above)"
    return 0
  fi
  OPS_KEY=ops-$(cat /proc/sys/kernel/random/uuid)
  start_server "operate: API_KEY " "$LOG_DIR/server-operate.log" API_KEY="$OPS_KEY" || return 0
  port=${BASE##*:}
  healthcheck_rc "$port"
  check "operate: \`$BIN_NAME healthcheck\` exits 0 against the running server" \
    "exit $HC_RC: $(cat "$TMP/healthcheck.err")" test "$HC_RC:$(cat "$TMP/healthcheck.err")" = 0:
  browser_test
  metrics_checks
  quiet_stop_server
  healthcheck_rc "$port"
  check "operate: \`$BIN_NAME healthcheck\` fails with a message once the server is gone (exit $HC_RC: $(head -n 1 "$TMP/healthcheck.err"))" \
    "exit $HC_RC, stderr: $(cat "$TMP/healthcheck.err")" \
    test "$HC_RC" -ne 0 -a "$HC_RC" -ne 124 -a -s "$TMP/healthcheck.err"
}

# ---- 4. docker-compose.yml --------------------------------------------------

step_compose_config() {
  if ! command -v docker-compose >/dev/null; then
    skip "docker-compose config: docker-compose is not installed"
    return 0
  fi
  check "docker-compose config accepts docker-compose.yml" \
    "$(docker-compose -f docker-compose.yml config -q 2>&1 | tail -n 5 | tr '\n' ' ')" \
    docker-compose -f docker-compose.yml config -q
}

# ---- 5. the Docker image ----------------------------------------------------

# final_stage_dockerfile: the Dockerfile from its last FROM on, with the one
# `COPY --from=... SRC DEST` replaced by `COPY pubsub-backend DEST`, so that
# the final stage's own instructions wrap the binary built on this host (the
# builder stage needs a Rust base image that cannot be pulled here).
final_stage_dockerfile() {
  awk -v bin="$BIN_NAME" '
    { line[NR] = $0 }
    toupper($1) == "FROM" { from = NR }
    END {
      for (i = from; i <= NR; i++) {
        n = split(line[i], w, /[ \t]+/)
        if (toupper(w[1]) == "COPY" && w[2] ~ /^--from=/) { print "COPY " bin " " w[n]; copies++ }
        else print line[i]
      }
      if (copies != 1) { print "expected exactly one COPY --from= in the final stage, found " copies + 0 > "/dev/stderr"; exit 1 }
    }' Dockerfile
}

build_test_image() {
  local ctx=$TMP/docker-context bin=$TARGET_DIR/$MUSL_TARGET/release/$BIN_NAME
  if ! rustup target list --installed 2>/dev/null | grep -qx "$MUSL_TARGET"; then
    note "rustup target add $MUSL_TARGET"
    rustup target add "$MUSL_TARGET" >"$LOG_DIR/rustup.log" 2>&1 || true
  fi
  note "cargo build --release --target $MUSL_TARGET (log: $LOG_DIR/build-musl.log)"
  if ! cargo build --release --target "$MUSL_TARGET" </dev/null >"$LOG_DIR/build-musl.log" 2>&1; then
    fail "static musl release build" "see $LOG_DIR/build-musl.log, its end:"$'\n'"$(tail -n 20 "$LOG_DIR/build-musl.log")"
    return 1
  fi
  pass "static musl release build"

  mkdir -p "$ctx"
  cp "$bin" "$ctx/$BIN_NAME"
  if ! final_stage_dockerfile >"$ctx/Dockerfile" 2>"$TMP/awk.err"; then
    fail "Dockerfile final stage" "$(cat "$TMP/awk.err")"
    return 1
  fi
  check "Dockerfile final stage is FROM scratch" "it starts with: $(head -n 1 "$ctx/Dockerfile")" \
    grep -qiE '^[[:space:]]*FROM[[:space:]]+scratch([[:space:]]|$)' "$ctx/Dockerfile"
  cp "$ctx/Dockerfile" "$LOG_DIR/Dockerfile.final-stage"

  # The classic builder: BuildKit is not available on our machines.
  if ! DOCKER_BUILDKIT=0 docker build -t "$IMAGE_TAG" "$ctx" >"$LOG_DIR/docker-build.log" 2>&1; then
    fail "docker build of the final stage" "see $LOG_DIR/docker-build.log, its end:"$'\n'"$(tail -n 10 "$LOG_DIR/docker-build.log")"
    return 1
  fi
  IMAGE_BUILT=1
  pass "docker build of the final stage"
}

inspect_image() {
  local fmt=$1
  docker image inspect -f "$fmt" "$IMAGE_TAG"
}

user_not_root() { [[ -n $1 && ${1%%:*} != 0 && ${1%%:*} != root ]]; }

# env_has "K=V K=V ..." K=V...: every K=V is one of the listed words.
env_has() {
  local have=" $1 " kv
  shift
  for kv in "$@"; do [[ $have == *" $kv "* ]] || return 1; done
}

check_image_metadata() {
  local user env ports entrypoint healthcheck size
  user=$(inspect_image '{{.Config.User}}')
  env=$(inspect_image '{{range .Config.Env}}{{.}} {{end}}')
  ports=$(inspect_image '{{json .Config.ExposedPorts}}')
  entrypoint=$(inspect_image '{{json .Config.Entrypoint}}')
  size=$(inspect_image '{{.Size}}')
  check "image runs as a non-root user ($user)" "Config.User is '$user'" user_not_root "$user"
  check "image sets HOST=0.0.0.0 PORT=8000 RING_SIZE=100 QUEUE_SIZE=100 LOG_LEVEL=INFO" "Env is: $env" \
    env_has "$env" HOST=0.0.0.0 PORT=8000 RING_SIZE=100 QUEUE_SIZE=100 LOG_LEVEL=INFO
  check "image exposes 8000/tcp" "ExposedPorts: $ports" test "$ports" = '{"8000/tcp":{}}'
  check "image entrypoint is the binary in exec form" "Entrypoint: $entrypoint" \
    test "$entrypoint" = "[\"/$BIN_NAME\"]"
  healthcheck=$(inspect_image '{{if .Config.Healthcheck}}{{json .Config.Healthcheck.Test}}{{end}}')
  check "image HEALTHCHECK runs the binary itself ($healthcheck)" "Healthcheck.Test: '$healthcheck'" \
    test "$healthcheck" = "[\"CMD\",\"/$BIN_NAME\",\"healthcheck\"]"
  check "image size $(awk -v s="$size" 'BEGIN { printf "%.2f MiB", s / 1048576 }') is under $((IMAGE_MAX_BYTES / 1048576)) MiB" \
    "$size bytes" test "$size" -lt "$IMAGE_MAX_BYTES"
}

container_listening() {
  [[ $(docker inspect -f '{{.State.Running}}' "$CONTAINER" 2>/dev/null) == true ]] || return 2
  docker logs "$CONTAINER" >"$LOG_DIR/container.log" 2>&1
  [[ -n $(listening_port "$LOG_DIR/container.log") ]]
}

# free_port: a port of 127.0.0.1 that nothing listens on (the OS picks it).
free_port() {
  node -e 'const s = require("net").createServer().listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close(); });'
}

# The container shares the host's network namespace (--network host) and
# binds 127.0.0.1 on a port the OS picked free: no port clash with anything
# on this machine, and the test traffic stays on loopback instead of going to
# the bridge network's private addresses. The port is fixed before the start
# (not PORT=0) because the image's HEALTHCHECK probes $PORT. The image's own
# HOST/PORT defaults are checked in its metadata above.
start_container() {
  local port
  port=$(free_port)
  docker rm -f "$CONTAINER" >/dev/null 2>&1 || true
  CONTAINER_RUN_AT=$(now)
  if ! docker run -d --name "$CONTAINER" --network host \
    -e HOST=127.0.0.1 -e PORT="$port" -e SHUTDOWN_GRACE_SEC="$SHUTDOWN_GRACE_SEC" \
    "$IMAGE_TAG" >"$TMP/run.out" 2>&1; then
    fail "docker run" "$(cat "$TMP/run.out")"
    return 1
  fi
  CONTAINER_STARTED=1
  if ! wait_until "$START_DEADLINE" container_listening; then
    fail "container starts and logs its address" "within ${START_DEADLINE}s; state: $(docker inspect -f '{{.State.Status}} exit {{.State.ExitCode}}' "$CONTAINER"); log: $(docker logs "$CONTAINER" 2>&1 | tail -c 500)"
    return 1
  fi
  BASE=http://127.0.0.1:$(listening_port "$LOG_DIR/container.log")
  pass "container starts and logs its address ($BASE)"
  check_container_user
}

# The process really runs as the image's user: ask the kernel, not docker.
check_container_user() {
  local pid uid
  pid=$(docker inspect -f '{{.State.Pid}}' "$CONTAINER")
  uid=$(awk '/^Uid:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo unknown)
  check "container process runs as uid 65534 (uid $uid)" "uid is $uid" test "$uid" = 65534
}

container_health() {
  docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}no health status{{end}}' "$CONTAINER" 2>/dev/null
}
container_healthy() { [[ $(container_health) == healthy ]]; }

# The image's HEALTHCHECK (the binary probing its own /health, every 10 s)
# must find the running container healthy: a FROM scratch image has no shell
# or curl that could do it instead.
check_container_health() {
  if wait_until "$HEALTH_DEADLINE" container_healthy; then
    pass "docker: the image's HEALTHCHECK reports the container healthy ($(elapsed_since "$CONTAINER_RUN_AT")s after docker run)"
  else
    fail "docker: the image's HEALTHCHECK reports the container healthy" \
      "still '$(container_health)' after ${HEALTH_DEADLINE}s; probes: $(docker inspect -f '{{if .State.Health}}{{range .State.Health.Log}}[exit {{.ExitCode}}] {{.Output}} {{end}}{{end}}' "$CONTAINER" 2>&1 | tr '\n' ' ' | tail -c 400)"
  fi
}

stop_container() {
  local start took code
  start=$(now)
  docker stop -t "$DOCKER_STOP_TIMEOUT" "$CONTAINER" >/dev/null 2>&1 || true
  took=$(elapsed_since "$start")
  code=$(docker inspect -f '{{.State.ExitCode}}' "$CONTAINER")
  docker logs "$CONTAINER" >"$LOG_DIR/container.log" 2>&1 || true
  check "docker stop ends the container within ${STOP_BOUND}s, exit 0 (took ${took}s, exit $code)" \
    "took ${took}s (docker's kill timeout is ${DOCKER_STOP_TIMEOUT}s), exit code $code" \
    quick_clean_exit "$code" "$took"
}

step_docker() {
  if ! timeout 20 docker info >/dev/null 2>&1; then
    if [[ ${CI:-} == true ]]; then
      fail "docker" "no Docker engine answers (docker info failed), and CI=true: .ci/run should have started one"
    else
      skip "docker: no Docker engine answers (docker info failed); CI starts one"
    fi
    return 0
  fi
  build_test_image || return 0
  check_image_metadata
  if ! command -v wscat >/dev/null; then fail "wscat" "missing; container smoke test not run"; return 0; fi
  start_container || return 0
  smoke "docker: " docker-
  check_container_health
  watch_shutdown docker-
  stop_container
  check_shutdown_notice "docker: " docker-
}

# ---- 5. long soak (only with LONG_SOAK_SECS set) -----------------------------

# LONG_SOAK_SECS=600 ./test.sh also runs the churn soak of tests/it/soak.rs
# for that many seconds (the normal suite runs it for 30): clients connecting,
# subscribing, publishing and vanishing, then threads, descriptors, memory and
# /health counts checked back at their idle baseline.
step_long_soak() {
  [[ -n ${LONG_SOAK_SECS:-} ]] || return 0
  local log=$LOG_DIR/long-soak.log rc=0
  local test=soak::churn_leaves_no_thread_descriptor_subscription_or_memory_behind
  if [[ ! $LONG_SOAK_SECS =~ ^[0-9]+$ ]]; then
    fail "long soak" "LONG_SOAK_SECS=$LONG_SOAK_SECS is not a number of seconds"
    return 0
  fi
  note "long soak: ${LONG_SOAK_SECS}s (log: $log)"
  SOAK_SECS=$LONG_SOAK_SECS timeout -k 10 $((LONG_SOAK_SECS + 300)) \
    cargo test --test it -- --exact "$test" --nocapture </dev/null >"$log" 2>&1 || rc=$?
  if [[ $rc -eq 0 ]] && grep -q '^test result: ok. 1 passed' "$log"; then
    pass "long soak: ${LONG_SOAK_SECS}s of churn, back to idle ($(grep -m1 -oE '[0-9]+ connections' "$log"))"
  else
    fail "long soak" "exit code $rc after up to ${LONG_SOAK_SECS}s"
    print_cargo_failures "$log"
  fi
}

# ---- main -------------------------------------------------------------------

main() {
  rm -rf "$LOG_DIR"
  mkdir -p "$LOG_DIR"
  step_cargo_test
  step_release_smoke
  step_clients
  step_operate
  step_compose_config
  step_docker
  step_long_soak
  echo "$PASSED passed, $FAILED failed"
  [[ $FAILED -eq 0 ]]
}

main "$@"
