#!/bin/bash
# The supervisor's own CPU per request (docs/benchmarks.md, "Supervisor cost").
#
# krserve runs with the instant worker (scripts/bench/instantworker: answers
# every frame at once, no model), so all the CPU krserve's process spends is
# the supervisor's: HTTP, JSON, validation, scheduler, IPC, SSE. Beside it, the
# replay server (scripts/bench/replayserver) answers the same bytes with
# nothing but net/http: the floor any Go front door pays. `krserve bench`
# drives each in turn (streamed chat requests, EOS ignored) and reads the
# server's process_cpu_seconds_total before and after.
#
#   scripts/bench/supervisor_cost.sh [REQUESTS] [ROUNDS]     (make bench-supervisor)
#
# TOKENS and CLIENTS (space-separated lists, default "1 16 128" and "1 16")
# pick the rows, e.g. TOKENS=1 CLIENTS=16 for the headline row alone.
#
# Prints a markdown table: CPU µs per request of each server, the difference
# (krserve's own work) and krserve's requests/s, per max_tokens and concurrency.
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-20000}
ROUNDS=${2:-2}
PORT_K=${PORT_K:-18480}
PORT_R=${PORT_R:-18481}
mkdir -p bin
go build -o bin/krserve ./cmd/krserve
go build -o bin/instantworker ./scripts/bench/instantworker
go build -o bin/replayserver ./scripts/bench/replayserver
model=$(mktemp -d)
echo '{}' >"$model/config.json" # the instant worker loads nothing; krserve wants a model directory
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$model"
}
trap cleanup EXIT
bin/krserve up --worker-exec "$PWD/bin/instantworker" --model "$model" --port "$PORT_K" --log-level warn &
pids+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT_K/ready" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$PORT_K/ready" >/dev/null || { echo "krserve did not get ready" >&2; exit 1; }

run() { # url conc tokens -> "cpu_us req_per_s"
  local j="$model/run.json"
  bin/krserve bench --url "$1" --concurrency "$2" --requests "$N" --max-tokens "$3" --ignore-eos --no-progress \
    --json "$j" >/dev/null
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); assert r["errors"]==0, r["errors"]; print(r["server_cpu_us_per_request"], r["req_per_s"])' "$j"
}

echo "| max_tokens | clients | krserve CPU/request | net/http floor | krserve's own | krserve requests/s |"
echo "|---|---|---|---|---|---|"
for toks in ${TOKENS:-1 16 128}; do
  bin/replayserver --record "http://127.0.0.1:$PORT_K" --addr "127.0.0.1:$PORT_R" --max-tokens "$toks" 2>/dev/null &
  rp=$!
  pids+=($rp)
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT_R/metrics" >/dev/null && break; sleep 0.1; done
  for conc in ${CLIENTS:-1 16}; do
    ks=() fs=() rs=()
    for _ in $(seq "$ROUNDS"); do # alternate, so both see the same machine
      read -r k r < <(run "http://127.0.0.1:$PORT_K" "$conc" "$toks")
      read -r f _ < <(run "http://127.0.0.1:$PORT_R" "$conc" "$toks")
      ks+=("$k") fs+=("$f") rs+=("$r")
    done
    python3 - "$toks" "$conc" "${ks[*]}" "${fs[*]}" "${rs[*]}" <<'PY'
import statistics as st, sys
toks, conc = sys.argv[1], sys.argv[2]
k, f, r = ([float(x) for x in a.split()] for a in sys.argv[3:6])
mk, mf = st.median(k), st.median(f)
print(f"| {toks} | {conc} | {mk:.0f} µs | {mf:.0f} µs | {mk - mf:.0f} µs | {st.median(r):.0f} |")
PY
  done
  kill "$rp"; wait "$rp" 2>/dev/null || true
done
