"""
Filing one core: metadata per the layout contract (handler.layout; README "Storage layout"), storage or
spool, failover mid-stream, rate limit after commit.

Used by the kernel path (:mod:`handler.capture`), ``import`` and the spool drain alike, so every core is filed
the same way whatever way it came in.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import signal as signals
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handler import digest, explain, layout, ratelimit, sparsecore
from handler.config import HandlerConfig
from handler.early import KILLED, STALLED
from handler.ingest import IngestResult, ingest
from handler.resolve import PodIdentity
from handler.spool import SpoolEntry, SpoolWriter

logger = logging.getLogger(__name__)


def signal_name(sig: int) -> str | None:
    try:
        return signals.Signals(sig).name
    except ValueError:
        return None


def base_metadata(
    *,
    ident: PodIdentity | None,
    pid: int,
    sig: int,
    timestamp: float,
    comm: str | None,
    exe: str | None,
    build_id: str | None,
    node: str | None,
    cmdline: str | None = None,
) -> dict[str, Any]:
    """Everything known before the bytes are read; sizes and digest are added after ingest."""
    return {
        "coreID": None,
        "namespace": ident.namespace if ident else None,
        "pod": ident.pod if ident else None,
        "podUID": ident.pod_uid if ident else None,
        "container": ident.container if ident else None,
        "containerID": ident.container_id if ident else None,
        "node": node,
        "image": ident.image if ident else None,
        "imageDigest": ident.image_digest if ident else None,
        "pid": pid,
        "signal": sig,
        "signalName": signal_name(sig),
        "comm": layout.sanitize_text(comm, max_len=64),
        "exe": layout.sanitize_text(exe),
        "buildID": build_id,
        "timestamp": layout.rfc3339(timestamp),
        "compression": "gzip",
        "labels": dict(ident.record.labels) if ident and ident.record else None,
        "annotations": dict(ident.record.annotations) if ident and ident.record else None,
        "owner": dict(ident.record.owner) if ident and ident.record and ident.record.owner else None,
        "cmdline": layout.sanitize_text(cmdline) if cmdline else None,
    }


def add_result(meta: dict[str, Any], result: IngestResult) -> dict[str, Any]:
    meta.update(
        size=result.size,
        observedSize=result.observed_size,
        **digest.metadata_fields(result.digest),
        truncated=result.truncated,
        truncationReason=result.truncation_reason,
    )
    return meta


def storage_usable(root: Path, *, timeout: float) -> str | None:
    """None if the storage root can take a core now, else why not. A hung mount counts as unusable."""
    verdict: list[str | None] = []

    def probe() -> None:
        try:
            st = os.statvfs(root)
            if not os.path.isdir(root):
                verdict.append(f"{root} is not a directory")
            elif st.f_flag & os.ST_RDONLY:
                verdict.append(f"{root} is read-only")
            elif st.f_bavail * st.f_frsize < 1 << 20:
                verdict.append(f"{root} is full")
            else:
                # A real create, not access(2): an NFS client answers access(2) from its access cache, which
                # kept saying "read-only" long after the export was writable again (seen in the VM suite).
                probe_path = os.path.join(root, f".probe-{os.getpid()}-{threading.get_ident()}")
                fd = os.open(probe_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                os.close(fd)
                os.unlink(probe_path)
                verdict.append(None)
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                verdict.append(f"{root} is read-only ({e.strerror})")
            else:
                verdict.append(f"{root}: {e.strerror or e}")

    t = threading.Thread(target=probe, name="storage-probe", daemon=True)
    t.start()
    t.join(timeout)
    if not verdict:
        return f"{root} did not answer within {timeout:g}s"
    return verdict[0]


class FailoverSink:
    """
    Writes to the storage writer; on the first storage error moves what was written to a spool writer and
    carries on there, so a storage that fills up or goes away mid-core loses nothing.
    """

    def __init__(self, writer: layout.CoreWriter | SpoolWriter, *, spool: Callable[[], SpoolWriter]) -> None:
        self.writer = writer
        self._spool = spool
        self.failover_reason: str | None = None
        # Bytes whose write completed: a failed write may have left part of its chunk in the file.
        self.written = 0

    @property
    def spooled(self) -> bool:
        return isinstance(self.writer, SpoolWriter)

    def write(self, data: bytes) -> None:
        try:
            self.writer.write(data)
        except OSError as e:
            if self.spooled:
                raise
            self._fail_over(e)
            self.writer.write(data)
        self.written += len(data)

    def _fail_over(self, err: OSError) -> None:
        old = self.writer
        assert isinstance(old, layout.CoreWriter)
        logger.error("storage failed mid-core (%s); moving the core to the spool", err)
        self.failover_reason = f"storage error: {err.strerror or err}"
        new = self._spool()
        partial = old.open_partial()
        if partial is not None:
            # What storage accepted so far is read back; if even that fails the core cannot be made whole.
            left = self.written
            with partial as f:
                while left and (chunk := f.read(min(1 << 20, left))):
                    new.write(chunk)
                    left -= len(chunk)
            if left:
                raise OSError(f"storage lost {left} bytes already written; the core cannot be moved whole")
        old.abort()
        self.writer = new

    def commit(self, meta: dict[str, Any]) -> layout.StoredCore | SpoolEntry:
        if not self.spooled:
            try:
                return self.writer.commit(meta)
            except OSError as e:
                self._fail_over(e)
        meta = dict(meta, _spoolReason=self.failover_reason)
        return self.writer.commit(meta)

    def abort(self) -> None:
        self.writer.abort()


# A stream cut by these is kept as a truncated core when its ELF header and notes arrived.
PARTIAL_REASONS = (STALLED, KILLED)


class PartialCoreLost(Exception):
    """The stream stopped before anything a debugger could use (the ELF header and notes) had arrived."""


@dataclass
class Filed:
    result: str  # "stored" or "spooled"
    stored: layout.StoredCore | None
    spooled: SpoolEntry | None
    metadata: dict[str, Any]
    rate_limited: int = 0
    reason: str | None = None


def rate_key(*, namespace: str, pod: str, pod_uid: str, container: str) -> str:
    return f"{namespace}/{pod}/{pod_uid}/{container}"


def reserve_rate_slot(cfg: HandlerConfig, *, ident: PodIdentity, core_id: str) -> ratelimit.Decision:
    """Ask the rate limiter before a byte is compressed whether this core is kept (kernel path)."""
    return ratelimit.record(
        cfg.ratelimit_dir,
        key=rate_key(namespace=ident.namespace, pod=ident.pod, pod_uid=ident.pod_uid, container=ident.container),
        core_id=core_id,
        now=time.time(),
        first=cfg.rate_first,
        latest=cfg.rate_latest,
        window=cfg.rate_window,
        latest_interval=cfg.rate_latest_interval,
    )


def _evict(cfg: HandlerConfig, ref: layout.CoreRef, core_ids: list[str]) -> int:
    removed = 0
    for core_id in core_ids:
        victim = layout.CoreRef(
            namespace=ref.namespace, pod=ref.pod, pod_uid=ref.pod_uid, container=ref.container, core_id=core_id
        )
        gone = layout.remove_core(
            layout.StoredCore(
                ref=victim,
                metadata={},
                core_path=victim.core_path(cfg.storage_root),
                meta_path=victim.meta_path(cfg.storage_root),
            )
        )
        removed += 1
        logger.info(
            "rate limit: removed core %s of %s/%s/%s (%s)",
            core_id,
            ref.namespace,
            ref.pod,
            ref.container,
            "gone" if gone else "already gone",
        )
    return removed


def apply_rate_limit(
    cfg: HandlerConfig,
    stored: layout.StoredCore,
    *,
    reserved: ratelimit.Decision | None = None,
    reserved_id: str | None = None,
) -> tuple[int, bool]:
    """
    Apply the rate limit to a committed core: the decision ``reserved`` before compression (kernel path),
    or one taken now (drain: the bytes are already compressed). Returns (cores removed, this one kept).
    """
    ref = stored.ref
    key = rate_key(namespace=ref.namespace, pod=ref.pod, pod_uid=ref.pod_uid, container=ref.container)
    if reserved is not None:
        ratelimit.rename(cfg.ratelimit_dir, key=key, old=reserved_id or ref.core_id, new=ref.core_id)
        return _evict(cfg, ref, reserved.evict), True
    decision = ratelimit.record(
        cfg.ratelimit_dir,
        key=key,
        core_id=ref.core_id,
        now=time.time(),
        first=cfg.rate_first,
        latest=cfg.rate_latest,
        window=cfg.rate_window,
    )
    victims = decision.evict + ([] if decision.keep else [ref.core_id])
    return _evict(cfg, ref, victims), decision.keep


@dataclass(frozen=True)
class Explain:
    """Explain the core after its commit (backtrace, objects): ``proc_pid`` while the process is held, or None."""

    proc_pid: Path | None


def _explain(cfg: HandlerConfig, stored: layout.StoredCore, sparse: Path, target: Explain) -> layout.StoredCore:
    """Add the backtrace and objects to a committed core; any failure leaves the core as it was committed."""
    try:
        extra = explain.explain(
            sparse=sparse,
            proc_pid=target.proc_pid,
            storage_root=cfg.storage_root,
            budget=explain.Budget(
                object_bytes=cfg.objects_max_bytes,
                object_seconds=cfg.objects_max_seconds,
                unwind_seconds=cfg.unwind_timeout,
            ),
        )
        return layout.amend_metadata(stored, extra)
    except Exception as e:  # the core is committed; explaining it is a bonus
        logger.error("core %s: no backtrace (%s)", stored.ref.core_id, e, extra={"core": stored.ref.core_id})
        return stored


def file_core(
    cfg: HandlerConfig,
    *,
    chunks: Iterable[bytes],
    meta: dict[str, Any],
    core_id: str,
    ident: PodIdentity | None,
    spool_reason: str | None,
    stored_result: IngestResult | None = None,
    dropped: int = 0,
    reserved: ratelimit.Decision | None = None,
    rate_limit: bool = True,
    explain_target: Explain | None = None,
    truncation_reason: str | None = None,
) -> Filed:
    """
    Ingest ``chunks`` and commit them, to storage when ``ident`` is known and ``spool_reason`` is None,
    to the spool otherwise. With ``stored_result`` (spool drain) the chunks are already gzipped and are
    copied unchanged. ``dropped`` bytes the source already left out (the shim's maximum) make the core
    truncated, in the metadata that is committed. ``reserved`` is the rate limiter's decision taken before
    compression (kernel path); without it a stored core is rate limited now, unless ``rate_limit`` is False
    (import: a person asked for this core).
    """

    def new_spool() -> SpoolWriter:
        return SpoolWriter(cfg.spool_dir, name=core_id)

    writer: layout.CoreWriter | SpoolWriter
    if ident is not None and spool_reason is None:
        writer = layout.CoreWriter(
            cfg.storage_root,
            namespace=ident.namespace,
            pod=ident.pod,
            pod_uid=ident.pod_uid,
            container=ident.container,
            core_id=core_id,
            node=cfg.node,
            heartbeat=cfg.heartbeat_interval,
        )
        try:
            writer.open()
        except OSError as e:
            spool_reason = f"storage error: {e.strerror or e}"
            logger.error("cannot write to storage (%s); spooling", e)
            writer = new_spool()
    else:
        writer = new_spool()
    sink = FailoverSink(writer, spool=new_spool)
    if spool_reason:
        sink.failover_reason = spool_reason
    scratch = None
    sparse: sparsecore.SparseCore | None = None
    if explain_target is not None and cfg.explain and stored_result is None and isinstance(writer, layout.CoreWriter):
        try:
            scratch = tempfile.TemporaryDirectory(prefix="coredump-explain-")
            sparse = sparsecore.SparseCore(Path(scratch.name) / f"{core_id}.sparse")
        except OSError as e:
            logger.warning("no sparse copy for a backtrace: %s", e)
            sparse = None
    try:
        return _file_core(
            cfg,
            chunks=chunks,
            meta=meta,
            core_id=core_id,
            sink=sink,
            stored_result=stored_result,
            dropped=dropped,
            reserved=reserved,
            rate_limit=rate_limit,
            sparse=sparse,
            explain_target=explain_target,
            truncation_reason=truncation_reason,
        )
    finally:
        if sparse is not None:
            sparse.abort()
        if scratch is not None:
            scratch.cleanup()


def _file_core(
    cfg: HandlerConfig,
    *,
    chunks: Iterable[bytes],
    meta: dict[str, Any],
    core_id: str,
    sink: FailoverSink,
    stored_result: IngestResult | None,
    dropped: int,
    reserved: ratelimit.Decision | None,
    rate_limit: bool,
    sparse: sparsecore.SparseCore | None,
    explain_target: Explain | None,
    truncation_reason: str | None = None,
) -> Filed:
    try:
        if stored_result is not None:
            for chunk in chunks:
                sink.write(chunk)
            result = stored_result
        else:
            result = ingest(
                chunks,
                sink.write,
                max_size=cfg.max_core_size,
                level=cfg.compress_level,
                algorithm=cfg.core_digest,
                tap=sparse.feed if sparse is not None else None,
            )
            if result.truncation_reason in PARTIAL_REASONS and not result.notes_complete:
                raise PartialCoreLost(
                    f"core {result.truncation_reason} after {result.observed_size} bytes, "
                    "before its ELF header and notes had arrived: nothing worth keeping"
                )
        if dropped or truncation_reason:
            result = dataclasses.replace(
                result,
                observed_size=result.observed_size + dropped,
                truncated=True,
                truncation_reason=truncation_reason or "spooled by the shim: larger than its maximum",
            )
        add_result(meta, result)
        committed = sink.commit(meta)
    except BaseException:
        sink.abort()
        if sparse is not None:
            sparse.abort()
        raise
    if isinstance(committed, layout.StoredCore):
        removed, kept = (
            apply_rate_limit(cfg, committed, reserved=reserved, reserved_id=core_id)
            if rate_limit or reserved is not None
            else (0, True)
        )
        if kept and sparse is not None and explain_target is not None:
            committed = _explain(cfg, committed, sparse.close(), explain_target)
        return Filed(
            result="stored",
            stored=committed if kept else None,
            spooled=None,
            metadata=committed.metadata,
            rate_limited=removed,
        )
    return Filed(result="spooled", stored=None, spooled=committed, metadata=meta, reason=sink.failover_reason)


def outcome_record(filed: Filed, *, duration: float, source: str) -> dict[str, Any]:
    m = filed.metadata
    return {
        "result": filed.result,
        "source": source,
        "duration": duration,
        "namespace": m.get("namespace"),
        "pod": m.get("pod"),
        "podUID": m.get("podUID"),
        "container": m.get("container"),
        "coreID": m.get("coreID"),
        "signal": m.get("signal"),
        "signalName": m.get("signalName"),
        "size": m.get("size"),
        "observedSize": m.get("observedSize"),
        "storedSize": (filed.stored.metadata.get("storedSize") if filed.stored else None),
        "truncated": m.get("truncated"),
        "exe": m.get("exe"),
        "topFrame": (m.get("topFrames") or [None])[0],
        "signature": m.get("signature"),
        "rateLimited": filed.rate_limited,
        "kept": filed.stored is not None or filed.result == "spooled",
        "reason": filed.reason,
        "node": m.get("node"),
    }
