"""Worker.gather: before a prefill step, the main thread waits for the gens
the reader thread is still tokenizing (Shared.tokenizing), until a deadline
(GATHER_S after the insert), and only for those. And the reader counts the gens of a read until it has
queued them."""

from __future__ import annotations

import os
import queue
import time
from types import SimpleNamespace

import msgpack

from krserve_worker import worker
from krserve_worker.channel import FrameReader, FrameWriter
from krserve_worker.reader import Reader, Shared


class ReaderQueue:
    """A queue whose blocking get stands for the reader finishing a read:
    it hands over the next item and lowers the count of gens in tokenizing."""

    def __init__(self, shared, reads):
        self.shared, self.reads, self.ready = shared, list(reads), []
        self.blocking_gets = 0

    def get(self, timeout=None):
        self.blocking_gets += 1
        if not self.reads:
            raise queue.Empty
        n, item = self.reads.pop(0)
        self.shared.tokenizing -= n
        return item

    def get_nowait(self):
        if not self.ready:
            raise queue.Empty
        return self.ready.pop(0)


def _worker(shared, q):
    return SimpleNamespace(shared=shared, q=q)


def test_waits_for_the_reads_in_tokenizing():
    shared = Shared()
    shared.tokenizing = 3
    q = ReaderQueue(shared, [(2, ("msgs", ["a", "b"])), (1, ("msgs", ["c"]))])
    q.ready = [("msgs", ["d"])]  # queued meanwhile
    items = worker.Worker.gather(_worker(shared, q), time.monotonic() + 60)
    assert items == [("msgs", ["a", "b"]), ("msgs", ["c"]), ("msgs", ["d"])]
    assert q.blocking_gets == 2 and shared.tokenizing == 0


def test_nothing_in_tokenizing_never_blocks():
    shared = Shared()
    q = ReaderQueue(shared, [(0, ("msgs", ["late"]))])
    q.ready = [("msgs", ["x"])]
    assert worker.Worker.gather(_worker(shared, q), time.monotonic() + 60) == [("msgs", ["x"])]
    assert q.blocking_gets == 0


def test_a_read_that_never_ends_is_waited_for_until_the_deadline():
    shared = Shared()
    shared.tokenizing = 1
    q = queue.Queue()  # the reader never queues it
    assert worker.Worker.gather(_worker(shared, q), time.monotonic() + 0.02) == []
    assert worker.Worker.gather(_worker(shared, q), time.monotonic() - 1) == []  # past: no wait


def _frame(msg) -> bytes:
    body = msgpack.packb(msg)
    return len(body).to_bytes(4, "big") + body


def test_reader_counts_gens_until_they_are_queued(tiny_model):
    """The reader raises Shared.tokenizing by a read's gens before it
    tokenizes them and lowers it before it queues them: a tokenizer that
    looks at the count sees both gens of the read, and after the item is
    queued the count is back to 0."""
    from mlx_lm import load

    _, tok = load(tiny_model)
    seen = []

    class Peeking:
        def __getattr__(self, name):
            return getattr(tok, name)

        def apply_chat_template(self, *a, **k):
            seen.append(shared.tokenizing)
            return tok.apply_chat_template(*a, **k)

    shared = Shared()
    q: queue.Queue = queue.Queue()
    r_in, w_in = os.pipe()
    r_out, w_out = os.pipe()
    reader = Reader(FrameReader(r_in), FrameWriter(w_out), q, Peeking(), shared)
    gens = [{"t": "gen", "id": i, "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 1}
            for i in (1, 2)]
    os.write(w_in, b"".join(_frame(g) for g in gens))  # one write: one read
    reader.start()
    kind, msgs = q.get(timeout=30)
    assert kind == "msgs" and [m["id"] for m in msgs] == [1, 2]
    assert seen == [2, 2]
    assert shared.tokenizing == 0
    os.close(w_in)  # EOF: the reader queues an exit and ends
    assert q.get(timeout=30)[0] == "exit"
    reader.join(timeout=30)
    assert not reader.is_alive()
    for fd in (r_in, r_out, w_out):
        os.close(fd)
