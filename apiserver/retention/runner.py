"""
The retention controller: passes only in the replica that holds the Lease (the elector cancels :meth:`run`
when the lease is lost).

A **pass** (every ``interval``) reads the index of stored cores from the stored status (``index``, see
:mod:`apiserver.retention.index`; no storage walk), adds the cores the last slow reconcile found in incarnations
no endpoint covers, reads the policy of each namespace with cores (its ``coredump-retention`` ConfigMap, through
``policies``), plans (:mod:`apiserver.retention.plan`), removes each planned core re-resolved from its names
(:func:`apiserver.retention.storage.remove`: no-follow, beneath its namespace), writes the removal record of each
incarnation it changed, prunes emptied directories, and then reconciles exactly those incarnations
(``reconcile``, the status reconciler's): watchers see MODIFIED, and a status whose last core went says so in
``status.lastRemoval``. With nothing to remove a pass touches no storage at all.

The **slow reconcile** (at the start of each term, then every ``full_interval``) walks the whole tree once: it
finds the cores of incarnations no endpoint covers, sweeps debris (the writers' temp files older than
``debris_grace``) and removes objects of the build-id store no stored core references
(:func:`handler.objects.collect_garbage`, after ``object_grace``). Usage figures (stored bytes and cores per
namespace), removals by reason, pass durations and storage operations are published from here, the one place
that computes them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from apiserver.retention import plan as plan_mod
from apiserver.retention import storage
from apiserver.retention.index import StatusIndex
from apiserver.retention.plan import Incarnation, IndexedCore, Removal
from apiserver.retention.policy import CONFIGMAP, Policy, PolicyError, effective, parse_namespace_policy
from apiserver.retention.storage import Ops

logger = logging.getLogger(__name__)


class Metrics(Protocol):
    def removed(self, reason: str, count: int) -> None: ...

    def usage(self, per_namespace: dict[str, tuple[int, int]]) -> None: ...

    def finished(self, *, kind: str, seconds: float, ops: Ops) -> None: ...

    def collected(self, *, debris: int, objects: int) -> None: ...


@dataclass
class PassReport:
    removals: list[Removal] = field(default_factory=list)
    failed: int = 0
    usage: dict[str, tuple[int, int]] = field(default_factory=dict)
    reconciled: set[Incarnation] = field(default_factory=set)
    ops: Ops = field(default_factory=Ops)


@dataclass
class FullReport:
    cores: int = 0
    uncovered: int = 0  # incarnations with cores that no endpoint covers
    debris: int = 0
    objects: list[str] = field(default_factory=list)
    ops: Ops = field(default_factory=Ops)


class ConfigMapPolicies:
    """Namespace policies from their ``coredump-retention`` ConfigMaps (kubernetes-asyncio CoreV1Api)."""

    def __init__(self, core_api: Any, *, default: Policy, maximum: Policy) -> None:
        self.api = core_api
        self.default = default
        self.maximum = maximum
        self._errors: dict[str, str] = {}

    async def policies(self, namespaces: Iterable[str]) -> dict[str, Policy]:
        out = {}
        for ns in namespaces:
            asked = None
            try:
                cm = await self.api.read_namespaced_config_map(name=CONFIGMAP, namespace=ns)
                asked = parse_namespace_policy(cm.data or {})
                self._errors.pop(ns, None)
            except PolicyError as e:
                if self._errors.get(ns) != str(e):
                    logger.warning(
                        "namespace %s: ignoring its %s ConfigMap: %s", ns, CONFIGMAP, e, extra={"namespace": ns}
                    )
                self._errors[ns] = str(e)
            except Exception as e:  # 404 is "no policy"; other errors: the cluster defaults
                if getattr(e, "status", None) != 404:
                    logger.warning(
                        "namespace %s: cannot read its %s ConfigMap (%s); cluster defaults apply",
                        ns,
                        CONFIGMAP,
                        e,
                        extra={"namespace": ns},
                    )
            out[ns] = effective(default=self.default, maximum=self.maximum, asked=asked)
        return out


def _apply(
    root: Path, planned: list[Removal], cores: list[IndexedCore], *, covered: set[Incarnation], now: float, ops: Ops
) -> tuple[list[Removal], int, set[Incarnation]]:
    """Blocking: remove ``planned``, record each changed incarnation an endpoint shows, prune emptied containers."""
    done: list[Removal] = []
    failed = 0
    touched: set[Incarnation] = set()
    for r in planned:
        touched.add(r.core.incarnation)  # removed or not, its status is out of date with storage
        try:
            if storage.remove(root, r.core, ops=ops):
                done.append(r)
        except OSError as e:
            logger.warning(
                "retention could not remove %s: %s",
                "/".join(r.core.key),
                e,
                extra={"namespace": r.core.namespace, "pod": r.core.pod, "core": r.core.core_id},
            )
            failed += 1
    by_incarnation: dict[Incarnation, list[Removal]] = {}
    for r in done:
        by_incarnation.setdefault(r.core.incarnation, []).append(r)
    for incarnation, removals in by_incarnation.items():
        if incarnation not in covered:
            continue  # no endpoint to tell: no record, so its directories go with its last core
        try:
            storage.record_removal(root, incarnation, reason=removals[-1].reason, count=len(removals), now=now, ops=ops)
        except OSError as e:
            logger.warning("retention could not record its removal in %s: %s", "/".join(incarnation), e)
    gone = {r.core.key for r in done}
    containers = {c.key[:4] for c in cores if c.incarnation in by_incarnation}
    left = {c.key[:4] for c in cores if c.key not in gone}
    for ns, pod, uid, container in sorted(containers - left):
        storage.prune(root, namespace=ns, pod=pod, pod_uid=uid, container=container, ops=ops)
    return done, failed, touched


def _collect(
    root: Path,
    walked: storage.Walked,
    *,
    covered: set[Incarnation],
    now: float,
    debris_grace: float,
    object_grace: float,
    ops: Ops,
) -> tuple[int, list[str]]:
    """Blocking: the debris sweep of every container directory, stale removal records, then the object collector."""
    for incarnation in walked.records:
        if incarnation not in covered:
            storage.drop_record(root, incarnation, ops=ops)
    debris = 0
    for d in walked.container_dirs:
        try:
            debris += storage.sweep(d, grace=debris_grace, now=now, ops=ops)
        except OSError as e:
            logger.warning("debris sweep of %s failed: %s", d, e)
    if not walked.complete:
        logger.warning("object collection skipped: part of the storage could not be read")
        return debris, []
    return debris, storage.collect_objects(root, referenced=walked.referenced, now=now, grace=object_grace, ops=ops)


class Retention:
    def __init__(
        self,
        *,
        root: Path,
        index: Callable[[Ops], Awaitable[StatusIndex]],
        policies: Callable[[Iterable[str]], Awaitable[dict[str, Policy]]],
        reconcile: Callable[[Incarnation], Awaitable[Any]],
        metrics: Metrics | None = None,
        interval: float = 300.0,
        full_interval: float = 6 * 3600.0,
        debris_grace: float = 900.0,
        object_grace: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(root)
        self.index = index
        self.policies = policies
        self.reconcile = reconcile
        self.metrics = metrics
        self.interval = interval
        self.full_interval = full_interval
        self.debris_grace = debris_grace
        self.object_grace = object_grace
        self.clock = clock
        self.passes = 0
        self.full_passes = 0
        # Cores the last walk found in incarnations no endpoint covers (planned with the index's).
        self.uncovered: dict[Incarnation, list[IndexedCore]] = {}

    async def run_pass(self) -> PassReport:
        began = time.monotonic()
        report = PassReport()
        ops = report.ops
        index = await self.index(ops)
        cores = list(index.cores)
        for incarnation, found in self.uncovered.items():
            if incarnation not in index.covered:
                cores.extend(found)
        policies = await self.policies(sorted({c.namespace for c in cores}))
        planned = plan_mod.plan(cores, policy_of=lambda ns: policies.get(ns, Policy()), now=self.clock())
        if planned:
            report.removals, report.failed, report.reconciled = await asyncio.to_thread(
                _apply, self.root, planned, cores, covered=index.covered, now=self.clock(), ops=ops
            )
        for incarnation in sorted(report.reconciled):
            if incarnation in index.covered:
                try:
                    await self.reconcile(incarnation)
                except Exception as e:  # the status resync catches what this misses
                    logger.warning(
                        "status of %s/%s not reconciled after retention: %s", incarnation[0], incarnation[1], e
                    )
        gone = {r.core.key for r in report.removals}
        for incarnation in list(self.uncovered):
            self.uncovered[incarnation] = [c for c in self.uncovered[incarnation] if c.key not in gone]
        report.usage = plan_mod.usage(cores, report.removals)
        if self.metrics is not None:
            for reason in storage.REASONS:
                n = sum(1 for r in report.removals if r.reason == reason)
                if n:
                    self.metrics.removed(reason, n)
            self.metrics.usage(report.usage)
            self.metrics.finished(kind="pass", seconds=time.monotonic() - began, ops=ops)
        if report.removals or report.failed:
            logger.info(
                "retention: removed %d cores (%s), %d failed",
                len(report.removals),
                ", ".join(sorted({r.reason for r in report.removals})) or "-",
                report.failed,
                extra={"removed": len(report.removals), "failed": report.failed},
            )
        self.passes += 1
        return report

    async def full_reconcile(self) -> FullReport:
        """The slow reconcile: one walk of the tree, the debris sweep and the object collector."""
        began = time.monotonic()
        report = FullReport()
        ops = report.ops
        walked = await asyncio.to_thread(storage.walk, self.root, ops=ops)
        index = await self.index(ops)
        uncovered: dict[Incarnation, list[IndexedCore]] = {}
        for core in walked.cores:
            if core.incarnation not in index.covered:
                uncovered.setdefault(core.incarnation, []).append(core)
        self.uncovered = uncovered
        report.cores, report.uncovered = len(walked.cores), len(uncovered)
        report.debris, report.objects = await asyncio.to_thread(
            _collect,
            self.root,
            walked,
            covered=index.covered,
            now=self.clock(),
            debris_grace=self.debris_grace,
            object_grace=self.object_grace,
            ops=ops,
        )
        if self.metrics is not None:
            self.metrics.collected(debris=report.debris, objects=len(report.objects))
            self.metrics.finished(kind="full", seconds=time.monotonic() - began, ops=ops)
        logger.info(
            "retention full reconcile: %d cores, %d in incarnations without an endpoint, %d debris files "
            "and %d objects removed",
            report.cores,
            report.uncovered,
            report.debris,
            len(report.objects),
            extra={"cores": report.cores, "debris": report.debris, "objects": len(report.objects)},
        )
        self.full_passes += 1
        return report

    async def run(self) -> None:
        """Until cancelled: the slow reconcile at once and every ``full_interval``, a pass every ``interval``."""
        last_full = float("-inf")
        while True:
            try:
                if time.monotonic() - last_full >= self.full_interval:
                    last_full = time.monotonic()
                    await self.full_reconcile()
                await self.run_pass()
            except asyncio.CancelledError:
                raise
            except Exception:  # one failing pass must not stop retention
                logger.exception("retention pass failed")
            await asyncio.sleep(self.interval)
