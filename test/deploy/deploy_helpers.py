"""
Helpers of the deployment tests: where things are, running the real kubectl and cert script, and lookups in
rendered manifests. (A module of its own, uniquely named: ``test/`` has two conftest modules.)
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
DEPLOY = REPO / "deploy"
MAKE_CERTS = DEPLOY / "make-certs.sh"
# name → directory relative to manifests/; "base" is what `kubectl apply -k manifests/` installs.
VARIANTS = {
    "base": ".",
    "nfs": "overlays/nfs",
    "cephfs": "overlays/cephfs",
    "cert-manager": "overlays/cert-manager",
}
# Not an install: the DaemonSet that gives every node its core_pattern back (README, Uninstall).
UNINSTALL = {"uninstall": "uninstall"}
NAMESPACE = "coredump-system"  # the API server and etcd (Pod Security restricted)
NODE_NAMESPACE = "coredump-node"  # the agent and the uninstaller (Pod Security privileged)
# Where deploy/make-certs.sh writes by default and the tls component reads: its name is kustomize's error message.
TLS_FILES = "tls/run-deploy-make-certs.sh-first"
SERVICE = "coredump-apiserver"
APISERVICE = "v1alpha1.coredump.example.io"


def find_kubectl() -> str | None:
    return shutil.which("kubectl")


def kubectl_versions() -> dict[str, str]:
    """The versioned kubectl binaries installed next to the real kubectl (``kubectl.1.27`` ...)."""
    kubectl = find_kubectl()
    if kubectl is None:
        return {}
    directory = Path(os.path.realpath(kubectl)).parent
    return {p.name.removeprefix("kubectl."): str(p) for p in sorted(directory.glob("kubectl.1.*"))}


def run_make_certs(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MAKE_CERTS), "--out", str(out), *args], capture_output=True, text=True, timeout=60, check=False
    )


def kustomize(directory: Path, *, kubectl: str | None = None) -> list[dict[str, Any]]:
    binary = kubectl or find_kubectl()
    assert binary, "kubectl is not installed"
    proc = subprocess.run(
        [binary, "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@dataclass
class Rendered:
    """The objects of one variant, with lookups by kind and name."""

    name: str
    objects: list[dict[str, Any]]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None, *, prefix: bool = False) -> dict[str, Any]:
        found = [
            o
            for o in self.all(kind)
            if name is None or (o["metadata"]["name"].startswith(name) if prefix else o["metadata"]["name"] == name)
        ]
        assert len(found) == 1, f"{self.name}: expected one {kind} {name or ''}, found {len(found)}"
        return found[0]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
        return obj["spec"]["template"]["spec"]
    if obj["kind"] == "Pod":
        return obj["spec"]
    return None


def container_flags(container: dict[str, Any]) -> list[str]:
    """The arguments after the program: command[1:] + args, as the container runs them."""
    return [*container.get("command", [])[1:], *container.get("args", [])]
