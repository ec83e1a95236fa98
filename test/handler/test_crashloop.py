"""Crash loops are cheap: the rate limit is decided before compression; cores over it are read, discarded, counted."""

from __future__ import annotations

from handler_harness import NodeTree, RealCore
from handler_harness import setup_pod

from handler import layout
from handler.agent.metrics import Metrics
from handler.outcome import read_outcomes


def test_cores_over_the_limit_are_never_written_and_are_counted(node: NodeTree, segv_core: RealCore) -> None:
    setup_pod(node, segv_core)
    limits = ("--rate-first", "2", "--rate-latest", "1", "--rate-window", "1h", "--rate-latest-interval", "1h")
    for i in range(6):
        r = node.run_capture(segv_core.path, pid=segv_core.pid, signal=11, time=1795000000 + i, extra=limits)
        assert r.returncode == 0, r.stderr.decode()
    kept = [c.metadata["timestamp"][-3:-1] for c in layout.list_cores(node.storage, namespace="team-a")]
    # The first two, and one "latest" (the next one is not due before the interval).
    assert kept == ["40", "41", "42"]
    records = [rec for _, rec in read_outcomes(node.state / "outcomes")]
    assert [r["result"] for r in records] == ["stored"] * 3 + ["dropped"] * 3
    size = segv_core.path.stat().st_size
    for rec in records[3:]:
        assert rec["reason"] == "rate-limited" and rec["observedSize"] == size
    m = Metrics()
    for rec in records:
        m.account(rec)
    assert m.get("coredump_cores_dropped_total", reason="rate-limited") == 3


def test_with_interval_zero_each_new_core_replaces_the_oldest_latest(node: NodeTree, segv_core: RealCore) -> None:
    setup_pod(node, segv_core)
    limits = ("--rate-first", "1", "--rate-latest", "2", "--rate-window", "1h", "--rate-latest-interval", "0")
    for i in range(5):
        r = node.run_capture(segv_core.path, pid=segv_core.pid, signal=11, time=1795000000 + i, extra=limits)
        assert r.returncode == 0, r.stderr.decode()
    kept = [c.metadata["timestamp"][-3:-1] for c in layout.list_cores(node.storage, namespace="team-a")]
    assert kept == ["40", "43", "44"]
