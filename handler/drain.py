"""
Draining the spool into storage: cores the handler spooled (storage away) and raw cores the shim spooled (agent away).

Storage is committed first and the spool entry removed after, so a crash in between never files a core zero
times; and never twice either: every core filed from the spool carries the entry's stable key
(``spoolEntry``: node, kind and entry name) in its metadata, and before filing, the drain looks for a core of the
same base id with that key (committed, or incomplete: then its commit is completed) and only removes the entry
if it finds one. Entries that cannot be filed yet (storage still away, pod names not found) stay. Raw cores of
processes that turn out not to be in a pod move to ``<spool>/host/``: kept, logged, counted. A raw core the
shim could not spool whole carries ``truncated=<reason>`` in its ``.info`` and is filed truncated with that
reason. The shim's own failures (spool full before a byte was kept) are in the outcomes it writes itself.

Every file is reached through :mod:`handler.safefs` (never through a link in the spool).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from handler import digest, elfinfo, faults, layout, safefs
from handler.config import HandlerConfig
from handler.filing import base_metadata, file_core, outcome_record, storage_usable
from handler.ingest import IngestResult
from handler.outcome import DRAINED, ERROR, write_outcome
from handler.resolve import PodIdentity, identity_from_cgroup_text, resolve_pod
from handler.spool import SpoolEntry, list_entries, parse_shim_info, sweep_orphans

logger = logging.getLogger(__name__)

HOST_DIR = "host"
KEY_FIELD = "spoolEntry"


@dataclass
class DrainReport:
    drained: int = 0
    waiting: int = 0
    host: int = 0
    errors: int = 0
    reasons: list[str] = field(default_factory=list)


def _resolve(cfg: HandlerConfig, cgroup_text: str | None) -> PodIdentity | None:
    if not cgroup_text:
        return None
    ident = resolve_pod(cfg, pid=0, cgroup_text=cgroup_text, pod_records=False)
    return ident if isinstance(ident, PodIdentity) else None


def entry_key(cfg: HandlerConfig, entry: SpoolEntry) -> str:
    """The stable key of a spool entry: the same entry drained twice carries the same key."""
    return f"{cfg.node or ''}/{entry.kind}/{entry.name}"


class InFlight(Exception):
    """The entry's core is being committed by a writer that is still alive: neither file it again nor remove it."""


def _already_filed(cfg: HandlerConfig, entry: SpoolEntry, ident: PodIdentity, core_id: str) -> bool:
    try:
        found = layout.find_by_key(
            cfg.storage_root,
            namespace=ident.namespace,
            pod=ident.pod,
            pod_uid=ident.pod_uid,
            container=ident.container,
            core_id=core_id,
            key=entry_key(cfg, entry),
            key_field=KEY_FIELD,
        )
    except layout.WriteInFlight as e:
        raise InFlight(str(e)) from e
    if found is None:
        return False
    logger.warning(
        "spool entry %s was already filed as %s (a drain stopped before removing it); removing it",
        entry.name,
        found.ref.core_id,
    )
    return True


def _open_data(entry: SpoolEntry) -> safefs.ReadFile:
    data = entry.open_data()
    if data is None:
        raise FileNotFoundError(f"{entry.data_path} is gone (or not a regular file)")
    return data


def _drain_handler_entry(cfg: HandlerConfig, entry: SpoolEntry, report: DrainReport) -> None:
    raw = entry.read_meta()
    if raw is None:
        raise FileNotFoundError(f"{entry.meta_path} is gone (or not a regular file)")
    meta: dict[str, Any] = json.loads(raw)
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a JSON object")
    if meta.get("namespace") is None:
        ident = _resolve(cfg, meta.get("_cgroup"))
        if ident is None:
            report.waiting += 1
            report.reasons.append(f"{entry.name}: pod names still unknown")
            return
        meta.update(
            namespace=ident.namespace,
            pod=ident.pod,
            podUID=ident.pod_uid,
            container=ident.container,
            containerID=ident.container_id,
            image=ident.image,
            imageDigest=ident.image_digest,
        )
    else:
        ident = PodIdentity(
            namespace=meta["namespace"],
            pod=meta["pod"],
            pod_uid=meta["podUID"],
            container=meta["container"],
            container_id=meta.get("containerID") or "",
        )
    clean = {k: v for k, v in meta.items() if not k.startswith("_")}
    promised = digest.of_metadata(clean)  # a spool entry written before ``digest`` carries ``sha256`` alone
    if promised is None:
        raise ValueError("metadata has no digest of the core")
    result = IngestResult(
        size=clean["size"],
        observed_size=clean["observedSize"],
        digest=digest.format_digest(*promised),
        truncated=clean["truncated"],
        truncation_reason=clean["truncationReason"],
    )
    core_id = layout.make_core_id(
        timestamp=_timestamp(clean), comm=clean.get("comm"), pid=clean.get("pid") or 0, signal=clean.get("signal") or 0
    )
    if _already_filed(cfg, entry, ident, core_id):
        entry.remove()
        report.drained += 1
        return
    clean[KEY_FIELD] = entry_key(cfg, entry)
    started = time.monotonic()
    with _open_data(entry) as data:
        filed = file_core(
            cfg, chunks=data.chunks(), meta=clean, core_id=core_id, ident=ident, spool_reason=None, stored_result=result
        )
    _finish(cfg, entry, filed, started, report)


def _timestamp(meta: dict[str, Any]) -> float:
    try:
        return datetime.strptime(meta["timestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    except (KeyError, TypeError, ValueError):
        return time.time()


def _drain_shim_entry(cfg: HandlerConfig, entry: SpoolEntry, report: DrainReport) -> None:
    raw = entry.read_meta()
    if raw is None:
        raise FileNotFoundError(f"{entry.meta_path} is gone (or not a regular file)")
    info = parse_shim_info(raw.decode(errors="replace"))
    cg = identity_from_cgroup_text(info.get("cgroup", ""))
    if cg is None:
        host = cfg.spool_dir / HOST_DIR
        spool = safefs.open_root(cfg.spool_dir)
        if spool is None:
            raise FileNotFoundError(f"{cfg.spool_dir} is gone")
        with spool, spool.make_sub(HOST_DIR, mode=0o700) as host_dir:
            spool.rename(entry.data_path.name, entry.data_path.name, dst_dir=host_dir)
            spool.rename(entry.meta_path.name, entry.meta_path.name, dst_dir=host_dir)
        logger.warning("spooled core %s is not from a pod; kept in %s", entry.name, host)
        write_outcome(
            cfg.outcomes_dir,
            {"result": "host", "source": "shim-spool", "reason": "not in a pod", "pid": int(info.get("pid") or 0)},
        )
        report.host += 1
        return
    ident = _resolve(cfg, info.get("cgroup"))
    if ident is None:
        report.waiting += 1
        report.reasons.append(f"{entry.name}: pod names still unknown (pod uid {cg.pod_uid})")
        return
    pid, sig = int(info.get("pid") or 0), int(info.get("signal") or 0)
    comm = info.get("comm")
    with _open_data(entry) as data:
        ts = float(info.get("time") or data.st.st_mtime)
        core_id = layout.make_core_id(timestamp=ts, comm=comm, pid=pid, signal=sig)
        if _already_filed(cfg, entry, ident, core_id):
            entry.remove()
            report.drained += 1
            return
        # The descriptor opened safely, by its /proc name: the ELF reader never sees the spool's names.
        build_id = elfinfo.build_id_from_core(Path(f"/proc/self/fd/{data.fd}"))
        meta = base_metadata(
            ident=ident, pid=pid, sig=sig, timestamp=ts, comm=comm, exe=None, build_id=build_id, node=cfg.node
        )
        meta[KEY_FIELD] = entry_key(cfg, entry)
        started = time.monotonic()
        # ``rest``: bytes the shim did not keep (past its maximum, or after a failed write), counted not kept;
        # ``truncated``: why the shim could not keep them all.
        dropped = int(info.get("rest") or 0)
        why = info.get("truncated") or None
        if why is None and dropped:
            why = "spooled by the shim: larger than its maximum"
        filed = file_core(
            cfg,
            chunks=data.chunks(cfg.chunk_size),
            meta=meta,
            core_id=core_id,
            ident=ident,
            spool_reason=None,
            dropped=dropped,
            truncation_reason=why,
        )
    _finish(cfg, entry, filed, started, report)


def _finish(cfg: HandlerConfig, entry: SpoolEntry, filed, started: float, report: DrainReport) -> None:
    if filed.result != "stored":
        # Storage went away again while draining: the new spool copy replaces this entry.
        entry.remove()
        report.waiting += 1
        return
    faults.point("drain:filed")
    entry.remove()
    report.drained += 1
    rec = outcome_record(filed, duration=time.monotonic() - started, source=f"{entry.kind}-spool")
    rec["result"] = DRAINED
    write_outcome(cfg.outcomes_dir, rec)


def drain(cfg: HandlerConfig) -> DrainReport:
    """File every committed spool entry that can be filed now."""
    report = DrainReport()
    sweep_orphans(cfg.spool_dir)
    entries = list_entries(cfg.spool_dir)
    if not entries:
        return report
    why = storage_usable(cfg.storage_root, timeout=cfg.storage_timeout)
    if why:
        report.waiting = len(entries)
        report.reasons.append(why)
        return report
    for entry in entries:
        try:
            if entry.kind == "handler":
                _drain_handler_entry(cfg, entry, report)
            else:
                _drain_shim_entry(cfg, entry, report)
        except InFlight as e:
            report.waiting += 1
            report.reasons.append(f"{entry.name}: {e}")
        except (OSError, ValueError, KeyError, layout.InvalidName) as e:
            why = f"metadata has no {e}" if isinstance(e, KeyError) else str(e)
            report.errors += 1
            report.reasons.append(f"{entry.name}: {why} (left in the spool)")
            logger.error("cannot drain spool entry %s: %s; left in the spool", entry.name, why)
            write_outcome(cfg.outcomes_dir, {"result": ERROR, "source": "drain", "reason": why})
    return report
