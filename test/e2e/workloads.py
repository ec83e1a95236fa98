"""
Namespaces, pods and cores for the e2e flows: real Pod objects (no kubelet runs them, they stay Pending) and
real kernel cores of test/handler's crashing program, filed on our storage by the handler's ``import``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

# The node-side tests' helpers (their crashing program and its real cores): conftest.py puts test/handler on
# sys.path, and the module's name is unique.
import handler_harness as handler_fixtures
from cluster import ControlPlane
from install import Installation, service_account_of
from waiting import wait_until

from handler.outcome import read_outcomes

RealCore = handler_fixtures.RealCore
CRASHER_C = handler_fixtures.CRASHER_C
make_core = handler_fixtures.make_core


def wait_for(predicate, what: str, *, timeout: float = 60.0, interval: float = 0.5):
    return wait_until(predicate, what=what, timeout=timeout, interval=interval)


def make_namespace(cp: ControlPlane, name: str) -> None:
    cp.kubectl("create", "namespace", name)
    wait_for(
        lambda: cp.kubectl("get", "sa", "default", "-n", name, check=False).returncode == 0,
        f"service account default in {name}",
    )


def make_pod(cp: ControlPlane, namespace: str, name: str, *, container: str = "app") -> str:
    """Creates a Pod object and returns its uid."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"containers": [{"name": container, "image": "registry.invalid/crasher:1"}]},
    }
    out = cp.kubectl("create", "-f", "-", "-o", "json", input=json.dumps(pod)).stdout
    return json.loads(out)["metadata"]["uid"]


def file_core(
    inst: Installation, core: Path, *, namespace: str, pod: str, uid: str, container: str = "app", notify: bool = True
) -> None:
    """
    Files one real core on storage as the node's handler does, then (``notify``) does what the agent's outcome
    pass does with the handler's outcome record: posts the CoreDumped Event on the pod through the real
    kube-apiserver, with the agent's own service account and EventPoster. That Event is how our server learns
    of the core within seconds (its full pass is minutes away).
    """
    work = inst.base / "handler"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "handler.cli",
            "--config",
            str(work / "no-config.json"),
            "--storage-root",
            str(inst.storage),
            "--spool-dir",
            str(work / "spool"),
            "--state-dir",
            str(work / "state"),
            "--crictl",
            "",
            "--node",
            "node-1",
            "import",
            "--namespace",
            namespace,
            "--pod",
            pod,
            "--pod-uid",
            uid,
            "--container",
            container,
            str(core),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    outcomes = work / "state" / "outcomes"
    if notify:
        post_core_dumped_events(inst, outcomes)
    else:
        for path, _record in read_outcomes(outcomes):
            path.unlink()


def post_core_dumped_events(inst: Installation, outcomes: Path) -> None:
    """The agent's outcome pass for the handler's records in ``outcomes``: one CoreDumped Event each."""
    from handler.agent.events import EventPoster

    kubeconfig = getattr(inst, "_agent_kubeconfig", None)
    if kubeconfig is None:
        kubeconfig = inst.token_kubeconfig(*service_account_of(inst.objects, "DaemonSet"))
        inst._agent_kubeconfig = kubeconfig  # type: ignore[attr-defined]

    async def post() -> None:
        poster = EventPoster(kubeconfig=str(kubeconfig), node="node-1")
        try:
            for path, record in read_outcomes(outcomes):
                if record.get("result") == "stored" and record.get("kept"):
                    await poster.post(record)
                path.unlink()
        finally:
            await poster.close()

    asyncio.run(post())


def dump_path(namespace: str, name: str) -> str:
    return f"/apis/coredump.example.io/v1alpha1/namespaces/{namespace}/coredumpendpoints/{name}/dump"


def endpoint_yaml(namespace: str, name: str, uid: str | None = None) -> str:
    spec = {"podUID": uid} if uid else {}
    return json.dumps(
        {
            "apiVersion": "coredump.example.io/v1alpha1",
            "kind": "CoredumpEndpoint",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }
    )
