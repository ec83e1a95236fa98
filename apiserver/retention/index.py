"""
The retention index from the stored status: every endpoint's ``status.cores`` (id, container, stored size; the
crash time is the one in the id), read from the object store a page at a time, without touching storage.

An endpoint whose status lists fewer cores than its ``coreCount`` (``status.cores`` keeps only the newest
:data:`apiserver.registry.corestatus.MAX_CORES_IN_STATUS`) is read from storage, that incarnation alone. The
index covers the incarnations that have an endpoint; the others (a pod recreated under the same name, auto-create
off, an endpoint deleted with its cores kept) are found by the slow reconcile's walk
(:func:`apiserver.retention.storage.walk`). Every name is validated before it can reach a path: the status came
from storage, which every node writes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apiserver.retention import storage
from apiserver.retention.plan import Incarnation, IndexedCore
from handler import layout

if TYPE_CHECKING:
    from apiserver.registry.endpoints import EndpointRegistry

PAGE = 500


@dataclass
class StatusIndex:
    cores: list[IndexedCore] = field(default_factory=list)
    covered: set[Incarnation] = field(default_factory=set)  # incarnations that have an endpoint
    read_from_storage: int = 0  # truncated statuses completed from storage


def _incarnation(obj: dict[str, Any]) -> Incarnation | None:
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    ns, name, uid = meta.get("namespace"), meta.get("name"), spec.get("podUID")
    if isinstance(ns, str) and isinstance(name, str) and isinstance(uid, str) and uid:
        return ns, name, uid
    return None


def entries_of(incarnation: Incarnation, status: Any) -> tuple[list[IndexedCore], bool]:
    """The cores a stored status lists, and whether that list is complete (``len(cores) == coreCount``)."""
    if not isinstance(status, dict):
        return [], True
    listed = status.get("cores")
    listed = listed if isinstance(listed, list) else []
    out = []
    ns, pod, uid = incarnation
    for entry in listed:
        if not isinstance(entry, dict):
            continue
        core = storage.index_entry(
            namespace=ns,
            pod=pod,
            pod_uid=uid,
            container=entry.get("container"),
            core_id=entry.get("id"),
            stored_size=entry.get("storedSize"),
        )
        if core is not None:
            out.append(core)
    count = status.get("coreCount")
    complete = not isinstance(count, int) or count <= len(listed)
    return out, complete


def _read_incarnation(root: Path, incarnation: Incarnation) -> list[IndexedCore]:
    ns, pod, uid = incarnation
    try:
        found = layout.list_cores(root, namespace=ns, pod=pod, pod_uid=uid)
    except (layout.InvalidName, OSError):
        return []
    out = []
    for c in found:
        core = storage.index_entry(
            namespace=ns,
            pod=pod,
            pod_uid=uid,
            container=c.ref.container,
            core_id=c.ref.core_id,
            stored_size=c.metadata.get("storedSize"),
        )
        if core is not None:
            out.append(core)
    return out


async def status_index(*, registry: "EndpointRegistry", root: Path, ops: storage.Ops, page: int = PAGE) -> StatusIndex:
    """Every stored core the endpoints' statuses know (store errors propagate: the pass is retried)."""
    index = StatusIndex()
    incomplete: list[Incarnation] = []
    token: str | None = None
    while True:
        listed = await registry.list(namespace=None, limit=page, continue_token=token)
        for obj in listed.items:
            incarnation = _incarnation(obj)
            if incarnation is None or incarnation in index.covered:
                continue
            index.covered.add(incarnation)
            cores, complete = entries_of(incarnation, obj.get("status"))
            if complete:
                index.cores.extend(cores)
            else:
                incomplete.append(incarnation)
        token = listed.continue_token
        if not token:
            break
    for incarnation in incomplete:
        ops["read"] += 1
        index.cores.extend(await asyncio.to_thread(_read_incarnation, root, incarnation))
        index.read_from_storage += 1
    return index
