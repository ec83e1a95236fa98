"""
The manifests render with the real ``kubectl kustomize`` (the machine's kubectl, and the oldest and newest
supported kubectl), for the base and every overlay, and contain what an install needs.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import pytest

from deploy_helpers import MANIFESTS, NAMESPACE, NODE_NAMESPACE, VARIANTS, Rendered, kubectl_versions, kustomize

logger = logging.getLogger(__name__)

pytestmark = pytest.mark.kubectl

# What every variant installs, by kind and name (the generated Secret's name carries a content hash).
INSTALLED = {
    ("Namespace", "coredump-system"),
    ("StatefulSet", "coredump-etcd"),
    ("Deployment", "coredump-apiserver"),
    ("PodDisruptionBudget", "coredump-apiserver"),
    ("Service", "coredump-apiserver"),
    ("APIService", "v1alpha1.coredump.example.io"),
    ("DaemonSet", "coredump-agent"),
    ("PersistentVolumeClaim", "coredump-storage"),
    ("ResourceQuota", "coredump-critical-pods"),
    ("NetworkPolicy", "coredump-agent-metrics"),
    ("ServiceAccount", "coredump-apiserver"),
    ("ServiceAccount", "coredump-agent"),
    ("ClusterRole", "coredump:view"),
    ("ClusterRole", "coredump:dump"),
}


def kinds_and_names(objects: list[dict]) -> set[tuple[str, str]]:
    return {(o["kind"], o["metadata"]["name"]) for o in objects}


def test_deploy_every_variant_renders_a_complete_install(variant: Rendered) -> None:
    missing = INSTALLED - kinds_and_names(variant.objects)
    assert not missing, f"{variant.name} lacks {sorted(missing)}"
    # Exactly one way to get the serving certificate: the script's Secret or cert-manager's Certificate.
    secrets = [o for o in variant.all("Secret") if o["metadata"]["name"].startswith("coredump-apiserver-tls")]
    certificates = variant.all("Certificate")
    if variant.name == "cert-manager":
        assert not secrets and {c["spec"]["secretName"] for c in certificates} >= {"coredump-apiserver-tls"}
    else:
        assert len(secrets) == 1 and secrets[0]["type"] == "kubernetes.io/tls" and not certificates
        assert set(secrets[0]["data"]) == {"tls.crt", "tls.key", "ca.crt"}


def test_deploy_objects_are_unique_and_namespaced_where_they_must_be(variant: Rendered) -> None:
    seen = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in variant.objects]
    assert len(seen) == len(set(seen))
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding", "APIService", "PersistentVolume"}
    for kind, namespace, name in seen:
        if kind in cluster_scoped:
            assert namespace is None, (kind, name)
        elif (kind, name) == ("RoleBinding", "coredump-apiserver:extension-apiserver-authentication-reader"):
            assert namespace == "kube-system"
        elif kind in ("ResourceQuota", "PersistentVolumeClaim"):
            assert namespace in (NAMESPACE, NODE_NAMESPACE), (kind, name)  # one in each
        elif name.startswith(("coredump-agent", "coredump-uninstall")):
            assert namespace == NODE_NAMESPACE, (kind, name)
        else:
            assert namespace == NAMESPACE, (kind, name)


def test_deploy_storage_overlays_bind_both_claims_to_one_shared_file_system(rendered: dict[str, Rendered]) -> None:
    """The agents (coredump-node) and the API server (coredump-system) must see the same files: two claims, each
    statically bound to its own volume, and both volumes of one overlay name the same export or CephFS path."""
    for name in ("base", "nfs", "cephfs"):
        claims = {
            c["metadata"]["namespace"]: c
            for c in rendered[name].all("PersistentVolumeClaim")
            if c["metadata"]["name"] == "coredump-storage"
        }
        assert set(claims) == {NAMESPACE, NODE_NAMESPACE}, name
        for claim in claims.values():
            # No dynamic provisioning: a StorageClass would give each claim an empty volume of its own.
            assert claim["spec"]["storageClassName"] == "" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for name, source in (
        ("nfs", lambda v: v["spec"]["nfs"]),
        ("cephfs", lambda v: v["spec"]["csi"]["volumeAttributes"]),
    ):
        variant = rendered[name]
        volumes = []
        for namespace in (NAMESPACE, NODE_NAMESPACE):
            claim = next(c for c in variant.all("PersistentVolumeClaim") if c["metadata"]["namespace"] == namespace)
            volume = variant.one("PersistentVolume", claim["spec"]["volumeName"])
            assert volume["spec"]["claimRef"] == {"namespace": namespace, "name": "coredump-storage"}, name
            assert volume["spec"]["accessModes"] == ["ReadWriteMany"] and volume["spec"]["storageClassName"] == ""
            assert volume["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
            volumes.append(volume)
        assert source(volumes[0]) == source(volumes[1]), f"{name}: the two volumes name different storage"
        if name == "cephfs":
            assert volumes[0]["spec"]["csi"]["volumeHandle"] != volumes[1]["spec"]["csi"]["volumeHandle"]


def test_deploy_base_without_certificates_names_the_missing_file(kubectl: str, tmp_path: Path) -> None:
    """Before deploy/make-certs.sh has run, `kubectl apply -k manifests/` stops and says what is missing."""
    copy = tmp_path / "manifests"
    shutil.copytree(MANIFESTS, copy, ignore=shutil.ignore_patterns("*.crt", "*.key", "apiservice-cabundle.yaml"))
    proc = subprocess.run([kubectl, "kustomize", str(copy)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0
    assert "tls" in proc.stderr and (
        "tls.crt" in proc.stderr or "ca.crt" in proc.stderr or "apiservice-cabundle.yaml" in proc.stderr
    )


@pytest.mark.parametrize("version", ["1.27", "1.33"])
def test_deploy_oldest_and_newest_kubectl_render_the_same_objects(
    version: str, manifests_with_certs: Path, rendered: dict[str, Rendered]
) -> None:
    binary = kubectl_versions().get(version)
    if binary is None:
        pytest.skip(f"kubectl {version} is not installed next to kubectl")
    for name, rel in VARIANTS.items():
        objects = kustomize(manifests_with_certs / rel, kubectl=binary)
        assert objects == rendered[name].objects or sorted(map(repr, objects)) == sorted(
            map(repr, rendered[name].objects)
        ), name
