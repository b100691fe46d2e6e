#!/usr/bin/env python3
"""Does the auto-tuner move B to meet a P99 inter-token latency target?

Runs krserve twice on the same model under the same closed-loop load
(N streaming clients, fixed max tokens, EOS ignored): once with the
auto-tuner on, once off, both starting at the same B. It samples /stats
every second and reports how B moved and where the P99 inter-token latency
ended relative to the target.

    scripts/bench/autotune.py --model DIR [--clients 32] [--seconds 60]
        [--batch-size 16] [--target-ms auto] [--tolerance-ms auto] [--json out.json]

With --target-ms auto, a short calibration run measures P99 inter-token
latency at --batch-size and sets the target to 60% of it, i.e. a target the
starting B cannot meet. Inter-token latency is read on the server side,
from krserve_inter_token_latency_seconds (what the tuner steers by); the
latency seen by the Python clients, which share the CPU, is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "py"))
from _server import Server  # noqa: E402


def client_loop(url: str, stop: threading.Event, max_tokens: int, gaps: list, lock: threading.Lock, i: int):
    body = json.dumps({"model": "default", "prompt": f"Client {i} says", "max_tokens": max_tokens,
                       "temperature": 0, "stream": True, "ignore_eos": True}).encode()
    while not stop.is_set():
        req = urllib.request.Request(url + "/v1/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        last = None
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                for line in r:
                    if not line.startswith(b"data: {"):
                        continue
                    now = time.monotonic()
                    if last is not None:
                        with lock:
                            gaps.append((now, now - last))
                    last = now
        except Exception:  # noqa: BLE001 - the server is stopped under a running client at the end
            return


def itl_histogram(url: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of krserve_inter_token_latency_seconds."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = []
    for line in text.splitlines():
        if line.startswith("krserve_inter_token_latency_seconds_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    return out


def hist_p99(before, after) -> float:
    """P99 in ms of the samples observed between two scrapes (bucket upper bound,
    linearly interpolated inside the bucket, as histogram_quantile does)."""
    diff = [(le, a - b) for (le, a), (_, b) in zip(after, before)]
    total = diff[-1][1]
    if total <= 0:
        return float("nan")
    rank, prev_le, prev_c = 0.99 * total, 0.0, 0.0
    for le, c in diff:
        if c >= rank:
            if le == float("inf"):
                return prev_le * 1000
            return (prev_le + (le - prev_le) * (rank - prev_c) / max(c - prev_c, 1e-9)) * 1000
        prev_le, prev_c = le, c
    return float("nan")


def p99(xs):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.99 * len(xs)))]


def run(model, args, clients, seconds, max_tokens, label):
    s = Server(model, *args)
    gaps, lock, stop = [], threading.Lock(), threading.Event()
    threads = [threading.Thread(target=client_loop, args=(s.url, stop, max_tokens, gaps, lock, i), daemon=True)
               for i in range(clients)]
    for t in threads:
        t.start()
    samples = []
    hists = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        time.sleep(1)
        _, st = s.get("/stats")
        at = st["scheduler"]["autotune"]
        now = time.monotonic()
        hists.append(itl_histogram(s.url))
        with lock:
            recent = [g for (t, g) in gaps if t > now - 5]
        samples.append({"t": round(now - t0, 1), "b": at["b"],
                        "server_p99_itl_ms_5s": round(hist_p99(hists[max(0, len(hists) - 6)], hists[-1]), 1)
                        if len(hists) > 1 else None,
                        "client_p99_itl_ms_5s": round(p99(recent) * 1000, 1),
                        "queue": st["scheduler"]["queue_requests"]})
        print(label, samples[-1], file=sys.stderr)
    _, st = s.get("/stats")
    final_server_p99 = round(hist_p99(hists[max(0, len(hists) - 16)], hists[-1]), 1)
    stop.set()
    s.stop()
    end = time.monotonic()
    with lock:
        last = [g for (t, g) in gaps if t > end - 15]
    return {"label": label, "args": args, "samples": samples,
            "adjustments": st["scheduler"]["autotune"].get("adjustments", []),
            "final_b": st["scheduler"]["autotune"]["b"],
            "final_p99_itl_ms_last15s": final_server_p99,
            "final_client_p99_itl_ms_last15s": round(p99(last) * 1000, 1),
            "tokens_per_second_30s": st["server"]["throughput"]["tokens_per_second"].get("30s")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--min-batch", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--target-ms", default="auto")
    ap.add_argument("--tolerance-ms", default="auto")
    ap.add_argument("--window", type=int, default=2048, help="--auto-tune-window: gaps the tuner's P99 is taken over")
    ap.add_argument("--json")
    a = ap.parse_args()
    base = ["--workers", "1", "--batch-size", str(a.batch_size)]
    if a.target_ms == "auto":
        cal = run(a.model, base, a.clients, 20, a.max_tokens, "calibrate")
        measured = cal["final_p99_itl_ms_last15s"]
        if measured != measured:  # NaN: no token in the calibration window (cold kernels)
            sys.exit("calibration saw no tokens; warm the server up or pass --target-ms")
        target = round(0.6 * measured, 1)
        print(f"P99 inter-token latency at B={a.batch_size} (server side): {measured} ms; target {target} ms",
              file=sys.stderr)
    else:
        target = float(a.target_ms)
    tol = round(0.1 * target, 1) if a.tolerance_ms == "auto" else float(a.tolerance_ms)
    tune = ["--p99-target-ms", str(target), "--p99-tolerance-ms", str(tol), "--auto-tune-min", str(a.min_batch),
            "--auto-tune-max", str(a.max_batch), "--auto-tune-interval", "5",
            "--auto-tune-window", str(a.window)]
    on = run(a.model, base + ["--auto-tune"] + tune, a.clients, a.seconds, a.max_tokens, "tuner-on")
    off = run(a.model, base + tune, a.clients, a.seconds, a.max_tokens, "tuner-off")
    report = {"target_ms": target, "tolerance_ms": tol, "clients": a.clients, "start_b": a.batch_size,
              "on": on, "off": off}
    for r in (on, off):
        ok = abs(r["final_p99_itl_ms_last15s"] - target) <= tol
        print(f"{r['label']}: B {a.batch_size} -> {r['final_b']}, final P99 ITL {r['final_p99_itl_ms_last15s']} ms "
              f"(target {target} ± {tol}: {'within' if ok else 'outside'}; "
              f"client-side {r['final_client_p99_itl_ms_last15s']} ms), "
              f"{len(r['adjustments'])} adjustments, {r['tokens_per_second_30s']} tok/s")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
