"""
Dev mode's change detector: a commit, a removal or a new incarnation is seen by one look at the directory
levels (no core or metadata file opened), and handed on to be re-read; links and invalid names are not
followed; a detector change reaches the endpoint as ADDED then MODIFIED through the same entry point the
Event watch uses. Status writes re-read storage at once.
"""

from __future__ import annotations

import asyncio
import datetime
import os
from pathlib import Path

from apiserver.registry.autocreate import AutoCreator
from apiserver.registry.changedetect import ChangeDetector, snapshot
from apiserver.registry.endpoints import EndpointRegistry

from apiserver_harness import T0, body, new_uid, store_core


def core(root: Path, *, pod: str, uid: str, minute: int) -> None:
    store_core(
        root,
        namespace="dev",
        pod=pod,
        pod_uid=uid,
        container="c",
        data=b"%d" % minute,
        when=T0 + datetime.timedelta(minutes=minute),
    )


async def test_the_detector_sees_commits_removals_and_new_incarnations(storage_root: Path) -> None:
    seen: list[tuple[str, str, str]] = []

    async def on_change(*, namespace: str, pod: str, uid: str) -> None:
        seen.append((namespace, pod, uid))

    detector = ChangeDetector(root=storage_root, on_change=on_change)
    a, b, quiet = new_uid(), new_uid(), new_uid()
    core(storage_root, pod="p", uid=a, minute=1)
    core(storage_root, pod="r", uid=quiet, minute=1)
    settle(storage_root / "dev" / "r" / quiet / "c")
    assert await detector.poll() == sorted([("dev", "p", a), ("dev", "r", quiet)])  # the first pass: all there
    core(storage_root, pod="p", uid=a, minute=2)
    core(storage_root, pod="q", uid=b, minute=3)
    assert set(await detector.poll()) == {("dev", "p", a), ("dev", "q", b)}  # not r: nothing changed there
    container = storage_root / "dev" / "p" / a / "c"
    victim = sorted(container.glob("*.json"))[0]
    victim.unlink()
    victim.with_name(victim.name.replace(".json", ".core.gz")).unlink()
    assert ("dev", "p", a) in await detector.poll()
    assert ("dev", "r", quiet) not in seen[2:]


def settle(container: Path) -> None:
    """Date a container directory's last change 10 s back, as if the clock had moved on since."""
    settled = container.stat().st_mtime - 10
    os.utime(container, (settled, settled))


async def test_a_change_within_the_clock_granularity_is_looked_at_once_more(storage_root: Path) -> None:
    detector = ChangeDetector(root=storage_root, on_change=lambda **_: asyncio.sleep(0))
    uid = new_uid()
    await detector.poll()
    core(storage_root, pod="p", uid=uid, minute=1)
    assert await detector.poll() == [("dev", "p", uid)]
    # Just changed: a second commit in the same clock tick would leave the same mtime, so it is re-read again.
    assert await detector.poll() == [("dev", "p", uid)]
    settle(storage_root / "dev" / "p" / uid / "c")
    await detector.poll()  # (the mtime changed, by the utime above)
    assert await detector.poll() == []  # settled: nothing to re-read


async def test_links_and_invalid_names_are_not_followed(storage_root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    core(outside, pod="x", uid=new_uid(), minute=1)
    os.symlink(outside / "dev", storage_root / "linked")  # a namespace that is a link
    (storage_root / "Not_A_Namespace").mkdir()
    pod_dir = storage_root / "dev"
    pod_dir.mkdir()
    os.symlink(outside / "dev" / "x", pod_dir / "x")  # a pod that is a link
    assert snapshot(storage_root) == {}


async def test_a_detected_change_is_added_then_modified(dev_registry: EndpointRegistry, storage_root: Path) -> None:
    creator = AutoCreator(root=storage_root, registry=dev_registry)
    detector = ChangeDetector(root=storage_root, on_change=creator.changed)
    await detector.poll()
    start = await dev_registry.store.current_revision()
    uid = new_uid()
    core(storage_root, pod="web", uid=uid, minute=1)
    await detector.poll()
    core(storage_root, pod="web", uid=uid, minute=2)
    await detector.poll()
    events = []
    async for item in dev_registry.watch(namespace="dev", resource_version=start, send_initial_events=False):
        assert item.obj is not None
        events.append((item.type, item.obj["status"]["coreCount"]))
        if len(events) == 2:
            break
    assert events == [("ADDED", 1), ("MODIFIED", 2)]


async def test_a_status_write_rereads_storage_now(dev_registry: EndpointRegistry, storage_root: Path) -> None:
    uid = new_uid()
    core(storage_root, pod="s", uid=uid, minute=1)
    created = (await dev_registry.create(namespace="dev", body=body("s", uid))).obj
    core(storage_root, pod="s", uid=uid, minute=2)  # nobody told the server
    assert (await dev_registry.get(namespace="dev", name="s"))["status"]["coreCount"] == 1
    refreshed = (
        await dev_registry.refresh_status(namespace="dev", name="s", body={**created, "status": {"coreCount": 0}})
    ).obj
    assert refreshed["status"]["coreCount"] == 2
    assert int(refreshed["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
