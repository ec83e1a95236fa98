"""
Fixtures of the API server tests: real cores of a crashing program, a storage root, the dump handlers on a
memory registry, the delegated-authentication app and a dev-mode registry. Their helpers are in
:mod:`apiserver_harness`.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import yaml
from aiohttp import web
from apiserver_harness import (
    CRASHER_C,
    App,
    Crasher,
    DumpServer,
    MemoryRegistry,
    make_registry,
    start_app,
    status_middleware,
)
from fake_kube import FakeKube, TestCA

from apiserver import context
from apiserver.handlers.dump import get_dump
from apiserver.registry.coredata import CoreData
from apiserver.registry.endpoints import EndpointRegistry


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


@pytest.fixture
def storage_root(tmp_path: Path) -> Path:
    root = tmp_path / "cores"
    root.mkdir()
    return root


@pytest_asyncio.fixture
async def dump_server(storage_root: Path, tmp_path: Path) -> AsyncIterator[DumpServer]:
    ca = TestCA(tmp_path, name="dump-test-ca")
    cert, key = ca.issue(cn="127.0.0.1", server=True)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    registry = MemoryRegistry()
    app = web.Application(middlewares=[status_middleware])
    app[context.REGISTRY] = registry  # type: ignore[assignment]
    app[context.STORAGE_ROOT] = storage_root
    app.router.add_get(
        "/apis/coredump.example.io/v1alpha1/namespaces/{namespace}/coredumpendpoints/{name}/dump", get_dump
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock, ssl_context=ctx).start()
    url = f"https://127.0.0.1:{sock.getsockname()[1]}"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "t", "cluster": {"server": url, "certificate-authority": str(ca.cert_file)}}],
                "users": [{"name": "u", "user": {"token": "dump-test"}}],
                "contexts": [{"name": "t", "context": {"cluster": "t", "user": "u"}}],
                "current-context": "t",
            }
        )
    )
    try:
        yield DumpServer(url=url, ca_file=ca.cert_file, kubeconfig=kubeconfig, registry=registry, root=storage_root)
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture
async def app(fake_kube: FakeKube, tmp_path: Path) -> AsyncIterator[App]:
    runner, started = await start_app(fake_kube, tmp_path)
    try:
        yield started
    finally:
        await runner.cleanup()
        await started.setup.close()


@pytest_asyncio.fixture
async def cluster_registry(storage_root: Path, fake_kube: FakeKube, tmp_path: Path) -> AsyncIterator[EndpointRegistry]:
    kubeconfig = fake_kube.write_kubeconfig(tmp_path / "server.kubeconfig")
    async for registry in make_registry(CoreData(storage_root=storage_root, kubeconfig=str(kubeconfig))):
        yield registry


@pytest_asyncio.fixture
async def dev_registry(storage_root: Path) -> AsyncIterator[EndpointRegistry]:
    async for registry in make_registry(CoreData(storage_root=storage_root)):
        yield registry
