"""
Fixtures of the plugin tests: a dev-mode ``coredump-apiserver`` (fixed port, so it can be restarted) over
a storage root holding real cores of a crashing C program, filed with ``coredump-handler import``, and
CoredumpEndpoints for their pods.
"""

from __future__ import annotations

import datetime
import hashlib
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from digests import promised
from fixtures_apiserver import RunningServer, endpoint_manifest, collection_path, start_apiserver
from plugin_harness import BIG_HEAP, T0, PluginWorld, build_crasher, crash, free_port, import_core

from handler import layout
from isal import isal_zlib


def _create_endpoint(
    server: RunningServer, *, namespace: str, pod: str, uid: str, labels: dict[str, str] | None = None
) -> None:
    body = endpoint_manifest(pod, namespace=namespace, pod_uid=uid, labels=labels)
    response = server.request("POST", collection_path(namespace), body=body)
    if response.status == 409 and labels:
        response = server.request(
            "PUT",
            f"{collection_path(namespace)}/{pod}",
            body={
                **body,
                "metadata": {
                    **body["metadata"],
                    "resourceVersion": server.request("GET", f"{collection_path(namespace)}/{pod}").json()["metadata"][
                        "resourceVersion"
                    ],
                },
            },
        )
    assert response.status in (200, 201, 409), response.body


def _file_with_metadata(
    root: Path,
    *,
    namespace: str,
    pod: str,
    uid: str,
    container: str,
    data: bytes,
    extra: dict[str, object],
    sha256: str | None = None,
) -> None:
    """A core filed through the layout's commit protocol, with metadata a newer handler writes (a backtrace)."""
    when = datetime.datetime.fromtimestamp(T0 + 600, tz=datetime.timezone.utc)
    core_id = layout.make_core_id(timestamp=when, comm="crasher", pid=777, signal=11)
    with layout.CoreWriter(
        root, namespace=namespace, pod=pod, pod_uid=uid, container=container, core_id=core_id
    ) as writer:
        writer.write(isal_zlib.compress(data, 1, 31))
        writer.commit(
            {
                "pid": 777,
                "signal": 11,
                "signalName": "SIGSEGV",
                "comm": "crasher",
                "exe": "/usr/bin/crasher",
                "buildID": "",
                "timestamp": layout.rfc3339(when),
                "size": len(data),
                "observedSize": len(data),
                "sha256": sha256 or hashlib.sha256(data).hexdigest(),
                "truncated": False,
                "truncationReason": None,
                "compression": "gzip",
                **extra,
            }
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PluginWorld]:
    if not shutil.which("gcc"):
        pytest.skip("gcc is needed to build the crashing program")
    base = tmp_path_factory.mktemp("plugin")
    crasher = build_crasher(base)
    root = base / "cores"
    root.mkdir()
    uids = {key: str(uuid.uuid4()) for key in ("shop/web-0", "default/big-0", "default/traced-0", "default/bad-0")}
    segv = crash(crasher, base / "c1", heap=300_000)
    abort = crash(crasher, base / "c2", heap=100_000, signal=6)
    big = crash(crasher, base / "c3", heap=BIG_HEAP)
    for core, ns_pod, container, at in (
        (segv, "shop/web-0", "app", T0),
        (abort, "shop/web-0", "app", T0 + 60),
        (segv, "shop/web-0", "sidecar", T0 + 120),
        (big, "default/big-0", "app", T0 + 180),
    ):
        namespace, pod = ns_pod.split("/")
        import_core(
            root=root,
            work=base,
            core=core,
            namespace=namespace,
            pod=pod,
            pod_uid=uids[ns_pod],
            container=container,
            time=at,
        )
    data = segv.read_bytes()
    _file_with_metadata(
        root,
        namespace="default",
        pod="traced-0",
        uid=uids["default/traced-0"],
        container="app",
        data=data,
        extra={
            "signature": "sig-crash-here",
            "backtrace": [
                {"function": "crash_here", "module": "/usr/bin/crasher", "file": "crasher.c", "line": 5},
                {"function": "main", "module": "/usr/bin/crasher"},
            ],
        },
    )
    _file_with_metadata(
        root,
        namespace="default",
        pod="bad-0",
        uid=uids["default/bad-0"],
        container="app",
        data=data,
        extra={},
        sha256="0" * 64,
    )
    originals = {}
    for ns_pod, uid in uids.items():
        namespace, pod = ns_pod.split("/")
        for stored in layout.list_cores(root, namespace=namespace, pod=pod, pod_uid=uid):
            originals[f"{ns_pod}/{stored.ref.container}/{stored.ref.core_id}"] = promised(stored.metadata)
    server = start_apiserver(base / "server", "--storage-root", str(root), "--secure-port", str(free_port()))
    try:
        for ns_pod, uid in uids.items():
            namespace, pod = ns_pod.split("/")
            _create_endpoint(
                server, namespace=namespace, pod=pod, uid=uid, labels={"app": "web"} if pod == "web-0" else None
            )
        yield PluginWorld(
            server=server, root=root, crasher=crasher, cache=base / "cache", uids=uids, originals=originals
        )
    finally:
        server.stop()
