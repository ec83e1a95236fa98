"""
The retention controller: one pass per interval, only in the replica that holds the Lease.

A pass reads the index of stored cores (``index``: the stored status where the server keeps it, or a storage walk
as the slow reconcile), the policy of each namespace that has cores (its ``coredump-retention`` ConfigMap,
through ``policies``), plans (:mod:`apiserver.retention.plan`), removes each planned core through ``remove``
(the storage-access layer: no-follow, beneath the core's own namespace directory), and tells ``removed`` which
incarnations changed so their status is recomputed and watchers see the cores go. Usage figures (stored bytes
and cores per namespace) and removals by reason are published from here, the one place that computes them.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from apiserver.retention import plan as plan_mod
from apiserver.retention.plan import IndexedCore, Removal
from apiserver.retention.policy import CONFIGMAP, Policy, PolicyError, effective, parse_namespace_policy

logger = logging.getLogger(__name__)


class Metrics(Protocol):
    def removed(self, reason: str, count: int) -> None: ...

    def usage(self, per_namespace: dict[str, tuple[int, int]]) -> None: ...


@dataclass
class PassReport:
    removals: list[Removal] = field(default_factory=list)
    failed: int = 0
    usage: dict[str, tuple[int, int]] = field(default_factory=dict)


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
                    logger.warning("namespace %s: ignoring its %s ConfigMap: %s", ns, CONFIGMAP, e,
                                   extra={"namespace": ns})
                self._errors[ns] = str(e)
            except Exception as e:  # noqa: BLE001 - 404 is "no policy"; other errors: the cluster defaults
                if getattr(e, "status", None) != 404:
                    logger.warning("namespace %s: cannot read its %s ConfigMap (%s); cluster defaults apply",
                                   ns, CONFIGMAP, e, extra={"namespace": ns})
            out[ns] = effective(default=self.default, maximum=self.maximum, asked=asked)
        return out


class Retention:
    def __init__(self, *, index: Callable[[], Awaitable[list[IndexedCore]]],
                 policies: Callable[[Iterable[str]], Awaitable[dict[str, Policy]]],
                 remove: Callable[[IndexedCore], bool], removed: Callable[[set[tuple[str, str, str]]], Awaitable[None]],
                 metrics: Metrics | None = None, interval: float = 300.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.index = index
        self.policies = policies
        self.remove = remove
        self.removed = removed
        self.metrics = metrics
        self.interval = interval
        self.clock = clock
        self.passes = 0

    async def run_pass(self) -> PassReport:
        cores = await self.index()
        namespaces = sorted({c.namespace for c in cores})
        policies = await self.policies(namespaces)
        planned = plan_mod.plan(cores, policy_of=lambda ns: policies.get(ns, Policy()), now=self.clock())
        report = PassReport()
        changed: set[tuple[str, str, str]] = set()
        for r in planned:
            try:
                ok = await asyncio.to_thread(self.remove, r.core)
            except OSError as e:
                logger.warning("retention could not remove %s: %s", "/".join(r.core.key), e,
                               extra={"namespace": r.core.namespace, "pod": r.core.pod, "core": r.core.core_id})
                report.failed += 1
                continue
            if ok:
                report.removals.append(r)
                changed.add((r.core.namespace, r.core.pod, r.core.pod_uid))
        if changed:
            await self.removed(changed)
        report.usage = plan_mod.usage(cores, report.removals)
        if self.metrics is not None:
            for reason in ("age", "pod-count", "namespace-bytes"):
                n = sum(1 for r in report.removals if r.reason == reason)
                if n:
                    self.metrics.removed(reason, n)
            self.metrics.usage(report.usage)
        if report.removals or report.failed:
            logger.info("retention: removed %d cores (%s), %d failed", len(report.removals),
                        ", ".join(sorted({r.reason for r in report.removals})) or "-", report.failed,
                        extra={"removed": len(report.removals), "failed": report.failed})
        self.passes += 1
        return report

    async def run(self) -> None:
        """Passes every ``interval`` until cancelled (the elector cancels it when the lease is lost)."""
        while True:
            try:
                await self.run_pass()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - one failing pass must not stop retention
                logger.exception("retention pass failed")
            await asyncio.sleep(self.interval)


def storage_index(root: Any) -> list[IndexedCore]:
    """The index from a walk of storage (the slow reconcile; blocking). Names come validated from the layout."""
    from handler import layout

    out = []
    for core in layout.iter_all_cores(root):
        ref, meta = core.ref, core.metadata
        size = meta.get("storedSize")
        out.append(IndexedCore(namespace=ref.namespace, pod=ref.pod, pod_uid=ref.pod_uid, container=ref.container,
                               core_id=ref.core_id, time=layout.core_id_time(ref.core_id).timestamp(),
                               stored_size=size if isinstance(size, int) and size >= 0 else 0))
    return out


def remove_from_storage(root: Any, core: IndexedCore) -> bool:
    """Remove one indexed core (re-resolved from storage: the index is a hint, storage the truth; blocking)."""
    from handler import layout

    for stored in layout.list_cores(root, namespace=core.namespace, pod=core.pod, pod_uid=core.pod_uid,
                                    container=core.container):
        if stored.ref.core_id == core.core_id:
            return layout.remove_core(stored)
    return False
