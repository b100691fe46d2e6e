#!/usr/bin/env python3
"""The prompt cache's cost when prompts share (almost) nothing.

    PYTHONPATH=worker-py .venv/bin/python scripts/bench/prompt_cache_overhead.py [MODEL_DIR] [--rounds 6]

Two real workers side by side, one with the prompt cache (the default budget)
and one with ``--prompt-cache-bytes 0``. Each round sends six new questions
(scripts/bench/questions.txt, marked with the round number so no prompt
repeats) to one worker at once, 48 greedy tokens each with EOS suppressed, and
times the batch to its last ``done``; then the same to the other worker (the
order alternates by round). Only what the model's chat template adds (SmolLM2:
its default system prompt) can come from the cache. Prints each round and the
median, min and max per worker.
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
    ap.add_argument("--rounds", type=int, default=6)
    a = ap.parse_args()
    questions = [q for q in (ROOT / "scripts" / "bench" / "questions.txt").read_text().split("\n") if q]
    workers = {"cache on": WorkerProc(a.model, stderr_path="/dev/null"),
               "cache off": WorkerProc(a.model, args=("--prompt-cache-bytes", "0"), stderr_path="/dev/null")}
    bias = {}
    for w in workers.values():
        bias = {e: -1e9 for e in w.hello()["eos"]}
    rid, times = 1, {k: [] for k in workers}
    for rnd in range(a.rounds):
        order = list(workers.items()) if rnd % 2 == 0 else list(reversed(workers.items()))
        for name, w in order:
            frames = []
            for i in range(6):
                q = f"{questions[(rnd * 6 + i) % len(questions)]} (round {rnd})"
                frames.append({"t": "gen", "id": rid + i, "messages": [{"role": "user", "content": q}],
                               "max_tokens": 48, "logit_bias": bias})
            t0 = time.perf_counter()
            w.send(*frames)
            cached = [summarize(w.collect(rid + i))["last"].get("cached", 0) for i in range(6)]
            times[name].append(time.perf_counter() - t0)
            rid += 6
            print(f"round {rnd} {name:9s} {times[name][-1]:.2f} s  cached {cached}", flush=True)
    for name, ts in times.items():
        print(f"{name:9s} median {statistics.median(ts):.2f} s (min {min(ts):.2f}, max {max(ts):.2f})")
    for w in workers.values():
        w.stop()


if __name__ == "__main__":
    main()
