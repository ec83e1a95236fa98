"""
Helpers of the node-side tests (imported explicitly, ``from handler_harness import NodeTree``; the fixtures that
use them are in this directory's conftest.py): real kernel cores of a small crashing program, and fake
proc/cgroup/log trees.

The cores are real: the program is compiled here and crashed under ``ulimit -c unlimited`` (this machine's
core_pattern is ``core``, so the kernel writes ``core`` in the child's cwd). The fake trees stand in for the
host's /proc/<pid>/cgroup and /var/log/containers of each container runtime and cgroup layout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

CRASHER_C = textwrap.dedent(r"""
    #include <signal.h>
    #include <stdio.h>
    #include <stdlib.h>
    #include <string.h>
    #include <unistd.h>

    static char filler[3 << 20];

    __attribute__((noinline)) void crash_in_segv_function(volatile int *p) { *p = 42; }
    __attribute__((noinline)) void crash_in_abort_function(void) { abort(); }

    int main(int argc, char **argv) {
        /* a few MiB of text, zero and noise pages so the core looks like a real one */
        for (size_t i = 0; i < sizeof filler / 3; i++) filler[i] = "hello core "[i % 11];
        unsigned x = 12345;
        for (size_t i = 2 * sizeof filler / 3; i < sizeof filler; i++) {
            x = x * 1103515245 + 12345;
            filler[i] = x >> 16;
        }
        if (argc > 1 && strcmp(argv[1], "abort") == 0) crash_in_abort_function();
        crash_in_segv_function((volatile int *)0);
        return filler[5];
    }
""")


@dataclass
class RealCore:
    path: Path
    exe: Path
    signal: int
    function: str
    pid: int


def make_core(crasher: Path, workdir: Path, mode: str) -> RealCore:
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["sh", "-c", f'ulimit -c unlimited && exec "{crasher}" {mode}'], cwd=workdir)
    sig = -proc.returncode if proc.returncode < 0 else proc.returncode - 128
    cores = sorted(workdir.glob("core*"))
    assert cores, f"no core in {workdir} (core_pattern {Path('/proc/sys/kernel/core_pattern').read_text()!r})"
    path = workdir / f"{mode}.core"
    cores[0].rename(path)
    from handler import elfinfo

    pid = int(elfinfo.core_process_info(path).get("pid", 0))
    function = "crash_in_abort_function" if mode == "abort" else "crash_in_segv_function"
    return RealCore(path=path, exe=crasher, signal=sig, function=function, pid=pid)


POD_UID = "7a3c2a0e-5b7e-4c1d-9f00-1234567890ab"
CONTAINER_ID = "4f1c0b7e" * 8


def cgroup_text(shape: str, *, pod_uid: str = POD_UID, cid: str = CONTAINER_ID) -> str:
    """``/proc/<pid>/cgroup`` of a container process for a runtime/driver/cgroup-version shape."""
    u = pod_uid.replace("-", "_")
    paths = {
        "containerd-systemd": f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/"
        f"cri-containerd-{cid}.scope",
        "containerd-cgroupfs": f"/kubepods/burstable/pod{pod_uid}/{cid}",
        "crio-systemd": f"/kubepods.slice/kubepods-pod{u}.slice/crio-{cid}.scope/container",
        "crio-cgroupfs": f"/kubepods/besteffort/pod{pod_uid}/crio-{cid}",
        "docker-systemd": f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/"
        f"docker-{cid}.scope",
        "docker-cgroupfs": f"/kubepods/pod{pod_uid}/{cid}",
    }
    runtime, version = shape.rsplit(":", 1) if ":" in shape else (shape, "v2")
    path = paths[runtime]
    if version == "v2":
        return f"0::{path}\n"
    # cgroup v1 (hybrid hosts also show an empty unified line)
    return (
        "".join(f"{n}:{c}:{path}\n" for n, c in [(12, "pids"), (11, "memory"), (4, "cpu,cpuacct"), (1, "name=systemd")])
        + "0::/\n"
    )


@dataclass
class NodeTree:
    """A fake node: proc root, host root with kubelet log links, storage, spool and state dirs."""

    base: Path
    proc: Path = field(init=False)
    host: Path = field(init=False)
    storage: Path = field(init=False)
    spool: Path = field(init=False)
    state: Path = field(init=False)

    def __post_init__(self) -> None:
        for name in ("proc", "host", "storage", "spool", "state"):
            d = self.base / name
            d.mkdir(parents=True, exist_ok=True)
            setattr(self, name, d)
        (self.host / "var/log/containers").mkdir(parents=True, exist_ok=True)

    def add_process(self, pid: int, *, cgroup: str, exe: Path | None = None, cwd: Path | None = None) -> Path:
        d = self.proc / str(pid)
        d.mkdir(parents=True, exist_ok=True)
        (d / "cgroup").write_text(cgroup)
        if exe is not None:
            (d / "exe").symlink_to(exe)
        if cwd is not None:
            (d / "cwd").symlink_to(cwd)
        return d

    def add_log_link(
        self, *, namespace: str, pod: str, container: str, pod_uid: str = POD_UID, cid: str = CONTAINER_ID
    ) -> None:
        target = f"/var/log/pods/{namespace}_{pod}_{pod_uid}/{container}/0.log"
        (self.host / "var/log/containers" / f"{pod}_{namespace}_{container}-{cid}.log").symlink_to(target)

    def handler_args(self, *extra: str) -> list[str]:
        return [
            PYTHON,
            "-m",
            "handler.cli",
            "--config",
            str(self.base / "no-config.json"),
            "--storage-root",
            str(self.storage),
            "--spool-dir",
            str(self.spool),
            "--state-dir",
            str(self.state),
            "--proc-root",
            str(self.proc),
            "--host-root",
            str(self.host),
            "--crictl",
            "",
            "--node",
            "node-1",
            *extra,
        ]

    def run_capture(
        self,
        core: Path,
        *,
        pid: int,
        signal: int,
        comm: str = "crasher",
        extra: tuple[str, ...] = (),
        time: int = 1795000000,
        rlimit: int = -1,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        with open(core, "rb") as f:
            return subprocess.run(
                self.handler_args(*extra, "capture", str(pid), str(pid), str(signal), str(time), str(rlimit), comm),
                stdin=f,
                capture_output=True,
                cwd=REPO,
                env=env,
                timeout=120,
            )


def gdb_backtrace(exe: Path, core: Path) -> str:
    gdb = shutil.which("gdb")
    assert gdb, "gdb is required"
    out = subprocess.run(
        [gdb, "-batch", "-nx", "-ex", "bt", str(exe), str(core)], capture_output=True, text=True, timeout=120
    )
    return out.stdout + out.stderr


def gunzip_to(src: Path, dst: Path) -> Path:
    import gzip

    with gzip.open(src, "rb") as i, open(dst, "wb") as o:
        shutil.copyfileobj(i, o, 1 << 20)
    return dst


@dataclass
class AgentEnv:
    """An agent set up against a fake node: fake sysctl tree, host dir in a temp dir, the real shim."""

    node: NodeTree
    sysctl: Path
    host_dir: Path
    agent: object

    @property
    def core_pattern(self) -> str:
        return (self.sysctl / "kernel/core_pattern").read_text().strip()

    def shim_argv(self, *, pid: int, signal: int, time: int = 1795000000, comm: str = "crasher") -> list[str]:
        """The command the kernel runs for this crash: core_pattern split on spaces, then expanded."""
        from handler.foreign import CrashSpecifiers, expand

        assert self.core_pattern.startswith("|")
        spec = CrashSpecifiers(pid=pid, tid=pid, signal=signal, time=time, comm=comm, rlimit=None)
        return [expand(a, spec) for a in self.core_pattern[1:].split()]

    def crash(self, core: Path, *, pid: int, signal: int, **kw: object) -> subprocess.CompletedProcess:
        with open(core, "rb") as f:
            return subprocess.run(
                self.shim_argv(pid=pid, signal=signal, **kw),
                stdin=f,
                capture_output=True,
                timeout=120,
                env={"PATH": os.environ["PATH"]},
            )


def make_sysctl_tree(base: Path, *, core_pattern: str = "core") -> Path:
    root = base / "sysctl"
    (root / "kernel").mkdir(parents=True)
    (root / "fs").mkdir(parents=True)
    (root / "kernel/core_pattern").write_text(core_pattern + "\n")
    (root / "kernel/core_pipe_limit").write_text("0\n")
    (root / "fs/suid_dumpable").write_text("0\n")
    return root


def setup_pod(node: NodeTree, core: RealCore, *, pid: int | None = None) -> int:
    pid = pid or core.pid
    node.add_process(pid, cgroup=cgroup_text("containerd-systemd:v2"), exe=core.exe)
    if not any((node.host / "var/log/containers").iterdir()):
        node.add_log_link(namespace="team-a", pod="web-0", container="app")
    return pid


def visible_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]
