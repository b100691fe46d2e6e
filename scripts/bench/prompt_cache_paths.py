#!/usr/bin/env python3
"""A lone request that hits the prompt cache: generate_step fast path or BatchGenerator?

    PYTHONPATH=worker-py .venv/bin/python scripts/bench/prompt_cache_paths.py [MODEL_DIR] [--runs 8]

Starts one real worker with the fast path (the default) and one with
``--no-single-fast-path``, one after the other. Each first prefills a long
conversation (a ~600-token system prompt and history), then is sent, one at a
time, that conversation plus a new short user message: all but the new
message comes from the cache. Reports, per worker, the median and range over
the runs of the time to the first token and of the time per generated token
(greedy, 32 tokens, EOS suppressed so every run has the same length).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "py"))

from conftest import WorkerProc, summarize  # noqa: E402

DEFAULT_MODEL = Path.home() / ".cache" / "krserve" / "models" / "SmolLM2-135M-Instruct-Q4_1"
QUESTIONS = (ROOT / "scripts" / "bench" / "questions.txt").read_text().split("\n")


def measure(model: str, args: tuple, runs: int, n: int = 32):
    w = WorkerProc(model, args=args, stderr_path="/dev/null")
    eos = w.hello()["eos"]
    bias = {e: -1e9 for e in eos}
    history = [{"role": "system", "content": " ".join(QUESTIONS[:30])}]
    for q in QUESTIONS[30:34]:
        history += [{"role": "user", "content": q}, {"role": "assistant", "content": q[::-1]}]
    rid = 1
    w.send({"t": "gen", "id": rid, "messages": history + [{"role": "user", "content": "Hi."}], "max_tokens": 1})
    w.collect(rid)
    ttft, tpot, cached = [], [], []
    for i in range(runs):
        rid += 1
        msgs = history + [{"role": "user", "content": QUESTIONS[34 + i % 16]}]
        t0 = time.perf_counter()
        w.send({"t": "gen", "id": rid, "messages": msgs, "max_tokens": n, "logit_bias": bias})
        first = w.next_for(rid)
        t1 = time.perf_counter()
        frames = [first] + w.collect(rid)
        t2 = time.perf_counter()
        done = summarize(frames)["last"]
        ttft.append(1000 * (t1 - t0))
        tpot.append(1000 * (t2 - t1) / (n - 1))
        cached.append(f"{done.get('cached', 0)}/{done['ptoks']}")
    w.stop()
    return ttft, tpot, cached


def fmt(xs):
    return f"{statistics.median(xs):.1f} ms (min {min(xs):.1f}, max {max(xs):.1f})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
    ap.add_argument("--runs", type=int, default=8)
    a = ap.parse_args()
    for name, args in (("fast path (generate_step)", ()), ("batch path", ("--no-single-fast-path",))):
        ttft, tpot, cached = measure(a.model, args, a.runs)
        print(f"{name:28s} TTFT {fmt(ttft)}   per token {fmt(tpot)}   cached/prompt {cached[0]}")


if __name__ == "__main__":
    main()
