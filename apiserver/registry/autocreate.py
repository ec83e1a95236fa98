"""
Auto-create: every pod incarnation with cores gets a CoredumpEndpoint, so ``kubectl get cde -A`` lists
every pod that has crashed.

A scan every :data:`INTERVAL_SECONDS` lists the crashed incarnations. An incarnation is acted on when
this process has not seen it before or it has a newer core than when last seen; then, if no endpoint
of that pod's name exists, one is created with ``spec.podUID`` set and the annotation
``coredump.example.io/auto-created: "true"``. So an endpoint deleted while its cores are kept stays
deleted until that pod crashes again (or this server restarts and rescans); to be rid of it for good,
delete it with the cores (``coredump.example.io/delete-cores: "true"``). Replicas racing to create the
same endpoint see AlreadyExists, which is fine: the store's create is atomic, so there is one ADDED per
incarnation however many replicas scan.

Every incarnation the scan acts on is then handed to the status reconciler (:mod:`.statusreconciler`),
so an existing endpoint whose pod filed another core gets its new status and a MODIFIED event.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from handler import layout
from handler.layout import StoredCore

from apiserver.api import errors
from apiserver.registry.corestatus import StatusCache, summarize
from apiserver.registry.statusreconciler import StatusReconciler

if TYPE_CHECKING:
    from apiserver.registry.endpoints import EndpointRegistry

logger = logging.getLogger(__name__)

INTERVAL_SECONDS = 30.0
AUTO_CREATED_ANNOTATION = "coredump.example.io/auto-created"
API_VERSION = "coredump.example.io/v1alpha1"

Incarnation = tuple[str, str, str]  # (namespace, pod, pod uid)


def _scan_storage(root: Path, seen: dict[Incarnation, str]) -> tuple[dict[Incarnation, str],
                                                                     dict[Incarnation, dict[str, Any]]]:
    """
    Blocking: every crashed incarnation with the id of its newest core (ids sort by time), and the status of
    each one whose newest core is not the one in ``seen`` (those are the ones the scan acts on).
    """
    cores: dict[Incarnation, list[StoredCore]] = {}
    for core in layout.iter_all_cores(root):
        cores.setdefault((core.ref.namespace, core.ref.pod, core.ref.pod_uid), []).append(core)
    newest = {key: max(c.ref.core_id for c in found) for key, found in cores.items()}
    return newest, {key: summarize(found) for key, found in cores.items() if seen.get(key) != newest[key]}


class AutoCreator:
    def __init__(self, *, root: Path, registry: "EndpointRegistry", status_cache: StatusCache | None = None,
                 reconciler: StatusReconciler | None = None) -> None:
        self.root = root
        self.registry = registry
        self.reconciler = reconciler or StatusReconciler(registry=registry, root=root)
        # Fed from each scan's listing: the endpoint reads and creates that follow find their status there
        # instead of walking each incarnation's directory again.
        self.status_cache = status_cache
        self.seen: dict[Incarnation, str] = {}

    def forget(self, *, namespace: str, pod: str) -> None:
        """Treat a pod's incarnations as seen with no cores (after its cores were purged)."""
        for key in [k for k in self.seen if k[:2] == (namespace, pod)]:
            self.seen[key] = ""

    async def scan(self) -> list[Incarnation]:
        """One pass; returns the incarnations an endpoint was created for."""
        began = time.monotonic()
        newest, changed_statuses = await asyncio.to_thread(_scan_storage, self.root, dict(self.seen))
        if self.status_cache is not None:
            self.status_cache.put(changed_statuses, read_since=began)
        changed = list(changed_statuses)
        # Newest crash first, so a pod name with several new incarnations is bound to the latest one.
        changed.sort(key=lambda k: newest[k], reverse=True)
        created = []
        handled_pods: set[tuple[str, str]] = set()
        for key in changed:
            namespace, pod, uid = key
            if (namespace, pod) not in handled_pods and await self._ensure(namespace=namespace, pod=pod, uid=uid):
                created.append(key)
            handled_pods.add((namespace, pod))
            try:
                await self.reconciler.reconcile(namespace=namespace, pod=pod, uid=uid)
            except Exception as error:  # noqa: BLE001 - one failed write (etcd blip) must not stop the scan
                logger.warning("status of %s/%s not updated: %s; retried at the next scan", namespace, pod, error)
                continue
            self.seen[key] = newest[key]
        return created

    async def _ensure(self, *, namespace: str, pod: str, uid: str) -> bool:
        try:
            await self.registry.get(namespace=namespace, name=pod, with_status=False)
            return False
        except errors.ApiError as error:
            if error.code != 404:
                logger.warning("auto-create: cannot read endpoint %s/%s: %s", namespace, pod, error.message)
                return False
        body: dict[str, Any] = {
            "apiVersion": API_VERSION, "kind": "CoredumpEndpoint",
            "metadata": {"name": pod, "namespace": namespace, "annotations": {AUTO_CREATED_ANNOTATION: "true"}},
            "spec": {"podUID": uid},
        }
        try:
            await self.registry.create(namespace=namespace, body=body)
        except errors.ApiError as error:
            if error.code != 409:
                logger.warning("auto-create: cannot create endpoint %s/%s: %s", namespace, pod, error.message)
            return False
        logger.info("auto-created endpoint %s/%s for pod uid %s", namespace, pod, uid)
        return True

    async def run(self, *, interval: float = INTERVAL_SECONDS) -> None:
        while True:
            try:
                await self.scan()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bad scan (storage hiccup) must not end auto-creation
                logger.exception("auto-create scan failed")
            await asyncio.sleep(interval)
