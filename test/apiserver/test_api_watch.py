"""
Watch as kube-apiserver serves it: newline-delimited events from a resourceVersion, synthetic ADDED
events for the current state, sendInitialEvents with its closing BOOKMARK, one-row Tables for kubectl,
timeoutSeconds, and a compacted resourceVersion reported in-stream as a 410 ERROR event.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fixtures_apiserver import RunningServer, collection_path, endpoint_manifest, item_path, start_apiserver

TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"


class Watch:
    def __init__(self, server: RunningServer, path: str, headers: dict[str, str] | None = None) -> None:
        self.connection = server.connect(timeout=15)
        self.connection.request("GET", path, headers=headers or {})
        self.response = self.connection.getresponse()

    def next(self) -> dict[str, Any]:
        line = self.response.readline()
        assert line, "the watch ended"
        return json.loads(line)

    def rest(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.response.read().splitlines() if line.strip()]

    def close(self) -> None:
        self.connection.close()


@pytest.fixture
def watches() -> Iterator[list[Watch]]:
    opened: list[Watch] = []
    yield opened
    for watch in opened:
        watch.close()


def open_watch(server: RunningServer, watches: list[Watch], path: str, **kw: Any) -> Watch:
    watch = Watch(server, path, **kw)
    watches.append(watch)
    assert watch.response.status == 200, watch.response.read()
    return watch


def create(server: RunningServer, name: str, namespace: str) -> dict[str, Any]:
    response = server.request("POST", collection_path(namespace), body=endpoint_manifest(name, namespace=namespace))
    assert response.status == 201, response.body
    return response.json()


def test_watch_from_resource_version_sees_changes_in_order(apiserver: RunningServer, watches: list[Watch]) -> None:
    listed = apiserver.request("GET", collection_path("w1")).json()
    watch = open_watch(
        apiserver,
        watches,
        collection_path("w1") + f"?watch=true&resourceVersion={listed['metadata']['resourceVersion']}",
    )
    created = create(apiserver, "a", "w1")
    patched = apiserver.request(
        "PATCH",
        item_path("a", "w1"),
        body={"metadata": {"labels": {"x": "y"}}},
        content_type="application/merge-patch+json",
    ).json()
    assert apiserver.request("DELETE", item_path("a", "w1")).status == 200
    events = [watch.next() for _ in range(3)]
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "DELETED"]
    assert events[0]["object"]["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
    assert events[1]["object"]["metadata"]["labels"] == {"x": "y"}
    assert events[1]["object"]["metadata"]["resourceVersion"] == patched["metadata"]["resourceVersion"]
    assert int(events[2]["object"]["metadata"]["resourceVersion"]) > int(patched["metadata"]["resourceVersion"])
    assert events[0]["object"]["kind"] == "CoredumpEndpoint"


def test_watch_without_resource_version_starts_with_current_state(
    apiserver: RunningServer, watches: list[Watch]
) -> None:
    create(apiserver, "existing", "w2")
    watch = open_watch(apiserver, watches, collection_path("w2") + "?watch=true")
    first = watch.next()
    assert first["type"] == "ADDED" and first["object"]["metadata"]["name"] == "existing"


def test_send_initial_events_ends_with_annotated_bookmark(apiserver: RunningServer, watches: list[Watch]) -> None:
    for name in ("i1", "i2"):
        create(apiserver, name, "w3")
    watch = open_watch(
        apiserver,
        watches,
        collection_path("w3") + "?watch=true&sendInitialEvents=true"
        "&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan",
    )
    events = [watch.next() for _ in range(3)]
    assert [(e["type"], e["object"]["metadata"].get("name")) for e in events[:2]] == [("ADDED", "i1"), ("ADDED", "i2")]
    bookmark = events[2]
    assert bookmark["type"] == "BOOKMARK"
    assert bookmark["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
    assert bookmark["object"]["metadata"]["resourceVersion"].isdigit()
    create(apiserver, "i3", "w3")
    assert watch.next()["object"]["metadata"]["name"] == "i3"


def test_send_initial_events_without_its_companions_is_422(apiserver: RunningServer) -> None:
    response = apiserver.request("GET", collection_path("w4") + "?watch=true&sendInitialEvents=true")
    assert response.status == 422
    status = response.json()
    assert status["reason"] == "Invalid"
    assert {c["field"] for c in status["details"]["causes"]} == {"resourceVersionMatch", "allowWatchBookmarks"}


def test_table_watch_sends_column_definitions_once(apiserver: RunningServer, watches: list[Watch]) -> None:
    rv = apiserver.request("GET", collection_path("w5")).json()["metadata"]["resourceVersion"]
    watch = open_watch(
        apiserver, watches, collection_path("w5") + f"?watch=true&resourceVersion={rv}", headers={"Accept": TABLE}
    )
    create(apiserver, "t1", "w5")
    create(apiserver, "t2", "w5")
    first, second = watch.next(), watch.next()
    assert first["object"]["kind"] == "Table" and first["object"]["columnDefinitions"]
    assert "columnDefinitions" not in second["object"]
    assert second["object"]["rows"][0]["cells"][0] == "t2"


def test_timeout_seconds_ends_the_watch(apiserver: RunningServer, watches: list[Watch]) -> None:
    watch = open_watch(apiserver, watches, collection_path("w6") + "?watch=true&timeoutSeconds=1&resourceVersion=1")
    assert watch.rest() == []  # the server closed the stream cleanly, with no event


def test_field_selector_watch_sees_only_the_named_object(apiserver: RunningServer, watches: list[Watch]) -> None:
    rv = apiserver.request("GET", collection_path("w7")).json()["metadata"]["resourceVersion"]
    watch = open_watch(
        apiserver, watches, collection_path("w7") + f"?watch=true&resourceVersion={rv}&fieldSelector=metadata.name%3Dme"
    )
    create(apiserver, "other", "w7")
    create(apiserver, "me", "w7")
    assert watch.next()["object"]["metadata"]["name"] == "me"


# ---- on etcd ---------------------------------------------------------------------------------------


@pytest.fixture
def etcd_args(etcd_server: Any, etcd_prefix: str) -> list[str]:
    return ["--etcd-servers", etcd_server.endpoint, "--etcd-prefix", etcd_prefix]


@pytest.mark.etcd
def test_objects_survive_a_restart_of_the_server(tmp_path: Any, etcd_args: list[str]) -> None:
    server = start_apiserver(tmp_path, *etcd_args)
    try:
        created = create(server, "durable", "persist")
        server.stop()
        server.start()
        again = server.request("GET", item_path("durable", "persist")).json()
        assert again["metadata"]["uid"] == created["metadata"]["uid"]
        assert again["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
    finally:
        server.stop()


@pytest.mark.etcd
def test_two_servers_on_one_etcd_see_each_others_writes_and_events(
    tmp_path: Any, etcd_args: list[str], watches: list[Watch]
) -> None:
    one = start_apiserver(tmp_path / "one", *etcd_args)
    two = start_apiserver(tmp_path / "two", *etcd_args)
    try:
        rv = two.request("GET", collection_path("shared")).json()["metadata"]["resourceVersion"]
        watch = open_watch(two, watches, collection_path("shared") + f"?watch=true&resourceVersion={rv}")
        created = create(one, "from-one", "shared")
        event = watch.next()
        assert event["type"] == "ADDED" and event["object"]["metadata"]["uid"] == created["metadata"]["uid"]
        seen = two.request("GET", item_path("from-one", "shared")).json()
        assert seen["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
        stale = dict(seen, metadata=dict(seen["metadata"], labels={"by": "two"}))
        assert (
            one.request(
                "PUT",
                item_path("from-one", "shared"),
                body=dict(seen, metadata=dict(seen["metadata"], labels={"by": "one"})),
            ).status
            == 200
        )
        assert two.request("PUT", item_path("from-one", "shared"), body=stale).status == 409
        assert watch.next()["type"] == "MODIFIED"
    finally:
        one.stop()
        two.stop()


@pytest.mark.etcd
def test_compacted_resource_version_is_a_410_error_event(
    tmp_path: Any, etcd_server: Any, etcd_prefix: str, etcd_args: list[str], watches: list[Watch]
) -> None:
    from apiserver.registry.etcd import EtcdStore

    # A watch cache of 2 changes: after 4 creates the first one's version is older than its window too.
    server = start_apiserver(tmp_path, *etcd_args, "--watch-cache-size", "2")
    try:
        old = create(server, "c0", "compact")["metadata"]["resourceVersion"]
        for i in range(1, 4):
            create(server, f"c{i}", "compact")
        newest = int(server.request("GET", collection_path("compact")).json()["metadata"]["resourceVersion"])

        async def compact() -> None:
            store = EtcdStore(endpoints=[etcd_server.endpoint], prefix=etcd_prefix)
            await store.start()
            try:
                await store.compact(newest)
            finally:
                await store.close()

        asyncio.run(compact())

        watch = open_watch(server, watches, collection_path("compact") + f"?watch=true&resourceVersion={old}")
        events = watch.rest()
        assert len(events) == 1 and events[0]["type"] == "ERROR"
        status = events[0]["object"]
        assert status["kind"] == "Status" and status["code"] == 410 and status["reason"] == "Expired"
        assert "too old resource version" in status["message"]
        listed = server.request(
            "GET", collection_path("compact") + f"?resourceVersion={old}&resourceVersionMatch=Exact"
        )
        assert listed.status == 410 and listed.json()["reason"] == "Expired"
    finally:
        server.stop()
