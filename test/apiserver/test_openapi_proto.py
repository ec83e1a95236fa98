"""
OpenAPI v2 as gnostic protobuf: what kubectl 1.27 and 1.28 need for ``create -f`` and ``explain``.

The encoder's bytes are decoded with the ``protobuf`` package, from message classes built here out of a
``FileDescriptorProto`` written from gnostic's ``OpenAPIv2.proto`` (not from the encoder's tables), and turned
back into the JSON shape, which must equal the JSON document. Then a real ``coredump-apiserver --dev`` serves
it to the real kubectl binaries.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from apiserver.api import openapi, openapi_proto
from waiting import wait_until

# gnostic's messages, as far as our document needs them: "name=number:Type", "*" = repeated, "|" = member of
# the message's oneof (gnostic names every oneof "oneof"). Fields left out here would decode as unknown.
_PROTO = {
    "Document": "swagger=1:string info=2:Info host=3:string base_path=4:string schemes=5:*string "
    "consumes=6:*string produces=7:*string paths=8:Paths definitions=9:Definitions "
    "security=12:*SecurityRequirement security_definitions=13:SecurityDefinitions "
    "vendor_extension=16:*NamedAny",
    "Info": "title=1:string version=2:string description=3:string vendor_extension=7:*NamedAny",
    "Any": "yaml=2:string",
    "NamedAny": "name=1:string value=2:Any",
    "Paths": "vendor_extension=1:*NamedAny path=2:*NamedPathItem",
    "NamedPathItem": "name=1:string value=2:PathItem",
    "PathItem": "_ref=1:string get=2:Operation put=3:Operation post=4:Operation delete=5:Operation "
    "options=6:Operation head=7:Operation patch=8:Operation parameters=9:*ParametersItem "
    "vendor_extension=10:*NamedAny",
    "Operation": "tags=1:*string summary=2:string description=3:string operation_id=5:string "
    "produces=6:*string consumes=7:*string parameters=8:*ParametersItem responses=9:Responses "
    "schemes=10:*string deprecated=11:bool security=12:*SecurityRequirement "
    "vendor_extension=13:*NamedAny",
    "ParametersItem": "|parameter=1:Parameter |json_reference=2:JsonReference",
    "JsonReference": "_ref=1:string description=2:string",
    "Parameter": "|body_parameter=1:BodyParameter |non_body_parameter=2:NonBodyParameter",
    "BodyParameter": "description=1:string name=2:string in=3:string required=4:bool schema=5:Schema "
    "vendor_extension=6:*NamedAny",
    "NonBodyParameter": "|query_parameter_sub_schema=3:QueryParameterSubSchema "
    "|path_parameter_sub_schema=4:PathParameterSubSchema",
    "QueryParameterSubSchema": "required=1:bool in=2:string description=3:string name=4:string "
    "allow_empty_value=5:bool type=6:string format=7:string collection_format=9:string "
    "default=10:Any unique_items=20:bool enum=21:*Any vendor_extension=23:*NamedAny",
    "PathParameterSubSchema": "required=1:bool in=2:string description=3:string name=4:string type=5:string "
    "format=6:string collection_format=8:string default=9:Any unique_items=19:bool "
    "enum=20:*Any vendor_extension=22:*NamedAny",
    "Responses": "response_code=1:*NamedResponseValue vendor_extension=2:*NamedAny",
    "NamedResponseValue": "name=1:string value=2:ResponseValue",
    "ResponseValue": "|response=1:Response |json_reference=2:JsonReference",
    "Response": "description=1:string schema=2:SchemaItem vendor_extension=5:*NamedAny",
    "SchemaItem": "|schema=1:Schema",
    "Schema": "_ref=1:string format=2:string title=3:string description=4:string default=5:Any "
    "maximum=7:double minimum=9:double max_length=11:int64 min_length=12:int64 pattern=13:string "
    "unique_items=16:bool required=19:*string enum=20:*Any additional_properties=21:AdditionalPropertiesItem "
    "type=22:TypeItem items=23:ItemsItem all_of=24:*Schema properties=25:Properties read_only=27:bool "
    "example=30:Any vendor_extension=31:*NamedAny",
    "AdditionalPropertiesItem": "|schema=1:Schema |boolean=2:bool",
    "TypeItem": "value=1:*string",
    "ItemsItem": "schema=1:*Schema",
    "Properties": "additional_properties=1:*NamedSchema",
    "Definitions": "additional_properties=1:*NamedSchema",
    "NamedSchema": "name=1:string value=2:Schema",
    "SecurityRequirement": "additional_properties=1:*NamedStringArray",
    "NamedStringArray": "name=1:string value=2:StringArray",
    "StringArray": "value=1:*string",
    "SecurityDefinitions": "additional_properties=1:*NamedSecurityDefinitionsItem",
    "NamedSecurityDefinitionsItem": "name=1:string value=2:SecurityDefinitionsItem",
    "SecurityDefinitionsItem": "|api_key_security=2:ApiKeySecurity",
    "ApiKeySecurity": "type=1:string name=2:string in=3:string description=4:string vendor_extension=5:*NamedAny",
}
_SCALARS = {
    "string": descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
    "bool": descriptor_pb2.FieldDescriptorProto.TYPE_BOOL,
    "int64": descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
    "double": descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE,
}


@pytest.fixture(scope="module")
def document_class() -> type[Message]:
    fdp = descriptor_pb2.FileDescriptorProto(name="openapiv2_subset.proto", package="openapi.v2", syntax="proto3")
    for name, spec in _PROTO.items():
        message = fdp.message_type.add(name=name)
        for token in spec.split():
            field_name, _, rest = token.partition("=")
            number, _, type_name = rest.partition(":")
            field = message.field.add(name=field_name.lstrip("|"), number=int(number), json_name=field_name)
            field.label = field.LABEL_REPEATED if type_name.startswith("*") else field.LABEL_OPTIONAL
            type_name = type_name.lstrip("*")
            if type_name in _SCALARS:
                field.type = _SCALARS[type_name]
            else:
                field.type, field.type_name = field.TYPE_MESSAGE, f".openapi.v2.{type_name}"
            if field_name.startswith("|"):
                if not message.oneof_decl:
                    message.oneof_decl.add(name="oneof")
                field.oneof_index = 0
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("openapi.v2.Document"))


def _json_key(name: str) -> str:
    if name == "_ref":
        return "$ref"
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _repeated(field: Any) -> bool:
    # protobuf >= 6.31 has is_repeated; older releases (still allowed by aetcd's range) only have label.
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED


def to_json(message: Message) -> Any:
    """gnostic's message back in Swagger's JSON shape (the inverse of what the server encodes)."""
    desc = message.DESCRIPTOR
    if desc.name == "Any":
        return yaml.safe_load(message.yaml)
    if desc.name == "StringArray":
        return list(message.value)
    if desc.name in ("TypeItem", "ItemsItem"):
        values = [
            to_json(v) if isinstance(v, Message) else v
            for v in (message.value if desc.name == "TypeItem" else message.schema)
        ]
        return values[0] if len(values) == 1 else values
    if desc.oneofs:
        member = message.WhichOneof("oneof")
        assert member, f"{desc.name} with no oneof member set"
        value = getattr(message, member)
        return to_json(value) if isinstance(value, Message) else value
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.name.startswith("Named"):
            # gnostic's ordered maps (and vendor extensions) are keys of the enclosing JSON object.
            for pair in value:
                assert pair.name not in out
                out[pair.name] = to_json(pair.value)
        elif _repeated(field):
            out[_json_key(field.name)] = [to_json(v) if isinstance(v, Message) else v for v in value]
        else:
            out[_json_key(field.name)] = to_json(value) if isinstance(value, Message) else value
    return out


@pytest.fixture(scope="module")
def decoded(document_class: type[Message]) -> Message:
    body, _ = openapi_proto.encoded_v2()
    return document_class.FromString(body)


def test_openapi_proto_round_trips_to_the_json_document(decoded: Message) -> None:
    assert to_json(decoded) == json.loads(openapi.encoded_v2())


def test_openapi_proto_bytes_are_canonical_with_no_unknown_fields(decoded: Message) -> None:
    # Python writes known fields in number order and unknown ones last: equal bytes mean every field we
    # wrote is the one gnostic's proto declares, in the order Go's proto.Marshal writes it.
    body, _ = openapi_proto.encoded_v2()
    assert decoded.SerializeToString(deterministic=True) == body


def test_openapi_proto_patch_operation_lists_field_validation(decoded: Message) -> None:
    # kubectl create trusts the server's strict validation only when the kind's PATCH lists fieldValidation.
    item = next(
        p.value
        for p in decoded.paths.path
        if p.name == "/apis/coredump.example.io/v1alpha1/namespaces/{namespace}/coredumpendpoints/{name}"
    )
    assert item.HasField("patch")
    gvk = {e.name: yaml.safe_load(e.value.yaml) for e in item.patch.vendor_extension}
    assert gvk["x-kubernetes-group-version-kind"] == {
        "group": "coredump.example.io",
        "version": "v1alpha1",
        "kind": "CoredumpEndpoint",
    }
    assert gvk["x-kubernetes-action"] == "patch"
    queries = [
        p.parameter.non_body_parameter.query_parameter_sub_schema
        for p in item.patch.parameters
        if p.parameter.non_body_parameter.WhichOneof("oneof") == "query_parameter_sub_schema"
    ]
    validation = [q for q in queries if q.name == "fieldValidation"]
    assert len(validation) == 1
    assert getattr(validation[0], "in") == "query" and validation[0].type == "string"
    body = [p.parameter.body_parameter for p in item.patch.parameters if p.parameter.HasField("body_parameter")]
    assert [(b.name, b.required, b.schema._ref) for b in body] == [
        ("body", True, "#/definitions/io.k8s.apimachinery.pkg.apis.meta.v1.Patch")
    ]


def test_openapi_proto_endpoint_definition_carries_gvk_and_spec(decoded: Message) -> None:
    schema = next(d.value for d in decoded.definitions.additional_properties if d.name == openapi.DEF_ENDPOINT)
    extensions = {e.name: yaml.safe_load(e.value.yaml) for e in schema.vendor_extension}
    assert extensions["x-kubernetes-group-version-kind"] == [
        {"group": "coredump.example.io", "version": "v1alpha1", "kind": "CoredumpEndpoint"}
    ]
    properties = {p.name: p.value for p in schema.properties.additional_properties}
    assert properties["metadata"]._ref == f"#/definitions/{openapi.META}.ObjectMeta"
    spec = {p.name: p.value for p in properties["spec"].properties.additional_properties}
    assert list(spec["podUID"].type.value) == ["string"]
    assert "UID of the pod incarnation" in spec["podUID"].description
    cores = {p.name: p.value for p in properties["status"].properties.additional_properties}["cores"]
    assert list(cores.type.value) == ["array"] and len(cores.items.schema) == 1
    labels = {p.name: p.value for p in decoded.definitions.additional_properties}[f"{openapi.META}.ObjectMeta"]
    labels = {p.name: p.value for p in labels.properties.additional_properties}["labels"]
    assert labels.additional_properties.WhichOneof("oneof") == "schema"
    assert list(labels.additional_properties.schema.type.value) == ["string"]


def test_openapi_proto_security_is_bearer_token(decoded: Message) -> None:
    [requirement] = decoded.security
    [named] = requirement.additional_properties
    assert (named.name, named.HasField("value"), list(named.value.value)) == ("BearerToken", True, [])
    [definition] = decoded.security_definitions.additional_properties
    key = definition.value.api_key_security
    assert (definition.name, key.type, key.name, getattr(key, "in")) == (
        "BearerToken",
        "apiKey",
        "authorization",
        "header",
    )


def test_openapi_proto_encodes_what_the_document_does_not_use_yet(document_class: type[Message]) -> None:
    # Constructs a later schema may bring: additionalProperties false (a oneof member set to its zero value
    # must stay on the wire), negative int64, doubles, enums, multiple types, a $ref parameter and response.
    doc = {
        "swagger": "2.0",
        "paths": {
            "/x": {
                "get": {
                    "parameters": [{"$ref": "#/parameters/p"}],
                    "responses": {"200": {"$ref": "#/responses/r"}, "x-note": {"a": 1}},
                }
            }
        },
        "definitions": {
            "T": {
                "type": ["string", "null"],
                "additionalProperties": False,
                "minLength": -2,
                "maximum": 1.5,
                "enum": ["a", "b"],
                "items": [{"type": "string"}, {"type": "integer"}],
                "allOf": [{"$ref": "#/definitions/U"}],
            }
        },
    }
    decoded = document_class.FromString(openapi_proto.encode_document(doc))
    assert to_json(decoded) == doc
    t = decoded.definitions.additional_properties[0].value
    assert t.additional_properties.WhichOneof("oneof") == "boolean" and t.min_length == -2


@pytest.mark.parametrize(
    "node",
    [
        {"swagger": "2.0", "definitions": {"T": {"nullable": True}}},  # an OpenAPI v3 keyword
        {"swagger": "2.0", "paths": {"/x": {"get": {"parameters": [{"name": "a", "in": "cookie"}]}}}},
        {"swagger": "2.0", "definitions": {"T": {"minLength": "2"}}},
    ],
)
def test_openapi_proto_refuses_what_it_cannot_encode(node: dict[str, Any]) -> None:
    # Dropping a construct silently would show kubectl a different API than the JSON document does.
    with pytest.raises(openapi_proto.UnsupportedConstruct):
        openapi_proto.encode_document(node)


# -- the real server and the real kubectl -------------------------------------------------------------------

KUBECTL_DIR = Path(os.path.realpath(shutil.which("kubectl") or "/nonexistent")).parent
START_TIMEOUT = 30.0


@dataclass
class DevServer:
    kubeconfig: Path
    url: str
    ssl: ssl.SSLContext

    def get(self, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(self.url + path, headers=headers)
        try:
            with urllib.request.urlopen(request, context=self.ssl, timeout=10) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    home = tmp_path_factory.mktemp("openapi-dev")
    binary = Path(sys.executable).parent / "coredump-apiserver"
    log = (home / "server.log").open("wb")
    proc = subprocess.Popen(
        [str(binary), "--dev", "--dev-dir", str(home), "--secure-port", "0"],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        kubeconfig = home / "kubeconfig"

        def ready() -> DevServer | None:
            assert proc.poll() is None, (home / "server.log").read_text()
            if not kubeconfig.exists():
                return None
            config = yaml.safe_load(kubeconfig.read_text())
            context = ssl.create_default_context(cafile=config["clusters"][0]["cluster"]["certificate-authority"])
            user = next(u["user"] for u in config["users"] if u["name"] == "dev-admin")
            context.load_cert_chain(user["client-certificate"], user["client-key"])
            candidate = DevServer(kubeconfig, config["clusters"][0]["cluster"]["server"], context)
            return candidate if candidate.get("/readyz", {})[0] == 200 else None

        server = wait_until(
            ready, what="the dev server to be ready", timeout=START_TIMEOUT, interval=0.1, ignore=(OSError,)
        )
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.kubectl
def test_openapi_v2_serves_protobuf_with_etag_and_304(dev_server: DevServer) -> None:
    status, headers, body = dev_server.get("/openapi/v2", {"Accept": openapi_proto.MEDIA_TYPE_DEPRECATED})
    assert status == 200
    # Go's mime parser rejects "@" in a response type; kube-openapi answers with the dotted spelling.
    assert headers["Content-Type"] == "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"
    assert body == openapi_proto.encoded_v2()[0]
    etag = headers["ETag"]
    status, headers, body = dev_server.get(
        "/openapi/v2", {"Accept": openapi_proto.MEDIA_TYPE_DEPRECATED, "If-None-Match": etag}
    )
    assert (status, headers["ETag"], body) == (304, etag, b"")


@pytest.mark.kubectl
def test_openapi_v2_serves_json_to_the_aggregator_and_406_otherwise(dev_server: DevServer) -> None:
    status, headers, body = dev_server.get("/openapi/v2", {"Accept": "application/json"})
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == json.loads(openapi.encoded_v2())
    proto_etag = dev_server.get("/openapi/v2", {"Accept": openapi_proto.MEDIA_TYPE})[1]["ETag"]
    assert headers["ETag"] != proto_etag  # different bytes, different validators (Vary: Accept)
    assert dev_server.get("/openapi/v2", {"Accept": "application/json", "If-None-Match": headers["ETag"]})[0] == 304
    # The client's order decides: JSON first means JSON even when protobuf is acceptable too.
    status, headers, _ = dev_server.get("/openapi/v2", {"Accept": f"application/json, {openapi_proto.MEDIA_TYPE}"})
    assert headers["Content-Type"].startswith("application/json")
    status, headers, body = dev_server.get("/openapi/v2", {"Accept": "text/html"})
    assert status == 406 and json.loads(body)["reason"] == "NotAcceptable"


def _kubectl(version: str, server: DevServer, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    binary = KUBECTL_DIR / f"kubectl.{version}"
    if not binary.exists():
        pytest.skip(f"{binary} is not installed")
    env = {**os.environ, "KUBECONFIG": str(server.kubeconfig), "HOME": str(server.kubeconfig.parent)}
    return subprocess.run([str(binary), *args], input=stdin, capture_output=True, text=True, env=env, timeout=60)


def _manifest(name: str, spec: dict[str, Any]) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "coredump.example.io/v1alpha1",
            "kind": "CoredumpEndpoint",
            "metadata": {"name": name, "namespace": "default"},
            "spec": spec,
        }
    )


@pytest.mark.kubectl
@pytest.mark.parametrize("version", ["1.27", "1.28"])
def test_openapi_old_kubectl_creates_explains_and_validates_strictly(dev_server: DevServer, version: str) -> None:
    name = f"web-{version.replace('.', '-')}"
    pod_uid = str(uuid.uuid4())
    created = _kubectl(version, dev_server, "create", "-f", "-", stdin=_manifest(name, {"podUID": pod_uid}))
    assert created.returncode == 0, created.stderr
    assert f"coredumpendpoint.coredump.example.io/{name} created" in created.stdout
    got = _kubectl(version, dev_server, "get", "coredumpendpoint", name, "-o", "json")
    assert json.loads(got.stdout)["spec"]["podUID"] == pod_uid

    explained = _kubectl(version, dev_server, "explain", "coredumpendpoint.spec")
    assert explained.returncode == 0, explained.stderr
    assert "podUID\t<string>" in explained.stdout and "UID of the pod incarnation" in explained.stdout

    bogus = _kubectl(
        version,
        dev_server,
        "create",
        "-f",
        "-",
        stdin=_manifest(f"{name}-bogus", {"podUID": str(uuid.uuid4()), "bogus": 1}),
    )
    assert bogus.returncode != 0
    assert 'unknown field "spec.bogus"' in bogus.stderr
    assert _kubectl(version, dev_server, "get", "coredumpendpoint", f"{name}-bogus").returncode != 0
