"""End to end: bin/krserve with real Python mlx-lm workers, over real HTTP.

The tiny random model makes these fast; the default model (SmolLM2) is used
where the answer has to make sense.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import socket
import subprocess
import time

import pytest

from _server import Server, pid_alive, tiny_model

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("e2e") / "tiny")


@pytest.fixture(scope="module")
def inproc(model_dir):
    from mlx_lm import load

    return load(str(model_dir))


@pytest.fixture(scope="module")
def server(model_dir):
    # --prefill-batch 2: four requests in flight are prefilled in two groups,
    # and must still equal batch_generate's all-at-once run.
    s = Server(model_dir, "--workers", "1", "--batch-size", "8", "--prefill-batch", "2")
    yield s
    assert s.stop() == 0, s.log()


def eos_bias(tokenizer):
    # Random weights sample EOS anywhere; suppressing it fixes every length.
    return {str(t): -100 for t in tokenizer.eos_token_ids}


def inproc_greedy(model, tokenizer, prompt_ids, max_tokens, bias=None):
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    procs = make_logits_processors(logit_bias={int(k): v for k, v in (bias or {}).items()})
    toks, text = [], ""
    for r in stream_generate(model, tokenizer, prompt_ids, max_tokens=max_tokens,
                             sampler=make_sampler(temp=0.0), logits_processors=procs):
        toks.append(r.token)
        text += r.text
    return toks, text


PROMPTS = ["The quick brown fox", "Once upon a time", "def add(a, b):", "1 2 3 4 5"]


def test_greedy_one_at_a_time_equals_inprocess(server, inproc):
    model, tok = inproc
    bias = eos_bias(tok)
    stored = []  # what the worker's prompt cache holds: each prompt + its output
    for p in PROMPTS:
        ids = tok.encode(p)
        out, want = inproc_greedy(model, tok, ids, MAX_TOKENS, bias)
        status, body = server.post("/v1/completions", {"model": "default", "prompt": p, "max_tokens": MAX_TOKENS,
                                                       "temperature": 0, "logit_bias": bias})
        assert status == 200, body
        assert body["choices"][0]["text"] == want, p
        assert body["choices"][0]["finish_reason"] == "length"
        # Only a shared start (BOS) can come from the cache; never the last token.
        shared = max((_common_prefix(ids, s) for s in stored), default=0)
        assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": MAX_TOKENS,
                                 "total_tokens": len(ids) + MAX_TOKENS,
                                 "prompt_tokens_details": {"cached_tokens": min(shared, len(ids) - 1)}}
        stored.append(list(ids) + out)


def _common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def test_chat_equals_inprocess_chat_template(server, inproc):
    model, tok = inproc
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
    toks, want = inproc_greedy(model, tok, ids, MAX_TOKENS)
    status, body = server.post("/v1/chat/completions", {"model": "default", "messages": msgs,
                                                        "max_tokens": MAX_TOKENS, "temperature": 0})
    assert status == 200, body
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": want}
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert body["usage"]["completion_tokens"] == len(toks)


def test_four_in_flight_equal_batch_generate(server, inproc):
    """Four requests at once are decoded together; each must equal what
    in-process batch_generate gives for the same prompts."""
    from mlx_lm import batch_generate
    from mlx_lm.sample_utils import make_logits_processors

    model, tok = inproc
    bias = eos_bias(tok)
    prompts = [tok.encode(p) for p in PROMPTS]
    procs = make_logits_processors(logit_bias={int(k): v for k, v in bias.items()})
    batch = batch_generate(model, tok, prompts, max_tokens=MAX_TOKENS, logits_processors=procs,
                           return_token_ids=True)
    want = []
    for ids in batch.token_ids:
        # Detokenize the batch's tokens the way streaming does (as
        # stream_generate and mlx_lm.server do), not with tokenizer.decode.
        d = tok.detokenizer
        for t in ids:
            d.add_token(t)
        d.finalize()
        want.append(d.text)

    def one(p):
        return server.post("/v1/completions", {"model": "default", "prompt": p, "max_tokens": MAX_TOKENS,
                                               "temperature": 0, "logit_bias": bias})

    with cf.ThreadPoolExecutor(4) as ex:
        got = list(ex.map(one, PROMPTS))
    texts = [b["choices"][0]["text"] for s, b in got]
    assert all(s == 200 for s, _ in got), got
    # Batched numerics can differ from single-sequence ones in the last bits;
    # the tiny float32 model is tested for exact equality with the batch.
    assert texts == want


def test_streaming_sse_shape_and_usage(server):
    import urllib.request

    req = urllib.request.Request(server.url + "/v1/chat/completions", method="POST",
                                 headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": "default", "messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 8, "stream": True, "temperature": 0,
                                                  "stream_options": {"include_usage": True}}).encode())
    chunks = []
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        for line in r:
            line = line.decode().rstrip("\n")
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    objs = [json.loads(c) for c in chunks[:-1]]
    assert objs[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(o["object"] == "chat.completion.chunk" for o in objs)
    assert len({o["id"] for o in objs}) == 1
    finish = [o for o in objs if o["choices"] and o["choices"][0]["finish_reason"]]
    assert len(finish) == 1
    usage = objs[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("body,status,param", [
    (None, 400, None),  # invalid JSON
    ({"model": "default"}, 400, "messages"),
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ({"model": "default", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "default", "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
    ({"model": "default", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"model": "default", "messages": [{"role": "user", "content": "x"}], "temperature": 5}, 400, "temperature"),
])
def test_bad_input_gets_openai_error(server, body, status, param):
    raw = b"{not json" if body is None else None
    got, resp = server.post("/v1/chat/completions", body, raw=raw)
    assert got == status
    err = resp["error"]
    assert err["message"] and err["type"]
    assert err["param"] == param


def test_prompt_longer_than_context(server, inproc):
    _, tok = inproc
    ctx = server.get("/stats")[1]["model"]["context_length"]
    status, body = server.post("/v1/completions", {"model": "default", "prompt": [5] * (ctx + 3), "max_tokens": 4})
    assert status == 400
    assert str(ctx) in body["error"]["message"] and str(ctx + 3) in body["error"]["message"]
    assert body["error"]["code"] == "context_length_exceeded"


def test_disconnect_mid_stream_cancels_in_worker(server):
    body = json.dumps({"model": "default", "prompt": "x", "max_tokens": 4000, "stream": True,
                       "ignore_eos": True}).encode()
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body)
    got = b""
    while got.count(b"data: ") < 3:
        got += s.recv(4096)
    s.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = server.get("/stats")[1]
        if st["scheduler"]["running"] == 0 and all(w["requests_in_flight"] == 0 for w in st["workers"]):
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"request still running after disconnect: {st['scheduler']}")
    _, m = server.get("/stats")


def test_sigterm_leaves_no_worker(model_dir):
    s = Server(model_dir, "--workers", "2")
    pids = s.worker_pids()
    assert len(pids) == 2 and all(pid_alive(p) for p in pids)
    assert s.stop() == 0, s.log()
    assert not any(pid_alive(p) for p in pids), s.log()


def test_sigkill_of_supervisor_leaves_no_orphan(model_dir):
    import signal

    s = Server(model_dir, "--workers", "1")
    pids = s.worker_pids()
    s.stop(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pid_alive(p) for p in pids)


def test_curl_chat_and_stream(server):
    out = subprocess.run(["curl", "-s", server.url + "/v1/chat/completions", "-H", "Content-Type: application/json",
                          "-d", json.dumps({"model": "default", "max_tokens": 5,
                                            "messages": [{"role": "user", "content": "hi"}]})],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["choices"][0]["message"]["role"] == "assistant"
    out = subprocess.run(["curl", "-sN", server.url + "/v1/completions", "-H", "Content-Type: application/json",
                          "-d", json.dumps({"model": "default", "max_tokens": 5, "prompt": "hi", "stream": True})],
                         capture_output=True, text=True, check=True).stdout
    assert out.rstrip().endswith("data: [DONE]")
