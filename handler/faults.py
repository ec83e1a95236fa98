"""
Fault injection for the crash-consistency tests: a named point in a commit protocol where a test can kill us.

``point(name)`` does nothing unless the environment variable :data:`ENV` names that point (a comma-separated
list of ``<name>`` or ``<name>@<n>`` for the n-th time it is reached, 1-based); then the process SIGKILLs itself
there, exactly as a node losing power or the OOM killer would, with no cleanup, no ``finally`` and no flush. The
variable is read once, at import; in production it is unset and each point is one ``dict`` lookup.
"""
from __future__ import annotations

import os
import signal

ENV = "COREDUMP_FAULT"


def _parse(value: str) -> dict[str, int]:
    points: dict[str, int] = {}
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, nth = item.partition("@")
        points[name] = int(nth) if nth.isdigit() and int(nth) > 0 else 1
    return points


_POINTS = _parse(os.environ.get(ENV, ""))
_SEEN: dict[str, int] = {}


def point(name: str) -> None:
    """Die here if a test asked to (see the module docstring)."""
    if not _POINTS or name not in _POINTS:
        return
    _SEEN[name] = _SEEN.get(name, 0) + 1
    if _SEEN[name] == _POINTS[name]:
        os.kill(os.getpid(), signal.SIGKILL)
