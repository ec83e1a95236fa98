"""
The dump over HTTPS as clients see it: filters, validation (no path from the query), Range resumes
under If-Range, stable bytes, a client that leaves, and dumps racing a core being written.
"""

from __future__ import annotations

import asyncio
import datetime
import gzip
import hashlib
import io
import json
import logging
import os
import random
import tarfile
from typing import Any

import aiohttp
import pytest
from isal import isal_zlib
from multidict import CIMultiDict

from handler import layout

from apiserver_harness import DumpServer, new_uid, store_core
from waiting import await_until
from digests import content_matches

T0 = datetime.datetime(2026, 11, 23, 10, 0, tzinfo=datetime.timezone.utc)


def members_of(archive: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}  # type: ignore[union-attr]


def check_cores(members: dict[str, bytes]) -> set[str]:
    """Every core in the archive matches its metadata's digest and size; returns the core ids."""
    ids = set()
    for name, body in members.items():
        if name.endswith(".core"):
            meta = json.loads(members[name[:-5] + ".json"])
            assert content_matches(body, meta) and len(body) == meta["size"], name
            ids.add(meta["coreID"])
    return ids


async def fetch(
    server: DumpServer,
    *,
    ns: str = "shop",
    name: str = "web-0",
    params: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, CIMultiDict[str], bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.get(
            server.dump_url(ns=ns, name=name),
            params=params,
            headers=headers,
            ssl=server.ssl_context(),
            auto_decompress=False,
        ) as resp:
            return resp.status, CIMultiDict(resp.headers), await resp.read()


@pytest.fixture
def pod(dump_server: DumpServer) -> dict[str, Any]:
    """shop/web-0 with cores in "app" at T0, T0+1h and in "sidecar" at T0+2h; an older incarnation too."""
    uid = new_uid()
    rng = random.Random(4)
    cores = {}
    for container, hours, pid in (("app", 0, 10), ("app", 1, 11), ("sidecar", 2, 12)):
        data = rng.randbytes(70_000) + bytes(200_000) + rng.randbytes(3_000)
        c = store_core(
            dump_server.root,
            namespace="shop",
            pod="web-0",
            pod_uid=uid,
            container=container,
            data=data,
            when=T0 + datetime.timedelta(hours=hours),
            pid=pid,
        )
        cores[c.core_id] = c
    old = store_core(
        dump_server.root,
        namespace="shop",
        pod="web-0",
        pod_uid=new_uid(),
        container="app",
        data=b"previous incarnation",
        when=T0 - datetime.timedelta(days=1),
        pid=9,
    )
    dump_server.registry.add(namespace="shop", name="web-0", pod_uid=uid)
    return {"uid": uid, "cores": cores, "old": old}


async def test_whole_dump_has_the_headers_a_download_needs_and_the_same_bytes_twice(
    dump_server: DumpServer, pod: dict[str, Any]
) -> None:
    status, headers, body = await fetch(dump_server)
    assert status == 200
    assert headers["Content-Type"] == "application/gzip"
    assert "Content-Encoding" not in headers  # the gzip is the payload, not a transfer coding
    assert headers["Content-Disposition"] == 'attachment; filename="shop_web-0_cores.tar.gz"'
    assert int(headers["Content-Length"]) == len(body)
    assert headers["Accept-Ranges"] == "bytes" and headers["ETag"].startswith('"')
    assert gzip.decompress(body)  # a valid gzip file as a whole
    members = members_of(body)
    assert check_cores(members) == set(pod["cores"])  # this incarnation only
    assert sorted(members) == sorted(
        f"{c.stored.ref.container}/{i}.{ext}" for i, c in pod["cores"].items() for ext in ("core", "json")
    )
    again = await fetch(dump_server)
    assert again[2] == body and again[1]["ETag"] == headers["ETag"]


@pytest.mark.parametrize(
    ("params", "expect"),
    [
        ({"container": "app"}, {"app", "app@1"}),
        ({"container": "sidecar"}, {"sidecar"}),
        ({"since": "2026-11-23T11:00:00Z"}, {"app@1", "sidecar"}),
        ({"since": "2026-11-23T12:30:00+01:00"}, {"sidecar"}),  # an offset, escaped as clients do
        ({"since": "2026-11-23T11:00:00.5Z"}, {"sidecar"}),
        ({"container": "app", "since": "2026-11-23T10:30:00Z"}, {"app@1"}),
    ],
)
async def test_filters(dump_server: DumpServer, pod: dict[str, Any], params: dict[str, str], expect: set[str]) -> None:
    by_label = {}
    for core_id, c in sorted(pod["cores"].items()):
        label = c.stored.ref.container
        by_label[label if label not in by_label else label + "@1"] = core_id
    status, _, body = await fetch(dump_server, params=params)
    assert status == 200
    assert check_cores(members_of(body)) == {by_label[e] for e in expect}


async def test_one_core_by_id(dump_server: DumpServer, pod: dict[str, Any]) -> None:
    core_id = sorted(pod["cores"])[1]
    status, _, body = await fetch(dump_server, params={"core": core_id})
    assert status == 200 and check_cores(members_of(body)) == {core_id}


@pytest.mark.parametrize(
    "params",
    [
        {"container": "nothere"},
        {"core": "20991231T000000Z-x-1-11"},
        {"since": "2030-01-01T00:00:00Z"},
        {"core": "20261122T100000Z-crasher-9-11"},  # the old incarnation's core
    ],
)
async def test_nothing_matches_is_a_404_status(
    dump_server: DumpServer, pod: dict[str, Any], params: dict[str, str]
) -> None:
    status, headers, body = await fetch(dump_server, params=params)
    assert status == 404 and headers["Content-Type"].startswith("application/json")
    st = json.loads(body)
    assert st["kind"] == "Status" and st["reason"] == "NotFound" and "no cores" in st["message"]


async def test_unknown_endpoint_is_404(dump_server: DumpServer, pod: dict[str, Any]) -> None:
    status, _, body = await fetch(dump_server, name="web-1")
    assert status == 404 and json.loads(body)["reason"] == "NotFound"


@pytest.mark.parametrize(
    "query",
    [
        "container=../..",
        "container=..%2F..%2Fkube-system",
        "container=%2e%2e",
        "container=app%2F..%2F..",
        "container=/etc",
        "container=App",
        "container=app%00",
        "core=../../../etc/passwd",
        "core=20261123T100000Z-crasher-10-11%2F..",
        "core=..",
        "since=yesterday",
        "since=2026-11-23",
        "since=2026-11-23T10:00:00",
        "container=",
        "container=app&container=sidecar",
        "path=/etc/passwd",
        "container=a" + "a" * 63,
    ],
)
async def test_bad_parameters_are_400_never_a_path(dump_server: DumpServer, pod: dict[str, Any], query: str) -> None:
    async with aiohttp.ClientSession() as session:
        url = dump_server.dump_url(ns="shop", name="web-0") + "?" + query
        async with session.get(url, ssl=dump_server.ssl_context()) as resp:
            status, body = resp.status, await resp.read()
    assert status == 400, (query, body)
    st = json.loads(body)
    assert st["kind"] == "Status" and st["reason"] == "BadRequest" and st["code"] == 400


async def test_range_pieces_reassemble_the_identical_archive(dump_server: DumpServer, pod: dict[str, Any]) -> None:
    _, headers, whole = await fetch(dump_server)
    etag, size = headers["ETag"], len(whole)
    pieces, offset = [], 0
    rng = random.Random(7)
    while offset < size:
        end = min(size, offset + rng.randint(1, size // 3))
        status, h, body = await fetch(dump_server, headers={"Range": f"bytes={offset}-{end - 1}", "If-Range": etag})
        assert status == 206 and h["Content-Range"] == f"bytes {offset}-{end - 1}/{size}"
        assert int(h["Content-Length"]) == len(body) == end - offset and h["ETag"] == etag
        pieces.append(body)
        offset = end
    assert b"".join(pieces) == whole
    # Open-ended and suffix ranges, as curl -C - and browsers send them.
    assert (await fetch(dump_server, headers={"Range": f"bytes={size - 1000}-"}))[2] == whole[-1000:]
    assert (await fetch(dump_server, headers={"Range": "bytes=-77"}))[2] == whole[-77:]
    status, h, body = await fetch(dump_server, headers={"Range": f"bytes={size}-"})
    assert status == 416 and h["Content-Range"] == f"bytes */{size}"
    assert json.loads(body)["reason"] == "RequestedRangeNotSatisfiable"


async def test_a_new_core_changes_the_etag_so_a_resume_restarts(dump_server: DumpServer, pod: dict[str, Any]) -> None:
    _, headers, whole = await fetch(dump_server)
    store_core(
        dump_server.root,
        namespace="shop",
        pod="web-0",
        pod_uid=pod["uid"],
        container="app",
        data=b"new crash" * 1000,
        when=T0 + datetime.timedelta(hours=3),
        pid=99,
    )
    status, h, body = await fetch(
        dump_server, headers={"Range": f"bytes={len(whole) // 2}-", "If-Range": headers["ETag"]}
    )
    # Not a 206 splicing two archives: the whole new archive, with its new ETag.
    assert status == 200 and h["ETag"] != headers["ETag"] and "Content-Range" not in h
    assert len(check_cores(members_of(body))) == 4


async def test_client_that_leaves_stops_the_read(dump_server: DumpServer, caplog: pytest.LogCaptureFixture) -> None:
    uid = new_uid()
    store_core(
        dump_server.root,
        namespace="shop",
        pod="big-0",
        pod_uid=uid,
        container="app",
        data=os.urandom(48 << 20),
        when=T0,
    )
    dump_server.registry.add(namespace="shop", name="big-0", pod_uid=uid)
    caplog.set_level(logging.INFO, logger="apiserver.handlers.dump")
    async with aiohttp.ClientSession() as session:
        async with session.get(dump_server.dump_url(ns="shop", name="big-0"), ssl=dump_server.ssl_context()) as resp:
            total = int(resp.headers["Content-Length"])
            await resp.content.readexactly(1 << 20)
            resp.close()  # drops the connection mid-body
    records = await await_until(
        lambda: [vars(r) for r in caplog.records if r.getMessage() == "dump streamed"], what="the dump's log record"
    )
    assert records[0]["outcome"] == "disconnected"
    # Stopped within a few chunks of where the client left, not after reading the whole core.
    assert records[0]["bytesSent"] < total / 2


async def test_four_dumps_while_a_core_is_being_written(dump_server: DumpServer, pod: dict[str, Any]) -> None:
    """Readers see the old set or the old set plus the new core, whole; never a half-written core."""
    new_data = os.urandom(1 << 20) + bytes(4 << 20)
    writer = layout.CoreWriter(
        dump_server.root,
        namespace="shop",
        pod="web-0",
        pod_uid=pod["uid"],
        container="app",
        core_id=layout.make_core_id(timestamp=T0 + datetime.timedelta(hours=5), comm="late", pid=77, signal=11),
    )
    compressed = isal_zlib.compress(new_data, 1, 31)
    seen: list[set[str]] = []

    async def one_dump() -> None:
        status, _, body = await fetch(dump_server)
        assert status == 200
        seen.append(check_cores(members_of(body)))

    async def write_slowly() -> None:
        for i in range(0, len(compressed), 64 << 10):
            await asyncio.to_thread(writer.write, compressed[i : i + (64 << 10)])
            await asyncio.sleep(0)
        await asyncio.to_thread(
            writer.commit,
            {
                "pid": 77,
                "signal": 11,
                "signalName": "SIGSEGV",
                "comm": "late",
                "exe": "/late",
                "timestamp": layout.rfc3339(T0 + datetime.timedelta(hours=5)),
                "size": len(new_data),
                "observedSize": len(new_data),
                "sha256": hashlib.sha256(new_data).hexdigest(),
                "truncated": False,
                "truncationReason": None,
                "compression": "gzip",
            },
        )

    with writer:
        await asyncio.gather(*(one_dump() for _ in range(4)), write_slowly(), *(one_dump() for _ in range(4)))
    before = set(pod["cores"])
    assert len(seen) == 8
    assert all(s == before or s == before | {writer.committed.ref.core_id} for s in seen), seen  # type: ignore[union-attr]
    assert (await fetch(dump_server))[0] == 200
    assert check_cores(members_of((await fetch(dump_server))[2])) == before | {writer.committed.ref.core_id}  # type: ignore[union-attr]


async def test_a_core_vanishing_mid_stream_cuts_the_response_short(
    dump_server: DumpServer, pod: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from apiserver.handlers import dump as handler_module
    from apiserver.dump.stream import CoreVanished, iter_range

    async def vanishing(plan, **kw):  # type: ignore[no-untyped-def]
        async for chunk in iter_range(plan, **kw):
            yield chunk
            raise CoreVanished("removed by retention")

    monkeypatch.setattr(handler_module, "iter_range", vanishing)
    async with aiohttp.ClientSession() as session:
        async with session.get(dump_server.dump_url(ns="shop", name="web-0"), ssl=dump_server.ssl_context()) as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()  # short of Content-Length: the client knows it is incomplete


async def test_a_core_gone_before_planning_is_a_409_that_says_to_retry(
    dump_server: DumpServer, pod: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from apiserver.dump import plan as plan_module
    from apiserver.handlers import dump as handler_module

    def listed_then_removed(cores):  # type: ignore[no-untyped-def]
        layout.remove_core(cores[0])  # retention, between the listing and the plan
        return plan_module.build_plan(cores)

    monkeypatch.setattr(handler_module, "build_plan", listed_then_removed)
    status, headers, body = await fetch(dump_server)
    st = json.loads(body)
    assert status == 409 and st["kind"] == "Status" and st["reason"] == "Conflict"
    assert "changed while reading" in st["message"] and "download again" in st["message"]
    monkeypatch.undo()
    assert (await fetch(dump_server))[0] == 200  # the retry gets the remaining cores
