"""
Putting the shim, its settings, the handler's config and the agent's identity on the host.

The identity file (``agent.pid``) is one line ``<pid> <starttime> <mount namespace>``: the agent's host pid, its
start time in clock ticks (``/proc/PID/stat`` field 22) and ``readlink /proc/PID/ns/mnt``. The shim enters the
agent's mount namespace only if all three still match, so a stale file (agent killed, pid reused by another
process, a process in another mount namespace) makes it spool instead of running anything. Every file in the
host dir is written by temp file and rename through :mod:`handler.safefs`: the shim reads either the old or the
new file, whole, and a link planted in the host dir is replaced, never written through.
"""

from __future__ import annotations

import logging
import os
import shlex
from importlib import resources
from pathlib import Path

from handler import safefs
from handler.agent.config import PID_NAME, SHIM_CONF_NAME, SHIM_LOG_NAME, AgentConfig
from handler.agent.sysctl import FORWARD_NAME
from handler.config import SPOOL_NAME, STATE_NAME

logger = logging.getLogger(__name__)

HOST_DIR_MODE = 0o755


def _write(cfg: AgentConfig, name: str, data: str | bytes, *, mode: int) -> None:
    safefs.make_dirs(cfg.local_dir, mode=HOST_DIR_MODE, root_mode=HOST_DIR_MODE).close()
    safefs.replace_file(cfg.local_dir, name, data=data.encode() if isinstance(data, str) else data, mode=mode)


def shim_conf(cfg: AgentConfig) -> str:
    q = shlex.quote
    lines = [
        "# written by coredump-agent; host paths",
        f"AGENT_PID_FILE={q(cfg.host_path(PID_NAME))}",
        f"SPOOL_DIR={q(cfg.host_path(SPOOL_NAME))}",
        f"SPOOL_MAX_BYTES={int(cfg.shim_spool_max_bytes)}",
        f"LOG_FILE={q(cfg.host_path(SHIM_LOG_NAME))}",
        f"FORWARD_FILE={q(cfg.host_path(FORWARD_NAME))}",
        f"OUTCOMES_DIR={q(cfg.host_path(STATE_NAME + '/outcomes'))}",
        # Inside the agent's mount namespace:
        f"HANDLER={q(cfg.handler_command + ' --config ' + str(cfg.handler_config_file))}",
        f"NSENTER={q(cfg.nsenter)}",
    ]
    return "\n".join(lines) + "\n"


def install_files(cfg: AgentConfig) -> None:
    shim = resources.files("handler").joinpath("shim.sh").read_bytes()
    _write(cfg, cfg.shim_path.name, shim, mode=0o755)
    _write(cfg, SHIM_CONF_NAME, shim_conf(cfg), mode=0o644)
    _write(cfg, cfg.handler_config_file.name, cfg.handler.to_json(), mode=0o644)
    for d in (cfg.handler.spool_dir, cfg.handler.state_dir):
        if d.parent == cfg.local_dir:
            safefs.make_dirs(cfg.local_dir, d.name, mode=0o700, root_mode=HOST_DIR_MODE).close()
        else:
            safefs.make_dirs(d, mode=0o700, root_mode=0o700).close()
    logger.info("installed the shim at %s", cfg.shim_path)


def process_start_time(stat_text: bytes) -> int:
    """Field 22 of ``/proc/PID/stat``, counted after the last ``)`` (the comm may hold spaces and parens)."""
    after = stat_text[stat_text.rindex(b")") + 1 :].split()
    return int(after[22 - 3])


def identity(*, proc_self: Path = Path("/proc/self")) -> str:
    """This process's identity line, as the shim checks it."""
    start = process_start_time((proc_self / "stat").read_bytes())
    mnt = os.readlink(proc_self / "ns" / "mnt")
    return f"{os.getpid()} {start} {mnt}\n"


def publish_pid(cfg: AgentConfig) -> None:
    # With hostPID the agent's pid is the host's pid, which is what the shim checks and enters.
    _write(cfg, PID_NAME, identity(), mode=0o644)


def unpublish_pid(cfg: AgentConfig) -> None:
    """From now on the shim spools instead of entering a container that is going away."""
    raw = safefs.read_bytes(cfg.local_dir, PID_NAME, limit=4096)
    if raw is not None and raw.split()[:1] == [str(os.getpid()).encode()]:
        safefs.unlink(cfg.local_dir, PID_NAME)


def uninstall_files(cfg: AgentConfig) -> None:
    for name in (cfg.shim_path.name, SHIM_CONF_NAME, PID_NAME, cfg.handler_config_file.name, FORWARD_NAME):
        safefs.unlink(cfg.local_dir, name)
