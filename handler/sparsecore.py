"""
A small sparse copy of a core, made while the core streams past: enough to unwind every thread, bounded in size.

The kernel writes a core as: ELF header, program headers, the ``PT_NOTE`` segment (one ``NT_PRSTATUS`` per
thread with its registers, ``NT_FILE`` with the mapped files, ``NT_AUXV``, ...), then the ``PT_LOAD`` segments
in address order. The notes arrive before any memory, so each thread's stack pointer is known before its stack
bytes go by. :class:`SparseCore` is fed the stream in order and keeps, at their offsets in a sparse file of the
core's full length:

- everything up to the end of the notes (capped at :data:`MAX_HEAD`);
- the first page of every ``PT_LOAD`` segment (the ELF header of a mapped file, where its build-id note is);
- file-backed segments (a library's data, with the dynamic linker's ``r_debug``) and small anonymous ones (the
  link map), each capped, all of them within :data:`FILE_SEGMENTS_TOTAL`;
- for each thread, its stack from just below the stack pointer up to :data:`STACK_BYTES` above it.

So an unwinder (drgn, ``eu-stack``) reads the copy like the whole core, and the copy costs a few MiB of disk and
no memory whatever the core's size. Nothing read from the stream is trusted: offsets and sizes are bounded by the
core's own length and the caps here, and a stream that is not an x86-64 or aarch64 ELF core keeps only its head.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

MAX_HEAD = 16 << 20
STACK_BYTES = 1 << 20
BELOW_SP = 4096
PAGE = 4096
PT_LOAD, PT_NOTE = 1, 4
NT_PRSTATUS = 1
NT_FILE = 0x46494C45
# File-backed segments (a library's .data with the dynamic linker's r_debug and link maps) are kept up to this.
FILE_SEGMENT_BYTES = 4 << 20
FILE_SEGMENTS_TOTAL = 64 << 20
# Small anonymous segments too (the dynamic linker's own allocations hold the link map an unwinder walks).
SMALL_SEGMENT = 256 << 10
EM_X86_64, EM_AARCH64 = 62, 183
# Offset of pr_reg in elf_prstatus (64-bit) and the stack pointer's index in it.
_PR_REG = 112
_SP_INDEX = {EM_X86_64: 19, EM_AARCH64: 31}


@dataclass(frozen=True)
class Segment:
    offset: int
    vaddr: int
    filesz: int


def _ranges_union(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def parse_head(head: bytes) -> tuple[list[Segment], tuple[int, int] | None, int] | None:
    """(PT_LOAD segments, the notes' (offset, size), e_machine) of a 64-bit little-endian ELF core head."""
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
        return None
    e_type, e_machine = struct.unpack_from("<HH", head, 16)
    (e_phoff,) = struct.unpack_from("<Q", head, 32)
    e_phentsize, e_phnum = struct.unpack_from("<HH", head, 54)
    if e_type != 4 or e_phentsize != 56 or e_phnum == 0xFFFF:
        return None
    if e_phoff + e_phnum * 56 > len(head):
        return None
    loads, notes = [], None
    for i in range(e_phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from("<IIQQQQ", head, e_phoff + i * 56)
        if p_type == PT_LOAD:
            loads.append(Segment(offset=p_offset, vaddr=p_vaddr, filesz=p_filesz))
        elif p_type == PT_NOTE and notes is None:
            notes = (p_offset, p_filesz)
    return loads, notes, e_machine


def _notes(notes: bytes):
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
        desc = pos + 12 + ((namesz + 3) & ~3)
        end = desc + ((descsz + 3) & ~3)
        if end > len(notes) or desc + descsz > len(notes):
            return
        yield ntype, notes[desc : desc + descsz]
        pos = end


def file_mappings(notes: bytes) -> list[tuple[int, int, int, str]]:
    """(start, end, file offset in bytes, path) of every mapped file, from ``NT_FILE``."""
    for ntype, desc in _notes(notes):
        if ntype != NT_FILE or len(desc) < 16:
            continue
        count, page = struct.unpack_from("<QQ", desc, 0)
        if count > 1 << 20 or 16 + count * 24 > len(desc):
            return []
        names = desc[16 + count * 24 :].split(b"\0")
        out = []
        for i in range(count):
            start, end, pgoff = struct.unpack_from("<QQQ", desc, 16 + i * 24)
            name = names[i].decode("utf-8", "surrogateescape") if i < len(names) else ""
            out.append((start, end, pgoff * page, name))
        return out
    return []


def stack_pointers(notes: bytes, machine: int) -> list[int]:
    """The stack pointer of every thread (``NT_PRSTATUS`` notes), in note order (the crashing thread first)."""
    index = _SP_INDEX.get(machine)
    out: list[int] = []
    pos = 0
    while index is not None and pos + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
        desc = pos + 12 + ((namesz + 3) & ~3)
        end = desc + ((descsz + 3) & ~3)
        if end > len(notes):
            break
        if ntype == NT_PRSTATUS and descsz >= _PR_REG + 8 * (index + 1):
            out.append(struct.unpack_from("<Q", notes, desc + _PR_REG + 8 * index)[0])
        pos = end
    return out


class SparseCore:
    """Feed the core in order with :meth:`feed`; :meth:`close` leaves the sparse copy at ``path``."""

    def __init__(self, path: Path, *, stack_bytes: int = STACK_BYTES, max_head: int = MAX_HEAD) -> None:
        self.path = Path(path)
        self.stack_bytes = stack_bytes
        self.max_head = max_head
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self._head = bytearray()
        self._pos = 0
        self._keep: list[tuple[int, int]] | None = None  # file ranges to copy, once the notes are in
        self._covered = 0  # stream offsets below this were written from the head buffer
        self.threads = 0
        self.kept = 0

    def feed(self, data: bytes | memoryview) -> None:
        start, end = self._pos, self._pos + len(data)
        self._pos = end
        if self._keep is None:
            if start < self.max_head:
                self._head += bytes(data[: self.max_head - start])
            self._plan()
        if self._keep is None:
            return
        for lo, hi in self._keep:
            if hi <= start:
                continue
            if lo >= end:
                break
            a, b = max(lo, start, self._covered), min(hi, end)
            if a >= b:
                continue
            os.pwrite(self._fd, data[a - start : b - start], a)
            self.kept += b - a

    def _plan(self) -> None:
        parsed = parse_head(bytes(self._head[:65536]))
        if parsed is None:
            if len(self._head) >= 65536 or len(self._head) >= self.max_head:
                self._keep = [(0, min(len(self._head), PAGE))]  # not a core we can read: its head only
                os.pwrite(self._fd, self._head[:PAGE], 0)
                self._covered = len(self._head)
                self._head = bytearray()
            return
        loads, notes, machine = parsed
        if notes is None:
            self._keep = [(0, len(self._head))]
            os.pwrite(self._fd, self._head, 0)
            self._covered = len(self._head)
            self._head = bytearray()
            return
        notes_end = notes[0] + notes[1]
        if notes_end > self.max_head:
            notes_end = self.max_head
        if len(self._head) < notes_end:
            return  # wait for the whole of the notes
        note_bytes = bytes(self._head[notes[0] : notes_end])
        sps = stack_pointers(note_bytes, machine)
        self.threads = len(sps)
        files = file_mappings(note_bytes)
        phdrs_end = min(len(self._head), 65536)
        keep = [(0, phdrs_end), (notes[0], notes_end)]
        budget = FILE_SEGMENTS_TOTAL
        for seg in loads:
            size = min(seg.filesz, PAGE)
            if budget > 0 and (seg.filesz <= SMALL_SEGMENT or any(lo <= seg.vaddr < hi for lo, hi, _, _ in files)):
                size = min(seg.filesz, FILE_SEGMENT_BYTES, budget)
                budget -= size
            keep.append((seg.offset, seg.offset + size))
        for sp in sps:
            for seg in loads:
                if seg.vaddr <= sp < seg.vaddr + seg.filesz:
                    lo = max(seg.vaddr, sp - BELOW_SP) - seg.vaddr + seg.offset
                    hi = min(seg.vaddr + seg.filesz, sp + self.stack_bytes) - seg.vaddr + seg.offset
                    keep.append((lo, hi))
        self._keep = _ranges_union(keep)
        # What already went by is in the head buffer: write the kept part of it now.
        for lo, hi in self._keep:
            if lo < len(self._head):
                chunk = self._head[lo : min(hi, len(self._head))]
                os.pwrite(self._fd, chunk, lo)
                self.kept += len(chunk)
        self._covered = len(self._head)
        self._head = bytearray()

    def close(self) -> Path:
        """Give the copy the stream's length (the rest stays holes) and close it (once; later calls do nothing)."""
        if self._fd >= 0:
            try:
                os.ftruncate(self._fd, self._pos)
            finally:
                os.close(self._fd)
                self._fd = -1
        return self.path

    def abort(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1
        try:
            os.unlink(self.path)
        except OSError:
            pass
