"""
The object store contract shared by the etcd and in-memory backends.

Objects are plain JSON-able dicts stored under string keys (``/<resource>/<namespace>/<name>``).
Keys start with ``/``; list and watch prefixes are ``""`` (everything) or start with ``/`` too, so
that a backend can put all its keys under a root of its own (etcd: ``--etcd-prefix``).
The store owns ``metadata.resourceVersion``: it is the etcd modification revision, a single
monotonic counter for the whole store, rendered as a decimal string. Everything above the store
(validation, defaults, uid, timestamps) belongs to the registry.

Both backends must pass the same suite (``test/apiserver/test_store_backends.py``): same errors, same
revision rules, same watch semantics.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import json
from collections.abc import AsyncIterator, Callable
from typing import Any


class StoreError(Exception):
    """Base of the store's own errors; the registry turns them into API errors."""


class KeyExists(StoreError):
    """``create`` found the key taken."""


class KeyNotFound(StoreError):
    """The key does not exist (get, update, delete)."""


class RevisionConflict(StoreError):
    """A compare-and-swap saw a different ``resourceVersion`` than the caller expected."""

    def __init__(self, *, current: dict[str, Any] | None) -> None:
        super().__init__("resourceVersion changed")
        self.current = current


class RevisionCompacted(StoreError):
    """A watch or list asked for a revision older than the store still keeps."""

    def __init__(self, *, requested: int, compacted: int) -> None:
        super().__init__(f"too old resource version: {requested} ({compacted})")
        self.requested = requested
        self.compacted = compacted


class StoreUnavailable(StoreError):
    """The backend cannot be reached (etcd down): a 503/504, never a 500."""


def check_key(key: str) -> None:
    """Reject a key the backends could not map alike (a programming error, not a user's)."""
    if not key.startswith("/") or len(key) < 2:
        raise ValueError(f"store keys start with '/': {key!r}")


def check_prefix(prefix: str) -> None:
    if prefix and not prefix.startswith("/"):
        raise ValueError(f"store prefixes are '' or start with '/': {prefix!r}")


def encode_object(obj: dict[str, Any]) -> bytes:
    """What a backend stores for ``obj``: its compact JSON without ``metadata.resourceVersion``."""
    metadata = obj.get("metadata")
    if isinstance(metadata, dict) and "resourceVersion" in metadata:
        obj = {**obj, "metadata": {k: v for k, v in metadata.items() if k != "resourceVersion"}}
    return json.dumps(obj, separators=(",", ":")).encode()


def with_revision(obj: dict[str, Any], revision: int) -> dict[str, Any]:
    """``obj`` (a fresh copy the caller owns) as read: ``metadata.resourceVersion`` set to ``revision``."""
    obj.setdefault("metadata", {})["resourceVersion"] = str(revision)
    return obj


class EventType(str, enum.Enum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"
    # Only on a watch given ``progress``: every change up to ``revision`` has been delivered (etcd's progress
    # notification); ``key`` is "" and ``obj`` is empty.
    PROGRESS = "PROGRESS"


class ProgressRequests:
    """
    How a watcher asks its store watch for a :attr:`EventType.PROGRESS` event (etcd's ``WatchProgressRequest``).

    The backend subscribes while the watch runs; :meth:`request` is answered, soon, by one PROGRESS event
    after every change it had to deliver at that moment. Requests made while no watch runs are dropped.
    """

    def __init__(self) -> None:
        self._listeners: list[Callable[[], None]] = []

    def request(self) -> None:
        for listener in list(self._listeners):
            listener()

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener`` on every request until the returned function is called."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)


@dataclasses.dataclass(frozen=True)
class StoreEvent:
    """One change: ``obj`` carries the new object (or, for DELETED, the last one with the delete revision)."""

    type: EventType
    key: str
    obj: dict[str, Any]
    revision: int


@dataclasses.dataclass(frozen=True)
class ListPage:
    """A consistent snapshot page: ``items`` sorted by key, read at ``revision``."""

    items: list[dict[str, Any]]
    revision: int
    continue_key: str | None  # the key to start the next page from (exclusive), None at the end


class ObjectStore(abc.ABC):
    """Keys are ``str``; values are dicts whose ``metadata.resourceVersion`` the store sets."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect; raise :class:`StoreUnavailable` if the backend cannot be reached."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and end every open watch."""

    @abc.abstractmethod
    async def check(self) -> None:
        """Readiness probe: return if usable, raise :class:`StoreUnavailable` if not."""

    @abc.abstractmethod
    async def current_revision(self) -> int:
        """The store's newest revision (what a list with no items would report)."""

    @abc.abstractmethod
    async def create(self, key: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Store a new object; return it with ``resourceVersion`` set. :class:`KeyExists` if taken."""

    @abc.abstractmethod
    async def get(self, key: str) -> dict[str, Any]:
        """The current object. :class:`KeyNotFound` if absent."""

    @abc.abstractmethod
    async def list(
        self,
        prefix: str,
        *,
        limit: int | None = None,
        start_after: str | None = None,
        revision: int | None = None,
    ) -> ListPage:
        """
        Objects whose key starts with ``prefix``, in key order.

        ``start_after`` resumes a paged list; ``revision`` reads a consistent snapshot at that
        revision (used for continue tokens), raising :class:`RevisionCompacted` if it is gone.
        """

    @abc.abstractmethod
    async def update(self, key: str, obj: dict[str, Any], *, expected_revision: int | None) -> dict[str, Any]:
        """
        Replace the object. With ``expected_revision`` the write is a compare-and-swap on the key's
        mod revision (:class:`RevisionConflict` on mismatch). :class:`KeyNotFound` if absent.
        """

    @abc.abstractmethod
    async def delete(self, key: str, *, expected_revision: int | None = None) -> dict[str, Any]:
        """Remove the object and return it as it last was, ``resourceVersion`` = the delete revision."""

    @abc.abstractmethod
    def watch(
        self, prefix: str, *, from_revision: int, progress: ProgressRequests | None = None
    ) -> AsyncIterator[StoreEvent]:
        """
        Every change under ``prefix`` with revision > ``from_revision``, in order, until the caller
        stops iterating or the store closes. :class:`RevisionCompacted` (raised on first iteration)
        when ``from_revision`` is older than the oldest kept revision. With ``progress``, each of its
        requests is answered in order with a :attr:`EventType.PROGRESS` event.
        """

    async def compact(self, revision: int) -> None:
        """Forget history up to ``revision`` (tests use it to provoke 410 Gone)."""
        raise NotImplementedError
