"""
OpenAPI v2 and v3 documents for ``coredump.example.io/v1alpha1``.

Two readers matter. The aggregator merges our documents into the cluster's, and kubectl reads them:
``kubectl explain`` walks the schemas by ``x-kubernetes-group-version-kind``, and ``kubectl create``
checks that the PATCH operation of the kind lists a ``fieldValidation`` query parameter before it
trusts the server with strict validation (without it kubectl falls back to looking for a CRD, which
ordinary users may not list).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from typing import Any

from apiserver.api import resource as r

META = "io.k8s.apimachinery.pkg.apis.meta.v1"
DEF_ENDPOINT = "io.example.coredump.v1alpha1.CoredumpEndpoint"
DEF_LIST = "io.example.coredump.v1alpha1.CoredumpEndpointList"
BASE = f"/apis/{r.GROUP}/{r.VERSION}"
V3_PATH = f"apis/{r.GROUP}/{r.VERSION}"


def _meta_definitions() -> dict[str, Any]:
    s = {"type": "string"}
    string_map = {"type": "object", "additionalProperties": {"type": "string", "default": ""}}
    time = {"type": "string", "format": "date-time"}
    return {
        f"{META}.ObjectMeta": {
            "description": "ObjectMeta is metadata that all persisted resources must have.",
            "type": "object",
            "properties": {
                "name": {**s, "description": "Name must be unique within a namespace. Here: the pod's name."},
                "generateName": {**s, "description": "Optional prefix used to generate a unique name."},
                "namespace": {**s, "description": "Namespace of the object; the pod's namespace."},
                "uid": {**s, "description": "UID of this object, set by the server."},
                "resourceVersion": {**s, "description": "Opaque version for optimistic concurrency and watch."},
                "generation": {
                    "type": "integer",
                    "format": "int64",
                    "description": "Sequence number of the desired state; set by the server.",
                },
                "creationTimestamp": {**time, "description": "When the object was created; set by the server."},
                "deletionTimestamp": {**time, "description": "When the object will be deleted."},
                "deletionGracePeriodSeconds": {"type": "integer", "format": "int64"},
                "labels": {
                    **string_map,
                    "description": "Map of string keys and values to organize and select objects.",
                },
                "annotations": {**string_map, "description": "Unstructured key value map stored with the object."},
                "finalizers": {
                    "type": "array",
                    "items": {"type": "string", "default": ""},
                    "x-kubernetes-list-type": "set",
                },
                "ownerReferences": {
                    "type": "array",
                    "items": {"$ref": f"#/definitions/{META}.OwnerReference"},
                    "x-kubernetes-list-type": "map",
                    "x-kubernetes-list-map-keys": ["uid"],
                },
                "managedFields": {"type": "array", "items": {"type": "object"}},
                "selfLink": {**s, "description": "Deprecated."},
            },
        },
        f"{META}.OwnerReference": {
            "type": "object",
            "required": ["apiVersion", "kind", "name", "uid"],
            "properties": {
                "apiVersion": s,
                "kind": s,
                "name": s,
                "uid": s,
                "controller": {"type": "boolean"},
                "blockOwnerDeletion": {"type": "boolean"},
            },
            "x-kubernetes-map-type": "atomic",
        },
        f"{META}.ListMeta": {
            "type": "object",
            "properties": {
                "resourceVersion": s,
                "continue": s,
                "remainingItemCount": {"type": "integer", "format": "int64"},
                "selfLink": s,
            },
        },
        f"{META}.Status": {
            "description": "Status is a return value for calls that don't return other objects.",
            "type": "object",
            "properties": {
                "apiVersion": s,
                "kind": s,
                "status": s,
                "message": s,
                "reason": s,
                "code": {"type": "integer", "format": "int32"},
                "details": {"type": "object"},
                "metadata": {"$ref": f"#/definitions/{META}.ListMeta"},
            },
            "x-kubernetes-group-version-kind": [{"group": "", "kind": "Status", "version": "v1"}],
        },
        f"{META}.DeleteOptions": {
            "type": "object",
            "properties": {
                "apiVersion": s,
                "kind": s,
                "dryRun": {"type": "array", "items": s},
                "gracePeriodSeconds": {"type": "integer", "format": "int64"},
                "propagationPolicy": s,
                "preconditions": {"type": "object", "properties": {"resourceVersion": s, "uid": s}},
            },
        },
        f"{META}.Patch": {
            "description": "Patch is provided to give a concrete name and type to the Kubernetes PATCH request body.",
            "type": "object",
        },
        f"{META}.WatchEvent": {
            "type": "object",
            "required": ["type", "object"],
            "properties": {"type": s, "object": {"type": "object"}},
        },
        f"{META}.APIResourceList": {
            "type": "object",
            "properties": {"groupVersion": s, "resources": {"type": "array", "items": {"type": "object"}}},
        },
    }


def _resource_definitions() -> dict[str, Any]:
    endpoint = copy.deepcopy(r.ENDPOINT_SCHEMA)
    endpoint["properties"]["metadata"] = {
        "$ref": f"#/definitions/{r.OBJECT_META_REF}",
        "description": "Standard object's metadata; the name is the pod's name.",
    }
    endpoint["x-kubernetes-group-version-kind"] = [r.GVK]
    return {
        DEF_ENDPOINT: endpoint,
        DEF_LIST: {
            "description": "CoredumpEndpointList is a list of CoredumpEndpoints.",
            "type": "object",
            "required": ["items"],
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"$ref": f"#/definitions/{META}.ListMeta"},
                "items": {"type": "array", "items": {"$ref": f"#/definitions/{DEF_ENDPOINT}"}},
            },
            "x-kubernetes-group-version-kind": [{**r.GVK, "kind": r.LIST_KIND}],
        },
    }


def _q(name: str, description: str, type_: str = "string") -> dict[str, Any]:
    return {"name": name, "in": "query", "description": description, "type": type_, "uniqueItems": True}


PRETTY = _q("pretty", "If 'true', then the output is pretty printed.")
DRY_RUN = _q("dryRun", "When present, indicates that modifications should not be persisted. Valid value: All.")
FIELD_MANAGER = _q("fieldManager", "Name of the actor making the change.")
FIELD_VALIDATION = _q(
    "fieldValidation", "How to treat unknown or duplicate fields in the body: Ignore, Warn (the default) or Strict."
)
LIST_PARAMS = [
    _q("labelSelector", "Restrict the list to objects whose labels match."),
    _q("fieldSelector", "Restrict the list by fields: metadata.name, metadata.namespace."),
    _q("limit", "Maximum number of items to return; use continue for the rest.", "integer"),
    _q("continue", "Token from a previous limited list, to fetch the next page."),
    _q("resourceVersion", "Which version of the data to serve; see Kubernetes resource version semantics."),
    _q("resourceVersionMatch", "How resourceVersion applies: Exact or NotOlderThan."),
    _q("watch", "Watch for changes instead of listing.", "boolean"),
    _q("allowWatchBookmarks", "Ask for BOOKMARK events.", "boolean"),
    _q("sendInitialEvents", "Start a watch with synthetic ADDED events for the current state.", "boolean"),
    _q("timeoutSeconds", "Timeout for the list or watch call.", "integer"),
]
DUMP_PARAMS = [
    _q("container", "Only the cores of this container."),
    _q("core", "Only this core id."),
    _q("since", "Only cores written at or after this RFC 3339 time."),
]


def _path_params(*, name: bool, pretty: bool = True) -> list[dict[str, Any]]:
    params = [
        {
            "name": "namespace",
            "in": "path",
            "required": True,
            "type": "string",
            "description": "object name and auth scope, such as for teams and projects",
            "uniqueItems": True,
        }
    ]
    if name:
        params.insert(
            0,
            {
                "name": "name",
                "in": "path",
                "required": True,
                "type": "string",
                "description": "name of the CoredumpEndpoint",
                "uniqueItems": True,
            },
        )
    return params + ([PRETTY] if pretty else [])


def _op(
    *,
    op_id: str,
    action: str,
    description: str,
    params: list[dict[str, Any]],
    responses: dict[str, str],
    body: str | None = None,
    consumes: list[str] | None = None,
    produces: list[str] | None = None,
    gvk: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A neutral operation description; the v2 and v3 renderers below turn it into their own shapes."""
    return {
        "operationId": op_id,
        "description": description,
        "action": action,
        "params": params,
        "responses": responses,
        "body": body,
        "consumes": consumes or ["*/*"],
        "produces": produces or ["application/json", "application/yaml"],
        "gvk": gvk or r.GVK,
    }


def _operations() -> dict[str, dict[str, dict[str, Any]]]:
    ns_coll = f"{BASE}/namespaces/{{namespace}}/{r.PLURAL}"
    ns_item = f"{ns_coll}/{{name}}"
    status = f"{META}.Status"
    ep, lst = DEF_ENDPOINT, DEF_LIST
    table = ["application/json", "application/yaml", "application/json;stream=watch"]
    return {
        f"{BASE}/{r.PLURAL}": {
            "get": _op(
                op_id="listCoredumpEndpointForAllNamespaces",
                action="list",
                description="list or watch CoredumpEndpoints in all namespaces",
                params=LIST_PARAMS + [PRETTY],
                responses={"200": lst},
                produces=table,
            ),
        },
        ns_coll: {
            "get": _op(
                op_id="listNamespacedCoredumpEndpoint",
                action="list",
                description="list or watch CoredumpEndpoints",
                params=_path_params(name=False) + LIST_PARAMS,
                responses={"200": lst},
                produces=table,
            ),
            "post": _op(
                op_id="createNamespacedCoredumpEndpoint",
                action="post",
                description="create a CoredumpEndpoint",
                params=_path_params(name=False) + [DRY_RUN, FIELD_MANAGER, FIELD_VALIDATION],
                responses={"200": ep, "201": ep, "202": ep},
                body=ep,
            ),
            "delete": _op(
                op_id="deleteCollectionNamespacedCoredumpEndpoint",
                action="deletecollection",
                description="delete a collection of CoredumpEndpoints",
                params=_path_params(name=False) + LIST_PARAMS[:5] + [DRY_RUN],
                responses={"200": status},
                body=f"{META}.DeleteOptions",
            ),
        },
        ns_item: {
            "get": _op(
                op_id="readNamespacedCoredumpEndpoint",
                action="get",
                description="read a CoredumpEndpoint",
                params=_path_params(name=True),
                responses={"200": ep},
            ),
            "put": _op(
                op_id="replaceNamespacedCoredumpEndpoint",
                action="put",
                description="replace a CoredumpEndpoint",
                params=_path_params(name=True) + [DRY_RUN, FIELD_MANAGER, FIELD_VALIDATION],
                responses={"200": ep, "201": ep},
                body=ep,
            ),
            "patch": _op(
                op_id="patchNamespacedCoredumpEndpoint",
                action="patch",
                description="partially update a CoredumpEndpoint",
                params=_path_params(name=True)
                + [DRY_RUN, FIELD_MANAGER, FIELD_VALIDATION, _q("force", "Force apply.", "boolean")],
                responses={"200": ep, "201": ep},
                body=f"{META}.Patch",
                consumes=[
                    "application/json-patch+json",
                    "application/merge-patch+json",
                    "application/apply-patch+yaml",
                ],
            ),
            "delete": _op(
                op_id="deleteNamespacedCoredumpEndpoint",
                action="delete",
                description="delete a CoredumpEndpoint (its cores stay on storage unless the object "
                "carries the delete-cores annotation)",
                params=_path_params(name=True)
                + [DRY_RUN, _q("propagationPolicy", "Ignored: nothing depends on an endpoint.")],
                responses={"200": ep, "202": ep},
                body=f"{META}.DeleteOptions",
            ),
        },
        f"{ns_item}/{r.SUBRESOURCE_DUMP}": {
            "get": _op(
                op_id="readNamespacedCoredumpEndpointDump",
                action="get",
                description="download the pod's cores and their metadata as a tar.gz (supports Range)",
                params=_path_params(name=True, pretty=False) + DUMP_PARAMS,
                responses={"200": "binary", "206": "binary"},
                produces=["application/gzip"],
            ),
        },
    }


def _v2_schema_ref(name: str) -> dict[str, Any]:
    if name == "binary":
        return {"type": "string", "format": "binary"}
    return {"$ref": f"#/definitions/{name}"}


def _v2_operation(op: dict[str, Any], tag: str) -> dict[str, Any]:
    params = list(op["params"])
    if op["body"]:
        params.append({"name": "body", "in": "body", "required": True, "schema": _v2_schema_ref(op["body"])})
    return {
        "description": op["description"],
        "operationId": op["operationId"],
        "tags": [tag],
        "consumes": op["consumes"],
        "produces": op["produces"],
        "schemes": ["https"],
        "parameters": params,
        "responses": {
            code: {"description": "OK", "schema": _v2_schema_ref(ref)} for code, ref in op["responses"].items()
        }
        | {"401": {"description": "Unauthorized"}},
        "x-kubernetes-action": op["action"],
        "x-kubernetes-group-version-kind": op["gvk"],
    }


@functools.cache
def document_v2() -> dict[str, Any]:
    tag = "coredumpExampleIo_v1alpha1"
    paths = {
        path: {method: _v2_operation(op, tag) for method, op in ops.items()} for path, ops in _operations().items()
    }
    return {
        "swagger": "2.0",
        "info": {"title": "coredump.example.io", "version": r.VERSION},
        "paths": paths,
        "definitions": _meta_definitions() | _resource_definitions(),
        "securityDefinitions": {"BearerToken": {"type": "apiKey", "name": "authorization", "in": "header"}},
        "security": [{"BearerToken": []}],
    }


def _v3_refs(node: Any) -> Any:
    """v2 `#/definitions/X` → v3 `#/components/schemas/X`; v3 wants `$ref` siblings wrapped in allOf."""
    if isinstance(node, list):
        return [_v3_refs(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _v3_refs(value) for key, value in node.items()}
    if "$ref" in out:
        out["$ref"] = out["$ref"].replace("#/definitions/", "#/components/schemas/")
        if len(out) > 1:
            ref = out.pop("$ref")
            out["allOf"] = [{"$ref": ref}]
    return out


def _v3_param(param: dict[str, Any]) -> dict[str, Any]:
    schema = {"type": param.get("type", "string"), "uniqueItems": True}
    out = {"name": param["name"], "in": param["in"], "description": param.get("description", ""), "schema": schema}
    if param.get("required"):
        out["required"] = True
    return out


def _v3_operation(op: dict[str, Any], tag: str) -> dict[str, Any]:
    def content(ref: str, types: list[str]) -> dict[str, Any]:
        schema = {"type": "string", "format": "binary"} if ref == "binary" else {"$ref": f"#/components/schemas/{ref}"}
        return {t: {"schema": schema} for t in types}

    out: dict[str, Any] = {
        "tags": [tag],
        "description": op["description"],
        "operationId": op["operationId"],
        "parameters": [_v3_param(p) for p in op["params"]],
        "responses": {
            code: {"description": "OK", "content": content(ref, op["produces"])}
            for code, ref in op["responses"].items()
        }
        | {"401": {"description": "Unauthorized"}},
        "x-kubernetes-action": op["action"],
        "x-kubernetes-group-version-kind": op["gvk"],
    }
    if op["body"]:
        types = op["consumes"] if op["consumes"] != ["*/*"] else ["application/json", "application/yaml"]
        out["requestBody"] = {"required": True, "content": content(op["body"], types)}
    return out


@functools.cache
def document_v3() -> dict[str, Any]:
    tag = "coredumpExampleIo_v1alpha1"
    paths = {
        path: {method: _v3_operation(op, tag) for method, op in ops.items()} for path, ops in _operations().items()
    }
    schemas = _v3_refs(_meta_definitions() | _resource_definitions())
    return {
        "openapi": "3.0.0",
        "info": {"title": "coredump.example.io", "version": r.VERSION},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"BearerToken": {"type": "apiKey", "name": "authorization", "in": "header"}},
        },
    }


@functools.cache
def encoded_v2() -> bytes:
    return json.dumps(document_v2(), separators=(",", ":"), sort_keys=True).encode()


@functools.cache
def encoded_v3() -> tuple[bytes, str]:
    """The v3 group-version document and its hash (upper-case hex SHA-512, as kube-apiserver writes it)."""
    body = json.dumps(document_v3(), separators=(",", ":"), sort_keys=True).encode()
    return body, hashlib.sha512(body).hexdigest().upper()


def v3_root() -> dict[str, Any]:
    _, digest = encoded_v3()
    return {"paths": {V3_PATH: {"serverRelativeURL": f"/openapi/v3/{V3_PATH}?hash={digest}"}}}
