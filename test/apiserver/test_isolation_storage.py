"""
Storage is written by every node: a link planted at any level of the layout never makes a dump serve, or a
delete remove, a byte outside the request's namespace (issue 9). Against the dump handler over TLS, on disk.
"""

from __future__ import annotations

import datetime
import gzip
import io
import os
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from apiserver_harness import DumpServer, new_uid, store_core

from handler import layout

T0 = datetime.datetime(2026, 11, 23, 10, 15, tzinfo=datetime.timezone.utc)
SECRET_B = b"TEAM-B-SECRET-BYTES-" * 64
OUTSIDE = b"NOT-UNDER-THE-STORAGE-ROOT-" * 64
OWN = b"team-a's own core " * 64


def plain(archive: bytes) -> bytes:
    """The dump decompressed (concatenated gzip members), empty if it is not gzip (a Status)."""
    try:
        return gzip.GzipFile(fileobj=io.BytesIO(archive)).read()
    except (OSError, EOFError):
        return b""


async def dump(server: DumpServer, *, ns: str, name: str, params: dict[str, str] | None = None) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.get(
            server.dump_url(ns=ns, name=name), params=params, ssl=server.ssl_context(), auto_decompress=False
        ) as resp:
            got = bytearray()
            try:
                async for chunk in resp.content.iter_any():
                    got += chunk
            except aiohttp.ClientPayloadError:
                pass  # the server cut the response short: what matters is what arrived before
            return resp.status, bytes(got)


def world(server: DumpServer, tmp_path: Path) -> dict[str, Any]:
    """team-a/web-0 with its own core; team-b/db-0 whose core holds SECRET_B; a secret file outside the root."""
    uid_a, uid_b = new_uid(), new_uid()
    a = store_core(
        server.root, namespace="team-a", pod="web-0", pod_uid=uid_a, container="app", data=OWN, when=T0, pid=1
    )
    b = store_core(
        server.root, namespace="team-b", pod="db-0", pod_uid=uid_b, container="app", data=SECRET_B, when=T0, pid=1
    )
    outside = tmp_path / "outside.secret"
    outside.write_bytes(gzip.compress(OUTSIDE))
    server.registry.add(namespace="team-a", name="web-0", pod_uid=uid_a)
    return {"a": a, "b": b, "uid_a": uid_a, "uid_b": uid_b, "outside": outside}


def replace_with_link(path: Path, target: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.symlink_to(target)


def server_key(tmp_path: Path) -> Path:
    keys = sorted(tmp_path.rglob("*.key"))
    assert keys, "the test server's private key was not found"
    return keys[0]


# Each level of <root>/<ns>/<pod>/<uid>/<container>/<id>.core.gz|.json, pointing into team-b, outside the root,
# or at the server's own TLS key.
LEVELS = ["namespace", "pod", "uid", "container", "core", "json"]
TARGETS = ["other-namespace", "outside-root", "server-key"]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("named", [False, True], ids=["listed", "named-in-query"])
async def test_a_link_at_any_level_never_serves_a_foreign_byte(
    dump_server: DumpServer, tmp_path: Path, level: str, target: str, named: bool
) -> None:
    w = world(dump_server, tmp_path)
    a: layout.StoredCore = w["a"].stored
    b: layout.StoredCore = w["b"].stored
    root = dump_server.root
    own_paths = {
        "namespace": root / "team-a",
        "pod": root / "team-a" / "web-0",
        "uid": root / "team-a" / "web-0" / w["uid_a"],
        "container": a.core_path.parent,
        "core": a.core_path,
        "json": a.meta_path,
    }
    b_paths = {
        "namespace": root / "team-b",
        "pod": root / "team-b" / "db-0",
        "uid": root / "team-b" / "db-0" / w["uid_b"],
        "container": b.core_path.parent,
        "core": b.core_path,
        "json": b.meta_path,
    }
    if target == "other-namespace":
        to = b_paths[level]
    elif target == "outside-root":
        to = w["outside"] if level in ("core", "json") else w["outside"].parent
    else:
        to = server_key(tmp_path) if level in ("core", "json") else server_key(tmp_path).parent
    if level in ("pod", "uid", "namespace") and target == "other-namespace":
        # the object names the incarnation the link leads to, as an endpoint created without podUID would
        dump_server.registry.add(namespace="team-a", name="web-0", pod_uid=w["uid_b"])
    replace_with_link(own_paths[level], to)
    params = {"container": "app", "core": a.ref.core_id} if named else None
    status, body = await dump(dump_server, ns="team-a", name="web-0", params=params)
    assert status < 500, body[:300]
    content = plain(body) + body
    assert SECRET_B[:40] not in content and OUTSIDE[:40] not in content
    assert b"PRIVATE KEY" not in content
    # what team-b owns is still there, whole
    assert gzip.decompress(b.core_path.read_bytes()) == SECRET_B and b.meta_path.is_file()


async def test_a_core_swapped_for_a_link_between_plan_and_open_is_refused(
    dump_server: DumpServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hard-to-see variant: the file is a real core when planned, a link to team-b's when opened."""
    from handler import faults

    w = world(dump_server, tmp_path)
    a: layout.StoredCore = w["a"].stored
    b: layout.StoredCore = w["b"].stored
    swapped = []

    def swap(name: str) -> None:
        if name == "dump:before-open" and not swapped:
            replace_with_link(a.core_path, b.core_path)
            swapped.append(name)

    monkeypatch.setattr(faults, "point", swap)
    status, body = await dump(dump_server, ns="team-a", name="web-0")
    assert swapped, "the swap point was never reached"
    assert SECRET_B[:40] not in plain(body) + body
    # and the archive was cut, not completed with someone else's file
    assert OWN[:40] not in plain(body)


def test_delete_cores_through_a_linked_directory_removes_nothing_of_another_namespace(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    uid_b = new_uid()
    b = store_core(root, namespace="team-b", pod="db-0", pod_uid=uid_b, container="app", data=SECRET_B, when=T0)
    (root / "team-a").mkdir()
    (root / "team-a" / "web-0").symlink_to(root / "team-b" / "db-0")
    assert layout.delete_cores(root, namespace="team-a", pod="web-0") == 0
    assert layout.delete_cores(root, namespace="team-a", pod="web-0", pod_uid=uid_b) == 0
    assert b.stored.core_path.is_file() and b.stored.meta_path.is_file()
    # a link one level further down (the incarnation) is not followed either
    os.unlink(root / "team-a" / "web-0")
    (root / "team-a" / "web-0").mkdir()
    (root / "team-a" / "web-0" / uid_b).symlink_to(root / "team-b" / "db-0" / uid_b)
    assert layout.delete_cores(root, namespace="team-a", pod="web-0", pod_uid=uid_b) == 0
    assert b.stored.core_path.is_file() and b.stored.meta_path.is_file()


def test_listing_skips_links_so_no_uid_of_another_namespace_is_picked_up(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    uid_b = new_uid()
    store_core(root, namespace="team-b", pod="db-0", pod_uid=uid_b, container="app", data=SECRET_B, when=T0)
    (root / "team-a" / "web-0").mkdir(parents=True)
    (root / "team-a" / "web-0" / uid_b).symlink_to(root / "team-b" / "db-0" / uid_b)
    assert layout.list_pod_uids(root, namespace="team-a", pod="web-0") == []
    assert layout.list_cores(root, namespace="team-a") == []
