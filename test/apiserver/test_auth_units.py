"""Decision caching, token caching, the dev rule table and the audit line, each against real collaborators."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest
from aiohttp.test_utils import make_mocked_request
from cryptography import x509
from kubernetes_asyncio import config

from apiserver import context
from apiserver.auth import RequestAttributes, UserInfo
from apiserver.auth.audit import audit_dump
from apiserver.logs import JsonFormatter
from handler.flags import parse_duration
from apiserver.auth.sar import SubjectAccessReviewAuthorizer
from apiserver.auth.static import StaticAuthorizer, dev_rules
from apiserver.auth.tokenreview import TokenReviewAuthenticator
from apiserver.auth.x509 import CABundle
from fake_kube import FakeKube, TestCA

GROUP = "coredump.example.io"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def attrs(user: UserInfo, verb: str, namespace: str, *, subresource: str = "") -> RequestAttributes:
    return RequestAttributes(
        user=user,
        verb=verb,
        path="",
        is_resource_request=True,
        api_group=GROUP,
        api_version="v1alpha1",
        resource="coredumpendpoints",
        subresource=subresource,
        namespace=namespace,
        name="web",
    )


async def test_sar_cache_honors_allowed_and_denied_ttls(fake_kube: FakeKube, tmp_path: Path) -> None:
    fake_kube.allow(verbs=["get"], users=["alice"], resources=["coredumpendpoints"], namespaces=["a"])
    clock = Clock()
    api = await config.new_client_from_config(config_file=str(fake_kube.write_kubeconfig(tmp_path / "kc")))
    async with api:
        authorizer = SubjectAccessReviewAuthorizer(api_client=api, authorized_ttl=10, unauthorized_ttl=3, clock=clock)
        alice = UserInfo(name="alice", groups=("system:authenticated",))
        allowed, denied = attrs(alice, "get", "a"), attrs(alice, "get", "b")

        assert (await authorizer.authorize(allowed)).allowed
        assert not (await authorizer.authorize(denied)).allowed
        assert len(fake_kube.sar_requests) == 2
        clock.now += 2.9
        assert (await authorizer.authorize(allowed)).allowed
        assert not (await authorizer.authorize(denied)).allowed
        assert len(fake_kube.sar_requests) == 2  # both answered from the cache

        # The denied answer expires first: a rule granted meanwhile takes effect then.
        fake_kube.allow(verbs=["get"], users=["alice"], resources=["coredumpendpoints"], namespaces=["b"])
        clock.now += 0.2
        assert (await authorizer.authorize(denied)).allowed
        assert (await authorizer.authorize(allowed)).allowed
        assert len(fake_kube.sar_requests) == 3

        clock.now += 7
        assert (await authorizer.authorize(allowed)).allowed
        assert len(fake_kube.sar_requests) == 4

        # A different user (or group set) is a different question.
        await authorizer.authorize(attrs(UserInfo(name="alice", groups=("x",)), "get", "a"))
        assert len(fake_kube.sar_requests) == 5


async def test_token_reviews_are_cached_per_token(fake_kube: FakeKube, tmp_path: Path) -> None:
    fake_kube.add_token("tok", user="alice", groups=["team-a"])
    clock = Clock()
    api = await config.new_client_from_config(config_file=str(fake_kube.write_kubeconfig(tmp_path / "kc")))
    async with api:
        authenticator = TokenReviewAuthenticator(api_client=api, cache_ttl=10, clock=clock)
        request = make_mocked_request("GET", "/apis", headers={"Authorization": "Bearer tok"})
        user = await authenticator.authenticate(request)
        assert user is not None and user.name == "alice" and "team-a" in user.groups
        await authenticator.authenticate(request)
        assert len(fake_kube.token_reviews) == 1
        assert fake_kube.token_reviews[0]["spec"]["token"] == "tok"
        clock.now += 10
        await authenticator.authenticate(request)
        assert len(fake_kube.token_reviews) == 2
        assert await authenticator.authenticate(make_mocked_request("GET", "/apis")) is None


async def test_dev_rules_let_viewers_read_default_but_not_dump() -> None:
    authorizer = StaticAuthorizer(dev_rules())
    viewer = UserInfo(name="dev-viewer", groups=("dev-viewers", "system:authenticated"))
    assert (await authorizer.authorize(attrs(viewer, "get", "default"))).allowed
    assert (await authorizer.authorize(attrs(viewer, "watch", "default"))).allowed
    assert not (await authorizer.authorize(attrs(viewer, "get", "default", subresource="dump"))).allowed
    assert not (await authorizer.authorize(attrs(viewer, "get", "kube-system"))).allowed
    assert not (await authorizer.authorize(attrs(viewer, "delete", "default"))).allowed
    discovery = RequestAttributes(
        user=UserInfo(name="x", groups=("system:authenticated",)),
        verb="get",
        path="/apis/coredump.example.io/v1alpha1",
        is_resource_request=False,
    )
    assert (await authorizer.authorize(discovery)).allowed


def test_audit_logs_one_json_line_per_dump(caplog: pytest.LogCaptureFixture) -> None:
    request = make_mocked_request(
        "GET", "/apis/coredump.example.io/v1alpha1/namespaces/a/coredumpendpoints/web/dump?container=app"
    )
    request[context.USER] = UserInfo(name="alice", groups=("team-a", "system:authenticated"))
    with caplog.at_level(logging.INFO, logger="coredump.audit"):
        audit_dump(request=request, namespace="a", pod="web", cores=2, bytes_sent=12345, outcome="complete", code=200)
    records = [r for r in caplog.records if r.name == "coredump.audit"]
    assert len(records) == 1
    text = JsonFormatter().format(records[0])
    assert "\n" not in text
    line = json.loads(text)
    assert {k: line[k] for k in ("user", "groups", "namespace", "pod", "cores", "bytes", "outcome")} == {
        "user": "alice",
        "groups": ["team-a", "system:authenticated"],
        "namespace": "a",
        "pod": "web",
        "cores": 2,
        "bytes": 12345,
        "outcome": "complete",
    }


@pytest.mark.parametrize(
    ("text", "seconds"), [("10s", 10), ("1m30s", 90), ("500ms", 0.5), ("2h", 7200), ("0", 0), ("1.5s", 1.5)]
)
def test_durations_parse_like_go(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_bad_durations_are_rejected() -> None:
    # A bare number other than 0 is refused, as Go's time.ParseDuration refuses it ("missing unit").
    for bad in ("ten", "10x", "1m 30s", "", "1.5", "30", "1d"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_duration(bad)


def test_ca_bundle_remembers_its_answer_per_leaf_until_the_bundle_changes(tmp_path: Path) -> None:
    ca, other = TestCA(tmp_path, name="client-ca"), TestCA(tmp_path, name="other-ca")

    def leaf(issuer: TestCA, *, server: bool = False) -> x509.Certificate:
        return x509.load_pem_x509_certificate(issuer.issue(cn="alice", server=server)[0].read_bytes())

    bundle = CABundle(name="client-ca", pem=ca.pem)
    alice, stranger, server_cert = leaf(ca), leaf(other), leaf(ca, server=True)
    assert bundle.issued(alice) and bundle.issued(alice)
    assert not bundle.issued(stranger)
    assert not bundle.issued(server_cert)  # signed by the CA, but not for client authentication
    bundle.update(other.pem)  # rotation drops the CA: the remembered answer goes with it
    assert not bundle.issued(alice)
    assert bundle.issued(stranger)
