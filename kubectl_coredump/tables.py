"""
What the commands print: kubectl-style tables (``list``, ``--by-signature``), ``describe`` blocks and
backtraces. Pure functions from the API's data to text; a field the server did not send prints ``-``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from kubectl_coredump import digest as core_digest
from kubectl_coredump.model import Core, Endpoint, format_frame, human_size

MAX_CELL = 60


def _cell(value: object) -> str:
    text = " ".join(str(value).split()) if value not in (None, "") else "-"
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Columns padded like ``kubectl get``: upper-case headers, three spaces between columns."""
    cells = [list(headers)] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in cells)


def list_table(endpoints: Sequence[Endpoint], *, all_namespaces: bool) -> str:
    headers = (["NAMESPACE"] if all_namespaces else []) + [
        "POD",
        "CONTAINER",
        "CORE",
        "TIME",
        "SIGNAL",
        "EXE",
        "TOP FRAME",
        "SIGNATURE",
        "SIZE",
    ]
    rows = []
    for endpoint in sorted(endpoints, key=lambda e: (e.namespace, e.name)):
        for core in sorted(endpoint.cores, key=lambda c: (c.time, c.id)):
            rows.append(
                ([endpoint.namespace] if all_namespaces else [])
                + [
                    endpoint.name,
                    core.container,
                    core.id,
                    core.time,
                    core.signal_text,
                    core.exe,
                    core.top_frame,
                    core.signature,
                    human_size(core.size) + (" (truncated)" if core.truncated else ""),
                ]
            )
    return table(headers, rows)


@dataclasses.dataclass
class _Group:
    signature: str
    count: int = 0
    first: str = ""
    last: str = ""
    top_frame: str = ""
    exe: str = ""
    pods: set[str] = dataclasses.field(default_factory=set)


def signature_table(endpoints: Sequence[Endpoint]) -> str:
    """Cores grouped by signature across every pod listed: count, first and last seen, pods affected."""
    groups: dict[str, _Group] = {}
    for endpoint in endpoints:
        for core in endpoint.cores:
            group = groups.setdefault(core.signature, _Group(signature=core.signature))
            group.count += 1
            group.first = min(group.first or core.time, core.time)
            group.last = max(group.last, core.time)
            group.top_frame = group.top_frame or core.top_frame
            group.exe = group.exe or core.exe
            group.pods.add(f"{endpoint.namespace}/{endpoint.name}")
    rows = []
    for group in sorted(groups.values(), key=lambda g: (-g.count, g.last)):
        pods = sorted(group.pods)
        shown = ",".join(pods[:3]) + (f",+{len(pods) - 3} more" if len(pods) > 3 else "")
        rows.append(
            [group.signature, group.count, group.first, group.last, len(pods), group.top_frame, group.exe, shown]
        )
    return table(["SIGNATURE", "COUNT", "FIRST SEEN", "LAST SEEN", "PODS", "TOP FRAME", "EXE", "AFFECTED"], rows)


def backtrace_lines(backtrace: Any) -> list[str]:
    """A stored backtrace as text: a list of frames, a list of threads with frames, or plain text."""
    if isinstance(backtrace, str):
        return backtrace.splitlines()
    if isinstance(backtrace, dict):
        if isinstance(backtrace.get("threads"), list):
            return backtrace_lines(backtrace["threads"])
        if isinstance(backtrace.get("frames"), list):
            return backtrace_lines(backtrace["frames"])
        return []
    if not isinstance(backtrace, list):
        return []
    if backtrace and all(isinstance(t, dict) and isinstance(t.get("frames"), list) for t in backtrace):
        lines: list[str] = []
        for index, thread in enumerate(backtrace):
            tid = thread.get("tid", thread.get("id", index + 1))
            crashed = " (crashed)" if thread.get("crashed") is True else ""
            lines.append(f"Thread {tid}{crashed}:")
            lines.extend("  " + line for line in backtrace_lines(thread["frames"]))
        return lines
    return [f"#{i:<3} {format_frame(frame)}" for i, frame in enumerate(backtrace)]


def stored_backtrace(*sources: dict[str, Any]) -> list[str]:
    """The first backtrace found in the given dicts (metadata JSON, a status entry)."""
    for source in sources:
        for key in ("backtrace", "topFrames"):
            lines = backtrace_lines(source.get(key))
            if lines:
                return lines
    return []


def describe(endpoint: Endpoint, *, cores: Sequence[Core], metadata: dict[str, dict[str, Any]]) -> str:
    status = endpoint.status
    out = [
        f"Name:          {endpoint.name}",
        f"Namespace:     {endpoint.namespace}",
        f"Pod UID:       {endpoint.pod_uid or '-'}",
        f"Cores:         {endpoint.core_count} ({human_size(_n(status.get('totalSize')))}, "
        f"{human_size(_n(status.get('storedSize')))} stored)",
        f"Last crash:    {_cell(status.get('lastCrash'))} {_cell(status.get('lastSignal'))}",
    ]
    for core in cores:
        meta = metadata.get(core.id, {})
        out += [
            "",
            f"Core {core.id}",
            f"  Container:   {core.container or '-'}",
            f"  Time:        {core.time or '-'}",
            f"  Signal:      {core.signal_text}" + (f" ({core.signal})" if core.signal and core.signal_name else ""),
            f"  Executable:  {core.exe or '-'}",
            f"  Build ID:    {core.build_id or '-'}",
            f"  Size:        {human_size(core.size)} ({human_size(core.stored_size)} stored)"
            + (" truncated" if core.truncated else ""),
            f"  Signature:   {core.signature or '-'}",
            f"  Top frame:   {core.top_frame or '-'}",
        ]
        for key, label in (
            ("image", "Image"),
            ("node", "Node"),
            ("pid", "PID"),
            ("comm", "Command"),
        ):
            if key in meta:
                out.append(f"  {label + ':':<12} {' '.join(str(meta[key]).split()) or '-'}")
        if (promised := core_digest.promised(meta)) is not None:
            out.append(f"  {'Digest:':<12} {':'.join(promised)}")
        lines = stored_backtrace(meta, core.raw)
        out.append("  Backtrace:" + ("" if lines else "   -"))
        out += ["    " + line for line in lines]
    return "\n".join(out)


def _n(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
