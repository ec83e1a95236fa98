"""
The real kubectl, oldest and newest supported versions, against the real server over TLS: every command a
user runs on CoredumpEndpoints works and prints what it prints for built-in resources.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import uuid

import pytest
import yaml
from fixtures_apiserver import NEWEST_KUBECTL, OLDEST_KUBECTL, RunningServer, endpoint_manifest, kubectl_binary
from waiting import NotYet, wait_until

pytestmark = pytest.mark.kubectl
VERSIONS = [OLDEST_KUBECTL, NEWEST_KUBECTL]


def _manifest(name: str, **kwargs: object) -> str:
    return yaml.safe_dump(endpoint_manifest(name, **kwargs))  # type: ignore[arg-type]


@pytest.fixture(params=VERSIONS, ids=lambda v: f"kubectl-{v}")
def version(request: pytest.FixtureRequest) -> str:
    kubectl_binary(request.param)
    return request.param


def test_api_resources_lists_the_kind_and_short_name(apiserver: RunningServer, version: str) -> None:
    out = apiserver.kubectl("api-resources", "--api-group=coredump.example.io", version=version).stdout
    row = next(line for line in out.splitlines() if line.startswith("coredumpendpoints"))
    assert row.split() == ["coredumpendpoints", "cde", "coredump.example.io/v1alpha1", "true", "CoredumpEndpoint"]


def test_create_get_table_yaml_describe_delete(apiserver: RunningServer, version: str) -> None:
    name = f"web-{version.replace('.', '-')}"
    uid = str(uuid.uuid4())
    created = apiserver.kubectl("create", "-f", "-", input=_manifest(name, pod_uid=uid), version=version)
    assert created.stdout.strip() == f"coredumpendpoint.coredump.example.io/{name} created"

    table = apiserver.kubectl("get", "coredumpendpoints", version=version).stdout.splitlines()
    assert table[0].split() == ["NAME", "POD", "UID", "CORES", "LAST", "SIGNAL", "LAST", "CRASH", "TOP", "FRAME", "AGE"]
    row = next(line.split() for line in table[1:] if line.startswith(name + " "))
    assert row[:5] == [name, uid, "0", "<none>", "<none>"]

    wide = apiserver.kubectl("get", "cde", name, "-o", "wide", version=version).stdout.splitlines()
    assert "CONTAINERS" in wide[0] and "STORED SIZE" in wide[0]

    everywhere = apiserver.kubectl("get", "cde", "-A", version=version).stdout.splitlines()
    assert everywhere[0].startswith("NAMESPACE")
    assert any(line.split()[:2] == ["default", name] for line in everywhere[1:])

    obj = yaml.safe_load(apiserver.kubectl("get", "cde", name, "-o", "yaml", version=version).stdout)
    assert obj["spec"]["podUID"] == uid
    assert obj["metadata"]["uid"] and obj["metadata"]["creationTimestamp"] and obj["metadata"]["generation"] == 1
    assert obj["status"]["coreCount"] == 0

    described = apiserver.kubectl("describe", "cde", name, version=version).stdout
    assert f"Name:         {name}" in described and uid in described

    deleted = apiserver.kubectl("delete", "cde", name, version=version)
    assert deleted.stdout.strip() == f'coredumpendpoint.coredump.example.io "{name}" deleted'
    missing = apiserver.kubectl("get", "cde", name, version=version, check=False)
    assert missing.returncode == 1
    assert f'coredumpendpoints.coredump.example.io "{name}" not found' in missing.stderr


def test_explain_spec_documents_pod_uid(apiserver: RunningServer, version: str) -> None:
    out = apiserver.kubectl("explain", "coredumpendpoint.spec", version=version).stdout
    assert "podUID" in out and "deleted" in out


def test_label_and_merge_patch(apiserver: RunningServer, version: str) -> None:
    name = f"lbl-{version.replace('.', '-')}"
    apiserver.kubectl("create", "-f", "-", input=_manifest(name), version=version)
    team = f"payments-{version.replace('.', '-')}"
    assert "labeled" in apiserver.kubectl("label", "cde", name, f"team={team}", version=version).stdout
    patched = apiserver.kubectl(
        "patch", "cde", name, "--type=merge", "-p", '{"metadata":{"annotations":{"owner":"alice"}}}', version=version
    )
    assert "patched" in patched.stdout
    obj = json.loads(apiserver.kubectl("get", "cde", name, "-o", "json", version=version).stdout)
    assert obj["metadata"]["labels"] == {"team": team}
    assert obj["metadata"]["annotations"] == {"owner": "alice"}
    selected = apiserver.kubectl("get", "cde", "-l", f"team={team}", "-o", "name", version=version).stdout
    assert selected.split() == [f"coredumpendpoint.coredump.example.io/{name}"]
    immutable = apiserver.kubectl(
        "patch",
        "cde",
        name,
        "--type=merge",
        "-p",
        f'{{"spec":{{"podUID":"{uuid.uuid4()}"}}}}',
        version=version,
        check=False,
    )
    assert immutable.returncode == 1 and "field is immutable" in immutable.stderr


def test_create_rejects_unknown_fields_strictly(apiserver: RunningServer, version: str) -> None:
    manifest = endpoint_manifest(f"strict-{version.replace('.', '-')}")
    manifest["spec"]["bogus"] = "x"
    result = apiserver.kubectl("create", "-f", "-", input=yaml.safe_dump(manifest), version=version, check=False)
    assert result.returncode == 1
    assert 'unknown field "spec.bogus"' in result.stderr


def test_get_watch_sees_create_and_delete(apiserver: RunningServer, version: str) -> None:
    name = f"watched-{version.replace('.', '-')}"
    command = [
        kubectl_binary(version),
        "--kubeconfig",
        str(apiserver.kubeconfig),
        "get",
        "cde",
        "-w",
        "--output-watch-events",
        "--field-selector",
        f"metadata.name={name}",
    ]
    watcher = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"HOME": str(apiserver.dev_dir), "PATH": "/usr/bin:/bin"},
    )
    lines: queue.Queue[str] = queue.Queue()
    assert watcher.stdout is not None
    threading.Thread(target=lambda: [lines.put(line) for line in watcher.stdout], daemon=True).start()  # type: ignore[union-attr]

    def next_event(kind: str) -> list[str]:
        while True:
            line = lines.get(timeout=20)
            if line.split()[:1] == [kind]:
                return line.split()

    try:
        # The watch is established once kubectl has listed; an object created after that arrives as ADDED.
        apiserver.kubectl("wait", "--for=delete", f"cde/{name}", "--timeout=1s", version=version, check=False)
        apiserver.kubectl("create", "-f", "-", input=_manifest(name), version=version)
        assert next_event("ADDED")[1] == name
        apiserver.kubectl("delete", "cde", name, version=version)
        assert next_event("DELETED")[1] == name
    finally:
        watcher.terminate()
        watcher.wait(timeout=10)


def test_forbidden_and_not_found_read_like_builtin_resources(apiserver: RunningServer, version: str) -> None:
    missing = apiserver.kubectl("delete", "cde", "nope", version=version, check=False)
    assert missing.returncode == 1
    assert 'Error from server (NotFound): coredumpendpoints.coredump.example.io "nope" not found' in missing.stderr
    denied = apiserver.kubectl("delete", "cde", "nope", context="dev-viewer", version=version, check=False)
    assert denied.returncode == 1
    assert "Error from server (Forbidden)" in denied.stderr and 'User "dev-viewer" cannot delete' in denied.stderr


def test_the_top_frame_and_signature_of_the_last_crash_are_shown(apiserver: RunningServer) -> None:
    """What the handler learned of a crash (its signature and top frames) is in status and in `kubectl get`."""
    import gzip

    from handler import layout

    uid = str(uuid.uuid4())
    with layout.CoreWriter(
        apiserver.storage_root,
        namespace="explained",
        pod="api-0",
        pod_uid=uid,
        container="app",
        core_id="20261201T101500Z-api-7-11",
    ) as w:
        w.write(gzip.compress(b"\x7fELF core"))
        stored = w.commit({"size": 9, "signal": 11, "signalName": "SIGSEGV"})
    layout.amend_metadata(
        stored,
        {
            "signature": "5e1fcafe00112233",
            "topFrames": ["api!parse_request", "api!handle", "libc.so.6!__libc_start_main"],
        },
    )

    # Dev mode notices the commit and the amendment on its own (auto-create, then the amended status).
    def amended() -> str | NotYet:
        out = apiserver.kubectl("get", "cde", "-n", "explained", "-o", "wide", check=False).stdout
        return out if "5e1fcafe00112233" in out else NotYet(out)

    out = str(wait_until(amended, what="the amended status in kubectl get -o wide"))
    header, row = out.splitlines()[0], out.splitlines()[1]
    assert "TOP FRAME" in header and "SIGNATURE" in header
    assert "api!parse_request" in row.split() and "5e1fcafe00112233" in row.split()
    core = json.loads(apiserver.kubectl("get", "cde", "api-0", "-n", "explained", "-o", "json").stdout)
    assert core["status"]["cores"][0]["topFrames"][:2] == ["api!parse_request", "api!handle"]
