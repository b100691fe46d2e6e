"""The worker's prompt cache (krserve_worker/prompt_cache.py), on real workers.

Greedy output must not depend on the cache: every turn of a conversation is
compared with an uncached reference (mlx_lm.stream_generate in-process, or a
worker started with ``--prompt-cache-bytes 0``), on the generate_step fast path
and in the BatchGenerator. ``done.cached`` must show the reuse, ``pong`` the
bytes held and the evictions, and the budget must hold.
"""

import time

import pytest

from conftest import summarize
from test_worker import NO_EOS, gen, ref_greedy

SYSTEM = ("You are a careful assistant. Answer in full sentences, never invent facts, "
          "and say so when you do not know. Keep every answer short and kind.")
QUESTIONS = [
    "What is the capital of France?",
    "Tell me a story about a robot.",
    "How much wood would a woodchuck chuck?",
    "Say hello to the world again.",
    "What did the quick brown fox do?",
]


@pytest.fixture(scope="module")
def clean(ref):
    """A logit_bias that keeps the random model to tokens of whole UTF-8
    characters (no specials but EOS): its replies then survive the
    text round trip, decode and re-encode, as a trained model's do."""
    _, tok = ref
    return {i: -1e9 for i in range(len(tok.vocab))
            if i in (0, 1) or "\ufffd" in tok.decode([i])}


def chat(rid, msgs, max_tokens, **kw):
    m = {"t": "gen", "id": rid, "messages": msgs, "max_tokens": max_tokens}
    m.update(kw)
    return m


def pong(w, seq):
    w.send({"t": "ping", "seq": seq})
    deadline = time.monotonic() + 30
    while True:
        m = w.next_frame(max(0.1, deadline - time.monotonic()))
        if m["t"] == "pong" and m.get("seq") == seq:
            return m


def wait_log(w, text, timeout=30):
    deadline = time.monotonic() + timeout
    while text not in w.stderr_text():
        assert time.monotonic() < deadline, f"{text!r} not logged"
        w.eof.wait(0.005)  # poll the log file the worker writes


def _common(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def conversation(user_turns, system=SYSTEM):
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs, list(user_turns)


def test_linear_trie_search_matches_mlx_lm():
    """The prompt cache's trie answers every lookup as mlx-lm's PromptTrie
    does (exact, shorter, longer and common prefix), on tries shaped like a
    worker's: conversations sharing a system prompt, entries that extend
    others, prefixes popped by longer entries and entries evicted."""
    import random

    from mlx_lm.models.cache import PromptTrie

    from krserve_worker.prompt_cache import _linear_trie

    rnd = random.Random(15)
    for trial in range(40):
        theirs, ours = PromptTrie(), _linear_trie()
        head = [rnd.randrange(6) for _ in range(rnd.randrange(0, 5))]
        system = head + [rnd.randrange(6) for _ in range(rnd.randrange(0, 30))]
        stored = []
        for _ in range(rnd.randrange(1, 12)):
            base = rnd.choice([head, system] + stored) if stored else system
            tokens = base[:rnd.randrange(len(base) + 1)] + [rnd.randrange(6) for _ in range(rnd.randrange(1, 40))]
            for t in (theirs, ours):
                t.add("m", tokens, len(stored))
            stored.append(tokens)
            if rnd.random() < 0.3:
                assert theirs.pop_prefixes("m", tokens) == ours.pop_prefixes("m", tokens)
            if rnd.random() < 0.2 and len(stored) > 1:
                gone = stored.pop(rnd.randrange(len(stored) - 1))
                try:
                    want = theirs.pop("m", gone)
                except KeyError:
                    continue  # popped as a prefix already
                assert ours.pop("m", gone) == want
        queries = [s[:rnd.randrange(len(s) + 1)] + [rnd.randrange(6) for _ in range(rnd.randrange(3))]
                   for s in stored for _ in range(3)] + [[], [7], head, system]
        for q in queries:
            try:
                want = theirs.search("m", q)
            except TypeError:  # PromptTrie's walk found no longer entry: cannot happen here
                raise AssertionError(f"trial {trial}: mlx-lm's search failed on {q}")
            assert ours.search("m", q) == want, (trial, q)
    assert _linear_trie().search("other", [1, 2]) == PromptTrie().search("other", [1, 2])


def test_followers_wait_for_their_leader():
    """The policy alone: the first request of a system prompt leads, later
    ones wait in arrival order until the leader releases them; a cancelled
    follower leaves the queue; after a release the next one leads again."""
    from krserve_worker.prompt_cache import Followers

    f = Followers()
    a, b = (1, 2, 3), (1, 2, 4)
    assert f.admit(a, 10) and f.admit(a, 10)  # the leader, asked again
    assert not f.admit(a, 11) and f.park(a, 11, "r11") == 10
    assert not f.admit(a, 12) and f.park(a, 12, "r12") == 10
    assert f.admit(b, 20)  # another system prompt has its own leader
    assert not f.admit(b, 21) and f.park(b, 21, "r21") == 20
    assert len(f) == 3 and f.parked() == ["r11", "r12", "r21"]
    assert f.cancel(12) == "r12" and f.cancel(12) is None and len(f) == 2
    assert f.release(11) == []  # not a leader
    assert f.release(10) == ["r11"] and f.release(10) == []
    assert f.admit(a, 13)  # released: the next request of a leads
    assert f.release(20) == ["r21"] and len(f) == 0
    assert f.cancel(21) is None


def _system_end(tok, msgs):
    from krserve_worker.prompt_cache import system_end

    ids = list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))
    return ids, system_end(tok, msgs, ids)


def test_a_burst_prefills_its_system_prompt_once(start_worker, ref, clean):
    """New conversations sent together with the same system prompt: the
    first prefills it, the others wait for its checkpoint and start from
    the cache. Every output equals the uncached reference."""
    _, tok = ref
    w = start_worker()
    w.hello()
    convs = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
             for q in QUESTIONS[:3]]
    w.send(*[chat(1 + k, m, 12, logit_bias=clean) for k, m in enumerate(convs)])
    got = [summarize(w.collect(1 + k)) for k in range(3)]
    err = w.stderr_text()
    sys_end = None
    for k, (m, g) in enumerate(zip(convs, got)):
        ids, sys_end = _system_end(tok, m)
        assert sys_end > 0
        want = ref_greedy(ref, ids, 12, logit_bias=clean)
        assert g["ids"] == want["ids"] and g["text"] == want["text"], k
        assert g["last"].get("cached", 0) == (0 if k == 0 else sys_end), k
    assert "inserted 1 request(s): ids [1]" in err
    assert "ids [2, 3] wait for the system prompt of id 1" in err
    assert f"inserted 2 request(s): ids [2, 3], cached [{sys_end}, {sys_end}]" in err


def test_cancel_while_waiting_for_a_system_prompt(start_worker, ref, clean):
    """A waiting request can be cancelled; so can the leader it waits for,
    and the request left still gets its uncached reference output. (The
    cancels race the leader's checkpoint: either way the outcome holds.)"""
    _, tok = ref
    w = start_worker(args=("--prefill-step", "4"))  # a long system prompt: many steps
    w.hello()
    system = " ".join([SYSTEM] * 6)
    convs = [[{"role": "system", "content": system}, {"role": "user", "content": q}]
             for q in QUESTIONS[:3]]
    w.send(*[chat(1 + k, m, 10 ** 5 if k < 2 else 12, logit_bias=clean)
             for k, m in enumerate(convs)])
    wait_log(w, "ids [2, 3] wait for the system prompt of id 1")
    w.send({"t": "cancel", "id": 2}, {"t": "cancel", "id": 1})
    assert w.collect(2)[-1]["reason"] == "cancelled"
    assert w.collect(1)[-1]["reason"] == "cancelled"
    got = summarize(w.collect(3))
    ids, sys_end = _system_end(tok, convs[2])
    want = ref_greedy(ref, ids, 12, logit_bias=clean)
    assert got["ids"] == want["ids"] and got["text"] == want["text"]
    assert got["last"].get("cached", 0) <= sys_end
    w.send(chat(4, convs[0], 4))  # the worker goes on
    assert summarize(w.collect(4))["last"]["reason"] in ("stop", "length")


def test_multi_turn_fast_path_matches_uncached_and_reports_cached(start_worker, ref, clean):
    """One conversation, one request at a time (the fast path): each turn's
    output equals mlx-lm's uncached greedy output, and from turn 2 on at least
    90% of the previous turn's prompt + reply comes from the cache."""
    _, tok = ref
    w = start_worker()
    assert "prompt_cache" in w.hello()["caps"]
    msgs, turns = conversation(QUESTIONS[:4])
    prev = None
    for i, q in enumerate(turns):
        msgs.append({"role": "user", "content": q})
        ids = list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))
        rid = 100 + i
        w.send(chat(rid, msgs, 20, logit_bias=clean))
        got = summarize(w.collect(rid))
        done = got["last"]
        want = ref_greedy(ref, ids, 20, logit_bias=clean)
        assert got["ids"] == want["ids"], f"turn {i + 1}"
        assert got["text"] == want["text"] and done["reason"] == want["reason"]
        assert done["ptoks"] == len(ids)
        if prev is None:
            assert done.get("cached", 0) == 0
        else:
            assert done["cached"] >= 0.9 * (prev["ptoks"] + prev["ctoks"]), (i + 1, done, prev)
            assert done["cached"] < done["ptoks"]
        prev = done
        msgs.append({"role": "assistant", "content": got["text"]})
    assert "fast path: id 103" in w.stderr_text()


def test_multi_turn_batched_matches_cache_off(start_worker, ref, clean):
    """Three conversations whose turns are sent together (the batch path),
    on a worker with the cache and one without: the same ids every turn, and
    the cached counts show the reuse."""
    on, off = start_worker(), start_worker(args=("--prompt-cache-bytes", "0"))
    on.hello()
    h_off = off.hello()
    assert "prompt_cache" not in h_off["caps"] and "cache_bytes" not in h_off
    convs = [conversation([QUESTIONS[(c + t) % len(QUESTIONS)] for t in range(3)])
             for c in range(3)]
    rid = 1000
    prev = [None] * len(convs)
    for t in range(3):
        rids = []
        for msgs, turns in convs:
            msgs.append({"role": "user", "content": turns[t]})
            rids.append(rid)
            rid += 1
        frames = [chat(r, msgs, 16 + 4 * k, logit_bias=clean) for k, (r, (msgs, _)) in enumerate(zip(rids, convs))]
        on.send(*frames)
        off.send(*frames)
        for k, r in enumerate(rids):
            a, b = summarize(on.collect(r)), summarize(off.collect(r))
            assert a["ids"] == b["ids"] and a["text"] == b["text"], (t + 1, k)
            assert a["last"]["reason"] == b["last"]["reason"]
            assert "cached" not in b["last"]
            if t == 0:
                # Turn 1: at most what the prompts share (the system prompt),
                # once a conversation has stored it (they are prefilled
                # together, so maybe none).
                ids = [ref[1].apply_chat_template(m[:2], add_generation_prompt=True, tokenize=True)
                       for m, _ in convs]
                shared = max(_common(ids[k], ids[j]) for j in range(len(ids)) if j != k)
                assert a["last"].get("cached", 0) in (0, shared)
            else:
                p = prev[k]
                assert a["last"]["cached"] >= 0.9 * (p["ptoks"] + p["ctoks"]), (t + 1, k)
            prev[k] = a["last"]
            convs[k][0].append({"role": "assistant", "content": a["text"]})
    assert "inserted 3 request(s)" in on.stderr_text()


def test_shared_system_prompt_is_a_checkpoint(start_worker, ref):
    """A new conversation with a known system prompt starts from the cache."""
    _, tok = ref
    w = start_worker()
    w.hello()
    a = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}]
    w.send(chat(1, a, 8))
    summarize(w.collect(1))
    b = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[1]}]
    ids = list(tok.apply_chat_template(b, add_generation_prompt=True, tokenize=True))
    sys_ids = list(tok.apply_chat_template(b[:1], tokenize=True))
    w.send(chat(2, b, 8))
    got = summarize(w.collect(2))
    assert got["last"]["cached"] >= len(sys_ids)
    assert got["ids"] == ref_greedy(ref, ids, 8)["ids"]


@pytest.mark.parametrize("fast", [True, False])
def test_penalties_on_a_cache_hit_match_uncached(start_worker, ref, fast):
    """Logits processors see the whole prompt on a cache hit too (the fast
    path hands generate_step only the uncached tail; with these prompts,
    penalties over the tail alone give other tokens)."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_logits_processors

    model, tok = ref
    w = start_worker(args=() if fast else ("--no-single-fast-path",))
    w.hello()
    p = tok.encode("The quick brown fox jumps over the lazy dog. " * 3, add_special_tokens=False)
    w.send(gen(1, p, 4))
    summarize(w.collect(1))
    q = p + tok.encode(" sea", add_special_tokens=False)
    w.send(gen(2, q, 24, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3))
    got = summarize(w.collect(2))
    assert got["last"]["cached"] >= len(p)
    lp = make_logits_processors(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3)
    want = [r.token for r in stream_generate(model, tok, q, max_tokens=24, logits_processors=lp)]
    want = [t for t in want if t not in tok.eos_token_ids]
    assert got["ids"] == want


def test_completion_continuing_its_own_output(start_worker, ref):
    """A text prompt that is exactly a stored sequence (prompt + reply) still
    prefills its last token itself."""
    _, tok = ref
    w = start_worker()
    w.hello()
    p = tok.encode("Once upon a time there was", add_special_tokens=False)
    w.send(gen(1, p, 12, logit_bias=NO_EOS))
    first = summarize(w.collect(1))
    q = p + first["ids"]  # what the cache stored, exactly
    w.send(gen(2, q, 12, logit_bias=NO_EOS))
    got = summarize(w.collect(2))
    assert got["last"]["cached"] == len(q) - 1
    assert got["ids"] == ref_greedy(ref, q, 12, logit_bias=NO_EOS)["ids"]


def _kv_bytes_per_token(w, tok):
    """Bytes the cache holds per token of a finished sequence (the tiny
    model's KV width), measured."""
    p = tok.encode("Hello world! Hello again, world.", add_special_tokens=False)
    w.send(gen(1, p, 8, logit_bias=NO_EOS))
    summarize(w.collect(1))
    held = pong(w, 1)["cache"]
    return held // (len(p) + 8)


def test_budget_holds_and_evicts_the_oldest(start_worker, ref, tmp_path):
    """With room for about two conversations, a third evicts the oldest; the
    cache never holds more than the budget; an entry larger than the budget is
    skipped without flushing the others."""
    _, tok = ref
    probe = start_worker()
    probe.hello()
    per_tok = _kv_bytes_per_token(probe, tok)
    probe.stop()
    assert per_tok > 0
    # Tokens per conversation: prompt 500 + reply 12, as much as a running
    # sequence's KV buffer holds (it grows in 256-token steps).
    n = 512
    budget = int(per_tok * n * 2.5)
    w = start_worker(args=("--prompt-cache-bytes", str(budget)))
    assert w.hello()["cache_bytes"] == budget
    a, b, c = prompts = [[(i * k + k) % 400 + 3 for i in range(500)] for k in (3, 5, 7)]
    for k, p in enumerate(prompts):
        w.send(gen(10 + k, p, 12, logit_bias=NO_EOS))
        summarize(w.collect(10 + k))
        m = pong(w, 10 + k)
        assert 0 < m["cache"] <= budget
        assert m.get("evicted", 0) == (1 if k == 2 else 0)
    assert m["cache"] == 2 * n * per_tok  # B and C
    # B and C are there: asked together, both hit (a hit copies its entry,
    # and then the copies count against the budget too, evicting both).
    w.send(gen(21, b, 2, logit_bias=NO_EOS), gen(22, c, 2, logit_bias=NO_EOS))
    assert summarize(w.collect(21))["last"]["cached"] == len(b) - 1
    assert summarize(w.collect(22))["last"]["cached"] == len(c) - 1
    # A, the oldest, was evicted.
    w.send(gen(20, a, 2, logit_bias=NO_EOS))
    assert "cached" not in summarize(w.collect(20))["last"]
    before = pong(w, 30)
    assert before["cache"] <= budget
    # An entry larger than the whole budget is skipped; nothing is evicted for it.
    big = [(i * 11) % 400 + 3 for i in range(int(budget / per_tok) + 10)]
    w.send(gen(31, big, 1))
    assert summarize(w.collect(31))["last"]["t"] == "done"
    after = pong(w, 32)
    assert after.get("evicted", 0) == before.get("evicted", 0)
    assert after["cache"] == before["cache"]


GB = 10**9
GIB = 2**30


@pytest.mark.parametrize("kind, device, physical, weights, share, want", [
    # A CUDA GPU: half its memory, less the weights of the share workers, split.
    ("cuda", 141 * GB, 128 * GIB, 6 * GB, 1, 141 * GB // 2 - 6 * GB),
    ("cuda", 141 * GB, 128 * GIB, 6 * GB, 2, (141 * GB // 2 - 12 * GB) // 2),
    ("cuda", 141 * GB, 128 * GIB, 6 * GB, 4, (141 * GB // 2 - 24 * GB) // 4),
    ("cuda", 80 * GB, 2 * GIB, 0, 3, 80 * GB // 2 // 3),  # not bounded by system memory
    # The weights take the half: 0, the cache is off (never negative).
    ("cuda", 24 * GB, 64 * GIB, 13 * GB, 1, 0),
    ("cuda", 80 * GB, 64 * GIB, 16 * GB, 3, 0),
    ("cuda", 80 * GB, 64 * GIB, 20 * GB, 2, 0),  # exactly the half
    # GPU memory unknown: the physical-memory rule, weights ignored.
    ("cuda", 0, 128 * GIB, 6 * GB, 2, 128 * GIB // 8 // 2),
    # The CPU and Apple silicon (unified memory): an eighth of physical memory.
    ("cpu", 0, 24 * GIB, 10**8, 1, 3 * GIB),
    ("cpu", 0, 24 * GIB, 10**8, 2, 3 * GIB // 2),
    ("metal", 192 * GIB, 192 * GIB, 70 * GB, 1, 24 * GIB),
    ("metal", 192 * GIB, 192 * GIB, 70 * GB, 4, 6 * GIB),
    ("cpu", 0, 0, 10**8, 1, 0),  # physical memory unknown: off
    ("cpu", 0, 24 * GIB, 10**8, 0, 3 * GIB),  # a share below 1 counts as 1
])
def test_default_budget(kind, device, physical, weights, share, want):
    from krserve_worker.prompt_cache import default_budget

    got = default_budget(kind, device, physical, weights, share)
    assert got.bytes == want
    if kind == "cuda" and device:
        assert "half of the GPU's" in got.rule
        assert ("prompt cache is off" in got.rule) == (want == 0)
    else:
        assert got.rule.startswith(("an eighth of the ", "GPU memory unknown: an eighth of the "))
        assert "of physical memory" in got.rule
        assert ("GPU memory unknown" in got.rule) == (kind == "cuda")
    assert ("split among" in got.rule) == (share > 1)


@pytest.mark.parametrize("dev, want", [
    (("cpu", 0), lambda w: 64 * GIB // 8 // 2),
    (("metal", 0), lambda w: 64 * GIB // 8 // 2),  # unified memory
    (("cuda", 80 * GB), lambda w: (40 * GB - 2 * w) // 2),
    (("cuda", 0), lambda w: 64 * GIB // 8 // 2),  # GPU memory unknown: physical
])
def test_device_budget_reads_the_device(ref, monkeypatch, dev, want):
    """device_budget sums the loaded model's weights and takes the device
    from device.current() (which test_device.py checks against what mlx
    reports; this machine has no GPU)."""
    from mlx.utils import tree_flatten

    from krserve_worker import device
    from krserve_worker.prompt_cache import device_budget

    model, _ = ref
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert weights > 0
    monkeypatch.setattr(device, "current", lambda: device.Device(*dev))
    assert device_budget(model, 2, 64 * GIB).bytes == want(weights)


def test_worker_default_budget_by_share(start_worker):
    """A worker started without --prompt-cache-bytes sizes its cache itself:
    on the CPU an eighth of physical memory split among the
    --device-share workers, logged with its rule."""
    import os

    w = start_worker(args=("--device-share", "2"))
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    h = w.hello()
    assert h["cache_bytes"] == physical // 8 // 2
    assert "prompt_cache" in h["caps"]
    wait_log(w, f"prompt cache budget: an eighth of the {physical / 2**30:.1f} GiB of physical "
                "memory, split among 2 workers")
    # Given bytes win over the share.
    w2 = start_worker(args=("--device-share", "4", "--prompt-cache-bytes", "12345678"))
    assert w2.hello()["cache_bytes"] == 12345678
    assert "prompt cache budget:" not in w2.stderr_text()


@pytest.mark.parametrize("args", [("--device-share", "0"), ("--prompt-cache-bytes", "-1")])
def test_bad_budget_flags_are_refused(args, capsys):
    from krserve_worker.args import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--model", "m", *args])
    assert e.value.code == 2
    assert args[0] in capsys.readouterr().err


def test_cancelled_request_keeps_its_prefill(start_worker, ref):
    """A request cancelled during its chunked prefill stores what it
    prefilled; one cancelled while decoding stores its prompt and tokens."""
    w = start_worker(args=("--prefill-step", "32"))
    w.hello()
    long_prompt = [(i * 7) % 500 + 3 for i in range(600)]
    w.send(gen(1, long_prompt, 100000, logit_bias=NO_EOS))  # cannot finish before the cancel
    wait_log(w, "inserted 1 request(s): ids [1]")  # then its prefill has begun
    w.send({"t": "cancel", "id": 1})
    done = w.collect(1)[-1]
    assert done["reason"] == "cancelled"
    w.send(gen(2, long_prompt, 2))
    again = summarize(w.collect(2))["last"]
    # Each 32-token chunk is a step; the cancel came at one of them (at worst
    # the request finished prefilling, and then everything is cached).
    assert again["cached"] > 0 and again["cached"] % 32 == 0 or again["cached"] == len(long_prompt) - 1
    # Cancelled while decoding on the fast path: prompt + tokens so far.
    p = [(i * 5) % 400 + 3 for i in range(20)]
    w.send(gen(3, p, 100000, logit_bias=NO_EOS))
    first = w.next_for(3)
    assert first["t"] == "tok"
    w.send({"t": "cancel", "id": 3})
    frames = [first] + w.collect(3)
    assert frames[-1]["reason"] == "cancelled"
    out = summarize(frames)["ids"]
    w.send(gen(4, p + out, 2, logit_bias=NO_EOS))
    assert summarize(w.collect(4))["last"]["cached"] == len(p + out) - 1


@pytest.mark.parametrize("fast", [True, False])
def test_resume_hits_the_cache(start_worker, ref, fast):
    """A resumed request (prompt + resume) finds the state of its first attempt."""
    _, tok = ref
    args = () if fast else ("--no-single-fast-path",)
    w = start_worker(args=args)
    w.hello()
    p = tok.encode("The quick brown fox", add_special_tokens=False)
    want = ref_greedy(ref, p, 20, logit_bias=NO_EOS)
    w.send(gen(1, p, 20, logit_bias=NO_EOS))
    summarize(w.collect(1))
    w.send(gen(2, p, 12, resume=want["ids"][:8], logit_bias=NO_EOS))
    got = summarize(w.collect(2))
    assert want["ids"][:8] + got["ids"] == want["ids"]
    assert got["last"]["cached"] == len(p) + 8 - 1


# -- a model whose cache cannot be trimmed (mamba: ArraysCache) ----------------


@pytest.fixture(scope="module")
def mamba(tmp_path_factory):
    from conftest import _load_script

    out = tmp_path_factory.mktemp("mamba") / "model"
    assert _load_script().main([str(out), "--seed", "0", "--arch", "mamba"]) == 0
    from mlx_lm import load

    model, tok = load(str(out))
    assert type(model.make_cache()[0]).__name__ == "ArraysCache"
    return str(out), (model, tok)


@pytest.mark.parametrize("fast", [True, False])
def test_state_space_model_multi_turn_and_exact_prefixes_only(start_worker, mamba, clean, fast):
    """ArraysCache cannot be trimmed: the worker resumes only from states it
    stored for an exact prefix (the end of the system prompt, of each prompt,
    the finished sequence), and the output equals uncached generation every
    turn, on the fast path and through the BatchGenerator (one request at a
    time: mlx-lm 0.32.2 does not batch mamba prompts of different lengths
    correctly even without a cache, see batch_generate)."""
    path, ref = mamba
    _, tok = ref
    w = start_worker(path, args=() if fast else ("--no-single-fast-path",))
    w.hello()
    msgs, turns = conversation(QUESTIONS[:3])
    prev, first_prompt = None, 0
    for i, q in enumerate(turns):
        msgs.append({"role": "user", "content": q})
        ids = list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))
        first_prompt = first_prompt or len(ids)
        w.send(chat(10 + i, msgs, 16, logit_bias=clean))
        got = summarize(w.collect(10 + i))
        assert got["ids"] == ref_greedy(ref, ids, 16, logit_bias=clean)["ids"], f"turn {i + 1}"
        if prev is not None:
            assert got["last"]["cached"] >= 0.9 * (prev["ptoks"] + prev["ctoks"])
        prev = got["last"]
        msgs.append({"role": "assistant", "content": got["text"]})
    # The same prompt again (a regenerated answer): the prompt-end checkpoint.
    w.send(chat(20, msgs[:-1], 16, logit_bias=clean))
    again = summarize(w.collect(20))
    assert again["last"]["cached"] == prev["ptoks"] - 1
    # A prompt that leaves the stored conversation mid-way (another first
    # answer) cannot use the longer states (no trimming): the nearest exact
    # prefix is turn 1's prompt-end checkpoint.
    other = msgs[:2] + [{"role": "assistant", "content": "Something else entirely."},
                        {"role": "user", "content": QUESTIONS[4]}]
    ids = list(tok.apply_chat_template(other, add_generation_prompt=True, tokenize=True))
    w.send(chat(21, other, 16, logit_bias=clean))
    got = summarize(w.collect(21))
    assert got["last"]["cached"] == first_prompt - 1
    assert got["ids"] == ref_greedy(ref, ids, 16, logit_bias=clean)["ids"]
    # A new conversation with the same system prompt: its checkpoint.
    sys_ids = list(tok.apply_chat_template(msgs[:1], tokenize=True))
    new = msgs[:1] + [{"role": "user", "content": QUESTIONS[3]}]
    ids = list(tok.apply_chat_template(new, add_generation_prompt=True, tokenize=True))
    w.send(chat(22, new, 16, logit_bias=clean))
    got = summarize(w.collect(22))
    assert len(sys_ids) <= got["last"]["cached"] < len(ids) - 1
    assert got["ids"] == ref_greedy(ref, ids, 16, logit_bias=clean)["ids"]
