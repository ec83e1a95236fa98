"""
Node-side faults with real kernel cores through the real shim and handler (issue 10, "Done when"): a full spool,
storage that fills up at each step of the commit, the drain killed at each step of filing, and 20 concurrent
crashes through the shim. Every case: 0 cores lost, 0 partial files visible as complete, every truncation
labelled with its reason.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import resource
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from handler_harness import POD_UID, REPO, AgentEnv, NodeTree, RealCore, cgroup_text

from handler import layout
from handler import spool as spool_mod
from handler.outcome import read_outcomes
from digests import digest_of, digest_of_file

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nsenter"), reason="the shim needs root")


def _pod(node: NodeTree, core: RealCore, *, pid: int | None = None) -> int:
    pid = pid or core.pid
    node.add_process(pid, cgroup=cgroup_text("containerd-systemd:v2"), exe=core.exe)
    if not any((node.host / "var/log/containers").iterdir()):
        node.add_log_link(namespace="team-a", pod="web-0", container="app")
    return pid


def _container_dir(node: NodeTree) -> Path:
    return layout.container_dir(node.storage, namespace="team-a", pod="web-0", pod_uid=POD_UID, container="app")


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _whole(core: layout.StoredCore, original: RealCore) -> None:
    data = original.path.read_bytes()
    assert gzip.decompress(core.core_path.read_bytes()) == data
    assert core.metadata["digest"] == digest_of(data)
    assert core.metadata["truncated"] is False and core.metadata["truncationReason"] is None


# -- a full spool (agent away) -------------------------------------------------------------------------------------


@needs_root
def test_a_full_spool_keeps_what_fit_labelled_truncated_and_counts_the_failure(
    agent_env: AgentEnv, segv_core: RealCore
) -> None:
    """The spool's filesystem takes 1 MiB per file (RLIMIT_FSIZE on the shim, SIGXFSZ ignored: ``cat`` gets
    EFBIG exactly where a full disk gives ENOSPC). What fit is kept and filed as truncated with the reason."""
    node = agent_env.node
    _pod(node, segv_core)
    (agent_env.host_dir / "agent.pid").unlink()  # the agent is away: the shim spools
    limit = 1 << 20
    data = segv_core.path.read_bytes()
    assert len(data) > 2 * limit

    def full_spool() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    with open(segv_core.path, "rb") as f:
        r = subprocess.run(
            agent_env.shim_argv(pid=segv_core.pid, signal=11),
            stdin=f,
            capture_output=True,
            timeout=120,
            env={"PATH": os.environ["PATH"]},
            preexec_fn=full_spool,
        )
    assert r.returncode == 0  # the kernel is never kept waiting on the shim's failure
    spool = agent_env.host_dir / "spool"
    (raw,) = spool.glob("*.core")
    assert raw.stat().st_size == limit and raw.read_bytes() == data[:limit]
    info = raw.with_suffix(".info").read_text()
    assert "truncated=spool write failed" in info and "spool full" in info
    # loudly: the shim's log, the kernel log, and an outcome the agent counts
    assert "ERROR: the spool took only part of the core" in (agent_env.host_dir / "shim.log").read_text()
    assert "spooled truncated" in (node.base.parent / "kmsg").read_text()
    agent = agent_env.agent
    asyncio.run(agent.process_outcomes())  # type: ignore[attr-defined]
    assert agent.metrics.get("coredump_handler_errors_total", source="shim") == 1  # type: ignore[attr-defined]

    report = asyncio.run(agent.drain_once())  # type: ignore[attr-defined]
    assert report.drained == 1
    (core,) = layout.list_cores(node.storage, namespace="team-a")
    assert gzip.decompress(core.core_path.read_bytes()) == data[:limit]
    m = core.metadata
    assert m["truncated"] is True and "spool full" in m["truncationReason"]
    assert m["size"] == limit and m["observedSize"] > limit
    assert list(spool.iterdir()) == []


# -- storage full at each step of the commit ---------------------------------------------------------------------


@pytest.mark.parametrize("step", ["commit:meta-written", "commit:data-synced", "commit:data-named"])
def test_storage_full_at_a_commit_step_moves_the_core_to_the_spool_whole(
    node: NodeTree, segv_core: RealCore, step: str
) -> None:
    """ENOSPC where a full filesystem gives it: the metadata temp's write, the data's fsync (NFS answers a full
    export there), the link. The core goes to the spool whole and leaves nothing on storage, not even debris."""
    _pod(node, segv_core)
    r = node.run_capture(
        segv_core.path, pid=segv_core.pid, signal=11, env={**os.environ, "COREDUMP_FAULT": f"{step}=enospc"}
    )
    assert r.returncode == 0, r.stderr.decode()[-800:]
    assert b"No space left on device" in r.stderr
    ((_, rec),) = read_outcomes(node.state / "outcomes")
    assert rec["result"] == "spooled" and "No space left" in rec["reason"]
    assert _files(node.storage) == []
    (spooled,) = node.spool.glob("*.core.gz")
    assert gzip.decompress(spooled.read_bytes()) == segv_core.path.read_bytes()
    out = subprocess.run(node.handler_args("drain"), capture_output=True, text=True, cwd=REPO, timeout=120)
    assert "drained 1" in out.stdout, out
    (core,) = layout.list_cores(node.storage, namespace="team-a")
    _whole(core, segv_core)
    assert list(node.spool.iterdir()) == []


# -- the drain killed at each step of filing ----------------------------------------------------------------------

DRAIN_STEPS = [
    "commit:meta-written",
    "commit:data-synced",
    "commit:data-named",
    "commit:meta-named",
    "commit:done",
    "drain:filed",
    "spool:entry-half-removed",
]


def _spool_handler_entry(node: NodeTree, core: RealCore) -> Path:
    """A handler spool entry, as when storage is away at capture."""
    _pod(node, core)
    r = node.run_capture(core.path, pid=core.pid, signal=11, extra=("--storage-root", str(node.base / "away")))
    assert r.returncode == 0, r.stderr.decode()[-800:]
    assert len(list(node.spool.glob("*.json"))) == 1
    return node.spool


def _spool_shim_entry(agent_env: AgentEnv, core: RealCore) -> Path:
    """A raw shim spool entry, as when the agent is away at the crash."""
    _pod(agent_env.node, core)
    (agent_env.host_dir / "agent.pid").unlink()
    r = agent_env.crash(core.path, pid=core.pid, signal=11)
    assert r.returncode == 0
    spool = agent_env.host_dir / "spool"
    assert len(list(spool.glob("*.info"))) == 1
    return spool


@pytest.mark.parametrize("step", DRAIN_STEPS)
@pytest.mark.parametrize("kind", ["handler", "shim"])
def test_a_drain_killed_at_any_step_files_the_core_exactly_once(
    request: pytest.FixtureRequest, node: NodeTree, segv_core: RealCore, kind: str, step: str
) -> None:
    if kind == "shim":
        if os.geteuid() != 0 or not shutil.which("nsenter"):
            pytest.skip("the shim needs root")
        spool = _spool_shim_entry(request.getfixturevalue("agent_env"), segv_core)
    else:
        spool = _spool_handler_entry(node, segv_core)
    drain = node.handler_args("--spool-dir", str(spool), "drain")
    killed = subprocess.run(
        drain, capture_output=True, text=True, cwd=REPO, timeout=120, env={**os.environ, "COREDUMP_FAULT": step}
    )
    assert killed.returncode == -signal.SIGKILL, killed
    # Whatever the step, no reader sees a half core meanwhile ...
    for core in layout.list_cores(node.storage, namespace="team-a"):
        _whole(core, segv_core)
    # ... and the next drain (a restarted agent) files it once, or finds it filed and only clears the spool.
    again = subprocess.run(drain, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert again.returncode == 0 and "errors 0" in again.stdout, again
    (core,) = layout.list_cores(node.storage, namespace="team-a")
    _whole(core, segv_core)
    assert core.metadata["spoolEntry"].startswith(f"node-1/{kind}/")
    # What a kill can leave is debris only, and the sweeps take it: a second name of the committed data (killed
    # right after the commit: its writer is dead), half of a removed spool entry (after the spool's grace).
    layout.sweep_debris(_container_dir(node), node="node-1", proc_root=Path("/proc"))
    assert [n for n in os.listdir(_container_dir(node)) if n.startswith(".")] == []
    assert layout.list_cores(node.storage, namespace="team-a") == [core]
    spool_mod.sweep_orphans(spool, now=time.time() + spool_mod.ORPHAN_GRACE_SECONDS + 1)
    leftover = [n for n in os.listdir(spool) if n != "host"]
    assert leftover == [], leftover


# -- 20 concurrent crashes through the shim ------------------------------------------------------------------------


@needs_root
@pytest.mark.slow
def test_twenty_concurrent_crashes_through_the_shim_are_all_filed_whole(
    agent_env: AgentEnv, segv_core: RealCore
) -> None:
    node = agent_env.node
    pids = [_pod(node, segv_core, pid=200000 + i) for i in range(20)]
    # The handler reads the agent's handler.json: no rate limit here (0), every one of the twenty is kept.
    conf = agent_env.host_dir / "handler.json"
    settings = json.loads(conf.read_text())
    settings.update(rate_first=0, rate_latest=0)
    conf.write_text(json.dumps(settings))

    def crash(i: int) -> subprocess.CompletedProcess:
        return agent_env.crash(segv_core.path, pid=pids[i], signal=11, time=1795000000 + i)

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(crash, range(20)))
    assert [r.returncode for r in results] == [0] * 20
    log = (agent_env.host_dir / "shim.log").read_text() if (agent_env.host_dir / "shim.log").exists() else ""
    cores = layout.list_cores(node.storage, namespace="team-a")
    assert sorted(c.metadata["pid"] for c in cores) == pids, log[-2000:]
    digest = digest_of_file(segv_core.path)
    assert all(c.metadata["digest"] == digest and c.metadata["truncated"] is False for c in cores)
    assert all(gzip.decompress(c.core_path.read_bytes()) == segv_core.path.read_bytes() for c in cores[:3])
    assert list((agent_env.host_dir / "spool").glob("*")) == []
    assert [p for p in node.storage.rglob(".*")] == []


def test_the_spool_sweep_takes_only_old_halves_never_a_committed_or_fresh_entry(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    names = [
        "a.core.gz",
        "a.json",
        "b.core",
        "b.info",  # committed entries
        "c.core.gz",
        "d.info",
        ".e.core.tmp",
        "f.core",
    ]  # halves and temps
    for n in names:
        (spool / n).write_bytes(b"x")
    assert spool_mod.sweep_orphans(spool) == 0  # all fresh: maybe a writer between its two renames
    old = time.time() - 2 * spool_mod.ORPHAN_GRACE_SECONDS
    for n in names:
        os.utime(spool / n, (old, old))
    assert spool_mod.sweep_orphans(spool) == 4
    assert sorted(os.listdir(spool)) == ["a.core.gz", "a.json", "b.core", "b.info"]
    assert [e.name for e in spool_mod.list_entries(spool)] == ["a", "b"]
