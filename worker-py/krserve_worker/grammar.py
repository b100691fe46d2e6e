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
- The MLX thread runs ``GrammarProcessor``, an mlx-lm logits processor (the
  last of a request's processors), in ``BatchGenerator`` and on the
  ``generate_step`` fast path. Each call after the first advances the matcher
  by the token sampled in the previous step (the last entry of the token
  context mlx-lm passes), then masks the logits to what the grammar allows.
  Once the grammar is complete llguidance allows only EOS. To keep the mask
  off the critical path the processor submits the sampled token and then the
  step's forward pass (two ``mx.async_eval``) before it waits for the token
  (``.item()``), so the matcher and the mask are computed while the model runs.

Masks. llguidance writes a bitmask (bit ``i % 32`` of int32 word ``i // 32``
allows token ``i``). ``apply_mask`` turns it into masked logits:
``mask_portable`` (``np.unpackbits`` + ``mx.where``) everywhere, or
``llguidance.mlx``'s Metal kernel when MLX runs on a Metal GPU. Both give
identical results (tests/py/test_grammar.py checks the portable path against
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


def mask_bits(bitmask: np.ndarray, width: int) -> np.ndarray:
    """The allowed-token booleans (uint8 0/1) of an int32 bitmask row, for
    ``width`` logits: bits beyond the bitmask are 0 (disallowed)."""
    bits = np.unpackbits(bitmask.reshape(-1).view(np.uint8), bitorder="little")
    if bits.shape[0] >= width:
        return bits[:width]
    return np.concatenate([bits, np.zeros(width - bits.shape[0], np.uint8)])


def mask_portable(logits, bitmask: np.ndarray):
    """Masked logits of shape (1, width): disallowed tokens get -inf."""
    import mlx.core as mx

    allowed = mx.array(mask_bits(bitmask, logits.shape[-1])).astype(mx.bool_)
    return mx.where(allowed, logits, mx.array(-np.inf, dtype=logits.dtype))


def mask_metal(logits, bitmask: np.ndarray):
    """llguidance's Metal kernel (Metal GPUs only)."""
    from llguidance.mlx import apply_token_bitmask

    words = bitmask_words(logits.shape[-1])
    row = bitmask.reshape(1, -1)
    if row.shape[1] < words:  # logits wider than the tokenizer: pad as disallowed
        row = np.concatenate([row, np.zeros((1, words - row.shape[1]), np.int32)], axis=1)
    return apply_token_bitmask(logits, row[:, :words])


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
        # llguidance fills exactly the tokenizer's words; mask_bits fits
        # them to the logits' width.
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
