"""
CloudEvents for committed cores: one event per core to every sink the admin configured, at least once.

Contract:

- :func:`build_event` makes the event of a committed core from its stored metadata: type :data:`EVENT_TYPE`,
  ``source`` ``/coredump.example.io/nodes/<node>``, ``subject`` ``<namespace>/<pod>/<container>/<core-id>``,
  ``id`` a hash of the core's full place (the same for every sink, every retry and a core filed again after a
  crash of drain, so receivers de-duplicate on it), ``time`` the crash time, and ``data`` an allow-list of the
  metadata (no environment, labels or annotations; never core bytes) plus the API path that downloads the core.
- :meth:`Notifier.enqueue` runs in the agent's outcome pass, never in the handler: the crashing process is not
  held a moment longer for delivery. It writes the event durably to each interested sink's queue in the
  :class:`~handler.agent.outbox.Outbox` before returning.
- :meth:`Notifier.run` delivers: one worker per sink takes its queue oldest first, removes an entry only after a
  2xx, retries everything else but a definite refusal (400, 413, 415, 422: counted as rejected) with exponential
  backoff and jitter, and logs one line per change of failure class, not per retry.
- Namespace decisions are taken at send time from the namespace object (cached): a namespace annotated
  ``coredump.example.io/events: "false"`` gets no events, and a sink's ``namespaceSelector`` matches its labels.
  When the namespace cannot be read the entry waits (opting out must hold even while the API is away).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
from cloudevents.core.bindings.http import to_binary_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent

from handler import layout
from handler.agent.outbox import Entry, Outbox
from handler.agent.sinks import OPT_OUT_ANNOTATION, Sink, SinksFile

logger = logging.getLogger(__name__)

EVENT_TYPE = "io.example.coredump.core.created"
API_PREFIX = "/apis/coredump.example.io/v1alpha1"
# Metadata keys an event carries; everything else of the metadata stays on storage.
DATA_KEYS = (
    "coreID",
    "namespace",
    "pod",
    "podUID",
    "container",
    "containerID",
    "node",
    "image",
    "imageDigest",
    "pid",
    "signal",
    "signalName",
    "comm",
    "exe",
    "buildID",
    "timestamp",
    "size",
    "storedSize",
    "digest",
    "sha256",
    "truncated",
    "truncationReason",
    "signature",
    "frames",
    "backtrace",
)
# A backtrace bigger than this is left out of the event (the dump and the API have it).
MAX_DATA_BYTES = 64 * 1024
REJECTED_CODES = frozenset({400, 413, 415, 422})
NAMESPACE_CACHE_SECONDS = 30.0


class NamespaceUnknown(Exception):
    """The namespace's labels and annotations could not be read now."""


class NamespaceGone(Exception):
    """The namespace does not exist (404): its events have nobody to reach and are dropped."""


class NamespaceInfo(Protocol):
    async def get(self, namespace: str) -> tuple[Mapping[str, str], Mapping[str, str]]:
        """(labels, annotations) of a namespace; :class:`NamespaceGone` for a 404, :class:`NamespaceUnknown` when
        it cannot be read now."""
        ...


def event_id(*, namespace: str, pod: str, pod_uid: str, container: str, core_id: str) -> str:
    """The stable id of a core's event (32 hex digits)."""
    place = "/".join((namespace, pod, pod_uid, container, core_id))
    return hashlib.sha256(place.encode()).hexdigest()[:32]


def dump_path(*, namespace: str, pod: str, container: str, core_id: str) -> str:
    """The API path that downloads exactly this core (through kube-apiserver, under RBAC)."""
    return (
        f"{API_PREFIX}/namespaces/{namespace}/coredumpendpoints/{pod}/dump"
        f"?container={quote(container)}&core={quote(core_id)}"
    )


def _crash_time(meta: Mapping[str, Any], core_id: str) -> str:
    ts = meta.get("timestamp")
    if isinstance(ts, str):
        try:
            datetime.fromisoformat(ts.replace("Z", "+00:00"))
            return ts
        except ValueError:
            pass
    return layout.rfc3339(layout.core_id_time(core_id))


def build_event(core: layout.StoredCore, *, node: str | None) -> dict[str, Any]:
    """The stored form of a core's event: ``{"attributes": {...}, "data": {...}}`` (time as RFC 3339)."""
    ref = core.ref
    data: dict[str, Any] = {k: core.metadata[k] for k in DATA_KEYS if k in core.metadata}
    # The place comes from the validated path, never from the metadata a node wrote.
    data.update(coreID=ref.core_id, namespace=ref.namespace, pod=ref.pod, podUID=ref.pod_uid, container=ref.container)
    data["dumpPath"] = dump_path(namespace=ref.namespace, pod=ref.pod, container=ref.container, core_id=ref.core_id)
    data["endpointPath"] = f"{API_PREFIX}/namespaces/{ref.namespace}/coredumpendpoints/{ref.pod}"
    if len(repr(data)) > MAX_DATA_BYTES:
        for key in ("backtrace", "frames"):
            if data.pop(key, None) is not None:
                data["backtraceOmitted"] = True
    source_node = node or "unknown"
    attributes = {
        "id": event_id(
            namespace=ref.namespace, pod=ref.pod, pod_uid=ref.pod_uid, container=ref.container, core_id=ref.core_id
        ),
        "source": f"/coredump.example.io/nodes/{source_node}",
        "type": EVENT_TYPE,
        "subject": f"{ref.namespace}/{ref.pod}/{ref.container}/{ref.core_id}",
        "time": _crash_time(core.metadata, ref.core_id),
        "datacontenttype": "application/json",
        # Extension attributes, so brokers can filter without reading data (Knative Trigger filters).
        "namespace": ref.namespace,
        "pod": ref.pod,
    }
    return {"attributes": attributes, "data": data}


def to_cloudevent(stored: Mapping[str, Any]) -> CloudEvent:
    """The SDK's event from the stored form (raises ValueError-like errors of the SDK for a bad one)."""
    attributes = dict(stored["attributes"])
    attributes["time"] = datetime.fromisoformat(str(attributes["time"]).replace("Z", "+00:00"))
    if attributes["time"].tzinfo is None:
        attributes["time"] = attributes["time"].replace(tzinfo=timezone.utc)
    return CloudEvent(attributes=attributes, data=stored.get("data"))


def encode(stored: Mapping[str, Any], *, mode: str) -> tuple[dict[str, str], bytes]:
    """HTTP headers and body of an event in ``binary`` or ``structured`` content mode (CloudEvents HTTP binding)."""
    event = to_cloudevent(stored)
    message = to_binary_event(event) if mode == "binary" else to_structured_event(event)
    return dict(message.headers), message.body


def find_core(root: Path, rec: Mapping[str, Any]) -> layout.StoredCore | None:
    """The committed core an outcome record names, read from storage (blocking)."""
    try:
        cores = layout.list_cores(
            root,
            namespace=str(rec["namespace"]),
            pod=str(rec["pod"]),
            pod_uid=str(rec["podUID"]),
            container=str(rec["container"]),
        )
    except (KeyError, layout.InvalidName):
        return None
    return next((c for c in cores if c.ref.core_id == rec.get("coreID")), None)


class KubeNamespaces:
    """Namespace labels and annotations through kubernetes-asyncio, cached :data:`NAMESPACE_CACHE_SECONDS`."""

    def __init__(self, *, kubeconfig: str | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.kubeconfig = kubeconfig
        self.clock = clock
        self._cache: dict[str, tuple[float, tuple[dict[str, str], dict[str, str]]]] = {}
        self._client: Any = None
        self._api: Any = None

    async def _core_api(self) -> Any:
        if self._api is None:
            from kubernetes_asyncio import client, config

            cfg = client.Configuration()
            if self.kubeconfig:
                await config.load_kube_config(config_file=self.kubeconfig, client_configuration=cfg)
            else:
                config.load_incluster_config(client_configuration=cfg)
            self._client = client.ApiClient(configuration=cfg)
            self._api = client.CoreV1Api(self._client)
        return self._api

    async def get(self, namespace: str) -> tuple[Mapping[str, str], Mapping[str, str]]:
        hit = self._cache.get(namespace)
        now = self.clock()
        if hit is not None and now - hit[0] < NAMESPACE_CACHE_SECONDS:
            return hit[1]
        try:
            api = await self._core_api()
            ns = await api.read_namespace(name=namespace)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # any failure to read means "not known now", never "allowed"
            if getattr(e, "status", None) == 404:
                raise NamespaceGone(namespace) from None
            raise NamespaceUnknown(f"cannot read namespace {namespace}: {e}") from None
        meta = ns.metadata
        labels = {str(k): str(v) for k, v in (meta.labels or {}).items()}
        annotations = {str(k): str(v) for k, v in (meta.annotations or {}).items()}
        self._cache[namespace] = (now, (labels, annotations))
        return labels, annotations

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = self._api = None


def _failure_class(error: BaseException | int) -> str:
    if isinstance(error, int):
        return f"HTTP {error // 100}xx" if error >= 500 else f"HTTP {error}"
    if isinstance(error, (aiohttp.ClientSSLError, ssl.SSLError)):
        return "TLS"
    if isinstance(error, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return "timeout"
    if isinstance(error, aiohttp.ClientConnectionError):
        return "connection"
    if isinstance(error, OSError):
        return "local file"
    return type(error).__name__


class Metrics(Protocol):
    def inc(self, name: str, value: float = 1, **labels: str) -> None: ...

    def set(self, name: str, value: float, **labels: str) -> None: ...


class Notifier:
    """Queues events of committed cores and delivers them; see the module docstring for the contract."""

    def __init__(
        self,
        *,
        sinks: SinksFile,
        outbox: Outbox,
        storage_root: Path,
        node: str | None,
        namespaces: NamespaceInfo,
        metrics: Metrics,
        backoff_base: float = 1.0,
        backoff_max: float = 300.0,
        poll_interval: float = 1.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.sinks = sinks
        self.outbox = outbox
        self.storage_root = Path(storage_root)
        self.node = node
        self.namespaces = namespaces
        self.metrics = metrics
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.poll_interval = poll_interval
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._wake = asyncio.Event()
        self._workers: dict[str, tuple[Sink, asyncio.Task[None]]] = {}
        self._last_failure: dict[str, str] = {}
        self._sink_wake: dict[str, asyncio.Event] = {}

    async def enqueue(self, rec: Mapping[str, Any]) -> int:
        """Queue the event of the core an outcome record names for each sink that wants it; returns the count."""
        sinks = (await asyncio.to_thread(self.sinks.refresh)).sinks
        if not sinks:
            return 0
        core = await asyncio.to_thread(find_core, self.storage_root, rec)
        if core is None:
            logger.warning(
                "no committed core %s/%s %s to announce (removed already?)",
                rec.get("namespace"),
                rec.get("pod"),
                rec.get("coreID"),
                extra={"namespace": rec.get("namespace"), "pod": rec.get("pod"), "core": rec.get("coreID")},
            )
            return 0
        stored = build_event(core, node=self.node)
        signal = stored["data"].get("signal")
        queued = 0
        for sink in sinks:
            # Cheap filters now; the namespace's own (opt-out, selector) at send time.
            if sink.namespaces is not None and core.ref.namespace not in sink.namespaces:
                continue
            if sink.signals is not None and signal not in sink.signals:
                continue
            dropped = await asyncio.to_thread(
                self.outbox.put, sink.name, event_id=stored["attributes"]["id"], event=stored
            )
            if dropped:
                self.metrics.inc("coredump_cloudevents_dropped_total", dropped, sink=sink.name, reason="outbox-full")
            queued += 1
            self._sink_wake.setdefault(sink.name, asyncio.Event()).set()
        self._wake.set()
        return queued

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop`` is set: keeps one worker per configured sink."""
        removed = await asyncio.to_thread(self.outbox.sweep)
        if removed:
            logger.info("outbox: removed %d temporary files of interrupted writes", removed)
        try:
            while not stop.is_set():
                await self._reconcile_workers()
                await self._update_gauges()
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=self.poll_interval)
                except asyncio.TimeoutError:
                    pass
        finally:
            for _, task in self._workers.values():
                task.cancel()
            await asyncio.gather(*(t for _, t in self._workers.values()), return_exceptions=True)
            self._workers.clear()

    async def _reconcile_workers(self) -> None:
        configured = (await asyncio.to_thread(self.sinks.refresh)).by_name()
        for name, (sink, task) in list(self._workers.items()):
            if configured.get(name) != sink or task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                del self._workers[name]
        for name, sink in configured.items():
            if name not in self._workers:
                self._workers[name] = (sink, asyncio.create_task(self._deliver(sink), name=f"cloudevents-{name}"))
        for name in await asyncio.to_thread(self.outbox.sinks):
            if name not in configured:
                n = await asyncio.to_thread(self.outbox.drop_queue, name)
                if n:
                    logger.warning(
                        "dropped %d queued events of sink %s, which is no longer configured",
                        n,
                        name,
                        extra={"sink": name, "dropped": n},
                    )
                    self.metrics.inc("coredump_cloudevents_dropped_total", n, sink=name, reason="sink-removed")
                self.metrics.set("coredump_cloudevents_outbox_events", 0, sink=name)
                self.metrics.set("coredump_cloudevents_outbox_bytes", 0, sink=name)

    async def _update_gauges(self) -> None:
        for name in list(self._workers):
            events, size = await asyncio.to_thread(self.outbox.size, name)
            self.metrics.set("coredump_cloudevents_outbox_events", events, sink=name)
            self.metrics.set("coredump_cloudevents_outbox_bytes", size, sink=name)

    async def _idle(self, sink: str) -> None:
        """Wait for an enqueue (or the poll interval: another process may have queued)."""
        wake = self._sink_wake.setdefault(sink, asyncio.Event())
        try:
            await asyncio.wait_for(wake.wait(), timeout=self.poll_interval)
        except asyncio.TimeoutError:
            pass
        wake.clear()

    def _delay(self, failures: int) -> float:
        """Exponential backoff with jitter: half fixed, half random, capped at ``backoff_max``."""
        d = min(self.backoff_max, self.backoff_base * (2 ** min(failures - 1, 30)))
        return d / 2 + self._rng.uniform(0, d / 2)

    async def _deliver(self, sink: Sink) -> None:
        ssl_ctx: ssl.SSLContext | bool = True
        if sink.ca_file is not None:
            ssl_ctx = await asyncio.to_thread(ssl.create_default_context, cafile=str(sink.ca_file))
        timeout = aiohttp.ClientTimeout(total=sink.timeout)
        failures = 0
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                entries = await asyncio.to_thread(self.outbox.entries, sink.name)
                if not entries:
                    await self._idle(sink.name)
                    continue
                for entry in entries:
                    outcome = await self._one(session, sink, entry, ssl_ctx)
                    if outcome is None:  # done with this entry (sent, filtered or rejected)
                        failures = 0
                        continue
                    failures += 1
                    self.metrics.inc("coredump_cloudevents_retries_total", sink=sink.name)
                    self._note_failure(sink, outcome, failures)
                    await self._sleep(self._delay(failures))
                    break

    async def _one(
        self, session: aiohttp.ClientSession, sink: Sink, entry: Entry, ssl_ctx: ssl.SSLContext | bool
    ) -> str | None:
        """Try one entry: ``None`` when it left the queue, else the failure class (it stays)."""
        stored = await asyncio.to_thread(self.outbox.read, entry)
        if stored is None:
            return None
        attrs = stored["attributes"]
        namespace = str(attrs.get("namespace", ""))
        try:
            labels, annotations = await self.namespaces.get(namespace)
        except NamespaceUnknown as e:
            return f"namespace lookup ({e})"
        except NamespaceGone:
            await asyncio.to_thread(self.outbox.remove, entry)
            self.metrics.inc("coredump_cloudevents_dropped_total", sink=sink.name, reason="namespace-gone")
            return None
        raw = stored.get("data")
        data: dict[str, Any] = raw if isinstance(raw, dict) else {}
        signal = data.get("signal") if isinstance(data.get("signal"), int) else None
        if annotations.get(OPT_OUT_ANNOTATION) == "false" or not sink.wants(
            namespace=namespace, signal=signal, labels=labels
        ):
            await asyncio.to_thread(self.outbox.remove, entry)
            self.metrics.inc("coredump_cloudevents_filtered_total", sink=sink.name)
            return None
        try:
            headers, body = encode(stored, mode=sink.mode)
        except Exception as e:  # a stored event the SDK refuses can never be sent
            logger.error("dropping event %s for %s: not a valid CloudEvent: %s", entry.event_id, sink.name, e)
            await asyncio.to_thread(self.outbox.remove, entry)
            self.metrics.inc("coredump_cloudevents_dropped_total", sink=sink.name, reason="invalid")
            return None
        if sink.token_file is not None:
            try:
                token = (await asyncio.to_thread(sink.token_file.read_text)).strip()
            except OSError as e:
                return _failure_class(e) + f" ({sink.token_file})"
            headers["Authorization"] = f"Bearer {token}"
        try:
            async with session.post(sink.url, data=body, headers=headers, ssl=ssl_ctx, allow_redirects=False) as resp:
                await resp.read()
                status = resp.status
        except asyncio.CancelledError:
            raise
        except Exception as e:  # every transport failure is a retry
            return _failure_class(e)
        if 200 <= status < 300:
            await asyncio.to_thread(self.outbox.remove, entry)
            self.metrics.inc("coredump_cloudevents_sent_total", sink=sink.name)
            if sink.name in self._last_failure:
                logger.info("sink %s accepts events again", sink.name, extra={"sink": sink.name})
                del self._last_failure[sink.name]
            return None
        if status in REJECTED_CODES:
            logger.error(
                "sink %s refused event %s with HTTP %d; dropped",
                sink.name,
                entry.event_id,
                status,
                extra={"sink": sink.name, "event": entry.event_id, "status": status},
            )
            await asyncio.to_thread(self.outbox.remove, entry)
            self.metrics.inc("coredump_cloudevents_dropped_total", sink=sink.name, reason="rejected")
            return None
        return _failure_class(status)

    def _note_failure(self, sink: Sink, failure: str, failures: int) -> None:
        """One log line per change of failure class, not one per retry."""
        if self._last_failure.get(sink.name) != failure:
            self._last_failure[sink.name] = failure
            logger.warning(
                "sink %s: delivery failing (%s); events stay queued and are retried with backoff",
                sink.name,
                failure,
                extra={"sink": sink.name, "failure": failure, "attempt": failures},
            )
