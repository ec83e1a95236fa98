"""
HTTP range requests for the dump (RFC 9110 §14): one ``bytes`` range, resumed under ``If-Range``.

Only a single range is served; a multi-range request gets the whole archive (200), which RFC 9110
allows and which every resuming client (curl -C, wget -c, browsers) handles.
"""

from __future__ import annotations

import dataclasses
import re

from apiserver.api import errors


_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class ByteRange:
    """Bytes ``[start, end)`` of an archive of ``total`` bytes."""

    start: int
    end: int
    total: int

    @property
    def length(self) -> int:
        return self.end - self.start

    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end - 1}/{self.total}"


def select_range(*, range_header: str | None, if_range: str | None, etag: str, size: int) -> ByteRange | None:
    """
    The range to send, or ``None`` for the whole archive (200).

    ``If-Range`` with anything but this archive's strong ETag means the client holds bytes of a
    different archive (a core was added or removed since): it gets the whole new one. A range that
    starts past the end is a 416 with ``Content-Range: bytes */size``.
    """
    if not range_header:
        return None
    if if_range is not None and if_range.strip() != etag:
        return None
    if "," in range_header:
        return None
    m = _RANGE_RE.match(range_header)
    if not m:
        return None  # not a bytes range we understand: RFC 9110 says ignore it
    first, last = m.group(1), m.group(2)
    if first == "" and last == "":
        return None
    if first == "":
        suffix = int(last)
        if suffix == 0:
            raise errors.requested_range_not_satisfiable(size=size)
        return ByteRange(start=max(0, size - suffix), end=size, total=size)
    start = int(first)
    if start >= size:
        raise errors.requested_range_not_satisfiable(size=size)
    end = size if last == "" else min(int(last) + 1, size)
    if end <= start:
        return None  # last < first: syntactically invalid, ignored
    return ByteRange(start=start, end=end, total=size)
