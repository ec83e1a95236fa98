"""
Fixtures for the deployment tests: the real kubectl, the real cert script, and the manifests rendered once.

``rendered`` renders the base and every overlay with ``kubectl kustomize`` from a copy of ``manifests/``
whose ``tls/`` certificate directory was filled by ``deploy/make-certs.sh`` (as an admin does before
``kubectl apply -k``).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy_helpers import MANIFESTS, TLS_FILES, UNINSTALL, VARIANTS, Rendered, find_kubectl, kustomize, run_make_certs

logger = logging.getLogger(__name__)


@pytest.fixture(scope="session")
def kubectl() -> str:
    binary = find_kubectl()
    if binary is None:
        pytest.skip("kubectl is not installed")
    return binary


@pytest.fixture(scope="session")
def manifests_with_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of manifests/ with tls/ filled by the real deploy/make-certs.sh."""
    copy = tmp_path_factory.mktemp("deploy") / "manifests"
    shutil.copytree(
        MANIFESTS, copy, ignore=shutil.ignore_patterns("*.crt", "*.key", "*.srl", "apiservice-cabundle.yaml")
    )
    proc = run_make_certs(copy / TLS_FILES)
    assert proc.returncode == 0, proc.stderr
    return copy


@pytest.fixture(scope="session")
def rendered(kubectl: str, manifests_with_certs: Path) -> dict[str, Rendered]:
    return {
        name: Rendered(name, kustomize(manifests_with_certs / rel, kubectl=kubectl))
        for name, rel in {**VARIANTS, **UNINSTALL}.items()
    }


@pytest.fixture(params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest, rendered: dict[str, Rendered]) -> Iterator[Rendered]:
    yield rendered[request.param]


@pytest.fixture(params=sorted({**VARIANTS, **UNINSTALL}))
def any_variant(request: pytest.FixtureRequest, rendered: dict[str, Rendered]) -> Iterator[Rendered]:
    """Every rendered kustomization, the uninstall one included."""
    yield rendered[request.param]
