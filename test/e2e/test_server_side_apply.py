"""
Server-side apply through the real kube-apiserver aggregator: kubectl 1.27 and 1.33 apply, conflict and force
exactly as against a CRD, the aggregator passing ``application/apply-patch+yaml`` and the 409 Status through.
"""

from __future__ import annotations

import json

import pytest

from fixtures_apiserver import kubectl_binary
from workloads import make_namespace


def _manifest(namespace: str, name: str, uid: str, team: str) -> str:
    return json.dumps(
        {
            "apiVersion": "coredump.example.io/v1alpha1",
            "kind": "CoredumpEndpoint",
            "metadata": {"name": name, "namespace": namespace, "labels": {"team": team}},
            "spec": {"podUID": uid},
        }
    )


@pytest.mark.parametrize("version", ["1.27", "1.33"])
def test_apply_server_side_conflict_and_force_through_the_aggregator(server_up, version: str) -> None:
    cp, kubectl = server_up.cp, kubectl_binary(version)
    namespace, name = f"ssa-{version.replace('.', '-')}", "web-0"
    uid = "5f1c3b2a-8d4e-4f6a-9b7c-0d1e2f3a4b5c"
    make_namespace(cp, namespace)
    out = cp.kubectl("apply", "--server-side", "-f", "-", input=_manifest(namespace, name, uid, "a"), binary=kubectl)
    assert out.stdout.strip() == f"coredumpendpoint.coredump.example.io/{name} serverside-applied"
    first = cp.get_json("cde", name, "-n", namespace)
    cp.kubectl("apply", "--server-side", "-f", "-", input=_manifest(namespace, name, uid, "a"), binary=kubectl)
    again = cp.get_json("cde", name, "-n", namespace)
    assert again["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]  # a no-op writes nothing

    cp.kubectl("label", "cde", name, "-n", namespace, "team=b", "--overwrite", binary=kubectl)
    conflict = cp.kubectl(
        "apply", "--server-side", "-f", "-", input=_manifest(namespace, name, uid, "a"), binary=kubectl, check=False
    )
    assert conflict.returncode == 1
    assert (
        'Apply failed with 1 conflict: conflict with "kubectl-label" using coredump.example.io/v1alpha1: '
        ".metadata.labels.team"
    ) in conflict.stderr

    cp.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        "-",
        input=_manifest(namespace, name, uid, "a"),
        binary=kubectl,
    )
    final = cp.get_json("cde", name, "-n", namespace, "--show-managed-fields")
    assert final["metadata"]["labels"] == {"team": "a"}
    assert {(e["manager"], e["operation"]) for e in final["metadata"]["managedFields"]} == {("kubectl", "Apply")}
    cp.kubectl("delete", "namespace", namespace, "--wait=false")
