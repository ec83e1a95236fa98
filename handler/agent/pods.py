"""
The agent's pod watcher: the pods of its own node and every namespace's annotations, kept as records on disk.

``list`` then ``watch`` from the list's resourceVersion (kubernetes-asyncio), for pods with the field selector
``spec.nodeName=<node>`` and for namespaces; each pod becomes ``<state>/pods/<uid>.json`` and each namespace
``<state>/namespaces/<name>.json`` (:mod:`handler.podrecord`, atomic writes), which the handler reads at
capture: no API call in the crash path. A relist removes records of pods that are gone; a deleted pod's
record stays ``keep_deleted`` seconds, so a core of its last moments still finds it. A watch that ends is
resumed, a ``410 Gone`` (or any error) relists after a pause. Needs ``list``/``watch`` on ``pods`` and
``namespaces``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from handler import podrecord

logger = logging.getLogger(__name__)

WATCH_TIMEOUT = 300  # seconds a single watch request lasts before it is resumed
RETRY_PAUSE = 5.0


class _Gone(Exception):
    """The watch's resourceVersion is too old: relist."""


async def kube_client(kubeconfig: str | None) -> Any:
    from kubernetes_asyncio import client, config

    cfg = client.Configuration()
    if kubeconfig:
        await config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    else:
        config.load_incluster_config(client_configuration=cfg)
    return client.ApiClient(configuration=cfg)


class PodWatcher:
    """Keeps the records of ``node``'s pods and of all namespaces in ``state_dir`` current."""

    def __init__(self, *, api_client: Any, node: str, state_dir: Path, keep_deleted: float = 600.0) -> None:
        from kubernetes_asyncio import client

        self.core = client.CoreV1Api(api_client)
        self.node = node
        self.state_dir = Path(state_dir)
        self.keep_deleted = keep_deleted
        self._deleted: dict[str, float] = {}
        self.synced = asyncio.Event()  # set after the first pod list is written
        self.errors = 0

    # -- records (blocking filesystem work, run in threads) --

    def _write_pod(self, obj: dict[str, Any]) -> None:
        rec = podrecord.pod_from_api(obj)
        if rec is not None:
            podrecord.write_pod(self.state_dir, rec)

    def _write_namespace(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        if isinstance(meta.get("name"), str):
            podrecord.write_namespace(self.state_dir, name=meta["name"], annotations=meta.get("annotations") or {})

    def _prune(self, keep: set[str], directory: str) -> None:
        d = self.state_dir / directory
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return
        for n in names:
            if n.endswith(".json") and not n.startswith(".") and n[:-5] not in keep:
                try:
                    (d / n).unlink()
                except FileNotFoundError:
                    pass

    def _expire_deleted(self) -> None:
        now = time.monotonic()
        for uid, at in list(self._deleted.items()):
            if now - at >= self.keep_deleted:
                podrecord.remove_pod(self.state_dir, uid)
                del self._deleted[uid]

    # -- API --

    async def _list(self, method: Any, **kw: Any) -> tuple[list[dict[str, Any]], str]:
        # Raw JSON: the records keep the API's own field names (imageID, ownerReferences...).
        resp = await method(_preload_content=False, **kw)
        body = json.loads(await resp.read())
        return body.get("items") or [], str((body.get("metadata") or {}).get("resourceVersion") or "")

    async def _watch(self, method: Any, *, resource_version: str, on_event: Any, **kw: Any) -> str:
        from kubernetes_asyncio import watch

        w = watch.Watch()
        async with w.stream(
            method, resource_version=resource_version, timeout_seconds=WATCH_TIMEOUT, allow_watch_bookmarks=True, **kw
        ) as stream:
            async for event in stream:
                kind, obj = event.get("type"), event.get("raw_object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _Gone()
                    raise RuntimeError(f"watch error: {obj.get('message')}")
                rv = (obj.get("metadata") or {}).get("resourceVersion")
                if rv:
                    resource_version = str(rv)
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    await on_event(kind, obj)
        return resource_version

    async def _pod_event(self, kind: str, obj: dict[str, Any]) -> None:
        uid = (obj.get("metadata") or {}).get("uid")
        if kind == "DELETED":
            if isinstance(uid, str):
                self._deleted[uid] = time.monotonic()
        elif isinstance(uid, str):
            self._deleted.pop(uid, None)
            await asyncio.to_thread(self._write_pod, obj)
        await asyncio.to_thread(self._expire_deleted)

    async def _namespace_event(self, kind: str, obj: dict[str, Any]) -> None:
        if kind != "DELETED":
            await asyncio.to_thread(self._write_namespace, obj)

    async def _run_pods(self) -> None:
        selector = f"spec.nodeName={self.node}"
        while True:
            try:
                items, rv = await self._list(self.core.list_pod_for_all_namespaces, field_selector=selector)
                for obj in items:
                    await asyncio.to_thread(self._write_pod, obj)
                uids = {u for o in items if isinstance(u := (o.get("metadata") or {}).get("uid"), str)}
                await asyncio.to_thread(self._prune, uids | set(self._deleted), podrecord.PODS_DIR)
                self.synced.set()
                logger.info("pod records: %d pods on node %s", len(items), self.node)
                while True:
                    rv = await self._watch(
                        self.core.list_pod_for_all_namespaces,
                        resource_version=rv,
                        on_event=self._pod_event,
                        field_selector=selector,
                    )
                    await asyncio.to_thread(self._expire_deleted)
            except asyncio.CancelledError:
                raise
            except _Gone:
                logger.info("pod watch expired; relisting")
            except Exception as e:  # the API may be away; records only go stale
                self.errors += 1
                logger.warning("pod watch failed: %s; retrying in %.0fs", e, RETRY_PAUSE)
                await asyncio.sleep(RETRY_PAUSE)

    async def _run_namespaces(self) -> None:
        while True:
            try:
                items, rv = await self._list(self.core.list_namespace)
                for obj in items:
                    await asyncio.to_thread(self._write_namespace, obj)
                names = {n for o in items if isinstance(n := (o.get("metadata") or {}).get("name"), str)}
                await asyncio.to_thread(self._prune, names, podrecord.NAMESPACES_DIR)
                while True:
                    rv = await self._watch(
                        self.core.list_namespace, resource_version=rv, on_event=self._namespace_event
                    )
            except asyncio.CancelledError:
                raise
            except _Gone:
                logger.info("namespace watch expired; relisting")
            except Exception as e:
                self.errors += 1
                logger.warning("namespace watch failed: %s; retrying in %.0fs", e, RETRY_PAUSE)
                await asyncio.sleep(RETRY_PAUSE)

    async def run(self) -> None:
        """Until cancelled."""
        await asyncio.gather(self._run_pods(), self._run_namespaces())
