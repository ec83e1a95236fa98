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

A stored object (:class:`~apiserver.dump.plan.ObjectSegment`) is sent as stored too, but its tar header promised
the size recorded in its ``object.json``: so whatever part of it a range needs is read from the start of the file
and inflated as it goes by (in bounded steps: a planted gzip bomb cannot cost memory), and the stream is cut with
:class:`ObjectMismatch` as soon as it would inflate to more bytes than promised, and — before the last chunk of a
range that ends with the object is sent — unless it inflated to exactly that many bytes with the promised sha256.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import typing
from collections.abc import AsyncGenerator, AsyncIterator

from isal import isal_zlib

from handler import faults, layout
from handler import objects as store

from apiserver.dump.plan import DumpPlan, FileSegment, MemorySegment, ObjectSegment


DEFAULT_CHUNK = 1 << 20


class CoreVanished(Exception):
    """A stored core changed or disappeared after the plan was made (retention, a purge)."""


class ObjectMismatch(CoreVanished):
    """A stored object is gone, changed, or does not inflate to the size and sha256 the archive promised."""


_INFLATE_STEP = 1 << 20
# ISA-L's error class (its stubs type it as an instance, hence the cast).
_BAD_GZIP = typing.cast("type[Exception]", isal_zlib.error)


class _Inflater:
    """Counts and hashes what a stored gzip inflates to, never more than one step of output at a time."""

    def __init__(self, seg: ObjectSegment) -> None:
        self.seg = seg
        self.out = 0
        self.sha = hashlib.sha256()
        self.z = isal_zlib.decompressobj(31)  # ISA-L: 1.8x zlib's inflate here, and the handler's own codec

    def _fail(self, what: str) -> ObjectMismatch:
        return ObjectMismatch(f"stored object {self.seg.build_id} {what}")

    def _count(self, chunk: bytes) -> None:
        self.out += len(chunk)
        if self.out > self.seg.object_size:
            raise self._fail("inflates to more bytes than its object.json says")
        self.sha.update(chunk)

    def feed(self, data: bytes) -> None:
        buf = data
        while buf:
            if self.z.eof:
                self.z = isal_zlib.decompressobj(31)  # another member: a concatenation is still one gzip file
            try:
                self._count(self.z.decompress(buf, _INFLATE_STEP))
            except _BAD_GZIP as exc:
                raise self._fail(f"is not valid gzip ({exc})") from None
            buf = self.z.unused_data if self.z.eof else self.z.unconsumed_tail

    def finish(self) -> None:
        try:
            while not self.z.eof and (chunk := self.z.decompress(b"", _INFLATE_STEP)):
                self._count(chunk)
        except _BAD_GZIP as exc:
            raise self._fail(f"is not valid gzip ({exc})") from None
        if not self.z.eof:
            raise self._fail("ends inside its gzip data")
        if self.out != self.seg.object_size or self.sha.hexdigest() != self.seg.sha256:
            raise self._fail("is not the object its core's capture verified (size or sha256 differs)")


def _open_object(seg: ObjectSegment) -> int:
    faults.point("dump:before-open")
    opened = store.open_object(seg.root, seg.build_id)
    if opened is None:
        raise ObjectMismatch(f"stored object {seg.build_id} was removed during the download")
    st = opened.st
    if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != (seg.device, seg.inode, seg.size, seg.mtime_ns):
        opened.close()
        raise ObjectMismatch(f"stored object {seg.build_id} changed during the download")
    fd, opened.fd = opened.fd, -1
    return fd


def _object_step(fd: int, inflater: _Inflater, *, pos: int, length: int, seg: ObjectSegment) -> bytes:
    data = _pread_exact(fd, length, pos, f"stored object {seg.build_id}")
    inflater.feed(data)
    return data


async def _object_chunks(seg: ObjectSegment, *, start: int, end: int, chunk_size: int) -> AsyncIterator[bytes]:
    """Bytes [start, end) of the stored file, every byte before ``end`` inflated on the way (see the module doc)."""
    loop = asyncio.get_running_loop()
    fd = await loop.run_in_executor(None, _open_object, seg)
    inflater = _Inflater(seg)
    held: bytes | None = None
    step: asyncio.Future[bytes] | None = None
    try:
        pos = 0
        while pos < end:
            length = min(chunk_size, end - pos)
            step = loop.run_in_executor(
                None, functools.partial(_object_step, fd, inflater, pos=pos, length=length, seg=seg)
            )
            data = await step
            lo, hi = max(start, pos) - pos, min(end, pos + len(data)) - pos
            pos += len(data)
            if hi > lo:
                if held is not None:
                    yield held
                held = data[lo:hi]
        if end == seg.size:
            # The whole file went through: only now may the last chunk go out.
            await loop.run_in_executor(None, inflater.finish)
        if held is not None:
            yield held
    finally:
        if step is not None and not step.done():
            step.add_done_callback(lambda fut: _close_after(fut, fd))  # cancelled mid-read: close when it ends
        else:
            _close_after(step, fd)


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


async def iter_range(
    plan: DumpPlan, *, start: int = 0, end: int | None = None, chunk_size: int = DEFAULT_CHUNK
) -> AsyncGenerator[bytes, None]:
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
        elif isinstance(seg, ObjectSegment):
            async for data in _object_chunks(seg, start=lo, end=hi, chunk_size=chunk_size):
                yield data
        else:
            async for data in _file_chunks(seg, start=lo, end=hi, chunk_size=chunk_size):
                yield data
        index += 1
