"""Grammar masks of a whole decode step (krserve_worker.batchmask and
grammar.BatchMasker) against the per-row path they replace: mlx-lm's own
BatchGenerator calling each row's GrammarProcessor.

On the tiny random model (scripts/make_tiny_model.py) with its byte-level BPE
tokenizer, so llguidance runs on a real tokenizer and every step is cheap."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlx_lm.generate import BatchGenerator

from krserve_worker import batchgen, batchmask, grammar
from krserve_worker.sampling import SeededSampler

OBJ = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                        "n": {"type": "integer"}},
       "required": ["name", "n"], "additionalProperties": False}
LIST = {"type": "array", "items": {"type": "integer"}, "maxItems": 40}
LARK = "start: obj+\nobj: %json " + json.dumps(OBJ)  # never completes: masks every step


@pytest.fixture(scope="module")
def grammars(ref):
    model, tok = ref
    return grammar.Grammars(tok._tokenizer, model.args.vocab_size, tok.eos_token_ids)


def test_mlx_lm_is_the_one_the_step_was_written_against():
    """MaskingGenerationBatch._step is mlx-lm 0.32.2's with another processor
    block. A different mlx-lm turns the batched path off in the worker (it
    falls back to mlx-lm's per-row loop); here it fails, so the copy gets
    compared with the new mlx-lm and GENERATION_BATCH_SHA256 updated."""
    assert batchmask.unsupported() == "", batchmask.unsupported()


def _matchers(grammars, kinds):
    out = []
    for kind in kinds:
        if kind == "obj":
            out.append(grammars.schema_matcher(json.dumps(OBJ)))
        elif kind == "list":
            out.append(grammars.schema_matcher(json.dumps(LIST)))
        elif kind == "lark":
            out.append(grammars.lark_matcher(LARK, "test"))
        else:
            out.append(None)
    return out


@pytest.mark.parametrize("extra", [0, 20])  # logits as wide as the tokenizer, and wider
def test_masker_equals_per_row_processors(ref, grammars, extra):
    """A mixed batch stepped by hand: constrained rows (three grammars, joined
    at different steps) and free rows; rows leave and join between steps; one
    row is fed a token its grammar refuses; then come steps with every row
    constrained and steps with one constrained row among free ones. At every step the BatchMasker's
    logits equal, bit for bit, those of each row's GrammarProcessor called as
    mlx-lm's loop calls it, and both leave the processors in the same state."""
    import mlx.core as mx

    n_vocab = grammars.n_vocab
    width = n_vocab + extra
    eos = grammars.eos[0]
    masker = grammar.BatchMasker(n_vocab)
    rng = np.random.default_rng(extra)

    kinds = ["obj", None, "lark", "list", None, "obj"]
    # Each row: (kind, processor for the batched path, processor for the
    # per-row path, context tokens): the two processors have twin matchers.
    rows = [(k, *(grammar.GrammarProcessor(m, n_vocab) if m else None for m in pair), [1, 5, 9])
            for k, pair in zip(kinds, zip(_matchers(grammars, kinds), _matchers(grammars, kinds)))]
    constrained_seen = full_steps = single_steps = 0
    refused = None
    for step in range(24):
        if step == 6:
            rows = [r for i, r in enumerate(rows) if i not in (1, 3)]  # two rows finish
        if step == 9:  # two join mid-decode: a fresh matcher (first call) and a free row
            for k in ("lark", None):
                a, b = _matchers(grammars, [k])[0], _matchers(grammars, [k])[0]
                rows.append((k, grammar.GrammarProcessor(a, n_vocab) if a else None,
                             grammar.GrammarProcessor(b, n_vocab) if b else None, [2, 3]))
        if step == 18:  # the free and failed rows leave: every row constrained
            rows = [r for r in rows if r[1] is not None and not r[1].error]
        if step == 21:  # one constrained row among free ones
            rows = rows[:1] + [(None, None, None, [4, 4]), (None, None, None, [6])]
        logits = mx.array(rng.standard_normal((len(rows), width)).astype(np.float32) * 4)
        inputs = mx.array([r[3][-1] for r in rows], dtype=mx.uint32)
        want = []
        for e, (_, _, ref_proc, ctx) in enumerate(rows):
            row = logits[e:e + 1]
            want.append(ref_proc(mx.array(ctx), row) if ref_proc else row)
        want = np.array(mx.concatenate(want, axis=0))
        grows = [e for e, r in enumerate(rows) if r[1] is not None]
        got = np.array(masker(logits, inputs, grows, [rows[e][1] for e in grows]))
        np.testing.assert_array_equal(got, want)
        for _, p, q, _ in rows:
            if p is not None:  # (llguidance's error text ends with timings)
                assert (p.calls, p.error.split("\n")[0]) == (q.calls, q.error.split("\n")[0])
        constrained_seen = max(constrained_seen, len(grows))
        full_steps += all(r[1] is not None and not r[1].error for r in rows)
        single_steps += len(rows) > 1 and sum(r[1] is not None and not r[1].error for r in rows) == 1
        # Next tokens: each row's best allowed token; at step 12 row 0 gets a
        # token its grammar refuses instead (both paths must flag it, not mask it).
        for e, r in enumerate(rows):
            allowed = np.flatnonzero(np.isfinite(got[e]))
            assert allowed.size, (step, e)
            token = int(allowed[np.argmax(got[e][allowed])])
            if step == 12 and e == 0:
                assert not r[1].error
                token = int(np.flatnonzero(~np.isfinite(got[e][:n_vocab]))[0])
                refused = r[1]
            if token == eos:
                token = 7  # keep going past a finished grammar: refused too
            r[3].append(token)
    assert refused.error.startswith("grammar refused token")
    assert constrained_seen >= 3 and full_steps >= 3 and single_steps >= 3


def _run(gen_factory, ref, grammars, schedule, n_steps):
    """Decode with a generator made by ``gen_factory``, inserting and
    removing as ``schedule`` says at each step; returns every step's
    responses as (uid, token, logprobs, finish_reason), and the processors."""
    import mlx.core as mx
    from mlx_lm.sample_utils import make_logits_processors

    model, tok = ref
    gen = gen_factory(model)
    procs = {}
    uids = {}
    out = []
    for step in range(n_steps):
        for name, spec in schedule.get(step, []):
            if spec == "remove":
                gen.remove([uids[name]])
                continue
            kind, max_tokens, extra, seed = spec
            ps = make_logits_processors(**extra) if extra else []
            if kind:
                g = grammar.GrammarProcessor(_matchers(grammars, [kind])[0], grammars.n_vocab)
                ps = list(ps) + [g]
                procs[name] = g
            prompt = tok.encode(f"request {name}: write JSON", add_special_tokens=False)
            sampler = SeededSampler(0.8, 1.0, 0.0, 0, grammars.n_vocab, seed) if seed is not None else None
            (uid,) = gen.insert([prompt], max_tokens=[max_tokens], logits_processors=[ps],
                                samplers=[sampler])
            uids[name] = uid
        _, responses = gen.next()
        out.append([(r.uid, r.token, np.array(r.logprobs.astype(mx.float32)), r.finish_reason)
                    for r in responses])
    return gen, out, procs


def test_mixed_batch_same_as_per_row(ref, grammars):
    """The same mixed batch decoded by mlx-lm's BatchGenerator (processors per
    row) and by the worker's generator (grammar masks batched): constrained
    and free rows, other processors before the grammar (repetition penalty,
    logit bias), a seeded sampler, rows joining mid-decode, finishing at
    max_tokens and cancelled. Every step's tokens, logprobs (from the
    processed logits) and finish reasons are identical."""
    calls = []

    class Counting(grammar.BatchMasker):
        def __call__(self, logits, inputs, rows, procs):
            calls.append(len(rows))
            return super().__call__(logits, inputs, rows, procs)

    masker = Counting(grammars.n_vocab)
    schedule = {
        0: [("a", ("obj", 30, None, None)), ("b", (None, 40, None, None)),
            ("c", ("lark", 40, {"repetition_penalty": 1.3}, None)),
            ("d", (None, 40, {"logit_bias": {5: 3.0, 9: -2.0}}, None)),
            ("e", ("list", 12, None, None))],
        4: [("f", ("lark", 30, None, 7)), ("g", (None, 25, None, None))],
        9: [("b", "remove")],
        11: [("h", ("obj", 20, {"logit_bias": {3: 1.5}}, None))],
        15: [("c", "remove")],
    }
    per_row, want, want_procs = _run(
        lambda m: BatchGenerator(m, stop_tokens=[[e] for e in grammars.eos]),
        ref, grammars, schedule, 40)
    batched, got, got_procs = _run(
        lambda m: batchgen.Generator(m, masker, first_tokens_first=False,
                                    stop_tokens=[[e] for e in grammars.eos]),
        ref, grammars, schedule, 40)
    assert type(per_row) is BatchGenerator
    assert type(batched._generation_batch) is batchmask.MaskingGenerationBatch  # still ours after joins
    assert len(got) == len(want)
    for step, (w, g) in enumerate(zip(want, got)):
        assert [(u, t, f) for u, t, _, f in g] == [(u, t, f) for u, t, _, f in w], step
        for (_, _, lw, _), (_, _, lg, _) in zip(w, g):
            np.testing.assert_array_equal(lg, lw)
    assert sum(len(s) for s in got) > 150
    assert calls and max(calls) >= 4  # the batched path ran, with several constrained rows at once
    for name, p in want_procs.items():
        q = got_procs[name]
        assert q.calls == p.calls, name
        assert not p.error, (name, p.error)
