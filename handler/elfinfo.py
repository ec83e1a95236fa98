"""
ELF build-id of the crashing executable: from the executable itself, or from the core when the process is gone.

The build-id is what symbol servers (debuginfod) key on. With the process alive (``core_pipe_limit`` keeps it),
``/proc/<pid>/exe`` is read. For imported or spooled cores the core is read instead: ``AT_PHDR`` in the
auxiliary vector points at the executable's program headers in memory, whose first page the kernel dumps by
default (``coredump_filter`` bit 4), and its ``PT_NOTE`` holds the build-id.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from collections.abc import Callable
from typing import Any, BinaryIO

logger = logging.getLogger(__name__)

PT_LOAD, PT_NOTE, PT_PHDR = 1, 4, 6
NT_GNU_BUILD_ID = 3
NT_AUXV = 6
AT_PHDR = 3
ET_CORE = 4
MAX_NOTES = 1 << 20


class _Elf:
    def __init__(self, head: bytes) -> None:
        if head[:4] != b"\x7fELF":
            raise ValueError("not ELF")
        self.is64 = head[4] == 2
        self.end = "<" if head[5] == 1 else ">"
        if self.is64:
            (self.type, _, _, _, self.phoff, _, _, _, self.phentsize, self.phnum) = struct.unpack_from(
                self.end + "HHIQQQIHHH", head, 16
            )
        else:
            (self.type, _, _, _, self.phoff, _, _, _, self.phentsize, self.phnum) = struct.unpack_from(
                self.end + "HHIIIIIHHH", head, 16
            )

    def phdrs(self, data: bytes) -> list[tuple[int, int, int, int, int]]:
        """(type, offset, vaddr, filesz, memsz) of each program header in ``data`` (starting at phoff)."""
        out = []
        for i in range(self.phnum):
            o = i * self.phentsize
            if self.is64:
                t, _, off, va, _, fs, ms, _ = struct.unpack_from(self.end + "IIQQQQQQ", data, o)
            else:
                t, off, va, _, fs, ms, _, _ = struct.unpack_from(self.end + "IIIIIIII", data, o)
            out.append((t, off, va, fs, ms))
        return out


def _notes(data: bytes, end: str):
    o = 0
    while o + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from(end + "III", data, o)
        o += 12
        name = data[o : o + namesz].rstrip(b"\0")
        o += (namesz + 3) & ~3
        desc = data[o : o + descsz]
        o += (descsz + 3) & ~3
        yield name, ntype, desc


def _build_id_in(notes: bytes, end: str) -> str | None:
    for name, ntype, desc in _notes(notes, end):
        if name == b"GNU" and ntype == NT_GNU_BUILD_ID and desc:
            return desc.hex()
    return None


def build_id_from_executable(path: Path) -> str | None:
    """The GNU build-id note of an ELF executable (or None)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            elf = _Elf(head)
            f.seek(elf.phoff)
            for t, off, _va, fs, _ms in elf.phdrs(f.read(elf.phentsize * elf.phnum)):
                if t == PT_NOTE and 0 < fs <= MAX_NOTES:
                    f.seek(off)
                    bid = _build_id_in(f.read(fs), elf.end)
                    if bid:
                        return bid
    except (OSError, ValueError, struct.error) as e:
        logger.debug("no build-id from %s: %s", path, e)
    return None


def _read_at(f: BinaryIO, segs, vaddr: int, size: int) -> bytes | None:
    """Read ``size`` bytes at virtual address ``vaddr`` of a core, if they were dumped."""
    for _t, off, va, fs, _ms in segs:
        if va <= vaddr and vaddr + size <= va + fs:
            f.seek(off + vaddr - va)
            return f.read(size)
    return None


def build_id_from_core(path: Path, *, opener: Callable[..., Any] = open) -> str | None:
    """The build-id of the main executable recorded in an ELF core file (or None); ``opener`` may be
    ``isal.igzip.open`` for a gzipped core (it seeks, forward reads decompress)."""
    try:
        with opener(path, "rb") as f:
            elf = _Elf(f.read(64))
            if elf.type != ET_CORE:
                return None
            f.seek(elf.phoff)
            segs = elf.phdrs(f.read(elf.phentsize * elf.phnum))
            loads = [s for s in segs if s[0] == PT_LOAD]
            phdr_addr = None
            for t, off, _va, fs, _ms in segs:
                if t == PT_NOTE and 0 < fs <= 64 * MAX_NOTES:
                    f.seek(off)
                    for name, ntype, desc in _notes(f.read(fs), elf.end):
                        if ntype == NT_AUXV and name == b"CORE":
                            fmt = elf.end + ("QQ" if elf.is64 else "II")
                            step = struct.calcsize(fmt)
                            for i in range(0, len(desc) - step + 1, step):
                                key, val = struct.unpack_from(fmt, desc, i)
                                if key == AT_PHDR:
                                    phdr_addr = val
            if phdr_addr is None:
                return None
            # The executable's ELF header sits at the start of the mapping holding its program headers.
            for _t, _off, va, _fs, ms in loads:
                if va <= phdr_addr < va + ms:
                    head = _read_at(f, loads, va, 64)
                    if head is None:
                        return None
                    exe = _Elf(head)
                    ph = _read_at(f, loads, phdr_addr, exe.phentsize * exe.phnum)
                    if ph is None:
                        return None
                    hdrs = exe.phdrs(ph)
                    # Load bias: where PT_PHDR landed minus where the file says it goes (0 for non-PIE).
                    bias = next(
                        (phdr_addr - hv for ht, _o, hv, _f, _m in hdrs if ht == PT_PHDR),
                        va - min((hv for ht, _o, hv, _f, _m in hdrs if ht == PT_LOAD), default=0),
                    )
                    for ht, _o, hv, hf, _m in hdrs:
                        if ht == PT_NOTE and 0 < hf <= MAX_NOTES:
                            notes = _read_at(f, loads, hv + bias, hf)
                            if notes:
                                bid = _build_id_in(notes, exe.end)
                                if bid:
                                    return bid
                    return None
    except (OSError, EOFError, ValueError, struct.error) as e:
        logger.debug("no build-id in core %s: %s", path, e)
    return None


NT_PRSTATUS, NT_PRPSINFO = 1, 3
NT_FILE = 0x46494C45
AT_ENTRY = 9


def _nt_file(desc: bytes, end: str) -> list[tuple[int, int, str]]:
    """(start, end, path) of each file mapping in an NT_FILE note (64-bit layout)."""
    count, _page = struct.unpack_from(end + "QQ", desc, 0)
    if count > 1 << 20:
        return []
    ranges = [struct.unpack_from(end + "QQQ", desc, 16 + 24 * i) for i in range(count)]
    names = desc[16 + 24 * count :].split(b"\0")
    return [(a, b, names[i].decode("utf-8", "replace")) for i, (a, b, _o) in enumerate(ranges) if i < len(names)]


def core_process_info(path: Path, *, opener: Callable[..., Any] = open) -> dict[str, int | str]:
    """
    What a (64-bit Linux) core's notes say of its process, where present: ``pid`` and ``signal``
    (NT_PRSTATUS), ``comm`` and ``cmdline`` (NT_PRPSINFO's fname and psargs, the kernel keeps 80 bytes of the
    command line), and ``exe``: the NT_FILE mapping that holds the executable's entry point or program headers
    (auxv AT_ENTRY / AT_PHDR). That is how ``exe`` is known for a core whose process is gone (import, drain).
    """
    info: dict[str, int | str] = {}
    try:
        with opener(path, "rb") as f:
            elf = _Elf(f.read(64))
            if elf.type != ET_CORE or not elf.is64:
                return info
            f.seek(elf.phoff)
            files: list[tuple[int, int, str]] = []
            anchors: list[int] = []
            for t, off, _va, fs, _ms in elf.phdrs(f.read(elf.phentsize * elf.phnum)):
                if t != PT_NOTE or not 0 < fs <= 64 * MAX_NOTES:
                    continue
                f.seek(off)
                for name, ntype, desc in _notes(f.read(fs), elf.end):
                    if name != b"CORE":
                        continue
                    if ntype == NT_PRSTATUS and "signal" not in info and len(desc) >= 36:
                        info["signal"] = struct.unpack_from(elf.end + "i", desc, 0)[0]
                        info["pid"] = struct.unpack_from(elf.end + "i", desc, 32)[0]
                    elif ntype == NT_PRPSINFO and len(desc) >= 56:
                        info["comm"] = desc[40:56].split(b"\0", 1)[0].decode("utf-8", "replace")
                        if len(desc) >= 136:
                            args = desc[56:136].split(b"\0", 1)[0].decode("utf-8", "replace").strip()
                            if args:
                                info["cmdline"] = args
                    elif ntype == NT_FILE and not files:
                        files = _nt_file(desc, elf.end)
                    elif ntype == NT_AUXV:
                        for i in range(0, len(desc) - 15, 16):
                            key, val = struct.unpack_from(elf.end + "QQ", desc, i)
                            if key in (AT_ENTRY, AT_PHDR) and val:
                                anchors.append(val)
            for addr in anchors:
                exe = next((p for a, b, p in files if a <= addr < b and p.startswith("/")), None)
                if exe:
                    info["exe"] = exe
                    break
    except (OSError, EOFError, ValueError, struct.error) as e:
        logger.debug("no process info in core %s: %s", path, e)
    return info


def is_core_file(head: bytes) -> bool:
    """True when ``head`` (at least 64 bytes) starts an ELF core (``e_type == ET_CORE``)."""
    try:
        return len(head) >= 64 and _Elf(head).type == ET_CORE
    except (ValueError, struct.error):
        return False


class CoreShape:
    """
    The extent of an ELF core read as a stream: where its notes end and how long the whole core is, from the
    ELF and program headers at its start (copied while they pass, at most ``limit`` bytes).

    After the stream: ``is_core`` says whether it was an ELF core at all, ``notes_end`` and ``expected_size``
    are offsets (None when unknown). A stream that stops before ``expected_size`` was cut.
    """

    def __init__(self, *, limit: int = 8 << 20) -> None:
        self.limit = limit
        self._head = bytearray()
        self._need = 64
        self._elf: _Elf | None = None
        self.done = False
        self.is_core: bool | None = None
        self.notes_end: int | None = None
        self.expected_size: int | None = None

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        view = memoryview(chunk)
        while not self.done and view:
            take = min(len(view), self._need - len(self._head))
            self._head += view[:take]
            view = view[take:]
            if len(self._head) < self._need:
                return
            self._advance()

    def _advance(self) -> None:
        try:
            if self._elf is None:
                self._elf = _Elf(bytes(self._head[:64]))
                self.is_core = self._elf.type == ET_CORE
                need = self._elf.phoff + self._elf.phentsize * self._elf.phnum
                if not self.is_core or self._elf.phnum in (0, 0xFFFF) or need > self.limit:
                    self.done = True
                    return
                self._need = need
                return
            hdrs = self._elf.phdrs(bytes(self._head[self._elf.phoff : self._need]))
        except (ValueError, struct.error):
            self.is_core = False
            self.done = True
            return
        ends = [off + fs for _t, off, _va, fs, _ms in hdrs if fs]
        notes = [off + fs for t, off, _va, fs, _ms in hdrs if t == PT_NOTE and fs]
        self.notes_end = max(notes, default=self._need)
        self.expected_size = max(ends, default=self._need)
        self.done = True
        self._head = bytearray()

    def has_notes(self, received: int) -> bool:
        """Whether ``received`` bytes hold the ELF header, program headers and every note."""
        return self.notes_end is not None and received >= self.notes_end
