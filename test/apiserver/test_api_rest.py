"""
The API as kube-apiserver clients see it on the wire: Status errors with the right reasons and codes,
server-managed metadata, field validation, dryRun, lists, selectors, paging, resourceVersion semantics,
output forms, discovery, OpenAPI and health.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from fixtures_apiserver import RunningServer, collection_path, endpoint_manifest, item_path

TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
PARTIAL_LIST = "application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io,application/json"
AGGREGATED = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json"


def create(server: RunningServer, name: str, **kwargs: Any) -> dict[str, Any]:
    namespace = kwargs.pop("namespace", "default")
    response = server.request(
        "POST", collection_path(namespace), body=endpoint_manifest(name, namespace=namespace, **kwargs)
    )
    assert response.status == 201, response.body
    return response.json()


def assert_status(response: Any, code: int, reason: str) -> dict[str, Any]:
    assert response.status == code, response.body
    status = response.json()
    assert status["kind"] == "Status" and status["apiVersion"] == "v1" and status["status"] == "Failure"
    assert status["code"] == code and status["reason"] == reason
    return status


# ---- bad input → Status --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b'{"apiVersion": ', "application/json"),
        (b"\xff\xfe\x00", "application/json"),
        (b"[1, 2", "application/json"),
        (b"a: [unclosed", "application/yaml"),
        (b"a: &x [1]\nb: *x\n", "application/yaml"),
        (b'{"a": NaN}', "application/json"),
        (b"", "application/json"),
    ],
)
def test_malformed_bodies_are_400(apiserver: RunningServer, body: bytes, content_type: str) -> None:
    response = apiserver.request("POST", collection_path(), body=body, content_type=content_type)
    assert_status(response, 400, "BadRequest")


def test_deeply_nested_json_is_400_not_a_crash(apiserver: RunningServer) -> None:
    response = apiserver.request("POST", collection_path(), body=b"[" * 100000 + b"]" * 100000)
    assert response.status in (400, 413)
    assert apiserver.alive()


def test_yaml_body_is_accepted(apiserver: RunningServer) -> None:
    import yaml

    body = yaml.safe_dump(endpoint_manifest("from-yaml"))
    response = apiserver.request("POST", collection_path(), body=body, content_type="application/yaml")
    assert response.status == 201 and response.json()["metadata"]["name"] == "from-yaml"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "Pod"}, "is not CoredumpEndpoint"),
        ({"apiVersion": "coredump.example.io/v2"}, "does not match the expected API version"),
        ({"kind": None}, "Kind' is missing"),
    ],
)
def test_wrong_kind_or_api_version_is_400(apiserver: RunningServer, change: dict[str, Any], message: str) -> None:
    body = endpoint_manifest("wrongkind") | change
    status = assert_status(apiserver.request("POST", collection_path(), body=body), 400, "BadRequest")
    assert message in status["message"]


@pytest.mark.parametrize(
    ("name", "pod_uid", "field"),
    [
        ("Upper-Case", None, "metadata.name"),
        ("a" * 254, None, "metadata.name"),
        ("bad_underscore", None, "metadata.name"),
        ("good-name", "not-a-uid", "spec.podUID"),
        ("good-name", "../../../etc", "spec.podUID"),
    ],
)
def test_invalid_names_and_pod_uids_are_422_with_causes(
    apiserver: RunningServer, name: str, pod_uid: str | None, field: str
) -> None:
    body = endpoint_manifest(name)
    if pod_uid is not None:
        body["spec"]["podUID"] = pod_uid
    status = assert_status(apiserver.request("POST", collection_path(), body=body), 422, "Invalid")
    assert status["details"]["kind"] == "CoredumpEndpoint"
    assert any(cause["field"] == field for cause in status["details"]["causes"])
    assert status["message"].startswith("CoredumpEndpoint.coredump.example.io")


def test_namespace_in_the_url_must_be_a_namespace_name(apiserver: RunningServer) -> None:
    body = endpoint_manifest("web", namespace="Not_A_Namespace")
    status = assert_status(apiserver.request("POST", collection_path("Not_A_Namespace"), body=body), 422, "Invalid")
    assert [cause["field"] for cause in status["details"]["causes"]] == ["metadata.namespace"]


def test_namespace_in_body_must_match_url(apiserver: RunningServer) -> None:
    body = endpoint_manifest("ns-mismatch", namespace="other")
    status = assert_status(apiserver.request("POST", collection_path("default"), body=body), 400, "BadRequest")
    assert "does not match the namespace" in status["message"]


def test_oversized_body_is_413(apiserver: RunningServer) -> None:
    body = endpoint_manifest("huge")
    body["metadata"]["annotations"] = {"big": "x" * (4 * 1024 * 1024)}
    assert_status(apiserver.request("POST", collection_path(), body=body), 413, "RequestEntityTooLarge")


def test_unknown_content_type_is_415(apiserver: RunningServer) -> None:
    response = apiserver.request("POST", collection_path(), body=b"<xml/>", content_type="application/xml")
    assert_status(response, 415, "UnsupportedMediaType")
    create(apiserver, "patch-415")
    response = apiserver.request(
        "PATCH", item_path("patch-415"), body=b"{}", content_type="application/strategic-merge-patch+json"
    )
    assert_status(response, 415, "UnsupportedMediaType")


def test_unknown_paths_and_methods(apiserver: RunningServer) -> None:
    assert_status(apiserver.request("GET", "/apis/coredump.example.io/v1alpha1/nothing"), 404, "NotFound")
    status = assert_status(apiserver.request("PUT", collection_path(), body={}), 405, "MethodNotAllowed")
    assert status["message"].endswith("(PUT)")


def test_get_missing_object_is_404_with_details(apiserver: RunningServer) -> None:
    status = assert_status(apiserver.request("GET", item_path("absent")), 404, "NotFound")
    assert status["message"] == 'coredumpendpoints.coredump.example.io "absent" not found'
    assert status["details"] == {"name": "absent", "group": "coredump.example.io", "kind": "coredumpendpoints"}


def test_no_credentials_is_401(apiserver: RunningServer) -> None:
    assert_status(apiserver.request("GET", collection_path(), user=None), 401, "Unauthorized")


# ---- writes ----------------------------------------------------------------------------------------


def test_server_manages_uid_timestamps_generation_and_resource_version(apiserver: RunningServer) -> None:
    body = endpoint_manifest("managed")
    body["metadata"].update(uid="client-chosen", resourceVersion="999", creationTimestamp="2000-01-01T00:00:00Z")
    obj = apiserver.request("POST", collection_path(), body=body).json()
    assert obj["metadata"]["uid"] != "client-chosen" and uuid.UUID(obj["metadata"]["uid"])
    assert obj["metadata"]["creationTimestamp"] != "2000-01-01T00:00:00Z"
    assert obj["metadata"]["generation"] == 1 and obj["metadata"]["resourceVersion"].isdigit()
    obj["metadata"]["labels"] = {"a": "b"}
    updated = apiserver.request("PUT", item_path("managed"), body=obj).json()
    assert updated["metadata"]["generation"] == 1, "metadata changes do not bump generation"
    assert int(updated["metadata"]["resourceVersion"]) > int(obj["metadata"]["resourceVersion"])
    assert updated["metadata"]["uid"] == obj["metadata"]["uid"]


def test_update_with_stale_resource_version_is_409_conflict(apiserver: RunningServer) -> None:
    obj = create(apiserver, "conflicted")
    fresh = dict(obj, metadata=dict(obj["metadata"], labels={"v": "1"}))
    assert apiserver.request("PUT", item_path("conflicted"), body=fresh).status == 200
    stale = dict(obj, metadata=dict(obj["metadata"], labels={"v": "2"}))
    status = assert_status(apiserver.request("PUT", item_path("conflicted"), body=stale), 409, "Conflict")
    assert "the object has been modified" in status["message"]


def test_create_twice_is_409_already_exists(apiserver: RunningServer) -> None:
    create(apiserver, "twice")
    response = apiserver.request("POST", collection_path(), body=endpoint_manifest("twice"))
    assert_status(response, 409, "AlreadyExists")


def test_generate_name(apiserver: RunningServer) -> None:
    body = endpoint_manifest("")
    del body["metadata"]["name"]
    body["metadata"]["generateName"] = "crashy-"
    first = apiserver.request("POST", collection_path(), body=body).json()
    second = apiserver.request("POST", collection_path(), body=body).json()
    assert first["metadata"]["name"].startswith("crashy-") and len(first["metadata"]["name"]) == len("crashy-") + 5
    assert first["metadata"]["name"] != second["metadata"]["name"]


def test_field_validation_strict_warn_ignore(apiserver: RunningServer) -> None:
    body = endpoint_manifest("fv-strict")
    body["spec"]["extra"] = 1
    status = assert_status(
        apiserver.request("POST", collection_path() + "?fieldValidation=Strict", body=body), 400, "BadRequest"
    )
    assert status["message"] == 'strict decoding error: unknown field "spec.extra"'

    duplicated = (
        '{"apiVersion":"coredump.example.io/v1alpha1","kind":"CoredumpEndpoint",'
        '"metadata":{"name":"fv-dup","name":"fv-dup"},"spec":{}}'
    )
    status = assert_status(
        apiserver.request("POST", collection_path() + "?fieldValidation=Strict", body=duplicated), 400, "BadRequest"
    )
    assert 'duplicate field "name"' in status["message"]

    body["metadata"]["name"] = "fv-warn"
    warned = apiserver.request("POST", collection_path() + "?fieldValidation=Warn", body=body)
    assert warned.status == 201
    assert warned.headers.get_all("Warning") == ['299 - "unknown field \\"spec.extra\\""']
    assert "extra" not in warned.json()["spec"], "unknown fields are dropped, never stored"

    body["metadata"]["name"] = "fv-ignore"
    ignored = apiserver.request("POST", collection_path() + "?fieldValidation=Ignore", body=body)
    assert ignored.status == 201 and not ignored.headers.get_all("Warning")
    assert_status(apiserver.request("POST", collection_path() + "?fieldValidation=Loose", body=body), 400, "BadRequest")


def test_dry_run_validates_but_does_not_persist(apiserver: RunningServer) -> None:
    response = apiserver.request("POST", collection_path() + "?dryRun=All", body=endpoint_manifest("dry"))
    assert response.status == 201 and response.json()["metadata"]["name"] == "dry"
    assert apiserver.request("GET", item_path("dry")).status == 404
    create(apiserver, "dry-delete")
    assert apiserver.request("DELETE", item_path("dry-delete") + "?dryRun=All").status == 200
    assert apiserver.request("GET", item_path("dry-delete")).status == 200
    assert_status(
        apiserver.request("POST", collection_path() + "?dryRun=Some", body=endpoint_manifest("d2")), 400, "BadRequest"
    )


def test_json_patch_and_merge_patch(apiserver: RunningServer) -> None:
    create(apiserver, "patched")
    ops = [
        {"op": "add", "path": "/metadata/labels", "value": {"tier": "db"}},
        {"op": "test", "path": "/metadata/labels/tier", "value": "db"},
    ]
    response = apiserver.request("PATCH", item_path("patched"), body=ops, content_type="application/json-patch+json")
    assert response.status == 200 and response.json()["metadata"]["labels"] == {"tier": "db"}
    failed = apiserver.request(
        "PATCH",
        item_path("patched"),
        body=[{"op": "test", "path": "/metadata/name", "value": "other"}],
        content_type="application/json-patch+json",
    )
    assert_status(failed, 422, "Invalid")
    merged = apiserver.request(
        "PATCH",
        item_path("patched"),
        body={"metadata": {"labels": {"tier": None}}},
        content_type="application/merge-patch+json",
    )
    assert merged.status == 200 and "tier" not in (merged.json()["metadata"].get("labels") or {})


def test_delete_honors_preconditions_and_returns_the_object(apiserver: RunningServer) -> None:
    obj = create(apiserver, "precond")
    wrong = {"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": str(uuid.uuid4())}}
    assert_status(apiserver.request("DELETE", item_path("precond"), body=wrong), 409, "Conflict")
    right = {"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": obj["metadata"]["uid"]}}
    deleted = apiserver.request("DELETE", item_path("precond"), body=right)
    assert deleted.status == 200 and deleted.json()["metadata"]["uid"] == obj["metadata"]["uid"]
    assert apiserver.request("GET", item_path("precond")).status == 404


def test_delete_collection_by_label(apiserver: RunningServer) -> None:
    for i in range(3):
        create(apiserver, f"coll-{i}", namespace="sweep", labels={"sweep": "yes" if i < 2 else "no"})
    response = apiserver.request("DELETE", collection_path("sweep") + "?labelSelector=sweep%3Dyes")
    assert response.status == 200
    assert sorted(i["metadata"]["name"] for i in response.json()["items"]) == ["coll-0", "coll-1"]
    left = apiserver.request("GET", collection_path("sweep")).json()["items"]
    assert [i["metadata"]["name"] for i in left] == ["coll-2"]


# ---- reads -----------------------------------------------------------------------------------------


def test_list_paging_is_consistent_with_limit_and_continue(apiserver: RunningServer) -> None:
    names = [f"page-{i:02d}" for i in range(7)]
    for name in names:
        create(apiserver, name, namespace="paging")
    first = apiserver.request("GET", collection_path("paging") + "?limit=3").json()
    assert [i["metadata"]["name"] for i in first["items"]] == names[:3]
    token = first["metadata"]["continue"]
    create(apiserver, "page-late", namespace="paging")  # after the snapshot: not part of this list
    seen = list(first["items"])
    while token:
        page = apiserver.request("GET", collection_path("paging") + f"?limit=3&continue={token}").json()
        assert page["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
        seen += page["items"]
        token = page["metadata"].get("continue")
    assert [i["metadata"]["name"] for i in seen] == names
    assert_status(apiserver.request("GET", collection_path("paging") + "?limit=3&continue=garbage"), 400, "BadRequest")


def test_label_and_field_selectors(apiserver: RunningServer) -> None:
    create(apiserver, "sel-a", namespace="sel", labels={"app": "a", "tier": "web"})
    create(apiserver, "sel-b", namespace="sel", labels={"app": "b"})
    create(apiserver, "sel-c", namespace="sel")

    def names(query: str) -> list[str]:
        response = apiserver.request("GET", collection_path("sel") + "?" + query)
        assert response.status == 200, response.body
        return [i["metadata"]["name"] for i in response.json()["items"]]

    assert names("labelSelector=app%3Da") == ["sel-a"]
    assert names("labelSelector=app%21%3Da") == ["sel-b", "sel-c"]
    assert names("labelSelector=app%20in%20(a,b)") == ["sel-a", "sel-b"]
    assert names("labelSelector=app,tier") == ["sel-a"]
    assert names("labelSelector=%21app") == ["sel-c"]
    assert names("fieldSelector=metadata.name%3Dsel-b") == ["sel-b"]
    assert names("fieldSelector=metadata.name%21%3Dsel-b") == ["sel-a", "sel-c"]
    assert_status(
        apiserver.request("GET", collection_path("sel") + "?fieldSelector=spec.podUID%3Dx"), 400, "BadRequest"
    )


def test_list_across_namespaces_and_resource_version(apiserver: RunningServer) -> None:
    create(apiserver, "x1", namespace="ns-one")
    create(apiserver, "x1", namespace="ns-two")
    listed = apiserver.request("GET", "/apis/coredump.example.io/v1alpha1/coredumpendpoints").json()
    assert listed["kind"] == "CoredumpEndpointList"
    assert {("ns-one", "x1"), ("ns-two", "x1")} <= {
        (i["metadata"]["namespace"], i["metadata"]["name"]) for i in listed["items"]
    }
    assert all(i["kind"] == "CoredumpEndpoint" for i in listed["items"]) or all(
        "kind" not in i for i in listed["items"]
    )
    rv = int(listed["metadata"]["resourceVersion"])
    too_new = apiserver.request(
        "GET", collection_path() + f"?resourceVersion={rv + 1000}&resourceVersionMatch=NotOlderThan"
    )
    assert_status(too_new, 504, "Timeout")
    assert_status(apiserver.request("GET", collection_path() + "?resourceVersionMatch=Exact"), 400, "BadRequest")
    exact = apiserver.request(
        "GET", f"/apis/coredump.example.io/v1alpha1/coredumpendpoints?resourceVersion={rv}&resourceVersionMatch=Exact"
    )
    assert exact.status == 200 and exact.json()["metadata"]["resourceVersion"] == str(rv)


def test_table_and_partial_object_metadata(apiserver: RunningServer) -> None:
    obj = create(apiserver, "tabled", namespace="tables")
    table = apiserver.request("GET", collection_path("tables"), headers={"Accept": TABLE}).json()
    assert table["kind"] == "Table" and table["apiVersion"] == "meta.k8s.io/v1"
    assert [c["name"] for c in table["columnDefinitions"] if c["priority"] == 0] == [
        "Name",
        "Pod UID",
        "Cores",
        "Last Signal",
        "Last Crash",
        "Top Frame",
        "Age",
    ]
    row = table["rows"][0]
    assert row["cells"][:3] == ["tabled", obj["spec"]["podUID"], 0]
    assert row["object"]["kind"] == "PartialObjectMetadata" and row["object"]["metadata"]["name"] == "tabled"
    full = apiserver.request(
        "GET", collection_path("tables") + "?includeObject=Object", headers={"Accept": TABLE}
    ).json()
    assert full["rows"][0]["object"]["spec"]["podUID"] == obj["spec"]["podUID"]

    partial = apiserver.request("GET", collection_path("tables"), headers={"Accept": PARTIAL_LIST}).json()
    assert partial["kind"] == "PartialObjectMetadataList" and partial["apiVersion"] == "meta.k8s.io/v1"
    assert partial["metadata"]["resourceVersion"]
    assert partial["items"][0] == {
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj["metadata"],
    }
    one = apiserver.request(
        "GET",
        item_path("tabled", "tables"),
        headers={"Accept": "application/json;as=PartialObjectMetadata;v=v1;g=meta.k8s.io"},
    )
    assert one.json()["kind"] == "PartialObjectMetadata"
    refused = apiserver.request("GET", collection_path("tables"), headers={"Accept": "application/protobuf"})
    assert_status(refused, 406, "NotAcceptable")


# ---- discovery, OpenAPI, health ------------------------------------------------------------------


def test_legacy_discovery(apiserver: RunningServer) -> None:
    groups = apiserver.request("GET", "/apis").json()
    assert groups["kind"] == "APIGroupList"
    assert groups["groups"][0]["preferredVersion"] == {
        "groupVersion": "coredump.example.io/v1alpha1",
        "version": "v1alpha1",
    }
    resources = apiserver.request("GET", "/apis/coredump.example.io/v1alpha1").json()
    assert resources["kind"] == "APIResourceList" and resources["apiVersion"] == "v1"
    by_name = {r["name"]: r for r in resources["resources"]}
    assert by_name["coredumpendpoints/dump"]["verbs"] == ["get"]
    assert set(by_name["coredumpendpoints"]["verbs"]) >= {
        "create",
        "get",
        "list",
        "watch",
        "delete",
        "deletecollection",
        "patch",
        "update",
    }
    assert by_name["coredumpendpoints"]["shortNames"] == ["cde"]


def test_aggregated_discovery_with_etag(apiserver: RunningServer) -> None:
    response = apiserver.request("GET", "/apis", headers={"Accept": AGGREGATED})
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
    document = response.json()
    assert document["kind"] == "APIGroupDiscoveryList" and document["apiVersion"] == "apidiscovery.k8s.io/v2"
    resource = document["items"][0]["versions"][0]["resources"][0]
    assert resource["resource"] == "coredumpendpoints" and resource["scope"] == "Namespaced"
    assert resource["subresources"][0]["subresource"] == "dump"
    etag = response.headers["ETag"]
    again = apiserver.request("GET", "/apis", headers={"Accept": AGGREGATED, "If-None-Match": etag})
    assert again.status == 304 and not again.body


def test_discovery_for_a_user_without_groups(apiserver: RunningServer) -> None:
    assert apiserver.request("GET", "/apis", user="viewer").status == 200
    assert apiserver.request("GET", "/apis/coredump.example.io/v1alpha1", user="viewer").status == 200


def test_openapi_v2_and_v3_carry_gvk_and_field_validation(apiserver: RunningServer) -> None:
    v2 = apiserver.request("GET", "/openapi/v2", headers={"Accept": "application/json"}).json()
    definition = v2["definitions"]["io.example.coredump.v1alpha1.CoredumpEndpoint"]
    assert definition["x-kubernetes-group-version-kind"] == [
        {"group": "coredump.example.io", "version": "v1alpha1", "kind": "CoredumpEndpoint"}
    ]
    root = apiserver.request("GET", "/openapi/v3").json()
    url = root["paths"]["apis/coredump.example.io/v1alpha1"]["serverRelativeURL"]
    response = apiserver.request("GET", url)
    assert "immutable" in response.headers["Cache-Control"]
    v3 = response.json()
    patch_ops = [ops["patch"] for ops in v3["paths"].values() if "patch" in ops]
    assert len(patch_ops) == 1
    assert patch_ops[0]["x-kubernetes-group-version-kind"]["kind"] == "CoredumpEndpoint"
    assert {"name": "fieldValidation", "in": "query"}.items() <= next(
        p for p in patch_ops[0]["parameters"] if p["name"] == "fieldValidation"
    ).items()
    stale = apiserver.request("GET", "/openapi/v3/apis/coredump.example.io/v1alpha1?hash=OLD")
    assert stale.status == 301 and stale.headers["Location"] == url


def test_health_and_version(apiserver: RunningServer) -> None:
    for path in ("/healthz", "/livez", "/readyz"):
        response = apiserver.request("GET", path, user=None)
        assert response.status == 200 and response.body == b"ok"
    verbose = apiserver.request("GET", "/readyz?verbose", user=None)
    assert b"[+]storage ok" in verbose.body and b"readyz check passed" in verbose.body
    version = apiserver.request("GET", "/version").json()
    assert version["gitVersion"].startswith("v") and version["major"] == "0"
