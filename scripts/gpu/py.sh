#!/bin/sh
# Python for the GPU benchmark: the device's torch venv python3 with the carried
# mlx / mlx-cuda-13 / mlx-lm / msgpack in /tmp/site and the worker package on
# PYTHONPATH. Used as `krserve up --python`, as run.py's --python (in-process
# baseline, mlx_lm.server) and by run_on_device.sh.
# krserve passes PYTHONPATH, LD_LIBRARY_PATH, CUDA_*, MLX_* and KRSERVE_WORKER_*
# through to workers; KRSERVE_WORKER_PY overrides the interpreter (local tests).
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
py=${KRSERVE_WORKER_PY:-/opt/torch/.venv/bin/python3}
[ -x "$py" ] || py=python3
export PYTHONPATH="${KRSERVE_WORKER_SITE:-/tmp/site}:$repo/worker-py${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" "$@"
