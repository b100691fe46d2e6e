"""The wrapper a rank on another host runs under (krserve_worker.remote), on
its own: what it passes to the worker, and when it kills the worker's process
group. End-to-end runs through ssh are in test_hostfile.py."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from _server import pid_alive

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "worker-py"))

from krserve_worker.remote import MARKER  # noqa: E402

RING = json.dumps([["127.0.0.1:4001"], ["127.0.0.1:4002"]])


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def preamble(**env) -> bytes:
    return frame(json.dumps({"env": env}).encode())


KEEPALIVE = frame(b"")

# A worker that records what it was given and exits when its stdin ends.
ECHO = textwrap.dedent("""
    import json, os, sys
    data = sys.stdin.buffer.read()
    ring = open(os.environ["MLX_HOSTFILE"]).read()
    json.dump({"data": data.hex(), "token": os.environ.get("KRSERVE_GROUP_TOKEN"), "ring": ring,
               "hostfile": os.environ["MLX_HOSTFILE"], "pgid": os.getpgid(0), "pid": os.getpid()},
              open(sys.argv[1], "w"))
""")

# A worker that ignores its stdin and has a child of its own in its process group.
STUBBORN = textwrap.dedent("""
    import os, subprocess, sys, time
    sub = subprocess.Popen(["sleep", "1000"])
    open(sys.argv[1] + ".tmp", "w").write(f"{os.getpid()} {sub.pid}")
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    while True:
        time.sleep(1)
""")


def wrapper(child: str, out: Path, *, idle=30.0, grace=0.5, env=None):
    e = dict(os.environ, PYTHONPATH=str(ROOT / "worker-py"), KRSERVE_RING_HOSTS=RING, **(env or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "krserve_worker.remote", "--rank", "1", "--idle-exit", str(idle), "--grace", str(grace),
         "--", sys.executable, "-c", child, str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=e)


def wait_file(p: Path, proc, timeout=30.0) -> str:
    deadline = time.monotonic() + timeout
    while not p.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, f"{p} not written"
        time.sleep(0.02)
    return p.read_text()


def wait_gone(pids, timeout=15.0):
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    return [p for p in pids if pid_alive(p)]


def test_frames_pass_keepalives_drop_and_environment(tmp_path):
    out = tmp_path / "got.json"
    w = wrapper(ECHO, out)
    assert w.stdout.read(len(MARKER)) == MARKER  # first, before the worker can write
    f1, f2 = frame(b"\x81\xa1t\xa4ping"), frame(b"x" * 70000)  # the second spans several reads
    w.stdin.write(preamble(KRSERVE_GROUP_TOKEN="s3cret") + f1 + KEEPALIVE)
    w.stdin.flush()
    w.stdin.write(f2[:100])
    w.stdin.flush()
    w.stdin.write(f2[100:] + KEEPALIVE + KEEPALIVE)
    w.stdin.close()
    assert w.wait(30) == 0, w.stderr.read().decode()
    got = json.loads(out.read_text())
    assert bytes.fromhex(got["data"]) == f1 + f2
    assert got["token"] == "s3cret"
    assert got["ring"] == RING
    assert not os.path.exists(got["hostfile"]), "the ring host file outlived the rank"
    assert got["pgid"] == got["pid"], "the worker is not the leader of its own process group"
    assert "started pid" in w.stderr.read().decode()


def test_session_end_kills_a_worker_that_does_not_exit(tmp_path):
    out = tmp_path / "pids"
    w = wrapper(STUBBORN, out, grace=0.3)
    w.stdin.write(preamble())
    w.stdin.flush()
    pids = [int(x) for x in wait_file(out, w).split()]
    assert all(pid_alive(p) for p in pids)
    w.stdin.close()  # what sshd does when the session ends
    assert w.wait(30) == 128 + signal.SIGKILL
    assert wait_gone(pids) == [], "the worker or its child outlived the session"
    err = w.stderr.read().decode()
    assert "ssh session ended" in err and "killed by SIGKILL" in err, err


def test_silence_ends_the_rank_and_keepalives_hold_it(tmp_path):
    out = tmp_path / "pids"
    w = wrapper(STUBBORN, out, idle=1.0)
    w.stdin.write(preamble())
    w.stdin.flush()
    pids = [int(x) for x in wait_file(out, w).split()]
    for _ in range(15):  # 3 s of keep-alives, one every 0.2 s: past the 1 s idle limit
        w.stdin.write(KEEPALIVE)
        w.stdin.flush()
        time.sleep(0.2)
    assert w.poll() is None and all(pid_alive(p) for p in pids), w.stderr.read().decode() if w.poll() else ""
    # Then nothing, with the session still open: a cut network.
    assert w.wait(30) == 128 + signal.SIGKILL
    assert wait_gone(pids) == []
    assert "nothing came from the supervisor" in w.stderr.read().decode()
    w.stdin.close()


def test_sigterm_to_the_wrapper_ends_the_group(tmp_path):
    out = tmp_path / "pids"
    w = wrapper(STUBBORN, out, grace=0.2)
    w.stdin.write(preamble())
    w.stdin.flush()
    pids = [int(x) for x in wait_file(out, w).split()]
    w.send_signal(signal.SIGTERM)
    assert w.wait(30) == 128 + signal.SIGKILL
    assert wait_gone(pids) == []
    w.stdin.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_sigkill_of_the_wrapper_takes_the_worker(tmp_path):
    out = tmp_path / "pids"
    w = wrapper(STUBBORN, out)
    w.stdin.write(preamble())
    w.stdin.flush()
    worker, _ = [int(x) for x in wait_file(out, w).split()]
    w.kill()
    w.wait(30)
    assert wait_gone([worker]) == []
    w.stdin.close()


@pytest.mark.parametrize("child,want", [
    ("import sys; sys.exit(5)", 5),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", 128 + 9),
])
def test_exit_status(tmp_path, child, want):
    w = wrapper(child, tmp_path / "unused")
    w.stdin.write(preamble())
    w.stdin.flush()
    assert w.wait(30) == want
    err = w.stderr.read().decode()
    if want > 128:
        assert "was killed by SIGKILL" in err, err
    w.stdin.close()


def test_no_preamble_no_worker(tmp_path):
    w = wrapper(ECHO, tmp_path / "never")
    w.stdin.write(b"junk")
    w.stdin.close()
    assert w.wait(30) == 2
    assert "no start" in w.stderr.read().decode()
    assert not (tmp_path / "never").exists()
