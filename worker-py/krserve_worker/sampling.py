"""Per-request samplers and logits processors (MLX: main thread only).

Seeds. mlx-lm's ``make_sampler`` draws from the global ``mx.random`` state,
which every request in the batch shares, so a seed set with ``mx.random.seed``
would not make one request reproducible. A request with ``has_seed`` gets a
``SeededSampler`` instead: the same filters as ``make_sampler`` (top_p, min_p,
top_k, in that order), then ``mx.random.categorical(..., key=k_i)`` with a key
owned by the request, ``k_i = mx.random.key(mix(seed, i))``, where ``i`` is the
index of the generated token in the request's output (counting ``resume``
tokens, so a resumed seeded request draws the same keys an uninterrupted run
would). The draw therefore depends only on the seed, the step and the logits:
neither on other requests nor on global state. (Batching can still change the
logits in the last bits of float precision; see the worker tests.)

Greedy requests (temperature 0) use argmax: no randomness, no seed needed.
Unseeded sampling requests use mlx-lm's ``make_sampler`` unchanged.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    make_logits_processors,
    make_sampler,
)

_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finalizer: a bijective 64-bit mix."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def step_seed(seed: int, step: int) -> int:
    """The 64-bit key seed of draw ``step`` of a request seeded with ``seed``."""
    return _mix64(_mix64(seed & _M64) ^ (step & _M64))


class SeededSampler:
    def __init__(self, temp: float, top_p: float, min_p: float, top_k: int,
                 vocab: int, seed: int, start_step: int = 0):
        self.inv_temp = 1.0 / temp
        self.top_p = top_p
        self.min_p = min_p
        self.top_k = top_k if 0 < top_k < vocab else 0
        self.seed = seed
        self.step = start_step

    def __call__(self, logprobs: mx.array) -> mx.array:
        if 0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p != 0.0:
            logprobs = apply_min_p(logprobs, self.min_p)
        if self.top_k > 0:
            logprobs = apply_top_k(logprobs, self.top_k)
        key = mx.random.key(step_seed(self.seed, self.step))
        self.step += 1
        return mx.random.categorical(logprobs * self.inv_temp, key=key)


def build_sampler(p, vocab: int):
    """The sampler for request params ``p``; None means greedy (the batch
    generator's shared argmax sampler, so greedy requests sample in one call)."""
    if p.temperature == 0:
        return None
    if p.has_seed:
        return SeededSampler(p.temperature, p.top_p, p.min_p, p.top_k, vocab,
                             p.seed, start_step=len(p.resume))
    top_k = p.top_k if 0 < p.top_k < vocab else 0
    return make_sampler(temp=p.temperature, top_p=p.top_p, min_p=p.min_p, top_k=top_k)


def build_processors(p) -> list:
    """Logits processors for request params ``p`` (zero means off)."""
    return make_logits_processors(
        logit_bias=dict(p.logit_bias) if p.logit_bias else None,
        repetition_penalty=p.repetition_penalty or None,
        presence_penalty=p.presence_penalty or None,
        frequency_penalty=p.frequency_penalty or None,
    )
