"""
Streaming ingest: read a core in bounded chunks, hash it, compress it once (ISA-L gzip level 1), hand the bytes on.

Memory is constant for any core size: a reader thread fills at most ``QUEUE_DEPTH`` chunks ahead, the sha256
runs on its own thread (hashlib and isal both release the GIL, so two cores work at once), and the compressed
output goes straight to the sink. Past ``max_size`` the stream is still read to its end, only counted, so the
kernel finishes the dump and the size the kernel sent is known.
"""
from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from isal import isal_zlib

from handler.early import QUEUE_DEPTH

logger = logging.getLogger(__name__)

COMPRESS_LEVEL = 1
COMPRESS_THREADS = 2


@dataclass
class IngestResult:
    size: int               # bytes stored (uncompressed)
    observed_size: int      # bytes read from the source
    sha256: str             # of the stored (uncompressed) bytes
    truncated: bool
    truncation_reason: str | None


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
    Compress ``chunks`` (an iterable of bytes) into ``sink``, up to ``max_size`` bytes (0 = all), counting
    the rest; returns sizes and the sha256 of what was stored.

    Each chunk becomes its own gzip member: the one-shot ``isal_zlib.compress`` releases the GIL (the
    streaming compressobj does not), so reading and hashing run while a chunk compresses. A member per MiB
    costs 18 bytes and a reset dictionary, nothing measurable; gzip readers read concatenated members.
    """
    hasher = _Hasher()
    size = observed = 0
    workers = max(1, min(COMPRESS_THREADS, os.cpu_count() or 1))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="core-compress")
    # Compressed chunks in flight, written in order; bounded so memory stays constant.
    pending: deque[Future[bytes]] = deque()
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
            pending.append(pool.submit(isal_zlib.compress, chunk, level, 31))
            while len(pending) > workers or (pending and pending[0].done()):
                sink(pending.popleft().result())
        while pending:
            sink(pending.popleft().result())
        if size == 0:
            sink(isal_zlib.compress(b"", level, 31))   # an empty core is still a valid gzip file
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)
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
