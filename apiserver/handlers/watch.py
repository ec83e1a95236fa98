"""
Serving a watch: newline-delimited JSON events streamed until the client leaves, the timeout passes or
the server stops. A resourceVersion the store has compacted is reported the way kube-apiserver reports
it: HTTP 200, then one ERROR event carrying a 410 Expired Status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Any

from aiohttp import web

from apiserver.api import conventions, errors
from apiserver.api import resource as r
from apiserver.api.conventions import Form
from apiserver.api.selectors import FieldSelector
from apiserver.api.table import COLUMNS
from apiserver.context import REGISTRY, SHUTTING_DOWN
from apiserver.handlers import io
from apiserver.registry.endpoints import WatchItem
from apiserver.registry.errors import RegistryError
from apiserver.registry.store import RevisionCompacted, StoreError

logger = logging.getLogger(__name__)

MIN_REQUEST_TIMEOUT = 1800  # kube-apiserver's --min-request-timeout: watches end between 1x and 2x of it


def _check_send_initial_events(request: web.Request) -> bool:
    if not io.query_bool(request, "sendInitialEvents"):
        return False
    causes = []
    if request.query.get("resourceVersionMatch") != "NotOlderThan":
        causes.append(
            errors.field_cause(
                "resourceVersionMatch",
                "Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                "FieldValueForbidden",
            )
        )
    if not io.query_bool(request, "allowWatchBookmarks"):
        causes.append(
            errors.field_cause(
                "allowWatchBookmarks",
                "Forbidden: sendInitialEvents requires setting allowWatchBookmarks to true",
                "FieldValueForbidden",
            )
        )
    if causes:
        raise errors.invalid(name="", causes=causes, kind="ListOptions")
    return True


class _Encoder:
    """Turns registry items into wire frames in the negotiated form."""

    def __init__(self, request: web.Request) -> None:
        self.form, _ = conventions.negotiate(request.headers.get("Accept"), allow_table=True)
        self.include = conventions.parse_include_object(request.query.get("includeObject"))
        self.headers_sent = False

    def frame(self, item: WatchItem) -> bytes:
        if item.type == "BOOKMARK":
            kind, api_version = {
                Form.TABLE: ("Table", conventions.META_API_VERSION),
                Form.PARTIAL_METADATA: ("PartialObjectMetadata", conventions.META_API_VERSION),
            }.get(self.form, (r.KIND, r.API_VERSION))
            bookmark = conventions.bookmark(
                kind=kind,
                api_version=api_version,
                resource_version=str(item.revision),
                initial_events_end=item.initial_events_end,
            )
            return conventions.watch_event("BOOKMARK", bookmark)
        assert item.obj is not None
        obj: dict[str, Any] = item.obj
        if self.form is Form.TABLE:
            obj = conventions.table(
                columns=COLUMNS,
                objects=[obj],
                include_object=self.include,
                resource_version=obj["metadata"].get("resourceVersion"),
                with_headers=not self.headers_sent,
            )
            self.headers_sent = True
        elif self.form is Form.PARTIAL_METADATA:
            obj = conventions.partial_metadata(obj)
        return conventions.watch_event(item.type, obj)


async def serve_watch(
    request: web.Request, *, namespace: str | None, labels: Any, fields: FieldSelector
) -> web.StreamResponse:
    send_initial = _check_send_initial_events(request)
    rv = conventions.parse_resource_version(request.query.get("resourceVersion"))
    bookmarks = io.query_bool(request, "allowWatchBookmarks")
    timeout = io.query_int(request, "timeoutSeconds")
    if timeout is None:
        timeout = int(MIN_REQUEST_TIMEOUT * (1 + random.random()))
    encoder = _Encoder(request)

    response = web.StreamResponse(
        status=200, headers={"Content-Type": "application/json", "Cache-Control": "no-cache, private"}
    )
    response.enable_chunked_encoding()
    await response.prepare(request)

    items = request.app[REGISTRY].watch(
        namespace=namespace,
        labels=labels,
        fields=fields,
        resource_version=rv,
        send_initial_events=send_initial,
        bookmarks=bookmarks,
    )
    deadline = asyncio.get_running_loop().time() + timeout
    pending: asyncio.Task[WatchItem] | None = None
    stopping = asyncio.ensure_future(request.app[SHUTTING_DOWN].wait())
    try:
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            if pending is None:
                pending = asyncio.ensure_future(items.__anext__())
            done, _ = await asyncio.wait({pending, stopping}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            if stopping in done:
                break  # clients re-establish watches against another replica or after the restart
            if not done:
                continue  # periodic bookmarks come from the watch cache, which knows the revision
            task, pending = pending, None
            try:
                item = task.result()
            except StopAsyncIteration:
                break
            except RevisionCompacted as error:
                status = errors.gone(f"too old resource version: {error.requested} ({error.compacted})")
                await response.write(conventions.watch_event("ERROR", status.to_status()))
                break
            except errors.ApiError as error:
                await response.write(conventions.watch_event("ERROR", error.to_status()))
                break
            except RegistryError as error:
                await response.write(conventions.watch_event("ERROR", errors.from_registry(error).to_status()))
                break
            except StoreError as error:
                # etcd went away mid-watch: end the stream with a Status, the client re-lists and re-watches.
                logger.warning("watch ended by the store", extra={"error": str(error)})
                status = errors.service_unavailable(f"storage is unavailable: {error}")
                await response.write(conventions.watch_event("ERROR", status.to_status()))
                break
            if item.type == "BOOKMARK" and not bookmarks:
                continue
            await response.write(encoder.frame(item))
    except ConnectionResetError:
        # The client hung up: the normal end of most watches, not an error to report.
        logger.debug("watch client went away")
        return response
    finally:
        stopping.cancel()
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        with contextlib.suppress(Exception):
            await items.aclose()  # type: ignore[attr-defined]
    with contextlib.suppress(ConnectionResetError):
        await response.write_eof()
    return response
