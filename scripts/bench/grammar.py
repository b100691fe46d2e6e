"""Per-token cost of grammar-constrained decoding in a batch (CPU or GPU).

Decodes B sequences together as the worker does (OpenBLAS and float32 weights
on the Linux CPU), with 0, 1 or all B sequences constrained by
krserve_worker.grammar.GrammarProcessor, and reports decode tokens/s for each,
medians over --reps runs with min and max, interleaved so drift hits every
case alike, and each rep's ratio to that rep's free run (runs seconds
apart: less exposed to other jobs on a shared machine than the medians).
Two paths (--path, both by default, interleaved in one run):

- ``per-row``: mlx-lm's own BatchGenerator, which calls each row's processors
  one row at a time (krserve before batchmask.py; its GrammarProcessor now
  reads the sampled token before queueing the forward pass, which helps the
  first row of a step only: the other rows' token contexts are queued behind
  the forward pass);
- ``batched``: the worker's generator (krserve_worker.batchmask): all
  constrained rows of a step masked by one grammar.BatchMasker call.

The grammar is an endless stream of small JSON objects (Lark: ``start:
obj+``), so constrained sequences run to max_tokens like free ones (no EOS:
the generators have no stop tokens) and every step computes a JSON mask.

``--mask-only`` times the masking alone instead: the processor block of a
decode step (per-row: mlx-lm's loop of slices, token contexts, processor
calls and a concatenate; batched: MaskingGenerationBatch._process) on fixed
logits of the model's width, no forward pass, and reports µs per step (host:
until the masked logits' graph is built; total: until they are evaluated).
``--vocab N`` builds the llguidance tokenizer N wide (a padded vocabulary,
e.g. 128256 for a Llama-3 width with this tokenizer) for --mask-only.

    PYTHONPATH=worker-py .venv/bin/python scripts/bench/grammar.py --batch 8 --tokens 64 --reps 3
    PYTHONPATH=worker-py .venv/bin/python scripts/bench/grammar.py --model .cache/tiny-model --batch 32 --tokens 128 --reps 7
    PYTHONPATH=worker-py .venv/bin/python scripts/bench/grammar.py --mask-only --batch 32 --reps 7
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "worker-py"))

from krserve_worker import blas  # noqa: E402

OBJ = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                        "age": {"type": "integer", "minimum": 0, "maximum": 150}},
       "required": ["name", "age"], "additionalProperties": False,
       "x-guidance": {"whitespace_flexible": False}}
LARK = "start: obj+\nobj: %json " + json.dumps(OBJ)
PATHS = ("per-row", "batched")


def summary(v: list[float]) -> str:
    return f"{statistics.median(v):8.1f} (min {min(v):.1f}, max {max(v):.1f})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/krserve/models/SmolLM2-135M-Instruct-Q4_1"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--path", choices=("both",) + PATHS, default="both")
    ap.add_argument("--cases", default="free,1,all",
                    help="comma-separated cases: free, 1 (one row constrained), all (every row)")
    ap.add_argument("--mask-only", action="store_true", help="time the masking alone (µs per step)")
    ap.add_argument("--vocab", type=int, default=0, help="--mask-only: logits width (default: the model's)")
    ap.add_argument("--steps", type=int, default=64, help="--mask-only: steps per run")
    args = ap.parse_args(argv)
    paths = PATHS if args.path == "both" else (args.path,)

    info = blas.load()
    import mlx.core as mx
    import mlx_lm
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator

    from krserve_worker import batchgen, batchmask, grammar
    from krserve_worker.cpuweights import dequantize_for_cpu
    from krserve_worker.worker import _model_info

    model, tok, config = load(args.model, return_config=True)
    vocab, _ = _model_info(model, tok, config)
    if args.mask_only and args.vocab:
        vocab = args.vocab
    dequantize_for_cpu(model, "auto", on_cpu=mx.default_device().type == mx.cpu,
                       fast_blas=info.startswith("OpenBLAS"))
    g = grammar.Grammars(tok._tokenizer, vocab, tok.eos_token_ids)
    mask = grammar.pick_mask()
    why = batchmask.unsupported()
    if why and "batched" in paths:
        print(f"batched path unavailable: {why}", file=sys.stderr)
        return 2
    masker = grammar.BatchMasker(vocab, mask)
    head = (f"B={args.batch}, {mx.default_device()}, mask: {mask.__name__}, vocab {vocab}, "
            f"mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}, {args.reps} runs")
    cases = {"free": 0, "1 constrained": 1, f"all {args.batch} constrained": args.batch}
    pick = {"free": "free", "1": "1 constrained", "all": f"all {args.batch} constrained"}
    want = args.cases.split(",")
    if set(want) - set(pick) or "free" not in want:
        ap.error(f"--cases: a comma-separated list of {', '.join(pick)}, with free (the baseline)")
    cases = {pick[c]: cases[pick[c]] for c in pick if c in want}

    def processors(n_constrained: int):
        return [[grammar.GrammarProcessor(g.lark_matcher(LARK, "bench"), vocab, mask)]
                if i < n_constrained else [] for i in range(args.batch)]

    if args.mask_only:
        return mask_only(args, paths, cases, head, processors, masker, vocab)

    prompt = tok.apply_chat_template([{"role": "user", "content": "List people as JSON objects."}],
                                     add_generation_prompt=True, tokenize=True)

    def run(path: str, n_constrained: int) -> float:
        kw = dict(stop_tokens=[], completion_batch_size=args.batch, prefill_batch_size=args.batch)
        if path == "batched":
            gen = batchgen.Generator(model, masker, first_tokens_first=False, **kw)
        else:
            gen = BatchGenerator(model, **kw)
        procs = processors(n_constrained)
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

    runs = {(p, k): [] for k in cases for p in paths}
    for p in paths:
        run(p, args.batch)  # warm up
    for rep in range(args.reps):
        for k, c in cases.items():
            for p in paths:
                runs[(p, k)].append(run(p, c))
        # Each rep as it ends (a run cut short still leaves its reps).
        print(f"rep {rep + 1}: " + ", ".join(f"{p} {k} {runs[(p, k)][-1]:.1f}" for p in paths for k in cases),
              file=sys.stderr, flush=True)
    print(f"{head}, {args.tokens} tokens/sequence")
    print("decode tok/s, median (min, max); % of free: of the same path's free median, and the "
          "median (min, max) of each rep's ratio to that rep's free run")
    for p in paths:
        free = runs[(p, "free")]
        base = statistics.median(free)
        for k in cases:
            v = runs[(p, k)]
            r = [100 * a / b for a, b in zip(v, free)]
            print(f"{p:>8} {k:>18}: {summary(v)}  {statistics.median(v) / base:6.1%}  "
                  f"per rep {statistics.median(r):5.1f}% ({min(r):.1f}, {max(r):.1f})")
    return 0


def mask_only(args, paths, cases, head, processors, masker, vocab) -> int:
    """µs per step of the processor block alone, per path and case."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.models.cache import TokenBuffer

    from krserve_worker import batchmask

    rng = np.random.default_rng(0)
    logits_steps = [mx.array(rng.standard_normal((args.batch, vocab)).astype(np.float32))
                    for _ in range(8)]
    mx.eval(logits_steps)
    prompt = [1, 2, 3]

    def per_row(batch, inputs, logits):  # mlx-lm 0.32.2's processor block
        processed_logits = []
        for e in range(len(batch.logits_processors)):
            sample_logits = logits[e : e + 1]
            procs = batch.logits_processors[e] or ()
            if procs:
                context = batch._token_context[e].update_and_fetch(inputs[e : e + 1])
                for processor in procs:
                    sample_logits = processor(context, sample_logits)
            processed_logits.append(sample_logits)
        return mx.concatenate(processed_logits, axis=0)

    def batched(batch, inputs, logits):
        return batchmask.MaskingGenerationBatch._process(batch, inputs, logits)[0]

    step = {"per-row": per_row, "batched": batched}

    def run(path: str, n_constrained: int) -> tuple[float, float]:
        batch = SimpleNamespace(logits_processors=processors(n_constrained), masker=masker,
                                _token_context=[TokenBuffer(prompt) for _ in range(args.batch)])
        inputs = mx.array([prompt[-1]] * args.batch, dtype=mx.uint32)
        host = total = 0.0
        for i in range(args.steps):
            logits = logits_steps[i % len(logits_steps)]
            t0 = time.perf_counter()
            out = step[path](batch, inputs, logits) if n_constrained else logits
            t1 = time.perf_counter()
            mx.eval(out)
            t2 = time.perf_counter()
            host, total = host + t1 - t0, total + t2 - t0
            # Each row's best allowed token feeds the next step, as sampling would.
            inputs = mx.argmax(out, axis=-1).astype(mx.uint32)
            mx.eval(inputs)
        return 1e6 * host / args.steps, 1e6 * total / args.steps

    runs = {(p, k): [] for k in cases for p in paths if cases[k]}
    for p in paths:
        run(p, args.batch)  # warm up
    for _ in range(args.reps):
        for k, c in cases.items():
            for p in paths:
                if c:
                    runs[(p, k)].append(run(p, c))
    print(f"{head}, {args.steps} steps/run; masking alone, µs per step, median (min, max)")
    for k in cases:
        for p in paths:
            if cases[k]:
                v = runs[(p, k)]
                print(f"{p:>8} {k:>18}: host {summary([h for h, _ in v])}  total {summary([t for _, t in v])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
