"""
The host shim runs as root in the host's namespaces: it enters only the agent it can identify (issue 9). A stale,
reused or foreign pid in ``agent.pid`` makes it spool the core; nothing runs in the other process's namespace.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from handler_harness import AgentEnv, RealCore, cgroup_text

from handler import layout
from waiting import wait_until

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"),
    reason="needs root, unshare and nsenter",
)


def start_time(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: after the comm, fields start at 3


def mount_ns(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/mnt")


@pytest.fixture
def foreign(agent_env: AgentEnv) -> Iterator[int]:
    """An unrelated process in a mount namespace of its own, where the storage root is an empty tmpfs: a handler
    run in there would file the core where the host never sees it (and the shim would not spool it)."""
    storage = agent_env.node.storage
    proc = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", f"mount -t tmpfs none '{storage}' && exec sleep 300"]
    )

    def started() -> bool:
        assert proc.poll() is None, "the foreign process exited"
        return mount_ns(proc.pid) != mount_ns(os.getpid()) and "sleep" in Path(f"/proc/{proc.pid}/cmdline").read_text()

    wait_until(started, what="the foreign process in its own mount namespace", interval=0.02)
    (agent_env.node.proc / str(proc.pid)).symlink_to(f"/proc/{proc.pid}")
    yield proc.pid
    proc.kill()
    proc.wait()


def crash(env: AgentEnv, core: RealCore) -> None:
    env.node.add_process(core.pid, cgroup=cgroup_text("containerd-systemd:v2"), exe=core.exe)
    env.node.add_log_link(namespace="team-a", pod="web-0", container="app")
    r = env.crash(core.path, pid=core.pid, signal=11)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("forged", ["reused-pid", "foreign-namespace", "dead-pid"])
def test_the_shim_enters_nothing_but_the_agent(
    agent_env: AgentEnv, segv_core: RealCore, foreign: int, forged: str
) -> None:
    me = os.getpid()
    identity = {
        # the agent died and its pid now belongs to another process: the start time no longer matches
        "reused-pid": f"{foreign} {start_time(me)} {mount_ns(me)}",
        # a live process whose start time is copied right, in another mount namespace
        "foreign-namespace": f"{foreign} {start_time(foreign)} {mount_ns(me)}",
        # nothing by that pid any more
        "dead-pid": f"999999999 {start_time(me)} {mount_ns(me)}",
    }[forged]
    (agent_env.host_dir / "agent.pid").write_text(identity + "\n")
    crash(agent_env, segv_core)
    (raw,) = (agent_env.host_dir / "spool").glob("*.core")
    assert raw.read_bytes() == segv_core.path.read_bytes()  # kept whole, on the host side
    assert layout.list_crashed_pods(agent_env.node.storage) == []
    log = (agent_env.host_dir / "shim.log").read_text()
    assert "spool" in log.lower()


def test_the_real_agent_is_still_entered(agent_env: AgentEnv, segv_core: RealCore, foreign: int) -> None:
    """The same check lets the genuine agent in (the test process is the agent here)."""
    crash(agent_env, segv_core)
    (core,) = layout.list_cores(agent_env.node.storage, namespace="team-a")
    assert core.ref.pod == "web-0"
    assert list((agent_env.host_dir / "spool").glob("*.core")) == []


def test_nothing_the_handler_prints_is_evaluated_on_the_host(
    agent_env: AgentEnv, segv_core: RealCore, tmp_path: Path
) -> None:
    """A handler (in the agent's namespace) that prints shell code: the host runs none of it."""
    marker = tmp_path / "evaluated-on-the-host"
    fake = tmp_path / "talkative-handler"
    fake.write_text(f"#!/bin/sh\ncat >/dev/null\necho 'touch {marker}'\necho 'touch {marker}' >&2\nexit 10\n")
    fake.chmod(0o755)
    with open(agent_env.host_dir / "shim.conf", "a") as f:
        f.write(f"HANDLER={fake}\n")
    agent_env.node.add_process(segv_core.pid, cgroup="0::/user.slice\n", exe=segv_core.exe)
    agent_env.crash(segv_core.path, pid=segv_core.pid, signal=11)
    assert not marker.exists()
