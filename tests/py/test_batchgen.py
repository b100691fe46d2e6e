"""The worker's batch generator (krserve_worker.batchgen) against mlx-lm's
BatchGenerator: first tokens come out before another prompt's next prefill
step, the tokens are the same, and a stream of arrivals cannot starve a
long prefill. On the tiny random model (scripts/make_tiny_model.py), greedy."""

from __future__ import annotations

import pytest
from mlx_lm.generate import BatchGenerator

from krserve_worker import batchgen

STEP = 16  # prefill step: B's 64 prompt tokens take four steps


def ALWAYS(*_):  # send first tokens first whenever it can (the policy aside)
    return True


def test_mlx_lm_is_the_one_next_was_written_against():
    """Generator._next is mlx-lm 0.32.2's with one early return. A different
    mlx-lm turns it off in the worker (mlx-lm's own _next runs); here it
    fails, so the copy gets compared with the new mlx-lm and NEXT_SHA256
    updated."""
    assert batchgen.next_unsupported() == "", batchgen.next_unsupported()


def _prompts(tok):
    a = tok.encode("a short question", add_special_tokens=False)[:8]
    b = (tok.encode("a long conversation with many earlier turns " * 8, add_special_tokens=False))[:64]
    assert len(a) == 8 and len(b) == 64
    return a, b


def _events(gen, prompts, max_tokens=6, n_calls=40):
    """Insert the prompts together, call next() until every sequence ended;
    per call: the uids whose prefill advanced (prompt responses that are not
    the move to decoding) and the (uid, token) pairs generated."""
    uids = gen.insert(prompts, max_tokens=[max_tokens] * len(prompts))
    calls, done = [], set()
    for _ in range(n_calls):
        prompt_responses, responses = gen.next()
        calls.append(([r.uid for r in prompt_responses if not r.end_of_prompt],
                      [(r.uid, int(r.token)) for r in responses]))
        done |= {r.uid for r in responses if r.finish_reason is not None}
        if done == set(uids):
            break
    assert done == set(uids), "did not finish"
    return uids, calls


def _first_token_call(calls, uid):
    return next(i for i, (_, toks) in enumerate(calls) if any(u == uid for u, _ in toks))


def _prefill_steps_until(calls, uid, end):
    """B's prefill steps in the calls up to and including call ``end``: a
    call returns its tokens when it ends, after its prefill step."""
    return sum(uid in prefilled for prefilled, _ in calls[:end + 1])


def _tokens(calls, uid):
    return [t for _, toks in calls for u, t in toks if u == uid]


def test_first_token_before_the_next_prefill_step(ref):
    """A (8 tokens) and B (64 tokens, four steps of 16) are inserted together
    and prefilled together in the first call. mlx-lm's generator moves A to
    decoding in the second call and runs B's second prefill step in the same
    call; the third call's decode step makes A's first token and its prefill
    step B's third, and the call returns both: A's first token comes out
    after three of B's steps. The worker's returns before the second call's
    prefill step and the third call returns after its decode step: A's first
    token comes out after one. The tokens of both are the same either way."""
    model, tok = ref
    a, b = _prompts(tok)
    kw = dict(stop_tokens=[], prefill_step_size=STEP, prefill_batch_size=8, completion_batch_size=8)

    (ua, ub), theirs = _events(BatchGenerator(model, **kw), [a, b])
    (va, vb), ours = _events(batchgen.Generator(model, worth=ALWAYS, **kw), [a, b])

    assert _prefill_steps_until(theirs, ub, _first_token_call(theirs, ua)) == 3
    assert _prefill_steps_until(ours, vb, _first_token_call(ours, va)) == 1
    assert _prefill_steps_until(ours, vb, len(ours)) == _prefill_steps_until(theirs, ub, len(theirs)) == 4
    assert _tokens(ours, va) == _tokens(theirs, ua) and len(_tokens(ours, va)) == 6
    assert _tokens(ours, vb) == _tokens(theirs, ub) and len(_tokens(ours, vb)) == 6


def test_off_is_mlx_lm(ref):
    """first_tokens_first=False is mlx-lm's _next: the same calls, event for event."""
    model, tok = ref
    a, b = _prompts(tok)
    kw = dict(stop_tokens=[], prefill_step_size=STEP, prefill_batch_size=8, completion_batch_size=8)
    _, theirs = _events(BatchGenerator(model, **kw), [a, b])
    _, ours = _events(batchgen.Generator(model, first_tokens_first=False, **kw), [a, b])
    assert ours == theirs


def test_arrivals_do_not_starve_a_long_prefill(ref):
    """A one-token prompt inserted before every call moves to decoding in
    that call, so every call could hold B's prefill back; after a call that
    held it back and one that sent first tokens comes one that prefills, so
    B's four steps take at most twelve calls."""
    model, tok = ref
    _, b = _prompts(tok)
    gen = batchgen.Generator(model, worth=ALWAYS, stop_tokens=[], prefill_step_size=STEP,
                             prefill_batch_size=32, completion_batch_size=32)
    (ub,) = gen.insert([b], max_tokens=[2])
    steps, calls = 0, 0
    while steps < 4:
        gen.insert([[5]], max_tokens=[1])
        prompt_responses, _ = gen.next()
        calls += 1
        steps += sum(r.uid == ub and not r.end_of_prompt for r in prompt_responses)
        assert calls <= 12, f"B took {calls} calls for {steps} of its 4 prefill steps"
    assert calls >= 9  # calls were held back: the arrivals' first tokens went first


def test_worker_generator_has_both(ref):
    """What the worker builds: first tokens first, and without llguidance's
    masker mlx-lm's own decode batch."""
    model, _ = ref
    gen, note = batchgen.generator(model, None, stop_tokens=[])
    assert isinstance(gen, batchgen.Generator) and gen.first_tokens_first
    assert "first tokens before the next prefill: yes" in note
    assert "per row (no llguidance)" in note


@pytest.mark.parametrize("moved, waiting, next_tokens, per_token, decode, want", [
    # The H200 trace: 8 moved, 7 waiting for a ~6,000-token step at ~7k tokens/s,
    # decode steps ~25 ms: sending first saves far more than it costs.
    (8, 7, 6000, 1 / 7000, 0.025, True),
    # One ahead, 15 waiting for ~12,000 tokens: 1.5 s sooner for one, 50 ms for 15.
    (1, 15, 12000, 1 / 8000, 0.025, True),
    # The CPU with short prompts: a 35-token step is shorter than two decode steps.
    (1, 1, 35, 0.001, 0.08, False),
    (4, 4, 35 * 4, 0.001, 0.08, False),
    # Nothing measured yet: as mlx-lm.
    (8, 7, 6000, None, 0.025, False),
    (8, 7, 6000, 1 / 7000, None, False),
    (0, 7, 6000, 1 / 7000, 0.025, False),
])
def test_worth_sending_first(moved, waiting, next_tokens, per_token, decode, want):
    assert batchgen.worth_sending_first(moved, waiting, next_tokens, per_token, decode) is want


def test_estimates_follow_the_steps(ref):
    """The generator measures its steps (seconds per prefill token, per decode
    step), and with nothing measured yet its first split is mlx-lm's."""
    model, tok = ref
    a, b = _prompts(tok)
    kw = dict(stop_tokens=[], prefill_step_size=STEP, prefill_batch_size=8, completion_batch_size=8)
    _, theirs = _events(BatchGenerator(model, **kw), [a, b])
    gen = batchgen.Generator(model, **kw)
    assert gen.prefill_s_per_token is None and gen.decode_s is None
    _, ours = _events(gen, [a, b])
    assert ours[:2] == theirs[:2]  # the first split (call 2): no decode step measured yet
    assert gen.prefill_s_per_token > 0 and gen.decode_s > 0


def test_a_follower_decides_with_rank_0s_estimates(ref):
    """A group's ranks must make the same calls (their collectives pair up):
    a generator that does not measure and is given rank 0's estimates before
    each call decides exactly as rank 0, whatever its own clock says."""
    model, tok = ref
    a, b = _prompts(tok)
    kw = dict(stop_tokens=[], prefill_step_size=STEP, prefill_batch_size=8, completion_batch_size=8)
    asked = {"leader": [], "follower": []}

    def worth(who):
        def w(*args):
            asked[who].append(args)
            return batchgen.worth_sending_first(*args)
        return w

    leader = batchgen.Generator(model, worth=worth("leader"), **kw)
    follower = batchgen.Generator(model, worth=worth("follower"), **kw)
    follower.measures = False
    # Estimates that make sending first pay, as on a GPU with long prompts.
    leader.estimates = (1.0, 1e-6)
    ua = leader.insert([a, b], max_tokens=[6, 6])
    ub = follower.insert([a, b], max_tokens=[6, 6])
    assert ua == ub
    for _ in range(40):
        follower.estimates = leader.estimates  # what ranks.Group.share carries
        (lp, lg), (fp, fg) = leader.next(), follower.next()
        assert [(r.uid, r.end_of_prompt) for r in lp] == [(r.uid, r.end_of_prompt) for r in fp]
        assert [(r.uid, int(r.token)) for r in lg] == [(r.uid, int(r.token)) for r in fg]
        if not lg and not leader._generation_batch and not leader._currently_processing and not leader._unprocessed_sequences:
            break
    assert asked["leader"] and asked["leader"] == asked["follower"]
    assert leader.estimates != (1.0, 1e-6)  # the leader measured its steps
