"""Ranks on "other hosts" (krserve up --hostfile), through a stand-in for ssh
(fakessh.py, first on PATH): it records its arguments and runs the remote
command locally in a session of its own, with a login's environment, relaying
its stdio as sshd would. The tiny model (4 attention heads, 2 KV heads) runs as
a group of 2 over the ring backend on 127.0.0.1 addresses from the host file.

What this shows, and what it cannot (docs/deploy.md, "Ranks on several
machines"): the command lines, environment, start, kill and restart of ranks
behind ssh, here on one machine; not a real network, real sshd or several
machines.

- the group's greedy output equals one process's, with both ranks behind ssh
  and with rank 0 on this machine;
- ssh's command line carries the user's ssh options, MLX_RANK, the ring's
  addresses, rank 0's control address and the worker's command and
  environment, and not the group's secret;
- SIGKILL of the remote follower's worker mid-stream: the group is restarted
  and every stream completes;
- SIGKILL of krserve: nothing the fake ssh started survives;
- bad host files are refused before anything starts.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _server import Server, krserve_bin, pid_alive, tiny_model
from test_group import PROMPTS, N, body, ranks, resumed_total, stream

WORKER_PY = Path(__file__).resolve().parents[2] / "worker-py"

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("hostfile") / "tiny")


@pytest.fixture(scope="module")
def want(model_dir):
    """What one process answers, greedy."""
    s = Server(model_dir)
    try:
        with cf.ThreadPoolExecutor(len(PROMPTS)) as ex:
            texts = list(ex.map(lambda p: s.post("/v1/completions", body(p, N))[1]["choices"][0]["text"], PROMPTS))
    finally:
        assert s.stop() == 0, s.log()
    return dict(zip(PROMPTS, texts))


def free_port_run(n: int) -> int:
    """The first of n consecutive ports free on 127.0.0.1 right now."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


class FakeHosts:
    """A directory with an `ssh` that is fakessh.py, a log of its calls and a
    tag that marks every process it starts."""

    def __init__(self, tmp: Path, hosts: list[dict]):
        self.dir = tmp
        (tmp / "bin").mkdir()
        ssh = tmp / "bin" / "ssh"
        ssh.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(HERE / 'fakessh.py'))} \"$@\"\n")
        ssh.chmod(0o755)
        self.log = tmp / "ssh.jsonl"
        self.tag = f"hostfile-test-{os.getpid()}-{random.randrange(1 << 30)}"
        self.hostfile = tmp / "hosts.json"
        self.hostfile.write_text(json.dumps(hosts))
        self.port = free_port_run(3 * 8)  # a block of 3 per group start, several restarts

    def env(self) -> dict:
        # PYTHONPATH is set (the worker package's directory, harmless beside an
        # editable install) so the test can see it travel to the remote login,
        # which does not have it.
        pythonpath = os.pathsep.join(p for p in (str(WORKER_PY), os.environ.get("PYTHONPATH", "")) if p)
        return {"PATH": f"{self.dir / 'bin'}:{os.environ['PATH']}", "FAKESSH_LOG": str(self.log),
                "FAKESSH_TAG": self.tag, "FAKESSH_BANNER": "Welcome to hostX\n", "PYTHONPATH": pythonpath}

    def args(self, *more: str) -> list[str]:
        return ["--hostfile", str(self.hostfile), "--ring-port", str(self.port), "--ssh", "ssh -o ServerAliveInterval=5", *more]

    def calls(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []

    def processes(self, exclude=()) -> list[dict]:
        """Every live process carrying this test's tag (what the fake ssh started)."""
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) in exclude:
                continue
            try:
                env = dict(kv.split("=", 1) for kv in (d / "environ").read_bytes().decode(errors="replace").split("\0") if "=" in kv)
                argv = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
            except (OSError, ValueError):
                continue
            if env.get("FAKESSH_TAG") == self.tag and pid_alive(int(d.name)):
                out.append({"pid": int(d.name), "argv": argv, "env": env})
        return out

    def worker(self, rank: int, exclude=()) -> dict:
        """The worker process of rank (not its wrapper), started behind the fake ssh."""
        found = [p for p in self.processes(exclude) if p["argv"][1:3] == ["-m", "krserve_worker"] and p["env"].get("MLX_RANK") == str(rank)]
        assert len(found) == 1, found
        return found[0]


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"{what} within {timeout}s")


def wait_new_group(server, old_pids, timeout=120):
    def up():
        server.wait_ready(timeout)
        rs = ranks(server)
        return rs if len(rs) == 2 and all(r["alive"] for r in rs) and not {r["pid"] for r in rs} & set(old_pids) else None
    return wait_for(up, timeout, "a new group")


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    hosts = FakeHosts(tmp_path_factory.mktemp("fakehosts"), [{"ssh": "hostA", "ips": ["127.0.0.1"]}, {"ssh": "hostB", "ips": ["127.0.0.1"]}])
    return hosts


@pytest.fixture(scope="module")
def group(model_dir, remote):
    s = Server(model_dir, *remote.args("--heartbeat", "200ms", "--progress-timeout", "3s", "--stop-grace", "1s"), env=remote.env())
    yield s
    assert s.stop() == 0, s.log()
    assert wait_for(lambda: not remote.processes(exclude=[s.proc.pid]), 15, "no remote process after a clean stop")


def test_group_over_ssh_matches_one_process(group, want):
    rs = ranks(group)
    assert [(r["rank"], r["host"]) for r in rs] == [(0, "hostA"), (1, "hostB")], rs
    with cf.ThreadPoolExecutor(len(PROMPTS)) as ex:
        got = list(ex.map(lambda p: group.post("/v1/completions", body(p, N))[1]["choices"][0]["text"], PROMPTS))
    assert dict(zip(PROMPTS, got)) == want
    # The login banner came before the wrapper's marker and was set aside, not read as frames.
    assert "ignored output before the remote worker started" in group.log() and "Welcome to hostX" in group.log()


def test_ssh_command_line(group, remote, model_dir):
    calls = sorted(remote.calls()[:2], key=lambda c: c["host"])  # the two ssh processes log in either order
    base = remote.port
    ring = json.dumps([[f"127.0.0.1:{base}"], [f"127.0.0.1:{base + 1}"]], separators=(",", ":"))
    for rank, call in enumerate(calls):
        argv = call["argv"]
        host = ["hostA", "hostB"][rank]
        assert argv[:6] == ["-o", "ServerAliveInterval=5", "-T", "-o", "BatchMode=yes", host], argv
        assert len(argv) == 7, "the remote command is one argument"
        words = shlex.split(argv[6])
        assert words[:2] == ["exec", "env"], words
        i = words.index("-m")
        python, wrapper = words[i - 1], words[i - 1:]
        env = dict(w.split("=", 1) for w in words[2:i - 1])
        assert python == sys.executable
        assert env["MLX_RANK"] == str(rank)
        assert env["KRSERVE_GROUP_ADDR"] == f"127.0.0.1:{base + 2}"
        assert env["KRSERVE_RING_HOSTS"] == ring
        assert env["PYTHONPATH"] == remote.env()["PYTHONPATH"]  # the fake remote login does not have it: it must travel
        for local in ("PATH", "HOME", "USER", "TMPDIR", "KRSERVE_GROUP_TOKEN"):
            assert local not in env, local
        j = wrapper.index("--")
        assert wrapper[:j] == [python, "-m", "krserve_worker.remote", "--rank", str(rank), "--idle-exit", "10", "--grace", "1"], wrapper
        worker = wrapper[j + 1:]
        assert worker[:5] == [python, "-m", "krserve_worker", "--model", str(model_dir)], worker
        assert worker[-2:] == ["--group-size", "2"], worker
    # And what the worker behind the fake ssh got: the ring's host file, the token from the preamble.
    for rank in (0, 1):
        w = remote.worker(rank)
        assert Path(w["env"]["MLX_HOSTFILE"]).read_text() == ring
        token = w["env"]["KRSERVE_GROUP_TOKEN"]
        assert len(token) == 32
        assert not [c for c in remote.calls() if token in json.dumps(c)], "the group's secret is on a command line"
        assert w["env"]["KRSERVE_GROUP_ADDR"] == f"127.0.0.1:{base + 2}"


def test_kill_remote_follower_mid_stream(group, remote, want):
    old = wait_new_group(group, [])
    ssh_pids = [r["pid"] for r in old]
    victim = remote.worker(1, exclude=[group.proc.pid])["pid"]
    behind = [p["pid"] for p in remote.processes(exclude=[group.proc.pid])]
    killed = []

    def on_chunk(i):
        if i == 10 and not killed:
            killed.append(victim)
            os.kill(victim, signal.SIGKILL)

    resumed = resumed_total(group)
    with cf.ThreadPoolExecutor(len(PROMPTS)) as ex:
        futs = {p: ex.submit(stream, group.url, body(p, N, True), on_chunk if p == PROMPTS[0] else None) for p in PROMPTS}
        got = {p: f.result(240) for p, f in futs.items()}
    assert killed == [victim]
    assert resumed_total(group) > resumed, "the kill did not land mid-stream"
    for p in PROMPTS:
        assert got[p] == (want[p], "length"), p
    new = wait_new_group(group, ssh_pids)
    assert [r["host"] for r in new] == ["hostA", "hostB"]
    # The old group is gone on both sides of ssh: its ssh processes, wrappers and workers.
    assert wait_for(lambda: not [p for p in behind + ssh_pids if pid_alive(p)], 15, "the old group's processes gone")
    # The group's exit blames the killed follower, not the leader that saw its
    # ring link drop first (supervisor.blame); the server's output is read by
    # a thread of the test's, so wait for the line.
    def exits():
        return [l for l in group.log().splitlines() if 'msg="worker exited"' in l]
    try:
        wait_for(lambda: [l for l in exits() if "rank 1 of 2 (on hostB, over ssh)" in l], 15, "the exit names the remote rank")
    except AssertionError:
        raise AssertionError("\n".join(exits())) from None
    assert "was killed by SIGKILL" in group.log()
    _, st = group.get("/stats")
    assert st["workers"][0]["last_exit"]["reason"] == "crash"
    # The restarted group took the next block of ports.
    assert any(f"127.0.0.1:{remote.port + 3}" in c["command"] for c in remote.calls()[2:]), remote.calls()


def test_local_rank0_and_supervisor_sigkill(model_dir, want, tmp_path):
    """Rank 0 on this machine (its host's ssh name is 127.0.0.1), rank 1
    behind ssh; then SIGKILL of krserve leaves no process anywhere."""
    hosts = FakeHosts(tmp_path, [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}, {"ssh": "hostB", "ips": ["127.0.0.1"]}])
    s = Server(model_dir, *hosts.args("--stop-grace", "1s"), env=hosts.env())
    try:
        rs = ranks(s)
        assert [r.get("host", "") for r in rs] == ["", "hostB"], rs
        assert [c["host"] for c in hosts.calls()] == ["hostB"], "rank 0 went through ssh"
        _, r = s.post("/v1/completions", body(PROMPTS[1], N))
        assert r["choices"][0]["text"] == want[PROMPTS[1]]
        local_rank0 = rs[0]["pid"]
        behind = hosts.processes(exclude=[s.proc.pid])
        assert len(behind) >= 3, behind  # the fake ssh's session: sh or the wrapper, and the worker
        s.stop(signal.SIGKILL)
        assert wait_for(lambda: not hosts.processes() and not pid_alive(local_rank0), 15,
                        "no rank, wrapper or worker left after SIGKILL of krserve")
    finally:
        s.stop(signal.SIGKILL)


def up_refused(*args, timeout=60):
    r = subprocess.run([str(krserve_bin()), "up", "--python", sys.executable, "--port", "0", *args],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode != 0, r
    return r.stderr + r.stdout


@pytest.mark.parametrize("content,want", [
    ('[\n  {"ssh": "a", "ips": ["127.0.0.1"]},\n  {"ssh": "b" "ips": []}\n]', ":3:15: invalid JSON"),
    ('[{"ssh": "a", "ips": ["127.0.0.1"]}]', "lists one host"),
    ('[{"ssh": "a", "ips": ["127.0.0.1"]}, {"ssh": "b"}]', 'host 1 (b) has no "ips"'),
    ('{"backend": "jaccl", "hosts": [{"ssh": "a", "ips": ["127.0.0.1"]}, {"ssh": "b", "ips": ["127.0.0.1"]}]}', "JACCL"),
], ids=["syntax", "one-host", "no-ips", "jaccl"])
def test_bad_host_files_are_refused(model_dir, tmp_path, content, want):
    hf = tmp_path / "hosts.json"
    hf.write_text(content)
    out = up_refused("--model", str(model_dir), "--hostfile", str(hf))
    assert f"--hostfile {hf}" in out and want in out, out


def test_group_size_comes_from_the_file(model_dir, tmp_path):
    hf = tmp_path / "hosts.json"
    hf.write_text(json.dumps([{"ssh": h, "ips": ["127.0.0.1"]} for h in ("a", "b", "c")]))
    out = up_refused("--model", str(model_dir), "--hostfile", str(hf), "--group-size", "2")
    assert "--group-size 2, but --hostfile" in out and "lists 3 hosts" in out, out
    out = up_refused("--model", str(model_dir), "--hostfile", str(hf))  # 3 ranks: 4 heads do not split
    assert "--group-size 3: the model has 4 attention heads and 2 KV heads" in out, out
