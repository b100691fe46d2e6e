"""Grammar-constrained decoding with llguidance (structured output, tool calls).

Who does what:

- ``Grammars`` (one per loaded model, built at load): the ``LLTokenizer``,
  made once from the model's Hugging Face tokenizer with the *logits* width
  (``n_vocab``: a padded vocabulary is wider than the tokenizer) and every EOS
  id. Building it takes ~0.3-1.5 s.
- The reader thread compiles each request's grammar into an ``LLMatcher``
  (``Grammars.schema_matcher`` / ``Grammars.lark_matcher``; llguidance releases
  the GIL while it compiles). A grammar llguidance refuses raises
  ``InvalidRequest`` with llguidance's message: the request fails with a 400,
  never runs unconstrained. A resume replays the delivered tokens into the
  fresh matcher there too (``replay``).
- The MLX thread applies the masks. ``GrammarProcessor`` is an mlx-lm logits
  processor (the last of a request's processors) for one sequence: on the
  ``generate_step`` fast path, and in a batch step that mlx-lm runs itself.
  Each call after the first advances the matcher by the token sampled in the
  previous step (the last entry of the token context mlx-lm passes), then
  masks the logits to what the grammar allows. In the worker's
  ``BatchGenerator`` (``batchmask.py``) the decode steps hand all constrained
  rows to one ``BatchMasker`` instead: one host read of the sampled tokens,
  the matchers advanced in a loop, every bitmask filled by one llguidance
  call (its thread pool, without the GIL), one mask op over the constrained
  rows.
  Both keep the mask off the critical path on a GPU: the step's forward pass
  is submitted (``mx.async_eval``) before the host waits for the sampled
  token, so the matchers and the bitmasks are computed while the model runs.
  (MLX's CPU backend returns from ``async_eval`` of a forward pass only near
  its end, so on the CPU they follow it: docs/benchmarks.md.) Once a
  grammar is complete llguidance allows only EOS.

Masks. llguidance writes a bitmask (bit ``i % 32`` of int32 word ``i // 32``
allows token ``i``), one row per sequence. ``mask_portable`` copies the packed
words to the device, unpacks them there and applies one ``mx.where``;
``mask_metal`` is ``llguidance.mlx``'s kernel, used when MLX runs on a Metal
GPU. Both take (k, width) logits and a (k, words) bitmask and give identical
results (tests/py/test_grammar.py checks the portable path against
llguidance's numpy reference everywhere, and against the Metal kernel where
Metal exists; this Linux machine has none, so the kernel itself is untested
here: see the README, "Structured output and tools").
"""

from __future__ import annotations

import json

import numpy as np

from .params import InvalidRequest

# Compact JSON: no whitespace between tokens. Flexible whitespace lets small
# models loop on newlines and spaces until max_tokens.
JSON_OPTIONS = {"whitespace_flexible": False}


class Grammars:
    """llguidance state shared by every request of one model."""

    def __init__(self, hf_tokenizer, n_vocab: int, eos_ids):
        import llguidance
        import llguidance.hf

        self.llg = llguidance
        self.n_vocab = int(n_vocab)
        self.eos = sorted(int(e) for e in eos_ids)
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=self.n_vocab,
                                                      eos_token=self.eos)

    # -- compiling (reader thread) --------------------------------------------

    def schema_matcher(self, schema_text: str):
        """A matcher for output that is one JSON value matching the JSON Schema
        ``schema_text``. Raises InvalidRequest for text that is not a JSON
        object or a schema llguidance cannot compile."""
        try:
            schema = json.loads(schema_text)
        except ValueError as e:
            raise InvalidRequest(f"response_format schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise InvalidRequest("response_format schema must be a JSON object")
        try:
            grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as e:
            raise InvalidRequest(f"invalid JSON schema: {e}") from None
        return self._matcher(grammar, "invalid JSON schema")

    def lark_matcher(self, lark: str, what: str):
        """A matcher for a Lark grammar (krserve builds these: tool calls)."""
        return self._matcher(self.llg.LLMatcher.grammar_from_lark(lark), what)

    def _matcher(self, grammar: str, what: str):
        m = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if m.is_error():
            raise InvalidRequest(f"{what}: {m.get_error()}")
        return m

    def is_special(self, token: int) -> bool:
        return self.tokenizer.is_special_token(int(token))


def replay(matcher, tokens) -> None:
    """Advance a fresh matcher over tokens already generated (a resume). A
    token the grammar refuses means the resume does not belong to this
    grammar: InvalidRequest."""
    if tokens and not matcher.consume_tokens([int(t) for t in tokens]):
        raise InvalidRequest(f"resume tokens do not match the grammar: {matcher.get_error()}")


# -- masks (MLX thread) ---------------------------------------------------------


def bitmask_words(width: int) -> int:
    return (width + 31) // 32


def fit_bitmask(bitmask: np.ndarray, width: int) -> np.ndarray:
    """An int32 bitmask (k, words) cut or zero-padded to the ``width`` logits'
    words: tokens beyond what llguidance filled are disallowed."""
    words = bitmask_words(width)
    if bitmask.shape[1] >= words:
        return bitmask[:, :words]
    return np.concatenate([bitmask, np.zeros((bitmask.shape[0], words - bitmask.shape[1]), np.int32)], axis=1)


def mask_portable(logits, bitmask: np.ndarray):
    """Masked logits (k, width) for an int32 bitmask (k, words), one row per
    logits row: disallowed tokens get -inf. The bits are unpacked on the
    device (one shift and one ``mx.where`` for all k rows), so the host only
    copies the packed words."""
    import mlx.core as mx

    width = logits.shape[-1]
    words = mx.array(fit_bitmask(bitmask, width).view(np.uint32))
    bits = (words[:, :, None] >> mx.arange(32, dtype=mx.uint32)) & 1  # bit i % 32 of word i // 32
    allowed = bits.reshape(words.shape[0], -1)[:, :width].astype(mx.bool_)
    return mx.where(allowed, logits, mx.array(-np.inf, dtype=logits.dtype))


def mask_metal(logits, bitmask: np.ndarray):
    """llguidance's Metal kernel (Metal GPUs only), same shapes as
    ``mask_portable``."""
    from llguidance.mlx import apply_token_bitmask

    return apply_token_bitmask(logits, np.ascontiguousarray(fit_bitmask(bitmask, logits.shape[-1])))


def pick_mask():
    """The mask function for MLX's default device."""
    import mlx.core as mx

    try:
        on_metal = mx.default_device().type == mx.gpu and mx.metal.is_available()
    except Exception:
        on_metal = False
    return mask_metal if on_metal else mask_portable


class GrammarProcessor:
    """An mlx-lm logits processor that constrains one sequence to a matcher.

    mlx-lm calls it once per decode step with the sequence's token context
    (prompt, resumed and generated tokens) and that step's logits (1, width).
    The first call comes right after the prompt; every later call's context
    ends with the token sampled at the previous step, which the matcher
    consumes before the next mask is computed.
    """

    __slots__ = ("matcher", "mask", "bitmask", "calls", "error")

    def __init__(self, matcher, n_vocab: int, mask=None):
        self.matcher = matcher
        self.mask = mask or mask_portable
        # llguidance fills exactly the tokenizer's words; the mask fits them
        # to the logits' width.
        self.bitmask = np.zeros((1, bitmask_words(n_vocab)), np.int32)
        self.calls = 0
        self.error = ""  # set when the matcher refused a token (never expected)

    def __call__(self, tokens, logits):
        import mlx.core as mx
        from llguidance.numpy import fill_next_token_bitmask

        if self.calls:
            # The sampled token first, then the forward pass: reading the token
            # waits for it only (the context's last entry is a new lazy array:
            # read after the forward pass was queued, it would wait for the
            # whole pass), and the model runs while the host masks.
            last = tokens[-1]
            mx.async_eval(last)
            mx.async_eval(logits)
            token = last.item()
            if not self.error and not self.matcher.consume_token(token):
                self.error = f"grammar refused token {token}: {self.matcher.get_error()}"
        self.calls += 1
        if self.error:
            return logits  # the worker fails the request at this token
        fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        return self.mask(logits, self.bitmask)


class BatchMasker:
    """The grammar masks of every constrained row of one batch step, at once.

    ``batchmask.MaskingGenerationBatch`` calls it once per decode step, after
    the rows' other logits processors, with the step's logits (B, width), its
    inputs (the B tokens sampled at the previous step) and the constrained
    rows (increasing batch indices) with their ``GrammarProcessor``. It does
    what each processor's ``__call__`` would do for its row, for all of them
    together: one host read of the sampled tokens, the matchers advanced in a
    loop (a consume is cheap), every bitmask filled by one llguidance call
    (its thread pool, without the GIL), one mask over the constrained rows. The
    processors keep the state (``calls``, ``error``), so a sequence whose
    first step ran per row (a joining batch's first step runs in mlx-lm's own
    loop) continues here unchanged.

    Rows that are not constrained are left alone: when some rows are, only
    theirs are gathered, masked and scattered back (``put_along_axis``, a new
    array: the caller's logits are not changed); when all are, the whole batch
    is masked in one op.
    """

    def __init__(self, n_vocab: int, mask=None, threads: int | None = None):
        from llguidance import LLExecutor

        self.words = bitmask_words(n_vocab)
        self.mask = mask or mask_portable
        self.executor = LLExecutor(threads)
        self.bitmask = np.zeros((0, self.words), np.int32)  # grown to the most rows seen

    def __call__(self, logits, inputs, rows: list[int], procs: list[GrammarProcessor]):
        import mlx.core as mx
        from llguidance.numpy import fill_next_token_bitmask, fill_next_token_bitmask_par

        going = [(row, p) for row, p in zip(rows, procs) if p.calls and not p.error]
        if going:
            # The sampled tokens first, then the forward pass: reading the
            # tokens waits for them only, and the model runs while the host
            # advances the matchers and fills the masks.
            mx.async_eval(inputs)
            mx.async_eval(logits)
            tokens = inputs.tolist()
            # One by one: a consume is ~0.2 µs, less than handing the batch to
            # the thread pool (consume_token_par: 32-44 µs for 32 rows, this
            # loop 5 µs, measured in a decode loop on the tiny model).
            for row, p in going:
                if not p.matcher.consume_token(tokens[row]):
                    p.error = f"grammar refused token {tokens[row]}: {p.matcher.get_error()}"
        for p in procs:
            p.calls += 1
        live = [(row, p) for row, p in zip(rows, procs) if not p.error]  # an error: unmasked, the worker fails it
        if not live:
            return logits
        k = len(live)
        if self.bitmask.shape[0] < k:
            self.bitmask = np.zeros((k, self.words), np.int32)
        bitmask = self.bitmask[:k]
        if k == 1:  # no thread pool for one mask
            fill_next_token_bitmask(live[0][1].matcher, bitmask, 0)
        else:
            fill_next_token_bitmask_par(self.executor, [(p.matcher, i) for i, (_, p) in enumerate(live)], bitmask)
        if k == logits.shape[0]:
            return self.mask(logits, bitmask)
        idx = mx.array([row for row, _ in live])
        return mx.put_along_axis(logits, idx[:, None], self.mask(logits[idx], bitmask), axis=0)
