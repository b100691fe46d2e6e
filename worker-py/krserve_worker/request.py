"""One request on the main thread, from its ``gen`` to its ``done``: its
validated parameters, its text stream (stop strings) and tool calls, its
sampler and logits processors (a grammar's among them), what the prompt cache
gave it and the checkpoints it will store. The engine (``worker.Worker``)
creates and advances them.
"""

from __future__ import annotations

from . import grammar, tools
from .textstream import TextStream


class Request:
    __slots__ = ("p", "uid", "text", "ptoks", "ctoks", "sampler", "processors", "grammar",
                 "calls", "carry", "fault", "tokens", "system_end", "cache", "cached", "kinds")

    def __init__(self, p, text: TextStream, system_end: int = 0):
        self.p = p
        self.uid = None
        self.text = text
        self.tokens = p.prompt + p.resume  # what is prefilled
        self.ptoks = len(self.tokens)
        self.ctoks = 0
        self.sampler = None
        self.processors = []
        self.system_end = system_end  # where a chat's system prompt ends (0: none)
        self.cache = None  # the prompt cache's KV state for tokens[:cached]
        self.cached = 0
        self.kinds: list[str] = []  # the checkpoints still to store, in order
        self.fault = None  # faults.Armed, only under KRSERVE_WORKER_FAULT
        self.grammar: grammar.GrammarProcessor | None = None
        self.calls: tools.CallStream | None = None  # splits tool calls out of the text
        self.carry = ("", [])  # content and calls a resume found undelivered

    @property
    def cut_call(self) -> bool:
        """The output ended inside a tool call that is not whole (``done``'s
        ``cut_call``: the finish reason stays ``stop`` or ``length``)."""
        return self.calls is not None and self.calls.cut

    def output(self, text: str, final: bool = False) -> tuple[str, list]:
        """The content and tool calls of a text delta (after stop strings)."""
        if self.calls is None:
            return text, []
        content, calls = self.calls.feed(text, final)
        if self.carry[0] or self.carry[1]:
            content, calls = self.carry[0] + content, self.carry[1] + calls
            self.carry = ("", [])
        return content, calls

    def system_key(self):
        """Its system prompt's tokens when it will store a checkpoint there
        (the cache did not hold it), else None: what new conversations of a
        burst share (``Followers``)."""
        if self.cached < self.system_end < len(self.tokens) - 1:
            return tuple(self.tokens[:self.system_end])
        return None

    def checkpoints(self, prompt_end: bool) -> list[tuple[int, str]]:
        """Where to store the KV state while prefilling, after what the cache
        gave: the end of the system prompt, and with ``prompt_end`` the end of
        the prompt but its last token."""
        n, last = self.cached, len(self.tokens) - 1
        out = []
        if n < self.system_end < last:
            out.append((self.system_end, "system"))
        if prompt_end and n < last:
            out.append((last, "user"))
        return out
