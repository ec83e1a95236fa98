"""
The retention plan: which stored cores to remove, and why, from an index of cores and the policy of each namespace.

Pure: no storage, no clock of its own. Rules, in order, per namespace:

1. ``age``: cores older than ``max_age``;
2. ``pod-count``: beyond the newest ``max_cores_per_pod`` of each pod (counted over its incarnations);
3. ``namespace-bytes``: the oldest remaining cores while the namespace's stored bytes exceed ``max_bytes``.

Each core is planned at most once, with the first rule that removes it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from apiserver.retention.policy import Policy


Incarnation = tuple[str, str, str]  # (namespace, pod, pod uid)


@dataclass(frozen=True)
class IndexedCore:
    namespace: str
    pod: str
    pod_uid: str
    container: str
    core_id: str
    time: float  # crash time, epoch seconds
    stored_size: int

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return (self.namespace, self.pod, self.pod_uid, self.container, self.core_id)

    @property
    def incarnation(self) -> Incarnation:
        return (self.namespace, self.pod, self.pod_uid)


@dataclass(frozen=True)
class Removal:
    core: IndexedCore
    reason: str  # age | pod-count | namespace-bytes


def plan(cores: Iterable[IndexedCore], *, policy_of: Callable[[str], Policy], now: float) -> list[Removal]:
    by_ns: dict[str, list[IndexedCore]] = defaultdict(list)
    for c in cores:
        by_ns[c.namespace].append(c)
    out: list[Removal] = []
    for namespace, items in sorted(by_ns.items()):
        policy = policy_of(namespace)
        items.sort(key=lambda c: (c.time, c.core_id))
        gone: set[tuple[str, ...]] = set()

        def remove(c: IndexedCore, reason: str, gone: set[tuple[str, ...]] = gone) -> None:
            if c.key not in gone:
                gone.add(c.key)
                out.append(Removal(core=c, reason=reason))

        if policy.max_age > 0:
            for c in items:
                if now - c.time > policy.max_age:
                    remove(c, "age")
        if policy.max_cores_per_pod > 0:
            per_pod: dict[str, list[IndexedCore]] = defaultdict(list)
            for c in items:
                if c.key not in gone:
                    per_pod[c.pod].append(c)
            for pod_cores in per_pod.values():
                for c in pod_cores[: max(0, len(pod_cores) - policy.max_cores_per_pod)]:
                    remove(c, "pod-count")
        if policy.max_bytes > 0:
            left = [c for c in items if c.key not in gone]
            total = sum(c.stored_size for c in left)
            for c in left:
                if total <= policy.max_bytes:
                    break
                remove(c, "namespace-bytes")
                total -= c.stored_size
    return out


def usage(cores: Iterable[IndexedCore], removed: Iterable[Removal] = ()) -> dict[str, tuple[int, int]]:
    """(stored bytes, cores) per namespace, after ``removed``."""
    gone = {r.core.key for r in removed}
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for c in cores:
        if c.key not in gone:
            out[c.namespace][0] += c.stored_size
            out[c.namespace][1] += 1
    return {ns: (b, n) for ns, (b, n) in out.items()}
