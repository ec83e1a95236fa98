"""
CoredumpEndpoints and their cores as the API serves them, read defensively.

``status.cores[]`` (see ``apiserver/registry/corestatus.py``) is untrusted input: every field is
type-checked, and a wrong type reads as absent. Fields a newer server adds (``signature``, top frames,
``backtrace``) are used when present and shown as ``-`` when not. Names that the plugin turns into local
paths (namespace, pod, container, core id) must pass :func:`safe_name`.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from typing import Any

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,252}$")


def safe_name(value: object) -> str | None:
    """``value`` if it can be one path component (no '/', never '.' or '..'), else ``None``."""
    return value if isinstance(value, str) and _SAFE_NAME.match(value) else None


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def parse_time(value: str) -> datetime.datetime | None:
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.timezone.utc)


def format_frame(frame: object) -> str:
    """One stack frame, as stored (a string, or a dict with function/module/offset/file/line)."""
    if isinstance(frame, str):
        return frame
    if not isinstance(frame, dict):
        return "?"
    function, module = _str(frame.get("function")), _str(frame.get("module"))
    offset = frame.get("offset")
    where = function or (f"{module.rsplit('/', 1)[-1]}+{offset:#x}" if module and isinstance(offset, int) else "")
    where = where or _str(frame.get("pc")) or (f"{frame['pc']:#x}" if isinstance(frame.get("pc"), int) else "??")
    if function and module:
        where += f" ({module.rsplit('/', 1)[-1]})"
    file, line = _str(frame.get("file")), frame.get("line")
    if file:
        where += f" at {file}" + (f":{line}" if isinstance(line, int) else "")
    return where


@dataclasses.dataclass(frozen=True)
class Core:
    """One entry of ``status.cores[]``; ``raw`` keeps what the server sent for ``describe``."""

    id: str
    container: str
    signal: int
    signal_name: str
    time: str
    size: int
    stored_size: int
    exe: str
    build_id: str
    truncated: bool
    signature: str
    top_frame: str
    raw: dict[str, Any]

    @classmethod
    def from_status(cls, entry: dict[str, Any]) -> "Core":
        frames = entry.get("topFrames")
        top = entry.get("topFrame")
        if not top and isinstance(frames, list) and frames:
            top = format_frame(frames[0])
        elif top and not isinstance(top, str):
            top = format_frame(top)
        return cls(
            id=_str(entry.get("id")),
            container=_str(entry.get("container")),
            signal=_int(entry.get("signal")),
            signal_name=_str(entry.get("signalName")),
            time=_str(entry.get("time")),
            size=_int(entry.get("size")),
            stored_size=_int(entry.get("storedSize")),
            exe=_str(entry.get("exe")),
            build_id=_str(entry.get("buildID")),
            truncated=entry.get("truncated") is True,
            signature=_str(entry.get("signature")),
            top_frame=_str(top),
            raw=entry,
        )

    @property
    def signal_text(self) -> str:
        return self.signal_name or (str(self.signal) if self.signal else "-")


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


@dataclasses.dataclass(frozen=True)
class Endpoint:
    namespace: str
    name: str
    pod_uid: str
    cores: tuple[Core, ...]
    status: dict[str, Any]
    raw: dict[str, Any]

    @classmethod
    def from_object(cls, obj: dict[str, Any]) -> "Endpoint":
        metadata = _dict(obj.get("metadata"))
        spec = _dict(obj.get("spec"))
        status = _dict(obj.get("status"))
        entries = status.get("cores")
        entries = entries if isinstance(entries, list) else []
        cores = tuple(Core.from_status(e) for e in entries if isinstance(e, dict) and isinstance(e.get("id"), str))
        return cls(
            namespace=_str(metadata.get("namespace")),
            name=_str(metadata.get("name")),
            pod_uid=_str(spec.get("podUID")),
            cores=cores,
            status=status,
            raw=obj,
        )

    @property
    def core_count(self) -> int:
        count = self.status.get("coreCount")
        return count if isinstance(count, int) and not isinstance(count, bool) else len(self.cores)

    def find_core(self, core_id: str) -> Core | None:
        return next((c for c in self.cores if c.id == core_id), None)

    def newest(self, *, container: str | None = None) -> Core | None:
        matching = [c for c in self.cores if container is None or c.container == container]
        return max(matching, key=lambda c: (c.time, c.id), default=None)


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{size}B"
