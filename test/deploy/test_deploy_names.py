"""
Names that must agree across objects, files and flags, or the install silently does not work: the APIService
points at the Service, the Service at the API server's secure port, the serving certificate names the
Service the way the aggregator dials it, the flags name the mounted files and directories; and every flag
the manifests pass is one the program's real argparse parser accepts.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import io
import logging
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from deploy_helpers import APISERVICE, NAMESPACE, SERVICE, TLS_FILES, Rendered, container_flags, pod_spec

logger = logging.getLogger(__name__)

pytestmark = pytest.mark.kubectl


def flag_values(container: dict[str, Any]) -> dict[str, str]:
    """``--name=value`` flags of a container (the manifests always use the = form)."""
    out = {}
    for arg in container_flags(container):
        name, sep, value = arg.partition("=")
        out[name] = value if sep else "true"
    return out


def apiserver_container(variant: Rendered) -> dict[str, Any]:
    (container,) = pod_spec(variant.one("Deployment", SERVICE))["containers"]
    return container


def mount_of(spec: dict[str, Any], container: dict[str, Any], path: str) -> tuple[dict, dict]:
    """The volume mount containing ``path`` (longest mount path wins), and its volume."""
    mounts = [
        m
        for m in container.get("volumeMounts", [])
        if Path(path) == Path(m["mountPath"]) or Path(m["mountPath"]) in Path(path).parents
    ]
    assert mounts, f"{path} is on no volume of {container['name']}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    return mount, volume


def test_deploy_apiservice_service_and_port_agree(variant: Rendered) -> None:
    apiservice = variant.one("APIService", APISERVICE)
    spec = apiservice["spec"]
    assert APISERVICE == f"{spec['version']}.{spec['group']}" == "v1alpha1.coredump.example.io"
    service = variant.one("Service", spec["service"]["name"])
    assert service["metadata"]["namespace"] == spec["service"]["namespace"] == NAMESPACE
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == spec["service"]["port"]]
    assert port["port"] == 443
    deployment = variant.one("Deployment", SERVICE)
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    container = apiserver_container(variant)
    (target,) = [p for p in container["ports"] if port["targetPort"] in (p["name"], p["containerPort"])]
    assert target["containerPort"] == int(flag_values(container)["--secure-port"])


def sans(pem: bytes) -> set[str]:
    cert = x509.load_pem_x509_certificate(pem)
    return set(
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    )


def test_deploy_certificate_names_match_the_service(manifests_with_certs: Path, rendered: dict[str, Rendered]) -> None:
    # kube-apiserver's aggregator dials <service>.<namespace>.svc and verifies that name.
    dialed = f"{SERVICE}.{NAMESPACE}.svc"
    script_sans = sans((manifests_with_certs / TLS_FILES / "tls.crt").read_bytes())
    assert dialed in script_sans
    assert script_sans == {SERVICE, f"{SERVICE}.{NAMESPACE}", dialed, f"{dialed}.cluster.local"}
    certificate = rendered["cert-manager"].one("Certificate", "coredump-apiserver-tls")
    assert set(certificate["spec"]["dnsNames"]) == script_sans


def test_deploy_tls_flags_name_the_mounted_serving_secret(variant: Rendered) -> None:
    deployment = variant.one("Deployment", SERVICE)
    spec, container = pod_spec(deployment), apiserver_container(variant)
    flags = flag_values(container)
    if variant.name == "cert-manager":
        secret_name = variant.one("Certificate", "coredump-apiserver-tls")["spec"]["secretName"]
        keys = {"tls.crt", "tls.key", "ca.crt"}  # what cert-manager writes into a certificate's Secret
    else:
        secret = variant.one("Secret", "coredump-apiserver-tls", prefix=True)
        secret_name, keys = secret["metadata"]["name"], set(secret["data"])
    for flag, key in (("--tls-cert-file", "tls.crt"), ("--tls-private-key-file", "tls.key")):
        path = flags[flag]
        mount, volume = mount_of(spec, container, path)
        assert volume["secret"]["secretName"] == secret_name and mount.get("readOnly") is True
        assert Path(path).name == key and key in keys


def test_deploy_storage_root_is_the_shared_claim(variant: Rendered) -> None:
    deployment = variant.one("Deployment", SERVICE)
    container = apiserver_container(variant)
    root = flag_values(container)["--storage-root"]
    mount, volume = mount_of(pod_spec(deployment), container, root)
    assert mount["mountPath"] == root
    assert volume["persistentVolumeClaim"]["claimName"] == "coredump-storage"


def test_deploy_etcd_servers_are_the_etcd_members(variant: Rendered) -> None:
    etcd = variant.one("StatefulSet", "coredump-etcd")
    headless = variant.one("Service", etcd["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    (client,) = [p["port"] for p in headless["spec"]["ports"] if p["name"] == "client"]
    expected = [
        f"https://coredump-etcd-{i}.{headless['metadata']['name']}.{NAMESPACE}.svc:{client}"
        for i in range(etcd["spec"]["replicas"])
    ]
    assert flag_values(apiserver_container(variant))["--etcd-servers"].split(",") == expected


def console_scripts() -> dict[str, str]:
    dist = importlib.metadata.distribution("coredump-example-io")
    return {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}


def parser_of(script: str) -> argparse.ArgumentParser:
    """The real parser of a console script: ``build_parser()`` of the module its entry point names."""
    module_name = console_scripts()[script].split(":")[0]
    module = importlib.import_module(module_name)
    return module.build_parser()


def manifest_commands(variant: Rendered) -> list[tuple[str, list[str]]]:
    out = []
    for obj in variant.objects:
        spec = pod_spec(obj)
        for container in [*(spec or {}).get("initContainers", []), *(spec or {}).get("containers", [])]:
            command = container.get("command", [])
            if command and command[0] in console_scripts():
                out.append((command[0], container_flags(container)))
    return out


def test_deploy_manifests_run_the_three_programs(variant: Rendered) -> None:
    assert {script for script, _ in manifest_commands(variant)} == {"coredump-apiserver", "coredump-agent"}


@pytest.mark.parametrize("script", ["coredump-apiserver", "coredump-agent", "coredump-handler"])
def test_deploy_every_flag_in_the_manifests_is_accepted_by_its_program(
    script: str, rendered: dict[str, Rendered]
) -> None:
    parser = parser_of(script)
    invocations = [
        flags for variant in rendered.values() for name, flags in manifest_commands(variant) if name == script
    ]
    if script == "coredump-handler":
        # The agent writes the handler's core_pattern line itself; the manifests never start it.
        assert not invocations
        return
    assert invocations
    for flags in invocations:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            try:
                parser.parse_args(flags)
            except SystemExit:
                pytest.fail(f"{script} rejects {flags}: {stderr.getvalue().strip()}")


def test_deploy_agent_host_paths_agree_with_its_mounts(variant: Rendered) -> None:
    """core_pattern names the shim by its host path (--host-dir); the agent writes it under --host-root."""
    agent = variant.one("DaemonSet", "coredump-agent")
    spec = pod_spec(agent)
    (container,) = spec["containers"]
    flags = flag_values(container)
    host_dir, host_root = flags["--host-dir"], flags["--host-root"]
    local = str(Path(host_root) / host_dir.lstrip("/"))
    mount, volume = mount_of(spec, container, local)
    assert mount["mountPath"] == local and not mount.get("readOnly")
    assert volume["hostPath"]["path"] == host_dir
    # The kubelet's container log links, which name a crashing container's pod, under the host root too.
    logs, logs_volume = mount_of(spec, container, str(Path(host_root) / "var/log/containers"))
    assert logs_volume["hostPath"]["path"] == "/var/log/containers" and logs.get("readOnly") is True
    # Cores go where the API server reads them: the same claim, at the path each one's flag names.
    root = flags["--storage-root"]
    storage_mount, storage = mount_of(spec, container, root)
    assert storage_mount["mountPath"] == root and storage["persistentVolumeClaim"]["claimName"] == "coredump-storage"
    assert root == flag_values(apiserver_container(variant))["--storage-root"]
    # The node name the handler records comes from the downward API.
    env = {e["name"]: e for e in container.get("env", [])}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_deploy_uninstall_targets_the_agent_host_directory(rendered: dict[str, Rendered]) -> None:
    agent_flags = flag_values(pod_spec(rendered["base"].one("DaemonSet", "coredump-agent"))["containers"][0])
    spec = pod_spec(rendered["uninstall"].one("DaemonSet", "coredump-uninstall"))
    (init,) = spec["initContainers"]
    assert init["command"][:2] == ["coredump-agent", "uninstall"]
    flags = flag_values(init)
    for flag in ("--host-root", "--host-dir", "--sysctl-root"):
        assert flags[flag] == agent_flags[flag], flag
    local = str(Path(flags["--host-root"]) / flags["--host-dir"].lstrip("/"))
    mount, volume = mount_of(spec, init, local)
    assert mount["mountPath"] == local and volume["hostPath"]["path"] == flags["--host-dir"]
