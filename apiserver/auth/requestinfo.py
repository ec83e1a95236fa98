"""
URL and method → :class:`RequestAttributes`, exactly as k8s.io/apiserver's ``RequestInfoFactory`` maps them.

Resource paths are ``/api/{version}/...`` and ``/apis/{group}/{version}/...`` with at least one part after
the version; everything else (``/apis``, ``/apis/{group}/{version}``, ``/openapi/v2``, ``/healthz``) is a
non-resource request whose verb is the lower-cased HTTP method. For resources: POST → create,
GET/HEAD → get (list when there is no name, watch when ``?watch=`` is true or the path has the old
``/watch/`` prefix), PUT → update, PATCH → patch, DELETE → delete (deletecollection without a name).
"""

from __future__ import annotations

from collections.abc import Mapping

from apiserver.auth import RequestAttributes, UserInfo

API_PREFIXES = frozenset({"api", "apis"})
GROUPLESS_API_PREFIXES = frozenset({"api"})
SPECIAL_VERBS = frozenset({"proxy", "watch"})
SPECIAL_VERBS_NO_SUBRESOURCES = frozenset({"proxy"})
# /namespaces/{ns}/status and /finalize are subresources of the namespace, not resources inside it.
NAMESPACE_SUBRESOURCES = frozenset({"status", "finalize"})
_METHOD_VERBS = {"POST": "create", "GET": "get", "HEAD": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
# strconv.ParseBool, which the query parameter decoder uses for ?watch=.
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})


def _name_from_field_selector(selector: str) -> str:
    """The name a ``metadata.name=X`` (or ``==``) field selector pins, as ``RequiresExactMatch`` finds it."""
    for term in selector.split(","):
        for op in ("==", "="):
            field, sep, value = term.partition(op)
            if sep and field.strip() == "metadata.name" and not value.startswith("="):
                value = value.strip()
                # path.IsValidPathSegmentName: a name that could not be a path segment is not a name.
                if value and value not in (".", "..") and "/" not in value and "%" not in value:
                    return value
                return ""
    return ""


def request_attributes(*, method: str, path: str, query: Mapping[str, str], user: UserInfo) -> RequestAttributes:
    """What the request asks to do, in the terms a SubjectAccessReview uses."""
    non_resource = RequestAttributes(user=user, verb=method.lower(), path=path, is_resource_request=False)
    parts = [p for p in path.strip("/").split("/")] if path.strip("/") else []
    if len(parts) < 3 or parts[0] not in API_PREFIXES:
        return non_resource
    prefix, parts = parts[0], parts[1:]
    api_group = ""
    if prefix not in GROUPLESS_API_PREFIXES:
        if len(parts) < 3:
            return non_resource
        api_group, parts = parts[0], parts[1:]
    api_version, parts = parts[0], parts[1:]

    if parts[0] in SPECIAL_VERBS:
        if len(parts) < 2:
            # kube-apiserver cannot tell kind and namespace here; it treats the request as unresolvable.
            return non_resource
        verb, parts = parts[0], parts[1:]
    else:
        verb = _METHOD_VERBS.get(method.upper(), "")

    namespace = ""
    if parts[0] == "namespaces":
        if len(parts) > 1:
            namespace = parts[1]
            if len(parts) > 2 and parts[2] not in NAMESPACE_SUBRESOURCES:
                parts = parts[2:]

    resource = name = subresource = ""
    if len(parts) >= 3 and verb not in SPECIAL_VERBS_NO_SUBRESOURCES:
        subresource = parts[2]
    if len(parts) >= 2:
        name = parts[1]
    resource = parts[0]

    if not name and verb == "get":
        verb = "watch" if query.get("watch", "") in _TRUE else "list"
        if selector := query.get("fieldSelector"):
            name = _name_from_field_selector(selector)
    if not name and verb == "delete":
        verb = "deletecollection"

    return RequestAttributes(
        user=user,
        verb=verb,
        path=path,
        is_resource_request=True,
        api_group=api_group,
        api_version=api_version,
        resource=resource,
        subresource=subresource,
        namespace=namespace,
        name=name,
    )
