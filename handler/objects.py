"""
The ELF objects a crashing process had mapped, kept once by build-id beside the cores.

Layout (debuginfod-style, one directory per build-id, shared by every namespace, pod and node)::

    <root>/.build-id/<2 hex>/<rest of the build-id>/executable.gz   the object, gzip (isal level 1), like cores
    <root>/.build-id/<2 hex>/<rest of the build-id>/object.json     size, sha256, stored size, first path seen

Contract:

- :func:`mapped_objects` lists the objects from the core's ``NT_FILE`` note (via :mod:`handler.sparsecore`):
  every file mapped at offset 0 whose first page in the core is an ELF header with a build-id note.
- :func:`keep_objects` copies each object not already stored, reading the exact file the process mapped
  (``/proc/<pid>/map_files/<start>-<end>``, else ``/proc/<pid>/root/<path>``), and keeps it only when the
  build-id of the bytes read equals the one the core names: a file replaced on disk since the mapping, or a
  planted one, is refused. Writes use the cores' commit protocol: a hidden temporary name, fsync, then a link to
  the final name that never replaces (two nodes storing the same object race harmlessly), the JSON last.
- Bounded by a byte and a time budget per core; what is skipped is recorded with its reason, and the core is
  always kept whatever happens here. The result is the list the core's metadata carries (``objects``).
- An object already stored counts for a core (``stored-earlier``) only when the file this process mapped is the
  same bytes (size and sha256 against ``object.json``): the build-id note a core shows is in memory the crashing
  program controls, so a build-id alone never makes another namespace's object "referenced" by this core. Each
  record the core keeps says so with the ``sha256`` of the bytes the handler read.
- Readers (the API server's ``dump?objects=true``): :func:`read_info` (``object.json`` validated: its build-id is
  the directory's, sizes bounded) and :func:`open_object`, both beneath the root without following a link. The
  dump serves an object through a core only when that core's record carries the sha256 the object's info has.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isal import isal_zlib

from handler import safefs, sparsecore

STORE_DIR = ".build-id"
OBJECT_NAME = "executable.gz"
INFO_NAME = "object.json"
BUILD_ID_RE = re.compile(r"^[0-9a-f]{8,128}$")
DEFAULT_BYTES = 512 << 20
DEFAULT_SECONDS = 1.0
MAX_OBJECT = 2 << 30
CHUNK = 1 << 20
NT_GNU_BUILD_ID = 3


@dataclass(frozen=True)
class Mapped:
    path: str  # in the container
    start: int
    end: int
    build_id: str  # from the core's copy of the ELF header page


def validate_build_id(value: str) -> str:
    if not isinstance(value, str) or not BUILD_ID_RE.match(value):
        raise ValueError(f"not a build-id: {value!r}")
    return value


def object_dir(root: Path, build_id: str) -> Path:
    validate_build_id(build_id)
    return Path(root) / STORE_DIR / build_id[:2] / build_id[2:]


def _build_id_of_elf(data: bytes) -> str | None:
    """The GNU build-id of an ELF image whose first bytes are ``data`` (64-bit LE; notes within ``data``)."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    (phoff,) = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    if phentsize != 56 or phoff + phnum * 56 > len(data):
        return None
    for i in range(phnum):
        p_type, _f, off, _va, _pa, filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * 56)
        if p_type != sparsecore.PT_NOTE or off + filesz > len(data):
            continue
        for ntype, desc in sparsecore._notes(data[off : off + filesz]):
            if ntype == NT_GNU_BUILD_ID and 4 <= len(desc) <= 64:
                return desc.hex()
    return None


def build_id_of_bytes(data: bytes) -> str | None:
    """The GNU build-id of an ELF image (its first 64 KiB are enough), or None."""
    return _build_id_of_elf(data[:65536])


def build_id_of_file(fd: int) -> str | None:
    return _build_id_of_elf(os.pread(fd, 65536, 0))


def mapped_objects(core_head: bytes, read_at: Callable[[int, int], bytes]) -> list[Mapped]:
    """Mapped ELF objects of a core: ``core_head`` holds headers and notes; ``read_at(offset, size)`` the rest."""
    parsed = sparsecore.parse_head(core_head)
    if parsed is None:
        return []
    loads, notes, _machine = parsed
    if notes is None:
        return []
    noff, nsize = notes
    if noff + nsize > len(core_head):
        return []
    out: dict[str, Mapped] = {}
    for start, end, file_off, path in sparsecore.file_mappings(core_head[noff : noff + nsize]):
        if file_off != 0 or path in out or not path.startswith("/"):
            continue
        seg = next((s for s in loads if s.vaddr == start and s.filesz > 0), None)
        if seg is None:
            continue
        build_id = _build_id_of_elf(read_at(seg.offset, min(seg.filesz, 65536)))
        if build_id:
            out[path] = Mapped(path=path, start=start, end=end, build_id=build_id)
    return list(out.values())


def _open_object(proc_pid: Path, m: Mapped) -> int:
    """The exact file the process mapped; else the path in its root. No link is followed in the root."""
    try:
        return os.open(proc_pid / "map_files" / f"{m.start:x}-{m.end:x}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        pass
    path = os.path.normpath(m.path).lstrip("/")
    fd = os.open(proc_pid / "root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parts = path.split("/")
        for part in parts[:-1]:
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)


def is_stored(root: Path, build_id: str) -> bool:
    """Both files committed, reached beneath ``root`` without following a link at any level."""
    validate_build_id(build_id)
    d = safefs.open_dir(root, STORE_DIR, build_id[:2], build_id[2:])
    if d is None:
        return False
    with d:
        return d.stat(INFO_NAME) is not None and d.stat(OBJECT_NAME) is not None


def _copy(src: int, d: safefs.Dir, *, build_id: str, deadline: float, budget: int) -> tuple[str, dict[str, Any]]:
    """Copy one object into ``d``; ("stored"|"exists", info) or raises _Skip."""
    st = os.fstat(src)
    if not stat.S_ISREG(st.st_mode):
        raise _Skip("not a regular file")
    if st.st_size > min(budget, MAX_OBJECT):
        raise _Skip("byte budget")
    if build_id_of_file(src) != build_id:
        raise _Skip("build-id mismatch (the file changed since it was mapped)")
    tmp = f".{OBJECT_NAME}.{secrets.token_hex(6)}.tmp"
    out = d.create(tmp, mode=0o640)
    sha = hashlib.sha256()
    comp = isal_zlib.compressobj(1, isal_zlib.DEFLATED, 16 + 15)
    stored = size = 0
    try:
        while True:
            if time.monotonic() > deadline:
                raise _Skip("time budget")
            chunk = os.pread(src, CHUNK, size)
            if not chunk:
                break
            size += len(chunk)
            sha.update(chunk)
            data = comp.compress(chunk)
            os.write(out, data)
            stored += len(data)
        tail = comp.flush()
        os.write(out, tail)
        stored += len(tail)
        if _build_id_of_elf(os.pread(src, 65536, 0)) != build_id:
            raise _Skip("build-id mismatch (the file changed while it was read)")
        os.fsync(out)
        try:
            d.link_no_replace(tmp, OBJECT_NAME)
            result = "stored"
        except FileExistsError:
            result = "exists"  # another node stored it first: same build-id, same object
        return result, {"size": size, "storedSize": stored, "sha256": sha.hexdigest()}
    finally:
        os.close(out)
        try:
            d.unlink(tmp)
        except OSError:
            pass


class _Skip(Exception):
    pass


def _write_info(d: safefs.Dir, info: dict[str, Any]) -> None:
    tmp = f".{INFO_NAME}.{secrets.token_hex(6)}.tmp"
    d.write_new(tmp, json.dumps(info, sort_keys=True).encode(), mode=0o640)
    try:
        d.link_no_replace(tmp, INFO_NAME)
    except FileExistsError:
        pass
    finally:
        d.unlink(tmp)
    d.fsync()


def keep_objects(
    root: Path,
    proc_pid: Path,
    objects: list[Mapped],
    *,
    max_bytes: int = DEFAULT_BYTES,
    max_seconds: float = DEFAULT_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> list[dict[str, Any]]:
    """Store what is missing; the per-object record for the core's metadata (never raises for one object)."""
    deadline = clock() + max_seconds
    budget = max_bytes
    records = []
    for m in objects:
        rec: dict[str, Any] = {"path": m.path, "buildID": m.build_id}
        try:
            if clock() > deadline:
                raise _Skip("time budget")
            # claim: refreshes the object's mark so the collector keeps it while this core is filed.
            earlier = read_info(root, m.build_id) if claim(root, m.build_id) else None
            if earlier is not None:
                # Stored by another crash: this process's own file must be the same bytes, else the core's claim
                # (a build-id note in memory it controls) would make a stranger's object "its" object.
                rec["sha256"] = _same_as_stored(proc_pid, m, earlier, deadline=deadline, clock=clock)
                rec["state"] = "stored-earlier"
                records.append(rec)
                continue
            if budget <= 0:
                raise _Skip("byte budget")
            src = _open_object(proc_pid, m)
            try:
                st = os.fstat(src)
                if not stat.S_ISREG(st.st_mode):
                    raise _Skip("not a regular file")
                if st.st_size > min(budget, MAX_OBJECT):
                    raise _Skip("byte budget")
                with safefs.make_dirs(root, STORE_DIR, m.build_id[:2], m.build_id[2:], mode=0o750) as d:
                    result, info = _copy(src, d, build_id=m.build_id, deadline=deadline, budget=budget)
                    _write_info(d, {**info, "buildID": m.build_id, "path": m.path})
                    if result == "exists":
                        # Another crash stored it first: it counts as this core's only if it is these very bytes.
                        other = read_info(root, m.build_id)
                        if other is None or other.sha256 != info["sha256"]:
                            raise _Skip(DIFFERS)
            finally:
                os.close(src)
            budget -= info["size"]
            rec.update(
                state="stored" if result == "stored" else "stored-earlier", size=info["size"], sha256=info["sha256"]
            )
        except _Skip as e:
            rec.update(state="skipped", reason=str(e))
        except OSError as e:
            reason = "not found" if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR) else e.strerror
            rec.update(state="skipped", reason=f"unreadable: {reason}")
        records.append(rec)
    return records


DIFFERS = "differs from the stored object with this build-id"
INFO_MAX_BYTES = 64 << 10
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ObjectInfo:
    """A stored object's ``object.json``, validated: never trusted beyond what is checked here."""

    build_id: str
    size: int  # of the object itself (decompressed)
    sha256: str  # of the object itself
    stored_size: int  # of executable.gz, as the writer counted it


def _valid_int(value: object, *, limit: int) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit else None


def read_info(root: Path, build_id: str) -> ObjectInfo | None:
    """The stored object's info, or None if absent, reached through a link, malformed, or naming another
    build-id than the directory it is in (a planted or mixed-up file). Blocking."""
    validate_build_id(build_id)
    raw = safefs.read_bytes(root, STORE_DIR, build_id[:2], build_id[2:], INFO_NAME, limit=INFO_MAX_BYTES + 1)
    if raw is None or len(raw) > INFO_MAX_BYTES:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("buildID") != build_id:
        return None
    size = _valid_int(doc.get("size"), limit=MAX_OBJECT)
    stored = _valid_int(doc.get("storedSize"), limit=2 * MAX_OBJECT)
    sha = doc.get("sha256")
    if size is None or stored is None or not isinstance(sha, str) or not _SHA256_RE.match(sha):
        return None
    return ObjectInfo(build_id=build_id, size=size, sha256=sha, stored_size=stored)


def open_object(root: Path, build_id: str) -> safefs.ReadFile | None:
    """The stored ``executable.gz`` opened for reading (a regular file, no link at any level), or None. Blocking."""
    validate_build_id(build_id)
    d = safefs.open_dir(root, STORE_DIR, build_id[:2], build_id[2:])
    if d is None:
        return None
    with d:
        return d.open_read(OBJECT_NAME)


def _same_as_stored(
    proc_pid: Path, m: Mapped, stored: ObjectInfo, *, deadline: float, clock: Callable[[], float]
) -> str:
    """The sha256 of the file the process mapped, when it is byte for byte the stored object; else _Skip."""
    src = _open_object(proc_pid, m)
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode):
            raise _Skip("not a regular file")
        if st.st_size != stored.size:
            raise _Skip(DIFFERS)
        sha = hashlib.sha256()
        pos = 0
        while chunk := os.pread(src, CHUNK, pos):
            if clock() > deadline:
                raise _Skip("time budget")
            sha.update(chunk)
            pos += len(chunk)
    finally:
        os.close(src)
    if pos != stored.size or sha.hexdigest() != stored.sha256:
        raise _Skip(DIFFERS)
    return stored.sha256


def referenced_build_ids(metadata: dict[str, Any]) -> set[str]:
    """Build-ids a core's metadata says it stored or found stored (for serving and retention)."""
    out = set()
    for o in metadata.get("objects") or []:
        if isinstance(o, dict) and o.get("state") in ("stored", "stored-earlier") and isinstance(o.get("buildID"), str):
            if BUILD_ID_RE.match(o["buildID"]):
                out.add(o["buildID"])
    return out


def claim(root: Path, build_id: str) -> bool:
    """
    Use an object stored earlier: True if it is stored, after refreshing its mark (the mtime of its
    ``object.json``) so the collector keeps it while the core that uses it is being filed. False if it is not
    stored, or went between looking and marking (the collector renamed it away): then store it again.
    """
    validate_build_id(build_id)
    d = safefs.open_dir(root, STORE_DIR, build_id[:2], build_id[2:])
    if d is None:
        return False
    with d:
        if d.stat(OBJECT_NAME) is None or d.stat(INFO_NAME) is None:
            return False
        try:
            os.utime(INFO_NAME, dir_fd=d.fd, follow_symlinks=False)
        except OSError:
            return False
    return True


def stored_build_ids(root: Path) -> list[tuple[str, float]]:
    """(build-id, mtime of its info: when stored or last claimed) of every stored object (a walk; blocking)."""
    out = []
    base = safefs.open_dir(root, STORE_DIR)
    if base is None:
        return []
    with base:
        for head in base.entries("dir"):
            if not re.fullmatch(r"[0-9a-f]{2}", head):
                continue
            head_dir = base.sub(head)
            if head_dir is None:
                continue
            with head_dir:
                for rest in head_dir.entries("dir"):
                    if not BUILD_ID_RE.match(head + rest):
                        continue
                    st = _mark(head_dir, rest)
                    if st is not None:
                        out.append((head + rest, st))
    return out


def _mark(head_dir: safefs.Dir, name: str) -> float | None:
    """The mark of the object directory ``name``: its info's mtime, else the directory's own."""
    d = head_dir.sub(name)
    if d is None:
        return None
    with d:
        st = d.lstat(INFO_NAME)
    if st is None:
        st = head_dir.lstat(name)
    return None if st is None else st.st_mtime


def _remove_dir(head_dir: safefs.Dir, name: str) -> bool:
    d = head_dir.sub(name)
    if d is None:
        return False
    with d:
        for entry, _st in d.all_entries():
            d.unlink(entry)
    return head_dir.rmdir(name)


def collect_garbage(root: Path, *, referenced: set[str], now: float, grace: float = 3600.0) -> list[str]:
    """
    Remove objects no stored core references whose mark is older than ``grace``; returns the build-ids removed.

    The mark (the info's mtime) is set when an object is stored and refreshed by :func:`claim` when a new core
    uses it; ``grace`` must exceed the time from storing or claiming to the core's metadata naming the object.
    Race-free against a concurrent claim: the directory is first renamed to a hidden name (a claim after that
    finds nothing and stores the object anew), then its mark is read again, and an object claimed before the
    rename is put back. A hidden leftover of a collector that died is removed after ``grace``. Never follows a
    link (every level is opened through :mod:`handler.safefs`).
    """
    removed = []
    base = safefs.open_dir(root, STORE_DIR)
    if base is None:
        return []
    with base:
        for head in base.entries("dir"):
            if not re.fullmatch(r"[0-9a-f]{2}", head):
                continue
            head_dir = base.sub(head)
            if head_dir is None:
                continue
            with head_dir:
                for rest in head_dir.entries("dir"):
                    build_id = head + rest
                    if rest.startswith("."):
                        mark = _mark(head_dir, rest)
                        if ".gc." in rest and mark is not None and now - mark >= grace:
                            _remove_dir(head_dir, rest)  # left by a collector that died mid-way
                        continue
                    if not BUILD_ID_RE.match(build_id) or build_id in referenced:
                        continue
                    mark = _mark(head_dir, rest)
                    if mark is None or now - mark < grace:
                        continue
                    condemned = f".{rest}.gc.{secrets.token_hex(4)}"
                    try:
                        head_dir.rename(rest, condemned)
                    except OSError:
                        continue
                    if _mark(head_dir, condemned) != mark:
                        try:  # claimed before the rename: put it back (unless it was stored anew meanwhile)
                            head_dir.rename(condemned, rest)
                            continue
                        except OSError:
                            pass
                    if _remove_dir(head_dir, condemned):
                        removed.append(build_id)
    return removed
