"""Per-token cost of grammar-constrained decoding in a batch (CPU or GPU).

Decodes B sequences together with mlx-lm's BatchGenerator, as the worker does
(OpenBLAS and float32 weights on the Linux CPU), with 0, 1 or all B sequences
constrained by krserve_worker.grammar.GrammarProcessor, and reports decode
tokens/s for each, medians over --reps runs, interleaved so drift hits every
case alike. The grammar is an endless stream of small JSON objects (Lark:
``start: obj+``), so constrained sequences run to max_tokens like free ones
(no EOS: the generator has no stop tokens) and every step computes a JSON mask.

    PYTHONPATH=worker-py .venv/bin/python scripts/bench/grammar.py --batch 8 --tokens 64 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "worker-py"))

from krserve_worker import blas  # noqa: E402

OBJ = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                        "age": {"type": "integer", "minimum": 0, "maximum": 150}},
       "required": ["name", "age"], "additionalProperties": False,
       "x-guidance": {"whitespace_flexible": False}}
LARK = "start: obj+\nobj: %json " + json.dumps(OBJ)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/krserve/models/SmolLM2-135M-Instruct-Q4_1"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)

    info = blas.load()
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator

    from krserve_worker import grammar
    from krserve_worker.worker import _model_info, dequantize_for_cpu

    model, tok, config = load(args.model, return_config=True)
    vocab, _ = _model_info(model, tok, config)
    dequantize_for_cpu(model, "auto", on_cpu=mx.default_device().type == mx.cpu,
                       fast_blas=info.startswith("OpenBLAS"))
    g = grammar.Grammars(tok._tokenizer, vocab, tok.eos_token_ids)
    mask = grammar.pick_mask()
    prompt = tok.apply_chat_template([{"role": "user", "content": "List people as JSON objects."}],
                                     add_generation_prompt=True, tokenize=True)

    def run(n_constrained: int) -> float:
        gen = BatchGenerator(model, stop_tokens=[], completion_batch_size=args.batch,
                             prefill_batch_size=args.batch)
        procs = [[grammar.GrammarProcessor(g.lark_matcher(LARK, "bench"), vocab, mask)]
                 if i < n_constrained else [] for i in range(args.batch)]
        gen.insert([list(prompt)] * args.batch, max_tokens=[args.tokens] * args.batch,
                   logits_processors=procs)
        n, t0 = 0, None
        while True:
            _, responses = gen.next()
            if responses and t0 is None:
                t0 = time.perf_counter()  # from the first decoded token: prefill excluded
                continue
            n += len(responses)
            if any(r.finish_reason for r in responses) and all(r.finish_reason for r in responses):
                break
        dt = time.perf_counter() - t0
        assert not any(p and p[0].error for p in procs), [p[0].error for p in procs if p]
        return n / dt

    cases = {"free": 0, "1 constrained": 1, f"all {args.batch} constrained": args.batch}
    runs = {k: [] for k in cases}
    run(0)  # warm up
    for _ in range(args.reps):
        for k, c in cases.items():
            runs[k].append(run(c))
    base = statistics.median(runs["free"])
    print(f"B={args.batch}, {args.tokens} tokens/sequence, {args.reps} runs, {mx.default_device()}, mask: {mask.__name__}")
    for k, v in runs.items():
        m = statistics.median(v)
        print(f"{k:>18}: {m:7.1f} tok/s (min {min(v):.1f}, max {max(v):.1f})  {m / base:6.1%} of free")
    return 0


if __name__ == "__main__":
    sys.exit(main())
