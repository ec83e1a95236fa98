"""
The objects of a dump, from metadata and a store that every node writes: untrusted paths and records refused before
they reach a tar name or a gdb command, stored objects that are not what the core's capture verified never sent,
conflicting paths placed apart, and an object that changes under a download cutting the stream.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import io
import json
import os
import tarfile
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from isal import isal_zlib

from handler import layout
from handler import objects as store

from apiserver.dump.objects import ObjectLimits
from apiserver.dump.plan import ObjectSegment, build_plan
from apiserver.dump.stream import ObjectMismatch, iter_range

from apiserver_harness import DumpServer, new_uid, store_core

T0 = datetime.datetime(2026, 11, 23, 10, 0, tzinfo=datetime.timezone.utc)


def put_object(root: Path, build_id: str, data: bytes, **info: Any) -> str:
    """Store an object as the handler does (gzip once, object.json beside it); its sha256."""
    d = store.object_dir(root, build_id)
    d.mkdir(parents=True, exist_ok=True)
    packed = isal_zlib.compress(data, 1, 31)
    (d / store.OBJECT_NAME).write_bytes(packed)
    sha = hashlib.sha256(data).hexdigest()
    (d / store.INFO_NAME).write_text(
        json.dumps(
            {"buildID": build_id, "size": len(data), "storedSize": len(packed), "sha256": sha, "path": "/x", **info}
        )
    )
    return sha


def core_with(
    root: Path,
    records: list[dict[str, Any]],
    *,
    container: str = "app",
    pid: int = 7,
    uid: str | None = None,
    exe: str = "/app/prog",
) -> layout.StoredCore:
    fixture = store_core(
        root,
        namespace="ns",
        pod="p",
        pod_uid=uid or new_uid(),
        container=container,
        data=os.urandom(5000),
        when=T0,
        pid=pid,
        exe=exe,
    )
    return layout.amend_metadata(fixture.stored, {"objects": records})


def rec(path: str, build_id: str, sha: str | None, state: str = "stored-earlier") -> dict[str, Any]:
    out: dict[str, Any] = {"path": path, "buildID": build_id, "state": state}
    if sha is not None:
        out["sha256"] = sha
    return out


async def archive(cores: list[layout.StoredCore], limits: ObjectLimits | None = None) -> bytes:
    plan = build_plan(cores, objects=limits or ObjectLimits())
    data = b"".join([c async for c in iter_range(plan, chunk_size=4096)])
    assert len(data) == plan.size
    return data


def members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return {m.name: m for m in tf.getmembers()}


def read_member(data: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        f = tf.extractfile(name)
        assert f is not None
        return f.read()


async def test_untrusted_paths_and_records_never_reach_a_tar_name_or_a_gdb_command(storage_root: Path) -> None:
    good, other = "aa" * 20, "bb" * 20
    sha = put_object(storage_root, good, b"good object " * 100)
    sha_other = put_object(storage_root, other, b"other object " * 100)
    hostile = [
        rec("/../../etc/passwd", good, sha),
        rec("app/relative", good, sha),
        rec("/app/x\nshell touch /tmp/pwned", good, sha),
        rec("/app/with space", good, sha),
        rec("/app/quote'", good, sha),
        rec("/app/ok#c", good, sha),
        rec("/app/ZZ", "not-hex", sha),
        rec("/app/unverified", other, None),
        rec("/app/wrong-sha", other, sha),
        rec("/app/skipped", other, sha_other, state="skipped"),
        "not a record",
    ]
    core = core_with(storage_root, [rec("/app/./prog//", good, sha), *hostile, rec("/app/prog", other, sha_other)])
    data = await archive([core])
    names = set(members(data))
    objects = {n for n in names if n.startswith("sysroot")}
    assert objects == {"sysroot/app/prog"}  # normalized; every other record refused; the duplicate path too
    assert read_member(data, "sysroot/app/prog") == b"good object " * 100
    gdb_file = f"app_{core.ref.core_id}.gdb"
    script = read_member(data, gdb_file).decode()
    commands = [line for line in script.splitlines() if not line.startswith("#")]
    assert commands == [
        "set auto-load off",
        "set sysroot sysroot",
        "set solib-search-path sysroot/app",
        "file sysroot/app/prog",
        f"core-file app/{core.ref.core_id}.core",
        "bt",
    ]
    (entry,) = json.loads(read_member(data, "manifest.json"))["cores"]
    reasons = [s["reason"] for s in entry["skipped"]]
    assert reasons.count("path unusable in an archive (relative, '..', or characters outside [A-Za-z0-9._+@=,~-])") == 6
    assert "not a valid build-id" in reasons and "malformed object record" in reasons and "path listed twice" in reasons
    assert "not verified against the process's mapped file at capture (no sha256 recorded)" in reasons
    assert "the stored object is not the file this core's process mapped (sha256 differs)" in reasons
    assert "not stored at capture: no reason recorded" in reasons
    assert len(entry["skipped"]) == len(hostile) + 1


async def test_a_stored_object_that_is_not_what_its_info_says_is_not_served(storage_root: Path) -> None:
    ids = ["a1" * 20, "b2" * 20, "c3" * 20]
    shas = [put_object(storage_root, i, f"object {n} ".encode() * 300) for n, i in enumerate(ids)]
    # b2's object.json replaced by a1's (a planted file naming another build-id)
    (store.object_dir(storage_root, ids[1]) / store.INFO_NAME).write_bytes(
        (store.object_dir(storage_root, ids[0]) / store.INFO_NAME).read_bytes()
    )
    # c3's info claims another size than its gzip holds
    info_path = store.object_dir(storage_root, ids[2]) / store.INFO_NAME
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "size": info["size"] + 1}))
    # and a link planted in place of an object directory is not followed
    d4 = "d4" * 20
    store.object_dir(storage_root, d4).parent.mkdir(parents=True)
    store.object_dir(storage_root, d4).symlink_to(store.object_dir(storage_root, ids[0]))
    core = core_with(
        storage_root,
        [rec("/a", ids[0], shas[0]), rec("/b", ids[1], shas[1]), rec("/c", ids[2], shas[2]), rec("/d", d4, shas[0])],
    )
    data = await archive([core])
    assert {n for n in members(data) if n.startswith("sysroot")} == {"sysroot/a"}
    (entry,) = json.loads(read_member(data, "manifest.json"))["cores"]
    assert {s["path"]: s["reason"] for s in entry["skipped"]} == {
        "/b": "not in the store (removed, or its object.json missing or invalid)",
        "/c": "stored file is not a gzip of the recorded object",
        "/d": "not in the store (removed, or its object.json missing or invalid)",
    }


async def test_conflicting_paths_get_a_sysroot_of_their_own_and_each_object_is_sent_once(storage_root: Path) -> None:
    prog, libc_a, libc_b = "01" * 20, "02" * 20, "03" * 20
    s_prog, s_a, s_b = (put_object(storage_root, i, f"bytes of {i} ".encode() * 200) for i in (prog, libc_a, libc_b))
    uid = new_uid()
    one = core_with(storage_root, [rec("/app/prog", prog, s_prog), rec("/lib/libc.so.6", libc_a, s_a)], uid=uid)
    # a sidecar with the same program and another libc at the same path
    two = core_with(
        storage_root,
        [rec("/app/prog", prog, s_prog), rec("/lib/libc.so.6", libc_b, s_b), rec("/usr/lib/libc.so.6", libc_a, s_a)],
        container="side",
        pid=8,
        uid=uid,
    )
    data = await archive([one, two])
    found = members(data)
    own = f"sysroot.side_{two.ref.core_id}"
    files = {n for n, m in found.items() if m.isfile() and n.startswith("sysroot")}
    links = {n: m.linkname for n, m in found.items() if m.issym()}
    assert files == {"sysroot/app/prog", "sysroot/lib/libc.so.6", f"{own}/lib/libc.so.6"}
    assert links == {
        f"{own}/app/prog": "../../sysroot/app/prog",
        f"{own}/usr/lib/libc.so.6": "../../../sysroot/lib/libc.so.6",
    }
    script = read_member(data, f"side_{two.ref.core_id}.gdb").decode()
    assert f"set sysroot {own}\n" in script and f"file {own}/app/prog\n" in script
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        tf.extractall(storage_root.parent / "out", filter="data")  # the links stay inside the archive's tree
    out = storage_root.parent / "out"
    assert (
        (out / own / "app/prog").read_bytes()
        == (out / "sysroot/app/prog").read_bytes()
        == f"bytes of {prog} ".encode() * 200
    )
    assert (out / own / "lib/libc.so.6").read_bytes() == f"bytes of {libc_b} ".encode() * 200
    assert (out / own / "usr/lib/libc.so.6").read_bytes() == f"bytes of {libc_a} ".encode() * 200


def _stored_gzip(data: bytes) -> bytes:
    z = zlib.compressobj(0, zlib.DEFLATED, 31)
    return z.compress(data) + z.flush()


def _object_segment(plan: Any) -> tuple[int, ObjectSegment]:
    index = next(i for i, s in enumerate(plan.segments) if isinstance(s, ObjectSegment))
    return plan.starts[index], plan.segments[index]


@pytest.mark.parametrize("change", ["replaced", "rewritten in place", "inflates to more"])
async def test_an_object_changed_under_the_download_cuts_the_stream_before_its_end(
    storage_root: Path, change: str
) -> None:
    build_id = "e5" * 20
    data = os.urandom(200_000)
    sha = put_object(storage_root, build_id, data)
    core = core_with(storage_root, [rec("/app/prog", build_id, sha)])
    path = store.object_dir(storage_root, build_id) / store.OBJECT_NAME
    if change == "rewritten in place":
        path.write_bytes(_stored_gzip(data))  # deflate's stored blocks: the size on disk depends on the length only
    if change == "inflates to more":
        # two gzip members: the trailer of the last one still says the recorded size, the whole is larger
        path.write_bytes(isal_zlib.compress(b"extra", 1, 31) + isal_zlib.compress(data, 1, 31))
    plan = build_plan([core], objects=ObjectLimits())
    start, seg = _object_segment(plan)
    if change == "replaced":
        path.unlink()
        path.write_bytes(gzip.compress(data))
    elif change == "rewritten in place":
        st = path.stat()
        # Another valid gzip of as many bytes, as long on disk. Same inode, size and mtime, a valid gzip with the
        # right trailer and CRC: only the sha256 tells.
        other = _stored_gzip(os.urandom(len(data)))
        assert len(other) == st.st_size
        with path.open("r+b") as f:
            f.write(other)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    got = b""
    with pytest.raises(ObjectMismatch):
        async for chunk in iter_range(plan, chunk_size=4096):
            got += chunk
    whole_before = start + seg.size
    assert len(got) < whole_before  # the last bytes of the object were never sent
    # A range that ends inside the object cannot be checked whole, but never passes its promised size either.
    if change == "inflates to more":
        with pytest.raises(ObjectMismatch):
            async for _ in iter_range(plan, start=start, end=start + seg.size - 1, chunk_size=4096):
                pass


async def test_the_objects_query_parameter(dump_server: DumpServer) -> None:
    uid = new_uid()
    dump_server.registry.add(namespace="ns", name="p", pod_uid=uid)
    core_with(dump_server.root, [], uid=uid)
    url = dump_server.dump_url(ns="ns", name="p")
    async with aiohttp.ClientSession() as session:

        async def get(params: dict[str, str]) -> tuple[int, bytes]:
            async with session.get(url, params=params, ssl=dump_server.ssl_context(), auto_decompress=False) as r:
                return r.status, await r.read()

        bad_status, bad = await get({"objects": "yes"})
        assert bad_status == 400 and "invalid query parameter 'objects'" in json.loads(bad)["message"]
        plain, off, on = await get({}), await get({"objects": "false"}), await get({"objects": "true"})
    assert plain == off and plain[0] == on[0] == 200 and on[1] != plain[1]
    assert "manifest.json" in members(on[1]) and "manifest.json" not in members(plain[1])
