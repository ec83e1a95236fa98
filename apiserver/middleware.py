"""
The outermost middleware: every failure leaves the server as a Kubernetes ``Status``.

``ApiError`` carries its own reason and code; aiohttp's HTTP exceptions (no route, wrong method) are
mapped to the Status kube-apiserver sends for them; anything else is a bug, logged with its traceback
and answered 500 InternalError without details a client could exploit.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from apiserver.api import errors

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def status_response(error: errors.ApiError) -> web.Response:
    # default=str: whatever a client managed to put into a message or detail, the Status still encodes.
    response = web.Response(body=json.dumps(error.to_status(), default=str).encode(), status=error.code,
                            content_type="application/json")
    for key, value in error.headers.items():
        response.headers[key] = value
    return response


def _from_http_exception(exc: web.HTTPException, *, method: str) -> errors.ApiError:
    if exc.status == 404:
        return errors.ApiError(code=404, reason="NotFound", message="the server could not find the requested resource",
                               details={})
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
