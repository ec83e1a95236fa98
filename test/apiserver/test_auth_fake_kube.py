"""The fake kube-apiserver answers the way the real one does, so the other auth tests mean something."""

from __future__ import annotations

import datetime
from pathlib import Path

import aiohttp
import pytest
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from fake_kube import FakeKube


def _sar(user: str, groups: list[str], **resource: str) -> client.V1SubjectAccessReview:
    return client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=user, groups=groups, resource_attributes=client.V1ResourceAttributes(**resource)
        )
    )


async def test_fake_serves_the_endpoints_a_kubernetes_client_calls(fake_kube: FakeKube, tmp_path: Path) -> None:
    api = await config.new_client_from_config(config_file=str(fake_kube.write_kubeconfig(tmp_path / "kc")))
    async with api:
        core = client.CoreV1Api(api)
        cm = await core.read_namespaced_config_map("extension-apiserver-authentication", "kube-system")
        assert cm.data["client-ca-file"] == fake_kube.client_ca.pem
        assert cm.data["requestheader-allowed-names"] == '["front-proxy-client"]'

        fake_kube.add_token("t-alice", user="alice", groups=["team-a"])
        review = await client.AuthenticationV1Api(api).create_token_review(
            client.V1TokenReview(spec=client.V1TokenReviewSpec(token="t-alice"))
        )
        assert review.status.authenticated and review.status.user.username == "alice"
        review = await client.AuthenticationV1Api(api).create_token_review(
            client.V1TokenReview(spec=client.V1TokenReviewSpec(token="wrong"))
        )
        assert not review.status.authenticated

        fake_kube.allow(verbs=["get"], users=["alice"], resources=["coredumpendpoints"], namespaces=["a"])
        authz = client.AuthorizationV1Api(api)
        allowed = await authz.create_subject_access_review(
            _sar("alice", [], verb="get", resource="coredumpendpoints", namespace="a", group="coredump.example.io")
        )
        other_ns = await authz.create_subject_access_review(
            _sar("alice", [], verb="get", resource="coredumpendpoints", namespace="b", group="coredump.example.io")
        )
        dump = await authz.create_subject_access_review(
            _sar("alice", [], verb="get", resource="coredumpendpoints", subresource="dump", namespace="a")
        )
        assert (allowed.status.allowed, other_ns.status.allowed, dump.status.allowed) == (True, False, False)
        assert len(fake_kube.sar_requests) == 3

        with pytest.raises(ApiException) as missing:
            await core.read_namespaced_pod("web", "a")
        assert missing.value.status == 404
        pod = fake_kube.add_pod(namespace="a", name="web", uid="uid-1")
        assert (await core.read_namespaced_pod("web", "a")).metadata.uid == pod["metadata"]["uid"] == "uid-1"

        ref = client.V1ObjectReference(kind="Pod", name="web", namespace="a", uid="uid-1")
        await core.create_namespaced_event(
            "a",
            client.CoreV1Event(
                metadata=client.V1ObjectMeta(generate_name="web."), involved_object=ref, reason="CoreDumped"
            ),
        )
        await client.EventsV1Api(api).create_namespaced_event(
            "a",
            client.EventsV1Event(
                metadata=client.V1ObjectMeta(generate_name="web."),
                regarding=ref,
                reason="CoreDumped",
                event_time=datetime.datetime.now(datetime.timezone.utc),
                reporting_controller="c",
                reporting_instance="i",
                action="Dumped",
                type="Warning",
            ),
        )
        assert [e["apiVersion"] for e in fake_kube.events] == ["v1", "events.k8s.io/v1"]
        assert all(e["metadata"]["name"].startswith("web.") for e in fake_kube.events)


async def test_fake_rejects_unknown_callers_and_injects_failures(fake_kube: FakeKube, tmp_path: Path) -> None:
    api = await config.new_client_from_config(
        config_file=str(fake_kube.write_kubeconfig(tmp_path / "kc", token="not-a-known-token"))
    )
    async with api:
        with pytest.raises(ApiException) as denied:
            await client.CoreV1Api(api).read_namespaced_pod("web", "a")
        assert denied.value.status == 401

    api = await config.new_client_from_config(config_file=str(fake_kube.write_kubeconfig(tmp_path / "kc")))
    async with api:
        authz = client.AuthorizationV1Api(api)
        fake_kube.sar_failure = "unreachable"
        with pytest.raises(aiohttp.ClientError):
            await authz.create_subject_access_review(_sar("system:admin", ["system:masters"], verb="get"))
        fake_kube.sar_failure = 500
        with pytest.raises(ApiException) as failed:
            await authz.create_subject_access_review(_sar("system:admin", ["system:masters"], verb="get"))
        assert failed.value.status == 500
