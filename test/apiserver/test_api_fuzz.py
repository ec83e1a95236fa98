"""
No input makes the server answer 500 or die: the API fuzzed from its own OpenAPI document.

The test reads ``/openapi/v3`` and the group-version document from the running ``coredump-apiserver``
(memory store, real TLS, dev client certificates) and drives every published operation (method + path
template) with requests that hypothesis derives from that document: path parameters (valid names and
hostile ones), every declared query parameter with well- and ill-typed values, and bodies generated from
the request schema (valid objects, wrong types, extra fields, deep nesting, huge strings, non-JSON bytes,
YAML) in every declared content type and in unknown ones. Every answer must be below 500, every error a
Kubernetes ``Status`` whose ``code`` is the HTTP status, and the server must still be alive at the end
with no traceback in its log.

Examples are derandomized (``derandomize=True``, no example database), so a failure reproduces by
running the test again; hypothesis prints the failing request.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import datetime
import http.client
import json
import logging
import os
import ssl
import subprocess
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures_apiserver import BIN, RunningServer, endpoint_manifest, start_apiserver

logger = logging.getLogger(__name__)

pytestmark = pytest.mark.slow

GV_PATH = "/apis/coredump.example.io/v1alpha1"
FUZZ_NS = "fuzz"
POOL = [f"fuzz-{i}" for i in range(4)]  # objects that exist, so item operations reach the registry
CORE_POD, CORE_UID, CORE_CONTAINER = POOL[0], "5f1c3b2a-8d4e-4f6a-9b7c-0d1e2f3a4b5c", "app"
# A longer hunt: COREDUMP_FUZZ_EXAMPLES=1000 (the default keeps the module well under a minute).
EXAMPLES_PER_OPERATION = int(os.environ.get("COREDUMP_FUZZ_EXAMPLES", "50"))
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)


# --------------------------------------------------------------------------------------------------
# The client: one fresh TLS connection per request, so a request that leaves a connection in a bad
# state cannot spoil the next one.


@dataclasses.dataclass(frozen=True)
class FuzzRequest:
    method: str
    path: str
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    user: str | None = "admin"

    def __repr__(self) -> str:  # hypothesis prints this for a failing example
        body = None if self.body is None else (self.body[:300] + (b"..." if len(self.body) > 300 else b""))
        size = None if self.body is None else len(self.body)
        return (
            f"FuzzRequest(method={self.method!r}, path={self.path[:400]!r}, headers={self.headers!r}, "
            f"user={self.user!r}, body[{size}]={body!r})"
        )


@dataclasses.dataclass(frozen=True)
class FuzzResponse:
    status: int
    content_type: str
    body: bytes
    streamed: bool


# Bugs this test found, by the line the server logs for them, while they were being fixed: the fuzzing
# tolerates exactly these so that it keeps looking for others. Empty: the four it found are fixed, and
# each has a regression test at the end of this file.
KNOWN_BUGS: dict[str, tuple[str, ...]] = {}


def known_bug(logged: str) -> str | None:
    for line in logged.splitlines():
        for bug, signature in KNOWN_BUGS.items():
            if all(part in line for part in signature):
                return bug
    return None


class Client:
    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.known_bugs_hit: collections.Counter[str] = collections.Counter()
        self.contexts: dict[str | None, ssl.SSLContext] = {
            user: server.ssl_context(user=user) for user in ("admin", "viewer", None)
        }

    def send(self, request: FuzzRequest) -> FuzzResponse:
        connection = http.client.HTTPSConnection(
            "127.0.0.1", self.server.port, context=self.contexts[request.user], timeout=30
        )
        try:
            connection.request(request.method, request.path, body=request.body, headers=dict(request.headers))
            try:
                response = connection.getresponse()
            except http.client.RemoteDisconnected:
                return FuzzResponse(status=0, content_type="", body=b"", streamed=False)
            content_type = response.getheader("Content-Type", "")
            streamed = response.status < 400 and response.getheader("Content-Length") is None
            # A watch streams until its timeout: its status line is the answer; hanging up is part of the test.
            body = b"" if streamed else response.read()
            return FuzzResponse(status=response.status, content_type=content_type, body=body, streamed=streamed)
        finally:
            connection.close()


def server_log(server: RunningServer) -> str:
    return server.log_path.read_text(errors="replace")


def unexpected_tracebacks(log: str, *, known: bool = True) -> list[str]:
    """Traceback lines in the log, without those of KNOWN_BUGS unless ``known`` is False."""
    return [line for line in log.splitlines() if "Traceback" in line and not (known and known_bug(line))]


def assert_server_healthy(world: FuzzWorld, *, since: int) -> None:
    """Still serving, and nothing unexpected went wrong inside since the test began."""
    log = server_log(world.server)
    assert world.server.alive(), log[-3000:]
    assert world.server.request("GET", "/readyz").status == 200
    assert not unexpected_tracebacks(log[since:]), unexpected_tracebacks(log[since:])


def too_large_resource_version(response: FuzzResponse) -> bool:
    """kube-apiserver's own answer to a resourceVersion from the future: 504 Timeout, cause
    ResourceVersionTooLarge, Retry-After (reflectors wait and retry on it). An answer, not a failure."""
    if response.status != 504:
        return False
    try:
        causes = json.loads(response.body).get("details", {}).get("causes", [])
    except ValueError:
        return False
    return any(cause.get("reason") == "ResourceVersionTooLarge" for cause in causes)


def check_response(request: FuzzRequest, response: FuzzResponse) -> None:
    """The contract every answer keeps, whatever was asked."""
    context = f"{request!r}\n-> {response.status} {response.body[:1000]!r}"
    assert 100 <= response.status < 500 or too_large_resource_version(response), context
    if response.status >= 400 and request.method != "HEAD":
        assert response.content_type.startswith("application/json"), context
        status = json.loads(response.body)
        assert status.get("kind") == "Status", context
        assert status.get("apiVersion") == "v1", context
        assert status.get("code") == response.status, context
        assert isinstance(status.get("reason"), str) and status["reason"], context
        assert status.get("status") == "Failure", context
    elif not response.streamed and response.content_type.startswith("application/json"):
        json.loads(response.body)  # a success is well-formed JSON too


# --------------------------------------------------------------------------------------------------
# The OpenAPI document: operations and their schemas.


@dataclasses.dataclass(frozen=True)
class Operation:
    method: str
    template: str
    operation_id: str
    parameters: tuple[dict[str, Any], ...]
    body_content: tuple[tuple[str, dict[str, Any]], ...]  # (content type, schema)

    @property
    def path_parameters(self) -> list[str]:
        return [p["name"] for p in self.parameters if p.get("in") == "path"]

    @property
    def query_parameters(self) -> list[dict[str, Any]]:
        return [p for p in self.parameters if p.get("in") == "query"]


def load_document(server: RunningServer) -> dict[str, Any]:
    root = server.request("GET", "/openapi/v3")
    assert root.status == 200, root.body
    url = root.json()["paths"][GV_PATH.lstrip("/")]["serverRelativeURL"]
    document = server.request("GET", url)
    assert document.status == 200, document.body
    return document.json()


def operations_of(document: dict[str, Any]) -> list[Operation]:
    found = []
    for template, item in document["paths"].items():
        shared = item.get("parameters", [])
        for method, op in item.items():
            if method.upper() not in METHODS:
                continue
            content = (op.get("requestBody") or {}).get("content", {})
            found.append(
                Operation(
                    method=method.upper(),
                    template=template,
                    operation_id=op.get("operationId", f"{method} {template}"),
                    parameters=tuple(shared + op.get("parameters", [])),
                    body_content=tuple((ctype, media.get("schema", {})) for ctype, media in content.items()),
                )
            )
    return found


class Schemas:
    """Hypothesis strategies for the values a JSON schema in the document describes."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.components = document.get("components", {}).get("schemas", {})

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema or ("allOf" in schema and "type" not in schema and "properties" not in schema):
            if "$ref" in schema:
                schema = self.components[schema["$ref"].rsplit("/", 1)[-1]]
            else:
                merged: dict[str, Any] = {}
                for part in schema["allOf"]:
                    merged.update(self.resolve(part))
                schema = merged
        return schema

    def values(self, schema: dict[str, Any], *, depth: int = 0) -> st.SearchStrategy[Any]:
        schema = self.resolve(schema)
        kind = schema.get("type")
        if depth > 6:
            return st.none()
        if kind == "object" or "properties" in schema:
            props = schema.get("properties", {})
            optional = {k: self.values(v, depth=depth + 1) for k, v in props.items()}
            base = st.fixed_dictionaries({}, optional=optional)
            extra = schema.get("additionalProperties")
            if isinstance(extra, dict):
                return st.dictionaries(label_keys(), self.values(extra, depth=depth + 1), max_size=3)
            if not props:
                return st.dictionaries(st.text(max_size=8), json_values(), max_size=4)
            return base
        if kind == "array":
            return st.lists(self.values(schema.get("items", {}), depth=depth + 1), max_size=3)
        if kind == "integer":
            bits = 31 if schema.get("format") == "int32" else 63
            return st.integers(-(2**bits), 2**bits - 1)
        if kind == "boolean":
            return st.booleans()
        if kind == "string":
            if schema.get("format") == "date-time":
                return st.one_of(
                    st.datetimes(timezones=st.just(datetime.timezone.utc)).map(
                        lambda t: t.isoformat().replace("+00:00", "Z")
                    ),
                    st.text(max_size=30),
                )
            return st.text(max_size=30)
        return json_values()


def label_keys() -> st.SearchStrategy[str]:
    return st.one_of(st.from_regex(r"\A[a-z0-9]([a-z0-9.-]{0,20}[a-z0-9])?(/[a-z0-9]{1,10})?\Z"), st.text(max_size=20))


def json_values() -> st.SearchStrategy[Any]:
    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
        max_leaves=8,
    )


def yaml_only_values() -> st.SearchStrategy[Any]:
    """What YAML can say and JSON cannot: timestamps, binary, sets, non-string keys."""
    return st.one_of(
        st.dates(),
        st.datetimes(),
        st.binary(max_size=8),
        st.frozensets(st.integers(), max_size=3).map(set),
        st.dictionaries(
            st.one_of(st.integers(), st.booleans(), st.none(), st.floats(allow_nan=False), st.dates()),
            st.text(max_size=5),
            min_size=1,
            max_size=2,
        ),
    )


# --------------------------------------------------------------------------------------------------
# Request parts.

DNS_LABEL = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?\Z")
HOSTILE_NAMES = [
    "..",
    ".",
    "%2e%2e",
    "%2E%2E%2F",
    "..%2F..%2Fetc",
    "%2e",
    "a%2Fb",
    "%00",
    "%",
    "%zz",
    "a;b",
    "~",
    "default%2F..%2Fkube-system",
    "x" * 254,
    "x" * 4000,
    "Ünïcødé",
    "名前",
    "💥",
    "a b",
    "A",
    "-leading",
    "trailing-",
    "a.b",
    "a_b",
    "\u202e",
    "null",
    "0",
]


def path_value(name: str) -> st.SearchStrategy[str]:
    """One path segment, already URL-encoded (a hostile value sometimes keeps its own % escapes and /)."""
    valid = st.sampled_from([FUZZ_NS] * 3 + ["default"]) if name == "namespace" else st.sampled_from([CORE_POD, *POOL])
    raw = st.one_of(
        valid, valid, valid, valid, DNS_LABEL, st.sampled_from(HOSTILE_NAMES), st.text(max_size=40), st.just("")
    )
    return st.tuples(raw, st.sampled_from(["", "%", "%/"])).map(
        lambda pair: urllib.parse.quote(pair[0], safe=pair[1] + "-._~")
    )


INTERESTING_QUERY = {
    "fieldValidation": ["Strict", "Warn", "Ignore", "strict", ""],
    "dryRun": ["All", "all", "None", ""],
    "resourceVersionMatch": ["Exact", "NotOlderThan", "exact"],
    "resourceVersion": ["0", "1", "-1", "999999999999999999999", "abc", ""],
    "labelSelector": ["a=b", "a in (b,c)", "!a", "a,b!=c", "a=", "=", "(", "a in (", "a notin ()", "x" * 400],
    "fieldSelector": [
        "metadata.name=fuzz-0",
        "metadata.namespace!=fuzz",
        "spec.podUID=x",
        "status.x=y",
        "a",
        "metadata.name==a",
        "metadata.name",
    ],
    "propagationPolicy": ["Orphan", "Background", "Foreground", "Never"],
    "continue": ["", "abc", "eyJ2IjoibWV0YS5rOHMuaW8vdjEiLCJydiI6MSwic3RhcnQiOiJhIn0=", "%%%"],
    "pretty": ["true", "false", "1", "yes"],
    "timeoutSeconds": ["0", "1"],  # a watch with a long timeout stays open; it is still only hung up on
    "container": [CORE_CONTAINER, "..", "a/b"],
    "core": ["x", ".."],
    "since": ["2000-01-01T00:00:00Z", "yesterday"],
}


def query_value(parameter: dict[str, Any]) -> st.SearchStrategy[str]:
    kind = (parameter.get("schema") or {}).get("type")
    ill_typed = st.one_of(st.text(max_size=20), st.sampled_from(["", "1.5", "1e3", "true", "null", "[]", "0x10"]))
    if kind == "integer":
        well = st.one_of(st.integers(-10, 1000), st.integers()).map(str)
    elif kind == "boolean":
        well = st.sampled_from(["true", "false", "1", "0", "True", "False"])
    else:
        well = st.text(max_size=30)
    known = st.sampled_from(INTERESTING_QUERY.get(parameter["name"], [""]))
    return st.one_of(known, known, well, ill_typed)


@st.composite
def query_string(draw: st.DrawFn, operation: Operation) -> str:
    pairs: list[tuple[str, str]] = []
    for parameter in operation.query_parameters:
        if draw(st.integers(0, 3)) == 0:  # each parameter in about a quarter of the requests
            pairs.append((parameter["name"], draw(query_value(parameter))))
            if draw(st.integers(0, 9)) == 0:
                pairs.append((parameter["name"], draw(query_value(parameter))))  # repeated
    if draw(st.integers(0, 9)) == 0:
        pairs.append((draw(st.text(min_size=1, max_size=10)), draw(st.text(max_size=10))))  # undeclared
    if operation.method == "GET" and any(p["name"] == "watch" for p in operation.query_parameters):
        # A watch without a timeout would hold a server task for half an hour after we hang up.
        if any(k == "watch" for k, _ in pairs) and not any(k == "timeoutSeconds" for k, _ in pairs):
            pairs.append(("timeoutSeconds", "1"))
    return urllib.parse.urlencode(pairs, quote_via=urllib.parse.quote)


UNKNOWN_CONTENT_TYPES = [
    "text/plain",
    "application/xml",
    "application/vnd.kubernetes.protobuf",
    "application/apply-patch+yaml",
    "application/strategic-merge-patch+json",
    "application/json; charset=utf-8",
    "application/json;charset=latin-1",
    "APPLICATION/JSON",
    "multipart/form-data; boundary=x",
    "application/x-www-form-urlencoded",
    "*/*",
    "application/",
    ";",
    "application/json, text/plain",
    "application/yaml; charset=utf-16",
]


def nested(depth: int, *, yaml_flow: bool = False) -> bytes:
    if yaml_flow:
        return b"[" * depth + b"]" * depth
    return b'{"metadata":{"annotations":' + b'{"a":' * depth + b"1" + b"}" * depth + b"}}"


def hostile_raw_bodies(*, yaml_type: bool) -> st.SearchStrategy[bytes]:
    """Bytes no generator of objects produces."""
    fixed = [
        b"",
        b"   ",
        b"\x00\xff\xfe",
        b"{",
        b'{"a":1,"a":2}',
        b"NaN",
        b'{"x": Infinity}',
        b"[]",
        b"null",
        b'"text"',
        b"123",
        b'{"metadata":{"generation":' + b"9" * 5000 + b"}}",
        b"\xef\xbb\xbf{}",
        b'{"apiVersion":"coredump.example.io/v1alpha1","kind":"CoredumpEndpoint","metadata":{"name":"\xff"}}',
        b'{"metadata":' * 100_000,
        b"[" * 200_000,
        nested(900),
        nested(980),
        nested(3000),
        b'{"spec":{"podUID":"' + b"u" * (4 * 1024 * 1024) + b'"}}',
        b'[{"op":"add","path":"/metadata/labels","value":' + b"[" * 950 + b"]" * 950 + b"}]",
    ]
    yaml_fixed = [
        b"a: &x [1]\nb: *x\n",
        b"!!python/object/apply:os.system ['true']\n",
        b"---\na: 1\n---\nb: 2\n",
        b"? [1, 2]\n: x\n",
        b"metadata: {name: !!binary aGk=}\n",
        b"\t- a\n",
        b"metadata: {name: 2020-01-01}\n",
        b"spec: !!set {a, b}\n",
        b"1: 2\n",
        b"kind: .nan\n",
        nested(5000, yaml_flow=True),
        b"apiVersion: coredump.example.io/v1alpha1\nkind: CoredumpEndpoint\nmetadata:\n  name: y\n"
        b"  labels: {1: a, true: b}\nspec: {podUID: x}\n",
    ]
    return st.sampled_from(fixed + (yaml_fixed if yaml_type else []))


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[Any], *, yaml_type: bool) -> Any:
    """A generated object with a few nodes given the wrong type, extra fields or deep nesting."""
    obj = draw(base)
    if not isinstance(obj, dict):
        return obj
    obj = copy.deepcopy(obj)
    for _ in range(draw(st.integers(1, 3))):
        containers: list[Any] = []

        def walk(node: Any) -> None:
            if isinstance(node, dict | list):
                containers.append(node)  # noqa: B023
                for child in node.values() if isinstance(node, dict) else node:
                    walk(child)

        walk(obj)
        node = draw(st.sampled_from(containers))
        replacement = draw(st.one_of(json_values(), yaml_only_values()) if yaml_type else json_values())
        if draw(st.booleans()) and isinstance(node, dict):
            node[draw(st.text(max_size=10))] = replacement  # an extra (or replaced) field
        elif isinstance(node, dict) and node:
            node[draw(st.sampled_from(sorted(node, key=repr)))] = replacement  # a field with a wrong type
        elif isinstance(node, list) and node:
            node[draw(st.integers(0, len(node) - 1))] = replacement
    if draw(st.integers(0, 4)) == 0:
        value: Any = "leaf"
        for _ in range(draw(st.sampled_from([50, 300, 700]))):
            value = {"n": value} if draw(st.booleans()) else [value]
        obj[draw(st.sampled_from(["spec", "status", "metadata", "extra"]))] = value
    return obj


@st.composite
def valid_endpoint(
    draw: st.DrawFn, schemas: Schemas, schema: dict[str, Any], *, namespace: str, name: str | None
) -> dict[str, Any]:
    """A schema-generated CoredumpEndpoint made acceptable: right type meta, a good name and pod UID."""
    obj = draw(schemas.values(schema))
    if not isinstance(obj, dict):
        obj = {}
    obj["apiVersion"], obj["kind"] = "coredump.example.io/v1alpha1", "CoredumpEndpoint"
    metadata = obj["metadata"] = {}
    metadata["name"] = name or draw(st.one_of(st.sampled_from(POOL), DNS_LABEL))
    if draw(st.booleans()):
        metadata["namespace"] = namespace
    if draw(st.booleans()):
        metadata["labels"] = draw(
            st.dictionaries(st.from_regex(r"\A[a-z]{1,8}\Z"), st.from_regex(r"\A[a-z0-9]{0,8}\Z"), max_size=3)
        )
    obj["spec"] = {"podUID": CORE_UID if metadata["name"] == CORE_POD else draw(st.uuids().map(str))}
    if draw(st.booleans()):
        obj.pop("status", None)
    return obj


JSON_PATCH_PATHS = [
    "",
    "/",
    "/metadata",
    "/metadata/labels",
    "/metadata/labels/a",
    "/metadata/labels/a~1b",
    "/metadata/name",
    "/metadata/resourceVersion",
    "/metadata/uid",
    "/spec/podUID",
    "/spec",
    "/status",
    "/status/cores/-",
    "/status/cores/0",
    "/status/cores/99999999999999999999",
    "/status/cores/01",
    "/kind",
    "/apiVersion",
    "/-",
    "/metadata/labels/~2",
    "metadata",
    "/a/b/c/d",
    "/metadata/finalizers/-",
    "/metadata/annotations",
]


def json_patch() -> st.SearchStrategy[Any]:
    op = st.fixed_dictionaries(
        {"op": st.sampled_from(["add", "remove", "replace", "move", "copy", "test", "bogus", ""])},
        optional={
            "path": st.one_of(st.sampled_from(JSON_PATCH_PATHS), st.text(max_size=10), json_values()),
            "from": st.sampled_from(JSON_PATCH_PATHS),
            "value": json_values(),
        },
    )
    return st.one_of(st.lists(op, max_size=4), json_values())


@st.composite
def body_for(
    draw: st.DrawFn, operation: Operation, schemas: Schemas, *, namespace: str, name: str | None
) -> tuple[bytes | None, str | None]:
    """A body and its Content-Type header (None: no header)."""
    declared = [ctype for ctype, _ in operation.body_content]
    if not declared and draw(st.integers(0, 4)) != 0:
        return None, None  # operations without a body mostly get none
    content_type = draw(
        st.one_of(
            st.sampled_from(declared or ["application/json"]),
            st.sampled_from(declared or ["application/json"]),
            st.sampled_from(UNKNOWN_CONTENT_TYPES),
            st.none(),
        )
    )
    yaml_type = content_type is not None and "yaml" in content_type
    schema = dict(operation.body_content).get(content_type or "", (operation.body_content or (("", {}),))[0][1])
    resolved = schemas.resolve(schema)
    is_endpoint = "CoredumpEndpoint" in json.dumps(resolved.get("x-kubernetes-group-version-kind", ""))
    if is_endpoint:
        valid = valid_endpoint(
            schemas,
            schema,
            namespace=urllib.parse.unquote(namespace),
            name=urllib.parse.unquote(name) if name else None,
        )
    elif content_type == "application/json-patch+json":
        valid = json_patch()
    else:
        valid = schemas.values(schema)
    shape = draw(st.sampled_from(["valid", "valid", "schema", "mutated", "raw", "huge", "json"]))
    if shape == "raw":
        return draw(hostile_raw_bodies(yaml_type=yaml_type)), content_type
    if shape == "valid":
        obj = draw(valid)
    elif shape == "schema":
        obj = draw(schemas.values(schema))
    elif shape == "mutated":
        obj = draw(mutated(valid, yaml_type=yaml_type))
    elif shape == "huge":
        obj = draw(valid)
        size = draw(st.sampled_from([70_000, 1024 * 1024, 3 * 1024 * 1024 - 200, 3 * 1024 * 1024 + 1]))
        filler = draw(st.sampled_from(["x", "é", "\u2603", "\\"])) * (size // 3)
        if isinstance(obj, dict):
            target = obj["metadata"] if isinstance(obj.get("metadata"), dict) else obj
            target[draw(st.sampled_from(["name", "annotations", "generateName", "huge"]))] = (
                {"big": filler} if draw(st.booleans()) else filler
            )
        else:
            obj = [obj, filler]
    else:
        obj = draw(json_values())
    as_yaml = yaml_type and draw(st.integers(0, 3)) != 0
    return encode(obj, as_yaml=as_yaml, allow_unicode=draw(st.booleans())), content_type


def encode(obj: Any, *, as_yaml: bool, allow_unicode: bool) -> bytes:
    """JSON or YAML as asked; what one cannot write (YAML-only values, nesting past PyYAML's recursion) goes
    in the other, and failing both, JSON with the odd values as strings."""
    encoders = [lambda: yaml.safe_dump(obj, allow_unicode=allow_unicode).encode(), lambda: json.dumps(obj).encode()]
    for encoder in encoders if as_yaml else encoders[::-1]:
        try:
            return encoder()
        except (TypeError, ValueError, RecursionError, yaml.YAMLError):
            continue
    return json.dumps(obj, default=repr).encode()


ACCEPTS = [
    None,
    "application/json",
    "application/yaml",
    "application/json;as=Table;v=v1;g=meta.k8s.io",
    "application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io",
    "application/json;as=PartialObjectMetadata;v=v1;g=meta.k8s.io",
    "application/vnd.kubernetes.protobuf",
    "text/html",
    "*/*",
    "application/json;as=Table;v=v1beta1;g=meta.k8s.io",
    "a/b;c",
    ";;;",
    "",
]


@st.composite
def requests_for(draw: st.DrawFn, operation: Operation, schemas: Schemas) -> FuzzRequest:
    values = {p: draw(path_value(p)) for p in operation.path_parameters}
    path = operation.template
    for parameter, value in values.items():
        path = path.replace("{" + parameter + "}", value)
    query = draw(query_string(operation))
    if query:
        path += "?" + query
    # Mostly the declared method; now and then one the path does not declare (405 is a Status too).
    method = operation.method
    if draw(st.integers(0, 7)) == 0:
        method = draw(st.sampled_from(METHODS + ("OPTIONS", "PROPFIND")))
    body, content_type = draw(
        body_for(operation, schemas, namespace=values.get("namespace", FUZZ_NS), name=values.get("name"))
    )
    headers: list[tuple[str, str]] = []
    if content_type is not None and body is not None:
        headers.append(("Content-Type", content_type))
    accept = draw(st.sampled_from(ACCEPTS))
    if accept is not None:
        headers.append(("Accept", accept))
    user = draw(st.sampled_from(["admin"] * 8 + ["viewer", None]))
    return FuzzRequest(method=method, path=path, body=body, headers=tuple(headers), user=user)


def baseline_request(operation: Operation, schemas: Schemas) -> FuzzRequest:
    """The well-formed request for ``operation``: pool names, no query, the simplest body of the first
    declared content type that fits, as kubectl would send it."""
    name = CORE_POD if operation.template.endswith("/dump") else POOL[1]
    path = operation.template.replace("{namespace}", FUZZ_NS).replace("{name}", name)
    if not operation.body_content:
        return FuzzRequest(method=operation.method, path=path)
    types = dict(operation.body_content)
    content_type = next(
        (t for t in ("application/json", "application/merge-patch+json") if t in types), operation.body_content[0][0]
    )
    schema = schemas.resolve(types[content_type])
    body: Any
    if operation.method == "POST":
        body = endpoint_manifest(f"baseline-{uuid.uuid4().hex[:8]}", namespace=FUZZ_NS)
    elif operation.method == "PUT":
        body = endpoint_manifest(name, namespace=FUZZ_NS, pod_uid=pool_uid(name), labels={"replaced": "yes"})
    elif content_type == "application/json-patch+json":
        body = [{"op": "add", "path": "/metadata/labels", "value": {"patched": "yes"}}]
    elif operation.method == "PATCH":
        body = {"metadata": {"labels": {"patched": "yes"}}}
    else:
        body = {"kind": "DeleteOptions", "apiVersion": "v1"} if "DeleteOptions" in json.dumps(schema) else {}
    return FuzzRequest(
        method=operation.method, path=path, body=json.dumps(body).encode(), headers=(("Content-Type", content_type),)
    )


# --------------------------------------------------------------------------------------------------
# The server under test, with objects to hit and a stored core behind one of them.


def import_core(server: RunningServer, tmp_path: Path) -> str:
    """File a core for CORE_POD through the real ``coredump-handler import``; returns its core id."""
    core = tmp_path / "core"
    # An ELF header saying ET_CORE (import takes only cores), then filler.
    core.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(9) + (4).to_bytes(2, "little") + bytes(46) + bytes(range(256)) * 64)
    # Every handler path is given: its defaults are the node's (/host/var/lib/coredump), never a test machine's.
    subprocess.run(
        [
            str(BIN / "coredump-handler"),
            "--config",
            str(tmp_path / "absent.json"),
            "--storage-root",
            str(server.storage_root),
            "--spool-dir",
            str(tmp_path / "spool"),
            "--state-dir",
            str(tmp_path / "state"),
            "--crictl",
            "",
            "import",
            "--namespace",
            FUZZ_NS,
            "--pod",
            CORE_POD,
            "--pod-uid",
            CORE_UID,
            "--container",
            CORE_CONTAINER,
            "--pid",
            "42",
            "--signal",
            "11",
            "--comm",
            "app",
            str(core),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    stored = list((server.storage_root / FUZZ_NS / CORE_POD / CORE_UID / CORE_CONTAINER).glob("*.json"))
    assert len(stored) == 1, stored
    return stored[0].name.removesuffix(".json")


def pool_uid(name: str) -> str:
    return CORE_UID if name == CORE_POD else str(uuid.uuid5(uuid.NAMESPACE_DNS, name))


def ensure_pool(server: RunningServer) -> None:
    for name in POOL:
        manifest = endpoint_manifest(name, namespace=FUZZ_NS, pod_uid=pool_uid(name))
        response = server.request("POST", f"{GV_PATH}/namespaces/{FUZZ_NS}/coredumpendpoints", body=manifest)
        assert response.status in (201, 409), response.body


@dataclasses.dataclass
class FuzzWorld:
    server: RunningServer
    client: Client
    core_id: str


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzWorld]:
    directory = tmp_path_factory.mktemp("fuzz")
    server = start_apiserver(directory)
    try:
        core_id = import_core(server, directory)
        ensure_pool(server)
        yield FuzzWorld(server=server, client=Client(server), core_id=core_id)
    finally:
        server.stop()


def fire(world: FuzzWorld, request: FuzzRequest) -> FuzzResponse:
    log_size = world.server.log_path.stat().st_size
    response = world.client.send(request)
    if response.status == 0 or (response.status >= 500 and not too_large_resource_version(response)):
        # No answer or a 500: tolerated only as a known bug, recognized by the line it logged for this request.
        with world.server.log_path.open("rb") as log:
            log.seek(log_size)
            logged = log.read().decode(errors="replace")
        bug = known_bug(logged)
        assert bug, (
            f"{request!r}\n-> {response.status or 'connection closed without an answer'} "
            f"{response.body[:500]!r}\nserver log of this request:\n{logged[-6000:]}"
        )
        world.client.known_bugs_hit[bug] += 1
        return response
    check_response(request, response)
    if request.method == "DELETE" and response.status < 300:
        ensure_pool(world.server)  # keep item operations reaching real objects
    return response


# --------------------------------------------------------------------------------------------------
# The tests.


def test_every_operation_survives_generated_requests(world: FuzzWorld) -> None:
    log_start = len(server_log(world.server))
    document = load_document(world.server)
    operations = operations_of(document)
    schemas = Schemas(document)
    published = {(op.method, op.template.rsplit("/", 1)[-1]) for op in operations}
    # The document must publish what the fuzzing relies on, or this test would quietly test less.
    assert {
        ("GET", "coredumpendpoints"),
        ("POST", "coredumpendpoints"),
        ("PUT", "{name}"),
        ("PATCH", "{name}"),
        ("DELETE", "{name}"),
        ("GET", "dump"),
    } <= published, published
    statuses: dict[str, collections.Counter[int]] = {}

    for operation in operations:
        # First the plain request the document describes, which must succeed: the fuzzing below then
        # varies requests that reach a working operation, not one that refuses everything.
        ensure_pool(world.server)
        baseline = baseline_request(operation, schemas)
        answer = fire(world, baseline)
        assert 200 <= answer.status < 300, (baseline, answer)
        seen = statuses.setdefault(operation.operation_id, collections.Counter())

        @FUZZ_SETTINGS
        @given(request=requests_for(operation, schemas))
        def check(request: FuzzRequest) -> None:
            seen[fire(world, request).status] += 1  # noqa: B023

        check()

    print(
        "statuses per operation:",
        {k: dict(sorted(v.items())) for k, v in statuses.items()},
        "known bugs hit:",
        dict(world.client.known_bugs_hit),
    )
    assert_server_healthy(world, since=log_start)


HOSTILE_FILTERS = {
    "container": [
        "..",
        ".",
        "../app",
        "app/..",
        "app/../app",
        "/etc/passwd",
        "%2e%2e",
        "app\x00",
        "app\n",
        "a" * 300,
        "ÄPP",
        "app%2f..",
        " app",
        "app ",
        "APP",
        "-app",
        "app-",
        "a.b",
        "a_b",
        "*",
        "app*",
        "[a]",
        "\\",
    ],
    "core": [
        "..",
        "../../../../etc/passwd",
        "/",
        "x/..",
        "core\x00",
        "a" * 1000,
        "💥",
        "%2e%2e%2f",
        ".json",
        "x.core.gz",
        "*",
        "?",
        "20261124T002741Z-app-42-11/../x",
        " ",
        "\t",
    ],
    "since": [
        "yesterday",
        "0",
        "-1",
        "2026-02-30T00:00:00Z",
        "2026-13-01T00:00:00Z",
        "2026-01-01T24:00:00Z",
        "2026-01-01T00:00:60Z",
        "2026-01-01T00:00:00",
        "2026-01-01",
        "2026-01-01T00:00:00+99:99",
        "0000-00-00T00:00:00Z",
        "99999-01-01T00:00:00Z",
        "2026-01-01T00:00:00.1234567890123Z",
        "2026-01-01T00:00:00Zjunk",
        "2026-01-01t00:00:00x",
        "１９９９-01-01T00:00:00Z",
        "%",
        "\x00",
    ],
}


@st.composite
def hostile_dump_query(draw: st.DrawFn) -> list[tuple[str, str]]:
    """At least one hostile filter, maybe with valid ones, repeats, empties or unknown keys beside it."""
    key = draw(st.sampled_from(sorted(HOSTILE_FILTERS)))
    pairs = [
        (
            key,
            draw(
                st.one_of(
                    st.sampled_from(HOSTILE_FILTERS[key]),
                    st.text(min_size=1, max_size=30).filter(lambda v: v.strip() != CORE_CONTAINER)
                    if key != "since"
                    else st.text(min_size=1, max_size=30),
                )
            ),
        )
    ]
    if draw(st.booleans()):
        pairs.append(draw(st.sampled_from([("container", CORE_CONTAINER), ("since", "2000-01-01T00:00:00Z")])))
    extra = draw(st.sampled_from([None, "repeat", "empty", "unknown"]))
    if extra == "repeat":
        pairs.append((key, pairs[0][1]))
    elif extra == "empty":
        pairs.append((draw(st.sampled_from(sorted(HOSTILE_FILTERS))), ""))
    elif extra == "unknown":
        pairs.append((draw(st.sampled_from(["path", "file", "Container", "core[]", ""])), "x"))
    draw(st.randoms()).shuffle(pairs)
    return pairs


def dump_path(pairs: list[tuple[str, str]], *, name: str = CORE_POD) -> str:
    query = urllib.parse.urlencode(pairs, quote_via=urllib.parse.quote)
    return f"{GV_PATH}/namespaces/{FUZZ_NS}/coredumpendpoints/{name}/dump" + (f"?{query}" if query else "")


def test_dump_with_hostile_filters_is_a_client_error(world: FuzzWorld) -> None:
    log_start = len(server_log(world.server))
    ensure_pool(world.server)
    # The target serves its core, so a 4xx below is the filter's doing, not a missing endpoint.
    for pairs in ([], [("container", CORE_CONTAINER)], [("core", world.core_id)], [("since", "2000-01-01T00:00:00Z")]):
        response = fire(world, FuzzRequest(method="GET", path=dump_path(pairs)))
        assert response.status == 200, (pairs, response)
        assert response.content_type == "application/gzip"

    @FUZZ_SETTINGS
    @given(pairs=hostile_dump_query())
    def check(pairs: list[tuple[str, str]]) -> None:
        request = FuzzRequest(method="GET", path=dump_path(pairs))
        response = fire(world, request)
        assert 400 <= response.status < 500, (request, response.status, response.body[:500])

    check()
    assert_server_healthy(world, since=log_start)


# --------------------------------------------------------------------------------------------------
# The bugs the fuzzing found, each as the smallest request that showed it: regression tests now.


def test_unknown_field_with_a_control_character_gets_an_answer(world: FuzzWorld) -> None:
    manifest = endpoint_manifest("warned", namespace=FUZZ_NS)
    manifest["x\x01y"] = 1
    response = world.server.request("POST", f"{GV_PATH}/namespaces/{FUZZ_NS}/coredumpendpoints", body=manifest)
    assert response.status == 201, response.body
    assert "unknown field" in " ".join(response.headers.get_all("Warning") or []), response.headers


def test_yaml_name_that_is_a_date_is_invalid(world: FuzzWorld) -> None:
    request = FuzzRequest(
        method="POST",
        path=f"{GV_PATH}/namespaces/{FUZZ_NS}/coredumpendpoints",
        body=b"apiVersion: coredump.example.io/v1alpha1\nkind: CoredumpEndpoint\n"
        b"metadata: {name: 2020-01-01}\nspec: {podUID: x}\n",
        headers=(("Content-Type", "application/yaml"),),
    )
    response = world.client.send(request)
    check_response(request, response)
    assert response.status == 422, response


def test_watch_client_hanging_up_is_not_an_error(world: FuzzWorld) -> None:
    log_start = len(server_log(world.server))
    watches = f"{GV_PATH}/namespaces/{FUZZ_NS}/coredumpendpoints?watch=true&timeoutSeconds=30"
    gone = world.server.connect()
    gone.request("GET", watches)
    assert gone.getresponse().status == 200
    gone.close()
    # A second watcher tells when the server has handed the event to its watchers, the gone one included.
    staying = world.server.connect()
    staying.request("GET", watches)
    events = staying.getresponse()
    assert events.status == 200
    name = f"hangup-{uuid.uuid4().hex[:8]}"
    for attempt in range(2):  # the first event may find the gone watcher's socket still half open
        created = world.server.request(
            "POST",
            f"{GV_PATH}/namespaces/{FUZZ_NS}/coredumpendpoints",
            body=endpoint_manifest(f"{name}-{attempt}", namespace=FUZZ_NS),
        )
        assert created.status == 201, created.body
        while f"{name}-{attempt}".encode() not in (line := events.readline()):
            assert line, "the watch ended before its event came"  # an ended stream reads b"" forever
    staying.close()
    assert not unexpected_tracebacks(server_log(world.server)[log_start:], known=False)


def test_yaml_integer_past_python_limit_is_a_bad_request(world: FuzzWorld) -> None:
    request = FuzzRequest(
        method="POST",
        path=f"{GV_PATH}/namespaces/{FUZZ_NS}/coredumpendpoints",
        body=b"metadata:\n  generation: " + b"9" * 5000 + b"\n",
        headers=(("Content-Type", "application/yaml"),),
    )
    response = world.client.send(request)
    check_response(request, response)
    assert response.status == 400, response
