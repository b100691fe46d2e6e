"""The worker's batch generator: mlx-lm's ``BatchGenerator``, two steps changed.

1. **First tokens before the next prefill** (``Generator._next``). In mlx-lm
   0.32.2 a call of ``BatchGenerator.next()`` runs a decode step, moves the
   prompts whose prefill is done into the decode batch (their first token is
   sampled there, asynchronously) and then runs the next prefill step of the
   prompts still waiting, in the same call. The first tokens come out with
   the *next* call's decode step, so a request whose prefill is done waits
   for another request's whole prefill step before its first token is sent.
   On the H200 (docs/gpu.md, 2026-12-01 (third)) a burst of 16 conversations
   arrived as 1 + 8 + 7 and each group's first tokens waited for the next
   group's prefill (0.9 s a step): every request's time to first token was
   the end of the last prefill. Here, when prompts just moved to the decode
   batch and others wait for a prefill step, the call returns before that
   step, and the next call returns right after its decode step, which
   carries their first tokens (a call returns its tokens only when it ends,
   so the decode step must end a call before the prefill). The waiting
   prompts' prefill starts up to two decode steps later (~10-40 ms each), so
   it is done only when it pays (``worth_sending_first``): when the first
   tokens it sends earlier save more waiting (the prompts moved, times the
   prefill step's estimated time) than it costs (the prompts waiting, times
   two decode steps), from the generator's own recent step times. On the CPU
   with short prompts a prefill step is shorter than two decode steps, and
   holding it back raised the P95 time to first token by a sixth (docs/
   benchmarks.md). The call after such a decode step does not hold its
   prefill back again, so a stream of fully cached arrivals cannot starve a
   long prefill. mlx_lm.server uses the same generator and has the same wait.

2. **Grammar masks batched** (``batchmask.MaskingGenerationBatch``, with a
   ``grammar.BatchMasker``): the decode batch masks every constrained row in
   one step instead of row by row.

Each change copies a piece of mlx-lm's source (``_next`` here, ``_step``
there) and is used only when the installed mlx-lm's source is the one it was
written against (a sha256 of it); otherwise ``generator`` says why and
falls back to mlx-lm's own behaviour for that part, and
tests/py/test_batchgen.py / test_batchmask.py fail, so an mlx-lm upgrade gets
the copies re-checked instead of silently running stale ones.
"""

from __future__ import annotations

import time

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, PromptProcessingBatch

from . import batchmask

# sha256 of inspect.getsource(mlx_lm.generate.BatchGenerator._next), mlx-lm 0.32.2.
NEXT_SHA256 = "eb3a4e361dc2c19eafd28e901155828fd4602d63e26c431ca9ffbf079302c665"


# Weight of the newest step time in the generator's running estimates.
EMA = 0.2


def worth_sending_first(moved: int, waiting: int, next_tokens: int,
                        prefill_s_per_token: float | None, decode_s: float | None) -> bool:
    """Whether to send the first tokens of the ``moved`` prompts (one decode
    step, ending a call) before the next prefill step of ``next_tokens``
    tokens of the ``waiting`` ones: the moved prompts then wait that step
    less, the waiting ones up to two decode steps more. Unknown step times
    (nothing measured yet): no, as mlx-lm."""
    if prefill_s_per_token is None or decode_s is None or moved < 1:
        return False
    return moved * next_tokens * prefill_s_per_token > waiting * 2 * decode_s


def _ema(old: float | None, new: float) -> float:
    return new if old is None else old + EMA * (new - old)


def next_unsupported() -> str:
    """Why ``Generator._next`` cannot replace the installed mlx-lm's ("" if it can)."""
    return batchmask.source_differs(BatchGenerator._next, NEXT_SHA256, "BatchGenerator._next", "batchgen")


class Generator(BatchGenerator):
    """``BatchGenerator`` with first tokens sent before the next prefill step
    (``first_tokens_first``) and, given a ``masker``, grammar masks batched.
    The generator keeps its decode batch object: rows join it by ``extend``
    and leave it by ``filter``, so a masking batch stays one."""

    def __init__(self, model, masker=None, first_tokens_first: bool = True,
                 worth=worth_sending_first, **kwargs):
        super().__init__(model, **kwargs)
        self.first_tokens_first = first_tokens_first
        self.worth = worth  # (moved, waiting, next_tokens, s per prefill token, s per decode step)
        self.prefill_s_per_token: float | None = None  # recent step times (EMA)
        self.decode_s: float | None = None
        # Whether the step times are measured here. A group's followers do
        # not measure: they take rank 0's estimates before each call
        # (``estimates``), so every rank decides alike and their collectives
        # stay in step (ranks.py).
        self.measures = True
        # The last call moved prompts to decoding and returned before the
        # prefill step of the others: this call returns after its decode
        # step, which sends their first tokens.
        self._send_first = False
        # The last call did that: this one prefills whatever moved.
        self._sent_first = False
        if masker is not None:
            batch = batchmask.MaskingGenerationBatch.empty(self.model, self.sampler)
            batch.masker = masker
            self._generation_batch = batch

    @property
    def estimates(self) -> tuple[float | None, float | None]:
        """The step times the next call decides with: (seconds per prefill
        token, seconds per decode step)."""
        return self.prefill_s_per_token, self.decode_s

    @estimates.setter
    def estimates(self, est) -> None:
        self.prefill_s_per_token, self.decode_s = est

    def _next(self):
        if not self.first_tokens_first:
            return super()._next()
        # krserve: decide with the estimates as the call starts, which a
        # group's followers are given (the steps below update them).
        per_token, decode_s = self.estimates
        # mlx-lm 0.32.2's BatchGenerator._next, but for the block marked krserve.
        generation_responses = []
        prompt_responses = []

        # krserve: the decode step that sends the first tokens of the prompts
        # the last call moved to decoding, alone.
        send_first, self._send_first = self._send_first, False
        sent_first, self._sent_first = self._sent_first, False

        # Generate tokens first
        if len(self._generation_batch) > 0:
            tic = time.perf_counter()
            generation_responses = self._generation_batch.next()
            if self.measures:  # krserve
                self.decode_s = _ema(self.decode_s, time.perf_counter() - tic)
            self._counters.decode_time += time.perf_counter() - tic
            self._counters.generation_tokens += len(generation_responses)
            self._counters.generation_steps += 1
            if self._counters.generation_steps % 512 == 0:
                mx.clear_cache()

        if send_first and generation_responses:
            self._sent_first = True
            return prompt_responses, generation_responses

        # Exit early because we already have our hands full with decoding
        if len(self._generation_batch) >= self.completion_batch_size:
            return prompt_responses, generation_responses

        # Check if we have sequences and add them to the prompt batch
        n = min(
            self.prefill_batch_size - len(self._prompt_batch),
            self.completion_batch_size - len(self._generation_batch),
            len(self._unprocessed_sequences),
        )
        if n > 0:
            self._prompt_batch.extend(self._make_batch(n))

        # Split the prompt sequences to the ones moving to generation and the rest
        keep = []
        split = []
        for i, seq in enumerate(self._currently_processing):
            segments = seq[0]
            if len(segments) == 1 and len(segments[0]) == 1:
                split.append(i)
            else:
                keep.append(i)

        # Actually split off part of the prompt batch and start generation
        if split:
            last_inputs = [self._currently_processing[i][0][0] for i in split]
            progress = [(self._currently_processing[i][2],) * 2 for i in split]
            self._currently_processing = [self._currently_processing[i] for i in keep]
            gen_batch = self._prompt_batch.split(split).generate(last_inputs)
            for i, p in enumerate(progress):
                prompt_responses.append(
                    PromptProcessingBatch.Response(
                        gen_batch.uids[i],
                        p,
                        True,
                        True,
                    )
                )
            self._generation_batch.extend(gen_batch)

        # krserve: the first tokens of the sequences just split off go out
        # with the next call's decode step, before the prefill step of the
        # prompts still waiting (unless the last call was such a step: a
        # stream of arrivals cannot hold a long prefill back for good).
        if split and self._currently_processing and not sent_first:
            next_tokens = sum(min(len(seq[0][0]), self.prefill_step_size)
                              for seq in self._currently_processing)
            if self.worth(len(split), len(self._currently_processing), next_tokens, per_token, decode_s):
                self._send_first = True
                return prompt_responses, generation_responses

        # Extract the next prompts input
        prompts = []
        for i, seq in enumerate(self._currently_processing):
            response = PromptProcessingBatch.Response(
                self._prompt_batch.uids[i], 0, False, False
            )
            segments = seq[0]
            n = min(len(segments[0]), self.prefill_step_size)
            prompts.append(segments[0][:n])
            segments[0] = segments[0][n:]
            if len(segments[0]) == 0:
                segments.pop(0)
                response.end_of_segment = True
            seq[1] += len(prompts[-1])
            response.progress = (seq[1], seq[2])
            prompt_responses.append(response)

        # Process the prompts
        self._counters.prompt_tokens += sum(len(p) for p in prompts)
        tic = time.perf_counter()
        self._prompt_batch.prompt(prompts)
        if prompts and self.measures:  # krserve
            self.prefill_s_per_token = _ema(self.prefill_s_per_token,
                                            (time.perf_counter() - tic) / max(1, sum(len(p) for p in prompts)))
        self._counters.prompt_time += time.perf_counter() - tic

        return prompt_responses, generation_responses


def generator(model, masker=None, **kwargs) -> tuple[BatchGenerator, str]:
    """The worker's batch generator (``kwargs``: BatchGenerator's) and a note
    for its log saying which of the two changes are on, and why not."""
    why_next = next_unsupported()
    why_mask = "no llguidance" if masker is None else batchmask.unsupported()
    gen = Generator(model, masker=None if why_mask else masker,
                    first_tokens_first=not why_next, **kwargs)
    note = (f"first tokens before the next prefill: {'yes' if not why_next else f'no ({why_next})'}; "
            f"grammar masks: {'batched' if not why_mask else f'per row ({why_mask})'}")
    return gen, note
