#!/bin/bash
# Device-side driver for the GPU runs (prompt cache multi-turn, routing, grammar cost),
# run through the device tool from the repository root: bash scripts/gpu/dev.sh STAGE.
# The wheels and split mlx-cuda wheel it joins are carried in the git-ignored .gpu/
# (p1, p2, whl, bin: see docs/gpu.md); docs/data/h200-*/ name the calls of each lease.
#   dev.sh one                  keep p1 + wheels in /tmp/keep, env report, 3B model (torch)
#   dev.sh setup                join wheel (p1 kept + p2 carried), install into /tmp/site, checks
#   dev.sh mt PASS CFG...       multi-turn runs; CFG in kr, kr0, mlx, mlxbig, krbig
#   dev.sh gram [B] [TOK] [REPS] grammar.py on the 3B model
#   dev.sh pack                 results to $OUT
# LIMIT (seconds since this process started) bounds every stage.
set -u
set -m
cd "$(dirname "$0")/../.."
REPO=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MLX_PTX_CACHE_DIR=/tmp/mlx-ptx-cache
TORCHPY=/opt/torch/.venv/bin/python3
PY=$REPO/scripts/gpu/py.sh
KR=$REPO/.gpu/bin/krserve
M=${MODEL:-/tmp/m3b}
R=/tmp/res; mkdir -p $R
WHEEL=mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl
SHA=94cb48fba73e5ee39467e51c35c51c691123359ca17bafd1a24cf92ad6732bee
START=${START:-$(date +%s)}; LIMIT=${LIMIT:-560}
left() { echo $(( START + LIMIT - $(date +%s) )); }
log() { echo "[dev $(date +%H:%M:%S) left $(left)s] $*"; }
gpu() { nvidia-smi --query-gpu=name,memory.used,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader; }

pack() {
  tar czf "$OUT/res.tar.gz" -C /tmp res
  for f in $R/*_*.txt; do case $f in *.warm.txt|*.cmd.txt|*.metrics.txt) continue;; esac; echo "### $f"; cat $f; done > "$OUT/summary.txt" 2>/dev/null
  ls -la "$OUT"
}

SRV=""
stop_srv() {
  [ -n "$SRV" ] || return 0
  kill -TERM -- -$SRV 2>/dev/null
  for i in $(seq 40); do kill -0 $SRV 2>/dev/null || break; sleep 0.5; done
  kill -KILL -- -$SRV 2>/dev/null
  wait $SRV 2>/dev/null
  SRV=""
}
trap stop_srv EXIT

stage=${1:-}; shift || true
case "$stage" in
one)
  exec > >(tee -a $R/one.log) 2>&1
  mkdir -p /tmp/keep/whl
  cp .gpu/p1/* /tmp/keep/ && cp .gpu/whl/*.whl /tmp/keep/whl/ && ls -la /tmp/keep /tmp/keep/whl
  nvidia-smi
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem,power.limit,pstate --format=csv
  uname -a; nproc; free -b; df -h /tmp
  $TORCHPY -V
  $TORCHPY -m pip list 2>/dev/null | grep -iE '^(torch|transformers|tokenizers|huggingface.hub|regex|safetensors|numpy|msgpack|jinja2|protobuf|sentencepiece|pyyaml|typer|tqdm|packaging|llguidance|mlx.*) '
  log "model"
  OUT=$R scripts/gpu/run_on_device.sh model-torch
  log "one done"; gpu
  ;;
setup)
  exec > >(tee -a $R/setup.log) 2>&1
  log "setup"
  if [ ! -f /tmp/site/.ok ]; then
    cat /tmp/keep/*-aa .gpu/p2/*-ab > /tmp/$WHEEL
    echo "$SHA  /tmp/$WHEEL" | sha256sum -c - || { log "FAILED sha"; exit 2; }
    rm -rf /tmp/site && mkdir -p /tmp/site
    for w in /tmp/keep/whl/*.whl /tmp/$WHEEL; do $TORCHPY -m zipfile -e "$w" /tmp/site || { log "FAILED unzip $w"; exit 2; }; done
    SP=$($TORCHPY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    ln -sfn "$SP/nvidia" /tmp/site/nvidia
    touch /tmp/site/.ok
  fi
  ls /tmp/site
  CHK='import mlx.core as mx, mlx_lm, msgpack, transformers, tokenizers, llguidance; d=mx.default_device(); print("mlx", mx.__version__, d, "mlx_lm", mlx_lm.__version__, "transformers", transformers.__version__, "tokenizers", tokenizers.__version__, "msgpack", msgpack.version, "llguidance", getattr(llguidance, "__version__", "?")); print((mx.ones((4,4))@mx.ones((4,4))).sum()); print(mx.device_info()); assert "gpu" in str(d); import krserve_worker.worker, krserve_worker.grammar; print("worker import ok")'
  if ! $PY -c "$CHK"; then
    log "FAILED check with carried transformers/tokenizers: falling back to the venv's"
    rm -rf /tmp/site/transformers /tmp/site/transformers-* /tmp/site/tokenizers /tmp/site/tokenizers-*
    $PY -c "$CHK" || { log "FAILED check"; ldd /tmp/site/mlx/lib/libmlx.so | grep -E 'not found'; exit 3; }
  fi
  if [ ! -f $M/config.json ]; then
    log "model missing: building with the mlx backend"
    rm -rf $M.tmp && $PY scripts/gpu/make_3b_model.py $M.tmp --backend mlx && mv $M.tmp $M || { log "FAILED model"; exit 4; }
  fi
  free -b; gpu
  $PY -c 'import mlx.core as mx; print(mx.device_info()); print(mx.__version__)'
  ;;
mt)
  pass=$1; shift
  exec > >(tee -a $R/mt_$pass.log) 2>&1
  free -b | head -2
  for cfg in "$@"; do
    if [ $(left) -lt ${NEED:-170} ]; then log "skip $cfg: too little time"; continue; fi
    name=${pass}_$cfg
    port=$(( 18000 + RANDOM % 1000 ))
    case $cfg in
      kr)     cmd=($KR up --model $M --host 127.0.0.1 --port $port --workers 1 --log-level info --python $PY --batch-size 32); model=default ;;
      kr0)    cmd=($KR up --model $M --host 127.0.0.1 --port $port --workers 1 --log-level info --python $PY --batch-size 32 --prompt-cache-bytes 0); model=default ;;
      kr2ca)  cmd=($KR up --model $M --host 127.0.0.1 --port $port --workers 2 --log-level info --python $PY --batch-size 32 --routing cache-aware); model=default ;;
      kr2ll)  cmd=($KR up --model $M --host 127.0.0.1 --port $port --workers 2 --log-level info --python $PY --batch-size 32 --routing least-loaded); model=default ;;
      krx)    cmd=($KR up --model $M --host 127.0.0.1 --port $port --workers 1 --log-level info --python $PY --batch-size 32 ${KRX:-}); model=default ;;
      krnc)   cmd=(env MLX_CUDA_USE_CUDNN_SDPA=0 MLX_CUDA_USE_CUDNN_SPDA=0 $KR up --model $M --host 127.0.0.1 --port $port --workers 1 --log-level info --python $PY --batch-size 32); model=default ;;
      kr512)  cmd=($KR up --model $M --host 127.0.0.1 --port $port --workers 1 --log-level info --python $PY --batch-size 32 --prefill-step 512); model=default ;;
      krbig)  cmd=($KR up --model $M --host 127.0.0.1 --port $port --workers 1 --log-level info --python $PY --batch-size 32 --prompt-cache-bytes 42949672960); model=default ;;
      mlx)    cmd=($PY -m krserve_worker.blas mlx_lm server --model $M --host 127.0.0.1 --port $port --max-tokens 64 --temp 0 --decode-concurrency 32 --log-level WARNING); model=default_model ;;
      mlxbig) cmd=($PY -m krserve_worker.blas mlx_lm server --model $M --host 127.0.0.1 --port $port --max-tokens 64 --temp 0 --decode-concurrency 32 --log-level WARNING --prompt-concurrency 16 --prompt-cache-size 32); model=default_model ;;
      *)      log "FAILED: no config $cfg (kr kr0 kr2ca kr2ll krx krnc kr512 krbig mlx mlxbig)"; continue ;;
    esac
    log "== $name: ${cmd[*]}"
    echo "${cmd[*]}" > $R/$name.cmd.txt
    if [ -n "${TRACE:-}" ]; then export KRSERVE_WORKER_SITE=/tmp/site:$REPO/scripts/bench/ttft_trace KRSERVE_WORKER_TTFT_TRACE=1; else unset KRSERVE_WORKER_SITE KRSERVE_WORKER_TTFT_TRACE; fi
    (cd $REPO && PYTHONPATH=$REPO/worker-py exec "${cmd[@]}") > $R/$name.server.log 2>&1 &
    SRV=$!
    ok=0
    for i in $(seq 240); do
      kill -0 $SRV 2>/dev/null || break
      if [ ${cfg:0:2} = kr ]; then curl -sf -o /dev/null http://127.0.0.1:$port/ready && { ok=1; break; }
      else curl -sf -o /dev/null -H 'Content-Type: application/json' -d '{"model":"default_model","max_tokens":1,"messages":[{"role":"user","content":"hi"}]}' http://127.0.0.1:$port/v1/chat/completions && { ok=1; break; }; fi
      sleep 0.5
    done
    [ $ok = 1 ] || { log "FAILED: $name not ready"; tail -30 $R/$name.server.log; stop_srv; continue; }
    log "ready after ${i} polls"; gpu
    B=($KR bench --url http://127.0.0.1:$port --model $model --scenario multi-turn --concurrency ${CONC:-16} --max-tokens 64 --ignore-eos --no-progress --timeout 4m)
    timeout $(( $(left) - 20 )) "${B[@]}" --conversations ${CONV:-16} --turns 2 --seed 1 > $R/$name.warm.txt 2>&1
    log "warm-up exit $?: $(tail -1 $R/$name.warm.txt)"
    timeout $(( $(left) - 15 )) "${B[@]}" --conversations ${CONV:-16} --turns ${TURNS:-8} --system-words ${SYSW:-750} --prefix-words 200 --user-words 75 --seed 0 ${THINK:+--think-time $THINK} --name $name --json $R/$name.json 2>&1 | tee $R/$name.txt
    log "bench done"; gpu
    if [ ${cfg:0:2} = kr ]; then
      curl -s http://127.0.0.1:$port/stats > $R/$name.stats.json
      curl -s http://127.0.0.1:$port/metrics | grep -E '^krserve_.*(cache|evict)' > $R/$name.metrics.txt
    fi
    stop_srv
  done
  ;;
gram)
  b=${1:-32}; t=${2:-128}; n=${3:-5}; shift 3 || true
  exec > >(tee -a $R/grammar.log) 2>&1
  log "grammar B=$b tokens=$t reps=$n $*"
  timeout $(( $(left) - 10 )) $PY scripts/bench/grammar.py --model $M --batch $b --tokens $t --reps $n "$@" 2>&1 | tee $R/grammar_b${b}_t${t}${GTAG:-}.txt
  log "grammar exit ${PIPESTATUS[0]}"; gpu
  ;;
pack) pack ;;
*) echo "usage" >&2; exit 64 ;;
esac
