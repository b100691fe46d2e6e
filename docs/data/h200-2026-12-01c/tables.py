"""Rows of docs/gpu.md, "2026-12-01 (third)", from the runs' JSON here:
python3 tables.py [NAME ...] (default: every *.json.gz but the stats)."""
import glob
import gzip
import json
import sys


def pct(xs, p):
    xs = sorted(xs)
    k = (len(xs) - 1) * p
    f = int(k)
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)


names = sys.argv[1:] or sorted(f[:-8] for f in glob.glob("*.json.gz") if ".stats." not in f)
for n in names:
    d = json.load(gzip.open(n + ".json.gz"))
    ok = [r for r in d["records"] if r.get("status") == 200]
    t = [r["ttft_ms"] for r in ok]
    turns = " ".join(f"{x['ttft_ms']['median']:.0f}/{x['ttft_p90_ms']:.0f}" for x in d["turns"])
    prompt = sum(x["prompt_tokens"] for x in d["turns"])
    cached = sum(x["cached_tokens"] for x in d["turns"])
    prev = sorted(x["cached_tokens"] / x["prev_tokens"] for x in d["turns"] if x.get("prev_tokens"))
    print(f"{n:12s} ok {len(ok):3d} failed {len(d['records']) - len(ok):2d}  TTFT P50 {pct(t, .5):5.0f} "
          f"P90 {pct(t, .9):5.0f}  wall {d['wall_ms'] / 1000:5.1f} s  {d['tok_per_s']:3.0f} tok/s  "
          f"cached/prompt {100 * cached / prompt:4.1f}%  cached/prev turn (median) "
          f"{100 * prev[len(prev) // 2] if prev else 0:4.1f}%")
    print(f"{'':12s} per turn P50/P90 ms: {turns}")
