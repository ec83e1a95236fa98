"""
The OpenAPI v2 document as gnostic's binary ``openapi_v2.Document`` protobuf.

kubectl 1.27 and 1.28 fetch ``/openapi/v2`` only as protobuf (``create -f`` to check that the server does
strict field validation, ``explain`` for the schemas) and give up with NotFound when the server answers 406.
The message layout and field numbers follow gnostic's ``openapiv2/OpenAPIv2.proto``; the encoder is written
by hand (varints and length-delimited fields) because no Python package ships those messages and the
document is small and encoded once.

Each message is described by a table from JSON key to (field number, field encoder). Keys starting with
``x-`` become ``NamedAny`` vendor extensions carrying the YAML text of the value, as gnostic's compiler does.
A key that no table knows raises :class:`UnsupportedConstruct` rather than vanish from what kubectl sees;
the tests encode the real document, so a new construct in ``openapi.document_v2()`` fails there first.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import struct
from collections.abc import Callable, Mapping
from typing import Any

import yaml

from apiserver.api import openapi

logger = logging.getLogger(__name__)

# What kubectl 1.27/1.28 ask for. "@" is not a token character, so Go's mime.ParseMediaType rejects it in a
# response's Content-Type ("unexpected content after media subtype"): like kube-openapi we answer with the
# spelling without "@", which later clients also ask for.
MEDIA_TYPE_DEPRECATED = "application/com.github.proto-openapi.spec.v2@v1.0+protobuf"
MEDIA_TYPE = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"
MEDIA_TYPES = (MEDIA_TYPE_DEPRECATED, MEDIA_TYPE)

# (field number, value) -> the field's bytes on the wire, empty when proto3 would leave it out.
FieldEncoder = Callable[[int, Any], bytes]
MessageTable = Mapping[str, tuple[int, FieldEncoder]]

_VARINT, _FIXED64, _LEN = 0, 1, 2


class UnsupportedConstruct(ValueError):
    """The JSON document holds something this encoder has no protobuf field for."""


# -- wire format ---------------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64 and bool are sent as two's complement, ten bytes for negatives
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _len(number: int, payload: bytes) -> bytes:
    return _tag(number, _LEN) + _varint(len(payload)) + payload


# -- scalar field encoders: proto3 leaves default values out -----------------------------------------------


def _string(number: int, value: Any) -> bytes:
    if not isinstance(value, str):
        raise UnsupportedConstruct(f"field {number}: expected a string, got {value!r}")
    return _len(number, value.encode()) if value else b""


def _bool(number: int, value: Any) -> bytes:
    if not isinstance(value, bool):
        raise UnsupportedConstruct(f"field {number}: expected a boolean, got {value!r}")
    return _tag(number, _VARINT) + _varint(1) if value else b""


def _int64(number: int, value: Any) -> bytes:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UnsupportedConstruct(f"field {number}: expected an integer, got {value!r}")
    return _tag(number, _VARINT) + _varint(value) if value else b""


def _double(number: int, value: Any) -> bytes:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UnsupportedConstruct(f"field {number}: expected a number, got {value!r}")
    return _tag(number, _FIXED64) + struct.pack("<d", float(value)) if value else b""


def _strings(number: int, value: Any) -> bytes:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise UnsupportedConstruct(f"field {number}: expected a list of strings, got {value!r}")
    # Repeated fields keep empty elements: only the list as a whole has a default.
    return b"".join(_len(number, item.encode()) for item in value)


def _message(encode: Callable[[Any], bytes]) -> FieldEncoder:
    """A singular message field: present (even when empty) whenever the JSON key is."""
    return lambda number, value: _len(number, encode(value))


def _repeated(encode: Callable[[Any], bytes]) -> FieldEncoder:
    def field(number: int, value: Any) -> bytes:
        if not isinstance(value, list):
            raise UnsupportedConstruct(f"field {number}: expected a list, got {value!r}")
        return b"".join(_len(number, encode(item)) for item in value)

    return field


def _encode_table(node: Any, table: MessageTable, *, what: str, vendor: int | None) -> bytes:
    """One message from a JSON object, fields in number order (as Go's proto.Marshal writes them)."""
    if not isinstance(node, dict):
        raise UnsupportedConstruct(f"{what}: expected an object, got {node!r}")
    parts: list[tuple[int, bytes]] = []
    for key, value in node.items():
        if key.startswith("x-") and vendor is not None:
            parts.append((vendor, _len(vendor, _named_any(key, value))))
            continue
        if key not in table:
            raise UnsupportedConstruct(f"{what}: no protobuf field for {key!r}")
        number, field = table[key]
        parts.append((number, field(number, value)))
    parts.sort(key=lambda part: part[0])  # stable: vendor extensions keep their order
    return b"".join(part for _, part in parts)


def _named(pairs: Any, encode_value: Callable[[Any], bytes], *, what: str) -> bytes:
    """gnostic's maps: ``repeated Named<X> additional_properties = 1`` with name = 1 and value = 2."""
    if not isinstance(pairs, dict):
        raise UnsupportedConstruct(f"{what}: expected an object, got {pairs!r}")
    return b"".join(_len(1, _string(1, name) + _len(2, encode_value(value))) for name, value in pairs.items())


# -- Any, vendor extensions ----------------------------------------------------------------------------------


def _any(value: Any) -> bytes:
    # openapi.v2.Any: field 2 holds the value as YAML text, which is what kubectl parses back.
    return _string(2, yaml.safe_dump(value, default_flow_style=False, sort_keys=False, allow_unicode=True))


def _named_any(name: str, value: Any) -> bytes:
    return _string(1, name) + _len(2, _any(value))


_ANY = _message(_any)
_ANYS = _repeated(_any)


# -- schemas -------------------------------------------------------------------------------------------------


def _type_item(value: Any) -> bytes:
    return _strings(1, [value] if isinstance(value, str) else value)


def _items_item(value: Any) -> bytes:
    return _repeated(_schema)(1, value if isinstance(value, list) else [value])


def _additional_properties(value: Any) -> bytes:
    if isinstance(value, bool):
        # A member of a oneof is on the wire even when false: false is what it says.
        return _tag(2, _VARINT) + _varint(int(value))
    return _len(1, _schema(value))


def _properties(value: Any) -> bytes:
    return _named(value, _schema, what="properties")


def _xml(value: Any) -> bytes:
    return _encode_table(value, _XML, what="xml", vendor=6)


def _external_docs(value: Any) -> bytes:
    return _encode_table(value, {"description": (1, _string), "url": (2, _string)}, what="externalDocs", vendor=3)


_XML: MessageTable = {
    "name": (1, _string),
    "namespace": (2, _string),
    "prefix": (3, _string),
    "attribute": (4, _bool),
    "wrapped": (5, _bool),
}

_SCHEMA: MessageTable = {
    "$ref": (1, _string),
    "format": (2, _string),
    "title": (3, _string),
    "description": (4, _string),
    "default": (5, _ANY),
    "multipleOf": (6, _double),
    "maximum": (7, _double),
    "exclusiveMaximum": (8, _bool),
    "minimum": (9, _double),
    "exclusiveMinimum": (10, _bool),
    "maxLength": (11, _int64),
    "minLength": (12, _int64),
    "pattern": (13, _string),
    "maxItems": (14, _int64),
    "minItems": (15, _int64),
    "uniqueItems": (16, _bool),
    "maxProperties": (17, _int64),
    "minProperties": (18, _int64),
    "required": (19, _strings),
    "enum": (20, _ANYS),
    "additionalProperties": (21, _message(_additional_properties)),
    "type": (22, _message(_type_item)),
    "items": (23, _message(_items_item)),
    "allOf": (24, _repeated(lambda s: _schema(s))),
    "properties": (25, _message(_properties)),
    "discriminator": (26, _string),
    "readOnly": (27, _bool),
    "xml": (28, _message(_xml)),
    "externalDocs": (29, _message(_external_docs)),
    "example": (30, _ANY),
}


def _schema(node: Any) -> bytes:
    return _encode_table(node, _SCHEMA, what="schema", vendor=31)


# -- parameters ----------------------------------------------------------------------------------------------

# The keys a non-body parameter, its items and a response header share; gnostic numbers them consecutively.
_PRIMITIVE_KEYS = (
    "type",
    "format",
    "items",
    "collectionFormat",
    "default",
    "maximum",
    "exclusiveMaximum",
    "minimum",
    "exclusiveMinimum",
    "maxLength",
    "minLength",
    "pattern",
    "maxItems",
    "minItems",
    "uniqueItems",
    "enum",
    "multipleOf",
)


def _primitive_table(first: int, *, head: MessageTable | None = None) -> MessageTable:
    kinds: dict[str, FieldEncoder] = {
        "type": _string,
        "format": _string,
        "items": _message(lambda v: _primitives_items(v)),
        "collectionFormat": _string,
        "default": _ANY,
        "maximum": _double,
        "exclusiveMaximum": _bool,
        "minimum": _double,
        "exclusiveMinimum": _bool,
        "maxLength": _int64,
        "minLength": _int64,
        "pattern": _string,
        "maxItems": _int64,
        "minItems": _int64,
        "uniqueItems": _bool,
        "enum": _ANYS,
        "multipleOf": _double,
    }
    table = dict(head or {})
    table.update({key: (first + offset, kinds[key]) for offset, key in enumerate(_PRIMITIVE_KEYS)})
    return table


_PRIMITIVES_ITEMS = _primitive_table(1)  # vendor extensions at 18
_HEADER = _primitive_table(1, head={"description": (18, _string)})  # vendor extensions at 19
_PARAM_HEAD: MessageTable = {
    "required": (1, _bool),
    "in": (2, _string),
    "description": (3, _string),
    "name": (4, _string),
}
# header/path sub-schemas: primitives from 5, vendor extensions at 22; query/formData add allowEmptyValue = 5,
# which moves the primitives to 6 and the vendor extensions to 23.
_PATH_OR_HEADER_PARAM = _primitive_table(5, head=_PARAM_HEAD)
_QUERY_OR_FORM_PARAM = _primitive_table(6, head={**_PARAM_HEAD, "allowEmptyValue": (5, _bool)})
# NonBodyParameter's oneof member for each location: (member, table, vendor extension field).
_NON_BODY: dict[str, tuple[int, MessageTable, int]] = {
    "header": (1, _PATH_OR_HEADER_PARAM, 22),
    "formData": (2, _QUERY_OR_FORM_PARAM, 23),
    "query": (3, _QUERY_OR_FORM_PARAM, 23),
    "path": (4, _PATH_OR_HEADER_PARAM, 22),
}
_BODY_PARAM: MessageTable = {
    "description": (1, _string),
    "name": (2, _string),
    "in": (3, _string),
    "required": (4, _bool),
    "schema": (5, _message(_schema)),
}


def _primitives_items(node: Any) -> bytes:
    return _encode_table(node, _PRIMITIVES_ITEMS, what="items", vendor=18)


def _json_reference(node: Any) -> bytes:
    return _encode_table(node, {"$ref": (1, _string), "description": (2, _string)}, what="$ref", vendor=None)


def _parameter(node: Any) -> bytes:
    """Parameter: oneof BodyParameter = 1, NonBodyParameter = 2 (itself a oneof over the locations)."""
    where = node.get("in") if isinstance(node, dict) else None
    if where == "body":
        return _len(1, _encode_table(node, _BODY_PARAM, what="body parameter", vendor=6))
    if where in _NON_BODY:
        member, table, vendor = _NON_BODY[where]
        return _len(2, _len(member, _encode_table(node, table, what=f"{where} parameter", vendor=vendor)))
    raise UnsupportedConstruct(f"parameter with unknown location: {node!r}")


def _parameters_item(node: Any) -> bytes:
    """ParametersItem: oneof Parameter = 1, JsonReference = 2."""
    if isinstance(node, dict) and "$ref" in node:
        return _len(2, _json_reference(node))
    return _len(1, _parameter(node))


# -- responses, operations, paths ----------------------------------------------------------------------------


def _schema_item(node: Any) -> bytes:
    """SchemaItem: oneof Schema = 1, FileSchema = 2 (a response of type file)."""
    if isinstance(node, dict) and node.get("type") == "file":
        return _len(2, _encode_table(node, _FILE_SCHEMA, what="file schema", vendor=10))
    return _len(1, _schema(node))


_FILE_SCHEMA: MessageTable = {
    "format": (1, _string),
    "title": (2, _string),
    "description": (3, _string),
    "default": (4, _ANY),
    "required": (5, _strings),
    "type": (6, _string),
    "readOnly": (7, _bool),
    "externalDocs": (8, _message(_external_docs)),
    "example": (9, _ANY),
}
_RESPONSE: MessageTable = {
    "description": (1, _string),
    "schema": (2, _message(_schema_item)),
    "headers": (
        3,
        _message(lambda v: _named(v, lambda h: _encode_table(h, _HEADER, what="header", vendor=19), what="headers")),
    ),
    "examples": (4, _message(lambda v: _named(v, _any, what="examples"))),
}


def _response_value(node: Any) -> bytes:
    """ResponseValue: oneof Response = 1, JsonReference = 2."""
    if isinstance(node, dict) and "$ref" in node:
        return _len(2, _json_reference(node))
    return _len(1, _encode_table(node, _RESPONSE, what="response", vendor=5))


def _responses(node: Any) -> bytes:
    """Responses: repeated NamedResponseValue response_code = 1, vendor extensions = 2."""
    if not isinstance(node, dict):
        raise UnsupportedConstruct(f"responses: expected an object, got {node!r}")
    codes = b"".join(
        _len(1, _string(1, code) + _len(2, _response_value(value)))
        for code, value in node.items()
        if not code.startswith("x-")
    )
    return codes + b"".join(_len(2, _named_any(key, value)) for key, value in node.items() if key.startswith("x-"))


def _security_requirement(node: Any) -> bytes:
    return _named(node, lambda scopes: _strings(1, scopes), what="security requirement")


_OPERATION: MessageTable = {
    "tags": (1, _strings),
    "summary": (2, _string),
    "description": (3, _string),
    "externalDocs": (4, _message(_external_docs)),
    "operationId": (5, _string),
    "produces": (6, _strings),
    "consumes": (7, _strings),
    "parameters": (8, _repeated(_parameters_item)),
    "responses": (9, _message(_responses)),
    "schemes": (10, _strings),
    "deprecated": (11, _bool),
    "security": (12, _repeated(_security_requirement)),
}


def _operation(node: Any) -> bytes:
    return _encode_table(node, _OPERATION, what="operation", vendor=13)


_PATH_ITEM: MessageTable = {
    "$ref": (1, _string),
    "get": (2, _message(_operation)),
    "put": (3, _message(_operation)),
    "post": (4, _message(_operation)),
    "delete": (5, _message(_operation)),
    "options": (6, _message(_operation)),
    "head": (7, _message(_operation)),
    "patch": (8, _message(_operation)),
    "parameters": (9, _repeated(_parameters_item)),
}


def _paths(node: Any) -> bytes:
    """Paths: vendor extensions = 1, repeated NamedPathItem path = 2."""
    if not isinstance(node, dict):
        raise UnsupportedConstruct(f"paths: expected an object, got {node!r}")
    extensions = b"".join(_len(1, _named_any(key, value)) for key, value in node.items() if key.startswith("x-"))
    paths = b"".join(
        _len(2, _string(1, path) + _len(2, _encode_table(item, _PATH_ITEM, what=path, vendor=10)))
        for path, item in node.items()
        if not path.startswith("x-")
    )
    return extensions + paths


# -- security definitions, info, document --------------------------------------------------------------------


def _oauth2_scopes(node: Any) -> bytes:
    """Oauth2Scopes: repeated NamedString (name = 1, value = 2 as a plain string)."""
    if not isinstance(node, dict):
        raise UnsupportedConstruct(f"scopes: expected an object, got {node!r}")
    return b"".join(_len(1, _string(1, name) + _string(2, text)) for name, text in node.items())


_SECURITY_SCHEMES: dict[tuple[str, str | None], tuple[int, MessageTable, int]] = {
    ("basic", None): (1, {"type": (1, _string), "description": (2, _string)}, 3),
    ("apiKey", None): (
        2,
        {"type": (1, _string), "name": (2, _string), "in": (3, _string), "description": (4, _string)},
        5,
    ),
    ("oauth2", "implicit"): (
        3,
        {
            "type": (1, _string),
            "flow": (2, _string),
            "scopes": (3, _message(_oauth2_scopes)),
            "authorizationUrl": (4, _string),
            "description": (5, _string),
        },
        6,
    ),
    ("oauth2", "password"): (
        4,
        {
            "type": (1, _string),
            "flow": (2, _string),
            "scopes": (3, _message(_oauth2_scopes)),
            "tokenUrl": (4, _string),
            "description": (5, _string),
        },
        6,
    ),
    ("oauth2", "application"): (
        5,
        {
            "type": (1, _string),
            "flow": (2, _string),
            "scopes": (3, _message(_oauth2_scopes)),
            "tokenUrl": (4, _string),
            "description": (5, _string),
        },
        6,
    ),
    ("oauth2", "accessCode"): (
        6,
        {
            "type": (1, _string),
            "flow": (2, _string),
            "scopes": (3, _message(_oauth2_scopes)),
            "authorizationUrl": (4, _string),
            "tokenUrl": (5, _string),
            "description": (6, _string),
        },
        7,
    ),
}


def _security_definitions_item(node: Any) -> bytes:
    kind = node.get("type") if isinstance(node, dict) else None
    key = (kind, node.get("flow") if kind == "oauth2" else None)
    if key not in _SECURITY_SCHEMES:
        raise UnsupportedConstruct(f"security definition of unknown type: {node!r}")
    member, table, vendor = _SECURITY_SCHEMES[key]
    return _len(member, _encode_table(node, table, what=f"{kind} security", vendor=vendor))


_INFO: MessageTable = {
    "title": (1, _string),
    "version": (2, _string),
    "description": (3, _string),
    "termsOfService": (4, _string),
    "contact": (
        5,
        _message(
            lambda v: _encode_table(
                v, {"name": (1, _string), "url": (2, _string), "email": (3, _string)}, what="contact", vendor=4
            )
        ),
    ),
    "license": (
        6,
        _message(lambda v: _encode_table(v, {"name": (1, _string), "url": (2, _string)}, what="license", vendor=3)),
    ),
}

_TAG: MessageTable = {"name": (1, _string), "description": (2, _string), "externalDocs": (3, _message(_external_docs))}

_DOCUMENT: MessageTable = {
    "swagger": (1, _string),
    "info": (2, _message(lambda v: _encode_table(v, _INFO, what="info", vendor=7))),
    "host": (3, _string),
    "basePath": (4, _string),
    "schemes": (5, _strings),
    "consumes": (6, _strings),
    "produces": (7, _strings),
    "paths": (8, _message(_paths)),
    "definitions": (9, _message(lambda v: _named(v, _schema, what="definitions"))),
    "parameters": (10, _message(lambda v: _named(v, _parameter, what="parameters"))),
    "responses": (
        11,
        _message(
            lambda v: _named(v, lambda r: _encode_table(r, _RESPONSE, what="response", vendor=5), what="responses")
        ),
    ),
    "security": (12, _repeated(_security_requirement)),
    "securityDefinitions": (13, _message(lambda v: _named(v, _security_definitions_item, what="securityDefinitions"))),
    "tags": (14, _repeated(lambda v: _encode_table(v, _TAG, what="tag", vendor=4))),
    "externalDocs": (15, _message(_external_docs)),
}


def encode_document(document: dict[str, Any]) -> bytes:
    """A JSON-shaped Swagger 2.0 document as the bytes of gnostic's ``openapi.v2.Document``."""
    return _encode_table(document, _DOCUMENT, what="document", vendor=16)


def _etag(body: bytes) -> str:
    return f'"{hashlib.sha512(body).hexdigest().upper()}"'


@functools.cache
def encoded_v2() -> tuple[bytes, str]:
    """Our v2 document as protobuf, and its ETag (quoted upper-case hex SHA-512, as kube-openapi writes it)."""
    body = encode_document(openapi.document_v2())
    logger.debug("encoded OpenAPI v2 as protobuf", extra={"bytes": len(body)})
    return body, _etag(body)


@functools.cache
def encoded_v2_json() -> tuple[bytes, str]:
    """The JSON encoding with its ETag, so that the aggregator's polling is answered with 304 too."""
    body = openapi.encoded_v2()
    return body, _etag(body)
