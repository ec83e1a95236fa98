"""
Filing one core: metadata per DESIGN §1, storage or spool, failover mid-stream, rate limit after commit.

Used by the kernel path (:mod:`handler.capture`), ``import`` and the spool drain alike, so every core is filed
the same way whatever way it came in.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal as signals
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handler import layout, ratelimit
from handler.config import HandlerConfig
from handler.ingest import IngestResult, ingest
from handler.resolve import PodIdentity
from handler.spool import SpoolEntry, SpoolWriter

logger = logging.getLogger(__name__)


def signal_name(sig: int) -> str | None:
    try:
        return signals.Signals(sig).name
    except ValueError:
        return None


def base_metadata(*, ident: PodIdentity | None, pid: int, sig: int, timestamp: float, comm: str | None,
                  exe: str | None, build_id: str | None, node: str | None) -> dict[str, Any]:
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
    }


def add_result(meta: dict[str, Any], result: IngestResult) -> dict[str, Any]:
    meta.update(size=result.size, observedSize=result.observed_size, sha256=result.sha256,
                truncated=result.truncated, truncationReason=result.truncation_reason)
    return meta


def storage_usable(root: Path, *, timeout: float) -> str | None:
    """None if the storage root can take a core now, else why not. A hung mount counts as unusable."""
    verdict: list[str | None] = []

    def probe() -> None:
        try:
            st = os.statvfs(root)
            if not os.path.isdir(root):
                verdict.append(f"{root} is not a directory")
            elif st.f_flag & os.ST_RDONLY or not os.access(root, os.W_OK):
                verdict.append(f"{root} is read-only")
            elif st.f_bavail * st.f_frsize < 1 << 20:
                verdict.append(f"{root} is full")
            else:
                verdict.append(None)
        except OSError as e:
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


@dataclass
class Filed:
    result: str                          # "stored" or "spooled"
    stored: layout.StoredCore | None
    spooled: SpoolEntry | None
    metadata: dict[str, Any]
    rate_limited: int = 0
    reason: str | None = None


def apply_rate_limit(cfg: HandlerConfig, stored: layout.StoredCore) -> tuple[int, bool]:
    """Record a committed core with the rate limiter; remove what falls out. Returns (removed, this one kept)."""
    ref = stored.ref
    decision = ratelimit.record(cfg.ratelimit_dir, key=f"{ref.namespace}/{ref.pod}/{ref.pod_uid}/{ref.container}",
                                core_id=ref.core_id, now=time.time(), first=cfg.rate_first,
                                latest=cfg.rate_latest, window=cfg.rate_window)
    removed = 0
    for core_id in decision.evict:
        victim = layout.CoreRef(namespace=ref.namespace, pod=ref.pod, pod_uid=ref.pod_uid,
                                container=ref.container, core_id=core_id)
        gone = layout.remove_core(layout.StoredCore(ref=victim, metadata={}, core_path=victim.core_path(cfg.storage_root),
                                                    meta_path=victim.meta_path(cfg.storage_root)))
        removed += 1
        logger.info("rate limit: removed core %s of %s/%s/%s (%s)", core_id, ref.namespace, ref.pod,
                    ref.container, "gone" if gone else "already gone")
    return removed, decision.keep


def file_core(cfg: HandlerConfig, *, chunks: Iterable[bytes], meta: dict[str, Any], core_id: str,
              ident: PodIdentity | None, spool_reason: str | None,
              stored_result: IngestResult | None = None, dropped: int = 0,
              truncation_reason: str | None = None) -> Filed:
    """
    Ingest ``chunks`` and commit them, to storage when ``ident`` is known and ``spool_reason`` is None,
    to the spool otherwise. With ``stored_result`` (spool drain) the chunks are already gzipped and are
    copied unchanged. ``dropped`` bytes the source already left out (the shim's maximum) make the core
    truncated, in the metadata that is committed.
    """
    def new_spool() -> SpoolWriter:
        return SpoolWriter(cfg.spool_dir, name=core_id)

    writer: layout.CoreWriter | SpoolWriter
    if ident is not None and spool_reason is None:
        writer = layout.CoreWriter(cfg.storage_root, namespace=ident.namespace, pod=ident.pod,
                                   pod_uid=ident.pod_uid, container=ident.container, core_id=core_id)
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
    try:
        if stored_result is not None:
            for chunk in chunks:
                sink.write(chunk)
            result = stored_result
        else:
            result = ingest(chunks, sink.write, max_size=cfg.max_core_size)
        if dropped or truncation_reason:
            result = dataclasses.replace(result, observed_size=result.observed_size + dropped, truncated=True,
                                         truncation_reason=truncation_reason
                                         or "spooled by the shim: larger than its maximum")
        add_result(meta, result)
        committed = sink.commit(meta)
    except BaseException:
        sink.abort()
        raise
    if isinstance(committed, layout.StoredCore):
        removed, kept = apply_rate_limit(cfg, committed)
        return Filed(result="stored", stored=committed if kept else None, spooled=None,
                     metadata=committed.metadata, rate_limited=removed)
    return Filed(result="spooled", stored=None, spooled=committed, metadata=meta, reason=sink.failover_reason)


def outcome_record(filed: Filed, *, duration: float, source: str) -> dict[str, Any]:
    m = filed.metadata
    return {
        "result": filed.result, "source": source, "duration": duration,
        "namespace": m.get("namespace"), "pod": m.get("pod"), "podUID": m.get("podUID"),
        "container": m.get("container"), "coreID": m.get("coreID"), "signal": m.get("signal"),
        "signalName": m.get("signalName"), "size": m.get("size"), "observedSize": m.get("observedSize"),
        "storedSize": (filed.stored.metadata.get("storedSize") if filed.stored else None),
        "truncated": m.get("truncated"), "rateLimited": filed.rate_limited, "kept": filed.stored is not None
        or filed.result == "spooled", "reason": filed.reason, "node": m.get("node"),
    }
