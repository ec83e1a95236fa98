"""
Endpoints and their stored status kept in step with storage: one entry point per incarnation that may have
changed (:meth:`AutoCreator.changed`, what notifications call) and one slow full pass (:meth:`AutoCreator.scan`).

Auto-create: every pod incarnation with cores gets a CoredumpEndpoint, so ``kubectl get cde -A`` lists
every pod that has crashed. An incarnation is acted on when this process has not seen it before or it has a
newer core than when last seen; then, if no endpoint of that pod's name exists, one is created with
``spec.podUID`` set and the annotation ``coredump.example.io/auto-created: "true"``. So an endpoint deleted
while its cores are kept stays deleted until that pod crashes again (or this server restarts and rescans);
to be rid of it for good, delete it with the cores (``coredump.example.io/delete-cores: "true"``). Replicas
racing to create the same endpoint see AlreadyExists, which is fine: the store's create is atomic, so there
is one ADDED per incarnation however many replicas act.

After the create, the incarnation is handed to the status reconciler (:mod:`.statusreconciler`), so an
existing endpoint whose pod filed another core gets its new status and a MODIFIED event.

The full pass is one walk of storage and one LIST of the endpoints per ``--status-resync-interval``: it
creates what notifications missed and reconciles every endpoint whose stored status differs from what the
walk found (cores removed by hand or by retention, a lost Event). Auto-creation and the status resync are
one pass because both need the same walk, and the walk is the cost (on NFS at 100,000 cores, minutes of
metadata reads): paying it twice, or every 30 s, was the cost issue 11 found. Between passes nothing walks
storage: notifications re-read one incarnation's directory each.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from handler import layout
from handler.layout import StoredCore

from apiserver.registry import errors
from apiserver.registry.corestatus import StatusCache, empty_status, read_statuses, summarize
from apiserver.registry.statusreconciler import StatusReconciler, key_of as _key_of

if TYPE_CHECKING:
    from apiserver.registry.endpoints import EndpointRegistry

logger = logging.getLogger(__name__)

INTERVAL_SECONDS = 600.0  # the full pass; --status-resync-interval
AUTO_CREATED_ANNOTATION = "coredump.example.io/auto-created"
API_VERSION = "coredump.example.io/v1alpha1"

Incarnation = tuple[str, str, str]  # (namespace, pod, pod uid)


def _scan_storage(root: Path) -> tuple[dict[Incarnation, str], dict[Incarnation, dict[str, Any]]]:
    """Blocking: every crashed incarnation with the id of its newest core (ids sort by time), and its status."""
    cores: dict[Incarnation, list[StoredCore]] = {}
    for core in layout.iter_all_cores(root):
        cores.setdefault((core.ref.namespace, core.ref.pod, core.ref.pod_uid), []).append(core)
    newest = {key: max(c.ref.core_id for c in found) for key, found in cores.items()}
    return newest, {key: summarize(found) for key, found in cores.items()}


def _valid(namespace: str, pod: str, uid: str) -> Incarnation | None:
    try:
        return layout.validate_namespace(namespace), layout.validate_pod_name(pod), layout.validate_pod_uid(uid)
    except (layout.InvalidName, TypeError):
        return None


class AutoCreator:
    def __init__(
        self,
        *,
        root: Path,
        registry: "EndpointRegistry",
        status_cache: StatusCache | None = None,
        reconciler: StatusReconciler | None = None,
        create: bool = True,
    ) -> None:
        self.root = root
        self.registry = registry
        self.create = create
        self.reconciler = reconciler or StatusReconciler(registry=registry, root=root)
        # Fed from each scan's listing: the endpoint creates that follow find their status there
        # instead of walking each incarnation's directory again.
        self.status_cache = status_cache
        self.seen: dict[Incarnation, str] = {}

    def forget(self, *, namespace: str, pod: str) -> None:
        """Treat a pod's incarnations as seen with no cores (after its cores were purged)."""
        for key in [k for k in self.seen if k[:2] == (namespace, pod)]:
            self.seen[key] = ""

    async def changed(self, *, namespace: str, pod: str, uid: str) -> bool:
        """
        The cores of one incarnation may have changed (a notification, retention, a local change): create its
        endpoint if it has cores and there is none (auto-create on), and reconcile its status from storage.
        Names are checked first (a notification is untrusted); True if an endpoint was created or written.
        """
        key = _valid(namespace, pod, uid)
        if key is None:
            logger.debug("ignoring a change notice for %r/%r (uid %r): not valid names", namespace, pod, uid)
            return False
        created = False
        if self.create:
            status = (await read_statuses(root=self.root, keys=[key]))[key]
            newest = status["cores"][-1]["id"] if status["cores"] else ""
            ensured: bool | None = False
            if newest and self.seen.get(key) != newest:
                ensured = await self._ensure(namespace=namespace, pod=pod, uid=uid)
            created = ensured is True
            if ensured is not None:  # a failed create is tried again by the next notice or full pass
                self.seen[key] = newest
        written = await self.reconciler.reconcile(namespace=namespace, pod=pod, uid=uid)
        return created or written

    async def scan(self) -> list[Incarnation]:
        """
        The full pass: endpoints listed (first: see :mod:`.statusreconciler` on order), storage walked once,
        missing endpoints created, every status that differs reconciled. Returns the incarnations an
        endpoint was created for.
        """
        listed = await self.registry.list(namespace=None)
        began = time.monotonic()
        newest, statuses = await asyncio.to_thread(_scan_storage, self.root)
        changed = [key for key in statuses if self.seen.get(key) != newest[key]]
        if self.status_cache is not None:
            self.status_cache.put({key: statuses[key] for key in changed}, read_since=began)
        # Newest crash first, so a pod name with several new incarnations is bound to the latest one.
        changed.sort(key=lambda k: newest[k], reverse=True)
        created: list[Incarnation] = []
        to_reconcile: dict[Incarnation, None] = {}
        handled_pods: set[tuple[str, str]] = set()
        failed: set[Incarnation] = set()
        for key in changed:
            namespace, pod, uid = key
            if self.create and (namespace, pod) not in handled_pods:
                ensured = await self._ensure(namespace=namespace, pod=pod, uid=uid)
                if ensured:
                    created.append(key)
                elif ensured is None:
                    failed.add(key)  # not marked seen: the next pass tries again
            handled_pods.add((namespace, pod))
            to_reconcile[key] = None
        empty = empty_status()
        for obj in listed.items:
            bound = _key_of(obj)
            if bound is not None and obj.get("status") != statuses.get(bound, empty):
                to_reconcile[bound] = None
        for key in to_reconcile:
            namespace, pod, uid = key
            try:
                await self.reconciler.reconcile(namespace=namespace, pod=pod, uid=uid)
            except Exception as error:  # one failed write (etcd blip) must not stop the pass
                logger.warning("status of %s/%s not updated: %s; retried at the next pass", namespace, pod, error)
                continue
            if key in newest and key not in failed:
                self.seen[key] = newest[key]
        return created

    async def _ensure(self, *, namespace: str, pod: str, uid: str) -> bool | None:
        """True: created; False: an endpoint of that name exists (or a replica created it first); None: failed."""
        try:
            await self.registry.get(namespace=namespace, name=pod, with_status=False)
            return False
        except errors.NotFound:
            pass
        except errors.RegistryError as error:
            logger.warning("auto-create: cannot read endpoint %s/%s: %s", namespace, pod, error.message)
            return None
        body: dict[str, Any] = {
            "apiVersion": API_VERSION,
            "kind": "CoredumpEndpoint",
            "metadata": {"name": pod, "namespace": namespace, "annotations": {AUTO_CREATED_ANNOTATION: "true"}},
            "spec": {"podUID": uid},
        }
        try:
            await self.registry.create(namespace=namespace, body=body)
        except (errors.AlreadyExists, errors.Conflict):
            return False
        except errors.RegistryError as error:
            logger.warning("auto-create: cannot create endpoint %s/%s: %s", namespace, pod, error.message)
            return None
        logger.info("auto-created endpoint %s/%s for pod uid %s", namespace, pod, uid)
        return True

    async def run(self, *, interval: float = INTERVAL_SECONDS) -> None:
        while True:
            try:
                await self.scan()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bad pass (storage hiccup, etcd down) must not end them
                logger.exception("full endpoint and status pass failed")
            await asyncio.sleep(interval)
