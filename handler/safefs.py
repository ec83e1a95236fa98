"""
The one way to reach storage, the spool, the state dir and the shim's host dir: beneath a root, never through a link.

Every node mounts the storage root read-write, so anything under it may be planted by a hostile or broken node:
a symlink at any level, a FIFO where a core should be, a directory where a file should be. This module resolves
each path component with its own ``openat(name, O_NOFOLLOW | O_DIRECTORY)`` relative to the directory fd of the
level above, opens files with ``O_NOFOLLOW | O_NONBLOCK`` (a planted FIFO cannot hang a reader) after an
``fstatat(AT_SYMLINK_NOFOLLOW)`` that must say "regular file", and checks with ``fstat`` that the file opened is
the one that was looked at. A link, or anything of the wrong kind, is treated as absent and logged once per path
(at most :data:`LOG_BURST` new paths per :data:`LOG_WINDOW` seconds, so a flood of planted links cannot flood
the log). Only the root itself is a configured path and is opened as given.

Why per-component ``openat`` and not ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)``: the layout is at most five
levels deep and every level is a validated single name (never ``..``, never ``/``), so ``O_NOFOLLOW`` on each
component gives the same guarantee with calls every Python and every kernel has (``openat2`` is Linux >= 5.6 and
needs ctypes); the extra syscalls are a few microseconds per directory next to a network filesystem's round trip.
Callers also get directory fds to work relative to: creating, renaming, linking and unlinking all happen with
``dir_fd`` of a directory opened this way, so a directory swapped for a link after it was opened is never written
through.

All of it is blocking; the API server calls it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

Kind = Literal["dir", "file"]

LOG_WINDOW = 60.0
LOG_BURST = 20
_LOG_REMEMBERED = 4096

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeName(ValueError):
    """A name that is not a single path component (empty, ``.``, ``..``, a ``/`` or a NUL in it)."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\0" in name:
        raise UnsafeName(f"{name!r} is not a single path component")
    return name


class _Reporter:
    """Log a refused path once, and no more than ``LOG_BURST`` new ones per ``LOG_WINDOW`` seconds."""

    def __init__(self) -> None:
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._window_start = 0.0
        self._in_window = 0
        self._suppressed = 0
        self._lock = threading.Lock()

    def __call__(self, path: str, what: str) -> None:
        with self._lock:
            if path in self._seen:
                self._seen.move_to_end(path)
                return
            self._seen[path] = None
            if len(self._seen) > _LOG_REMEMBERED:
                self._seen.popitem(last=False)
            now = time.monotonic()
            if now - self._window_start > LOG_WINDOW:
                if self._suppressed:
                    logger.warning("%d more refused paths were not logged", self._suppressed)
                self._window_start, self._in_window, self._suppressed = now, 0, 0
            if self._in_window >= LOG_BURST:
                self._suppressed += 1
                return
            self._in_window += 1
        logger.warning("refusing %s: %s; treated as absent", path, what)


report_refused = _Reporter()


def _describe(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device or special file"


@dataclass
class ReadFile:
    """A regular file opened for reading beneath a root; ``st`` is its ``fstat`` taken right after opening."""

    fd: int
    st: os.stat_result
    path: str

    def read(self, limit: int) -> bytes:
        """Up to ``limit`` bytes from the start (a bound, never the file's own size claim)."""
        parts: list[bytes] = []
        got, pos = 0, 0
        while got < limit:
            chunk = os.pread(self.fd, min(1 << 20, limit - got), pos)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
            pos += len(chunk)
        return b"".join(parts)

    def chunks(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        pos = 0
        while chunk := os.pread(self.fd, chunk_size, pos):
            pos += len(chunk)
            yield chunk

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "ReadFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Dir:
    """An open directory reached without following links; every method works relative to its fd."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    # -- lifetime ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Dir":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _where(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"

    # -- looking --------------------------------------------------------------------------------------------
    def lstat(self, name: str) -> os.stat_result | None:
        """``fstatat(AT_SYMLINK_NOFOLLOW)``: what ``name`` is, whatever it is; None if absent."""
        try:
            return os.stat(check_name(name), dir_fd=self.fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def stat(self, name: str, *, kind: Kind = "file") -> os.stat_result | None:
        """The stat of ``name`` if it is of ``kind`` (never through a link); None otherwise (logged if a link)."""
        st = self.lstat(name)
        if st is None:
            return None
        if not _is_kind(st.st_mode, kind):
            report_refused(self._where(name), f"{_describe(st.st_mode)} where a {_kind_word(kind)} belongs")
            return None
        return st

    def entries(self, kind: Kind) -> list[str]:
        """Names of the entries of ``kind``, sorted; links and other kinds are skipped (and logged once)."""
        names = []
        try:
            with os.scandir(self.fd) as it:
                for entry in it:
                    try:
                        is_link = entry.is_symlink()
                        ok = not is_link and (
                            entry.is_dir(follow_symlinks=False)
                            if kind == "dir"
                            else entry.is_file(follow_symlinks=False)
                        )
                    except OSError:
                        continue
                    if ok:
                        names.append(entry.name)
                    elif is_link:
                        report_refused(self._where(entry.name), "a symbolic link")
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(names)

    def all_entries(self) -> list[tuple[str, os.stat_result]]:
        """Every entry with its own (not followed) stat, for sweeps that must see what is there."""
        out = []
        try:
            names = os.listdir(self.fd)
        except (FileNotFoundError, NotADirectoryError):
            return []
        for name in sorted(names):
            st = self.lstat(name)
            if st is not None:
                out.append((name, st))
        return out

    def sub(self, name: str) -> "Dir | None":
        """The subdirectory ``name`` (opened with O_NOFOLLOW), or None if absent, a link or not a directory."""
        check_name(name)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                st = self.lstat(name)
                report_refused(self._where(name), _describe(st.st_mode) if st else "not a directory")
                return None
            raise
        return Dir(fd, self._where(name))

    def walk(self, *names: str) -> "Dir | None":
        """The directory ``names`` beneath this one, one component at a time; None if any level is not there."""
        current: Dir = self
        for name in names:
            nxt = current.sub(name)
            if current is not self:
                current.close()
            if nxt is None:
                return None
            current = nxt
        if current is self:
            return Dir(os.dup(self.fd), self.path)
        return current

    def open_read(self, name: str) -> ReadFile | None:
        """The regular file ``name``, opened for reading; None if absent, a link, or anything else."""
        before = self.stat(name, kind="file")
        if before is None:
            return None
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                report_refused(self._where(name), "changed into something that is not a regular file")
                return None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
            os.close(fd)
            report_refused(self._where(name), "replaced between looking and opening")
            return None
        return ReadFile(fd=fd, st=st, path=self._where(name))

    def read_bytes(self, name: str, *, limit: int) -> bytes | None:
        f = self.open_read(name)
        if f is None:
            return None
        with f:
            return f.read(limit)

    # -- changing -------------------------------------------------------------------------------------------
    def make_sub(self, name: str, *, mode: int) -> "Dir":
        """The subdirectory ``name``, created if absent; raises NotADirectoryError if a link or file is there."""
        check_name(name)
        try:
            os.mkdir(name, mode, dir_fd=self.fd)
        except FileExistsError:
            pass
        d = self.sub(name)
        if d is None:
            raise NotADirectoryError(errno.ENOTDIR, "not a directory (or a link)", self._where(name))
        return d

    def make_dirs(self, *names: str, mode: int) -> "Dir":
        current: Dir = self
        for name in names:
            nxt = current.make_sub(name, mode=mode)
            if current is not self:
                current.close()
            current = nxt
        return current if current is not self else Dir(os.dup(self.fd), self.path)

    def create(self, name: str, *, mode: int) -> int:
        """A new file ``name`` (O_EXCL, O_NOFOLLOW), open for writing: its fd."""
        return os.open(check_name(name), _CREATE_FLAGS, mode, dir_fd=self.fd)

    def write_new(self, name: str, data: bytes, *, mode: int, sync: bool = True) -> None:
        """Create ``name`` with ``data`` (fsynced unless told otherwise)."""
        fd = self.create(name, mode=mode)
        try:
            os.fchmod(fd, mode)  # exactly this mode, whatever the process umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def replace_atomically(self, name: str, data: bytes, *, mode: int, sync: bool = True) -> None:
        """Give ``name`` the content ``data`` by a hidden temp file and rename: readers see old or new, whole."""
        tmp = f".{check_name(name)}.{os.getpid()}.{time.monotonic_ns()}.tmp"
        self.write_new(tmp, data, mode=mode, sync=sync)
        try:
            self.rename(tmp, name)
        except BaseException:
            self.unlink(tmp)
            raise

    def rename(self, src: str, dst: str, *, dst_dir: "Dir | None" = None) -> None:
        """``renameat``: replaces ``dst`` (a link there is replaced, never followed)."""
        os.rename(check_name(src), check_name(dst), src_dir_fd=self.fd, dst_dir_fd=(dst_dir or self).fd)

    def link_no_replace(self, src: str, dst: str) -> bool:
        """
        Give the file ``src`` the extra name ``dst`` unless ``dst`` exists (FileExistsError).
        True: hard-linked (``src`` still exists); False: renamed (the filesystem has no hard links).
        """
        check_name(src), check_name(dst)
        try:
            os.link(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd, follow_symlinks=False)
            return True
        except FileExistsError:
            raise
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                raise
        # No hard links here: check, then rename; the race is then only as good as the filesystem.
        if self.lstat(dst) is not None:
            raise FileExistsError(errno.EEXIST, "exists", self._where(dst))
        self.rename(src, dst)
        return False

    def unlink(self, name: str) -> bool:
        """Remove the entry ``name`` (a link is removed itself, its target never touched); False if absent."""
        try:
            os.unlink(check_name(name), dir_fd=self.fd)
            return True
        except FileNotFoundError:
            return False
        except IsADirectoryError:
            report_refused(self._where(name), "a directory where a file belongs")
            return False

    def rmdir(self, name: str) -> bool:
        """Remove the empty directory ``name``; False if absent, not empty, or not a directory."""
        try:
            os.rmdir(check_name(name), dir_fd=self.fd)
            return True
        except OSError:
            return False

    def fsync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError:
            pass  # some network filesystems refuse fsync on directories; their renames are synchronous anyway


def _is_kind(mode: int, kind: Kind) -> bool:
    return stat.S_ISDIR(mode) if kind == "dir" else stat.S_ISREG(mode)


def _kind_word(kind: Kind) -> str:
    return "directory" if kind == "dir" else "regular file"


def open_root(root: Path | str, *, create: bool = False, mode: int = 0o700) -> Dir | None:
    """The root directory itself (a configured path, opened as given); None if it is not there."""
    path = os.fspath(root)
    if create:
        os.makedirs(path, mode=mode, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return Dir(fd, path)


def open_dir(root: Path | str, *names: str) -> Dir | None:
    """``root/names...`` opened beneath ``root`` without following a link at any level; None if not there."""
    r = open_root(root)
    if r is None:
        return None
    with r:
        return r.walk(*names)


def make_dirs(root: Path | str, *names: str, mode: int, root_mode: int = 0o700) -> Dir:
    """``root/names...``, created as needed beneath ``root`` (the root too); raises if a level is a link."""
    r = open_root(root, create=True, mode=root_mode)
    if r is None:
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", os.fspath(root))
    with r:
        return r.make_dirs(*names, mode=mode)


def read_bytes(root: Path | str, *names: str, limit: int) -> bytes | None:
    """The first ``limit`` bytes of the regular file ``root/names...``; None if it is not there (or a link)."""
    *dirs, name = names
    d = open_dir(root, *dirs)
    if d is None:
        return None
    with d:
        return d.read_bytes(name, limit=limit)


def replace_file(root: Path | str, *names: str, data: bytes, mode: int, dir_mode: int = 0o755) -> None:
    """Atomically (temp + rename) give ``root/names...`` the content ``data``, creating directories as needed."""
    *dirs, name = names
    with make_dirs(root, *dirs, mode=dir_mode) as d:
        d.replace_atomically(name, data, mode=mode)
        d.fsync()


def unlink(root: Path | str, *names: str) -> bool:
    *dirs, name = names
    d = open_dir(root, *dirs)
    if d is None:
        return False
    with d:
        return d.unlink(name)
