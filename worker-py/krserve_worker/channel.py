"""The worker's side of the protocol channel: fd protection and framing.

``protect_stdio()`` must run before anything heavy is imported: it moves the
protocol pipes away from fds 0 and 1 so that stray ``print()`` calls, C-level
writes to fd 1 and ``input()`` prompts can never touch protocol bytes.

Frames are a 4-byte big-endian body length and one msgpack map (see
docs/protocol.md and ``protocol.py``). This module imports only the standard
library and msgpack (through ``protocol``).
"""

from __future__ import annotations

import io
import os
import sys
import threading

from . import protocol
from .protocol import MAX_FRAME, ProtocolError  # noqa: F401  (re-exported)

READ_CHUNK = 65536


def protect_stdio() -> tuple[int, int]:
    """Move the protocol off fds 0/1; return ``(proto_in, proto_out)``.

    Afterwards fd 0 is /dev/null, fd 1 is a copy of fd 2 (stderr), and
    ``sys.stdout`` writes to stderr. The dup'd fds are non-inheritable.
    """
    proto_in = os.dup(0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    proto_out = os.dup(1)
    os.dup2(2, 1)
    try:
        sys.stdout.flush()
    except Exception:
        pass
    sys.stdout = io.TextIOWrapper(
        io.FileIO(os.dup(2), "w", closefd=True), encoding="utf-8", errors="replace",
        line_buffering=True, write_through=True,
    )
    sys.__stdout__ = sys.stdout
    return proto_in, proto_out


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
