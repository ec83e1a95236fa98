"""
``kubectl apply --server-side`` and client-side ``kubectl apply`` with the real kubectl, oldest and newest
supported versions, against the real server: what they print and exit with is what they print and exit
with against a CRD.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import yaml
from fixtures_apiserver import NEWEST_KUBECTL, OLDEST_KUBECTL, RunningServer, endpoint_manifest, kubectl_binary

pytestmark = pytest.mark.kubectl
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


@pytest.fixture(params=[OLDEST_KUBECTL, NEWEST_KUBECTL], ids=lambda v: f"kubectl-{v}")
def version(request: pytest.FixtureRequest) -> str:
    kubectl_binary(request.param)
    return request.param


def _manifest(name: str, uid: str, **labels: str) -> str:
    return yaml.safe_dump(endpoint_manifest(name, pod_uid=uid, labels=labels))


def _get(apiserver: RunningServer, name: str, version: str, *extra: str) -> dict[str, Any]:
    return yaml.safe_load(apiserver.kubectl("get", "cde", name, "-o", "yaml", *extra, version=version).stdout)


def _managers(obj: dict[str, Any]) -> set[tuple[str, str]]:
    return {(e["manager"], e["operation"]) for e in obj["metadata"].get("managedFields", [])}


def test_server_side_apply_create_no_op_change_conflict_force(apiserver: RunningServer, version: str) -> None:
    name = f"ssa-{version.replace('.', '-')}"
    uid = str(uuid.uuid4())
    created = apiserver.kubectl(
        "apply", "--server-side", "-f", "-", input=_manifest(name, uid, team="a"), version=version
    )
    assert created.stdout.strip() == f"coredumpendpoint.coredump.example.io/{name} serverside-applied"
    first = _get(apiserver, name, version, "--show-managed-fields")
    assert _managers(first) == {("kubectl", "Apply")}
    assert "managedFields" not in _get(apiserver, name, version)["metadata"]  # hidden unless asked for

    apiserver.kubectl("apply", "--server-side", "-f", "-", input=_manifest(name, uid, team="a"), version=version)
    assert _get(apiserver, name, version)["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]

    apiserver.kubectl(
        "apply", "--server-side", "-f", "-", input=_manifest(name, uid, team="b", tier="web"), version=version
    )
    changed = _get(apiserver, name, version)
    assert changed["metadata"]["labels"] == {"team": "b", "tier": "web"}
    assert int(changed["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])

    apiserver.kubectl("label", "cde", name, "team=c", "--overwrite", version=version)
    conflict = apiserver.kubectl(
        "apply",
        "--server-side",
        "-f",
        "-",
        input=_manifest(name, uid, team="b", tier="web"),
        version=version,
        check=False,
    )
    assert conflict.returncode == 1
    assert conflict.stderr.startswith(
        'error: Apply failed with 1 conflict: conflict with "kubectl-label" using coredump.example.io/v1alpha1: '
        ".metadata.labels.team\nPlease review the fields above--they currently have other managers."
    )
    assert "--force-conflicts" in conflict.stderr
    assert _get(apiserver, name, version)["metadata"]["labels"]["team"] == "c"

    forced = apiserver.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        "-",
        input=_manifest(name, uid, team="b", tier="web"),
        version=version,
    )
    assert forced.stdout.strip().endswith("serverside-applied")
    final = _get(apiserver, name, version, "--show-managed-fields")
    assert final["metadata"]["labels"]["team"] == "b"
    assert _managers(final) == {("kubectl", "Apply")}  # kubectl-label lost its only field

    # A field the applier stops applying is removed.
    apiserver.kubectl("apply", "--server-side", "-f", "-", input=_manifest(name, uid, team="b"), version=version)
    assert _get(apiserver, name, version)["metadata"]["labels"] == {"team": "b"}


def test_client_side_apply_still_works_and_server_side_apply_takes_it_over(
    apiserver: RunningServer, version: str
) -> None:
    name = f"csa-{version.replace('.', '-')}"
    uid = str(uuid.uuid4())
    created = apiserver.kubectl("apply", "-f", "-", input=_manifest(name, uid, team="a"), version=version)
    assert created.stdout.strip() == f"coredumpendpoint.coredump.example.io/{name} created"
    obj = _get(apiserver, name, version, "--show-managed-fields")
    assert LAST_APPLIED in obj["metadata"]["annotations"]
    assert _managers(obj) == {("kubectl-client-side-apply", "Update")}

    configured = apiserver.kubectl("apply", "-f", "-", input=_manifest(name, uid, team="b"), version=version)
    assert configured.stdout.strip() == f"coredumpendpoint.coredump.example.io/{name} configured"
    assert _get(apiserver, name, version)["metadata"]["labels"] == {"team": "b"}

    # kubectl moves client-side apply's ownership to its server-side manager (a JSON patch of managedFields).
    apiserver.kubectl("apply", "--server-side", "-f", "-", input=_manifest(name, uid, team="b"), version=version)
    migrated = _get(apiserver, name, version, "--show-managed-fields")
    assert ("kubectl-client-side-apply", "Update") not in _managers(migrated)
    assert ("kubectl", "Apply") in _managers(migrated)
    apiserver.kubectl("apply", "--server-side", "-f", "-", input=_manifest(name, uid, team="c"), version=version)
    assert _get(apiserver, name, version)["metadata"]["labels"] == {"team": "c"}


def test_strategic_merge_patch_stays_refused_and_patch_records_its_manager(
    apiserver: RunningServer, version: str
) -> None:
    name = f"smp-{version.replace('.', '-')}"
    apiserver.kubectl("create", "-f", "-", input=_manifest(name, str(uuid.uuid4())), version=version)
    strategic = apiserver.kubectl(
        "patch",
        "cde",
        name,
        "--type=strategic",
        "-p",
        '{"metadata":{"labels":{"a":"1"}}}',
        version=version,
        check=False,
    )
    assert strategic.returncode == 1  # kubectl words it as for a CRD:
    assert strategic.stderr.startswith(
        "error: application/strategic-merge-patch+json is not supported by "
        "coredump.example.io/v1alpha1, Kind=CoredumpEndpoint"
    )
    apiserver.kubectl("patch", "cde", name, "--type=merge", "-p", '{"metadata":{"labels":{"a":"1"}}}', version=version)
    assert _managers(_get(apiserver, name, version, "--show-managed-fields")) == {
        ("kubectl-create", "Update"),
        ("kubectl-patch", "Update"),
    }
