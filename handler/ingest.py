"""
Streaming ingest: read a core in bounded chunks, hash it, compress it once (ISA-L gzip level 1), hand the bytes on.

Memory is constant for any core size: a reader thread fills at most ``QUEUE_DEPTH`` chunks ahead, the sha256
runs on its own thread (hashlib and isal both release the GIL, so two cores work at once), and the compressed
output goes straight to the sink. Past ``max_size`` the stream is still read to its end, only counted, so the
kernel finishes the dump and the size the kernel sent is known.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from isal import isal_zlib

logger = logging.getLogger(__name__)

QUEUE_DEPTH = 4
COMPRESS_LEVEL = 1
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
PIPE_SIZE = 1 << 20


@dataclass
class IngestResult:
    size: int               # bytes stored (uncompressed)
    observed_size: int      # bytes read from the source
    sha256: str             # of the stored (uncompressed) bytes
    truncated: bool
    truncation_reason: str | None


class Progress:
    """Bytes moved so far and when they last moved; a watchdog reads it to tell a stall from a large core."""

    def __init__(self) -> None:
        self.bytes = 0
        self.last = time.monotonic()

    def advance(self, n: int) -> None:
        self.bytes += n
        self.last = time.monotonic()


def widen_pipe(fd: int) -> None:
    """Ask for a 1 MiB pipe buffer: the kernel then writes the core in far fewer, larger steps."""
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError as e:
        logger.debug("cannot widen pipe: %s", e)


class ChunkReader:
    """Reads ``fd`` on a thread into a bounded queue, so reading starts at once and overlaps compression."""

    _EOF = object()

    def __init__(self, fd: int, *, chunk_size: int, progress: Progress | None = None) -> None:
        self.fd = fd
        self.chunk_size = chunk_size
        self.progress = progress
        self.queue: queue.Queue[object] = queue.Queue(maxsize=QUEUE_DEPTH)
        self.error: BaseException | None = None
        self.first_read_at: float | None = None
        self._thread = threading.Thread(target=self._run, name="core-reader", daemon=True)

    def start(self) -> "ChunkReader":
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while True:
                buf = bytearray(self.chunk_size)
                view = memoryview(buf)
                filled = 0
                # Fill whole chunks: a pipe returns at most its buffer per read.
                while filled < self.chunk_size:
                    n = os.readv(self.fd, [view[filled:]])
                    if self.first_read_at is None:
                        self.first_read_at = time.monotonic()
                    if n == 0:
                        break
                    filled += n
                    if self.progress is not None:
                        self.progress.advance(n)
                view.release()
                if filled:
                    del buf[filled:]
                    self.queue.put(bytes(buf) if filled < self.chunk_size // 4 else buf)
                if filled < self.chunk_size:
                    break
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self.error = e
        finally:
            self.queue.put(self._EOF)

    def __iter__(self):
        while True:
            item = self.queue.get()
            if item is self._EOF:
                if self.error is not None:
                    raise self.error
                return
            yield item


class _Hasher:
    """sha256 on its own thread; ``QUEUE_DEPTH`` chunks in flight at most."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.q: queue.Queue[bytes | bytearray | None] = queue.Queue(maxsize=QUEUE_DEPTH)
        self.t = threading.Thread(target=self._run, name="core-hasher", daemon=True)
        self.t.start()

    def _run(self) -> None:
        while (chunk := self.q.get()) is not None:
            self.h.update(chunk)

    def update(self, chunk: bytes | bytearray) -> None:
        self.q.put(chunk)

    def hexdigest(self) -> str:
        self.q.put(None)
        self.t.join()
        return self.h.hexdigest()


def ingest(chunks, sink: Callable[[bytes], None], *, max_size: int = 0,
           level: int = COMPRESS_LEVEL) -> IngestResult:
    """
    Compress ``chunks`` (an iterable of bytes) into ``sink`` as one gzip member, up to ``max_size`` bytes
    (0 = all), counting the rest; returns sizes and the sha256 of what was stored.
    """
    comp = isal_zlib.compressobj(level, isal_zlib.DEFLATED, 31)
    hasher = _Hasher()
    size = observed = 0
    try:
        for chunk in chunks:
            n = len(chunk)
            observed += n
            if max_size and size + n > max_size:
                chunk = memoryview(chunk)[: max(0, max_size - size)]
                n = len(chunk)
                if not n:
                    continue
                chunk = bytes(chunk)
            size += n
            hasher.update(chunk)
            out = comp.compress(chunk)
            if out:
                sink(out)
        sink(comp.flush())
    finally:
        digest = hasher.hexdigest()
    truncated = observed > size
    reason = f"core larger than the maximum size of {max_size} bytes" if truncated else None
    return IngestResult(size=size, observed_size=observed, sha256=digest, truncated=truncated,
                        truncation_reason=reason)


def file_chunks(path: os.PathLike[str] | str, *, chunk_size: int = 1 << 20):
    """Chunks of a file (for import and for draining raw spooled cores)."""
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(chunk_size):
            yield chunk


def copy_stored(src: os.PathLike[str] | str, sink: Callable[[bytes], None], *, chunk_size: int = 1 << 20) -> None:
    """Copy an already compressed core unchanged (draining the handler's spool never recompresses)."""
    for chunk in file_chunks(src, chunk_size=chunk_size):
        sink(chunk)
