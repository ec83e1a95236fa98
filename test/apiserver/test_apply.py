"""
Server-side apply and managedFields against the real server over TLS, on both object stores: what a
GitOps tool (Flux, Argo CD) or a controller applying server-side relies on, answered as kube-apiserver
answers it for a custom resource: create-on-apply, no-op without a new resourceVersion, removal of
fields a manager stops applying, conflicts as 409 with one cause per field and manager, ``force``,
``dryRun``, an ``Update`` entry for every other write, and a Status (never a 5xx) for bad bodies.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from fixtures_apiserver import RunningServer, collection_path, endpoint_manifest, item_path, start_apiserver

APPLY = "application/apply-patch+yaml"
GV = "coredump.example.io/v1alpha1"
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


@pytest.fixture(scope="module", params=["memory", "etcd"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    args: list[str] = []
    if request.param == "etcd":
        etcd = request.getfixturevalue("etcd_server")
        args = ["--etcd-servers", etcd.endpoint, "--etcd-prefix", f"/ssa-{uuid.uuid4().hex[:8]}"]
    running = start_apiserver(tmp_path_factory.mktemp(f"apply-{request.param}"), *args)
    try:
        yield running
    finally:
        running.stop()
    log = running.log_path.read_text()
    assert "Traceback" not in log, log[-5000:]


def config(
    name: str,
    *,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    pod_uid: str | None = None,
    **metadata: Any,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, **metadata}
    if labels is not None:
        meta["labels"] = labels
    if annotations is not None:
        meta["annotations"] = annotations
    body: dict[str, Any] = {"apiVersion": GV, "kind": "CoredumpEndpoint", "metadata": meta}
    if pod_uid:
        body["spec"] = {"podUID": pod_uid}
    return body


def apply(
    server: RunningServer, name: str, body: Any, *, manager: str | None = "mgr-a", force: bool = False, extra: str = ""
) -> Any:
    query = "&".join(
        part for part in (f"fieldManager={manager}" if manager else "", "force=true" if force else "", extra) if part
    )
    raw = body if isinstance(body, (bytes, str)) else yaml.safe_dump(body)
    return server.request("PATCH", f"{item_path(name)}?{query}", body=raw, content_type=APPLY)


def managers(obj: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """fieldsV1 by (manager, operation)."""
    return {(e["manager"], e["operation"]): e["fieldsV1"] for e in obj["metadata"].get("managedFields", [])}


def status_of(response: Any, code: int, reason: str) -> dict[str, Any]:
    assert response.status == code, response.body
    status = response.json()
    assert status["kind"] == "Status" and status["code"] == code and status["reason"] == reason, status
    return status


def new_uid() -> str:
    return str(uuid.uuid4())


def get(server: RunningServer, name: str) -> dict[str, Any]:
    response = server.request("GET", item_path(name))
    assert response.status == 200, response.body
    return response.json()


# ---- apply: create, no-op, change -----------------------------------------------------------------------


def test_apply_creates_then_is_a_no_op_then_changes(server: RunningServer) -> None:
    uid = str(uuid.uuid4())
    created = apply(server, "sa-create", config("sa-create", labels={"app": "web"}, pod_uid=uid))
    assert created.status == 201, created.body
    obj = created.json()
    assert obj["metadata"]["labels"] == {"app": "web"} and obj["spec"]["podUID"] == uid
    [entry] = obj["metadata"]["managedFields"]
    assert {k: v for k, v in entry.items() if k != "time"} == {
        "manager": "mgr-a",
        "operation": "Apply",
        "apiVersion": GV,
        "fieldsType": "FieldsV1",
        "fieldsV1": {"f:metadata": {"f:labels": {"f:app": {}}}, "f:spec": {"f:podUID": {}}},
    }
    assert RFC3339.match(entry["time"])

    again = apply(server, "sa-create", config("sa-create", labels={"app": "web"}, pod_uid=uid))
    assert again.status == 200, again.body
    assert again.json()["metadata"]["resourceVersion"] == obj["metadata"]["resourceVersion"]
    assert get(server, "sa-create")["metadata"] == again.json()["metadata"]

    changed = apply(server, "sa-create", config("sa-create", labels={"app": "api"}, pod_uid=uid))
    assert changed.status == 200
    assert changed.json()["metadata"]["labels"] == {"app": "api"}
    assert int(changed.json()["metadata"]["resourceVersion"]) > int(obj["metadata"]["resourceVersion"])
    assert get(server, "sa-create")["metadata"]["labels"] == {"app": "api"}


def test_fields_a_manager_stops_applying_go_unless_another_manager_owns_them(server: RunningServer) -> None:
    name = "sa-prune"
    first = apply(
        server,
        name,
        config(
            name,
            labels={"a": "1", "b": "1", "shared": "1"},
            pod_uid=new_uid(),
            annotations={"note": "x"},
            finalizers=["example.com/a"],
        ),
        manager="first",
    )
    assert first.status == 201, first.body
    second = apply(server, name, config(name, labels={"shared": "1", "own": "2"}), manager="second")
    assert second.status == 200, second.body
    assert managers(second.json())[("second", "Apply")] == {"f:metadata": {"f:labels": {"f:own": {}, "f:shared": {}}}}

    pruned = apply(server, name, config(name, labels={"a": "1"}), manager="first").json()
    # b, the annotation and the finalizer were first's alone: gone; shared is second's too: kept.
    assert pruned["metadata"]["labels"] == {"a": "1", "shared": "1", "own": "2"}
    assert "annotations" not in pruned["metadata"] and "finalizers" not in pruned["metadata"]
    assert managers(pruned)[("first", "Apply")] == {"f:metadata": {"f:labels": {"f:a": {}}}}


def test_the_same_value_is_co_owned_not_a_conflict(server: RunningServer) -> None:
    name = "sa-share"
    assert apply(server, name, config(name, labels={"team": "x"}, pod_uid=new_uid()), manager="one").status == 201
    shared = apply(server, name, config(name, labels={"team": "x"}), manager="two")
    assert shared.status == 200, shared.body
    owners = managers(shared.json())
    assert owners[("two", "Apply")] == {"f:metadata": {"f:labels": {"f:team": {}}}}
    assert owners[("one", "Apply")] == {"f:metadata": {"f:labels": {"f:team": {}}}, "f:spec": {"f:podUID": {}}}


# ---- conflicts ----------------------------------------------------------------------------------------------


def test_conflicts_are_409_with_a_cause_per_field_and_manager_and_force_takes_over(server: RunningServer) -> None:
    name = "sa-conflict"
    body = endpoint_manifest(name, labels={"tier": "1", "keep": "y"})
    body["metadata"]["annotations"] = {"owner": "alice"}
    assert server.request("POST", collection_path() + "?fieldManager=creator", body=body).status == 201
    before = get(server, name)

    response = apply(server, name, config(name, labels={"tier": "2"}, annotations={"owner": "bob"}), manager="applier")
    status = status_of(response, 409, "Conflict")
    assert status["message"] == (
        'Apply failed with 2 conflicts: conflicts with "creator" using coredump.example.io/v1alpha1:\n'
        "- .metadata.annotations.owner\n- .metadata.labels.tier"
    )
    assert status["details"]["causes"] == [
        {
            "type": "FieldManagerConflict",
            "message": 'conflict with "creator" using coredump.example.io/v1alpha1',
            "field": ".metadata.annotations.owner",
        },
        {
            "type": "FieldManagerConflict",
            "message": 'conflict with "creator" using coredump.example.io/v1alpha1',
            "field": ".metadata.labels.tier",
        },
    ]
    assert get(server, name) == before  # nothing written

    one = status_of(apply(server, name, config(name, labels={"tier": "2"}), manager="applier"), 409, "Conflict")
    assert one["message"] == (
        'Apply failed with 1 conflict: conflict with "creator" using '
        "coredump.example.io/v1alpha1: .metadata.labels.tier"
    )

    forced = apply(server, name, config(name, labels={"tier": "2"}), manager="applier", force=True)
    assert forced.status == 200, forced.body
    obj = forced.json()
    assert obj["metadata"]["labels"] == {"tier": "2", "keep": "y"}
    owners = managers(obj)
    assert owners[("applier", "Apply")] == {"f:metadata": {"f:labels": {"f:tier": {}}}}
    assert "f:tier" not in owners[("creator", "Update")]["f:metadata"]["f:labels"]
    assert "f:keep" in owners[("creator", "Update")]["f:metadata"]["f:labels"]


# ---- managedFields on every other write ---------------------------------------------------------------------


def test_every_write_records_an_update_entry_for_its_manager(server: RunningServer) -> None:
    name = "sa-update"
    created = server.request(
        "POST", collection_path() + "?fieldManager=kubectl-create", body=endpoint_manifest(name)
    ).json()
    assert managers(created) == {("kubectl-create", "Update"): {"f:spec": {".": {}, "f:podUID": {}}}}
    [entry] = created["metadata"]["managedFields"]
    assert entry["apiVersion"] == GV and entry["fieldsType"] == "FieldsV1" and RFC3339.match(entry["time"])

    # No fieldManager: the user agent's first word names the manager, as kube-apiserver derives it.
    patched = server.request(
        "PATCH",
        item_path(name),
        body={"metadata": {"labels": {"a": "1"}}},
        content_type="application/merge-patch+json",
        headers={"User-Agent": "mytool/1.2 (linux/amd64)"},
    ).json()
    assert managers(patched)[("mytool", "Update")] == {"f:metadata": {"f:labels": {".": {}, "f:a": {}}}}

    json_patched = server.request(
        "PATCH",
        item_path(name) + "?fieldManager=kubectl-patch",
        body=[{"op": "add", "path": "/metadata/annotations", "value": {"n": "v"}}],
        content_type="application/json-patch+json",
    ).json()
    assert managers(json_patched)[("kubectl-patch", "Update")] == {
        "f:metadata": {"f:annotations": {".": {}, "f:n": {}}}
    }

    replaced_body = dict(json_patched)
    replaced_body["metadata"] = {**json_patched["metadata"], "labels": {"a": "2"}}
    replaced = server.request("PUT", item_path(name) + "?fieldManager=kubectl-replace", body=replaced_body).json()
    owners = managers(replaced)
    assert owners[("kubectl-replace", "Update")] == {"f:metadata": {"f:labels": {"f:a": {}}}}
    # Its label was taken over; the labels map it created stays its own, as structured-merge-diff keeps it.
    assert owners[("mytool", "Update")] == {"f:metadata": {"f:labels": {}}}

    # A write that changes nothing writes nothing: same resourceVersion, no new entry.
    same = server.request(
        "PATCH",
        item_path(name) + "?fieldManager=someone",
        body={"metadata": {"labels": {"a": "2"}}},
        content_type="application/merge-patch+json",
    )
    assert same.json()["metadata"]["resourceVersion"] == replaced["metadata"]["resourceVersion"]
    assert ("someone", "Update") not in managers(same.json())


def test_managed_fields_sent_by_a_client_are_validated_and_can_be_reset(server: RunningServer) -> None:
    name = "sa-forge"
    assert apply(server, name, config(name, labels={"a": "1"}, pod_uid=new_uid())).status == 201
    bad = server.request(
        "PATCH",
        item_path(name),
        content_type="application/merge-patch+json",
        body={"metadata": {"managedFields": [{"manager": "x", "operation": "Steal", "fieldsType": "FieldsV2"}]}},
    )
    status = status_of(bad, 422, "Invalid")
    assert {c["field"] for c in status["details"]["causes"]} == {
        "metadata.managedFields[0].operation",
        "metadata.managedFields[0].fieldsType",
    }
    assert "must be `Apply` or `Update`" in status["message"]

    # Undecodable fieldsV1 is ignored (the stored entries stay), as kube-apiserver does.
    kept = server.request(
        "PATCH",
        item_path(name),
        content_type="application/merge-patch+json",
        body={"metadata": {"managedFields": [{"manager": "x", "operation": "Update", "fieldsV1": {"nonsense": 1}}]}},
    )
    assert kept.status == 200 and set(managers(kept.json())) == {("mgr-a", "Apply")}

    reset = server.request(
        "PATCH",
        item_path(name),
        content_type="application/merge-patch+json",
        body={"metadata": {"managedFields": [{}]}},
    )
    assert reset.status == 200, reset.body
    assert "managedFields" not in reset.json()["metadata"]
    assert reset.json()["metadata"]["labels"] == {"a": "1"}


def test_status_is_never_owned_nor_applied(server: RunningServer) -> None:
    name = "sa-status"
    body = config(name, labels={"a": "1"}, pod_uid=new_uid())
    body["status"] = {"coreCount": 99}
    obj = apply(server, name, body).json()
    assert obj["status"]["coreCount"] == 0
    assert "f:status" not in json.dumps(obj["metadata"]["managedFields"])


# ---- options and bad bodies --------------------------------------------------------------------------------


def test_apply_options_are_checked_as_kube_apiserver_checks_them(server: RunningServer) -> None:
    name = "sa-options"
    missing = status_of(apply(server, name, config(name), manager=None), 422, "Invalid")
    assert missing["message"] == (
        'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: is required for apply patch'
    )
    assert missing["details"]["causes"] == [
        {
            "reason": "FieldValueRequired",
            "field": "fieldManager",
            "message": "Required value: is required for apply patch",
        }
    ]
    long = status_of(apply(server, name, config(name), manager="m" * 129), 422, "Invalid")
    assert "fieldManager: Too long: may not be more than 128 bytes" in long["message"]
    assert apply(server, name, config(name, pod_uid=new_uid())).status == 201
    forced_merge = server.request(
        "PATCH", item_path(name) + "?force=true", body={"metadata": {}}, content_type="application/merge-patch+json"
    )
    assert status_of(forced_merge, 422, "Invalid")["message"] == (
        'PatchOptions.meta.k8s.io "" is invalid: force: Forbidden: may not be specified for non-apply patch'
    )
    strategic = server.request(
        "PATCH", item_path(name), body=b"{}", content_type="application/strategic-merge-patch+json"
    )
    status_of(strategic, 415, "UnsupportedMediaType")


def test_dry_run_apply_writes_nothing(server: RunningServer) -> None:
    name = "sa-dry"
    uid = new_uid()
    dry = apply(server, name, config(name, labels={"a": "1"}, pod_uid=uid), extra="dryRun=All")
    assert dry.status == 201 and dry.json()["metadata"]["labels"] == {"a": "1"}
    assert server.request("GET", item_path(name)).status == 404
    assert apply(server, name, config(name, labels={"a": "1"}, pod_uid=uid)).status == 201
    dry_change = apply(server, name, config(name, labels={"a": "2"}), extra="dryRun=All")
    assert dry_change.status == 200 and dry_change.json()["metadata"]["labels"] == {"a": "2"}
    assert get(server, name)["metadata"]["labels"] == {"a": "1"}


BAD_BODIES: list[tuple[str, bytes, int, str]] = [
    ("not-yaml", b"metadata: [unclosed", 400, "not valid YAML"),
    ("a-list", b"- 1\n- 2\n", 400, "must be an object"),
    ("alias-bomb", b"a: &x [1]\nb: *x\n", 400, "aliases are not allowed"),
    (
        "wrong-version",
        b"apiVersion: coredump.example.io/v1\nkind: CoredumpEndpoint\nmetadata: {name: sa-bad}\n",
        400,
        "Incorrect version specified in apply patch. Specified patch version: coredump.example.io/v1, "
        "expected: coredump.example.io/v1alpha1",
    ),
    (
        "wrong-kind",
        b"apiVersion: coredump.example.io/v1alpha1\nkind: Pod\nmetadata: {name: sa-bad}\n",
        400,
        "is not CoredumpEndpoint",
    ),
    ("no-kind", b"apiVersion: coredump.example.io/v1alpha1\nmetadata: {name: sa-bad}\n", 400, "'Kind' is missing"),
    (
        "other-name",
        b"apiVersion: coredump.example.io/v1alpha1\nkind: CoredumpEndpoint\nmetadata: {name: other}\n",
        400,
        "the name of the object (other) does not match the name on the URL (sa-bad)",
    ),
    (
        "other-namespace",
        b"apiVersion: coredump.example.io/v1alpha1\nkind: CoredumpEndpoint\n"
        b"metadata: {name: sa-bad, namespace: kube-system}\n",
        400,
        "does not match the namespace",
    ),
    (
        "managed-fields",
        b"apiVersion: coredump.example.io/v1alpha1\nkind: CoredumpEndpoint\n"
        b"metadata: {name: sa-bad, managedFields: [{manager: x}]}\n",
        400,
        "metadata.managedFields must be nil",
    ),
    (
        "bad-label",
        b"apiVersion: coredump.example.io/v1alpha1\nkind: CoredumpEndpoint\n"
        b"metadata: {name: sa-bad, labels: {'-no': x}}\n",
        422,
        "metadata.labels",
    ),
    (
        "labels-not-a-map",
        b"apiVersion: coredump.example.io/v1alpha1\nkind: CoredumpEndpoint\nmetadata: {name: sa-bad, labels: [1]}\n",
        422,
        "metadata.labels",
    ),
    (
        "bad-pod-uid",
        b"apiVersion: coredump.example.io/v1alpha1\nkind: CoredumpEndpoint\n"
        b"metadata: {name: sa-bad}\nspec: {podUID: 7}\n",
        422,
        "spec.podUID",
    ),
    (
        "huge",
        b"apiVersion: coredump.example.io/v1alpha1\nkind: CoredumpEndpoint\nmetadata: {name: sa-bad, "
        b"annotations: {a: '" + b"x" * (4 * 1024 * 1024) + b"'}}\n",
        413,
        "",
    ),
]


@pytest.mark.parametrize(
    ("body", "code", "text"), [case[1:] for case in BAD_BODIES], ids=[case[0] for case in BAD_BODIES]
)
def test_bad_apply_bodies_get_a_clear_status(server: RunningServer, body: bytes, code: int, text: str) -> None:
    response = apply(server, "sa-bad", body)
    assert response.status == code, response.body
    status = response.json()
    assert status["kind"] == "Status" and status["code"] == code
    assert text in status["message"]
    assert server.request("GET", item_path("sa-bad")).status == 404


def test_strict_field_validation_refuses_unknown_fields_in_an_apply(server: RunningServer) -> None:
    body = config("sa-strict", labels={"a": "1"})
    body["spec"] = {"bogus": 1, "podUID": new_uid()}
    strict = apply(server, "sa-strict", body, extra="fieldValidation=Strict")
    assert status_of(strict, 400, "BadRequest")["message"] == 'strict decoding error: unknown field "spec.bogus"'
    warned = apply(server, "sa-strict", body)
    assert warned.status == 201 and 'unknown field \\"spec.bogus\\"' in warned.headers.get("Warning", "")
    assert "bogus" not in json.dumps(warned.json())


@pytest.mark.parametrize("spec", [[1], "x", 7])
def test_a_spec_that_is_not_an_object_is_422_on_an_existing_object(server: RunningServer, spec: Any) -> None:
    name = "sa-spec"
    if server.request("GET", item_path(name)).status == 404:
        assert apply(server, name, config(name, pod_uid=new_uid())).status == 201
    body = config(name)
    body["spec"] = spec
    status_of(apply(server, name, body), 422, "Invalid")
    merge = server.request("PATCH", item_path(name), body={"spec": spec}, content_type="application/merge-patch+json")
    assert status_of(merge, 422, "Invalid")["details"]["causes"][0]["field"] == "spec"


def test_entries_of_an_unknown_api_version_are_dropped(server: RunningServer) -> None:
    name = "sa-version"
    assert apply(server, name, config(name, labels={"a": "1"}, pod_uid=new_uid())).status == 201
    foreign = [
        {
            "manager": "old",
            "operation": "Update",
            "apiVersion": "coredump.example.io/v0",
            "fieldsType": "FieldsV1",
            "fieldsV1": {"f:metadata": {"f:labels": {"f:a": {}}}},
        }
    ]
    patched = server.request(
        "PATCH",
        item_path(name) + "?fieldManager=p",
        content_type="application/merge-patch+json",
        body={"metadata": {"managedFields": foreign, "labels": {"b": "2"}}},
    )
    assert patched.status == 200, patched.body
    assert set(managers(patched.json())) == {("p", "Update")}
