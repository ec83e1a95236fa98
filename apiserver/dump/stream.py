"""
The bytes of a byte range of a :class:`~apiserver.dump.plan.DumpPlan`, as an async generator.

Stored cores are read in a worker thread in large chunks (``os.pread``: no shared file offset,
one copy from the page cache) with one chunk read ahead, so the disk and the TLS writer overlap
and memory stays at about two chunks per download. Each stored file is checked against the
identity the plan recorded (device, inode, size) on the descriptor actually opened: it is opened
through :func:`handler.layout.open_core` (every level beneath the storage root without following a
link, the file itself ``O_NOFOLLOW`` and a regular file), so a core removed, replaced, or swapped for
a link (into another namespace, at a key) since the plan was made ends the stream with
:class:`CoreVanished` instead of sending other bytes under the same ETag. Closing the generator
(client gone) stops reading at once.
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator

from handler import faults, layout

from apiserver.dump.plan import DumpPlan, FileSegment, MemorySegment

logger = logging.getLogger(__name__)

DEFAULT_CHUNK = 1 << 20


class CoreVanished(Exception):
    """A stored core changed or disappeared after the plan was made (retention, a purge)."""


def _open_checked(seg: FileSegment) -> int:
    faults.point("dump:before-open")
    opened = layout.open_core(seg.core)
    if opened is None:
        raise CoreVanished(f"{seg.path.name} was removed (or is no longer a regular file) during the download")
    fd, st = opened.fd, opened.st
    if (st.st_dev, st.st_ino, st.st_size) != (seg.device, seg.inode, seg.size):
        opened.close()
        raise CoreVanished(f"{seg.path.name} changed during the download")
    try:
        # The whole body is read once, front to back: let the kernel read ahead generously.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except OSError:
        pass
    return fd


def _pread_exact(fd: int, length: int, offset: int, name: str) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            raise CoreVanished(f"{name} is shorter than when the download started")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


async def _file_chunks(seg: FileSegment, *, start: int, end: int, chunk_size: int) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    fd = await loop.run_in_executor(None, _open_checked, seg)

    def read_at(pos: int) -> "asyncio.Future[bytes]":
        # A bare executor future: no coroutine and no Task per chunk on the download's hot path.
        return loop.run_in_executor(None, _pread_exact, fd, min(chunk_size, end - pos), pos, seg.path.name)

    ahead: asyncio.Future[bytes] | None = read_at(start) if start < end else None
    try:
        while ahead is not None:
            data = await ahead
            start += len(data)
            ahead = read_at(start) if start < end else None
            yield data
    finally:
        if ahead is not None and not ahead.done():
            # A worker thread cannot be interrupted: close the descriptor when its (bounded) read
            # ends, so the number is never reused under it, without making the caller wait.
            ahead.add_done_callback(lambda fut: _close_after(fut, fd))
        else:
            _close_after(ahead, fd)


def _close_after(fut: "asyncio.Future[bytes] | None", fd: int) -> None:
    if fut is not None and not fut.cancelled():
        fut.exception()  # retrieved, so an abandoned read does not log "exception never retrieved"
    # Closing a descriptor opened read-only does not wait on the disk.
    os.close(fd)


async def iter_range(plan: DumpPlan, *, start: int = 0, end: int | None = None,
                     chunk_size: int = DEFAULT_CHUNK) -> AsyncIterator[bytes]:
    """Yield the archive's bytes ``[start, end)`` in order (``end`` defaults to the archive size)."""
    stop = plan.size if end is None else end
    if not 0 <= start <= stop <= plan.size:
        raise ValueError(f"range {start}-{stop} outside an archive of {plan.size} bytes")
    if start == stop:
        return
    index = plan.locate(start)
    while index < len(plan.segments):
        seg_start = plan.starts[index]
        if seg_start >= stop:
            break
        seg = plan.segments[index]
        lo = max(start, seg_start) - seg_start
        hi = min(stop, seg_start + seg.size) - seg_start
        if isinstance(seg, MemorySegment):
            if hi > lo:
                yield seg.data[lo:hi]
        else:
            async for data in _file_chunks(seg, start=lo, end=hi, chunk_size=chunk_size):
                yield data
        index += 1
