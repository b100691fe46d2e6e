"""Cache-aware routing with real workers: a conversation's turns go to the
worker whose prompt cache holds it; when that worker is killed, the next turn is
answered correctly elsewhere and the affinity (and the hit rate) moves with it."""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request

import pytest

from _server import Server
from test_worker import ref_greedy

SYSTEM = "You are a careful assistant. Answer in full sentences and keep every answer short."
USERS = ["Tell me about the sea.", "And the mountains?", "What about rivers?", "Which do you like best?"]


@pytest.fixture(scope="module")
def server(tiny_model):
    s = Server(tiny_model, "--workers", "2", "--heartbeat", "200ms")
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def clean(ref):
    # Keep the random model to whole UTF-8 characters and no specials but EOS,
    # so its replies survive decode and re-encode (as a trained model's do).
    _, tok = ref
    return {str(i): -100 for i in range(len(tok.vocab)) if i in (0, 1) or "\ufffd" in tok.decode([i])}


def decisions(server, reason: str) -> float:
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(rf'^krserve_routing_decisions_total\{{[^}}]*reason="{reason}"[^}}]*\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def turn(server, ref, clean, msgs):
    _, tok = ref
    status, body = server.post("/v1/chat/completions", {"model": "default", "messages": msgs, "max_tokens": 12,
                                                        "temperature": 0, "logit_bias": clean})
    assert status == 200, body
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
    want = ref_greedy(ref, ids, 12, logit_bias={int(k): v for k, v in clean.items()})
    reply = body["choices"][0]["message"]["content"]
    assert reply == want["text"], "the answer differs from the uncached in-process reference"
    return reply, body["usage"]


def test_workers_size_their_default_budget(server):
    """With the default --prompt-cache-bytes, krserve up passes each worker
    --device-share 2 and the workers size their budgets themselves (on
    the CPU: an eighth of physical memory, split between the two); /stats
    shows what each worker's hello advertised."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    deadline = time.monotonic() + 120
    while True:  # the server is ready with its first worker; wait for both
        _, st = server.get("/stats")
        ready = [w for w in st["workers"] if w["state"] == "ready"]
        if len(ready) == 2:
            break
        assert time.monotonic() < deadline, st["workers"]
        time.sleep(0.05)
    assert [w["prompt_cache_budget_bytes"] for w in ready] == [physical // 8 // 2] * 2
    assert st["model"]["prompt_cache_budget_bytes"] == physical // 8 // 2
    assert "auto (each worker's, by its device)" in server.log()


def test_affinity_follows_the_conversation_and_survives_a_kill(server, ref, clean):
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USERS[0]}]
    reply, u1 = turn(server, ref, clean, msgs)
    msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": USERS[1]}]
    cache0 = decisions(server, "cache")
    reply, u2 = turn(server, ref, clean, msgs)
    assert decisions(server, "cache") == cache0 + 1, "turn 2 was not routed by its cache"
    held = u1["prompt_tokens"] + u1["completion_tokens"]
    assert u2["prompt_tokens_details"]["cached_tokens"] >= 0.9 * held, (u1, u2)

    # Kill the worker that holds the conversation (the one that served turn 2).
    _, st = server.get("/stats")
    busiest = max(st["workers"], key=lambda w: w["requests_served"])
    os.kill(busiest["pid"], signal.SIGKILL)
    # Whether the supervisor has noticed yet or not, turn 3 cannot find its
    # history: on the dead worker it is retried elsewhere (a suspect), and
    # the other workers never saw the conversation.
    msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": USERS[2]}]
    reply, u3 = turn(server, ref, clean, msgs)  # answered by another worker, correctly
    assert u3["prompt_tokens_details"]["cached_tokens"] < 0.5 * u3["prompt_tokens"], u3

    msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": USERS[3]}]
    cache3 = decisions(server, "cache")
    _, u4 = turn(server, ref, clean, msgs)
    assert decisions(server, "cache") == cache3 + 1, "turn 4 was not routed by its cache"
    held = u3["prompt_tokens"] + u3["completion_tokens"]
    assert u4["prompt_tokens_details"]["cached_tokens"] >= 0.9 * held, (u3, u4)
    server.wait_ready(120)
