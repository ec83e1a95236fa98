"""
Fixtures of the node-side tests: the crashing program and its real cores, a fake node tree, an agent set up
against it. The helpers they return live in :mod:`handler_harness`.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from handler_harness import CRASHER_C, PYTHON, AgentEnv, NodeTree, RealCore, make_core, make_sysctl_tree

os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")


@pytest.fixture(scope="session")
def crasher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("crasher")
    (d / "crasher.c").write_text(CRASHER_C)
    exe = d / "crasher"
    subprocess.run(["gcc", "-g", "-O0", "-Wl,--build-id", "-o", str(exe), str(d / "crasher.c")], check=True)
    return exe


@pytest.fixture(scope="session")
def segv_core(crasher: Path, tmp_path_factory: pytest.TempPathFactory) -> RealCore:
    return make_core(crasher, tmp_path_factory.mktemp("segv"), "segv")


@pytest.fixture(scope="session")
def abort_core(crasher: Path, tmp_path_factory: pytest.TempPathFactory) -> RealCore:
    return make_core(crasher, tmp_path_factory.mktemp("abort"), "abort")


@pytest.fixture
def node(tmp_path: Path) -> NodeTree:
    return NodeTree(tmp_path / "node")


@pytest.fixture
def agent_env(node: NodeTree, tmp_path: Path) -> AgentEnv:
    from handler.agent.config import AgentConfig
    from handler.agent.runner import Agent
    from handler.config import HandlerConfig

    sysctl = make_sysctl_tree(tmp_path)
    host_dir = tmp_path / "hostdir"
    cfg = AgentConfig(
        sysctl_root=sysctl,
        proc_root=node.proc,
        host_root=Path("/"),
        host_dir=str(host_dir),
        storage_root=node.storage,
        node="node-1",
        events=False,
        metrics_port=0,
        handler_command=f"{PYTHON} -m handler.cli",
        # The agent's host root is / (its host dir is a temp dir); the kubelet's log links are in
        # the fake node's host tree, named relative to it.
        handler=HandlerConfig(crictl=None, container_logs=str((node.host / "var/log/containers").relative_to("/"))),
    )
    agent = Agent(cfg)
    # The shim checks the agent's identity (stat, mount namespace) under the proc root it is given: the
    # agent (this process) is real, so its entry in the fake proc tree is the real one.
    (node.proc / str(os.getpid())).symlink_to(f"/proc/{os.getpid()}")
    agent.setup()
    with open(host_dir / "shim.conf", "a") as f:
        f.write(f"PROC={node.proc}\nKMSG={tmp_path / 'kmsg'}\n")
    return AgentEnv(node=node, sysctl=sysctl, host_dir=host_dir, agent=agent)
