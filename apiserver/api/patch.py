"""
PATCH bodies: JSON merge patch (RFC 7386) and JSON patch (RFC 6902), as kube-apiserver applies them to
custom resources. Strategic merge patch needs Go struct tags this kind does not have; like CRDs, it is
refused with 415, and kubectl falls back to merge patch for kinds it does not compile in.
"""

from __future__ import annotations

import copy
from typing import Any

from apiserver.api import errors

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"


def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: Any) -> list[str]:
    if not isinstance(path, str) or (path and not path.startswith("/")):
        raise errors.bad_request(f'the JSON patch path "{path}" is not a JSON pointer')
    if path == "":
        return []
    return [token.replace("~1", "/").replace("~0", "~") for token in path[1:].split("/")]


def _index(container: list[Any], token: str, *, allow_end: bool) -> int:
    if token == "-" and allow_end:
        return len(container)
    if not token.isdigit() or (len(token) > 1 and token.startswith("0")):
        raise errors.bad_request(f'the JSON patch array index "{token}" is not a number')
    index = int(token)
    if index > len(container) or (index == len(container) and not allow_end):
        raise errors.ApiError(code=422, reason="Invalid", message=f"the JSON patch array index {index} is out of range")
    return index


def _parent(doc: Any, tokens: list[str], path: str) -> tuple[Any, str]:
    node = doc
    for token in tokens[:-1]:
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list):
            node = node[_index(node, token, allow_end=False)]
        else:
            raise errors.ApiError(
                code=422, reason="Invalid", message=f'the JSON patch path "{path}" does not exist in the object'
            )
    return node, tokens[-1]


def _get(doc: Any, path: str) -> Any:
    tokens = _pointer(path)
    if not tokens:
        return doc
    parent, last = _parent(doc, tokens, path)
    if isinstance(parent, dict) and last in parent:
        return parent[last]
    if isinstance(parent, list):
        return parent[_index(parent, last, allow_end=False)]
    raise errors.ApiError(code=422, reason="Invalid", message=f'the JSON patch path "{path}" does not exist')


def _remove(doc: Any, path: str) -> Any:
    tokens = _pointer(path)
    if not tokens:
        raise errors.ApiError(code=422, reason="Invalid", message="the JSON patch cannot remove the whole object")
    parent, last = _parent(doc, tokens, path)
    if isinstance(parent, dict) and last in parent:
        return parent.pop(last)
    if isinstance(parent, list):
        return parent.pop(_index(parent, last, allow_end=False))
    raise errors.ApiError(code=422, reason="Invalid", message=f'the JSON patch path "{path}" does not exist')


def _add(doc: Any, path: str, value: Any) -> Any:
    tokens = _pointer(path)
    if not tokens:
        return value
    parent, last = _parent(doc, tokens, path)
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, last, allow_end=True), value)
    else:
        raise errors.ApiError(code=422, reason="Invalid", message=f'the JSON patch path "{path}" does not exist')
    return doc


def json_patch(target: Any, operations: Any) -> Any:
    if not isinstance(operations, list):
        raise errors.bad_request("a JSON patch must be a list of operations")
    doc = copy.deepcopy(target)
    for op in operations:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise errors.bad_request('every JSON patch operation needs "op" and "path"')
        kind, path = op["op"], op["path"]
        if kind in ("add", "replace", "test") and "value" not in op:
            raise errors.bad_request(f'the JSON patch operation "{kind}" needs a "value"')
        if kind == "add":
            doc = _add(doc, path, copy.deepcopy(op["value"]))
        elif kind == "remove":
            _remove(doc, path)
        elif kind == "replace":
            _get(doc, path)  # must exist
            if _pointer(path):
                _remove(doc, path)
            doc = _add(doc, path, copy.deepcopy(op["value"]))
        elif kind in ("move", "copy"):
            source = op.get("from")
            if not isinstance(source, str):
                raise errors.bad_request(f"a JSON patch {kind} operation needs a string 'from'")
            value = copy.deepcopy(_get(doc, source))
            if kind == "move":
                if isinstance(path, str) and isinstance(source, str) and path.startswith(source + "/"):
                    raise errors.bad_request("a JSON patch cannot move a value into itself")
                _remove(doc, source)
            doc = _add(doc, path, value)
        elif kind == "test":
            if _get(doc, path) != op["value"]:
                raise errors.ApiError(
                    code=422,
                    reason="Invalid",
                    message=f'the JSON patch test failed: "{path}" differs from the given value',
                )
        else:
            raise errors.bad_request(f'unknown JSON patch operation "{kind}"')
    return doc


def apply(*, content_type: str, target: dict[str, Any], patch: Any) -> Any:
    if content_type == MERGE_PATCH:
        return merge_patch(target, patch)
    if content_type == JSON_PATCH:
        return json_patch(target, patch)
    raise errors.unsupported_media_type(content_type)
