"""
Observability of the real server: ``/metrics`` read back with prometheus-client's own text parser, one
structured JSON line per request, and content negotiation that never answers 500 for an odd ``Accept``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fake_kube import FakeKube
from fixtures_apiserver import RunningServer, collection_path, endpoint_manifest, item_path
from apiserver_harness import GV, run_server
from waiting import wait_until


def scrape(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name → [(labels, value)], parsed by prometheus-client (a malformed exposition raises)."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for found, v in samples.get(name, []) if all(found.get(k) == w for k, w in labels.items()))


def request_lines(server: RunningServer) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in server.log_path.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("logger") == "coredump.requests"]


def test_metrics_count_requests_dumps_watches_and_store_calls(apiserver: RunningServer) -> None:
    assert (
        apiserver.request("POST", collection_path("metrics"), body=endpoint_manifest("web", namespace="metrics")).status
        == 201
    )
    assert apiserver.request("GET", collection_path("metrics")).status == 200
    assert apiserver.request("GET", item_path("absent", "metrics")).status == 404
    assert apiserver.request("GET", item_path("web", "metrics") + "/dump").status == 404  # no cores
    # A resource nobody serves must not become a label value of its own.
    assert apiserver.request("GET", f"{GV}/namespaces/metrics/made-up-{time.time_ns()}").status == 404

    watch = apiserver.connect()
    try:
        watch.request("GET", collection_path("metrics") + "?watch=true")
        assert watch.getresponse().status == 200
        response = apiserver.request("GET", "/metrics")
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
        samples = scrape(response.body.decode())
    finally:
        watch.close()

    assert value(samples, "apiserver_request_total", verb="create", resource="coredumpendpoints", code="201") >= 1
    assert value(samples, "apiserver_request_total", verb="list", resource="coredumpendpoints", code="200") >= 1
    assert value(samples, "apiserver_request_total", verb="get", resource="coredumpendpoints", code="404") >= 1
    assert (
        value(
            samples, "apiserver_request_total", verb="get", resource="coredumpendpoints", subresource="dump", code="404"
        )
        >= 1
    )
    assert value(samples, "apiserver_request_total", resource="other", code="404") >= 1
    assert not [labels for labels, _ in samples["apiserver_request_total"] if "made-up" in labels["resource"]]
    assert value(samples, "apiserver_request_duration_seconds_count", verb="list", resource="coredumpendpoints") >= 1
    assert value(samples, "apiserver_longrunning_requests", verb="watch", resource="coredumpendpoints") == 1
    assert value(samples, "coredump_dumps_total", outcome="not_found") >= 1
    assert value(samples, "etcd_request_duration_seconds_count", operation="create") >= 1
    assert value(samples, "coredump_apiserver_open_connections") >= 2  # the watch and the scrape itself
    assert "coredump_dump_sent_bytes_total" in samples
    assert value(samples, "apiserver_current_inflight_requests", request_kind="readOnly") >= 1  # the scrape


def test_metrics_need_authorization(apiserver: RunningServer) -> None:
    assert apiserver.request("GET", "/metrics", user=None).status == 401
    assert apiserver.request("GET", "/metrics", user="viewer").status == 403


def test_one_structured_line_per_request(apiserver: RunningServer) -> None:
    path = item_path("nobody-here", "logs")
    assert apiserver.request("GET", path).status == 404
    [line] = wait_until(
        lambda: [line for line in request_lines(apiserver) if line.get("path") == path],
        what=f"the request line of {path}",
    )
    assert (line["msg"], line["method"], line["user"], line["status"]) == ("request", "GET", "dev-admin", 404)
    assert isinstance(line["bytes"], int) and line["bytes"] > 0
    assert isinstance(line["seconds"], float) and line["seconds"] >= 0
    assert (line["verb"], line["resource"], line["namespace"], line["objectName"]) == (
        "get",
        "coredumpendpoints",
        "logs",
        "nobody-here",
    )


@pytest.mark.parametrize(
    "accept",
    [
        "application/json;q=abc",
        "application/json;q=",
        "application/json;q=nan",
        "application/yaml;q=x, application/json",
        "*/*;q=1e999",
    ],
)
def test_accept_with_an_unparsable_quality_is_served(apiserver: RunningServer, accept: str) -> None:
    response = apiserver.request("GET", collection_path("default"), headers={"Accept": accept})
    assert response.status == 200, response.body[:300]


def test_nothing_acceptable_is_406(apiserver: RunningServer) -> None:
    response = apiserver.request("GET", collection_path("default"), headers={"Accept": "text/html;q=abc"})
    assert (response.status, response.json()["reason"]) == (406, "NotAcceptable")


async def test_authentication_and_authorization_metrics(fake_kube: FakeKube, tmp_path: Path) -> None:
    fake_kube.add_token("token-alice", user="alice", groups=["team-a"])
    fake_kube.allow(verbs=["list"], groups=["team-a"], resources=["coredumpendpoints"], namespaces=["a"])
    async with run_server(fake_kube, tmp_path) as server:
        for _ in range(3):
            status, _ = await server.request("GET", f"{GV}/namespaces/a/coredumpendpoints", token="token-alice")
            assert status == 200
        fake_kube.sar_answer = ("text/html", b"<html>proxy error</html>")
        assert (await server.request("GET", f"{GV}/namespaces/b/coredumpendpoints", token="token-alice"))[0] == 500
        status, body = await server.request("GET", "/metrics", cert=server.admin)
        assert status == 200
        samples = scrape(body.decode() if isinstance(body, bytes) else json.dumps(body))
    assert value(samples, "authentication_token_cache_request_total", status="miss") == 1
    assert value(samples, "authentication_token_cache_request_total", status="hit") >= 3
    assert value(samples, "coredump_authorization_cache_request_total", status="hit") >= 2
    assert value(samples, "apiserver_delegated_authn_request_total", code="201") == 1
    assert value(samples, "apiserver_delegated_authz_request_total", code="201") == 1
    assert value(samples, "apiserver_delegated_authz_request_total", code="malformed") == 1
    assert value(samples, "apiserver_delegated_authz_request_duration_seconds_count") == 2
