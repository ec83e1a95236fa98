"""
After a core is committed: keep its objects by build-id, unwind it, and say what to add to its metadata.

:func:`explain` runs in the handler after the commit, while the kernel still holds the crashing process (so
``/proc/<pid>`` and the exact mapped files are there), and never raises: whatever fails is recorded and the core
stays as it is. It

1. lists the mapped ELF objects from the core's sparse copy (:mod:`handler.sparsecore`) and stores the missing
   ones (:func:`handler.objects.keep_objects`, bounded by bytes and time);
2. rebuilds, in a temporary directory, a sysroot of the stored objects at their paths in the container and
   unwinds the sparse copy against it (and ``/proc/<pid>/root`` for anything not stored) in a child process
   limited in CPU time, address space and wall time (:mod:`handler.backtrace`);
3. returns the metadata additions: ``objects``, ``backtrace`` (every thread within budget), ``signature`` and
   ``topFrames`` (the short form the API shows), or ``backtraceError``.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handler import backtrace, objects, safefs, sparsecore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    object_bytes: int = objects.DEFAULT_BYTES
    object_seconds: float = objects.DEFAULT_SECONDS
    unwind_seconds: float = 5.0
    unwind_memory: int = 1 << 30
    max_threads: int = backtrace.MAX_THREADS


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(sparsecore.MAX_HEAD)


def _sysroot(root: Path, kept: list[dict[str, Any]], into: Path) -> None:
    """Decompress each stored object at its container path under ``into`` (paths normalized, no escape), and
    at ``into/.build-id/<build-id>``."""
    for rec in kept:
        if rec.get("state") not in ("stored", "stored-earlier"):
            continue
        rel = os.path.normpath(str(rec["path"])).lstrip("/")
        if rel.startswith("..") or not rel:
            continue
        dst = into / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        build_id = rec["buildID"]
        try:
            objects.validate_build_id(build_id)
            d = safefs.open_dir(root, objects.STORE_DIR, build_id[:2], build_id[2:])
            src = d.open_read(objects.OBJECT_NAME) if d is not None else None
            if d is not None:
                d.close()
            if src is None:
                raise FileNotFoundError(f"object {build_id} is not stored (or not a regular file)")
            with src, gzip.open(os.fdopen(os.dup(src.fd), "rb")) as i, open(dst, "wb") as o:
                shutil.copyfileobj(i, o, 1 << 20)
        except (OSError, EOFError, ValueError) as e:
            logger.warning("cannot unpack stored object %s: %s", rec["buildID"], e, extra={"buildID": rec["buildID"]})
            continue
        # also by build-id: the link map may name the file by another path than NT_FILE did
        by_id = into / ".build-id"
        by_id.mkdir(exist_ok=True)
        try:
            os.link(dst, by_id / rec["buildID"])
        except FileExistsError:
            pass


def unwind_in_child(sparse: Path, *, roots: list[Path], budget: Budget) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "handler.backtrace",
        str(sparse),
        "--memory-limit",
        str(budget.unwind_memory),
        "--cpu-limit",
        str(max(1, int(budget.unwind_seconds))),
        "--max-threads",
        str(budget.max_threads),
    ]
    for r in roots:
        cmd += ["--root", str(r)]
    try:
        out = subprocess.run(
            cmd,
            capture_output=True,
            timeout=budget.unwind_seconds,
            text=True,
            env={
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "PYTHONPATH": os.pathsep.join(sys.path),
                # No drgn plugins: unwinding a user-space core needs none of them (drgn's own are its kernel
                # and crash commands), loading them was 0.08 of the unwinder's 0.13 s of held time, and an
                # installed third-party plugin would run its code on an untrusted core.
                "DRGN_DISABLE_PLUGINS": "*",
            },
        )
    except subprocess.TimeoutExpired:
        return {"error": f"unwinding took longer than {budget.unwind_seconds:g}s"}
    try:
        doc = json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else None
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        return {"error": f"unwinder failed (exit {out.returncode})"}
    return doc


def explain(*, sparse: Path, proc_pid: Path | None, storage_root: Path, budget: Budget = Budget()) -> dict[str, Any]:
    """Metadata additions for a committed core (see the module docstring); never raises."""
    started = time.monotonic()
    extra: dict[str, Any] = {}
    try:
        head = _head(sparse)
        with open(sparse, "rb") as f:

            def read_at(offset: int, size: int) -> bytes:
                return os.pread(f.fileno(), size, offset)

            mapped = objects.mapped_objects(head, read_at)
    except OSError as e:
        return {"backtraceError": f"no sparse copy of the core: {e.strerror}"}
    if not mapped:
        extra["objects"] = []
    elif proc_pid is not None:
        extra["objects"] = objects.keep_objects(
            storage_root, proc_pid, mapped, max_bytes=budget.object_bytes, max_seconds=budget.object_seconds
        )
    else:
        extra["objects"] = [
            {
                "path": m.path,
                "buildID": m.build_id,
                "state": "stored-earlier" if objects.is_stored(storage_root, m.build_id) else "skipped",
                **({} if objects.is_stored(storage_root, m.build_id) else {"reason": "the process was gone"}),
            }
            for m in mapped
        ]
    with tempfile.TemporaryDirectory(prefix="coredump-sysroot-") as tmp:
        _sysroot(storage_root, extra["objects"], Path(tmp))
        roots = [Path(tmp)] + ([proc_pid / "root"] if proc_pid is not None else [])
        result = unwind_in_child(sparse, roots=roots, budget=budget)
    if "error" in result:
        extra["backtraceError"] = str(result["error"])[:300]
    else:
        extra["backtrace"] = result
        if result.get("signature"):
            extra["signature"] = result["signature"]
        extra["topFrames"] = backtrace.top_frames(result)
    extra["explainSeconds"] = round(time.monotonic() - started, 3)
    return extra
