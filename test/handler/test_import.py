"""``coredump-handler import`` takes only cores, says what it did in its exit code, writes only where told."""

from __future__ import annotations

import gzip
import os
import subprocess
from pathlib import Path

import pytest
from handler_harness import POD_UID, REPO, PYTHON, NodeTree, RealCore

from handler import layout

IMPORT = ("import", "--namespace", "demo", "--pod", "p-1", "--pod-uid", POD_UID, "--container", "c")


def run(node: NodeTree, *args: str, base: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run((base or node.handler_args()) + list(args), capture_output=True, text=True, cwd=REPO)


def nothing_written(node: NodeTree) -> bool:
    return not [p for d in (node.storage, node.spool, node.state) for p in d.rglob("*") if p.is_file()]


@pytest.mark.parametrize(
    "kind", ["empty", "text", "random", "directory", "elf-executable", "gzip-of-text", "broken-gzip", "missing"]
)
def test_anything_but_a_core_is_refused_with_one_line_and_exit_2(
    node: NodeTree, segv_core: RealCore, tmp_path: Path, kind: str
) -> None:
    path = tmp_path / kind
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("hello, I am not a core\n" * 10)
    elif kind == "random":
        path.write_bytes(os.urandom(100000))
    elif kind == "directory":
        path.mkdir()
    elif kind == "elf-executable":
        path.write_bytes(segv_core.exe.read_bytes())
    elif kind == "gzip-of-text":
        path.write_bytes(gzip.compress(b"not a core" * 100))
    elif kind == "broken-gzip":
        path.write_bytes(gzip.compress(segv_core.path.read_bytes())[:50])
    r = run(node, *IMPORT, str(path))
    assert r.returncode == 2, r
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and str(path) in r.stderr
    assert nothing_written(node)


def test_a_gzipped_core_is_imported_with_exe_and_command_line_from_its_notes(
    node: NodeTree, segv_core: RealCore, tmp_path: Path
) -> None:
    gz = tmp_path / "core.gz"
    gz.write_bytes(gzip.compress(segv_core.path.read_bytes()))
    r = run(node, *IMPORT, str(gz))
    assert r.returncode == 0, r.stderr
    (core,) = layout.list_cores(node.storage, namespace="demo")
    m = core.metadata
    assert gzip.decompress(core.core_path.read_bytes()) == segv_core.path.read_bytes()
    # /proc is long gone: the executable and command line come from NT_FILE/auxv and NT_PRPSINFO.
    assert m["exe"] == str(segv_core.exe) and m["cmdline"].startswith(str(segv_core.exe))
    assert (m["pid"], m["signal"]) == (segv_core.pid, 11)


def test_imports_are_not_rate_limited(node: NodeTree, segv_core: RealCore) -> None:
    limits = ["--rate-first", "1", "--rate-latest", "0", "--rate-window", "1h"]
    for i in range(3):
        r = run(node, *limits, *IMPORT, "--time", str(1795000000 + i), str(segv_core.path))
        assert r.returncode == 0, r.stderr
    assert len(layout.list_cores(node.storage, namespace="demo")) == 3


def test_import_exit_code_says_spooled_when_storage_cannot_take_it(node: NodeTree, segv_core: RealCore) -> None:
    missing = node.base / "no-such-storage"
    r = run(node, "--storage-root", str(missing), *IMPORT, str(segv_core.path))
    assert r.returncode == 3, r
    assert r.stdout.startswith("spooled") and [p for p in node.spool.iterdir() if not p.name.startswith(".")]


def test_import_without_a_spool_dir_writes_nowhere_it_was_not_told(
    node: NodeTree, segv_core: RealCore, tmp_path: Path
) -> None:
    """No --spool-dir, --state-dir or config file: nothing may appear under the built-in /host defaults."""
    base = [
        PYTHON,
        "-m",
        "handler.cli",
        "--config",
        str(tmp_path / "none.json"),
        "--storage-root",
        str(tmp_path / "missing-storage"),
        "--crictl",
        "",
    ]
    before = Path("/host").exists()
    r = run(node, *IMPORT, str(segv_core.path), base=base)
    assert r.returncode == 4 and "nothing written" in r.stderr and "Traceback" not in r.stderr
    assert Path("/host").exists() == before and not (tmp_path / "missing-storage").exists()


@pytest.mark.parametrize("value", ["1e20", "-5", "nan", "soon"])
def test_an_impossible_time_is_a_clear_error(node: NodeTree, segv_core: RealCore, value: str) -> None:
    r = run(node, *IMPORT, "--time", value, str(segv_core.path))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--time" in r.stderr
    assert nothing_written(node)
