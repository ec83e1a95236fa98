"""
Dev mode's notification path: a cheap change detector on the local storage root, so a core filed by hand
(``coredump-handler import``) reaches a watcher within about a second without a cluster to carry an Event.

Every :data:`INTERVAL_SECONDS` it walks the directory levels only (namespace, pod, uid) and takes the
``lstat`` of each container directory: a commit renames the core's metadata into its container directory,
and a removal unlinks from it, so either changes that directory's mtime; a new container directory or a
removed one changes the set. No core file and no metadata is opened, so a pass costs one ``scandir`` per
namespace, pod and incarnation directory plus one ``lstat`` per container: a few milliseconds for a
developer's tree (see ``bench/apiserver_bench.py``). Each incarnation whose signature changed is handed
to ``on_change(namespace=, pod=, uid=)``, which re-reads that incarnation from storage (the truth).

Why not inotify: one watch per directory at four levels must be re-armed as directories come and go, and
it says nothing on NFS, where the same root is shared by every node; the mtime walk behaves the same on
every filesystem. It is O(incarnations) per pass, which is why only dev mode uses it: a cluster gets the
agent's Events (:mod:`.eventwatch`). Links are never followed (:mod:`handler.safefs`) and names that are
not valid at their level are skipped. Timestamps are coarse (two commits within one clock tick leave the
same mtime), so an incarnation whose directory changed within the last second is looked at once more on the
next pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from handler import layout, safefs

logger = logging.getLogger(__name__)

INTERVAL_SECONDS = 1.0
RACY_SECONDS = 1.0

Incarnation = tuple[str, str, str]
Signature = tuple[tuple[str, int, int], ...]  # (container, inode, mtime_ns) of each container directory


def _valid_subdirs(d: safefs.Dir, validator: Callable[[str], str]) -> list[str]:
    names = []
    for name in d.entries("dir"):
        try:
            names.append(validator(name))
        except layout.InvalidName:
            continue
    return names


def snapshot(
    root: Path, *, racy: set[Incarnation] | None = None, racy_seconds: float = RACY_SECONDS
) -> dict[Incarnation, Signature]:
    """
    Blocking: the signature of every incarnation directory under ``root`` (directory levels only). Into
    ``racy`` go the incarnations with a container directory changed within ``racy_seconds`` of now: a
    second change within the filesystem's timestamp granularity (the kernel's coarse clock, a jiffy) would
    leave the same mtime, so those are looked at once more on the next pass (git's "racy" entries).
    """
    found: dict[Incarnation, Signature] = {}
    recent_ns = time.time_ns() - int(racy_seconds * 1e9)
    top = safefs.open_root(root)
    if top is None:
        return found
    with top:
        for namespace in _valid_subdirs(top, layout.validate_namespace):
            ns_dir = top.sub(namespace)
            if ns_dir is None:
                continue
            with ns_dir:
                for pod in _valid_subdirs(ns_dir, layout.validate_pod_name):
                    pod_dir = ns_dir.sub(pod)
                    if pod_dir is None:
                        continue
                    with pod_dir:
                        for uid in _valid_subdirs(pod_dir, layout.validate_pod_uid):
                            uid_dir = pod_dir.sub(uid)
                            if uid_dir is None:
                                continue
                            with uid_dir:
                                signature = []
                                for container in _valid_subdirs(uid_dir, layout.validate_container):
                                    st = uid_dir.lstat(container)
                                    if st is not None:
                                        signature.append((container, st.st_ino, st.st_mtime_ns))
                                        if racy is not None and st.st_mtime_ns >= recent_ns:
                                            racy.add((namespace, pod, uid))
                            found[(namespace, pod, uid)] = tuple(signature)
    return found


def changed(before: dict[Incarnation, Signature], after: dict[Incarnation, Signature]) -> list[Incarnation]:
    """Incarnations that appeared, disappeared or whose container directories changed."""
    return sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))


class ChangeDetector:
    def __init__(
        self,
        *,
        root: Path,
        on_change: Callable[..., Awaitable[Any]],
        interval: float = INTERVAL_SECONDS,
        racy_seconds: float = RACY_SECONDS,
    ) -> None:
        self.root = Path(root)
        self.racy_seconds = racy_seconds
        self.on_change = on_change
        self.interval = interval
        self._last: dict[Incarnation, Signature] | None = None
        self._racy: set[Incarnation] = set()

    async def poll(self) -> list[Incarnation]:
        """One pass; the first one hands over every incarnation there (nothing filed at startup is missed)."""
        racy: set[Incarnation] = set()
        current = await asyncio.to_thread(snapshot, self.root, racy=racy, racy_seconds=self.racy_seconds)
        previous, self._last = self._last, current
        keys = sorted(set(changed(previous or {}, current)) | self._racy)
        self._racy = racy
        for namespace, pod, uid in keys:
            try:
                await self.on_change(namespace=namespace, pod=pod, uid=uid)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # one failed re-read must not stop the detector
                logger.warning("cores of %s/%s not re-read: %s; retried at the next change", namespace, pod, error)
                # Forget this incarnation's signature so the next pass tries again.
                self._last.pop((namespace, pod, uid), None)
        return keys

    async def run(self) -> None:
        """Until cancelled: :meth:`poll` every ``interval`` seconds."""
        while True:
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except OSError as error:
                logger.warning("storage change detector: %s", error)
            await asyncio.sleep(self.interval)
