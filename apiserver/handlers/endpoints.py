"""
HTTP handlers for ``coredumpendpoints``: parse the request, call the registry, render the answer in the
form the client asked for (object, Table or PartialObjectMetadata). No rules live here.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from aiohttp import web

from apiserver.api import conventions, errors, patch
from apiserver.api import resource as r
from apiserver.api.conventions import Form
from apiserver.api.selectors import parse_field_selector, parse_label_selector
from apiserver.api.table import COLUMNS
from apiserver.apply import managed
from apiserver.context import REGISTRY
from apiserver.handlers import io
from apiserver.handlers.watch import serve_watch
from apiserver.registry.endpoints import EndpointRegistry, WriteOptions


def _registry(request: web.Request) -> EndpointRegistry:
    return request.app[REGISTRY]


def _ns(request: web.Request) -> str:
    return request.match_info["namespace"]


def _name(request: web.Request) -> str:
    return request.match_info["name"]


def render_one(
    request: web.Request, obj: dict[str, Any], *, status: int = 200, warnings: list[str] | None = None
) -> web.Response:
    form, encoding = conventions.negotiate(request.headers.get("Accept"), allow_table=True)
    if form is Form.TABLE:
        include = conventions.parse_include_object(request.query.get("includeObject"))
        out = conventions.table(columns=COLUMNS, objects=[obj], include_object=include)
    elif form is Form.PARTIAL_METADATA:
        out = conventions.partial_metadata(obj)
    else:
        out = obj
    return io.respond(request, out, status=status, warnings=warnings, yaml_out=encoding == "yaml")


async def get_endpoint(request: web.Request) -> web.Response:
    conventions.parse_resource_version(request.query.get("resourceVersion"))
    obj = await _registry(request).get(namespace=_ns(request), name=_name(request))
    return render_one(request, obj)


async def get_endpoint_status(request: web.Request) -> web.Response:
    """``GET .../NAME/status``: the whole object, as kube-apiserver answers for a status subresource."""
    return await get_endpoint(request)


async def write_endpoint_status(request: web.Request) -> web.Response:
    """
    ``PUT``/``PATCH .../NAME/status`` (authorized as ``update``/``patch`` on ``coredumpendpoints/status``):
    the body is validated like any write and its status ignored; the server re-reads the endpoint's cores
    from storage now and answers the stored object (see :meth:`EndpointRegistry.refresh_status`). Status is
    the server's: a client cannot set it, only ask for it to be brought up to date.
    """
    registry = _registry(request)
    if request.method == "PATCH":
        body = await io.read_body(request, allowed=io.PATCH_TYPES)
        content_type = request.content_type
        if content_type not in (patch.MERGE_PATCH, patch.JSON_PATCH):
            raise errors.unsupported_media_type(content_type)
        current = await registry.get(namespace=_ns(request), name=_name(request))
        data = patch.apply(content_type=content_type, target=current, patch=body.data)
    else:
        body = await io.read_body(request, allowed=io.WRITE_TYPES)
        data = body.data
    result = await registry.refresh_status(
        namespace=_ns(request), name=_name(request), body=data, options=io.write_options(request, body)
    )
    return render_one(request, result.obj, warnings=result.warnings)


async def list_endpoints(request: web.Request) -> web.StreamResponse:
    namespace = request.match_info.get("namespace")
    labels = parse_label_selector(request.query.get("labelSelector"))
    fields = parse_field_selector(request.query.get("fieldSelector"))
    if io.query_bool(request, "watch"):
        return await serve_watch(request, namespace=namespace, labels=labels, fields=fields)
    rv = conventions.parse_resource_version(request.query.get("resourceVersion"))
    match = request.query.get("resourceVersionMatch", "")
    continue_token = request.query.get("continue") or None
    if match and match not in ("Exact", "NotOlderThan"):
        raise errors.bad_request(
            f'resourceVersionMatch: Unsupported value: "{match}": supported values: "Exact", "NotOlderThan"'
        )
    if match and rv is None:
        raise errors.bad_request("resourceVersionMatch is forbidden unless resourceVersion is provided")
    if continue_token and rv is not None:
        raise errors.bad_request("specifying resource version is not allowed when using continue")
    if match == "Exact" and rv == 0:
        raise errors.bad_request('resourceVersionMatch "Exact" is forbidden for resourceVersion "0"')
    if io.query_bool(request, "sendInitialEvents"):
        raise errors.bad_request("sendInitialEvents is only for watch requests")
    limit = io.query_int(request, "limit") or None
    result = await _registry(request).list(
        namespace=namespace,
        labels=labels,
        fields=fields,
        limit=limit,
        continue_token=continue_token,
        resource_version=rv,
        exact=match == "Exact",
    )
    form, encoding = conventions.negotiate(request.headers.get("Accept"), allow_table=True)
    if form is Form.TABLE:
        include = conventions.parse_include_object(request.query.get("includeObject"))
        out = conventions.table(
            columns=COLUMNS,
            objects=result.items,
            include_object=include,
            resource_version=result.resource_version,
            continue_token=result.continue_token,
        )
    elif form is Form.PARTIAL_METADATA:
        out = conventions.partial_metadata_list(
            items=result.items, resource_version=result.resource_version, continue_token=result.continue_token
        )
    else:
        out = conventions.list_object(
            kind=r.LIST_KIND,
            api_version=r.API_VERSION,
            items=result.items,
            resource_version=result.resource_version,
            continue_token=result.continue_token,
        )
        if result.encoded is not None and encoding != "yaml" and request.query.get("pretty") not in ("true", "1"):
            return _joined_list(out, result.encoded)
    return io.respond(request, out, yaml_out=encoding == "yaml")


def _joined_list(out: dict[str, Any], encoded: list[bytes]) -> web.Response:
    """The compact JSON of the list ``out`` with its items already encoded (by the watch cache): the same bytes
    ``io.respond`` would write, without encoding every object again."""
    envelope = {key: value for key, value in out.items() if key != "items"}
    head = json.dumps(envelope, separators=(",", ":")).encode()
    body = b"".join((head[:-1], b',"items":[', b",".join(encoded), b"]}"))
    return web.Response(body=body, content_type="application/json")


def _write_options(request: web.Request, body: io.Body, *, kind: str, apply: bool = False) -> WriteOptions:
    """The write options with the request's field manager: ``fieldManager``, else (not for apply) the
    user agent's first word, as kube-apiserver derives it; 422 worded as kube-apiserver words it."""
    options = io.write_options(request, body)
    manager = request.query.get("fieldManager", "")
    causes = managed.field_manager_causes(manager, field="fieldManager")
    if apply and not manager:
        causes.insert(
            0,
            {
                "reason": "FieldValueRequired",
                "field": "fieldManager",
                "message": "Required value: is required for apply patch",
            },
        )
    if not apply and "force" in request.query and kind == "PatchOptions":
        causes.insert(
            0,
            {
                "reason": "FieldValueForbidden",
                "field": "force",
                "message": "Forbidden: may not be specified for non-apply patch",
            },
        )
    if causes:
        raise managed.options_invalid(kind=kind, causes=causes)
    if not manager:
        manager = managed.manager_from_user_agent(request.headers.get("User-Agent", ""))
    return dataclasses.replace(options, field_manager=manager)


async def create_endpoint(request: web.Request) -> web.Response:
    body = await io.read_body(request, allowed=io.WRITE_TYPES)
    result = await _registry(request).create(
        namespace=_ns(request), body=body.data, options=_write_options(request, body, kind="CreateOptions")
    )
    return render_one(request, result.obj, status=201, warnings=result.warnings)


async def replace_endpoint(request: web.Request) -> web.Response:
    body = await io.read_body(request, allowed=io.WRITE_TYPES)
    result = await _registry(request).update(
        namespace=_ns(request),
        name=_name(request),
        body=body.data,
        options=_write_options(request, body, kind="UpdateOptions"),
    )
    return render_one(request, result.obj, warnings=result.warnings)


async def patch_endpoint(request: web.Request) -> web.Response:
    body = await io.read_body(request, allowed=io.PATCH_TYPES)
    content_type = request.content_type
    if content_type == patch.APPLY_PATCH:
        return await _apply_endpoint(request, body)
    if content_type not in (patch.MERGE_PATCH, patch.JSON_PATCH):
        raise errors.unsupported_media_type(content_type)
    options = _write_options(request, body, kind="PatchOptions")

    def apply(current: dict[str, Any]) -> Any:
        return patch.apply(content_type=content_type, target=current, patch=body.data)

    result = await _registry(request).patch(
        namespace=_ns(request), name=_name(request), apply_patch=apply, options=options
    )
    return render_one(request, result.obj, warnings=result.warnings)


async def _apply_endpoint(request: web.Request, body: io.Body) -> web.Response:
    """Server-side apply: 201 when it created the object, 200 otherwise."""
    options = _write_options(request, body, kind="PatchOptions", apply=True)
    result, created = await _registry(request).apply(
        namespace=_ns(request),
        name=_name(request),
        body=body.data,
        force=io.query_bool(request, "force"),
        options=options,
    )
    return render_one(request, result.obj, status=201 if created else 200, warnings=result.warnings)


async def _delete_options(request: web.Request) -> dict[str, Any]:
    """DeleteOptions come in the body (kubectl) or the query (curl); both are honored."""
    options: dict[str, Any] = {}
    if request.can_read_body and (request.content_length or 0) > 0:
        body = await io.read_body(request, allowed=io.WRITE_TYPES)
        if not isinstance(body.data, dict):
            raise errors.bad_request("DeleteOptions must be an object")
        options = body.data
        if options.get("kind") not in (None, "DeleteOptions"):
            raise errors.bad_request(f'expected kind DeleteOptions, got "{options.get("kind")}"')
    policy = options.get("propagationPolicy") or request.query.get("propagationPolicy")
    if policy not in (None, "Orphan", "Background", "Foreground"):
        raise errors.bad_request(
            f'propagationPolicy: Unsupported value: "{policy}": supported values: "Orphan", "Background", "Foreground"'
        )
    dry = options.get("dryRun") or []
    if not isinstance(dry, list) or any(v != "All" for v in dry):
        raise errors.bad_request(f'dryRun: Unsupported value: {dry!r}: supported values: "All"')
    preconditions = options.get("preconditions") or {}
    if not isinstance(preconditions, dict):
        raise errors.bad_request("preconditions must be an object")
    return {
        "dry_run": bool(dry) or io.dry_run(request),
        "precondition_uid": preconditions.get("uid"),
        "precondition_rv": preconditions.get("resourceVersion"),
    }


async def delete_endpoint(request: web.Request) -> web.Response:
    options = await _delete_options(request)
    deleted = await _registry(request).delete(namespace=_ns(request), name=_name(request), **options)
    return render_one(request, deleted)


async def delete_endpoints(request: web.Request) -> web.Response:
    options = await _delete_options(request)
    result = await _registry(request).delete_collection(
        namespace=_ns(request),
        labels=parse_label_selector(request.query.get("labelSelector")),
        fields=parse_field_selector(request.query.get("fieldSelector")),
        dry_run=options["dry_run"],
    )
    out = conventions.list_object(
        kind=r.LIST_KIND, api_version=r.API_VERSION, items=result.items, resource_version=result.resource_version
    )
    return io.respond(request, out)
