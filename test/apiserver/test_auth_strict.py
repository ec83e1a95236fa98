"""
Fail closed on every answer from the cluster, and read credentials as k8s.io/apiserver reads them.

The readers of TokenReview, SubjectAccessReview and the authentication ConfigMap get arbitrary JSON and
arbitrary bytes (hypothesis): they return a verdict or raise ``MalformedAnswer``, nothing else, and only a
JSON ``true`` ever allows or authenticates. Then the same malformed answers come from the fake
kube-apiserver over real TLS to the real middleware: 401 for authentication, 500 InternalError for
authorization (kube-apiserver's answer when its authorizer errs), never a 200.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apiserver.auth.authconfig import AuthConfigError
from apiserver.auth.options import add_auth_flags
from apiserver.auth.pipeline import AlwaysAllowPaths
from apiserver.auth.reviews import (
    MalformedAnswer,
    parse_configmap_data,
    parse_subject_access_review,
    parse_token_review,
)
from fake_kube import FakeKube
from apiserver_harness import App, front_proxy, start_app

GV = "/apis/coredump.example.io/v1alpha1"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def sar(status: Any, *, kind: str = "SubjectAccessReview", api_version: str = "authorization.k8s.io/v1") -> str:
    return json.dumps({"kind": kind, "apiVersion": api_version, "status": status})


def token_review(status: Any, *, kind: str = "TokenReview", api_version: str = "authentication.k8s.io/v1") -> str:
    return json.dumps({"kind": kind, "apiVersion": api_version, "status": status})


# --- the readers, alone ----------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200) | json_values.map(json.dumps))
def test_any_bytes_are_a_verdict_or_malformed_never_a_crash(body: bytes | str) -> None:
    for parse in (
        parse_token_review,
        parse_subject_access_review,
        lambda b: parse_configmap_data(b, name="x", namespace="y"),
    ):
        try:
            parse(body)
        except MalformedAnswer:
            pass


@settings(max_examples=400, deadline=None)
@given(allowed=json_values, denied=json_values, reason=json_values)
def test_only_a_json_true_allows(allowed: Any, denied: Any, reason: Any) -> None:
    try:
        decision = parse_subject_access_review(sar({"allowed": allowed, "denied": denied, "reason": reason}))
    except MalformedAnswer:
        return
    if decision.allowed:
        assert allowed is True and denied in (None, False)


@settings(max_examples=400, deadline=None)
@given(authenticated=json_values, user=json_values)
def test_only_a_json_true_with_a_user_name_authenticates(authenticated: Any, user: Any) -> None:
    try:
        result = parse_token_review(token_review({"authenticated": authenticated, "user": user}))
    except MalformedAnswer:
        return
    if result.user is not None:
        assert authenticated is True and isinstance(user, dict) and isinstance(user["username"], str)
        assert result.user.name == user["username"] != ""
        assert all(isinstance(g, str) for g in result.user.groups)


@settings(max_examples=200, deadline=None)
@given(
    status=json_values,
    kind=st.sampled_from(["SubjectAccessReview", "Status", "TokenReview", ""]),
    api_version=st.sampled_from(["authorization.k8s.io/v1", "authorization.k8s.io/v1beta1", "v1"]),
)
def test_another_kind_or_version_never_allows(status: Any, kind: str, api_version: str) -> None:
    body = sar(
        {"allowed": True} if not isinstance(status, dict) else {**status, "allowed": True},
        kind=kind,
        api_version=api_version,
    )
    try:
        decision = parse_subject_access_review(body)
    except MalformedAnswer:
        return
    assert (kind, api_version) == ("SubjectAccessReview", "authorization.k8s.io/v1") and decision.allowed


@pytest.mark.parametrize(
    "status",
    [
        {"allowed": "false"},
        {"allowed": "true"},
        {"allowed": 1},
        {},
        {"allowed": True, "denied": True},
        {"allowed": True, "reason": 5},
        {"allowed": False, "evaluationError": ["x"]},
    ],
)
def test_malformed_subject_access_reviews_are_refused(status: dict[str, Any]) -> None:
    with pytest.raises(MalformedAnswer):
        parse_subject_access_review(sar(status))


@pytest.mark.parametrize(
    "status",
    [
        {"authenticated": "false", "user": {"username": "eve"}},
        {"authenticated": "true", "user": {"username": "eve"}},
        {"authenticated": 1, "user": {"username": "eve"}},
        {"authenticated": True},
        {"authenticated": True, "user": {"username": ""}},
        {"authenticated": True, "user": {"username": ["eve"]}},
        {"authenticated": True, "user": {"username": "eve", "groups": "system:masters"}},
        {"authenticated": True, "user": {"username": "eve", "extra": {"k": "v"}}},
    ],
)
def test_malformed_token_reviews_are_refused(status: dict[str, Any]) -> None:
    with pytest.raises(MalformedAnswer):
        parse_token_review(token_review(status))


def test_well_formed_answers_are_read() -> None:
    assert parse_subject_access_review(sar({"allowed": True, "reason": "RBAC"})).allowed
    assert not parse_subject_access_review(sar({"allowed": False, "denied": True})).allowed
    result = parse_token_review(
        token_review(
            {
                "authenticated": True,
                "user": {"username": "alice", "uid": "1", "groups": ["a"], "extra": {"scopes": ["x"]}},
            }
        )
    )
    assert result.user is not None and (result.user.name, result.user.groups) == ("alice", ("a",))
    assert result.user.extra == {"scopes": ("x",)}
    assert parse_token_review(token_review({"authenticated": False, "error": "expired"})).error == "expired"
    assert parse_token_review(token_review({"user": {}})).user is None


def test_configmap_must_be_the_one_asked_for() -> None:
    good = {
        "kind": "ConfigMap",
        "apiVersion": "v1",
        "metadata": {"name": "extension-apiserver-authentication", "namespace": "kube-system"},
        "data": {"client-ca-file": "PEM"},
    }
    assert parse_configmap_data(
        json.dumps(good), name="extension-apiserver-authentication", namespace="kube-system"
    ) == {"client-ca-file": "PEM"}
    for bad in (
        {**good, "kind": "Secret"},
        {**good, "data": {"client-ca-file": ["PEM"]}},
        {**good, "metadata": {"name": "other", "namespace": "kube-system"}},
        [good],
    ):
        with pytest.raises(MalformedAnswer):
            parse_configmap_data(json.dumps(bad), name="extension-apiserver-authentication", namespace="kube-system")


# --- the same answers from the fake cluster, through the real middleware ----------------------------------------


async def test_malformed_subject_access_review_is_500_never_an_allow(app: App) -> None:
    app.fake.add_token("token-alice", user="alice", groups=["team-a"])
    path = f"{GV}/namespaces/a/coredumpendpoints/web"
    for index, answer in enumerate(
        [
            ("application/json", sar({"allowed": "false"}).encode()),
            ("application/json", sar({"allowed": True, "denied": True}).encode()),
            ("text/html", b"<html><body>502 Bad Gateway</body></html>"),
            ("application/json", b'{"kind": "Status", "apiVersion": "v1", "code": 200}'),
        ]
    ):
        app.fake.sar_answer = answer
        # A new name each time: the cache never holds a failure, but be sure each answer is asked for.
        status, body = await app.get(f"{path}{index}", token="token-alice")
        assert (status, body["reason"]) == (500, "InternalError"), answer
        assert body["message"].startswith("Internal error occurred: ")
    app.fake.sar_answer = None
    app.fake.allow(verbs=["get"], groups=["team-a"], resources=["coredumpendpoints"], namespaces=["a"])
    assert (await app.get(f"{path}0", token="token-alice"))[0] == 200  # the refusals were not cached


async def test_malformed_token_review_is_401(app: App) -> None:
    app.fake.allow(verbs=["get"], non_resource_urls=["/whoami"], users=["eve"])
    for index, answer in enumerate(
        [
            ("application/json", token_review({"authenticated": "false", "user": {"username": "eve"}}).encode()),
            (
                "application/json",
                token_review({"authenticated": True, "user": {"username": "eve"}}, kind="SubjectAccessReview").encode(),
            ),
            ("text/html", b"<!DOCTYPE html><title>Sign in</title>"),
            ("application/json", b"[]"),
        ]
    ):
        app.fake.token_review_answer = answer
        status, body = await app.get("/whoami", token=f"token-eve-{index}")
        assert (status, body["reason"]) == (401, "Unauthorized"), answer


async def test_a_malformed_configmap_stops_startup(fake_kube: FakeKube, tmp_path: Path) -> None:
    fake_kube.configmap_answer = (
        "application/json",
        json.dumps(
            {
                "kind": "ConfigMap",
                "apiVersion": "v1",
                "metadata": {"name": "extension-apiserver-authentication", "namespace": "kube-system"},
                "data": {"client-ca-file": {"not": "a string"}},
            }
        ).encode(),
    )
    with pytest.raises(AuthConfigError, match="data.client-ca-file must be a string"):
        await start_app(fake_kube, tmp_path)
    fake_kube.configmap_answer = ("text/html", b"<html>login</html>")
    with pytest.raises(AuthConfigError, match="not JSON"):
        await start_app(fake_kube, tmp_path)


# --- credentials as k8s.io/apiserver reads them ----------------------------------------------------------------


async def test_username_header_first_value_and_empty_user_refused(app: App) -> None:
    app.fake.allow(verbs=["get"], non_resource_urls=["/whoami"], users=["alice", "mallory"])
    status, body = await app.get(
        "/whoami", cert=front_proxy(app), headers=[("X-Remote-User", "alice"), ("X-Remote-User", "mallory")]
    )
    assert (status, body["user"]) == (200, "alice")
    # An empty first value is no user, even when a later header names one (Go's Header.Get).
    status, body = await app.get(
        "/whoami", cert=front_proxy(app), headers=[("X-Remote-User", ""), ("X-Remote-User", "mallory")]
    )
    assert (status, body["reason"]) == (401, "Unauthorized")


async def test_bearer_scheme_is_strict(app: App) -> None:
    app.fake.add_token("token-alice", user="alice")
    app.fake.allow(verbs=["get"], non_resource_urls=["/whoami"], users=["alice"])
    ok = await app.get("/whoami", headers=[("Authorization", "bearer token-alice")])
    assert (ok[0], ok[1]["user"]) == (200, "alice")
    reviews = len(app.fake.token_reviews)
    for header in ("Bearer  token-alice", "Bearer\ttoken-alice", "Bearertoken-alice", "Basic token-alice"):
        status, body = await app.get("/whoami", headers=[("Authorization", header)])
        assert (status, body["reason"]) == (401, "Unauthorized"), header
    assert len(app.fake.token_reviews) == reviews  # none of them was even a token to review


async def test_always_allow_paths_are_exact_or_trailing_star(fake_kube: FakeKube, tmp_path: Path) -> None:
    runner, app = await start_app(fake_kube, tmp_path, "--authorization-always-allow-paths=/healthz,debug/*")
    try:
        assert (await app.get("/healthz"))[1]["user"] == "system:anonymous"
        assert (await app.get("/debug/pprof"))[1]["user"] == "system:anonymous"
        for path in ("/healthz/etcd", "/healthzX", "/livez", f"{GV}/namespaces/debug/coredumpendpoints"):
            assert (await app.get(path))[0] == 401, path
    finally:
        await runner.cleanup()
        await app.setup.close()


def test_always_allow_paths_refuse_an_inner_star() -> None:
    parser = argparse.ArgumentParser()
    add_auth_flags(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--authorization-always-allow-paths=/a*/b"])
    matcher = AlwaysAllowPaths(["/", "/metrics"])
    assert matcher("/", is_resource_request=False) and matcher("metrics", is_resource_request=False)
    assert not matcher("/metrics/x", is_resource_request=False)
    assert not matcher("/metrics", is_resource_request=True)
