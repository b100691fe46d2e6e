#!/usr/bin/env python3
"""Throughput and per-rank memory of a worker split over N ranks
(`krserve up --group-size N`), each size run in turn on one machine.

    .venv/bin/python scripts/bench/group.py --model DIR --sizes 1,2 \
        [--concurrency 4 --requests 40 --max-tokens 64 --repeat 3] [-- extra krserve up flags]

For each size: start krserve, run `krserve bench` (streamed completions,
ignore_eos, greedy) --repeat times, read each rank's resident memory from
/stats (after the load), stop krserve. Prints one row per size: aggregate
tok/s (median and min..max over the repeats) and the RSS of every rank.
Results are what this machine gives: on one CPU the ranks share its cores and
talk over loopback, so a group is slower than one process here; a group is for
a model that does not fit one machine's memory (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def run_size(args, size: int) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile("w+", prefix=f"krserve-group{size}-", suffix=".log", delete=False)
    cmd = [args.krserve, "up", "--model", args.model, "--port", str(port), "--python", sys.executable,
           "--group-size", str(size), *args.extra]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"krserve exited ({proc.returncode}); log: {log.name}")
            try:
                with urllib.request.urlopen(url + "/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"krserve not ready; log: {log.name}")
            time.sleep(0.2)
        toks = []
        for i in range(args.repeat):
            out = Path(tempfile.mkdtemp()) / "bench.json"
            subprocess.run([args.krserve, "bench", "--url", url, "--completions", "--ignore-eos", "--no-progress",
                            "--concurrency", str(args.concurrency), "--requests", str(args.requests),
                            "--max-tokens", str(args.max_tokens), "--questions", args.questions,
                            "--json", str(out)], check=True, stdout=subprocess.DEVNULL)
            toks.append(_tok_s(json.loads(out.read_text())))
        st = get(url + "/stats")
        w = st["workers"][0]
        ranks = w.get("ranks") or [{"rank": 0, "pid": w["pid"], "rss_bytes": w.get("rss_bytes", 0)}]
        return {"size": size, "tok_s": toks, "rss": [r.get("rss_bytes", 0) for r in ranks],
                "restarts": w["restarts"]}
    finally:
        proc.terminate()
        proc.wait(60)


def _tok_s(doc) -> float:
    return float(doc["tok_per_s"])  # krserve bench --json: aggregate tokens / wall time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--sizes", default="1,2")
    ap.add_argument("--krserve", default=str(ROOT / "bin" / "krserve"))
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--questions", default=str(ROOT / "scripts" / "bench" / "questions.txt"))
    ap.add_argument("extra", nargs="*", help="more `krserve up` flags (after --)")
    args = ap.parse_args()
    rows = [run_size(args, int(n)) for n in args.sizes.split(",")]
    base = statistics.median(rows[0]["tok_s"])
    print(f"| ranks | tok/s median (min..max of {args.repeat}) | vs {rows[0]['size']} rank(s) | RSS per rank (MiB) | restarts |")
    print("|---|---|---|---|---|")
    for r in rows:
        med = statistics.median(r["tok_s"])
        rss = ", ".join(f"{b / 2**20:.0f}" for b in r["rss"])
        print(f"| {r['size']} | {med:.1f} ({min(r['tok_s']):.1f}..{max(r['tok_s']):.1f}) | {med / base:.2f}x | {rss} | {r['restarts']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
