"""
The layout of a dump archive, byte for byte, decided before the first byte is sent.

A gzip file may be a concatenation of gzip members (RFC 1952 §2.2), and a tar stream is headers,
bodies and padding. So the archive is, for each core::

    gzip( [padding of the previous body] tar header of .json | json | padding | tar header of .core )
    <the stored .core.gz, as it is on disk: its members decompress to exactly the core's bytes>

and finally ``gzip( padding | end-of-archive )``. The small members are compressed here, in memory;
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
import logging
import os
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from handler import layout
from handler.layout import StoredCore

from apiserver.dump.select import core_time

logger = logging.getLogger(__name__)

BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
# Bump when the archive's bytes for the same cores change (member layout, header fields, level):
# it is part of the ETag, so a resume never splices two formats.
FORMAT_VERSION = b"coredump-dump-v1"
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


Segment = MemorySegment | FileSegment


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


def build_plan(cores: Sequence[StoredCore]) -> DumpPlan:
    """Lay out the archive of ``cores`` (in the given order). Raises :class:`PlanError`."""
    segments: list[Segment] = []
    digest = hashlib.sha256(FORMAT_VERSION)
    pending = b""  # tar bytes not yet put in a member: the padding after the previous core body
    tar_size = 0
    for core in cores:
        meta = core.metadata
        size = meta.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise PlanError(f"core {core.ref.core_id}: metadata has no valid size")
        # Through safefs: a link (or anything not a regular file) planted as the data file is "gone".
        st = layout.stat_core(core)
        if st is None:
            raise PlanError(f"core {core.ref.core_id}: stored file is gone")
        mtime = int(core_time(core) or 0)
        base = f"{core.ref.container}/{core.ref.core_id}"
        body = metadata_bytes(meta)
        head = (pending
                + _tar_header(name=f"{base}.json", size=len(body), mtime=mtime, mode=0o644)
                + body + _padding(len(body))
                + _tar_header(name=f"{base}.core", size=size, mtime=mtime, mode=0o600))
        tar_size += len(head) + size
        pending = _padding(size)
        member = MemorySegment(_gzip_member(head))
        stored = FileSegment(path=core.core_path, size=st.st_size, device=st.st_dev, inode=st.st_ino,
                             mtime_ns=st.st_mtime_ns, core=core)
        segments += [member, stored]
        digest.update(b"M%d:" % member.size + hashlib.sha256(member.data).digest())
        digest.update(b"F%d:%d:%d:%d:" % (stored.size, stored.device, stored.inode, stored.mtime_ns)
                      + os.fsencode(stored.path) + b"\0")
    # End of archive: two zero blocks, then zeros to a whole record, as GNU tar and tarfile write it.
    tail = pending + b"\0" * (2 * BLOCK)
    tail += b"\0" * (-(tar_size + len(tail)) % RECORD)
    tar_size += len(tail)
    end = MemorySegment(_gzip_member(tail))
    segments.append(end)
    digest.update(b"M%d:" % end.size + hashlib.sha256(end.data).digest())

    starts: list[int] = []
    offset = 0
    for seg in segments:
        starts.append(offset)
        offset += seg.size
    return DumpPlan(segments=tuple(segments), starts=tuple(starts), size=offset,
                    etag='"' + digest.hexdigest()[:40] + '"', cores=tuple(cores),
                    uncompressed_size=tar_size)
