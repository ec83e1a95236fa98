"""The archive plan and its byte stream without HTTP: ranges, and cores that vanish under a download."""

from __future__ import annotations

import datetime
import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest

from handler import layout

from apiserver.dump.plan import PlanError, build_plan
from apiserver.dump.stream import CoreVanished, iter_range

from apiserver_harness import new_uid, store_core

T0 = datetime.datetime(2026, 11, 23, 10, 0, tzinfo=datetime.timezone.utc)


def two_cores(root: Path) -> list[layout.StoredCore]:
    uid = new_uid()
    for i in range(2):
        store_core(
            root,
            namespace="ns",
            pod="p",
            pod_uid=uid,
            container="c",
            data=os.urandom(300_000) * 3,
            when=T0 + datetime.timedelta(minutes=i),
            pid=i + 1,
            members=3,
        )
    return layout.list_cores(root, namespace="ns", pod="p", pod_uid=uid)


async def collect(plan, **kw) -> bytes:  # type: ignore[no-untyped-def]
    return b"".join([c async for c in iter_range(plan, chunk_size=64 << 10, **kw)])


async def test_every_range_is_the_matching_slice(storage_root: Path) -> None:
    plan = build_plan(two_cores(storage_root))
    whole = await collect(plan)
    assert len(whole) == plan.size and len(gzip.decompress(whole)) == plan.uncompressed_size
    # Boundaries of every segment, and ranges straddling them.
    for s in plan.starts[1:]:
        for a, b in ((s - 1, s + 1), (s, s + 70_000), (max(0, s - 100_000), s), (s, plan.size)):
            b = min(b, plan.size)
            assert await collect(plan, start=a, end=b) == whole[a:b]
    with tarfile.open(fileobj=io.BytesIO(whole)) as tf:
        assert [m.name.rsplit(".", 1)[1] for m in tf.getmembers()] == ["json", "core", "json", "core"]
        assert all(m.mode == 0o600 for m in tf.getmembers() if m.name.endswith(".core"))


async def test_a_core_removed_mid_download_ends_the_stream_in_error(storage_root: Path) -> None:
    cores = two_cores(storage_root)
    plan = build_plan(cores)
    whole = await collect(plan)
    got = b""
    with pytest.raises(CoreVanished):
        async for chunk in iter_range(plan, chunk_size=64 << 10):
            got += chunk
            if len(got) > plan.starts[2]:  # inside the first core: retention removes the second
                layout.remove_core(cores[1])
    assert whole.startswith(got) and len(got) < plan.size


async def test_a_core_replaced_under_the_same_name_is_not_sent(storage_root: Path) -> None:
    cores = two_cores(storage_root)
    plan = build_plan(cores)
    path = cores[0].core_path
    copy = path.with_name(".replacement")
    copy.write_bytes(path.read_bytes())
    os.replace(copy, path)  # same bytes, another file: not the one the ETag promised
    with pytest.raises(CoreVanished):
        await collect(plan)
    path.unlink()
    with pytest.raises(PlanError):
        build_plan(cores)


async def test_plan_is_stable_and_etag_follows_content(storage_root: Path) -> None:
    cores = two_cores(storage_root)
    a, b = build_plan(cores), build_plan(cores)
    assert a.etag == b.etag and a.size == b.size
    assert build_plan(cores[:1]).etag != a.etag
