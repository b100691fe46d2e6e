"""krserve_worker.device: a worker that is one of several on a CUDA GPU sets
mlx's memory and cache limits to its part of mlx's own 0.8 of the GPU; one
worker, Apple silicon and the CPU keep mlx's defaults. (This machine has no
GPU: the CUDA branch runs with mlx's device functions standing in.)"""

from __future__ import annotations

import pytest

from krserve_worker import device
from krserve_worker.device import Device

GB = 10**9


@pytest.mark.parametrize("dev, share, want", [
    (Device("cuda", 150 * GB), 1, None),  # alone: mlx's default (0.8) already
    (Device("cuda", 150 * GB), 2, 60 * GB),
    (Device("cuda", 150 * GB), 3, 40 * GB),
    (Device("cuda", 0, ), 2, None),  # memory unknown
    (Device("metal", 0), 4, None),  # unified memory: mlx's defaults
    (Device("cpu", 0), 4, None),
])
def test_memory_limit(dev, share, want):
    assert device.memory_limit(dev, share) == want


class _Metal:
    def __init__(self, on):
        self.on = on

    def is_available(self):
        return self.on


@pytest.mark.parametrize("gpu, metal, info, want", [
    (False, False, None, Device("cpu", 0)),
    (True, True, {"memory_size": 96 * GB}, Device("metal", 0)),
    (True, False, {"total_memory": 80 * GB, "free_memory": 1}, Device("cuda", 80 * GB)),
    (True, False, {"memory_size": 80 * GB}, Device("cuda", 80 * GB)),
    (True, False, {"device_name": "x"}, Device("cuda", 0)),
    (True, False, RuntimeError("no"), Device("cuda", 0)),
])
def test_current(monkeypatch, gpu, metal, info, want):
    import mlx.core as mx

    if gpu:
        monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
        monkeypatch.setattr(mx, "metal", _Metal(metal))

        def device_info():
            if isinstance(info, Exception):
                raise info
            return info

        monkeypatch.setattr(mx, "device_info", device_info)
    assert device.current() == want


def test_apply_sets_both_limits(monkeypatch):
    import mlx.core as mx

    got = {}
    monkeypatch.setattr(mx, "set_memory_limit", lambda n: got.setdefault("memory", n))
    monkeypatch.setattr(mx, "set_cache_limit", lambda n: got.setdefault("cache", n))
    note = device.apply_memory_limit(Device("cuda", 150 * GB), 2)
    assert got == {"memory": 60 * GB, "cache": 60 * GB}
    assert "split among 2 workers" in note
    got.clear()
    assert device.apply_memory_limit(Device("cuda", 150 * GB), 1) == ""
    assert device.apply_memory_limit(Device("cpu", 0), 2) == ""
    assert got == {}
