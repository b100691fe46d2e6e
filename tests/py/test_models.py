"""Several models behind one krserve: load on demand, swaps with room for one,
single-flight loads, a broken model, crash isolation, ttl and keep_alive.

Two tiny models (make_tiny_model.py seeds 0 and 1) and a broken one. The first
server has room for one model at a time (--max-loaded-models 1); the second,
configured with a --config file, holds both.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from _server import Server, tiny_model


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    a = tiny_model(root / "a", seed=0)
    b = tiny_model(root / "b", seed=1)
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "no_such_architecture", "vocab_size": 8}))
    return {"a": a, "b": b, "broken": broken, "root": root}


@pytest.fixture(scope="module")
def one_at_a_time(dirs):
    s = Server(None, "--model", f"a={dirs['a']}", "--model", f"b={dirs['b']}", "--model", f"broken={dirs['broken']}",
               "--max-loaded-models", "1", "--min-residency", "0", "--heartbeat", "200ms")
    yield s
    assert s.stop() == 0, s.log()


def complete(server, model, n=8, **extra):
    return server.post("/v1/completions", {"model": model, "prompt": "hello there", "max_tokens": n,
                                           "temperature": 0, **extra})


def metric(server, name, **labels) -> float:
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    m = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    assert m, f"{name}{{{want}}} not in /metrics"
    return float(m.group(1))


def ps(server) -> dict:
    _, doc = server.get("/api/ps?all=1")
    return {m["name"]: m for m in doc["models"]}


def wait_state(server, name, state, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ps(server)[name]["state"] == state:
            return
        time.sleep(0.05)
    raise AssertionError(f"{name} did not become {state}: {ps(server)[name]}")


def test_models_listed_with_state(one_at_a_time):
    _, doc = one_at_a_time.get("/v1/models")
    assert {m["id"]: m["state"] for m in doc["data"]} == {"a": "unloaded", "b": "unloaded", "broken": "unloaded"}
    status, err = complete(one_at_a_time, "nope")
    assert status == 404 and err["error"]["code"] == "model_not_found" and '"a", "b", "broken"' in err["error"]["message"]


def test_alternating_requests_each_reload(one_at_a_time):
    s = one_at_a_time
    before = {m: metric(s, "krserve_model_loads_total", model=m, result="ok") for m in ("a", "b")}
    outputs = {}
    for model in ["a", "b", "a", "b"]:
        status, body = complete(s, model)
        assert status == 200, body
        assert body["model"] == model
        outputs.setdefault(model, set()).add(body["choices"][0]["text"])
        # Room for one: the other one is not loaded.
        states = {k: v["state"] for k, v in ps(s).items()}
        assert states[model] == "ready" and states["a" if model == "b" else "b"] == "unloaded", states
    for m in ("a", "b"):
        assert metric(s, "krserve_model_loads_total", model=m, result="ok") - before[m] == 2
        assert len(outputs[m]) == 1  # greedy: the same answer after a reload
    assert outputs["a"] != outputs["b"]  # two different models answered
    assert metric(s, "krserve_model_evictions_total", model="a", reason="room") >= 2


def test_simultaneous_first_requests_share_one_load(one_at_a_time):
    s = one_at_a_time
    for m in ("a", "b"):
        s.post(f"/api/models/{m}/unload", None)
    assert ps(s)["a"]["state"] == "unloaded"
    before = metric(s, "krserve_model_loads_total", model="a", result="ok")
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: complete(s, "a"), range(8)))
    assert all(st == 200 for st, _ in results), results
    assert metric(s, "krserve_model_loads_total", model="a", result="ok") - before == 1


def test_32_concurrent_requests_over_both(one_at_a_time):
    s = one_at_a_time
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda i: (i, complete(s, "ab"[i % 2], n=4)), range(32)))
    for i, (status, body) in results:
        assert status == 200, (i, body)
        assert body["model"] == "ab"[i % 2]


def test_broken_model_fails_its_requests_not_the_others(one_at_a_time):
    s = one_at_a_time
    with ThreadPoolExecutor(4) as pool:
        broken = [pool.submit(complete, s, "broken") for _ in range(3)]
        good = pool.submit(complete, s, "a")
        results = [f.result() for f in broken]
        assert good.result()[0] == 200, good.result()
    for status, body in results:
        assert status == 503, body
        assert body["error"]["code"] == "model_unavailable"
        assert "No safetensors found" in body["error"]["message"], body  # the worker's reason
    assert metric(s, "krserve_model_loads_total", model="broken", result="failed") == 1
    # During the backoff: refused at once, with Retry-After and the reason.
    req = urllib.request.Request(s.url + "/v1/completions", method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": "broken", "prompt": "x", "max_tokens": 1}).encode())
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 503 and int(e.value.headers["Retry-After"]) >= 1
    st = ps(s)["broken"]
    assert st["state"] == "failed" and "No safetensors found" in st["reason"]
    status, body = s.get("/ready?model=broken")
    assert status == 503 and body["status"] == "failed"
    assert complete(s, "b")[0] == 200


@pytest.fixture(scope="module")
def both(dirs):
    cfg = dirs["root"] / "krserve.yaml"
    cfg.write_text(f"""
max_loaded_models: 2
models:
  a:
    path: {dirs['a']}
    aliases: [alpha]
    ttl: 2s
  b:
    path: {dirs['b']}
    ttl: never
""")
    s = Server(None, "--config", str(cfg), "--heartbeat", "200ms")
    yield s
    assert s.stop() == 0, s.log()


def stream(server, model, n):
    req = urllib.request.Request(server.url + "/v1/completions", method="POST",
                                 headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": model, "prompt": "tell me", "max_tokens": n, "temperature": 0,
                                                  "ignore_eos": True, "stream": True}).encode())
    return urllib.request.urlopen(req, timeout=120)


def test_killing_one_models_worker_leaves_the_others_stream(both):
    s = both
    assert complete(s, "alpha")[0] == 200  # a loaded, by its alias
    _, st = s.get("/stats")
    pid = st["models"]["a"]["workers"][0]["pid"]
    texts, finish = [], None
    with stream(s, "b", 1500) as r:
        first = r.readline()  # b is streaming
        assert first.startswith(b"data: ")
        os.kill(pid, signal.SIGKILL)
        for line in r:
            if line.startswith(b"data: {"):
                ch = json.loads(line[6:])
                assert "error" not in ch, ch
                texts.append(ch["choices"][0]["text"])
                finish = ch["choices"][0]["finish_reason"] or finish
    assert finish == "length"
    _, st = s.get("/stats")
    assert st["models"]["b"]["workers"][0]["restarts"] == 0
    # a's pool saw its worker die (a may since have idled out: its ttl is 2 s).
    assert metric(s, "krserve_worker_restarts_total", model="a", reason="crash") >= 1
    assert metric(s, "krserve_worker_restarts_total", model="b", reason="crash") == 0
    assert complete(s, "a")[0] == 200


def test_ttl_and_keep_alive_unload(both):
    s = both
    assert complete(s, "b", keep_alive=0)[0] == 200  # b's ttl is never, but this request says 0
    wait_state(s, "b", "unloaded", timeout=10)
    assert metric(s, "krserve_model_evictions_total", model="b", reason="keep_alive") == 1
    assert complete(s, "a")[0] == 200
    assert ps(s)["a"]["expires_at"]
    wait_state(s, "a", "unloaded", timeout=20)  # its 2 s ttl
    assert metric(s, "krserve_model_evictions_total", model="a", reason="ttl") >= 1
    assert complete(s, "b", keep_alive="-1")[0] == 200
    st = ps(s)["b"]
    assert st["state"] == "ready" and "expires_at" not in st
    status, _ = s.post("/api/models/a/load", None)
    assert status == 200 and ps(s)["a"]["state"] == "ready"
    status, body = complete(s, "a", keep_alive="soon")
    assert status == 400 and body["error"]["param"] == "keep_alive"
