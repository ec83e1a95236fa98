"""
Which ELF objects a ``dump?objects=true`` carries, where in the archive, and the gdb command file of each core.

Objects are reached only through a core of the dump (whose namespace the request was authorized for) and only
as that core's metadata records them, and the metadata is read as untrusted input:

- a record counts only when the handler, at that core's capture, read the file the process had mapped and found
  it byte for byte the stored object: ``state`` ``stored``/``stored-earlier`` with a ``sha256``, which must equal
  the ``sha256`` of the object's own ``object.json`` (whose build-id must be its directory's). The build-id note a
  core shows is memory the crashing program controls, so naming a build-id is never enough: a core of namespace A
  gets an object only if A's process had mapped those very bytes (see the README's threat model);
- a path is refused unless it is absolute, has no ``..``, and uses only ``[A-Za-z0-9._+@=,~-]`` in components of
  at most 255 bytes (it becomes a tar name and a word of a gdb command file: no newline, quote, ``#`` or space can
  reach gdb); it is normalized and put under ``sysroot/``;
- the number of records read per core, the objects and their bytes per dump are bounded (:class:`ObjectLimits`);
  what is left out is listed with its reason in the archive's ``manifest.json``.

Each object's bytes appear once in an archive. Cores whose objects agree on every path share ``sysroot/``; a core
whose objects conflict with it (a sidecar's other libc at the same path, an image changed under a restarted
container) gets ``sysroot.<container>_<core-id>/``. An object already in the archive appears again as a relative
symbolic link to its first place. Blocking (it reads the store through :mod:`handler.safefs`).
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
import stat
from pathlib import Path
from typing import Any

from handler import objects as store
from handler.layout import StoredCore


DEFAULT_MAX_OBJECTS = 256
DEFAULT_MAX_OBJECT_BYTES = 4 << 30
MAX_RECORDS_PER_CORE = 1024
MAX_PATH = 1024
SHARED_SYSROOT = "sysroot"
MANIFEST = "manifest.json"

_COMPONENT_RE = re.compile(r"^[A-Za-z0-9._+@=,~-]{1,255}$")
_GZIP_MAGIC = b"\x1f\x8b"


@dataclasses.dataclass(frozen=True)
class ObjectLimits:
    """Per dump: distinct objects carried, their (decompressed) bytes; per core: metadata records read."""

    max_objects: int = DEFAULT_MAX_OBJECTS
    max_bytes: int = DEFAULT_MAX_OBJECT_BYTES
    max_records_per_core: int = MAX_RECORDS_PER_CORE


@dataclasses.dataclass(frozen=True)
class Wanted:
    """An object a core's metadata says the handler verified: its normalized path in the container."""

    path: str
    build_id: str
    sha256: str


@dataclasses.dataclass(frozen=True)
class Skipped:
    path: str | None
    build_id: str | None
    reason: str

    def record(self) -> dict[str, Any]:
        return {"path": self.path, "buildID": self.build_id, "reason": self.reason}


@dataclasses.dataclass(frozen=True)
class StoredObject:
    """A stored object as planned: its info and the identity of the ``executable.gz`` that will be sent."""

    info: store.ObjectInfo
    device: int
    inode: int
    mtime_ns: int
    stored_size: int


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tar entry for an object: its bytes (``target`` None) or a relative symbolic link to them."""

    name: str
    build_id: str
    target: str | None


@dataclasses.dataclass(frozen=True)
class CoreObjects:
    """What the archive carries for one core: its object entries, its gdb file and its manifest entry."""

    entries: tuple[Entry, ...]
    gdb_name: str
    gdb_script: bytes
    manifest: dict[str, Any]


def normalize_path(value: object) -> str | None:
    """The container path as an archive-safe absolute path, or None if it cannot be one (see the module doc)."""
    if not isinstance(value, str) or not value.startswith("/") or len(value) > MAX_PATH:
        return None
    parts = [p for p in value.split("/") if p not in ("", ".")]
    if not parts or ".." in parts or not all(_COMPONENT_RE.match(p) for p in parts):
        return None
    return "/" + "/".join(parts)


def wanted_objects(metadata: dict[str, Any], *, limit: int) -> tuple[list[Wanted], list[Skipped]]:
    """The objects a core's metadata records as verified at its capture, and the others with their reasons."""
    records = metadata.get("objects")
    if not isinstance(records, list):
        return [], []
    wanted: list[Wanted] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    for n, rec in enumerate(records):
        if n >= limit:
            skipped.append(
                Skipped(
                    None, None, f"{len(records) - limit} more objects in the metadata than the {limit} a core may list"
                )
            )
            break
        if not isinstance(rec, dict):
            skipped.append(Skipped(None, None, "malformed object record"))
            continue
        raw_path, build_id = rec.get("path"), rec.get("buildID")
        shown_path = raw_path[:MAX_PATH] if isinstance(raw_path, str) else None
        shown_id = build_id if isinstance(build_id, str) and store.BUILD_ID_RE.match(build_id) else None
        path = normalize_path(raw_path)
        state, sha = rec.get("state"), rec.get("sha256")
        if state not in ("stored", "stored-earlier"):
            reason = rec.get("reason")
            why = reason[:200] if isinstance(reason, str) else "no reason recorded"
            skipped.append(Skipped(shown_path, shown_id, f"not stored at capture: {why}"))
        elif shown_id is None:
            skipped.append(Skipped(shown_path, None, "not a valid build-id"))
        elif path is None:
            skipped.append(
                Skipped(
                    shown_path,
                    shown_id,
                    "path unusable in an archive (relative, '..', or characters outside [A-Za-z0-9._+@=,~-])",
                )
            )
        elif not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            skipped.append(
                Skipped(
                    shown_path,
                    shown_id,
                    "not verified against the process's mapped file at capture (no sha256 recorded)",
                )
            )
        elif path in seen:
            skipped.append(Skipped(shown_path, shown_id, "path listed twice"))
        else:
            seen.add(path)
            wanted.append(Wanted(path=path, build_id=shown_id, sha256=sha))
    return wanted, skipped


def inspect_stored(root: Path, build_id: str) -> StoredObject | str:
    """The stored object, checked as far as is cheap before sending (info valid, a regular gzip file whose
    trailer agrees with the recorded size); else why it cannot be sent. Its bytes are checked while sent."""
    info = store.read_info(root, build_id)
    if info is None:
        return "not in the store (removed, or its object.json missing or invalid)"
    opened = store.open_object(root, build_id)
    if opened is None:
        return "not in the store (its executable.gz is missing or not a regular file)"
    with opened:
        st = opened.st
        if not stat.S_ISREG(st.st_mode) or st.st_size < 18 or st.st_size > 2 * store.MAX_OBJECT:
            return "stored file is not a gzip of the recorded object"
        head = os.pread(opened.fd, 2, 0)
        tail = os.pread(opened.fd, 4, st.st_size - 4)
    # RFC 1952: the last member ends with ISIZE, the size mod 2**32 (the handler writes one member).
    if head != _GZIP_MAGIC or int.from_bytes(tail, "little") != info.size & 0xFFFFFFFF:
        return "stored file is not a gzip of the recorded object"
    return StoredObject(info=info, device=st.st_dev, inode=st.st_ino, mtime_ns=st.st_mtime_ns, stored_size=st.st_size)


def _exe_path(metadata: dict[str, Any], kept: list[Wanted]) -> str | None:
    """The executable, if the archive carries it: the recorded exe among the core's objects (as the node saw it,
    it may carry a host prefix), else the first object recorded (the lowest mapping: the executable of PIE and
    non-PIE programs alike)."""
    records = metadata.get("objects")
    paths = (
        [p for r in records if isinstance(r, dict) and (p := normalize_path(r.get("path")))]
        if isinstance(records, list)
        else []
    )
    exe, chosen = metadata.get("exe"), None
    if isinstance(exe, str):
        chosen = next((p for p in paths if exe == p or (exe.endswith(p) and exe[: -len(p)].startswith("/"))), None)
    if chosen is None and paths:
        chosen = paths[0]
    return chosen if chosen in {w.path for w in kept} else None


def gdb_script(*, sysroot: str | None, exe: str | None, search: list[str], core_name: str, title: str) -> bytes:
    """The command file: every word comes from a validated name or path (no quoting is needed or possible)."""
    lines = [
        f"# {title}: run `gdb -x THIS_FILE` in the directory the archive was extracted in",
        "# nothing is loaded automatically from the archive (scripts in objects could run code)",
        "set auto-load off",
    ]
    if sysroot is not None:
        lines.append(f"set sysroot {sysroot}")
        if search:
            lines.append("set solib-search-path " + ":".join(search))
    if exe is not None:
        lines.append(f"file {exe}")
    lines += [f"core-file {core_name}", "bt"]
    return ("\n".join(lines) + "\n").encode()


class ObjectPlanner:
    """Places the objects of the cores of one archive, in order, within the dump's limits (see the module doc)."""

    def __init__(self, *, root: Path, limits: ObjectLimits) -> None:
        self.root = root
        self.limits = limits
        self.shared: dict[str, str] = {}  # path under sysroot/ -> build-id
        self.first: dict[str, str] = {}  # build-id -> archive name of its bytes
        self.stored: dict[str, StoredObject] = {}
        self._refused: dict[str, str] = {}  # build-id -> why it cannot be sent
        self.bytes = 0

    def _resolve(self, w: Wanted) -> StoredObject | str:
        if w.build_id in self._refused:
            return self._refused[w.build_id]
        found = self.stored.get(w.build_id)
        if found is None:
            result = inspect_stored(self.root, w.build_id)
            if isinstance(result, str):
                self._refused[w.build_id] = result
                return result
            found = result
        if found.info.sha256 != w.sha256:
            return "the stored object is not the file this core's process mapped (sha256 differs)"
        if w.build_id not in self.first:
            if len(self.first) >= self.limits.max_objects:
                return f"dump object limit ({self.limits.max_objects} objects)"
            if self.bytes + found.info.size > self.limits.max_bytes:
                return f"dump object byte limit ({self.limits.max_bytes} bytes)"
        self.stored[w.build_id] = found
        return found

    def place(self, core: StoredCore) -> CoreObjects:
        meta = core.metadata
        base = f"{core.ref.container}/{core.ref.core_id}"
        wanted, skipped = wanted_objects(meta, limit=self.limits.max_records_per_core)
        kept: list[Wanted] = []
        for w in wanted:
            result = self._resolve(w)
            if isinstance(result, str):
                skipped.append(Skipped(w.path, w.build_id, result))
                continue
            kept.append(w)
            if w.build_id not in self.first:
                # Reserve now, so the limits count each object once whichever core names it first.
                self.first[w.build_id] = ""
                self.bytes += result.info.size
        conflict = any(self.shared.get(w.path, w.build_id) != w.build_id for w in kept)
        sysroot = f"{SHARED_SYSROOT}.{core.ref.container}_{core.ref.core_id}" if conflict else SHARED_SYSROOT
        entries: list[Entry] = []
        included: list[dict[str, Any]] = []
        for w in kept:
            name = sysroot + w.path
            included.append(
                {"path": w.path, "buildID": w.build_id, "file": name, "size": self.stored[w.build_id].info.size}
            )
            if sysroot == SHARED_SYSROOT:
                if w.path in self.shared:
                    continue
                self.shared[w.path] = w.build_id
            first = self.first[w.build_id]
            if first:
                entries.append(
                    Entry(name=name, build_id=w.build_id, target=posixpath.relpath(first, posixpath.dirname(name)))
                )
            else:
                self.first[w.build_id] = name
                entries.append(Entry(name=name, build_id=w.build_id, target=None))
        exe = _exe_path(meta, kept)
        gdb_name = f"{core.ref.container}_{core.ref.core_id}.gdb"
        search = sorted({posixpath.dirname(sysroot + w.path) for w in kept})
        script = gdb_script(
            sysroot=sysroot if kept else None,
            exe=sysroot + exe if exe else None,
            search=search,
            core_name=f"{base}.core",
            title=base,
        )
        entry: dict[str, Any] = {
            "core": f"{base}.core",
            "metadata": f"{base}.json",
            "gdb": gdb_name,
            "sysroot": sysroot if kept else None,
            "objects": included,
            "skipped": [s.record() for s in skipped],
        }
        if not isinstance(meta.get("objects"), list):
            entry["note"] = (
                "the capture recorded no objects for this core (explaining was off or failed, or the "
                "core was drained or imported after its process was gone)"
            )
        elif not meta["objects"]:
            entry["note"] = "the core names no mapped ELF object with a build-id (no NT_FILE note, or not an ELF core)"
        if isinstance(meta.get("backtraceError"), str):
            entry["backtraceError"] = meta["backtraceError"][:300]
        return CoreObjects(entries=tuple(entries), gdb_name=gdb_name, gdb_script=script, manifest=entry)
