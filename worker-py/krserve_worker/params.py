"""Validation of ``gen`` requests (pure Python).

``parse_gen`` turns a decoded ``gen`` message into ``GenParams`` or raises
``InvalidRequest`` (answered with ``error`` code ``invalid``). Missing fields
are their zero value, and zero means "off" for every sampling parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


MAX_TOP_LOGPROBS = 20


class InvalidRequest(ValueError):
    """Bad request parameters: answered with ``error`` code ``invalid``."""

    code = "invalid"


class InvalidPrompt(InvalidRequest):
    """A prompt the worker tokenized and cannot use (the chat template refused
    the messages, or nothing is left): code ``invalid_prompt``."""

    code = "invalid_prompt"


class ContextLengthExceeded(InvalidRequest):
    """A prompt that leaves no room in the model's context: code
    ``context_length_exceeded``, with OpenAI's wording."""

    code = "context_length_exceeded"

    def __init__(self, ctx: int, n: int):
        super().__init__(
            f"This model's maximum context length is {ctx} tokens. "
            f"However, your prompt has {n} tokens."
        )


@dataclass
class GenParams:
    id: int
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int = 0
    has_seed: bool = False
    repetition_penalty: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    resume: list[int] = field(default_factory=list)
    sent: int = 0
    logprobs: bool = False
    top_logprobs: int = 0
    one_call: bool = False  # parallel_tool_calls false
    sent_calls: int = 0  # resume: tool calls begun (their header delivered)
    sent_args: int = 0  # resume: bytes of the last begun call's arguments delivered


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(msg, key, lo=None):
    v = msg.get(key, 0)
    if not _is_int(v):
        raise InvalidRequest(f"{key} must be an integer")
    if lo is not None and v < lo:
        raise InvalidRequest(f"{key} must be >= {lo}")
    return v


def _float(msg, key, lo=None, hi=None):
    v = msg.get(key, 0.0)
    if not (_is_int(v) or isinstance(v, float)) or not math.isfinite(v):
        raise InvalidRequest(f"{key} must be a finite number")
    v = float(v)
    if lo is not None and hi is not None and not (lo <= v <= hi):
        raise InvalidRequest(f"{key} must be in [{lo:g}, {hi:g}]")
    if lo is not None and v < lo:
        raise InvalidRequest(f"{key} must be >= {lo:g}")
    return v


def _token_list(msg, key, vocab):
    v = msg.get(key, [])
    if not isinstance(v, list):
        raise InvalidRequest(f"{key} must be a list of token ids")
    for t in v:
        if not _is_int(t) or not (0 <= t < vocab):
            raise InvalidRequest(f"{key}: token id {t!r} outside [0, {vocab})")
    return list(v)


def parse_gen(msg: dict, vocab: int, ctx: int = 0, prompt: list[int] | None = None) -> GenParams:
    """Validate a ``gen``. ``prompt``: the ids the reader thread tokenized
    from the gen's text or messages (already known to be in the vocabulary),
    instead of the gen's ``prompt``.

    ``max_tokens`` is cut to what the context leaves after the prompt and the
    resumed tokens. A resume that fills the context leaves 0: the request is
    complete ("length"), and so is a resume that asks for 0. A prompt alone
    that fills it is refused."""
    rid = msg["id"]
    if prompt is None:
        prompt = _token_list(msg, "prompt", vocab)
        if not prompt:
            raise InvalidRequest("prompt must not be empty")
    elif not prompt:
        raise InvalidPrompt("the prompt is empty after tokenization")
    resume = _token_list(msg, "resume", vocab)
    max_tokens = _int(msg, "max_tokens")
    # A resume may ask for no new token: its worker died after streaming the
    # last one but before done, and this worker only flushes the text the
    # dead one held back (a partial character, a stop-string prefix).
    if max_tokens < 1 and not (max_tokens == 0 and resume):
        raise InvalidRequest("max_tokens must be >= 1 (0 only with resume)")
    if ctx:
        if len(prompt) >= ctx:
            raise ContextLengthExceeded(ctx, len(prompt))
        max_tokens = max(0, min(max_tokens, ctx - len(prompt) - len(resume)))
    temperature = _float(msg, "temperature", lo=0.0)
    top_p = _float(msg, "top_p", 0.0, 1.0)
    min_p = _float(msg, "min_p", 0.0, 1.0)
    top_k = _int(msg, "top_k", lo=0)
    seed = _int(msg, "seed")
    has_seed = msg.get("has_seed", False)
    if not isinstance(has_seed, bool):
        raise InvalidRequest("has_seed must be a bool")
    repetition_penalty = _float(msg, "repetition_penalty", lo=0.0)
    presence_penalty = _float(msg, "presence_penalty")
    frequency_penalty = _float(msg, "frequency_penalty")

    lb = msg.get("logit_bias", {})
    if not isinstance(lb, dict):
        raise InvalidRequest("logit_bias must be a map of token id to bias")
    logit_bias = {}
    for k, b in lb.items():
        if not _is_int(k) or not (0 <= k < vocab):
            raise InvalidRequest(f"logit_bias: token id {k!r} outside [0, {vocab})")
        if not (_is_int(b) or isinstance(b, float)) or math.isnan(b):
            raise InvalidRequest(f"logit_bias[{k}] must be a number")
        logit_bias[k] = float(b)

    stop = msg.get("stop", [])
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequest("stop must be a list of strings")
    if any(s == "" for s in stop):
        raise InvalidRequest("stop strings must not be empty")

    sent = _int(msg, "sent", lo=0)
    if sent and not resume:
        raise InvalidRequest("sent without resume tokens")

    logprobs = msg.get("logprobs", False)
    if not isinstance(logprobs, bool):
        raise InvalidRequest("logprobs must be a bool")
    top_logprobs = _int(msg, "top_logprobs", lo=0)
    if top_logprobs > MAX_TOP_LOGPROBS:
        raise InvalidRequest(f"top_logprobs must be <= {MAX_TOP_LOGPROBS}")
    if top_logprobs and not logprobs:
        raise InvalidRequest("top_logprobs needs logprobs")

    one_call = msg.get("one_call", False)
    if not isinstance(one_call, bool):
        raise InvalidRequest("one_call must be a bool")
    sent_calls = _int(msg, "sent_calls", lo=0)
    if sent_calls and not resume:
        raise InvalidRequest("sent_calls without resume tokens")
    sent_args = _int(msg, "sent_args", lo=0)
    if sent_args and not sent_calls:
        raise InvalidRequest("sent_args without sent_calls")

    return GenParams(
        id=rid, prompt=prompt, max_tokens=max_tokens, temperature=temperature,
        top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, has_seed=has_seed,
        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty, logit_bias=logit_bias, stop=list(stop),
        resume=resume, sent=sent, logprobs=logprobs, top_logprobs=top_logprobs,
        one_call=one_call, sent_calls=sent_calls, sent_args=sent_args,
    )
