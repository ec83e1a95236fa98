"""
Flows 2 and 9: who may download a dump, decided by the real RBAC through the real aggregator, with the identity
our server learns from kube-apiserver's front-proxy client certificate (our server trusts the front-proxy CA
only through the real extension-apiserver-authentication ConfigMap: it is started without any
--requestheader-client-ca-file).
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile

import pytest

from fixtures_apiserver import kubectl_binary
from workloads import dump_path, endpoint_yaml

KUBECTLS = ["1.27", "1.33"]


def cores_in(archive: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".core")}


def raw(cp, path: str, *, kubeconfig, version: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [kubectl_binary(version), "--kubeconfig", str(kubeconfig), "get", "--raw", path],
        capture_output=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def endpoints(installed, teams) -> dict:
    cp = installed.cp
    for ns in teams:
        got = cp.kubectl("create", "-f", "-", input=endpoint_yaml(ns, "crasher"), check=False)
        assert got.returncode == 0 or "AlreadyExists" in got.stderr, got.stderr
    return teams


@pytest.mark.parametrize("version", KUBECTLS)
def test_dump_role_downloads_its_namespace_byte_identical_and_nothing_else(
    installed, endpoints, users, real_core, version: str
) -> None:
    got = raw(installed.cp, dump_path("team-a", "crasher"), kubeconfig=users["alice"], version=version)
    assert got.returncode == 0, got.stderr
    (core,) = cores_in(got.stdout).values()
    assert core == real_core.path.read_bytes()
    other = raw(installed.cp, dump_path("team-b", "crasher"), kubeconfig=users["alice"], version=version)
    assert other.returncode != 0 and b"forbidden" in other.stderr.lower()
    assert b'User "alice"' in other.stderr  # the identity came through the front proxy, not as anonymous


@pytest.mark.parametrize("version", KUBECTLS)
def test_view_lists_endpoints_but_may_not_dump(installed, endpoints, users, version: str) -> None:
    cp = installed.cp
    listed = cp.kubectl(
        "get",
        "coredumpendpoints",
        "-n",
        "team-a",
        "-o",
        "name",
        kubeconfig=users["victor"],
        binary=kubectl_binary(version),
    ).stdout.split()
    assert "coredumpendpoint.coredump.example.io/crasher" in listed
    dump = raw(cp, dump_path("team-a", "crasher"), kubeconfig=users["victor"], version=version)
    assert dump.returncode != 0 and b"forbidden" in dump.stderr.lower()


def test_cluster_edit_role_aggregates_dump_and_delete(installed, endpoints, users, real_core) -> None:
    """The shipped ClusterRoles carry aggregate-to-edit: the real aggregation controller folds them into edit."""
    got = raw(installed.cp, dump_path("team-b", "crasher"), kubeconfig=users["eddie"], version="1.33")
    assert got.returncode == 0, got.stderr
    assert list(cores_in(got.stdout).values()) == [real_core.path.read_bytes()]
    can = installed.cp.kubectl(
        "auth",
        "can-i",
        "delete",
        "coredumpendpoints.coredump.example.io",
        "-n",
        "team-b",
        kubeconfig=users["eddie"],
        check=False,
    )
    assert can.stdout.strip() == "yes"


def test_service_account_token_is_a_third_identity(installed, endpoints) -> None:
    cp = installed.cp
    cp.kubectl("create", "serviceaccount", "collector", "-n", "team-a")
    cp.kubectl(
        "create",
        "rolebinding",
        "collector-dump",
        "-n",
        "team-a",
        "--clusterrole",
        "coredump:dump",
        "--serviceaccount",
        "team-a:collector",
    )
    kubeconfig = installed.token_kubeconfig("team-a", "collector")
    assert raw(cp, dump_path("team-a", "crasher"), kubeconfig=kubeconfig, version="1.33").returncode == 0
    denied = raw(cp, dump_path("team-b", "crasher"), kubeconfig=kubeconfig, version="1.27")
    assert b"system:serviceaccount:team-a:collector" in denied.stderr


def test_server_trusts_the_front_proxy_ca_from_the_cluster_configmap(installed) -> None:
    """Flow 9: the requestheader CA our server uses is the one kube-apiserver publishes, and it works."""
    cp = installed.cp
    cm = cp.get_json("configmap", "extension-apiserver-authentication", "-n", "kube-system")
    published = cm["data"]["requestheader-client-ca-file"]
    assert published.strip() == (cp.pki / "front-proxy-ca.crt").read_text().strip()
    assert json.loads(cm["data"]["requestheader-allowed-names"]) == ["front-proxy-client"]
    assert "--requestheader-client-ca-file" not in installed.server.argv
    # A client certificate of the cluster CA with a forged front-proxy name and headers, sent straight to our
    # server, is not taken as a proxied identity: only kube-apiserver's proxy certificate is.
    crt, key = cp.cluster_ca.issue(directory=cp.pki, name="forged-proxy", common_name="front-proxy-client")
    import http.client
    import ssl

    ctx = ssl.create_default_context(cafile=str(installed.tls_dir() / "ca.crt"))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(crt), str(key))
    conn = http.client.HTTPSConnection("127.0.0.1", installed.port, context=ctx, timeout=30)
    try:
        conn.request("GET", dump_path("team-a", "crasher"), headers={"X-Remote-User": "alice"})
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status in (401, 403), (resp.status, body[:200])
