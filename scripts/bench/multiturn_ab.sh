#!/bin/bash
# Multi-turn TTFT side by side: krserve revisions with the prompt cache on and
# off, and mlx_lm.server, in interleaved rounds (the order rotates each round),
# each run after a warm-up of the same shape (other conversations, --seed 1).
# docs/benchmarks.md, "Prompt cache: time to first token".
#
#   scripts/bench/multiturn_ab.sh OUT ROUNDS CFG...
#
# CFG: new, new0 (this checkout's bin/krserve and worker-py; new0: --prompt-cache-bytes 0),
#      base, base0 (the same from $BASE, a directory holding bin/krserve and worker-py of
#      another revision, e.g. `git archive REV | tar -x -C DIR && (cd DIR && go build -o bin/krserve ./cmd/krserve)`),
#      mlx (mlx_lm.server with OpenBLAS loaded as the workers do, --temp 0, --decode-concurrency 32).
# Environment: MODEL (default: the default model; mlx_lm.server keeps quantized weights
# quantized, so give both a float32 copy: scripts/bench/f32_model.py), CONV, TURNS, CONC,
# SYSW, PREFW, USERW, MAXT (krserve bench --scenario multi-turn's sizes), KRARGS (more
# `krserve up` flags for new/new0). Per run OUT/rN_CFG.{json,txt,warm.txt,server.log,cmd.txt};
# tables: scripts/bench/multiturn_table.py OUT.
set -u
OUTD=$1; ROUNDS=$2; shift 2
mkdir -p "$OUTD"
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
NEW=${NEW:-$ROOT}
BASE=${BASE:-}
PY=${PYTHON:-$ROOT/.venv/bin/python}
M=${MODEL:-$($PY -m krserve_worker.prepare 2>/dev/null | tail -1)}
export PYTHONPATH=$ROOT/worker-py  # for krserve_worker.blas and prepare
run() { # name cfg
  local name=$1 cfg=$2 port=$(( 18600 + RANDOM % 300 )) srv ok=0 model=default env cmd
  case $cfg in
    new|new0) env=(PYTHONPATH=$NEW/worker-py); cmd=($NEW/bin/krserve up --model "$M" --host 127.0.0.1 --port $port --workers 1 --batch-size 32 --python "$PY" ${KRARGS:-}) ;;
    base|base0) env=(PYTHONPATH=${BASE:?set BASE}/worker-py); cmd=($BASE/bin/krserve up --model "$M" --host 127.0.0.1 --port $port --workers 1 --batch-size 32 --python "$PY") ;;
    mlx) env=(PYTHONPATH=$ROOT/worker-py); model=default_model
         cmd=($PY -m krserve_worker.blas mlx_lm server --model "$M" --host 127.0.0.1 --port $port --max-tokens ${MAXT:-32} --temp 0 --decode-concurrency 32 --log-level WARNING) ;;
    *) echo "unknown config $cfg" >&2; return ;;
  esac
  case $cfg in *0) cmd+=(--prompt-cache-bytes 0) ;; esac
  [ $cfg = mlx ] || cmd+=(--log-level info)
  echo "${env[*]} ${cmd[*]}" > "$OUTD/$name.cmd.txt"
  (exec env "${env[@]}" setsid "${cmd[@]}") > "$OUTD/$name.server.log" 2>&1 &
  srv=$!
  for i in $(seq 600); do
    kill -0 $srv 2>/dev/null || break
    if [ $cfg = mlx ]; then
      curl -sf -o /dev/null -H 'Content-Type: application/json' -d '{"model":"default_model","max_tokens":1,"messages":[{"role":"user","content":"hi"}]}' http://127.0.0.1:$port/v1/chat/completions && { ok=1; break; }
    else curl -sf -o /dev/null http://127.0.0.1:$port/ready && { ok=1; break; }; fi
    sleep 0.5
  done
  if [ $ok = 1 ]; then
    local B=($ROOT/bin/krserve bench --url http://127.0.0.1:$port --model $model --scenario multi-turn --concurrency ${CONC:-8}
             --max-tokens ${MAXT:-32} --no-progress --timeout 10m --conversations ${CONV:-8}
             --system-words ${SYSW:-300} --prefix-words ${PREFW:-200} --user-words ${USERW:-75})
    "${B[@]}" --turns 2 --seed 1 > "$OUTD/$name.warm.txt" 2>&1
    "${B[@]}" --turns ${TURNS:-4} --seed 0 --name $name --json "$OUTD/$name.json" > "$OUTD/$name.txt" 2>&1
    echo "$(date +%T) $name: $(tail -1 "$OUTD/$name.txt")"
  else
    echo "$(date +%T) $name: server did not start"; tail -5 "$OUTD/$name.server.log"
  fi
  kill -TERM -- -$srv 2>/dev/null
  for i in $(seq 40); do kill -0 $srv 2>/dev/null || break; sleep 0.5; done
  kill -KILL -- -$srv 2>/dev/null; wait $srv 2>/dev/null
}
cfgs=("$@"); n=${#cfgs[@]}
for r in $(seq "$ROUNDS"); do
  for j in $(seq 0 $((n - 1))); do
    c=${cfgs[$(( (j + r - 1) % n ))]}
    run r${r}_$c $c
  done
done
