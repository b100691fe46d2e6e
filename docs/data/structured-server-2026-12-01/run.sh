#!/bin/bash
# usage: run.sh MODEL ROUNDS REQUESTS MAXTOK OUTDIR
M=$1; N=$2; REQ=$3; T=$4; O=$5; mkdir -p $O
RF='{"type":"json_schema","json_schema":{"name":"s","schema":{"type":"object","properties":{"text":{"type":"string","minLength":5000}},"required":["text"]}}}'
cd /work/main
./bin/krserve up --model $M --python .venv/bin/python --port 18124 --workers 1 --batch-size 32 > $O/server.log 2>&1 & pid=$!
for i in $(seq 200); do curl -sf localhost:18124/ready >/dev/null 2>&1 && break; sleep 0.5; done
for r in $(seq 1 $N); do
  for mode in free grammar; do
    extra=""; [ $mode = grammar ] && extra="--response-format $RF"
    ./bin/krserve bench --url http://127.0.0.1:18124 --concurrency 32 --requests $REQ --max-tokens $T --ignore-eos --no-progress --warmup 2 --json $O/$mode-$r.json $extra > $O/$mode-$r.txt 2>&1
    echo "$r $mode $(grep -E '^\| [0-9.]+ s \|' $O/$mode-$r.txt | awk -F'|' '{print $5, $6}') load $(cut -d' ' -f1 /proc/loadavg)"
  done
done | tee $O/summary.txt
kill -INT $pid; wait $pid
