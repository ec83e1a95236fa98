"""
Benchmark of one retention pass at 10,000 stored cores: storage operations and wall time, before and after.

- before: the previous pass, a walk of the whole storage every interval (``layout.iter_all_cores``: every
  directory listed, every metadata file opened), the plan, and each removal re-found by listing its container;
- after: the pass of :class:`apiserver.retention.runner.Retention` as the server runs it: the index from the stored
  status (the endpoints in the object store, here the in-memory store), the plan, each removal by name through
  safefs, the removal record, and the status reconcile of exactly the incarnations it changed.

Each is measured with no change to make and with 10 cores to remove (10 cores past the age limit filed into 10
incarnations before the pass, and the status told of them, as the Event watch or the resync would). Storage
operations are the filesystem calls the pass makes, counted by wrapping ``os`` (open, scandir, listdir, stat,
lstat, unlink, rmdir, rename, replace, utime, mkdir) in this process. Methods and scenarios are interleaved, the
order alternating per round; medians of the rounds are printed with the ratio before/after and the load average.

The cores' data is a small gzip member, not a kernel core: no pass reads core data, so the size of the data file
changes none of the counts (the handler's real cores are exercised by the test suite). ``fsync`` is skipped while
the tree is built (only), so building 10,000 cores takes seconds.

    .venv/bin/python bench/retention_bench.py [--cores 10000] [--per-incarnation 10] [--rounds 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apiserver.registry.autocreate import AutoCreator
from apiserver.registry.coredata import CoreData
from apiserver.registry.endpoints import EndpointRegistry
from apiserver.registry.memory import MemoryStore
from apiserver.registry.statusreconciler import StatusReconciler
from apiserver.retention import plan as plan_mod
from apiserver.retention.index import StatusIndex, status_index
from apiserver.retention.plan import IndexedCore
from apiserver.retention.policy import Policy
from apiserver.retention.runner import Retention
from apiserver.retention.storage import Ops
from handler import layout

NOW = datetime.now(timezone.utc).replace(microsecond=0)
POLICY = Policy(max_age=30 * 86400)
COUNTED = ("open", "scandir", "listdir", "stat", "lstat", "unlink", "rmdir", "rename", "replace", "utime", "mkdir")


class SyscallCounter:
    """Counts calls of the ``os`` filesystem functions while active (every thread)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.active = False
        self._lock = threading.Lock()
        self._real = {name: getattr(os, name) for name in COUNTED}
        for name, real in self._real.items():
            setattr(os, name, self._wrap(name, real))

    def _wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self.active:
                with self._lock:
                    self.counts[name] += 1
            return real(*args, **kwargs)

        return counted

    @contextmanager
    def measure(self) -> Iterator[Counter[str]]:
        self.counts = Counter()
        self.active = True
        try:
            yield self.counts
        finally:
            self.active = False


def file_core(root: Path, *, ns: str, pod: str, uid: str, when: datetime, n: int) -> layout.StoredCore:
    core_id = layout.make_core_id(timestamp=when, comm="app", pid=1000 + n, signal=11)
    with layout.CoreWriter(root, namespace=ns, pod=pod, pod_uid=uid, container="app", core_id=core_id) as w:
        w.write(gzip.compress(b"core bytes " * 8))
        return w.commit({"signal": 11, "signalName": "SIGSEGV", "size": 88, "timestamp": layout.rfc3339(when)})


def uid_of(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012x}"


def build(root: Path, *, cores: int, per_incarnation: int) -> list[tuple[str, str, str]]:
    incarnations = []
    with mock.patch("os.fsync", lambda fd: None):
        for i in range(cores // per_incarnation):
            key = (f"team-{i % 10}", f"web-{i}", uid_of(i))
            incarnations.append(key)
            for k in range(per_incarnation):
                file_core(root, ns=key[0], pod=key[1], uid=key[2], when=NOW - timedelta(days=1, minutes=k), n=k)
    return incarnations


def before_pass(root: Path) -> int:
    """The previous hot path: index by a walk of all storage, plan, re-find each removal by listing its container."""
    cores = []
    for core in layout.iter_all_cores(root):
        size = core.metadata.get("storedSize")
        cores.append(
            IndexedCore(
                namespace=core.ref.namespace,
                pod=core.ref.pod,
                pod_uid=core.ref.pod_uid,
                container=core.ref.container,
                core_id=core.ref.core_id,
                time=layout.core_id_time(core.ref.core_id).timestamp(),
                stored_size=size if isinstance(size, int) else 0,
            )
        )
    removed = 0
    for r in plan_mod.plan(cores, policy_of=lambda ns: POLICY, now=time.time()):
        c = r.core
        for stored in layout.list_cores(
            root, namespace=c.namespace, pod=c.pod, pod_uid=c.pod_uid, container=c.container
        ):
            if stored.ref.core_id == c.core_id and layout.remove_core(stored):
                removed += 1
    return removed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--cores", type=int, default=10_000)
    parser.add_argument("--per-incarnation", type=int, default=10)
    parser.add_argument("--changes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to build the tree (default: a temp dir)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="retention-bench-", dir=args.dir))
    root = base / "storage"
    root.mkdir()
    try:
        began = time.monotonic()
        incarnations = build(root, cores=args.cores, per_incarnation=args.per_incarnation)
        store = MemoryStore()
        await store.start()
        coredata = CoreData(storage_root=root)
        await coredata.start()
        registry = EndpointRegistry(store=store, coredata=coredata)
        await AutoCreator(root=root, registry=registry).scan()  # the endpoints and their stored status
        listed = await registry.list(namespace=None)
        print(
            f"built {args.cores} cores in {len(incarnations)} incarnations ({len(listed.items)} endpoints) "
            f"in {time.monotonic() - began:.1f}s under {root}"
        )
        reconciler = StatusReconciler(registry=registry, root=root)

        async def index(ops: Ops) -> StatusIndex:
            return await status_index(registry=registry, root=root, ops=ops)

        async def reconcile(incarnation: tuple[str, str, str]) -> bool:
            return await reconciler.reconcile(namespace=incarnation[0], pod=incarnation[1], uid=incarnation[2])

        async def policies(namespaces: Any) -> dict[str, Policy]:
            return {ns: POLICY for ns in namespaces}

        after = Retention(root=root, index=index, policies=policies, reconcile=reconcile)

        async def prepare(changes: int, round_no: int) -> list[tuple[str, str, str]]:
            changed = []
            for j in range(changes):
                ns, pod, uid = incarnations[(round_no * 97 + j * 13) % len(incarnations)]
                file_core(root, ns=ns, pod=pod, uid=uid, when=NOW - timedelta(days=40, minutes=j), n=500 + j)
                await reconciler.reconcile(namespace=ns, pod=pod, uid=uid)
                changed.append((ns, pod, uid))
            return changed

        counter = SyscallCounter()
        results: dict[tuple[str, int], list[tuple[int, float]]] = {}
        breakdown: dict[tuple[str, int], Counter[str]] = {}
        for round_no in range(args.rounds):
            methods = ["before", "after"] if round_no % 2 == 0 else ["after", "before"]
            for changes in (0, args.changes):
                for method in methods:
                    changed = await prepare(changes, round_no)
                    t0 = time.perf_counter()
                    with counter.measure() as counts:
                        if method == "before":
                            removed = await asyncio.to_thread(before_pass, root)
                        else:
                            removed = len((await after.run_pass()).removals)
                    seconds = time.perf_counter() - t0
                    assert removed == changes, (method, changes, removed)
                    if method == "before":  # it left the statuses stale: bring them back, not measured
                        for key in changed:
                            await reconcile(key)
                    results.setdefault((method, changes), []).append((sum(counts.values()), seconds))
                    breakdown[(method, changes)] = Counter(counts)
        load = os.getloadavg()
        print(
            f"rounds: {args.rounds} (interleaved, order alternating); load average {load[0]:.2f} {load[1]:.2f} "
            f"{load[2]:.2f} on {os.cpu_count()} CPUs"
        )
        print(f"{'pass':<8}{'changes':>8}{'storage ops':>14}{'wall ms':>10}   breakdown (last round)")
        medians: dict[tuple[str, int], tuple[float, float]] = {}
        for (method, changes), rows in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0] != "before")):
            ops = statistics.median(r[0] for r in rows)
            ms = statistics.median(r[1] for r in rows) * 1000
            medians[(method, changes)] = (ops, ms)
            detail = ", ".join(f"{k} {v}" for k, v in breakdown[(method, changes)].most_common())
            print(f"{method:<8}{changes:>8}{ops:>14.0f}{ms:>10.1f}   {detail or '-'}")
        for changes in (0, args.changes):
            (bo, bt), (ao, at) = medians[("before", changes)], medians[("after", changes)]
            ratio_ops = f"{bo / ao:.0f}x fewer" if ao else f"{bo:.0f} -> 0"
            print(f"{changes} changes: storage ops {ratio_ops}; wall time {bt / at:.1f}x faster (median)")
        await coredata.close()
        await store.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
