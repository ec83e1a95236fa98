"""
A new core reaches real kubectl (1.27 and 1.33) without a poll of storage by the reader: dev mode's change
detector re-reads the incarnation, the stored status changes, and a watcher sees MODIFIED with the new
coreCount; ``kubectl wait --for=jsonpath`` returns. Status writes (``--subresource=status``) are authorized as
``patch``/``update`` of ``coredumpendpoints/status``, validated like any write, and only make the server
re-read storage. Two replicas on one real etcd make one ADDED per new incarnation. Dev mode answers
``kubectl auth can-i`` from its rule table and says in one line why ``kubectl events`` has nothing.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures_apiserver import (
    NEWEST_KUBECTL,
    OLDEST_KUBECTL,
    RunningServer,
    collection_path,
    item_path,
    kubectl_binary,
    start_apiserver,
)

from apiserver_harness import new_uid, store_core

T0 = datetime.datetime(2026, 11, 30, 8, 0, tzinfo=datetime.timezone.utc)
DEADLINE = 30.0


class KubectlWatch:
    """``kubectl get cde -w --output-watch-events -o json`` running, its events parsed as they come."""

    def __init__(self, server: RunningServer, *args: str, version: str | None = None) -> None:
        command = [
            kubectl_binary(version),
            "--kubeconfig",
            str(server.kubeconfig),
            "get",
            "cde",
            "-w",
            "--output-watch-events",
            "-o",
            "json",
            *args,
        ]
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "HOME": str(server.dev_dir)},
        )
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        decoder, buffer = json.JSONDecoder(), ""
        for line in self.process.stdout:
            buffer += line
            while buffer.strip():
                try:
                    event, end = decoder.raw_decode(buffer.lstrip())
                except ValueError:
                    break  # an object not complete yet
                buffer = buffer.lstrip()[end:]
                with self._lock:
                    self.events.append(event)

    def wait_for(self, predicate: Any) -> list[dict[str, Any]]:
        """All events so far once ``predicate(events)`` holds (deadline-bounded, never a timed assertion)."""
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            with self._lock:
                events = list(self.events)
            if predicate(events):
                return events
            if self.process.poll() is not None:
                stderr = self.process.stderr.read() if self.process.stderr else ""
                raise AssertionError(f"kubectl watch ended: {stderr}")
            time.sleep(0.05)
        raise AssertionError(f"no such events within {DEADLINE} s: {events}")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture
def watchers() -> Iterator[list[KubectlWatch]]:
    opened: list[KubectlWatch] = []
    yield opened
    for watch in opened:
        watch.close()


def counts(events: list[dict[str, Any]], name: str) -> list[tuple[str, int]]:
    return [(e["type"], e["object"]["status"]["coreCount"]) for e in events if e["object"]["metadata"]["name"] == name]


def file_core(server: RunningServer, *, namespace: str, pod: str, uid: str, minute: int) -> None:
    store_core(
        server.storage_root,
        namespace=namespace,
        pod=pod,
        pod_uid=uid,
        container="app",
        data=b"core %d" % minute,
        when=T0 + datetime.timedelta(minutes=minute),
    )


@pytest.mark.parametrize("version", [OLDEST_KUBECTL, NEWEST_KUBECTL])
def test_a_watcher_sees_added_then_modified_with_each_new_core_count(
    apiserver: RunningServer, watchers: list[KubectlWatch], version: str
) -> None:
    namespace, pod, uid = f"watch-{version.replace('.', '-')}", "api-0", new_uid()
    watch = KubectlWatch(apiserver, "-n", namespace, version=version)
    watchers.append(watch)
    # The watch is open once kubectl has listed (an empty namespace: nothing to print yet); give it a known
    # object first so that its arrival proves the watch is established.
    file_core(apiserver, namespace=namespace, pod=pod, uid=uid, minute=1)
    watch.wait_for(lambda ev: counts(ev, pod) == [("ADDED", 1)])
    for n in (2, 3):
        file_core(apiserver, namespace=namespace, pod=pod, uid=uid, minute=n)
        events = watch.wait_for(lambda ev, n=n: counts(ev, pod)[-1] == ("MODIFIED", n))
    assert counts(events, pod) == [("ADDED", 1), ("MODIFIED", 2), ("MODIFIED", 3)]
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert rvs == sorted(set(rvs))  # a new resourceVersion per core


@pytest.mark.parametrize("version", [OLDEST_KUBECTL, NEWEST_KUBECTL])
def test_kubectl_wait_for_the_core_count_returns(apiserver: RunningServer, version: str) -> None:
    namespace, pod, uid = f"wait-{version.replace('.', '-')}", "job-0", new_uid()
    file_core(apiserver, namespace=namespace, pod=pod, uid=uid, minute=1)
    deadline = time.monotonic() + DEADLINE
    while apiserver.request("GET", item_path(pod, namespace)).status != 200:
        assert time.monotonic() < deadline, "the endpoint was never auto-created"
        time.sleep(0.05)
    waiting = subprocess.Popen(
        [
            kubectl_binary(version),
            "--kubeconfig",
            str(apiserver.kubeconfig),
            "-n",
            namespace,
            "wait",
            f"cde/{pod}",
            "--for=jsonpath={.status.coreCount}=2",
            f"--timeout={DEADLINE:.0f}s",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HOME": str(apiserver.dev_dir)},
    )
    file_core(apiserver, namespace=namespace, pod=pod, uid=uid, minute=2)
    out, err = waiting.communicate(timeout=DEADLINE + 10)
    assert waiting.returncode == 0, err
    assert "condition met" in out


def test_status_writes_are_authorized_validated_and_only_reread_storage(apiserver: RunningServer) -> None:
    namespace, pod, uid = "status-writes", "w-0", new_uid()
    file_core(apiserver, namespace=namespace, pod=pod, uid=uid, minute=1)
    path = item_path(pod, namespace) + "/status"
    deadline = time.monotonic() + DEADLINE
    while apiserver.request("GET", path).status != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # A client's status is ignored: the answer is the stored truth.
    patched = apiserver.kubectl(
        "-n",
        namespace,
        "patch",
        "cde",
        pod,
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status":{"coreCount":99}}',
        "-o",
        "json",
        version=NEWEST_KUBECTL,
    )
    assert json.loads(patched.stdout)["status"]["coreCount"] == 1
    current = apiserver.request("GET", path).json()
    put = apiserver.request("PUT", path, body={**current, "status": {"coreCount": 42}})
    assert put.status == 200 and put.json()["status"]["coreCount"] == 1
    # Validated like any write, as a Status.
    for body, code in (
        ({**current, "kind": "Pod"}, 400),
        ({**current, "metadata": {**current["metadata"], "name": "other"}}, 400),
        ({**current, "metadata": {**current["metadata"], "resourceVersion": "1"}}, 409),
        ("[1,2", 400),
    ):
        answer = apiserver.request("PUT", path, body=body)
        assert answer.status == code and answer.json()["kind"] == "Status", answer.body
    # RBAC: a write to status is its own permission (patch on coredumpendpoints/status), which the viewer lacks.
    denied = apiserver.request(
        "PATCH",
        item_path(pod, "default") + "/status",
        body={},
        user="viewer",
        content_type="application/merge-patch+json",
    )
    assert denied.status == 403 and 'cannot patch resource "coredumpendpoints/status"' in denied.json()["message"]
    # Discovery advertises what is served.
    resources = apiserver.request("GET", "/apis/coredump.example.io/v1alpha1").json()["resources"]
    assert {r["name"]: sorted(r["verbs"]) for r in resources}["coredumpendpoints/status"] == ["get", "patch", "update"]


@pytest.mark.parametrize("version", [OLDEST_KUBECTL, NEWEST_KUBECTL])
def test_dev_mode_answers_auth_can_i_and_says_why_there_are_no_events(apiserver: RunningServer, version: str) -> None:
    def can_i(*args: str, context: str | None = None) -> str:
        result = apiserver.kubectl("auth", "can-i", *args, version=version, context=context, check=False)
        return result.stdout.strip()

    assert can_i("get", "cde", "--subresource=dump") == "yes"
    assert can_i("list", "cde", context="dev-viewer") == "yes"
    assert can_i("get", "cde", "--subresource=dump", context="dev-viewer") == "no"
    assert can_i("list", "cde", "-n", "kube-system", context="dev-viewer") == "no"
    events = apiserver.kubectl("events", version=version, check=False)
    assert events.returncode != 0
    assert "serves only the coredump.example.io API" in events.stderr and len(events.stderr.splitlines()) == 1


@pytest.mark.etcd
def test_two_replicas_on_one_etcd_make_one_added_per_new_incarnation(
    tmp_path: Path, etcd_server: Any, etcd_prefix: str, watchers: list[KubectlWatch]
) -> None:
    storage = tmp_path / "cores"
    storage.mkdir()
    common = ("--etcd-servers", etcd_server.endpoint, "--etcd-prefix", etcd_prefix, "--storage-root", str(storage))
    one = start_apiserver(tmp_path / "one", *common)
    two = start_apiserver(tmp_path / "two", *common)
    try:
        watch = KubectlWatch(one, "-n", "ha", version=NEWEST_KUBECTL)
        watchers.append(watch)
        uid = new_uid()
        file_core(one, namespace="ha", pod="db-0", uid=uid, minute=1)
        watch.wait_for(lambda ev: counts(ev, "db-0")[-1:] == [("ADDED", 1)])
        file_core(one, namespace="ha", pod="db-0", uid=uid, minute=2)
        watch.wait_for(lambda ev: counts(ev, "db-0")[-1:] == [("MODIFIED", 2)])
        # A new incarnation of the same pod name (a StatefulSet pod recreated) in another pod of the namespace.
        file_core(one, namespace="ha", pod="db-1", uid=new_uid(), minute=3)
        events = watch.wait_for(lambda ev: counts(ev, "db-1")[-1:] == [("ADDED", 1)])
        # Both replicas saw every change; the atomic create and the compare-and-swap let one write through.
        listed = two.request("GET", collection_path("ha")).json()
        assert sorted(o["metadata"]["name"] for o in listed["items"]) == ["db-0", "db-1"]
        assert counts(events, "db-0") == [("ADDED", 1), ("MODIFIED", 2)]
        assert counts(events, "db-1") == [("ADDED", 1)]
    finally:
        one.stop()
        two.stop()
