#!/usr/bin/env bash
# The standard performance set of pubsub-backend, measured on this machine: ./bench.sh
#
#   ./bench.sh            the full set, under 2 minutes (10 s per throughput scenario)
#   ./bench.sh --quick    the same set in under a minute (3 s per throughput scenario)
#
# Builds the release server and the load generator (examples/loadgen.rs), raises the open-file
# limit to 20,000, then for every scenario starts a fresh release server (HOST=127.0.0.1
# PORT=0), runs the load generator against it while sampling the server's VmRSS and Threads
# from /proc, and stops it. Before that, `loadgen ready` starts the server a few times on its
# own to measure the time from exec to the first answered GET /health and the idle RSS. With the
# x86_64-unknown-linux-musl target installed, also the static build the Docker image holds: its
# memory per connection (conns 1000) and its size.
#
# Prints a Markdown table, then the raw JSON line of every scenario. Columns:
#   key result        the scenario's headline (loadgen's "summary")
#   latency p50 / p99 end to end for fanout, the ack round trip for pubs, time for the
#                     broadcast to reach each connection for conns, GET /health for rest
#   server CPU %      utime+stime of the server over the measured window, as % of one core
#                     (200 % = both cores); loadgen CPU % likewise for the load generator,
#                     which shares the same two cores: read the two together. other CPU % is
#                     what every other process on the machine used meanwhile: well above 0,
#                     the row was measured on a busy machine and is worth running again
#   server peak RSS   VmHWM of the server at the end of the scenario (the highest sampled
#                     VmRSS if the server did not survive it)
#
# conns 10000 needs more than the file limit: each server thread takes 4 memory maps (stack,
# guard page, signal stack and its guard), so 10,000 connections (20,000 threads) need
# vm.max_map_count above ~80,000; the table header shows the value, bench.sh never changes it.
#
# With redis-server installed, two more rows run one instance in cluster mode (REDIS_URL) on a
# redis-server of the script's own, without persistence.
#
# LOADGEN_THREADS=N gives the load generator N runtime threads (default 1: on two cores it
# leaves the server the other one; raise it when the server outgrows one loadgen thread).
#
# Only loopback traffic; every process this script starts is stopped on exit (trap).
# Needs: cargo, and the tools of a Debian base system (awk, sed, date).

set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

QUICK=0
for arg in "$@"; do
  case $arg in
    --quick) QUICK=1 ;;
    -h | --help)
      sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0"
      exit 0
      ;;
    *)
      echo "bench.sh: unknown argument $arg (try --help)" >&2
      exit 2
      ;;
  esac
done

if ((QUICK)); then
  DURATION=3 READY_RUNS=3
else
  DURATION=10 READY_RUNS=5
fi
# The server needs a descriptor per connection; 10,000 WebSockets plus the load generator's own.
OPEN_FILES=20000
SERVER_START_DEADLINE=10 # seconds until the "listening on" line
SERVER_STOP_DEADLINE=10  # seconds after SIGTERM before SIGKILL
TARGET_DIR=${CARGO_TARGET_DIR:-target}
SERVER=$TARGET_DIR/release/pubsub-backend
LOADGEN=$TARGET_DIR/release/examples/loadgen
LOADGEN_THREADS=${LOADGEN_THREADS:-1}

log() { echo "bench: $*" >&2; }
die() {
  log "$*"
  exit 1
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pubsub-bench.XXXXXX")
SERVER_PID="" SAMPLER_PID="" LOADGEN_PID="" REDIS_PID=""
# Settings the server under test gets beyond HOST, PORT and LOG_LEVEL (the cluster rows).
SERVER_ENV=()

stop_pid() { # PID: SIGTERM, then SIGKILL after SERVER_STOP_DEADLINE
  local pid=$1 waited=0
  kill -TERM "$pid" 2>/dev/null || return 0
  while kill -0 "$pid" 2>/dev/null && ((waited < SERVER_STOP_DEADLINE * 20)); do
    sleep 0.05
    waited=$((waited + 1))
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local pid
  for pid in "$LOADGEN_PID" "$SAMPLER_PID" "$SERVER_PID" "$REDIS_PID"; do
    [[ -n $pid ]] && stop_pid "$pid"
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ulimit -n "$OPEN_FILES" 2>/dev/null ||
  die "cannot raise the open-file limit to $OPEN_FILES (hard limit: $(ulimit -Hn))"

log "building the release server and the load generator"
cargo build --release --quiet --example loadgen --example tiny_http_alone
# Built last and on its own, so the binary measured has none of the dev-dependencies' features.
cargo build --release --quiet --bin pubsub-backend
# The static musl build is what the Docker image holds (and all it holds): its size, and its
# memory per connection, which differs from glibc's. Skipped without the target.
MUSL_TARGET=x86_64-unknown-linux-musl
MUSL_SERVER=$TARGET_DIR/$MUSL_TARGET/release/pubsub-backend
if rustup target list --installed 2>/dev/null | grep -qx "$MUSL_TARGET"; then
  cargo build --release --quiet --bin pubsub-backend --target "$MUSL_TARGET"
else
  MUSL_SERVER=""
  log "no $MUSL_TARGET target (rustup target add $MUSL_TARGET): the musl rows are skipped"
fi

# ---- the server ----------------------------------------------------------------------------

# LOG_LEVEL=WARN keeps logging out of the measurement, but the port is read from the start-up
# line, which the server may print at INFO only: probe_log_level finds out once.
LOG_LEVEL=WARN

start_server() { # NAME [PROBE_SECONDS]: sets SERVER_PID, PORT; fails after the deadline
  local name=$1 deadline_s=${2:-$SERVER_START_DEADLINE}
  local server_log=$WORK/$name.server.log
  : >"$server_log"
  env HOST=127.0.0.1 PORT=0 LOG_LEVEL="$LOG_LEVEL" "${SERVER_ENV[@]}" "$SERVER" 2>"$server_log" &
  SERVER_PID=$!
  local deadline=$((SECONDS + deadline_s))
  PORT=""
  while :; do
    PORT=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9][0-9]*\).*/\1/p' "$server_log" | head -n 1)
    [[ -n $PORT ]] && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || die "the server exited at start: $(tail -n 3 "$server_log")"
    ((SECONDS < deadline)) || return 1
    sleep 0.01
  done
}

stop_server() {
  [[ -n $SERVER_PID ]] && stop_pid "$SERVER_PID"
  SERVER_PID=""
}

probe_log_level() {
  if start_server probe 2; then
    log "the server names its port at LOG_LEVEL=WARN"
  else
    LOG_LEVEL=INFO
    log "no start-up line at LOG_LEVEL=WARN: using LOG_LEVEL=INFO (it logs only start-up, shutdown and topic changes)"
  fi
  stop_server
}

cpu_ticks() { # PID: utime + stime in clock ticks (fields 14 and 15 of /proc/PID/stat)
  awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null || true
}

status_kb() { # PID FIELD: a /proc/PID/status field's number
  awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status" 2>/dev/null || true
}

sample_server() { # PID FILE: "rss_kb threads" every 0.2 s while the process lives
  while kill -0 "$1" 2>/dev/null; do
    awk '$1 == "VmRSS:" { r = $2 } $1 == "Threads:" { t = $2 } END { if (r) print r, t }' \
      "/proc/$1/status" >>"$2" 2>/dev/null || break
    sleep 0.2
  done
}

# ---- results -------------------------------------------------------------------------------

json_string() { sed -n "s/.*\"$2\":\"\([^\"]*\)\".*/\1/p" "$1" | head -n 1; }
json_number() { sed -n "s/.*\"$2\":\([-0-9.][0-9.e+-]*\).*/\1/p" "$1" | head -n 1; }

ROWS=()
RAW=()
NOTES=()

note_server_log() { # NAME LOG: keeps the server's warnings and errors for the report
  local count
  count=$(grep -cE ' (WARN|ERROR) |panicked|fatal' "$2" || true)
  ((count > 0)) || return 0
  NOTES+=("- $1: $count warning/error line(s) from the server, the first:")
  while IFS= read -r line; do
    NOTES+=("  \`${line:0:240}\`")
  done < <(grep -E ' (WARN|ERROR) |panicked|fatal' "$2" | head -n 3)
}

add_row() { # NAME JSON_FILE CPU_FALLBACK PEAK_RSS_KB
  local name=$1 file=$2 cpu_fallback=$3 peak_kb=$4
  local summary latency server_cpu loadgen_cpu other_cpu error peak
  summary=$(json_string "$file" summary)
  latency=$(json_string "$file" latency_summary)
  error=$(json_string "$file" error)
  server_cpu=$(json_number "$file" server_cpu_pct)
  loadgen_cpu=$(json_number "$file" loadgen_cpu_pct)
  other_cpu=$(json_number "$file" other_cpu_pct)
  [[ -n $error ]] && summary="FAILED: $error"
  peak=-
  [[ -n $peak_kb ]] && peak=$(awk -v k="$peak_kb" 'BEGIN { printf "%.1f MiB", k / 1024 }')
  ROWS+=("| $name | ${summary:--} | ${latency:--} | ${server_cpu:-$cpu_fallback} | ${loadgen_cpu:--} | ${other_cpu:--} | $peak |")
  RAW+=("$(cat "$file")")
}

run_scenario() { # NAME LOADGEN_ARGS...
  local name=$1 file=${1//[^A-Za-z0-9]/_}
  shift
  start_server "$file" || die "$name: the server printed no 'listening on' line in time"
  local out=$WORK/$file.json samples=$WORK/$file.samples
  : >"$samples"
  sample_server "$SERVER_PID" "$samples" &
  SAMPLER_PID=$!
  local t0 c0 t1 c1 rc=0
  t0=$(date +%s%N)
  c0=$(cpu_ticks "$SERVER_PID")
  log "$name: loadgen $*"
  "$LOADGEN" "$@" --url "http://127.0.0.1:$PORT" --server-pid "$SERVER_PID" --threads "$LOADGEN_THREADS" \
    >"$out" 2>"$WORK/$file.loadgen.log" &
  LOADGEN_PID=$!
  wait "$LOADGEN_PID" || rc=$?
  LOADGEN_PID=""
  t1=$(date +%s%N)
  c1=$(cpu_ticks "$SERVER_PID")
  local hwm
  hwm=$(status_kb "$SERVER_PID" VmHWM)
  stop_pid "$SAMPLER_PID"
  SAMPLER_PID=""
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    log "$name: THE SERVER EXITED during the run; its last lines:"
    tail -n 3 "$WORK/$file.server.log" >&2
  fi
  stop_server
  note_server_log "$name" "$WORK/$file.server.log"
  ((rc == 0)) || log "$name: loadgen exited with $rc; its last lines: $(tail -n 2 "$WORK/$file.loadgen.log")"
  [[ -s $out ]] || echo "{\"scenario\":\"$name\",\"error\":\"loadgen printed nothing (exit $rc)\"}" >"$out"
  # Whole-run CPU (set-up included), used only when loadgen could not measure its window.
  local cpu_fallback=-
  [[ -n $c0 && -n $c1 ]] &&
    cpu_fallback=$(awk -v c="$((c1 - c0))" -v ns="$((t1 - t0))" 'BEGIN { printf "%.1f", c / 100 / (ns / 1e9) * 100 }')
  [[ -n $hwm ]] || hwm=$(awk 'BEGIN { m = 0 } $1 > m { m = $1 } END { if (m) print m }' "$samples")
  add_row "$name" "$out" "$cpu_fallback" "$hwm"
  log "$name: $(json_string "$out" summary)$(json_string "$out" error)"
}

# ---- the set -------------------------------------------------------------------------------

read -r LOAD1 _ </proc/loadavg
if awk -v l="$LOAD1" 'BEGIN { exit !(l > 0.5) }'; then
  log "WARNING: the machine is busy (1-minute load $LOAD1): other processes share the cores and the numbers will be low"
fi
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
probe_log_level

log "start-up: loadgen ready --runs $READY_RUNS"
"$LOADGEN" ready --server-bin "$SERVER" --runs "$READY_RUNS" >"$WORK/ready.json" 2>"$WORK/ready.log" || true
[[ -s $WORK/ready.json ]] || echo '{"scenario":"ready","error":"loadgen printed nothing"}' >"$WORK/ready.json"
add_row "start-up (exec to GET /health)" "$WORK/ready.json" - "$(json_number "$WORK/ready.json" idle_rss_kb)"

D=$DURATION
run_scenario "fanout 1x100 max" fanout --topics 1 --subscribers 100 --rate max --duration "$D"
# An extra row: "max" paced by deliveries instead of acks (a publish stays in the
# window until every subscriber has it), the delivery capacity without slow-consumer cuts.
run_scenario "fanout 1x100 max, paced by deliveries" fanout --topics 1 --subscribers 100 \
  --rate max --pace deliveries --duration "$D"
run_scenario "fanout 1x1000 20/s" fanout --topics 1 --subscribers 1000 --rate 20 --duration "$D"
run_scenario "fanout 10x100 max" fanout --topics 10 --subscribers 1000 --rate max --duration "$D"
run_scenario "pubs 50" pubs --publishers 50 --duration "$D"
run_scenario "conns 1000" conns --connections 1000
run_scenario "conns 10000" conns --connections 10000
if [[ -n $MUSL_SERVER ]]; then
  SERVER=$MUSL_SERVER
  run_scenario "conns 1000, static musl build (the Docker image's)" conns --connections 1000
  SERVER=$TARGET_DIR/release/pubsub-backend
  MUSL_BYTES=$(stat -c %s "$MUSL_SERVER")
  echo "{\"scenario\":\"image\",\"binary_bytes\":$MUSL_BYTES,\"summary\":\"$(awk -v b="$MUSL_BYTES" 'BEGIN { printf "%.2f MiB", b / 1048576 }') static binary, the only file of the FROM scratch image\"}" >"$WORK/image.json"
  add_row "Docker image contents (musl binary)" "$WORK/image.json" - ""
fi
run_scenario "rest" rest --connections 4 --cycle-connections 1 --duration "$D"
# What the peek dispatcher and the hand-off to tiny_http cost per REST request: GET /health
# alone, against pubsub-backend and against tiny_http on its own (examples/tiny_http_alone.rs,
# same answer, same two workers).
run_scenario "rest GET /health only" rest --connections 4 --cycle-connections 0 --duration "$D"
SERVER=$TARGET_DIR/release/examples/tiny_http_alone
run_scenario "rest GET /health only, tiny_http alone" rest --connections 4 --cycle-connections 0 --duration "$D"
SERVER=$TARGET_DIR/release/pubsub-backend

# Cluster mode, one instance on a redis-server of this script's own (no persistence): what the
# backplane costs a publish (one Redis round trip and a channel delivery) and fan-out.
if command -v redis-server >/dev/null; then
  REDIS_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no >"$WORK/redis.log" 2>&1 &
  REDIS_PID=$!
  for _ in $(seq 200); do
    { exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT" && printf 'PING\r\n' >&3 && read -r -t 1 reply <&3 &&
      exec 3<&-; } 2>/dev/null && [[ $reply == +PONG* ]] && break
    sleep 0.05
  done
  SERVER_ENV=("REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0")
  run_scenario "pubs 50, cluster mode (local Redis)" pubs --publishers 50 --duration "$D"
  run_scenario "fanout 1x100 max, cluster mode (local Redis)" fanout --topics 1 --subscribers 100 --rate max --duration "$D"
  SERVER_ENV=()
  stop_pid "$REDIS_PID"
  REDIS_PID=""
else
  log "redis-server not installed: no cluster-mode rows"
fi

# ---- report --------------------------------------------------------------------------------

CPU_MODEL=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
REVISION=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD -- main.rs 2>/dev/null || REVISION="$REVISION with uncommitted changes to main.rs"
MEM_GIB=$(awk '/^MemTotal:/ { printf "%.0f", $2 / 1048576 }' /proc/meminfo)
cat <<EOF

## pubsub-backend benchmark ($STARTED)

Server: commit $REVISION. Machine: $(nproc) cores ($CPU_MODEL), $MEM_GIB GiB, $(uname -sr);
load generator on the same cores. Command: \`./bench.sh$( ((QUICK)) && echo " --quick")\` (${DURATION} s per throughput scenario,
LOG_LEVEL=$LOG_LEVEL, loadgen threads $LOADGEN_THREADS, open files $(ulimit -n), vm.max_map_count $(cat /proc/sys/vm/max_map_count 2>/dev/null || echo '?'),
pid_max $(cat /proc/sys/kernel/pid_max 2>/dev/null || echo '?')). Load average before the run: $LOAD1.

| scenario | key result | latency p50 / p99 | server CPU % | loadgen CPU % | other CPU % | server peak RSS |
|---|---|---|---|---|---|---|
EOF
printf '%s\n' "${ROWS[@]}"
if ((${#NOTES[@]})); then
  echo
  echo "Server log lines at WARN and above:"
  echo
  printf '%s\n' "${NOTES[@]}"
fi
echo
echo "Raw results (one JSON line per scenario):"
echo
echo '```'
printf '%s\n' "${RAW[@]}"
echo '```'
