"""
The real ``coredump-apiserver`` (a subprocess) behind delegated auth, against the fake kube-apiserver,
driven over real TLS by aiohttp and by the real kubectl.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import yaml

from apiserver_harness import SERVER, Server, run_server
from fake_kube import FakeKube
from apiserver_harness import store_core
from waiting import await_until

GV = "/apis/coredump.example.io/v1alpha1"


@pytest_asyncio.fixture
async def server(fake_kube: FakeKube, tmp_path: Path) -> AsyncIterator[Server]:
    async with run_server(fake_kube, tmp_path) as started:
        yield started


async def test_headers_count_only_from_the_front_proxy(server: Server) -> None:
    fake = server.fake
    forged = [("X-Remote-User", "alice"), ("X-Remote-Group", "system:masters")]
    status, body = await server.request("GET", f"{GV}/namespaces/a/coredumpendpoints", headers=forged)
    assert (status, body["reason"]) == (401, "Unauthorized")

    # A cluster-CA certificate is its own user; the forged system:masters header is not read.
    mallory = fake.issue_client_cert(server.directory, cn="mallory")
    status, body = await server.request("GET", f"{GV}/namespaces/a/coredumpendpoints", cert=mallory, headers=forged)
    assert status == 403 and 'User "mallory" cannot list' in body["message"]

    wrong_cn = fake.issue_client_cert(server.directory, cn="not-the-aggregator", ca="front-proxy")
    status, body = await server.request("GET", "/apis", cert=wrong_cn, headers=forged)
    assert (status, body["reason"]) == (401, "Unauthorized")

    # The aggregator's own certificate: now the headers name the user, every group header counts.
    fake.allow(verbs=["list"], groups=["team-a"], resources=["coredumpendpoints"], namespaces=["a"])
    status, body = await server.request(
        "GET",
        f"{GV}/namespaces/a/coredumpendpoints",
        cert=(fake.front_proxy_cert, fake.front_proxy_key),
        headers=[("X-Remote-User", "alice"), ("X-Remote-Group", "other"), ("X-Remote-Group", "team-a")],
    )
    assert status == 200 and body["kind"] == "CoredumpEndpointList", body
    spec = fake.sar_requests[-1]["spec"]
    assert (spec["user"], spec["groups"]) == ("alice", ["other", "team-a", "system:authenticated"])


async def test_rbac_decides_per_namespace_verb_and_dump(server: Server) -> None:
    fake = server.fake
    fake.add_token("token-alice", user="alice", groups=["team-a"])
    fake.allow(verbs=["get", "list", "watch"], groups=["team-a"], resources=["coredumpendpoints"], namespaces=["a"])
    uid_a, uid_b = str(uuid.uuid4()), str(uuid.uuid4())
    fake.add_pod(namespace="a", name="web", uid=uid_a)
    fake.add_pod(namespace="b", name="web", uid=uid_b)
    for ns, uid in (("a", uid_a), ("b", uid_b)):
        status, body = await server.request(
            "POST",
            f"{GV}/namespaces/{ns}/coredumpendpoints",
            cert=server.admin,
            body={
                "apiVersion": "coredump.example.io/v1alpha1",
                "kind": "CoredumpEndpoint",
                "metadata": {"name": "web"},
                "spec": {"podUID": uid},
            },
        )
        assert status == 201, body["message"]

    b = f"{GV}/namespaces/b/coredumpendpoints"
    for path, verb in [(f"{b}/web", "get"), (b, "list"), (f"{b}?watch=true", "watch"), (f"{b}/web/dump", "get")]:
        status, body = await server.request("GET", path, token="token-alice")
        assert (status, body["reason"]) == (403, "Forbidden"), path
        resource = "coredumpendpoints/dump" if path.endswith("/dump") else "coredumpendpoints"
        assert (
            f'User "alice" cannot {verb} resource "{resource}" in API group "coredump.example.io" '
            f'in the namespace "b"' in body["message"]
        )

    a = f"{GV}/namespaces/a/coredumpendpoints"
    status, body = await server.request("GET", f"{a}/web", token="token-alice")
    assert (status, body["metadata"]["name"]) == (200, "web")
    assert (await server.request("GET", a, token="token-alice"))[0] == 200
    status, body = await server.request("GET", f"{a}/web/dump", token="token-alice")
    assert (status, body["reason"]) == (403, "Forbidden")
    assert 'cannot get resource "coredumpendpoints/dump"' in body["message"]
    # Refused before the dump handler, and still audited: who tried, where, and that it was refused.
    await await_until(lambda: len(server.audit_lines()) >= 2, what="two audit lines")
    denied = [
        (line["user"], line["namespace"], line["pod"], line["code"], line["outcome"], line["bytes"])
        for line in server.audit_lines()
    ]
    assert denied == [("alice", "b", "web", 403, "denied", 0), ("alice", "a", "web", 403, "denied", 0)]

    # Granted dump (to bob: alice's denial stays cached for 10 s): the cores come, and the audit names bob.
    store_core(
        server.storage_root,
        namespace="a",
        pod="web",
        pod_uid=uid_a,
        container="app",
        data=b"\x7fELF" + b"x" * 5000,
        when=datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
    )
    fake.add_token("token-bob", user="bob", groups=["team-a"])
    fake.allow(verbs=["get"], users=["bob"], resources=["coredumpendpoints/dump"], namespaces=["a"])
    status, body = await server.request("GET", f"{a}/web/dump", token="token-bob")
    assert status == 200 and body[:2] == b"\x1f\x8b"
    # The line is written as the response ends; give the log pipe a moment.
    await await_until(lambda: len(server.audit_lines()) > 2, what="the granted dump's audit line")
    [audit] = server.audit_lines()[2:]
    assert (audit["user"], audit["namespace"], audit["pod"], audit["cores"]) == ("bob", "a", "web", 1)
    assert (audit["code"], audit["outcome"]) == (200, "complete")
    assert audit["groups"] == ["team-a", "system:authenticated"] and audit["bytes"] == len(body)


async def test_discovery_for_a_user_without_groups(server: Server) -> None:
    server.fake.add_token("token-lonely", user="lonely")
    for path in ("/apis", GV, "/openapi/v2"):
        status, body = await server.request("GET", path, token="token-lonely")
        assert status == 200, (path, body)
    status, body = await server.request("GET", GV, token="token-lonely")
    assert [r["name"] for r in body["resources"]] == [
        "coredumpendpoints",
        "coredumpendpoints/dump",
        "coredumpendpoints/status",
    ]
    assert server.fake.sar_requests[-1]["spec"]["groups"] == ["system:authenticated"]


async def test_unreachable_cluster_is_an_error_and_decisions_are_cached(server: Server) -> None:
    fake = server.fake
    fake.add_token("token-alice", user="alice", groups=["team-a"])
    fake.allow(verbs=["list"], groups=["team-a"], resources=["coredumpendpoints"], namespaces=["a"])
    path = f"{GV}/namespaces/a/coredumpendpoints"
    fake.sar_failure = "unreachable"
    status, body = await server.request("GET", path, token="token-alice")
    assert (status, body["reason"]) == (500, "InternalError")  # as kube-apiserver answers an authorizer error
    fake.sar_failure = None

    before = len(fake.sar_requests)
    for _ in range(3):
        assert (await server.request("GET", path, token="token-alice"))[0] == 200
    assert len(fake.sar_requests) == before + 1  # one review, then the cache (10 s by default)
    assert len(fake.token_reviews) == 1  # the token was reviewed once, on the first request, then cached

    # Still within the allowed TTL: even an unreachable cluster does not matter for a cached decision.
    fake.sar_failure = "unreachable"
    assert (await server.request("GET", path, token="token-alice"))[0] == 200


async def test_cache_ttl_flags_reach_the_server(fake_kube: FakeKube, tmp_path: Path) -> None:
    fake_kube.add_token("token-alice", user="alice", groups=["team-a"])
    fake_kube.add_token("token-bob", user="bob", groups=["team-b"])
    fake_kube.allow(verbs=["list"], groups=["team-a"], resources=["coredumpendpoints"], namespaces=["a"])
    async with run_server(
        fake_kube,
        tmp_path,
        "--authorization-webhook-cache-authorized-ttl=0s",
        "--authorization-webhook-cache-unauthorized-ttl=1h",
    ) as server:
        path = f"{GV}/namespaces/a/coredumpendpoints"
        for _ in range(2):
            assert (await server.request("GET", path, token="token-alice"))[0] == 200
        assert len(fake_kube.sar_requests) == 2  # allowed answers are not cached at all
        for _ in range(2):
            assert (await server.request("GET", path, token="token-bob"))[0] == 403
        assert len(fake_kube.sar_requests) == 3  # the denial is cached for an hour
        fake_kube.allow(verbs=["list"], users=["bob"], resources=["coredumpendpoints"], namespaces=["a"])
        assert (await server.request("GET", path, token="token-bob"))[0] == 403
        assert len(fake_kube.sar_requests) == 3


@pytest.mark.kubectl
async def test_kubectl_shows_forbidden_like_for_builtin_resources(server: Server) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    fake = server.fake
    fake.add_token("token-alice", user="alice", groups=["team-a"])
    kubeconfig = server.directory / "alice.kubeconfig"
    config = yaml.safe_load(fake.write_kubeconfig(kubeconfig, token="token-alice").read_text())
    config["clusters"][0]["cluster"]["server"] = server.url
    kubeconfig.write_text(yaml.safe_dump(config))
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "HOME": str(server.directory)}

    async def kubectl_run(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            kubectl, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    code, _, err = await kubectl_run("get", "coredumpendpoints", "-n", "b")
    assert code == 1
    assert err.strip().splitlines()[-1] == (
        'Error from server (Forbidden): coredumpendpoints.coredump.example.io is forbidden: User "alice" cannot '
        'list resource "coredumpendpoints" in API group "coredump.example.io" in the namespace "b"'
    )
    code, _, err = await kubectl_run("get", "--raw", f"{GV}/namespaces/b/coredumpendpoints/web/dump")
    assert code == 1
    assert (
        'User "alice" cannot get resource "coredumpendpoints/dump" in API group "coredump.example.io" in the '
        'namespace "b"' in err
    )


async def test_unreadable_authentication_configmap_stops_startup_with_one_line(
    fake_kube: FakeKube, tmp_path: Path
) -> None:
    kubeconfig = fake_kube.write_kubeconfig(tmp_path / "stranger.kubeconfig", token="unknown-to-the-cluster")
    cert, key = fake_kube.client_ca.issue(cn="coredump-apiserver", server=True, directory=tmp_path, stem="serving")
    proc = await asyncio.create_subprocess_exec(
        str(SERVER),
        "--secure-port=0",
        "--bind-address=127.0.0.1",
        f"--tls-cert-file={cert}",
        f"--tls-private-key-file={key}",
        f"--storage-root={tmp_path}",
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 1
    lines = [line for line in err.decode().splitlines() if not line.startswith("{")]
    assert len(lines) == 1 and "Traceback" not in err.decode()
    assert lines[0].startswith(
        "coredump-apiserver: authentication setup failed: cannot read configmap "
        "kube-system/extension-apiserver-authentication: HTTP 401"
    )
