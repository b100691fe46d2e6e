#!/bin/bash
# Cache-aware vs least-loaded routing, side by side (ROUNDS rounds, alternating),
# then one worker, on the default model: `scripts/bench/routing.sh` from the
# repository root after `make build model`. Results in $OUT (default out/routing/):
# per run NAME.{txt,json,metrics,server.log} (docs/benchmarks.md, "Cache-aware
# routing with two workers").
#
# Environment (defaults: the first scenario of that section):
#   CONV TURNS CONC SYSW PREFW USERW MAXT SEED  krserve bench --scenario multi-turn's sizes
#   THINK    --think-time (empty: none, a closed loop)
#   BUDGET   --prompt-cache-bytes per worker (empty: the default)
#   ROUNDS   rounds of the two policies (2); ONE: also run one worker (1), with
#            the same per-worker budget and, when BUDGET is set, with twice it
#   WARM     conversations of a one-turn warm-up before each run (0: none)
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/routing}
mkdir -p "$OUT"
run() { # name port args...
  name=$1; port=$2; shift 2
  bin/krserve up --port $port --log-level info "$@" > "$OUT/$name.server.log" 2>&1 &
  pid=$!
  for i in $(seq 600); do curl -sf http://127.0.0.1:$port/ready >/dev/null && break; sleep 0.5; done
  B=(bin/krserve bench --url http://127.0.0.1:$port --scenario multi-turn --max-tokens ${MAXT:-32} --no-progress
     --timeout 10m --system-words ${SYSW:-300} --prefix-words ${PREFW:-100} --user-words ${USERW:-75})
  if [ "${WARM:-0}" -gt 0 ]; then
    "${B[@]}" --conversations $WARM --turns 1 --concurrency $WARM --seed 9 > "$OUT/$name.warm.txt" 2>&1
  fi
  "${B[@]}" --conversations ${CONV:-8} --turns ${TURNS:-4} --concurrency ${CONC:-4} --seed ${SEED:-1} \
    ${THINK:+--think-time $THINK} --name $name --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1
  curl -s http://127.0.0.1:$port/metrics | grep -E "^krserve_(routing|prefix_cache|prompt_cache)" > "$OUT/$name.metrics"
  kill -TERM $pid; wait $pid
  echo "$(date +%T) $name: $(tail -1 "$OUT/$name.txt")"
}
budget=(${BUDGET:+--prompt-cache-bytes $BUDGET})
for round in $(seq ${ROUNDS:-2}); do
  run cache-aware-$round 18301 --workers 2 --routing cache-aware "${budget[@]}"
  run least-loaded-$round 18302 --workers 2 --routing least-loaded "${budget[@]}"
done
if [ "${ONE:-1}" = 1 ]; then
  run one-worker 18303 --workers 1 "${budget[@]}"
  [ -n "${BUDGET:-}" ] && run one-worker-2x 18304 --workers 1 --prompt-cache-bytes $((2 * BUDGET))
fi
echo DONE
