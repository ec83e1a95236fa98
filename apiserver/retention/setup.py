"""
Retention in the API server: its flags, its metrics, and the task :func:`start` adds to the server.

In a cluster, every replica campaigns for the Lease ``--retention-lease-name`` in ``--retention-lease-namespace``
and only the holder runs passes; in dev mode (one process, no cluster) the pass runs directly. Retention is off
unless one of the ``--retention-max-*`` limits is set.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge

from apiserver.metrics import REGISTRY
from apiserver.retention.leader import LeaseElector
from apiserver.retention.policy import Policy
from apiserver.retention.runner import ConfigMapPolicies, Retention, remove_from_storage, storage_index
from handler.flags import parse_duration, parse_retention_duration, parse_size

if TYPE_CHECKING:
    from apiserver.options import Config

logger = logging.getLogger(__name__)

REMOVED = Counter("coredump_retention_removed_cores_total", "Cores removed by retention, by reason "
                  "(age, pod-count, namespace-bytes).", ["reason"], registry=REGISTRY)
STORED_BYTES = Gauge("coredump_namespace_stored_bytes", "Stored (compressed) bytes of cores per namespace, at the "
                     "last retention pass.", ["namespace"], registry=REGISTRY)
STORED_CORES = Gauge("coredump_namespace_stored_cores", "Stored cores per namespace, at the last retention pass.",
                     ["namespace"], registry=REGISTRY)
LEADING = Gauge("coredump_retention_leader", "1 while this replica holds the retention Lease.", registry=REGISTRY)


class _Metrics:
    def removed(self, reason: str, count: int) -> None:
        REMOVED.labels(reason=reason).inc(count)

    def usage(self, per_namespace: dict[str, tuple[int, int]]) -> None:
        STORED_BYTES.clear()
        STORED_CORES.clear()
        for ns, (size, count) in per_namespace.items():
            STORED_BYTES.labels(namespace=ns).set(size)
            STORED_CORES.labels(namespace=ns).set(count)


def add_retention_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("retention (one elected replica enforces it for the cluster)")
    g.add_argument("--retention-max-age", type=parse_retention_duration, default=0.0,
                   help="remove cores older than this, e.g. 14d (default 0: keep)")
    g.add_argument("--retention-max-namespace-bytes", type=parse_size, default=0,
                   help="stored bytes per namespace, oldest cores removed first, e.g. 20Gi (default 0: unlimited)")
    g.add_argument("--retention-max-cores-per-pod", type=int, default=0,
                   help="newest cores kept per pod (default 0: unlimited)")
    g.add_argument("--retention-namespace-limit-max-age", type=parse_retention_duration, default=None,
                   help="the longest maxAge a namespace's coredump-retention ConfigMap may ask for "
                        "(default: --retention-max-age, so namespaces may only be stricter)")
    g.add_argument("--retention-namespace-limit-bytes", type=parse_size, default=None,
                   help="the most maxBytes a namespace may ask for (default: --retention-max-namespace-bytes)")
    g.add_argument("--retention-namespace-limit-cores-per-pod", type=int, default=None,
                   help="the most maxCoresPerPod a namespace may ask for (default: --retention-max-cores-per-pod)")
    g.add_argument("--retention-interval", type=parse_duration, default=300.0, help="time between passes (5m)")
    g.add_argument("--retention-lease-namespace", default=os.environ.get("POD_NAMESPACE", "coredump-system"),
                   help="namespace of the Lease (default: env POD_NAMESPACE, else coredump-system)")
    g.add_argument("--retention-lease-name", default="coredump-retention", help="name of the Lease")


def policies_from(args: Config) -> tuple[Policy, Policy]:
    default = Policy(max_age=args.retention_max_age, max_bytes=args.retention_max_namespace_bytes,
                     max_cores_per_pod=args.retention_max_cores_per_pod)

    def pick(value: Any, fallback: Any) -> Any:
        return fallback if value is None else value

    maximum = Policy(max_age=pick(args.retention_namespace_limit_max_age, default.max_age),
                     max_bytes=pick(args.retention_namespace_limit_bytes, default.max_bytes),
                     max_cores_per_pod=pick(args.retention_namespace_limit_cores_per_pod, default.max_cores_per_pod))
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


async def run(args: Config, *, storage_root: Path, dev: bool) -> None:
    """Retention until cancelled: elected in a cluster, direct in dev mode."""
    default, maximum = policies_from(args)

    async def no_policies(namespaces: Any) -> dict[str, Policy]:
        return {ns: default for ns in namespaces}

    async def changed(incarnations: set[tuple[str, str, str]]) -> None:
        logger.debug("retention changed %d incarnations", len(incarnations))

    api = None if dev else await _api_client(args.kubeconfig)
    try:
        if api is not None:
            from kubernetes_asyncio import client
            policies = ConfigMapPolicies(client.CoreV1Api(api), default=default, maximum=maximum).policies
        else:
            policies = no_policies
        retention = Retention(index=lambda: asyncio.to_thread(storage_index, storage_root), policies=policies,
                              remove=lambda core: remove_from_storage(storage_root, core), removed=changed,
                              metrics=_Metrics(), interval=args.retention_interval)
        if api is None:
            await retention.run()
            return
        elector = LeaseElector(api_client=api, name=args.retention_lease_name,
                               namespace=args.retention_lease_namespace)

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
