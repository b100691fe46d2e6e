"""A worker that is a group of ranks (--group-size 2): the tiny model (4
attention heads, 2 KV heads) split over two processes with mlx.distributed's
ring backend over loopback, through a real krserve.

- the group's output equals one process's (greedy, and seeded sampling);
- SIGKILL of either rank mid-stream restarts the whole group and every client
  stream completes with the text a crash-free run gives;
- a follower stopped with SIGSTOP wedges the group (rank 0 waits in a
  collective): the progress watchdog restarts it;
- SIGKILL of krserve leaves no rank behind (each has the parent-death signal);
- sizes and models that cannot work are refused before anything starts.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from _server import Server, krserve_bin, pid_alive, tiny_model

PROMPTS = ["Once upon a time", "The quick brown fox", "In a galaxy far away", "Hello"]
N = 120


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("group") / "tiny")


def body(prompt, n, stream=False, **kw):
    return {"model": "default", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "stream": stream, **kw}


SEEDED = dict(temperature=0.9, top_p=0.95, seed=7)

# Constrained requests: each rank compiles the grammar and masks its logits.
ASK = [{"role": "user", "content": "Describe a fictional person."}]
SCHEMA = {"type": "json_schema", "json_schema": {"name": "p", "schema": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["name", "age"], "additionalProperties": False}}}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"]}}}
CONSTRAINED = [
    {"model": "default", "messages": ASK, "max_tokens": 120, "temperature": 0, "response_format": SCHEMA},
    {"model": "default", "messages": ASK, "max_tokens": 60, "temperature": 0, "tools": [TOOL],
     "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
]


def constrained(server):
    out = []
    for b in CONSTRAINED:
        status, r = server.post("/v1/chat/completions", b)
        assert status == 200, r
        msg = r["choices"][0]["message"]
        for c in msg.get("tool_calls") or []:
            c.pop("id")  # named after the request: differs between servers
        out.append(msg)
    return out


@pytest.fixture(scope="module")
def want(model_dir):
    """What one process answers: each prompt greedy, one seeded sample, the
    constrained requests."""
    s = Server(model_dir)
    try:
        with cf.ThreadPoolExecutor(len(PROMPTS)) as ex:
            texts = list(ex.map(lambda p: s.post("/v1/completions", body(p, N))[1]["choices"][0]["text"], PROMPTS))
        _, seeded = s.post("/v1/completions", body(PROMPTS[0], 40, **SEEDED))
        cons = constrained(s)
    finally:
        assert s.stop() == 0, s.log()
    return dict(zip(PROMPTS, texts)), seeded["choices"][0]["text"], cons


@pytest.fixture(scope="module")
def group(model_dir):
    s = Server(model_dir, "--group-size", "2", "--heartbeat", "200ms", "--progress-timeout", "3s")
    yield s
    assert s.stop() == 0, s.log()


def ranks(server):
    _, st = server.get("/stats")
    (w,) = st["workers"]
    return w.get("ranks") or []


def wait_group_up(server, old_pids, timeout=120):
    """Wait until the slot runs a new group (no pid of old_pids) with every rank alive."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        server.wait_ready(timeout)
        rs = ranks(server)
        if len(rs) == 2 and all(r["alive"] for r in rs) and not {r["pid"] for r in rs} & set(old_pids):
            return rs
        time.sleep(0.1)
    raise AssertionError(f"no new group within {timeout}s: {ranks(server)}\n{server.log()[-4000:]}")


def resumed_total(server) -> float:
    with urllib.request.urlopen(server.url + "/metrics") as r:
        for line in r.read().decode().splitlines():
            if line.startswith("krserve_requests_resumed_total"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def stream(url, b, on_chunk=None):
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(b).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    text, finish = "", None
    with urllib.request.urlopen(req, timeout=180) as r:
        i = 0
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            c = json.loads(line[6:])
            assert "error" not in c, c
            ch = c["choices"][0]
            text += ch["text"]
            finish = ch["finish_reason"] or finish
            if on_chunk:
                on_chunk(i)
            i += 1
    return text, finish


def test_group_matches_one_process(group, want):
    greedy, seeded, _ = want
    rs = ranks(group)
    assert [r["rank"] for r in rs] == [0, 1] and all(r["alive"] for r in rs), rs
    _, st = group.get("/stats")
    assert st["workers"][0]["pid"] == rs[0]["pid"]
    with cf.ThreadPoolExecutor(len(PROMPTS)) as ex:  # batched together in the group
        got = list(ex.map(lambda p: group.post("/v1/completions", body(p, N))[1]["choices"][0]["text"], PROMPTS))
    assert dict(zip(PROMPTS, got)) == greedy
    _, one = group.post("/v1/completions", body(PROMPTS[0], N))  # alone
    assert one["choices"][0]["text"] == greedy[PROMPTS[0]]
    _, s = group.post("/v1/completions", body(PROMPTS[0], 40, **SEEDED))
    assert s["choices"][0]["text"] == seeded
    with urllib.request.urlopen(group.url + "/metrics") as r:
        metrics = r.read().decode()
    for rank in (0, 1):
        assert f'krserve_worker_rank_up{{model="tiny",rank="{rank}",worker="0"}} 1' in metrics, metrics


def test_constrained_output_matches_one_process(group, want):
    """A JSON schema and a forced tool call: every rank builds the same matcher."""
    got = constrained(group)
    assert got == want[2]
    assert json.loads(got[0]["content"]).keys() == {"name", "age"}
    assert got[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert all(r["alive"] for r in ranks(group)) and "RankDivergedError" not in group.log()


def test_unseeded_sampling_stays_in_step(group, want):
    """Unseeded sampling draws from each rank's global random state: the ranks
    seed it alike and draw alike, so they sample the same tokens. A follower
    that sampled otherwise would exit (its token digest differs from rank
    0's) and restart the group."""
    greedy, *_ = want
    _, before = group.get("/stats")
    with cf.ThreadPoolExecutor(6) as ex:
        sampled = [ex.submit(group.post, "/v1/completions", body(f"Sample {i}", 48, temperature=1.0, top_k=50))
                   for i in range(4)]
        plain = ex.submit(group.post, "/v1/completions", body(PROMPTS[2], N))
        assert all(f.result(120)[0] == 200 for f in sampled)
        assert plain.result(120)[1]["choices"][0]["text"] == greedy[PROMPTS[2]]
    _, after = group.get("/stats")
    assert after["workers"][0]["starts"] == before["workers"][0]["starts"], group.log()[-3000:]
    assert "RankDivergedError" not in group.log()


def test_idle_followers_sleep(group):
    """An idle follower waits on its link to rank 0, not spinning in a collective."""
    rs = wait_group_up(group, [])
    f = rs[1]["pid"]

    def cpu():
        with open(f"/proc/{f}/stat") as fh:
            parts = fh.read().rsplit(") ", 1)[1].split()
        return int(parts[11]) + int(parts[12])

    before = cpu()
    time.sleep(1.0)
    assert cpu() - before < os.sysconf("SC_CLK_TCK") // 4  # under 0.25 s of CPU in 1 s


@pytest.mark.parametrize("rank", [0, 1], ids=["leader", "follower"])
def test_kill_rank_mid_stream(group, want, rank):
    greedy, *_ = want
    old = wait_group_up(group, [])
    pids = [r["pid"] for r in old]
    victim = pids[rank]
    killed = []

    def on_chunk(i):
        if i == 10 and not killed:
            killed.append(victim)
            os.kill(victim, signal.SIGKILL)

    resumed = resumed_total(group)
    with cf.ThreadPoolExecutor(len(PROMPTS)) as ex:
        futs = {p: ex.submit(stream, group.url, body(p, N, True), on_chunk if p == PROMPTS[0] else None)
                for p in PROMPTS}
        got = {p: f.result(240) for p, f in futs.items()}
    assert killed == [victim]
    assert resumed_total(group) > resumed, "the kill did not land mid-stream"
    for p in PROMPTS:
        assert got[p] == (greedy[p], "length"), p
    wait_group_up(group, pids)
    for pid in pids:  # every rank of the dead group is gone, not only the victim
        assert not pid_alive(pid), pid
    _, st = group.get("/stats")
    last = st["workers"][0]["last_exit"]
    assert last["signal"] == "SIGKILL" and last["reason"] == "crash", last
    assert f"rank {rank} of 2 killed by SIGKILL" in group.log()


def test_stopped_follower_is_caught_by_the_watchdog(group, want):
    greedy, *_ = want
    pids = [r["pid"] for r in wait_group_up(group, [])]
    stopped = []

    def on_chunk(i):
        if i == 10 and not stopped:
            stopped.append(pids[1])
            os.kill(pids[1], signal.SIGSTOP)

    resumed = resumed_total(group)
    try:
        text, finish = stream(group.url, body(PROMPTS[1], N, True), on_chunk)
    finally:
        if stopped and pid_alive(stopped[0]):
            os.kill(stopped[0], signal.SIGCONT)
    assert stopped
    assert (text, finish) == (greedy[PROMPTS[1]], "length")
    assert resumed_total(group) > resumed, "the stop did not land mid-stream"
    wait_group_up(group, pids)
    assert not any(pid_alive(p) for p in pids)
    _, st = group.get("/stats")
    assert st["workers"][0]["last_exit"]["reason"] == "wedged", st["workers"][0]["last_exit"]


def test_no_rank_left_after_supervisor_sigkill(model_dir):
    s = Server(model_dir, "--group-size", "2")
    try:
        pids = [r["pid"] for r in wait_group_up(s, [])]
        assert len(pids) == 2
        s.stop(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in pids if pid_alive(p)], "ranks outlived a SIGKILLed supervisor"
    finally:
        s.stop(signal.SIGKILL)


def up_refused(*args, timeout=60):
    r = subprocess.run([str(krserve_bin()), "up", "--python", sys.executable, "--port", "0", *args],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode != 0, r
    return r.stderr + r.stdout


def test_refuses_heads_not_divisible(model_dir):
    out = up_refused("--model", str(model_dir), "--group-size", "3")
    assert "4 attention heads and 2 KV heads" in out and "group sizes that fit: 1, 2" in out, out


def test_refuses_model_class_without_shard(tmp_path):
    # mlx-lm's cohere has no tensor-parallel shard(); config.json is all the check reads.
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "cohere", "num_attention_heads": 4, "num_key_value_heads": 2}))
    out = up_refused("--model", str(tmp_path), "--group-size", "2")
    assert "has no tensor-parallel shard()" in out and "cohere" in out, out
