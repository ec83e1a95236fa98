"""
Flows 5 and 6: the namespace controller deletes a namespace holding CoredumpEndpoints through our API; with our
server stopped the rest of the cluster keeps working (pods, partial api-resources, /openapi/v2), and after it comes
back explain works again. While our server is down, any namespace deleted waits (the controller cannot tell whether
it holds our objects), saying why in a condition, and completes once the server is back: what the README says.
"""

from __future__ import annotations

import json

from fixtures_apiserver import kubectl_binary
from workloads import endpoint_yaml, file_core, make_namespace, make_pod, wait_for


def _gone(cp, ns: str) -> bool:
    return cp.kubectl("get", "namespace", ns, check=False).returncode != 0


def test_deleting_a_namespace_with_endpoints_completes(server_up, real_core) -> None:
    cp = server_up.cp
    make_namespace(cp, "team-gone")
    uid = make_pod(cp, "team-gone", "crasher")
    file_core(server_up, real_core.path, namespace="team-gone", pod="crasher", uid=uid)
    cp.kubectl("apply", "-f", "-", input=endpoint_yaml("team-gone", "crasher"))
    cp.kubectl("delete", "namespace", "team-gone", "--wait=false")
    wait_for(lambda: _gone(cp, "team-gone"), "namespace team-gone to be deleted", timeout=120)


def test_cluster_keeps_working_while_our_server_is_down(server_up) -> None:
    cp, inst = server_up.cp, server_up
    make_namespace(cp, "team-outage")
    make_pod(cp, "team-outage", "bystander")
    inst.stop_server()
    try:
        inst.wait_available(want="False", timeout=90)
        for version in ("1.27", "1.33"):
            kubectl = kubectl_binary(version)
            pods = cp.kubectl("get", "pods", "-n", "team-outage", "-o", "name", binary=kubectl).stdout.split()
            assert pods == ["pod/bystander"]
            res = cp.kubectl("api-resources", binary=kubectl, check=False)
            assert "pods" in res.stdout.split() and "coredumpendpoints" not in res.stdout
            if version == "1.27":  # legacy discovery: partial list, the failing group named, exit 1
                assert res.returncode != 0 and "coredump.example.io/v1alpha1" in res.stderr
            else:  # aggregated discovery (kubectl >= 1.30 here): the stale group is left out, exit 0
                assert res.returncode == 0
        openapi = json.loads(cp.kubectl("get", "--raw", "/openapi/v2", timeout=120).stdout)
        assert "io.k8s.api.core.v1.Pod" in openapi["definitions"]
        # A namespace deleted now waits for our API (its objects cannot be listed), and is not lost.
        cp.kubectl("delete", "namespace", "team-outage", "--wait=false")

        def discovery_failure() -> bool:
            ns = cp.get_json("namespace", "team-outage")
            conds = {c["type"]: c for c in ns["status"].get("conditions", [])}
            cond = conds.get("NamespaceDeletionDiscoveryFailure")
            return (
                ns["status"]["phase"] == "Terminating"
                and cond is not None
                and cond["status"] == "True"
                and "coredump.example.io/v1alpha1" in cond["message"]
            )

        wait_for(discovery_failure, "the namespace controller to report our group's discovery failure", timeout=90)
    finally:
        inst.start_server()
    wait_for(lambda: _gone(cp, "team-outage"), "namespace team-outage to finish deleting", timeout=180)
    explain = wait_for(
        lambda: cp.kubectl("explain", "coredumpendpoint.spec", check=False).stdout, "explain to work again", timeout=120
    )
    assert "CoredumpEndpoint" in explain
