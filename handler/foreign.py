"""
Cores of processes that are not in a pod go where the node's previous ``core_pattern`` would have sent them.

* previous pattern is a pipe (``|/usr/lib/systemd/systemd-coredump %P ...``): the program lives on the host, not
  in the agent's container, so the handler reads nothing and exits :data:`EXIT_FORWARD`; the shim then runs the
  command itself, on the host, with the untouched stdin, from :func:`shim_forward_script`, which the agent wrote
  into its host dir when it saved the pattern. Nothing the handler prints is ever run: the command comes from
  the agent, and the crash's values (comm, exe) only ever reach it as quoted shell variables.
* previous pattern is a file name (``core``, ``/var/crash/core.%e.%p``): the handler writes the file itself
  where the kernel would have, through ``/proc/<pid>/cwd`` (relative) or ``/proc/<pid>/root`` (absolute),
  i.e. in the crashing process's own filesystem view, honouring its ``RLIMIT_CORE`` like the kernel does.
"""

from __future__ import annotations

import logging
import os
import shlex
import socket
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

EXIT_FORWARD = 10


@dataclass
class CrashSpecifiers:
    pid: int  # %P (initial pid namespace)
    tid: int | None = None  # %I
    signal: int = 0  # %s
    time: int = 0  # %t
    comm: str = ""  # %e
    rlimit: int | None = None  # %c (bytes; None = unknown)
    uid: int | None = None
    gid: int | None = None
    ns_pid: int | None = None  # %p
    ns_tid: int | None = None  # %i
    exe: str | None = None  # %E-ish: the executable path


def expand(template: str, spec: CrashSpecifiers, *, hostname: str | None = None) -> str:
    """Expand core_pattern ``%`` specifiers the way the kernel does (unknown ones vanish)."""
    values = {
        "%": "%",
        "p": spec.ns_pid if spec.ns_pid is not None else spec.pid,
        "P": spec.pid,
        "i": spec.ns_tid if spec.ns_tid is not None else (spec.tid or spec.pid),
        "I": spec.tid or spec.pid,
        "u": spec.uid if spec.uid is not None else 0,
        "g": spec.gid if spec.gid is not None else 0,
        "s": spec.signal,
        "t": spec.time,
        "h": hostname or socket.gethostname(),
        "e": spec.comm,
        "E": (spec.exe or "").replace("/", "!"),
        "c": spec.rlimit if spec.rlimit is not None else -1,
        "d": 0,
        "f": os.path.basename(spec.exe or spec.comm),
    }
    out = []
    i = 0
    while i < len(template):
        ch = template[i]
        if ch == "%" and i + 1 < len(template):
            out.append(str(values.get(template[i + 1], "")))
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def pipe_command(previous: str, spec: CrashSpecifiers) -> list[str]:
    """The argv of a previous pipe pattern for this crash (split before expansion, as the kernel does now)."""
    argv = previous.lstrip("|").strip().split()
    return [expand(a, spec) for a in argv]


# Specifiers the shim can fill in itself (see handler/shim.sh, forward()): as the kernel and :func:`expand` do.
SHIM_SPECIFIERS = frozenset("PIstcCehugpiEfd")


def shim_forward_script(previous: str) -> str | None:
    """
    The previous pipe pattern as a POSIX sh ``set --`` line for the shim: literal parts single-quoted, each
    specifier a double-quoted ``${sp_X}`` the shim sets from the crash (unknown specifiers vanish, as in
    :func:`expand`). Split on whitespace before expansion, as the kernel does. None for a file pattern.
    """
    if not previous.startswith("|"):
        return None
    words = []
    for arg in previous[1:].strip().split():
        parts: list[str] = []
        literal: list[str] = []
        i = 0
        while i < len(arg):
            if arg[i] == "%" and i + 1 < len(arg):
                spec = arg[i + 1]
                i += 2
                if spec == "%":
                    literal.append("%")
                    continue
                if literal:
                    parts.append(shlex.quote("".join(literal)))
                    literal = []
                if spec in SHIM_SPECIFIERS:
                    parts.append(f'"${{sp_{spec}}}"')
                continue
            literal.append(arg[i])
            i += 1
        if literal:
            parts.append(shlex.quote("".join(literal)))
        words.append("".join(parts) or "''")
    if not words:
        return None
    return (
        "# written by coredump-agent from the node's previous core_pattern; read by the shim\nset -- "
        + " ".join(words)
        + "\n"
    )


def shell_command(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def file_target(previous: str, spec: CrashSpecifiers, *, proc_root: Path) -> Path:
    """Where the kernel would have written the core for a file pattern, seen through /proc/<pid>."""
    name = expand(previous.strip(), spec)
    if name.startswith("/"):
        return Path(proc_root) / str(spec.pid) / "root" / name.lstrip("/")
    return Path(proc_root) / str(spec.pid) / "cwd" / name


def write_file_core(target: Path, chunks, *, limit: int | None, owner: tuple[int, int] | None = None) -> int:
    """Write the raw core to ``target`` like the kernel: new file, mode 0600, the process's owner, ``limit`` bytes."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    if owner is not None:
        try:
            os.fchown(fd, *owner)
        except OSError as e:
            logger.warning("cannot give %s to uid %d: %s", target, owner[0], e)
    written = 0
    with os.fdopen(fd, "wb") as f:
        for chunk in chunks:
            if limit is not None and written + len(chunk) > limit:
                chunk = chunk[: max(0, limit - written)]
            if chunk:
                f.write(chunk)
                written += len(chunk)
    return written
