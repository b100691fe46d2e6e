#!/usr/bin/env python3
"""mlx on the GPU: bandwidth and the model's single-stream decode rate.

    python scripts/gpu/probe.py --model DIR [--json FILE] [--max-tokens 128]

1. mlx read bandwidth: sum of a --gib (2) GiB bf16 array; copy bandwidth: x * 1
   over half of it (read + write);
2. mlx-lm stream_generate, one sequence, greedy, EOS masked, --max-tokens tokens,
   3 runs after a warm-up: mlx-lm's own prompt_tps / generation_tps;
3. the bare decode step: the model called on one token with a KV cache, the
   next step queued with mx.async_eval as mlx-lm does, 200 steps: seconds per
   token without sampling, detokenizing or Python request handling.
Parameter count and weight bytes come from the loaded model.
"""

import argparse
import json
import math
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def tsync(fn, iters=10):
    import mlx.core as mx

    mx.eval(fn())
    mx.synchronize()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--json", default="")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--gib", type=float, default=2.0, help="size of the bandwidth test array")
    args = ap.parse_args()

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load, stream_generate
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.sample_utils import make_sampler

    res = dict(mlx=mx.__version__, device=str(mx.default_device()))
    try:
        res["device_info"] = {k: str(v) for k, v in mx.device_info().items()}
    except Exception as e:  # noqa: BLE001
        res["device_info"] = f"? ({e})"

    n = int(args.gib * 2**30) // 2
    x = mx.random.normal((n,)).astype(mx.bfloat16)
    mx.eval(x)
    s = tsync(lambda: x.sum())
    res["mlx_sum_read"] = dict(bytes=x.nbytes, s=s, tb_s=x.nbytes / s / 1e12)
    y = x[: n // 2]
    s = tsync(lambda: y * 1)
    res["mlx_mul_copy"] = dict(bytes=2 * y.nbytes, s=s, tb_s=2 * y.nbytes / s / 1e12)
    del x, y
    mx.clear_cache()

    t0 = time.perf_counter()
    model, tok = load(args.model)
    res["load_s"] = time.perf_counter() - t0
    params = dict(tree_flatten(model.parameters()))
    res["params"] = int(sum(v.size for v in params.values()))
    res["weight_bytes"] = int(sum(v.nbytes for v in params.values()))
    res["dtypes"] = sorted({str(v.dtype) for v in params.values()})

    eos = sorted(tok.eos_token_ids)
    mask = None

    def proc(tokens, logits):
        nonlocal mask
        if mask is None:
            m = [0.0] * logits.shape[-1]
            for i in eos:
                m[i] = -math.inf
            mask = mx.array(m, dtype=logits.dtype)
        return logits + mask

    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True)
    sampler = make_sampler(temp=0.0)
    runs = []
    for i in range(4):
        last = None
        for last in stream_generate(model, tok, prompt, max_tokens=args.max_tokens, sampler=sampler,
                                    logits_processors=[proc]):
            pass
        if i:
            runs.append(dict(prompt_tps=last.prompt_tps, generation_tps=last.generation_tps,
                             tokens=last.generation_tokens, peak_gb=last.peak_memory))
    res["stream_generate"] = runs
    res["stream_generate_tps_median"] = statistics.median(r["generation_tps"] for r in runs)

    # Bare decode loop (mlx-lm's generate_step without the sampler's extras).
    cache = make_prompt_cache(model)
    y = mx.array([prompt])
    logits = model(y, cache=cache)
    nxt = mx.argmax(logits[:, -1, :], axis=-1)
    mx.eval(nxt)

    def step(t):
        lg = model(t[:, None], cache=cache)
        return mx.argmax(lg[:, -1, :], axis=-1)

    for _ in range(10):
        nxt = step(nxt)
        mx.eval(nxt)
    n = 200
    t0 = time.perf_counter()
    cur = step(nxt)
    mx.async_eval(cur)
    for _ in range(n - 1):
        nx = step(cur)
        mx.async_eval(nx)
        cur.item()
        cur = nx
    cur.item()
    dt = time.perf_counter() - t0
    res["bare_decode"] = dict(steps=n, s_per_tok=dt / n, tok_s=n / dt,
                              tb_s=res["weight_bytes"] / (dt / n) / 1e12)
    res["peak_memory_gb"] = mx.get_peak_memory() / 1e9
    txt = json.dumps(res, indent=2)
    print(txt)
    if args.json:
        with open(args.json, "w") as f:
            f.write(txt + "\n")


if __name__ == "__main__":
    main()
