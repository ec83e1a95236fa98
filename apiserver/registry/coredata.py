"""
What storage knows about an endpoint's pod: its cores (status), its uid, and purging them.

Placeholder with the final interface; the dump work replaces the bodies.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apiserver.api import errors

if TYPE_CHECKING:
    from apiserver.registry.endpoints import EndpointRegistry

logger = logging.getLogger(__name__)


class CoreData:
    def __init__(self, *, storage_root: Path, kubeconfig: str | None = None, in_cluster: bool = False) -> None:
        self.storage_root = storage_root

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def fill_status(self, objs: list[dict[str, Any]]) -> None:
        for obj in objs:
            obj["status"] = {"coreCount": 0, "totalSize": 0, "cores": []}

    async def default_pod_uid(self, *, namespace: str, name: str) -> str:
        raise errors.invalid(name=name, causes=[{
            "type": "FieldValueRequired", "field": "spec.podUID",
            "message": "Required value: the pod's uid cannot be found; give spec.podUID"}])

    async def on_delete(self, obj: dict[str, Any]) -> None:
        pass

    async def run_autocreate(self, *, registry: "EndpointRegistry") -> None:
        pass
