"""The worker's command line: its flags (``python -m krserve_worker --help``;
``--group-size`` makes it a group of ranks, ``ranks.py``), checked, and the defaults
that depend on the device (``--prefill-step``), decided once the model is
loaded.
"""

from __future__ import annotations

import argparse


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m krserve_worker",
                                 description="krserve mlx-lm worker (msgpack over stdio)")
    ap.add_argument("--model", required=True, help="local model directory (never a hub id)")
    ap.add_argument("--max-batch", type=int, default=32,
                    help="sequences decoded together (BatchGenerator completion_batch_size)")
    ap.add_argument("--prefill-batch", type=int, default=8,
                    help="prompts prefilled together (prefill_batch_size)")
    ap.add_argument("--prefill-step", type=int, default=None,
                    help="prompt tokens per sequence per prefill step (default: 2048 on a "
                         "GPU, as mlx_lm.server; 512 on the CPU); smaller keeps cancel "
                         "and the running streams responsive, larger takes fewer steps")
    ap.add_argument("--no-single-fast-path", dest="single_fast_path", action="store_false",
                    help="decode a request that runs alone with BatchGenerator too "
                         "(default: with mlx-lm's generate_step, as stream_generate does)")
    ap.add_argument("--dequantize", choices=("auto", "on", "off"), default="auto",
                    help="hold a quantized model's weights as float32 (auto: on mlx's CPU "
                         "device with OpenBLAS loaded, when float32 weights take at most a "
                         "quarter of physical memory; see dequantize_for_cpu)")
    ap.add_argument("--prompt-cache-bytes", type=int, default=None, metavar="N",
                    help="bytes of KV cache the prompt cache and the running sequences may "
                         "hold together; 0 turns the prompt cache off. Default, decided "
                         "once the model is loaded: on a CUDA GPU half of the GPU's memory "
                         "less the weights of the --device-share workers, split among "
                         "them (0, cache off, if the weights take that half); elsewhere (the "
                         "CPU, Apple silicon's unified memory) an eighth of physical memory "
                         "split among them")
    ap.add_argument("--device-share", type=int, default=1, metavar="N",
                    help="workers sharing the device's memory (krserve up passes those of "
                         "every model that may be loaded at once; default 1): the default --prompt-cache-bytes "
                         "is split among them, and on a CUDA GPU so is mlx's memory limit "
                         "(0.8 of the GPU's memory, its own default for one process)")
    ap.add_argument("--group-size", type=int, default=1,
                    help="ranks this worker is split over (tensor parallel with mlx.distributed; "
                         "krserve up sets each rank's MLX_RANK, MLX_HOSTFILE, KRSERVE_GROUP_ADDR and "
                         "KRSERVE_GROUP_TOKEN)")
    args = ap.parse_args(argv)
    for name in ("max_batch", "prefill_batch", "prefill_step"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.prompt_cache_bytes is not None and args.prompt_cache_bytes < 0:
        ap.error("--prompt-cache-bytes must be >= 0")
    if args.device_share < 1:
        ap.error("--device-share must be >= 1")
    return args


# --prefill-step's defaults. On a GPU a prefill step costs more than its
# tokens: every step's attention has shapes not seen before once the prompt
# cache is on (cached lengths vary), and on CUDA each new shape builds a cuDNN
# graph; 2048 is mlx_lm.server's step, so a cached turn is one step there too.
# On the CPU prefill runs at a few hundred tokens/s: a step of B long prompts
# would stall every running stream (and a cancel) for minutes.
PREFILL_STEP_GPU = 2048
PREFILL_STEP_CPU = 512


def default_prefill_step(on_cpu: bool) -> int:
    return PREFILL_STEP_CPU if on_cpu else PREFILL_STEP_GPU
