"""Grammar masks for a whole decode step of mlx-lm's ``BatchGenerator``.

Why this module exists. mlx-lm's ``GenerationBatch._step`` runs logits
processors row by row: as soon as any row has one, it slices every row's
logits, runs that row's processors and concatenates the rows again. A grammar
processor then costs, per row and step, a host read of the sampled token, an
llguidance call and a mask op, all serialized on the MLX thread, and the free
rows pay the slicing and concatenation. On an H200 at B = 32 with every row
constrained that was 61 % of the free throughput (docs/gpu.md).

mlx-lm has no hook between the forward pass and the normalisation of the
logits, so ``MaskingGenerationBatch`` overrides ``_step``: mlx-lm 0.32.2's body
unchanged except the processor block (``_process``), which

1. runs the other processors (repetition penalty, logit bias, ...) only on the
   rows that have them, per row as mlx-lm does, and puts those rows back;
2. hands every row whose last processor is a ``grammar.GrammarProcessor`` to
   one ``grammar.BatchMasker`` call: the sampled tokens read once, every
   matcher advanced, every bitmask filled in one llguidance call, one mask
   over the constrained rows. The grammar mask stays last, and the
   logprobs are still computed from the processed logits.

A sequence's first step runs before it joins this batch: mlx-lm's
``PromptProcessingBatch.generate`` builds a plain ``GenerationBatch`` for the
newly prefilled rows, which steps once in its constructor (processors per
row), and ``BatchGenerator`` then ``extend``s this batch with it. The
``GrammarProcessor`` keeps the state, so both paths agree; the batched path
takes over from the second step.

Other ways considered: a shared masker triggered by the first constrained
row's processor still leaves mlx-lm's per-row slice, token context and
concatenation for all B rows; a wrapped model that returns processed logits
would hide the processors inside the model call and lean on the same
internals less visibly.

Guard: the override is used only when the installed mlx-lm's
``GenerationBatch`` is the source it was written against
(``GENERATION_BATCH_SHA256``). Otherwise ``batchgen.generator`` keeps mlx-lm's
own decode batch (processors per row: correct, slower) and says why, and
tests/py/test_batchmask.py fails, so an mlx-lm upgrade gets this copy
re-checked instead of silently running a stale one. (``batchgen.Generator``
installs this batch as its decode batch.)
"""

from __future__ import annotations

import hashlib
import inspect

import mlx.core as mx
from mlx_lm.generate import GenerationBatch

from .grammar import BatchMasker, GrammarProcessor

# sha256 of inspect.getsource(mlx_lm.generate.GenerationBatch), mlx-lm 0.32.2.
GENERATION_BATCH_SHA256 = "af6d7dee4ec6091ef209ff86a52e2c2d2c3dd79d5386ed9c00da13b2b4597698"


def source_differs(obj, sha256: str, name: str, copier: str) -> str:
    """Why a copy of mlx-lm's ``obj`` (``name``) in module ``copier`` does not
    fit the installed mlx-lm: its source is not readable or its sha256 is not
    ``sha256``, the one the copy was written against ("" if it fits)."""
    import mlx_lm

    try:
        src = inspect.getsource(obj)
    except (OSError, TypeError) as e:
        return f"mlx-lm {mlx_lm.__version__}: {name}'s source is not readable ({e})"
    if hashlib.sha256(src.encode()).hexdigest() != sha256:
        return (f"mlx-lm {mlx_lm.__version__}'s {name} is not the one "
                f"krserve_worker.{copier} was written against (0.32.2)")
    return ""


def unsupported() -> str:
    """Why the batched step cannot be used with the installed mlx-lm ("" if it can)."""
    return source_differs(GenerationBatch, GENERATION_BATCH_SHA256, "GenerationBatch", "batchmask")


class MaskingGenerationBatch(GenerationBatch):
    """mlx-lm's ``GenerationBatch`` with the grammar masks of a step batched."""

    masker: BatchMasker | None = None

    def _step(self):
        # mlx-lm 0.32.2's GenerationBatch._step but for the processor block.
        self._current_tokens = self._next_tokens
        self._current_logprobs = self._next_logprobs
        inputs = self._current_tokens

        # Forward pass
        logits = self.model(inputs[:, None], cache=self.prompt_cache)
        logits = logits[:, -1, :]

        # Logits processors (krserve: _process, grammar masks batched)
        token_context = []
        if any(self.logits_processors):
            logits, token_context = self._process(inputs, logits)

        # Normalize the logits
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)

        # One batched call when the batch shares a sampler.
        samplers = [
            self.fallback_sampler if s is None else s
            for s in (self.samplers or [None] * len(self.uids))
        ]
        if not samplers or all(s is samplers[0] for s in samplers):
            sampled = (samplers[0] if samplers else self.fallback_sampler)(logprobs)
        else:
            sampled = mx.concatenate(
                [s(logprobs[e : e + 1]) for e, s in enumerate(samplers)], axis=0
            )

        # Assign the next step to member variables and start computing it
        # asynchronously
        self._next_tokens = sampled
        self._next_logprobs = list(logprobs)
        mx.async_eval(self._next_tokens, self._next_logprobs, token_context)

        # Eval the current tokens and current logprobs. After that also add
        # them to self.tokens so that it always represents the tokens contained
        # in the KV Cache.
        mx.eval(inputs, self._current_logprobs)
        inputs = inputs.tolist()
        for sti, ti in zip(self.tokens, inputs):
            sti.append(ti)
        return inputs, self._current_logprobs

    def _process(self, inputs, logits):
        """The step's logits after every row's processors: the rows' other
        processors per row (only rows that have them), then the grammar masks
        of all constrained rows in one ``BatchMasker`` call. Returns the
        logits and the token contexts to evaluate with the step (mlx-lm's)."""
        grammar_rows, grammars = [], []
        other_rows, processed, token_context = [], [], []
        for e, procs in enumerate(self.logits_processors):
            if not procs:
                continue
            if self.masker is not None and isinstance(procs[-1], GrammarProcessor):
                grammar_rows.append(e)
                grammars.append(procs[-1])
                procs = procs[:-1]
            if procs:
                context = self._token_context[e].update_and_fetch(inputs[e : e + 1])
                token_context.append(context)
                row = logits[e : e + 1]
                for processor in procs:
                    row = processor(context, row)
                other_rows.append(e)
                processed.append(row)
        if len(other_rows) == logits.shape[0]:
            logits = mx.concatenate(processed, axis=0)
        elif other_rows:
            idx = mx.array(other_rows)[:, None]
            logits = mx.put_along_axis(logits, idx, mx.concatenate(processed, axis=0), axis=0)
        if grammar_rows:
            logits = self.masker(logits, inputs, grammar_rows, grammars)
        return logits, token_context
