"""
Kubernetes API conventions in one place: the output forms a client may ask for, and how lists,
tables, partial metadata, watch events and continue tokens look on the wire.

Handlers never assemble these shapes themselves. What kube-apiserver does here (and kubectl relies
on) is noted where it is not obvious.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import json
import math
from collections.abc import Callable, Iterable
from typing import Any

from apiserver.api import errors

META_GROUP = "meta.k8s.io"
META_VERSION = "v1"
META_API_VERSION = f"{META_GROUP}/{META_VERSION}"
INITIAL_EVENTS_END_ANNOTATION = "k8s.io/initial-events-end"


class Form(enum.Enum):
    """What the client wants back, from its Accept header (`as=`, `g=`, `v=` media type parameters)."""

    OBJECT = "object"  # the resource itself (or its List)
    TABLE = "table"  # meta.k8s.io/v1 Table
    PARTIAL_METADATA = "partial"  # meta.k8s.io/v1 PartialObjectMetadata(List)


@dataclasses.dataclass(frozen=True)
class MediaType:
    type: str
    params: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> "MediaType":
        parts = [p.strip() for p in text.split(";")]
        params: dict[str, str] = {}
        for part in parts[1:]:
            key, _, value = part.partition("=")
            if key:
                params[key.strip().lower()] = value.strip().strip('"')
        return cls(type=parts[0].lower(), params=params)


def parse_accept(header: str | None) -> list[MediaType]:
    """The media types of an Accept header, in the client's order (kubectl lists its preference first)."""
    if not header:
        return [MediaType("*/*", {})]
    types = [MediaType.parse(item) for item in header.split(",") if item.strip()]
    # q-values are rare among Kubernetes clients; honor them with a stable sort when present.
    return sorted(types, key=lambda mt: -_quality(mt.params.get("q")))


def _quality(text: str | None) -> float:
    """A q-value as goautoneg (k8s.io/apimachinery's negotiation) reads it: unparsable means 0, not an error."""
    if text is None:
        return 1.0
    try:
        value = float(text)
    except ValueError:
        return 0.0
    return value if math.isfinite(value) else 0.0


_JSON_TYPES = {"application/json", "application/*", "*/*"}
_YAML_TYPES = {"application/yaml"}


def negotiate(accept: str | None, *, allow_table: bool) -> tuple[Form, str]:
    """
    Choose the output form and the encoding ("json" or "yaml") for a GET/LIST/WATCH.

    Like kube-apiserver, an `as=` form we do not serve is skipped in favour of the client's next choice,
    and 406 NotAcceptable comes only when nothing in the list can be served.
    """
    for media in parse_accept(accept):
        if media.type not in _JSON_TYPES | _YAML_TYPES:
            continue
        encoding = "yaml" if media.type in _YAML_TYPES else "json"
        as_kind = media.params.get("as")
        if not as_kind:
            return Form.OBJECT, encoding
        if media.params.get("g") != META_GROUP or media.params.get("v") not in ("v1", "v1beta1"):
            continue
        if as_kind == "Table" and allow_table:
            return Form.TABLE, encoding
        if as_kind in ("PartialObjectMetadata", "PartialObjectMetadataList"):
            return Form.PARTIAL_METADATA, encoding
    raise errors.not_acceptable(
        "only the following media types are accepted: application/json, application/yaml, "
        "application/json;as=Table;v=v1;g=meta.k8s.io, "
        "application/json;as=PartialObjectMetadata;v=v1;g=meta.k8s.io"
    )


def partial_metadata(obj: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "PartialObjectMetadata", "apiVersion": META_API_VERSION, "metadata": obj.get("metadata", {})}


def list_object(
    *,
    kind: str,
    api_version: str,
    items: list[dict[str, Any]],
    resource_version: str,
    continue_token: str | None = None,
    remaining: int | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"resourceVersion": resource_version}
    if continue_token:
        meta["continue"] = continue_token
        if remaining is not None:
            meta["remainingItemCount"] = remaining
    return {"kind": kind, "apiVersion": api_version, "metadata": meta, "items": items}


def partial_metadata_list(
    *, items: list[dict[str, Any]], resource_version: str, continue_token: str | None = None
) -> dict[str, Any]:
    return list_object(
        kind="PartialObjectMetadataList",
        api_version=META_API_VERSION,
        items=[partial_metadata(i) for i in items],
        resource_version=resource_version,
        continue_token=continue_token,
    )


@dataclasses.dataclass(frozen=True)
class Column:
    name: str
    type: str
    description: str
    cell: Callable[[dict[str, Any]], Any]
    format: str = ""
    priority: int = 0  # 1 = shown only with `-o wide`

    def definition(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "format": self.format,
            "description": self.description,
            "priority": self.priority,
        }


def table(
    *,
    columns: Iterable[Column],
    objects: Iterable[dict[str, Any]],
    include_object: str,
    resource_version: str | None = None,
    continue_token: str | None = None,
    with_headers: bool = True,
) -> dict[str, Any]:
    """
    A meta.k8s.io/v1 Table. ``include_object`` is the client's ``includeObject`` (None, Metadata, Object);
    kube-apiserver defaults it to Metadata. On watch only the first event carries column definitions.
    """
    columns = list(columns)
    rows = []
    for obj in objects:
        row: dict[str, Any] = {"cells": [column.cell(obj) for column in columns]}
        if include_object == "Object":
            row["object"] = obj
        elif include_object == "Metadata":
            row["object"] = partial_metadata(obj)
        rows.append(row)
    meta: dict[str, Any] = {}
    if resource_version is not None:
        meta["resourceVersion"] = resource_version
    if continue_token:
        meta["continue"] = continue_token
    result: dict[str, Any] = {"kind": "Table", "apiVersion": META_API_VERSION, "metadata": meta}
    if with_headers:
        result["columnDefinitions"] = [c.definition() for c in columns]
    result["rows"] = rows
    return result


def parse_include_object(value: str | None) -> str:
    if value in (None, ""):
        return "Metadata"
    if value not in ("None", "Metadata", "Object"):
        raise errors.bad_request(f'includeObject: unsupported value "{value}": must be None, Metadata or Object')
    return value


def watch_event(event_type: str, obj: dict[str, Any]) -> bytes:
    """One watch frame: a JSON object per line, as kube-apiserver streams them."""
    return json.dumps({"type": event_type, "object": obj}, separators=(",", ":")).encode() + b"\n"


def bookmark(*, kind: str, api_version: str, resource_version: str, initial_events_end: bool = False) -> dict[str, Any]:
    """A BOOKMARK carries only a resourceVersion (and, after initial events, the end annotation)."""
    metadata: dict[str, Any] = {"resourceVersion": resource_version}
    if initial_events_end:
        metadata["annotations"] = {INITIAL_EVENTS_END_ANNOTATION: "true"}
    return {"kind": kind, "apiVersion": api_version, "metadata": metadata}


# Continue tokens: opaque to clients, like kube-apiserver's base64 JSON {"v","rv","start"}.
def encode_continue(*, revision: int, start_after: str) -> str:
    raw = json.dumps({"v": "coredump.example.io/v1", "rv": revision, "start": start_after}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_continue(token: str) -> tuple[int, str]:
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        revision, start = data["rv"], data["start"]
        if (
            data.get("v") != "coredump.example.io/v1"
            or not isinstance(revision, int)
            or revision < 1
            or not isinstance(start, str)
        ):
            raise ValueError("unknown token version")
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise errors.bad_request("continue key is not valid: the token is malformed") from None
    return revision, start


def parse_resource_version(value: str | None, *, param: str = "resourceVersion") -> int | None:
    """None for "" (most recent); 0 for "0" (any); else a positive revision, or a 400 like kube-apiserver."""
    if value in (None, ""):
        return None
    if not value.isdigit():
        raise errors.bad_request(f'{param}: Invalid value: "{value}": must be a non-negative integer')
    return int(value)
