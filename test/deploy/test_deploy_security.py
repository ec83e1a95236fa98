"""
What the manifests do on a cluster's nodes, checked on every rendered variant: only the agent is privileged;
everything else runs as non-root with limits and a read-only root filesystem; the API server is highly
available; the APIService verifies TLS; RBAC gives core dumps the rules of Secrets, not of view.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from deploy_helpers import NAMESPACE, NODE_NAMESPACE, Rendered, pod_spec

logger = logging.getLogger(__name__)

pytestmark = pytest.mark.kubectl

AGENT = ("DaemonSet", "coredump-agent")
# The uninstall DaemonSet's init container writes /proc/sys too (restoring the node's core_pattern).
UNINSTALLER = ("DaemonSet", "coredump-uninstall", "uninstall")
APISERVER_LABELS = {"app.kubernetes.io/name": "coredump", "app.kubernetes.io/component": "apiserver"}


def workloads(variant: Rendered) -> list[dict[str, Any]]:
    return [o for o in variant.objects if pod_spec(o) is not None]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def effective(spec: dict[str, Any], container: dict[str, Any], key: str) -> Any:
    """A security setting as the kubelet applies it: the container's, else the pod's."""
    value = container.get("securityContext", {}).get(key)
    return spec.get("securityContext", {}).get(key) if value is None else value


def test_deploy_only_the_agent_is_privileged(any_variant: Rendered) -> None:
    variant = any_variant
    for obj in workloads(variant):
        spec = pod_spec(obj)
        ident = (obj["kind"], obj["metadata"]["name"])
        node_level = ident == AGENT or ident == UNINSTALLER[:2]
        for container in containers(spec):
            sc = container.get("securityContext", {})
            if ident == AGENT or (*ident, container["name"]) == UNINSTALLER:
                assert sc.get("privileged") is True
                assert spec.get("hostPID") is (True if ident == AGENT else None)
                continue
            assert not sc.get("privileged"), ident
            assert not (spec.get("hostPID") or spec.get("hostNetwork") or spec.get("hostIPC")), ident
            assert node_level or not any("hostPath" in v for v in spec.get("volumes", [])), ident
            assert not sc.get("capabilities", {}).get("add"), ident
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], ident
            assert sc.get("allowPrivilegeEscalation") is False, ident
            assert effective(spec, container, "runAsNonRoot") is True, ident
            assert effective(spec, container, "runAsUser") not in (None, 0), ident
            assert sc.get("readOnlyRootFilesystem") is True, ident
            assert effective(spec, container, "seccompProfile") == {"type": "RuntimeDefault"}, ident
            assert not any(
                m.get("readOnly") is not True
                for m in container.get("volumeMounts", [])
                if any(v["name"] == m["name"] and "hostPath" in v for v in spec.get("volumes", []))
            ), ident
    names = {(o["kind"], o["metadata"]["name"]) for o in workloads(variant)}
    assert AGENT in names or UNINSTALLER[:2] in names


def test_deploy_every_container_has_requests_and_limits(any_variant: Rendered) -> None:
    for obj in workloads(any_variant):
        for container in containers(pod_spec(obj)):
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(kind, {})), (
                    f"{obj['metadata']['name']}/{container['name']} lacks {kind}"
                )


def test_deploy_agent_reaches_every_node_and_what_it_needs_there(variant: Rendered) -> None:
    agent = variant.one(*AGENT)
    spec = pod_spec(agent)
    # Tolerates every taint: an untolerated taint would be a node whose crashes nobody captures.
    assert {"operator": "Exists"} in spec["tolerations"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for c in spec["containers"] for m in c.get("volumeMounts", [])}
    claims = [v for v in volumes.values() if v.get("persistentVolumeClaim", {}).get("claimName") == "coredump-storage"]
    assert len(claims) == 1 and any(m["name"] == claims[0]["name"] and not m.get("readOnly") for m in mounts.values())
    host_dirs = {v["hostPath"]["path"] for v in volumes.values() if "hostPath" in v}
    # The shim's directory and the spool, both on the host (the kernel runs the shim in the host's namespaces).
    assert "/var/lib/coredump" in host_dirs
    assert spec["serviceAccountName"] == "coredump-agent"


def test_deploy_apiserver_is_highly_available_and_probed(variant: Rendered) -> None:
    deployment = variant.one("Deployment", "coredump-apiserver")
    spec = pod_spec(deployment)
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["template"]["metadata"]["labels"] == APISERVER_LABELS
    pdb = variant.one("PodDisruptionBudget", "coredump-apiserver")
    assert pdb["spec"]["selector"]["matchLabels"] == APISERVER_LABELS
    assert pdb["spec"]["minAvailable"] >= 1 and pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    anti = spec["affinity"]["podAntiAffinity"]
    terms = [t.get("podAffinityTerm", t) for k in anti.values() for t in k]
    assert any(
        t["topologyKey"] == "kubernetes.io/hostname" and t["labelSelector"]["matchLabels"] == APISERVER_LABELS
        for t in terms
    )
    (container,) = spec["containers"]
    port_names = {p["name"] for p in container["ports"]}
    for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["scheme"] == "HTTPS" and get["path"] == path and get["port"] in port_names, probe


def test_deploy_apiservice_verifies_the_server_certificate(variant: Rendered) -> None:
    apiservice = variant.one("APIService", "v1alpha1.coredump.example.io")
    assert "insecureSkipTLSVerify" not in apiservice["spec"]
    if variant.name == "cert-manager":
        source = apiservice["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
        namespace, name = source.split("/")
        certificate = variant.one("Certificate", name)
        assert certificate["metadata"]["namespace"] == namespace == NAMESPACE
        assert "caBundle" not in apiservice["spec"]  # the injector owns it
    else:
        assert apiservice["spec"]["caBundle"]


def test_deploy_etcd_keeps_its_data_on_persistent_volumes(variant: Rendered) -> None:
    etcd = variant.one("StatefulSet", "coredump-etcd")
    templates = {t["metadata"]["name"] for t in etcd["spec"]["volumeClaimTemplates"]}
    mounted = {m["name"] for c in pod_spec(etcd)["containers"] for m in c["volumeMounts"]}
    assert templates and templates <= mounted
    assert etcd["spec"]["replicas"] % 2 == 1  # an odd member count: a quorum survives (n-1)/2 failures


def rules_of(variant: Rendered, kind: str, name: str) -> list[dict[str, Any]]:
    return variant.one(kind, name).get("rules", [])


def allows(rules: list[dict[str, Any]], *, group: str, resource: str, verb: str) -> bool:
    return any(
        group in r.get("apiGroups", []) and resource in r.get("resources", []) and verb in r.get("verbs", [])
        for r in rules
    )


def bound_to(variant: Rendered, kind: str, role: str, *, service_account: str) -> list[dict[str, Any]]:
    bindings = [*variant.all("ClusterRoleBinding"), *variant.all("RoleBinding")]
    namespace = NODE_NAMESPACE if service_account == "coredump-agent" else NAMESPACE
    return [
        b
        for b in bindings
        if b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role}
        and {"kind": "ServiceAccount", "name": service_account, "namespace": namespace} in b["subjects"]
    ]


def test_deploy_component_service_accounts_have_what_they_need(variant: Rendered) -> None:
    assert bound_to(variant, "ClusterRole", "system:auth-delegator", service_account="coredump-apiserver")
    reader = bound_to(
        variant, "Role", "extension-apiserver-authentication-reader", service_account="coredump-apiserver"
    )
    assert [b["metadata"]["namespace"] for b in reader] == ["kube-system"]
    apiserver_rules = [
        r
        for b in bound_to(variant, "ClusterRole", "coredump-apiserver", service_account="coredump-apiserver")
        for r in rules_of(variant, "ClusterRole", b["roleRef"]["name"])
    ]
    assert all(allows(apiserver_rules, group="", resource="pods", verb=v) for v in ("get", "list", "watch"))
    # The CoreDumped Event watch that brings each new core to watchers within seconds; never more than reading.
    assert all(allows(apiserver_rules, group="", resource="events", verb=v) for v in ("list", "watch"))
    assert not any(allows(apiserver_rules, group="", resource="events", verb=v) for v in ("create", "delete"))
    agent_rules = [
        r
        for b in bound_to(variant, "ClusterRole", "coredump-agent", service_account="coredump-agent")
        for r in rules_of(variant, "ClusterRole", b["roleRef"]["name"])
    ]
    assert allows(agent_rules, group="", resource="events", verb="create")
    assert allows(agent_rules, group="", resource="pods", verb="get")
    # Neither component can read Secrets cluster-wide.
    for rules in (apiserver_rules, agent_rules):
        assert not any(allows(rules, group="", resource=r, verb="get") for r in ("secrets", "*"))
    deployments = {
        o["metadata"]["name"]: pod_spec(o)["serviceAccountName"]
        for o in workloads(variant)
        if o["kind"] in ("Deployment", "DaemonSet")
    }
    assert deployments == {"coredump-apiserver": "coredump-apiserver", "coredump-agent": "coredump-agent"}


AGGREGATE = "rbac.authorization.k8s.io/aggregate-to-"


def aggregated_into(role: dict[str, Any]) -> set[str]:
    return {
        k.removeprefix(AGGREGATE)
        for k, v in role["metadata"].get("labels", {}).items()
        if k.startswith(AGGREGATE) and v == "true"
    }


def test_deploy_users_see_endpoints_with_view_and_download_cores_only_with_edit_or_admin(variant: Rendered) -> None:
    group = "coredump.example.io"
    roles = variant.all("ClusterRole")
    viewers = [r for r in roles if "view" in aggregated_into(r)]
    assert viewers and all(
        allows(r["rules"], group=group, resource="coredumpendpoints", verb=v)
        for r in viewers
        for v in ("get", "list", "watch")
    )
    for role in viewers:
        for rule in role["rules"]:
            assert set(rule["verbs"]) <= {"get", "list", "watch"}, role["metadata"]["name"]
            assert not any(r.startswith("coredumpendpoints/") or r == "*" for r in rule["resources"])
    dumpers = [r for r in roles if allows(r["rules"], group=group, resource="coredumpendpoints/dump", verb="get")]
    assert [r["metadata"]["name"] for r in dumpers] == ["coredump:dump"]
    assert aggregated_into(dumpers[0]) == {"edit", "admin"}
