"""The kernel path on real cores: every runtime and cgroup shape, byte-identical storage, gdb-readable cores."""

from __future__ import annotations

import gzip
import json
import stat
from pathlib import Path

import pytest
from handler_harness import CONTAINER_ID, POD_UID, NodeTree, RealCore, cgroup_text, gdb_backtrace, gunzip_to

from handler import elfinfo, layout
from digests import digest_of, digest_of_file

SHAPES = [
    f"{rt}-{drv}:{v}"
    for rt in ("containerd", "crio", "docker")
    for drv in ("systemd", "cgroupfs")
    for v in ("v1", "v2")
]
RUNTIME_SCHEME = {"containerd": "containerd", "crio": "cri-o", "docker": "docker"}


def only_core(node: NodeTree, namespace: str = "team-a") -> layout.StoredCore:
    cores = layout.list_cores(node.storage, namespace=namespace)
    assert len(cores) == 1, cores
    return cores[0]


@pytest.mark.parametrize("shape", SHAPES)
def test_handler_files_a_real_core_for_every_runtime_and_cgroup_shape(
    node: NodeTree, segv_core: RealCore, shape: str
) -> None:
    node.add_process(segv_core.pid, cgroup=cgroup_text(shape), exe=segv_core.exe)
    node.add_log_link(namespace="team-a", pod="web-0", container="app")
    runtime = RUNTIME_SCHEME[shape.split("-")[0]]
    # cgroupfs paths are bare ids: the runtime's name comes from configuration there.
    r = node.run_capture(segv_core.path, pid=segv_core.pid, signal=segv_core.signal, extra=("--runtime", runtime))
    assert r.returncode == 0, r.stderr.decode()
    core = only_core(node)
    assert (core.ref.pod, core.ref.pod_uid, core.ref.container) == ("web-0", POD_UID, "app")
    m = core.metadata
    assert m["containerID"] == f"{runtime}://{CONTAINER_ID}"
    raw = gzip.decompress(core.core_path.read_bytes())
    assert len(raw) == m["size"] == m["observedSize"] == segv_core.path.stat().st_size
    assert digest_of(raw) == m["digest"] == digest_of_file(segv_core.path) and m["sha256"] is None


def test_handler_metadata_is_complete_and_gdb_reads_the_stored_core(
    node: NodeTree, segv_core: RealCore, tmp_path: Path
) -> None:
    node.add_process(segv_core.pid, cgroup=cgroup_text("containerd-systemd:v2"), exe=segv_core.exe)
    node.add_log_link(namespace="team-a", pod="web-0", container="app")
    r = node.run_capture(segv_core.path, pid=segv_core.pid, signal=segv_core.signal, time=1795000000)
    assert r.returncode == 0, r.stderr.decode()
    core = only_core(node)
    m = json.loads(core.meta_path.read_text())
    assert set(layout.METADATA_KEYS) <= set(m)
    assert m["coreID"] == core.ref.core_id == f"20261118T110640Z-crasher-{segv_core.pid}-11"
    assert layout.CORE_ID_RE.match(m["coreID"])
    assert (m["namespace"], m["pod"], m["podUID"], m["container"]) == ("team-a", "web-0", POD_UID, "app")
    assert m["signal"] == 11 and m["signalName"] == "SIGSEGV" and m["pid"] == segv_core.pid
    assert m["timestamp"] == "2026-11-18T11:06:40Z"
    assert m["node"] == "node-1" and m["comm"] == "crasher" and m["exe"] == str(segv_core.exe)
    assert m["buildID"] == elfinfo.build_id_from_executable(segv_core.exe) and len(m["buildID"]) == 40
    assert m["storedSize"] == core.core_path.stat().st_size < m["size"]
    assert m["truncated"] is False and m["truncationReason"] is None and m["compression"] == "gzip"
    assert stat.S_IMODE(core.core_path.stat().st_mode) & 0o007 == 0
    bt = gdb_backtrace(segv_core.exe, gunzip_to(core.core_path, tmp_path / "stored.core"))
    assert segv_core.function in bt, bt


def test_handler_sigabrt_core_from_crio_names_abort_path(node: NodeTree, abort_core: RealCore, tmp_path: Path) -> None:
    node.add_process(abort_core.pid, cgroup=cgroup_text("crio-systemd:v1"), exe=abort_core.exe)
    node.add_log_link(namespace="batch", pod="job-x-7c9", container="worker")
    r = node.run_capture(abort_core.path, pid=abort_core.pid, signal=abort_core.signal)
    assert r.returncode == 0, r.stderr.decode()
    core = only_core(node, "batch")
    assert core.metadata["signalName"] == "SIGABRT" and core.metadata["signal"] == 6
    bt = gdb_backtrace(abort_core.exe, gunzip_to(core.core_path, tmp_path / "stored.core"))
    assert abort_core.function in bt, bt


def test_handler_names_from_crictl_when_log_links_are_missing(
    node: NodeTree, segv_core: RealCore, tmp_path: Path
) -> None:
    """No /var/log/containers link (e.g. a hostNetwork pod whose logs are elsewhere): the CRI names it."""
    crictl = tmp_path / "crictl"
    info = {
        "status": {
            "labels": {
                "io.kubernetes.pod.namespace": "infra",
                "io.kubernetes.pod.name": "node-exporter-x2",
                "io.kubernetes.pod.uid": POD_UID,
                "io.kubernetes.container.name": "exporter",
            },
            "image": {"image": "quay.io/prom/node-exporter:v1.8.0"},
            "imageRef": "quay.io/prom/node-exporter@sha256:" + "ab" * 32,
        }
    }
    crictl.write_text(
        f'#!/bin/sh\n[ "$1 $4" = "inspect {CONTAINER_ID}" ] || exit 1\ncat <<\'X\'\n{json.dumps(info)}\nX\n'
    )
    crictl.chmod(0o755)
    node.add_process(segv_core.pid, cgroup=cgroup_text("containerd-cgroupfs:v2"), exe=segv_core.exe)
    r = node.run_capture(segv_core.path, pid=segv_core.pid, signal=segv_core.signal, extra=("--crictl", str(crictl)))
    assert r.returncode == 0, r.stderr.decode()
    core = only_core(node, "infra")
    assert (core.ref.pod, core.ref.container) == ("node-exporter-x2", "exporter")
    assert core.metadata["image"] == "quay.io/prom/node-exporter:v1.8.0"
    assert core.metadata["imageDigest"] == "sha256:" + "ab" * 32


def test_handler_spools_when_pod_names_are_unknown_and_drain_files_it_later(
    node: NodeTree, segv_core: RealCore
) -> None:
    node.add_process(segv_core.pid, cgroup=cgroup_text("docker-cgroupfs:v1"), exe=segv_core.exe)
    r = node.run_capture(segv_core.path, pid=segv_core.pid, signal=segv_core.signal)
    assert r.returncode == 0, r.stderr.decode()
    assert layout.list_crashed_pods(node.storage) == []
    assert len(list(node.spool.glob("*.core.gz"))) == 1
    # The kubelet's link shows up later; the drain resolves the spooled cgroup and files the core.
    node.add_log_link(namespace="team-a", pod="late-0", container="app")
    import subprocess

    out = subprocess.run(node.handler_args("drain"), capture_output=True, text=True)
    assert out.returncode == 0 and "drained 1" in out.stdout, out
    core = only_core(node)
    assert core.ref.pod == "late-0"
    assert gzip.decompress(core.core_path.read_bytes()) == segv_core.path.read_bytes()
    assert list(node.spool.iterdir()) == []


def test_handler_import_files_an_existing_core(node: NodeTree, abort_core: RealCore, tmp_path: Path) -> None:
    import subprocess

    r = subprocess.run(
        node.handler_args(
            "import",
            "--namespace",
            "demo",
            "--pod",
            "p-1",
            "--pod-uid",
            POD_UID,
            "--container",
            "c",
            str(abort_core.path),
        ),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    core = only_core(node, "demo")
    assert r.stdout.strip() == str(core.core_path)
    m = core.metadata
    assert (m["pid"], m["signal"], m["comm"]) == (abort_core.pid, 6, "crasher")
    assert m["buildID"] == elfinfo.build_id_from_executable(abort_core.exe)
    assert m["digest"] == digest_of_file(abort_core.path)
    bad = subprocess.run(
        node.handler_args(
            "import",
            "--namespace",
            "Bad_NS",
            "--pod",
            "p",
            "--pod-uid",
            POD_UID,
            "--container",
            "c",
            str(abort_core.path),
        ),
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert "namespace 'Bad_NS'" in bad.stderr


def test_a_node_told_to_use_sha256_records_it_for_fips_hosts_and_older_plugins(
    node: NodeTree, segv_core: RealCore
) -> None:
    node.add_process(segv_core.pid, cgroup=cgroup_text("containerd-systemd:v2"), exe=segv_core.exe)
    node.add_log_link(namespace="team-a", pod="web-0", container="app")
    r = node.run_capture(segv_core.path, pid=segv_core.pid, signal=segv_core.signal, extra=("--core-digest", "sha256"))
    assert r.returncode == 0, r.stderr.decode()
    m = only_core(node).metadata
    expected = digest_of_file(segv_core.path, algorithm="sha256")
    # Both fields: ``digest`` for this plugin, ``sha256`` (the bare hex) for a plugin older than ``digest``.
    assert m["digest"] == expected and m["sha256"] == expected.removeprefix("sha256:")
