"""
Retention of stored cores: a maximum age, and a maximum of stored bytes per namespace.

Over a namespace's limit, the oldest cores of that namespace go first, and the namespaces using the most are
trimmed first (like systemd-coredump's MaxUse, but per namespace, so one crash-looping team cannot evict
everyone else's cores). Uncommitted debris older than the grace period is swept on the way, and interrupted
commits are completed (see :mod:`handler.layout`). Every access goes through :mod:`handler.layout`, which reaches
storage only through :mod:`handler.safefs`: a planted link is never followed, sized or deleted through.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from handler import digest, layout

logger = logging.getLogger(__name__)


@dataclass
class RetentionReport:
    deleted_age: int = 0
    deleted_size: int = 0
    debris: int = 0
    namespace_bytes: dict[str, int] = field(default_factory=dict)


def apply(
    root: Path,
    *,
    max_age: float = 0,
    max_namespace_bytes: int = 0,
    now: float | None = None,
    core_digest: str = digest.DEFAULT,
) -> RetentionReport:
    now = time.time() if now is None else now
    report = RetentionReport()
    by_ns: dict[str, list[tuple[str, int, layout.StoredCore]]] = defaultdict(list)
    dirs = set()
    for core in layout.iter_all_cores(root):
        dirs.add(core.core_path.parent)
        try:
            born = layout.core_id_time(core.ref.core_id).timestamp()
        except layout.InvalidName:
            born = now
        if max_age and now - born > max_age:
            if layout.remove_core(core):
                report.deleted_age += 1
                logger.info(
                    "retention: %s/%s/%s: %s older than %.0fs",
                    core.ref.namespace,
                    core.ref.pod,
                    core.ref.container,
                    core.ref.core_id,
                    max_age,
                )
            continue
        # Oldest first within a namespace: the core id starts with the UTC time.
        by_ns[core.ref.namespace].append((core.ref.core_id, layout.stored_bytes(core), core))
    usage = {ns: sum(s for _, s, _ in cores) for ns, cores in by_ns.items()}
    if max_namespace_bytes:
        for ns in sorted(usage, key=lambda n: -usage[n]):
            cores = sorted(by_ns[ns], key=lambda t: t[0])
            while usage[ns] > max_namespace_bytes and cores:
                _, size, core = cores.pop(0)
                if layout.remove_core(core):
                    report.deleted_size += 1
                    logger.info(
                        "retention: namespace %s uses %d > %d bytes: removed %s/%s/%s",
                        ns,
                        usage[ns],
                        max_namespace_bytes,
                        core.ref.pod,
                        core.ref.container,
                        core.ref.core_id,
                    )
                usage[ns] -= size
    report.namespace_bytes = usage
    # Every container directory, not only those with committed cores: an interrupted first core is in one alone.
    for d in dirs | set(layout.iter_container_dirs(root)):
        report.debris += layout.sweep_debris(d, now=now, algorithm=core_digest)
        layout.prune_empty_dirs(Path(root), d)
    return report
