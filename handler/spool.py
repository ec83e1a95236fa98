"""
The spool: a node-local directory where cores wait while shared storage is away (or the agent is).

Two kinds of entries, both committed by renaming their small description file last:

* from the handler: ``<name>.core.gz`` (already compressed, pod already resolved) and ``<name>.json`` holding the
  pending metadata; draining copies the bytes unchanged into storage.
* from the shim (agent absent): ``<name>.core`` (the raw core as the kernel sent it) and ``<name>.info``
  (``key=value`` lines: pid, tid, signal, time, comm, the pid's cgroup taken while it was still alive,
  and ``rest=`` bytes that did not fit); draining runs them through the normal ingest.

Hidden names are writes in flight. Nothing here talks to shared storage.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

HANDLER_DATA, HANDLER_META = ".core.gz", ".json"
SHIM_DATA, SHIM_INFO = ".core", ".info"


@dataclass(frozen=True)
class SpoolEntry:
    kind: str                   # "handler" or "shim"
    name: str
    data_path: Path
    meta_path: Path

    def remove(self) -> None:
        # Description first: a half-removed entry must not look committed.
        for p in (self.meta_path, self.data_path):
            try:
                p.unlink()
            except FileNotFoundError:
                pass


class SpoolWriter:
    """Same shape as :class:`handler.layout.CoreWriter` (write, commit, abort) for a handler spool entry."""

    def __init__(self, spool_dir: Path, *, name: str) -> None:
        self.spool_dir = Path(spool_dir)
        self.name = f"{name}.{secrets.token_hex(4)}"
        self._tmp = self.spool_dir / f".{self.name}{HANDLER_DATA}.tmp"
        self._file: Any = None
        self.committed: SpoolEntry | None = None

    def open(self):
        if self._file is None:
            self.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            self._file = os.fdopen(fd, "wb", buffering=0)
        return self._file

    def write(self, data: bytes | memoryview) -> None:
        f = self.open()
        view = memoryview(data)
        while view:
            view = view[f.write(view):]

    def commit(self, metadata: dict[str, Any]) -> SpoolEntry:
        f = self.open()
        os.fsync(f.fileno())
        f.close()
        data = self.spool_dir / f"{self.name}{HANDLER_DATA}"
        meta = self.spool_dir / f"{self.name}{HANDLER_META}"
        os.rename(self._tmp, data)
        tmp_meta = self.spool_dir / f".{self.name}{HANDLER_META}.tmp"
        with open(tmp_meta, "w") as mf:
            json.dump(metadata, mf)
            mf.flush()
            os.fsync(mf.fileno())
        os.rename(tmp_meta, meta)
        self.committed = SpoolEntry(kind="handler", name=self.name, data_path=data, meta_path=meta)
        return self.committed

    def abort(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        try:
            self._tmp.unlink()
        except FileNotFoundError:
            pass


def list_entries(spool_dir: Path) -> list[SpoolEntry]:
    """Committed spool entries, oldest name first."""
    try:
        names = {e.name for e in os.scandir(spool_dir) if not e.name.startswith(".")}
    except FileNotFoundError:
        return []
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


def read_shim_info(path: Path) -> dict[str, str]:
    """The ``key=value`` description the shim wrote; ``cgroup`` lines are gathered into one text."""
    info: dict[str, str] = {}
    cgroup: list[str] = []
    for line in Path(path).read_text(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        if key == "cgroup":
            cgroup.append(value)
        else:
            info[key] = value
    info["cgroup"] = "\n".join(cgroup)
    return info


def spool_bytes(spool_dir: Path) -> int:
    total = 0
    try:
        for e in os.scandir(spool_dir):
            if e.is_file(follow_symlinks=False):
                total += e.stat(follow_symlinks=False).st_size
    except FileNotFoundError:
        pass
    return total
