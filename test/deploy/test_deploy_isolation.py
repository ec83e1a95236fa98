"""
The install's isolation (issue 9, issue 16), on every rendered variant: the API server and etcd in a namespace
that enforces Pod Security ``restricted`` and whose pods pass it; the agent alone in a ``privileged`` one; etcd
over TLS with client and peer certificate authentication, wired to the certificates that are really mounted (and
the script's certificates work with a real etcd); the critical priority classes covered by scoped quotas; the
agent's metrics port behind a NetworkPolicy; our image pinned by digest with one ``images:`` entry; and a missing
certificate named with the script that makes it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from apiserver.registry.etcd import EtcdStore
from etcd_launcher import find_etcd, free_port
from apiserver.registry.store import StoreUnavailable
from deploy_helpers import (
    MANIFESTS,
    NAMESPACE,
    NODE_NAMESPACE,
    Rendered,
    container_flags,
    kustomize,
    pod_spec,
    run_make_certs,
)
from waiting import wait_until

logger = logging.getLogger(__name__)

pytestmark = pytest.mark.kubectl

# Volume types Pod Security "restricted" admits (k8s.io/pod-security-admission, policy restrictedVolumes).
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
OUR_IMAGE = "coredump.example.io/coredump"
DIGEST = "sha256:" + "ab" * 32


def workloads(variant: Rendered) -> list[dict[str, Any]]:
    return [o for o in variant.objects if pod_spec(o) is not None]


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """What Pod Security ``restricted`` (latest) refuses in a pod spec; empty when the pod is admitted."""
    problems = []
    pod_sc = spec.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            problems.append(key)
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            problems.append(f"volume {volume['name']}: {sorted(kinds)}")
    if pod_sc.get("runAsUser") == 0:
        problems.append("pod runAsUser 0")
    pod_seccomp = pod_sc.get("seccompProfile", {}).get("type")
    for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
        sc = container.get("securityContext", {})
        name = container["name"]
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation not false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            problems.append(f"{name}: capabilities not dropping ALL")
        if set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities")
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        if non_root is not True:
            problems.append(f"{name}: runAsNonRoot not true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            problems.append(f"{name}: runAsUser 0")
        seccomp = sc.get("seccompProfile", {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile {seccomp}")
        if any(p.get("hostPort") for p in container.get("ports", [])):
            problems.append(f"{name}: hostPort")
    return problems


def test_restricted_checker_refuses_what_pod_security_would() -> None:
    good = {
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [
            {"name": "c", "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}
        ],
    }
    assert restricted_violations(good) == []
    assert restricted_violations({**good, "hostPID": True}) == ["hostPID"]
    assert restricted_violations({**good, "volumes": [{"name": "h", "hostPath": {"path": "/"}}]})
    assert restricted_violations({**good, "securityContext": {"runAsNonRoot": True}})  # no seccomp


def test_deploy_namespaces_enforce_restricted_except_for_the_agent(any_variant: Rendered) -> None:
    variant = any_variant
    namespaces = {n["metadata"]["name"]: n["metadata"]["labels"] for n in variant.all("Namespace")}
    if variant.name != "uninstall":
        assert namespaces[NAMESPACE]["pod-security.kubernetes.io/enforce"] == "restricted"
        assert namespaces[NODE_NAMESPACE]["pod-security.kubernetes.io/enforce"] == "privileged"
    for obj in workloads(variant):
        namespace = obj["metadata"]["namespace"]
        problems = restricted_violations(pod_spec(obj))
        if namespace == NAMESPACE:
            assert problems == [], f"{obj['metadata']['name']} would be refused in {NAMESPACE}: {problems}"
        else:
            # Only the node-level pods live in the privileged namespace, and they do need it.
            assert namespace == NODE_NAMESPACE and obj["kind"] == "DaemonSet" and problems, obj["metadata"]["name"]


def test_deploy_critical_priority_classes_are_covered_by_scoped_quotas(variant: Rendered) -> None:
    used = {}
    for obj in workloads(variant):
        if (priority := pod_spec(obj).get("priorityClassName")) is not None:
            namespace = obj["metadata"]["namespace"]
            replicas = obj["spec"].get("replicas", 0) + 1  # a surge pod during a rolling update
            used.setdefault((namespace, priority), 0)
            used[(namespace, priority)] += replicas
    assert set(used) == {(NAMESPACE, "system-cluster-critical"), (NODE_NAMESPACE, "system-node-critical")}
    for (namespace, priority), pods in used.items():
        quotas = [q for q in variant.all("ResourceQuota") if q["metadata"]["namespace"] == namespace]
        covering = [
            q
            for q in quotas
            for e in q["spec"]["scopeSelector"]["matchExpressions"]
            if e == {"scopeName": "PriorityClass", "operator": "In", "values": [priority]}
        ]
        assert len(covering) == 1, (namespace, priority)
        assert int(covering[0]["spec"]["hard"]["pods"]) >= max(pods, 1000 if namespace == NODE_NAMESPACE else 0)


def test_deploy_agent_metrics_port_has_a_network_policy(variant: Rendered) -> None:
    agent = variant.one("DaemonSet", "coredump-agent")
    (container,) = pod_spec(agent)["containers"]
    metrics_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")
    assert f"--metrics-port={metrics_port}" in container_flags(container)
    policy = variant.one("NetworkPolicy", "coredump-agent-metrics")
    assert policy["metadata"]["namespace"] == agent["metadata"]["namespace"] == NODE_NAMESPACE
    assert (
        policy["spec"]["podSelector"]["matchLabels"].items() <= agent["spec"]["template"]["metadata"]["labels"].items()
    )
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": metrics_port}]
    assert rule["from"] and all("namespaceSelector" in peer and peer["namespaceSelector"] for peer in rule["from"])


def _flag_map(container: dict[str, Any]) -> dict[str, str]:
    return dict(f.split("=", 1) if "=" in f else (f, "") for f in container_flags(container))


def _mounted_secret_keys(spec: dict[str, Any], container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Path of every file a container sees from a Secret volume → (secret name, key)."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    return {
        f"{m['mountPath']}/{key}": (volumes[m["name"]]["secret"]["secretName"], key)
        for m in container.get("volumeMounts", [])
        if "secret" in volumes.get(m["name"], {})
        for key in ("tls.crt", "tls.key", "ca.crt")
    }


def _secret(variant: Rendered, name: str) -> str:
    """The kind of object that supplies Secret ``name``: a generated Secret or a cert-manager Certificate."""
    if any(s["metadata"]["name"] == name and s["type"] == "kubernetes.io/tls" for s in variant.all("Secret")):
        return "Secret"
    assert any(c["spec"]["secretName"] == name for c in variant.all("Certificate")), name
    return "Certificate"


def test_deploy_etcd_requires_tls_client_and_peer_certificates(variant: Rendered) -> None:
    etcd = variant.one("StatefulSet", "coredump-etcd")
    spec = pod_spec(etcd)
    (container,) = spec["containers"]
    flags = _flag_map(container)
    for url_flag in (
        "--listen-client-urls",
        "--advertise-client-urls",
        "--listen-peer-urls",
        "--initial-advertise-peer-urls",
    ):
        assert flags[url_flag].startswith("https://"), url_flag
    assert all(member.split("=", 1)[1].startswith("https://") for member in flags["--initial-cluster"].split(","))
    assert "--client-cert-auth" in flags and "--peer-client-cert-auth" in flags
    mounted = _mounted_secret_keys(spec, container)
    server = {mounted[flags[f]][0] for f in ("--cert-file", "--key-file", "--trusted-ca-file")}
    peer = {mounted[flags[f]][0] for f in ("--peer-cert-file", "--peer-key-file", "--peer-trusted-ca-file")}
    assert len(server) == len(peer) == 1 and server != peer
    for name in (*server, *peer):
        _secret(variant, name)

    apiserver = variant.one("Deployment", "coredump-apiserver")
    (api,) = pod_spec(apiserver)["containers"]
    api_flags = _flag_map(api)
    assert all(url.startswith("https://") for url in api_flags["--etcd-servers"].split(","))
    api_mounted = _mounted_secret_keys(pod_spec(apiserver), api)
    client = {api_mounted[api_flags[f]] for f in ("--etcd-cafile", "--etcd-certfile", "--etcd-keyfile")}
    assert {key for _, key in client} == {"ca.crt", "tls.crt", "tls.key"} and len({n for n, _ in client}) == 1
    _secret(variant, next(iter(client))[0])


def test_deploy_cert_manager_issues_etcd_certificates_from_a_ca_of_their_own(rendered: dict[str, Rendered]) -> None:
    variant = rendered["cert-manager"]
    by_secret = {c["spec"]["secretName"]: c for c in variant.all("Certificate")}
    etcd_issuer = {
        by_secret[n]["spec"]["issuerRef"]["name"]
        for n in ("coredump-etcd-server", "coredump-etcd-peer", "coredump-apiserver-etcd-client")
    }
    assert len(etcd_issuer) == 1 and etcd_issuer != {by_secret["coredump-apiserver-tls"]["spec"]["issuerRef"]["name"]}
    assert set(by_secret["coredump-etcd-peer"]["spec"]["usages"]) >= {"server auth", "client auth"}
    assert "client auth" in by_secret["coredump-apiserver-etcd-client"]["spec"]["usages"]
    # Every member's name (coredump-etcd-N.coredump-etcd.<ns>.svc), as the script's certificates have them.
    assert f"*.coredump-etcd.{NAMESPACE}.svc" in by_secret["coredump-etcd-server"]["spec"]["dnsNames"]


def test_deploy_one_images_entry_pins_our_image_by_digest(kubectl: str, manifests_with_certs: Path) -> None:
    overlay = manifests_with_certs.parent / "pinned"
    overlay.mkdir(exist_ok=True)
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [../manifests]\n"
        f"images:\n  - name: {OUR_IMAGE}\n    newName: registry.example.internal/coredump\n    digest: {DIGEST}\n"
    )
    objects = kustomize(overlay, kubectl=kubectl)
    images = {
        c["image"]
        for o in objects
        if pod_spec(o)
        for c in [*pod_spec(o).get("initContainers", []), *pod_spec(o)["containers"]]
    }
    ours = {i for i in images if "coredump" in i.split("/")[-1].split("@")[0].split(":")[0]}
    assert ours == {f"registry.example.internal/coredump@{DIGEST}"}, images
    assert any(i.startswith("registry.k8s.io/etcd:") for i in images)  # etcd pins with an entry of its own


def test_deploy_missing_certificates_name_the_script(kubectl: str, tmp_path: Path) -> None:
    copy = tmp_path / "manifests"
    shutil.copytree(
        MANIFESTS, copy, ignore=shutil.ignore_patterns("*.crt", "*.key", "*.srl", "apiservice-cabundle.yaml")
    )
    proc = subprocess.run([kubectl, "kustomize", str(copy)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0
    assert "run-deploy-make-certs.sh-first/" in proc.stderr, proc.stderr


# -- the script's etcd certificates against a real etcd, with the manifest's TLS flags ------------------------


@pytest.fixture(scope="module")
def script_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("etcd-certs") / "certs"
    proc = run_make_certs(out)
    assert proc.returncode == 0, proc.stderr
    return out


@dataclasses.dataclass
class ScriptEtcd:
    endpoint: str
    peer_port: int


@pytest.fixture(scope="module")
def script_etcd(script_certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScriptEtcd]:
    """A real etcd with the StatefulSet's TLS flags (client and peer), on loopback, with the script's certificates."""
    binary = find_etcd()
    if binary is None:
        pytest.skip("etcd is not installed; scripts/test installs it")
    base = tmp_path_factory.mktemp("etcd")
    client, peer = f"https://127.0.0.1:{free_port()}", f"https://127.0.0.1:{free_port()}"
    c = script_certs
    command = [
        binary,
        "--name",
        "coredump-etcd-0",
        "--data-dir",
        str(base / "data"),
        "--listen-client-urls",
        client,
        "--advertise-client-urls",
        client,
        "--listen-peer-urls",
        peer,
        "--initial-advertise-peer-urls",
        peer,
        "--initial-cluster",
        f"coredump-etcd-0={peer}",
        "--log-level",
        "warn",
        "--logger",
        "zap",
        "--cert-file",
        str(c / "etcd-server.crt"),
        "--key-file",
        str(c / "etcd-server.key"),
        "--trusted-ca-file",
        str(c / "etcd-ca.crt"),
        "--client-cert-auth",
        "--peer-cert-file",
        str(c / "etcd-peer.crt"),
        "--peer-key-file",
        str(c / "etcd-peer.key"),
        "--peer-trusted-ca-file",
        str(c / "etcd-ca.crt"),
        "--peer-client-cert-auth",
    ]
    with open(base / "etcd.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        context = ssl.create_default_context(cafile=str(c / "etcd-ca.crt"))
        context.load_cert_chain(str(c / "etcd-client.crt"), str(c / "etcd-client.key"))

        def healthy() -> bool:
            assert process.poll() is None, (base / "etcd.log").read_text()
            with urllib.request.urlopen(f"{client}/health", timeout=1, context=context) as response:
                return b'"true"' in response.read()

        wait_until(healthy, what=f"etcd to be healthy (log {base / 'etcd.log'})", ignore=(OSError,), interval=0.1)
        yield ScriptEtcd(endpoint=client, peer_port=int(peer.rsplit(":", 1)[1]))
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.etcd
def test_deploy_script_certificates_work_with_a_real_etcd_requiring_client_certificates(
    script_etcd: ScriptEtcd, script_certs: Path
) -> None:
    async def attempt(cert: str | None, key: str | None) -> None:
        store = EtcdStore(
            endpoints=[script_etcd.endpoint],
            prefix="/deploy-test",
            ca_file=script_certs / "etcd-ca.crt",
            cert_file=script_certs / cert if cert else None,
            key_file=script_certs / key if key else None,
            dial_timeout=3,
        )
        await asyncio.wait_for(store.start(), 20)
        await store.close()

    asyncio.run(attempt("etcd-client.crt", "etcd-client.key"))  # the API server's certificate: accepted
    # Without a client certificate, or with the API server's serving certificate (another CA): refused.
    with pytest.raises(StoreUnavailable):
        asyncio.run(attempt(None, None))
    with pytest.raises(StoreUnavailable):
        asyncio.run(attempt("tls.crt", "tls.key"))


@pytest.mark.etcd
def test_deploy_etcd_peer_port_requires_a_peer_certificate(script_etcd: ScriptEtcd, script_certs: Path) -> None:
    def handshake(cert: str | None) -> str:
        context = ssl.create_default_context(cafile=str(script_certs / "etcd-ca.crt"))
        if cert:
            context.load_cert_chain(str(script_certs / f"{cert}.crt"), str(script_certs / f"{cert}.key"))
        with (
            socket.create_connection(("127.0.0.1", script_etcd.peer_port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return tls.recv(4096).decode(errors="replace")

    assert handshake("etcd-peer").startswith("HTTP/1.1 ")  # the server's peer certificate verifies as 127.0.0.1
    with pytest.raises((ssl.SSLError, ConnectionError)):
        handshake(None)
