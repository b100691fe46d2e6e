#!/usr/bin/env python3
"""Memory-bandwidth ceilings of the GPU, measured with PyTorch (no mlx needed).

    python3 scripts/gpu/torch_ceiling.py [--json FILE]

1. device-to-device copy of a 4 GiB buffer (bytes read + bytes written);
2. read-only: sum of a 4 GiB bf16 buffer;
3. the decode floor of a Llama-3.2-3B-shaped model: one token's matrix-vector
   products over every weight matrix (q, k, v, o, gate, up, down per layer, and
   the tied 128256 x 3072 lm_head), random bf16, cuBLAS GEMV, captured in a
   CUDA graph and replayed; weights bytes / time = achieved bandwidth; 1 / time
   = the tok/s a decoder that only streams the weights once could reach here.

Median of CUDA-event timings after warm-up; random data (never zeros).
"""

import argparse
import json
import statistics

import torch


def timed(fn, iters=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1000.0)
    return statistics.median(ts), min(ts), max(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    dev = torch.device("cuda")
    p = torch.cuda.get_device_properties(dev)
    res = dict(device=torch.cuda.get_device_name(dev), sms=p.multi_processor_count,
               mem_gib=p.total_memory / 2**30, torch=torch.__version__, cuda=torch.version.cuda)

    n = 4 * 2**30 // 2  # 4 GiB of bf16
    x = torch.randn(n, device=dev, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    med, lo, hi = timed(lambda: y.copy_(x))
    res["copy_4GiB"] = dict(s=med, min_s=lo, max_s=hi, tb_s=2 * x.nbytes / med / 1e12)
    med, lo, hi = timed(lambda: x.sum(dtype=torch.float32))
    res["sum_4GiB_read"] = dict(s=med, min_s=lo, max_s=hi, tb_s=x.nbytes / med / 1e12)
    del x, y
    torch.cuda.empty_cache()

    # Llama-3.2-3B shapes.
    h, inter, v, layers, q, kv = 3072, 8192, 128256, 28, 3072, 1024
    g = torch.Generator(device=dev).manual_seed(0)

    def w(o, i):
        return (0.02 * torch.randn(o, i, device=dev, generator=g)).to(torch.bfloat16)

    mats = []
    for _ in range(layers):
        mats += [w(q, h), w(kv, h), w(kv, h), w(h, q), w(inter, h), w(inter, h), w(h, inter)]
    emb = w(v, h)
    wbytes = sum(m.nbytes for m in mats) + emb.nbytes
    nparams = sum(m.numel() for m in mats) + emb.numel() + (2 * layers + 1) * h
    xs = {i: torch.randn(1, i, device=dev, dtype=torch.bfloat16) for i in (h, inter)}
    outs = [None] * (len(mats) + 1)

    def step():
        for j, m in enumerate(mats):
            outs[j] = torch.matmul(xs[m.shape[1]], m.t())
        outs[-1] = torch.matmul(xs[h], emb.t())

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    med, lo, hi = timed(graph.replay, iters=50, warmup=5)
    res["decode_gemv_3b"] = dict(weight_bytes=wbytes, params=nparams, s=med, min_s=lo, max_s=hi,
                                 tb_s=wbytes / med / 1e12, tok_s=1 / med)
    txt = json.dumps(res, indent=2)
    print(txt)
    if args.json:
        with open(args.json, "w") as f:
            f.write(txt + "\n")


if __name__ == "__main__":
    main()
