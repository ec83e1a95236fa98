"""
The spool: a node-local directory where cores wait while shared storage is away (or the agent is).

Two kinds of entries, both committed by renaming their small description file last:

* from the handler: ``<name>.core.gz`` (already compressed, pod already resolved) and ``<name>.json`` holding the
  pending metadata; draining copies the bytes unchanged into storage.
* from the shim (agent absent): ``<name>.core`` (the raw core as the kernel sent it) and ``<name>.info``
  (``key=value`` lines: pid, tid, signal, time, comm, the pid's cgroup taken while it was still alive,
  and ``rest=`` bytes that did not fit); draining runs them through the normal ingest.

Hidden names are writes in flight. Nothing here talks to shared storage. Every access goes through
:mod:`handler.safefs` with the spool directory as its root: a link in the spool is never followed.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handler import faults, safefs

logger = logging.getLogger(__name__)

HANDLER_DATA, HANDLER_META = ".core.gz", ".json"
SHIM_DATA, SHIM_INFO = ".core", ".info"
SPOOL_MODE, ENTRY_MODE = 0o700, 0o600
INFO_MAX_BYTES = 1 << 20
# A half-written or half-removed entry older than this belongs to no live writer (the shim and the handler write
# a core's bytes continuously, and name an entry's two files within moments of each other).
ORPHAN_GRACE_SECONDS = 60 * 60


@dataclass(frozen=True)
class SpoolEntry:
    kind: str  # "handler" or "shim"
    name: str
    data_path: Path
    meta_path: Path

    @property
    def spool_dir(self) -> Path:
        return self.data_path.parent

    def remove(self) -> None:
        # Description first: a half-removed entry must not look committed.
        d = safefs.open_root(self.spool_dir)
        if d is None:
            return
        with d:
            d.unlink(self.meta_path.name)
            faults.point("spool:entry-half-removed")
            d.unlink(self.data_path.name)

    def open_data(self) -> safefs.ReadFile | None:
        """The entry's data, a regular file opened without following a link; None if it is not there."""
        d = safefs.open_root(self.spool_dir)
        if d is None:
            return None
        with d:
            return d.open_read(self.data_path.name)

    def read_meta(self) -> bytes | None:
        return safefs.read_bytes(self.spool_dir, self.meta_path.name, limit=INFO_MAX_BYTES)


class SpoolWriter:
    """Same shape as :class:`handler.layout.CoreWriter` (write, commit, abort) for a handler spool entry."""

    def __init__(self, spool_dir: Path, *, name: str) -> None:
        self.spool_dir = Path(spool_dir)
        self.name = f"{name}.{secrets.token_hex(4)}"
        self._tmp_name = f".{self.name}{HANDLER_DATA}.tmp"
        self._tmp = self.spool_dir / self._tmp_name
        self._dir: safefs.Dir | None = None
        self._file: Any = None
        self.committed: SpoolEntry | None = None

    def open(self):
        if self._file is None:
            self._dir = safefs.make_dirs(self.spool_dir, mode=SPOOL_MODE, root_mode=SPOOL_MODE)
            fd = self._dir.create(self._tmp_name, mode=ENTRY_MODE)
            self._file = os.fdopen(fd, "wb", buffering=0)
        return self._file

    def write(self, data: bytes | memoryview) -> None:
        f = self.open()
        view = memoryview(data)
        while view:
            view = view[f.write(view) :]

    def commit(self, metadata: dict[str, Any]) -> SpoolEntry:
        f = self.open()
        assert self._dir is not None
        os.fsync(f.fileno())
        f.close()
        data_name, meta_name = f"{self.name}{HANDLER_DATA}", f"{self.name}{HANDLER_META}"
        self._dir.rename(self._tmp_name, data_name)
        # The description is the commit point: written, fsynced, renamed last.
        self._dir.replace_atomically(meta_name, json.dumps(metadata).encode(), mode=ENTRY_MODE)
        self._dir.fsync()
        self._dir.close()
        self._dir = None
        self.committed = SpoolEntry(
            kind="handler", name=self.name, data_path=self.spool_dir / data_name, meta_path=self.spool_dir / meta_name
        )
        return self.committed

    def abort(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self._dir is not None:
            self._dir.unlink(self._tmp_name)
            self._dir.close()
            self._dir = None


def list_entries(spool_dir: Path) -> list[SpoolEntry]:
    """Committed spool entries (regular files only, never links), oldest name first."""
    spool_dir = Path(spool_dir)
    d = safefs.open_root(spool_dir)
    if d is None:
        return []
    with d:
        names = {n for n in d.entries("file") if not n.startswith(".")}
    entries = []
    for n in sorted(names):
        if n.endswith(HANDLER_META):
            base = n[: -len(HANDLER_META)]
            if base + HANDLER_DATA in names:
                entries.append(SpoolEntry("handler", base, spool_dir / (base + HANDLER_DATA), spool_dir / n))
        elif n.endswith(SHIM_INFO):
            base = n[: -len(SHIM_INFO)]
            if base + SHIM_DATA in names:
                entries.append(SpoolEntry("shim", base, spool_dir / (base + SHIM_DATA), spool_dir / n))
    return entries


def parse_shim_info(text: str) -> dict[str, str]:
    """The ``key=value`` description the shim wrote; ``cgroup`` lines are gathered into one text."""
    info: dict[str, str] = {}
    cgroup: list[str] = []
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        if key == "cgroup":
            cgroup.append(value)
        else:
            info[key] = value
    info["cgroup"] = "\n".join(cgroup)
    return info


def read_shim_info(path: Path) -> dict[str, str]:
    """:func:`parse_shim_info` of the file at ``path`` (a regular file in the spool, never through a link)."""
    raw = safefs.read_bytes(Path(path).parent, Path(path).name, limit=INFO_MAX_BYTES)
    if raw is None:
        raise FileNotFoundError(f"{path} is gone (or not a regular file)")
    return parse_shim_info(raw.decode(errors="replace"))


def spool_bytes(spool_dir: Path) -> int:
    d = safefs.open_root(spool_dir)
    if d is None:
        return 0
    with d:
        return sum(st.st_size for _, st in d.all_entries() if stat.S_ISREG(st.st_mode))


def sweep_orphans(spool_dir: Path, *, now: float | None = None, grace: float = ORPHAN_GRACE_SECONDS) -> int:
    """
    Remove what is left of entries that will never be committed or were half removed, once older than
    ``grace``: hidden temp files, and a data file or description without its partner (a drain killed between
    its two unlinks; a shim or handler killed between its two renames). Committed entries are never touched.
    Returns how many files were removed.
    """
    now = time.time() if now is None else now
    d = safefs.open_root(spool_dir)
    if d is None:
        return 0
    removed = 0
    with d:
        files = {n: st for n, st in d.all_entries() if stat.S_ISREG(st.st_mode)}
        pairs = (
            (HANDLER_DATA, HANDLER_META),
            (HANDLER_META, HANDLER_DATA),
            (SHIM_DATA, SHIM_INFO),
            (SHIM_INFO, SHIM_DATA),
        )
        for name, st in sorted(files.items()):
            if now - st.st_mtime < grace:
                continue
            if name.startswith("."):
                orphan = name.endswith(".tmp")
            else:
                orphan = any(name.endswith(own) and name[: -len(own)] + other not in files for own, other in pairs)
            if orphan and d.unlink(name):
                removed += 1
                logger.warning(
                    "removed %s/%s: part of a spool entry that was never committed or half removed", d.path, name
                )
    return removed
