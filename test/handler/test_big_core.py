"""
A large real core through the real handler: stored whole, in flat memory (the 8 GiB run is in
bench/ingest_bench.py).
"""

from __future__ import annotations

import importlib.util
import subprocess

import pytest
from handler_harness import REPO, NodeTree, cgroup_text

from handler import layout
from digests import digest_of_file

pytestmark = pytest.mark.slow


def _bench():
    spec = importlib.util.spec_from_file_location("ingest_bench", REPO / "bench" / "ingest_bench.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_1_gib_real_core_is_stored_whole_in_under_64_mib(node: NodeTree) -> None:
    bench = _bench()
    core = bench.real_core(1)  # cached under ~/.cache/coredump-bench
    node.add_process(4242, cgroup=cgroup_text("containerd-systemd:v2"))
    node.add_log_link(namespace="team-a", pod="web-0", container="app")
    with open(core, "rb") as f:
        proc = subprocess.Popen(
            node.handler_args("capture", "4242", "4242", "11", "1795000000", "-1", "bigcrash"),
            stdin=f,
            stderr=subprocess.DEVNULL,
            cwd=REPO,
        )
        peak = bench.PeakRss(proc.pid)  # the process's own VmHWM, polled while it runs
        assert proc.wait() == 0
        hwm = peak.stop()
    (stored,) = layout.list_cores(node.storage, namespace="team-a")
    assert stored.metadata["digest"] == digest_of_file(core) and stored.metadata["truncated"] is False
    assert stored.metadata["size"] == core.stat().st_size
    # gzip -t of the whole stored file: every member intact.
    assert subprocess.run(["gzip", "-t", str(stored.core_path)]).returncode == 0
    assert 0 < hwm <= 64 << 20, f"peak RSS {hwm >> 20} MiB"
