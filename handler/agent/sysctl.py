"""
core_pattern and friends: install ours, remember the node's, keep ours in place, give theirs back on uninstall.

A rolling update stops one agent and starts the next; core_pattern stays pointed at the shim throughout (the
shim spools while no agent runs), so no crash in between is lost. Only ``coredump-agent uninstall`` restores
the saved pattern. If something else rewrites core_pattern while we run, theirs becomes the saved "previous"
(non-pod cores keep going there) and ours goes back.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from handler.agent.config import AgentConfig

logger = logging.getLogger(__name__)

CORE_PATTERN = "kernel.core_pattern"
CORE_PIPE_LIMIT = "kernel.core_pipe_limit"
SUID_DUMPABLE = "fs.suid_dumpable"
CORE_PATTERN_MAX = 127   # CORENAME_MAX_SIZE - 1


def read(cfg: AgentConfig, name: str) -> str:
    return cfg.sysctl(name).read_text().rstrip("\n")


def write(cfg: AgentConfig, name: str, value: str) -> None:
    path = cfg.sysctl(name)
    # sysctl files take one write; no temp file and rename on /proc/sys.
    with open(path, "w") as f:
        f.write(value + "\n")
    logger.info("set %s = %r", name, value)


def _save_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.rename(tmp, path)


def is_ours(cfg: AgentConfig, pattern: str) -> bool:
    return pattern.strip() == cfg.core_pattern


def install(cfg: AgentConfig) -> None:
    """Save the node's settings (unless they are already ours) and set ours."""
    ours = cfg.core_pattern
    if len(ours) > CORE_PATTERN_MAX:
        raise ValueError(f"core_pattern {ours!r} is longer than {CORE_PATTERN_MAX} bytes; use a shorter --host-dir")
    current = read(cfg, CORE_PATTERN)
    if not is_ours(cfg, current):
        _save_atomically(cfg.previous_pattern_file, current + "\n")
        logger.info("saved the node's core_pattern %r", current)
    if not cfg.previous_sysctls_file.exists():
        saved = {n: read(cfg, n) for n in (CORE_PIPE_LIMIT, SUID_DUMPABLE) if cfg.sysctl(n).exists()}
        _save_atomically(cfg.previous_sysctls_file, json.dumps(saved))
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
    logger.warning("core_pattern was changed to %r behind our back; keeping it as the previous pattern, "
                   "restoring ours", current)
    _save_atomically(cfg.previous_pattern_file, current + "\n")
    write(cfg, CORE_PATTERN, cfg.core_pattern)
    return True


def restore(cfg: AgentConfig) -> None:
    """Uninstall: give the node its own settings back (only if ours are still in place)."""
    if is_ours(cfg, read(cfg, CORE_PATTERN)):
        try:
            previous = cfg.previous_pattern_file.read_text().rstrip("\n")
        except FileNotFoundError:
            previous = "core"
            logger.warning("no saved core_pattern; restoring the kernel default %r", previous)
        write(cfg, CORE_PATTERN, previous)
    try:
        saved = json.loads(cfg.previous_sysctls_file.read_text())
    except (FileNotFoundError, ValueError):
        saved = {}
    for name, value in saved.items():
        if cfg.sysctl(name).exists():
            write(cfg, name, value)
    for p in (cfg.previous_pattern_file, cfg.previous_sysctls_file):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
