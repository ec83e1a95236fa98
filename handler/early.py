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
import stat
import threading
import time

logger = logging.getLogger(__name__)

QUEUE_DEPTH = 4
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
PIPE_SIZE = 1 << 20
DEFAULT_CHUNK = 1 << 20


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
        self.first_read_at: float | None = None   # wall clock, so a caller outside can compare
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
                        self.first_read_at = time.time()
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


def start_reading(fd: int, *, chunk_size: int) -> ChunkReader:
    """Widen the kernel's pipe and start reading it, with a :class:`Progress` for the stall watchdog."""
    widen_pipe(fd)
    return ChunkReader(fd, chunk_size=chunk_size, progress=Progress()).start()


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
    proc_root = _flag(head, "--proc-root") or cfg.get("proc_root")
    try:
        with open(os.path.join(proc_root or "/proc", str(pid), "cgroup")) as f:
            text = f.read()
    except OSError:
        text = None
    from handler.cgroup import identity_from_cgroup_text
    if not text or identity_from_cgroup_text(text) is None:
        return EarlyStart(cgroup_text=text, reader=None)
    return EarlyStart(cgroup_text=text, reader=start_reading(stdin_fd, chunk_size=chunk))
