"""
Flows 3 and 4: endpoints for real Pod objects (auto-created for a live pod with cores; created by hand with the
real uid of a deleted pod), a watch through the aggregator, and the agent's CoreDumped Event on the real pod.
"""

from __future__ import annotations

import json
import subprocess

from fixtures_apiserver import kubectl_binary
from workloads import endpoint_yaml, file_core, make_namespace, make_pod, wait_for


def test_endpoint_is_auto_created_for_a_live_pod_and_by_hand_for_a_deleted_one(installed, real_core) -> None:
    cp = installed.cp
    make_namespace(cp, "team-pods")
    watch = subprocess.Popen(
        [
            kubectl_binary("1.33"),
            "--kubeconfig",
            str(cp.admin_kubeconfig),
            "get",
            "cde",
            "-n",
            "team-pods",
            "-w",
            "-o",
            "name",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        live = make_pod(cp, "team-pods", "live")
        file_core(installed, real_core.path, namespace="team-pods", pod="live", uid=live)
        auto = wait_for(
            lambda: cp.kubectl("get", "cde", "live", "-n", "team-pods", "-o", "json", check=False).stdout,
            "the auto-created endpoint",
            timeout=90,
        )
        assert json.loads(auto)["spec"]["podUID"] == live

        gone = make_pod(cp, "team-pods", "gone")
        file_core(installed, real_core.path, namespace="team-pods", pod="gone", uid=gone)
        cp.kubectl("delete", "pod", "gone", "-n", "team-pods", "--wait=false")
        wait_for(
            lambda: cp.kubectl("get", "pod", "gone", "-n", "team-pods", check=False).returncode != 0, "the pod to go"
        )
        cp.kubectl(
            "create",
            "-f",
            "-",
            input=endpoint_yaml("team-pods", "gone", gone),
            check=False,
            binary=kubectl_binary("1.27"),
        )
        got = json.loads(cp.kubectl("get", "cde", "gone", "-n", "team-pods", "-o", "json").stdout)
        assert got["spec"]["podUID"] == gone and got["status"]["coreCount"] == 1
    finally:
        watch.terminate()
        out, _ = watch.communicate(timeout=30)
    seen = out.split()
    assert "coredumpendpoint.coredump.example.io/live" in seen
    assert "coredumpendpoint.coredump.example.io/gone" in seen


def test_agent_posts_core_dumped_event_on_the_real_pod(installed, real_core) -> None:
    """The node path for real: the handler's capture with a fake /proc of the pod's container, then the agent."""
    from workloads import handler_fixtures

    cp = installed.cp
    make_namespace(cp, "team-events")
    uid = make_pod(cp, "team-events", "crasher")
    host_dir = installed.start_agent()
    config = host_dir / "handler.json"
    wait_for(config.exists, "the agent's handler config", timeout=60)
    node = handler_fixtures.NodeTree(installed.base / "events-node")
    pid = 4242
    node.add_process(pid, cgroup=handler_fixtures.cgroup_text("containerd-systemd", pod_uid=uid))
    node.add_log_link(namespace="team-events", pod="crasher", container="app", pod_uid=uid)
    argv = [*node.handler_args(), "capture", str(pid), str(pid), "11", "1795000000", "-1", "crasher"]
    argv[argv.index("--config") + 1] = str(config)
    argv[argv.index("--storage-root") + 1] = str(installed.storage)
    argv[argv.index("--state-dir") + 1] = str(config.parent / "state")
    with open(real_core.path, "rb") as f:
        done = subprocess.run(argv, stdin=f, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    for version in ("1.27", "1.33"):
        events = wait_for(
            lambda: (
                "CoreDumped"
                in (
                    out := cp.kubectl(
                        "events",
                        "-n",
                        "team-events",
                        "--for",
                        "pod/crasher",
                        binary=kubectl_binary(version),  # noqa: B023
                        check=False,
                    ).stdout
                )
                and out
            ),
            "the CoreDumped event",
            timeout=60,
        )
        assert "SIGSEGV" in events and "Container app dumped core" in events
    (ev,) = [e for e in cp.get_json("events", "-n", "team-events")["items"] if e["reason"] == "CoreDumped"]
    assert ev["involvedObject"]["uid"] == uid and ev["source"]["component"] == "coredump-agent"


def test_each_new_core_reaches_a_watcher_through_the_agents_event(installed, real_core) -> None:
    """
    Notified, not polled, for real: the agent's CoreDumped Event goes to kube-apiserver, our server's Event
    watch (its own service account and ClusterRole) re-reads that incarnation, and a watcher through the
    aggregator sees ADDED, then MODIFIED with the new coreCount; kubectl wait on the count returns. The server's
    full pass is 10 minutes away, so only the Event can have brought them.
    """
    cp = installed.cp
    make_namespace(cp, "team-notify")
    uid = make_pod(cp, "team-notify", "flaky")
    watch = subprocess.Popen(
        [
            kubectl_binary("1.33"),
            "--kubeconfig",
            str(cp.admin_kubeconfig),
            "get",
            "cde",
            "-n",
            "team-notify",
            "-w",
            "--output-watch-events",
            "-o",
            "json",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        file_core(installed, real_core.path, namespace="team-notify", pod="flaky", uid=uid)
        wait_for(
            lambda: cp.kubectl("get", "cde", "flaky", "-n", "team-notify", check=False).returncode == 0,
            "the endpoint, auto-created on the Event",
            timeout=60,
        )
        file_core(installed, real_core.path, namespace="team-notify", pod="flaky", uid=uid)
        waited = cp.kubectl(
            "wait",
            "cde/flaky",
            "-n",
            "team-notify",
            "--for=jsonpath={.status.coreCount}=2",
            "--timeout=60s",
            binary=kubectl_binary("1.27"),
            check=False,
            timeout=90,
        )
        assert waited.returncode == 0, waited.stderr
    finally:
        watch.terminate()
        out, _ = watch.communicate(timeout=30)
    decoder, events, rest = json.JSONDecoder(), [], out.strip()
    while rest:
        event, end = decoder.raw_decode(rest)
        events.append((event["type"], event["object"]["status"]["coreCount"]))
        rest = rest[end:].strip()
    assert events[:1] == [("ADDED", 1)] and ("MODIFIED", 2) in events, events
