"""
The watch cache with the real etcd and the real kubectl: `kubectl get cde -w` (1.27 and 1.33) stays open while
etcd is stopped for ~12 s and shows what is created after it returns, with no ERROR row; LIST
resourceVersion=0 is answered from the cache while etcd is down (a consistent LIST is 503); bookmarks come when
asked and carry progress etcd reports for writes the cache does not watch; a resourceVersion older than the
window is 410 (in ``test_api_watch.py``).
"""

from __future__ import annotations

import asyncio
import json
import queue
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures_apiserver import (
    NEWEST_KUBECTL,
    OLDEST_KUBECTL,
    RunningServer,
    collection_path,
    endpoint_manifest,
    kubectl_binary,
    start_apiserver,
)

from apiserver.registry.etcd import EtcdStore

pytestmark = pytest.mark.etcd

OUTAGE_SECONDS = 12.0  # how long etcd stays down: the scenario, not a bound on anything
DEADLINE = 30.0


@pytest.fixture
def server(tmp_path: Path, etcd_server: Any, etcd_prefix: str) -> Iterator[RunningServer]:
    running = start_apiserver(
        tmp_path,
        "--etcd-servers",
        etcd_server.endpoint,
        "--etcd-prefix",
        etcd_prefix,
        "--watch-bookmark-interval",
        "1s",
    )
    try:
        yield running
    finally:
        running.stop()
        etcd_server.start()
    assert "Traceback" not in running.log_path.read_text(), running.log_path.read_text()[-5000:]


def create_when_etcd_answers(server: RunningServer, name: str, namespace: str) -> dict[str, Any]:
    """Create through the API, retrying while the server's etcd connection comes back."""
    deadline = time.monotonic() + DEADLINE
    while True:
        response = server.request("POST", collection_path(namespace), body=endpoint_manifest(name, namespace=namespace))
        if response.status == 201 or time.monotonic() > deadline:
            assert response.status == 201, response.body
            return response.json()
        time.sleep(0.2)


class Lines:
    """A subprocess's output lines, read in a thread."""

    def __init__(self, stream: Any) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(line) for line in stream], daemon=True).start()

    def drain(self) -> list[str]:
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return self.seen

    def until(self, predicate: Any) -> str:
        deadline = time.monotonic() + DEADLINE
        while True:
            line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            self.seen.append(line)
            if predicate(line):
                return line


@pytest.mark.kubectl
@pytest.mark.parametrize("version", [OLDEST_KUBECTL, NEWEST_KUBECTL])
def test_kubectl_watch_survives_an_etcd_restart_and_shows_what_came_after(
    server: RunningServer, etcd_server: Any, version: str
) -> None:
    namespace = f"outage-{version.replace('.', '-')}"
    create_when_etcd_answers(server, "before", namespace)
    command = [
        kubectl_binary(version),
        "--kubeconfig",
        str(server.kubeconfig),
        "get",
        "cde",
        "-n",
        namespace,
        "-w",
        "--output-watch-events",
    ]
    kubectl = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"HOME": str(server.dev_dir), "PATH": "/usr/bin:/bin"},
    )
    assert kubectl.stdout is not None and kubectl.stderr is not None
    out, err = Lines(kubectl.stdout), Lines(kubectl.stderr)
    try:
        out.until(lambda line: "before" in line)
        etcd_server.stop()
        try:
            # While etcd is down: the watch stays open, LIST resourceVersion=0 is served by the cache, and a
            # consistent LIST (a quorum read) cannot be.
            cached = server.request("GET", collection_path(namespace) + "?resourceVersion=0")
            assert cached.status == 200, cached.body
            assert [o["metadata"]["name"] for o in cached.json()["items"]] == ["before"]
            assert server.request("GET", collection_path(namespace)).status == 503
            time.sleep(OUTAGE_SECONDS)
            assert kubectl.poll() is None, "kubectl's watch ended during the outage"
        finally:
            etcd_server.start()
        create_when_etcd_answers(server, "after", namespace)
        row = out.until(lambda line: "after" in line)
        assert row.split()[0] == "ADDED"
        assert kubectl.poll() is None
    finally:
        kubectl.terminate()
        kubectl.wait(timeout=10)
    assert not any("ERROR" in line for line in out.drain()), out.seen
    assert not any("error" in line.lower() for line in err.drain()), err.seen


def test_bookmarks_come_when_asked_and_carry_progress_etcd_reports(
    server: RunningServer, etcd_server: Any, etcd_prefix: str
) -> None:
    listed = server.request("GET", collection_path("quiet")).json()["metadata"]["resourceVersion"]
    connection = server.connect(timeout=DEADLINE)
    connection.request(
        "GET", collection_path("quiet") + f"?watch=true&allowWatchBookmarks=true&resourceVersion={listed}"
    )
    response = connection.getresponse()
    assert response.status == 200

    async def write_outside() -> int:
        # A key outside this server's prefix: its watch never sees it, only etcd's progress notifications can.
        store = EtcdStore(endpoints=[etcd_server.endpoint], prefix=f"/test/{uuid.uuid4().hex}")
        await store.start()
        try:
            return int((await store.create("/other/x", {"metadata": {"name": "x"}}))["metadata"]["resourceVersion"])
        finally:
            await store.close()

    outside = asyncio.run(write_outside())
    try:
        while True:
            event = json.loads(response.readline())
            assert event["type"] == "BOOKMARK", event
            assert event["object"]["kind"] == "CoredumpEndpoint"
            if int(event["object"]["metadata"]["resourceVersion"]) >= outside:
                break
    finally:
        connection.close()
    # A list not older than that revision waits for the cache to get there, by asking etcd for progress.
    fresh = server.request(
        "GET", collection_path("quiet") + f"?resourceVersion={outside}&resourceVersionMatch=NotOlderThan"
    )
    assert fresh.status == 200, fresh.body
    assert int(fresh.json()["metadata"]["resourceVersion"]) >= outside


def test_no_bookmarks_unless_asked(server: RunningServer) -> None:
    listed = server.request("GET", collection_path("quiet2")).json()["metadata"]["resourceVersion"]
    connection = server.connect(timeout=DEADLINE)
    # The server ends the watch after 3 s, three bookmark intervals: nothing may have been sent.
    connection.request("GET", collection_path("quiet2") + f"?watch=true&timeoutSeconds=3&resourceVersion={listed}")
    response = connection.getresponse()
    assert response.status == 200
    assert response.read() == b""
    connection.close()
