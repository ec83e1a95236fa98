"""The pod's context in every core, from the agent's pod record, with no API call and no CRI in the crash path."""

from __future__ import annotations

import pytest
from handler_harness import CONTAINER_ID, POD_UID, NodeTree, RealCore, cgroup_text
from handler_harness import setup_pod

from handler import layout, podrecord
from handler.outcome import read_outcomes

DIGEST = "sha256:" + "ab" * 32


def api_pod(*, annotations: dict[str, str] | None = None) -> dict:
    """A Pod as the API server returns it (camelCase), the way the agent's watcher receives it."""
    return {
        "metadata": {
            "name": "web-0",
            "namespace": "team-a",
            "uid": POD_UID,
            "labels": {"app": "web", "tier": "front"},
            "annotations": {
                "team": "a",
                **(annotations or {}),
                "kubectl.kubernetes.io/last-applied-configuration": "{" + "x" * 5000 + "}",
            },
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "StatefulSet",
                    "name": "web",
                    "uid": "11111111-2222-3333-4444-555555555555",
                    "controller": True,
                }
            ],
        },
        "spec": {
            "nodeName": "node-1",
            "containers": [
                {"name": "app", "image": "registry.example/web:1.2"},
                {"name": "sidecar", "image": "envoy:1"},
            ],
        },
        "status": {
            "containerStatuses": [
                {
                    "name": "app",
                    "image": "registry.example/web:1.2",
                    "imageID": f"registry.example/web@{DIGEST}",
                    "containerID": f"containerd://{CONTAINER_ID}",
                },
                {
                    "name": "sidecar",
                    "image": "envoy:1",
                    "imageID": "docker.io/envoy@sha256:" + "cd" * 32,
                    "containerID": "containerd://" + "9" * 64,
                },
            ]
        },
    }


def write_record(node: NodeTree, **kw: object) -> None:
    rec = podrecord.pod_from_api(api_pod(**kw))  # type: ignore[arg-type]
    assert rec is not None
    podrecord.write_pod(node.state, rec)


def test_captured_core_names_image_digest_labels_and_owner_of_its_pod(node: NodeTree, segv_core: RealCore) -> None:
    setup_pod(node, segv_core)
    write_record(node)
    r = node.run_capture(segv_core.path, pid=segv_core.pid, signal=11)
    assert r.returncode == 0, r.stderr.decode()
    (core,) = layout.list_cores(node.storage, namespace="team-a")
    m = core.metadata
    assert (m["image"], m["imageDigest"]) == ("registry.example/web:1.2", DIGEST)
    assert m["labels"] == {"app": "web", "tier": "front"}
    assert m["owner"] == {"kind": "StatefulSet", "name": "web", "uid": "11111111-2222-3333-4444-555555555555"}
    assert m["annotations"] == {"team": "a"}  # the large kubectl annotation is not carried


def test_names_come_from_the_record_when_the_kubelet_links_are_missing(node: NodeTree, segv_core: RealCore) -> None:
    node.add_process(segv_core.pid, cgroup=cgroup_text("containerd-systemd:v2"), exe=segv_core.exe)
    write_record(node)
    r = node.run_capture(segv_core.path, pid=segv_core.pid, signal=11)
    assert r.returncode == 0, r.stderr.decode()
    (core,) = layout.list_cores(node.storage, namespace="team-a")
    assert (core.metadata["pod"], core.metadata["container"]) == ("web-0", "app")


def test_a_broken_or_foreign_record_costs_context_not_the_core(node: NodeTree, segv_core: RealCore) -> None:
    setup_pod(node, segv_core)
    (node.state / "pods").mkdir(parents=True)
    (node.state / "pods" / f"{POD_UID}.json").write_text('{"namespace": ["not", "a", "string"]')
    r = node.run_capture(segv_core.path, pid=segv_core.pid, signal=11)
    assert r.returncode == 0, r.stderr.decode()
    (core,) = layout.list_cores(node.storage, namespace="team-a")
    assert core.metadata["labels"] is None and core.metadata["image"] is None


@pytest.mark.parametrize(
    ("pod_says", "namespace_says", "default", "kept"),
    [
        ("false", None, "true", False),
        (None, "false", "true", False),
        ("true", "false", "true", True),  # the pod wins over its namespace
        (None, "true", "false", True),  # the namespace wins over the agent's default
        (None, None, "false", False),
        ("bogus", None, "true", True),  # an unknown value is ignored
    ],
)
def test_capture_annotation_on_pod_or_namespace_decides_before_compression(
    node: NodeTree, segv_core: RealCore, pod_says: str | None, namespace_says: str | None, default: str, kept: bool
) -> None:
    setup_pod(node, segv_core)
    write_record(node, annotations={podrecord.CAPTURE_ANNOTATION: pod_says} if pod_says else None)
    if namespace_says:
        podrecord.write_namespace(node.state, name="team-a", annotations={podrecord.CAPTURE_ANNOTATION: namespace_says})
    r = node.run_capture(segv_core.path, pid=segv_core.pid, signal=11, extra=("--capture-default", default))
    assert r.returncode == 0, r.stderr.decode()
    cores = layout.list_cores(node.storage, namespace="team-a")
    assert len(cores) == (1 if kept else 0)
    ((_, rec),) = read_outcomes(node.state / "outcomes")
    if kept:
        assert rec["result"] == "stored"
    else:
        # Read to the end (the kernel finishes), never written anywhere, counted with its reason.
        assert rec["result"] == "dropped" and rec["reason"] == "opted-out"
        assert rec["observedSize"] == segv_core.path.stat().st_size
        assert not [p for p in node.storage.rglob("*") if p.is_file()]
        assert not [p for p in node.spool.rglob("*") if p.is_file()]
