"""logprobs end to end: the official `openai` client against krserve on the tiny model."""

from __future__ import annotations

import math

import openai
import pytest

from _server import Server, tiny_model


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    s = Server(str(tiny_model(tmp_path_factory.mktemp("logprobs") / "tiny")), "--workers", "1")
    yield openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert s.stop() == 0, s.log()


def _model(client):
    return client.models.list().data[0].id


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=_model(client), temperature=0, max_tokens=8,
                                       logit_bias={"2": -100},  # no EOS: 8 tokens
                                       logprobs=True, top_logprobs=3,
                                       messages=[{"role": "user", "content": "Hello"}])
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 8
    assert "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        assert c.logprob <= 0 and math.isfinite(c.logprob)
        assert c.bytes == list(c.token.encode())
        assert len(c.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert c.top_logprobs[0].token == c.token and c.top_logprobs[0].logprob == c.logprob
        assert [t.logprob for t in c.top_logprobs] == sorted((t.logprob for t in c.top_logprobs), reverse=True)


def test_chat_logprobs_stream_matches(client):
    kw = dict(model=_model(client), temperature=0, max_tokens=6, logit_bias={"2": -100},
              logprobs=True, top_logprobs=2, messages=[{"role": "user", "content": "Hi"}])
    want = client.chat.completions.create(**kw).choices[0].logprobs.content
    got = []
    for chunk in client.chat.completions.create(stream=True, **kw):
        if chunk.choices and chunk.choices[0].logprobs:
            got += chunk.choices[0].logprobs.content
    assert [(c.token, c.logprob) for c in got] == [(c.token, c.logprob) for c in want]


def test_completion_logprobs(client):
    r = client.completions.create(model=_model(client), prompt="Once upon", temperature=0,
                                  max_tokens=5, logit_bias={"2": -100}, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0
    for t, x, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[t] == x and max(top.values()) == x
