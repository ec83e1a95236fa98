"""
Bounded cost per client: what one connection and one request may hold, as kube-apiserver bounds them.

- :class:`ConnectionLimits` wraps the aiohttp protocol factory (``loop.create_server(limits.factory(...))``).
  Each accepted connection gets ``--read-header-timeout`` (Go's ``http.Server.ReadHeaderTimeout``, 32 s in
  k8s.io/apiserver's secure serving) from the end of its TLS handshake until its first request's headers are
  complete, and again from the first byte of each later request: a client that sends half a header (slow
  loris) is closed when it runs out. Between requests aiohttp's own keep-alive timeout, set to
  ``--idle-timeout`` (Go's ``IdleTimeout``, 90 s), closes an idle connection. ``--max-connections`` caps
  connections open at once: one more is closed right after its handshake (``ssl_handshake_timeout``, set to
  the header timeout, bounds the handshake itself).
  aiohttp has no header-read timeout of its own, hence this watchdog: the wrapper protocol passes every
  callback through unchanged and only adds a timer, armed on connection and on new data while no request
  is being served, disarmed by :meth:`ConnectionLimits.middleware` once aiohttp has parsed a request.
- :func:`inflight_limit` is kube-apiserver's max-in-flight filter: at most ``--max-requests-inflight``
  read-only and ``--max-mutating-requests-inflight`` mutating requests are served at once (0: no limit);
  one more is answered 429 TooManyRequests with ``Retry-After: 1``. Long-running requests — watches and
  dumps, which last as long as the client reads — are not counted, as kube-apiserver exempts watches.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp import typedefs as aiohttp_typedefs

from apiserver import metrics
from apiserver.api import errors
from apiserver.middleware import is_long_running, status_response

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = aiohttp_typedefs.Middleware  # a Protocol: what web.Application accepts

DEFAULT_READ_HEADER_TIMEOUT = 32.0
DEFAULT_IDLE_TIMEOUT = 90.0
DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_MAX_REQUESTS_INFLIGHT = 400
DEFAULT_MAX_MUTATING_REQUESTS_INFLIGHT = 200
_NON_MUTATING_VERBS = frozenset({"get", "list", "watch", "head", "options"})


class _GuardedProtocol(asyncio.Protocol):
    """aiohttp's protocol for one connection, plus the header-read watchdog and the connection count."""

    def __init__(self, limits: "ConnectionLimits", inner: asyncio.Protocol) -> None:
        self._limits = limits
        self._inner = inner
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._active = 0
        self._counted = False

    # -- the watchdog --

    def _arm(self) -> None:
        if self._timer is None and self._transport is not None:
            self._timer = asyncio.get_running_loop().call_later(self._limits.read_header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self._transport is not None and self._active == 0:
            logger.debug(
                "closing a connection whose request header is not complete",
                extra={"timeout": self._limits.read_header_timeout},
            )
            metrics.CLOSED_CONNECTIONS.labels(reason="read-header-timeout").inc()
            self._transport.abort()

    def request_started(self) -> None:
        self._active += 1
        self._disarm()

    def request_finished(self) -> None:
        self._active -= 1

    # -- asyncio.Protocol, passed through --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if self._limits.open >= self._limits.max_connections > 0:
            metrics.CLOSED_CONNECTIONS.labels(reason="max-connections").inc()
            self._limits.log_refusal()
            transport.abort()
            return
        self._transport = transport
        self._counted = True
        self._limits.opened(transport, self)
        self._arm()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._active == 0:
            self._arm()
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if not self._counted:
            return
        self._counted = False
        assert self._transport is not None
        self._limits.closed(self._transport)
        self._transport = None
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class ConnectionLimits:
    """Connection count and header-read watchdog shared by every connection of one listener."""

    def __init__(self, *, max_connections: int, read_header_timeout: float) -> None:
        self.max_connections = max_connections
        self.read_header_timeout = read_header_timeout
        self._guards: dict[asyncio.BaseTransport, _GuardedProtocol] = {}
        self._refusals_logged = 0.0

    @property
    def open(self) -> int:
        return len(self._guards)

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """The protocol factory for ``loop.create_server``, around aiohttp's (``runner.server``)."""
        return lambda: _GuardedProtocol(self, inner())

    def opened(self, transport: asyncio.BaseTransport, guard: _GuardedProtocol) -> None:
        self._guards[transport] = guard
        metrics.OPEN_CONNECTIONS.set(len(self._guards))

    def closed(self, transport: asyncio.BaseTransport) -> None:
        self._guards.pop(transport, None)
        metrics.OPEN_CONNECTIONS.set(len(self._guards))

    def log_refusal(self) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._refusals_logged >= 60:  # at most one line a minute; the metric counts them all
            self._refusals_logged = now
            logger.warning("connection refused: --max-connections reached", extra={"max": self.max_connections})

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Outermost middleware: the request's header is complete, so its connection's watchdog stands down."""
        guard = self._guards.get(request.transport) if request.transport is not None else None
        if guard is None:
            return await handler(request)
        guard.request_started()
        try:
            return await handler(request)
        finally:
            guard.request_finished()


def too_many_requests() -> errors.ApiError:
    """kube-apiserver's answer at the in-flight limit (its text, as a Status, and the same Retry-After)."""
    return errors.ApiError(
        code=429,
        reason="TooManyRequests",
        message="Too many requests, please try again later.",
        details={"retryAfterSeconds": 1},
        headers={"Retry-After": "1"},
    )


def inflight_limit(*, max_readonly: int, max_mutating: int) -> Middleware:
    """The ``--max-requests-inflight`` / ``--max-mutating-requests-inflight`` middleware (0: unlimited)."""
    in_flight = {"readOnly": 0, "mutating": 0}
    limits = {"readOnly": max_readonly, "mutating": max_mutating}

    @web.middleware
    async def limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        if is_long_running(request):
            return await handler(request)
        kind = "readOnly" if request.method.lower() in _NON_MUTATING_VERBS else "mutating"
        if 0 < limits[kind] <= in_flight[kind]:
            metrics.DROPPED.labels(request_kind=kind).inc()
            return status_response(too_many_requests())
        in_flight[kind] += 1
        metrics.INFLIGHT.labels(request_kind=kind).set(in_flight[kind])
        try:
            return await handler(request)
        finally:
            in_flight[kind] -= 1
            metrics.INFLIGHT.labels(request_kind=kind).set(in_flight[kind])

    return limit
