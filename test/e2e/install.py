"""
Installs the shipped manifests on the e2e control plane, as an admin would, minus what needs a kubelet.

``render`` copies ``manifests/`` and ``deploy/`` into a temp dir, runs ``deploy/make-certs.sh`` there for the
Service that the rendered APIService names, and renders with ``kubectl kustomize``. ``Installation`` takes
names and namespaces from the rendered objects (the APIService's Service, the service accounts of the
Deployment and DaemonSet), drops the workloads (Deployment, StatefulSet, DaemonSet: nothing would run them),
turns the APIService's Service into an ``ExternalName`` for ``localhost`` on our server's port (the
aggregator's resolver sends ExternalName traffic to that host and the APIService's port), applies the rest,
and runs our API server and agent as processes authenticated with TokenRequest tokens of those service
accounts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cluster import REPO, ControlPlane, Process, free_port, write_kubeconfig
from waiting import NotYet, wait_until

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}
GROUP = "coredump.example.io"


# Where the base kustomization reads the certificates deploy/make-certs.sh makes (its default --out).
TLS_FILES = "tls/run-deploy-make-certs.sh-first"


def copy_repo_manifests(dest: Path) -> Path:
    """A copy of manifests/ and deploy/ (the TLS files are written into the copy, never the repo)."""
    for name in ("manifests", "deploy"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("*.crt", "*.key", "*cabundle*"))
    return dest / "manifests"


def make_certs(
    manifests: Path, *, namespace: str | None = None, service: str | None = None, out: Path | None = None
) -> None:
    argv = [
        "sh",
        str(manifests.parent / "deploy/make-certs.sh"),
        "--out",
        str(out or manifests / TLS_FILES),
        "--new-ca",
    ]
    if namespace:
        argv += ["--namespace", namespace]
    if service:
        argv += ["--service", service]
    subprocess.run(argv, check=True, capture_output=True)


def kustomize(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run(["kubectl", "kustomize", str(path)], check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def render(dest: Path) -> list[dict[str, Any]]:
    """The base install rendered with serving certificates for the Service its APIService names."""
    manifests = copy_repo_manifests(dest)
    make_certs(manifests)
    objects = kustomize(manifests)
    svc = apiservice_of(objects)["spec"]["service"]
    if (svc["namespace"], svc["name"]) != ("coredump-system", "coredump-apiserver"):
        make_certs(manifests, namespace=svc["namespace"], service=svc["name"])
        objects = kustomize(manifests)
    return objects


def apiservice_of(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (api,) = [o for o in objects if o["kind"] == "APIService" and o["spec"].get("group") == GROUP]
    return api


def service_account_of(objects: list[dict[str, Any]], kind: str, *, name: str | None = None) -> tuple[str, str]:
    """(namespace, serviceAccountName) of the workload of ``kind`` (the one called ``name`` if several)."""
    found = [o for o in objects if o["kind"] == kind]
    if len(found) > 1 and name is not None:
        found = [o for o in found if o["metadata"]["name"] == name]
    (w,) = found
    return w["metadata"]["namespace"], w["spec"]["template"]["spec"]["serviceAccountName"]


@dataclass
class Installation:
    cp: ControlPlane
    base: Path
    objects: list[dict[str, Any]] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    storage: Path = field(init=False)
    server: Process | None = None
    agent: Process | None = None

    def __post_init__(self) -> None:
        self.storage = self.base / "storage"
        self.storage.mkdir(parents=True, exist_ok=True)

    @property
    def apiservice(self) -> dict[str, Any]:
        return apiservice_of(self.objects)

    @property
    def service(self) -> tuple[str, str]:
        svc = self.apiservice["spec"]["service"]
        return svc["namespace"], svc["name"]

    def tls_dir(self) -> Path:
        return self.base / "render/manifests" / TLS_FILES

    def apply(self) -> None:
        self.objects = render(self.base / "render")
        ns, name = self.service
        applied = []
        for o in self.objects:
            if o["kind"] in WORKLOADS:
                continue
            if o["kind"] == "Service" and (o["metadata"].get("namespace"), o["metadata"]["name"]) == (ns, name):
                o = dict(
                    o,
                    spec={
                        "type": "ExternalName",
                        "externalName": "localhost",
                        "ports": [{"name": "https", "port": self.port, "protocol": "TCP"}],
                    },
                )
            if o["kind"] == "APIService" and o["spec"].get("group") == GROUP:
                o = dict(o, spec=dict(o["spec"], service=dict(o["spec"]["service"], port=self.port)))
            applied.append(o)
        self.cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(applied))

    def token_kubeconfig(self, namespace: str, name: str) -> Path:
        """A kubeconfig holding a TokenRequest token of service account ``namespace/name``."""
        token = self.cp.kubectl("create", "token", name, "-n", namespace, "--duration", "2h").stdout.strip()
        return write_kubeconfig(
            self.base / f"sa-{namespace}-{name}.kubeconfig", server=self.cp.server, ca=self.cp.ca, token=token
        )

    def start_server(self) -> None:
        ns, sa = service_account_of(self.objects, "Deployment", name=self.service[1])
        kubeconfig = self.token_kubeconfig(ns, sa)
        tls = self.tls_dir()
        self.server = Process(
            name="coredump-apiserver",
            log=self.base / "coredump-apiserver.log",
            argv=[
                sys.executable,
                "-m",
                "apiserver",
                "--secure-port",
                str(self.port),
                "--bind-address",
                "127.0.0.1",
                "--tls-cert-file",
                str(tls / "tls.crt"),
                "--tls-private-key-file",
                str(tls / "tls.key"),
                "--etcd-servers",
                self.cp.etcd_url,
                "--storage-root",
                str(self.storage),
                "--kubeconfig",
                str(kubeconfig),
                "--authentication-kubeconfig",
                str(kubeconfig),
                "--authorization-kubeconfig",
                str(kubeconfig),
                "--log-level",
                "info",
            ],
        )
        self.server.start()
        self.wait_available()

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def wait_available(self, *, want: str = "True", timeout: float = 90.0) -> None:
        name = self.apiservice["metadata"]["name"]

        def available() -> object:
            if self.server is not None:
                self.server.check()
            api = self.cp.get_json("apiservice", name)
            status = {c["type"]: c for c in api.get("status", {}).get("conditions", [])}.get("Available")
            return status if status and status["status"] == want else NotYet(status)

        wait_until(available, what=f"APIService {name} Available={want}", timeout=timeout, interval=0.5)

    def start_agent(self) -> Path:
        """Runs the agent with every host path in a temp dir; returns its host dir (handler config inside)."""
        ns, sa = service_account_of(self.objects, "DaemonSet")
        kubeconfig = self.token_kubeconfig(ns, sa)
        node = self.base / "node"
        sysctl = node / "sysctl"
        for rel, value in (("kernel/core_pattern", "core"), ("kernel/core_pipe_limit", "0"), ("fs/suid_dumpable", "0")):
            (sysctl / rel).parent.mkdir(parents=True, exist_ok=True)
            (sysctl / rel).write_text(value + "\n")
        proc = node / "proc"
        own = proc / str(os.getpid()) / "ns"
        own.mkdir(parents=True, exist_ok=True)
        host_dir = node / "hostdir"
        self.agent = Process(
            name="coredump-agent",
            log=self.base / "coredump-agent.log",
            argv=[
                sys.executable,
                "-m",
                "handler.agent.cli",
                "run",
                "--sysctl-root",
                str(sysctl),
                "--proc-root",
                str(proc),
                "--host-root",
                "/",
                "--host-dir",
                str(host_dir),
                "--storage-root",
                str(self.storage),
                "--node-name",
                "node-1",
                "--kubeconfig",
                str(kubeconfig),
                "--crictl",
                "",
                "--metrics-bind-address",
                "127.0.0.1",
                "--metrics-port",
                "0",
                "-v",
            ],
        )
        self.agent.start()
        return host_dir

    def stop(self) -> None:
        for p in (self.agent, self.server):
            if p is not None:
                p.stop()
