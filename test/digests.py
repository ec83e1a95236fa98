"""What a test expects a core's metadata to say of its content (``handler.digest``: ``"blake3:<hex>"`` by default)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import blake3


def _hasher(algorithm: str):
    return blake3.blake3() if algorithm == "blake3" else hashlib.sha256()


def digest_of(data: bytes, *, algorithm: str = "blake3") -> str:
    """The ``digest`` metadata value of a core whose content is ``data``, computed independently of the product."""
    h = _hasher(algorithm)
    h.update(data)
    return f"{algorithm}:{h.hexdigest()}"


def promised(meta: dict) -> str:
    """The digest a core's metadata promises: ``digest``, or ``sha256`` alone for a core stored before it."""
    return meta.get("digest") or f"sha256:{meta['sha256']}"


def content_matches(data: bytes, meta: dict) -> bool:
    """Whether ``data`` is the content ``meta`` promises, by the algorithm it names (old cores: sha256)."""
    want = promised(meta)
    return digest_of(data, algorithm=want.partition(":")[0]) == want


def digest_of_file(path: Path, *, algorithm: str = "blake3") -> str:
    """Of a file read in pieces (an 8 GiB core does not fit in a test's memory)."""
    h = _hasher(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return f"{algorithm}:{h.hexdigest()}"
