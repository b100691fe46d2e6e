#!/bin/bash
# Single-stream diagnosis on the lent GPU (docs/gpu.md): in-process
# stream_generate and krserve, alternating, N sequential requests each, the
# worker logging its time per step inside and outside step()
# (KRSERVE_WORKER_TIMING=1), and in-process once more under the worker's
# environment (env -i plus krserve's allow-list) to rule the environment in or
# out. Needs `run_on_device.sh setup` first; writes JSON and logs to $OUT.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}; MODEL=${MODEL:-/tmp/m3b}; PY=$PWD/scripts/gpu/py.sh; N=${N:-20}
BIN=${KRSERVE_BIN:-$PWD/.gpu/bin/krserve}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MLX_PTX_CACHE_DIR=/tmp/mlx-ptx-cache
mkdir -p "$OUT"; env | sort > "$OUT/device-env.txt"
Q=scripts/bench/questions.txt
inproc() {
  "$@" "$PY" scripts/bench/inprocess.py --model "$MODEL" --questions $Q --max-tokens 128 --ignore-eos \
    --warmup 10 --requests "$N" --quiet --name "$name" --json "$OUT/$name.json"
}
name=inproc1 inproc
KRSERVE_WORKER_TIMING=1 "$BIN" up --model "$MODEL" --port 18080 --python "$PY" --log-level info \
  --batch-size 64 >"$OUT/krserve.log" 2>&1 &
kpid=$!
for _ in $(seq 300); do curl -fs localhost:18080/ready >/dev/null && break; sleep 1; done
kbench() {
  "$BIN" bench --url http://127.0.0.1:18080 --model default --concurrency 1 --requests "$N" \
    --max-tokens 128 --questions $Q --ignore-eos --warmup 5 --no-progress --name "$1" --json "$OUT/$1.json" >/dev/null
}
kbench krserve1
name=inproc2 inproc
kbench krserve2
name=inproc_env inproc env -i PATH="$PATH" HOME="$HOME" LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}" \
  MLX_PTX_CACHE_DIR=$MLX_PTX_CACHE_DIR PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
kbench krserve3
kill -TERM $kpid; wait $kpid
for f in inproc1 krserve1 inproc2 krserve2 inproc_env krserve3; do
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); i=d['itl_ms']; t=d['ttft_ms']
print(f\"{sys.argv[2]:11s} tok/s {d['tok_per_s']:7.1f}  ITL median {i['median']:.2f} mean {i['mean']:.2f} ms  TTFT median {t['median']:.1f} ms\")" "$OUT/$f.json" $f
done
grep -E "timing:|fast path" "$OUT/krserve.log" | tail -12
