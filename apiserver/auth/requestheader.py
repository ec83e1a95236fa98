"""
Front-proxy authentication: the kube-aggregator's client certificate vouches for X-Remote-* headers.

Headers count only on a connection whose client certificate was issued by the requestheader CA **and**
whose CN is one of the allowed names (an empty list allows any CN from that CA), as k8s.io/apiserver's
requestheader authenticator decides. The user is the first value of the first username header whose first
value is not empty (as Go's ``Header.Get``: a later ``X-Remote-User`` never overrides an empty first one);
no such value means no user from the front proxy (then 401). Groups are every
value of every group header (one group per header line, never split on commas); extras are every
``<prefix><key>`` header, the key lower-cased and path-unescaped as Kubernetes does.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import urllib.parse
from collections.abc import Mapping

from aiohttp import web

from apiserver.api import errors
from apiserver.auth import UserInfo
from apiserver.auth.x509 import CABundle, common_name, peer_certificate

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RequestHeaderNames:
    """The ``requestheader-*`` settings besides the CA: who may send the headers, and which headers say what."""

    allowed_names: tuple[str, ...] = ()
    username_headers: tuple[str, ...] = ("X-Remote-User",)
    uid_headers: tuple[str, ...] = ()
    group_headers: tuple[str, ...] = ("X-Remote-Group",)
    extra_headers_prefixes: tuple[str, ...] = ("X-Remote-Extra-",)

    @functools.cached_property
    def lowered_extra_prefixes(self) -> tuple[str, ...]:
        return tuple(p.lower() for p in self.extra_headers_prefixes)


@dataclasses.dataclass
class RequestHeaderConfig:
    """The front proxy's CA and names; ``names`` is replaced whole, so a refresh takes effect on the next request."""

    bundle: CABundle
    names: RequestHeaderNames = RequestHeaderNames()


def _unescape_extra_key(key: str) -> str:
    # url.PathUnescape: on a malformed escape Kubernetes keeps the key as it came.
    try:
        return urllib.parse.unquote(key, errors="strict")
    except UnicodeDecodeError:
        return key


def _first_value(headers: Mapping[str, str], names: tuple[str, ...]) -> str:
    """k8s.io/apiserver's ``headerValue``: per header name in order, its first value; the first non-empty wins."""
    for name in names:
        value = headers.get(name, "")
        if value:
            return value
    return ""


class RequestHeaderAuthenticator:
    """Users named by the front proxy's X-Remote-* headers, trusted only from the front proxy's certificate."""

    def __init__(self, *, config: RequestHeaderConfig) -> None:
        self.config = config

    async def authenticate(self, request: web.Request) -> UserInfo | None:
        bundle, names = self.config.bundle, self.config.names
        if not bundle.certificates:
            return None
        cert = peer_certificate(request)
        if cert is None:
            return None
        if not bundle.issued(cert):
            # Not the front proxy: another authenticator (x509 with the client CA) may still know it,
            # but its X-Remote-* headers are never read.
            raise errors.unauthorized()
        cn = common_name(cert)
        if names.allowed_names and cn not in names.allowed_names:
            logger.warning("front-proxy certificate CN %r is not among the allowed names", cn)
            raise errors.unauthorized()

        headers = request.headers
        name = _first_value(headers, names.username_headers)
        if not name:
            logger.info("front-proxy request without a user name header value: not authenticated")
            return None
        uid = _first_value(headers, names.uid_headers)
        groups = tuple(v for h in names.group_headers for v in headers.getall(h, []) if v)
        extra: dict[str, list[str]] = {}
        prefixes = names.lowered_extra_prefixes
        for header, value in headers.items():
            lowered = header.lower()
            for prefix in prefixes:
                if lowered.startswith(prefix) and len(lowered) > len(prefix):
                    extra.setdefault(_unescape_extra_key(lowered[len(prefix) :]), []).append(value)
                    break
        return UserInfo(name=name, uid=uid, groups=groups, extra={k: tuple(v) for k, v in extra.items()})
