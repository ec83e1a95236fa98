"""
Dev mode only: what kube-apiserver would answer for the requests ``kubectl auth can-i`` and ``kubectl events``
send, since in dev mode there is no kube-apiserver in front of us.

- ``POST /apis/authorization.k8s.io/v1/selfsubjectaccessreviews`` is answered from the dev rule table
  (:func:`apiserver.auth.static.dev_rules`), for the caller the dev client certificate names, so
  ``kubectl --context dev-viewer auth can-i get cde/dump`` says ``no`` exactly when a dump would be Forbidden.
- ``/api/...`` (the core group: events, pods, namespaces) answers 404 with one line saying that dev mode
  serves only ``coredump.example.io``; ``kubectl events`` prints that line instead of a bare NotFound.

The review body is untrusted: only the documented string fields of ``resourceAttributes`` or
``nonResourceAttributes`` are read, each bounded by the body limit, and anything else is a 400 Status.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiohttp import web

from apiserver.api import errors, reviewproto
from apiserver.auth import MASTERS_GROUP, RequestAttributes
from apiserver.auth.static import Rule, decide
from apiserver.context import USER
from apiserver.handlers import io

PROTOBUF = "application/vnd.kubernetes.protobuf"
REVIEW_PATH = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
RULES_KEY: web.AppKey[Sequence[Rule]] = web.AppKey("dev_rules")
CORE_API_MESSAGE = (
    "coredump-apiserver --dev serves only the coredump.example.io API; {path} is kube-apiserver's "
    "(Events, Pods, Namespaces): use a cluster for it"
)

_RESOURCE_FIELDS = ("namespace", "verb", "group", "version", "resource", "subresource", "name")


def _strings(spec: Any, field: str, names: tuple[str, ...]) -> dict[str, str]:
    attributes = spec.get(field)
    if not isinstance(attributes, dict):
        raise errors.bad_request(f"spec.{field} must be an object")
    out = {}
    for name in names:
        value = attributes.get(name, "")
        if not isinstance(value, str):
            raise errors.bad_request(f"spec.{field}.{name} must be a string")
        out[name] = value
    return out


def _attributes(request: web.Request, body: Any) -> RequestAttributes:
    if not isinstance(body, dict) or body.get("kind") != "SelfSubjectAccessReview":
        raise errors.bad_request("the request body must be a SelfSubjectAccessReview")
    spec = body.get("spec")
    if not isinstance(spec, dict):
        raise errors.bad_request("spec must be an object")
    user = request[USER]
    if spec.get("resourceAttributes") is not None:
        a = _strings(spec, "resourceAttributes", _RESOURCE_FIELDS)
        return RequestAttributes(
            user=user,
            verb=a["verb"],
            path="",
            is_resource_request=True,
            api_group=a["group"],
            api_version=a["version"],
            resource=a["resource"],
            subresource=a["subresource"],
            namespace=a["namespace"],
            name=a["name"],
        )
    if spec.get("nonResourceAttributes") is not None:
        a = _strings(spec, "nonResourceAttributes", ("path", "verb"))
        return RequestAttributes(user=user, verb=a["verb"], path=a["path"], is_resource_request=False)
    raise errors.invalid(
        name="",
        kind="SelfSubjectAccessReview",
        causes=[
            {
                "reason": "FieldValueRequired",
                "field": "spec.resourceAttributes",
                "message": "exactly one of resourceAttributes or nonResourceAttributes must be specified",
            }
        ],
    )


async def _review_body(request: web.Request) -> Any:
    if request.content_type != PROTOBUF:
        return (await io.read_body(request, allowed=io.WRITE_TYPES)).data
    limit = request.app.get(io.BODY_LIMIT_KEY, io.DEFAULT_MAX_BODY_BYTES)
    raw = bytearray()
    while len(raw) <= limit:
        chunk = await request.content.read(limit + 1 - len(raw))
        if not chunk:
            break
        raw += chunk
    if len(raw) > limit:
        raise errors.request_entity_too_large(limit=limit)
    try:
        return reviewproto.decode_self_subject_access_review(bytes(raw))
    except (ValueError, UnicodeDecodeError) as error:
        raise errors.bad_request(f"cannot decode the SelfSubjectAccessReview: {error}") from None


async def self_subject_access_review(request: web.Request) -> web.Response:
    review = await _review_body(request)
    attributes = _attributes(request, review)
    # As the request pipeline (and kube-apiserver): system:masters may do anything.
    allowed = MASTERS_GROUP in attributes.user.groups or decide(request.app[RULES_KEY], attributes).allowed
    answer = {
        **review,
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "metadata": {"creationTimestamp": None},
        "status": {"allowed": allowed, **({"reason": "dev mode rule table"} if allowed else {})},
    }
    return web.json_response(answer, status=201)


async def rules_review(request: web.Request) -> web.Response:
    raise errors.ApiError(
        code=404,
        reason="NotFound",
        message=(
            "coredump-apiserver --dev answers 'kubectl auth can-i VERB RESOURCE' (SelfSubjectAccessReview) but not "
            "--list (SelfSubjectRulesReview is kube-apiserver's)"
        ),
    )


async def core_api(request: web.Request) -> web.Response:
    raise errors.ApiError(code=404, reason="NotFound", message=CORE_API_MESSAGE.format(path=request.path))


def add_routes(app: web.Application, *, rules: Sequence[Rule]) -> None:
    """Dev mode's answers for kubectl's cluster-side requests (see the module docstring)."""
    app[RULES_KEY] = rules
    app.router.add_post(REVIEW_PATH, self_subject_access_review)
    app.router.add_route("*", "/apis/authorization.k8s.io/v1/selfsubjectrulesreviews", rules_review)
    app.router.add_route("*", "/api/{tail:.+}", core_api)
