"""
The CloudEvents outbox: every event is on the node's disk before it is sent, and leaves only after a 2xx.

Layout: ``<state>/outbox/<sink>/<enqueued-ns>-<event-id>.json``, one small file per event and sink, written to a
hidden temporary name, fsynced and renamed (a crash leaves either the whole entry or nothing). A sink's
directory is its queue, oldest first by name. Each queue is bounded by count and by bytes: putting an entry into
a full queue drops the oldest ones and returns how many, so the caller counts them. The same event id may be put
twice (a drained core filed again is the same core): the second put of an id already queued is a no-op, so a
receiver sees duplicates only through retries, never through the outbox.

Blocking filesystem code; the agent calls it through ``asyncio.to_thread``. Files in the queue are the agent's
own, on the node's own disk, but they are parsed strictly all the same: an unreadable entry is dropped and
counted, never a crash of the delivery loop.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_ENTRY = re.compile(r"^(?P<ns>\d{19,20})-(?P<id>[0-9a-f]{32})\.json$")
_SINK = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class Entry:
    path: Path
    event_id: str
    size: int


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Outbox:
    """Per-sink durable queues under ``directory``, each at most ``max_events`` entries and ``max_bytes``."""

    def __init__(self, directory: Path, *, max_events: int, max_bytes: int) -> None:
        if max_events < 1 or max_bytes < 1:
            raise ValueError("the outbox needs room for at least one event")
        self.directory = Path(directory)
        self.max_events = max_events
        self.max_bytes = max_bytes

    def _queue(self, sink: str) -> Path:
        if not _SINK.match(sink):
            raise ValueError(f"not a sink name: {sink!r}")
        return self.directory / sink

    def sinks(self) -> list[str]:
        """Sinks with a queue on disk (a sink removed from the configuration may still have one)."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(
            n
            for n in names
            if _SINK.match(n) and (self.directory / n).is_dir() and not (self.directory / n).is_symlink()
        )

    def entries(self, sink: str) -> list[Entry]:
        """The sink's queue, oldest first."""
        queue = self._queue(sink)
        try:
            names = sorted(os.listdir(queue))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            m = _ENTRY.match(name)
            if m is None:
                continue
            try:
                st = os.lstat(queue / name)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            out.append(Entry(path=queue / name, event_id=m["id"], size=st.st_size))
        return out

    def put(self, sink: str, *, event_id: str, event: dict[str, Any]) -> int:
        """Queue ``event`` for ``sink`` durably; returns how many older entries were dropped to make room."""
        if not re.fullmatch(r"[0-9a-f]{32}", event_id):
            raise ValueError(f"not an event id: {event_id!r}")
        queue = self._queue(sink)
        queue.mkdir(parents=True, exist_ok=True, mode=0o700)
        existing = self.entries(sink)
        if any(e.event_id == event_id for e in existing):
            return 0
        body = json.dumps(event, separators=(",", ":"), sort_keys=True).encode()
        if len(body) > self.max_bytes:
            raise ValueError(f"event {event_id} is {len(body)} bytes, more than the outbox holds")
        dropped = self._make_room(existing, incoming=len(body))
        name = f"{time.time_ns():020d}-{event_id}.json"
        tmp = queue / f".{name}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, queue / name)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        _fsync_dir(queue)
        return dropped

    def _make_room(self, existing: list[Entry], *, incoming: int) -> int:
        count, size, dropped = len(existing), sum(e.size for e in existing), 0
        for e in existing:
            if count + 1 <= self.max_events and size + incoming <= self.max_bytes:
                break
            if self.remove(e):
                dropped += 1
            count -= 1
            size -= e.size
        if dropped:
            logger.warning(
                "outbox full: dropped the %d oldest events of %s",
                dropped,
                existing[0].path.parent.name,
                extra={"sink": existing[0].path.parent.name, "dropped": dropped},
            )
        return dropped

    def read(self, entry: Entry) -> dict[str, Any] | None:
        """The event of an entry; ``None`` (and the entry removed) when it is unreadable."""
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as f:
                doc = json.loads(f.read(self.max_bytes + 1))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            logger.error("dropping unreadable outbox entry %s: %s", entry.path, e)
            self.remove(entry)
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("attributes"), dict):
            logger.error("dropping malformed outbox entry %s", entry.path)
            self.remove(entry)
            return None
        return doc

    def remove(self, entry: Entry) -> bool:
        try:
            os.unlink(entry.path)
            return True
        except FileNotFoundError:
            return False

    def drop_queue(self, sink: str) -> int:
        """Remove a queue whose sink is no longer configured; returns the number of events dropped."""
        n = sum(1 for e in self.entries(sink) if self.remove(e))
        queue = self._queue(sink)
        for name in os.listdir(queue) if queue.is_dir() else []:
            if name.startswith("."):
                try:
                    os.unlink(queue / name)
                except OSError:
                    pass
        try:
            os.rmdir(queue)
        except OSError:
            pass
        return n

    def sweep(self) -> int:
        """Remove temporary files of puts that a crash interrupted (only this agent writes here); at start-up."""
        removed = 0
        for sink in self.sinks():
            queue = self._queue(sink)
            for name in os.listdir(queue):
                if name.startswith(".") and name.endswith(".tmp"):
                    try:
                        os.unlink(queue / name)
                        removed += 1
                    except OSError:
                        pass
        return removed

    def size(self, sink: str) -> tuple[int, int]:
        """(events, bytes) queued for ``sink``."""
        es = self.entries(sink)
        return len(es), sum(e.size for e in es)
