"""
Flow 7: a dump that lasts longer than kube-apiserver's --request-timeout (short in this harness) is cut by
kube-apiserver (a proxied GET of a subresource is not long-running to it), and a download resumed with Range and
If-Range gets exactly the rest: the reassembled archive is byte-identical to one read in one go.
"""

from __future__ import annotations

import subprocess
import textwrap

import pytest

from cluster import REQUEST_TIMEOUT, https_get
from workloads import dump_path, endpoint_yaml, file_core, make_core, make_namespace, make_pod

BIG_CRASHER_C = textwrap.dedent(r"""
    #include <stdlib.h>
    static unsigned char noise[48 << 20];
    int main(void) {
        unsigned x = 2463534242u;
        for (size_t i = 0; i < sizeof noise; i++) { x ^= x << 13; x ^= x >> 17; x ^= x << 5; noise[i] = x; }
        *(volatile int *)0 = noise[7];
        return 0;
    }
""")


@pytest.fixture(scope="module")
def big_core(tmp_path_factory):
    d = tmp_path_factory.mktemp("big-crasher")
    (d / "big.c").write_text(BIG_CRASHER_C)
    subprocess.run(["gcc", "-O1", "-o", str(d / "big"), str(d / "big.c")], check=True)
    return make_core(d / "big", d / "core", "segv")


def test_slow_dump_is_cut_by_kube_apiserver_and_resumes_with_range(installed, big_core) -> None:
    cp = installed.cp
    make_namespace(cp, "team-slow")
    uid = make_pod(cp, "team-slow", "big")
    file_core(installed, big_core.path, namespace="team-slow", pod="big", uid=uid)
    cp.kubectl("apply", "-f", "-", input=endpoint_yaml("team-slow", "big"))
    path = dump_path("team-slow", "big")

    status, headers, whole, error = https_get(cp, path)
    assert status == 200 and error is None and len(whole) == int(headers["content-length"])
    etag = headers["etag"]

    # ~1 MiB/s: the 48 MiB archive cannot finish within the request timeout (read at full speed, it does).
    status, headers, first, error = https_get(cp, path, read_delay=0.06)
    assert status == 200 and error is not None, f"not cut (timeout {REQUEST_TIMEOUT}): {len(first)} bytes"
    assert 0 < len(first) < len(whole)

    status, headers, rest, error = https_get(cp, path, headers={"Range": f"bytes={len(first)}-", "If-Range": etag})
    assert status == 206 and error is None
    assert headers["content-range"] == f"bytes {len(first)}-{len(whole) - 1}/{len(whole)}"
    assert first + rest == whole
