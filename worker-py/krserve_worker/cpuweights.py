"""A quantized model's weights held as float32 on mlx's CPU device
(``--dequantize``): mlx's CPU backend has no fast quantized matmul, while
float32 matmuls go to BLAS (blas.py loads OpenBLAS).
"""

from __future__ import annotations

from . import device


def dequantize_for_cpu(model, setting: str, *, fast_blas: bool, on_cpu: bool,
                       memory: int | None = None) -> str:
    """Replace a quantized model's quantized layers by float32 ones, in place.

    mlx's CPU backend has no fast quantized matmul (a 4-bit 1536x576
    matrix-vector product costs ~1.6 ms here, as much as the float32 one on the
    reference BLAS), while float32 matmuls go to BLAS: with OpenBLAS loaded
    (krserve_worker.blas), SmolLM2-135M Q4_1 prefills ~9x and decodes ~2x
    faster dequantized. The values are the quantized ones exactly
    (:func:`_dequantized_weight`), so only the summation order changes. ``auto`` does it
    on the CPU device with OpenBLAS when float32 weights fit in a quarter of
    physical memory; on a GPU (Metal, CUDA) quantized kernels are the fast
    path, so ``auto`` leaves the model alone. Returns what was done, for logs.
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    quantized = [(name, m) for name, m in model.named_modules()
                 if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
                 or type(m).__name__ == "QuantizedSwitchLinear"]
    if not quantized:
        return "model not quantized"
    if setting == "off":
        return "kept quantized (--dequantize off)"
    n = sum(m.weight.size * 32 // m.bits for _, m in quantized)
    need = 4 * (n + sum(v.size for k, v in tree_flatten(model.parameters())
                        if not k.endswith((".weight", ".scales", ".biases"))))
    if setting == "auto":
        memory = device.physical_memory() if memory is None else memory
        if not on_cpu:
            return "kept quantized (not on the CPU device)"
        if not fast_blas:
            return "kept quantized (no OpenBLAS: float32 matmuls would not be faster)"
        if memory and need > memory // 4:
            return (f"kept quantized (float32 weights would take {need / 2**30:.1f} GiB, "
                    f"over a quarter of {memory / 2**30:.1f} GiB)")
    from mlx.utils import tree_unflatten

    layers = []
    for name, m in quantized:
        w = _dequantized_weight(m)
        mx.eval(w)  # one layer at a time: the peak is one layer, not the model
        if isinstance(m, nn.QuantizedEmbedding):
            new = nn.Embedding(w.shape[0], w.shape[1])
        elif isinstance(m, nn.QuantizedLinear):
            new = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
        else:
            from mlx_lm.models.switch_layers import SwitchLinear

            new = SwitchLinear(w.shape[2], w.shape[1], w.shape[0], bias="bias" in m)
        new.weight = w
        if "bias" in m:
            new.bias = m.bias
        layers.append((name, new))
    model.update_modules(tree_unflatten(layers))
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return f"dequantized {len(quantized)} layers to float32 ({need / 2**20:.0f} MiB)"


def _dequantized_weight(m):
    """A quantized layer's weight as float32: ``q * scale + bias`` per group for
    mlx's affine 2/4/8-bit packing (computed in float32, ~3x faster on the CPU
    than ``mx.dequantize``, which also rounds to the scales' float16), else
    ``mx.dequantize``."""
    import mlx.core as mx

    mode = getattr(m, "mode", "affine")
    biases = getattr(m, "biases", None)
    if mode == "affine" and m.bits in (2, 4, 8) and biases is not None:
        w = m.weight
        shifts = mx.arange(0, 32, m.bits, dtype=mx.uint32)
        q = mx.right_shift(w[..., None], shifts) & ((1 << m.bits) - 1)
        q = q.reshape(*w.shape[:-1], -1, m.group_size).astype(mx.float32)
        out = q * m.scales.astype(mx.float32)[..., None] + biases.astype(mx.float32)[..., None]
        return out.reshape(*w.shape[:-1], -1)
    return mx.dequantize(m.weight, m.scales, biases, m.group_size, m.bits, mode=mode).astype(mx.float32)
