"""The device a worker's model runs on: what it is, how much memory it has,
and mlx's memory limits when several workers share it.

mlx's CUDA allocator lets each process use 0.8 of the GPU's memory and keep
as much again in its buffer cache (freed buffers it reuses) before it gives
any back. Two workers on one GPU could each claim that 0.8: on the H200, two
workers with long conversations ran the GPU out of memory (cudaMallocAsync
failed, ten crashes in a 160 s run, docs/gpu.md). A worker that knows it is
one of ``share`` on a CUDA GPU sets its memory and cache limits to its part
of mlx's own 0.8, so each returns cached buffers before it crowds the others
out. (Apple silicon's unified memory and the CPU are left to mlx's defaults.)
"""

from __future__ import annotations

import os
from typing import NamedTuple

# mlx's CUDA allocator's default memory limit, a fraction of the GPU's memory.
MLX_CUDA_LIMIT = 0.8


class Device(NamedTuple):
    kind: str  # "cpu", "metal" or "cuda"
    memory: int  # a CUDA GPU's own memory in bytes; 0 elsewhere or unknown


def current() -> Device:
    """mlx's default device (on the MLX thread)."""
    import mlx.core as mx

    if mx.default_device().type != mx.gpu:
        return Device("cpu", 0)
    if mx.metal.is_available():
        return Device("metal", 0)
    try:
        info = mx.device_info()
    except Exception:  # an mlx that cannot say: memory unknown
        info = {}
    # mlx 0.32's CUDA backend says total_memory; Metal's says memory_size.
    return Device("cuda", int(info.get("total_memory") or info.get("memory_size") or 0))


def physical_memory() -> int:
    """The machine's memory in bytes (0: unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return 0


def weights_bytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def memory_limit(dev: Device, share: int) -> int | None:
    """mlx's memory and buffer cache limit for one of ``share`` workers on
    ``dev``: on a CUDA GPU of known memory shared by more than one worker,
    their part of mlx's own limit; None: mlx's default stays."""
    if dev.kind != "cuda" or dev.memory <= 0 or share <= 1:
        return None
    return int(dev.memory * MLX_CUDA_LIMIT) // share


def apply_memory_limit(dev: Device, share: int) -> str:
    """Set ``memory_limit``'s limits in mlx; what was done, for the log ("" if nothing)."""
    limit = memory_limit(dev, share)
    if limit is None:
        return ""
    import mlx.core as mx

    mx.set_memory_limit(limit)
    mx.set_cache_limit(limit)
    return (f"mlx memory and cache limit {limit / 2**30:.1f} GiB: {MLX_CUDA_LIMIT} of the GPU's "
            f"{dev.memory / 2**30:.1f} GiB split among {share} workers")
