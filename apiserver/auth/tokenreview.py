"""
Bearer tokens, authenticated by asking the cluster with a TokenReview (``authentication.k8s.io/v1``).

The token is read from ``Authorization`` exactly as k8s.io/apiserver's bearertoken authenticator reads it:
the header trimmed, split on single spaces, scheme ``bearer`` in any case, the token the second part; an
empty second part (``Bearer  token``, two spaces) is no token at all. The answer is read strictly
(:mod:`apiserver.auth.reviews`): anything but a well-formed ``authenticated: true`` with a user name is a
401. Answers are cached by the token's SHA-256 (never the token itself) for
``--authentication-token-webhook-cache-ttl``, both "authenticated" and "rejected"; failures to reach the
cluster and malformed answers are never cached.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any
from collections.abc import Callable

from aiohttp import web
from kubernetes_asyncio import client

from apiserver import metrics
from apiserver.api import errors
from apiserver.auth import UserInfo
from apiserver.auth.cache import TTLCache
from apiserver.auth.reviews import TOKEN_REVIEW_API_VERSION, MalformedAnswer, parse_token_review
from apiserver.auth.webhook import Unreachable, call_cluster

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10.0


def bearer_token(request: web.Request) -> str:
    """The token of ``Authorization: Bearer <token>``, or "" (then other authenticators get their turn)."""
    parts = request.headers.get("Authorization", "").strip().split(" ")
    if len(parts) < 2 or parts[0].lower() != "bearer":
        return ""
    return parts[1]


class TokenReviewAuthenticator:
    def __init__(
        self, *, api_client: client.ApiClient, cache_ttl: float, clock: Callable[[], float] | None = None
    ) -> None:
        self._api = client.AuthenticationV1Api(api_client)
        self._ttl = cache_ttl
        self._cache: TTLCache[UserInfo | str] = TTLCache(clock=clock)

    async def authenticate(self, request: web.Request) -> UserInfo | None:
        token = bearer_token(request)
        if not token:
            return None
        key = hashlib.sha256(token.encode()).hexdigest()
        cached = self._cache.get(key)
        metrics.TOKEN_CACHE.labels(status="hit" if cached is not None else "miss").inc()
        if cached is None:
            cached = await self._review(token)
            self._cache.put(key, cached, ttl=self._ttl)
        if isinstance(cached, str):
            raise errors.unauthorized()
        return cached

    async def _review(self, token: str) -> UserInfo | str:
        """The user, or the reason the cluster rejected the token. Raises 401 when there is no usable answer."""
        # A plain dict (kubernetes-asyncio serializes it as is): the answer is read raw and strictly anyway.
        body: Any = {"apiVersion": TOKEN_REVIEW_API_VERSION, "kind": "TokenReview", "spec": {"token": token}}
        try:
            answer = await call_cluster(
                start=lambda: self._api.create_token_review(
                    body, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
                ),
                timeout=REQUEST_TIMEOUT,
            )
        except Unreachable as error:
            metrics.observe_webhook(metrics.AUTHN_REQUESTS, metrics.AUTHN_DURATION, code="error", seconds=error.seconds)
            logger.error("TokenReview unreachable", extra={"error": str(error)})
            raise errors.unauthorized() from error
        code = str(answer.status)
        if not 200 <= answer.status <= 299:
            metrics.observe_webhook(metrics.AUTHN_REQUESTS, metrics.AUTHN_DURATION, code=code, seconds=answer.seconds)
            logger.error("TokenReview failed", extra={"httpStatus": answer.status})
            raise errors.unauthorized()
        try:
            result = parse_token_review(answer.body)
        except MalformedAnswer as error:
            metrics.observe_webhook(
                metrics.AUTHN_REQUESTS, metrics.AUTHN_DURATION, code="malformed", seconds=answer.seconds
            )
            logger.error("TokenReview answer refused", extra={"error": str(error)})
            raise errors.unauthorized() from None
        metrics.observe_webhook(metrics.AUTHN_REQUESTS, metrics.AUTHN_DURATION, code=code, seconds=answer.seconds)
        if result.user is None:
            logger.info("bearer token rejected", extra={"reason": result.error})
            return result.error
        return result.user
