"""
Authorization by asking the cluster: one SubjectAccessReview (``authorization.k8s.io/v1``) per decision.

Decisions are cached by the whole review spec: allowed ones for
``--authorization-webhook-cache-authorized-ttl``, denied ones for
``--authorization-webhook-cache-unauthorized-ttl``. The answer is read strictly
(:mod:`apiserver.auth.reviews`). When no decision can be had — the cluster unreachable, an HTTP error, an
answer that is not a well-formed SubjectAccessReview (``"allowed": "false"``, HTML, both allowed and
denied) — the request is answered 500 InternalError "Internal error occurred: ...", which is what
kube-apiserver's authorization filter writes when its authorizer returns an error without an allow
(k8s.io/apiserver ``endpoints/filters/authorization.go``: ``responsewriters.InternalError``; the webhook
authorizer returns its decode and transport errors as such). Never an allow, and never cached.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Any

from kubernetes_asyncio import client

from apiserver import metrics
from apiserver.api import errors
from apiserver.auth import Decision, RequestAttributes
from apiserver.auth.cache import TTLCache
from apiserver.auth.reviews import SUBJECT_ACCESS_REVIEW_API_VERSION, MalformedAnswer, parse_subject_access_review
from apiserver.auth.webhook import Unreachable, call_cluster

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10.0


def review_spec(attributes: RequestAttributes) -> dict[str, Any]:
    """The ``spec`` of the SubjectAccessReview kube-apiserver's webhook authorizer would send."""
    user = attributes.user
    spec: dict[str, Any] = {"user": user.name, "groups": list(user.groups)}
    if user.uid:
        spec["uid"] = user.uid
    if user.extra:
        spec["extra"] = {k: list(v) for k, v in user.extra.items()}
    if attributes.is_resource_request:
        spec["resourceAttributes"] = {
            "namespace": attributes.namespace,
            "verb": attributes.verb,
            "group": attributes.api_group,
            "version": attributes.api_version,
            "resource": attributes.resource,
            "subresource": attributes.subresource,
            "name": attributes.name,
        }
    else:
        spec["nonResourceAttributes"] = {"path": attributes.path, "verb": attributes.verb}
    return spec


def _cache_key(attributes: RequestAttributes) -> Hashable:
    """Everything :func:`review_spec` puts in the review, as a tuple (0.5 µs a request; JSON of the spec took 16)."""
    user = attributes.user
    if attributes.is_resource_request:
        asked: tuple[str, ...] = (
            attributes.namespace,
            attributes.verb,
            attributes.api_group,
            attributes.api_version,
            attributes.resource,
            attributes.subresource,
            attributes.name,
        )
    else:
        asked = (attributes.path, attributes.verb)
    return (user.name, user.uid, user.groups, tuple(sorted(user.extra.items())), attributes.is_resource_request, asked)


def _authorizer_error(detail: str) -> errors.ApiError:
    return errors.internal(f"Internal error occurred: {detail}")


class SubjectAccessReviewAuthorizer:
    def __init__(
        self,
        *,
        api_client: client.ApiClient,
        authorized_ttl: float,
        unauthorized_ttl: float,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._api = client.AuthorizationV1Api(api_client)
        self._authorized_ttl = authorized_ttl
        self._unauthorized_ttl = unauthorized_ttl
        self._cache: TTLCache[Decision] = TTLCache(clock=clock)

    async def authorize(self, attributes: RequestAttributes) -> Decision:
        key = _cache_key(attributes)
        decision = self._cache.get(key)
        metrics.AUTHZ_CACHE.labels(status="hit" if decision is not None else "miss").inc()
        if decision is not None:
            return decision
        decision = await self._review(review_spec(attributes))
        self._cache.put(key, decision, ttl=self._authorized_ttl if decision.allowed else self._unauthorized_ttl)
        return decision

    async def _review(self, spec: dict[str, Any]) -> Decision:
        body: Any = {"apiVersion": SUBJECT_ACCESS_REVIEW_API_VERSION, "kind": "SubjectAccessReview", "spec": spec}
        try:
            answer = await call_cluster(
                start=lambda: self._api.create_subject_access_review(
                    body, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
                ),
                timeout=REQUEST_TIMEOUT,
            )
        except Unreachable as error:
            metrics.observe_webhook(metrics.AUTHZ_REQUESTS, metrics.AUTHZ_DURATION, code="error", seconds=error.seconds)
            logger.error("SubjectAccessReview unreachable", extra={"error": str(error)})
            raise _authorizer_error(f"SubjectAccessReview could not reach the cluster: {error}") from error
        if not 200 <= answer.status <= 299:
            metrics.observe_webhook(
                metrics.AUTHZ_REQUESTS, metrics.AUTHZ_DURATION, code=str(answer.status), seconds=answer.seconds
            )
            logger.error("SubjectAccessReview failed", extra={"httpStatus": answer.status})
            raise _authorizer_error(f"SubjectAccessReview failed: HTTP {answer.status}")
        try:
            decision = parse_subject_access_review(answer.body)
        except MalformedAnswer as error:
            metrics.observe_webhook(
                metrics.AUTHZ_REQUESTS, metrics.AUTHZ_DURATION, code="malformed", seconds=answer.seconds
            )
            logger.error("SubjectAccessReview answer refused", extra={"error": str(error)})
            raise _authorizer_error(f"SubjectAccessReview answer refused: {error}") from None
        metrics.observe_webhook(
            metrics.AUTHZ_REQUESTS, metrics.AUTHZ_DURATION, code=str(answer.status), seconds=answer.seconds
        )
        return decision
