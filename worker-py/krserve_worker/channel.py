"""The worker's side of the protocol channel: framing over the protected fds.

``__main__`` moves the protocol pipes away from fds 0 and 1 before anything is
imported (so stray ``print()`` calls, C-level writes to fd 1 and ``input()``
prompts can never touch protocol bytes) and hands the private fds to
``FrameReader`` and ``FrameWriter``.

Frames are a 4-byte big-endian body length and one msgpack map (see
docs/protocol.md and ``protocol.py``). This module imports only the standard
library and msgpack (through ``protocol``).
"""

from __future__ import annotations

import os
import threading

from . import protocol
from .protocol import MAX_FRAME, ProtocolError  # noqa: F401  (re-exported)

READ_CHUNK = 65536


class FrameReader:
    """Reads frames from a pipe fd with ``os.read`` into a buffer.

    ``read()`` returns the next decoded message, or None on a clean EOF between
    frames. Any malformation (zero/oversized length, EOF inside a frame, a body
    that is not one msgpack map with a str ``t``) raises ProtocolError.
    """

    def __init__(self, fd: int):
        self.fd = fd
        self.buf = bytearray()
        self.eof = False

    def _fill(self) -> bool:
        chunk = os.read(self.fd, READ_CHUNK)
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def read(self) -> dict | None:
        while True:
            head = protocol.split_frame(self.buf)  # checks the length first
            if head is not None:
                _, total = head
                if len(self.buf) >= total:
                    body = bytes(self.buf[4:total])
                    del self.buf[:total]
                    return protocol.decode_body(body)
            if self.eof or not self._fill():
                if self.buf:
                    need = head[1] if head else 4
                    raise ProtocolError(
                        f"truncated frame: EOF with {len(self.buf)} of {need} bytes"
                    )
                return None

    def read_batch(self) -> list[dict] | None:
        """Block for the next message, then also return every further message
        already complete in the buffer (frames the peer wrote together arrive
        together). None on a clean EOF."""
        first = self.read()
        if first is None:
            return None
        out = [first]
        while True:
            head = protocol.split_frame(self.buf)
            if head is None or len(self.buf) < head[1]:
                return out
            out.append(self.read())


class FrameWriter:
    """Writes whole buffers of frames under a lock, looping on ``os.write``."""

    def __init__(self, fd: int):
        self.fd = fd
        self.lock = threading.Lock()
        self.closed = False

    def write(self, data: bytes) -> None:
        if not data:
            return
        view = memoryview(data)
        with self.lock:
            if self.closed:
                return
            while view:
                n = os.write(self.fd, view)
                view = view[n:]

    def close(self) -> None:
        with self.lock:
            self.closed = True
