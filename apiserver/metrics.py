"""
The API server's Prometheus metrics (``prometheus-client``), served on ``GET /metrics`` in the text format.

Names follow k8s.io/apiserver where it has one (``apiserver_request_total``,
``apiserver_request_duration_seconds``, ``apiserver_current_inflight_requests``,
``apiserver_longrunning_requests``, ``apiserver_delegated_authn_request_*``,
``apiserver_delegated_authz_request_*``, ``authentication_token_cache_request_total``,
``etcd_request_duration_seconds``), so dashboards written for aggregated API servers work; what only this
server has is prefixed ``coredump_``. Label values are bounded: verbs, resources and subresources outside
the fixed sets below are reported as ``other``, so no client can grow the series without limit.

All metrics live in :data:`REGISTRY` (not prometheus-client's global one), one per process.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from apiserver.api import resource as r
from apiserver.registry.store import ListPage, ObjectStore, ProgressRequests, StoreEvent

REGISTRY = CollectorRegistry(auto_describe=True)

_VERBS = frozenset(
    {
        "get",
        "list",
        "watch",
        "create",
        "update",
        "patch",
        "delete",
        "deletecollection",
        "head",
        "post",
        "put",
        "options",
    }
)
_RESOURCES = frozenset({r.PLURAL})
_SUBRESOURCES = frozenset({r.SUBRESOURCE_DUMP, "status"})
# Latency buckets of k8s.io/apiserver's request duration histogram (seconds), cut at one minute.
_REQUEST_BUCKETS = (
    0.005,
    0.025,
    0.05,
    0.1,
    0.2,
    0.4,
    0.6,
    0.8,
    1.0,
    1.25,
    1.5,
    2,
    3,
    4,
    5,
    6,
    8,
    10,
    15,
    20,
    30,
    45,
    60,
)
_WEBHOOK_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_DUMP_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

REQUESTS = Counter(
    "apiserver_request_total",
    "API requests by verb, resource, subresource and HTTP code.",
    ["verb", "resource", "subresource", "code"],
    registry=REGISTRY,
)
REQUEST_DURATION = Histogram(
    "apiserver_request_duration_seconds",
    "Time to answer an API request (for streams: until the stream ends).",
    ["verb", "resource", "subresource"],
    buckets=_REQUEST_BUCKETS,
    registry=REGISTRY,
)
INFLIGHT = Gauge(
    "apiserver_current_inflight_requests",
    "Requests being served now, counted against --max-requests-inflight (readOnly) and "
    "--max-mutating-requests-inflight (mutating).",
    ["request_kind"],
    registry=REGISTRY,
)
DROPPED = Counter(
    "apiserver_dropped_requests_total",
    "Requests answered 429 because the in-flight limit was reached.",
    ["request_kind"],
    registry=REGISTRY,
)
LONGRUNNING = Gauge(
    "apiserver_longrunning_requests",
    "Open long-running requests (watches, dumps).",
    ["verb", "resource", "subresource"],
    registry=REGISTRY,
)

OPEN_CONNECTIONS = Gauge(
    "coredump_apiserver_open_connections", "Client connections open now (after TLS).", registry=REGISTRY
)
CLOSED_CONNECTIONS = Counter(
    "coredump_apiserver_closed_connections_total",
    "Connections the server closed on its own: over --max-connections, or a request "
    "header not complete within --read-header-timeout.",
    ["reason"],
    registry=REGISTRY,
)

AUTHN_REQUESTS = Counter(
    "apiserver_delegated_authn_request_total",
    "TokenReviews sent, by HTTP code ('error': no answer, 'malformed': an answer that is not a TokenReview).",
    ["code"],
    registry=REGISTRY,
)
AUTHN_DURATION = Histogram(
    "apiserver_delegated_authn_request_duration_seconds",
    "TokenReview latency.",
    ["code"],
    buckets=_WEBHOOK_BUCKETS,
    registry=REGISTRY,
)
AUTHZ_REQUESTS = Counter(
    "apiserver_delegated_authz_request_total",
    "SubjectAccessReviews sent, by HTTP code "
    "('error': no answer, 'malformed': an answer that is not a SubjectAccessReview).",
    ["code"],
    registry=REGISTRY,
)
AUTHZ_DURATION = Histogram(
    "apiserver_delegated_authz_request_duration_seconds",
    "SubjectAccessReview latency.",
    ["code"],
    buckets=_WEBHOOK_BUCKETS,
    registry=REGISTRY,
)
TOKEN_CACHE = Counter(
    "authentication_token_cache_request_total", "TokenReview cache lookups.", ["status"], registry=REGISTRY
)
AUTHZ_CACHE = Counter(
    "coredump_authorization_cache_request_total", "SubjectAccessReview cache lookups.", ["status"], registry=REGISTRY
)

DUMPS = Counter(
    "coredump_dumps_total",
    "Dump requests by outcome (complete, disconnected, error, denied, not_found).",
    ["outcome"],
    registry=REGISTRY,
)
DUMP_BYTES = Counter("coredump_dump_sent_bytes_total", "Archive bytes sent by the dump subresource.", registry=REGISTRY)
DUMP_DURATION = Histogram(
    "coredump_dump_duration_seconds",
    "Time to stream one dump, by outcome.",
    ["outcome"],
    buckets=_DUMP_BUCKETS,
    registry=REGISTRY,
)

STORE_DURATION = Histogram(
    "etcd_request_duration_seconds",
    "Object store call latency by operation.",
    ["operation", "type"],
    buckets=_WEBHOOK_BUCKETS,
    registry=REGISTRY,
)


def bounded(value: str, allowed: frozenset[str]) -> str:
    """``value`` if it is one of ``allowed`` (or empty), else ``other``: label values a client cannot multiply."""
    return value if not value or value in allowed else "other"


def request_labels(*, verb: str, resource: str, subresource: str) -> dict[str, str]:
    return {
        "verb": bounded(verb, _VERBS),
        "resource": bounded(resource, _RESOURCES),
        "subresource": bounded(subresource, _SUBRESOURCES),
    }


def observe_webhook(counter: Counter, histogram: Histogram, *, code: str, seconds: float) -> None:
    counter.labels(code=code).inc()
    histogram.labels(code=code).observe(seconds)


@contextmanager
def longrunning(labels: dict[str, str]) -> Iterator[None]:
    gauge = LONGRUNNING.labels(**labels)
    gauge.inc()
    try:
        yield
    finally:
        gauge.dec()


async def serve_metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: the text exposition format (authorized like any non-resource path)."""
    response = web.Response(body=generate_latest(REGISTRY))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


class InstrumentedStore(ObjectStore):
    """An :class:`ObjectStore` that times every call of the store it wraps (``etcd_request_duration_seconds``)."""

    def __init__(self, inner: ObjectStore, *, kind: str = r.KIND) -> None:
        self._inner = inner
        self._kind = kind

    @contextmanager
    def _timed(self, operation: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            STORE_DURATION.labels(operation=operation, type=self._kind).observe(time.perf_counter() - began)

    async def start(self) -> None:
        await self._inner.start()

    async def close(self) -> None:
        await self._inner.close()

    async def check(self) -> None:
        with self._timed("check"):
            await self._inner.check()

    async def current_revision(self) -> int:
        with self._timed("currentRevision"):
            return await self._inner.current_revision()

    async def create(self, key: str, obj: dict[str, Any]) -> dict[str, Any]:
        with self._timed("create"):
            return await self._inner.create(key, obj)

    async def get(self, key: str) -> dict[str, Any]:
        with self._timed("get"):
            return await self._inner.get(key)

    async def list(
        self, prefix: str, *, limit: int | None = None, start_after: str | None = None, revision: int | None = None
    ) -> ListPage:
        with self._timed("list"):
            return await self._inner.list(prefix, limit=limit, start_after=start_after, revision=revision)

    async def update(self, key: str, obj: dict[str, Any], *, expected_revision: int | None) -> dict[str, Any]:
        with self._timed("update"):
            return await self._inner.update(key, obj, expected_revision=expected_revision)

    async def delete(self, key: str, *, expected_revision: int | None = None) -> dict[str, Any]:
        with self._timed("delete"):
            return await self._inner.delete(key, expected_revision=expected_revision)

    def watch(
        self, prefix: str, *, from_revision: int, progress: ProgressRequests | None = None
    ) -> AsyncIterator[StoreEvent]:
        return self._inner.watch(prefix, from_revision=from_revision, progress=progress)

    async def compact(self, revision: int) -> None:
        await self._inner.compact(revision)
