"""
The agent's main loop: install, then keep core_pattern ours, account outcomes, post Events, drain, apply retention.

All filesystem work runs in threads (``asyncio.to_thread``): storage may be a slow network filesystem and the
metrics endpoint must keep answering. On SIGTERM the agent unpublishes its pid (the shim then spools) and
leaves core_pattern pointing at the shim: the next agent of a rolling update takes over from there.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from aiohttp import web

from handler import drain as drain_mod
from handler import spool as spool_mod
from handler.agent import install, retention, sysctl
from handler.agent.config import AgentConfig
from handler.agent.events import EventPoster
from handler.agent.metrics import Metrics, make_app
from handler.agent.notify import KubeNamespaces, NamespaceInfo, Notifier
from handler.agent.outbox import Outbox
from handler.agent.sinks import SinksFile
from handler.outcome import read_outcomes

logger = logging.getLogger(__name__)

EVENT_RESULTS = ("stored", "drained")
EVENT_ATTEMPTS = 3


class Agent:
    def __init__(
        self, cfg: AgentConfig, *, poster: EventPoster | None = None, namespaces: NamespaceInfo | None = None
    ) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.poster = (
            poster
            if poster is not None
            else (EventPoster(kubeconfig=cfg.kubeconfig, node=cfg.node) if cfg.events else None)
        )
        self.notifier: Notifier | None = None
        if cfg.event_sinks_file is not None:
            self._namespaces = namespaces or KubeNamespaces(kubeconfig=cfg.kubeconfig)
            self.notifier = Notifier(
                sinks=SinksFile(cfg.event_sinks_file),
                outbox=Outbox(cfg.outbox_dir, max_events=cfg.outbox_max_events, max_bytes=cfg.outbox_max_bytes),
                storage_root=cfg.storage_root,
                node=cfg.node,
                namespaces=self._namespaces,
                metrics=self.metrics,
            )
        # Outcome records already accounted whose CloudEvent could not be queued yet: retried, not re-counted.
        self._announce_pending: set[Path] = set()
        self._stop = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.metrics_port: int | None = None
        # Publishing runs in worker threads (setup, every core_pattern pass); once shutdown has unpublished,
        # a pass already in flight must not put the pid back.
        self._pid_lock = threading.Lock()
        self._pid_withdrawn = False

    def _publish_pid(self) -> None:
        with self._pid_lock:
            if not self._pid_withdrawn:
                install.publish_pid(self.cfg)

    def _unpublish_pid(self) -> None:
        with self._pid_lock:
            self._pid_withdrawn = True
            install.unpublish_pid(self.cfg)

    def setup(self) -> None:
        """Blocking: files on the host, then sysctls (core_pattern last, once the shim is there)."""
        install.install_files(self.cfg)
        self._publish_pid()
        sysctl.install(self.cfg)

    async def start_metrics(self) -> None:
        self._runner = web.AppRunner(make_app(self.metrics), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.cfg.metrics_bind_address, self.cfg.metrics_port)
        await site.start()
        addresses = self._runner.addresses
        if addresses:
            self.metrics_port = addresses[0][1]
        logger.info("metrics on %s:%s", self.cfg.metrics_bind_address, self.metrics_port)

    async def process_outcomes(self) -> int:
        records = await asyncio.to_thread(read_outcomes, self.cfg.handler.outcomes_dir)
        for path, rec in records:
            filed = rec.get("result") in EVENT_RESULTS and rec.get("kept") and rec.get("namespace") and rec.get("pod")
            if path not in self._announce_pending:
                self.metrics.account(rec)
                if self.poster is not None and filed:
                    await self._post_event(rec)
            if self.notifier is not None and filed and not await self._announce(path, rec):
                continue  # the record stays until its CloudEvent is safely in the outbox
            await asyncio.to_thread(_unlink, path)
        return len(records)

    async def _announce(self, path: Path, rec: dict[str, Any]) -> bool:
        """Queue the core's CloudEvent durably; False (record kept, retried next pass) when that fails."""
        assert self.notifier is not None
        try:
            await self.notifier.enqueue(rec)
        except asyncio.CancelledError:
            raise
        except (OSError, ValueError) as e:
            if path not in self._announce_pending:
                logger.error(
                    "cannot queue the CloudEvent of core %s: %s; retrying",
                    rec.get("coreID"),
                    e,
                    extra={"namespace": rec.get("namespace"), "pod": rec.get("pod"), "core": rec.get("coreID")},
                )
            self._announce_pending.add(path)
            return False
        self._announce_pending.discard(path)
        return True

    async def _post_event(self, rec: dict[str, Any]) -> None:
        assert self.poster is not None
        for attempt in range(EVENT_ATTEMPTS):
            try:
                await self.poster.post(rec)
                self.metrics.inc("coredump_events_posted_total")
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the API may be away; the core is filed regardless
                logger.warning(
                    "posting event for %s/%s failed (attempt %d): %s",
                    rec.get("namespace"),
                    rec.get("pod"),
                    attempt + 1,
                    e,
                )
                await asyncio.sleep(0.2 * (attempt + 1))
        self.metrics.inc("coredump_event_errors_total")

    async def drain_once(self) -> drain_mod.DrainReport:
        report = await asyncio.to_thread(drain_mod.drain, self.cfg.handler)
        if report.drained or report.errors:
            logger.info("spool: drained %d, waiting %d, errors %d", report.drained, report.waiting, report.errors)
        entries = await asyncio.to_thread(spool_mod.list_entries, self.cfg.handler.spool_dir)
        self.metrics.set("coredump_spool_entries", len(entries))
        self.metrics.set(
            "coredump_spool_bytes", await asyncio.to_thread(spool_mod.spool_bytes, self.cfg.handler.spool_dir)
        )
        return report

    async def retention_once(self) -> retention.RetentionReport:
        report = await asyncio.to_thread(
            retention.apply,
            self.cfg.storage_root,
            max_age=self.cfg.max_age,
            max_namespace_bytes=self.cfg.max_namespace_bytes,
            core_digest=self.cfg.handler.core_digest,
        )
        self.metrics.inc("coredump_retention_deleted_total", report.deleted_age, reason="age")
        self.metrics.inc("coredump_retention_deleted_total", report.deleted_size, reason="namespace-bytes")
        self.metrics.clear("coredump_namespace_stored_bytes")
        for ns, b in report.namespace_bytes.items():
            self.metrics.set("coredump_namespace_stored_bytes", b, namespace=ns)
        return report

    async def enforce_once(self) -> bool:
        changed = await asyncio.to_thread(sysctl.enforce, self.cfg)
        if changed:
            self.metrics.inc("coredump_core_pattern_restored_total")
        # The pid file too: a previous agent's shutdown may have removed it after we wrote ours.
        await asyncio.to_thread(self._publish_pid)
        return changed

    async def _every(self, interval: float, fn, name: str) -> None:
        while not self._stop.is_set():
            try:
                await fn()
            except asyncio.CancelledError:
                raise
            except Exception:  # one failing pass must not stop the others
                logger.exception("%s pass failed", name)
                self.metrics.inc("coredump_handler_errors_total", source=name)
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=interval)
            except asyncio.TimeoutError:
                pass

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        # Signal handlers first: setup publishes our pid, and a SIGTERM from then on (a rollout can send
        # one at any moment) must be a clean stop, not the default action killing us mid-setup.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.stop)
            except (NotImplementedError, RuntimeError):
                pass
        await asyncio.to_thread(self.setup)
        await self.start_metrics()
        tasks = [
            asyncio.create_task(self._every(self.cfg.outcome_interval, self.process_outcomes, "outcomes")),
            asyncio.create_task(self._every(self.cfg.drain_interval, self.drain_once, "drain")),
            asyncio.create_task(self._every(self.cfg.watch_interval, self.enforce_once, "core_pattern")),
        ]
        if self.notifier is not None:
            tasks.append(asyncio.create_task(self.notifier.run(self._stop), name="cloudevents"))
        if self.cfg.max_age or self.cfg.max_namespace_bytes:
            tasks.append(
                asyncio.create_task(self._every(self.cfg.retention_interval, self.retention_once, "retention"))
            )
        if self.cfg.pod_records and self.cfg.node:
            tasks.append(asyncio.create_task(self._watch_pods(), name="pod-records"))
        logger.info("agent running; core_pattern %r", self.cfg.core_pattern)
        await self._stop.wait()
        await self.shutdown(tasks)

    async def _watch_pods(self) -> None:
        from handler.agent.pods import PodWatcher, kube_client

        try:
            api = await kube_client(self.cfg.kubeconfig)
        except Exception as e:  # cores are still filed, with less context
            logger.error("no API access for pod records: %s; cores carry no pod labels, owner or digest", e)
            return
        assert self.cfg.node is not None  # the task starts only with a node name
        try:
            await PodWatcher(api_client=api, node=self.cfg.node, state_dir=self.cfg.handler.state_dir).run()
        finally:
            await api.close()

    async def shutdown(self, tasks: list[asyncio.Task]) -> None:
        # Deliberately not restoring core_pattern: see the module docstring.
        await asyncio.to_thread(self._unpublish_pid)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self.process_outcomes()
        except Exception:
            logger.exception("last outcome pass failed")
        if self.poster is not None:
            await self.poster.close()
        if self.notifier is not None and isinstance(self._namespaces, KubeNamespaces):
            await self._namespaces.close()
        if self._runner is not None:
            await self._runner.cleanup()
        logger.info("agent stopped; core_pattern left on the shim, which spools until the next agent")


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def uninstall(cfg: AgentConfig) -> list[str]:
    """A real uninstall: the node's core_pattern and sysctls back, the shim and its settings gone."""
    notes = []
    sysctl.restore(cfg)
    install.uninstall_files(cfg)
    left = spool_mod.list_entries(cfg.handler.spool_dir)
    if left:
        notes.append(
            f"{len(left)} cores are still in the spool at {cfg.handler.spool_dir}; "
            f"file them with 'coredump-handler drain' before removing it"
        )
    return notes
