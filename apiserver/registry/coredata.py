"""
What storage (and the cluster) knows about an endpoint's pod: its cores (status), its uid, purging them.

The registry calls this; the work is in small modules: :mod:`.corestatus` (status from storage,
batched and cached) and :mod:`.pods` (live pods through kubernetes-asyncio). The auto-creator
(:mod:`.autocreate`) sits above the registry and is composed in ``apiserver.server``; it hears of purged
cores through :meth:`CoreData.on_purge`, so this module never reaches up to it.

Deleting an endpoint keeps its cores. An endpoint annotated ``coredump.example.io/delete-cores: "true"``
takes its incarnation's cores with it when it is deleted (``kubectl annotate cde POD
coredump.example.io/delete-cores=true && kubectl delete cde POD``): two deliberate steps, so neither a
namespace deletion nor a stray ``kubectl delete`` loses data.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from handler import layout

from apiserver.registry import errors
from apiserver.registry.corestatus import StatusCache, empty_status
from apiserver.registry.pods import PodLookup

logger = logging.getLogger(__name__)

DELETE_CORES_ANNOTATION = "coredump.example.io/delete-cores"


def _pod_uid_required(*, name: str, message: str) -> errors.Invalid:
    cause = errors.FieldError(field="spec.podUID", message=f"Required value: {message}", type="FieldValueRequired")
    return errors.Invalid(name=name, causes=(cause,))


class CoreData:
    def __init__(self, *, storage_root: Path, kubeconfig: str | None = None, in_cluster: bool = False) -> None:
        self.storage_root = Path(storage_root)
        self.pods = PodLookup(kubeconfig=kubeconfig, in_cluster=in_cluster)
        self.status_cache = StatusCache(root=self.storage_root)
        self._purge_listeners: list[Callable[..., None]] = []

    def on_purge(self, listener: Callable[..., None]) -> None:
        """Call ``listener(namespace=..., pod=...)`` after a pod's cores were purged with its endpoint."""
        self._purge_listeners.append(listener)

    async def start(self) -> None:
        await self.pods.start()

    async def close(self) -> None:
        await self.pods.close()

    async def fill_status(self, objs: list[dict[str, Any]]) -> None:
        """Set ``status`` of each object from storage (one batched read for all cache misses)."""
        keys: list[tuple[str, str, str] | None] = []
        for obj in objs:
            meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
            ns, name, uid = meta.get("namespace"), meta.get("name"), spec.get("podUID")
            keys.append(
                (ns, name, uid)
                if isinstance(ns, str) and isinstance(name, str) and isinstance(uid, str) and uid
                else None
            )
        statuses = await self.status_cache.statuses(k for k in keys if k is not None)
        for obj, key in zip(objs, keys, strict=True):
            # A copy per object: objects are serialized and may be mutated independently.
            status = statuses[key] if key is not None else empty_status()
            obj["status"] = {**status, "cores": [dict(c) for c in status["cores"]]}

    async def default_pod_uid(self, *, namespace: str, name: str) -> str:
        """The uid for an endpoint created without ``spec.podUID``: the live pod's, else the stored one."""
        if self.pods.configured:
            uid = await self.pods.pod_uid(namespace=namespace, name=name)
            if uid:
                return uid
        try:
            uids = await asyncio.to_thread(layout.list_pod_uids, self.storage_root, namespace=namespace, pod=name)
        except layout.InvalidName:
            uids = []
        if len(uids) == 1:
            return uids[0]
        where = "no live pod of that name, and " if self.pods.configured else ""
        if not uids:
            raise _pod_uid_required(
                name=name, message=f'{where}no cores of a pod "{name}" are stored; give spec.podUID'
            )
        raise _pod_uid_required(
            name=name,
            message=f'{where}cores of {len(uids)} incarnations of pod "{name}" '
            f"are stored ({', '.join(uids)}, newest last); "
            "give spec.podUID",
        )

    async def on_delete(self, obj: dict[str, Any]) -> None:
        """Purge the incarnation's cores only if the object opted in (``DELETE_CORES_ANNOTATION``)."""
        meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
        namespace, name, uid = meta.get("namespace"), meta.get("name"), spec.get("podUID")
        annotations = meta.get("annotations") or {}
        if str(annotations.get(DELETE_CORES_ANNOTATION, "")).lower() != "true" or not uid:
            return
        if not (isinstance(namespace, str) and isinstance(name, str) and isinstance(uid, str)):
            return  # a stored object always has these; nothing to purge for one that does not
        try:
            removed = await asyncio.to_thread(
                layout.delete_cores, self.storage_root, namespace=namespace, pod=name, pod_uid=uid
            )
        except layout.InvalidName as error:
            logger.warning("not deleting cores of %s/%s: %s", namespace, name, error)
            return
        self.status_cache.invalidate(namespace=namespace, pod=name)
        for listener in self._purge_listeners:
            listener(namespace=namespace, pod=name)
        logger.info("deleted %d cores of %s/%s (uid %s) with its endpoint", removed, namespace, name, uid)
