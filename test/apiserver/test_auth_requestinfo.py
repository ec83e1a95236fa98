"""Verbs and attributes exactly as kube-apiserver's RequestInfoFactory derives them (what RBAC rules see)."""

from __future__ import annotations

import pytest

from apiserver.auth import UserInfo
from apiserver.auth.requestinfo import request_attributes

GV = "/apis/coredump.example.io/v1alpha1"
NS = f"{GV}/namespaces/team-a/coredumpendpoints"


@pytest.mark.parametrize(
    ("method", "path", "query", "expected"),
    [
        ("GET", f"{NS}/web", {}, ("get", "coredumpendpoints", "", "team-a", "web")),
        ("HEAD", f"{NS}/web", {}, ("get", "coredumpendpoints", "", "team-a", "web")),
        ("GET", NS, {}, ("list", "coredumpendpoints", "", "team-a", "")),
        ("GET", NS, {"watch": "true"}, ("watch", "coredumpendpoints", "", "team-a", "")),
        ("GET", NS, {"watch": "1"}, ("watch", "coredumpendpoints", "", "team-a", "")),
        ("GET", NS, {"watch": "false"}, ("list", "coredumpendpoints", "", "team-a", "")),
        ("GET", f"{GV}/coredumpendpoints", {}, ("list", "coredumpendpoints", "", "", "")),
        (
            "GET",
            f"{GV}/watch/namespaces/team-a/coredumpendpoints",
            {},
            ("watch", "coredumpendpoints", "", "team-a", ""),
        ),
        (
            "GET",
            NS,
            {"watch": "true", "fieldSelector": "metadata.name=web"},
            ("watch", "coredumpendpoints", "", "team-a", "web"),
        ),
        ("GET", f"{NS}/web/dump", {"container": "app"}, ("get", "coredumpendpoints", "dump", "team-a", "web")),
        ("POST", NS, {}, ("create", "coredumpendpoints", "", "team-a", "")),
        ("PUT", f"{NS}/web", {}, ("update", "coredumpendpoints", "", "team-a", "web")),
        ("PATCH", f"{NS}/web", {}, ("patch", "coredumpendpoints", "", "team-a", "web")),
        ("DELETE", f"{NS}/web", {}, ("delete", "coredumpendpoints", "", "team-a", "web")),
        ("DELETE", NS, {}, ("deletecollection", "coredumpendpoints", "", "team-a", "")),
        ("GET", "/api/v1/namespaces/team-a", {}, ("get", "namespaces", "", "team-a", "team-a")),
        ("PUT", "/api/v1/namespaces/team-a/finalize", {}, ("update", "namespaces", "finalize", "team-a", "team-a")),
    ],
)
def test_resource_requests(
    method: str, path: str, query: dict[str, str], expected: tuple[str, str, str, str, str]
) -> None:
    attrs = request_attributes(method=method, path=path, query=query, user=UserInfo(name="u"))
    assert attrs.is_resource_request
    assert (attrs.verb, attrs.resource, attrs.subresource, attrs.namespace, attrs.name) == expected


@pytest.mark.parametrize(
    ("method", "path", "verb"),
    [
        ("GET", "/apis", "get"),
        ("GET", "/apis/coredump.example.io", "get"),
        ("GET", GV, "get"),
        ("GET", "/api/v1", "get"),
        ("GET", "/openapi/v3/apis/coredump.example.io/v1alpha1", "get"),
        ("GET", "/healthz/etcd", "get"),
        ("POST", "/version", "post"),
        ("GET", "/", "get"),
    ],
)
def test_non_resource_requests(method: str, path: str, verb: str) -> None:
    attrs = request_attributes(method=method, path=path, query={}, user=UserInfo(name="u"))
    assert not attrs.is_resource_request
    assert (attrs.verb, attrs.path) == (verb, path)


def test_group_and_version_are_reported() -> None:
    attrs = request_attributes(method="GET", path=f"{NS}/web/dump", query={}, user=UserInfo(name="u"))
    assert (attrs.api_group, attrs.api_version) == ("coredump.example.io", "v1alpha1")
