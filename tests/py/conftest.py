"""Shared fixtures for the Python worker tests.

- ``tiny_model``: a tiny random llama directory made by scripts/make_tiny_model.py
  (once per session, under tmp_path_factory).
- ``ref``: the same model loaded in-process with mlx_lm, for reference outputs.
- ``worker``: one real worker subprocess (``python -m krserve_worker``) shared by
  the tests that only need a live worker; tests that kill or corrupt a worker
  start their own with ``start_worker``.

``WorkerProc`` speaks the protocol over pipes. A reader thread parses every
frame strictly (length prefix + one msgpack map with a str ``t``), so any stray
byte on the worker's stdout fails the test; frames are sorted per request id.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "worker-py"))

from krserve_worker import blas, protocol  # noqa: E402

# The workers under test load OpenBLAS before mlx when the venv has it
# (krserve_worker.blas); so does this process, for its in-process reference
# outputs: both sides then run the same float32 matmuls, summed in the same order.
BLAS = blas.load()

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

START_TIMEOUT = 120.0
TIMEOUT = 60.0


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "make_tiny_model", ROOT / "scripts" / "make_tiny_model.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("tiny") / "model"
    assert _load_script().main([str(out), "--seed", "0"]) == 0
    return str(out)


@pytest.fixture(scope="session")
def ref(tiny_model):
    from mlx_lm import load

    model, tokenizer = load(tiny_model)
    return model, tokenizer


class WorkerProc:
    def __init__(self, model: str, *, env: dict | None = None, args=(), stderr_path=None):
        full_env = dict(os.environ)
        full_env.update({"PYTHONPATH": str(ROOT / "worker-py"), "PYTHONUNBUFFERED": "1"})
        if env:
            full_env.update(env)
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "wb") if stderr_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "krserve_worker", "--model", model, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            env=full_env, cwd=str(ROOT),
        )
        self.frames: queue.Queue = queue.Queue()  # every frame, in order
        self.by_id: dict[int, queue.Queue] = {}
        self.all: list[dict] = []
        self.raw = bytearray()  # every byte read from stdout
        self.stream_error: str | None = None
        self.lock = threading.Lock()
        self.eof = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    # -- stdout parsing (strict) --

    def _read_exact(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.proc.stdout.read(n - len(buf))
            if not chunk:
                return None if not buf else buf
            buf += chunk
        return buf

    def _read(self):
        try:
            while True:
                head = self._read_exact(4)
                if head is None:
                    return
                self.raw += head
                if len(head) < 4:
                    self.stream_error = f"truncated header {head!r}"
                    return
                (n,) = struct.unpack(">I", head)
                if n == 0 or n > protocol.MAX_FRAME:
                    self.stream_error = f"bad frame length {n} (header {head!r})"
                    return
                body = self._read_exact(n)
                self.raw += body or b""
                if body is None or len(body) < n:
                    self.stream_error = "truncated body"
                    return
                try:
                    msg = protocol.decode_body(body)
                except protocol.ProtocolError as e:
                    self.stream_error = f"bad frame: {e}"
                    return
                with self.lock:
                    self.all.append(msg)
                    self.frames.put(msg)
                    if "id" in msg:
                        self._q(msg["id"]).put(msg)
        finally:
            self.eof.set()

    def _q(self, rid):
        with_lock = self.by_id.get(rid)
        if with_lock is None:
            with_lock = self.by_id[rid] = queue.Queue()
        return with_lock

    # -- sending --

    def send(self, *msgs):
        data = b"".join(m if isinstance(m, bytes) else protocol.encode(m) for m in msgs)
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def close_stdin(self):
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    # -- receiving --

    def next_frame(self, timeout=TIMEOUT) -> dict:
        try:
            return self.frames.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no frame within {timeout}s (error: {self.stream_error})")

    def hello(self, timeout=START_TIMEOUT) -> dict:
        m = self.next_frame(timeout)
        assert m["t"] == "hello", m
        return m

    def next_for(self, rid, timeout=TIMEOUT) -> dict:
        with self.lock:
            q = self._q(rid)
        try:
            return q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no frame for id {rid} within {timeout}s "
                                 f"(error: {self.stream_error})")

    def collect(self, rid, timeout=TIMEOUT) -> list[dict]:
        """Frames for ``rid`` up to and including its ``done``/``error``/``tokens``."""
        out = []
        deadline = time.monotonic() + timeout
        while True:
            m = self.next_for(rid, max(0.1, deadline - time.monotonic()))
            out.append(m)
            if m["t"] in ("done", "error", "tokens"):
                return out

    def wait(self, timeout=TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.send({"t": "shutdown"})
            except OSError:
                pass
            self.close_stdin()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._stderr is not subprocess.DEVNULL:
            self._stderr.close()

    def stderr_text(self) -> str:
        if self._stderr is not subprocess.DEVNULL:
            self._stderr.flush()
        return Path(self.stderr_path).read_text(errors="replace") if self.stderr_path else ""


def summarize(frames: list[dict]) -> dict:
    """Fold one request's frames into ids, text, and the final frame."""
    ids, text = [], ""
    for m in frames:
        if m["t"] == "tok":
            ids += m.get("ids", [])
            text += m.get("text", "")
        elif m["t"] == "done":
            text += m.get("text", "")
    return {"ids": ids, "text": text, "last": frames[-1], "frames": frames}


@pytest.fixture
def start_worker(tiny_model, tmp_path):
    procs = []

    def start(model=None, *, env=None, args=()):
        w = WorkerProc(model or tiny_model, env=env, args=args,
                       stderr_path=tmp_path / f"worker{len(procs)}.stderr")
        procs.append(w)
        return w

    yield start
    for w in procs:
        w.stop()


@pytest.fixture(scope="session")
def worker(tiny_model, tmp_path_factory):
    w = WorkerProc(tiny_model, stderr_path=tmp_path_factory.mktemp("w") / "worker.stderr")
    w.hello_msg = w.hello()
    yield w
    w.stop()


_ids = iter(range(1000, 10**9))


@pytest.fixture
def new_id():
    return lambda: next(_ids)
