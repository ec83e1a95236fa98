"""
Delegated authentication and authorization, end to end over real TLS: a small aiohttp app behind the auth
middleware built by ``build_auth`` from real flags, talking to the fake kube-apiserver.
"""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import pytest

from apiserver.auth.options import AuthConfigError, build_auth
from apiserver_harness import App, front_proxy, parse_flags, start_app
from fake_kube import FakeKube
from fake_clock import FakeClock

GV = "/apis/coredump.example.io/v1alpha1"


async def test_front_proxy_headers_need_the_front_proxy_certificate(app: App) -> None:
    app.fake.allow(verbs=["get"], non_resource_urls=["/whoami"], users=["alice", "mallory"])
    forged = [("X-Remote-User", "alice"), ("X-Remote-Group", "system:masters")]

    status, body = await app.get("/whoami", headers=forged)
    assert (status, body["reason"]) == (401, "Unauthorized")

    # A certificate from the cluster CA authenticates its own CN; its X-Remote-* headers are ignored.
    mallory = app.fake.issue_client_cert(app.certs, cn="mallory", orgs=["devs"])
    status, body = await app.get("/whoami", cert=mallory, headers=forged)
    assert status == 200
    assert body["user"] == "mallory" and "system:masters" not in body["groups"]
    assert body["groups"] == ["devs", "system:authenticated"]

    # The front-proxy CA with a CN that is not allowed: nobody.
    status, body = await app.get("/whoami", cert=front_proxy(app, cn="someone-else"), headers=forged)
    assert (status, body["code"]) == (401, 401)


async def test_front_proxy_user_groups_and_extras(app: App) -> None:
    app.fake.allow(verbs=["get"], non_resource_urls=["/whoami"], groups=["team-a"])
    status, body = await app.get(
        "/whoami",
        cert=front_proxy(app),
        headers=[
            ("X-Remote-User", "alice"),
            ("X-Remote-Group", "team-a"),
            ("X-Remote-Group", "team-b"),
            ("X-Remote-Extra-Scopes", "view"),
            ("X-Remote-Extra-Scopes", "dump"),
            ("X-Remote-Extra-Example.com%2fteam", "blue"),
        ],
    )
    assert status == 200, body
    assert body["user"] == "alice"
    assert body["groups"] == ["team-a", "team-b", "system:authenticated"]
    assert body["extra"] == {"scopes": ["view", "dump"], "example.com/team": ["blue"]}
    spec = app.fake.sar_requests[-1]["spec"]
    assert spec["user"] == "alice" and spec["groups"] == ["team-a", "team-b", "system:authenticated"]
    assert spec["extra"] == {"scopes": ["view", "dump"], "example.com/team": ["blue"]}


async def test_namespace_rbac_for_get_list_watch_and_dump(app: App) -> None:
    app.fake.add_token("token-alice", user="alice", groups=["team-a"])
    app.fake.allow(verbs=["get", "list", "watch"], groups=["team-a"], resources=["coredumpendpoints"], namespaces=["a"])
    base_b = f"{GV}/namespaces/b/coredumpendpoints"
    for path, verb in [
        (f"{base_b}/web", "get"),
        (base_b, "list"),
        (f"{base_b}?watch=true", "watch"),
        (f"{base_b}/web/dump", "get"),
    ]:
        status, body = await app.get(path, token="token-alice")
        assert (status, body["reason"]) == (403, "Forbidden"), path
        assert f'User "alice" cannot {verb} resource' in body["message"]
        assert 'in the namespace "b"' in body["message"]

    base_a = f"{GV}/namespaces/a/coredumpendpoints"
    for path, verb in [(f"{base_a}/web", "get"), (base_a, "list"), (f"{base_a}?watch=1", "watch")]:
        status, body = await app.get(path, token="token-alice")
        assert (status, body["verb"]) == (200, verb)
    status, body = await app.get(f"{base_a}/web/dump", token="token-alice")
    assert status == 403
    assert 'cannot get resource "coredumpendpoints/dump" in API group "coredump.example.io"' in body["message"]
    assert app.fake.sar_requests[-1]["spec"]["resourceAttributes"] == {
        "namespace": "a",
        "verb": "get",
        "group": "coredump.example.io",
        "version": "v1alpha1",
        "resource": "coredumpendpoints",
        "subresource": "dump",
        "name": "web",
    }


async def test_discovery_for_a_user_without_groups_and_401_for_bad_tokens(app: App) -> None:
    app.fake.add_token("token-nogroups", user="lonely")
    for path in ("/apis", GV, "/openapi/v2"):
        status, body = await app.get(path, token="token-nogroups")
        assert (status, body["user"]) == (200, "lonely"), path
    assert app.fake.sar_requests[-1]["spec"]["groups"] == ["system:authenticated"]

    status, body = await app.get("/apis", token="no-such-token")
    assert (status, body["reason"]) == (401, "Unauthorized")
    status, body = await app.get("/apis")
    assert status == 401


async def test_unreachable_or_failing_cluster_is_an_error_never_an_allow(app: App) -> None:
    app.fake.add_token("token-alice", user="alice", groups=["team-a"])
    app.fake.allow(verbs=["get"], groups=["team-a"], resources=["coredumpendpoints"], namespaces=["a"])
    path = f"{GV}/namespaces/a/coredumpendpoints/web"

    # kube-apiserver answers an authorizer error with 500 InternalError, whatever the error was.
    app.fake.sar_failure = "unreachable"
    status, body = await app.get(path, token="token-alice")
    assert (status, body["reason"]) == (500, "InternalError")
    app.fake.sar_failure = 500
    status, body = await app.get(path, token="token-alice")
    assert (status, body["reason"]) == (500, "InternalError")
    # Failures are not cached: the cluster answers again and the request goes through.
    app.fake.sar_failure = None
    assert (await app.get(path, token="token-alice"))[0] == 200

    app.fake.add_token("token-bob", user="bob", groups=["team-a"])
    app.fake.token_review_failure = "unreachable"
    status, body = await app.get(path, token="token-bob")
    assert (status, body["reason"]) == (401, "Unauthorized")


async def test_masters_and_health_paths_skip_authorization(app: App) -> None:
    admin = app.fake.issue_client_cert(app.certs, cn="admin", orgs=["system:masters"])
    app.fake.sar_failure = 500
    status, body = await app.get(f"{GV}/namespaces/x/coredumpendpoints/any/dump", cert=admin)
    assert (status, body["user"]) == (200, "admin")
    for path in ("/healthz", "/livez", "/readyz"):
        status, body = await app.get(path)
        assert (status, body["user"]) == (200, "system:anonymous"), path
    assert app.fake.sar_requests == []
    # Only the exact paths, as kube-apiserver's default: a named check needs credentials.
    status, body = await app.get("/livez/ping")
    assert (status, body["reason"]) == (401, "Unauthorized")


async def test_anonymous_access_when_switched_on(fake_kube: FakeKube, tmp_path: Path) -> None:
    runner, app = await start_app(fake_kube, tmp_path, "--anonymous-auth=true")
    try:
        status, body = await app.get("/apis")
        assert (status, body["user"]) == (200, "system:anonymous")
        assert fake_kube.sar_requests[-1]["spec"]["groups"] == ["system:unauthenticated"]
        status, body = await app.get(f"{GV}/namespaces/a/coredumpendpoints")
        assert status == 403 and 'User "system:anonymous" cannot list' in body["message"]
        # Wrong credentials stay wrong: no silent fall back to anonymous.
        assert (await app.get("/apis", token="bogus"))[0] == 401
    finally:
        await runner.cleanup()
        await app.setup.close()


async def test_front_proxy_ca_rotation_is_followed(fake_kube: FakeKube, tmp_path: Path) -> None:
    from fake_kube import TestCA

    clock = FakeClock()
    runner, app = await start_app(fake_kube, tmp_path, "--authentication-config-refresh-interval=30s", clock=clock)
    try:
        await clock.asleep()
        fake_kube.allow(verbs=["get"], non_resource_urls=["/whoami"], users=["alice"])
        alice = [("X-Remote-User", "alice")]
        old_cert = front_proxy(app)
        assert (await app.get("/whoami", cert=old_cert, headers=alice))[0] == 200

        rotated = TestCA(tmp_path, name="front-proxy-ca-2")
        new_cert = rotated.issue(cn="front-proxy-client", directory=tmp_path)
        fake_kube.set_authentication_configmap(requestheader_ca=rotated.pem)
        with pytest.raises(aiohttp.ClientError):  # not before the refresh: TLS does not know the new CA yet
            await app.get("/whoami", cert=new_cert, headers=alice)
        reads = fake_kube.configmap_reads
        await clock.advance(30)
        assert fake_kube.configmap_reads == reads + 1

        status, body = await app.get("/whoami", cert=new_cert, headers=alice)
        assert (status, body["user"]) == (200, "alice")
        status, body = await app.get("/whoami", cert=old_cert, headers=alice)
        assert status == 401
    finally:
        await runner.cleanup()
        await app.setup.close()


async def test_flags_replace_the_configmap(fake_kube: FakeKube, tmp_path: Path) -> None:
    from fake_kube import TestCA

    own_proxy_ca = TestCA(tmp_path, name="own-front-proxy")
    runner, app = await start_app(
        fake_kube,
        tmp_path,
        "--authentication-skip-lookup",
        f"--client-ca-file={fake_kube.ca_file}",
        f"--requestheader-client-ca-file={own_proxy_ca.cert_file}",
        "--requestheader-allowed-names=proxy-1",
        "--requestheader-username-headers=X-User",
        "--requestheader-group-headers=X-Groups",
    )
    try:
        fake_kube.allow(verbs=["get"], non_resource_urls=["/whoami"], users=["carol"])
        proxy = own_proxy_ca.issue(cn="proxy-1", directory=tmp_path)
        status, body = await app.get("/whoami", cert=proxy, headers=[("X-User", "carol"), ("X-Groups", "g1")])
        assert (status, body["user"], body["groups"]) == (200, "carol", ["g1", "system:authenticated"])
        # The ConfigMap's front-proxy CA means nothing now (TLS refuses its certificate), and it was never read.
        with pytest.raises(aiohttp.ClientError):
            await app.get(
                "/whoami",
                cert=(fake_kube.front_proxy_cert, fake_kube.front_proxy_key),
                headers=[("X-Remote-User", "carol")],
            )
        status, _ = await app.get("/whoami", cert=proxy, headers=[("X-Remote-User", "carol")])
        assert status == 401  # the default header names are not the configured ones
        assert fake_kube.configmap_reads == 0
    finally:
        await runner.cleanup()
        await app.setup.close()


async def test_bad_authentication_sources_are_named_at_startup(fake_kube: FakeKube, tmp_path: Path) -> None:
    kubeconfig = str(fake_kube.write_kubeconfig(tmp_path / "server.kubeconfig"))
    cluster = ("--authentication-kubeconfig", kubeconfig, "--authorization-kubeconfig", kubeconfig)
    missing = tmp_path / "missing.crt"
    with pytest.raises(AuthConfigError, match=f"^--client-ca-file {re.escape(str(missing))}: No such file"):
        await build_auth(
            options=parse_flags(*cluster, "--authentication-skip-lookup", f"--client-ca-file={missing}"), dev=None
        )
    with pytest.raises(AuthConfigError, match=r"^--authorization-kubeconfig \S+: no such file$"):
        await build_auth(
            options=parse_flags("--authentication-kubeconfig", kubeconfig, f"--authorization-kubeconfig={missing}"),
            dev=None,
        )
    fake_kube.auth_configmap["requestheader-allowed-names"] = "front-proxy-client"  # not a JSON list
    with pytest.raises(
        AuthConfigError,
        match="^configmap kube-system/extension-apiserver-authentication key "
        "requestheader-allowed-names: expected a JSON list of strings",
    ):
        await build_auth(options=parse_flags(*cluster), dev=None)
