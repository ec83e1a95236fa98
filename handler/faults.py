"""
Fault injection for the crash-consistency and isolation tests: named points where a test can act on a process.

``point(name)`` does nothing unless the environment variable :data:`ENV` names that point. The variable is a
comma-separated list of ``<name>[@<n>][=<action>]``: at the n-th time (1-based, default 1) the point is reached,

* ``kill`` (the default): the process SIGKILLs itself there, as a node losing power or the OOM killer would,
  with no cleanup, no ``finally`` and no flush;
* ``enospc``: the point raises ``OSError(ENOSPC)``, as a write, fsync, link or rename on a full filesystem does
  (on NFS a full export may answer only at fsync or close);
* ``pause``: it creates ``<name>.reached`` in the directory :data:`DIR_ENV` names and waits until the test creates
  ``<name>.go`` there (a handshake, not a timing: the test does its deed in between, e.g. swaps a file for a
  link between a dump's plan and its open).

The variable is read once, at import; in production it is unset and each point is one ``dict`` lookup.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

ENV = "COREDUMP_FAULT"
DIR_ENV = "COREDUMP_FAULT_DIR"
_PAUSE_POLL = 0.01
_PAUSE_MAX = 120.0


def _parse(value: str) -> dict[str, tuple[int, str]]:
    points: dict[str, tuple[int, str]] = {}
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        spec, _, action = item.partition("=")
        name, _, nth = spec.partition("@")
        points[name] = (int(nth) if nth.isdigit() and int(nth) > 0 else 1, action or "kill")
    return points


_POINTS = _parse(os.environ.get(ENV, ""))
_SEEN: dict[str, int] = {}


def point(name: str) -> None:
    """Act here if a test asked to (see the module docstring)."""
    if not _POINTS or name not in _POINTS:
        return
    nth, action = _POINTS[name]
    _SEEN[name] = _SEEN.get(name, 0) + 1
    if _SEEN[name] != nth:
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" (injected at {name})")
    if action == "pause":
        d = Path(os.environ.get(DIR_ENV, "."))
        (d / f"{name}.reached").touch()
        deadline = time.monotonic() + _PAUSE_MAX
        while not (d / f"{name}.go").exists() and time.monotonic() < deadline:
            time.sleep(_PAUSE_POLL)
        return
    os.kill(os.getpid(), signal.SIGKILL)
