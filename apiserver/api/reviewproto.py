"""
Decoding a ``SelfSubjectAccessReview`` sent as Kubernetes protobuf (``application/vnd.kubernetes.protobuf``),
which is how ``kubectl auth can-i`` sends it; dev mode answers it (:mod:`apiserver.handlers.devreviews`).

The envelope is the 4 bytes ``k8s\\0`` then a ``runtime.Unknown`` (1: typeMeta {1: apiVersion, 2: kind},
2: raw); ``raw`` is the ``authorization.k8s.io/v1`` message (field numbers from k8s.io/api's
``authorization/v1/generated.proto``): SelfSubjectAccessReview {2: spec}, spec {1: resourceAttributes,
2: nonResourceAttributes}, ResourceAttributes {1 namespace, 2 verb, 3 group, 4 version, 5 resource,
6 subresource, 7 name}, NonResourceAttributes {1 path, 2 verb}. Written by hand (a wire-format reader of
varints and length-delimited fields) because no Python package ships these messages; only the string fields
above are read, everything else is skipped. The bytes are untrusted: any malformation raises ValueError.
"""

from __future__ import annotations

from typing import Any

MAGIC = b"k8s\x00"
_RESOURCE_FIELDS = {1: "namespace", 2: "verb", 3: "group", 4: "version", 5: "resource", 6: "subresource", 7: "name"}
_NON_RESOURCE_FIELDS = {1: "path", 2: "verb"}


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def fields(data: bytes) -> dict[int, bytes]:
    """The length-delimited fields of one message by number (the last occurrence wins, as in protobuf)."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise ValueError("a field runs past the end of the message")
            out[number] = data[pos : pos + length]
            pos += length
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if pos > len(data):
        raise ValueError("truncated message")
    return out


def _strings(data: bytes, names: dict[int, str]) -> dict[str, str]:
    found = fields(data)
    return {name: found.get(number, b"").decode("utf-8") for number, name in names.items()}


def decode_self_subject_access_review(body: bytes) -> dict[str, Any]:
    """The review as the JSON form would carry it (``kind``, ``apiVersion``, ``spec``); ValueError if malformed."""
    if not body.startswith(MAGIC):
        raise ValueError("not a Kubernetes protobuf message (no k8s\\0 prefix)")
    unknown = fields(body[len(MAGIC) :])
    type_meta = fields(unknown.get(1, b""))
    spec = fields(fields(unknown.get(2, b"")).get(2, b""))
    out: dict[str, Any] = {
        "kind": type_meta.get(2, b"").decode("utf-8"),
        "apiVersion": type_meta.get(1, b"").decode("utf-8"),
        "spec": {},
    }
    if 1 in spec:
        out["spec"]["resourceAttributes"] = _strings(spec[1], _RESOURCE_FIELDS)
    if 2 in spec:
        out["spec"]["nonResourceAttributes"] = _strings(spec[2], _NON_RESOURCE_FIELDS)
    return out
