"""
The server's own middlewares: every failure leaves the server as a Kubernetes ``Status``
(:func:`status_errors`), and every request is counted, timed and logged (:func:`observe_requests`).

``ApiError`` carries its own reason and code; a registry error gets its Status from
:func:`apiserver.api.errors.from_registry`; aiohttp's HTTP exceptions (no route, wrong method) are
mapped to the Status kube-apiserver sends for them; anything else is a bug, logged with its traceback
and answered 500 InternalError without details a client could exploit.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from apiserver import context, metrics
from apiserver.api import errors
from apiserver.api.resource import SUBRESOURCE_DUMP
from apiserver.auth.pipeline import ANONYMOUS
from apiserver.auth.requestinfo import request_attributes
from apiserver.registry.errors import RegistryError

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def status_response(error: errors.ApiError) -> web.Response:
    # default=str: whatever a client managed to put into a message or detail, the Status still encodes.
    response = web.Response(
        body=json.dumps(error.to_status(), default=str).encode(), status=error.code, content_type="application/json"
    )
    for key, value in error.headers.items():
        response.headers[key] = value
    return response


def _from_http_exception(exc: web.HTTPException, *, method: str) -> errors.ApiError:
    if exc.status == 404:
        return errors.ApiError(
            code=404, reason="NotFound", message="the server could not find the requested resource", details={}
        )
    if exc.status == 405:
        return errors.method_not_allowed(method=method)
    if exc.status == 413:
        return errors.ApiError(code=413, reason="RequestEntityTooLarge", message="the request body is too large")
    return errors.ApiError(code=exc.status, reason=exc.reason.replace(" ", ""), message=exc.text or exc.reason)


@web.middleware
async def status_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except errors.ApiError as error:
        return status_response(error)
    except RegistryError as error:
        return status_response(errors.from_registry(error))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and 304s are answers, not errors
        return status_response(_from_http_exception(exc, method=request.method))
    except (ConnectionResetError, TimeoutError) as exc:
        logger.debug("client connection lost: %s", exc)
        raise
    except Exception:
        logger.exception("unexpected error serving %s %s", request.method, request.path)
        return status_response(errors.internal())


def is_long_running(request: web.Request) -> bool:
    """Watches and dumps: they last as long as the client keeps reading (not limited by in-flight caps)."""
    attributes = request_attributes(method=request.method, path=request.path, query=request.query, user=ANONYMOUS)
    return attributes.verb == "watch" or (
        attributes.is_resource_request and attributes.verb == "get" and attributes.subresource == SUBRESOURCE_DUMP
    )


# -- one log line and the request metrics per request -------------------------------------------------------

request_logger = logging.getLogger("coredump.requests")
# Probes and scrapes come every few seconds; their lines are debug, every other request's info.
_QUIET_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/metrics"})


def _bytes_sent(response: web.StreamResponse) -> int:
    if response.prepared:
        return response.body_length
    if isinstance(response, web.Response) and isinstance(response.body, bytes | bytearray):
        return len(response.body)
    return response.content_length or 0


@web.middleware
async def observe_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count, time and log every request (``apiserver_request_total``, ``..._duration_seconds``, one JSON line).

    The line carries method, path, user, status, bytes and duration as fields, plus verb, resource,
    namespace and name when the request named them. A request that ends in an exception (the client left)
    is logged with ``status`` 0 and the exception's name.
    """
    began = time.perf_counter()
    response: web.StreamResponse | None = None
    failure = ""
    long_running = is_long_running(request)
    attributes = request_attributes(method=request.method, path=request.path, query=request.query, user=ANONYMOUS)
    labels = metrics.request_labels(
        verb=attributes.verb, resource=attributes.resource, subresource=attributes.subresource
    )
    try:
        if long_running:
            with metrics.longrunning(labels):
                response = await handler(request)
        else:
            response = await handler(request)
        return response
    except web.HTTPException as exc:
        response = exc
        raise
    except BaseException as exc:
        failure = type(exc).__name__
        raise
    finally:
        seconds = time.perf_counter() - began
        status = response.status if response is not None else 0
        metrics.REQUESTS.labels(**labels, code=str(status) if status else "error").inc()
        metrics.REQUEST_DURATION.labels(**labels).observe(seconds)
        user = request.get(context.USER)
        fields: dict[str, object] = {
            "method": request.method,
            "path": request.path,
            "user": user.name if user else "",
            "status": status,
            "bytes": _bytes_sent(response) if response is not None else 0,
            "seconds": round(seconds, 6),
            "remote": request.remote or "",
            "userAgent": request.headers.get("User-Agent", "")[:256],
        }
        if attributes.is_resource_request:
            fields.update(
                verb=attributes.verb,
                resource=attributes.resource,
                namespace=attributes.namespace,
                objectName=attributes.name,
                subresource=attributes.subresource,
            )
        if failure:
            fields["error"] = failure
        level = logging.DEBUG if request.path in _QUIET_PATHS else logging.INFO
        request_logger.log(level, "request", extra=fields)
