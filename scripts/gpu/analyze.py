#!/usr/bin/env python3
"""Tables for docs/gpu.md from the device results (no mlx needed).

    python3 scripts/gpu/analyze.py RESULTS_DIR

RESULTS_DIR holds the unpacked run.py output folders (A, B, C, D: the *.tar.gz
that run_on_device.sh bench writes), probe.json and torch_ceiling.json.

Decode rate of one request = (tokens - 1) / (end-to-end - TTFT): the token rate
after the first token, i.e. without prefill. Bandwidth limit = bytes of weights
read per token (every weight once: the 28 layers and the tied 128256 x 3072
embedding used as lm_head) over the card's bandwidth: the datasheet's (looked up
from the card's name in torch_ceiling.json or probe.json: H100 SXM 3.35 TB/s,
H200 4.8 TB/s; KRSERVE_DATASHEET_TBS overrides) and the read bandwidth measured
on this card (torch sum of 4 GiB).
"""

import json
import os
import statistics
import sys

LABEL = {"inprocess": "in-process mlx-lm", "mlx": "mlx_lm.server", "krserve": "krserve"}
# HBM bandwidth from NVIDIA's datasheets, by a substring of the device name.
DATASHEETS_TBS = {"H200": 4.8, "H100": 3.35}


def datasheet_tbs(*names: str) -> float | None:
    if os.environ.get("KRSERVE_DATASHEET_TBS"):
        return float(os.environ["KRSERVE_DATASHEET_TBS"])
    for name in names:
        for card, tbs in DATASHEETS_TBS.items():
            if card in (name or ""):
                return tbs
    return None


def load(p):
    try:
        with open(p) as f:
            return json.load(f)
    except OSError:
        return None


def decode_rates(res):
    out = []
    for r in res["records"]:
        if r.get("error") or r["tokens"] < 2:
            continue
        dt = (r["e2e_ms"] - r["ttft_ms"]) / 1000.0
        if dt > 0:
            out.append((r["tokens"] - 1) / dt)
    return out


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else ".gpu/results"
    probe = load(os.path.join(root, "probe.json")) or {}
    ceil = load(os.path.join(root, "torch_ceiling.json")) or {}
    wbytes = probe.get("weight_bytes") or ceil.get("decode_gemv_3b", {}).get("weight_bytes")
    params = probe.get("params")
    read_tbs = ceil.get("sum_4GiB_read", {}).get("tb_s")
    card = ceil.get("device") or str((probe.get("device_info") or {}).get("device_name", ""))
    ds_tbs = datasheet_tbs(card, str(probe.get("device_info", "")))
    if ds_tbs is None:
        print(f"unknown card {card!r}: no datasheet bandwidth (set KRSERVE_DATASHEET_TBS)", file=sys.stderr)
        ds_tbs = float("nan")
    lim_ds = ds_tbs * 1e12 / wbytes
    lim_meas = read_tbs * 1e12 / wbytes if read_tbs else float("nan")
    gemv = ceil.get("decode_gemv_3b", {})
    print(f"params {params:,}; weight bytes/token {wbytes:,} ({wbytes / 1e9:.4f} GB)")
    print(f"card {card or '?'}; limit at {ds_tbs} TB/s: {lim_ds:.1f} tok/s; at measured read {read_tbs:.3f} TB/s: {lim_meas:.1f} tok/s")
    if gemv:
        print(f"cuBLAS GEMV chain (CUDA graph): {gemv['s'] * 1e3:.3f} ms/token = {gemv['tok_s']:.1f} tok/s, "
              f"{gemv['tb_s']:.3f} TB/s")
    if probe:
        print(f"mlx probe: stream_generate generation_tps median {probe['stream_generate_tps_median']:.1f}; "
              f"bare decode {probe['bare_decode']['tok_s']:.1f} tok/s; mlx sum read {probe['mlx_sum_read']['tb_s']:.3f} TB/s")
    print()

    runs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    print("| Run | Engine | Aggregate tok/s | vs in-process | Mean TTFT (ms) | Median ITL (ms) | "
          f"Decode tok/s median (best) | % of {ds_tbs} TB/s limit | % of measured-read limit |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        base = load(os.path.join(root, run, "seq_inprocess_r1.json"))
        for eng in ("inprocess", "mlx", "krserve"):
            res = load(os.path.join(root, run, f"seq_{eng}_r1.json"))
            if not res:
                continue
            dr = decode_rates(res)
            med, best = statistics.median(dr), max(dr)
            vs = f"{res['tok_per_s'] / base['tok_per_s']:.3f}x" if base and eng != "inprocess" else "-"
            name = LABEL[eng] + (" (BatchGenerator)" if eng == "inprocess" and "Batch" in res["run"].get("endpoint", "") else "")
            print(f"| {run} | {name} | {res['tok_per_s']:.1f} | {vs} | {res['ttft_ms']['mean']:.1f} | "
                  f"{res['itl_ms']['median']:.2f} | {med:.1f} ({best:.1f}) | {100 * med / lim_ds:.0f}% ({100 * best / lim_ds:.0f}%) | "
                  f"{100 * med / lim_meas:.0f}% ({100 * best / lim_meas:.0f}%) |")
    print()
    for run in runs:
        levels = sorted({int(f.split("_")[1][1:]) for f in os.listdir(os.path.join(root, run)) if f.startswith("sweep_c")
                         and f.endswith(".json")})
        if not levels:
            continue
        print(f"Sweep, run {run}")
        print()
        print("| Clients | Requests | mlx_lm.server tok/s | krserve tok/s | krserve / mlx_lm.server | "
              "TTFT P50/P99 mlx (ms) | TTFT P50/P99 krserve (ms) | decode tok/s per stream mlx / krserve (median) |")
        print("|---|---|---|---|---|---|---|---|")
        for c in levels:
            m = load(os.path.join(root, run, f"sweep_c{c}_mlx_r1.json"))
            k = load(os.path.join(root, run, f"sweep_c{c}_krserve_r1.json"))
            print(f"| {c} | {m['completed']} | {m['tok_per_s']:.1f} | {k['tok_per_s']:.1f} | {k['tok_per_s'] / m['tok_per_s']:.3f}x | "
                  f"{m['ttft_ms']['median']:.0f} / {m['ttft_ms']['p99']:.0f} | {k['ttft_ms']['median']:.0f} / {k['ttft_ms']['p99']:.0f} | "
                  f"{statistics.median(decode_rates(m)):.1f} / {statistics.median(decode_rates(k)):.1f} |")
        print()


if __name__ == "__main__":
    main()
