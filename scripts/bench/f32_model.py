#!/usr/bin/env python3
"""A float32 copy of a quantized mlx-lm model, for CPU comparisons with mlx_lm.server.

    PYTHONPATH=worker-py .venv/bin/python scripts/bench/f32_model.py SRC DST

krserve's workers hold a quantized model's weights as float32 on the CPU
(``--dequantize auto``, cpuweights.dequantize_for_cpu); mlx_lm.server keeps them
quantized, and mlx's quantized CPU matmuls are far slower. Given this copy both
run the same float32 matmuls (the values are the quantized ones exactly).
"""
import json
import shutil
import sys
from pathlib import Path

from krserve_worker import blas

blas.load()  # before mlx

from mlx_lm import load  # noqa: E402
from mlx_lm.utils import save_model  # noqa: E402

from krserve_worker.cpuweights import dequantize_for_cpu  # noqa: E402


def main(src: Path, dst: Path) -> None:
    model, _, config = load(str(src), return_config=True)
    print(dequantize_for_cpu(model, "on", fast_blas=True, on_cpu=True), file=sys.stderr)
    dst.mkdir(parents=True, exist_ok=True)
    save_model(dst, model)
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            shutil.copy(f, dst / f.name)
    print(dst)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
