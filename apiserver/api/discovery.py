"""
Discovery documents: the legacy ones (APIGroupList, APIGroup, APIResourceList) and aggregated
discovery (``apidiscovery.k8s.io`` v2 and v2beta1), which the aggregator and kubectl ≥ 1.26 ask for first.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from apiserver.api import resource as r

AGGREGATED_VERSIONS = ("v2", "v2beta1")


def group_version() -> dict[str, str]:
    return {"groupVersion": r.API_VERSION, "version": r.VERSION}


def api_group() -> dict[str, Any]:
    return {
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": r.GROUP,
        "versions": [group_version()],
        "preferredVersion": group_version(),
    }


def api_group_list() -> dict[str, Any]:
    group = api_group()
    del group["kind"], group["apiVersion"]
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [group]}


STATUS_VERBS = ["get", "patch", "update"]


def api_resource_list() -> dict[str, Any]:
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": r.API_VERSION,
        "resources": [
            {
                "name": r.PLURAL,
                "singularName": r.SINGULAR,
                "namespaced": True,
                "kind": r.KIND,
                "verbs": r.VERBS,
                "shortNames": r.SHORT_NAMES,
            },
            # Like pods/log: a read-only subresource whose kind is the parent's.
            {
                "name": f"{r.PLURAL}/{r.SUBRESOURCE_DUMP}",
                "singularName": "",
                "namespaced": True,
                "kind": r.KIND,
                "verbs": ["get"],
            },
            # Status is the server's: a client's PUT/PATCH only asks it to be re-read from storage now.
            {
                "name": f"{r.PLURAL}/status",
                "singularName": "",
                "namespaced": True,
                "kind": r.KIND,
                "verbs": STATUS_VERBS,
            },
        ],
    }


def aggregated_discovery(version: str) -> dict[str, Any]:
    """APIGroupDiscoveryList for /apis, in the requested apidiscovery.k8s.io version."""
    response_kind = {"group": r.GROUP, "version": r.VERSION, "kind": r.KIND}
    return {
        "kind": "APIGroupDiscoveryList",
        "apiVersion": f"apidiscovery.k8s.io/{version}",
        "metadata": {},
        "items": [
            {
                "metadata": {"name": r.GROUP, "creationTimestamp": None},
                "versions": [
                    {
                        "version": r.VERSION,
                        "resources": [
                            {
                                "resource": r.PLURAL,
                                "responseKind": response_kind,
                                "scope": "Namespaced",
                                "singularResource": r.SINGULAR,
                                "verbs": r.VERBS,
                                "shortNames": r.SHORT_NAMES,
                                "subresources": [
                                    {
                                        "subresource": r.SUBRESOURCE_DUMP,
                                        "responseKind": response_kind,
                                        "verbs": ["get"],
                                    },
                                    {"subresource": "status", "responseKind": response_kind, "verbs": STATUS_VERBS},
                                ],
                            }
                        ],
                        "freshness": "Current",
                    }
                ],
            }
        ],
    }


def aggregated_media_type(version: str) -> str:
    return f"application/json;g=apidiscovery.k8s.io;v={version};as=APIGroupDiscoveryList"


def encode_with_etag(document: dict[str, Any]) -> tuple[bytes, str]:
    """The JSON body and a strong ETag over it, so clients can revalidate with If-None-Match → 304."""
    body = json.dumps(document, separators=(",", ":"), sort_keys=True).encode()
    return body, '"' + hashlib.sha256(body).hexdigest()[:32].upper() + '"'
