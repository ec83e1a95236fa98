"""Crashes that explain themselves: objects kept by build-id, a backtrace and a signature, on real programs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from handler import backtrace, explain, objects, sparsecore
from waiting import wait_until

PROGRAM = textwrap.dedent(r"""
    #include <signal.h>
    #include <stdlib.h>
    #include <string.h>
    #include <unistd.h>
    static char filler[8 << 20];
    __attribute__((noinline)) void crash_here(volatile int *p) { raise(SIGSTOP); *p = 1; }
    __attribute__((noinline)) void crash_there(volatile int *p) { raise(SIGSTOP); *p = 2; }
    __attribute__((noinline)) void on_the_way(int which) { if (which) crash_there(0); else crash_here(0); }
    int main(int argc, char **argv) {
        memset(filler, 7, sizeof filler);
        on_the_way(argc > 1 && strcmp(argv[1], "there") == 0);
        return filler[3];
    }
""")


@dataclass
class Image:
    """A program in a root directory of its own, with its libraries: a container image on disk."""

    root: Path
    exe: str  # path inside the root


def _libraries(binary: Path) -> list[Path]:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/"):
            libs.append(Path(path))
    return libs


def make_image(base: Path, *, flags: list[str], strip: bool) -> Image:
    base.mkdir(parents=True, exist_ok=True)
    src = base / "prog.c"
    src.write_text(PROGRAM)
    root = base / "root"
    (root / "app").mkdir(parents=True)
    exe = root / "app" / "prog"
    subprocess.run(["gcc", "-O1", *flags, "-o", str(exe), str(src)], check=True)
    if strip:
        subprocess.run(["strip", str(exe)], check=True)
    for lib in _libraries(exe):
        dst = root / str(lib).lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib.resolve(), dst)
    return Image(root=root, exe="/app/prog")


@dataclass
class Held:
    """A process stopped in its crashing function, and its core taken live with gcore, as the kernel holds it."""

    pid: int
    core: Path

    @property
    def proc(self) -> Path:
        return Path(f"/proc/{self.pid}")


def hold(image: Image, base: Path, *args: str) -> Held:
    proc = subprocess.Popen(["chroot", str(image.root), image.exe, *args], start_new_session=True)

    def stopped() -> bool:
        assert proc.poll() is None, "the program exited before its crash"
        return Path(f"/proc/{proc.pid}/stat").read_text().split(")")[-1].split()[0] == "T"

    wait_until(stopped, what="the program to stop at its crash", interval=0.02)
    prefix = base / f"core-{proc.pid}"
    subprocess.run(["gcore", "-o", str(prefix), str(proc.pid)], check=True, capture_output=True, timeout=120)
    return Held(pid=proc.pid, core=Path(f"{prefix}.{proc.pid}"))


def release(held: Held) -> None:
    os.kill(held.pid, signal.SIGKILL)
    try:
        os.waitpid(held.pid, 0)
    except ChildProcessError:
        pass


def sparse_of(core: Path, dst: Path, **kw: int) -> sparsecore.SparseCore:
    sc = sparsecore.SparseCore(dst, **kw)
    with open(core, "rb") as f:
        while chunk := f.read(1 << 16):
            sc.feed(chunk)
    sc.close()
    return sc


@pytest.fixture
def store(tmp_path: Path) -> Path:
    d = tmp_path / "storage"
    d.mkdir()
    return d


@pytest.fixture(params=["debug-info", "symbols", "stripped"])
def image(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Image]:
    flags = {"debug-info": ["-g"], "symbols": [], "stripped": []}[request.param]
    yield make_image(tmp_path / request.param, flags=flags, strip=request.param == "stripped")


def function_names(result: dict) -> list[str]:
    return [f.get("function", "") for f in result["backtrace"]["threads"][0]["frames"]]


def test_a_held_crash_gets_a_backtrace_and_its_objects_are_kept(image: Image, store: Path, tmp_path: Path) -> None:
    held = hold(image, tmp_path)
    try:
        sparse = sparse_of(held.core, tmp_path / "sparse")
        extra = explain.explain(sparse=sparse.path, proc_pid=held.proc, storage_root=store)
    finally:
        release(held)
    assert "backtraceError" not in extra, extra
    states = {o["path"]: o["state"] for o in extra["objects"]}
    assert states and set(states.values()) == {"stored"}, extra["objects"]
    for o in extra["objects"]:
        d = objects.object_dir(store, o["buildID"])
        assert (d / objects.OBJECT_NAME).is_file() and (d / objects.INFO_NAME).is_file()
    frames = extra["backtrace"]["threads"][0]["frames"]
    names = function_names(extra)
    stripped = "stripped" in str(image.root)
    if stripped:
        # no symbols: the program's frames are module + offset, libc's still have names
        prog = [f for f in frames if f.get("module", "").endswith("/prog")]
        assert prog and all("function" not in f and f["offset"].startswith("0x") for f in prog)
    else:
        assert "crash_here" in names and names.index("crash_here") < names.index("on_the_way") < names.index("main")
    if "debug-info" in str(image.root):
        crash = next(f for f in frames if f.get("function") == "crash_here")
        assert crash["file"].endswith("prog.c") and crash["line"] > 0
    assert extra["signature"] == backtrace.signature(frames)
    assert extra["topFrames"] == [backtrace.frame_key(f) for f in frames[:3]]
    # frames say where in the code, never what was in memory
    assert all(set(f) <= {"pc", "module", "buildID", "offset", "function", "file", "line"} for f in frames)


def test_signature_same_path_same_signature_other_path_differs_second_crash_copies_nothing(
    store: Path, tmp_path: Path
) -> None:
    image = make_image(tmp_path / "img", flags=["-g"], strip=False)
    results = []
    for n, args in enumerate([(), (), ("there",)]):
        held = hold(image, tmp_path, *args)
        try:
            sparse = sparse_of(held.core, tmp_path / f"sparse-{n}")
            results.append(explain.explain(sparse=sparse.path, proc_pid=held.proc, storage_root=store))
        finally:
            release(held)
    first, second, other = results
    assert first["signature"] == second["signature"] != other["signature"]
    # ASLR moved every address between the two runs; the signature did not move
    assert first["backtrace"]["threads"][0]["frames"][0]["pc"] != second["backtrace"]["threads"][0]["frames"][0]["pc"]
    assert {o["state"] for o in second["objects"]} == {"stored-earlier"}
    assert "size" not in second["objects"][0]  # nothing was copied
    assert "crash_there" in function_names(other)


def test_after_the_program_and_its_root_are_gone_the_store_still_symbolizes(store: Path, tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", flags=["-g"], strip=False)
    held = hold(image, tmp_path)
    try:
        sparse = sparse_of(held.core, tmp_path / "sparse")
        explain.explain(sparse=sparse.path, proc_pid=held.proc, storage_root=store)
    finally:
        release(held)
    shutil.rmtree(image.root)
    later = explain.explain(sparse=sparse.path, proc_pid=None, storage_root=store)
    assert "crash_here" in function_names(later)
    assert {o["state"] for o in later["objects"]} == {"stored-earlier"}


def test_budgets_and_missing_objects_are_recorded_and_the_explanation_still_comes(store: Path, tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", flags=["-g"], strip=False)
    held = hold(image, tmp_path)
    try:
        sparse = sparse_of(held.core, tmp_path / "sparse")
        tight = explain.explain(
            sparse=sparse.path, proc_pid=held.proc, storage_root=store, budget=explain.Budget(object_bytes=1)
        )
        assert {(o["state"], o.get("reason")) for o in tight["objects"]} == {("skipped", "byte budget")}
        # still unwound (the core is explained as far as the process's own root allows), and kept
        assert tight["backtrace"]["threads"][0]["frames"]
        slow = explain.explain(
            sparse=sparse.path, proc_pid=held.proc, storage_root=store, budget=explain.Budget(object_seconds=0)
        )
        assert {o.get("reason") for o in slow["objects"]} == {"time budget"}
    finally:
        release(held)
    # a "process" whose files cannot be found: every object skipped as unreadable, nothing stored
    fake = tmp_path / "fakeproc"
    (fake / "root").mkdir(parents=True)
    gone = explain.explain(sparse=sparse.path, proc_pid=fake, storage_root=store)
    assert gone["objects"] and all(
        o["state"] == "skipped" and o["reason"].startswith("unreadable") for o in gone["objects"]
    )
    assert not list(store.rglob(objects.OBJECT_NAME)) and not list(store.rglob("*/*/*"))


def test_a_planted_file_with_another_build_id_is_refused(store: Path, tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", flags=["-g"], strip=False)
    other = make_image(tmp_path / "other", flags=[], strip=True)
    held = hold(image, tmp_path)
    try:
        sparse = sparse_of(held.core, tmp_path / "sparse")
        mapped = objects.mapped_objects(
            sparse.path.read_bytes()[: sparsecore.MAX_HEAD],
            lambda o, n: os.pread(os.open(sparse.path, os.O_RDONLY), n, o),
        )
    finally:
        release(held)
    prog = next(m for m in mapped if m.path.endswith("/app/prog"))
    # a proc dir whose root holds a different binary at the same path (no map_files: the process is gone)
    fake = tmp_path / "fakeproc"
    target = fake / "root" / prog.path.lstrip("/")
    target.parent.mkdir(parents=True)
    shutil.copy2(other.root / "app/prog", target)
    (rec,) = objects.keep_objects(store, fake, [prog])
    assert rec["state"] == "skipped" and "build-id mismatch" in rec["reason"]
    assert not objects.is_stored(store, prog.build_id)
    # a link planted at that path is not followed either
    target.unlink()
    target.symlink_to(image.root / "app/prog")
    (rec,) = objects.keep_objects(store, fake, [prog])
    assert rec["state"] == "skipped" and rec["reason"].startswith("unreadable")


def test_a_core_without_notes_is_recorded_not_fatal(store: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x7fELF" + b"\0" * 4000)
    sparse = sparse_of(junk, tmp_path / "sparse")
    extra = explain.explain(sparse=sparse.path, proc_pid=None, storage_root=store)
    assert extra["objects"] == [] and "backtraceError" in extra


def test_the_sparse_copy_is_small_for_a_large_core(tmp_path: Path) -> None:
    """An 8 MiB filler plus heap: the copy keeps the notes, stacks and file-backed data, not the memory."""
    image = make_image(tmp_path / "img", flags=["-g"], strip=False)
    held = hold(image, tmp_path)
    try:
        sparse = sparse_of(held.core, tmp_path / "sparse")
    finally:
        release(held)
    size = held.core.stat().st_size
    assert sparse.path.stat().st_size == size  # same offsets: an unwinder reads it like the core
    assert sparse.threads == 1
    assert sparse.kept < size / 2 and sparse.path.stat().st_blocks * 512 < size / 2


def test_retention_removes_objects_no_core_references(store: Path, tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", flags=["-g"], strip=False)
    held = hold(image, tmp_path)
    try:
        sparse = sparse_of(held.core, tmp_path / "sparse")
        extra = explain.explain(sparse=sparse.path, proc_pid=held.proc, storage_root=store)
    finally:
        release(held)
    ids = objects.referenced_build_ids({"objects": extra["objects"]})
    prog = next(o["buildID"] for o in extra["objects"] if o["path"].endswith("/app/prog"))
    now = time.time()
    # within the grace nothing goes; then only what no core references
    assert objects.collect_garbage(store, referenced=set(), now=now) == []
    assert objects.collect_garbage(store, referenced=ids - {prog}, now=now + 7200) == [prog]
    assert not objects.is_stored(store, prog) and all(objects.is_stored(store, b) for b in ids - {prog})
