"""
Retention's storage side: every call is blocking filesystem code (the runner calls it through
``asyncio.to_thread``) and goes through :mod:`handler.layout` / :mod:`handler.safefs`, so no level is reached
through a link and nothing outside ``<root>/<namespace>/`` is touched.

- :func:`remove` removes one planned core, re-resolved from its validated names (O(1): the container directory
  opened beneath the namespace, the metadata unlinked first, then the data); an index entry that no longer
  matches storage removes nothing.
- :func:`record_removal` / :func:`read_removal`: the removal record of an incarnation,
  ``<root>/<ns>/<pod>/<uid>/retention.json`` (time, reason, count of the last pass that removed its cores). The
  status producer reads it, so an endpoint whose cores retention removed says so (``status.lastRemoval``) and
  every replica computes the same status from storage. It is a file, not a directory, at the uid level: readers of
  the layout list only directories there, and it keeps the uid directory (and the record) when the last core goes.
  Only incarnations an endpoint shows get one; :func:`drop_record` removes it (and the emptied directories) once
  neither cores nor an endpoint are left.
- :func:`walk` is the slow reconcile: every committed core, every container directory (for the debris sweep) and
  every build-id a core's metadata references (for the object collector), in one pass over the tree.
- :func:`sweep` is the debris sweep of one container directory (one place calls it), with the grace of the flag.
- :class:`Ops` counts the storage operations a pass makes, by kind, for the metrics.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from apiserver.retention.plan import IndexedCore, Incarnation
from handler import layout, objects, safefs

logger = logging.getLogger(__name__)

RECORD_NAME = layout.RETENTION_RECORD
RECORD_MAX_BYTES = 4096
REASONS = ("age", "pod-count", "namespace-bytes")


class Ops(Counter[str]):
    """Storage operations of one pass, by kind (remove, record, prune, read, walk, sweep, gc)."""


def index_entry(
    *, namespace: str, pod: str, pod_uid: str, container: Any, core_id: Any, stored_size: Any
) -> IndexedCore | None:
    """An index entry from untrusted names (status, metadata); None when a name could not be in storage."""
    try:
        ref = layout.CoreRef(namespace=namespace, pod=pod, pod_uid=pod_uid, container=container, core_id=core_id)
        when = layout.core_id_time(ref.core_id).timestamp()
    except (layout.InvalidName, TypeError, ValueError):
        return None
    size = stored_size if isinstance(stored_size, int) and not isinstance(stored_size, bool) and stored_size >= 0 else 0
    return IndexedCore(
        namespace=ref.namespace,
        pod=ref.pod,
        pod_uid=ref.pod_uid,
        container=ref.container,
        core_id=ref.core_id,
        time=when,
        stored_size=size,
    )


def remove(root: Path, core: IndexedCore, *, ops: Ops) -> bool:
    """Remove one core if storage still has it (metadata first: no reader ever sees half of it)."""
    ref = layout.CoreRef(
        namespace=core.namespace, pod=core.pod, pod_uid=core.pod_uid, container=core.container, core_id=core.core_id
    )
    ops["remove"] += 1
    stored = layout.StoredCore(ref=ref, metadata={}, core_path=ref.core_path(root), meta_path=ref.meta_path(root))
    return layout.remove_core(stored)


def prune(root: Path, *, namespace: str, pod: str, pod_uid: str, container: str, ops: Ops) -> None:
    """Remove the container directory and its parents below the namespace while they are empty."""
    ops["prune"] += 1
    layout.prune_empty_dirs(
        root, layout.container_dir(root, namespace=namespace, pod=pod, pod_uid=pod_uid, container=container)
    )


def record_removal(root: Path, incarnation: Incarnation, *, reason: str, count: int, now: float, ops: Ops) -> None:
    """Write the removal record of an incarnation (atomically: temp file and rename, beneath the namespace)."""
    ops["record"] += 1
    namespace, pod, uid = incarnation
    d = safefs.open_dir(
        root, layout.validate_namespace(namespace), layout.validate_pod_name(pod), layout.validate_pod_uid(uid)
    )
    if d is None:
        return  # the whole incarnation is gone (pruned): there is no endpoint status left to explain
    body = json.dumps({"time": layout.rfc3339(now), "reason": reason, "cores": count}, sort_keys=True).encode()
    with d:
        d.replace_atomically(RECORD_NAME, body, mode=layout.FILE_MODE)


def drop_record(root: Path, incarnation: Incarnation, *, ops: Ops) -> None:
    """Remove the record of an incarnation that has no cores and no endpoint left, then its empty directories."""
    ops["record"] += 1
    namespace, pod, uid = incarnation
    d = safefs.open_dir(root, namespace, pod)
    if d is None:
        return
    with d:
        uid_dir = d.sub(uid)
        if uid_dir is None:
            return
        with uid_dir:
            uid_dir.unlink(RECORD_NAME)
        if not d.rmdir(uid):
            return  # a core arrived meanwhile: its directory stays
    ns_dir = safefs.open_dir(root, namespace)
    if ns_dir is not None:
        with ns_dir:
            ns_dir.rmdir(pod)


def read_removal(root: Path, incarnation: Incarnation) -> dict[str, Any] | None:
    """The removal record of an incarnation, checked field by field (storage is written by every node)."""
    namespace, pod, uid = incarnation
    try:
        raw = safefs.read_bytes(
            root,
            layout.validate_namespace(namespace),
            layout.validate_pod_name(pod),
            layout.validate_pod_uid(uid),
            RECORD_NAME,
            limit=RECORD_MAX_BYTES + 1,
        )
    except (layout.InvalidName, OSError):
        return None
    if raw is None or len(raw) > RECORD_MAX_BYTES:
        return None
    try:
        doc = json.loads(raw)
        when = datetime.strptime(doc["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
        reason, count = doc["reason"], doc["cores"]
    except (ValueError, TypeError, KeyError):
        return None
    if reason not in REASONS or not isinstance(count, int) or isinstance(count, bool) or count < 1:
        return None
    return {"time": layout.rfc3339(when), "reason": reason, "cores": count}


@dataclass
class Walked:
    """What the slow reconcile found: every committed core, every container directory, every referenced object."""

    cores: list[IndexedCore] = field(default_factory=list)
    container_dirs: list[Path] = field(default_factory=list)
    referenced: set[str] = field(default_factory=set)
    complete: bool = True  # False when a part of the tree could not be read: the object collector then waits
    records: list[Incarnation] = field(default_factory=list)  # removal records of incarnations with no container


def _dirs(d: safefs.Dir, validator: Any) -> list[str]:
    names = []
    for name in d.entries("dir"):
        try:
            names.append(validator(name))
        except layout.InvalidName:
            continue
    return names


def _container_dirs(root: Path, namespace: str, records: list[Incarnation]) -> list[Path]:
    """Every container directory of a namespace, committed cores or not (debris lives in new ones too); the
    incarnations left with only a removal record are added to ``records``."""
    out: list[Path] = []
    ns_dir = safefs.open_dir(root, namespace)
    if ns_dir is None:
        return out
    with ns_dir:
        for pod in _dirs(ns_dir, layout.validate_pod_name):
            pod_dir = ns_dir.sub(pod)
            if pod_dir is None:
                continue
            with pod_dir:
                for uid in _dirs(pod_dir, layout.validate_pod_uid):
                    uid_dir = pod_dir.sub(uid)
                    if uid_dir is None:
                        continue
                    with uid_dir:
                        containers = _dirs(uid_dir, layout.validate_container)
                        out.extend(
                            layout.container_dir(root, namespace=namespace, pod=pod, pod_uid=uid, container=c)
                            for c in containers
                        )
                        if not containers and uid_dir.stat(RECORD_NAME) is not None:
                            records.append((namespace, pod, uid))
    return out


def walk(root: Path, *, ops: Ops) -> Walked:
    """One pass over the whole tree (the slow reconcile; never on the hot path)."""
    out = Walked()
    ops["walk"] += 1
    r = safefs.open_root(root)
    if r is None:
        return out
    with r:
        namespaces = _dirs(r, layout.validate_namespace)
    for ns in namespaces:
        try:
            cores = layout.list_cores(root, namespace=ns)
            out.container_dirs.extend(_container_dirs(root, ns, out.records))
        except OSError as e:
            logger.warning("retention walk: cannot read namespace %s: %s", ns, e, extra={"namespace": ns})
            out.complete = False
            continue
        for core in cores:
            found = index_entry(
                namespace=ns,
                pod=core.ref.pod,
                pod_uid=core.ref.pod_uid,
                container=core.ref.container,
                core_id=core.ref.core_id,
                stored_size=core.metadata.get("storedSize"),
            )
            if found is not None:
                out.cores.append(found)
            out.referenced |= objects.referenced_build_ids(core.metadata)
    return out


def sweep(directory: Path, *, grace: float, now: float | None = None, ops: Ops) -> int:
    """The debris sweep of one container directory: the one call of :func:`handler.layout.sweep_debris` here.

    A writer's temp file is kept while it is younger than ``grace`` by mtime; writers that stall keep their temp
    files fresh (their heartbeat), so only the files of writers that died are removed.
    """
    ops["sweep"] += 1
    return layout.sweep_debris(directory, now=time.time() if now is None else now, grace=grace)


def collect_objects(root: Path, *, referenced: set[str], now: float, grace: float, ops: Ops) -> list[str]:
    """Objects of the build-id store no stored core references (see :func:`handler.objects.collect_garbage`)."""
    ops["gc"] += 1
    return objects.collect_garbage(root, referenced=referenced, now=now, grace=grace)
