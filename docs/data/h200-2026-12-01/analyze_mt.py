import json, glob, statistics as st, sys
def pct(xs, p):
    xs = sorted(xs)
    if not xs: return float('nan')
    k = (len(xs)-1)*p/100; f = int(k); c = min(f+1, len(xs)-1)
    return xs[f] + (xs[c]-xs[f])*(k-f)
runs = {}
for f in sorted(glob.glob('res/p*_*.json')):
    if f.endswith('stats.json'): continue
    d = json.load(open(f)); name = d['name']; p, cfg = name.split('_', 1)
    ok = [r for r in d['records'] if not r.get('status') or r.get('finish_reason')]
    ok = [r for r in d['records'] if r.get('finish_reason')]
    turns = {}
    for t in d['turns']:
        turns[t['turn']] = t
    allt = [r['ttft_ms'] for r in ok]
    late = [r['ttft_ms'] for r in ok if r['turn'] >= 2]
    runs[name] = dict(p=p, cfg=cfg, sysw=d['config']['system_prefix_user_words'][0], wall=d['wall_ms']/1000,
        tps=d['tok_per_s'], errors=len(d['records'])-len(ok), n=len(d['records']),
        p50=[turns[i]['ttft_ms']['median'] for i in range(1,9)], p90=[turns[i]['ttft_p90_ms'] for i in range(1,9)],
        prompt=sum(t['prompt_tokens'] for t in d['turns']), cached=sum(t['cached_tokens'] for t in d['turns']),
        allp50=pct(allt,50), allp90=pct(allt,90), lateP90=pct(late,90),
        t8t1=(turns[8]['ttft_ms']['median']/turns[1]['ttft_ms']['median']) if turns[8]['requests']-turns[8]['errors'] else float('nan'))
print("| run | system words | errors/requests | wall s | tok/s | cached/prompt | TTFT P50 all | TTFT P90 all | TTFT P90 turns 2-8 | turn8/turn1 P50 |")
print("|---|---|---|---|---|---|---|---|---|---|")
for n, r in runs.items():
    print(f"| {n} | {r['sysw']} | {r['errors']}/{r['n']} | {r['wall']:.1f} | {r['tps']:.0f} | {100*r['cached']/max(r['prompt'],1):.1f}% | {r['allp50']:.0f} | {r['allp90']:.0f} | {r['lateP90']:.0f} | {r['t8t1']:.2f} |")
print()
for n, r in runs.items():
    print(f"{n:10s} P50 " + " ".join(f"{x:6.0f}" for x in r['p50']) + " | P90 " + " ".join(f"{x:6.0f}" for x in r['p90']))
print()
# medians over the system-words-500 passes, per config
cfgs = {}
for n, r in runs.items():
    if r['sysw'] == 500: cfgs.setdefault(r['cfg'], []).append(r)
def ms(v): return f"{st.median(v):.0f} ({min(v):.0f}-{max(v):.0f})"
print("| config | passes | TTFT P50 turn 1 | TTFT P50 turn 8 | turn8/turn1 | TTFT P90 all turns | TTFT P90 turns 2-8 | wall s | cached/prompt |")
print("|---|---|---|---|---|---|---|---|---|")
for c, rs in cfgs.items():
    print(f"| {c} | {len(rs)} | {ms([r['p50'][0] for r in rs])} | {ms([r['p50'][7] for r in rs])} | {st.median([r['t8t1'] for r in rs]):.2f} ({min(r['t8t1'] for r in rs):.2f}-{max(r['t8t1'] for r in rs):.2f}) | {ms([r['allp90'] for r in rs])} | {ms([r['lateP90'] for r in rs])} | {st.median([r['wall'] for r in rs]):.1f} ({min(r['wall'] for r in rs):.1f}-{max(r['wall'] for r in rs):.1f}) | {st.median([100*r['cached']/r['prompt'] for r in rs]):.1f}% |")
print()
print("per-turn medians over passes (system words 500): TTFT P50 / P90 ms")
for c, rs in cfgs.items():
    print(f"{c:7s} " + "  ".join(f"t{i+1} {st.median([r['p50'][i] for r in rs]):.0f}/{st.median([r['p90'][i] for r in rs]):.0f}" for i in range(8)))
