"""
The authenticate → authorize middleware every request passes, as k8s.io/apiserver's filter chain does it.

1. The authenticator names the user; no credentials → 401 ``Status`` unless anonymous access is on
   (then ``system:anonymous`` in ``system:unauthenticated``). Every authenticated user gets
   ``system:authenticated``.
2. The URL and method become :class:`RequestAttributes` (:mod:`apiserver.auth.requestinfo`).
3. ``system:masters`` and the always-allowed paths (health checks) skip authorization; every other
   request is authorized, and a denial is the 403 ``Status`` kube-apiserver would write (an authorizer that
   cannot decide: 500 InternalError, as kube-apiserver). A refused ``dump`` is audited here
   (:mod:`apiserver.auth.audit`).

The user and the attributes are stored in the request (``apiserver.context.USER``/``ATTRIBUTES``) for the
handlers (the dump handler audits with them). Errors are answered here as ``Status`` responses, so this
middleware works whatever sits outside it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web

from apiserver import context
from apiserver.api import errors
from apiserver.api.resource import PLURAL as RESOURCE
from apiserver.api.resource import SUBRESOURCE_DUMP as DUMP
from apiserver.auth import MASTERS_GROUP, Authenticator, Authorizer, RequestAttributes, UserInfo
from apiserver.auth.audit import audit_dump
from apiserver.auth.requestinfo import request_attributes

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]

ANONYMOUS = UserInfo(name="system:anonymous", groups=("system:unauthenticated",))
# k8s.io/apiserver's DelegatingAuthorizationOptions default: the three health paths, exactly (not their checks).
HEALTH_PATHS = ("/healthz", "/livez", "/readyz")


class AlwaysAllowPaths:
    """``--authorization-always-allow-paths`` as k8s.io/apiserver's path authorizer reads it.

    Each entry is an exact path or a prefix ending in ``*`` (``*`` anywhere else is refused with
    ``ValueError``); a leading ``/`` is optional on both sides, and ``""`` or ``/`` means the root path.
    Only non-resource requests are matched there, so a resource path is never always-allowed.
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        self._exact: set[str] = set()
        prefixes: list[str] = []
        for pattern in patterns:
            trimmed = pattern.removeprefix("/")
            if not trimmed:
                self._exact.add("")
                continue
            if "*" in trimmed[:-1]:
                raise ValueError(f"only a trailing * is allowed in {pattern!r}")
            if trimmed.endswith("*"):
                prefixes.append(trimmed[:-1])
            else:
                self._exact.add(trimmed)
        self._prefixes = tuple(prefixes)

    def __call__(self, path: str, *, is_resource_request: bool) -> bool:
        if is_resource_request:
            return False
        trimmed = path.removeprefix("/")
        return trimmed in self._exact or (bool(self._prefixes) and trimmed.startswith(self._prefixes))


class PathMatcher:
    """``--authorization-always-allow-paths`` and RBAC ``nonResourceURLs`` semantics: exact paths, or prefixes
    written with a trailing ``*`` (``*`` alone matches every path)."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self._exact = {p for p in patterns if not p.endswith("*")}
        self._prefixes = tuple(p[:-1] for p in patterns if p.endswith("*"))

    def __call__(self, path: str) -> bool:
        if path in self._exact:
            return True
        return bool(self._prefixes) and path.startswith(self._prefixes)


def _status_response(error: errors.ApiError) -> web.Response:
    return web.json_response(error.to_status(), status=error.code, headers=error.headers)


def _forbidden(attributes: RequestAttributes, reason: str) -> errors.ApiError:
    if attributes.is_resource_request:
        return errors.forbidden(
            user=attributes.user.name,
            verb=attributes.verb,
            resource=attributes.resource,
            namespace=attributes.namespace or None,
            name=attributes.name or None,
            subresource=attributes.subresource or None,
            reason=reason,
            group=attributes.api_group,
        )
    error = errors.forbidden_path(user=attributes.user.name, verb=attributes.verb, path=attributes.path)
    if reason:
        error.message += f": {reason}"
    return error


def _audit_refused_dump(request: web.Request, attributes: RequestAttributes, *, outcome: str, code: int) -> None:
    """A dump the authorizer refused never reaches its handler: its audit line is written here."""
    if attributes.is_resource_request and attributes.resource == RESOURCE and attributes.subresource == DUMP:
        audit_dump(
            request=request,
            namespace=attributes.namespace,
            pod=attributes.name,
            outcome=outcome,
            code=code,
            user=attributes.user,
        )


def make_auth_middleware(
    *,
    authenticator: Authenticator,
    authorizer: Authorizer,
    always_allow_paths: Iterable[str] = HEALTH_PATHS,
    anonymous: bool = False,
) -> Middleware:
    """An aiohttp middleware that authenticates and authorizes every request before its handler runs."""
    always_allowed = AlwaysAllowPaths(always_allow_paths)

    @web.middleware
    async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        # Classified before authentication, to let unauthenticated health probes through; the attributes
        # depend on the user only in their user field.
        always_allowed_path = always_allowed(
            path,
            is_resource_request=request_attributes(
                method=request.method, path=path, query=request.query, user=ANONYMOUS
            ).is_resource_request,
        )
        try:
            user = await authenticator.authenticate(request)
        except errors.ApiError as error:
            logger.info("authentication failed for %s %s: %s", request.method, path, error.message)
            return _status_response(error)
        if user is None:
            # Health probes come from the kubelet without credentials; they are served to anyone, like
            # kube-apiserver's always-allowed paths with anonymous access on.
            if anonymous or always_allowed_path:
                user = ANONYMOUS
            else:
                return _status_response(errors.unauthorized())
        else:
            user = user.with_authenticated_group()
        attributes = request_attributes(method=request.method, path=path, query=request.query, user=user)
        request[context.USER] = user
        request[context.ATTRIBUTES] = attributes

        if MASTERS_GROUP not in user.groups and not always_allowed_path:
            try:
                decision = await authorizer.authorize(attributes)
            except errors.ApiError as error:
                logger.warning(
                    "authorization failed",
                    extra={"verb": attributes.verb, "path": path, "user": user.name, "error": error.message},
                )
                _audit_refused_dump(request, attributes, outcome="error", code=error.code)
                return _status_response(error)
            if not decision.allowed:
                logger.info("forbidden", extra={"verb": attributes.verb, "path": path, "user": user.name})
                _audit_refused_dump(request, attributes, outcome="denied", code=403)
                return _status_response(_forbidden(attributes, decision.reason))
        return await handler(request)

    return auth_middleware


class UnionAuthenticator:
    """Ask each authenticator in turn (front proxy, client certificate, bearer token), as kube-apiserver does.

    The first user found wins. When nobody knows the request but some authenticator rejected its
    credentials, the request is unauthorized (401), even with anonymous access on.
    """

    def __init__(self, authenticators: Iterable[Authenticator]) -> None:
        self._authenticators = tuple(authenticators)

    async def authenticate(self, request: web.Request) -> UserInfo | None:
        failure: errors.ApiError | None = None
        for authenticator in self._authenticators:
            try:
                user = await authenticator.authenticate(request)
            except errors.ApiError as error:
                failure = failure or error
                continue
            if user is not None:
                return user
        if failure is not None:
            raise failure
        return None
