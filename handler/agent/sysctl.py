"""
core_pattern and friends: install ours, remember the node's, keep ours in place, give theirs back on uninstall.

A rolling update stops one agent and starts the next; core_pattern stays pointed at the shim throughout (the
shim spools while no agent runs), so no crash in between is lost. Only ``coredump-agent uninstall`` restores
the saved pattern. If something else rewrites core_pattern while we run, theirs becomes the saved "previous"
(non-pod cores keep going there) and ours goes back. Saving a pipe pattern also writes ``forward.sh``, the command
the shim runs itself for non-pod cores. Files in the host dir are written through :mod:`handler.safefs`; the
sysctls themselves are configured paths (``--sysctl-root``).
"""

from __future__ import annotations

import json
import logging

from handler import foreign, safefs
from handler.agent.config import AgentConfig

logger = logging.getLogger(__name__)

CORE_PATTERN = "kernel.core_pattern"
CORE_PIPE_LIMIT = "kernel.core_pipe_limit"
SUID_DUMPABLE = "fs.suid_dumpable"
CORE_PATTERN_MAX = 127  # CORENAME_MAX_SIZE - 1
# In the host dir: the previous pipe pattern as the shim runs it (see handler.foreign.shim_forward_script).
FORWARD_NAME = "forward.sh"


def read(cfg: AgentConfig, name: str) -> str:
    return cfg.sysctl(name).read_text().rstrip("\n")


def write(cfg: AgentConfig, name: str, value: str) -> None:
    path = cfg.sysctl(name)
    # sysctl files take one write; no temp file and rename on /proc/sys.
    with open(path, "w") as f:
        f.write(value + "\n")
    logger.info("set %s = %r", name, value)


def _save_atomically(cfg: AgentConfig, name: str, text: str) -> None:
    """``name`` in the host dir, written by temp file and rename through :mod:`handler.safefs`."""
    safefs.make_dirs(cfg.local_dir, mode=0o755, root_mode=0o755).close()
    safefs.replace_file(cfg.local_dir, name, data=text.encode(), mode=0o644)


def save_previous(cfg: AgentConfig, pattern: str) -> None:
    """Remember the node's pattern, and (for a pipe) the command the shim runs for non-pod cores."""
    script = foreign.shim_forward_script(pattern.strip())
    if script is not None:
        _save_atomically(cfg, FORWARD_NAME, script)
    else:
        safefs.unlink(cfg.local_dir, FORWARD_NAME)
    _save_atomically(cfg, cfg.previous_pattern_file.name, pattern + "\n")


def is_ours(cfg: AgentConfig, pattern: str) -> bool:
    return pattern.strip() == cfg.core_pattern


def install(cfg: AgentConfig) -> None:
    """Save the node's settings (unless they are already ours) and set ours."""
    ours = cfg.core_pattern
    if len(ours) > CORE_PATTERN_MAX:
        raise ValueError(f"core_pattern {ours!r} is longer than {CORE_PATTERN_MAX} bytes; use a shorter --host-dir")
    current = read(cfg, CORE_PATTERN)
    if not is_ours(cfg, current):
        save_previous(cfg, current)
        logger.info("saved the node's core_pattern %r", current)
    if safefs.read_bytes(cfg.local_dir, cfg.previous_sysctls_file.name, limit=1) is None:
        saved = {n: read(cfg, n) for n in (CORE_PIPE_LIMIT, SUID_DUMPABLE) if cfg.sysctl(n).exists()}
        _save_atomically(cfg, cfg.previous_sysctls_file.name, json.dumps(saved))
    for name, value in ((CORE_PIPE_LIMIT, cfg.core_pipe_limit), (SUID_DUMPABLE, cfg.suid_dumpable)):
        if cfg.sysctl(name).exists() and read(cfg, name) != str(value):
            write(cfg, name, str(value))
    if not is_ours(cfg, current):
        write(cfg, CORE_PATTERN, ours)


def enforce(cfg: AgentConfig) -> bool:
    """Put our core_pattern back if something replaced it; True if it had to."""
    current = read(cfg, CORE_PATTERN)
    if is_ours(cfg, current):
        return False
    logger.warning(
        "core_pattern was changed to %r behind our back; keeping it as the previous pattern, restoring ours", current
    )
    save_previous(cfg, current)
    write(cfg, CORE_PATTERN, cfg.core_pattern)
    return True


def restore(cfg: AgentConfig) -> None:
    """Uninstall: give the node its own settings back (only if ours are still in place)."""
    if is_ours(cfg, read(cfg, CORE_PATTERN)):
        raw = safefs.read_bytes(cfg.local_dir, cfg.previous_pattern_file.name, limit=4096)
        previous = raw.decode(errors="replace").rstrip("\n") if raw is not None else ""
        if not previous:
            previous = "core"
            logger.warning("no saved core_pattern; restoring the kernel default %r", previous)
        write(cfg, CORE_PATTERN, previous)
    raw = safefs.read_bytes(cfg.local_dir, cfg.previous_sysctls_file.name, limit=1 << 16)
    try:
        saved = json.loads(raw) if raw is not None else {}
    except ValueError:
        saved = {}
    if not isinstance(saved, dict):
        saved = {}
    for name, value in saved.items():
        if cfg.sysctl(name).exists():
            write(cfg, name, value)
    for name in (cfg.previous_pattern_file.name, cfg.previous_sysctls_file.name, FORWARD_NAME):
        safefs.unlink(cfg.local_dir, name)
