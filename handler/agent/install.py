"""Putting the shim, its settings, the handler's config and the agent's pid on the host."""
from __future__ import annotations

import logging
import os
import shlex
from importlib import resources
from pathlib import Path

from handler.agent.config import PID_NAME, SHIM_CONF_NAME, SHIM_LOG_NAME, AgentConfig
from handler.config import SPOOL_NAME

logger = logging.getLogger(__name__)


def _write(path: Path, data: str | bytes, *, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(tmp, mode)
    # rename: a crash running the shim right now keeps reading the old complete file.
    os.rename(tmp, path)


def shim_conf(cfg: AgentConfig) -> str:
    q = shlex.quote
    lines = [
        "# written by coredump-agent; host paths",
        f"AGENT_PID_FILE={q(cfg.host_path(PID_NAME))}",
        f"SPOOL_DIR={q(cfg.host_path(SPOOL_NAME))}",
        f"SPOOL_MAX_BYTES={int(cfg.shim_spool_max_bytes)}",
        f"LOG_FILE={q(cfg.host_path(SHIM_LOG_NAME))}",
        # Inside the agent's mount namespace:
        f"HANDLER={q(cfg.handler_command + ' --config ' + str(cfg.handler_config_file))}",
        f"NSENTER={q(cfg.nsenter)}",
    ]
    return "\n".join(lines) + "\n"


def install_files(cfg: AgentConfig) -> None:
    shim = resources.files("handler").joinpath("shim.sh").read_bytes()
    _write(cfg.shim_path, shim, mode=0o755)
    _write(cfg.local_dir / SHIM_CONF_NAME, shim_conf(cfg), mode=0o644)
    _write(cfg.handler_config_file, cfg.handler.to_json(), mode=0o644)
    for d in (cfg.handler.spool_dir, cfg.handler.state_dir):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    logger.info("installed the shim at %s", cfg.shim_path)


def publish_pid(cfg: AgentConfig) -> None:
    # With hostPID the agent's pid is the host's pid, which is what the shim's nsenter needs.
    _write(cfg.pid_file, f"{os.getpid()}\n", mode=0o644)


def unpublish_pid(cfg: AgentConfig) -> None:
    """From now on the shim spools instead of entering a container that is going away."""
    try:
        if cfg.pid_file.read_text().strip() == str(os.getpid()):
            cfg.pid_file.unlink()
    except FileNotFoundError:
        pass


def uninstall_files(cfg: AgentConfig) -> None:
    for p in (cfg.shim_path, cfg.local_dir / SHIM_CONF_NAME, cfg.pid_file, cfg.handler_config_file):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
