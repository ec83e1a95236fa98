"""
The real control plane of the e2e suite: etcd, kube-apiserver and kube-controller-manager built by
``test/e2e/build-control-plane``, started as child processes on 127.0.0.1 with certificates made here
(:mod:`pki`), and stopped (SIGTERM, then SIGKILL) when the session ends, also on failure or Ctrl-C.

kube-apiserver runs RBAC, service-account tokens (TokenRequest), the aggregation layer with a front-proxy CA,
and a short ``--request-timeout`` (``E2E_REQUEST_TIMEOUT``, default 20s) so that a slow dump is cut by it.
kube-controller-manager runs the namespace, garbage-collector, service-account and ClusterRole-aggregation
controllers.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pki import CA, service_account_keys
from waiting import wait_until

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
REQUEST_TIMEOUT = os.environ.get("E2E_REQUEST_TIMEOUT", "20s")
CONTROLLERS = ",".join(
    f"{c}-controller"
    for c in (
        "namespace",
        "garbage-collector",
        "serviceaccount",
        "serviceaccount-token",
        "root-ca-certificate-publisher",
        "clusterrole-aggregation",
    )
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build() -> tuple[Path, Path]:
    """The directories of the kube and etcd binaries, built when missing (progress on stderr)."""
    out = subprocess.run([str(HERE / "build-control-plane")], check=True, stdout=subprocess.PIPE, text=True)
    kube, etcd = out.stdout.split()
    return Path(kube), Path(etcd)


def write_kubeconfig(
    path: Path, *, server: str, ca: Path, token: str | None = None, cert: Path | None = None, key: Path | None = None
) -> Path:
    user: dict[str, str] = {}
    if token is not None:
        user["token"] = token
    if cert is not None and key is not None:
        user["client-certificate"], user["client-key"] = str(cert), str(key)
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "e2e",
                "clusters": [{"name": "e2e", "cluster": {"server": server, "certificate-authority": str(ca)}}],
                "users": [{"name": "e2e", "user": user}],
                "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "e2e"}}],
            }
        )
    )
    path.chmod(0o600)
    return path


@dataclass
class Process:
    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )

    def check(self) -> None:
        if self.popen is not None and self.popen.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}; its log ends:\n{tail}")

    def stop(self) -> None:
        p, self.popen = self.popen, None
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=15)


@dataclass
class ControlPlane:
    base: Path
    kube_bin: Path
    etcd_bin: Path
    pki: Path = field(init=False)
    port: int = field(init=False)
    etcd_url: str = field(init=False)
    processes: list[Process] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pki = self.base / "pki"
        self.pki.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.etcd_url = f"http://127.0.0.1:{free_port()}"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.pki / "ca.crt"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.base / "admin.kubeconfig"

    def user_kubeconfig(self, name: str, *, groups: tuple[str, ...] = ()) -> Path:
        """A kubeconfig for a user authenticated by a client certificate of the cluster CA."""
        crt, key = self.cluster_ca.issue(
            directory=self.pki, name=f"user-{name}", common_name=name, organizations=groups
        )
        return write_kubeconfig(self.base / f"{name}.kubeconfig", server=self.server, ca=self.ca, cert=crt, key=key)

    def start(self) -> None:
        self.cluster_ca = CA.create(directory=self.pki, name="ca")
        front = CA.create(directory=self.pki, name="front-proxy-ca")
        serving = self.cluster_ca.issue(
            directory=self.pki,
            name="apiserver",
            common_name="kube-apiserver",
            dns=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"),
            ips=("127.0.0.1",),
            server=True,
        )
        proxy = front.issue(directory=self.pki, name="front-proxy-client", common_name="front-proxy-client")
        admin = self.cluster_ca.issue(
            directory=self.pki, name="admin", common_name="e2e-admin", organizations=("system:masters",)
        )
        sa_key, sa_pub = service_account_keys(directory=self.pki)
        write_kubeconfig(self.admin_kubeconfig, server=self.server, ca=self.ca, cert=admin[0], key=admin[1])

        etcd_peer = free_port()
        self._run(
            "etcd",
            [
                str(self.etcd_bin / "etcd"),
                "--name",
                "e2e",
                "--data-dir",
                str(self.base / "etcd"),
                "--listen-client-urls",
                self.etcd_url,
                "--advertise-client-urls",
                self.etcd_url,
                "--listen-peer-urls",
                f"http://127.0.0.1:{etcd_peer}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{etcd_peer}",
                "--initial-cluster",
                f"e2e=http://127.0.0.1:{etcd_peer}",
                "--listen-metrics-urls",
                f"http://127.0.0.1:{free_port()}",
                "--log-level",
                "warn",
            ],
        )
        self._wait(lambda: urllib.request.urlopen(f"{self.etcd_url}/health", timeout=2).status == 200, "etcd")
        self._run(
            "kube-apiserver",
            [
                str(self.kube_bin / "kube-apiserver"),
                "--etcd-servers",
                self.etcd_url,
                "--bind-address",
                "127.0.0.1",
                "--advertise-address",
                "127.0.0.1",
                "--secure-port",
                str(self.port),
                "--tls-cert-file",
                str(serving[0]),
                "--tls-private-key-file",
                str(serving[1]),
                "--client-ca-file",
                str(self.ca),
                "--authorization-mode",
                "RBAC",
                "--allow-privileged=true",  # as kubeadm and every cluster that runs privileged DaemonSets
                "--anonymous-auth=false",
                "--service-account-issuer",
                "https://kubernetes.default.svc.cluster.local",
                "--service-account-key-file",
                str(sa_pub),
                "--service-account-signing-key-file",
                str(sa_key),
                "--service-cluster-ip-range",
                "10.96.0.0/16",
                "--endpoint-reconciler-type",
                "none",
                "--requestheader-client-ca-file",
                str(front.cert_path),
                "--requestheader-allowed-names",
                "front-proxy-client",
                "--requestheader-username-headers",
                "X-Remote-User",
                "--requestheader-group-headers",
                "X-Remote-Group",
                "--requestheader-extra-headers-prefix",
                "X-Remote-Extra-",
                "--proxy-client-cert-file",
                str(proxy[0]),
                "--proxy-client-key-file",
                str(proxy[1]),
                "--request-timeout",
                REQUEST_TIMEOUT,
                "--profiling=false",
                "--v=1",
            ],
        )
        self._wait(self._apiserver_ready, "kube-apiserver")
        self._run(
            "kube-controller-manager",
            [
                str(self.kube_bin / "kube-controller-manager"),
                "--kubeconfig",
                str(self.admin_kubeconfig),
                "--controllers",
                CONTROLLERS,
                "--service-account-private-key-file",
                str(sa_key),
                "--root-ca-file",
                str(self.ca),
                "--leader-elect=false",
                "--secure-port=0",
                "--bind-address",
                "127.0.0.1",
                "--namespace-sync-period",
                "10s",
                "--v=1",
            ],
        )
        self._wait(
            lambda: self.kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0,
            "the default service account",
        )

    def _apiserver_ready(self) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        with urllib.request.urlopen(f"{self.server}/readyz", context=ctx, timeout=5) as r:
            return r.status == 200

    def _run(self, name: str, argv: list[str]) -> None:
        p = Process(name=name, argv=argv, log=self.base / f"{name}.log")
        p.start()
        self.processes.append(p)

    def _wait(self, ready, what: str, *, timeout: float = 120.0) -> None:
        def probe() -> bool:
            for p in self.processes:
                p.check()  # a child that died ends the wait at once, with its log
            return ready()

        # Not up yet: connection errors and a kubectl that times out; the last one is in the failure.
        wait_until(
            probe,
            what=f"{what} to be ready",
            timeout=timeout,
            interval=0.5,
            ignore=(OSError, subprocess.SubprocessError),
        )

    def stop(self) -> None:
        for p in reversed(self.processes):
            p.stop()
        self.processes.clear()

    def kubectl(
        self,
        *args: str,
        kubeconfig: Path | None = None,
        binary: str = "kubectl",
        check: bool = True,
        input: str | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Runs kubectl (``binary``: a path to kubectl 1.27/1.33) against kube-apiserver."""
        proc = subprocess.run(
            [binary, "--kubeconfig", str(kubeconfig or self.admin_kubeconfig), *args],
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def get_json(self, *args: str) -> dict:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)


def https_get(
    cp: ControlPlane,
    path: str,
    *,
    user: str = "admin",
    headers: dict[str, str] | None = None,
    read_delay: float = 0.0,
    chunk: int = 1 << 16,
) -> tuple[int, dict[str, str], bytes, str | None]:
    """GET ``path`` on kube-apiserver with the client certificate ``pki/<user>.crt``.

    Returns (status, headers, body, error): ``error`` says why the body ended early (the connection was cut);
    ``read_delay`` sleeps between chunks of ``chunk`` bytes to make a slow client.
    """
    import http.client

    ctx = ssl.create_default_context(cafile=str(cp.ca))
    ctx.load_cert_chain(str(cp.pki / f"{user}.crt"), str(cp.pki / f"{user}.key"))
    conn = http.client.HTTPSConnection("127.0.0.1", cp.port, context=ctx, timeout=120)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        parts: list[bytes] = []
        error = None
        try:
            while True:
                data = resp.read1(chunk) if hasattr(resp, "read1") else resp.read(chunk)
                if not data:
                    break
                parts.append(data)
                if read_delay:
                    time.sleep(read_delay)
        except (http.client.IncompleteRead, ConnectionError, ssl.SSLError) as e:
            error = repr(e)
        body = b"".join(parts)
        length = resp.getheader("Content-Length")
        if error is None and length is not None and int(length) != len(body):
            error = f"body ended after {len(body)} of {length} bytes"
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body, error
    finally:
        conn.close()
