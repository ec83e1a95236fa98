"""
Bearer tokens, authenticated by asking the cluster with a TokenReview (``authentication.k8s.io/v1``).

Answers are cached by the token's SHA-256 (never the token itself) for
``--authentication-token-webhook-cache-ttl``, both "authenticated" and "rejected"; failures to reach the
cluster are never cached and end in 401, never in a user.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable

import aiohttp
from aiohttp import web
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from apiserver.api import errors
from apiserver.auth import UserInfo
from apiserver.auth.cache import TTLCache

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10.0


def bearer_token(request: web.Request) -> str:
    """The token of ``Authorization: Bearer <token>``, or "" (then other authenticators get their turn)."""
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return ""
    return token.strip()


class TokenReviewAuthenticator:
    def __init__(self, *, api_client: client.ApiClient, cache_ttl: float,
                 clock: Callable[[], float] | None = None) -> None:
        self._api = client.AuthenticationV1Api(api_client)
        self._ttl = cache_ttl
        self._cache: TTLCache[UserInfo | str] = TTLCache(clock=clock)

    async def authenticate(self, request: web.Request) -> UserInfo | None:
        token = bearer_token(request)
        if not token:
            return None
        key = hashlib.sha256(token.encode()).hexdigest()
        cached = self._cache.get(key)
        if cached is None:
            cached = await self._review(token)
            self._cache.put(key, cached, ttl=self._ttl)
        if isinstance(cached, str):
            raise errors.unauthorized()
        return cached

    async def _review(self, token: str) -> UserInfo | str:
        """The user, or the reason the cluster rejected the token. Raises 401 when the cluster cannot answer."""
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}
        try:
            review = await self._api.create_token_review(body, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as error:
            logger.error("TokenReview failed: HTTP %s %s", error.status, error.reason)
            raise errors.unauthorized() from error
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
            logger.error("TokenReview unreachable: %s", error)
            raise errors.unauthorized() from error
        status = review.status
        if status is None or not status.authenticated or status.user is None:
            reason = (status.error if status else "") or "token not authenticated"
            logger.info("bearer token rejected: %s", reason)
            return reason
        user = status.user
        return UserInfo(name=user.username or "", uid=user.uid or "", groups=tuple(user.groups or ()),
                        extra={k: tuple(v) for k, v in (user.extra or {}).items()})
