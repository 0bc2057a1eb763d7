#!/usr/bin/env bash
# The project's one test command: ./test.sh
#
# It runs `cargo test` first, then only what `cargo test` cannot do: build the
# shipped artefacts and drive them with outside clients and tools.
#
#   1. cargo test: the unit tests and the integration tests of tests/it/, which
#      cover the server's behaviour (every REST route and error, the WebSocket
#      protocol, fan-out, replay, shutdown, metrics, the healthcheck
#      subcommand, ...); each Rust test counts as one check here. Their
#      clients record what they exchange (PUBSUB_API_RECORD) for step 1b.
#  1b. the API documents: openapi-spec-validator on docs/openapi.json, the
#      AsyncAPI parser (tests/api/validate-asyncapi.mjs) on docs/asyncapi.json,
#      then tests/api/check_traffic.py: every frame and response of the
#      recorded traffic against the two documents, and every documented route
#      asked of the debug binary
#   2. the release binary: one end-to-end smoke test with curl and wscat
#      (health, create a topic, subscribe, publish -> the event arrives), then
#      with the binary's own client (create, sub --count 3 in the background,
#      pub from stdin -> its three events, topics), SIGTERM -> a quick exit 0;
#      then the Python client suite of tests/clients against it (pytest; each
#      test counts as one check)
#   3. a release server with API_KEY set: the console in headless Chromium
#      (tests/browser/console.mjs), then `promtool check metrics` on a scrape
#   4. docker-compose.yml: `docker-compose config` accepts it, and it passes
#      every setting of `--help` but HOST and PORT from the shell, restating
#      no default
#   5. the Docker image: the Dockerfile's final stage around a static musl
#      binary built here; its metadata (user, ENV, port, entrypoint,
#      HEALTHCHECK, size); the same smoke test against the container, ended
#      by `docker stop`; its HEALTHCHECK turning healthy
#
# Every check prints `ok - NAME` or `not ok - NAME: DETAIL`; the last line is
# `N passed, M failed` and the exit status is non-zero when M > 0. Nothing
# sleeps for a fixed time: every wait polls until a deadline. Logs of the
# builds, the servers and the container stay in target/test-sh/.
#
# Needs: cargo, curl, node + wscat (installed with npm when missing), python3
# with tests/clients/requirements.txt (pytest, requests, websockets).
# Optional outside CI (a SKIP line naming what is missing; with CI=true a
# failure): the API checks' openapi-spec-validator, jsonschema, referencing
# and regress (also in tests/clients/requirements.txt) and @asyncapi/parser
# (npm ci --prefix tests/api), promtool (Debian's prometheus), Debian's
# chromium with playwright-core (npm ci --prefix tests/browser),
# docker-compose, a Docker engine (the musl target is added with rustup when
# missing). .ci/run installs all of that on a fresh Debian machine.

set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

# ---- settings ---------------------------------------------------------------

TARGET_DIR=${CARGO_TARGET_DIR:-target}
LOG_DIR=$TARGET_DIR/test-sh
MUSL_TARGET=x86_64-unknown-linux-musl
BIN_NAME=pubsub-backend
RELEASE_BIN=$TARGET_DIR/release/$BIN_NAME
DEBUG_BIN=$TARGET_DIR/debug/$BIN_NAME
# What cargo test's clients exchanged with the server (tests/it/record.rs).
API_TRAFFIC_DIR=$LOG_DIR/api-traffic
MUSL_BIN=$TARGET_DIR/$MUSL_TARGET/release/$BIN_NAME

# Deadlines, in seconds.
START_DEADLINE=20      # start-up until the "listening on" line
REPLY_DEADLINE=10      # one WebSocket reply or event
EXIT_DEADLINE=15       # exit after SIGTERM (the verdict uses STOP_BOUND)
HEALTH_DEADLINE=30     # a new container until its HEALTHCHECK says healthy
BROWSER_TIMEOUT=120    # the browser test, Chromium's start included
CARGO_TEST_TIMEOUT=300 # one to two minutes on a cold 2-core machine
CLIENTS_TIMEOUT=600    # the Python client suite, about a minute
API_CHECK_TIMEOUT=600  # the traffic checker, about a minute on a 2-core machine

# The server flushes queues for at most SHUTDOWN_GRACE_SEC (5 s unless set).
# The stops below find nothing queued, so a correct server exits at once; 3 s
# leaves room for docker's bookkeeping on a busy machine. A server ignoring
# SIGTERM (easy as PID 1) is SIGKILLed at docker's timeout instead: exit 137.
STOP_BOUND=3
DOCKER_STOP_TIMEOUT=10
# A scratch image holds the static binary alone, a few MiB.
IMAGE_MAX_BYTES=$((20 * 1024 * 1024))

BROWSER_DIR=tests/browser
API_DIR=tests/api
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
IMAGE_TAG=$BIN_NAME:test-sh-$$
CONTAINER=$BIN_NAME-test-sh-$$

# ---- bookkeeping ------------------------------------------------------------

PASSED=0 FAILED=0
TMP=$(mktemp -d "${TMPDIR:-/tmp}/pubsub-test.XXXXXX")
T_PASSED=0 T_FAILED=0 SERVER_PID="" WS_PID="" WS_FD="" SUB_PID="" CONTAINER_STARTED="" CONTAINER_RUN_AT="" IMAGE_BUILT=""

pass() { PASSED=$((PASSED + 1)); echo "ok - $1"; }
# fail NAME DETAIL: the lines of a DETAIL after its first (a log's tail) go
# under the verdict as "#   " lines.
fail() {
  FAILED=$((FAILED + 1))
  echo "not ok - $1: ${2%%$'\n'*}"
  local rest=${2#*$'\n'}
  if [[ $2 == *$'\n'* ]]; then echo "#   ${rest//$'\n'/$'\n'#   }"; fi
}
skip() { echo "SKIP $1"; }
note() { echo "# $*"; }

# check NAME DETAIL CMD...: run CMD; pass or fail NAME with DETAIL on failure.
check() {
  local name=$1 detail=$2
  shift 2
  if "$@"; then pass "$name"; else fail "$name" "$detail"; fi
}
expect_eq() { check "$1" "got '$2', expected '$3'" test "$2" = "$3"; } # NAME GOT WANT

# missing_tool NAME WHAT: a SKIP outside CI; with CI=true, where .ci/run
# should have installed it, a failure.
missing_tool() {
  if [[ ${CI:-} == true ]]; then
    fail "$1" "missing $2, and CI=true: .ci/run should have installed it"
  else
    skip "$1: missing $2"
  fi
}

# Stop whatever this run started, on any exit (success, failure, Ctrl-C).
cleanup() {
  if [[ -n $WS_PID ]]; then kill "$WS_PID" 2>/dev/null || true; fi
  if [[ -n $SUB_PID ]]; then kill "$SUB_PID" 2>/dev/null || true; fi
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

# wait_until SECONDS CMD...: poll CMD every 0.1 s until it succeeds, or says
# it never will (exit status 2: what it waits for is gone), or time is up.
wait_until() {
  local deadline rc
  deadline=$(awk -v t="$(now)" -v d="$1" 'BEGIN { printf "%.3f", t + d }')
  shift
  while true; do
    rc=0
    "$@" || rc=$?
    [[ $rc -ne 0 ]] || return 0
    [[ $rc -ne 2 ]] || return 2
    less_than "$(now)" "$deadline" || return 1
    sleep 0.1
  done
}

# count_totals LOG LINE_RE: sum the "N passed" into T_PASSED and the "N
# failed" (or "N error(s)") into T_FAILED over LOG's lines that match
# LINE_RE, and add them to this run's totals. For cargo test and pytest.
count_totals() {
  read -r T_PASSED T_FAILED < <(awk -v re="$2" '$0 ~ re { for (i = 1; i < NF; i++) {
    if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^(failed|errors?)/) f += $i } }
    END { print p + 0, f + 0 }' "$1")
  PASSED=$((PASSED + T_PASSED))
  FAILED=$((FAILED + T_FAILED))
}

# build NAME LOG CMD...: run a build with its output in LOG; pass NAME, or
# fail it with the end of LOG.
build() {
  local name=$1 log=$2
  shift 2
  note "$name (log: $log)"
  if "$@" </dev/null >"$log" 2>&1; then pass "$name"; return 0; fi
  fail "$name" "its log ends with:"$'\n'"$(tail -n 20 "$log")"
  return 1
}

# ---- clients: curl, wscat, JSON ---------------------------------------------

# json_has FILE PATH=VALUE...: some JSON object in FILE has every PATH (dotted,
# e.g. message.payload) equal to VALUE (objects as their JSON text; * is any
# value). FILE is one JSON document (a REST body) or one per line (wscat's
# output, where a "> " prompt may come first). Node parses: wscat runs on it.
JSON_HAS_JS='
const [file, ...conds] = process.argv.slice(1);
let text = "", docs;
try { text = require("fs").readFileSync(file, "utf8"); } catch (e) { process.exit(1); }
try { docs = [JSON.parse(text)]; } catch (e) {
  docs = text.split("\n").map(l => { try { return JSON.parse(l.slice(l.indexOf("{"))); } catch (e) { return null; } });
}
const get = (o, p) => p.split(".").reduce((v, k) => (v == null ? undefined : v[k]), o);
const show = v => (v !== null && typeof v === "object" ? JSON.stringify(v) : String(v));
const ok = o => o !== null && typeof o === "object" && conds.every(c => {
  const i = c.indexOf("="), v = get(o, c.slice(0, i)), want = c.slice(i + 1);
  return v !== undefined && (want === "*" || show(v) === want);
});
process.exit(docs.some(ok) ? 0 : 1);
'
json_has() { node -e "$JSON_HAS_JS" "$@"; }

BASE=""   # http://ADDR:PORT of the server under test, from its start-up line
WS_URL="" # ws://ADDR:PORT/ws, from the same line

# http METHOD PATH [BODY]: one request to $BASE; status in HTTP_STATUS, body
# in $TMP/body.
http() {
  local args=(-sS -X "$1" -o "$TMP/body" -w '%{http_code}' --max-time 5)
  if [[ $# -ge 3 ]]; then args+=(-H 'Content-Type: application/json' --data-binary "$3"); fi
  HTTP_STATUS=$(curl "${args[@]}" "$BASE$2" 2>"$TMP/curl.err") ||
    HTTP_STATUS="curl failed: $(tr '\n' ' ' <"$TMP/curl.err")"
}

# expect_http NAME STATUS [PATH=VALUE...]: judge the last http call.
expect_http() {
  local name=$1 status=$2
  shift 2
  if [[ $HTTP_STATUS != "$status" ]]; then
    fail "$name" "expected $status, got $HTTP_STATUS, body: $(head -c 300 "$TMP/body" 2>/dev/null)"
  elif [[ $# -gt 0 ]] && ! json_has "$TMP/body" "$@"; then
    fail "$name" "body lacks $*: $(head -c 300 "$TMP/body")"
  else
    pass "$name"
  fi
}

# The WebSocket subscriber: wscat, its stdin a fifo this script holds open (at
# EOF wscat would quit), its stdout (a message a line) in $TMP/ws.out. wscat
# drops what is written before its connection is open and prints nothing when
# it opens, so ws_subscribe repeats the subscribe until an ack comes back (a
# repeated subscribe is acked again and changes nothing).
ws_subscribe() {
  rm -f "$TMP/ws.in"
  mkfifo "$TMP/ws.in"
  : >"$TMP/ws.out"
  # timeout: a hard upper bound, should the trap ever miss this process.
  timeout 300 wscat --no-color -c "$WS_URL" <"$TMP/ws.in" >"$TMP/ws.out" 2>"$TMP/ws.err" &
  WS_PID=$!
  exec {WS_FD}<>"$TMP/ws.in" # read-write: opening never blocks
  wait_until "$REPLY_DEADLINE" ws_acked "$1"
}
ws_acked() {
  json_has "$TMP/ws.out" type=ack request_id=sub status=ok "topic=$1" && return 0
  kill -0 "$WS_PID" 2>/dev/null || return 2
  printf '{"type":"subscribe","topic":"%s","client_id":"test-sh","request_id":"sub"}\n' "$1" >&"$WS_FD"
  return 1
}
ws_close() {
  [[ -n $WS_PID ]] || return 0
  kill "$WS_PID" 2>/dev/null || true
  wait "$WS_PID" 2>/dev/null || true
  exec {WS_FD}>&-
  WS_PID=""
}
# ws_tail: the last messages and any wscat error, on one line.
ws_tail() { tail -c 300 "$TMP/ws.out" | tr '\n' ' '; tr '\n' ' ' <"$TMP/ws.err" 2>/dev/null || true; }

# ---- the artefact under test: start-up line, smoke test ---------------------

# read_start_line LOGFILE: the one place that reads the server's start-up
# line, for the release binary and the container alike:
#   ... pubsub-backend 0.1.0 listening on 127.0.0.1:PORT (REST http://127.0.0.1:PORT, WebSocket ws://127.0.0.1:PORT/ws)
# Sets BASE and WS_URL from it; fails while the line is not there yet.
read_start_line() {
  local line re=' listening on [^ ]+ \(REST (http://[^,]+), WebSocket (ws://[^)]+)\)'
  line=$(grep -m 1 ' listening on ' "$1" 2>/dev/null) || return 1
  [[ $line =~ $re ]] || return 1
  BASE=${BASH_REMATCH[1]}
  WS_URL=${BASH_REMATCH[2]}
}

# await_start LABEL LOGFILE ALIVE: wait for the start-up line in LOGFILE.
# ALIVE refreshes LOGFILE if need be, and fails once the server is gone.
await_start() {
  if wait_until "$START_DEADLINE" started "$2" "$3"; then
    pass "$1 starts and logs its address ($BASE)"
  else
    fail "$1 starts" "no start-up line with its address within ${START_DEADLINE}s (or it exited); log: $(tail -c 500 "$2" 2>/dev/null)"
    return 1
  fi
}
started() { "$2" || return 2; read_start_line "$1"; }

# smoke LABEL: one pass through the artefact at $BASE and $WS_URL: health, a
# new topic, a wscat subscriber, a publish with curl, the event at the
# subscriber, which stays connected through the stop that follows.
smoke() {
  local p=$1 topic=smoke payload='{"n":1,"text":"hello"}'
  http GET /health
  expect_http "$p: GET /health" 200 'uptime_sec=*' topics=0
  http POST /topics "{\"name\":\"$topic\"}"
  expect_http "$p: POST /topics creates a topic" 201 status=created "topic=$topic"
  if ! ws_subscribe "$topic"; then
    fail "$p: wscat subscribes" "no ack within ${REPLY_DEADLINE}s; got: $(ws_tail)"
    return 0
  fi
  pass "$p: wscat subscribes at $WS_URL"
  http POST "/topics/$topic/messages" "{\"payload\":$payload}"
  expect_http "$p: POST /topics/$topic/messages publishes" 201 status=published seq=1
  if wait_until "$REPLY_DEADLINE" json_has "$TMP/ws.out" type=event "topic=$topic" seq=1 "message.payload=$payload"; then
    pass "$p: the event arrives at the wscat subscriber"
  else
    fail "$p: the event arrives at the wscat subscriber" "not within ${REPLY_DEADLINE}s; got: $(ws_tail)"
  fi
  cli_smoke "$p"
}

# client ARGS...: the release binary as a client of $BASE, in a clean
# environment (no PUBSUB_URL or API_KEY from the caller's shell).
client() { env -i PATH="$PATH" "$RELEASE_BIN" "$@" --url "$BASE"; }

# cli_smoke LABEL: the binary's own client against $BASE: `create` a topic,
# `sub --count 3` in the background, three payloads to `pub` on stdin (it
# prints each ack's seq), the subscriber prints their three events and exits
# 0, and `topics` lists the topic.
cli_smoke() {
  local p=$1 topic=cli-smoke rc=0
  if [[ ! -x $RELEASE_BIN ]]; then fail "$p: pubsub-backend as a client" "no release binary"; return 0; fi
  client create "$topic" >"$TMP/cli.out" 2>&1 || rc=$?
  if [[ $rc -ne 0 ]] || ! json_has "$TMP/cli.out" status=created "topic=$topic"; then
    fail "$p: pubsub-backend create $topic" "exit $rc: $(head -c 300 "$TMP/cli.out")"
    return 0
  fi
  pass "$p: pubsub-backend create $topic"
  client sub "$topic" --count 3 </dev/null >"$TMP/sub.out" 2>"$TMP/sub.err" &
  SUB_PID=$!
  if ! wait_until "$REPLY_DEADLINE" cli_subscribed "$topic"; then
    fail "$p: pubsub-backend sub $topic --count 3 subscribes" \
      "no subscriber in /stats within ${REPLY_DEADLINE}s; sub says: $(tr '\n' ' ' <"$TMP/sub.err" | head -c 300)"
    kill "$SUB_PID" 2>/dev/null || true
    SUB_PID=""
    return 0
  fi
  rc=0
  printf '{"n":1}\n{"n":2}\n{"n":3}\n' | client pub "$topic" >"$TMP/pub.out" 2>&1 || rc=$?
  expect_eq "$p: pubsub-backend pub $topic publishes three lines of stdin, printing each seq" \
    "$(tr '\n' ' ' <"$TMP/pub.out")(exit $rc)" "1 2 3 (exit 0)"
  rc=0
  if wait_until "$REPLY_DEADLINE" cli_sub_gone; then
    wait "$SUB_PID" || rc=$?
    SUB_PID=""
    check "$p: pubsub-backend sub $topic --count 3 prints events 1, 2, 3 and exits 0 (exit $rc)" \
      "exit $rc, printed: $(head -c 600 "$TMP/sub.out"); stderr: $(head -c 200 "$TMP/sub.err")" \
      cli_events_in_order "$TMP/sub.out" "$topic" "$rc"
  else
    fail "$p: pubsub-backend sub $topic --count 3 exits" \
      "still running ${REPLY_DEADLINE}s after the publishes; printed: $(head -c 600 "$TMP/sub.out")"
    kill "$SUB_PID" 2>/dev/null || true
    SUB_PID=""
  fi
  rc=0
  client topics >"$TMP/cli.out" 2>&1 || rc=$?
  check "$p: pubsub-backend topics lists $topic" "exit $rc: $(head -c 300 "$TMP/cli.out")" \
    cli_lists_topic "$TMP/cli.out" "$topic" "$rc"
}
cli_subscribed() {
  kill -0 "$SUB_PID" 2>/dev/null || return 2
  curl -sS -o "$TMP/stats.json" --max-time 5 "$BASE/stats" 2>/dev/null &&
    json_has "$TMP/stats.json" "topics.$1.subscribers=1"
}
cli_sub_gone() { ! kill -0 "$SUB_PID" 2>/dev/null; }

# cli_events_in_order FILE TOPIC RC: RC is 0 and FILE holds exactly three
# lines, the events of TOPIC with seq 1, 2, 3 and payloads {"n":1}..{"n":3}.
CLI_EVENTS_JS='
const [file, topic] = process.argv.slice(1);
const lines = require("fs").readFileSync(file, "utf8").split("\n").filter(l => l.trim());
const ok = lines.length === 3 && lines.every((l, i) => {
  const e = JSON.parse(l);
  return e.type === "event" && e.topic === topic && e.seq === i + 1 && e.message.payload.n === i + 1;
});
process.exit(ok ? 0 : 1);
'
cli_events_in_order() { [[ $3 == 0 ]] && node -e "$CLI_EVENTS_JS" "$1" "$2" 2>/dev/null; }
# cli_lists_topic FILE TOPIC RC: RC is 0 and FILE is a topic list naming TOPIC.
cli_lists_topic() {
  [[ $3 == 0 ]] && node -e 'const [file, topic] = process.argv.slice(1);
    const list = JSON.parse(require("fs").readFileSync(file, "utf8")).topics;
    process.exit(list.some(t => t.name === topic) ? 0 : 1);' "$1" "$2" 2>/dev/null
}

# quick_clean_exit CODE SECONDS: exit code 0, sooner than STOP_BOUND.
quick_clean_exit() { [[ $1 == 0 ]] && less_than "$2" "$STOP_BOUND"; }

# ---- 1. cargo test ----------------------------------------------------------

# Each Rust test counts as one check. A build failure or a time-out, which
# leave no complete totals, counts as one more failure.
step_cargo_test() {
  local log=$LOG_DIR/cargo-test.log rc=0
  note "cargo test (log: $log; traffic recorded in $API_TRAFFIC_DIR)"
  rm -rf "$API_TRAFFIC_DIR"
  # timeout kills cargo's whole process group, test binaries included. The
  # directory is absolute: test binaries run in the package's directory.
  PUBSUB_API_RECORD=$PWD/$API_TRAFFIC_DIR timeout -k 10 "$CARGO_TEST_TIMEOUT" \
    cargo test --no-fail-fast </dev/null >"$log" 2>&1 || rc=$?
  count_totals "$log" '^test result:'
  if [[ $rc -eq 0 ]]; then
    echo "ok - cargo test: $T_PASSED passed"
    return 0
  elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
    fail "cargo test" "timed out after ${CARGO_TEST_TIMEOUT}s ($T_PASSED passed, $T_FAILED failed before that)"
  elif [[ $T_FAILED -gt 0 ]]; then
    echo "not ok - cargo test: $T_PASSED passed, $T_FAILED failed:"
    grep -E '^test .* FAILED$' "$log" | sed 's/^/#   /' || true
  else
    fail "cargo test" "exit code $rc with no failed test counted (a build error?)"
  fi
  # The failures without stack backtraces, long lines cut; or, after a build
  # error, the end of the log.
  note "from $log:"
  if grep -qx 'failures:' "$log"; then
    awk '/^failures:$/ { f = 1 } /^stack backtrace:/ { s = 1; print "(stack backtrace omitted)"; next }
      /^---- |^failures:$/ { s = 0 } f && !s' "$log" | cut -c 1-400 | head -n 120 | sed 's/^/#   /'
  else
    tail -n 40 "$log" | sed 's/^/#   /'
  fi
}

# ---- 1b. the API documents ---------------------------------------------------

# The two documents are valid by their specifications' own tools, and agree
# with the traffic that cargo test recorded (tests/api/check_traffic.py).
step_api_docs() {
  local log=$LOG_DIR/api-check.log rc=0 validator=()
  if command -v openapi-spec-validator >/dev/null; then
    validator=(openapi-spec-validator)
  elif python3 -c 'import openapi_spec_validator' 2>/dev/null; then
    validator=(python3 -m openapi_spec_validator)
  fi
  if [[ ${#validator[@]} -eq 0 ]]; then
    missing_tool "openapi-spec-validator docs/openapi.json" "openapi-spec-validator (pip install -r tests/clients/requirements.txt)"
  elif "${validator[@]}" docs/openapi.json >"$TMP/openapi.out" 2>&1; then
    pass "openapi-spec-validator accepts docs/openapi.json (OpenAPI 3.1.0)"
  else
    fail "openapi-spec-validator docs/openapi.json" "it says:"$'\n'"$(head -n 20 "$TMP/openapi.out")"
  fi

  if [[ ! -f $API_DIR/node_modules/@asyncapi/parser/package.json ]]; then
    missing_tool "AsyncAPI parser on docs/asyncapi.json" "@asyncapi/parser (npm ci --prefix $API_DIR)"
  elif node "$API_DIR/validate-asyncapi.mjs" docs/asyncapi.json >"$TMP/asyncapi.out" 2>&1; then
    pass "@asyncapi/parser accepts docs/asyncapi.json (AsyncAPI 3.0.0: $(grep -o '[0-9]* channel.*operation(s), [0-9]* message(s)' "$TMP/asyncapi.out"))"
  else
    fail "AsyncAPI parser on docs/asyncapi.json" "it says:"$'\n'"$(grep -v '^# info' "$TMP/asyncapi.out" | head -n 20)"
  fi

  # Its verdicts (the WebSocket traffic, the REST traffic, the documented
  # routes, the API key) are `ok - ` and `not ok - ` lines, each a check here.
  local name="tests/api/check_traffic.py" oks not_oks
  if ! python3 -c 'import jsonschema, referencing, regress' 2>/dev/null; then
    missing_tool "$name" "python3's jsonschema, referencing or regress (pip install -r tests/clients/requirements.txt)"
    return 0
  fi
  if [[ ! -d $API_TRAFFIC_DIR || ! -x $DEBUG_BIN ]]; then
    fail "$name" "nothing recorded in $API_TRAFFIC_DIR or no $DEBUG_BIN: see cargo test above"
    return 0
  fi
  note "python3 $API_DIR/check_traffic.py $API_TRAFFIC_DIR --server $DEBUG_BIN (log: $log)"
  PYTHONDONTWRITEBYTECODE=1 timeout -k 10 "$API_CHECK_TIMEOUT" \
    python3 "$API_DIR/check_traffic.py" "$API_TRAFFIC_DIR" --server "$DEBUG_BIN" </dev/null >"$log" 2>&1 || rc=$?
  # The verdicts and their mismatches, not the counts above them (in the log).
  sed -n '/^\(not \)\{0,1\}ok - /,$p' "$log" | grep -E '^(ok - |not ok - |#   )' | head -n 80 || true
  oks=$(grep -c '^ok - ' "$log" || true)
  not_oks=$(grep -c '^not ok - ' "$log" || true)
  PASSED=$((PASSED + oks)) FAILED=$((FAILED + not_oks))
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    fail "$name" "timed out after ${API_CHECK_TIMEOUT}s"
  elif [[ $rc -ne 0 && $not_oks -eq 0 ]]; then
    fail "$name" "exit code $rc without a failed verdict; its log ends with:"$'\n'"$(tail -n 10 "$log")"
  elif [[ $rc -eq 0 && $oks -eq 0 ]]; then
    fail "$name" "exited 0 without a single verdict; see $log"
  fi
}

# ---- 2. the release binary --------------------------------------------------

# start_binary LABEL LOGFILE [NAME=VALUE...]: the release binary on a free
# loopback port in a clean environment (the caller's shell cannot change the
# outcome), plus the given settings. LOG_LEVEL=INFO: the start-up line is INFO.
start_binary() {
  local label=$1 log=$2
  shift 2
  env -i PATH="$PATH" RUST_BACKTRACE=1 LOG_LEVEL=INFO HOST=127.0.0.1 PORT=0 "$@" \
    "$RELEASE_BIN" </dev/null >"$log" 2>&1 &
  SERVER_PID=$!
  await_start "$label" "$log" binary_alive
}
binary_alive() { kill -0 "$SERVER_PID" 2>/dev/null || return 2; }
binary_gone() { ! kill -0 "$SERVER_PID" 2>/dev/null; }

# stop_binary [LABEL]: SIGTERM; with a LABEL, check for a quick exit 0.
stop_binary() {
  local start took rc=0
  start=$(now)
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  if ! wait_until "$EXIT_DEADLINE" binary_gone; then
    if [[ -n ${1:-} ]]; then fail "$1: SIGTERM stops it" "still running after ${EXIT_DEADLINE}s"; fi
    return 0 # the trap kills it
  fi
  took=$(elapsed_since "$start")
  wait "$SERVER_PID" || rc=$?
  SERVER_PID=""
  [[ -z ${1:-} ]] || check "$1: SIGTERM -> exit 0 within ${STOP_BOUND}s (took ${took}s, exit $rc)" \
    "took ${took}s, exit code $rc" quick_clean_exit "$rc" "$took"
}

step_release() {
  build "cargo build --release" "$LOG_DIR/build-release.log" cargo build --release || return 0
  if ! command -v curl >/dev/null; then fail "curl" "not installed; no smoke test"; return 0; fi
  if ! command -v wscat >/dev/null; then
    note "wscat missing: npm install -g wscat"
    npm install -g wscat >"$LOG_DIR/npm-wscat.log" 2>&1 || true
    if ! command -v wscat >/dev/null; then fail "wscat" "missing, and npm install -g wscat failed"; return 0; fi
  fi
  start_binary "release binary" "$LOG_DIR/server.log" || return 0
  smoke "release binary"
  stop_binary "release binary"
  ws_close
}

# tests/clients: pytest drives the release binary with independent Python
# clients (websockets, requests, raw sockets), each test with its own servers.
step_clients() {
  local log=$LOG_DIR/clients.log rc=0
  [[ -x $RELEASE_BIN ]] || return 0 # the failed build is reported above
  if ! python3 -c 'import pytest, requests, websockets' 2>/dev/null; then
    fail "client suite" "python3 lacks pytest, requests or websockets: python3 -m pip install -r tests/clients/requirements.txt"
    return 0
  fi
  note "python3 -m pytest -q tests/clients (log: $log)"
  # -p no:cacheprovider and no bytecode: the run leaves the work tree clean.
  PUBSUB_BIN=$RELEASE_BIN PYTHONDONTWRITEBYTECODE=1 timeout -k 10 "$CLIENTS_TIMEOUT" \
    python3 -m pytest -q -rfE -p no:cacheprovider tests/clients </dev/null >"$log" 2>&1 || rc=$?
  # pytest's last line: "2 failed, 50 passed, 1 error in 41.3s"
  count_totals <(tail -n 1 "$log") .
  if [[ $rc -eq 0 ]]; then
    echo "ok - client suite: $T_PASSED passed"
  elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
    fail "client suite" "timed out after ${CLIENTS_TIMEOUT}s"
  elif [[ $T_FAILED -gt 0 ]]; then
    echo "not ok - client suite: $T_PASSED passed, $T_FAILED failed:"
    grep -E '^(FAILED|ERROR) ' "$log" | cut -c 1-300 | sed 's/^/#   /' || true
  else
    fail "client suite" "pytest exit code $rc with no failed test counted; its log ends with:"$'\n'"$(tail -n 15 "$log")"
  fi
}

# ---- 3. Chromium and promtool against a server with API_KEY -----------------

# browser_test KEY: tests/browser/console.mjs against $BASE, a fresh server.
# Its `ok - ` and `not ok - ` lines count as checks. It saves the console's
# screenshot to $LOG_DIR/console.png (copy it over tests/browser/console.png,
# which README.md shows, to refresh that), and on a failure one of each page.
browser_test() {
  local missing=() rc=0 oks not_oks log=$LOG_DIR/browser.log
  [[ -x $CHROMIUM ]] || missing+=("$CHROMIUM (apt-get install chromium)")
  [[ -f $BROWSER_DIR/node_modules/playwright-core/package.json ]] ||
    missing+=("playwright-core (npm ci --prefix $BROWSER_DIR)")
  if [[ ${#missing[@]} -gt 0 ]]; then missing_tool "browser test" "${missing[*]}"; return 0; fi
  note "headless Chromium drives the console (log: $log)"
  SCREENSHOT=$LOG_DIR/console.png ARTIFACTS_DIR=$LOG_DIR CHROMIUM=$CHROMIUM timeout -k 5 "$BROWSER_TIMEOUT" \
    node "$BROWSER_DIR/console.mjs" "$BASE" "$1" </dev/null >"$log" 2>&1 || rc=$?
  grep -E '^(ok - |not ok - |# )' "$log" || true
  oks=$(grep -c '^ok - ' "$log" || true)
  not_oks=$(grep -c '^not ok - ' "$log" || true)
  PASSED=$((PASSED + oks)) FAILED=$((FAILED + not_oks))
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    fail "browser test" "timed out after ${BROWSER_TIMEOUT}s; its log ends with:"$'\n'"$(tail -n 10 "$log")"
  elif [[ $rc -ne 0 && $not_oks -eq 0 ]]; then
    fail "browser test" "exit code $rc without a failed check; its log ends with:"$'\n'"$(tail -n 10 "$log")"
  elif [[ $rc -eq 0 && $oks -eq 0 ]]; then
    fail "browser test" "exited 0 without a single check; see $log"
  fi
}

# promtool_check KEY: `promtool check metrics` on a real scrape of /metrics,
# taken after the browser's traffic.
promtool_check() {
  local name="promtool check metrics" scrape=$LOG_DIR/metrics.txt status
  if ! command -v promtool >/dev/null; then missing_tool "$name" "promtool (apt-get install prometheus)"; return 0; fi
  status=$(curl -sS -o "$scrape" -w '%{http_code}' --max-time 5 -H "Authorization: Bearer $1" "$BASE/metrics" 2>&1) || true
  if [[ $status != 200 ]]; then
    fail "$name" "GET /metrics with the key got $status: $(head -c 300 "$scrape" 2>/dev/null)"
  elif promtool check metrics <"$scrape" >"$TMP/promtool.out" 2>&1; then
    pass "$name accepts a real scrape ($(grep -vc '^#' "$scrape") samples, $scrape)"
  else
    fail "$name" "promtool says:"$'\n'"$(head -n 10 "$TMP/promtool.out")"
  fi
}

step_operate() {
  local key
  [[ -x $RELEASE_BIN ]] || return 0 # the failed build is reported above
  key=ops-$(cat /proc/sys/kernel/random/uuid)
  start_binary "release binary with API_KEY" "$LOG_DIR/server-operate.log" API_KEY="$key" || return 0
  browser_test "$key"
  promtool_check "$key"
  stop_binary
}

# ---- 4. docker-compose.yml --------------------------------------------------

# The server's settings table (--help) is the only source of defaults: the
# compose file fixes HOST and PORT and passes every other setting from the
# shell: a key without a value, `null` in `docker-compose config` when unset.
step_compose() {
  local unset_cfg set_cfg var vars=() given=() wrong=()
  if ! command -v docker-compose >/dev/null; then
    missing_tool "docker-compose config" "docker-compose (apt-get install docker-compose)"
    return 0
  fi
  if ! unset_cfg=$(env -i PATH="$PATH" docker-compose -f docker-compose.yml config 2>&1); then
    fail "docker-compose config accepts docker-compose.yml" "it says:"$'\n'"$(tail -n 5 <<<"$unset_cfg")"
    return 0
  fi
  pass "docker-compose config accepts docker-compose.yml"
  [[ -x $RELEASE_BIN ]] || return 0
  # --help's settings lines: "  RING_SIZE   --ring-size   100   ...".
  mapfile -t vars < <("$RELEASE_BIN" --help |
    awk '$1 ~ /^[A-Z][A-Z0-9_]*$/ && $2 ~ /^--[a-z]/ && $1 != "HOST" && $1 != "PORT" { print $1 }')
  for var in "${vars[@]}"; do given+=("$var=from-the-shell"); done
  set_cfg=$(env -i PATH="$PATH" "${given[@]}" docker-compose -f docker-compose.yml config 2>&1) || true
  for var in "${vars[@]}"; do
    grep -qxE " +$var: null" <<<"$unset_cfg" && grep -qxE " +$var: from-the-shell" <<<"$set_cfg" ||
      wrong+=("$var")
  done
  check "docker-compose.yml passes the ${#vars[@]} other settings of --help from the shell, no default restated" \
    "wrong for: ${wrong[*]}" test "${#vars[@]}" -gt 0 -a "${#wrong[@]}" -eq 0
  expect_eq "docker-compose.yml fixes HOST and PORT" \
    "$(grep -oE '^ +(HOST|PORT): .*' <<<"$unset_cfg" | xargs)" "HOST: 0.0.0.0 PORT: 8000"
}

# ---- 5. the Docker image ----------------------------------------------------

# final_stage_dockerfile: the Dockerfile from its last FROM on, its one
# `COPY --from=... SRC DEST` replaced by `COPY pubsub-backend DEST`: the final
# stage's own instructions around the binary built here (the build stage
# needs a Rust base image that cannot be pulled here).
final_stage_dockerfile() {
  awk -v bin="$BIN_NAME" 'toupper($1) == "FROM" { n = 0; copies = 0 }
    toupper($1) == "COPY" && $2 ~ /^--from=/ { $0 = "COPY " bin " " $NF; copies++ }
    { line[++n] = $0 }
    END { for (i = 1; i <= n; i++) print line[i]
      if (copies != 1) { print "expected one COPY --from= in the final stage, found " copies + 0 > "/dev/stderr"; exit 1 } }' Dockerfile
}

build_image() {
  local ctx=$TMP/docker-context
  if ! rustup target list --installed 2>/dev/null | grep -qx "$MUSL_TARGET"; then
    note "rustup target add $MUSL_TARGET"
    rustup target add "$MUSL_TARGET" >"$LOG_DIR/rustup.log" 2>&1 || true
  fi
  build "cargo build --release --target $MUSL_TARGET (static)" "$LOG_DIR/build-musl.log" \
    cargo build --release --target "$MUSL_TARGET" || return 1
  mkdir -p "$ctx"
  cp "$MUSL_BIN" "$ctx/$BIN_NAME"
  if ! final_stage_dockerfile >"$ctx/Dockerfile" 2>"$TMP/awk.err"; then
    fail "Dockerfile final stage" "$(cat "$TMP/awk.err")"
    return 1
  fi
  cp "$ctx/Dockerfile" "$LOG_DIR/Dockerfile.final-stage"
  expect_eq "Dockerfile: the final stage is FROM scratch" "$(awk 'NR == 1 { print tolower($1 " " $2) }' "$ctx/Dockerfile")" "from scratch"
  # The classic builder: BuildKit is not available on our machines.
  IMAGE_BUILT=1
  build "docker build of the final stage" "$LOG_DIR/docker-build.log" \
    env DOCKER_BUILDKIT=0 docker build -t "$IMAGE_TAG" "$ctx"
}

image() { docker image inspect -f "$1" "$IMAGE_TAG"; }

check_image() {
  local size
  size=$(image '{{.Size}}')
  expect_eq "image: runs as 65534:65534" "$(image '{{.Config.User}}')" 65534:65534
  # Every other setting keeps the server's own default (PATH is docker's).
  expect_eq "image: sets only HOST=0.0.0.0 and PORT=8000" \
    "$(image '{{range .Config.Env}}{{println .}}{{end}}' | grep -v '^PATH=' | sort | xargs)" "HOST=0.0.0.0 PORT=8000"
  expect_eq "image: exposes 8000/tcp" "$(image '{{json .Config.ExposedPorts}}')" '{"8000/tcp":{}}'
  expect_eq "image: the entrypoint is the binary, exec form" "$(image '{{json .Config.Entrypoint}}')" "[\"/$BIN_NAME\"]"
  expect_eq "image: the HEALTHCHECK runs the binary itself" \
    "$(image '{{if .Config.Healthcheck}}{{json .Config.Healthcheck.Test}}{{end}}')" "[\"CMD\",\"/$BIN_NAME\",\"healthcheck\"]"
  check "image: $(awk -v s="$size" 'BEGIN { printf "%.2f MiB", s / 1048576 }') is under $((IMAGE_MAX_BYTES / 1048576)) MiB" \
    "$size bytes" test "$size" -lt "$IMAGE_MAX_BYTES"
}

container_alive() {
  docker logs "$CONTAINER" >"$LOG_DIR/container.log" 2>&1 || true
  [[ $(docker inspect -f '{{.State.Running}}' "$CONTAINER" 2>/dev/null) == true ]] || return 2
}

# The container shares the host's network (--network host) and binds
# 127.0.0.1 on a port the OS found free: no clash with anything on this
# machine, traffic on loopback. The port is picked here, not with PORT=0,
# because the image's HEALTHCHECK probes $PORT.
start_container() {
  local port pid uid
  port=$(node -e 'const s = require("net").createServer().listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close(); });')
  CONTAINER_RUN_AT=$(now)
  if ! docker run -d --name "$CONTAINER" --network host -e HOST=127.0.0.1 -e PORT="$port" \
    -e LOG_LEVEL=INFO "$IMAGE_TAG" >"$TMP/run.out" 2>&1; then
    fail "docker run" "$(cat "$TMP/run.out")"
    return 1
  fi
  CONTAINER_STARTED=1
  await_start "container" "$LOG_DIR/container.log" container_alive || return 1
  # Ask the kernel, not docker, who the process runs as.
  pid=$(docker inspect -f '{{.State.Pid}}' "$CONTAINER")
  uid=$(awk '/^Uid:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo unknown)
  expect_eq "container: the process runs as uid 65534" "$uid" 65534
}

container_health() {
  docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}no health status{{end}}' "$CONTAINER" 2>/dev/null
}
container_healthy() { [[ $(container_health) == healthy ]]; }

# The image's HEALTHCHECK (the binary probing its own /health; scratch has no
# shell or curl) must find the running container healthy.
check_container_health() {
  local name="container: the image's HEALTHCHECK reports it healthy"
  if wait_until "$HEALTH_DEADLINE" container_healthy; then
    pass "$name ($(elapsed_since "$CONTAINER_RUN_AT")s after docker run)"
  else
    fail "$name" "still '$(container_health)' after ${HEALTH_DEADLINE}s; probes: $(docker inspect -f '{{if .State.Health}}{{range .State.Health.Log}}[exit {{.ExitCode}}] {{.Output}} {{end}}{{end}}' "$CONTAINER" 2>&1 | tr '\n' ' ' | tail -c 400)"
  fi
}

stop_container() {
  local start took code
  start=$(now)
  docker stop -t "$DOCKER_STOP_TIMEOUT" "$CONTAINER" >/dev/null 2>&1 || true
  took=$(elapsed_since "$start")
  code=$(docker inspect -f '{{.State.ExitCode}}' "$CONTAINER")
  docker logs "$CONTAINER" >"$LOG_DIR/container.log" 2>&1 || true
  check "container: docker stop -> exit 0 within ${STOP_BOUND}s (took ${took}s, exit $code)" \
    "took ${took}s (docker's kill timeout is ${DOCKER_STOP_TIMEOUT}s), exit code $code" \
    quick_clean_exit "$code" "$took"
}

step_docker() {
  if ! timeout 20 docker info >/dev/null 2>&1; then missing_tool "docker" "a Docker engine (docker info failed)"; return 0; fi
  build_image || return 0
  check_image
  if ! command -v wscat >/dev/null; then fail "wscat" "missing; no container smoke test"; return 0; fi
  start_container || return 0
  smoke "container"
  check_container_health
  stop_container
  ws_close
}

# ---- main -------------------------------------------------------------------

main() {
  rm -rf "$LOG_DIR"
  mkdir -p "$LOG_DIR"
  step_cargo_test
  step_api_docs
  step_release
  step_clients
  step_operate
  step_compose
  step_docker
  echo "$PASSED passed, $FAILED failed"
  [[ $FAILED -eq 0 ]]
}

main "$@"
