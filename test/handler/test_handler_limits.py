"""Bounded and lossless: kill -9 mid-core, read-only storage, concurrency, hostile names, rate and size limits."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from handler_harness import setup_pod, visible_files, REPO, NodeTree, RealCore, cgroup_text

from handler import layout
from handler.outcome import read_outcomes
from waiting import wait_until
from digests import digest_of, digest_of_file


def test_handler_killed_mid_stream_commits_nothing(node: NodeTree, segv_core: RealCore) -> None:
    setup_pod(node, segv_core)
    proc = subprocess.Popen(
        node.handler_args("capture", str(segv_core.pid), str(segv_core.pid), "11", "1795000000", "-1", "crasher"),
        stdin=subprocess.PIPE,
        cwd=REPO,
    )
    data = segv_core.path.read_bytes()
    assert proc.stdin is not None
    proc.stdin.write(data[: len(data) // 2])
    proc.stdin.flush()
    # Wait until the handler is mid-core: its hidden temp file exists.
    wait_until(lambda: list(node.storage.rglob(".*.tmp")), what="the handler's temp file", interval=0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdin.close()
    assert layout.list_cores(node.storage, namespace="team-a") == []
    assert visible_files(node.storage) == []
    # The debris is swept once it is old enough not to be a write in flight: what the writer had on storage
    # is kept as a core truncated "killed" if its notes were in it (else removed), never as a whole core.
    (d,) = {p.parent for p in node.storage.rglob(".*.tmp")}
    layout.sweep_debris(d, now=time.time() + layout.ORPHAN_GRACE_SECONDS + 1)
    assert list(node.storage.rglob(".*.tmp")) == []
    for core in layout.list_cores(node.storage, namespace="team-a"):
        kept = gzip.decompress(core.core_path.read_bytes())
        assert core.metadata["truncationReason"] == "killed" and kept == data[: len(kept)] and len(kept) < len(data)


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"), reason="private mounts need root and unshare"
)


@needs_root
@pytest.mark.slow
def test_handler_read_only_storage_spools_then_agent_drains(node: NodeTree, segv_core: RealCore) -> None:
    setup_pod(node, segv_core)
    args = node.handler_args("capture", str(segv_core.pid), str(segv_core.pid), "11", "1795000000", "-1", "crasher")
    # A private mount namespace, so the read-only bind mount is seen by the handler only.
    script = f'mount --bind "{node.storage}" "{node.storage}" && mount -o remount,bind,ro "{node.storage}" && exec "$@"'
    with open(segv_core.path, "rb") as f:
        r = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *args],
            stdin=f,
            capture_output=True,
            cwd=REPO,
        )
    assert r.returncode == 0, r.stderr.decode()
    assert layout.list_crashed_pods(node.storage) == []
    assert len(list(node.spool.glob("*.core.gz"))) == 1
    ((path, rec),) = read_outcomes(node.state / "outcomes")
    assert rec["result"] == "spooled" and "read-only" in rec["reason"]
    path.unlink()

    from handler.agent.config import AgentConfig
    from handler.agent.runner import Agent
    from handler.config import HandlerConfig

    # The agent's spool is the handler's spool: host dir "/" under the fake node's base is where spool/ and
    # state/ are; the kubelet's log links are in its host tree.
    cfg = AgentConfig(
        storage_root=node.storage,
        host_root=node.base,
        host_dir="/",
        proc_root=node.proc,
        events=False,
        handler=HandlerConfig(crictl=None, container_logs="host/var/log/containers"),
    )
    assert (cfg.handler.spool_dir, cfg.handler.state_dir) == (node.spool, node.state)
    agent = Agent(cfg)
    report = asyncio.run(agent.drain_once())
    assert report.drained == 1
    (core,) = layout.list_cores(node.storage, namespace="team-a")
    assert gzip.decompress(core.core_path.read_bytes()) == segv_core.path.read_bytes()
    assert core.metadata["digest"] == digest_of(segv_core.path.read_bytes())
    assert list(node.spool.iterdir()) == []
    asyncio.run(agent.process_outcomes())
    assert agent.metrics.get("coredump_cores_captured_total", source="handler-spool") == 1


@pytest.mark.slow
def test_handler_twenty_concurrent_cores_are_all_filed(node: NodeTree, segv_core: RealCore) -> None:
    pids = [setup_pod(node, segv_core, pid=100000 + i) for i in range(20)]

    def run(pid: int) -> subprocess.CompletedProcess:
        return node.run_capture(segv_core.path, pid=pid, signal=11, extra=("--rate-first", "0", "--rate-latest", "0"))

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(run, pids))
    assert [r.returncode for r in results] == [0] * 20, [r.stderr for r in results if r.returncode]
    cores = layout.list_cores(node.storage, namespace="team-a")
    assert sorted(c.metadata["pid"] for c in cores) == pids
    digest = digest_of_file(segv_core.path)
    assert all(c.metadata["digest"] == digest for c in cores)
    assert all(gzip.decompress(c.core_path.read_bytes()) == segv_core.path.read_bytes() for c in cores[:3])


@pytest.mark.parametrize("comm", ["../../../../etc", "a/b", "..", "x\ny", "-rf", "$(reboot)", "ü" * 20, "a" * 200])
def test_handler_hostile_comm_stays_inside_its_directory(node: NodeTree, segv_core: RealCore, comm: str) -> None:
    setup_pod(node, segv_core)
    r = node.run_capture(segv_core.path, pid=segv_core.pid, signal=11, comm=comm)
    assert r.returncode == 0, r.stderr.decode()
    (core,) = layout.list_cores(node.storage, namespace="team-a")
    directory = node.storage / "team-a/web-0" / core.ref.pod_uid / "app"
    assert sorted(p.parent for p in visible_files(node.storage)) == [directory, directory]
    assert layout.CORE_ID_RE.match(core.ref.core_id)
    assert "\n" not in json.dumps(core.metadata["comm"]).strip('"')


def test_handler_rate_limit_keeps_first_and_latest_and_counts_the_rest(node: NodeTree, segv_core: RealCore) -> None:
    setup_pod(node, segv_core)
    small = node.base / "small.core"
    small.write_bytes(segv_core.path.read_bytes()[:65536])
    for i in range(9):
        r = node.run_capture(
            small,
            pid=segv_core.pid,
            signal=11,
            time=1795000000 + i,
            extra=("--rate-first", "3", "--rate-latest", "2", "--rate-window", "1h", "--rate-latest-interval", "0"),
        )
        assert r.returncode == 0, r.stderr.decode()
    kept = [c.metadata["timestamp"][-3:-1] for c in layout.list_cores(node.storage, namespace="team-a")]
    assert kept == ["40", "41", "42", "47", "48"]
    records = [rec for _, rec in read_outcomes(node.state / "outcomes")]
    assert sum(rec["rateLimited"] for rec in records) == 4

    from handler.agent.metrics import Metrics

    m = Metrics()
    for rec in records:
        m.account(rec)
    assert m.get("coredump_cores_rate_limited_total") == 4
    assert m.get("coredump_cores_captured_total", source="kernel") == 9


def test_handler_size_limit_keeps_a_marked_truncated_core(node: NodeTree, segv_core: RealCore) -> None:
    setup_pod(node, segv_core)
    r = node.run_capture(segv_core.path, pid=segv_core.pid, signal=11, extra=("--max-core-size", "1Mi"))
    assert r.returncode == 0, r.stderr.decode()
    (core,) = layout.list_cores(node.storage, namespace="team-a")
    m = core.metadata
    full = segv_core.path.read_bytes()
    assert m["truncated"] is True and "maximum size" in m["truncationReason"]
    assert m["size"] == 1 << 20 and m["observedSize"] == len(full) > m["size"]
    stored = gzip.decompress(core.core_path.read_bytes())
    assert stored == full[: 1 << 20]
    assert m["digest"] == digest_of(stored)
    ((_, rec),) = read_outcomes(node.state / "outcomes")
    assert rec["truncated"] is True and rec["observedSize"] == len(full)


def _non_pod(node: NodeTree, core: RealCore, tmp: Path) -> Path:
    cwd = tmp / "cwd"
    cwd.mkdir()
    node.add_process(core.pid, cgroup="0::/user.slice/user-1000.slice/session-3.scope\n", exe=core.exe, cwd=cwd)
    return cwd


def test_handler_non_pod_core_goes_to_previous_file_pattern(
    node: NodeTree, segv_core: RealCore, tmp_path: Path
) -> None:
    cwd = _non_pod(node, segv_core, tmp_path)
    prev = node.base / "previous"
    prev.write_text("core.%e.%p\n")
    r = node.run_capture(segv_core.path, pid=segv_core.pid, signal=11, extra=("--previous-pattern-file", str(prev)))
    assert r.returncode == 0, r.stderr.decode()
    assert (cwd / f"core.crasher.{segv_core.pid}").read_bytes() == segv_core.path.read_bytes()
    assert layout.list_crashed_pods(node.storage) == []
    # RLIMIT_CORE 0: the kernel would have written nothing; counted as dropped, not silently swallowed.
    (cwd / f"core.crasher.{segv_core.pid}").unlink()
    r = node.run_capture(
        segv_core.path, pid=segv_core.pid, signal=11, rlimit=0, extra=("--previous-pattern-file", str(prev))
    )
    assert r.returncode == 0 and list(cwd.iterdir()) == []
    results = sorted(rec["result"] for _, rec in read_outcomes(node.state / "outcomes"))
    assert results == ["dropped", "forwarded"]


def test_handler_non_pod_core_with_previous_pipe_is_handed_back_unread(
    node: NodeTree, segv_core: RealCore, tmp_path: Path
) -> None:
    _non_pod(node, segv_core, tmp_path)
    prev = node.base / "previous"
    prev.write_text("|/usr/lib/systemd/systemd-coredump %P %u %g %s %t %c %h\n")
    r = node.run_capture(
        segv_core.path, pid=segv_core.pid, signal=11, rlimit=-1, extra=("--previous-pattern-file", str(prev))
    )
    assert r.returncode == 10
    argv = r.stdout.decode().split()
    assert argv[0] == "/usr/lib/systemd/systemd-coredump" and argv[1] == str(segv_core.pid) and argv[4] == "11"
    # No previous pattern at all: dropped and counted.
    prev.write_text("")
    r = node.run_capture(segv_core.path, pid=segv_core.pid, signal=11, extra=("--previous-pattern-file", str(prev)))
    assert r.returncode == 0
    reasons = sorted(str(rec.get("reason")) for _, rec in read_outcomes(node.state / "outcomes"))
    assert reasons == ["no previous core_pattern", "previous pipe"]


@needs_root
@pytest.mark.slow
def test_handler_storage_filling_up_mid_core_moves_it_to_the_spool(node: NodeTree, segv_core: RealCore) -> None:
    """A 1 MiB-and-a-bit tmpfs passes the free-space probe, then runs out in the middle of the core."""
    setup_pod(node, segv_core)
    args = node.handler_args("capture", str(segv_core.pid), str(segv_core.pid), "11", "1795000000", "-1", "crasher")
    script = f'mount -t tmpfs -o size=1050k tmpfs "{node.storage}" && exec "$@"'
    with open(segv_core.path, "rb") as f:
        r = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *args],
            stdin=f,
            capture_output=True,
            cwd=REPO,
        )
    assert r.returncode == 0, r.stderr.decode()
    assert b"storage failed mid-core" in r.stderr
    (spooled,) = node.spool.glob("*.core.gz")
    assert gzip.decompress(spooled.read_bytes()) == segv_core.path.read_bytes()
    ((_, rec),) = read_outcomes(node.state / "outcomes")
    assert rec["result"] == "spooled" and "No space left" in rec["reason"]
    # Outside that mount namespace the storage has room: the drain files the core unchanged.
    out = subprocess.run(node.handler_args("drain"), capture_output=True, text=True, cwd=REPO)
    assert "drained 1" in out.stdout, out
    (core,) = layout.list_cores(node.storage, namespace="team-a")
    assert core.metadata["digest"] == digest_of(segv_core.path.read_bytes())


def test_handler_gives_up_on_a_stalled_stream_and_exits(node: NodeTree, segv_core: RealCore) -> None:
    """A writer that stops sending (and never closes) must not keep the handler, and the process, forever.
    Stalled before the ELF notes arrived there is nothing worth keeping (test_capture_partial: after them)."""
    setup_pod(node, segv_core)
    proc = subprocess.Popen(
        node.handler_args(
            "--stall-timeout",
            "1s",
            "capture",
            str(segv_core.pid),
            str(segv_core.pid),
            "11",
            "1795000000",
            "-1",
            "crasher",
        ),
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    assert proc.stdin is not None
    proc.stdin.write(segv_core.path.read_bytes()[:200])
    proc.stdin.flush()
    try:
        assert proc.wait(timeout=60) == 3
    finally:
        proc.stdin.close()
        proc.kill()
    assert layout.list_cores(node.storage, namespace="team-a") == []
    assert [rec["reason"] for _, rec in read_outcomes(node.state / "outcomes")] == ["stalled"]


def test_drain_marks_a_core_the_shim_cut_at_its_maximum_as_truncated(node: NodeTree, segv_core: RealCore) -> None:
    """The shim spooled only its maximum (``rest=`` bytes more were sent): the committed metadata says so."""
    setup_pod(node, segv_core)
    full = segv_core.path.read_bytes()
    kept, rest = full[: 1 << 20], len(full) - (1 << 20)
    (node.spool / "raw-1.core").write_bytes(kept)
    (node.spool / "raw-1.info").write_text(
        f"pid={segv_core.pid}\nsignal=11\ntime=1795000000\ncomm=crasher\n"
        f"{''.join('cgroup=' + line + chr(10) for line in cgroup_text('containerd-systemd:v2').splitlines())}"
        f"rest={rest}\n"
    )
    out = subprocess.run(node.handler_args("drain"), capture_output=True, text=True, cwd=REPO)
    assert "drained 1" in out.stdout, out
    (core,) = layout.list_cores(node.storage, namespace="team-a")
    m = core.metadata
    assert m["truncated"] is True and "shim" in m["truncationReason"]
    assert m["size"] == len(kept) and m["observedSize"] == len(full)
    assert gzip.decompress(core.core_path.read_bytes()) == kept
    # The outcome record (metrics, Event) says the same as the metadata.
    ((_, rec),) = read_outcomes(node.state / "outcomes")
    assert rec["result"] == "drained" and rec["truncated"] is True and rec["observedSize"] == len(full)
