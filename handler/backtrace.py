"""
Backtraces of a core with drgn (elfutils' unwinder), and the crash signature that groups crashes by code path.

Contract:

- :func:`unwind` reads a core (the full core or its :mod:`handler.sparsecore` copy) and returns the crashing
  thread first, then the others (at most ``max_threads``), each with at most ``max_frames`` frames. A frame
  records its program counter, module (the path in the container), the module's build-id, the offset in the
  module, and, where symbols or debug info exist, function and file:line — never argument values or memory.
- Files are looked up only where the caller says: each root in ``roots`` (the container's own root,
  ``/proc/<pid>/root``, or a build-id store's sysroot), at the module's path. drgn takes a file only when its
  build-id equals the one the core names, so a wrong or planted file is never used. drgn's own search of this
  machine's filesystem is switched off: a container's ``/lib/libc.so.6`` is not the node's.
- :func:`signature` is a stable hash of the crashing thread's top frames: module basename plus function, or plus
  the offset in the module when stripped. It does not change with ASLR, and differs for another code path.
- :func:`main` (``python -m handler.backtrace``) runs one unwind and prints JSON. The handler and the agent run it
  in a child process under a CPU-time and address-space limit, so a hostile core costs bounded time and memory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

SIGNATURE_FRAMES = 5
MAX_FRAMES = 64
MAX_THREADS = 32
UNWINDER = "drgn"


def _frame(prog: Any, frame: Any) -> dict[str, Any] | None:
    try:
        pc = frame.pc
    except LookupError:
        return None
    out: dict[str, Any] = {"pc": f"0x{pc:x}"}
    try:
        module = prog.module(pc)
    except LookupError:
        module = None
    if module is not None:
        out["module"] = module.name
        if module.build_id:
            out["buildID"] = module.build_id.hex()
        ranges = module.address_ranges or ()
        if ranges:
            out["offset"] = f"0x{pc - min(r[0] for r in ranges):x}"
    name = frame.name
    if name and not name.startswith("0x"):
        out["function"] = name
    try:
        filename, line, _column = frame.source()
        out["file"], out["line"] = filename, line
    except LookupError:
        pass
    return out


def _candidates(name: str, build_id: str | None, roots: Sequence[Path]) -> Iterable[Path]:
    """Where a module's file may be: ``<root>/.build-id/<id>`` (a sysroot made from the store), then its path."""
    if build_id:
        for root in roots:
            yield root / ".build-id" / build_id
    if name.startswith("/") and "\0" not in name:
        for root in roots:
            yield Path(str(root) + os.path.normpath(name))


def unwind(
    core: Path, *, roots: Sequence[Path] = (), max_frames: int = MAX_FRAMES, max_threads: int = MAX_THREADS
) -> dict[str, Any]:
    """The backtrace of ``core`` (see the module docstring); raises ``ValueError`` for a core drgn cannot read."""
    import drgn

    prog = drgn.Program()
    try:
        prog.set_core_dump(str(core))
    except (drgn.FaultError, OSError, ValueError) as e:
        raise ValueError(f"not a readable core: {e}") from None
    try:
        prog.set_enabled_debug_info_finders([])
    except (AttributeError, ValueError):
        pass
    missing: list[str] = []
    try:
        modules = [m for m, _new in prog.loaded_modules()]
    except Exception as e:  # drgn raises several kinds for a damaged link map
        modules = []
        missing.append(f"module list: {e}")
    for module in modules:
        build_id = module.build_id.hex() if module.build_id else None
        for path in _candidates(module.name, build_id, roots):
            if (
                module.loaded_file_status != drgn.ModuleFileStatus.WANT
                and module.debug_file_status != drgn.ModuleFileStatus.WANT
            ):
                break
            try:
                if path.is_file() and not path.is_symlink():
                    module.try_file(str(path))
            except (OSError, drgn.FaultError, ValueError):
                continue
        if module.loaded_file_status == drgn.ModuleFileStatus.WANT and module.name.startswith("/"):
            missing.append(module.name)
    try:
        crashed = prog.crashed_thread()
    except (LookupError, ValueError) as e:
        raise ValueError(f"no crashed thread in the core: {e}") from None
    ordered = [crashed] + [t for t in prog.threads() if t.tid != crashed.tid]
    threads = []
    for thread in ordered[:max_threads]:
        try:
            trace = thread.stack_trace()
        except (LookupError, ValueError, drgn.FaultError) as e:
            threads.append(
                {"tid": thread.tid, "crashed": thread.tid == crashed.tid, "frames": [], "error": str(e)[:200]}
            )
            continue
        frames = [f for f in (_frame(prog, fr) for fr in list(trace)[:max_frames]) if f is not None]
        threads.append({"tid": thread.tid, "crashed": thread.tid == crashed.tid, "frames": frames})
    result: dict[str, Any] = {
        "unwinder": f"{UNWINDER} {drgn.__version__}",
        "threads": threads,
        "threadCount": len(ordered),
    }
    if missing:
        result["missingObjects"] = sorted(set(missing))[:64]
    result["signature"] = signature(threads[0]["frames"]) if threads and threads[0]["frames"] else None
    return result


def frame_key(frame: dict[str, Any]) -> str:
    """``libc.so.6!abort``, or ``app+0x1139`` when the frame has no symbol."""
    module = os.path.basename(frame.get("module") or "?")
    if frame.get("function"):
        return f"{module}!{frame['function']}"
    return f"{module}+{frame.get('offset') or frame.get('pc')}"


def signature(frames: Sequence[dict[str, Any]], *, depth: int = SIGNATURE_FRAMES) -> str:
    """A stable 16-hex-digit hash of the top ``depth`` frames."""
    keys = "\n".join(frame_key(f) for f in frames[:depth])
    return hashlib.sha256(keys.encode()).hexdigest()[:16]


def top_frames(result: dict[str, Any], *, depth: int = 3) -> list[str]:
    """The short form of the crashing thread's top frames, for status and Event messages."""
    threads = result.get("threads") or []
    return [frame_key(f) for f in (threads[0]["frames"][:depth] if threads else [])]


def _limit(address_space: int, cpu_seconds: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m handler.backtrace", description="Unwind a core; print JSON.")
    p.add_argument("core", type=Path)
    p.add_argument("--root", type=Path, action="append", default=[], help="where the container's files are")
    p.add_argument("--max-frames", type=int, default=MAX_FRAMES)
    p.add_argument("--max-threads", type=int, default=MAX_THREADS)
    p.add_argument("--memory-limit", type=int, default=1 << 30, help="address-space limit in bytes")
    p.add_argument("--cpu-limit", type=int, default=20, help="CPU seconds")
    args = p.parse_args(argv)
    _limit(args.memory_limit, args.cpu_limit)
    try:
        result = unwind(args.core, roots=args.root, max_frames=args.max_frames, max_threads=args.max_threads)
    except ValueError as e:
        print(json.dumps({"error": str(e)[:500]}))
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
