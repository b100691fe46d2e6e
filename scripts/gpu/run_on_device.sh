#!/bin/bash
# krserve's GPU benchmark on the lent NVIDIA GPU (H100 before 2026-12, H200 now; see docs/gpu.md). Stages, run in the
# repository root on the device machine:
#
#   run_on_device.sh keep           copy the wheel parts carried in this call
#                                   (.gpu/p1, p2 or p3) to /tmp/keep
#   run_on_device.sh prep           env report, torch bandwidth ceilings
#   run_on_device.sh model-torch    build the 3B model with the torch backend
#   run_on_device.sh setup          wheel = parts aa+ab+ac (sha256 checked),
#                                   install mlx/mlx-cuda-13/mlx-lm/msgpack into
#                                   /tmp/site, tiny mlx GPU check
#   run_on_device.sh probe          model (mlx backend if prep's is missing),
#                                   mlx bandwidth + single-stream decode probe
#   run_on_device.sh bench NAME [run.py args]
#                                   scripts/bench/run.py on the 3B model, 128
#                                   tokens, ignore_eos, krserve --batch-size 64,
#                                   stopped (SIGTERM: summary still written)
#                                   before the call's deadline
#
# Inputs carried in .gpu/ (git-ignored): p1/, p2/, p3/ (the 90 MB mlx-cuda-13
# wheel split with `split -b 35M`, one part per call, because a call carries at
# most 64 MiB, the working tree included), whl/ (mlx, mlx-lm, msgpack wheels), bin/krserve (built at the
# commit named in docs/gpu.md). Between calls the warm machine keeps /tmp, but
# not ignored paths carried by an earlier call: carry .gpu/bin in every call
# that runs `bench`. Results go to $OUT (at most 8 files come back).
set -u
cd "$(dirname "$0")/../.."
REPO=$PWD
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
MODEL=${MODEL:-/tmp/m3b}
SITE=/tmp/site
TORCHPY=${TORCHPY:-/opt/torch/.venv/bin/python3}
PY=$REPO/scripts/gpu/py.sh
WHEEL_SHA=94cb48fba73e5ee39467e51c35c51c691123359ca17bafd1a24cf92ad6732bee
WHEEL=mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MLX_PTX_CACHE_DIR=/tmp/mlx-ptx-cache
# The call's deadline (epoch seconds), set by the first stage of a call.
DEADLINE_FILE=/tmp/gpu-deadline

log() { echo "[gpu $(date +%H:%M:%S)] $*"; }

stage=${1:-}
shift || true
case "$stage" in
prep)
  exec > >(tee -a "$OUT/prep.log") 2>&1
  log "prep"
  nvidia-smi
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem,power.limit,pstate --format=csv
  uname -a; nproc; free -g; df -h /tmp
  $TORCHPY -V
  $TORCHPY -m pip list 2>/dev/null | grep -iE '^(torch|transformers|tokenizers|safetensors|numpy|jinja2|protobuf|sentencepiece|pyyaml|matplotlib|nvidia-)' 
  SP=$($TORCHPY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "site-packages: $SP"; ls "$SP/nvidia"
  for l in libcublasLt.so.13 libcufft.so.12 libcusolver.so.12 libnvrtc.so.13 libcudnn.so.9 libnccl.so.2 libcudart.so.13; do
    echo "$l: $(find "$SP/nvidia" -name "$l*" | head -3 | tr '\n' ' ')"
  done
  ls -d "$SP"/nvidia/*/include 2>/dev/null; ls "$SP"/nvidia/cu13/include 2>/dev/null | head -20
  ls -la /usr/local/cuda/include/cuda_runtime.h 2>&1; which nvcc && nvcc --version | tail -2
  ldconfig -p | grep -E 'libcuda\.so' ; echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-} CUDA_HOME=${CUDA_HOME:-}"
  log "torch ceilings"
  $TORCHPY scripts/gpu/torch_ceiling.py --json "$OUT/torch_ceiling.json"
  log "prep done"
  ;;
keep)
  # Wheel parts carried in this call (.gpu/pN) are copied to /tmp/keep, which
  # the warm machine keeps for the next call.
  mkdir -p /tmp/keep && cp .gpu/p*/* /tmp/keep/ 2>/dev/null; ls -la /tmp/keep
  ;;
model-torch)
  exec > >(tee -a "$OUT/prep.log") 2>&1
  if [ ! -f "$MODEL/config.json" ]; then
    log "model (torch backend)"
    rm -rf "$MODEL.tmp" && $TORCHPY scripts/gpu/make_3b_model.py "$MODEL.tmp" --backend torch && mv "$MODEL.tmp" "$MODEL"
  fi
  ls -la "$MODEL"; du -sh "$MODEL"
  ;;
setup)
  echo $(( $(date +%s) + ${CALL_SECONDS:-575} )) > $DEADLINE_FILE
  exec > >(tee -a "$OUT/bench.log") 2>&1
  log "setup"
  if [ ! -f $SITE/.ok ]; then
    parts=()
    for x in aa ab ac; do
      p=$(ls /tmp/keep/*-$x .gpu/p*/*-$x 2>/dev/null | head -1)
      [ -n "$p" ] || { log "FAILED: wheel part $x missing: machine went cold?"; exit 2; }
      parts+=("$p")
    done
    cat "${parts[@]}" > /tmp/$WHEEL
    echo "$WHEEL_SHA  /tmp/$WHEEL" | sha256sum -c - || { log "FAILED: sha256"; exit 2; }
    rm -rf $SITE && mkdir -p $SITE
    for w in .gpu/whl/*.whl /tmp/$WHEEL; do
      $TORCHPY -m zipfile -e "$w" $SITE || { log "FAILED: unzip $w"; exit 2; }
    done
    SP=$($TORCHPY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    ln -sfn "$SP/nvidia" $SITE/nvidia
    touch $SITE/.ok
  fi
  ls $SITE
  log "tiny mlx GPU check"
  if ! $PY -c "import mlx.core as mx; d = mx.default_device(); print(mx.__version__, d); print((mx.ones((4,4))@mx.ones((4,4))).sum()); assert \"gpu\" in str(d), d"; then
    log "FAILED: tiny check; ldd:"
    ldd $SITE/mlx/lib/libmlx.so | grep -E 'not found|cuda|cublas|nvrtc|cudnn|nccl'
    log "retry with CUDA_HOME=/usr/local/cuda"
    CUDA_HOME=/usr/local/cuda $PY -c "import mlx.core as mx; print(mx.default_device()); print((mx.ones((4,4))@mx.ones((4,4))).sum())"
    exit 3
  fi
  $PY -c "import mlx.core as mx, mlx_lm, msgpack, transformers, tokenizers; print('mlx', mx.__version__, 'mlx_lm', mlx_lm.__version__, 'transformers', transformers.__version__, 'tokenizers', tokenizers.__version__, 'msgpack', msgpack.version); print(mx.device_info())"
  ;;
probe)
  exec > >(tee -a "$OUT/bench.log") 2>&1
  if [ ! -f "$MODEL/config.json" ]; then
    log "model (mlx backend)"
    rm -rf "$MODEL.tmp" && $PY scripts/gpu/make_3b_model.py "$MODEL.tmp" --backend mlx && mv "$MODEL.tmp" "$MODEL" || exit 4
  fi
  log "probe"
  timeout 240 $PY scripts/gpu/probe.py --model "$MODEL" --json "$OUT/probe.json" || log "FAILED: probe (exit $?)"
  cp "$OUT/probe.json" /tmp/probe.json 2>/dev/null
  nvidia-smi --query-gpu=name,memory.used,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
  ;;
bench)
  name=$1; shift
  exec > >(tee -a "$OUT/bench.log") 2>&1
  dl=$(cat $DEADLINE_FILE 2>/dev/null || echo $(( $(date +%s) + 575 )))
  budget=$(( dl - $(date +%s) - 25 ))
  log "bench $name: budget ${budget}s; run.py args: $*"
  [ $budget -gt 60 ] || { log "no time left"; exit 5; }
  # Slow decoding (probe below 150 tok/s): no warm pass, fewer sequential
  # requests, so that the call's time is not spent before the sweep.
  extra=()
  tps=$($TORCHPY -c "import json; print(int(json.load(open('/tmp/probe.json'))['stream_generate_tps_median']))" 2>/dev/null || echo 0)
  if [ "${AUTO_CUT:-1}" = 1 ] && [ "$tps" -gt 0 ] && [ "$tps" -lt 150 ]; then
    n=$(( budget * tps / 128 / 8 )); [ $n -gt 50 ] && n=50; [ $n -lt 5 ] && n=5
    extra=(--no-warm-pass --warmup 3 --seq-requests $n)
    log "probe: $tps tok/s: cutting to ${extra[*]}"
  fi
  mkdir -p /tmp/res
  timeout --signal=TERM --kill-after=20 $budget $TORCHPY scripts/bench/run.py --model "$MODEL" \
    --krserve .gpu/bin/krserve --python "$PY" --out /tmp/res/$name --max-tokens 128 --ignore-eos \
    --krserve-args "--python $PY --batch-size 64" --startup-timeout 240 "${extra[@]}" "$@"
  log "run.py exit $?"
  tar czf "$OUT/$name.tar.gz" -C /tmp/res "$name" && cp /tmp/res/$name/summary.md "$OUT/$name-summary.md"
  nvidia-smi --query-gpu=name,memory.used,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
  ;;
*)
  echo "usage: $0 keep|prep|model-torch|setup|probe|bench NAME [run.py args]" >&2; exit 64 ;;
esac
