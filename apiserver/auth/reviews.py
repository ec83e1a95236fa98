"""
Strict readers of what the cluster answers: TokenReview, SubjectAccessReview and the
``kube-system/extension-apiserver-authentication`` ConfigMap, from the raw response bytes.

These answers decide who gets in, so nothing is guessed: the body must be a JSON object of the expected
``kind`` and ``apiVersion``, every field that decides must have the JSON type Go's decoder requires
(``"allowed": "false"`` is not a boolean and is refused, as ``encoding/json`` refuses it), and anything else
raises :class:`MalformedAnswer`. ``null`` counts as absent, as Go's decoder leaves the zero value for it.
The callers turn :class:`MalformedAnswer` into a denial (401 for authentication, 500 InternalError for
authorization: what kube-apiserver answers when its authorizer errs), never into a user or an allow.

Why by hand and not kubernetes-asyncio's models: its deserializer casts primitives with ``bool(value)``
(``bool("false")`` is true) and returns the raw text when the body is not JSON.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from apiserver.auth import Decision, UserInfo

# Larger answers are refused unread beyond this: a review is a few hundred bytes, the ConfigMap a few CAs.
MAX_ANSWER_BYTES = 1 << 20

TOKEN_REVIEW_API_VERSION = "authentication.k8s.io/v1"
SUBJECT_ACCESS_REVIEW_API_VERSION = "authorization.k8s.io/v1"


class MalformedAnswer(ValueError):
    """The cluster's answer is not what the API defines (one line saying what is wrong)."""


@dataclasses.dataclass(frozen=True)
class TokenReviewResult:
    """The user when ``authenticated``; otherwise ``user`` is None and ``error`` says why (maybe empty)."""

    user: UserInfo | None
    error: str = ""


def _object(body: bytes | str, *, kind: str, api_version: str) -> dict[str, Any]:
    if len(body) > MAX_ANSWER_BYTES:
        raise MalformedAnswer(f"{kind} answer larger than {MAX_ANSWER_BYTES} bytes")
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise MalformedAnswer(f"{kind} answer is not JSON ({type(error).__name__})") from None
    if not isinstance(document, dict):
        raise MalformedAnswer(f"{kind} answer is a JSON {type(document).__name__}, not an object")
    if document.get("kind") != kind or document.get("apiVersion") != api_version:
        raise MalformedAnswer(
            f"expected kind {kind} apiVersion {api_version}, got kind "
            f"{_short(document.get('kind'))} apiVersion {_short(document.get('apiVersion'))}"
        )
    return document


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _field(mapping: dict[str, Any], key: str, expected: type, *, where: str) -> Any:
    """``mapping[key]`` if it has JSON type ``expected``; None if absent or null; else :class:`MalformedAnswer`."""
    value = mapping.get(key)
    if value is None:
        return None
    # bool is a subclass of int in Python; JSON keeps them apart, and so do we.
    if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
        raise MalformedAnswer(f"{where}.{key} must be a JSON {_json_type(expected)}, got {_short(value)}")
    return value


def _json_type(python_type: type) -> str:
    return {bool: "boolean", str: "string", list: "array", dict: "object"}.get(python_type, python_type.__name__)


def _strings(mapping: dict[str, Any], key: str, *, where: str) -> tuple[str, ...]:
    values = _field(mapping, key, list, where=where) or []
    if not all(isinstance(v, str) for v in values):
        raise MalformedAnswer(f"{where}.{key} must be an array of strings")
    return tuple(values)


def _status(document: dict[str, Any], *, kind: str) -> dict[str, Any]:
    status = _field(document, "status", dict, where=kind)
    if status is None:
        raise MalformedAnswer(f"{kind} answer has no status")
    return status


def parse_token_review(body: bytes | str) -> TokenReviewResult:
    """Read a TokenReview answer; :class:`MalformedAnswer` for anything that is not a well-formed one."""
    status = _status(_object(body, kind="TokenReview", api_version=TOKEN_REVIEW_API_VERSION), kind="TokenReview")
    authenticated = _field(status, "authenticated", bool, where="status")
    error = _field(status, "error", str, where="status") or ""
    user = _field(status, "user", dict, where="status")
    if not authenticated:
        return TokenReviewResult(user=None, error=error or "token not authenticated")
    if user is None:
        raise MalformedAnswer("status.authenticated is true but status.user is missing")
    name = _field(user, "username", str, where="status.user") or ""
    if not name:
        raise MalformedAnswer("status.authenticated is true but status.user.username is empty")
    uid = _field(user, "uid", str, where="status.user") or ""
    groups = _strings(user, "groups", where="status.user")
    extra_field = _field(user, "extra", dict, where="status.user") or {}
    extra: dict[str, tuple[str, ...]] = {}
    for key in extra_field:
        extra[key] = _strings(extra_field, key, where="status.user.extra")
    return TokenReviewResult(user=UserInfo(name=name, uid=uid, groups=groups, extra=extra))


def parse_subject_access_review(body: bytes | str) -> Decision:
    """Read a SubjectAccessReview answer into a decision; :class:`MalformedAnswer` when it is not well-formed.

    ``allowed`` is required (the API marks it so); ``allowed`` and ``denied`` both true is an error, as in
    k8s.io/apiserver's webhook authorizer.
    """
    status = _status(
        _object(body, kind="SubjectAccessReview", api_version=SUBJECT_ACCESS_REVIEW_API_VERSION),
        kind="SubjectAccessReview",
    )
    allowed = _field(status, "allowed", bool, where="status")
    if allowed is None:
        raise MalformedAnswer("status.allowed is required")
    denied = _field(status, "denied", bool, where="status") or False
    reason = _field(status, "reason", str, where="status") or ""
    _field(status, "evaluationError", str, where="status")
    if allowed and denied:
        raise MalformedAnswer("status.allowed and status.denied are both true")
    return Decision(allowed=allowed, reason=reason)


def parse_configmap_data(body: bytes | str, *, name: str, namespace: str) -> dict[str, str]:
    """The ``data`` of a ConfigMap answer (every value a string), checked to be the ConfigMap asked for."""
    document = _object(body, kind="ConfigMap", api_version="v1")
    metadata = _field(document, "metadata", dict, where="ConfigMap") or {}
    if metadata.get("name") != name or metadata.get("namespace") != namespace:
        raise MalformedAnswer(
            f"expected ConfigMap {namespace}/{name}, got "
            f"{_short(metadata.get('namespace'))}/{_short(metadata.get('name'))}"
        )
    data = _field(document, "data", dict, where="ConfigMap") or {}
    for key, value in data.items():
        if not isinstance(value, str):
            raise MalformedAnswer(f"ConfigMap data.{key} must be a string, got {_short(value)}")
    return dict(data)
