"""
The first milliseconds of the kernel path: start reading the core before anything heavy is imported.

The kernel is blocked writing the core into the pipe until the handler reads it, and Python's imports take
tens of milliseconds. So ``coredump-handler capture`` first decides, with nothing but ``os``/``re``/``json``,
whether the crashing process is in a pod (only then may stdin be consumed; a non-pod core may have to be
handed back unread to the shim), and if so starts the reader thread here; the rest is imported after.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import select
import stat
import threading
import time

logger = logging.getLogger(__name__)

QUEUE_DEPTH = 4
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
# The pipe buffer asked for, largest first: above /proc/sys/fs/pipe-max-size (1 MiB by default) only a process
# with CAP_SYS_RESOURCE gets it (the kernel's usermode helper has it; a test or bench process may not).
PIPE_SIZES = (4 << 20, 1 << 20)
DEFAULT_CHUNK = 1 << 20
DEFAULT_STALL = 60.0  # same as HandlerConfig.stall_timeout


class Progress:
    """Bytes moved so far and when they last moved; a watchdog reads it to tell a stall from a large core."""

    def __init__(self) -> None:
        self.bytes = 0
        self.last = time.monotonic()

    def advance(self, n: int) -> None:
        self.bytes += n
        self.last = time.monotonic()


def widen_pipe(fd: int) -> int | None:
    """Ask for a 4 MiB (else 1 MiB) pipe buffer: the kernel then writes the core in far fewer, larger steps and
    waits less on the reader. Returns the size granted, or None if ``fd`` is not a pipe or none was granted."""
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return None
    except OSError:
        return None
    for size in PIPE_SIZES:
        try:
            return int(fcntl.fcntl(fd, _F_SETPIPE_SZ, size))
        except OSError as e:
            logger.debug("cannot widen the pipe to %d bytes: %s", size, e)
    return None


class BufferPool:
    """A fixed set of equal buffers, lent out and given back: the handler's memory does not grow with the core."""

    def __init__(self, *, count: int, size: int) -> None:
        self.size = size
        self.count = count
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(bytearray(size))

    def take(self) -> bytearray:
        return self._free.get()

    def give(self, buf: bytearray) -> None:
        self._free.put(buf)


# Buffers a reader owns: the queue ahead of the consumer, one being filled, and one per compressing worker.
POOL_BUFFERS = QUEUE_DEPTH + 4

STALLED, KILLED = "stalled", "killed"


class ChunkReader:
    """
    Reads ``fd`` on a thread into pooled buffers, so reading starts at once and overlaps compression.

    Iterating yields ``memoryview`` chunks; a consumer that keeps a chunk past the next iteration (the ingest
    workers do) must call :meth:`release` with it, a plain loop may ignore that (the previous chunk goes back
    to the pool when the next is asked for, unless :attr:`manual_release` is set).

    The stream ends at EOF, after ``stall_timeout`` seconds without a byte (``end_reason`` "stalled"), or
    when :meth:`stop` is called ("killed": the handler was told to stop); whatever arrived before is kept.
    """

    _EOF = object()

    def __init__(
        self,
        fd: int,
        *,
        chunk_size: int,
        progress: Progress | None = None,
        stall_timeout: float | None = None,
        pool: BufferPool | None = None,
    ) -> None:
        self.fd = fd
        self.chunk_size = chunk_size
        self.progress = progress
        self.stall_timeout = stall_timeout
        self.pool = pool or BufferPool(count=POOL_BUFFERS, size=chunk_size)
        self.queue: queue.Queue[object] = queue.Queue(maxsize=QUEUE_DEPTH)
        self.error: BaseException | None = None
        self.end_reason: str | None = None
        self.manual_release = False
        self.first_read_at: float | None = None  # wall clock, so a caller outside can compare
        self._stop_reason: str | None = None
        self._views: dict[int, bytearray] = {}
        self._thread = threading.Thread(target=self._run, name="core-reader", daemon=True)

    def start(self) -> "ChunkReader":
        self._thread.start()
        return self

    def stop(self, reason: str = KILLED) -> None:
        """End the stream at the next poll (within 0.2 s); bytes already read are still delivered."""
        self._stop_reason = reason

    def _wait_readable(self, poller: select.poll) -> bool:
        waiting_since = time.monotonic()
        while True:
            if self._stop_reason is not None:
                self.end_reason = self._stop_reason
                return False
            if poller.poll(200):
                return True
            if self.stall_timeout and time.monotonic() - waiting_since > self.stall_timeout:
                self.end_reason = STALLED
                return False

    def _run(self) -> None:
        try:
            poller = select.poll()
            poller.register(self.fd, select.POLLIN | select.POLLHUP | select.POLLERR)
            while True:
                buf = self.pool.take()
                view = memoryview(buf)
                filled = 0
                # Fill whole chunks: a pipe returns at most its buffer per read.
                while filled < self.chunk_size:
                    if not self._wait_readable(poller):
                        break
                    n = os.readv(self.fd, [view[filled:]])
                    if self.first_read_at is None:
                        self.first_read_at = time.time()
                    if n == 0:
                        break
                    filled += n
                    if self.progress is not None:
                        self.progress.advance(n)
                view.release()
                if filled:
                    self.queue.put((buf, filled))
                else:
                    self.pool.give(buf)
                if filled < self.chunk_size:
                    break
        except BaseException as e:  # handed to the consumer
            self.error = e
        finally:
            self.queue.put(self._EOF)

    def release(self, chunk: memoryview) -> None:
        """Give the buffer under ``chunk`` back to the pool (the view must not be used afterwards)."""
        buf = self._views.pop(id(chunk), None)
        chunk.release()
        if buf is not None:
            self.pool.give(buf)

    def __iter__(self):
        previous: memoryview | None = None
        while True:
            if previous is not None and not self.manual_release:
                self.release(previous)
            previous = None
            item = self.queue.get()
            if item is self._EOF:
                if self.error is not None:
                    raise self.error
                return
            assert isinstance(item, tuple)
            buf, n = item
            chunk = memoryview(buf)[:n]
            self._views[id(chunk)] = buf
            previous = chunk
            yield chunk


def start_reading(fd: int, *, chunk_size: int, stall_timeout: float | None = None) -> ChunkReader:
    """Widen the kernel's pipe and start reading it, with a :class:`Progress` for the watchdog."""
    widen_pipe(fd)
    return ChunkReader(fd, chunk_size=chunk_size, progress=Progress(), stall_timeout=stall_timeout).start()


class EarlyStart:
    """What :func:`start_capture` found: the pid's cgroup text and, for a pod process, the running reader."""

    __slots__ = ("cgroup_text", "reader")

    def __init__(self, *, cgroup_text: str | None, reader: ChunkReader | None) -> None:
        self.cgroup_text = cgroup_text
        self.reader = reader


def _flag(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def start_capture(argv: list[str], *, default_config: str, stdin_fd: int = 0) -> EarlyStart | None:
    """For ``... capture PID ...``: read the pid's cgroup and, if it is a pod's, start reading stdin now."""
    try:
        i = argv.index("capture")
        pid = int(argv[i + 1])
    except (ValueError, IndexError):
        return None
    head = argv[:i]
    import json

    # The agent's config for chunk_size and proc_root; a flag wins. HandlerConfig.load reports a broken file.
    cfg: dict = {}
    try:
        with open(_flag(head, "--config") or default_config) as f:
            loaded = json.load(f)
        cfg = loaded if isinstance(loaded, dict) else {}
        chunk = int(cfg.get("chunk_size") or DEFAULT_CHUNK)
    except (OSError, ValueError, TypeError):
        chunk = DEFAULT_CHUNK
    try:
        stall = float(_flag(head, "--stall-timeout") or cfg.get("stall_timeout") or DEFAULT_STALL)
    except (ValueError, TypeError):
        stall = DEFAULT_STALL
    proc_root = _flag(head, "--proc-root") or cfg.get("proc_root")
    try:
        with open(os.path.join(proc_root or "/proc", str(pid), "cgroup")) as f:
            text = f.read()
    except OSError:
        text = None
    from handler.cgroup import identity_from_cgroup_text

    if not text or identity_from_cgroup_text(text) is None:
        return EarlyStart(cgroup_text=text, reader=None)
    return EarlyStart(cgroup_text=text, reader=start_reading(stdin_fd, chunk_size=chunk, stall_timeout=stall))
