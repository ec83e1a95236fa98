"""
Debris sweeps judge liveness, not age alone (issue 17's node-side item, issue 10's commit gap).

A write that stalls for longer than a sweeper's grace is still its writer's: the temp file names its writer (node,
pid, start time) and the live writer keeps its mtime fresh, so neither its own node's sweeper (which sees the pid)
nor one elsewhere (which sees the mark) takes it. A dead writer's temp goes at once on its own node and after the
grace elsewhere; a dead writer that had reached its commit leaves a core the sweep completes, checked first.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from handler_harness import POD_UID, REPO, NodeTree, RealCore, cgroup_text

from handler import inflight, layout
from digests import digest_of

GRACE = layout.ORPHAN_GRACE_SECONDS
THIS, OTHER = "node-1", "node-2"
PROC = Path("/proc")


def _pod(node: NodeTree, core: RealCore) -> Path:
    node.add_process(core.pid, cgroup=cgroup_text("containerd-systemd:v2"), exe=core.exe)
    node.add_log_link(namespace="team-a", pod="web-0", container="app")
    return layout.container_dir(node.storage, namespace="team-a", pod="web-0", pod_uid=POD_UID, container="app")


def _wait_for(what: str, check: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def _temps(directory: Path) -> list[Path]:
    return sorted(directory.glob(".*.tmp")) if directory.is_dir() else []


def _start_stalled(
    node: NodeTree, core: RealCore, *, heartbeat: float, send: int | None = None
) -> tuple[subprocess.Popen, bytes]:
    # The agent's handler.json carries the heartbeat; here the handler's --config file does.
    (node.base / "no-config.json").write_text(json.dumps({"heartbeat_interval": heartbeat}))
    proc = subprocess.Popen(
        node.handler_args(
            "--stall-timeout", "10m", "capture", str(core.pid), str(core.pid), "11", "1795000000", "-1", "crasher"
        ),
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    data = core.path.read_bytes()
    assert proc.stdin is not None
    proc.stdin.write(data[: len(data) // 2 if send is None else send])
    proc.stdin.flush()
    return proc, data


def test_a_stalled_writer_keeps_its_temp_file_through_every_sweep(node: NodeTree, segv_core: RealCore) -> None:
    directory = _pod(node, segv_core)
    proc, data = _start_stalled(node, segv_core, heartbeat=0.2)
    try:
        _wait_for("the handler's temp file", lambda: _temps(directory))
        (tmp,) = _temps(directory)
        parsed = layout._parse_temp(tmp.name)
        assert parsed is not None and parsed.writer.node == THIS and parsed.writer.pid == proc.pid
        # Its own node's sweeper sees the live pid, even a day past the grace.
        assert layout.sweep_debris(directory, now=time.time() + 86400, node=THIS, proc_root=PROC) == 0
        # Another node's sweeper sees only the mark. Make it look stalled for twice the grace: the live writer
        # marks it again, and the sweep keeps it.
        stale = time.time() - 2 * GRACE
        os.utime(tmp, (stale, stale))
        _wait_for("the writer's heartbeat", lambda: tmp.stat().st_mtime > stale + GRACE)
        assert layout.sweep_debris(directory, node=OTHER, proc_root=PROC) == 0
        assert tmp.exists()
        # The stream resumes: the core is committed whole, nothing of it was swept.
        assert proc.stdin is not None
        proc.stdin.write(data[len(data) // 2 :])
        proc.stdin.close()
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()[-800:] if proc.stderr else ""
    finally:
        proc.kill()
        proc.wait()
    (core,) = layout.list_cores(node.storage, namespace="team-a")
    assert gzip.decompress(core.core_path.read_bytes()) == data
    assert core.metadata["truncated"] is False
    assert _temps(directory) == []


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.stdin:
        proc.stdin.close()


def test_a_dead_writers_partial_core_is_kept_after_the_grace_elsewhere(node: NodeTree, segv_core: RealCore) -> None:
    """SIGKILLed mid-stream (the OOM killer, say) after the notes arrived: kept as a core truncated ``killed``."""
    from handler import elfinfo

    directory = _pod(node, segv_core)
    proc, data = _start_stalled(node, segv_core, heartbeat=0.2)
    try:
        # the first chunk (1 MiB) compressed and written: the notes are in it
        _wait_for("the first chunk on storage", lambda: any(p.stat().st_size for p in _temps(directory)))
    finally:
        _kill(proc)
    (tmp,) = _temps(directory)
    mark = tmp.stat().st_mtime
    # Elsewhere: within the grace it may be a live write; after it, its writer is gone.
    assert layout.sweep_debris(directory, now=mark + GRACE - 1, node=OTHER, proc_root=PROC) == 0
    assert tmp.exists() and layout.list_cores(node.storage, namespace="team-a") == []
    layout.sweep_debris(directory, now=mark + GRACE + 1, node=OTHER, proc_root=PROC)
    assert _temps(directory) == []
    (core,) = layout.list_cores(node.storage, namespace="team-a")
    m = core.metadata
    assert m["truncated"] is True and m["truncationReason"] == "killed"
    kept = gzip.decompress(core.core_path.read_bytes())
    assert 0 < len(kept) < len(data) and kept == data[: len(kept)]  # a prefix of the core, never more
    assert m["size"] == len(kept) and m["digest"] == digest_of(kept)
    assert (m["pid"], m["signal"], m["comm"], m["node"]) == (segv_core.pid, 11, "crasher", THIS)
    assert m["storedSize"] == core.core_path.stat().st_size
    raw = node.base / "kept.core"
    raw.write_bytes(kept)
    assert elfinfo.core_process_info(raw).get("pid") == segv_core.pid  # the notes are all there


def test_its_own_node_sweeps_a_dead_writer_without_waiting(node: NodeTree, segv_core: RealCore) -> None:
    """Killed before anything a debugger could use arrived: nothing to keep, the temp goes at once."""
    directory = _pod(node, segv_core)
    proc, _ = _start_stalled(node, segv_core, heartbeat=60, send=200)
    try:
        _wait_for("the handler's temp file", lambda: _temps(directory))
    finally:
        _kill(proc)
    assert layout.sweep_debris(directory, node=OTHER, proc_root=PROC) == 0  # fresh mark, unknown pid: kept
    assert layout.sweep_debris(directory, node=THIS, proc_root=PROC) == 1  # its pid is gone: debris now
    assert _temps(directory) == []
    assert layout.list_cores(node.storage, namespace="team-a") == []


def _killed_in_commit(node: NodeTree, core: RealCore, step: str = "commit:meta-written") -> Path:
    directory = _pod(node, core)
    r = node.run_capture(core.path, pid=core.pid, signal=core.signal, env={**os.environ, "COREDUMP_FAULT": step})
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-500:]
    assert layout.list_cores(node.storage, namespace="team-a") == []
    return directory


@pytest.mark.parametrize("damage", ["cut", "flipped"])
def test_a_write_whose_data_does_not_match_its_metadata_is_not_published(
    node: NodeTree, segv_core: RealCore, damage: str
) -> None:
    """As after a power loss between the metadata's fsync and the data's: the sweep checks before it commits."""
    directory = _killed_in_commit(node, segv_core)
    (data_tmp,) = [p for p in _temps(directory) if p.name.endswith(layout.CORE_SUFFIX + ".tmp")]
    raw = bytearray(data_tmp.read_bytes())
    if damage == "cut":
        data_tmp.write_bytes(raw[: len(raw) // 2])
    else:
        raw[len(raw) // 2] ^= 0xFF
        data_tmp.write_bytes(bytes(raw))
    layout.sweep_debris(directory, node=THIS, proc_root=PROC)
    assert layout.list_cores(node.storage, namespace="team-a") == []
    assert sorted(os.listdir(directory)) == []


def test_a_recovered_write_whose_id_was_taken_meanwhile_gets_the_next_one(node: NodeTree, segv_core: RealCore) -> None:
    directory = _killed_in_commit(node, segv_core)
    # Another core of the same base id (same second, pid, signal) commits before the sweep runs.
    r = node.run_capture(segv_core.path, pid=segv_core.pid, signal=segv_core.signal)
    assert r.returncode == 0, r.stderr.decode()[-500:]
    (first,) = layout.list_cores(node.storage, namespace="team-a")
    layout.sweep_debris(directory, node=THIS, proc_root=PROC)
    cores = layout.list_cores(node.storage, namespace="team-a")
    assert [c.ref.core_id for c in cores] == [first.ref.core_id, first.ref.core_id + "-1"]
    recovered = cores[1]
    assert recovered.metadata["coreID"] == recovered.ref.core_id
    assert gzip.decompress(recovered.core_path.read_bytes()) == segv_core.path.read_bytes()
    assert recovered.metadata["digest"] == digest_of(segv_core.path.read_bytes())
    assert _temps(directory) == []


def test_a_grace_shorter_than_four_heartbeats_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="heartbeat"):
        layout.sweep_debris(tmp_path / "ns/p" / POD_UID / "c", grace=inflight.HEARTBEAT_SECONDS)


def test_hostile_temp_names_are_judged_by_their_mark_alone(tmp_path: Path) -> None:
    """A planted name claiming a live pid of the sweeper's node (its own) cannot keep debris forever, and a
    name that does not parse is only a temp file."""
    d = tmp_path / "ns/p" / POD_UID / "c"
    d.mkdir(parents=True)
    me = inflight.this_writer(THIS)
    names = [
        inflight.temp_name(
            "20261123T101500Z-x-1-11",
            inflight.Writer(node=THIS, pid=me.pid, start=me.start + 1),
            "ab" * 6,
            layout.CORE_SUFFIX,
        ),
        ".20261123T101500Z-x-1-11@..@1-1@abababababab.core.gz.tmp",
        ".x@y@z.json.tmp",
    ]
    old = time.time() - 2 * GRACE
    for n in names:
        (d / n).write_bytes(b"x")
        os.utime(d / n, (old, old))
    # the first names this process with another start time: a reused pid, so dead; the others fall to their age
    assert layout.sweep_debris(d, node=THIS, proc_root=PROC) == 3
    assert os.listdir(d) == []


def test_retention_completes_an_interrupted_core_alone_in_its_directory(node: NodeTree, segv_core: RealCore) -> None:
    """The first core of a container, killed in its commit: no committed core shows the sweep its directory."""
    from handler.agent import retention

    directory = _killed_in_commit(node, segv_core, "commit:data-named")
    assert list(layout.iter_container_dirs(node.storage)) == [directory]
    retention.apply(node.storage, now=time.time() + 2 * GRACE)
    (core,) = layout.list_cores(node.storage, namespace="team-a")
    assert gzip.decompress(core.core_path.read_bytes()) == segv_core.path.read_bytes()
