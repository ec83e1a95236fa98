"""
``status`` of a CoredumpEndpoint, computed from storage: the cores of its pod incarnation, summed up.

The status is stored with the object (:mod:`.statusreconciler` writes it); this module computes it.

Reads are batched and cached briefly: a ``list`` of thousands of endpoints costs one trip to a worker
thread for the incarnations not seen in the last few seconds, not one per object.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from apiserver.retention import storage as retention_storage
from handler import layout
from handler.layout import StoredCore

logger = logging.getLogger(__name__)

# The newest cores listed in status.cores; coreCount and the sums always cover all of them.
MAX_CORES_IN_STATUS = 256
CACHE_SECONDS = 3.0
CACHE_ENTRIES = 50_000

Key = tuple[str, str, str]  # (namespace, pod, pod uid)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def core_entry(core: StoredCore) -> dict[str, Any]:
    meta = core.metadata
    return {
        "id": core.ref.core_id,
        "container": core.ref.container,
        "signal": _int(meta.get("signal")),
        "signalName": meta.get("signalName") or "",
        "time": meta.get("timestamp") or layout.rfc3339(layout.core_id_time(core.ref.core_id)),
        "size": _int(meta.get("size")),
        "storedSize": _int(meta.get("storedSize")),
        "exe": meta.get("exe") or "",
        "buildID": meta.get("buildID") or "",
        "truncated": bool(meta.get("truncated")),
        **_explained(meta),
    }


def _explained(meta: dict[str, Any]) -> dict[str, Any]:
    """Signature and top frames, when the handler stored them (checked: storage is written by every node)."""
    out: dict[str, Any] = {}
    sig = meta.get("signature")
    if isinstance(sig, str) and 0 < len(sig) <= 64 and sig.isalnum():
        out["signature"] = sig
    frames = meta.get("topFrames")
    if isinstance(frames, list):
        top = [f[:256] for f in frames[:3] if isinstance(f, str)]
        if top:
            out["topFrames"] = top
    return out


def summarize(cores: Iterable[StoredCore]) -> dict[str, Any]:
    """The status of an endpoint whose incarnation has ``cores``."""
    entries = sorted((core_entry(c) for c in cores), key=lambda e: (e["time"], e["id"], e["container"]))
    status: dict[str, Any] = {
        "coreCount": len(entries),
        "totalSize": sum(e["size"] for e in entries),
        "storedSize": sum(e["storedSize"] for e in entries),
        "cores": entries[-MAX_CORES_IN_STATUS:],
    }
    if entries:
        status["lastCrash"] = entries[-1]["time"]
        status["lastSignal"] = entries[-1]["signalName"]
    return status


def _read(root: Path, keys: list[Key]) -> dict[Key, dict[str, Any]]:
    result = {}
    for namespace, pod, uid in keys:
        try:
            cores = layout.list_cores(root, namespace=namespace, pod=pod, pod_uid=uid)
        except layout.InvalidName:
            cores = []  # an object whose names cannot be in storage has no cores
        except OSError as error:
            logger.warning("cannot read the cores of %s/%s (%s): %s", namespace, pod, uid, error)
            cores = []
        status = summarize(cores)
        removal = retention_storage.read_removal(root, (namespace, pod, uid))
        if removal is not None:
            status["lastRemoval"] = removal  # retention removed cores of it (maybe the last one)
        result[(namespace, pod, uid)] = status
    return result


class StatusCache:
    """Statuses by incarnation, each kept :data:`CACHE_SECONDS`; misses of one batch read together."""

    def __init__(self, *, root: Path, ttl: float = CACHE_SECONDS) -> None:
        self.root = root
        self.ttl = ttl
        self._entries: dict[Key, tuple[float, dict[str, Any]]] = {}
        self._invalidated = float("-inf")  # monotonic time of the last invalidate()
        # One storage read at a time: an event fanned out to 100 watchers asks for the same status 100
        # times at once, and after the first read the other 99 find it cached instead of walking storage.
        self._reading = asyncio.Lock()

    def _cached(self, keys: Iterable[Key]) -> tuple[dict[Key, dict[str, Any]], list[Key]]:
        now = time.monotonic()
        found: dict[Key, dict[str, Any]] = {}
        missing: list[Key] = []
        for key in dict.fromkeys(keys):
            entry = self._entries.get(key)
            if entry and now - entry[0] < self.ttl:
                found[key] = entry[1]
            else:
                missing.append(key)
        return found, missing

    async def statuses(self, keys: Iterable[Key]) -> dict[Key, dict[str, Any]]:
        found, missing = self._cached(keys)
        if not missing:
            return found
        async with self._reading:
            fresh_hits, missing = self._cached(missing)
            found.update(fresh_hits)
            if not missing:
                return found
            began = time.monotonic()
            fresh = await asyncio.to_thread(_read, self.root, missing)
            self.put(fresh, read_since=began)
        found.update(fresh)
        return found

    def put(self, statuses: dict[Key, dict[str, Any]], *, read_since: float | None = None) -> None:
        """
        Cache statuses read from storage (here, or by the auto-create scan, which lists every core anyway).
        ``read_since``: the monotonic time the read began; if an invalidate() came after it, the read may
        predate a purge and is not kept.
        """
        if read_since is not None and self._invalidated >= read_since:
            return
        if len(self._entries) + len(statuses) > CACHE_ENTRIES:
            self._entries.clear()
        stamp = time.monotonic()
        for key, status in statuses.items():
            self._entries[key] = (stamp, status)

    def invalidate(self, *, namespace: str, pod: str) -> None:
        self._invalidated = time.monotonic()
        for key in [k for k in self._entries if k[0] == namespace and k[1] == pod]:
            del self._entries[key]


def empty_status() -> dict[str, Any]:
    return summarize([])


async def read_statuses(*, root: Path, keys: list[Key]) -> dict[Key, dict[str, Any]]:
    """The statuses of ``keys`` read from storage now (no cache), in a worker thread: what the status
    reconciler compares with the stored status."""
    return await asyncio.to_thread(_read, root, list(keys))
