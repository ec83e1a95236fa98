"""
The user's path: ``kubectl get --raw .../dump > cores.tar.gz``, then GNU tar, Python's tarfile and gdb.

The cores are real kernel cores of a crashing C program, filed with the layout's commit protocol.
"""

from __future__ import annotations

import asyncio
import datetime
import gzip
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from handler import layout

from apiserver_harness import Crasher, DumpServer, DUMP_PATH, new_uid, store_core
from digests import content_matches

pytestmark = pytest.mark.kubectl

T0 = datetime.datetime(2026, 11, 23, 10, 15, tzinfo=datetime.timezone.utc)


async def kubectl_raw(server: DumpServer, path: str, out: Path) -> subprocess.CompletedProcess[bytes]:
    with open(out, "wb") as f:
        proc = await asyncio.create_subprocess_exec(
            "kubectl",
            "--kubeconfig",
            str(server.kubeconfig),
            "get",
            "--raw",
            path,
            stdout=f,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate()
    return subprocess.CompletedProcess(["kubectl"], proc.returncode or 0, b"", err)


@pytest.fixture
def shop_pod(dump_server: DumpServer, crasher: Crasher, real_core: Path, tmp_path: Path) -> dict[str, object]:
    """Pod shop/web-0: a SIGSEGV and a SIGABRT core in "app" (one stored in several gzip members), and one
    in "sidecar" filed by the node handler's own ``coredump-handler import``."""
    uid = new_uid()
    abort_core = crasher.crash(tmp_path / "abort", heap=100_000, signal=6)
    store_core(
        dump_server.root,
        namespace="shop",
        pod="web-0",
        pod_uid=uid,
        container="app",
        data=real_core.read_bytes(),
        when=T0,
        pid=101,
        signal=11,
    )
    store_core(
        dump_server.root,
        namespace="shop",
        pod="web-0",
        pod_uid=uid,
        container="app",
        data=abort_core.read_bytes(),
        when=T0 + datetime.timedelta(minutes=5),
        pid=102,
        signal=6,
        members=7,
    )
    handler = Path(sys.executable).parent / "coredump-handler"
    subprocess.run(
        [
            str(handler),
            "--config",
            str(tmp_path / "absent.json"),
            "--storage-root",
            str(dump_server.root),
            "--spool-dir",
            str(tmp_path / "spool"),
            "--state-dir",
            str(tmp_path / "state"),
            "--crictl",
            "",
            "import",
            "--namespace",
            "shop",
            "--pod",
            "web-0",
            "--pod-uid",
            uid,
            "--container",
            "sidecar",
            str(real_core),
        ],
        check=True,
        capture_output=True,
    )
    cores = layout.list_cores(dump_server.root, namespace="shop", pod="web-0", pod_uid=uid)
    assert [c.ref.container for c in cores] == ["app", "app", "sidecar"]
    dump_server.registry.add(namespace="shop", name="web-0", pod_uid=uid)
    return {"uid": uid, "cores": cores}


async def test_kubectl_dump_extracts_with_gnu_tar_and_tarfile_and_gdb_names_the_crash(
    dump_server: DumpServer, shop_pod: dict, crasher: Crasher, tmp_path: Path
) -> None:
    archive = tmp_path / "cores.tar.gz"
    result = await kubectl_raw(dump_server, DUMP_PATH.format(ns="shop", name="web-0"), archive)
    assert result.returncode == 0, result.stderr.decode()

    expected = {f"{c.ref.container}/{c.ref.core_id}": c for c in shop_pod["cores"]}
    # GNU tar, the way a user unpacks it.
    out = tmp_path / "gnu"
    out.mkdir()
    tar = await asyncio.create_subprocess_exec(
        "tar", "-xzf", str(archive), "-C", str(out), stderr=asyncio.subprocess.PIPE
    )
    _, err = await tar.communicate()
    assert tar.returncode == 0 and not err, err.decode()
    extracted = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert extracted == sorted([k + ".core" for k in expected] + [k + ".json" for k in expected])
    for key, core in expected.items():
        meta = json.loads((out / f"{key}.json").read_text())
        assert meta == core.metadata
        assert content_matches((out / f"{key}.core").read_bytes(), meta)

    # Python's tarfile: as a file (gzip members are read by GzipFile), and as a stream through GzipFile
    # (tarfile's own "r|gz" reads one gzip member only; the README says so).
    with tarfile.open(archive) as tf:
        names = tf.getnames()
        by_file = {n: tf.extractfile(n).read() for n in names}  # type: ignore[union-attr]
    with open(archive, "rb") as raw, tarfile.open(fileobj=gzip.GzipFile(fileobj=raw), mode="r|") as tf:
        by_stream = {m.name: tf.extractfile(m).read() for m in tf}  # type: ignore[union-attr]
    assert by_file == by_stream
    for key in expected:
        assert content_matches(by_file[key + ".core"], json.loads(by_file[key + ".json"]))
        info = json.loads(by_file[key + ".json"])
        assert info["size"] == len(by_file[key + ".core"]) and info["podUID"] == shop_pod["uid"]

    # gdb on the extracted SIGSEGV core names the function that crashed.
    segv = next(k for k, c in expected.items() if c.metadata["signal"] == 11 and k.startswith("app/"))
    gdb = await asyncio.create_subprocess_exec(
        "gdb",
        "-batch",
        "-ex",
        "bt",
        str(crasher.binary),
        str(out / f"{segv}.core"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    text = (await gdb.communicate())[0].decode()
    assert "crash_here" in text, text
    assert "SIGSEGV" in text or "Segmentation fault" in text, text


async def test_kubectl_sees_status_errors(dump_server: DumpServer, shop_pod: dict, tmp_path: Path) -> None:
    missing = await kubectl_raw(dump_server, DUMP_PATH.format(ns="shop", name="nope"), tmp_path / "a")
    assert missing.returncode != 0
    assert b"(NotFound)" in missing.stderr and b'"nope" not found' in missing.stderr, missing.stderr
    bad = await kubectl_raw(
        dump_server, DUMP_PATH.format(ns="shop", name="web-0") + "?container=..%2F..", tmp_path / "b"
    )
    assert bad.returncode != 0
    assert b"(BadRequest)" in bad.stderr and b"container" in bad.stderr, bad.stderr
