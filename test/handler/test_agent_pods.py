"""The agent's pod watcher against the fake kube-apiserver: its node's pods and the namespaces, as records."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from handler_harness import CONTAINER_ID, POD_UID, NodeTree, RealCore, cgroup_text

from handler import layout, podrecord
from handler.agent.pods import PodWatcher, kube_client
from waiting import await_until

DIGEST = "sha256:" + "ef" * 32


async def until(predicate, *, timeout: float = 20.0) -> None:
    await await_until(predicate, what=getattr(predicate, "__doc__", None) or "the watcher's records", timeout=timeout)


async def test_watcher_keeps_records_of_its_nodes_pods_and_the_handler_uses_them(
    fake_kube, tmp_path: Path, node: NodeTree, segv_core: RealCore
) -> None:
    fake_kube.set_namespace("team-a", annotations={"owner": "a"})
    fake_kube.add_pod(
        namespace="team-a",
        name="web-0",
        uid=POD_UID,
        node_name="node-1",
        labels={"app": "web"},
        owner_references=[
            {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "web", "uid": "0000-1", "controller": True}
        ],
        container_statuses=[
            {
                "name": "app",
                "image": "example/app:1",
                "ready": True,
                "imageID": f"example/app@{DIGEST}",
                "containerID": f"containerd://{CONTAINER_ID}",
            }
        ],
    )
    other = fake_kube.add_pod(namespace="team-a", name="elsewhere", node_name="node-2")
    api = await kube_client(str(fake_kube.write_kubeconfig(tmp_path / "kubeconfig")))
    watcher = PodWatcher(api_client=api, node="node-1", state_dir=node.state, keep_deleted=0)
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.wait_for(watcher.synced.wait(), 20)
        # Only its own node's pods, asked for with the field selector (not filtered after a full list).
        assert any(
            "fieldSelector=spec.nodeName%3Dnode-1" in r or "fieldSelector=spec.nodeName=node-1" in r
            for r in fake_kube.list_requests
        )
        assert podrecord.read_pod(node.state, POD_UID) is not None
        assert podrecord.read_pod(node.state, other["metadata"]["uid"]) is None
        await until(lambda: podrecord.read_namespace_annotations(node.state, "team-a") == {"owner": "a"})

        # Changes arrive through the watch: a namespace opts out, a new pod appears, a pod goes away.
        fake_kube.set_namespace("team-a", annotations={podrecord.CAPTURE_ANNOTATION: "false"})
        late = fake_kube.add_pod(namespace="team-a", name="web-1", node_name="node-1")
        await until(lambda: podrecord.read_pod(node.state, late["metadata"]["uid"]) is not None)
        await until(
            lambda: (
                podrecord.read_namespace_annotations(node.state, "team-a").get(podrecord.CAPTURE_ANNOTATION) == "false"
            )
        )
        fake_kube.delete_pod(namespace="team-a", name="web-1")
        fake_kube.add_pod(namespace="team-a", name="web-2", node_name="node-1")  # an event after the delete
        await until(lambda: podrecord.read_pod(node.state, late["metadata"]["uid"]) is None)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await api.close()

    # The record as the agent wrote it is what the handler reads at capture.
    raw = json.loads((node.state / "pods" / f"{POD_UID}.json").read_text())
    assert raw["containers"][0]["imageID"] == f"example/app@{DIGEST}"
    fake_kube_ns = node.state / "namespaces" / "team-a.json"
    fake_kube_ns.unlink()  # capture is not the subject here, the namespace opted out above
    node.add_process(segv_core.pid, cgroup=cgroup_text("containerd-systemd:v2"), exe=segv_core.exe)
    r = await asyncio.to_thread(node.run_capture, segv_core.path, pid=segv_core.pid, signal=11)
    assert r.returncode == 0, r.stderr.decode()
    (core,) = layout.list_cores(node.storage, namespace="team-a")
    m = core.metadata
    assert (m["pod"], m["container"], m["image"], m["imageDigest"]) == ("web-0", "app", "example/app:1", DIGEST)
    assert m["labels"] == {"app": "web"} and m["owner"]["kind"] == "StatefulSet"


async def test_a_field_selector_the_server_does_not_know_is_refused_like_the_real_one(
    fake_kube, tmp_path: Path
) -> None:
    from kubernetes_asyncio import client
    from kubernetes_asyncio.client.exceptions import ApiException

    api = await kube_client(str(fake_kube.write_kubeconfig(tmp_path / "kubeconfig")))
    try:
        try:
            await client.CoreV1Api(api).list_pod_for_all_namespaces(field_selector="spec.nope=1")
        except ApiException as e:
            assert e.status == 400 and "field label not supported: spec.nope" in e.body
        else:
            raise AssertionError("accepted an unknown field label")
    finally:
        await api.close()
