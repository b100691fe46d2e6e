"""Fault injection: make this worker crash or hang on chosen requests.

A testing aid, for krserve's own tests and for operators who want to see
crash containment work on their setup. ``KRSERVE_WORKER_FAULT`` (passed to
workers by ``krserve up`` like every ``KRSERVE_WORKER_*`` variable) holds one
or more rules separated by ``;``:

``segv-on-prompt:TEXT``
    A request whose prompt contains TEXT crashes the worker with a real
    segmentation fault (an invalid read, as a broken kernel would) when the
    model thread starts it: every worker it runs on dies.
``segv-after-tokens:N`` or ``segv-after-tokens:N:TEXT``
    The worker segfaults right after writing the N-th token this worker
    generated for a request (whose prompt contains TEXT), before anything
    else about it: its ``done`` is lost, with any text still held back.
``hang-on-prompt:TEXT``
    The model thread blocks for ever when such a request starts, while the
    reader thread still answers heartbeats: only the supervisor's progress
    watchdog can tell.

The prompt is the gen's ``text`` and the ``content`` of each of its
``messages`` (prompt ids are decoded). A bad rule stops the worker at start
with an error naming it. Without the variable nothing here runs.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from dataclasses import dataclass

ENV = "KRSERVE_WORKER_FAULT"


class FaultSpecError(ValueError):
    pass


@dataclass(frozen=True)
class Rule:
    kind: str  # "segv-on-prompt", "segv-after-tokens" or "hang-on-prompt"
    text: str = ""  # the prompt must contain it ("" matches every prompt)
    tokens: int = 0  # segv-after-tokens: N


def parse(spec: str) -> list[Rule]:
    rules = []
    for part in spec.split(";"):
        part = part.strip()
        if not part:
            continue
        kind, _, arg = part.partition(":")
        if kind in ("segv-on-prompt", "hang-on-prompt"):
            if not arg:
                raise FaultSpecError(f"{ENV}: {kind} needs the prompt text to match ({kind}:TEXT)")
            rules.append(Rule(kind, text=arg))
        elif kind == "segv-after-tokens":
            n, _, text = arg.partition(":")
            try:
                tokens = int(n)
            except ValueError:
                tokens = 0
            if tokens < 1:
                raise FaultSpecError(f"{ENV}: segv-after-tokens needs a token count >= 1 "
                                     f"(segv-after-tokens:N[:TEXT]); got {arg!r}")
            rules.append(Rule(kind, text=text, tokens=tokens))
        else:
            raise FaultSpecError(f"{ENV}: unknown fault {kind!r} (known: segv-on-prompt, "
                                 "segv-after-tokens, hang-on-prompt)")
    return rules


def prompt_text(msg: dict, tokenizer) -> str:
    """The text a rule is matched against: the gen's text and message
    contents, or its prompt ids decoded."""
    parts = [msg.get("text") or ""]
    parts += [m.get("content") or "" for m in msg.get("messages") or [] if isinstance(m, dict)]
    if msg.get("prompt"):
        parts.append(tokenizer.decode(list(msg["prompt"])))
    return "\n".join(p for p in parts if isinstance(p, str))


class Armed:
    """The faults armed for one request."""

    def __init__(self, rid: int, rules: list[Rule]):
        self.rid = rid
        self.rules = rules

    def on_start(self) -> None:
        """The model thread is about to prefill the request."""
        for r in self.rules:
            if r.kind == "segv-on-prompt":
                crash(f"segv-on-prompt: request {self.rid}")
            elif r.kind == "hang-on-prompt":
                _log(f"hang-on-prompt: request {self.rid}; the model thread blocks for ever")
                threading.Event().wait()

    def after_token(self, ctoks: int) -> bool:
        """Whether to crash now that the request's ``ctoks``-th token (by this
        worker) has been queued for writing; the caller writes it first."""
        return any(r.kind == "segv-after-tokens" and ctoks == r.tokens for r in self.rules)


class Faults:
    def __init__(self, rules: list[Rule], tokenizer):
        self.rules = rules
        self.tokenizer = tokenizer

    @classmethod
    def from_env(cls, environ, tokenizer) -> "Faults | None":
        spec = environ.get(ENV, "")
        if not spec.strip():
            return None
        faults = cls(parse(spec), tokenizer)
        _log(f"fault injection armed ({ENV}={spec!r}): this worker will crash or hang on purpose")
        return faults

    def arm(self, msg: dict) -> Armed | None:
        text = prompt_text(msg, self.tokenizer)
        rules = [r for r in self.rules if r.text in text]
        return Armed(msg["id"], rules) if rules else None


def crash(why: str) -> None:
    """Die of a real segmentation fault (faulthandler prints the stack)."""
    _log(f"fault injection: {why}: segmentation fault")
    ctypes.string_at(0)


def _log(msg: str) -> None:
    print("krserve_worker:", msg, file=sys.stderr, flush=True)
