"""
The CoredumpEndpoint resource: its identity, its schema, and the rules its objects must follow.

The schema here is the one source for OpenAPI (and so ``kubectl explain``), strict field validation and
the set of fields the server keeps. Validation reports every problem as a Kubernetes StatusCause, so a
422 names each bad field the way kube-apiserver does.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from apiserver.api import errors
from handler import layout

GROUP = "coredump.example.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "CoredumpEndpoint"
LIST_KIND = "CoredumpEndpointList"
PLURAL = "coredumpendpoints"
SINGULAR = "coredumpendpoint"
SHORT_NAMES = ["cde"]
SUBRESOURCE_DUMP = "dump"
VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
GVK = {"group": GROUP, "version": VERSION, "kind": KIND}

_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# Stricter than storage's rule (any lowercase hex and '-'): the API takes only what Kubernetes generates.
_POD_UID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
MAX_ANNOTATIONS_BYTES = 256 * 1024

DNS1123_SUBDOMAIN_MESSAGE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
    "and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation "
    "is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
DNS1123_LABEL_MESSAGE = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start "
    "and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)


def _valid(check: Callable[[str], str], value: str) -> bool:
    try:
        check(value)
    except layout.InvalidName:
        return False
    return True


def is_dns1123_subdomain(value: str) -> bool:
    """The pod-name rule of the storage layout, which is Kubernetes' DNS-1123 subdomain."""
    return _valid(layout.validate_pod_name, value)


def is_dns1123_label(value: str) -> bool:
    """The namespace rule of the storage layout, which is Kubernetes' DNS-1123 label."""
    return _valid(layout.validate_namespace, value)


def is_pod_uid(value: str) -> bool:
    return bool(_POD_UID.match(value))


# ---- schema (OpenAPI v3 flavour; openapi.py derives v2 from it) ----------------------------------

OBJECT_META_REF = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"

CORE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "One core dump of a process in the pod.",
    "properties": {
        "id": {
            "type": "string",
            "description": "Core id: UTC time, command, pid and signal; use it as ?core= on the dump.",
        },
        "container": {"type": "string", "description": "Container the process ran in."},
        "signal": {
            "type": "integer",
            "format": "int32",
            "description": "Number of the signal that killed the process.",
        },
        "signalName": {"type": "string", "description": "Name of that signal, e.g. SIGSEGV."},
        "time": {"type": "string", "format": "date-time", "description": "When the process crashed (UTC)."},
        "size": {"type": "integer", "format": "int64", "description": "Uncompressed size of the stored core in bytes."},
        "storedSize": {"type": "integer", "format": "int64", "description": "Compressed size on storage in bytes."},
        "exe": {"type": "string", "description": "Path of the crashed executable."},
        "buildID": {"type": "string", "description": "ELF build-id of the executable, to find matching debug symbols."},
        "truncated": {"type": "boolean", "description": "True when the core was cut at the size limit."},
        "signature": {
            "type": "string",
            "description": "Crash signature: a hash of the crashing thread's top "
            "frames, the same for crashes on the same code path.",
        },
        "topFrames": {
            "type": "array",
            "items": {"type": "string"},
            "description": "Top frames of the crashing thread (module!function or module+offset); the "
            "full backtrace is in the core's metadata in the dump.",
        },
    },
}

SPEC_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Which pod incarnation this endpoint serves the cores of.",
    "properties": {
        "podUID": {
            "type": "string",
            "description": "UID of the pod incarnation. Filled from the live pod when omitted; give it to reach "
            "the cores of a pod that has been deleted. Immutable.",
        },
    },
}

STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Computed from storage on every read.",
    "properties": {
        "coreCount": {"type": "integer", "format": "int32", "description": "Number of stored cores."},
        "totalSize": {"type": "integer", "format": "int64", "description": "Uncompressed bytes of all stored cores."},
        "storedSize": {"type": "integer", "format": "int64", "description": "Bytes of all stored cores on storage."},
        "lastCrash": {"type": "string", "format": "date-time", "description": "Time of the newest core."},
        "lastSignal": {"type": "string", "description": "Signal name of the newest core."},
        "cores": {"type": "array", "items": CORE_SCHEMA, "description": "The stored cores, oldest first."},
        "lastRemoval": {
            "type": "object",
            "description": "The last retention pass that removed cores of this pod; with coreCount 0, retention "
            "removed the last one.",
            "properties": {
                "time": {"type": "string", "format": "date-time", "description": "When the cores were removed."},
                "reason": {"type": "string", "description": "Why: age, pod-count or namespace-bytes."},
                "cores": {"type": "integer", "format": "int32", "description": "How many that pass removed."},
            },
        },
    },
}

ENDPOINT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "CoredumpEndpoint gives access to the core dumps of one pod: its status lists them and its "
    "dump subresource streams them as a tar.gz.",
    "properties": {
        "apiVersion": {
            "type": "string",
            "description": "APIVersion defines the versioned schema of this representation of an object.",
        },
        "kind": {
            "type": "string",
            "description": "Kind is a string value representing the REST resource this object represents.",
        },
        "metadata": {"$ref": OBJECT_META_REF, "description": "Standard object's metadata; the name is the pod's name."},
        "spec": SPEC_SCHEMA,
        "status": STATUS_SCHEMA,
    },
}

# What ObjectMeta accepts from a client; anything else is an unknown field under strict validation.
OBJECT_META_FIELDS = {
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
}


# ---- validation ------------------------------------------------------------------------------------

_cause = errors.field_cause


def unknown_fields(body: dict[str, Any]) -> list[str]:
    """Paths of fields the schema does not know, as kube-apiserver names them (``spec.foo``)."""
    found: list[str] = []

    def walk(value: Any, schema: dict[str, Any], path: str) -> None:
        if not isinstance(value, dict):
            if isinstance(value, list) and "items" in schema:
                for index, item in enumerate(value):
                    walk(item, schema["items"], f"{path}[{index}]")
            return
        props = schema.get("properties")
        if props is None:
            return
        for key, sub in value.items():
            child = f"{path}.{key}" if path else key
            if key not in props:
                found.append(child)
            else:
                walk(sub, props[key], child)

    for key, value in body.items():
        if key == "metadata":
            if isinstance(value, dict):
                found.extend(f"metadata.{k}" for k in value if k not in OBJECT_META_FIELDS)
        elif key not in ENDPOINT_SCHEMA["properties"]:
            found.append(key)
        else:
            walk(value, ENDPOINT_SCHEMA["properties"][key], key)
    return found


def prune(body: dict[str, Any]) -> dict[str, Any]:
    """Only the fields the server keeps: known top-level fields, known metadata, known spec fields."""
    metadata = {k: v for k, v in (body.get("metadata") or {}).items() if k in OBJECT_META_FIELDS}
    spec_in = body.get("spec") or {}
    spec = (
        {k: v for k, v in spec_in.items() if k in SPEC_SCHEMA["properties"]} if isinstance(spec_in, dict) else spec_in
    )
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": metadata, "spec": spec}


def check_type_meta(body: Any) -> None:
    """400 unless the body is a CoredumpEndpoint of our group and version."""
    if not isinstance(body, dict):
        raise errors.bad_request("the request body must be a JSON or YAML object")
    kind, api_version = body.get("kind"), body.get("apiVersion")
    if not kind:
        raise errors.bad_request("Object 'Kind' is missing in the request body")
    if not api_version:
        raise errors.bad_request("Object 'apiVersion' is missing in the request body")
    if kind != KIND or api_version != API_VERSION:
        raise errors.bad_request(
            f"the API version in the data ({api_version}) does not match the expected API version ({API_VERSION}) "
            f"or the kind ({kind}) is not {KIND}"
        )


def validate_metadata_types(metadata: Any) -> list[dict[str, str]]:
    causes: list[dict[str, str]] = []
    if not isinstance(metadata, dict):
        return [_cause("metadata", "Invalid value: metadata must be an object", "FieldValueTypeInvalid")]
    for field in ("name", "generateName", "namespace", "uid", "resourceVersion"):
        if field in metadata and not isinstance(metadata[field], str):
            causes.append(_cause(f"metadata.{field}", "Invalid value: must be a string", "FieldValueTypeInvalid"))
    for field in ("labels", "annotations"):
        value = metadata.get(field)
        if value is None:
            continue
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            causes.append(
                _cause(
                    f"metadata.{field}",
                    "Invalid value: must be a map of string keys to string values",
                    "FieldValueTypeInvalid",
                )
            )
    if "finalizers" in metadata and not (
        isinstance(metadata["finalizers"], list) and all(isinstance(f, str) for f in metadata["finalizers"])
    ):
        causes.append(
            _cause("metadata.finalizers", "Invalid value: must be a list of strings", "FieldValueTypeInvalid")
        )
    return causes


def _qualified_name_problem(key: str) -> str | None:
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or not is_dns1123_subdomain(prefix)):
        return "prefix part " + DNS1123_SUBDOMAIN_MESSAGE
    if not name or len(name) > 63 or not _QUALIFIED_NAME.match(name):
        return (
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
            "with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for "
            "validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]') and be at most 63 characters"
        )
    return None


def validate_object(obj: dict[str, Any]) -> list[dict[str, str]]:
    """Every field problem of a (pruned) object, as StatusCauses; empty when valid."""
    metadata = obj["metadata"]
    causes = validate_metadata_types(metadata)
    if causes:
        return causes
    namespace = metadata.get("namespace", "")
    if not is_dns1123_label(namespace):
        causes.append(_cause("metadata.namespace", f'Invalid value: "{namespace}": {DNS1123_LABEL_MESSAGE}'))
    name = metadata.get("name", "")
    if not name:
        causes.append(_cause("metadata.name", "Required value: name or generateName is required", "FieldValueRequired"))
    elif not is_dns1123_subdomain(name):
        causes.append(_cause("metadata.name", f'Invalid value: "{name}": {DNS1123_SUBDOMAIN_MESSAGE}'))
    for key, value in (metadata.get("labels") or {}).items():
        problem = _qualified_name_problem(key)
        if problem:
            causes.append(_cause("metadata.labels", f'Invalid value: "{key}": {problem}'))
        if len(value) > 63 or not _LABEL_VALUE.match(value):
            causes.append(
                _cause(
                    "metadata.labels",
                    f'Invalid value: "{value}": a valid label must be an empty '
                    "string or consist of alphanumeric characters, '-', '_' or "
                    "'.', and must start and end with an alphanumeric character, "
                    "at most 63 characters",
                )
            )
    annotations = metadata.get("annotations") or {}
    for key in annotations:
        problem = _qualified_name_problem(key)
        if problem:
            causes.append(_cause("metadata.annotations", f'Invalid value: "{key}": {problem}'))
    if sum(len(k) + len(v) for k, v in annotations.items()) > MAX_ANNOTATIONS_BYTES:
        causes.append(_cause("metadata.annotations", "Too long: must have at most 262144 bytes", "FieldValueTooLong"))
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        causes.append(_cause("spec", "Invalid value: spec must be an object", "FieldValueTypeInvalid"))
        return causes
    uid = spec.get("podUID")
    if uid is not None and (not isinstance(uid, str) or not is_pod_uid(uid)):
        causes.append(
            _cause(
                "spec.podUID",
                f'Invalid value: "{uid}": must be the pod\'s UID, a lowercase RFC 4122 '
                "UUID such as 5f1c3b2a-8d4e-4f6a-9b7c-0d1e2f3a4b5c",
            )
        )
    return causes
