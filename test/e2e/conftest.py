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

from cluster import ControlPlane, build  # noqa: E402
from install import Installation  # noqa: E402

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


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
