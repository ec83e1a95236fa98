"""Flow 1: the APIService is Available through the real aggregator; discovery, api-resources and explain work."""
from __future__ import annotations

import json

import pytest

from fixtures_apiserver import kubectl_binary

KUBECTLS = ["1.27", "1.33"]


@pytest.mark.parametrize("version", KUBECTLS)
def test_api_resources_and_explain_through_the_aggregator(server_up, version: str) -> None:
    cp, kubectl = server_up.cp, kubectl_binary(version)
    out = cp.kubectl("api-resources", "--api-group", "coredump.example.io", "-o", "wide", binary=kubectl).stdout
    (row,) = [line for line in out.splitlines() if line.startswith("coredumpendpoints")]
    assert "coredump.example.io/v1alpha1" in row and "true" in row and "CoredumpEndpoint" in row
    assert "get" in row and "list" in row and "watch" in row
    explain = cp.kubectl("explain", "coredumpendpoint.spec", binary=kubectl).stdout
    assert "KIND:" in explain and "CoredumpEndpoint" in explain and "FIELD" in explain


def test_aggregated_discovery_lists_the_group(server_up) -> None:
    out = server_up.cp.kubectl("get", "--raw", "/apis", "--as", "e2e-admin",
                               check=False)
    doc = json.loads(server_up.cp.kubectl("get", "--raw", "/apis").stdout)
    groups = {g["name"]: g for g in doc["groups"]}
    assert groups["coredump.example.io"]["preferredVersion"]["version"] == "v1alpha1"
    assert out.returncode == 0
