"""
Notified, not polled (issue 11): how long a committed core takes to reach a watcher, and what the server
costs storage when nothing crashes. Run through ``bench/apiserver_bench.py --notify`` (or this file).

Measured, interleaved round by round against a floor taken in the same run:
  * dev mode: the real ``coredump-apiserver --dev`` (subprocess, memory store, TLS); from the return of a
    core's commit on storage to the watcher (``?watch=true`` over TLS) reading the MODIFIED line with the
    new coreCount. Floor: a label PATCH through the API to the same watcher reading its MODIFIED line.
  * Event path: the server's own Event watch, reconcile and store (in-process, memory store) against the
    fake kube-apiserver over real TLS (``test/fake_kube.py``), the agent's own EventPoster posting the
    CoreDumped Event right after the commit, as the agent does on its outcome pass (which runs every
    second: add up to 1 s for the agent's pickup). Floor: a label patch through the registry to the watch.
  * steady state at N endpoints (N incarnations of one core each, built on a temp dir): storage calls
    (``os.open``/``scandir``/``stat``/``listdir``/``read`` made by the process, counted by wrapping them)
    during an idle period with the Event watch running, for one full pass (auto-create + resync, what
    ``--status-resync-interval`` paces), and for one pass of dev mode's change detector. Per minute:
    idle + full pass / interval; the baseline is the design before issue 11 (a full walk every 30 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp

from handler import layout

HERE = Path(__file__).resolve().parent
T0 = datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc)
OLD_SCAN_SECONDS = 30.0  # the auto-create scan's interval before issue 11, in every replica
FULL_PASS_SECONDS = 600.0  # --status-resync-interval's default


def commit_core(root: Path, *, namespace: str, pod: str, uid: str, n: int, fsync: bool = True) -> None:
    """One small core filed with the handler's own writer (data first, metadata named last: the commit)."""
    when = T0 + datetime.timedelta(seconds=n)
    core_id = layout.make_core_id(timestamp=when, comm="bench", pid=1000 + n, signal=11)
    with layout.CoreWriter(root, namespace=namespace, pod=pod, pod_uid=uid, container="app", core_id=core_id) as writer:
        writer.write(gzip.compress(b"core %d" % n, 1))
        writer.commit(
            {
                "signal": 11,
                "signalName": "SIGSEGV",
                "timestamp": layout.rfc3339(when),
                "size": 6,
                "exe": "/bench",
                "truncated": False,
            }
        )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(ms: list[float]) -> str:
    return f"p50 {statistics.median(ms):.1f} ms, p99 {percentile(ms, 0.99):.1f} ms (n={len(ms)})"


# --------------------------------------------------------------------------------------------------
# Dev mode, end to end through the real server.


async def _read_until(stream: aiohttp.ClientResponse, test: Callable[[dict[str, Any]], bool]) -> float:
    while True:
        line = await stream.content.readline()
        if not line:
            raise RuntimeError("the watch ended")
        if test(json.loads(line)):
            return time.perf_counter()


def _is(name: str, *, count: int | None = None, label: str | None = None) -> Callable[[dict[str, Any]], bool]:
    def test(event: dict[str, Any]) -> bool:
        obj = event.get("object") or {}
        if (obj.get("metadata") or {}).get("name") != name:
            return False
        if count is not None:
            return (obj.get("status") or {}).get("coreCount") == count
        return ((obj.get("metadata") or {}).get("labels") or {}).get("round") == label

    return test


async def dev_latency(*, rounds: int) -> tuple[list[float], list[float]]:
    """(commit → watcher ms, API write → watcher ms), interleaved, in dev mode."""
    from apiserver_bench import apiserver, client_ssl

    with tempfile.TemporaryDirectory(prefix="notify-bench-dev-") as temp:
        directory = Path(temp)
        with apiserver(directory, etcd_endpoint=None) as port:
            dev = directory / "dev"
            root = dev / "cores"
            base = f"https://127.0.0.1:{port}/apis/coredump.example.io/v1alpha1/namespaces/notify/coredumpendpoints"
            uid = str(uuid.uuid4())
            timeout = aiohttp.ClientTimeout(total=None)
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=client_ssl(dev)), timeout=timeout
            ) as session:
                body = {
                    "apiVersion": "coredump.example.io/v1alpha1",
                    "kind": "CoredumpEndpoint",
                    "metadata": {"name": "floor"},
                    "spec": {"podUID": str(uuid.uuid4())},
                }
                async with session.post(base, json=body) as created:
                    assert created.status == 201, await created.text()
                    rv = (await created.json())["metadata"]["resourceVersion"]
                stream = await session.get(f"{base}?watch=true&resourceVersion={rv}")
                notify_ms, floor_ms = [], []
                try:
                    for n in range(rounds + 1):
                        waiting = asyncio.ensure_future(_read_until(stream, _is("lat", count=n + 1)))
                        await asyncio.to_thread(commit_core, root, namespace="notify", pod="lat", uid=uid, n=n)
                        began = time.perf_counter()
                        arrived = await asyncio.wait_for(waiting, 30)
                        waiting = asyncio.ensure_future(_read_until(stream, _is("floor", label=str(n))))
                        floor_began = time.perf_counter()
                        async with session.patch(
                            f"{base}/floor",
                            data=json.dumps({"metadata": {"labels": {"round": str(n)}}}),
                            headers={"Content-Type": "application/merge-patch+json"},
                        ) as r:
                            assert r.status == 200, await r.text()
                        floor_arrived = await asyncio.wait_for(waiting, 30)
                        if n:  # round 0 is the ADDED (auto-create) and warms everything up
                            notify_ms.append((arrived - began) * 1000)
                            floor_ms.append((floor_arrived - floor_began) * 1000)
                        await asyncio.sleep(0.3 + (n % 7) / 10)  # commits land at every phase of the 1 s poll
                finally:
                    stream.close()
                return notify_ms, floor_ms


# --------------------------------------------------------------------------------------------------
# The Event path, in-process against the fake kube-apiserver.


@contextlib.asynccontextmanager
async def event_path(root: Path, directory: Path) -> Any:
    sys.path.insert(0, str(HERE.parent / "test"))
    from fake_kube import FakeKube

    from apiserver.registry.autocreate import AutoCreator
    from apiserver.registry.coredata import CoreData
    from apiserver.registry.endpoints import EndpointRegistry
    from apiserver.registry.eventwatch import EventWatch, PendingIncarnations
    from apiserver.registry.memory import MemoryStore
    from handler.agent.events import EventPoster

    fake = FakeKube(directory)
    await fake.start()
    store = MemoryStore()
    await store.start()
    coredata = CoreData(storage_root=root, kubeconfig=str(fake.write_kubeconfig(directory / "server.kubeconfig")))
    await coredata.start()
    registry = EndpointRegistry(store=store, coredata=coredata)
    creator = AutoCreator(root=root, registry=registry)
    pending = PendingIncarnations(handler=creator.changed)
    assert coredata.pods.api_client is not None
    watch = EventWatch(api=coredata.pods.api_client, pending=pending)
    tasks = [asyncio.create_task(pending.run()), asyncio.create_task(watch.run())]
    poster = EventPoster(kubeconfig=str(fake.write_kubeconfig(directory / "agent.kubeconfig")), node="bench")
    try:
        await asyncio.wait_for(watch.watching.wait(), 30)
        yield registry, poster, fake
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await poster.close()
        await coredata.close()
        await store.close()
        await fake.close()


async def event_latency(*, rounds: int) -> tuple[list[float], list[float]]:
    """(commit → watcher ms with the agent's Event, registry write → watcher ms), interleaved."""
    with tempfile.TemporaryDirectory(prefix="notify-bench-events-") as temp:
        directory = Path(temp)
        root = directory / "cores"
        root.mkdir()
        async with event_path(root, directory) as (registry, poster, _fake):
            uid = str(uuid.uuid4())
            from apiserver.registry.endpoints import WatchItem

            async def wait(since: int, test: Callable[[WatchItem], bool]) -> float:
                async for item in registry.watch(namespace="notify", resource_version=since, send_initial_events=False):
                    if test(item):
                        return time.perf_counter()
                raise RuntimeError("the watch ended")

            notify_ms, floor_ms = [], []
            for n in range(rounds + 1):
                since = await registry.store.current_revision()
                waiting = asyncio.ensure_future(
                    wait(
                        since,
                        lambda i, n=n: (
                            i.obj is not None
                            and i.obj["metadata"]["name"] == "lat"
                            and i.obj["status"]["coreCount"] == n + 1
                        ),
                    )
                )
                await asyncio.to_thread(commit_core, root, namespace="notify", pod="lat", uid=uid, n=n)
                began = time.perf_counter()
                await poster.post(
                    {
                        "namespace": "notify",
                        "pod": "lat",
                        "podUID": uid,
                        "container": "app",
                        "coreID": f"bench-{n}",
                        "signal": 11,
                        "signalName": "SIGSEGV",
                    }
                )
                arrived = await asyncio.wait_for(waiting, 30)
                if n == 0:
                    await registry.create(
                        namespace="notify",
                        body={
                            "apiVersion": "coredump.example.io/v1alpha1",
                            "kind": "CoredumpEndpoint",
                            "metadata": {"name": "floor"},
                            "spec": {"podUID": str(uuid.uuid4())},
                        },
                    )
                    continue
                since = await registry.store.current_revision()
                waiting = asyncio.ensure_future(
                    wait(
                        since,
                        lambda i, n=n: i.obj is not None and i.obj["metadata"].get("labels", {}).get("round") == str(n),
                    )
                )
                floor_began = time.perf_counter()
                await registry.patch(
                    namespace="notify",
                    name="floor",
                    apply_patch=lambda cur, n=n: {**cur, "metadata": {**cur["metadata"], "labels": {"round": str(n)}}},
                )
                floor_arrived = await asyncio.wait_for(waiting, 30)
                notify_ms.append((arrived - began) * 1000)
                floor_ms.append((floor_arrived - floor_began) * 1000)
            return notify_ms, floor_ms


# --------------------------------------------------------------------------------------------------
# Steady state: storage calls with no crashes.


COUNTED = ("open", "scandir", "stat", "lstat", "listdir", "read")


@contextlib.contextmanager
def counting() -> Iterator[dict[str, int]]:
    """Every call of the counted ``os`` functions in this process, by name, while the block runs."""
    counts = dict.fromkeys(COUNTED, 0)
    originals = {name: getattr(os, name) for name in COUNTED}

    def wrap(name: str) -> Any:
        original = originals[name]

        def counted(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return original(*args, **kwargs)

        return counted

    for name in COUNTED:
        setattr(os, name, wrap(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(os, name, original)


def build_tree(root: Path, *, incarnations: int) -> None:
    """``incarnations`` pods of one core each across 100 namespaces, written directly (no fsync: setup only)."""
    for i in range(incarnations):
        directory = root / f"ns-{i % 100}" / f"pod-{i}" / str(uuid.UUID(int=i)) / "app"
        directory.mkdir(parents=True)
        core_id = layout.make_core_id(timestamp=T0, comm="idle", pid=i + 1, signal=11)
        (directory / f"{core_id}.core.gz").write_bytes(gzip.compress(b"x", 1))
        (directory / f"{core_id}.json").write_text(
            json.dumps(
                {
                    "coreID": core_id,
                    "signal": 11,
                    "signalName": "SIGSEGV",
                    "timestamp": layout.rfc3339(T0),
                    "size": 1,
                    "storedSize": 21,
                }
            )
        )


async def steady_state(*, endpoints: int, idle_seconds: float) -> dict[str, float]:
    from apiserver.registry.autocreate import AutoCreator
    from apiserver.registry.changedetect import snapshot

    with tempfile.TemporaryDirectory(prefix="notify-bench-idle-") as temp:
        directory = Path(temp)
        root = directory / "cores"
        root.mkdir()
        await asyncio.to_thread(build_tree, root, incarnations=endpoints)
        async with event_path(root, directory) as (registry, _poster, _fake):
            creator = AutoCreator(root=root, registry=registry)
            began = time.perf_counter()
            created = await creator.scan()  # the first pass creates every endpoint
            first_s = time.perf_counter() - began
            assert len(created) == endpoints, len(created)
            with counting() as full:
                began = time.perf_counter()
                await creator.scan()
                full_s = time.perf_counter() - began
            with counting() as idle:
                await asyncio.sleep(idle_seconds)  # the Event watch is open; nothing crashes
            with counting() as detector:
                await asyncio.to_thread(snapshot, root)
            began = time.perf_counter()  # timed without the counting wrappers
            await asyncio.to_thread(snapshot, root)
            detector_s = time.perf_counter() - began
    full_ops, idle_ops, detector_ops = sum(full.values()), sum(idle.values()), sum(detector.values())
    return {
        "endpoints": endpoints,
        "first_pass_s": first_s,
        "full_pass_s": full_s,
        "full_pass_ops": full_ops,
        "idle_ops_per_min": idle_ops * 60 / idle_seconds,
        "new_ops_per_min": idle_ops * 60 / idle_seconds + full_ops * 60 / FULL_PASS_SECONDS,
        "old_ops_per_min": full_ops * 60 / OLD_SCAN_SECONDS,
        "detector_pass_ms": detector_s * 1000,
        "detector_pass_ops": detector_ops,
    }


# --------------------------------------------------------------------------------------------------


def rows(*, rounds: int, endpoints: int, idle_seconds: float) -> list[tuple[str, str, str, str]]:
    """(metric, value, baseline, ratio) rows; latency ratios are medians of per-round ratios."""
    out = []
    for name, measure in (("dev mode: commit → watcher", dev_latency), ("Event path: commit → watcher", event_latency)):
        notify_ms, floor_ms = asyncio.run(measure(rounds=rounds))
        ratios = [a / b for a, b in zip(notify_ms, floor_ms, strict=True)]
        out.append(
            (name, summary(notify_ms), "API write → watcher " + summary(floor_ms), f"{statistics.median(ratios):.1f}x")
        )
    idle = asyncio.run(steady_state(endpoints=endpoints, idle_seconds=idle_seconds))
    out.append(
        (
            f"storage calls/min, {endpoints} endpoints, no crashes",
            f"{idle['new_ops_per_min']:.0f} (idle {idle['idle_ops_per_min']:.0f} + one full pass of "
            f"{idle['full_pass_ops']:.0f} calls / {FULL_PASS_SECONDS:.0f} s)",
            f"{idle['old_ops_per_min']:.0f} (full walk every {OLD_SCAN_SECONDS:.0f} s)",
            f"{idle['new_ops_per_min'] / idle['old_ops_per_min']:.3f}x",
        )
    )
    out.append(
        (
            f"full pass, {endpoints} endpoints",
            f"{idle['full_pass_s']:.2f} s (first, creating all: {idle['first_pass_s']:.1f} s)",
            "",
            "",
        )
    )
    out.append(
        (
            f"dev change detector pass, {endpoints} incarnations",
            f"{idle['detector_pass_ms']:.0f} ms, {idle['detector_pass_ops']:.0f} calls",
            "",
            "",
        )
    )
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="cores timed per path (default 30)")
    parser.add_argument("--endpoints", type=int, default=10_000, help="endpoints for the steady state (10000)")
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of idle counted (default 60)")
    args = parser.parse_args(argv)
    print_rows(rows(rounds=args.rounds, endpoints=args.endpoints, idle_seconds=args.idle))
    return 0


def print_rows(table: list[tuple[str, str, str, str]]) -> None:
    load = os.getloadavg()
    print(f"\n{os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}\n")
    headers = ("metric", "value", "baseline", "ratio")
    widths = [max(len(r[i]) for r in [headers, *table]) for i in range(4)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in table:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
