"""
Reading requests and writing responses the Kubernetes way: bodies in JSON or YAML with a size limit and
duplicate-field detection, query options checked like kube-apiserver checks them, and objects rendered
as JSON or YAML with ``Warning`` headers.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import math
from typing import Any

import yaml
from aiohttp import web

from apiserver.api import errors, patch
from apiserver.api.conventions import negotiate
from apiserver.registry.endpoints import FIELD_VALIDATION_VALUES, WriteOptions


DEFAULT_MAX_BODY_BYTES = 3 * 1024 * 1024  # kube-apiserver's limit for a single object
BODY_LIMIT_KEY: web.AppKey[int] = web.AppKey("max_body_bytes", int)
JSON_TYPES = ("application/json", "")
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml")


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without anchors/aliases: they buy nothing for one object and allow billion-laughs bodies."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "YAML aliases are not allowed", event.start_mark)
        return super().compose_node(parent, index)


@dataclasses.dataclass(frozen=True)
class Body:
    data: Any
    duplicate_fields: tuple[str, ...]


def _json_decode(raw: bytes) -> Body:
    duplicates: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in items:
            if key in result:
                duplicates.append(key)
            result[key] = value
        return result

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(raw, object_pairs_hook=pairs, parse_constant=no_constants)
    except RecursionError:
        raise errors.bad_request("the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise errors.bad_request(f"the request body is not valid JSON: {error}") from None
    return Body(data=data, duplicate_fields=tuple(duplicates))


def _as_json_value(value: Any, path: str = "") -> Any:
    """
    YAML values in JSON terms, as Kubernetes' YAML-to-JSON conversion gives them: timestamps become
    strings, ``!!binary`` base64 text, ``!!set`` a map of nulls, non-string keys strings. Non-finite floats
    have no JSON form and are a 400.
    """
    if isinstance(value, dict):
        return {
            str(key).lower() if isinstance(key, bool) else str(key): _as_json_value(item, f"{path}.{key}")
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_as_json_value(item, f"{path}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, set):
        return {str(item): None for item in value}
    if isinstance(value, dt.datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, float) and not math.isfinite(value):
        raise errors.bad_request(f"the request body holds a number JSON cannot represent at {path or 'the top'}")
    return value


def _yaml_decode(raw: bytes) -> Body:
    try:
        data = yaml.load(raw, Loader=_NoAliasLoader)  # a SafeLoader subclass
        return Body(data=_as_json_value(data), duplicate_fields=())
    except RecursionError:
        raise errors.bad_request("the request body is nested too deeply") from None
    except (yaml.YAMLError, UnicodeDecodeError, ValueError) as error:
        # ValueError: PyYAML turns digits into int() and Python refuses past 4300 digits.
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise errors.bad_request(f"the request body is not valid YAML: {first_line}") from None


async def read_body(request: web.Request, *, allowed: tuple[str, ...]) -> Body:
    """The decoded body; 415 for a content type not in ``allowed``, 413 past the size limit, 400 if malformed."""
    content_type = request.content_type if request.headers.get("Content-Type") else ""
    if content_type not in allowed:
        raise errors.unsupported_media_type(request.headers.get("Content-Type", ""))
    limit = request.app.get(BODY_LIMIT_KEY, DEFAULT_MAX_BODY_BYTES)
    if request.content_length is not None and request.content_length > limit:
        raise errors.request_entity_too_large(limit=limit)
    # StreamReader.read(n) returns what has arrived so far: read until the end, or just past the limit.
    buffer = bytearray()
    while len(buffer) <= limit:
        chunk = await request.content.read(limit + 1 - len(buffer))
        if not chunk:
            break
        buffer += chunk
    raw = bytes(buffer)
    if len(raw) > limit:
        raise errors.request_entity_too_large(limit=limit)
    if not raw.strip():
        raise errors.bad_request("the request body is empty")
    if content_type in YAML_TYPES or content_type == patch.APPLY_PATCH:  # an apply body is YAML (or JSON)
        return _yaml_decode(raw)
    return _json_decode(raw)


WRITE_TYPES = JSON_TYPES + YAML_TYPES
PATCH_TYPES = (patch.MERGE_PATCH, patch.JSON_PATCH, patch.STRATEGIC_MERGE_PATCH, patch.APPLY_PATCH)


def query_bool(request: web.Request, name: str) -> bool:
    value = request.query.get(name)
    if value in (None, "", "false", "0", "False"):
        return False
    if value in ("true", "1", "True"):
        return True
    raise errors.bad_request(f'{name}: Invalid value: "{value}": must be true or false')


def query_int(request: web.Request, name: str, *, minimum: int = 0) -> int | None:
    value = request.query.get(name)
    if value in (None, ""):
        return None
    try:
        number = int(value)
    except ValueError:
        raise errors.bad_request(f'{name}: Invalid value: "{value}": must be an integer') from None
    if number < minimum:
        raise errors.bad_request(f"{name}: Invalid value: {number}: must be greater than or equal to {minimum}")
    return number


def dry_run(request: web.Request) -> bool:
    values = request.query.getall("dryRun", [])
    for value in values:
        if value != "All":
            raise errors.bad_request(f'dryRun: Unsupported value: "{value}": supported values: "All"')
    return bool(values)


def write_options(request: web.Request, body: Body) -> WriteOptions:
    validation = request.query.get("fieldValidation") or "Warn"
    if validation not in FIELD_VALIDATION_VALUES:
        raise errors.bad_request(
            f'fieldValidation: Unsupported value: "{validation}": supported values: "Ignore", "Warn", "Strict"'
        )
    return WriteOptions(dry_run=dry_run(request), field_validation=validation, duplicate_fields=body.duplicate_fields)


def warning_header(text: str) -> str:
    """A ``Warning: 299`` value; field names come from clients, so anything but printable ASCII is escaped."""
    escaped = "".join(
        ch if " " <= ch <= "~" and ch not in '"\\' else ("\\" + ch if ch in '"\\' else f"\\u{ord(ch):04x}")
        for ch in text
    )
    return f'299 - "{escaped}"'


def respond(
    request: web.Request,
    obj: Any,
    *,
    status: int = 200,
    warnings: list[str] | None = None,
    yaml_out: bool | None = None,
) -> web.Response:
    """Render ``obj`` as the client prefers; ``Warning: 299`` headers are how kubectl learns of dropped fields."""
    if yaml_out is None:
        yaml_out = negotiate(request.headers.get("Accept"), allow_table=False)[1] == "yaml"
    if yaml_out:
        body = yaml.safe_dump(obj, sort_keys=False).encode()
        content_type = "application/yaml"
    else:
        pretty = request.query.get("pretty") in ("true", "1")
        body = json.dumps(obj, indent=2 if pretty else None, separators=None if pretty else (",", ":")).encode()
        content_type = "application/json"
    response = web.Response(body=body, status=status, content_type=content_type)
    for warning in warnings or []:
        response.headers.add("Warning", warning_header(warning))
    return response
