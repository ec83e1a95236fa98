"""The storage layout contract: names, paths, the commit protocol and the listing functions the API server uses."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from handler import layout
from handler.layout import CoreRef, CoreWriter, InvalidName

UID = "0b5a6c1e-1111-4a2b-9c3d-000000000001"
UID2 = "0b5a6c1e-1111-4a2b-9c3d-000000000002"


def write_core(
    root: Path,
    *,
    ns: str = "team-a",
    pod: str = "web-0",
    uid: str = UID,
    container: str = "app",
    core_id: str = "20261123T101500Z-myapp-4242-11",
    body: bytes = b"core",
) -> layout.StoredCore:
    with CoreWriter(root, namespace=ns, pod=pod, pod_uid=uid, container=container, core_id=core_id) as w:
        w.write(gzip.compress(body))
        return w.commit({"size": len(body), "signal": 11, "signalName": "SIGSEGV"})


@pytest.mark.parametrize("bad", ["", "A", "-a", "a-", "a_b", "a.b", "..", "a/b", "x" * 64, "a\nb"])
def test_layout_namespace_and_container_must_be_dns_labels(bad: str) -> None:
    with pytest.raises(InvalidName):
        layout.validate_namespace(bad)
    with pytest.raises(InvalidName):
        layout.validate_container(bad)


def test_layout_valid_names_pass_through() -> None:
    assert layout.validate_namespace("kube-system") == "kube-system"
    assert layout.validate_pod_name("web-0.shard.a") == "web-0.shard.a"
    assert layout.validate_pod_uid(UID) == UID
    assert layout.validate_core_id("20261123T101500Z-myapp-4242-11-3") == "20261123T101500Z-myapp-4242-11-3"
    for bad in ("..", ".hidden", "a/..", "x" * 254, "Web"):
        with pytest.raises(InvalidName):
            layout.validate_pod_name(bad)
    for bad in ("../x", "ABC", "x" * 65, ""):
        with pytest.raises(InvalidName):
            layout.validate_pod_uid(bad)
    for bad in ("20261123T101500Z-my/app-1-11", "../../etc/passwd", "20261123T101500Z-a-b-1-11"):
        with pytest.raises(InvalidName):
            layout.validate_core_id(bad)


@pytest.mark.parametrize(
    "comm", ["../../etc", "a/b", "x\x00y", "new\nline", "-", "", "ü" * 40, ".", "..", "my-app", "x" * 300]
)
def test_layout_hostile_comm_makes_a_safe_core_id(comm: str) -> None:
    core_id = layout.make_core_id(timestamp=1795000000, comm=comm, pid=12, signal=11)
    assert layout.CORE_ID_RE.match(core_id)
    assert "/" not in core_id and "\x00" not in core_id and "\n" not in core_id
    m = layout.CORE_ID_RE.match(core_id)
    assert m["pid"] == "12" and m["signal"] == "11"


def test_layout_commit_makes_the_core_visible_and_complete(tmp_path: Path) -> None:
    stored = write_core(tmp_path, body=b"hello core")
    assert stored.core_path == tmp_path / "team-a/web-0" / UID / "app/20261123T101500Z-myapp-4242-11.core.gz"
    meta = json.loads(stored.meta_path.read_text())
    assert meta["coreID"] == "20261123T101500Z-myapp-4242-11"
    assert meta["podUID"] == UID and meta["container"] == "app" and meta["compression"] == "gzip"
    assert meta["storedSize"] == stored.core_path.stat().st_size
    assert set(layout.METADATA_KEYS) <= set(meta)
    assert gzip.decompress(stored.core_path.read_bytes()) == b"hello core"
    assert not [p for p in stored.core_path.parent.iterdir() if p.name.startswith(".")]
    assert stored.core_path.stat().st_mode & 0o007 == 0


def test_layout_same_core_id_gets_a_uniquifier(tmp_path: Path) -> None:
    a = write_core(tmp_path)
    b = write_core(tmp_path)
    assert a.ref.core_id == "20261123T101500Z-myapp-4242-11"
    assert b.ref.core_id == "20261123T101500Z-myapp-4242-11-1"
    assert len(layout.list_cores(tmp_path, namespace="team-a")) == 2


def test_layout_uncommitted_writes_are_invisible(tmp_path: Path) -> None:
    w = CoreWriter(
        tmp_path, namespace="team-a", pod="web-0", pod_uid=UID, container="app", core_id="20261123T101500Z-myapp-1-6"
    )
    w.write(b"partial")
    assert layout.list_cores(tmp_path, namespace="team-a") == []
    # A data file renamed but without metadata (handler killed between the two renames) is not a core either.
    (w.directory / "20261123T101500Z-myapp-2-6.core.gz").write_bytes(b"x")
    assert layout.list_cores(tmp_path, namespace="team-a") == []
    assert layout.list_crashed_pods(tmp_path) == []
    w.abort()
    assert [p.name for p in w.directory.iterdir()] == ["20261123T101500Z-myapp-2-6.core.gz"]


def test_layout_exception_inside_writer_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with CoreWriter(
            tmp_path, namespace="ns", pod="p", pod_uid=UID, container="c", core_id="20261123T101500Z-x-1-11"
        ) as w:
            w.write(b"abc")
            raise RuntimeError("boom")
    assert list((tmp_path / "ns/p" / UID / "c").iterdir()) == []


def test_layout_listing_filters_and_sorts(tmp_path: Path) -> None:
    write_core(tmp_path, container="b", core_id="20261123T101500Z-x-1-11")
    write_core(tmp_path, container="a", core_id="20261123T111500Z-x-2-6")
    write_core(tmp_path, container="a", core_id="20261123T101500Z-x-3-11")
    write_core(tmp_path, uid=UID2, core_id="20261124T101500Z-x-4-11", container="a")
    write_core(tmp_path, pod="other", core_id="20261123T101500Z-x-5-11")
    write_core(tmp_path, ns="team-b", core_id="20261123T101500Z-x-6-11")
    (tmp_path / "team-a" / "not_a_pod!").mkdir()
    (tmp_path / "team-a" / "web-0" / "zz").symlink_to(tmp_path / "team-b")

    cores = layout.list_cores(tmp_path, namespace="team-a", pod="web-0", pod_uid=UID)
    assert [(c.ref.container, c.ref.core_id) for c in cores] == [
        ("a", "20261123T101500Z-x-3-11"),
        ("a", "20261123T111500Z-x-2-6"),
        ("b", "20261123T101500Z-x-1-11"),
    ]
    assert len(layout.list_cores(tmp_path, namespace="team-a", pod="web-0")) == 4
    assert len(layout.list_cores(tmp_path, namespace="team-a", container="a")) == 3
    assert layout.list_pod_uids(tmp_path, namespace="team-a", pod="web-0") == [UID, UID2]
    assert layout.list_crashed_pods(tmp_path) == [
        ("team-a", "other", UID),
        ("team-a", "web-0", UID),
        ("team-a", "web-0", UID2),
        ("team-b", "web-0", UID),
    ]
    assert layout.list_crashed_pods(tmp_path, namespace="team-b") == [("team-b", "web-0", UID)]
    assert layout.list_cores(tmp_path, namespace="nothing-here") == []
    with pytest.raises(InvalidName):
        layout.list_cores(tmp_path, namespace="../etc")
    with pytest.raises(InvalidName):
        layout.list_cores(tmp_path, namespace="team-a", pod="..")


def test_layout_corrupt_metadata_is_skipped_not_fatal(tmp_path: Path) -> None:
    good = write_core(tmp_path, core_id="20261123T101500Z-x-1-11")
    bad = write_core(tmp_path, core_id="20261123T101500Z-x-2-11")
    bad.meta_path.write_text("{not json")
    assert [c.ref.core_id for c in layout.list_cores(tmp_path, namespace="team-a")] == [good.ref.core_id]


def test_layout_delete_cores_removes_one_incarnation_or_all(tmp_path: Path) -> None:
    write_core(tmp_path, core_id="20261123T101500Z-x-1-11")
    write_core(tmp_path, core_id="20261123T101500Z-x-2-11", container="side")
    write_core(tmp_path, uid=UID2, core_id="20261123T101500Z-x-3-11")
    write_core(tmp_path, pod="keep", core_id="20261123T101500Z-x-4-11")
    assert layout.delete_cores(tmp_path, namespace="team-a", pod="web-0", pod_uid=UID) == 2
    assert not (tmp_path / "team-a/web-0" / UID).exists()
    assert layout.list_pod_uids(tmp_path, namespace="team-a", pod="web-0") == [UID2]
    assert layout.delete_cores(tmp_path, namespace="team-a", pod="web-0") == 1
    assert layout.delete_cores(tmp_path, namespace="team-a", pod="web-0") == 0
    assert layout.list_crashed_pods(tmp_path) == [("team-a", "keep", UID)]


def test_layout_sweep_removes_old_temp_files_and_keeps_incomplete_cores(tmp_path: Path) -> None:
    stored = write_core(tmp_path)
    d = stored.core_path.parent
    (d / ".20261123T101500Z-x-9-11.abc.core.gz.tmp").write_bytes(b"t")
    (d / "20261123T101500Z-x-8-11.core.gz").write_bytes(b"orphan")
    assert layout.sweep_debris(d) == 0
    old = os.stat(d).st_mtime - 3600
    for name in (".20261123T101500Z-x-9-11.abc.core.gz.tmp", "20261123T101500Z-x-8-11.core.gz"):
        os.utime(d / name, (old, old))
    # The temp file of a write that never committed goes; a public data file is never deleted by a sweep.
    assert layout.sweep_debris(d) == 1
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [stored.core_path.name, stored.meta_path.name, "20261123T101500Z-x-8-11.core.gz"]
    )
    assert [c.ref.core_id for c in layout.list_cores(tmp_path, namespace="team-a")] == [stored.ref.core_id]


def test_layout_core_ref_paths_and_validation(tmp_path: Path) -> None:
    ref = CoreRef(namespace="ns", pod="p", pod_uid=UID, container="c", core_id="20261123T101500Z-x-1-11")
    assert ref.meta_path(tmp_path) == tmp_path / "ns/p" / UID / "c/20261123T101500Z-x-1-11.json"
    with pytest.raises(InvalidName):
        CoreRef(namespace="ns", pod="p", pod_uid=UID, container="c", core_id="../../x")
    assert layout.core_id_time(ref.core_id).isoformat() == "2026-11-23T10:15:00+00:00"


def test_layout_failed_metadata_write_leaves_no_core_but_keeps_the_bytes(tmp_path: Path, monkeypatch) -> None:
    w = CoreWriter(tmp_path, namespace="ns", pod="p", pod_uid=UID, container="c", core_id="20261123T101500Z-x-1-11")
    w.write(b"precious")
    real_rename = os.rename

    def failing_rename(src, dst, **kw):
        if str(dst).endswith(".json"):
            raise OSError(28, "No space left on device")
        return real_rename(src, dst, **kw)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError):
        w.commit({"size": 8})
    monkeypatch.setattr(os, "rename", real_rename)
    assert layout.list_cores(tmp_path, namespace="ns") == []
    assert [p.name for p in w.directory.iterdir() if not p.name.startswith(".")] == []
    assert w._tmp is not None and w._tmp.read_bytes() == b"precious"
    w.abort()
    assert list(w.directory.iterdir()) == []
