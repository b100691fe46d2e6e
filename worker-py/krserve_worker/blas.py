"""An optimised BLAS for mlx's CPU backend on Linux.

The ``mlx[cpu]`` wheel for Linux bundles the netlib *reference* BLAS
(``mlx_cpu.libs/libblas-*.so.3``): a float32 256x256 matmul takes ~21 ms on
this project's 2-core VM, against ~0.3 ms with OpenBLAS. libmlx resolves
``cblas_sgemm`` and friends through the dynamic linker's global scope first,
so loading OpenBLAS with ``RTLD_GLOBAL`` *before* ``mlx.core`` is imported
makes every float32 matmul (and so every dequantized model; see
:func:`krserve_worker.cpuweights.dequantize_for_cpu`) run on it. Nothing in the
mlx wheel is modified.

Where OpenBLAS comes from: ``scripts/fetch-openblas.sh`` (run by ``make
venv``) unpacks Debian's ``libopenblas0-pthread`` and its Fortran runtime into
``<venv>/lib/krserve-blas/``. ``$KRSERVE_WORKER_BLAS`` overrides that: a
directory holding ``libopenblas.so.0`` (and, where the system lacks them,
``libgfortran.so.5`` and ``libquadmath.so.0``), or ``off``.

    python -m krserve_worker.blas MODULE [ARGS...]

runs ``python -m MODULE ARGS...`` with the BLAS loaded (the benchmark starts
``mlx_lm.server`` this way, so that every engine it compares uses the same
BLAS).
"""

from __future__ import annotations

import ctypes
import os
import runpy
import sys
from pathlib import Path

ENV = "KRSERVE_WORKER_BLAS"
# Loaded in this order: each needs the ones before it.
LIBS = ("libquadmath.so.0", "libgfortran.so.5", "libopenblas.so.0")


class BlasError(Exception):
    pass


def default_dir() -> Path:
    return Path(sys.prefix) / "lib" / "krserve-blas"


def load(environ=None) -> str:
    """Load OpenBLAS into the global symbol scope, if there is one to load.

    Returns a description for logs ("OpenBLAS 0.3.21 ... from DIR", or why
    the reference BLAS stays). Raises BlasError when ``$KRSERVE_WORKER_BLAS``
    names a directory that cannot be used, or when mlx.core is already
    imported (too late: its symbols may be bound).
    """
    environ = os.environ if environ is None else environ
    if not sys.platform.startswith("linux"):
        return "platform BLAS (not Linux)"
    setting = environ.get(ENV, "")
    if setting == "off":
        return f"mlx's bundled BLAS ({ENV}=off)"
    d = Path(setting) if setting else default_dir()
    if not (d / "libopenblas.so.0").is_file():
        if setting:
            raise BlasError(f"{ENV}={setting!r}: no libopenblas.so.0 in that directory")
        return f"mlx's bundled reference BLAS (no OpenBLAS in {d}; run scripts/fetch-openblas.sh)"
    if "mlx.core" in sys.modules:
        raise BlasError("krserve_worker.blas.load() must run before mlx.core is imported")
    lib = None
    for name in LIBS:
        p = d / name
        if p.is_file():
            try:
                lib = ctypes.CDLL(str(p), mode=ctypes.RTLD_GLOBAL)
            except OSError as e:
                raise BlasError(f"cannot load {p}: {e}") from e
    try:
        lib.openblas_get_config.restype = ctypes.c_char_p
        config = lib.openblas_get_config().decode(errors="replace").strip()
    except (AttributeError, OSError):
        config = "OpenBLAS"
    return f"{config} from {d}"


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m krserve_worker.blas MODULE [ARGS...]", file=sys.stderr)
        return 64
    try:
        what = load()
    except BlasError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"krserve_worker.blas: {what}", file=sys.stderr, flush=True)
    sys.argv = list(argv)
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
