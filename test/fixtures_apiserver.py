"""
A real ``coredump-apiserver`` for the tests: started as a subprocess in dev mode over TLS, with the
dev kubeconfig for real kubectl, and a small synchronous HTTPS client that presents the dev client
certificates. ``apiserver`` is shared per module (memory store); ``start_apiserver`` starts more, e.g.
on a real etcd.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from waiting import wait_until

BIN = Path(sys.executable).parent
KUBECTL_DIR = Path(os.path.realpath(shutil.which("kubectl") or "/nonexistent")).parent
OLDEST_KUBECTL, NEWEST_KUBECTL = "1.27", "1.33"
START_TIMEOUT = 30.0


def kubectl_binary(version: str | None) -> str:
    path = KUBECTL_DIR / (f"kubectl.{version}" if version else "kubectl")
    if not path.exists():
        pytest.skip(f"kubectl {version or ''} is not installed beside {KUBECTL_DIR}")
    return str(path)


@dataclasses.dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclasses.dataclass
class RunningServer:
    args: list[str]
    dev_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    port: int = 0

    @property
    def kubeconfig(self) -> Path:
        return self.dev_dir / "kubeconfig"

    @property
    def storage_root(self) -> Path:
        for i, arg in enumerate(self.args):
            if arg == "--storage-root":
                return Path(self.args[i + 1])
        return self.dev_dir / "cores"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [str(BIN / "coredump-apiserver"), "--dev", "--dev-dir", str(self.dev_dir), *self.args],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        assert self.process.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        line = b""
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            if b"serving https://127.0.0.1:" in line:
                self.port = int(line.split(b"127.0.0.1:")[1].split()[0].rstrip(b","))
                break
        if not self.port:
            self.stop()
            raise RuntimeError(f"coredump-apiserver did not start: {self.log_path.read_text()[-3000:]}")
        wait_until(
            lambda: self.request("GET", "/readyz").status == 200,
            what="coredump-apiserver to be ready",
            timeout=max(deadline - time.monotonic(), 0.0),
            ignore=(OSError,),
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ssl_context(self, *, user: str | None = "admin") -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.dev_dir / "ca.crt"))
        if user:
            context.load_cert_chain(str(self.dev_dir / f"{user}.crt"), str(self.dev_dir / f"{user}.key"))
        return context

    def connect(self, *, user: str | None = "admin", timeout: float = 30) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ssl_context(user=user), timeout=timeout)

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        headers: dict[str, str] | None = None,
        user: str | None = "admin",
        content_type: str = "application/json",
    ) -> Response:
        headers = dict(headers or {})
        if body is not None and not isinstance(body, bytes | str):
            body = json.dumps(body)
        if body is not None:
            headers.setdefault("Content-Type", content_type)
        connection = self.connect(user=user)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return Response(status=response.status, headers=response.headers, body=response.read())
        finally:
            connection.close()

    def kubectl(
        self,
        *args: str,
        version: str | None = None,
        context: str | None = None,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        command = [kubectl_binary(version), "--kubeconfig", str(self.kubeconfig)]
        if context:
            command += ["--context", context]
        env = {**os.environ, "HOME": str(self.dev_dir)}  # kubectl's discovery cache stays per server
        result = subprocess.run(
            [*command, *args], input=input, capture_output=True, text=True, timeout=timeout, env=env
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result


def start_apiserver(directory: Path, *args: str) -> RunningServer:
    directory.mkdir(parents=True, exist_ok=True)
    server = RunningServer(
        args=["--secure-port", "0", *args], dev_dir=directory / "dev", log_path=directory / "apiserver.log"
    )
    server.start()
    return server


@pytest.fixture(scope="module")
def apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A dev-mode server on the in-memory store, shared by the tests of one module."""
    server = start_apiserver(tmp_path_factory.mktemp("apiserver"))
    try:
        yield server
    finally:
        server.stop()
    assert "Traceback" not in server.log_path.read_text(), server.log_path.read_text()[-5000:]


def endpoint_manifest(
    name: str,
    *,
    namespace: str = "default",
    pod_uid: str | None = None,
    labels: dict[str, str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    import uuid

    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if labels:
        metadata["labels"] = labels
    return {
        "apiVersion": "coredump.example.io/v1alpha1",
        "kind": "CoredumpEndpoint",
        "metadata": metadata,
        "spec": {"podUID": pod_uid or str(uuid.uuid4())},
        **extra,
    }


COLLECTION = "/apis/coredump.example.io/v1alpha1/namespaces/{namespace}/coredumpendpoints"


def collection_path(namespace: str = "default") -> str:
    return COLLECTION.format(namespace=namespace)


def item_path(name: str, namespace: str = "default") -> str:
    return f"{collection_path(namespace)}/{name}"
