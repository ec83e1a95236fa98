"""
Issue 14 through the real aggregator: ``kubectl coredump`` as a user bound only to ``coredump:dump`` in one
namespace, a download that kube-apiserver cuts at its request timeout (the client reads slowly through a
throttling proxy) and that the plugin resumes to a byte-identical, sha256-verified core.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugin"))

from plugin_harness import CuttingProxy, ProxyRule, kubeconfig_via, run_plugin
from test_timeout import big_core  # noqa: F401  (the 48 MiB incompressible core)
from workloads import endpoint_yaml, file_core, make_namespace, make_pod


@pytest.fixture(scope="module")
def paula(installed, big_core) -> Path:  # noqa: F811
    """A user with the shipped coredump:dump role in team-plugin only, whose pod has a 48 MiB core."""
    cp = installed.cp
    make_namespace(cp, "team-plugin")
    uid = make_pod(cp, "team-plugin", "big")
    file_core(installed, big_core.path, namespace="team-plugin", pod="big", uid=uid)
    cp.kubectl("apply", "-f", "-", input=endpoint_yaml("team-plugin", "big"))
    cp.kubectl(
        "create", "rolebinding", "paula-dump", "-n", "team-plugin", "--clusterrole", "coredump:dump", "--user", "paula"
    )
    return cp.user_kubeconfig("paula")


def test_plugin_get_resumes_past_the_aggregators_request_timeout(installed, paula, big_core, tmp_path) -> None:  # noqa: F811
    port = int(installed.cp.server.rsplit(":", 1)[1])
    # The first connection reads at ~1 MiB/s, so the ~48 MiB archive outlives kube-apiserver's request timeout;
    # the resumed requests run at full speed.
    proxy = CuttingProxy(port, [ProxyRule(connection=0, after=1 << 20, action="slow", rate=1 << 20)])
    try:
        kubeconfig = kubeconfig_via(paula, port=proxy.port, target=tmp_path / "paula-proxy.kubeconfig")
        out = tmp_path / "out"
        got = run_plugin(kubeconfig, "get", "big", "-n", "team-plugin", "-o", str(out), timeout=600)
    finally:
        proxy.close()
    assert got.returncode == 0, got.stderr.decode()
    assert b"resuming at byte" in got.stderr, got.stderr.decode()
    (core,) = [p for p in out.rglob("*") if p.is_file() and p.name.endswith(".core")]
    want = hashlib.sha256(big_core.path.read_bytes()).hexdigest()
    assert hashlib.sha256(core.read_bytes()).hexdigest() == want


def test_plugin_as_a_dump_only_user_lists_its_namespace_and_is_refused_elsewhere(paula, tmp_path) -> None:
    listed = run_plugin(paula, "list", "-n", "team-plugin")
    assert listed.returncode == 0 and b"big" in listed.stdout, listed.stderr.decode()
    other = run_plugin(paula, "get", "crasher", "-n", "team-a", "-o", str(tmp_path / "x"))
    # one line naming what is missing and the shipped role that grants it (reading the endpoint comes first)
    assert other.returncode == 4 and b"forbidden" in other.stderr and b"ClusterRole coredump:" in other.stderr
    assert len(other.stderr.decode().strip().splitlines()) == 1
    everywhere = run_plugin(paula, "list", "-A")
    assert everywhere.returncode == 4, everywhere.stderr.decode()
