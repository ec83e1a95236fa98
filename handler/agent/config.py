"""
The agent's settings: host paths (all configurable, tests use temp dirs), intervals and limits.

``AgentConfig`` is frozen and complete when made: the handler's paths (storage root, spool and state dirs, proc
and host roots, the previous core_pattern file, the node name) are derived from the agent's own in
``__post_init__``, so there is one place they come from and nothing to remember to call.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from handler.config import (
    CONFIG_NAME,
    HOST_DIR,
    HOST_ROOT,
    PROC_ROOT,
    SPOOL_NAME,
    STATE_NAME,
    STORAGE_ROOT,
    HandlerConfig,
    local_dir,
)

# Names in the host dir that the shim (host view) and the agent (local view) must agree on.
SHIM_NAME, SHIM_CONF_NAME, SHIM_LOG_NAME, PID_NAME = "shim", "shim.conf", "shim.log", "agent.pid"


@dataclass(frozen=True)
class AgentConfig:
    sysctl_root: Path = Path("/proc/sys")
    proc_root: Path = PROC_ROOT
    host_root: Path = HOST_ROOT
    # The agent's directory on the host, as the host sees it (core_pattern names the shim by this path).
    host_dir: str = HOST_DIR
    storage_root: Path = STORAGE_ROOT
    node: str | None = None
    handler_command: str = f"{sys.executable} -m handler.cli"
    nsenter: str = "nsenter"
    core_pipe_limit: int = 16
    suid_dumpable: int = 2
    shim_spool_max_bytes: int = 0
    watch_interval: float = 10.0
    drain_interval: float = 10.0
    outcome_interval: float = 1.0
    retention_interval: float = 300.0
    max_age: float = 0.0  # seconds; 0 = keep forever
    max_namespace_bytes: int = 0  # stored bytes per namespace; 0 = unlimited
    metrics_bind_address: str = "0.0.0.0"
    metrics_port: int = 9402
    events: bool = True
    # Watch this node's pods and the namespaces into records the handler reads (needs --node-name).
    pod_records: bool = True
    kubeconfig: str | None = None
    # CloudEvents: the admin's sinks file (a mounted ConfigMap); None = no events. The outbox is bounded per sink.
    event_sinks_file: Path | None = None
    outbox_max_events: int = 10_000
    outbox_max_bytes: int = 64 << 20
    handler: HandlerConfig = field(default_factory=HandlerConfig)

    @property
    def local_dir(self) -> Path:
        """The host directory as this process sees it."""
        return local_dir(self.host_root, self.host_dir)

    def host_path(self, name: str) -> str:
        """``name`` in the host directory as the host (the kernel, the shim) sees it."""
        return f"{self.host_dir.rstrip('/')}/{name}"

    @property
    def shim_path(self) -> Path:
        return self.local_dir / SHIM_NAME

    @property
    def pid_file(self) -> Path:
        return self.local_dir / PID_NAME

    @property
    def previous_pattern_file(self) -> Path:
        return self.local_dir / "previous_core_pattern"

    @property
    def previous_sysctls_file(self) -> Path:
        return self.local_dir / "previous_sysctls.json"

    @property
    def handler_config_file(self) -> Path:
        return self.local_dir / CONFIG_NAME

    @property
    def core_pattern(self) -> str:
        return f"|{self.host_path(SHIM_NAME)} %P %I %s %t %c %e"

    @property
    def outbox_dir(self) -> Path:
        """CloudEvents waiting for their sinks, on the node's own disk (survives agent restarts)."""
        return self.local_dir / STATE_NAME / "outbox"

    def sysctl(self, name: str) -> Path:
        return Path(self.sysctl_root) / name.replace(".", "/")

    def __post_init__(self) -> None:
        """Complete: the handler's paths are the agent's (one spool and one state dir, on the host)."""
        for name in ("sysctl_root", "proc_root", "host_root", "storage_root"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        object.__setattr__(
            self,
            "handler",
            dataclasses.replace(
                self.handler,
                storage_root=self.storage_root,
                spool_dir=self.local_dir / SPOOL_NAME,
                state_dir=self.local_dir / STATE_NAME,
                proc_root=self.proc_root,
                host_root=self.host_root,
                previous_pattern_file=self.previous_pattern_file,
                node=self.node,
            ),
        )
