"""
Checking a downloaded core against the digest its metadata promises.

The metadata says ``"digest": "<algorithm>:<hex>"``, BLAKE3 or sha256 (the node agent's ``--core-digest``); cores
stored before that field carry ``sha256`` alone. The node side writes the same form (``handler.digest``, the
README's Storage layout); the plugin keeps its own reader because it imports nothing of the node side.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, Protocol

ALGORITHMS = ("blake3", "sha256")


class Hasher(Protocol):
    def update(self, data: Any, /) -> Any: ...

    def hexdigest(self) -> str: ...


def new(algorithm: str) -> Hasher:
    if algorithm == "blake3":
        import blake3

        return blake3.blake3()
    return hashlib.sha256()


def promised(meta: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(algorithm, lowercase hex)`` of the core's metadata, or None when it names none this plugin can check."""
    value = meta.get("digest")
    if value is None and isinstance(meta.get("sha256"), str):
        value = f"sha256:{meta['sha256']}"
    if not isinstance(value, str):
        return None
    algorithm, _, hexdigest = value.partition(":")
    hexdigest = hexdigest.lower()
    if algorithm not in ALGORITHMS or len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
        return None
    return algorithm, hexdigest
