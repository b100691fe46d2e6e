"""Two krserve replicas behind a real HAProxy (Debian's package), configured
from deploy/haproxy/haproxy.cfg itself: one replica is drained with SIGTERM
under streaming load and no client request fails."""

from __future__ import annotations

import concurrent.futures as cf
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import openai
import pytest

from _server import ROOT, Server, free_port, tiny_model

TEMPLATE = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
HAPROXY = shutil.which("haproxy")
needs_haproxy = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy; .ci/run does)")

TOKENS = 96  # per request; ignore_eos makes every answer exactly this long
PROMPTS = [f"Replica test {i}: once upon a time" for i in range(8)]


def wait_for(cond, timeout: float, what: str, interval: float = 0.05):
    """Polls cond until it returns something truthy; fails naming what."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def haproxy_config(template: str, *, port: int, sock: Path, servers: dict[str, int]) -> str:
    """The shipped config with only its addresses changed: the frontend binds
    `port`, the runtime API listens on `sock`, and the backend's server lines
    are `servers` (name: loopback port), keeping the template's server options;
    the global maxconn drops to 256 so the descriptor limit of a test machine
    suffices. Everything else (balance, checks, timeouts, retries) is the
    template's."""
    out, binds, socks, opts, placed, section = [], 0, 0, None, False, ""
    for line in template.splitlines():
        s = line.split("#", 1)[0].strip()
        if s and not line[0].isspace():
            section = s.split()[0]
        if s.startswith("bind "):
            out.append(f"    bind 127.0.0.1:{port}")
            binds += 1
        elif s.startswith("stats socket "):
            out.append(re.sub(r"stats socket \S+", f"stats socket {sock}", line))
            socks += 1
        elif s.startswith("maxconn ") and section == "global":
            # The global connection limit needs two descriptors a connection,
            # and haproxy inherits this process's limit, which importing
            # mlx_lm lowers to 2048/4096 (mlx_lm/utils.py calls setrlimit):
            # "Cannot raise FD limit to 8222". A few hundred is plenty here.
            out.append(re.sub(r"maxconn \d+", "maxconn 256", line))
        elif s.startswith("server "):
            if opts is None:
                opts = " ".join(s.split()[3:])
            if not placed:
                out += [f"    server {n} 127.0.0.1:{p} {opts}".rstrip() for n, p in servers.items()]
                placed = True
        else:
            out.append(line)
    assert (binds, socks, placed) == (1, 1, True), "deploy/haproxy/haproxy.cfg no longer has one bind, one stats socket and server lines"
    return "\n".join(out) + "\n"


class HAProxy:
    """haproxy -db (foreground) with a generated config, its log captured."""

    def __init__(self, tmp: Path, servers: dict[str, int]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.sock = tmp / "haproxy.sock"
        cfg = tmp / "haproxy.cfg"
        cfg.write_text(haproxy_config(TEMPLATE.read_text(), port=self.port, sock=self.sock, servers=servers))
        check = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self._lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self._lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()
        wait_for(lambda: self.proc.poll() is not None or self.sock.exists(), 30, "haproxy's runtime API socket")
        assert self.proc.poll() is None, self.log()

    def log(self) -> str:
        return "".join(self._lines)

    def admin(self, cmd: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.sock))
            s.sendall(cmd.encode() + b"\n")
            chunks = []
            while b := s.recv(65536):
                chunks.append(b)
        return b"".join(chunks).decode()

    def op_states(self) -> dict[str, int]:
        """server name -> srv_op_state from `show servers state` (0 down, 2 up)."""
        lines = [ln for ln in self.admin("show servers state krserve").splitlines() if ln.strip()]
        assert lines[0].strip() == "1", lines  # format version
        cols = lines[1].lstrip("# ").split()
        rows = [dict(zip(cols, ln.split())) for ln in lines[2:] if not ln.startswith("#")]
        return {r["srv_name"]: int(r["srv_op_state"]) for r in rows}

    def stat(self) -> dict[tuple[str, str], dict[str, str]]:
        """(proxy, server) -> `show stat` fields."""
        lines = self.admin("show stat").splitlines()
        cols = lines[0].lstrip("# ").split(",")
        return {(r[0], r[1]): dict(zip(cols, r)) for r in (ln.split(",") for ln in lines[1:] if ln)}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self._reader.join(5)


def complete(client: openai.OpenAI, prompt: str) -> tuple[str | None, str, str | None]:
    """One streamed, greedy completion: (X-Served-By, text, finish_reason)."""
    with client.completions.with_streaming_response.create(
            model="default", prompt=prompt, max_tokens=TOKENS, temperature=0, stream=True,
            extra_body={"ignore_eos": True}) as resp:
        served_by = resp.headers.get("x-served-by")
        text, finish = "", None
        for chunk in resp.parse():
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
    return served_by, text, finish


def running(server: Server) -> int:
    return server.get("/stats")[1]["scheduler"]["running"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("lb") / "tiny")


def test_shipped_config_is_valid():
    if HAPROXY is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy; .ci/run does)")
    r = subprocess.run([HAPROXY, "-c", "-f", str(TEMPLATE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def ready_status(server: Server) -> int | None:
    """/ready's status, or None once nothing listens any more."""
    try:
        return server.get("/ready")[0]
    except OSError:
        return None


@needs_haproxy
@pytest.mark.parametrize("mode", ["drain-delay", "retries"])
def test_drain_one_replica_under_streaming_load(model_dir, tmp_path, mode):
    """8 clients stream greedy completions through HAProxy; one replica gets
    SIGTERM while it serves some of them. Every request completes with the
    full greedy text, the drained replica exits 0 after finishing its streams,
    HAProxy marks it down, and later requests go to the survivor.

    drain-delay: the deployment as documented. krserve keeps admitting for
    --drain-delay after SIGTERM while /ready answers 503, so HAProxy's checks
    take it out before it refuses anything.
    retries: krserve refuses at once (--drain-delay 0) and HAProxy's checks of
    the victim are held off (`disable health`), so HAProxy keeps sending it
    requests through its drain and after its exit: the 503s and refused
    connections must all be retried on the survivor (retry-on, redispatch)."""
    delay = "5s" if mode == "drain-delay" else "0s"
    args = ("--workers", "1", "--drain-delay", delay, "--drain-timeout", "120s")
    servers = {"krserve1": Server(model_dir, *args), "krserve2": Server(model_dir, *args)}
    lb = None
    try:
        lb = HAProxy(tmp_path, {n: s.port for n, s in servers.items()})
        wait_for(lambda: lb.op_states() == {"krserve1": 2, "krserve2": 2}, 60, "both replicas up in HAProxy")

        # The greedy answers, from each replica directly: they must agree.
        def ref(s: Server, p: str) -> str:
            status, b = s.post("/v1/completions", {"model": "default", "prompt": p, "max_tokens": TOKENS,
                                                   "temperature": 0, "ignore_eos": True})
            assert status == 200, b
            return b["choices"][0]["text"]

        with cf.ThreadPoolExecutor(8) as ex:
            want = dict(zip(PROMPTS, ex.map(lambda p: ref(servers["krserve1"], p), PROMPTS)))
            other = dict(zip(PROMPTS, ex.map(lambda p: ref(servers["krserve2"], p), PROMPTS)))
        assert want == other, "the two replicas disagree on greedy output"

        client = openai.OpenAI(base_url=lb.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        results, stop = [], threading.Event()
        lock = threading.Lock()

        def load(i: int):
            for k in range(60):  # bounded; stopped earlier by the test
                if stop.is_set():
                    return
                p = PROMPTS[(i + k) % len(PROMPTS)]
                r = {"prompt": p, "start": time.monotonic()}
                try:
                    r["served_by"], r["text"], r["finish"] = complete(client, p)
                except Exception as e:  # noqa: BLE001 - every failure is a finding
                    r["error"] = repr(e)
                r["end"] = time.monotonic()
                with lock:
                    results.append(r)

        threads = [threading.Thread(target=load, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        victim, survivor = servers["krserve1"], servers["krserve2"]
        try:
            wait_for(lambda: running(victim) > 0 and running(survivor) > 0, 120,
                     "streams in flight on both replicas")
            if mode == "retries":
                assert lb.admin("disable health krserve/krserve1").strip() == ""
            t_term = time.monotonic()
            victim.proc.send_signal(signal.SIGTERM)
            if mode == "drain-delay":
                # /ready turns 503 as soon as the signal is handled (delivery
                # is asynchronous); krserve still admits for --drain-delay.
                body = wait_for(lambda: (lambda r: r[0] == 503 and r[1])(victim.get("/ready")), 10, "/ready to answer 503")
                assert body["status"] == "draining", body
                wait_for(lambda: lb.op_states()["krserve1"] == 0, 60, "HAProxy to mark the drained replica down")
            assert victim.proc.wait(180) == 0, victim.log()
            t_exit = time.monotonic()
            if mode == "retries":
                # HAProxy still counts the victim up: leastconn sends it new
                # requests, each refused and retried on the survivor.
                for _ in range(20):  # leastconn alternates between equals: a few suffice
                    served_by, text, finish = complete(client, PROMPTS[1])
                    assert (served_by, text, finish) == ("krserve2", want[PROMPTS[1]], "length")
                    if int(lb.stat()[("krserve", "krserve1")]["wredis"]) > 0:
                        break
                else:
                    raise AssertionError("HAProxy never redispatched a request from the stopped replica")
                assert lb.op_states()["krserve1"] == 2  # still in rotation: the retries did it
                lb.admin("enable health krserve/krserve1")
                wait_for(lambda: lb.op_states()["krserve1"] == 0, 60, "HAProxy to mark the stopped replica down")
            # A new request now goes to the survivor.
            served_by, text, finish = complete(client, PROMPTS[0])
            assert (served_by, text, finish) == ("krserve2", want[PROMPTS[0]], "length")
            # Let every client finish at least one request started after the exit.
            wait_for(lambda: len({id(r) for r in results if r["start"] > t_exit}) >= 8, 180,
                     "requests started after the drained replica exited")
        finally:
            stop.set()
            for t in threads:
                t.join(300)

        errors = [r for r in results if "error" in r]
        assert not errors, (len(errors), [e["error"] for e in errors][:3], [ln for ln in lb.log().splitlines() if " 503 " in ln][:10])
        wrong = [r for r in results if r["text"] != want[r["prompt"]] or r["finish"] != "length"]
        assert not wrong, wrong
        # The drain mattered: the victim had streams in flight at SIGTERM and
        # finished them in full.
        in_flight = [r for r in results if r["served_by"] == "krserve1" and r["start"] < t_term < r["end"]]
        assert in_flight, "no stream was in flight on the drained replica at SIGTERM"
        after_exit = [r for r in results if r["start"] > t_exit]
        assert after_exit and all(r["served_by"] == "krserve2" for r in after_exit)
        assert "drained: no request in flight" in victim.log(), victim.log()
        assert "drain timeout passed" not in victim.log()
        # No 5xx reached a client through HAProxy.
        fe = lb.stat()[("krserve", "FRONTEND")]
        assert fe["hrsp_5xx"] == "0", fe
    finally:
        if lb is not None:
            lb.stop()
        for s in servers.values():
            s.stop()
