import re,sys
for path in sys.argv[1:]:
    name=None; rows=[]
    def flush():
        if name and rows:
            t1=rows[0]; t8=rows[-1]
            p90max=max(r[4] for r in rows)
            print(f"| {name} | {t1[3]} | {t8[3]} | {t8[3]/t1[3]:.2f} | {max(r[4] for r in rows[1:])} | {p90max} | {wall} | {tok} | {cp} |")
    wall=tok=cp=''
    for line in open(path):
        m=re.search(r'== (\S+): ',line)
        if m:
            flush(); name=m.group(1).rstrip(':'); rows=[]; continue
        m=re.match(r'\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)%',line)
        if m and name:
            rows.append(tuple(int(x) for x in m.groups()[:7])); continue
        m=re.match(r'wall ([\d.]+) s, \d+ completion tokens, ([\d.]+) tok/s',line)
        if m and name:
            wall,tok=m.groups()
            pt=sum(r[5] for r in rows); ct=sum(r[6] for r in rows); cp=f"{ct/pt:.1%}" if pt else ''
    flush()
