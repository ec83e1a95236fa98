"""
Every rendered object validates offline against the Kubernetes OpenAPI schemas of the oldest and newest
supported Kubernetes (1.27 and 1.33), in kubernetes-validate's strict mode (unknown fields are errors, as
``kubectl apply`` with server-side field validation makes them).

kubernetes-validate carries no CRD schemas, so cert-manager's Issuer and Certificate (the cert-manager overlay)
are checked against a strict JSON Schema of the cert-manager.io/v1 fields this project uses, written from
cert-manager's v1 API reference below: required fields, types, enums, and no field outside it.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from deploy_helpers import Rendered

logger = logging.getLogger(__name__)

pytestmark = pytest.mark.kubectl

SUPPORTED = ["1.27", "1.33"]

_META = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}
_ISSUER_REF = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "kind": {"enum": ["Issuer", "ClusterIssuer"]},
        "group": {"const": "cert-manager.io"},
    },
}
_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"}
# cert-manager.io/v1 (https://cert-manager.io/docs/reference/api-docs/), the subset used here.
CERT_MANAGER_SCHEMAS: dict[str, dict[str, Any]] = {
    "Issuer": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "cert-manager.io/v1"},
            "kind": {"const": "Issuer"},
            "metadata": _META,
            "spec": {
                "type": "object",
                "minProperties": 1,
                "maxProperties": 1,
                "additionalProperties": False,
                "properties": {
                    "selfSigned": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"crlDistributionPoints": {"type": "array"}},
                    },
                    "ca": {
                        "type": "object",
                        "required": ["secretName"],
                        "additionalProperties": False,
                        "properties": {"secretName": {"type": "string"}},
                    },
                },
            },
        },
    },
    "Certificate": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "cert-manager.io/v1"},
            "kind": {"const": "Certificate"},
            "metadata": _META,
            "spec": {
                "type": "object",
                "required": ["secretName", "issuerRef"],
                "additionalProperties": False,
                "properties": {
                    "secretName": {"type": "string"},
                    "commonName": {"type": "string", "maxLength": 64},
                    "isCA": {"type": "boolean"},
                    "issuerRef": _ISSUER_REF,
                    "dnsNames": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                    "ipAddresses": {"type": "array", "items": {"type": "string"}},
                    "duration": _DURATION,
                    "renewBefore": _DURATION,
                    "usages": {
                        "type": "array",
                        "items": {
                            "enum": [
                                "signing",
                                "digital signature",
                                "content commitment",
                                "key encipherment",
                                "key agreement",
                                "data encipherment",
                                "cert sign",
                                "crl sign",
                                "encipher only",
                                "decipher only",
                                "any",
                                "server auth",
                                "client auth",
                                "code signing",
                                "email protection",
                                "s/mime",
                                "ipsec end system",
                                "ipsec tunnel",
                                "ipsec user",
                                "timestamping",
                                "ocsp signing",
                                "microsoft sgc",
                                "netscape sgc",
                            ]
                        },
                    },
                    "privateKey": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                            "size": {"type": "integer"},
                            "encoding": {"enum": ["PKCS1", "PKCS8"]},
                            "rotationPolicy": {"enum": ["Never", "Always"]},
                        },
                    },
                },
            },
        },
    },
}


def validate_k8s(obj: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(obj, version, strict=True)


def test_deploy_schema_versions_cover_the_supported_range() -> None:
    """The installed kubernetes-validate has schemas for exactly the versions we claim to check."""
    carried = {".".join(v.split(".")[:2]) for v in kubernetes_validate.utils.all_versions()}
    assert set(SUPPORTED) <= carried


@pytest.mark.parametrize("version", SUPPORTED)
def test_deploy_every_object_validates_against_the_kubernetes_schemas(any_variant: Rendered, version: str) -> None:
    variant = any_variant
    unchecked = []
    for obj in variant.objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            validate_k8s(obj, version)
        except kubernetes_validate.SchemaNotFoundError:
            unchecked.append(obj)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(
                f"{variant.name}: {name} is invalid for Kubernetes {version}: {'.'.join(map(str, e.path))}: {e.message}"
            )
    # Only cert-manager's kinds lack a Kubernetes schema; they have their own check below.
    assert {o["kind"] for o in unchecked} <= set(CERT_MANAGER_SCHEMAS), (
        f"objects validated by nothing: {[o['kind'] for o in unchecked]}"
    )


def test_deploy_cert_manager_objects_validate_against_the_cert_manager_v1_schema(rendered: dict[str, Rendered]) -> None:
    objects = [o for o in rendered["cert-manager"].objects if o["apiVersion"].startswith("cert-manager.io/")]
    # CA + serving certificate of the API server; CA + server, peer and client certificates of etcd; 3 issuers.
    assert sorted(o["kind"] for o in objects) == ["Certificate"] * 6 + ["Issuer"] * 3
    for obj in objects:
        jsonschema.validate(obj, CERT_MANAGER_SCHEMAS[obj["kind"]])


def test_deploy_schema_checks_reject_what_an_apiserver_would(rendered: dict[str, Rendered]) -> None:
    """The checks above can fail: an unknown field and a wrong type are caught, for both kinds of schema."""
    base = rendered["base"]
    deployment = copy.deepcopy(base.one("Deployment", "coredump-apiserver"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFilesytem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(deployment, "1.33")
    apiservice = copy.deepcopy(base.one("APIService", "v1alpha1.coredump.example.io"))
    apiservice["spec"]["service"]["port"] = "443"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(apiservice, "1.27")

    certificate = copy.deepcopy(rendered["cert-manager"].one("Certificate", "coredump-apiserver-tls"))
    certificate["spec"]["dnsName"] = certificate["spec"].pop("dnsNames")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(certificate, CERT_MANAGER_SCHEMAS["Certificate"])
