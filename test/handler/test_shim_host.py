"""The host shim, run exactly as the kernel runs it from the installed core_pattern (POSIX sh, real nsenter)."""

from __future__ import annotations

import asyncio
import gzip
import os
import shutil
from pathlib import Path

import pytest
from handler_harness import AgentEnv, RealCore, cgroup_text

from handler import layout

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nsenter"), reason="nsenter needs root")


def pod_process(env: AgentEnv, core: RealCore) -> None:
    env.node.add_process(core.pid, cgroup=cgroup_text("containerd-systemd:v2"), exe=core.exe)
    env.node.add_log_link(namespace="team-a", pod="web-0", container="app")


def test_shim_enters_the_agent_and_files_the_core(agent_env: AgentEnv, segv_core: RealCore) -> None:
    pod_process(agent_env, segv_core)
    assert agent_env.core_pattern == f"|{agent_env.host_dir}/shim %P %I %s %t %c %e"
    r = agent_env.crash(segv_core.path, pid=segv_core.pid, signal=11)
    assert r.returncode == 0, (r.stdout, r.stderr, (agent_env.host_dir / "shim.log").read_text())
    (core,) = layout.list_cores(agent_env.node.storage, namespace="team-a")
    assert gzip.decompress(core.core_path.read_bytes()) == segv_core.path.read_bytes()
    assert list((agent_env.host_dir / "spool").iterdir()) == []


def test_shim_spools_raw_core_when_agent_is_gone_and_agent_files_it_later(
    agent_env: AgentEnv, segv_core: RealCore
) -> None:
    pod_process(agent_env, segv_core)
    (agent_env.host_dir / "agent.pid").unlink()  # as a stopping agent does
    r = agent_env.crash(segv_core.path, pid=segv_core.pid, signal=11, comm="my app")
    assert r.returncode == 0
    spool = agent_env.host_dir / "spool"
    (raw,) = spool.glob("*.core")
    assert raw.read_bytes() == segv_core.path.read_bytes()
    info = (raw.with_suffix(".info")).read_text()
    assert "reason=agent not running" in info and "cgroup=0::/kubepods.slice" in info and "comm=my app" in info
    assert layout.list_crashed_pods(agent_env.node.storage) == []

    report = asyncio.run(agent_env.agent.drain_once())
    assert report.drained == 1
    (core,) = layout.list_cores(agent_env.node.storage, namespace="team-a")
    assert gzip.decompress(core.core_path.read_bytes()) == segv_core.path.read_bytes()
    assert core.metadata["comm"] == "my app" and core.ref.core_id.startswith("20261118T110640Z-my_app-")
    assert core.metadata["buildID"] and core.metadata["signalName"] == "SIGSEGV"
    assert list(spool.iterdir()) == []


@pytest.mark.parametrize("breakage", ["stale-pid", "no-handler"])
def test_shim_spools_when_the_handler_cannot_run(agent_env: AgentEnv, segv_core: RealCore, breakage: str) -> None:
    pod_process(agent_env, segv_core)
    if breakage == "stale-pid":
        (agent_env.host_dir / "agent.pid").write_text("999999999\n")
    else:
        with open(agent_env.host_dir / "shim.conf", "a") as f:
            f.write("HANDLER=/nonexistent/coredump-handler\n")
    r = agent_env.crash(segv_core.path, pid=segv_core.pid, signal=11)
    assert r.returncode == 0
    (raw,) = (agent_env.host_dir / "spool").glob("*.core")
    assert raw.read_bytes() == segv_core.path.read_bytes()


def test_shim_runs_the_previous_pipe_program_on_the_host_for_non_pod_processes(
    agent_env: AgentEnv, segv_core: RealCore, tmp_path: Path
) -> None:
    out = tmp_path / "forwarded"
    prog = tmp_path / "systemd-coredump"
    prog.write_text(f'#!/bin/sh\necho "$@" > {out}.args\ncat > {out}\n')
    prog.chmod(0o755)
    from handler.agent import sysctl

    sysctl.save_previous(agent_env.agent.cfg, f"|{prog} %P %s %e")  # as the agent does when it takes over
    agent_env.node.add_process(segv_core.pid, cgroup="0::/system.slice/cron.service\n", exe=segv_core.exe)
    r = agent_env.crash(segv_core.path, pid=segv_core.pid, signal=11)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == segv_core.path.read_bytes()
    assert Path(f"{out}.args").read_text().split() == [str(segv_core.pid), "11", "crasher"]
    assert layout.list_crashed_pods(agent_env.node.storage) == []
