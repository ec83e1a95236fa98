"""
Retention in the API server: its flags, its metrics, and the task :func:`run` adds to the server.

In a cluster, every replica campaigns for the Lease ``--retention-lease-name`` in ``--retention-lease-namespace``
and only the holder runs passes; in dev mode (one process, no cluster) the passes run directly. Retention (with
the debris sweep, the object collector and the usage figures) is off unless one of the ``--retention-max-*``
limits is set.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge, Histogram

from apiserver.metrics import REGISTRY
from apiserver.retention.index import StatusIndex, status_index
from apiserver.retention.leader import LeaseElector
from apiserver.retention.plan import Incarnation
from apiserver.retention.policy import Policy
from apiserver.retention.runner import ConfigMapPolicies, Retention
from apiserver.retention.storage import Ops
from apiserver.registry.statusreconciler import StatusReconciler
from handler.flags import parse_count, parse_duration, parse_retention_duration, parse_size
from handler import inflight

if TYPE_CHECKING:
    from apiserver.options import Config
    from apiserver.registry.endpoints import EndpointRegistry


REMOVED = Counter(
    "coredump_retention_removed_cores_total",
    "Cores removed by retention, by reason (age, pod-count, namespace-bytes).",
    ["reason"],
    registry=REGISTRY,
)
STORED_BYTES = Gauge(
    "coredump_namespace_stored_bytes",
    "Stored (compressed) bytes of cores per namespace, at the last retention pass.",
    ["namespace"],
    registry=REGISTRY,
)
STORED_CORES = Gauge(
    "coredump_namespace_stored_cores",
    "Stored cores per namespace, at the last retention pass.",
    ["namespace"],
    registry=REGISTRY,
)
LEADING = Gauge("coredump_retention_leader", "1 while this replica holds the retention Lease.", registry=REGISTRY)
PASS_DURATION = Histogram(
    "coredump_retention_pass_duration_seconds",
    "Time of one retention pass (pass: from the stored status; full: the slow reconcile that walks the storage).",
    ["kind"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600),
    registry=REGISTRY,
)
STORAGE_OPS = Counter(
    "coredump_retention_storage_operations_total",
    "Storage operations of retention passes, by "
    "kind of pass and operation (remove, record, prune, read, walk, sweep, gc); per pass: divide "
    "by coredump_retention_pass_duration_seconds_count.",
    ["kind", "operation"],
    registry=REGISTRY,
)
DEBRIS_REMOVED = Counter(
    "coredump_retention_debris_removed_files_total",
    "Temp files of dead writes removed by the debris sweep (older than --debris-grace).",
    registry=REGISTRY,
)
OBJECTS_REMOVED = Counter(
    "coredump_retention_removed_objects_total",
    "Objects of the build-id store removed because no stored core references them.",
    registry=REGISTRY,
)


class _Metrics:
    def removed(self, reason: str, count: int) -> None:
        REMOVED.labels(reason=reason).inc(count)

    def usage(self, per_namespace: dict[str, tuple[int, int]]) -> None:
        STORED_BYTES.clear()
        STORED_CORES.clear()
        for ns, (size, count) in per_namespace.items():
            STORED_BYTES.labels(namespace=ns).set(size)
            STORED_CORES.labels(namespace=ns).set(count)

    def finished(self, *, kind: str, seconds: float, ops: Ops) -> None:
        PASS_DURATION.labels(kind=kind).observe(seconds)
        for operation, count in ops.items():
            STORAGE_OPS.labels(kind=kind, operation=operation).inc(count)

    def collected(self, *, debris: int, objects: int) -> None:
        DEBRIS_REMOVED.inc(debris)
        OBJECTS_REMOVED.inc(objects)


def add_retention_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("retention (one elected replica enforces it for the cluster)")
    g.add_argument(
        "--retention-max-age",
        type=parse_retention_duration,
        default="0s",
        help="remove cores older than this, e.g. 14d (default 0: keep)",
    )
    g.add_argument(
        "--retention-max-namespace-bytes",
        type=parse_size,
        default=0,
        help="stored bytes per namespace, oldest cores removed first, e.g. 20Gi (default 0: unlimited)",
    )
    g.add_argument(
        "--retention-max-cores-per-pod",
        type=parse_count,
        default="0",
        help="newest cores kept per pod (default 0: unlimited)",
    )
    g.add_argument(
        "--retention-namespace-limit-max-age",
        type=parse_retention_duration,
        default=None,
        help="the longest maxAge a namespace's coredump-retention ConfigMap may ask for "
        "(default: --retention-max-age, so namespaces may only be stricter)",
    )
    g.add_argument(
        "--retention-namespace-limit-bytes",
        type=parse_size,
        default=None,
        help="the most maxBytes a namespace may ask for (default: --retention-max-namespace-bytes)",
    )
    g.add_argument(
        "--retention-namespace-limit-cores-per-pod",
        type=parse_count,
        default=None,
        help="the most maxCoresPerPod a namespace may ask for (default: --retention-max-cores-per-pod)",
    )
    g.add_argument(
        "--retention-interval",
        type=_positive_duration,
        default="5m",
        help="time between passes; a pass reads the stored status, not the storage",
    )
    g.add_argument(
        "--retention-full-interval",
        type=_positive_duration,
        default="6h",
        help="time between slow reconciles: a walk of the whole storage that finds cores no endpoint "
        "covers, sweeps debris and removes objects no core references",
    )
    g.add_argument(
        "--debris-grace",
        type=_debris_grace,
        default="15m",
        help="temp files of a write untouched this long are debris (at least 4m: four of the "
        "writers' heartbeats); a live writer keeps its own fresh",
    )
    g.add_argument(
        "--object-grace",
        type=_positive_duration,
        default="1h",
        help="an object stored or reused this recently is kept even if no core references it yet",
    )
    g.add_argument(
        "--retention-lease-namespace",
        default=os.environ.get("POD_NAMESPACE", "coredump-system"),
        help="namespace of the Lease (default: env POD_NAMESPACE, else coredump-system)",
    )
    g.add_argument("--retention-lease-name", default="coredump-retention", help="name of the Lease")


def _positive_duration(text: str) -> float:
    seconds = parse_duration(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
    return seconds


def _debris_grace(text: str) -> float:
    try:
        return inflight.check_grace(parse_duration(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def policies_from(args: Config) -> tuple[Policy, Policy]:
    default = Policy(
        max_age=args.retention_max_age,
        max_bytes=args.retention_max_namespace_bytes,
        max_cores_per_pod=args.retention_max_cores_per_pod,
    )

    def pick(value: Any, fallback: Any) -> Any:
        return fallback if value is None else value

    maximum = Policy(
        max_age=pick(args.retention_namespace_limit_max_age, default.max_age),
        max_bytes=pick(args.retention_namespace_limit_bytes, default.max_bytes),
        max_cores_per_pod=pick(args.retention_namespace_limit_cores_per_pod, default.max_cores_per_pod),
    )
    return default, maximum


def enabled(args: Config) -> bool:
    return bool(args.retention_max_age or args.retention_max_namespace_bytes or args.retention_max_cores_per_pod)


async def _api_client(kubeconfig: Path | None) -> Any:
    from kubernetes_asyncio import client, config

    cfg = client.Configuration()
    if kubeconfig is not None:
        await config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    else:
        config.load_incluster_config(client_configuration=cfg)
    return client.ApiClient(configuration=cfg)


def controller(args: Config, *, storage_root: Path, registry: "EndpointRegistry", policies: Any) -> Retention:
    """The controller over the stored status of ``registry``, reconciling through its one status writer."""
    reconciler = StatusReconciler(registry=registry, root=storage_root)

    async def index(ops: Ops) -> StatusIndex:
        return await status_index(registry=registry, root=storage_root, ops=ops)

    async def reconcile(incarnation: Incarnation) -> bool:
        namespace, pod, uid = incarnation
        return await reconciler.reconcile(namespace=namespace, pod=pod, uid=uid)

    return Retention(
        root=storage_root,
        index=index,
        policies=policies,
        reconcile=reconcile,
        metrics=_Metrics(),
        interval=args.retention_interval,
        full_interval=args.retention_full_interval,
        debris_grace=args.debris_grace,
        object_grace=args.object_grace,
    )


async def run(args: Config, *, storage_root: Path, registry: "EndpointRegistry", dev: bool) -> None:
    """Retention until cancelled: elected in a cluster, direct in dev mode."""
    default, maximum = policies_from(args)

    async def no_policies(namespaces: Any) -> dict[str, Policy]:
        return {ns: default for ns in namespaces}

    api = None if dev else await _api_client(args.kubeconfig)
    try:
        if api is not None:
            from kubernetes_asyncio import client

            policies = ConfigMapPolicies(client.CoreV1Api(api), default=default, maximum=maximum).policies
        else:
            policies = no_policies
        retention = controller(args, storage_root=storage_root, registry=registry, policies=policies)
        if api is None:
            await retention.run()
            return
        elector = LeaseElector(api_client=api, name=args.retention_lease_name, namespace=args.retention_lease_namespace)

        async def term() -> None:
            LEADING.set(1)
            try:
                await retention.run()
            finally:
                LEADING.set(0)

        await elector.run(term)
    finally:
        if api is not None:
            await api.close()
