"""The official `openai` package against a running krserve, used as a user would.

The default model (SmolLM2-135M-Instruct, what `krserve up` serves with no
--model) answers here, so the answers have to make sense.
"""

from __future__ import annotations

import openai
import pytest

from _server import Server


@pytest.fixture(scope="module")
def server():
    s = Server(None, "--workers", "1")  # no --model: the default model
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models(client):
    ids = [m.id for m in client.models.list().data]
    assert "default" in ids


def test_chat_answers_sensibly(client):
    r = client.chat.completions.create(model="default", temperature=0, max_tokens=32,
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_with_usage(client):
    stream = client.chat.completions.create(
        model="default", temperature=0, max_tokens=32, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert "Paris" in text
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0
    # Streamed and non-streamed greedy outputs agree.
    r = client.chat.completions.create(model="default", temperature=0, max_tokens=32,
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert r.choices[0].message.content == text


def test_stop_sequence_cuts_and_does_not_leak(client):
    base = client.completions.create(model="default", prompt="1, 2, 3, 4, 5,", max_tokens=16, temperature=0)
    text = base.choices[0].text
    # Stop at a piece of the greedy continuation itself, so it is known to occur.
    stop = text.strip()[2:5]
    assert len(stop) == 3, text
    r = client.completions.create(model="default", prompt="1, 2, 3, 4, 5,", max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert stop not in r.choices[0].text
    assert text.startswith(r.choices[0].text)
    assert r.choices[0].text + stop == text[: len(r.choices[0].text) + len(stop)]
    # Streamed, the same.
    s = client.completions.create(model="default", prompt="1, 2, 3, 4, 5,", max_tokens=16, temperature=0,
                                  stop=stop, stream=True)
    streamed = "".join(c.choices[0].text for c in s if c.choices)
    assert streamed == r.choices[0].text


def test_seed_makes_sampling_reproducible(client):
    kw = dict(model="default", max_tokens=16, temperature=1.0, top_p=0.95,
              messages=[{"role": "user", "content": "Write a short poem about the sea."}])
    a = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    assert a == b
    outs = {client.chat.completions.create(seed=s, **kw).choices[0].message.content for s in (1, 2, 3)}
    assert len(outs) > 1, "different seeds should give different samples"


def test_penalties_change_the_output(client):
    kw = dict(model="default", max_tokens=24, temperature=0, prompt="the the the the the the")
    plain = client.completions.create(**kw).choices[0].text
    pen = client.completions.create(frequency_penalty=2.0, presence_penalty=2.0, **kw).choices[0].text
    rep = client.completions.create(extra_body={"repetition_penalty": 1.8}, **kw).choices[0].text
    assert pen != plain
    assert rep != plain
    assert pen.count(" the") <= plain.count(" the")


def test_errors_are_openai_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="default", messages=[])
    assert "messages" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": "x"}], n=3)


def test_greedy_stream_survives_worker_kill_on_default_model(server, client):
    """The default (4-bit) model: a stream whose worker is SIGKILLed mid-way is
    resumed on the restarted worker and equals the crash-free output."""
    import json
    import os
    import signal
    import urllib.request

    body = {"model": "default", "messages": [{"role": "user", "content": "Write a short story about a robot."}],
            "max_tokens": 32, "temperature": 0, "ignore_eos": True}
    want = client.chat.completions.create(**{k: v for k, v in body.items() if k != "ignore_eos"},
                                          extra_body={"ignore_eos": True}).choices[0].message.content
    req = urllib.request.Request(server.url + "/v1/chat/completions", method="POST",
                                 data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    text, chunks, killed = "", 0, None
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: {"):
                continue
            d = json.loads(line[6:])
            assert "error" not in d, d
            for c in d["choices"]:
                text += c["delta"].get("content") or ""
            chunks += 1
            if chunks == 10 and killed is None:
                _, st = server.get("/stats")
                killed = next(w["pid"] for w in st["workers"] if w["requests_in_flight"] > 0)
                os.kill(killed, signal.SIGKILL)
    assert killed
    assert text == want
    server.wait_ready(120)


def test_multi_turn_reports_cached_tokens(server, client):
    """Turn 2 of a conversation is mostly prefilled from the worker's prompt
    cache, and usage says so (whole and streamed); /stats and /metrics count it."""
    import json
    import urllib.request

    msgs = [{"role": "system", "content": "You are a concise geography tutor. Answer in one sentence."},
            {"role": "user", "content": "What is the capital of France?"}]
    r1 = client.chat.completions.create(model="default", temperature=0, max_tokens=24, messages=msgs)
    assert r1.usage.prompt_tokens_details.cached_tokens < r1.usage.prompt_tokens
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content},
             {"role": "user", "content": "And the capital of Italy?"}]
    r2 = client.chat.completions.create(model="default", temperature=0, max_tokens=24, messages=msgs)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= 0.9 * (r1.usage.prompt_tokens + r1.usage.completion_tokens), (r1.usage, r2.usage)
    assert cached < r2.usage.prompt_tokens
    # Asked again, streamed: the same answer, and now nearly all of it is cached.
    stream = client.chat.completions.create(model="default", temperature=0, max_tokens=24, messages=msgs,
                                            stream=True, stream_options={"include_usage": True})
    text, usage = "", None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            text += c.delta.content or ""
    assert text == r2.choices[0].message.content
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1
    with urllib.request.urlopen(server.url + "/stats") as resp:
        stats = json.load(resp)
    pc = stats["server"]["prefix_cache"]
    assert pc["hit_tokens"] >= cached + usage.prompt_tokens - 1 and 0 < pc["hit_rate"] < 1
    with urllib.request.urlopen(server.url + "/metrics") as resp:
        text = resp.read().decode()
    hits = [line for line in text.splitlines() if line.startswith("krserve_prefix_cache_hits_total")]
    assert hits and float(hits[0].split()[-1]) >= cached
