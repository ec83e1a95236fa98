"""
The agent's Prometheus metrics: counters fed from the handler's outcome records, served as plain text.

No client library: the text exposition format is a few lines, and the agent has one process.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from aiohttp import web

logger = logging.getLogger(__name__)

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
    "coredump_cloudevents_dropped_total": ("counter", "CloudEvents dropped, by sink and reason (outbox-full, "
                                                      "rejected, invalid, sink-removed, namespace-gone)."),
    "coredump_cloudevents_filtered_total": ("counter", "CloudEvents not sent because the namespace opted out or "
                                                       "the sink's namespaceSelector did not match, by sink."),
    "coredump_cloudevents_outbox_events": ("gauge", "CloudEvents queued in the outbox, by sink."),
    "coredump_cloudevents_outbox_bytes": ("gauge", "Bytes of CloudEvents queued in the outbox, by sink."),
}


class Metrics:
    def __init__(self) -> None:
        self.values: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(lambda: defaultdict(float))
        self.buckets = [0] * len(DURATION_BUCKETS)
        self.duration_sum = 0.0
        self.duration_count = 0

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        self.values[name][tuple(sorted(labels.items()))] += value

    def set(self, name: str, value: float, **labels: str) -> None:
        self.values[name][tuple(sorted(labels.items()))] = value

    def get(self, name: str, **labels: str) -> float:
        return self.values.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def observe_duration(self, seconds: float) -> None:
        self.duration_sum += seconds
        self.duration_count += 1
        for i, b in enumerate(DURATION_BUCKETS):
            if seconds <= b:
                self.buckets[i] += 1

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

    def render(self) -> str:
        out = []
        for name, (kind, text) in HELP.items():
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")
            if kind == "histogram":
                for b, n in zip(DURATION_BUCKETS, self.buckets):
                    out.append(f'{name}_bucket{{le="{b}"}} {n}')
                out.append(f'{name}_bucket{{le="+Inf"}} {self.duration_count}')
                out.append(f"{name}_sum {self.duration_sum}")
                out.append(f"{name}_count {self.duration_count}")
                continue
            series = self.values.get(name) or ({(): 0.0} if kind == "counter" and name not in (
                "coredump_cores_dropped_total", "coredump_retention_deleted_total") and not name.startswith("coredump_cloudevents_") else {})
            for labels, v in sorted(series.items()):
                lab = ",".join(f'{k}="{_escape(val)}"' for k, val in labels)
                out.append(f"{name}{{{lab}}} {_num(v)}" if lab else f"{name} {_num(v)}")
        return "\n".join(out) + "\n"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(v)


def make_app(metrics: Metrics) -> web.Application:
    async def handle_metrics(request: web.Request) -> web.Response:
        return web.Response(text=metrics.render(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def handle_healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/healthz", handle_healthz)
    return app
