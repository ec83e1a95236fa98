"""Which stored cores a dump request gets: the endpoint's pod incarnation, narrowed by the query."""

from __future__ import annotations

from pathlib import Path

from handler import layout
from handler.layout import StoredCore

from apiserver.dump.query import DumpQuery, parse_rfc3339


def core_time(core: StoredCore) -> float | None:
    """When the core was dumped (Unix seconds): its metadata ``timestamp``, else the time in its id."""
    value = core.metadata.get("timestamp")
    if isinstance(value, str):
        try:
            return parse_rfc3339(value).timestamp()
        except ValueError:
            pass
    try:
        return layout.core_id_time(core.ref.core_id).timestamp()
    except ValueError:  # InvalidName, or digits that are no date (month 13)
        return None


def select_cores(*, root: Path, namespace: str, pod: str, pod_uid: str, query: DumpQuery) -> list[StoredCore]:
    """Blocking: the committed cores of one incarnation that match ``query``, in archive order."""
    cores = layout.list_cores(root, namespace=namespace, pod=pod, pod_uid=pod_uid, container=query.container)
    if query.core is not None:
        cores = [c for c in cores if c.ref.core_id == query.core]
    if query.since is not None:
        since = query.since.timestamp()
        cores = [c for c in cores if (t := core_time(c)) is not None and t >= since]
    return cores
