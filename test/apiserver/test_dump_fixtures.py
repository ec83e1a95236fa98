"""
Fixtures of the dump tests: real kernel cores, a storage root filled through ``handler.layout.CoreWriter``,
and the dump handler served over real TLS with a kubeconfig for the real kubectl.

The test modules import these with ``from test_dump_fixtures import *``. The server here is the dump
route alone on aiohttp, with the error middleware's Status shape and an in-memory registry; the
end-to-end test through the full API server lives in ``test_dump_e2e.py``.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from aiohttp import web
from isal import isal_zlib

from fake_kube import TestCA
from handler import layout

from apiserver import context
from apiserver.api import errors
from apiserver.handlers.dump import get_dump

__all__ = ["CRASHER_C", "Crasher", "DumpServer", "StoredFixtureCore", "crasher", "dump_server", "real_core",
           "storage_root", "store_core", "DUMP_PATH"]

DUMP_PATH = "/apis/coredump.example.io/v1alpha1/namespaces/{ns}/coredumpendpoints/{name}/dump"

CRASHER_C = r"""
#include <stdlib.h>
#include <string.h>
#include <signal.h>
/* A distinct frame for gdb to name, and some heap so the core is more than a few pages. */
__attribute__((noinline)) void crash_here(volatile int *p) { *p = 42; }
int main(int argc, char **argv) {
    size_t n = argc > 1 ? (size_t)atol(argv[1]) : 0;
    if (n) { char *b = malloc(n); for (size_t i = 0; i < n; i++) b[i] = (char)(i * 7 / 4096); }
    if (argc > 2) raise(atoi(argv[2]));
    crash_here((volatile int *)0);
    return 0;
}
"""


@dataclasses.dataclass(frozen=True)
class Crasher:
    binary: Path

    def crash(self, workdir: Path, *, heap: int = 0, signal: int | None = None) -> Path:
        """Run the program until it dumps core in ``workdir`` (core_pattern is ``core``); return the core."""
        workdir.mkdir(parents=True, exist_ok=True)
        args = [str(self.binary), str(heap)] + ([str(signal)] if signal else [])
        proc = subprocess.run(["bash", "-c", 'ulimit -c unlimited && exec "$@"', "crasher", *args], cwd=workdir,
                              capture_output=True)
        assert proc.returncode < 0 or proc.returncode >= 128, proc
        cores = [p for p in workdir.iterdir() if p.name == "core" or p.name.startswith("core.")]
        assert cores, f"no core in {workdir}: is core_pattern 'core'? ({proc})"
        return cores[0]


@pytest.fixture(scope="session")
def crasher(tmp_path_factory: pytest.TempPathFactory) -> Crasher:
    if not shutil.which("gcc"):
        pytest.skip("gcc is needed to build the crashing program")
    d = tmp_path_factory.mktemp("crasher")
    (d / "crasher.c").write_text(CRASHER_C)
    subprocess.run(["gcc", "-g", "-O0", "-o", str(d / "crasher"), str(d / "crasher.c")], check=True)
    return Crasher(binary=d / "crasher")


@pytest.fixture(scope="session")
def real_core(crasher: Crasher, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real SIGSEGV core of the crasher (a few hundred KiB of heap in it)."""
    return crasher.crash(tmp_path_factory.mktemp("real-core"), heap=300_000)


@dataclasses.dataclass(frozen=True)
class StoredFixtureCore:
    stored: layout.StoredCore
    data_sha256: str

    @property
    def core_id(self) -> str:
        return self.stored.ref.core_id


def store_core(root: Path, *, namespace: str, pod: str, pod_uid: str, container: str, data: bytes,
               when: datetime.datetime, comm: str = "crasher", pid: int = 4242, signal: int = 11,
               exe: str = "/usr/bin/crasher", members: int = 1) -> StoredFixtureCore:
    """File a core the way the node handler does: gzip (ISA-L level 1) once, metadata committed last."""
    core_id = layout.make_core_id(timestamp=when, comm=comm, pid=pid, signal=signal)
    digest = hashlib.sha256(data).hexdigest()
    with layout.CoreWriter(root, namespace=namespace, pod=pod, pod_uid=pod_uid, container=container,
                           core_id=core_id) as writer:
        # Several members when asked: the handler may flush a member per bounded chunk.
        step = max(1, -(-len(data) // members))
        for i in range(0, max(len(data), 1), step):
            writer.write(isal_zlib.compress(data[i:i + step], 1, 31))
        stored = writer.commit({
            "containerID": "containerd://" + "ab" * 32, "node": "node-1", "image": "example/crasher:1",
            "imageDigest": "sha256:" + "cd" * 32, "pid": pid, "signal": signal,
            "signalName": {11: "SIGSEGV", 6: "SIGABRT", 7: "SIGBUS"}.get(signal, f"SIG{signal}"),
            "comm": comm, "exe": exe, "buildID": "0123456789abcdef", "timestamp": layout.rfc3339(when),
            "size": len(data), "observedSize": len(data), "sha256": digest, "truncated": False,
            "truncationReason": None, "compression": "gzip",
        })
    return StoredFixtureCore(stored=stored, data_sha256=digest)


@pytest.fixture
def storage_root(tmp_path: Path) -> Path:
    root = tmp_path / "cores"
    root.mkdir()
    return root


class MemoryRegistry:
    """The one registry call the dump handler makes, over a dict: ``get`` with 404 as the real one says it."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}

    def add(self, *, namespace: str, name: str, pod_uid: str) -> None:
        self.objects[(namespace, name)] = {
            "apiVersion": "coredump.example.io/v1alpha1", "kind": "CoredumpEndpoint",
            "metadata": {"namespace": namespace, "name": name}, "spec": {"podUID": pod_uid}}

    async def get(self, *, namespace: str, name: str, with_status: bool = True) -> dict[str, Any]:
        try:
            return self.objects[(namespace, name)]
        except KeyError:
            raise errors.not_found(name=name) from None


@web.middleware
async def _status_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except errors.ApiError as exc:
        return web.json_response(exc.to_status(), status=exc.code, headers=exc.headers)


@dataclasses.dataclass
class DumpServer:
    url: str
    ca_file: Path
    kubeconfig: Path
    registry: MemoryRegistry
    root: Path

    def dump_url(self, *, ns: str, name: str) -> str:
        return self.url + DUMP_PATH.format(ns=ns, name=name)

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


@pytest_asyncio.fixture
async def dump_server(storage_root: Path, tmp_path: Path) -> AsyncIterator[DumpServer]:
    ca = TestCA(tmp_path, name="dump-test-ca")
    cert, key = ca.issue(cn="127.0.0.1", server=True)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    registry = MemoryRegistry()
    app = web.Application(middlewares=[_status_middleware])
    app[context.REGISTRY] = registry  # type: ignore[assignment]
    app[context.STORAGE_ROOT] = storage_root
    app.router.add_get("/apis/coredump.example.io/v1alpha1/namespaces/{namespace}/coredumpendpoints/{name}/dump",
                       get_dump)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock, ssl_context=ctx).start()
    url = f"https://127.0.0.1:{sock.getsockname()[1]}"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "t", "cluster": {"server": url, "certificate-authority": str(ca.cert_file)}}],
        "users": [{"name": "u", "user": {"token": "dump-test"}}],
        "contexts": [{"name": "t", "context": {"cluster": "t", "user": "u"}}], "current-context": "t"}))
    try:
        yield DumpServer(url=url, ca_file=ca.cert_file, kubeconfig=kubeconfig, registry=registry, root=storage_root)
    finally:
        await runner.cleanup()


def new_uid() -> str:
    return str(uuid.uuid4())


def metadata_of(tar_members: dict[str, bytes], name: str) -> dict[str, Any]:
    return json.loads(tar_members[name])


def env_without_proxy() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


__all__ += ["MemoryRegistry", "new_uid", "metadata_of", "env_without_proxy"]
