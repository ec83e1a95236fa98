"""
Two real ``coredump-apiserver`` processes on one storage root, one etcd and one (fake) kube-apiserver: exactly one
holds the retention Lease and enforces, the endpoint whose last core it removed says so in its stored status, and
when the holder stops the other takes over and removes only what is new.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from fake_kube import FakeKube
from fixtures_etcd import EtcdServer
from test_auth_server import GV, Server, run_server
from apiserver_harness import store_core

UID_A = "0b5a6c1e-1111-4a2b-9c3d-00000000000a"
UID_B = "0b5a6c1e-1111-4a2b-9c3d-00000000000b"


def now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def entries(server: Server, message: str) -> list[dict[str, Any]]:
    out = []
    for line in list(server.logs):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if str(entry.get("msg", "")).startswith(message):
                    out.append(entry)
    return out


async def until(check: Any, *, what: str, timeout: float = 40.0, logs: list[str] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n" + "\n".join((logs or [])[-20:]))
        await asyncio.sleep(0.2)


async def endpoint(server: Server, name: str) -> dict[str, Any]:
    status, body = await server.request("GET", f"{GV}/namespaces/team-a/coredumpendpoints/{name}", cert=server.admin)
    assert status == 200, body
    return body


async def test_two_server_replicas_one_enforces_then_the_other_takes_over(
    fake_kube: FakeKube, tmp_path: Path, etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    root = tmp_path / "shared-storage"
    root.mkdir()
    store_core(
        root,
        namespace="team-a",
        pod="web-1",
        pod_uid=UID_B,
        container="app",
        data=b"young",
        when=now() - timedelta(days=1),
    )
    flags = (
        f"--storage-root={root}",
        "--etcd-servers",
        etcd_server.endpoint,
        "--etcd-prefix",
        etcd_prefix,
        "--retention-max-age=30d",
        "--retention-interval=200ms",
        "--status-resync-interval=1s",
        "--auto-create-endpoints=false",
    )
    (tmp_path / "r1").mkdir()
    (tmp_path / "r2").mkdir()
    async with contextlib.AsyncExitStack() as first:
        r1 = await first.enter_async_context(run_server(fake_kube, tmp_path / "r1", *flags))
        await until(lambda: asyncio.sleep(0, entries(r1, "leading")), what="the first replica to lead", logs=r1.logs)
        async with run_server(fake_kube, tmp_path / "r2", *flags) as r2:
            for name, uid in (("web-0", UID_A), ("web-1", UID_B)):
                status, body = await r2.request(
                    "POST",
                    f"{GV}/namespaces/team-a/coredumpendpoints",
                    cert=r2.admin,
                    body={
                        "apiVersion": "coredump.example.io/v1alpha1",
                        "kind": "CoredumpEndpoint",
                        "metadata": {"name": name},
                        "spec": {"podUID": uid},
                    },
                )
                assert status == 201, body
            # filed once the endpoints exist; the status resync tells the stored status of it
            old = store_core(
                root,
                namespace="team-a",
                pod="web-0",
                pod_uid=UID_A,
                container="app",
                data=b"old",
                when=now() - timedelta(days=40),
            )

            async def web0_emptied() -> dict[str, Any] | None:
                status = (await endpoint(r2, "web-0")).get("status", {})
                return status if status.get("coreCount") == 0 and "lastRemoval" in status else None

            # Read from the other replica: the status is stored (etcd), not computed by whoever answers.
            emptied = await until(web0_emptied, what="the leader to remove the old core and say so", logs=r1.logs)
            assert emptied["lastRemoval"]["reason"] == "age" and emptied["lastRemoval"]["cores"] == 1
            assert not old.stored.meta_path.exists() and not old.stored.core_path.exists()
            assert (await endpoint(r2, "web-1"))["status"]["coreCount"] == 1
            assert entries(r2, "leading") == [] and entries(r2, "retention: removed") == []  # idle
            assert (
                fake_kube.leases[("coredump-system", "coredump-retention")]["spec"]["holderIdentity"]
                == entries(r1, "leading")[0]["identity"]
            )
            removed_by_r1 = len(entries(r1, "retention: removed"))

            await first.aclose()  # the leader stops without handing the lease back
            late = store_core(
                root,
                namespace="team-a",
                pod="web-1",
                pod_uid=UID_B,
                container="app",
                data=b"late",
                when=now() - timedelta(days=31),
            )

            async def web1_trimmed() -> bool:
                status = (await endpoint(r2, "web-1")).get("status", {})
                return status.get("coreCount") == 1 and status.get("lastRemoval", {}).get("reason") == "age"

            await until(
                web1_trimmed,
                what="the other replica to take over and remove the new old core",
                timeout=60,
                logs=r2.logs,
            )
            assert entries(r2, "leading") and not late.stored.meta_path.exists()
            assert [e["removed"] for e in entries(r2, "retention: removed")] == [1]  # that one core, once
            assert len(entries(r1, "retention: removed")) == removed_by_r1
