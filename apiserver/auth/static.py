"""
A small RBAC-like rule table and the authorizer that consults it (dev mode; the test fake's SubjectAccessReview).

A :class:`Rule` grants ``verbs`` to ``users``/``groups`` on ``resources`` (``"coredumpendpoints"``,
``"coredumpendpoints/dump"``, ``"*"``, ``"*/dump"``) in ``namespaces`` (empty: every namespace and the
cluster scope), or on ``non_resource_urls`` (exact, or a prefix ending in ``*``), matched the way RBAC's
``rbac/v1`` helpers match them: a resource rule never matches a subresource unless it names it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from apiserver.api.errors import GROUP
from apiserver.auth import AUTHENTICATED_GROUP, Decision, RequestAttributes
from apiserver.auth.pipeline import PathMatcher

DISCOVERY_URLS = (
    "/api",
    "/api/*",
    "/apis",
    "/apis/*",
    "/openapi",
    "/openapi/*",
    "/version",
    "/version/",
    "/healthz",
    "/livez",
    "/readyz",
)


@dataclasses.dataclass(frozen=True)
class Rule:
    verbs: tuple[str, ...]
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    resources: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    api_groups: tuple[str, ...] = ("*",)
    non_resource_urls: tuple[str, ...] = ()

    def applies_to(self, attributes: RequestAttributes) -> bool:
        user = attributes.user
        if user.name not in self.users and not set(user.groups) & set(self.groups):
            return False
        if "*" not in self.verbs and attributes.verb not in self.verbs:
            return False
        if not attributes.is_resource_request:
            return PathMatcher(self.non_resource_urls)(attributes.path)
        if "*" not in self.api_groups and attributes.api_group not in self.api_groups:
            return False
        if self.namespaces and attributes.namespace not in self.namespaces:
            return False
        return any(
            _resource_matches(pattern, attributes.resource, attributes.subresource) for pattern in self.resources
        )


def _resource_matches(pattern: str, resource: str, subresource: str) -> bool:
    combined = f"{resource}/{subresource}" if subresource else resource
    if pattern in ("*", combined):
        return True
    # RBAC's "*/dump" form: any resource's named subresource.
    return bool(subresource) and pattern == f"*/{subresource}"


def rule(
    *,
    verbs: Iterable[str],
    users: Iterable[str] = (),
    groups: Iterable[str] = (),
    resources: Iterable[str] = (),
    namespaces: Iterable[str] = (),
    api_groups: Iterable[str] = ("*",),
    non_resource_urls: Iterable[str] = (),
) -> Rule:
    """A :class:`Rule` from any iterables (lists read better in tests and configuration)."""
    return Rule(
        verbs=tuple(verbs),
        users=tuple(users),
        groups=tuple(groups),
        resources=tuple(resources),
        namespaces=tuple(namespaces),
        api_groups=tuple(api_groups),
        non_resource_urls=tuple(non_resource_urls),
    )


def decide(rules: Sequence[Rule], attributes: RequestAttributes) -> Decision:
    """Allowed when any rule applies; otherwise denied with the reason RBAC would give (none)."""
    for candidate in rules:
        if candidate.applies_to(attributes):
            return Decision(allowed=True, reason="allowed by rule table")
    return Decision(allowed=False, reason="")


def discovery_rule() -> Rule:
    """What the ``system:discovery`` and ``system:public-info-viewer`` ClusterRoles give every user."""
    return rule(verbs=["get"], groups=[AUTHENTICATED_GROUP, "system:unauthenticated"], non_resource_urls=DISCOVERY_URLS)


def dev_rules() -> list[Rule]:
    """Dev mode's table: discovery for everyone, read-only endpoints (no dump) in ``default`` for dev-viewers."""
    return [
        discovery_rule(),
        rule(
            verbs=["get", "list", "watch"],
            groups=["dev-viewers"],
            resources=["coredumpendpoints"],
            namespaces=["default"],
            api_groups=[GROUP],
        ),
        # system:basic-user's: anyone may ask what they may do (kubectl auth can-i).
        rule(
            verbs=["create"],
            groups=[AUTHENTICATED_GROUP],
            resources=["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
            api_groups=["authorization.k8s.io"],
        ),
    ]


class StaticAuthorizer:
    """An :class:`apiserver.auth.Authorizer` over a fixed rule table (no cluster to ask in dev mode)."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self._rules = tuple(rules)

    async def authorize(self, attributes: RequestAttributes) -> Decision:
        return decide(self._rules, attributes)
