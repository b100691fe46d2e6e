"""The remote end of a rank started over ssh (``krserve up --hostfile``).

The supervisor starts a rank on another host as (supervisor/remote.go)::

    ssh [--ssh options] -T -o BatchMode=yes HOST \\
        'exec env VARS... PYTHON -m krserve_worker.remote --rank R --idle-exit S --grace S -- COMMAND...'

This process, the wrapper, sits between sshd and the worker and ties the
worker's life to the ssh session, which sshd alone does not do: without a
terminal, a session that ends leaves its command running (no SIGHUP), and one
whose network is cut stays open until TCP gives up, hours later.

- It writes ``MARKER`` on stdout before anything else, so the supervisor can
  skip whatever the remote login shell printed first (an rc file's ``echo``
  would otherwise land in rank 0's protocol stream).
- Its stdin carries what the supervisor writes, in frames (4-byte big-endian
  length, then the body): first one of its own, JSON ``{"env": {...}}``,
  variables that must not appear on a command line (the group's token); then
  rank 0's protocol frames, which it passes to the worker byte for byte; and
  keep-alive frames of length 0 (no protocol frame is empty), which it drops.
- It runs COMMAND in a session and process group of its own (on Linux also
  with the parent-death signal), with ``MLX_HOSTFILE`` pointing at a file it
  writes from ``KRSERVE_RING_HOSTS`` (the ring backend's addresses).
- It SIGKILLs the worker's process group when its stdin ends (the supervisor
  stopped or killed this rank's ssh, or died, and the session closed) and the
  worker has not exited within ``--grace`` seconds; when nothing has arrived
  on stdin for ``--idle-exit`` seconds (the network to the supervisor is cut:
  the supervisor writes at least a keep-alive every heartbeat interval); and on
  SIGTERM, SIGHUP or SIGINT, as when stdin ends.
- When the worker exits it SIGKILLs whatever is left in the worker's process
  group, removes the file it wrote and exits with the worker's status, or
  128+N with a line on stderr when signal N ended the worker (ssh carries a
  status, not a signal).

It imports the standard library only: it starts in a few tens of
milliseconds and holds a few MiB.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

MARKER = b"\x00krserve-remote\x00\n"
MAX_FRAME = 64 << 20


def log(rank: int, msg: str) -> None:
    try:
        sys.stderr.write(f"krserve-remote: rank {rank} on {socket.gethostname()}: {msg}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_preamble(fd: int, idle: float) -> dict:
    """The supervisor's first frame: JSON with the environment to add."""
    buf = b""
    deadline = time.monotonic() + idle
    while True:
        if len(buf) >= 4:
            (n,) = struct.unpack(">I", buf[:4])
            if n == 0 or n > MAX_FRAME:
                raise ValueError(f"first frame of length {n} is not a preamble")
            if len(buf) >= 4 + n:
                doc = json.loads(buf[4:4 + n])
                rest = buf[4 + n:]
                if not isinstance(doc, dict) or not isinstance(doc.get("env", {}), dict):
                    raise ValueError("preamble is not a JSON object with an env object")
                doc["_rest"] = rest
                return doc
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no preamble within {idle:g}s")
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            raise EOFError("stdin ended before the preamble")
        buf += chunk


class Relay:
    """Passes the supervisor's frames from fd 0 to the worker's stdin and drops
    keep-alives; notes when a byte last came and when stdin ended."""

    def __init__(self, src: int, dst: int, rest: bytes):
        self.src, self.dst = src, dst
        self.buf = bytearray(rest)
        self.last = time.monotonic()
        self.ended = threading.Event()
        self.thread = threading.Thread(target=self._run, name="relay", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _flush_frames(self) -> None:
        while len(self.buf) >= 4:
            (n,) = struct.unpack(">I", self.buf[:4])
            if n == 0:  # keep-alive
                del self.buf[:4]
                continue
            if len(self.buf) < 4 + n:
                return
            frame = bytes(self.buf[:4 + n])
            del self.buf[:4 + n]
            if self.dst >= 0:
                try:
                    _write_all(self.dst, frame)
                except OSError:  # the worker closed its input: it is exiting
                    os.close(self.dst)
                    self.dst = -1

    def _run(self) -> None:
        try:
            self._flush_frames()
            while True:
                chunk = os.read(self.src, 65536)
                if not chunk:
                    break
                self.last = time.monotonic()
                self.buf += chunk
                self._flush_frames()
        except OSError:
            pass
        finally:
            if self.dst >= 0:
                try:
                    os.close(self.dst)  # the worker sees EOF too
                except OSError:
                    pass
                self.dst = -1
            self.ended.set()


def _exited(child: subprocess.Popen) -> bool:
    """Whether the child has exited, without reaping it where the platform
    allows (so its process group id stays reserved until we have killed what
    is left in it)."""
    if hasattr(os, "waitid"):
        try:
            return os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True
    return child.poll() is not None


def _parent_death_signal():
    """On Linux, the worker is SIGKILLed should this wrapper be killed."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def set_pdeathsig():
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    return set_pdeathsig


def run(rank: int, idle: float, grace: float, command: list[str]) -> int:
    _write_all(1, MARKER)
    try:
        pre = _read_preamble(0, idle)
    except (ValueError, TimeoutError, EOFError, OSError) as e:
        log(rank, f"no start: {e}")
        return 2
    env = dict(os.environ)
    env.update({str(k): str(v) for k, v in pre.get("env", {}).items()})
    hostfile = None
    ring = env.pop("KRSERVE_RING_HOSTS", None)
    if ring is not None:
        fd, hostfile = tempfile.mkstemp(prefix="krserve-ring-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(ring)
        env["MLX_HOSTFILE"] = hostfile
    ended = threading.Event()  # a signal asked us to end, as stdin ending does
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, lambda *_: ended.set())
    try:
        child = subprocess.Popen(command, stdin=subprocess.PIPE, env=env, start_new_session=True,
                                 preexec_fn=_parent_death_signal())
    except OSError as e:
        log(rank, f"cannot start {command[0]}: {e}")
        if hostfile:
            os.unlink(hostfile)
        return 127
    log(rank, f"started pid {child.pid}")
    relay = Relay(0, os.dup(child.stdin.fileno()), pre["_rest"])
    child.stdin.close()
    relay.start()
    ended_at = None
    killed = None
    while not _exited(child):
        now = time.monotonic()
        if ended_at is None and (relay.ended.is_set() or ended.is_set()):
            ended_at = now
        if killed is None:
            if ended_at is not None and now - ended_at >= grace:
                killed = f"its ssh session ended and it did not exit within {grace:g}s"
            elif ended_at is None and now - relay.last >= idle:
                killed = f"nothing came from the supervisor for {idle:g}s (network cut?)"
            if killed:
                log(rank, f"killing pid {child.pid} and its process group: {killed}")
                try:
                    os.killpg(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(0.05)
    try:  # what the worker left in its group (still ours while it is a zombie)
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    code = child.wait()
    if hostfile:
        try:
            os.unlink(hostfile)
        except OSError:
            pass
    if code < 0:
        name = signal.Signals(-code).name
        log(rank, f"worker pid {child.pid} was killed by {name}")
        return 128 - code
    return code


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: python -m krserve_worker.remote --rank R --idle-exit SECONDS --grace SECONDS -- COMMAND...",
              file=sys.stderr)
        return 2
    i = argv.index("--")
    opts, command = argv[:i], argv[i + 1:]
    import argparse

    ap = argparse.ArgumentParser(prog="python -m krserve_worker.remote")
    ap.add_argument("--rank", type=int, default=-1)
    ap.add_argument("--idle-exit", type=float, required=True,
                    help="end the worker after this many seconds without a byte on stdin")
    ap.add_argument("--grace", type=float, default=3.0,
                    help="after stdin ends, seconds the worker has to exit before SIGKILL")
    args = ap.parse_args(opts)
    if not command:
        ap.error("no command after --")
    return run(args.rank, args.idle_exit, args.grace, command)


if __name__ == "__main__":
    sys.exit(main())
