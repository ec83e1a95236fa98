"""
Who is asking and what they may do: the authenticate → authorize seam of the request pipeline.

The pipeline (:mod:`apiserver.auth.pipeline`) asks an :class:`Authenticator` for the user behind a
request, derives :class:`RequestAttributes` from the URL and method the way kube-apiserver's
RequestInfoFactory does (:mod:`apiserver.auth.requestinfo`), and asks an :class:`Authorizer`. Dev mode
plugs in static implementations; a cluster deployment plugs in delegated ones (TokenReview,
front-proxy headers, SubjectAccessReview).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from aiohttp import web

AUTHENTICATED_GROUP = "system:authenticated"
MASTERS_GROUP = "system:masters"


@dataclasses.dataclass(frozen=True)
class UserInfo:
    name: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def with_authenticated_group(self) -> "UserInfo":
        """Every authenticated user is in ``system:authenticated``, as kube-apiserver adds it."""
        if AUTHENTICATED_GROUP in self.groups or self.name == "system:anonymous":
            return self
        return dataclasses.replace(self, groups=(*self.groups, AUTHENTICATED_GROUP))


@dataclasses.dataclass(frozen=True)
class RequestAttributes:
    """What a SubjectAccessReview asks about; mirrors k8s.io/apiserver's authorizer.Attributes."""

    user: UserInfo
    verb: str
    path: str
    is_resource_request: bool
    api_group: str = ""
    api_version: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""


@dataclasses.dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""


class Authenticator(Protocol):
    async def authenticate(self, request: web.Request) -> UserInfo | None:
        """The user, or None when the request carries no credentials this authenticator knows.

        Raise ``apiserver.api.errors.ApiError`` (401) for credentials that are present but wrong,
        and for a backend that cannot be reached (never fall through to anonymous then).
        """


class Authorizer(Protocol):
    async def authorize(self, attributes: RequestAttributes) -> Decision:
        """Allow or deny. Raise ``ApiError`` when the decision cannot be made (never allow then)."""
