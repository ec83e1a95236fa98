"""CoreDumped Events on the crashed pod, through kubernetes-asyncio (in-cluster config or a kubeconfig)."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

logger = logging.getLogger(__name__)

REASON = "CoreDumped"
COMPONENT = "coredump-agent"


def human_size(n: int | None) -> str:
    if n is None:
        return "unknown size"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def event_body(rec: dict[str, Any], *, node: str | None) -> dict[str, Any]:
    """The Event for one filed core (an outcome record with namespace, pod, podUID and container)."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    container = rec.get("container")
    sig = rec.get("signalName") or f"signal {rec.get('signal')}"
    trunc = " (truncated)" if rec.get("truncated") else ""
    exe = f" in {rec['exe']}" if isinstance(rec.get("exe"), str) and rec.get("exe") else ""
    top = f" at {rec['topFrame']}" if isinstance(rec.get("topFrame"), str) and rec.get("topFrame") else ""
    message = (
        f"Container {container} dumped core: {sig} (signal {rec.get('signal')}){exe}{top}, "
        f"{human_size(rec.get('observedSize'))}{trunc}; core {rec.get('coreID')}"
    )[:1024]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{rec['pod']}.", "namespace": rec["namespace"]},
        "involvedObject": {
            "apiVersion": "v1",
            "kind": "Pod",
            "namespace": rec["namespace"],
            "name": rec["pod"],
            "uid": rec.get("podUID"),
            "fieldPath": f"spec.containers{{{container}}}",
        },
        "reason": REASON,
        "message": message,
        "type": "Warning",
        "source": {"component": COMPONENT, "host": node or ""},
        "reportingComponent": f"coredump.example.io/{COMPONENT}",
        "reportingInstance": node or "",
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


class EventPoster:
    """Posts Events; connects lazily, so an agent without API access still files cores."""

    def __init__(self, *, kubeconfig: str | None, node: str | None) -> None:
        self.kubeconfig = kubeconfig
        self.node = node
        self._api: Any = None
        self._client: Any = None

    async def _core_api(self) -> Any:
        if self._api is None:
            from kubernetes_asyncio import client, config

            if self.kubeconfig:
                cfg = client.Configuration()
                await config.load_kube_config(config_file=self.kubeconfig, client_configuration=cfg)
            else:
                cfg = client.Configuration()
                config.load_incluster_config(client_configuration=cfg)
            self._client = client.ApiClient(configuration=cfg)
            self._api = client.CoreV1Api(self._client)
        return self._api

    async def post(self, rec: dict[str, Any]) -> None:
        api = await self._core_api()
        body = event_body(rec, node=self.node)
        await api.create_namespaced_event(namespace=rec["namespace"], body=body)
        logger.info(
            "posted %s event for %s/%s container %s", REASON, rec["namespace"], rec["pod"], rec.get("container")
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = self._api = None
