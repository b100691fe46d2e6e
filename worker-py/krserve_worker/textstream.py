"""Per-request output text: streaming detokenization, stop strings, resume.

Pure Python (no MLX): ``TextStream`` wraps one streaming detokenizer (from
``tokenizer.detokenizer``, a new instance per request) and decides which part
of the decoded text may be sent:

- Stop strings are matched on the text, so a stop string split over several
  tokens (or tokenized differently in context) is still found. On a match the
  output ends right before the stop string; the stop string never leaks.
- Any tail of the unsent text that could be the start of a stop string is held
  back until the next token settles it (or the request ends).
- The detokenizer itself holds back incomplete UTF-8 characters.

``pos`` is the number of characters of ``acc`` already delivered to the client
(by this worker, or before a crash: see ``skip_bytes``).
"""

from __future__ import annotations


class TextStream:
    def __init__(self, detokenizer, stops: list[str] | tuple[str, ...] = ()):
        self.detok = detokenizer
        self.stops = tuple(s for s in stops if s)
        self.max_hold = max((len(s) for s in self.stops), default=1) - 1
        self.acc = ""  # all text decoded so far
        self.pos = 0  # chars of acc already delivered
        self.done = False

    # -- feeding -------------------------------------------------------------

    def add(self, token: int) -> None:
        self.detok.add_token(token)
        self.acc += self.detok.last_segment

    def finalize(self) -> None:
        self.detok.finalize()
        self.acc += self.detok.last_segment

    def replay(self, tokens, sent_bytes: int) -> None:
        """Resume: decode ``tokens`` and mark the first ``sent_bytes`` bytes (UTF-8)
        of their text as already delivered. Raises ValueError if ``sent_bytes`` is
        beyond that text or splits a character."""
        for t in tokens:
            self.add(t)
        if sent_bytes < 0:
            raise ValueError("sent must be >= 0")
        raw = self.acc.encode("utf-8")
        if sent_bytes > len(raw):
            raise ValueError(
                f"sent ({sent_bytes} bytes) is beyond the text of the resume tokens "
                f"({len(raw)} bytes)"
            )
        try:
            self.pos = len(raw[:sent_bytes].decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"sent ({sent_bytes} bytes) splits a UTF-8 character") from None

    # -- output --------------------------------------------------------------

    def _find_stop(self, region: str) -> int:
        best = -1
        for s in self.stops:
            i = region.find(s)
            if i >= 0 and (best < 0 or i < best):
                best = i
        return best

    def stop_pending(self) -> bool:
        """Whether the undelivered text already contains a stop string."""
        return bool(self.stops) and self._find_stop(self.acc[self.pos :]) >= 0

    def _held(self, region: str) -> int:
        """Length of the longest suffix of ``region`` that is a proper prefix of
        a stop string."""
        for k in range(min(len(region), self.max_hold), 0, -1):
            tail = region[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def take(self, final: bool = False) -> tuple[str, bool]:
        """Return ``(text, stopped)``: the text that can be delivered now, and
        whether a stop string was found (the text then ends right before it and
        the stream is done). With ``final``, nothing is held back."""
        if self.done:
            return "", False
        region = self.acc[self.pos :]
        i = self._find_stop(region) if self.stops else -1
        if i >= 0:
            self.pos = len(self.acc)
            self.done = True
            return region[:i], True
        if final:
            self.pos = len(self.acc)
            self.done = True
            return region, False
        keep = len(region) - (self._held(region) if self.stops else 0)
        self.pos += keep
        return region[:keep], False
