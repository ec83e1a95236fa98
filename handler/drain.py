"""
Draining the spool into storage: cores the handler spooled (storage away) and raw cores the shim spooled (agent away).

Storage is committed first and the spool entry removed after, so a crash in between files a core twice at
worst, never zero times. Entries that cannot be filed yet (storage still away, pod names not found) stay.
Raw cores of processes that turn out not to be in a pod move to ``<spool>/host/``: kept, logged, counted.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from handler import elfinfo, layout
from handler.config import HandlerConfig
from handler.filing import base_metadata, file_core, outcome_record, storage_usable
from handler.ingest import IngestResult, file_chunks
from handler.outcome import DRAINED, ERROR, write_outcome
from handler.resolve import PodIdentity, identity_from_cgroup_text, resolve_pod
from handler.spool import SpoolEntry, list_entries, read_shim_info

logger = logging.getLogger(__name__)

HOST_DIR = "host"


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
    ident = resolve_pod(proc_root=cfg.proc_root, host_root=cfg.host_root, container_logs=cfg.container_logs,
                        pid=0, crictl=cfg.crictl, crictl_timeout=cfg.crictl_timeout, cgroup_text=cgroup_text,
                        runtime=cfg.runtime)
    return ident if isinstance(ident, PodIdentity) else None


def _drain_handler_entry(cfg: HandlerConfig, entry: SpoolEntry, report: DrainReport) -> None:
    meta: dict[str, Any] = json.loads(entry.meta_path.read_text())
    if meta.get("namespace") is None:
        ident = _resolve(cfg, meta.get("_cgroup"))
        if ident is None:
            report.waiting += 1
            report.reasons.append(f"{entry.name}: pod names still unknown")
            return
        meta.update(namespace=ident.namespace, pod=ident.pod, podUID=ident.pod_uid, container=ident.container,
                    containerID=ident.container_id, image=ident.image, imageDigest=ident.image_digest)
    else:
        ident = PodIdentity(namespace=meta["namespace"], pod=meta["pod"], pod_uid=meta["podUID"],
                            container=meta["container"], container_id=meta.get("containerID") or "")
    clean = {k: v for k, v in meta.items() if not k.startswith("_")}
    result = IngestResult(size=clean["size"], observed_size=clean["observedSize"], sha256=clean["sha256"],
                          truncated=clean["truncated"], truncation_reason=clean["truncationReason"])
    core_id = layout.make_core_id(timestamp=_timestamp(clean), comm=clean.get("comm"), pid=clean.get("pid") or 0,
                                  signal=clean.get("signal") or 0)
    started = time.monotonic()
    filed = file_core(cfg, chunks=file_chunks(entry.data_path), meta=clean, core_id=core_id, ident=ident,
                      spool_reason=None, stored_result=result)
    _finish(cfg, entry, filed, started, report)


def _timestamp(meta: dict[str, Any]) -> float:
    try:
        return datetime.strptime(meta["timestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    except (KeyError, TypeError, ValueError):
        return time.time()


def _drain_shim_entry(cfg: HandlerConfig, entry: SpoolEntry, report: DrainReport) -> None:
    info = read_shim_info(entry.meta_path)
    cg = identity_from_cgroup_text(info.get("cgroup", ""))
    if cg is None:
        host = cfg.spool_dir / HOST_DIR
        host.mkdir(parents=True, exist_ok=True)
        os.rename(entry.data_path, host / entry.data_path.name)
        os.rename(entry.meta_path, host / entry.meta_path.name)
        logger.warning("spooled core %s is not from a pod; kept in %s", entry.name, host)
        write_outcome(cfg.outcomes_dir, {"result": "host", "source": "shim-spool", "reason": "not in a pod",
                                         "pid": int(info.get("pid") or 0)})
        report.host += 1
        return
    ident = _resolve(cfg, info.get("cgroup"))
    if ident is None:
        report.waiting += 1
        report.reasons.append(f"{entry.name}: pod names still unknown (pod uid {cg.pod_uid})")
        return
    pid, sig = int(info.get("pid") or 0), int(info.get("signal") or 0)
    ts = float(info.get("time") or entry.data_path.stat().st_mtime)
    comm = info.get("comm")
    meta = base_metadata(ident=ident, pid=pid, sig=sig, timestamp=ts, comm=comm, exe=None,
                         build_id=elfinfo.build_id_from_core(entry.data_path), node=cfg.node)
    core_id = layout.make_core_id(timestamp=ts, comm=comm, pid=pid, signal=sig)
    started = time.monotonic()
    # ``rest``: bytes past the shim's maximum, counted but not kept.
    filed = file_core(cfg, chunks=file_chunks(entry.data_path, chunk_size=cfg.chunk_size), meta=meta,
                      core_id=core_id, ident=ident, spool_reason=None, dropped=int(info.get("rest") or 0))
    _finish(cfg, entry, filed, started, report)


def _finish(cfg: HandlerConfig, entry: SpoolEntry, filed, started: float, report: DrainReport) -> None:
    if filed.result != "stored":
        # Storage went away again while draining: the new spool copy replaces this entry.
        entry.remove()
        report.waiting += 1
        return
    entry.remove()
    report.drained += 1
    rec = outcome_record(filed, duration=time.monotonic() - started, source=f"{entry.kind}-spool")
    rec["result"] = DRAINED
    write_outcome(cfg.outcomes_dir, rec)


def drain(cfg: HandlerConfig) -> DrainReport:
    """File every committed spool entry that can be filed now."""
    report = DrainReport()
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
        except (OSError, ValueError, KeyError, layout.InvalidName) as e:
            why = f"metadata has no {e}" if isinstance(e, KeyError) else str(e)
            report.errors += 1
            report.reasons.append(f"{entry.name}: {why} (left in the spool)")
            logger.error("cannot drain spool entry %s: %s; left in the spool", entry.name, why)
            write_outcome(cfg.outcomes_dir, {"result": ERROR, "source": "drain", "reason": why})
    return report
