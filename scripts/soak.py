#!/usr/bin/env python3
"""Soak krserve under worker crashes.

Starts `krserve up` with real mlx-lm workers, drives N concurrent clients
(mixed streamed and non-streamed, greedy) for a fixed number of requests,
and meanwhile kills worker processes from outside with SIGSEGV and SIGKILL
every few seconds. Every output is compared with a crash-free run of the same
requests. Reports completed, retried, resumed, failed, lost and hung.

    scripts/soak.py --krserve bin/krserve [--model DIR] [--clients 32] [--requests 300]
                    [--kill-every 3] [--workers 2] [--json out.json] [-- extra krserve up flags]

A kill lands on whatever the worker runs, sometimes a suspect running alone
on probation after an earlier crash (docs/architecture.md, "Crash
containment"); the report counts requests declared poison that way.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "py"))
from _server import Server  # noqa: E402

QUESTIONS = [q.strip() for q in (ROOT / "scripts" / "bench" / "questions.txt").read_text().splitlines() if q.strip()] \
    if (ROOT / "scripts" / "bench" / "questions.txt").exists() else [f"Tell me fact number {i}." for i in range(50)]


def request(url: str, i: int, max_tokens: int, timeout: float) -> dict:
    """One request; returns {text, finish, error, status, streamed}."""
    stream = i % 2 == 0
    body = {"model": "default", "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    out = {"i": i, "stream": stream, "text": "", "finish": None, "error": None, "status": None}
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            out["status"] = r.status
            if not stream:
                d = json.loads(r.read())
                out["text"] = d["choices"][0]["message"]["content"]
                out["finish"] = d["choices"][0]["finish_reason"]
                return out
            for line in r:
                line = line.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                d = json.loads(line[6:])
                if "error" in d:
                    out["error"] = d["error"]["message"]
                    continue
                for c in d.get("choices", []):
                    out["text"] += c["delta"].get("content") or ""
                    out["finish"] = c.get("finish_reason") or out["finish"]
    except urllib.error.HTTPError as e:
        out["status"] = e.code
        out["error"] = e.read().decode()[:300]
    except Exception as e:  # noqa: BLE001 - a hung or broken connection is a result here
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def run_load(url: str, n: int, clients: int, max_tokens: int, timeout: float) -> list[dict]:
    with cf.ThreadPoolExecutor(clients) as ex:
        return list(ex.map(lambda i: request(url, i, max_tokens, timeout), range(n)))


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            m = re.match(rf"{re.escape(name)}(\{{[^}}]*\}})? (\S+)", line)
            if m:
                total += float(m.group(2))
    return total


def killer(server: Server, every: float, stop: threading.Event, log: list):
    rnd = random.Random(7)
    while not stop.wait(every):
        try:
            pids = server.worker_pids()
        except Exception:  # noqa: BLE001
            continue
        if not pids:
            continue
        pid = rnd.choice(pids)
        sig = rnd.choice([signal.SIGSEGV, signal.SIGKILL])
        try:
            os.kill(pid, sig)
            log.append({"t": time.time(), "pid": pid, "signal": sig.name})
        except ProcessLookupError:
            pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--krserve", default=str(ROOT / "bin" / "krserve"))
    ap.add_argument("--model", default=None, help="model dir (default: krserve's default model)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--kill-every", type=float, default=3.0)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--json", default=None)
    ap.add_argument("extra", nargs="*", help="more `krserve up` flags (after --)")
    a = ap.parse_args()
    os.environ["KRSERVE_BIN"] = a.krserve
    args = ["--workers", str(a.workers), "--batch-size", "16", "--max-queue", str(a.requests * 2),
            "--heartbeat-timeout", "5s", *a.extra]

    print(f"crash-free reference run: {a.requests} requests, {a.clients} clients", file=sys.stderr)
    s = Server(a.model, *args)
    t0 = time.time()
    ref = run_load(s.url, a.requests, a.clients, a.max_tokens, a.timeout)
    ref_s = time.time() - t0
    s.stop()

    print(f"soak run: killing a worker every {a.kill_every}s with SIGSEGV or SIGKILL", file=sys.stderr)
    s = Server(a.model, *args)
    kills: list = []
    stop = threading.Event()
    k = threading.Thread(target=killer, args=(s, a.kill_every, stop, kills), daemon=True)
    t0 = time.time()
    k.start()
    got = run_load(s.url, a.requests, a.clients, a.max_tokens, a.timeout)
    stop.set()
    k.join()
    soak_s = time.time() - t0
    retried = metric(s.url, "krserve_requests_retried_total")
    resumed = metric(s.url, "krserve_requests_resumed_total")
    restarts = metric(s.url, "krserve_worker_restarts_total")
    suspected = metric(s.url, "krserve_requests_suspected_total")
    probations = metric(s.url, "krserve_probations_total")
    poisoned = metric(s.url, "krserve_requests_poisoned_total")
    s.stop()

    completed = [g for g in got if g["error"] is None and g["finish"]]
    failed = [g for g in got if g["error"] is not None]
    hung = [g for g in got if g["error"] and "timed out" in g["error"].lower()]
    lost = [g for g in got if g["error"] is None and not g["finish"]]
    same = sum(1 for g, r in zip(got, ref) if g["text"] == r["text"] and g["finish"] == r["finish"])
    diffs = [{"i": g["i"], "ref": r["text"], "got": g["text"]} for g, r in zip(got, ref)
             if g["error"] is None and g["text"] != r["text"]][:5]
    report = {"requests": a.requests, "clients": a.clients, "workers": a.workers, "kills": len(kills),
              "worker_restarts": restarts, "completed": len(completed), "retried": retried, "resumed": resumed,
              "suspected": suspected, "probations": probations, "declared_poison": poisoned,
              "failed": len(failed), "lost": len(lost), "hung": len(hung), "identical_to_reference": same,
              "reference_seconds": round(ref_s, 2), "soak_seconds": round(soak_s, 2),
              "failures": [g["error"] for g in failed][:5], "differences": diffs}
    print(json.dumps(report, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    ok = len(completed) == a.requests and same == a.requests
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
