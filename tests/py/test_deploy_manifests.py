"""deploy/kubernetes: valid Kubernetes objects that agree with krserve itself
(its flags, its probes' endpoints, its stop sequence)."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from _server import ROOT, krserve_bin

MANIFEST = ROOT / "deploy" / "kubernetes" / "krserve.yaml"
# HTTP shutdown after the drain (cmd/krserve/up.go: srv.Shutdown's 5 s).
HTTP_SHUTDOWN_S = 5


def objects() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert len(kinds) == len(docs), "one object of each kind expected"
    return kinds


def seconds(v: str) -> float:
    """A Go duration as krserve's flags take it (1m30s, 60s, 500ms)."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", v)
    assert parts and "".join(n + u for n, u in parts) == v, f"not a duration: {v!r}"
    return sum(float(n) * units[u] for n, u in parts)


@pytest.fixture(scope="module")
def up_help() -> dict[str, str | None]:
    """Every `krserve up` flag and its default, from --help."""
    out = subprocess.run([str(krserve_bin()), "up", "--help"], capture_output=True, text=True, check=True).stdout
    flags = {}
    for m in re.finditer(r"^\s+(?:-\w, )?--([\w-]+)(?: \w+)?\s+(.*)$", out, re.M):
        d = re.search(r'\(default "?([^")]*)"?\)$', m.group(2))
        flags[m.group(1)] = d.group(1) if d else None
    assert "drain-timeout" in flags, out
    return flags


def container() -> dict:
    (c,) = objects()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def args(c: dict) -> dict[str, str]:
    assert c["args"][0] == "up", c["args"]
    out = {}
    for a in c["args"][1:]:
        name, eq, value = a.partition("=")
        assert name.startswith("--") and eq, f"write flags as --name=value: {a!r}"
        out[name[2:]] = value
    return out


def test_schema_is_valid():
    kv = pytest.importorskip("kubernetes_validate",
                             reason="kubernetes-validate is not installed (it is in pyproject's [test] extra)")
    for obj in objects().values():
        # 1.30: the oldest release whose preStop has the sleep action.
        for version in ("1.30.0", kv.latest_version()):
            kv.validate(obj, version, strict=True)


def test_flags_exist(up_help):
    unknown = sorted(set(args(container())) - set(up_help))
    assert not unknown, f"krserve up has no flag {unknown}"


def test_probes_and_ports_match_krserve():
    objs = objects()
    c, a = container(), args(container())
    assert a["host"] == "0.0.0.0", "in a pod krserve must listen beyond loopback"
    (port,) = c["ports"]
    assert port["containerPort"] == int(a["port"])
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": port["name"]}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": port["name"]}
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    pod = objs["Deployment"]["spec"]["template"]
    ann = pod["metadata"]["annotations"]
    assert (ann["prometheus.io/scrape"], ann["prometheus.io/port"], ann["prometheus.io/path"]) == ("true", a["port"], "/metrics")
    svc = objs["Service"]["spec"]
    assert svc["selector"].items() <= pod["metadata"]["labels"].items()
    assert [p["targetPort"] for p in svc["ports"]] == [port["name"]]
    assert objs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


def test_grace_period_covers_the_stop_sequence(up_help):
    """The kubelet's SIGKILL must not come before krserve has drained and
    stopped its workers: preStop + --drain-delay + --drain-timeout + HTTP
    shutdown + three stages of --stop-grace."""
    spec = objects()["Deployment"]["spec"]["template"]["spec"]
    c, a = container(), args(container())

    def flag(name):
        v = a.get(name, up_help[name])
        return seconds(v) if v else 0.0

    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    budget = pre_stop + flag("drain-delay") + flag("drain-timeout") + HTTP_SHUTDOWN_S + 3 * flag("stop-grace")
    assert spec["terminationGracePeriodSeconds"] >= budget, (spec["terminationGracePeriodSeconds"], budget)
