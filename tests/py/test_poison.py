"""Crashes blame the guilty, with real workers and KRSERVE_WORKER_FAULT: a
request that crashes every worker it touches is failed after running alone
(probation); the requests batched beside it survive, with the same text as a
crash-free run; a crash between the last token and done loses no text."""

from __future__ import annotations

import concurrent.futures as cf
import re
import urllib.request

import pytest

from _server import Server, tiny_model

FAULT = "segv-on-prompt:POISON PILL;segv-after-tokens:6:LATE CRASH;hang-on-prompt:HANG FOREVER"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("poison") / "tiny")


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, "--workers", "2", "--batch-size", "16", "--heartbeat", "200ms",
               "--progress-timeout", "3s", env={"KRSERVE_WORKER_FAULT": FAULT})
    yield s
    assert s.stop() == 0, s.log()


def metric(server, name: str) -> float:
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(m.group(2)) for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M))


def body(prompt, n=40, **kw):
    return {"model": "default", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, **kw}


def test_poison_fails_alone_and_innocents_complete(server):
    prompts = [f"Story number {i}:" for i in range(24)]
    with cf.ThreadPoolExecutor(24) as ex:
        ref = list(ex.map(lambda p: server.post("/v1/completions", body(p)), prompts))
    assert all(s == 200 for s, _ in ref), ref
    restarts = metric(server, "krserve_worker_restarts_total")
    poisoned = metric(server, "krserve_requests_poisoned_total")

    with cf.ThreadPoolExecutor(25) as ex:
        futs = [ex.submit(server.post, "/v1/completions", body(p)) for p in prompts[:12]]
        poison = ex.submit(server.post, "/v1/completions", body("Here is the POISON PILL:"))
        futs += [ex.submit(server.post, "/v1/completions", body(p)) for p in prompts[12:]]
        got = [f.result(240) for f in futs]
        status, err = poison.result(240)

    assert status == 500, err
    assert err["error"]["code"] == "worker_crash", err
    assert "alone" in err["error"]["message"] and "SIGSEGV" in err["error"]["message"], err
    bad = [(p, s, b) for p, (s, b) in zip(prompts, got) if s != 200]
    assert not bad, bad
    assert [b["choices"][0]["text"] for _, b in got] == [b["choices"][0]["text"] for _, b in ref]
    assert metric(server, "krserve_requests_poisoned_total") - poisoned == 1
    crashes = metric(server, "krserve_worker_restarts_total") - restarts
    assert 1 <= crashes <= 3, f"{crashes} worker crashes for one poison request"
    _, st = server.get("/stats")
    assert st["scheduler"]["poisoned"] >= 1 and "SIGSEGV" in st["scheduler"]["last_poison"], st["scheduler"]
    assert "request declared poison" in server.log()
    server.wait_ready(120)


def test_hang_is_caught_by_the_watchdog_and_declared_poison(server):
    with cf.ThreadPoolExecutor(2) as ex:
        hang = ex.submit(server.post, "/v1/completions", body("HANG FOREVER, please", 8))
        ok = ex.submit(server.post, "/v1/completions", body("An ordinary request", 8))
        status, err = hang.result(240)
        assert ok.result(240)[0] == 200
    assert status == 500 and err["error"]["code"] == "worker_crash", err
    assert "alone" in err["error"]["message"], err
    server.wait_ready(120)


def test_crash_after_the_last_token_loses_no_held_back_text(server, model_dir):
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    model, tok = load(str(model_dir))
    ids = tok.encode("LATE CRASH, then once upon a time")
    bias = {t: -100.0 for t in tok.eos_token_ids}
    want = "".join(r.text for r in stream_generate(
        model, tok, ids, max_tokens=6, sampler=make_sampler(temp=0.0),
        logits_processors=make_logits_processors(logit_bias=bias)))
    resumed = metric(server, "krserve_requests_resumed_total")
    # A stop string that starts with the answer's last character: the worker
    # holds that character back until its done, which the fault kills.
    status, got = server.post("/v1/completions", {
        "model": "default", "prompt": ids, "max_tokens": 6, "temperature": 0,
        "logit_bias": {str(k): v for k, v in bias.items()}, "stop": [want[-1] + "\u2603"]})
    assert status == 200, got
    assert got["choices"][0]["text"] == want
    assert got["choices"][0]["finish_reason"] == "length"
    assert got["usage"]["completion_tokens"] == 6
    assert metric(server, "krserve_requests_resumed_total") - resumed == 1, "the worker did not die before done"
    server.wait_ready(120)
