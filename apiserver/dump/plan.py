"""
The layout of a dump archive, byte for byte, decided before the first byte is sent.

A gzip file may be a concatenation of gzip members (RFC 1952 §2.2), and a tar stream is headers,
bodies and padding. So the archive is, for each core::

    gzip( [padding of the previous body] tar header of .json | json | padding | tar header of .core )
    <the stored .core.gz, as it is on disk: its members decompress to exactly the core's bytes>

and finally ``gzip( padding | end-of-archive )``. With ``objects`` (``?objects=true``) the archive starts with
``manifest.json`` and each core also gets ``<container>_<core-id>.gdb`` and, after its core, the objects
:mod:`.objects` places for it: each stored ``executable.gz`` sent as it is on disk too (one gzip member that
decompresses to the object), its tar header sized by the object's ``object.json`` — a size the stream checks
(:mod:`.stream` inflates what it sends and cuts the download if the bytes are not that many, or not the sha256
the core's record names). The small members are compressed here, in memory;
the stored core bodies are never recompressed (README "Getting the cores"). Because every segment's length is known,
the response has a ``Content-Length``, any byte range maps to segments, and the ``ETag`` (a hash of
the in-memory members and of the identity of each stored file) changes whenever the bytes would.

Blocking (it stats files, through :mod:`handler.safefs`): call :func:`build_plan` through ``asyncio.to_thread``.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from handler import layout
from handler.layout import StoredCore

from apiserver.dump.objects import MANIFEST, ObjectLimits, ObjectPlanner
from apiserver.dump.select import core_time


BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
# Bump when the archive's bytes for the same cores change (member layout, header fields, level):
# it is part of the ETag, so a resume never splices two formats.
FORMAT_VERSION = b"coredump-dump-v1"
OBJECTS_FORMAT_VERSION = b"coredump-dump-v1+objects"
_GZIP_LEVEL = 9  # the small members only; deterministic for a given zlib, and hashed into the ETag anyway


class PlanError(Exception):
    """A stored core cannot be put in an archive (metadata and file disagree, file gone)."""


@dataclasses.dataclass(frozen=True)
class MemorySegment:
    """A gzip member built in memory (tar headers, metadata JSON, padding)."""

    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


@dataclasses.dataclass(frozen=True)
class FileSegment:
    """A stored ``.core.gz``, sent as it is; ``device``/``inode``/``mtime_ns`` pin the exact file.

    ``core`` is how the stream reaches it again (beneath the storage root, never through a link); ``path`` is
    for messages and the ETag only, never opened."""

    path: Path
    size: int
    device: int
    inode: int
    mtime_ns: int
    core: StoredCore


@dataclasses.dataclass(frozen=True)
class ObjectSegment:
    """A stored ``executable.gz`` sent as it is: ``size`` bytes on disk that must inflate to ``object_size`` bytes
    with ``sha256``; ``device``/``inode``/``mtime_ns`` pin the file planned."""

    root: Path
    build_id: str
    size: int
    device: int
    inode: int
    mtime_ns: int
    object_size: int
    sha256: str


Segment = MemorySegment | FileSegment | ObjectSegment


@dataclasses.dataclass(frozen=True)
class DumpPlan:
    """The archive: its segments in order, where each starts, the total size and a strong ETag."""

    segments: tuple[Segment, ...]
    starts: tuple[int, ...]
    size: int
    etag: str
    cores: tuple[StoredCore, ...]
    uncompressed_size: int  # the size of the tar stream, for logs and the benchmark

    def locate(self, offset: int) -> int:
        """The index of the segment holding byte ``offset`` (0 <= offset < size)."""
        return bisect.bisect_right(self.starts, offset) - 1


def _gzip_member(data: bytes) -> bytes:
    # wbits=31: a gzip wrapper with mtime 0 and no name, so the same input gives the same member.
    return zlib.compress(data, level=_GZIP_LEVEL, wbits=31)


def _tar_header(*, name: str, size: int, mtime: int, mode: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = mode
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    # PAX: extended headers only where ustar cannot say it (names > 100 bytes, cores >= 8 GiB).
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")


def metadata_bytes(metadata: dict[str, Any]) -> bytes:
    """The metadata JSON as it goes into the archive: stable key order, so the archive is stable."""
    return (json.dumps(metadata, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


class _Builder:
    """Tar bytes accumulated into in-memory gzip members, cut wherever a stored gzip file is spliced in."""

    def __init__(self, version: bytes) -> None:
        self.segments: list[Segment] = []
        self.digest = hashlib.sha256(version)
        self.pending = b""  # tar bytes not yet in a member
        self.tar_size = 0

    def add(self, data: bytes) -> None:
        self.pending += data
        self.tar_size += len(data)

    def _flush(self) -> None:
        member = MemorySegment(_gzip_member(self.pending))
        self.pending = b""
        self.segments.append(member)
        self.digest.update(b"M%d:" % member.size + hashlib.sha256(member.data).digest())

    def add_file(self, seg: FileSegment | ObjectSegment, *, tar_size: int) -> None:
        self._flush()
        self.segments.append(seg)
        self.tar_size += tar_size
        if isinstance(seg, FileSegment):
            self.digest.update(
                b"F%d:%d:%d:%d:" % (seg.size, seg.device, seg.inode, seg.mtime_ns) + os.fsencode(seg.path) + b"\0"
            )
        else:
            self.digest.update(
                b"O%d:%d:%d:%d:%d:" % (seg.size, seg.device, seg.inode, seg.mtime_ns, seg.object_size)
                + seg.build_id.encode()
                + b":"
                + seg.sha256.encode()
                + b"\0"
            )
        self.pending = _padding(tar_size)
        self.tar_size += len(self.pending)

    def finish(self, cores: Sequence[StoredCore]) -> DumpPlan:
        # End of archive: two zero blocks, then zeros to a whole record, as GNU tar and tarfile write it.
        tail = b"\0" * (2 * BLOCK)
        tail += b"\0" * (-(self.tar_size + len(tail)) % RECORD)
        self.add(tail)
        self._flush()
        starts: list[int] = []
        offset = 0
        for seg in self.segments:
            starts.append(offset)
            offset += seg.size
        return DumpPlan(
            segments=tuple(self.segments),
            starts=tuple(starts),
            size=offset,
            etag='"' + self.digest.hexdigest()[:40] + '"',
            cores=tuple(cores),
            uncompressed_size=self.tar_size,
        )


def _core_file(core: StoredCore) -> tuple[int, FileSegment]:
    meta = core.metadata
    size = meta.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise PlanError(f"core {core.ref.core_id}: metadata has no valid size")
    # Through safefs: a link (or anything not a regular file) planted as the data file is "gone".
    st = layout.stat_core(core)
    if st is None:
        raise PlanError(f"core {core.ref.core_id}: stored file is gone")
    return size, FileSegment(
        path=core.core_path, size=st.st_size, device=st.st_dev, inode=st.st_ino, mtime_ns=st.st_mtime_ns, core=core
    )


def build_plan(cores: Sequence[StoredCore], *, objects: ObjectLimits | None = None) -> DumpPlan:
    """Lay out the archive of ``cores`` (in the given order), with their objects when ``objects`` gives the
    limits. Raises :class:`PlanError`."""
    if objects is not None:
        return _build_with_objects(cores, limits=objects)
    out = _Builder(FORMAT_VERSION)
    for core in cores:
        size, stored = _core_file(core)
        mtime = int(core_time(core) or 0)
        base = f"{core.ref.container}/{core.ref.core_id}"
        body = metadata_bytes(core.metadata)
        out.add(
            _tar_header(name=f"{base}.json", size=len(body), mtime=mtime, mode=0o644)
            + body
            + _padding(len(body))
            + _tar_header(name=f"{base}.core", size=size, mtime=mtime, mode=0o600)
        )
        out.add_file(stored, tar_size=size)
    return out.finish(cores)


def _symlink_header(*, name: str, target: str, mtime: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    info.mtime = mtime
    info.mode = 0o777
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")


def _build_with_objects(cores: Sequence[StoredCore], *, limits: ObjectLimits) -> DumpPlan:
    planner = ObjectPlanner(root=cores[0].root if cores else Path("/nonexistent"), limits=limits)
    placed = [(core, planner.place(core)) for core in cores]
    manifest = {
        "format": OBJECTS_FORMAT_VERSION.decode(),
        "limits": {
            "maxObjects": limits.max_objects,
            "maxObjectBytes": limits.max_bytes,
            "maxObjectsPerCore": limits.max_records_per_core,
        },
        "objects": sum(1 for _c, p in placed for e in p.entries if e.target is None),
        "objectBytes": planner.bytes,
        "cores": [p.manifest for _c, p in placed],
    }
    out = _Builder(OBJECTS_FORMAT_VERSION)
    mtime_all = max((int(core_time(c) or 0) for c in cores), default=0)
    body = metadata_bytes(manifest)
    out.add(_tar_header(name=MANIFEST, size=len(body), mtime=mtime_all, mode=0o644) + body + _padding(len(body)))
    for core, place in placed:
        size, stored = _core_file(core)
        mtime = int(core_time(core) or 0)
        base = f"{core.ref.container}/{core.ref.core_id}"
        body = metadata_bytes(core.metadata)
        out.add(
            _tar_header(name=f"{base}.json", size=len(body), mtime=mtime, mode=0o644)
            + body
            + _padding(len(body))
            + _tar_header(name=place.gdb_name, size=len(place.gdb_script), mtime=mtime, mode=0o644)
            + place.gdb_script
            + _padding(len(place.gdb_script))
            + _tar_header(name=f"{base}.core", size=size, mtime=mtime, mode=0o600)
        )
        out.add_file(stored, tar_size=size)
        for entry in place.entries:
            if entry.target is not None:
                out.add(_symlink_header(name=entry.name, target=entry.target, mtime=mtime))
                continue
            obj = planner.stored[entry.build_id]
            out.add(_tar_header(name=entry.name, size=obj.info.size, mtime=mtime, mode=0o755))
            out.add_file(
                ObjectSegment(
                    root=planner.root,
                    build_id=entry.build_id,
                    size=obj.stored_size,
                    device=obj.device,
                    inode=obj.inode,
                    mtime_ns=obj.mtime_ns,
                    object_size=obj.info.size,
                    sha256=obj.info.sha256,
                ),
                tar_size=obj.info.size,
            )
    return out.finish(cores)
