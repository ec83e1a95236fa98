"""
The calls the plugin makes to the coredump.example.io API, and what their failures mean to the user.

Only three requests exist: list CoredumpEndpoints (one namespace or all), get one, and open its ``dump``
(a streamed tar.gz; :mod:`kubectl_coredump.download` resumes it). Everything the server answers is
untrusted: bodies are size-bounded and type-checked before use, and a failure becomes a
:class:`~kubectl_coredump.errors.PluginError` worded for the user (which verb, which role, what exists).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from kubectl_coredump.errors import Exit, PluginError
from kubectl_coredump.transport import Client, Response

GROUP = "coredump.example.io"
VERSION = "v1alpha1"
RESOURCE = "coredumpendpoints"
MAX_JSON_BYTES = 64 * 1024 * 1024  # a list of 50 000 endpoints with 256 cores each still fits
APISERVICE = f"{VERSION}.{GROUP}"

# The shipped ClusterRoles (manifests/common/rbac-users.yaml) that grant each request.
ROLE_FOR = {"list": "coredump:view", "get": "coredump:view", "dump": "coredump:dump"}


def collection_path(namespace: str | None) -> str:
    base = f"/apis/{GROUP}/{VERSION}"
    return f"{base}/namespaces/{quote(namespace, safe='')}/{RESOURCE}" if namespace else f"{base}/{RESOURCE}"


def item_path(namespace: str, name: str) -> str:
    return f"{collection_path(namespace)}/{quote(name, safe='')}"


def dump_path(namespace: str, name: str) -> str:
    return f"{item_path(namespace, name)}/dump"


@dataclasses.dataclass(frozen=True)
class Request:
    """What was asked, to word an error: the RBAC verb and resource, the namespace and the object."""

    verb: str
    resource: str
    namespace: str | None
    name: str | None = None

    @property
    def role(self) -> str:
        return ROLE_FOR["dump" if self.resource.endswith("/dump") else self.verb]

    def where(self) -> str:
        return f'in namespace "{self.namespace}"' if self.namespace else "in any namespace (-A)"


def _status(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    return data if isinstance(data, dict) and data.get("kind") == "Status" else {}


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_for(*, status: int, body: bytes, request: Request, server: str) -> PluginError:
    """The one line (and exit code) for a non-2xx answer to ``request``."""
    error = _error_for(status=status, body=body, request=request, server=server)
    error.http_status = status
    return error


def _error_for(*, status: int, body: bytes, request: Request, server: str) -> PluginError:
    st = _status(body)
    message = _one_line(st.get("message") or body[:300].decode("utf-8", "replace") or f"HTTP {status}")
    details = st.get("details")
    details = details if isinstance(details, dict) else {}
    if status == 401:
        return PluginError(
            f"not authenticated to {server} (401 Unauthorized): the credentials of this kubeconfig "
            "context are missing or expired; log in again (kubectl auth whoami shows who you are)",
            code=Exit.FORBIDDEN,
        )
    if status == 403:
        scope = f"-n {request.namespace}" if request.namespace else "--all-namespaces"
        return PluginError(
            f"forbidden: you may not {request.verb} {request.resource}.{GROUP} {request.where()} "
            f"(check: kubectl auth can-i {request.verb} {request.resource}.{GROUP} {scope}); "
            f"the ClusterRole {request.role} grants it: ask an admin for a RoleBinding to it. Server said: {message}",
            code=Exit.FORBIDDEN,
        )
    if status == 404 and not details.get("kind"):
        return PluginError(
            f"the {GROUP}/{VERSION} API is not available on {server}: the APIService {APISERVICE} "
            f"is not installed (kubectl get apiservice {APISERVICE}); server said: {message}",
            code=Exit.UNAVAILABLE,
        )
    if status == 404:
        return PluginError(message, code=Exit.NOT_FOUND)
    if status == 503:
        return PluginError(
            f"the {GROUP} API is registered but not available ({message}); "
            f"kubectl get apiservice {APISERVICE} says why",
            code=Exit.UNAVAILABLE,
        )
    return PluginError(f"the API server answered {status} {st.get('reason') or ''}: {message}".replace("  ", " "))


def read_bounded(response: Response, *, limit: int = MAX_JSON_BYTES) -> bytes:
    """The whole body (at most ``limit`` bytes, else an error), and the response closed."""
    try:
        body = response.read_bounded(limit=limit)
    finally:
        response.close()
    if body is None:
        raise PluginError(f"the API server sent more than {limit} bytes for one object list; narrow it with -n or -l")
    return body


def get_json(client: Client, path: str, *, request: Request, query: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    response = client.get(path, query=query)
    body = read_bounded(response)
    if response.status != 200:
        raise error_for(status=response.status, body=body, request=request, server=client.server)
    try:
        data = json.loads(body)
    except ValueError:
        raise PluginError(f"the API server sent something that is not JSON for {path}") from None
    if not isinstance(data, dict):
        raise PluginError(f"the API server sent an unexpected answer for {path}")
    return data


def list_endpoints(client: Client, *, namespace: str | None, selector: str | None) -> list[dict[str, Any]]:
    """Every CoredumpEndpoint in ``namespace`` (all namespaces when ``None``), with its status."""
    query = [("labelSelector", selector)] if selector else []
    data = get_json(
        client,
        collection_path(namespace),
        query=query,
        request=Request(verb="list", resource=RESOURCE, namespace=namespace),
    )
    items = data.get("items")
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def get_endpoint(client: Client, *, namespace: str, name: str) -> dict[str, Any]:
    return get_json(
        client,
        item_path(namespace, name),
        request=Request(verb="get", resource=RESOURCE, namespace=namespace, name=name),
    )


def dump_request(namespace: str, name: str) -> Request:
    return Request(verb="get", resource=f"{RESOURCE}/dump", namespace=namespace, name=name)
