"""
The commit protocol, both halves (issue 10): the handler killed at every step of a commit (injected, not timed)
leaves either a committed pair or a write that readers skip and that the sweep completes (the metadata is on disk
before any step of the commit); never a public core that a reader takes as whole, and never a lost core.
"""

from __future__ import annotations

import gzip
import os
import signal
from pathlib import Path

import pytest
from handler_harness import POD_UID, NodeTree, RealCore, cgroup_text

from handler import layout
from digests import digest_of

STEPS = ["commit:data-synced", "commit:meta-written", "commit:data-named", "commit:meta-named", "commit:done"]


@pytest.mark.parametrize("step", STEPS)
def test_a_kill_at_every_commit_step_loses_nothing_and_shows_nothing_half(
    node: NodeTree, segv_core: RealCore, step: str
) -> None:
    node.add_process(segv_core.pid, cgroup=cgroup_text("containerd-systemd:v2"), exe=segv_core.exe)
    node.add_log_link(namespace="team-a", pod="web-0", container="app")
    env = {**os.environ, "COREDUMP_FAULT": step}
    r = node.run_capture(segv_core.path, pid=segv_core.pid, signal=segv_core.signal, env=env)
    assert r.returncode == -signal.SIGKILL, (step, r.returncode, r.stderr.decode()[-500:])
    directory = layout.container_dir(node.storage, namespace="team-a", pod="web-0", pod_uid=POD_UID, container="app")
    visible = layout.list_cores(node.storage, namespace="team-a")
    names = sorted(os.listdir(directory)) if directory.is_dir() else []
    public_meta = [n for n in names if not n.startswith(".") and n.endswith(layout.META_SUFFIX)]
    if step in ("commit:meta-named", "commit:done"):
        # the metadata's rename is the commit point: from there on the core is whole and visible
        (core,) = visible
        assert gzip.decompress(core.core_path.read_bytes()) == segv_core.path.read_bytes()
        # the data temp a kill right after the commit leaves (a second name of the same file) is only debris
        layout.sweep_debris(directory, node="node-1", proc_root=Path("/proc"))
        assert layout.list_cores(node.storage, namespace="team-a") == visible
        assert [n for n in os.listdir(directory) if n.startswith(".")] == []
        return
    # before the commit point nobody sees a core ...
    assert visible == [] and public_meta == [], names
    # ... a sweeper on another node leaves it alone within its grace (it cannot see the writer's pid) ...
    assert layout.sweep_debris(directory, node="node-2", proc_root=Path("/proc")) == 0
    assert layout.list_cores(node.storage, namespace="team-a") == []
    # ... and its own node's sweeper, which sees the writer is dead, completes it: every commit step is after the
    # metadata was on disk, so the core is never lost, and it is labelled as the handler would have labelled it
    layout.sweep_debris(directory, node="node-1", proc_root=Path("/proc"))
    (core,) = layout.list_cores(node.storage, namespace="team-a")
    assert gzip.decompress(core.core_path.read_bytes()) == segv_core.path.read_bytes()
    assert core.metadata["digest"] == digest_of(segv_core.path.read_bytes())
    assert core.metadata["truncated"] is False and core.metadata["pid"] == segv_core.pid
    assert core.metadata["storedSize"] == core.core_path.stat().st_size
    assert [n for n in os.listdir(directory) if n.startswith(".")] == []  # and no debris is left
