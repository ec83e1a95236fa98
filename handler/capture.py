"""
The kernel path: one crashing process, its core on stdin, filed per handler.layout or handed to the previous pattern.

Order matters for the crashing process: reading starts at once (a reader thread fills a few chunks while the
pod's names are looked up), every external call has a timeout, and a watchdog ends the handler if nothing
moves for ``stall_timeout`` seconds, so the kernel can finish and the process can die. A stream that stalls, or
a handler told to stop (SIGTERM), keeps what arrived as a truncated core (reason ``stalled`` / ``killed``) when
the ELF header and notes are in it. Whether a core is kept at all (the pod's or namespace's
``coredump.example.io/capture`` annotation, the crash-loop limit) is decided before a byte is compressed; a
core not kept is read and discarded at pipe speed and counted.
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any

from handler import elfinfo, foreign, layout
from handler.config import HandlerConfig
from handler.filing import (
    Explain,
    Filed,
    PartialCoreLost,
    base_metadata,
    file_core,
    outcome_record,
    reserve_rate_slot,
    storage_usable,
)
from handler.ingest import file_chunks
from handler.early import KILLED, ChunkReader, EarlyStart, Progress, start_reading
from handler.podrecord import capture_wanted, read_namespace_annotations
from handler.outcome import DROPPED, ERROR, FORWARDED, write_outcome
from handler.resolve import CgroupIdentity, PodIdentity, identity_from_cgroup_text, read_cgroup, resolve_pod

logger = logging.getLogger(__name__)

# 1, 126 and 127 are left to nsenter and Python itself: the shim reads them as "the handler never ran".
EXIT_OK, EXIT_ERROR, EXIT_STALLED = 0, 4, 3
# The watchdog fires after twice the stall timeout plus this: the reader ends a stalled stream first.
WATCHDOG_GRACE = 30.0


def _watchdog(
    progress: Progress, *, timeout: float, done: threading.Event, cfg: HandlerConfig, spec: foreign.CrashSpecifiers
) -> None:
    while not done.wait(min(1.0, timeout / 4)):
        if time.monotonic() - progress.last > timeout:
            logger.error("no progress for %.0fs on pid %d; giving up so the process can exit", timeout, spec.pid)
            write_outcome(
                cfg.outcomes_dir,
                {"result": ERROR, "source": "kernel", "pid": spec.pid, "signal": spec.signal, "reason": "stalled"},
            )
            os._exit(EXIT_STALLED)


def _read_previous(cfg: HandlerConfig) -> str:
    if cfg.previous_pattern_file is None:
        return ""
    try:
        return cfg.previous_pattern_file.read_text().strip()
    except OSError:
        return ""


def _exe_path(cfg: HandlerConfig, pid: int) -> str | None:
    try:
        return os.readlink(cfg.proc_root / str(pid) / "exe")
    except OSError:
        return None


def handle_foreign(cfg: HandlerConfig, spec: foreign.CrashSpecifiers, *, stdin_fd: int, out) -> int:
    """A process outside any pod: the previous core_pattern's job, never silently dropped."""
    previous = _read_previous(cfg)
    record = {"source": "kernel", "pid": spec.pid, "signal": spec.signal, "comm": layout.sanitize_text(spec.comm)}
    if cfg.foreign == "drop" or not previous:
        why = "configured to drop" if cfg.foreign == "drop" else "no previous core_pattern"
        logger.warning("core of pid %d (%s, not in a pod) dropped: %s", spec.pid, record["comm"], why)
        write_outcome(cfg.outcomes_dir, dict(record, result=DROPPED, reason=why))
        return EXIT_OK
    if previous.startswith("|"):
        argv = foreign.pipe_command(previous, spec)
        out.write(foreign.shell_command(argv) + "\n")
        out.flush()
        write_outcome(cfg.outcomes_dir, dict(record, result=FORWARDED, reason="previous pipe"))
        return foreign.EXIT_FORWARD
    if spec.rlimit == 0:
        # The kernel writes no file core with RLIMIT_CORE 0; neither do we.
        write_outcome(cfg.outcomes_dir, dict(record, result=DROPPED, reason="RLIMIT_CORE is 0"))
        return EXIT_OK
    target = foreign.file_target(previous, spec, proc_root=cfg.proc_root)
    owner = None
    try:
        st = os.stat(cfg.proc_root / str(spec.pid))
        owner = (st.st_uid, st.st_gid)
    except OSError:
        pass
    reader = ChunkReader(stdin_fd, chunk_size=cfg.chunk_size).start()
    try:
        n = foreign.write_file_core(
            target, reader, limit=spec.rlimit if spec.rlimit and spec.rlimit > 0 else None, owner=owner
        )
    except OSError as e:
        logger.error("cannot write core of pid %d to %s: %s", spec.pid, target, e)
        write_outcome(cfg.outcomes_dir, dict(record, result=ERROR, reason=f"previous pattern: {e}"))
        return EXIT_ERROR
    write_outcome(cfg.outcomes_dir, dict(record, result=FORWARDED, reason="previous file pattern", size=n))
    return EXIT_OK


def discard(reader: ChunkReader) -> int:
    """Read the rest of the core and throw it away at pipe speed (the kernel must finish; nothing is kept)."""
    n = 0
    for chunk in reader:
        n += len(chunk)
    return n


def _skip(
    cfg: HandlerConfig,
    spec: foreign.CrashSpecifiers,
    reader: ChunkReader,
    *,
    pod: PodIdentity,
    reason: str,
    why: str,
    started: float,
) -> int:
    n = discard(reader)
    logger.info(
        "core of pid %d in %s/%s container %s not kept (%s): %d bytes discarded",
        spec.pid,
        pod.namespace,
        pod.pod,
        pod.container,
        why,
        n,
    )
    write_outcome(
        cfg.outcomes_dir,
        {
            "result": DROPPED,
            "source": "kernel",
            "reason": reason,
            "detail": why,
            "pid": spec.pid,
            "signal": spec.signal,
            "namespace": pod.namespace,
            "pod": pod.pod,
            "podUID": pod.pod_uid,
            "container": pod.container,
            "observedSize": n,
            "duration": time.monotonic() - started,
            "firstReadAt": reader.first_read_at,
        },
    )
    return EXIT_OK


def capture(
    cfg: HandlerConfig,
    spec: foreign.CrashSpecifiers,
    *,
    stdin_fd: int = 0,
    out=sys.stdout,
    early: EarlyStart | None = None,
) -> int:
    """File the core on ``stdin_fd``; ``early`` is the reader :mod:`handler.early` may already have started."""
    started = time.monotonic()
    if early is not None:
        cgroup_text = early.cgroup_text
    else:
        cgroup_text = read_cgroup(cfg.proc_root, spec.pid)
    cg = identity_from_cgroup_text(cgroup_text) if cgroup_text else None
    if cg is None:
        return handle_foreign(cfg, spec, stdin_fd=stdin_fd, out=out)

    # Read first, look up second: the kernel is not kept waiting on the CRI or a slow mount.
    reader = (
        early.reader
        if early is not None and early.reader is not None
        else start_reading(stdin_fd, chunk_size=cfg.chunk_size, stall_timeout=cfg.stall_timeout)
    )
    reader.stall_timeout = cfg.stall_timeout
    # SIGTERM: stop reading and keep what arrived, marked truncated ("killed").
    signal.signal(signal.SIGTERM, lambda signum, frame: reader.stop(KILLED))
    progress = reader.progress
    assert progress is not None
    done = threading.Event()
    # The reader ends a stalled stream itself and the partial core is kept; the watchdog is the last resort
    # for a handler stuck elsewhere (a hung storage write).
    threading.Thread(
        target=_watchdog,
        args=(progress,),
        daemon=True,
        name="watchdog",
        kwargs=dict(timeout=2 * cfg.stall_timeout + WATCHDOG_GRACE, done=done, cfg=cfg, spec=spec),
    ).start()
    try:
        ident = resolve_pod(cfg, pid=spec.pid, cgroup_text=cgroup_text)
    except Exception:  # bytes are already being read: spool rather than fail
        logger.exception("resolving pid %d failed; spooling", spec.pid)
        ident = cg
    exe = _exe_path(cfg, spec.pid) or spec.exe
    build_id = elfinfo.build_id_from_executable(cfg.proc_root / str(spec.pid) / "exe")
    progress.advance(0)
    spool_reason = None
    pod: PodIdentity | None = ident if isinstance(ident, PodIdentity) else None
    crashed_at = spec.time or time.time()
    core_id = layout.make_core_id(timestamp=crashed_at, comm=spec.comm, pid=spec.pid, signal=spec.signal)
    reserved = None
    if pod is None:
        spool_reason = "pod names not found yet"
        logger.warning(
            "pid %d is in pod %s but its names are unknown; spooling for the agent to resolve", spec.pid, cg.pod_uid
        )
    else:
        # Decided before a byte is compressed: opt-out, then the crash-loop limit.
        wanted, why = capture_wanted(
            pod=pod.record.annotations if pod.record else None,
            namespace=read_namespace_annotations(cfg.state_dir, pod.namespace),
            default=cfg.capture_default,
        )
        if not wanted:
            done.set()
            return _skip(cfg, spec, reader, pod=pod, reason="opted-out", why=why, started=started)
        spool_reason = storage_usable(cfg.storage_root, timeout=cfg.storage_timeout)
        if spool_reason:
            logger.error("storage unusable (%s); spooling core of %s/%s", spool_reason, pod.namespace, pod.pod)
        else:
            reserved = reserve_rate_slot(cfg, ident=pod, core_id=core_id)
            if not reserved.keep:
                done.set()
                return _skip(
                    cfg,
                    spec,
                    reader,
                    pod=pod,
                    reason="rate-limited",
                    why=f"{reserved.dropped_in_window} cores over the limit in this window",
                    started=started,
                )
    meta = base_metadata(
        ident=pod,
        pid=spec.pid,
        sig=spec.signal,
        timestamp=crashed_at,
        comm=spec.comm,
        exe=exe,
        build_id=build_id,
        node=cfg.node,
        cmdline=_cmdline(cfg, spec.pid),
    )
    if pod is None:
        meta["_cgroup"] = cgroup_text
        meta["_podUID"] = ident.pod_uid if isinstance(ident, CgroupIdentity) else None
    try:
        filed = file_core(
            cfg,
            chunks=reader,
            meta=meta,
            core_id=core_id,
            ident=pod,
            spool_reason=spool_reason,
            reserved=reserved,
            explain_target=Explain(proc_pid=cfg.proc_root / str(spec.pid)),
        )
    except PartialCoreLost as e:
        logger.error("core of pid %d lost: %s", spec.pid, e)
        write_outcome(
            cfg.outcomes_dir,
            {
                "result": ERROR,
                "source": "kernel",
                "pid": spec.pid,
                "signal": spec.signal,
                "reason": reader.end_reason or KILLED,
                "detail": str(e),
                "duration": time.monotonic() - started,
            },
        )
        return EXIT_STALLED
    except Exception as e:  # any failure is one clear log line and an outcome, never a hang
        logger.exception("core of pid %d could not be filed", spec.pid)
        write_outcome(
            cfg.outcomes_dir,
            {
                "result": ERROR,
                "source": "kernel",
                "pid": spec.pid,
                "signal": spec.signal,
                "reason": str(e),
                "duration": time.monotonic() - started,
            },
        )
        return EXIT_ERROR
    finally:
        done.set()
    record = outcome_record(filed, duration=time.monotonic() - started, source="kernel")
    record["firstReadAt"] = reader.first_read_at
    record["truncationReason"] = filed.metadata.get("truncationReason")
    write_outcome(cfg.outcomes_dir, record)
    where = filed.stored.core_path if filed.stored else (filed.spooled.data_path if filed.spooled else "rate-limited")
    logger.info("core of pid %d (signal %d) %s: %s", spec.pid, spec.signal, filed.result, where)
    return EXIT_OK


def _cmdline(cfg: HandlerConfig, pid: int) -> str | None:
    try:
        raw = (cfg.proc_root / str(pid) / "cmdline").read_bytes()[:4096]
    except OSError:
        return None
    return " ".join(a.decode("utf-8", "replace") for a in raw.split(b"\0") if a) or None


class NotACore(ValueError):
    """``import`` was given something that is not an ELF core or a gzip of one."""


def sniff_core(path: Path) -> Any:
    """The opener for an importable core (``open``, or ``igzip.open`` for a gzipped one); else :class:`NotACore`."""
    from isal import igzip

    try:
        st = os.stat(path)
    except OSError as e:
        raise NotACore(f"{path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise NotACore(f"{path}: not a regular file")
    if st.st_size == 0:
        raise NotACore(f"{path}: empty file, not a core")
    with open(path, "rb") as f:
        head = f.read(64)
    if head[:2] == b"\x1f\x8b":
        try:
            with igzip.open(path, "rb") as g:
                head = g.read(64)
        except (OSError, EOFError, ValueError) as e:
            raise NotACore(f"{path}: gzip file that cannot be read: {e}") from None
        if elfinfo.is_core_file(head):
            return igzip.open
        raise NotACore(f"{path}: gzip file whose content is not an ELF core")
    if elfinfo.is_core_file(head):
        return open
    what = "an ELF file but not a core (e_type is not ET_CORE)" if head[:4] == b"\x7fELF" else "not an ELF core"
    raise NotACore(f"{path}: {what}; import takes an ELF core file or a gzip of one")


class NoPlaceToFile(OSError):
    """Storage cannot take the core now and no spool directory was given: nothing is written."""


def import_core(
    cfg: HandlerConfig,
    path: Path,
    *,
    ident: PodIdentity,
    pid: int | None,
    sig: int | None,
    comm: str | None,
    timestamp: float | None,
) -> Filed:
    """
    File an existing core file (an ELF core, or a gzip of one) as if the kernel had sent it; never rate
    limited. Writes only under directories given by flag or config file: the storage root, the spool (only
    if given) and outcome records (only if a state dir was given). Raises :class:`NotACore` before writing.
    """
    opener = sniff_core(path)
    info = elfinfo.core_process_info(path, opener=opener)
    pid = pid if pid is not None else int(info.get("pid", 0))
    sig = sig if sig is not None else int(info.get("signal", 0))
    comm = comm if comm is not None else str(info.get("comm", "") or path.name)
    timestamp = timestamp if timestamp is not None else path.stat().st_mtime
    exe = info.get("exe")
    cmdline = info.get("cmdline")
    meta = base_metadata(
        ident=ident,
        pid=pid,
        sig=sig,
        timestamp=timestamp,
        comm=comm,
        exe=exe if isinstance(exe, str) else None,
        build_id=elfinfo.build_id_from_core(path, opener=opener),
        node=cfg.node,
        cmdline=cmdline if isinstance(cmdline, str) else None,
    )
    core_id = layout.make_core_id(timestamp=timestamp, comm=comm, pid=pid, signal=sig)
    started = time.monotonic()
    spool_reason = storage_usable(cfg.storage_root, timeout=cfg.storage_timeout)
    if spool_reason and "spool_dir" not in cfg.explicit:
        raise NoPlaceToFile(f"storage unusable ({spool_reason}) and no --spool-dir given: nothing written")
    chunks = file_chunks(path, chunk_size=cfg.chunk_size, opener=None if opener is open else opener)
    filed = file_core(
        cfg,
        chunks=chunks,
        meta=meta,
        core_id=core_id,
        ident=ident,
        spool_reason=spool_reason,
        rate_limit=False,
        explain_target=Explain(proc_pid=None),
    )
    if "state_dir" in cfg.explicit:
        write_outcome(cfg.outcomes_dir, outcome_record(filed, duration=time.monotonic() - started, source="import"))
    return filed
