"""
Flow 8: ``kubectl apply -k --dry-run=server`` of the base and of every overlay the README names is accepted by
the real kube-apiserver (every object valid against the real API, defaulting and admission), on a fresh control
plane of its own (the shared one already holds the installed objects, whose immutable fields overlays change).

Server-side dry-run cannot create a namespace for the objects in it, so the Namespaces the install renders are
created first, as an admin's first apply would. cert-manager's kinds need its CRDs: a stand-in CRD that accepts
any spec is installed, so those objects are checked only for their kind and metadata.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest

from cluster import REPO, ControlPlane, build
from fixtures_apiserver import kubectl_binary
from install import copy_repo_manifests, kustomize, make_certs


def readme_overlays() -> list[str]:
    names = sorted(set(re.findall(r"overlays/([a-z0-9-]+)", (REPO / "README.md").read_text())))
    return [n for n in names if (REPO / "manifests/overlays" / n / "kustomization.yaml").exists()]


def stand_in_crd(kind: str, plural: str) -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.cert-manager.io"},
        "spec": {
            "group": "cert-manager.io",
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
                }
            ],
        },
    }


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Iterator[tuple[ControlPlane, object]]:
    kube, etcd = build()
    cp = ControlPlane(base=tmp_path_factory.mktemp("dry-run-plane"), kube_bin=kube, etcd_bin=etcd)
    try:
        cp.start()
        manifests = copy_repo_manifests(tmp_path_factory.mktemp("dry-run"))
        make_certs(manifests)
        cp.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "List",
                    "items": [stand_in_crd("Issuer", "issuers"), stand_in_crd("Certificate", "certificates")],
                }
            ),
        )
        cp.kubectl(
            "wait", "--for", "condition=Established", "crd/issuers.cert-manager.io", "crd/certificates.cert-manager.io"
        )
        yield cp, manifests
    finally:
        cp.stop()


def test_readme_names_the_overlays() -> None:
    assert {"nfs", "cephfs", "cert-manager"} <= set(readme_overlays())


@pytest.mark.parametrize("target", ["."] + [f"overlays/{n}" for n in readme_overlays()])
def test_server_side_dry_run_accepts_the_install(fresh, target: str) -> None:
    cp, manifests = fresh
    path = manifests / target
    for ns in [o for o in kustomize(path) if o["kind"] == "Namespace"]:
        if cp.kubectl("get", "namespace", ns["metadata"]["name"], check=False).returncode != 0:
            cp.kubectl("create", "namespace", ns["metadata"]["name"], "--save-config")
    for version in ("1.27", "1.33"):
        out = cp.kubectl("apply", "-k", str(path), "--dry-run=server", binary=kubectl_binary(version), check=False)
        assert out.returncode == 0, out.stderr
        assert "apiservice.apiregistration.k8s.io/v1alpha1.coredump.example.io created (server dry run)" in out.stdout
