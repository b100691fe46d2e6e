"""The real worker subprocess, driven over pipes, against in-process mlx-lm."""

import os
import platform
import time

import pytest

from conftest import BLAS, summarize
from krserve_worker import protocol

EOS = 2  # <|im_end|> in the tiny model
NO_EOS = {EOS: -1e9}  # logit_bias that suppresses EOS: exact lengths


def ref_greedy(ref, prompt, max_tokens, logit_bias=None):
    """In-process greedy reference with mlx_lm.stream_generate."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_logits_processors

    model, tok = ref
    lp = make_logits_processors(logit_bias=logit_bias) if logit_bias else None
    ids, text, reason, n = [], "", None, 0
    for r in stream_generate(model, tok, prompt, max_tokens=max_tokens, logits_processors=lp):
        text += r.text
        n = r.generation_tokens
        reason = r.finish_reason
        if not (r.finish_reason == "stop" and r.token in tok.eos_token_ids):
            ids.append(r.token)
    return {"ids": ids, "text": text, "reason": reason, "ctoks": n}


def gen(rid, prompt, max_tokens, **kw):
    m = {"t": "gen", "id": rid, "prompt": list(prompt), "max_tokens": max_tokens}
    m.update(kw)
    return m


def run(worker, rid, prompt, max_tokens, **kw):
    worker.send(gen(rid, prompt, max_tokens, **kw))
    return summarize(worker.collect(rid))


@pytest.fixture(scope="module")
def prompts(ref):
    _, tok = ref
    texts = ["The quick brown fox", "Hello world!", "Once upon a time there was"]
    ps = [tok.encode(t, add_special_tokens=False) for t in texts]
    ps.append(tok.apply_chat_template([{"role": "user", "content": "Tell me a story."}],
                                      add_generation_prompt=True))
    ps.append([5, 6, 7])
    return ps


# -- hello ---------------------------------------------------------------------


def test_hello(worker, tiny_model):
    import mlx.core as mx
    import mlx_lm

    h = worker.hello_msg
    assert h["v"] == protocol.VERSION == 4
    assert h["pid"] == worker.proc.pid
    assert h["model"] == tiny_model
    assert h["ctx"] == 2048
    assert h["vocab"] == 512
    assert h["eos"] == [EOS]
    assert h["caps"] == ["resume", "stop", "penalties", "logit_bias", "seed", "schema", "tools", "prompt_cache"]
    # The default budget: an eighth of physical memory.
    assert h["cache_bytes"] == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 8
    assert h["versions"] == {"krserve_worker": "0.1.0", "mlx": mx.__version__,
                             "mlx_lm": mlx_lm.__version__,
                             "python": platform.python_version(),
                             "blas": "bundled" if not BLAS.startswith("OpenBLAS") else " ".join(BLAS.split()[:2])}


def wait_pong(worker, seq):
    deadline = time.monotonic() + 30
    while True:
        m = worker.next_frame(max(0.1, deadline - time.monotonic()))
        if m["t"] == "pong" and m.get("seq") == seq:
            return m


def test_ping(worker):
    worker.send({"t": "ping", "seq": 77})
    m = wait_pong(worker, 77)
    assert m.get("active", 0) == 0
    assert m["rss"] > 10 << 20
    assert m.get("mem_peak", 0) >= m.get("mem_active", 0) >= 0


# -- greedy generation ---------------------------------------------------------


def test_greedy_one_at_a_time_matches_stream_generate(worker, ref, prompts, new_id):
    reasons = set()
    for p in prompts:
        want = ref_greedy(ref, p, 24)
        got = run(worker, new_id(), p, 24)
        done = got["last"]
        assert done["t"] == "done", done
        assert got["ids"] == want["ids"]
        assert got["text"] == want["text"]
        assert done["reason"] == want["reason"]
        assert done["ctoks"] == want["ctoks"]
        assert done["ptoks"] == len(p)
        reasons.add(done["reason"])
    # The random model hits EOS on some prompts: both endings are covered.
    assert reasons == {"stop", "length"}


def test_exact_length_with_logit_bias(worker, ref, prompts, new_id):
    p = prompts[3]
    want = ref_greedy(ref, p, 40, logit_bias=NO_EOS)
    got = run(worker, new_id(), p, 40, logit_bias=NO_EOS)
    assert got["ids"] == want["ids"] and len(got["ids"]) == 40
    assert got["text"] == want["text"]
    assert got["last"]["reason"] == "length" and got["last"]["ctoks"] == 40


def test_single_fast_path_then_batch_alongside(worker, ref, prompts, new_id):
    """A request alone takes the generate_step fast path; two that arrive while
    it decodes go to the BatchGenerator, and all three advance together. Each
    output equals its own single-request greedy run."""
    a, b, c = new_id(), new_id(), new_id()
    worker.send(gen(a, prompts[0], 40, logit_bias=NO_EOS))
    first = worker.next_for(a, 60)
    assert first["t"] == "tok"
    worker.send(gen(b, prompts[1], 24, logit_bias=NO_EOS), gen(c, prompts[2], 24, logit_bias=NO_EOS))
    got_a = summarize([first] + worker.collect(a))
    got_b, got_c = summarize(worker.collect(b)), summarize(worker.collect(c))
    err = worker.stderr_text()
    assert f"fast path: id {a}" in err
    assert f"inserted 2 request(s): ids {[b, c]}" in err
    for got, p, n in ((got_a, prompts[0], 40), (got_b, prompts[1], 24), (got_c, prompts[2], 24)):
        want = ref_greedy(ref, p, n, logit_bias=NO_EOS)
        assert got["ids"] == want["ids"] and len(got["ids"]) == n
        assert got["text"] == want["text"]
        assert got["last"]["reason"] == "length" and got["last"]["ctoks"] == n


def test_fast_path_cancel_then_next_request(worker, ref, prompts, new_id):
    a = new_id()
    worker.send(gen(a, prompts[3], 500, logit_bias=NO_EOS))
    assert worker.next_for(a, 60)["t"] == "tok"
    worker.send({"t": "cancel", "id": a})
    frames = worker.collect(a)
    assert frames[-1]["t"] == "done" and frames[-1]["reason"] == "cancelled"
    assert f"fast path: id {a}" in worker.stderr_text()
    b = new_id()
    got = run(worker, b, prompts[4], 16, logit_bias=NO_EOS)
    assert got["ids"] == ref_greedy(ref, prompts[4], 16, logit_bias=NO_EOS)["ids"]


def test_no_single_fast_path_gives_the_same_output(start_worker, ref, prompts):
    w = start_worker(args=("--no-single-fast-path",))
    w.hello()
    w.send(gen(7, prompts[3], 24))
    got = summarize(w.collect(7))
    assert "inserted 1 request(s): ids [7]" in w.stderr_text()
    assert "fast path" not in w.stderr_text()
    want = ref_greedy(ref, prompts[3], 24)
    assert got["ids"] == want["ids"] and got["text"] == want["text"]
    assert got["last"]["reason"] == want["reason"] and got["last"]["ctoks"] == want["ctoks"]


def test_fast_path_only_for_a_short_prefill_whatever_the_step(start_worker, ref):
    """With a GPU's prefill step (2048) a lone request still takes the fast
    path only when at most 512 tokens are left to prefill: a longer one is
    prefilled in the BatchGenerator, whose steps later arrivals join. Both
    match the reference; the CPU's default step is 512."""
    assert "prefill step 512" in start_worker_log(start_worker)
    w = start_worker(args=("--prefill-step", "2048"))
    w.hello()
    short = [(i * 7) % 500 + 3 for i in range(500)]
    long = [(i * 11) % 500 + 3 for i in range(600)]
    for rid, p in ((21, short), (22, long)):
        w.send(gen(rid, p, 8, logit_bias=NO_EOS))
        got = summarize(w.collect(rid))
        want = ref_greedy(ref, p, 8, logit_bias=NO_EOS)
        assert got["ids"] == want["ids"] and got["text"] == want["text"]
    err = w.stderr_text()
    assert "prefill step 2048" in err
    assert "fast path: id 21" in err and "fast path: id 22" not in err
    assert "inserted 1 request(s): ids [22]" in err


def start_worker_log(start_worker) -> str:
    w = start_worker()
    w.hello()
    return w.stderr_text()


def test_four_at_once_match_batch_generate(worker, ref, prompts, new_id):
    from mlx_lm import batch_generate
    from mlx_lm.sample_utils import make_logits_processors

    model, tok = ref
    ps = prompts[:4]
    n = 32
    want = batch_generate(model, tok, ps, max_tokens=n, return_token_ids=True,
                          logits_processors=make_logits_processors(logit_bias=NO_EOS))
    rids = [new_id() for _ in ps]
    worker.send(*[gen(r, p, n, logit_bias=NO_EOS) for r, p in zip(rids, ps)])
    got = [summarize(worker.collect(r)) for r in rids]
    for g, w_ids, w_text in zip(got, want.token_ids, want.texts):
        assert g["ids"] == w_ids and len(g["ids"]) == n
        assert g["text"] == w_text
    # Frames written together are inserted with one BatchGenerator.insert call.
    assert f"inserted 4 request(s): ids {rids}" in worker.stderr_text()
    # On this float32 model, batching does not change greedy numerics: the
    # batched outputs are also token-identical to single-request generation.
    for g, p in zip(got, ps):
        assert g["ids"] == ref_greedy(ref, p, n, logit_bias=NO_EOS)["ids"]


def test_penalties_match_stream_generate(worker, ref, prompts, new_id):
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_logits_processors

    model, tok = ref
    p = prompts[0]
    lp = make_logits_processors(logit_bias=NO_EOS, repetition_penalty=1.3,
                                presence_penalty=0.5, frequency_penalty=0.25)
    want = [r.token for r in stream_generate(model, tok, p, max_tokens=24, logits_processors=lp)]
    got = run(worker, new_id(), p, 24, logit_bias=NO_EOS, repetition_penalty=1.3,
              presence_penalty=0.5, frequency_penalty=0.25)
    assert got["ids"] == want


# -- cancel --------------------------------------------------------------------


def test_cancel_mid_generation(worker, prompts, new_id):
    rid = new_id()
    worker.send(gen(rid, prompts[0], 100000, logit_bias=NO_EOS))
    first = worker.next_for(rid)
    assert first["t"] == "tok"
    worker.send({"t": "cancel", "id": rid})
    frames = [first] + worker.collect(rid)
    done = frames[-1]
    assert done["t"] == "done" and done["reason"] == "cancelled"
    assert done["ctoks"] >= len(summarize(frames)["ids"]) >= 1
    assert done["ctoks"] < 100000
    # Nothing follows: a later request completes and no frame for rid appeared.
    other = new_id()
    worker.send({"t": "cancel", "id": 987654321})  # unknown id: silently ignored
    assert run(worker, other, [5], 2)["last"]["t"] == "done"
    assert worker.by_id[rid].empty()
    assert not worker.by_id.get(987654321) or worker.by_id[987654321].empty()


def test_cancel_during_prefill(worker, new_id):
    rid = new_id()
    long_prompt = [(i * 7) % 500 + 3 for i in range(1800)]  # 4 prefill steps of 512
    worker.send(gen(rid, long_prompt, 50), {"t": "cancel", "id": rid})
    frames = worker.collect(rid)
    assert frames[-1]["t"] == "done" and frames[-1]["reason"] == "cancelled"
    assert all(f["t"] != "tok" for f in frames)
    assert run(worker, new_id(), [5], 2)["last"]["reason"] == "length"
    assert worker.by_id[rid].empty()


# -- stop strings --------------------------------------------------------------


def _spanning_stop(frames):
    """A stop string made of the end of one token's text and the start of the
    next one's, from a first run without stop strings."""
    toks = [f for f in frames if f["t"] == "tok"]
    for i in range(3, len(toks) - 1):
        a, b = toks[i].get("text", ""), toks[i + 1].get("text", "")
        if len(a) >= 2 and len(b) >= 2:
            return a[-2:] + b[:2]
    raise AssertionError("no two consecutive tokens with text")


def test_stop_string_spanning_tokens(worker, prompts, new_id):
    p = prompts[3]
    first = run(worker, new_id(), p, 40, logit_bias=NO_EOS)
    full = first["text"]
    stop = _spanning_stop(first["frames"])
    cut = full.index(stop)
    got = run(worker, new_id(), p, 40, logit_bias=NO_EOS, stop=["never-there", stop])
    done = got["last"]
    assert done["reason"] == "stop"
    assert got["text"] == full[:cut]
    assert stop not in got["text"]
    # Generation stopped at the token that completed the stop string.
    acc, k = "", 0
    for f in first["frames"]:
        if f["t"] == "tok":
            acc += f.get("text", "")
            k += 1
            if stop in acc:
                break
    assert done["ctoks"] == k
    assert got["ids"] == first["ids"][:k]
    # No tok text ever contained any part of the stop string beyond the cut.
    emitted = "".join(f.get("text", "") for f in got["frames"])
    assert emitted == full[:cut]


def test_stop_prefix_held_then_released(worker, prompts, new_id):
    p = prompts[3]
    first = run(worker, new_id(), p, 30, logit_bias=NO_EOS)
    toks = [f for f in first["frames"] if f["t"] == "tok" and f.get("text")]
    a = toks[5]["text"]
    stop = a[-1] + "\x00never"  # its first char appears, the rest never does
    got = run(worker, new_id(), p, 30, logit_bias=NO_EOS, stop=[stop])
    assert got["last"]["reason"] == "length"
    assert got["text"] == first["text"]
    assert got["ids"] == first["ids"]


def test_earliest_stop_string_wins(worker, prompts, new_id):
    p = prompts[3]
    first = run(worker, new_id(), p, 30, logit_bias=NO_EOS)
    full = first["text"]
    early, late = full[8:11], full[20:24]
    got = run(worker, new_id(), p, 30, logit_bias=NO_EOS, stop=[late, early])
    assert got["text"] == full[: min(full.index(early), full.index(late))]
    assert got["last"]["reason"] == "stop"


# -- resume --------------------------------------------------------------------


def _sent_after(frames, k):
    """(resume ids, bytes of text delivered) after the first k tok events."""
    toks = [f for f in frames if f["t"] == "tok"]
    ids = [i for f in toks[:k] for i in f["ids"]]
    text = "".join(f.get("text", "") for f in toks[:k])
    return ids, text


@pytest.mark.parametrize("k", [1, 7, 19])
def test_resume_equals_uninterrupted(worker, prompts, new_id, k):
    p, n = prompts[2], 24
    full = run(worker, new_id(), p, n, logit_bias=NO_EOS)
    assert len(full["ids"]) == n
    resume, delivered = _sent_after(full["frames"], k)
    rest = run(worker, new_id(), p, n - k, logit_bias=NO_EOS, resume=resume,
               sent=len(delivered.encode("utf-8")))
    assert resume + rest["ids"] == full["ids"]
    assert delivered + rest["text"] == full["text"]
    assert rest["last"]["reason"] == "length"
    assert rest["last"]["ctoks"] == n - k
    assert rest["last"]["ptoks"] == len(p) + k


def test_resume_with_stop_string_across_the_boundary(worker, prompts, new_id):
    p = prompts[3]
    first = run(worker, new_id(), p, 40, logit_bias=NO_EOS)
    stop = _spanning_stop(first["frames"])
    stopped = run(worker, new_id(), p, 40, logit_bias=NO_EOS, stop=[stop])
    toks = [f for f in stopped["frames"] if f["t"] == "tok"]
    # Crash right after the token that starts the stop string: its text was held.
    k = len(toks) - 1
    resume, delivered = _sent_after(stopped["frames"], k)
    rest = run(worker, new_id(), p, 40 - k, logit_bias=NO_EOS, stop=[stop], resume=resume,
               sent=len(delivered.encode("utf-8")))
    assert delivered + rest["text"] == stopped["text"]
    assert rest["last"]["reason"] == "stop"
    assert resume + rest["ids"] == stopped["ids"]


@pytest.mark.parametrize("hold", ["stop-prefix", "none"])
def test_resume_with_no_token_left_flushes_held_back_text(worker, prompts, new_id, hold):
    """A worker that died after streaming the last token but before done held
    back text (here the start of a stop string). The supervisor resumes the
    request with max_tokens 0: the new worker generates nothing and flushes
    that text over the delivered ids."""
    p, n = prompts[0], 12
    full = run(worker, new_id(), p, n, logit_bias=NO_EOS)
    kw = {}
    if hold == "stop-prefix":
        kw["stop"] = [full["text"][-1] + "\x00never"]  # the last char is held until done
    held = run(worker, new_id(), p, n, logit_bias=NO_EOS, **kw)
    toks = [f for f in held["frames"] if f["t"] == "tok"]
    resume, delivered = _sent_after(held["frames"], len(toks))
    assert resume == full["ids"]
    if hold == "stop-prefix":
        assert delivered == full["text"][:-1], "the test needs text held back until done"
    rest = run(worker, new_id(), p, 0, logit_bias=NO_EOS, resume=resume,
               sent=len(delivered.encode("utf-8")), **kw)
    assert rest["ids"] == []
    assert delivered + rest["text"] == full["text"]
    assert rest["last"]["reason"] == "length"
    assert rest["last"].get("ctoks", 0) == 0  # zero is omitted on the wire


def test_max_tokens_zero_without_resume_is_invalid(worker, new_id):
    rid = new_id()
    worker.send(gen(rid, [5, 6], 0))
    frames = worker.collect(rid)
    assert frames[-1]["t"] == "error" and frames[-1]["code"] == "invalid"
    assert "max_tokens" in frames[-1]["msg"]


def test_resume_sent_beyond_text_is_invalid(worker, new_id):
    rid = new_id()
    worker.send(gen(rid, [5, 6], 4, resume=[7], sent=10000))
    frames = worker.collect(rid)
    assert frames[-1]["t"] == "error" and frames[-1]["code"] == "invalid"


# -- seeds ---------------------------------------------------------------------


def test_seeded_sampling_is_reproducible(worker, prompts, new_id):
    p, n = prompts[0], 24
    kw = dict(temperature=1.5, top_p=0.95, top_k=100, min_p=0.01, seed=1234, has_seed=True,
              logit_bias=NO_EOS)
    a = run(worker, new_id(), p, n, **kw)
    b = run(worker, new_id(), p, n, **kw)
    assert a["ids"] == b["ids"] and a["text"] == b["text"]
    c = run(worker, new_id(), p, n, **{**kw, "seed": 4321})
    assert c["ids"] != a["ids"]
    # Also when batched with other (unseeded, sampling) requests.
    rids = [new_id() for _ in range(4)]
    worker.send(gen(rids[0], p, n, **kw),
                *[gen(r, prompts[1], n, temperature=1.0, logit_bias=NO_EOS) for r in rids[1:]])
    got = [summarize(worker.collect(r)) for r in rids]
    assert got[0]["ids"] == a["ids"]
    # And across a resume: draw i uses key(seed, i) whatever worker runs it.
    k = 9
    resume, delivered = _sent_after(a["frames"], k)
    rest = run(worker, new_id(), p, n - k, resume=resume,
               sent=len(delivered.encode("utf-8")), **kw)
    assert resume + rest["ids"] == a["ids"]
    assert delivered + rest["text"] == a["text"]


# -- prompts the worker tokenizes ------------------------------------------------


def run_msg(worker, m):
    worker.send(m)
    return summarize(worker.collect(m["id"]))


@pytest.mark.parametrize("special", [False, True])
def test_gen_text_is_tokenized_like_encode(worker, ref, new_id, special):
    _, tok = ref
    text = "héllo wörld 🙂 The capital of France is"
    ids = tok.encode(text, add_special_tokens=special)
    want = run(worker, new_id(), ids, 12, logit_bias=NO_EOS)
    got = run_msg(worker, {"t": "gen", "id": new_id(), "text": text, "special": special,
                           "max_tokens": 12, "logit_bias": NO_EOS})
    assert got["ids"] == want["ids"] and got["text"] == want["text"] and len(got["ids"]) == 12
    assert got["last"]["ptoks"] == len(ids)


def test_gen_chat_applies_the_template(worker, ref, new_id):
    _, tok = ref
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the capital of France?"}]
    ids = list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    want = ref_greedy(ref, ids, 16)
    got = run_msg(worker, {"t": "gen", "id": new_id(), "messages": msgs, "max_tokens": 16})
    assert got["ids"] == want["ids"] and got["text"] == want["text"]
    assert got["last"]["reason"] == want["reason"] and got["last"]["ptoks"] == len(ids)


def test_gen_chat_resumes(worker, ref, new_id):
    """A resumed chat request carries its messages again; the new worker
    tokenizes them to the same ids and continues the same output."""
    _, tok = ref
    msgs = [{"role": "user", "content": "Tell me a story."}]
    ids = list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))
    want = ref_greedy(ref, ids, 20, logit_bias=NO_EOS)
    k = 7
    got = run_msg(worker, {"t": "gen", "id": new_id(), "messages": msgs, "max_tokens": 20 - k,
                           "resume": want["ids"][:k], "logit_bias": NO_EOS})
    assert want["ids"][:k] + got["ids"] == want["ids"]
    assert got["last"]["ptoks"] == len(ids) + k


def test_gen_text_during_generation(worker, prompts, new_id):
    """A text gen that arrives while another request decodes is tokenized on
    the reader thread and joins the batch; pings are still answered."""
    rid, tid = new_id(), new_id()
    worker.send(gen(rid, prompts[0], 100000, logit_bias=NO_EOS))
    assert worker.next_for(rid)["t"] == "tok"
    worker.send({"t": "gen", "id": tid, "text": "hello", "max_tokens": 3, "logit_bias": NO_EOS})
    assert summarize(worker.collect(tid))["last"]["ctoks"] == 3
    worker.send({"t": "ping", "seq": 5})
    pong = wait_pong(worker, 5)
    assert pong["active"] == 1 and pong["mem_active"] > 0
    worker.send({"t": "cancel", "id": rid})
    assert worker.collect(rid)[-1]["reason"] == "cancelled"


@pytest.mark.parametrize(
    "fields, code, msg",
    [
        # Context 2048: a prompt must leave room for one token.
        ({"text": "a" * 2048}, "context_length_exceeded",
         "This model's maximum context length is 2048 tokens. However, your prompt has 2048 tokens."),
        ({"prompt": [3] * 2049}, "context_length_exceeded", "However, your prompt has 2049 tokens."),
        ({"text": ""}, "invalid_prompt", "the prompt is empty after tokenization"),
        ({"prompt": []}, "invalid_prompt", "the prompt is empty after tokenization"),
        ({"text": "hi", "prompt": [5]}, "invalid", "not both"),
        ({"messages": [{"role": "user", "content": 5}]}, "invalid", "must be strings"),
    ],
)
def test_prompt_refusals(worker, new_id, fields, code, msg):
    rid = new_id()
    m = {"t": "gen", "id": rid, "max_tokens": 4}
    m.update(fields)
    worker.send(m)
    (f,) = worker.collect(rid)
    assert f["t"] == "error" and f["code"] == code and msg in f["msg"], f


def test_max_tokens_cut_to_the_context(worker, new_id):
    """max_tokens is cut to what the context leaves; a resume that fills the
    context completes at once."""
    got = run_msg(worker, {"t": "gen", "id": new_id(), "prompt": [3] * 2045, "max_tokens": 10,
                           "logit_bias": NO_EOS})
    assert len(got["ids"]) == 3 and got["last"]["reason"] == "length"
    got = run_msg(worker, {"t": "gen", "id": new_id(), "prompt": [3] * 2040, "max_tokens": 10,
                           "resume": [5] * 8, "sent": 0, "logit_bias": NO_EOS})
    assert got["ids"] == [] and got["last"]["reason"] == "length" and got["last"]["ptoks"] == 2048


# -- invalid requests ----------------------------------------------------------


@pytest.mark.parametrize(
    "fields, msg",
    [
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": -3}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"prompt": [1, 512]}, "prompt"),
        ({"prompt": [1, -1]}, "prompt"),
        ({"resume": [600]}, "resume"),
        ({"logit_bias": {9999: 1.0}}, "logit_bias"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"stop": [""]}, "stop"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_invalid_params(worker, new_id, fields, msg):
    rid = new_id()
    m = gen(rid, [5, 6], 4)
    m.update(fields)
    worker.send(m)
    frames = worker.collect(rid)
    assert len(frames) == 1
    assert frames[0]["t"] == "error" and frames[0]["code"] == "invalid"
    assert msg in frames[0]["msg"]


# -- process lifecycle -----------------------------------------------------------


def test_missing_model_dir_is_fatal(start_worker, tmp_path):
    w = start_worker(str(tmp_path / "no-such-model"))
    m = w.next_frame(60)
    assert m["t"] == "error" and "id" not in m and m["code"] == "internal"
    assert "does not exist" in m["msg"]
    assert w.wait(60) == 2
    assert w.stream_error is None


def test_stdin_eof_mid_generation_exits_0(start_worker, prompts):
    w = start_worker()
    w.hello()
    w.send(gen(1, prompts[0], 100000, logit_bias=NO_EOS))
    assert w.next_for(1)["t"] == "tok"
    t0 = time.monotonic()
    w.close_stdin()
    assert w.wait(30) == 0
    assert time.monotonic() - t0 < 10
    assert w.stream_error is None


def test_shutdown_mid_generation_exits_0(start_worker, prompts):
    w = start_worker()
    w.hello()
    w.send(gen(1, prompts[0], 100000, logit_bias=NO_EOS))
    assert w.next_for(1)["t"] == "tok"
    t0 = time.monotonic()
    w.send({"t": "shutdown"})
    assert w.wait(30) == 0
    assert time.monotonic() - t0 < 10
    assert w.stream_error is None
    assert all(f["t"] == "tok" for f in w.all[1:])  # no done after shutdown


def test_malformed_frame_exits_3(start_worker):
    w = start_worker()
    w.hello()
    w.send({"t": "ping", "seq": 1})
    assert w.next_frame()["t"] == "pong"
    w.send(b"\x00\x00\x00\x03abc")  # a body that is not a msgpack map
    assert w.wait(30) == 3
    assert "not a msgpack map" in w.stderr_text()


# -- logprobs --------------------------------------------------------------------


def test_logprobs_match_in_process_logits(worker, ref, prompts, new_id):
    import mlx.core as mx

    model, tok = ref
    for p in prompts[:3]:
        rid = new_id()
        frames = [f for f in run(worker, rid, p, 8, logprobs=True, top_logprobs=3,
                                 logit_bias=NO_EOS)["frames"] if f["t"] == "tok"]
        ids = [i for f in frames for i in f["ids"]]
        assert len(ids) == 8
        lps = [x for f in frames for x in f["lps"]]
        toks = [x for f in frames for x in f["toks"]]
        top_lps = [x for f in frames for x in f["top_lps"]]
        top_toks = [x for f in frames for x in f["top_toks"]]
        assert len(lps) == len(toks) == len(top_lps) == len(top_toks) == len(ids)
        # Reference: the model's own log-softmax over the whole sequence.
        seq = list(p) + ids
        logits = model(mx.array(seq)[None])[0].astype(mx.float32)
        ref_lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        for j, t in enumerate(ids):
            row = ref_lp[len(p) - 1 + j]
            assert lps[j] == pytest.approx(row[t].item(), abs=2e-2)
            assert int(mx.argmax(row).item()) == t  # greedy
            # Greedy: the chosen token is the best alternative.
            assert len(top_lps[j]) == 3 and top_toks[j][0] == toks[j]
            assert top_lps[j][0] == lps[j]
            assert top_lps[j] == sorted(top_lps[j], reverse=True)
            assert toks[j] == tok.decode([t])


def test_no_logprobs_unless_asked(worker, prompts, new_id):
    frames = run(worker, new_id(), prompts[0], 4)["frames"]
    assert not any(k in f for f in frames for k in ("lps", "toks", "top_lps", "top_toks"))
    frames = run(worker, new_id(), prompts[0], 4, logprobs=True)["frames"]
    toks = [f for f in frames if f["t"] == "tok"]
    assert toks and all(len(f["lps"]) == len(f["ids"]) and "top_lps" not in f for f in toks)
