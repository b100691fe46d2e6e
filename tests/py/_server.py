"""Start and stop a real `bin/krserve up` for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def krserve_bin() -> Path:
    p = Path(os.environ.get("KRSERVE_BIN", ROOT / "bin" / "krserve"))
    if not p.exists():
        subprocess.run(["go", "build", "-o", str(ROOT / "bin" / "krserve"), "./cmd/krserve"], cwd=ROOT, check=True)
        p = ROOT / "bin" / "krserve"
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(out: Path, seed: int = 0) -> Path:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), str(out), "--seed", str(seed)],
                   check=True, capture_output=True)
    return out


class Server:
    """A running krserve with its log captured (server.log())."""

    def __init__(self, model: str | None, *args: str, env: dict | None = None, ready_timeout: float = 240):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(krserve_bin()), "up", "--port", str(self.port), "--python", sys.executable, *args]
        if model is not None:
            cmd += ["--model", str(model)]
        e = dict(os.environ)
        e.update(env or {})
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=e, text=True)
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_ready(ready_timeout)

    def _read(self):
        for line in self.proc.stdout:
            self._lines.append(line)

    def log(self) -> str:
        return "".join(self._lines)

    def wait_ready(self, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"krserve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"krserve not ready after {timeout}s:\n{self.log()}")

    def get(self, path: str):
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def post(self, path: str, body, headers: dict | None = None, raw: bytes | None = None):
        data = raw if raw is not None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def worker_pids(self) -> list[int]:
        _, st = self.get("/stats")
        return [w["pid"] for w in st["workers"] if w.get("pid")]

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
