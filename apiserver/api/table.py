"""
Table conversion for CoredumpEndpoint: the columns ``kubectl get`` prints (more with ``-o wide``).

Ages are rendered server-side the way kube-apiserver's printers render them (``5m``, ``3h12m``, ``2d``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from apiserver.api.conventions import Column


def human_duration(seconds: float) -> str:
    """k8s.io/apimachinery/pkg/util/duration.HumanDuration, so ages read the same as for pods."""
    if seconds < -1:
        return "<invalid>"
    if seconds < 0:
        return "0s"
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        rest = s % 60
        return f"{minutes}m{rest}s" if rest else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h{rest}m" if rest else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    days = hours // 24
    if hours < 24 * 8:
        rest = hours % 24
        return f"{days}d{rest}h" if rest else f"{days}d"
    if days < 365 * 2:
        return f"{days}d"
    years, rest_days = days // 365, days % 365
    if years < 8:
        return f"{years}y{rest_days}d" if rest_days else f"{years}y"
    return f"{years}y"


def age(timestamp: str | None, *, now: dt.datetime | None = None) -> str:
    if not timestamp:
        return "<unknown>"
    try:
        then = dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return "<invalid>"
    now = now or dt.datetime.now(dt.timezone.utc)
    return human_duration((now - then).total_seconds())


def _status(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("status") or {}


def _containers(obj: dict[str, Any]) -> str:
    names = sorted({core.get("container", "") for core in _status(obj).get("cores", []) if core.get("container")})
    return ",".join(names) or "<none>"


def _size(num: int | None) -> str:
    """Sizes like `kubectl top`'s binary units, short enough for a table cell."""
    value = float(num or 0)
    for unit in ("B", "Ki", "Mi", "Gi", "Ti"):
        if value < 1024 or unit == "Ti":
            return f"{value:.0f}{unit}" if unit == "B" or value >= 10 else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.0f}Ti"


def _top_frame(obj: dict[str, Any]) -> str:
    cores = _status(obj).get("cores") or []
    frames = (cores[-1].get("topFrames") if cores and isinstance(cores[-1], dict) else None) or []
    return str(frames[0]) if frames else "<none>"


COLUMNS: list[Column] = [
    Column(
        "Name",
        "string",
        "Name of the pod whose cores this endpoint serves.",
        lambda o: o["metadata"]["name"],
        format="name",
    ),
    Column(
        "Pod UID", "string", "UID of the pod incarnation.", lambda o: (o.get("spec") or {}).get("podUID") or "<none>"
    ),
    Column("Cores", "integer", "Number of stored cores.", lambda o: _status(o).get("coreCount", 0)),
    Column("Last Signal", "string", "Signal of the newest core.", lambda o: _status(o).get("lastSignal") or "<none>"),
    Column(
        "Last Crash",
        "string",
        "How long ago the newest core was written.",
        lambda o: age(_status(o).get("lastCrash")) if _status(o).get("lastCrash") else "<none>",
    ),
    Column(
        "Top Frame", "string", "Where the newest core's crashing thread was: its top frame.", lambda o: _top_frame(o)
    ),
    Column("Age", "date", "CreationTimestamp of the endpoint.", lambda o: age(o["metadata"].get("creationTimestamp"))),
    Column("Containers", "string", "Containers that dumped core.", _containers, priority=1),
    Column(
        "Total Size",
        "string",
        "Uncompressed size of all cores.",
        lambda o: _size(_status(o).get("totalSize")),
        priority=1,
    ),
    Column(
        "Stored Size",
        "string",
        "Size of all cores on storage.",
        lambda o: _size(_status(o).get("storedSize")),
        priority=1,
    ),
    Column(
        "Signature",
        "string",
        "Crash signature of the newest core.",
        lambda o: (_status(o).get("cores") or [{}])[-1].get("signature") or "<none>",
        priority=1,
    ),
]
