"""OpenBLAS for mlx's CPU backend (krserve_worker.blas) and dequantizing a
quantized model for the CPU (krserve_worker.cpuweights.dequantize_for_cpu).

Which BLAS serves mlx's float32 matmuls is checked through the dynamic
linker itself (``LD_DEBUG=bindings`` names the library each symbol of libmlx
is bound to), not by timing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from krserve_worker import blas

ROOT = Path(__file__).resolve().parents[2]
HAVE_OPENBLAS = (blas.default_dir() / "libopenblas.so.0").is_file()
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the bundled reference BLAS is Linux's")

MATMUL = """
import sys
from krserve_worker import blas
print(blas.load(), file=sys.stderr, flush=True)
import mlx.core as mx, numpy as np
a = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)
b = np.random.default_rng(1).standard_normal((48, 32)).astype(np.float32)
got = np.array(mx.array(a) @ mx.array(b))
assert np.allclose(got, a @ b, rtol=1e-4, atol=1e-4), abs(got - a @ b).max()
print("ok")
"""


def _bindings(env_blas: str | None) -> tuple[str, list[str]]:
    env = dict(os.environ, LD_DEBUG="bindings", PYTHONPATH=str(ROOT / "worker-py"))
    env.pop(blas.ENV, None)
    if env_blas is not None:
        env[blas.ENV] = env_blas
    r = subprocess.run([sys.executable, "-c", MATMUL], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if "libmlx" in ln and "`cblas_sgemm'" in ln]
    return r.stderr, lines


@linux
@pytest.mark.skipif(not HAVE_OPENBLAS, reason="no OpenBLAS in the venv: run scripts/fetch-openblas.sh")
def test_mlx_matmul_binds_to_openblas():
    _, lines = _bindings(None)
    assert lines, "libmlx never bound cblas_sgemm"
    assert all("libopenblas.so.0" in ln for ln in lines), lines


@linux
def test_off_keeps_the_bundled_blas():
    err, lines = _bindings("off")
    assert f"{blas.ENV}=off" in err
    assert lines and all("libopenblas" not in ln and "libblas" in ln for ln in lines), lines


def test_load_refuses_a_directory_without_openblas(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("Linux only")
    with pytest.raises(blas.BlasError, match="no libopenblas.so.0"):
        blas.load({blas.ENV: str(tmp_path)})


def test_load_without_openblas_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(blas, "default_dir", lambda: tmp_path)
    msg = blas.load({})
    assert "OpenBLAS" not in msg.split()[0]
    if sys.platform.startswith("linux"):
        assert "fetch-openblas" in msg


@linux
@pytest.mark.skipif(not HAVE_OPENBLAS, reason="no OpenBLAS in the venv")
def test_load_after_mlx_is_refused():
    code = "import mlx.core\nfrom krserve_worker import blas\nblas.load()\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(ROOT / "worker-py")))
    assert r.returncode != 0 and "before mlx.core is imported" in r.stderr


@linux
@pytest.mark.skipif(not HAVE_OPENBLAS, reason="no OpenBLAS in the venv")
def test_runner_serves_a_module_with_openblas(tmp_path):
    mod = tmp_path / "probe_mod.py"
    mod.write_text("import sys, mlx.core as mx\nprint('args', sys.argv[1:])\n")
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'worker-py'}:{tmp_path}", LD_DEBUG="bindings")
    r = subprocess.run([sys.executable, "-m", "krserve_worker.blas", "probe_mod", "--x", "1"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "args ['--x', '1']" in r.stdout
    assert "krserve_worker.blas: OpenBLAS" in r.stderr


# -- dequantize_for_cpu ----------------------------------------------------------


@pytest.fixture
def quantized(tiny_model):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm import load

    model, tok = load(tiny_model)
    nn.quantize(model, group_size=32, bits=4)
    mx.eval(model.parameters())
    return model, tok


def _logits(model, ids):
    import mlx.core as mx

    out = model(mx.array([ids]))
    mx.eval(out)
    return out


def _count_quantized(model):
    import mlx.nn as nn

    return sum(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def test_dequantize_keeps_the_values(quantized):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from krserve_worker.cpuweights import dequantize_for_cpu

    model, tok = quantized
    ids = tok.encode("Once upon a time there was")
    before = _logits(model, ids)
    assert _count_quantized(model) > 0
    msg = dequantize_for_cpu(model, "on", fast_blas=False, on_cpu=True)
    assert msg.startswith("dequantized"), msg
    assert _count_quantized(model) == 0
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.float32}
    after = _logits(model, ids)
    assert mx.allclose(before, after, rtol=1e-3, atol=1e-3).item()
    assert (mx.argmax(before, -1) == mx.argmax(after, -1)).all().item()


@pytest.mark.parametrize("kw, why", [
    (dict(setting="off", fast_blas=True, on_cpu=True), "--dequantize off"),
    (dict(setting="auto", fast_blas=True, on_cpu=False), "not on the CPU"),
    (dict(setting="auto", fast_blas=False, on_cpu=True), "no OpenBLAS"),
    (dict(setting="auto", fast_blas=True, on_cpu=True, memory=1 << 20), "over a quarter"),
])
def test_dequantize_auto_keeps_quantized_when_it_would_not_help(quantized, kw, why):
    from krserve_worker.cpuweights import dequantize_for_cpu

    model, _ = quantized
    n = _count_quantized(model)
    msg = dequantize_for_cpu(model, kw.pop("setting"), **kw)
    assert msg.startswith("kept quantized") and why in msg, msg
    assert _count_quantized(model) == n


def test_dequantize_auto_on_cpu_with_openblas(quantized):
    from krserve_worker.cpuweights import dequantize_for_cpu

    model, _ = quantized
    msg = dequantize_for_cpu(model, "auto", fast_blas=True, on_cpu=True, memory=64 << 30)
    assert msg.startswith("dequantized") and _count_quantized(model) == 0


def test_dequantize_float_model_untouched(ref):
    from krserve_worker.cpuweights import dequantize_for_cpu

    model, _ = ref
    assert dequantize_for_cpu(model, "on", fast_blas=True, on_cpu=True) == "model not quantized"


@pytest.mark.parametrize("bits, group", [(2, 32), (4, 32), (4, 64), (8, 32), (8, 128), (3, 32), (6, 64)])
def test_dequantized_weight_matches_mlx(bits, group):
    import mlx.core as mx
    import mlx.nn as nn

    from krserve_worker.cpuweights import _dequantized_weight

    lin = nn.Linear(256, 48)
    q = nn.QuantizedLinear.from_linear(lin, group_size=group, bits=bits)
    got = _dequantized_weight(q)
    want = mx.dequantize(q.weight, q.scales, q.biases, group, bits)
    assert got.dtype == mx.float32 and got.shape == (48, 256)
    assert mx.allclose(got, want.astype(mx.float32), rtol=1e-6, atol=1e-6).item()
