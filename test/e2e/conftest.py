"""
Session fixtures of the end-to-end suite: the real control plane (:mod:`cluster`), the shipped manifests
applied to it and our API server and agent running as processes (:mod:`install`), and users.

Every test under test/e2e gets the ``e2e`` marker: ``scripts/test -m "not e2e"`` runs the fast suite alone,
``scripts/e2e`` (or ``scripts/test test/e2e``) only this one.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "handler"))  # handler_harness

from cluster import ControlPlane, build
from install import Installation

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)
            # The first test builds the control plane from Go modules (minutes on a cold cache).
            item.add_marker(pytest.mark.timeout(3600))


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    kube, etcd = build()
    cp = ControlPlane(base=tmp_path_factory.mktemp("control-plane"), kube_bin=kube, etcd_bin=etcd)
    try:
        cp.start()
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def installed(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    inst = Installation(cp=control_plane, base=tmp_path_factory.mktemp("install"))
    try:
        inst.apply()
        inst.start_server()
        yield inst
    finally:
        inst.stop()


@pytest.fixture
def server_up(installed: Installation) -> Installation:
    """The installation with our server running (a test that stopped it gets it back)."""
    if installed.server is None:
        installed.start_server()
    return installed


@pytest.fixture(scope="session")
def real_core(tmp_path_factory: pytest.TempPathFactory):
    from workloads import CRASHER_C, make_core
    import subprocess

    d = tmp_path_factory.mktemp("crasher")
    (d / "crasher.c").write_text(CRASHER_C)
    exe = d / "crasher"
    subprocess.run(["gcc", "-g", "-O0", "-o", str(exe), str(d / "crasher.c")], check=True)
    return make_core(exe, d / "segv", "segv")


@pytest.fixture(scope="session")
def teams(installed: Installation, real_core) -> dict:
    """team-a and team-b, each with a pod that has one real core on storage and its CoredumpEndpoint."""
    from workloads import file_core, make_namespace, make_pod

    cp = installed.cp
    out = {}
    for ns in ("team-a", "team-b"):
        make_namespace(cp, ns)
        uid = make_pod(cp, ns, "crasher")
        file_core(installed, real_core.path, namespace=ns, pod="crasher", uid=uid)
        out[ns] = uid
    return out


@pytest.fixture(scope="session")
def users(installed: Installation, teams: dict) -> dict[str, Path]:
    """alice: the shipped coredump:dump role in team-a; victor: view in team-a; eddie: cluster edit (aggregated)."""
    cp = installed.cp
    cp.kubectl(
        "create", "rolebinding", "alice-dump", "-n", "team-a", "--clusterrole", "coredump:dump", "--user", "alice"
    )
    cp.kubectl("create", "rolebinding", "victor-view", "-n", "team-a", "--clusterrole", "view", "--user", "victor")
    cp.kubectl("create", "rolebinding", "eddie-edit", "-n", "team-b", "--clusterrole", "edit", "--user", "eddie")
    return {name: cp.user_kubeconfig(name) for name in ("alice", "victor", "eddie")}
