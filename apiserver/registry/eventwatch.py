"""
The notification path: the agent's ``CoreDumped`` Events, watched cluster-wide, each one a hint to re-read
one pod incarnation's cores.

The agent posts a core/v1 Event on the crashed pod once the core is committed on storage
(:mod:`handler.agent.events`). This module watches ``/api/v1/events?fieldSelector=reason=CoreDumped``
through kubernetes-asyncio, as an informer would: it lists once (``limit=1``: only the list's
resourceVersion is wanted, the slow full pass covers what happened before), then watches from that
resourceVersion, resumes from the last one seen (bookmarks included) when the server ends the watch, relists
on 410 Gone, and backs off (exponential, capped) on any other error.

Nothing in an Event is trusted: the namespace, pod name and pod uid of ``involvedObject`` are checked as
storage names (:mod:`handler.layout`) and the Event only says *which* incarnation to re-read; the cores
themselves are read from storage by the handler of :class:`PendingIncarnations`. A flood of Events costs
bounded memory: incarnations waiting for their re-read are kept once each, at most
:data:`MAX_PENDING`; past that, further hints are dropped and counted (the full pass catches them).
An Event that cannot be decoded (a line over aiohttp's limit, a non-JSON line) ends the watch; the same
failure twice at one resourceVersion relists instead of resuming, so one bad Event cannot stop the watch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from handler import layout

logger = logging.getLogger(__name__)

REASON = "CoreDumped"
FIELD_SELECTOR = f"reason={REASON}"
WATCH_TIMEOUT_SECONDS = 300  # the server ends each watch after this; we resume from the last resourceVersion
REQUEST_TIMEOUT_SECONDS = 30.0
MAX_PENDING = 10_000
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0

Incarnation = tuple[str, str, str]  # (namespace, pod, pod uid)
Handler = Callable[..., Awaitable[Any]]


def incarnation_of(event: Any) -> Incarnation | None:
    """The pod incarnation an Event names, if it is a ``CoreDumped`` Event on a Pod with valid names."""
    if not isinstance(event, dict) or event.get("reason") != REASON:
        return None
    involved = event.get("involvedObject")
    if not isinstance(involved, dict) or involved.get("kind") != "Pod" or involved.get("apiVersion", "v1") != "v1":
        return None
    namespace, pod, uid = involved.get("namespace"), involved.get("name"), involved.get("uid")
    meta = event.get("metadata")
    # The Event lives in the pod's namespace (the API server refuses an involvedObject elsewhere): both must agree.
    if not isinstance(meta, dict) or meta.get("namespace") != namespace:
        return None
    if not (isinstance(namespace, str) and isinstance(pod, str) and isinstance(uid, str)):
        return None
    try:
        return (layout.validate_namespace(namespace), layout.validate_pod_name(pod), layout.validate_pod_uid(uid))
    except layout.InvalidName:
        return None


class PendingIncarnations:
    """
    Incarnations waiting to be re-read, each once however many hints name it, at most ``limit``; one
    worker hands them to ``handler(namespace=, pod=, uid=)`` in arrival order.
    """

    def __init__(self, *, handler: Handler, limit: int = MAX_PENDING) -> None:
        self.handler = handler
        self.limit = limit
        self._pending: dict[Incarnation, None] = {}
        self._wake = asyncio.Event()
        self.dropped = 0
        self.handled = 0

    def add(self, key: Incarnation) -> None:
        if key in self._pending:
            return
        if len(self._pending) >= self.limit:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.warning(
                    "%d core notifications dropped (more than %d pods waiting); the full status pass catches them",
                    self.dropped,
                    self.limit,
                )
            return
        self._pending[key] = None
        self._wake.set()

    def __len__(self) -> int:
        return len(self._pending)

    async def run(self) -> None:
        """Until cancelled: re-read each pending incarnation; a failed one is logged (the full pass retries)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                key = next(iter(self._pending))
                del self._pending[key]
                namespace, pod, uid = key
                try:
                    await self.handler(namespace=namespace, pod=pod, uid=uid)
                except asyncio.CancelledError:
                    raise
                except Exception as error:  # one failed re-read (etcd blip) must not stop the others
                    logger.warning(
                        "cores of %s/%s (uid %s) not re-read: %s; the full status pass retries",
                        namespace,
                        pod,
                        uid,
                        error,
                    )
                self.handled += 1


class EventWatch:
    """Watches ``CoreDumped`` Events with ``api`` (a kubernetes-asyncio ApiClient) and feeds ``pending``."""

    def __init__(
        self, *, api: client.ApiClient, pending: PendingIncarnations, timeout_seconds: int = WATCH_TIMEOUT_SECONDS
    ) -> None:
        self.core = client.CoreV1Api(api)
        self.pending = pending
        self.timeout_seconds = timeout_seconds
        self.resource_version: str | None = None
        self.relists = 0
        self.watching = asyncio.Event()  # set while a watch is open (tests and readiness)

    async def _list_resource_version(self) -> str:
        response: Any = await self.core.list_event_for_all_namespaces(
            field_selector=FIELD_SELECTOR, limit=1, _preload_content=False, _request_timeout=REQUEST_TIMEOUT_SECONDS
        )
        try:
            body = json.loads(await response.read())
        finally:
            response.release()
        version = (body.get("metadata") or {}).get("resourceVersion") if isinstance(body, dict) else None
        if not isinstance(version, str) or not version:
            raise ValueError("the Event list carries no resourceVersion")
        return version

    async def _watch_once(self) -> None:
        """One watch from :attr:`resource_version` until the server ends it; raises on errors."""
        assert self.resource_version is not None
        # return_type "object": events stay plain dicts (checked by incarnation_of), not strictly typed models
        # whose validation a malformed Event would fail.
        stream = watch.Watch(return_type="object")
        try:
            stream_iter = stream.stream(
                self.core.list_event_for_all_namespaces,
                field_selector=FIELD_SELECTOR,
                resource_version=self.resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=self.timeout_seconds,
                _request_timeout=self.timeout_seconds + REQUEST_TIMEOUT_SECONDS,
            )
            self.watching.set()
            async for event in stream_iter:
                if not isinstance(event, dict):  # the library hands back a line it could not parse as it is
                    raise ValueError(f"the Event watch sent a line that is not JSON: {str(event)[:200]!r}")
                if stream.resource_version:
                    self.resource_version = str(stream.resource_version)
                if event.get("type") not in ("ADDED", "MODIFIED"):
                    continue  # DELETED: the Event expired; BOOKMARK: only its resourceVersion matters
                key = incarnation_of(event.get("raw_object"))
                if key is not None:
                    self.pending.add(key)
        finally:
            self.watching.clear()
            await stream.close()

    async def run(self) -> None:
        """Until cancelled: list, then watch and resume; relist on 410; back off on errors."""
        delay = BACKOFF_INITIAL
        failed_at: str | None = None
        while True:
            try:
                if self.resource_version is None:
                    self.resource_version = await self._list_resource_version()
                    self.relists += 1
                await self._watch_once()
                delay = BACKOFF_INITIAL
                failed_at = None
                continue
            except asyncio.CancelledError:
                raise
            except ApiException as error:
                if error.status == 410:
                    logger.info(
                        "CoreDumped Event watch: resourceVersion %s is too old, listing again", self.resource_version
                    )
                    self.resource_version = None
                    continue
                logger.warning(
                    "CoreDumped Event watch failed: %s %s; retrying in %.1f s", error.status, error.reason, delay
                )
            # Anything else: the connection (aiohttp, OSError, timeouts), or a line the library could not
            # decode (it raises a bare Exception for JSON without type/object): back off, never end the watch.
            except Exception as error:
                logger.warning(
                    "CoreDumped Event watch failed: %s; retrying in %.1f s", error or type(error).__name__, delay
                )
                # The same failure twice at one resourceVersion (an Event we cannot decode): list again past it.
                if self.resource_version is not None and failed_at == self.resource_version:
                    self.resource_version = None
                failed_at = self.resource_version
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, BACKOFF_MAX)
