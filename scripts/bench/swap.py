#!/usr/bin/env python3
"""Cold loads and model swaps: krserve (models layer) beside mlx_lm.server.

Two models, A and B, room for one at a time: krserve serves both with
`--model a=A --model b=B --max-loaded-models 1`; mlx_lm.server starts with A
and loads whatever the request's `model` field names (one model resident). The
same sequence goes to each, one request at a time, streamed, greedy:

  A (a warm-up, not recorded), A, A (loaded), then B, A, B, A, ... (every
  request a swap)

and the time to first token of each is recorded: the first B is a cold load,
the rest are swaps. Every request asks a different question
(scripts/bench/questions.txt), so no answer comes from a prompt cache. Both servers run with the same BLAS (krserve_worker.blas)
and the weights as stored (krserve --dequantize off), so a swap costs the same
load on both.

    .venv/bin/python scripts/bench/swap.py --a MODEL_DIR --b MODEL_DIR [--swaps 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, path: str, proc, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + path, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


QUESTIONS = [q.strip() for q in (ROOT / "scripts" / "bench" / "questions.txt").read_text().splitlines() if q.strip()]
_asked = iter(range(10**6))


def ttft(url: str, model: str, max_tokens: int) -> float:
    # A new question each time: no request is a prompt-cache hit, on either server.
    q = QUESTIONS[next(_asked) % len(QUESTIONS)]
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": q}]}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    t0 = time.perf_counter()
    first = None
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if "error" in d:
                raise RuntimeError(d["error"])
            if first is None and any((c.get("delta") or {}).get("content") for c in d.get("choices", [])):
                first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError(f"no content from {model}")
    return first


def run(name: str, cmd: list[str], url: str, ready: str, models: tuple[str, str], swaps: int, max_tokens: int):
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_ready(url, ready, proc)
        a, b = models
        ttft(url, a, max_tokens)  # A loaded (krserve loads on demand), warm
        seq = [a, a] + [b, a] * swaps
        out = []
        for i, m in enumerate(seq):
            t = ttft(url, m, max_tokens)
            kind = "loaded" if i < 2 else ("cold" if i == 2 else "swap")
            out.append({"model": "A" if m == a else "B", "kind": kind, "ttft_s": round(t, 3)})
            print(f"{name}: {out[-1]}", file=sys.stderr)
        return out
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def summary(rows):
    by = {}
    for r in rows:
        by.setdefault(r["kind"], []).append(r["ttft_s"])
    return {k: {"n": len(v), "median_s": round(statistics.median(v), 3), "min_s": min(v), "max_s": max(v)}
            for k, v in by.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", required=True)
    ap.add_argument("--krserve", default=str(ROOT / "bin" / "krserve"))
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--swaps", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--json", default=None)
    ap.add_argument("--krserve-args", default="", help="more `krserve up` flags, e.g. '--min-residency 0s'")
    ap.add_argument("--skip-mlx", action="store_true", help="krserve only")
    a = ap.parse_args()
    res = {}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    res["krserve"] = run("krserve", [a.krserve, "up", "--port", str(port), "--python", a.python,
                                     "--model", f"a={a.a}", "--model", f"b={a.b}", "--max-loaded-models", "1",
                                     "--dequantize", "off", "--log-level", "warn", *a.krserve_args.split()],
                         url, "/v1/models", ("a", "b"), a.swaps, a.max_tokens)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    res["mlx_lm.server"] = [] if a.skip_mlx else run("mlx_lm.server", [a.python, "-m", "krserve_worker.blas", "mlx_lm", "server",
                                                 "--model", a.a, "--host", "127.0.0.1", "--port", str(port),
                                                 "--temp", "0"],
                               url, "/v1/models", (a.a, a.b), a.swaps, a.max_tokens)
    report = {k: {"summary": summary(v), "requests": v} for k, v in res.items() if v}
    print(json.dumps({k: v["summary"] for k, v in report.items()}, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
