"""
API errors as Kubernetes reports them: every failure becomes a ``Status`` with a reason and a code.

Raise an :class:`ApiError` (or one of the shortcuts) in the HTTP layer; the error middleware turns
it into the ``Status`` body that kubectl knows how to print. The registry below raises its own
domain errors (:mod:`apiserver.registry.errors`); :func:`from_registry` is the one place they become
a ``Status``. Reasons and codes follow
k8s.io/apimachinery/pkg/api/errors so that kubectl's messages ("Error from server (NotFound): ...")
read exactly as they do for built-in resources.
"""

from __future__ import annotations

from typing import Any

from apiserver.registry import errors as registry

GROUP = "coredump.example.io"
RESOURCE = "coredumpendpoints"


class ApiError(Exception):
    """An error with its Kubernetes ``Status`` fields."""

    def __init__(
        self,
        *,
        code: int,
        reason: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
        self.headers = headers or {}

    def to_status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            status["details"] = self.details
        return status


def _qualified(resource: str) -> str:
    return f"{resource}.{GROUP}"


def _details(*, name: str | None, resource: str = RESOURCE, **extra: Any) -> dict[str, Any]:
    details: dict[str, Any] = {"group": GROUP, "kind": resource}
    if name:
        details["name"] = name
    details.update(extra)
    return details


def not_found(*, name: str, resource: str = RESOURCE) -> ApiError:
    return ApiError(
        code=404,
        reason="NotFound",
        message=f'{_qualified(resource)} "{name}" not found',
        details=_details(name=name, resource=resource),
    )


def already_exists(*, name: str, resource: str = RESOURCE) -> ApiError:
    return ApiError(
        code=409,
        reason="AlreadyExists",
        message=f'{_qualified(resource)} "{name}" already exists',
        details=_details(name=name, resource=resource),
    )


def conflict(*, name: str, message: str, resource: str = RESOURCE) -> ApiError:
    return ApiError(
        code=409,
        reason="Conflict",
        message=f'Operation cannot be fulfilled on {_qualified(resource)} "{name}": {message}',
        details=_details(name=name, resource=resource),
    )


def field_cause(field: str, message: str, reason: str = "FieldValueInvalid") -> dict[str, str]:
    """
    One ``details.causes`` entry of a 422 Status, shaped as metav1.StatusCause (``reason`` is the
    field.ErrorType, e.g. ``FieldValueRequired``): every field error of the server is built here.
    """
    return {"reason": reason, "message": message, "field": field}


def invalid(*, name: str, causes: list[dict[str, str]], kind: str = "CoredumpEndpoint") -> ApiError:
    """422: the object is well-formed but its fields break the rules; ``causes`` name each field."""
    summary = ", ".join(f"{c['field']}: {c['message']}" for c in causes)
    return ApiError(
        code=422,
        reason="Invalid",
        message=f'{kind}.{GROUP} "{name}" is invalid: {summary}',
        details={"name": name, "group": GROUP, "kind": kind, "causes": causes},
    )


def bad_request(message: str) -> ApiError:
    return ApiError(code=400, reason="BadRequest", message=message)


def method_not_allowed(*, method: str) -> ApiError:
    return ApiError(
        code=405,
        reason="MethodNotAllowed",
        message=f"the server does not allow this method on the requested resource ({method})",
    )


def not_acceptable(message: str) -> ApiError:
    return ApiError(code=406, reason="NotAcceptable", message=message)


def unsupported_media_type(content_type: str) -> ApiError:
    return ApiError(
        code=415,
        reason="UnsupportedMediaType",
        message=f"the body of the request was in an unknown format - accepted media types include: "
        f"application/json, application/yaml, application/merge-patch+json, "
        f'application/json-patch+json, application/apply-patch+yaml (got "{content_type}")',
    )


def request_entity_too_large(*, limit: int) -> ApiError:
    return ApiError(
        code=413, reason="RequestEntityTooLarge", message=f"the request body is larger than the limit of {limit} bytes"
    )


def gone(message: str) -> ApiError:
    return ApiError(code=410, reason="Expired", message=message)


def too_large_resource_version(*, requested: int, current: int) -> ApiError:
    """504 with the cause reflectors look for: they wait and retry instead of re-listing from scratch."""
    return ApiError(
        code=504,
        reason="Timeout",
        message=f"Too large resource version: {requested}, current: {current}",
        details={
            "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
            "retryAfterSeconds": 1,
        },
    )


def unauthorized(message: str = "Unauthorized") -> ApiError:
    return ApiError(code=401, reason="Unauthorized", message=message)


def forbidden(
    *,
    user: str,
    verb: str,
    resource: str,
    namespace: str | None,
    name: str | None = None,
    subresource: str | None = None,
    reason: str = "",
    group: str = GROUP,
) -> ApiError:
    """
    403 worded the way kube-apiserver words it, so kubectl prints the familiar Forbidden line. ``group`` is
    the API group of the request's path ("" for the core group), not always ours.
    """
    what = resource + (f"/{subresource}" if subresource else "")
    target = f' "{name}"' if name else ""
    scope = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
    qualified = f"{resource}.{group}" if group else resource
    message = (
        f'{qualified}{target} is forbidden: User "{user}" cannot {verb} resource "{what}" in API group "{group}"{scope}'
    )
    if reason:
        message += f": {reason}"
    details: dict[str, Any] = {"group": group, "kind": resource}
    if name:
        details["name"] = name
    return ApiError(code=403, reason="Forbidden", message=message, details=details)


def forbidden_path(*, user: str, verb: str, path: str) -> ApiError:
    return ApiError(code=403, reason="Forbidden", message=f'forbidden: User "{user}" cannot {verb} path "{path}"')


def internal(message: str = "an internal error occurred") -> ApiError:
    return ApiError(code=500, reason="InternalError", message=message)


def service_unavailable(message: str) -> ApiError:
    return ApiError(code=503, reason="ServiceUnavailable", message=message)


def timeout(message: str) -> ApiError:
    return ApiError(code=504, reason="Timeout", message=message)


def requested_range_not_satisfiable(*, size: int) -> ApiError:
    return ApiError(
        code=416,
        reason="RequestedRangeNotSatisfiable",
        message=f"the requested range is outside the archive of {size} bytes",
        headers={"Content-Range": f"bytes */{size}"},
    )


def from_registry(error: registry.RegistryError) -> ApiError:
    """The ``Status`` of a registry refusal: the one mapping from the registry's words to Kubernetes'."""
    match error:
        case registry.NotFound():
            return not_found(name=error.name)
        case registry.AlreadyExists():
            return already_exists(name=error.name)
        case registry.Conflict():
            return conflict(name=error.name, message=error.message)
        case registry.Invalid():
            causes = [field_cause(cause.field, cause.message, cause.type) for cause in error.causes]
            return invalid(name=error.name, causes=causes)
        case registry.BadRequest():
            return bad_request(error.message)
        case registry.Unavailable():
            return service_unavailable(error.message)
        case registry.Expired():
            return gone(error.message)
        case registry.ResourceVersionTooLarge():
            return too_large_resource_version(requested=error.requested, current=error.current)
    return internal()
