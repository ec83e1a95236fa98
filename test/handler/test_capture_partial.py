"""Partial cores: a stream that stalls, is cut off, or whose handler is told to stop keeps what arrived, labelled."""

from __future__ import annotations

import gzip
import signal
import subprocess
import time

from handler_harness import REPO, NodeTree, RealCore, gdb_backtrace
from handler_harness import setup_pod, visible_files

from handler import elfinfo, layout
from handler.outcome import read_outcomes
from waiting import wait_until


def notes_end(core: RealCore) -> int:
    shape = elfinfo.CoreShape()
    shape.feed(core.path.read_bytes())
    assert shape.notes_end is not None
    return shape.notes_end


def start_capture(node: NodeTree, core: RealCore, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        node.handler_args(*extra, "capture", str(core.pid), str(core.pid), "11", "1795000000", "-1", "crasher"),
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )


def test_a_stalled_stream_keeps_its_partial_core_marked_stalled(node: NodeTree, segv_core: RealCore) -> None:
    setup_pod(node, segv_core)
    data = segv_core.path.read_bytes()
    sent = data[: notes_end(segv_core) + 8192]
    proc = start_capture(node, segv_core, "--stall-timeout", "1s")
    assert proc.stdin is not None
    proc.stdin.write(sent)
    proc.stdin.flush()
    try:
        # The writer never closes: the handler must end by itself.
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        proc.stdin.close()
        proc.kill()
    (core,) = layout.list_cores(node.storage, namespace="team-a")
    m = core.metadata
    assert m["truncated"] is True and m["truncationReason"] == "stalled"
    assert m["size"] == m["observedSize"] == len(sent)
    assert gzip.decompress(core.core_path.read_bytes()) == sent
    ((_, rec),) = read_outcomes(node.state / "outcomes")
    assert rec["result"] == "stored" and rec["truncated"] is True and rec["truncationReason"] == "stalled"


def test_a_stream_cut_short_by_the_kernel_is_kept_marked_killed_and_gdb_reads_it(
    node: NodeTree, segv_core: RealCore
) -> None:
    """The dumping process killed mid-dump: the kernel closes the pipe early. The headers say it is short."""
    setup_pod(node, segv_core)
    data = segv_core.path.read_bytes()
    cut = segv_core.path.parent / "cut.core"
    cut.write_bytes(data[: len(data) * 3 // 4])
    r = node.run_capture(cut, pid=segv_core.pid, signal=11)
    assert r.returncode == 0, r.stderr.decode()
    (core,) = layout.list_cores(node.storage, namespace="team-a")
    assert core.metadata["truncated"] is True and core.metadata["truncationReason"] == "killed"
    assert core.metadata["observedSize"] == len(data) * 3 // 4
    # Still worth having: gdb reads the threads' registers from the notes.
    out = segv_core.path.parent / "stored.core"
    out.write_bytes(gzip.decompress(core.core_path.read_bytes()))
    assert "crash_in_segv_function" in gdb_backtrace(segv_core.exe, out)


def test_sigterm_to_the_handler_keeps_what_arrived_marked_killed(node: NodeTree, segv_core: RealCore) -> None:
    setup_pod(node, segv_core)
    sent = segv_core.path.read_bytes()[: notes_end(segv_core) + 4096]
    proc = start_capture(node, segv_core)
    assert proc.stdin is not None
    proc.stdin.write(sent)
    proc.stdin.flush()
    # Once the handler has the bytes (it reads ahead at once), tell it to stop.
    wait_until((node.storage / "team-a").exists, what="the handler to start filing")
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=30) == 0
    finally:
        proc.stdin.close()
        proc.kill()
    (core,) = layout.list_cores(node.storage, namespace="team-a")
    assert core.metadata["truncated"] is True and core.metadata["truncationReason"] == "killed"
    assert gzip.decompress(core.core_path.read_bytes()) == sent


def test_a_stream_cut_before_its_notes_keeps_nothing_and_says_why(node: NodeTree, segv_core: RealCore) -> None:
    setup_pod(node, segv_core)
    cut = segv_core.path.parent / "head.core"
    cut.write_bytes(segv_core.path.read_bytes()[: notes_end(segv_core) - 100])
    r = node.run_capture(cut, pid=segv_core.pid, signal=11)
    assert r.returncode == 3
    assert visible_files(node.storage) == []
    ((_, rec),) = read_outcomes(node.state / "outcomes")
    assert rec["result"] == "error" and rec["reason"] == "killed" and "notes" in rec["detail"]
