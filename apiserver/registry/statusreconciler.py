"""
The status reconciler: the one writer of a CoredumpEndpoint's stored ``status``.

Storage is the truth. For an incarnation ``(namespace, pod, pod uid)`` the reconciler reads the endpoint
named after the pod (if its ``spec.podUID`` is that uid), *then* reads that incarnation's cores from
storage, and when the status computed from them differs from the stored one it writes the object with a
resourceVersion precondition: a new resourceVersion and one MODIFIED event for every watcher. Equal: no
write. A conflict (another replica, or a client's spec change, wrote in between) re-reads the object and
storage and tries again. Reading the object before storage is what keeps two replicas from writing an
older status over a newer one: a status stored before our object read came from a storage read older
than ours, and one stored after it fails our compare-and-swap.

What triggers a reconcile: :meth:`apiserver.registry.autocreate.AutoCreator.changed` for one incarnation
(a CoreDumped Event, :mod:`.eventwatch`; dev mode's storage change detector, :mod:`.changedetect`; a
client's write to the status subresource) and the slow full pass (:meth:`AutoCreator.scan`, every
``--status-resync-interval``), which reconciles every endpoint whose status differs from one storage walk.
:meth:`StatusReconciler.resync` (every endpoint, one directory read each) remains for callers without a walk.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apiserver.registry.corestatus import Key, read_statuses
from apiserver.registry.store import KeyNotFound, RevisionConflict, StoreError

if TYPE_CHECKING:
    from apiserver.registry.endpoints import EndpointRegistry

logger = logging.getLogger(__name__)

RESYNC_INTERVAL_SECONDS = 600.0
_ATTEMPTS = 5


def key_of(obj: dict[str, Any]) -> Key | None:
    """The incarnation an endpoint is bound to (namespace, name, spec.podUID), or None."""
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    ns, name, uid = meta.get("namespace"), meta.get("name"), spec.get("podUID")
    if isinstance(ns, str) and isinstance(name, str) and isinstance(uid, str) and uid:
        return ns, name, uid
    return None


class StatusReconciler:
    def __init__(self, *, registry: "EndpointRegistry", root: Path) -> None:
        self.registry = registry
        self.root = Path(root)

    async def reconcile(self, *, namespace: str, pod: str, uid: str) -> bool:
        """Bring the endpoint of this incarnation up to date with storage; True if a write was made."""
        for _attempt in range(_ATTEMPTS):
            try:
                current = await self.registry.read_stored(namespace=namespace, name=pod)
            except KeyNotFound:
                return False  # no endpoint (yet): the auto-creator makes it, with its status
            if key_of(current) != (namespace, pod, uid):
                return False  # the endpoint of that name belongs to another incarnation
            return_value = await self._write_if_changed(current)
            if return_value is not None:
                return return_value
        logger.warning("status of %s/%s keeps changing under the reconciler; the next resync retries", namespace, pod)
        return False

    async def _write_if_changed(self, current: dict[str, Any]) -> bool | None:
        """True written, False equal or gone, None conflict (read again)."""
        key = key_of(current)
        if key is None:
            return False
        status = (await read_statuses(root=self.root, keys=[key]))[key]
        if current.get("status") == status:
            return False
        try:
            written = await self.registry.write_status(current=current, status=status)
        except RevisionConflict:
            return None
        except KeyNotFound:
            return False
        self.registry.coredata.status_cache.put({key: status})
        logger.info(
            "status of %s/%s: %d cores (resourceVersion %s)",
            key[0],
            key[1],
            status["coreCount"],
            written["metadata"]["resourceVersion"],
        )
        return True

    async def resync(self) -> int:
        """One full pass over every endpoint; returns how many statuses were written."""
        listed = await self.registry.list(namespace=None)
        written = 0
        for obj in listed.items:
            key = key_of(obj)
            if key is None:
                continue
            try:
                if await self.reconcile(namespace=key[0], pod=key[1], uid=key[2]):
                    written += 1
            except StoreError as error:
                logger.warning("status resync of %s/%s failed: %s", key[0], key[1], error)
        return written

    async def run(self, *, interval: float = RESYNC_INTERVAL_SECONDS) -> None:
        """Until cancelled: :meth:`resync` every ``interval`` seconds (the first one at once)."""
        while True:
            try:
                count = await self.resync()
                if count:
                    logger.info("status resync wrote %d statuses", count)
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed pass (etcd down) must not end the resync
                logger.exception("status resync failed")
            await asyncio.sleep(interval)
