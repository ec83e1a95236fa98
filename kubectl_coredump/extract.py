"""
Unpack a dump archive as it downloads, verifying every core against the digest of its metadata (BLAKE3 or sha256).

The archive (``apiserver/dump/plan.py``) is a tar stream in concatenated gzip members: per core
``<container>/<core-id>.json`` then ``<container>/<core-id>.core``; with ``?objects=true`` also the ELF
objects under ``sysroot/`` (or ``sysroot.<container>_<core-id>/`` for a core whose objects conflict with
another's), a gdb command file ``<container>_<core-id>.gdb`` per core and ``manifest.json`` at the top.
ISA-L's ``igzip`` reads every member (Python's ``tarfile`` ``r|gz`` would stop after the first) and is
several times faster than ``gzip``.

The archive comes from the server and is untrusted: only those names are accepted (each component a
plain name, never ``..``), only regular files and directories are written, never through a link, and a
link under a sysroot is materialized as a hard link or copy of the sysroot file of the archive it names,
resolved inside the archive's own name space, so nothing can point outside the output directory. A core is
written to ``NAME.part`` and renamed only once its digest matched.

Runs in a worker thread: :class:`ExtractSink` hands it the downloaded bytes through a bounded queue (so
the download's TLS and the extraction's gunzip + digest + writes use two cores).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import os
import posixpath
import queue
import shutil
import tarfile
import threading
from pathlib import Path
from typing import Any

from isal import igzip

from kubectl_coredump import digest as core_digest
from kubectl_coredump.errors import Exit, PluginError
from kubectl_coredump.model import safe_name

MAX_METADATA_BYTES = 16 * 1024 * 1024
MANIFEST = "manifest.json"  # what ?objects=true says it carried for each core
COPY_CHUNK = 1 << 20
QUEUE_CHUNKS = 32  # 32 MiB in flight at most
THREADED_WRITE_BYTES = 8 << 20  # a member larger than this is hashed and written by a thread of its own
WRITE_BUFFERS = 4
_EOF = object()
_RESTART = object()


class _Restart(Exception):
    pass


class _Aborted(Exception):
    pass


@dataclasses.dataclass
class ExtractedCore:
    container: str
    core_id: str
    path: Path
    metadata: dict[str, Any]
    digest: str  # "<algorithm>:<hex>", as checked


@dataclasses.dataclass
class Extracted:
    directory: Path
    cores: list[ExtractedCore] = dataclasses.field(default_factory=list)
    sysroot: Path | None = None  # the first sysroot of the archive (sysroot/ when every core shares one)
    sysroots: list[Path] = dataclasses.field(default_factory=list)
    gdb_scripts: list[Path] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    written: list[Path] = dataclasses.field(default_factory=list)


class _QueueReader(io.RawIOBase):
    """A raw stream over the chunks of a queue, fed by the downloading event loop."""

    def __init__(self, chunks: "queue.Queue[object]") -> None:
        super().__init__()
        self._chunks = chunks
        self._buffer = memoryview(b"")
        self._eof = False

    def read(self, size: int = -1) -> bytes:
        if not self._buffer and not self._eof:
            item = self._chunks.get()
            if item is _RESTART:
                raise _Restart()
            if item is _EOF:
                self._eof = True
            elif isinstance(item, BaseException):
                raise _Aborted() from item
            else:
                assert isinstance(item, bytes)
                self._buffer = memoryview(item)
        if size < 0 or size >= len(self._buffer):
            data, self._buffer = bytes(self._buffer), memoryview(b"")
        else:
            data, self._buffer = bytes(self._buffer[:size]), self._buffer[size:]
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True


class _Writer:
    """Hashes and writes one file's chunks, in a thread of its own when ``threaded`` (buffers rotate through queues)."""

    def __init__(self, *, fd: int, digest: "core_digest.Hasher | None", threaded: bool) -> None:
        self._fd = fd
        self._digest = digest
        self._free: "queue.Queue[memoryview]" = queue.Queue()
        for _ in range(WRITE_BUFFERS if threaded else 1):
            self._free.put(memoryview(bytearray(COPY_CHUNK)))
        self._full: "queue.Queue[memoryview | None]" = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="extract-write", daemon=True) if threaded else None
        if self._thread is not None:
            self._thread.start()

    def _consume(self, chunk: memoryview) -> None:
        if self._digest is not None:
            self._digest.update(chunk)
        while chunk:
            chunk = chunk[os.write(self._fd, chunk) :]

    def _run(self) -> None:
        while (chunk := self._full.get()) is not None:
            try:
                if self._error is None:
                    self._consume(chunk)
            except BaseException as exc:  # reported to the producer by buffer()/close()
                self._error = exc
            self._free.put(memoryview(chunk.obj))  # the whole buffer the chunk is a slice of

    def buffer(self) -> memoryview:
        if self._error is not None:
            raise self._error
        return self._free.get()

    def submit(self, chunk: memoryview) -> None:
        if self._thread is None:
            self._consume(chunk)
            self._free.put(memoryview(chunk.obj))
        else:
            self._full.put(chunk)

    def close(self) -> None:
        if self._thread is not None:
            self._full.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error


class _Forward:
    """The decompressed archive as tarfile's "r:" mode reads it: ``seek`` goes forward only (by reading)."""

    def __init__(self, stream: igzip.GzipFile) -> None:
        self._stream = stream
        self._position = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._position += len(data)
        return data

    def readinto(self, buffer: memoryview) -> int:
        count = self._stream.readinto(buffer)
        self._position += count
        return count

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self._position + offset
        if whence not in (io.SEEK_SET, io.SEEK_CUR) or target < self._position:
            raise tarfile.ReadError("the archive would have to be read backwards")
        while self._position < target:
            if not self.read(min(target - self._position, COPY_CHUNK)):
                break
        return self._position


def _is_sysroot(component: str) -> bool:
    """``sysroot`` (shared by the archive's cores) or ``sysroot.<container>_<core-id>`` (a core's own)."""
    return component == "sysroot" or (component.startswith("sysroot.") and bool(safe_name(component[8:])))


def _parts(name: str) -> list[str] | None:
    if name.startswith("/") or "\\" in name:
        return None
    parts = [p for p in name.split("/") if p != ""]
    if not parts or any(p in (".", "..") or "\0" in p for p in parts):
        return None
    return parts


def _open_new(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _mkdirs(base: Path, parts: list[str]) -> Path:
    """Create ``base/parts...`` as real directories (an existing link there is an error, never followed)."""
    current = base
    for part in parts:
        current = current / part
        try:
            os.mkdir(current, 0o755)
        except FileExistsError:
            if current.is_symlink() or not current.is_dir():
                raise PluginError(f"{current} exists and is not a directory; choose another -o directory") from None
    return current


class Extractor:
    """Unpacks one archive into ``directory``; :meth:`run` is the worker thread's body."""

    def __init__(self, *, directory: Path, chunks: "queue.Queue[object]") -> None:
        self.directory = directory
        self.chunks = chunks
        self.result = Extracted(directory=directory)

    def run(self) -> Extracted:
        while True:
            try:
                self._extract()
                return self.result
            except _Restart:
                self._discard(everything=True)  # the archive changed: nothing of the old one stays
            except (_Aborted, PluginError):
                self._discard(everything=False)
                raise
            except (OSError, EOFError, tarfile.TarError, igzip.BadGzipFile) as exc:
                self._discard(everything=False)
                raise PluginError(f"the archive is damaged: {exc}", code=Exit.VERIFY_FAILED) from None

    def _discard(self, *, everything: bool) -> None:
        """Remove what this archive wrote: all of it, or only the unverified ``.part`` files."""
        for path in self.result.written:
            if not everything and not path.name.endswith(".part"):
                continue
            try:
                os.unlink(path)
            except OSError:
                pass
        if everything:
            self.result = Extracted(directory=self.directory)

    def _extract(self) -> None:
        reader = _QueueReader(self.chunks)
        links: dict[str, str] = {}
        files: dict[str, Path] = {}
        dirs: set[str] = set()
        # "r:" over the forward-only gzip stream: tarfile reads exactly the header blocks, so the data of a
        # member is read by _write without tarfile's stream-mode buffering (three copies of every byte).
        with igzip.GzipFile(fileobj=reader, mode="rb") as gz:
            self._stream = _Forward(gz)
            archive = tarfile.open(fileobj=self._stream, mode="r:")  # type: ignore[call-overload]
            pending_meta: dict[tuple[str, str], dict[str, Any]] = {}
            for member in archive:
                parts = _parts(member.name)
                if parts is None:
                    self.result.skipped.append(member.name)
                    continue
                if _is_sysroot(parts[0]) and len(parts) > 1:
                    self._sysroot_member(archive, member, parts, links=links, files=files, dirs=dirs)
                elif len(parts) == 2 and member.isfile() and parts[1].endswith((".json", ".core")):
                    self._core_member(archive, member, parts, pending_meta)
                elif (
                    len(parts) == 1
                    and member.isfile()
                    and safe_name(parts[0])
                    and (parts[0].endswith(".gdb") or parts[0] == MANIFEST)
                ):
                    path = self._write(archive, member, self.directory / parts[0])
                    if parts[0] != MANIFEST:
                        self.result.gdb_scripts.append(path)
                else:
                    self.result.skipped.append(member.name)
            archive.close()
            # Drain the rest of the stream: the end-of-archive member and anything after it.
            while gz.read(COPY_CHUNK):
                pass
        if links:
            self._materialize_links(links=links, files=files, dirs=dirs)

    def _write(
        self,
        archive: tarfile.TarFile,
        member: tarfile.TarInfo,
        path: Path,
        *,
        digest: "core_digest.Hasher | None" = None,
    ) -> Path:
        """
        The member's bytes into a new file at ``path``: read straight from the decompressed stream (tarfile
        has parsed the header and stands at the data) into reusable buffers, hashed and written from them;
        a large member is hashed and written by a second thread while this one decompresses (both release
        the GIL, so they use two cores).
        """
        stream = self._stream  # where archive reads from
        if stream.tell() != member.offset_data:
            stream.seek(member.offset_data)  # forward only: the stream cannot go back
        fd = _open_new(path)
        self.result.written.append(path)
        sink = _Writer(fd=fd, digest=digest, threaded=member.size > THREADED_WRITE_BYTES)
        try:
            remaining = member.size
            while remaining:
                buffer = sink.buffer()
                count = stream.readinto(buffer[: min(remaining, len(buffer))])
                if not count:
                    raise EOFError(f"the archive ends inside {member.name}")
                sink.submit(buffer[:count])
                remaining -= count
        finally:
            try:
                sink.close()
            finally:
                os.close(fd)
        return path

    def _core_member(
        self,
        archive: tarfile.TarFile,
        member: tarfile.TarInfo,
        parts: list[str],
        pending: dict[tuple[str, str], dict[str, Any]],
    ) -> None:
        container, filename = parts
        core_id, _, kind = filename.rpartition(".")
        if not safe_name(container) or not safe_name(core_id):
            self.result.skipped.append(member.name)
            return
        folder = _mkdirs(self.directory, [container])
        if kind == "json":
            if member.size > MAX_METADATA_BYTES:
                raise PluginError(
                    f"{member.name}: metadata of {member.size} bytes is too large", code=Exit.VERIFY_FAILED
                )
            source = archive.extractfile(member)
            assert source is not None
            data = source.read()
            try:
                meta = json.loads(data)
            except ValueError:
                raise PluginError(f"{member.name}: the metadata is not JSON", code=Exit.VERIFY_FAILED) from None
            if not isinstance(meta, dict):
                raise PluginError(f"{member.name}: the metadata is not an object", code=Exit.VERIFY_FAILED)
            pending[(container, core_id)] = meta
            path = folder / filename
            fd = _open_new(path)
            self.result.written.append(path)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            return
        meta = pending.pop((container, core_id), None)
        expected = core_digest.promised(meta) if meta else None
        if expected is None:
            raise PluginError(
                f"{member.name}: no digest in its metadata that this plugin can check (blake3 or sha256); "
                "if it names another algorithm, upgrade kubectl-coredump",
                code=Exit.VERIFY_FAILED,
            )
        algorithm, want = expected
        hasher = core_digest.new(algorithm)
        part = self._write(archive, member, folder / f"{filename}.part", digest=hasher)
        actual = hasher.hexdigest()
        if actual != want:
            raise PluginError(
                f"{container}/{core_id}: {algorithm} {actual} does not match its metadata ({want}); "
                "the core is damaged (kept nothing of it)",
                code=Exit.VERIFY_FAILED,
            )
        final = folder / filename
        os.replace(part, final)
        self.result.written[self.result.written.index(part)] = final
        assert meta is not None
        self.result.cores.append(
            ExtractedCore(
                container=container, core_id=core_id, path=final, metadata=meta, digest=f"{algorithm}:{actual}"
            )
        )

    def _sysroot_member(
        self,
        archive: tarfile.TarFile,
        member: tarfile.TarInfo,
        parts: list[str],
        *,
        links: dict[str, str],
        files: dict[str, Path],
        dirs: set[str],
    ) -> None:
        """A member under a sysroot (``sysroot/`` or ``sysroot.<container>_<core-id>/``), keyed by its full name."""
        root = _mkdirs(self.directory, [parts[0]])
        if root not in self.result.sysroots:
            self.result.sysroots.append(root)
        self.result.sysroot = self.result.sysroot or root
        name = "/".join(parts)
        if member.isdir():
            _mkdirs(root, parts[1:])
            dirs.add(name)
        elif member.isfile():
            folder = _mkdirs(root, parts[1:-1])
            for i in range(1, len(parts) - 1):
                dirs.add("/".join(parts[: i + 1]))
            files[name] = self._write(archive, member, folder / parts[-1])
        elif member.issym() or member.islnk():
            links[name] = member.linkname
        else:
            self.result.skipped.append(member.name)

    def _materialize_links(self, *, links: dict[str, str], files: dict[str, Path], dirs: set[str]) -> None:
        """
        Each link under a sysroot becomes a hard link (or copy) of the archive file it resolves to: an
        absolute target inside the link's own sysroot, a relative one from the link's directory (it may
        name another sysroot of the archive); anything that resolves to no file of the archive is skipped.
        """
        for name, target in links.items():
            current, hops = name, 0
            resolved: Path | None = None
            while hops < 40:
                hops += 1
                link_target = links[current]
                root = current.split("/", 1)[0]
                path = posixpath.normpath(
                    posixpath.join(root, link_target.lstrip("/"))
                    if link_target.startswith("/")
                    else posixpath.join(posixpath.dirname(current), link_target)
                )
                if path.startswith("..") or path == ".":
                    break
                if path in files:
                    resolved = files[path]
                    break
                if path in links:
                    current = path
                    continue
                break
            parts = _parts(name)
            if resolved is None or parts is None or name in files:
                self.result.skipped.append(f"{name} -> {target}")
                continue
            folder = _mkdirs(self.directory, parts[:-1])
            destination = folder / parts[-1]
            try:
                os.link(resolved, destination, follow_symlinks=False)
            except OSError:
                shutil.copyfile(resolved, destination, follow_symlinks=False)
            files[name] = destination
            self.result.written.append(destination)


class ExtractSink:
    """A download sink that extracts in a worker thread as the bytes arrive (``with``)."""

    def __init__(self, *, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._chunks: "queue.Queue[object]" = queue.Queue(maxsize=QUEUE_CHUNKS)
        self._extractor = Extractor(directory=directory, chunks=self._chunks)
        self._written = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="extract")
        self._future: concurrent.futures.Future[Extracted] | None = None

    @property
    def written(self) -> int:
        return self._written

    def __enter__(self) -> "ExtractSink":
        self._future = self._pool.submit(self._extractor.run)
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None and self._future is not None:
            if not self._future.done():
                try:
                    self._put(RuntimeError("download failed"))
                except BaseException:  # the download's own error is the one to report
                    pass
            try:
                self._future.result()  # let it clean up its partial files before the error is reported
            except BaseException:  # the download's own error is the one to report
                pass
        self._pool.shutdown(wait=False)

    def _put(self, item: object) -> None:
        assert self._future is not None
        while True:
            try:
                self._chunks.put(item, timeout=0.5)
                return
            except queue.Full:
                if self._future.done():
                    self._future.result()  # the extractor failed: raise its error here
                    raise PluginError("the extraction stopped unexpectedly") from None

    def write(self, data: memoryview) -> None:
        assert self._future is not None
        if self._future.done():
            self._future.result()
            raise PluginError("the extraction stopped before the end of the archive")
        self._put(bytes(data))
        self._written += len(data)

    def restart(self) -> None:
        self._put(_RESTART)
        self._written = 0

    def finish(self) -> Extracted:
        assert self._future is not None
        self._put(_EOF)
        return self._future.result()
