"""
The whole path through the real ``coredump-apiserver`` (dev mode, TLS, its auth) with the real kubectl:
auto-created endpoints for crashed pods, the deleted-pod flow, the dump, and the delete-cores opt-in.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from handler import layout

from fixtures_apiserver import RunningServer, endpoint_manifest, start_apiserver
from apiserver_harness import DUMP_PATH, new_uid, store_core
from waiting import wait_until
from digests import content_matches

pytestmark = pytest.mark.kubectl

T0 = datetime.datetime(2026, 11, 23, 10, 0, tzinfo=datetime.timezone.utc)
CRASHED_UID = new_uid()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, real_core: Path) -> Iterator[RunningServer]:
    directory = tmp_path_factory.mktemp("dump-e2e")
    root = directory / "cores"
    root.mkdir()
    # A pod that crashed before the server started and has no endpoint: auto-create must list it.
    store_core(
        root, namespace="shop", pod="cart-0", pod_uid=CRASHED_UID, container="app", data=real_core.read_bytes(), when=T0
    )
    srv = start_apiserver(directory, "--storage-root", str(root))
    try:
        yield srv
    finally:
        srv.stop()
    assert "Traceback" not in srv.log_path.read_text(), srv.log_path.read_text()[-5000:]


def test_auto_created_endpoint_lists_the_crashed_pod_and_dumps(server: RunningServer, tmp_path: Path) -> None:
    items = wait_until(
        lambda: json.loads(server.kubectl("get", "coredumpendpoints", "-A", "-o", "json").stdout)["items"],
        what="an auto-created endpoint",
        timeout=10,
        interval=0.1,
    )
    [obj] = [i for i in items if i["metadata"]["name"] == "cart-0"]
    assert obj["spec"]["podUID"] == CRASHED_UID and obj["status"]["coreCount"] == 1
    archive = tmp_path / "cores.tar.gz"
    with archive.open("wb") as out:
        subprocess.run(
            [
                "kubectl",
                "--kubeconfig",
                str(server.kubeconfig),
                "get",
                "--raw",
                DUMP_PATH.format(ns="shop", name="cart-0"),
            ],
            stdout=out,
            check=True,
            env={"HOME": str(server.dev_dir), "PATH": "/usr/bin:/bin"},
        )
    with tarfile.open(archive) as tf:
        names = tf.getnames()
        core = tf.extractfile(next(n for n in names if n.endswith(".core"))).read()  # type: ignore[union-attr]
        meta = json.loads(tf.extractfile(next(n for n in names if n.endswith(".json"))).read())  # type: ignore[union-attr]
    assert content_matches(core, meta)


def test_deleted_pod_flow_and_delete_cores_opt_in(server: RunningServer, real_core: Path, tmp_path: Path) -> None:
    uid = new_uid()
    store_core(
        server.storage_root,
        namespace="shop",
        pod="gone-0",
        pod_uid=uid,
        container="app",
        data=real_core.read_bytes(),
        when=T0,
    )
    store_core(
        server.storage_root,
        namespace="shop",
        pod="gone-0",
        pod_uid=new_uid(),
        container="app",
        data=b"an earlier incarnation",
        when=T0 - datetime.timedelta(days=1),
    )
    # Two incarnations stored and no live pod: the user names the one they want (apply: dev mode may have
    # auto-created it already, bound to the newest incarnation, within a second of the commit).
    manifest = tmp_path / "cde.yaml"
    manifest.write_text(yaml.safe_dump(endpoint_manifest("gone-0", namespace="shop", pod_uid=uid)))
    server.kubectl("apply", "-f", str(manifest))
    got = json.loads(server.kubectl("get", "cde", "-n", "shop", "gone-0", "-o", "json").stdout)
    assert got["status"]["coreCount"] == 1 and got["status"]["lastSignal"] == "SIGSEGV"

    response = server.request("GET", DUMP_PATH.format(ns="shop", name="gone-0") + "?container=..%2F..")
    assert response.status == 400 and response.json()["reason"] == "BadRequest"

    server.kubectl("delete", "cde", "-n", "shop", "gone-0")
    assert len(layout.list_cores(server.storage_root, namespace="shop", pod="gone-0")) == 2  # kept
    manifest.write_text(yaml.safe_dump(endpoint_manifest("gone-0", namespace="shop", pod_uid=uid)))
    server.kubectl("create", "-f", str(manifest))
    server.kubectl("annotate", "cde", "-n", "shop", "gone-0", "coredump.example.io/delete-cores=true")
    server.kubectl("delete", "cde", "-n", "shop", "gone-0")
    left = layout.list_cores(server.storage_root, namespace="shop", pod="gone-0")
    assert [c.ref.pod_uid for c in left] != [uid] and len(left) == 1  # only the other incarnation remains
