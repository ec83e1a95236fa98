"""Forbidden messages name the API group of the request's path, as kube-apiserver's do (issue 11, item 5)."""

from apiserver.api import errors


def test_core_group_path_is_not_named_as_ours() -> None:
    error = errors.forbidden(user="alice", verb="list", resource="namespaces", namespace=None, group="")
    assert error.message == (
        'namespaces is forbidden: User "alice" cannot list resource "namespaces" in API group "" at the cluster scope'
    )
    assert error.to_status()["details"] == {"group": "", "kind": "namespaces"}


def test_other_group_is_named_in_the_qualified_resource() -> None:
    error = errors.forbidden(user="bob", verb="get", resource="deployments", namespace="web", name="api", group="apps")
    assert error.message.startswith(
        'deployments.apps "api" is forbidden: User "bob" cannot get resource '
        '"deployments" in API group "apps" in the namespace "web"'
    )


def test_our_group_is_the_default() -> None:
    error = errors.forbidden(user="carol", verb="get", resource="coredumpendpoints", namespace="ns", subresource="dump")
    assert error.message.startswith(
        'coredumpendpoints.coredump.example.io is forbidden: User "carol" cannot get '
        'resource "coredumpendpoints/dump" in API group "coredump.example.io"'
    )
