"""
gdb on a pod's core in one step: a verified local copy (cached) and the command that opens it right.

The cache is ``$XDG_CACHE_HOME/kubectl-coredump`` (``~/.cache/kubectl-coredump``), one directory per core:
``<namespace>/<pod>/<pod-uid>/<container>/<core-id>/``, holding the extracted one-core archive and
``verified.json`` (the digest checked at download, with the core file's size and mtime). A cached core is
used while its file still has that size and mtime; otherwise it is downloaded again.

With objects (``?objects=true``) the archive carries the core's own gdb command file,
``<container>_<core-id>.gdb`` (``set sysroot``, ``solib-search-path``, ``file``, ``core-file``, relative to
the archive's top): gdb runs it with ``-cd`` there, then the user's arguments. Otherwise (or with
``--exe``) the executable is ``sysroot/<exe>`` when a sysroot came (gdb also gets ``set sysroot``), else the
recorded exe path if that file exists on this machine, else none: gdb opens the core alone and the user is
told so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

from kubectl_coredump import digest as core_digest
from kubectl_coredump.errors import PluginError
from kubectl_coredump.model import safe_name

MARKER = "verified.json"


def cache_root(environ: dict[str, str] | os._Environ[str] = os.environ) -> Path:
    base = environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(base) / "kubectl-coredump"


def cache_dir(*, root: Path, namespace: str, pod: str, pod_uid: str, container: str, core_id: str) -> Path:
    parts = [namespace, pod, pod_uid or "unknown-uid", container, core_id]
    if not all(safe_name(p) for p in parts):
        raise PluginError(f"the server named the core with characters that cannot be a file name: {parts!r}")
    return root.joinpath(*parts)


@dataclasses.dataclass(frozen=True)
class CachedCore:
    directory: Path
    core: Path
    metadata: dict[str, Any]
    digest: str  # "<algorithm>:<hex>", as checked at download


def cached(directory: Path, *, container: str, core_id: str) -> CachedCore | None:
    """The cached copy if it is complete and unchanged since it was verified."""
    try:
        marker = json.loads((directory / MARKER).read_text())
        core = directory / container / f"{core_id}.core"
        info = core.stat()
        meta = json.loads((directory / container / f"{core_id}.json").read_text())
    except (OSError, ValueError):
        return None
    if not (
        isinstance(marker, dict)
        and isinstance(meta, dict)
        and marker.get("size") == info.st_size
        and marker.get("mtimeNs") == info.st_mtime_ns
        and (promised := core_digest.promised(meta)) is not None
        and marker.get("digest") == ":".join(promised)
    ):
        return None
    return CachedCore(directory=directory, core=core, metadata=meta, digest=str(marker["digest"]))


def commit(*, staging: Path, final: Path, core: Path, digest: str) -> None:
    """Mark the staged, verified copy and move it into place (replacing a stale one)."""
    info = core.stat()
    (staging / MARKER).write_text(json.dumps({"digest": digest, "size": info.st_size, "mtimeNs": info.st_mtime_ns}))
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, final)


def command(
    copy: CachedCore, *, container: str, core_id: str, gdb_args: list[str], exe: Path | None = None
) -> tuple[list[str], list[str]]:
    """The gdb command line for a cached core, and notes for the user about what it could not find."""
    script = copy.directory / f"{container}_{core_id}.gdb"
    if exe is None and script.is_file():
        # ?objects=true wrote this core's command file (sysroot, solib path, file, core-file, all relative
        # to the archive's top): gdb runs it from there, then the user's own arguments.
        script_notes: list[str] = []
        if not any(line.startswith("file ") for line in script.read_text(errors="replace").splitlines()):
            script_notes.append(
                "note: the dump carries no executable for this core (see manifest.json): gdb opens the "
                "core alone (addresses only)"
            )
        return ["gdb", f"-cd={copy.directory}", "-x", str(script), *gdb_args], script_notes
    core = copy.directory / container / f"{core_id}.core"
    notes: list[str] = []
    exe_recorded = copy.metadata.get("exe") if isinstance(copy.metadata.get("exe"), str) else ""
    own = copy.directory / f"sysroot.{container}_{core_id}"
    sysroot = own if own.is_dir() else copy.directory / "sysroot"
    args = ["gdb"]
    executable: Path | None = exe
    if sysroot.is_dir():
        args += ["-ex", f"set sysroot {sysroot}"]
        candidate = sysroot / exe_recorded.lstrip("/") if exe_recorded else None
        if executable is None and candidate is not None and candidate.is_file():
            executable = candidate
    if executable is None and exe_recorded and os.path.isfile(exe_recorded):
        executable = Path(exe_recorded)
        notes.append(
            f"note: using {exe_recorded} from this machine; it must be the same build as in the pod "
            f"(build-id {copy.metadata.get('buildID') or 'unknown'})"
        )
    if executable is None:
        notes.append(
            f"note: the executable {exe_recorded or '(not recorded)'} is not in the archive nor on this "
            "machine: gdb opens the core alone (addresses only); copy the binary here, or use a server "
            "that keeps objects (--objects)"
        )
    args += gdb_args
    args += [str(executable), str(core)] if executable else ["-c", str(core)]
    return args, notes
