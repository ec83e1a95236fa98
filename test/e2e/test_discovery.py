"""Flow 1: the APIService is Available through the real aggregator; discovery, api-resources and explain work."""

from __future__ import annotations

import json

import pytest

from cluster import https_get
from fixtures_apiserver import kubectl_binary
from waiting import wait_until

KUBECTLS = ["1.27", "1.33"]


@pytest.mark.parametrize("version", KUBECTLS)
def test_api_resources_and_explain_through_the_aggregator(server_up, version: str) -> None:
    cp, kubectl = server_up.cp, kubectl_binary(version)
    out = cp.kubectl("api-resources", "--api-group", "coredump.example.io", "-o", "wide", binary=kubectl).stdout
    (row,) = [line for line in out.splitlines() if line.startswith("coredumpendpoints")]
    assert "coredump.example.io/v1alpha1" in row and "true" in row and "CoredumpEndpoint" in row
    assert "get" in row and "list" in row and "watch" in row

    # kube-apiserver merges our OpenAPI into its own a little after the APIService is Available (its aggregation
    # controller syncs in the background): wait for it, with a deadline, saying what was last seen.
    def explained() -> str:
        got = cp.kubectl("explain", "coredumpendpoint.spec", binary=kubectl, check=False)
        return got.stdout if got.returncode == 0 else ""

    explain = wait_until(explained, what="kubectl explain coredumpendpoint.spec", timeout=120, interval=2)
    assert "KIND:" in explain and "CoredumpEndpoint" in explain and "FIELD" in explain


def test_aggregated_discovery_lists_the_group(server_up) -> None:
    """kube-apiserver's aggregated discovery (what kubectl >= 1.30 reads) carries our group and resources."""
    accept = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json;q=0.5"
    status, headers, body, error = https_get(server_up.cp, "/apis", headers={"Accept": accept})
    assert status == 200 and error is None
    doc = json.loads(body)
    assert doc["kind"] == "APIGroupDiscoveryList"
    (group,) = [g for g in doc["items"] if g["metadata"]["name"] == "coredump.example.io"]
    (version,) = group["versions"]
    assert version["version"] == "v1alpha1" and version.get("freshness", "Current") == "Current"
    (res,) = [r for r in version["resources"] if r["resource"] == "coredumpendpoints"]
    assert res["responseKind"]["kind"] == "CoredumpEndpoint" and res["scope"] == "Namespaced"
    assert {"dump"} <= {sub["subresource"] for sub in res.get("subresources", [])}
