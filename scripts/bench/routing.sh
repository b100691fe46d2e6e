#!/bin/bash
# Cache-aware vs least-loaded routing, side by side (two rounds, alternating),
# then one worker, on the default model: `scripts/bench/routing.sh` from the
# repository root after `make build model`. Results in out/routing/
# (docs/benchmarks.md, "Cache-aware routing with two workers").
set -u
cd "$(dirname "$0")/../.."
mkdir -p out/routing
run() { # name port args...
  name=$1; port=$2; shift 2
  bin/krserve up --port $port "$@" > out/routing/$name.server.log 2>&1 &
  pid=$!
  for i in $(seq 600); do curl -sf http://127.0.0.1:$port/ready >/dev/null && break; sleep 0.5; done
  bin/krserve bench --url http://127.0.0.1:$port --scenario multi-turn --conversations 8 --turns 4 --concurrency 4 \
    --system-words 300 --prefix-words 100 --user-words 75 --max-tokens 32 --seed 1 --json out/routing/$name.json > out/routing/$name.txt 2>&1
  curl -s http://127.0.0.1:$port/metrics | grep -E "^krserve_(routing|prefix_cache)" > out/routing/$name.metrics
  kill -TERM $pid; wait $pid
}
for round in 1 2; do
  run cache-aware-$round 18301 --workers 2 --routing cache-aware
  run least-loaded-$round 18302 --workers 2 --routing least-loaded
done
run one-worker 18303 --workers 1
echo DONE
