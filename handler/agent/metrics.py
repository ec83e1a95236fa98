"""
The agent's Prometheus metrics, on ``prometheus-client``: counters fed from the handler's outcome records.

:data:`HELP` names every metric with its kind and help text, :data:`LABELS` its label names; a metric used with
other labels is a programming error (``ValueError``), caught by the tests. Each :class:`Metrics` has its own
registry, so agents in one test process do not share counts.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

HELP = {
    "coredump_cores_captured_total": ("counter", "Cores filed on storage (kernel, import or drained from the spool)."),
    "coredump_core_bytes_total": ("counter", "Uncompressed bytes the kernel sent for captured cores."),
    "coredump_core_stored_bytes_total": ("counter", "Compressed bytes written to storage."),
    "coredump_cores_truncated_total": ("counter", "Cores kept truncated at the maximum size."),
    "coredump_cores_rate_limited_total": ("counter", "Cores removed by the per-container rate limit."),
    "coredump_cores_spooled_total": ("counter", "Cores sent to the node spool (storage unusable, names unknown)."),
    "coredump_cores_forwarded_total": ("counter", "Cores of non-pod processes handed to the previous core_pattern."),
    "coredump_cores_dropped_total": ("counter", "Cores deliberately not kept, by reason."),
    "coredump_handler_errors_total": ("counter", "Handler and drain failures."),
    "coredump_handler_duration_seconds": ("histogram", "Time the handler took per core."),
    "coredump_spool_entries": ("gauge", "Entries waiting in the spool."),
    "coredump_spool_bytes": ("gauge", "Bytes waiting in the spool."),
    "coredump_events_posted_total": ("counter", "CoreDumped Events posted."),
    "coredump_event_errors_total": ("counter", "CoreDumped Events that could not be posted."),
    "coredump_retention_deleted_total": ("counter", "Cores removed by retention, by reason."),
    "coredump_namespace_stored_bytes": ("gauge", "Stored bytes per namespace at the last retention pass."),
    "coredump_core_pattern_restored_total": ("counter", "Times core_pattern was found changed and put back."),
    "coredump_cloudevents_sent_total": ("counter", "CloudEvents a sink accepted (2xx), by sink."),
    "coredump_cloudevents_retries_total": ("counter", "Failed CloudEvents deliveries that will be retried, by sink."),
    "coredump_cloudevents_dropped_total": (
        "counter",
        "CloudEvents dropped, by sink and reason (outbox-full, rejected, invalid, sink-removed, namespace-gone).",
    ),
    "coredump_cloudevents_filtered_total": (
        "counter",
        "CloudEvents not sent because the namespace opted out or the sink's namespaceSelector did not match, by sink.",
    ),
    "coredump_cloudevents_outbox_events": ("gauge", "CloudEvents queued in the outbox, by sink."),
    "coredump_cloudevents_outbox_bytes": ("gauge", "Bytes of CloudEvents queued in the outbox, by sink."),
}

LABELS: dict[str, tuple[str, ...]] = {
    "coredump_cores_captured_total": ("source",),
    "coredump_cores_dropped_total": ("reason",),
    "coredump_handler_errors_total": ("source",),
    "coredump_retention_deleted_total": ("reason",),
    "coredump_namespace_stored_bytes": ("namespace",),
    "coredump_cloudevents_sent_total": ("sink",),
    "coredump_cloudevents_retries_total": ("sink",),
    "coredump_cloudevents_dropped_total": ("sink", "reason"),
    "coredump_cloudevents_filtered_total": ("sink",),
    "coredump_cloudevents_outbox_events": ("sink",),
    "coredump_cloudevents_outbox_bytes": ("sink",),
}


def _base(name: str, kind: str) -> str:
    """prometheus-client adds ``_total`` to a counter's name itself."""
    return name[: -len("_total")] if kind == "counter" and name.endswith("_total") else name


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._metrics: dict[str, Any] = {}
        for name, (kind, text) in HELP.items():
            labelnames = LABELS.get(name, ())
            if kind == "counter":
                m: Any = Counter(_base(name, kind), text, labelnames, registry=self.registry)
            elif kind == "gauge":
                m = Gauge(name, text, labelnames, registry=self.registry)
            else:
                m = Histogram(name, text, labelnames, buckets=DURATION_BUCKETS, registry=self.registry)
            self._metrics[name] = m

    def _child(self, name: str, labels: dict[str, str]) -> Any:
        m = self._metrics[name]
        want = LABELS.get(name, ())
        if set(labels) != set(want):
            raise ValueError(f"metric {name} takes labels {want}, not {tuple(sorted(labels))}")
        return m.labels(**labels) if want else m

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        if value:
            self._child(name, labels).inc(value)
        else:
            self._child(name, labels)  # the series exists from now on, at its current value

    def set(self, name: str, value: float, **labels: str) -> None:
        self._child(name, labels).set(value)

    def clear(self, name: str) -> None:
        """Forget every series of a labelled gauge (e.g. namespaces that no longer have cores)."""
        self._metrics[name].clear()

    def get(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def observe_duration(self, seconds: float) -> None:
        self._metrics["coredump_handler_duration_seconds"].observe(seconds)

    def account(self, rec: dict[str, Any]) -> None:
        """Fold one handler outcome record into the counters."""
        result = rec.get("result")
        if result in ("stored", "drained"):
            self.inc("coredump_cores_captured_total", source=str(rec.get("source", "kernel")))
            self.inc("coredump_core_bytes_total", rec.get("observedSize") or 0)
            self.inc("coredump_core_stored_bytes_total", rec.get("storedSize") or 0)
            if rec.get("truncated"):
                self.inc("coredump_cores_truncated_total")
        elif result == "spooled":
            self.inc("coredump_cores_spooled_total")
            if rec.get("truncated"):
                self.inc("coredump_cores_truncated_total")
        elif result == "forwarded":
            self.inc("coredump_cores_forwarded_total")
        elif result in ("dropped", "host"):
            self.inc("coredump_cores_dropped_total", reason=str(rec.get("reason") or result))
        elif result == "error":
            self.inc("coredump_handler_errors_total", source=str(rec.get("source", "kernel")))
        if rec.get("rateLimited"):
            self.inc("coredump_cores_rate_limited_total", rec["rateLimited"])
        if rec.get("duration") is not None and rec.get("source") in ("kernel", "import"):
            self.observe_duration(float(rec["duration"]))

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


def make_app(metrics: Metrics) -> web.Application:
    async def handle_metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST, "X-Content-Type-Options": "nosniff"}
        )

    async def handle_healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/healthz", handle_healthz)
    return app
