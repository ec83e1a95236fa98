"""
Streaming ingest: read a core in bounded chunks, hash it, compress it once (ISA-L gzip), hand the bytes on.

Memory is flat for any core size: the chunks live in a fixed pool of reusable buffers (:class:`BufferPool`,
filled with ``readinto``/``readv``), and there are few hand-offs between threads. ``COMPRESS_THREADS`` workers
each take the next chunk from the source (hashing it in order while they hold the source: BLAKE3 by default,
:mod:`handler.digest`), compress it on their own (the one-shot ``isal_zlib.compress`` releases the GIL, so both
CPUs work), and hand it to whoever is writing: no worker waits for its turn to write. The worker that holds the
next chunk in order writes it and any that are ready after it, while the other goes on compressing (up to
``READY_MAX`` queued chunks, so memory stays flat behind a hung write).
Each chunk is its own gzip member: 18 bytes per MiB, readable by every gzip reader.
``bench/ingest_bench.py`` measures this against the previous pipeline and ``isal.igzip_threaded``.

Past ``max_size`` the stream is still read to its end, only counted, so the kernel finishes the dump and the
size the kernel sent is known. A stream that ends before the size its ELF headers announce, or that a
:class:`~handler.early.ChunkReader` ended (stall, stop), is marked truncated with the reason.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from isal import isal_zlib

from handler import digest
from handler.early import DEFAULT_CHUNK, KILLED, POOL_BUFFERS, BufferPool
from handler.elfinfo import CoreShape

# ISA-L level 2 is as fast as level 1 on the benchmark's real core and stores 2.5% less; level 3 stores 3% less
# again at several times the cost (README, Core ingest). The agent's --compress-level picks.
COMPRESS_LEVEL = 2
COMPRESS_THREADS = 2
# Compressed chunks that may queue behind the head of the line (a slow write, or a chunk another worker is still
# compressing), each at most a chunk: the bound on memory beyond the pool.
READY_MAX = 4


@dataclass
class IngestResult:
    size: int  # bytes stored (uncompressed)
    observed_size: int  # bytes read from the source
    digest: str  # "<algorithm>:<hex>" of the stored (uncompressed) bytes (handler.digest)
    truncated: bool
    truncation_reason: str | None
    # Whether the ELF header, program headers and notes all arrived (None: the stream is not an ELF core).
    notes_complete: bool | None = None


class _Run:
    """One ingest: workers share the source under a lock, compress apart; the bytes are written in sequence order
    by one worker at a time, the one that finds the next chunk ready (the others wait only when ``READY_MAX``
    chunks are queued)."""

    def __init__(
        self,
        chunks: Iterable[Any],
        sink: Callable[[bytes], None],
        *,
        max_size: int,
        level: int,
        algorithm: str,
        tap: Callable[[Any], None] | None = None,
    ) -> None:
        self.it = iter(chunks)
        self.tap = tap
        self.release: Callable[[Any], None] | None = getattr(chunks, "release", None)
        self.sink = sink
        self.max_size = max_size
        self.level = level
        self.hash = digest.new(algorithm)
        self.shape = CoreShape()
        self.size = self.observed = 0
        self.take_lock = threading.Lock()
        self.out = threading.Condition()
        self.ready: dict[int, bytes] = {}  # compressed chunks waiting for an earlier one to be written
        self.writing = False
        self.next_seq = self.written_seq = 0
        self.exhausted = False
        self.error: BaseException | None = None

    def _give_back(self, chunk: Any) -> None:
        if self.release is not None:
            self.release(chunk)

    def _take(self) -> tuple[int, Any, Any] | None:
        with self.take_lock:
            if self.exhausted or self.error is not None:
                return None
            for chunk in self.it:
                n = len(chunk)
                self.observed += n
                if not self.shape.done:
                    self.shape.feed(chunk)
                piece = chunk
                if self.max_size and self.size + n > self.max_size:
                    keep = max(0, self.max_size - self.size)
                    if not keep:
                        self._give_back(chunk)
                        continue
                    piece = memoryview(chunk)[:keep]
                self.size += len(piece)
                self.hash.update(piece)
                if self.tap is not None:
                    self.tap(piece)  # in stream order, under the take lock (the sparse copy for backtraces)
                seq = self.next_seq
                self.next_seq += 1
                return seq, chunk, piece
            self.exhausted = True
            return None

    def _deliver(self, seq: int, out: bytes) -> None:
        """Queue chunk ``seq``. If nobody is writing and the next chunk in order is queued, become the writer and
        write every chunk that is next in order. Otherwise return at once, unless more than ``READY_MAX`` chunks are
        queued (behind a slow write, or behind a chunk another worker is still compressing): then wait, so memory
        stays bounded however long the head of the line takes."""
        with self.out:
            self.ready[seq] = out
            while True:
                if self.error is not None:
                    return
                if not self.writing and self.written_seq in self.ready:
                    self.writing = True
                    break
                if len(self.ready) <= READY_MAX:
                    return
                self.out.wait()
        try:
            while True:
                with self.out:
                    piece = self.ready.pop(self.written_seq, None)
                    self.out.notify_all()
                    if piece is None or self.error is not None:
                        self.writing = False
                        return
                self.sink(piece)  # outside the lock: the other worker queues meanwhile
                with self.out:
                    self.written_seq += 1
        except BaseException:
            with self.out:
                self.writing = False
                self.out.notify_all()
            raise

    def work(self) -> None:
        try:
            while (item := self._take()) is not None:
                seq, chunk, piece = item
                try:
                    out = isal_zlib.compress(piece, self.level, 31)
                finally:
                    if piece is not chunk:
                        piece.release()
                    self._give_back(chunk)
                self._deliver(seq, out)
        except BaseException as e:  # re-raised by ingest() in the caller's thread
            with self.out:
                if self.error is None:
                    self.error = e
                self.out.notify_all()


def ingest(
    chunks: Iterable[Any],
    sink: Callable[[bytes], None],
    *,
    max_size: int = 0,
    level: int = COMPRESS_LEVEL,
    algorithm: str = digest.DEFAULT,
    threads: int = COMPRESS_THREADS,
    tap: Callable[[Any], None] | None = None,
) -> IngestResult:
    """
    Compress ``chunks`` (bytes-like; a source with ``release(chunk)`` gets each chunk back once it is hashed
    and compressed) into ``sink``, up to ``max_size`` bytes (0 = all), counting the rest; returns sizes, the
    digest (``algorithm``) of what was stored and whether the stream was cut. ``tap`` sees every stored byte in order.
    """
    if hasattr(chunks, "manual_release"):
        chunks.manual_release = True  # the workers hold chunks past the next iteration
    run = _Run(chunks, sink, max_size=max_size, level=level, algorithm=algorithm, tap=tap)
    workers = [
        threading.Thread(target=run.work, name=f"core-compress-{i}", daemon=True)
        for i in range(max(1, min(threads, os.cpu_count() or 1)))
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if run.error is not None:
        raise run.error
    if run.ready:  # cannot happen: every worker delivers before it takes again, and all have ended
        raise RuntimeError(f"ingest ended with {len(run.ready)} compressed chunks never written")
    if run.size == 0:
        sink(isal_zlib.compress(b"", level, 31))  # an empty core is still a valid gzip file
    shape = run.shape
    ended_by = getattr(chunks, "end_reason", None)
    reason = None
    if ended_by:
        reason = ended_by
    elif shape.expected_size is not None and run.observed < shape.expected_size:
        # The stream stopped before the end its own headers announce: the dump was cut off.
        reason = KILLED
    elif run.observed > run.size:
        reason = f"core larger than the maximum size of {max_size} bytes"
    notes = None if shape.is_core is not True else shape.has_notes(run.observed)
    return IngestResult(
        size=run.size,
        observed_size=run.observed,
        digest=digest.format_digest(algorithm, run.hash.hexdigest()),
        truncated=reason is not None,
        truncation_reason=reason,
        notes_complete=notes,
    )


class FileChunks:
    """A file's chunks through a :class:`BufferPool` (``readinto``): import and drain read with flat memory."""

    def __init__(
        self, path: os.PathLike[str] | str, *, chunk_size: int = DEFAULT_CHUNK, opener: Callable[..., Any] | None = None
    ) -> None:
        self.path = path
        self.opener = opener
        self.pool = BufferPool(count=POOL_BUFFERS, size=chunk_size)
        self.manual_release = False
        self._views: dict[int, bytearray] = {}

    def release(self, chunk: memoryview) -> None:
        buf = self._views.pop(id(chunk), None)
        chunk.release()
        if buf is not None:
            self.pool.give(buf)

    def __iter__(self):
        with self.opener(self.path, "rb") if self.opener else open(self.path, "rb", buffering=0) as f:
            previous: memoryview | None = None
            while True:
                if previous is not None and not self.manual_release:
                    self.release(previous)
                previous = None
                buf = self.pool.take()
                n = f.readinto(buf)
                if not n:
                    self.pool.give(buf)
                    return
                chunk = memoryview(buf)[:n]
                self._views[id(chunk)] = buf
                previous = chunk
                yield chunk


def file_chunks(
    path: os.PathLike[str] | str, *, chunk_size: int = DEFAULT_CHUNK, opener: Callable[..., Any] | None = None
) -> FileChunks:
    """Chunks of a file (for import and for draining raw spooled cores); ``opener`` e.g. ``isal.igzip.open``."""
    return FileChunks(path, chunk_size=chunk_size, opener=opener)


def copy_stored(src: os.PathLike[str] | str, sink: Callable[[bytes], None], *, chunk_size: int = DEFAULT_CHUNK) -> None:
    """Copy an already compressed core unchanged (draining the handler's spool never recompresses)."""
    for chunk in file_chunks(src, chunk_size=chunk_size):
        sink(chunk)
