"""
Per-container rate limit: in each window keep the first N cores and the latest M, count the rest.

A crash-looping container would otherwise fill the storage with identical cores, and cost a CPU compressing
them: the kernel path asks :func:`record` *before* compressing, and a core it does not keep is read and
discarded at pipe speed. Past the first N, a core becomes one of the latest M at most once per
``latest_interval`` seconds (0: every core does, the older ones are then removed). The first cores of a window
show how it started, the latest show how it is going; the ones in between are removed as newer ones arrive
and counted. State is one small JSON file per container under the state directory, updated under ``flock`` so
concurrent handlers of the same container agree on the order.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Decision:
    keep: bool = True
    # Cores (core ids) that this arrival pushed out of the "latest M" and that must now be removed.
    evict: list[str] = field(default_factory=list)
    dropped_in_window: int = 0


def _state_path(state_dir: Path, key: str) -> Path:
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return Path(state_dir) / f"{digest}.json"


def record(
    state_dir: Path,
    *,
    key: str,
    core_id: str,
    now: float,
    first: int,
    latest: int,
    window: float,
    latest_interval: float = 0.0,
) -> Decision:
    """
    Register a committed core of container ``key``; says which cores to remove (possibly this one).

    ``first`` or ``latest`` of 0 disables that part; both 0 (or ``window`` 0) disables the limit.
    """
    if window <= 0 or (first <= 0 and latest <= 0):
        return Decision()
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    path = _state_path(state_dir, key)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "r+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            state = json.loads(f.read() or "{}")
        except ValueError:
            state = {}
        if not state or now - state.get("start", 0) >= window or state.get("key") != key:
            state = {"key": key, "start": now, "first": [], "latest": [], "dropped": 0}
        decision = Decision()
        if len(state["first"]) < first:
            state["first"].append(core_id)
        elif latest > 0 and now - state.get("lastLatest", float("-inf")) >= latest_interval:
            state["lastLatest"] = now
            state["latest"].append(core_id)
            while len(state["latest"]) > latest:
                decision.evict.append(state["latest"].pop(0))
        else:
            decision.keep = False
        state["dropped"] += len(decision.evict) + (0 if decision.keep else 1)
        decision.dropped_in_window = state["dropped"]
        f.seek(0)
        f.truncate()
        f.write(json.dumps(state))
        f.flush()
    return decision


def rename(state_dir: Path, *, key: str, old: str, new: str) -> None:
    """The core reserved as ``old`` was committed as ``new`` (its id was taken): keep the state exact."""
    if old == new:
        return
    path = _state_path(state_dir, key)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    with os.fdopen(fd, "r+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            state = json.loads(f.read() or "{}")
        except ValueError:
            return
        for part in ("first", "latest"):
            state[part] = [new if c == old else c for c in state.get(part, [])]
        f.seek(0)
        f.truncate()
        f.write(json.dumps(state))
