#!/bin/bash
# name dir port
set -u
name=$1; dir=$2; port=$3
cd /work/main
PYTHONPATH=$dir/worker-py $dir/bin/krserve up --port $port --workers 1 --python /work/main/.venv/bin/python > /tmp/ab/$name.server.log 2>&1 &
pid=$!
for i in $(seq 600); do curl -sf http://127.0.0.1:$port/ready >/dev/null && break; sleep 0.5; done
bin/krserve bench --url http://127.0.0.1:$port --concurrency 8 --requests 16 --max-tokens 16 --no-progress > /dev/null 2>&1
bin/krserve bench --url http://127.0.0.1:$port --concurrency 8 --requests 64 --max-tokens 48 --no-progress > /tmp/ab/$name.txt 2>&1
kill -TERM $pid; wait $pid
