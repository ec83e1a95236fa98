"""
Fixtures of the dump tests: real kernel cores, a storage root filled through ``handler.layout.CoreWriter``,
and the dump handler served over real TLS with a kubeconfig for the real kubectl.

The test modules import these helpers explicitly (``from apiserver_harness import DumpServer``); the
fixtures (``dump_server``, ``real_core``, ``storage_root``, ``crasher``, ``app``, ``dev_registry``) are in this
folder's conftest.py. The server here is the dump
route alone on aiohttp, with the error middleware's Status shape and an in-memory registry; the
end-to-end test through the full API server lives in ``test_dump_e2e.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from fake_clock import FakeClock
from fake_kube import FakeKube
from isal import isal_zlib
from multidict import CIMultiDict

from apiserver import context
from apiserver.api import errors
from apiserver.registry import errors as registry_errors
from apiserver.auth.options import AuthOptions, AuthSetup, add_auth_flags, build_auth
from apiserver.registry.coredata import CoreData
from apiserver.registry.endpoints import EndpointRegistry
from apiserver.registry.memory import MemoryStore
from handler import layout

GV = "/apis/coredump.example.io/v1alpha1"
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
        proc = subprocess.run(
            ["bash", "-c", 'ulimit -c unlimited && exec "$@"', "crasher", *args], cwd=workdir, capture_output=True
        )
        assert proc.returncode < 0 or proc.returncode >= 128, proc
        cores = [p for p in workdir.iterdir() if p.name == "core" or p.name.startswith("core.")]
        assert cores, f"no core in {workdir}: is core_pattern 'core'? ({proc})"
        return cores[0]


@dataclasses.dataclass(frozen=True)
class StoredFixtureCore:
    stored: layout.StoredCore
    data_sha256: str

    @property
    def core_id(self) -> str:
        return self.stored.ref.core_id


def store_core(
    root: Path,
    *,
    namespace: str,
    pod: str,
    pod_uid: str,
    container: str,
    data: bytes,
    when: datetime.datetime,
    comm: str = "crasher",
    pid: int = 4242,
    signal: int = 11,
    exe: str = "/usr/bin/crasher",
    members: int = 1,
) -> StoredFixtureCore:
    """File a core the way the node handler does: gzip (ISA-L level 1) once, metadata committed last."""
    core_id = layout.make_core_id(timestamp=when, comm=comm, pid=pid, signal=signal)
    digest = hashlib.sha256(data).hexdigest()
    with layout.CoreWriter(
        root, namespace=namespace, pod=pod, pod_uid=pod_uid, container=container, core_id=core_id
    ) as writer:
        # Several members when asked: the handler may flush a member per bounded chunk.
        step = max(1, -(-len(data) // members))
        for i in range(0, max(len(data), 1), step):
            writer.write(isal_zlib.compress(data[i : i + step], 1, 31))
        stored = writer.commit(
            {
                "containerID": "containerd://" + "ab" * 32,
                "node": "node-1",
                "image": "example/crasher:1",
                "imageDigest": "sha256:" + "cd" * 32,
                "pid": pid,
                "signal": signal,
                "signalName": {11: "SIGSEGV", 6: "SIGABRT", 7: "SIGBUS"}.get(signal, f"SIG{signal}"),
                "comm": comm,
                "exe": exe,
                "buildID": "0123456789abcdef",
                "timestamp": layout.rfc3339(when),
                "size": len(data),
                "observedSize": len(data),
                "sha256": digest,
                "truncated": False,
                "truncationReason": None,
                "compression": "gzip",
            }
        )
    return StoredFixtureCore(stored=stored, data_sha256=digest)


class MemoryRegistry:
    """The one registry call the dump handler makes, over a dict: ``get`` with 404 as the real one says it."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}

    def add(self, *, namespace: str, name: str, pod_uid: str) -> None:
        self.objects[(namespace, name)] = {
            "apiVersion": "coredump.example.io/v1alpha1",
            "kind": "CoredumpEndpoint",
            "metadata": {"namespace": namespace, "name": name},
            "spec": {"podUID": pod_uid},
        }

    async def get(self, *, namespace: str, name: str, with_status: bool = True) -> dict[str, Any]:
        try:
            return self.objects[(namespace, name)]
        except KeyError:
            raise registry_errors.NotFound(name=name) from None


@web.middleware
async def status_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
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


def new_uid() -> str:
    return str(uuid.uuid4())


def metadata_of(tar_members: dict[str, bytes], name: str) -> dict[str, Any]:
    return json.loads(tar_members[name])


def env_without_proxy() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


# -- the delegated-authentication app (test_auth_delegated, test_auth_strict) --


@dataclasses.dataclass
class App:
    url: str
    fake: FakeKube
    setup: AuthSetup
    certs: Path

    def client_ssl(self, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.fake.ca_file))
        if cert:
            ctx.load_cert_chain(*cert)
        return ctx

    async def get(
        self,
        path: str,
        *,
        cert: tuple[Path, Path] | None = None,
        token: str | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        all_headers = list(headers or [])
        if token:
            all_headers.append(("Authorization", f"Bearer {token}"))
        async with aiohttp.ClientSession() as session:
            async with session.get(
                self.url + path, ssl=self.client_ssl(cert), headers=CIMultiDict(all_headers)
            ) as response:
                return response.status, await response.json()


async def _whoami(request: web.Request) -> web.Response:
    user = request[context.USER]
    attributes = request[context.ATTRIBUTES]
    return web.json_response(
        {
            "user": user.name,
            "groups": list(user.groups),
            "extra": {k: list(v) for k, v in user.extra.items()},
            "verb": attributes.verb,
        }
    )


def parse_flags(*flags: str) -> AuthOptions:
    parser = argparse.ArgumentParser()
    add_auth_flags(parser)
    return AuthOptions.from_args(parser.parse_args(list(flags)))


async def start_app(
    fake: FakeKube, directory: Path, *extra_flags: str, clock: FakeClock | None = None
) -> tuple[web.AppRunner, App]:
    kubeconfig = fake.write_kubeconfig(directory / "server.kubeconfig")
    args = parse_flags(
        "--authentication-kubeconfig", str(kubeconfig), "--authorization-kubeconfig", str(kubeconfig), *extra_flags
    )
    setup = await build_auth(options=args, dev=None, **({"sleep": clock.sleep} if clock else {}))
    app = web.Application(middlewares=[setup.middleware])
    app.router.add_get("/{tail:.*}", _whoami)
    serving = fake.client_ca.issue(cn="coredump-apiserver", server=True, directory=directory)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*serving)
    setup.configure_ssl(ctx)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock, ssl_context=ctx).start()
    return runner, App(url=f"https://127.0.0.1:{sock.getsockname()[1]}", fake=fake, setup=setup, certs=directory)


def front_proxy(app: App, cn: str = "front-proxy-client") -> tuple[Path, Path]:
    return app.fake.issue_client_cert(app.certs, cn=cn, ca="front-proxy")


# -- registries over a storage root (test_coredata_registry, test_status_stored) --

T0 = datetime.datetime(2026, 11, 23, 10, 0, tzinfo=datetime.timezone.utc)


def body(name: str, uid: str | None = None, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "coredump.example.io/v1alpha1",
        "kind": "CoredumpEndpoint",
        "metadata": {"name": name},
        "spec": {},
    }
    if uid:
        obj["spec"]["podUID"] = uid
    if annotations:
        obj["metadata"]["annotations"] = annotations
    return obj


async def make_registry(coredata: CoreData) -> AsyncIterator[EndpointRegistry]:
    store = MemoryStore()
    await store.start()
    await coredata.start()
    try:
        yield EndpointRegistry(store=store, coredata=coredata)
    finally:
        await coredata.close()
        await store.close()


# -- the real server process with delegated auth (test_auth_server, test_metrics) --

SERVER = Path(sys.executable).parent / "coredump-apiserver"


@dataclasses.dataclass
class Server:
    url: str
    fake: FakeKube
    directory: Path
    storage_root: Path
    logs: list[str]
    admin: tuple[Path, Path]

    async def request(
        self,
        method: str,
        path: str,
        *,
        cert: tuple[Path, Path] | None = None,
        token: str | None = None,
        headers: list[tuple[str, str]] | None = None,
        body: Any = None,
    ) -> tuple[int, Any]:
        ctx = ssl.create_default_context(cafile=str(self.fake.ca_file))
        if cert:
            ctx.load_cert_chain(*cert)
        all_headers = CIMultiDict(headers or [])
        if token:
            all_headers["Authorization"] = f"Bearer {token}"
        async with aiohttp.ClientSession() as session:
            async with session.request(method, self.url + path, ssl=ctx, headers=all_headers, json=body) as response:
                raw = await response.read()
                if response.content_type == "application/json":
                    return response.status, json.loads(raw)
                return response.status, raw

    def audit_lines(self) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.logs if line.startswith("{")]
        return [line for line in lines if line.get("logger") == "coredump.audit"]


async def _drain(stream: asyncio.StreamReader, sink: list[str], ready: asyncio.Future[str]) -> None:
    while line := await stream.readline():
        text = line.decode(errors="replace").rstrip()
        sink.append(text)
        if not ready.done() and text.startswith("{"):
            with contextlib.suppress(ValueError):
                entry = json.loads(text)
                if entry.get("msg") == "serving":
                    ready.set_result(entry["address"])
    if not ready.done():
        ready.set_exception(RuntimeError("coredump-apiserver exited before serving:\n" + "\n".join(sink[-20:])))


@contextlib.asynccontextmanager
async def run_server(fake: FakeKube, directory: Path, *flags: str) -> AsyncIterator[Server]:
    kubeconfig = fake.write_kubeconfig(directory / "server.kubeconfig")
    cert, key = fake.client_ca.issue(cn="coredump-apiserver", server=True, directory=directory, stem="serving")
    storage_root = directory / "cores"
    storage_root.mkdir(exist_ok=True)
    proc = await asyncio.create_subprocess_exec(
        str(SERVER),
        "--secure-port=0",
        "--bind-address=127.0.0.1",
        f"--tls-cert-file={cert}",
        f"--tls-private-key-file={key}",
        f"--storage-root={storage_root}",
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        *flags,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    logs: list[str] = []
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    drain = asyncio.create_task(_drain(proc.stderr, logs, ready))
    try:
        address = await asyncio.wait_for(ready, timeout=30)
        admin = fake.issue_client_cert(directory, cn="test-admin", orgs=["system:masters"])
        yield Server(url=address, fake=fake, directory=directory, storage_root=storage_root, logs=logs, admin=admin)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout=15)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        await drain
