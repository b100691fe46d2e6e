#!/usr/bin/env python3
"""Tables of scripts/bench/multiturn_ab.sh runs: per config and turn, TTFT P50 and
P90 as the median over rounds (min-max), TTFT P90 over all turns and over turns
2+, wall time, tok/s, cached/prompt tokens and failed requests.

    scripts/bench/multiturn_table.py OUT [OUT...]      (reads OUT/rN_CFG.json)
"""
import glob
import json
import os
import re
import statistics as st
import sys


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    f = int(k)
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)


def load(dirs):
    runs = {}
    for d in dirs:
        for f in sorted(glob.glob(os.path.join(d, "r*_*.json"))):
            m = re.match(r"r(\d+)_(.+)\.json", os.path.basename(f))
            if not m:
                continue
            j = json.load(open(f))
            ok = [r for r in j["records"] if r.get("finish_reason")]
            per = {}
            for r in ok:
                per.setdefault(r["turn"], []).append(r["ttft_ms"])
            prompt = sum(t["prompt_tokens"] for t in j["turns"])
            runs.setdefault(m.group(2), []).append(dict(
                p50={t: pct(v, 50) for t, v in per.items()},
                p90={t: pct(v, 90) for t, v in per.items()},
                all90=pct([r["ttft_ms"] for r in ok], 90),
                late90=pct([r["ttft_ms"] for r in ok if r["turn"] >= 2], 90),
                wall=j["wall_ms"] / 1000, tps=j["tok_per_s"],
                errors=len(j["records"]) - len(ok),
                cached=sum(t["cached_tokens"] for t in j["turns"]) / max(1, prompt)))
    return runs


def spread(values, fmt="{:.0f}"):
    v = [x for x in values if x == x]
    if not v:
        return "-"
    return f"{fmt.format(st.median(v))} ({fmt.format(min(v))}-{fmt.format(max(v))})"


def main(dirs):
    runs = load(dirs)
    turns = sorted({t for rs in runs.values() for r in rs for t in r["p50"]})
    print("| config | runs | " + " | ".join(f"turn {t} P50 / P90 ms" for t in turns)
          + " | P90 all turns | P90 turns 2+ | wall s | tok/s | cached/prompt | failed |")
    print("|---|---|" + "---|" * len(turns) + "---|---|---|---|---|---|")
    nan = float("nan")
    for cfg, rs in runs.items():
        cells = [f"{spread([r['p50'].get(t, nan) for r in rs])} / {spread([r['p90'].get(t, nan) for r in rs])}"
                 for t in turns]
        print(f"| {cfg} | {len(rs)} | " + " | ".join(cells)
              + f" | {spread([r['all90'] for r in rs])} | {spread([r['late90'] for r in rs])}"
              + f" | {spread([r['wall'] for r in rs], '{:.1f}')} | {spread([r['tps'] for r in rs])}"
              + f" | {100 * st.median([r['cached'] for r in rs]):.1f}% | {sum(r['errors'] for r in rs)} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
