"""The agent: core_pattern ownership across restarts and uninstall, retention, metrics, CoreDumped Events."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from handler_harness import POD_UID, REPO, AgentEnv, make_sysctl_tree

from handler import layout
from handler.agent import retention, sysctl
from handler.agent.events import EventPoster
from handler.agent.runner import Agent
from handler.outcome import write_outcome
from waiting import wait_until


def agent_args(tmp: Path, sysctl_root: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "handler.agent.cli",
        "--sysctl-root",
        str(sysctl_root),
        "--host-root",
        "/",
        "--host-dir",
        str(tmp / "hostdir"),
        "--storage-root",
        str(tmp / "storage"),
        "--proc-root",
        str(tmp / "proc"),
        "--no-events",
        "--metrics-port",
        "0",
        "--metrics-bind-address",
        "127.0.0.1",
        *extra,
    ]


def test_agent_installs_saves_and_restores_only_on_uninstall(agent_env: AgentEnv) -> None:
    cfg = agent_env.agent.cfg
    s = agent_env.sysctl
    assert agent_env.core_pattern == cfg.core_pattern
    assert (s / "kernel/core_pipe_limit").read_text().strip() == "16"
    assert (s / "fs/suid_dumpable").read_text().strip() == "2"
    assert cfg.previous_pattern_file.read_text().strip() == "core"
    assert os.access(cfg.shim_path, os.X_OK)
    # A restarted agent finds its own pattern in place and keeps the node's saved one.
    sysctl.install(cfg)
    assert cfg.previous_pattern_file.read_text().strip() == "core"
    # Someone rewrites core_pattern: theirs becomes the previous, ours comes back.
    (s / "kernel/core_pattern").write_text("|/usr/lib/systemd/systemd-coredump %P %u %g %s %t %c %h\n")
    assert asyncio.run(agent_env.agent.enforce_once()) is True
    assert agent_env.core_pattern == cfg.core_pattern
    assert cfg.previous_pattern_file.read_text().startswith("|/usr/lib/systemd/systemd-coredump")
    assert agent_env.agent.metrics.get("coredump_core_pattern_restored_total") == 1
    assert asyncio.run(agent_env.agent.enforce_once()) is False

    from handler.agent.runner import uninstall

    uninstall(cfg)
    assert agent_env.core_pattern.startswith("|/usr/lib/systemd/systemd-coredump")
    assert (s / "kernel/core_pipe_limit").read_text().strip() == "0"
    assert (s / "fs/suid_dumpable").read_text().strip() == "0"
    assert not cfg.shim_path.exists()


def test_handler_defaults_are_where_a_default_agent_puts_things() -> None:
    """A handler started without flags reads the agent's handler.json and uses the agent's spool and state."""
    from handler import cli
    from handler.agent.config import AgentConfig
    from handler.config import DEFAULT_CONFIG_FILE, HandlerConfig

    agent = AgentConfig()
    handler = HandlerConfig()
    assert cli.DEFAULT_CONFIG == str(DEFAULT_CONFIG_FILE) == str(agent.handler_config_file)
    for name in ("storage_root", "spool_dir", "state_dir", "proc_root", "host_root"):
        assert getattr(handler, name) == getattr(agent.handler, name), name


@pytest.mark.slow
def test_agent_sigterm_leaves_the_shim_in_place_and_uninstall_gives_the_pattern_back(tmp_path: Path) -> None:
    sysctl_root = make_sysctl_tree(tmp_path, core_pattern="/var/crash/core.%e.%p")
    proc = subprocess.Popen(agent_args(tmp_path, sysctl_root), cwd=REPO, stderr=subprocess.PIPE, text=True)
    pid_file = tmp_path / "hostdir/agent.pid"
    ours = f"|{tmp_path}/hostdir/shim %P %I %s %t %c %e"
    # Setup publishes the pid before it sets core_pattern (the shim must be there first): wait for both.
    wait_until(
        lambda: pid_file.exists() and (sysctl_root / "kernel/core_pattern").read_text().strip() == ours,
        what="the agent's pid file and core_pattern",
    )
    assert pid_file.read_text().split()[0] == str(proc.pid)  # "<pid> <starttime> <mount ns>"
    assert (sysctl_root / "kernel/core_pattern").read_text().strip() == ours
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
    # A rolling update: the node keeps the shim (which spools) and the pid is gone.
    assert (sysctl_root / "kernel/core_pattern").read_text().strip() == ours
    assert not pid_file.exists() and (tmp_path / "hostdir/shim").exists()
    r = subprocess.run(agent_args(tmp_path, sysctl_root, "uninstall"), cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (sysctl_root / "kernel/core_pattern").read_text().strip() == "/var/crash/core.%e.%p"
    assert not (tmp_path / "hostdir/shim").exists()


def test_agent_refuses_a_core_pattern_the_kernel_would_cut(tmp_path: Path) -> None:
    sysctl_root = make_sysctl_tree(tmp_path)
    r = subprocess.run(
        agent_args(tmp_path, sysctl_root, "--host-dir", "/" + "x" * 120),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "longer than 127 bytes" in r.stderr and "Traceback" not in r.stderr
    assert (sysctl_root / "kernel/core_pattern").read_text().strip() == "core"


def _core(root: Path, *, ns: str, when: str, size: int, pod: str = "p", n: int = 1) -> layout.StoredCore:
    with layout.CoreWriter(
        root, namespace=ns, pod=pod, pod_uid=POD_UID, container="c", core_id=f"{when}-app-{n}-11"
    ) as w:
        w.write(os.urandom(size))
        return w.commit({"size": size})


def test_agent_retention_by_age_and_by_namespace_bytes(tmp_path: Path) -> None:
    root = tmp_path / "storage"
    now = layout.core_id_time("20261201T000000Z-x-1-1").timestamp()
    old = _core(root, ns="a", when="20261101T000000Z", size=100)
    a = [_core(root, ns="a", when=f"20261130T0{i}0000Z", size=1000, n=i) for i in range(1, 5)]
    b = [_core(root, ns="b", when=f"20261130T0{i}0000Z", size=1000, n=i) for i in range(1, 3)]
    per_core = a[0].core_path.stat().st_size + a[0].meta_path.stat().st_size  # what retention counts
    limit = 2 * per_core + per_core // 2
    rep = retention.apply(root, max_age=7 * 86400, max_namespace_bytes=limit, now=now)
    assert rep.deleted_age == 1 and not old.meta_path.exists()
    # Namespace a used four cores' worth: its two oldest go; b is within its limit and keeps everything.
    left = {(c.ref.namespace, c.ref.core_id) for c in layout.iter_all_cores(root)}
    assert left == {("a", a[2].ref.core_id), ("a", a[3].ref.core_id), ("b", b[0].ref.core_id), ("b", b[1].ref.core_id)}
    assert rep.deleted_size == 2 and rep.namespace_bytes["a"] <= limit


async def test_agent_serves_metrics_from_handler_outcomes(agent_env: AgentEnv) -> None:
    agent: Agent = agent_env.agent
    outcomes = agent.cfg.handler.outcomes_dir
    write_outcome(
        outcomes,
        {
            "result": "stored",
            "source": "kernel",
            "observedSize": 5000,
            "storedSize": 700,
            "truncated": True,
            "rateLimited": 2,
            "duration": 0.3,
            "kept": True,
        },
    )
    write_outcome(outcomes, {"result": "spooled", "source": "kernel", "duration": 0.2})
    write_outcome(outcomes, {"result": "error", "source": "kernel", "reason": "stalled"})
    assert await agent.process_outcomes() == 3
    assert list(outcomes.iterdir()) == []
    await agent.start_metrics()
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{agent.metrics_port}/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()
    finally:
        await agent._runner.cleanup()
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    expected = {
        ("coredump_cores_captured_total", (("source", "kernel"),)): 1,
        ("coredump_core_bytes_total", ()): 5000,
        ("coredump_cores_truncated_total", ()): 1,
        ("coredump_cores_rate_limited_total", ()): 2,
        ("coredump_cores_spooled_total", ()): 1,
        ("coredump_handler_errors_total", (("source", "kernel"),)): 1,
        ("coredump_handler_duration_seconds_count", ()): 2,
        ("coredump_handler_duration_seconds_bucket", (("le", "0.25"),)): 1,
    }
    for key, value in expected.items():
        assert samples.get(key) == value, key
    assert families["coredump_handler_duration_seconds"].type == "histogram"


async def test_agent_posts_a_core_dumped_event_on_the_pod(agent_env: AgentEnv, fake_kube, tmp_path: Path) -> None:
    kubeconfig = fake_kube.write_kubeconfig(tmp_path / "kubeconfig")
    agent: Agent = agent_env.agent
    agent.poster = EventPoster(kubeconfig=str(kubeconfig), node="node-1")
    write_outcome(
        agent.cfg.handler.outcomes_dir,
        {
            "result": "stored",
            "source": "kernel",
            "namespace": "team-a",
            "pod": "web-0",
            "podUID": POD_UID,
            "container": "app",
            "coreID": "20261118T110640Z-crasher-42-11",
            "signal": 11,
            "signalName": "SIGSEGV",
            "observedSize": 3 << 20,
            "storedSize": 1 << 20,
            "kept": True,
        },
    )
    # Not kept (rate-limited away) and non-pod outcomes post nothing.
    write_outcome(
        agent.cfg.handler.outcomes_dir, {"result": "stored", "namespace": "team-a", "pod": "web-0", "kept": False}
    )
    write_outcome(agent.cfg.handler.outcomes_dir, {"result": "forwarded", "pid": 1})
    try:
        await agent.process_outcomes()
    finally:
        await agent.poster.close()
    (ev,) = fake_kube.events
    assert ev["reason"] == "CoreDumped" and ev["type"] == "Warning"
    assert ev["metadata"]["namespace"] == "team-a" and ev["metadata"]["name"].startswith("web-0.")
    assert ev["involvedObject"] == {
        "apiVersion": "v1",
        "kind": "Pod",
        "namespace": "team-a",
        "name": "web-0",
        "uid": POD_UID,
        "fieldPath": "spec.containers{app}",
    }
    assert "app" in ev["message"] and "SIGSEGV" in ev["message"] and "3.0 MiB" in ev["message"]
    assert ev["source"] == {"component": "coredump-agent", "host": "node-1"}
    assert agent.metrics.get("coredump_events_posted_total") == 1


async def test_agent_counts_events_it_cannot_post_and_keeps_going(
    agent_env: AgentEnv, fake_kube, tmp_path: Path
) -> None:
    kubeconfig = fake_kube.write_kubeconfig(tmp_path / "kubeconfig", token="not-a-valid-token")
    agent: Agent = agent_env.agent
    agent.poster = EventPoster(kubeconfig=str(kubeconfig), node="node-1")
    write_outcome(
        agent.cfg.handler.outcomes_dir,
        {
            "result": "stored",
            "namespace": "team-a",
            "pod": "web-0",
            "podUID": POD_UID,
            "container": "app",
            "signal": 6,
            "kept": True,
        },
    )
    try:
        assert await agent.process_outcomes() == 1
    finally:
        await agent.poster.close()
    assert fake_kube.events == []
    assert agent.metrics.get("coredump_event_errors_total") == 1
    assert list(agent.cfg.handler.outcomes_dir.iterdir()) == []
