"""Metrics, /stats, /ready and krserve status against a real server.

A real Prometheus server (Debian's package, unpacked by
scripts/fetch-prometheus.sh) scrapes krserve on loopback while it serves load.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from _server import ROOT, Server, free_port, krserve_bin, tiny_model

PROM_DIR = ROOT / ".cache" / "prometheus"


def prom_tools() -> Path:
    r = subprocess.run([str(ROOT / "scripts" / "fetch-prometheus.sh")], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"prometheus cannot be installed on this machine: {r.stderr.strip()}")
    return PROM_DIR


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("obs") / "tiny")


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, "--workers", "2", "--heartbeat", "100ms", "--heartbeat-timeout", "1500ms",
               "--auto-tune", "--metrics-addr", f"127.0.0.1:{free_port()}")
    yield s
    assert s.stop() == 0, s.log()


def load(server, n=24, clients=8):
    def one(i):
        return server.post("/v1/chat/completions", {"model": "default", "max_tokens": 12, "stream": i % 2 == 0,
                                                    "messages": [{"role": "user", "content": f"q{i}"}]}
                           if i % 2 else
                           {"model": "default", "max_tokens": 12, "messages": [{"role": "user", "content": f"q{i}"}]})
    with cf.ThreadPoolExecutor(clients) as ex:
        res = list(ex.map(one, range(n)))
    assert all(s == 200 for s, _ in res), res


def scrape(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        return r.read().decode()


def test_promtool_check_metrics(server):
    tools = prom_tools()
    load(server)
    text = scrape(server.url)
    r = subprocess.run([str(tools / "promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ["krserve_time_to_first_token_seconds_bucket", "krserve_request_success_total",
                 "krserve_worker_up", "krserve_batch_size", "krserve_build_info", "krserve_num_requests_running"]:
        assert name in text, name


def test_separate_metrics_listener(server):
    log = server.log()
    addr = [a for a in log.split() if a.startswith("metrics_addr=")][0].split("=", 1)[1]
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
        assert "krserve_request_success_total" in r.read().decode()


def test_real_prometheus_scrapes_and_queries(server, tmp_path):
    tools = prom_tools()
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(f"""global:
  scrape_interval: 1s
scrape_configs:
  - job_name: krserve
    static_configs:
      - targets: ['127.0.0.1:{server.port}']
""")
    prom = subprocess.Popen([str(tools / "prometheus"), f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        api = f"http://127.0.0.1:{port}/api/v1/query?query="

        def query(q):
            with urllib.request.urlopen(api + urllib.parse.quote(q), timeout=10) as r:
                d = json.loads(r.read())
            assert d["status"] == "success", d
            return d["data"]["result"]

        def until(q, pred, what, timeout=60):
            deadline = time.monotonic() + timeout
            res = None
            while time.monotonic() < deadline:
                try:
                    res = query(q)
                    if pred(res):
                        return res
                except OSError:
                    pass  # prometheus still starting
                load(server, n=8, clients=4)
            pytest.fail(f"{what}: last result {res}")

        res = until("sum(krserve_request_success_total)", lambda r: r and float(r[0]["value"][1]) > 0,
                    "request counter never scraped")
        assert float(res[0]["value"][1]) > 0
        res = until("histogram_quantile(0.5, sum by (le) (rate(krserve_time_to_first_token_seconds_bucket[30s])))",
                    lambda r: r and r[0]["value"][1] not in ("NaN", "+Inf") and float(r[0]["value"][1]) > 0,
                    "TTFT quantile never computed")
        assert 0 < float(res[0]["value"][1]) < 30
    finally:
        prom.terminate()
        prom.wait(20)


def test_stats_document(server):
    load(server)
    status, st = server.get("/stats")
    assert status == 200
    srv = st["server"]
    assert srv["latency"]["count"] > 0 and srv["latency"]["p50"] > 0
    assert set(srv["throughput"]["tokens_per_second"]) == {"5s", "30s", "60s"}
    assert srv["throughput"]["tokens_total"] > 0
    assert {"current", "min", "max", "mean", "distribution"} <= set(srv["batch"])
    assert st["scheduler"]["autotune"]["enabled"] is True
    assert len(st["workers"]) == 2
    for w in st["workers"]:
        assert w["state"] == "ready" and w["pid"] > 0 and w["healthy"]
        assert w["rss_bytes"] > 0


def test_krserve_status_command(server):
    out = subprocess.run([str(krserve_bin()), "status", "--url", server.url], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "WORKER" in out.stdout and "ready" in out.stdout and "latency" in out.stdout
    raw = subprocess.run([str(krserve_bin()), "status", "--url", server.url, "--json"], capture_output=True, text=True)
    assert json.loads(raw.stdout)["workers"]


def test_ready_tracks_a_wedged_then_replaced_worker(model_dir):
    s = Server(model_dir, "--workers", "1", "--heartbeat", "100ms", "--heartbeat-timeout", "1s")
    try:
        pid = s.worker_pids()[0]
        os.kill(pid, signal.SIGSTOP)  # wedged: alive, answers nothing
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            status, body = s.get("/ready")
            if status == 503:
                break
            time.sleep(0.02)
        assert status == 503, body
        assert body["status"] in ("unavailable", "loading")
        s.wait_ready(120)  # the supervisor killed it and started a new one
        assert s.worker_pids()[0] != pid
        _, st = s.get("/stats")
        assert st["workers"][0]["last_exit"]["reason"] == "wedged"
        # Killed outright: not ready until the replacement loaded.
        pid = s.worker_pids()[0]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            status, body = s.get("/ready")
            if status == 503:
                break
            time.sleep(0.02)
        assert status == 503
        s.wait_ready(120)
        _, st = s.get("/stats")
        assert st["workers"][0]["last_exit"]["signal"] == "SIGKILL"
    finally:
        assert s.stop() == 0, s.log()
