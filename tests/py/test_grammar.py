"""Unit tests of krserve_worker.grammar (masks, the logits processor, replay)
and krserve_worker.tools (call grammar, CallStream)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from krserve_worker import grammar, tools
from krserve_worker.params import InvalidRequest

MODEL = Path(os.path.expanduser("~/.cache/krserve/models/SmolLM2-135M-Instruct-Q4_1"))


# -- masks --------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("width,words", [(100, 4), (96, 3), (130, 4), (49152, 1536)])
def test_portable_mask_matches_llguidance_reference(width, words, rows):
    """mask_portable gives what llguidance's numpy reference gives (the
    semantics of its Metal kernel), one bitmask row per logits row, including
    logits wider than the bitmask (padded vocabularies: the extra tokens are
    disallowed)."""
    import mlx.core as mx
    from llguidance.numpy import apply_token_bitmask_inplace

    rng = np.random.default_rng(width)
    bitmask = rng.integers(-2**31, 2**31, size=(rows, words), dtype=np.int64).astype(np.int32)
    logits = rng.standard_normal((rows, width)).astype(np.float32)
    want = logits.copy()
    apply_token_bitmask_inplace(want, bitmask)
    got = np.array(grammar.mask_portable(mx.array(logits), bitmask))
    np.testing.assert_array_equal(got, want)


def test_metal_mask_matches_portable():
    """The Metal kernel and the portable twin give identical masked logits,
    for one row (the per-sequence processor) and for a batch (BatchMasker),
    including logits wider than the bitmask."""
    import mlx.core as mx

    if not (mx.metal.is_available()):
        pytest.skip("no Metal device here: llguidance's Metal kernel cannot run (Linux)")
    rng = np.random.default_rng(0)
    for width, rows in ((100, 1), (49152, 1), (151936, 1), (49152, 32), (130, 7)):
        bitmask = rng.integers(-2**31, 2**31, size=(rows, (width + 31) // 32 - (width == 130)),
                               dtype=np.int64).astype(np.int32)
        logits = mx.array(rng.standard_normal((rows, width)).astype(np.float32))
        with mx.stream(mx.gpu):
            metal = np.array(grammar.mask_metal(logits, bitmask))
        np.testing.assert_array_equal(metal, np.array(grammar.mask_portable(logits, bitmask)))


# -- with the default model's tokenizer ------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    if not MODEL.exists():
        pytest.skip("default model not fetched")
    from mlx_lm.tokenizer_utils import load

    return load(MODEL)


@pytest.fixture(scope="module")
def grammars(tok):
    return grammar.Grammars(tok._tokenizer, 49152, [2])




@pytest.mark.model
def test_processor_masks_then_allows_only_eos(tok, grammars):
    """The processor consumes each sampled token and masks the next step;
    once the grammar is complete only EOS is allowed."""
    import mlx.core as mx

    m = grammars.schema_matcher(json.dumps({"type": "object", "properties": {"a": {"type": "integer"}},
                                            "required": ["a"], "additionalProperties": False}))
    proc = grammar.GrammarProcessor(m, 49152)
    prompt = mx.array(tok.encode("hi", add_special_tokens=False))
    ctx = prompt
    out = []
    for want in tok.encode('{"a":7}', add_special_tokens=False):
        logits = mx.zeros((1, 49152))
        masked = proc(ctx, logits)
        allowed = np.isfinite(np.array(masked[0]))
        assert allowed[want], tok.decode([want])
        assert allowed.sum() < 49152
        out.append(want)
        ctx = mx.concatenate([ctx, mx.array([want])])
    masked = np.array(proc(ctx, mx.zeros((1, 49152)))[0])
    assert list(np.nonzero(np.isfinite(masked))[0]) == [2]
    assert not proc.error


@pytest.mark.model
def test_refused_schema_and_replay(tok, grammars):
    with pytest.raises(InvalidRequest, match="objectx"):
        grammars.schema_matcher('{"type": "objectx"}')
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        grammars.schema_matcher("{")
    m = grammars.schema_matcher('{"type": "object"}')
    grammar.replay(m, tok.encode('{"k":', add_special_tokens=False))
    assert not m.is_error()
    with pytest.raises(InvalidRequest, match="do not match"):
        grammar.replay(grammars.schema_matcher('{"type": "object"}'), tok.encode("hello", add_special_tokens=False))


@pytest.mark.model
def test_named_call_grammar(tok, grammars):
    treq = tools.ToolRequest([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}},
        {"type": "function", "function": {"name": "g"}}], "function", "f", True)
    ok = '<tool_call>\n{"name":"f","arguments":{"x":1}}\n</tool_call>'
    m = tools.call_matcher(grammars, treq)
    ids = tok.encode(ok, add_special_tokens=False)
    assert m.try_consume_tokens(ids) == len(ids) and m.is_accepting()
    wrong = '<tool_call>\n{"name":"g"'
    m = tools.call_matcher(grammars, treq)
    ids = tok.encode(wrong, add_special_tokens=False)
    assert m.try_consume_tokens(ids) < len(ids)


# -- CallStream ------------------------------------------------------------------


def _feed_chunks(cs, text, size):
    content, calls = "", []
    for i in range(0, len(text), size):
        c, k = cs.feed(text[i:i + size])
        content += c
        calls += k
    c, k = cs.feed("", final=True)
    return content + c, calls + k


OUT = ('Let me check.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
       '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>\n')


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_callstream_splits_content_and_calls(size):
    content, calls = _feed_chunks(tools.CallStream(tools.FALLBACK, []), OUT, size)
    assert content == "Let me check."
    assert calls == [{"index": 0, "name": "f", "arguments": '{"x": 1}'},
                     {"index": 1, "name": "g", "arguments": "{}"}]


def test_callstream_keeps_unparsable_and_plain_text():
    bad = "a <tool_call>\nnot json\n</tool_call> b"
    assert _feed_chunks(tools.CallStream(tools.FALLBACK, []), bad, 2) == (bad, [])
    plain = "no calls here <tool and < signs\n"
    assert _feed_chunks(tools.CallStream(tools.FALLBACK, []), plain, 4) == (plain, [])
    # An unterminated call at the end is parsed if it can be.
    assert _feed_chunks(tools.CallStream(tools.FALLBACK, []), '<tool_call>{"name":"f","arguments":{}}', 5) \
        == ("", [{"index": 0, "name": "f", "arguments": "{}"}])


def test_callstream_resume_skips_what_was_delivered():
    """A resumed request replays the whole text: the content bytes and calls
    delivered before the crash are not returned again."""
    cs = tools.CallStream(tools.FALLBACK, [])
    first = OUT[:90]  # the crash: first call delivered, second under way
    c1, k1 = cs.feed(first)
    # As the scheduler counts them: calls begun, bytes of the last one's arguments.
    resumed = tools.CallStream(tools.FALLBACK, [], skip_bytes=len(c1.encode()), skip_calls=len(k1),
                               skip_args=len(k1[-1]["arguments"].encode()))
    c2, k2 = _feed_chunks(resumed, OUT, 5)
    assert (c1 + c2, k1 + k2) == _feed_chunks(tools.CallStream(tools.FALLBACK, []), OUT, 1000)
    assert k1 and k2
