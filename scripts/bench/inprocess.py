#!/usr/bin/env python3
"""In-process mlx-lm baseline: the lower bound for krserve's latency.

    python scripts/bench/inprocess.py --model DIR --questions FILE --max-tokens 50 \
        --json out/inprocess.json [--ignore-eos] [--requests N] [--warmup 1]

The equivalent of kr-serve-mlx's "mlx-engine baseline": the model is loaded once
with ``mlx_lm.load`` and every question is run sequentially in this process, so
no HTTP, IPC or scheduling is paid. For each question the chat template is
applied (inside the timed region, as a server must do it too) and
``mlx_lm.stream_generate`` runs with a greedy sampler (``make_sampler(temp=0)``)
and a fixed ``max_tokens``.

Measured per request, with the same meaning as the Go load generator
(``loadgen``) so the two can be compared with ``krserve bench --compare``:

- TTFT: from the start of the request to the first *non-empty* text segment
  (an HTTP server only sends a chunk when there is text, so the first token may
  be held back when it is a partial UTF-8 sequence);
- end-to-end time; tokens = ``generation_tokens`` of the last response;
- tok/s = tokens / end-to-end time (TTFT included);
- inter-token gaps between non-empty text segments.

The JSON written is loadgen's ``Result`` (schema ``krserve-bench/1``):
percentiles by linear interpolation (numpy's default), population std dev.
With ``--ignore-eos`` a logits processor sets the EOS logits to -inf, so every
request makes exactly ``max_tokens`` tokens (krserve's ``ignore_eos``).
"""

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SCHEMA = "krserve-bench/1"


# --- statistics, identical to loadgen/stats.go ---------------------------------


def percentile_sorted(s, p):
    n = len(s)
    if n == 0:
        return 0.0
    if n == 1 or p <= 0:
        return s[0]
    if p >= 100:
        return s[-1]
    pos = p / 100.0 * (n - 1)
    lo = int(math.floor(pos))
    hi = lo + 1
    if hi >= n:
        return s[-1]
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(xs):
    n = len(xs)
    if n == 0:
        return dict(n=0, mean=0.0, median=0.0, p95=0.0, p99=0.0, min=0.0, max=0.0, stddev=0.0)
    s = sorted(xs)
    mean = sum(s) / n
    var = sum((x - mean) ** 2 for x in s) / n
    return dict(
        n=n,
        mean=mean,
        median=percentile_sorted(s, 50),
        p95=percentile_sorted(s, 95),
        p99=percentile_sorted(s, 99),
        min=s[0],
        max=s[-1],
        stddev=math.sqrt(var),
    )


def finalize(result):
    """Fill aggregates and summaries from result['records'] (as loadgen does)."""
    e2e, ttft, tps, gaps = [], [], [], []
    completed = errors = tokens = 0
    by_status = {}
    for r in result["records"]:
        if r.get("error"):
            errors += 1
            k = r.get("error_kind") or "other"
            by_status[k] = by_status.get(k, 0) + 1
            continue
        completed += 1
        tokens += r["tokens"]
        e2e.append(r["e2e_ms"])
        if r.get("chunks", 0) > 0:
            ttft.append(r["ttft_ms"])
        tps.append(r["tok_per_s"])
        gaps.extend(r.get("itl_ms") or [])
    wall_s = result["wall_ms"] / 1000.0
    result.update(
        completed=completed,
        errors=errors,
        total_tokens=tokens,
        tok_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        req_per_s=completed / wall_s if wall_s > 0 else 0.0,
        response_ms=summarize(e2e),
        ttft_ms=summarize(ttft),
        request_tok_per_s=summarize(tps),
        itl_ms=summarize(gaps),
    )
    if by_status:
        result["errors_by_status"] = by_status
    return result


# --- the benchmark ---------------------------------------------------------------


def read_questions(path):
    with open(path, encoding="utf-8") as f:
        qs = [l.strip() for l in f]
    qs = [q for q in qs if q and not q.startswith("#")]
    if not qs:
        sys.exit(f"{path}: no questions")
    return qs


def model_info(model_dir):
    info = {}
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
        q = cfg.get("quantization") or cfg.get("quantization_config")
        info["quantization"] = q if q else "none (" + str(cfg.get("torch_dtype", "?")) + ")"
        info["model_type"] = cfg.get("model_type")
    except (OSError, ValueError) as e:
        info["quantization"] = f"unknown ({e})"
    return info


def make_eos_mask(eos_ids):
    import mlx.core as mx

    cache = {}

    def processor(tokens, logits):
        v = logits.shape[-1]
        m = cache.get(v)
        if m is None:
            m = [0.0] * v
            for i in eos_ids:
                if 0 <= i < v:
                    m[i] = -math.inf
            m = cache[v] = mx.array(m, dtype=logits.dtype)
        return logits + m

    return processor


def record(t0, first, tokens, prompt_tokens, chunks, finish, gaps):
    """One request's record, ending now (the load generator's schema)."""
    e2e = (time.perf_counter() - t0) * 1000.0
    return dict(
        ttft_ms=(first - t0) * 1000.0 if first is not None else 0.0,
        e2e_ms=e2e,
        tokens=tokens,
        prompt_tokens=prompt_tokens,
        tokens_source="generator",
        chunks=chunks,
        tok_per_s=tokens / (e2e / 1000.0) if e2e > 0 else 0.0,
        finish_reason=finish,
        itl_ms=gaps,
    )


def run_one(model, tokenizer, question, max_tokens, sampler, processors, stream_generate):
    t0 = time.perf_counter()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True
    )
    first = None
    last = None
    gaps = []
    chunks = 0
    resp = None
    for resp in stream_generate(
        model,
        tokenizer,
        prompt,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=processors,
    ):
        if resp.text:
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                gaps.append((now - last) * 1000.0)
            last = now
            chunks += 1
    tokens = resp.generation_tokens if resp is not None else 0
    finish = (resp.finish_reason if resp is not None else None) or ""
    return t0, record(t0, first, tokens, len(prompt), chunks, finish, gaps)


def run_one_batch(gen, tokenizer, question, max_tokens, sampler, processors):
    """One request through a (long-lived) mlx-lm BatchGenerator, batch of one.

    This is the generation path of mlx_lm.server and of krserve's worker, so it
    isolates what HTTP, IPC and scheduling add; ``stream_generate`` is the
    classic single-sequence loop (kr-serve-mlx's baseline).
    """
    t0 = time.perf_counter()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True
    )
    (uid,) = gen.insert(
        [prompt],
        max_tokens=[max_tokens],
        samplers=[sampler],
        logits_processors=[processors or []],
    )
    detok = tokenizer.detokenizer
    detok.reset()
    first = last = None
    gaps = []
    chunks = tokens = 0
    finish = ""
    done = False
    while not done:
        responses = gen.next_generated()
        if not responses:
            break
        for r in responses:
            if r.uid != uid:
                continue
            tokens += 1
            if r.finish_reason != "stop":
                detok.add_token(r.token)
            if r.finish_reason is not None:
                detok.finalize()
                finish = r.finish_reason
                done = True
            text = detok.last_segment
            if text:
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps.append((now - last) * 1000.0)
                last = now
                chunks += 1
    return t0, record(t0, first, tokens, len(prompt), chunks, finish, gaps)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="mlx-lm model directory")
    ap.add_argument("--questions", default="scripts/bench/questions.txt")
    ap.add_argument("--max-tokens", type=int, default=50)
    ap.add_argument("--json", required=True, help="output file (loadgen Result schema)")
    ap.add_argument("--ignore-eos", action="store_true", help="mask EOS so every request makes max-tokens tokens")
    ap.add_argument("--requests", type=int, default=0, help="requests (default: one per question)")
    ap.add_argument("--warmup", type=int, default=1, help="unrecorded requests first")
    ap.add_argument(
        "--engine",
        choices=["stream_generate", "batch"],
        default="stream_generate",
        help="stream_generate (default; kr-serve-mlx's baseline) or batch: a BatchGenerator "
        "with one sequence at a time (the loop mlx_lm.server and krserve's worker run)",
    )
    ap.add_argument("--name", default="")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--dequantize", choices=("auto", "on", "off"), default="off",
                    help="as krserve's worker: hold a quantized model as float32 (default off: as stored)")
    args = ap.parse_args(argv)

    # The BLAS krserve's worker uses (OpenBLAS from the venv, on Linux), loaded
    # the same way, before mlx: the baseline does the same arithmetic.
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "worker-py"))
    from krserve_worker import blas
    from krserve_worker.cpuweights import dequantize_for_cpu

    blas_info = blas.load()
    print(f"in-process: BLAS: {blas_info}", file=sys.stderr, flush=True)

    import mlx.core as mx
    import mlx_lm
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    questions = read_questions(args.questions)
    n = args.requests or len(questions)

    t_load = time.perf_counter()
    model, tokenizer = load(args.model)
    weights = dequantize_for_cpu(model, args.dequantize, fast_blas=blas_info.startswith("OpenBLAS"),
                                 on_cpu=mx.default_device().type == mx.cpu)
    load_s = time.perf_counter() - t_load
    print(f"in-process: weights: {weights}", file=sys.stderr, flush=True)
    sampler = make_sampler(temp=0.0)
    processors = [make_eos_mask(sorted(tokenizer.eos_token_ids))] if args.ignore_eos else None

    if args.engine == "batch":
        from mlx_lm.generate import BatchGenerator

        gen = BatchGenerator(
            model, stop_tokens=[[e] for e in sorted(tokenizer.eos_token_ids)], completion_batch_size=1,
            prefill_batch_size=1,
        )

        def one(q):
            return run_one_batch(gen, tokenizer, q, args.max_tokens, sampler, processors)
    else:

        def one(q):
            return run_one(model, tokenizer, q, args.max_tokens, sampler, processors, stream_generate)

    name = args.name or ("in-process mlx-lm" if args.engine == "stream_generate" else "in-process BatchGenerator")
    for i in range(args.warmup):
        one(questions[i % len(questions)])

    started = datetime.datetime.now(datetime.timezone.utc)
    records = []
    run_start = time.perf_counter()
    last_end = run_start
    for i in range(n):
        pi = i % len(questions)
        t0, rec = one(questions[pi])
        last_end = t0 + rec["e2e_ms"] / 1000.0
        records.append(dict(index=i, prompt=pi, start_ms=(t0 - run_start) * 1000.0, **rec))
        if not args.quiet:
            print(
                f"\r{i + 1}/{n}  ttft {rec['ttft_ms']:.1f} ms  e2e {rec['e2e_ms']:.1f} ms  "
                f"{rec['tok_per_s']:.1f} tok/s   ",
                end="",
                file=sys.stderr,
                flush=True,
            )
    if not args.quiet:
        print(file=sys.stderr)

    try:
        device = str(mx.default_device())
    except Exception:  # pragma: no cover - informational only
        device = "?"
    result = dict(
        schema=SCHEMA,
        name=name,
        run=dict(
            engine="inprocess",
            endpoint="mlx_lm." + ("stream_generate" if args.engine == "stream_generate" else "BatchGenerator"),
            model=os.path.abspath(args.model),
            chat=True,
            concurrency=1,
            requests=n,
            max_tokens=args.max_tokens,
            temperature=0.0,
            ignore_eos=bool(args.ignore_eos),
            prompts=len(questions),
        ),
        started_at=started.isoformat(),
        wall_ms=(last_end - run_start) * 1000.0,
        records=records,
        # Extra context (ignored by the Go reader).
        env=dict(
            mlx=getattr(mx, "__version__", "?"),
            mlx_lm=getattr(mlx_lm, "__version__", "?"),
            python=platform.python_version(),
            platform=platform.platform(),
            blas=blas_info,
            weights=weights,
            device=device,
            load_s=load_s,
            **model_info(args.model),
        ),
    )
    finalize(result)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    if not args.quiet:
        r, t = result["response_ms"], result["ttft_ms"]
        print(
            f"{name}: {result['completed']}/{n} ok, mean e2e {r['mean']:.2f} ms, "
            f"mean TTFT {t['mean']:.2f} ms, {result['tok_per_s']:.2f} tok/s aggregate",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
