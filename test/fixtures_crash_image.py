"""
A real program in a root directory of its own (a container image on disk), held at its crash site and filed by the
real node handler with its real pid, so the handler keeps its ELF objects and unwinds it as in a pod.

- :func:`make_image`: ``gcc`` builds the program (``-g``, symbols only, or stripped) into ``<base>/root/app/prog``
  beside copies of the libraries ``ldd`` names, at the same paths: the process runs ``chroot``-ed there, so every
  path it maps (the core's ``NT_FILE`` note) is a path in its own root, as in a container.
- :func:`hold`: the program stops itself (``SIGSTOP``) in ``crash_here`` (or ``crash_there`` with ``there``): it is
  alive, so ``/proc/PID/map_files`` holds the exact files it mapped, as while the kernel holds a crashing process.
  ``forge HEX`` first overwrites, in its own memory, the build-id note of its ELF header with ``HEX``.
- :class:`Node` + :meth:`Node.capture`: ``gcore`` of the held process piped into ``python -m handler.cli capture`` with
  its real pid; the handler's proc root is a directory whose ``<pid>`` entry carries the pod's cgroup text and links
  to the real ``/proc/PID`` files the handler reads (``exe``, ``map_files``, ``root``, ``cmdline``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def container_id(pod_uid: str) -> str:
    """One container per pod here: its id, derived from the pod's uid (the handler finds the pod by it)."""
    return hashlib.sha256(pod_uid.encode()).hexdigest()


PROGRAM = textwrap.dedent(r"""
    #define _GNU_SOURCE
    #include <elf.h>
    #include <link.h>
    #include <signal.h>
    #include <stdio.h>
    #include <stdlib.h>
    #include <string.h>
    #include <sys/mman.h>
    #include <unistd.h>
    #ifndef FLAVOUR
    #define FLAVOUR "plain"
    #endif
    const char *flavour = FLAVOUR;  /* another FLAVOUR: another binary, another build-id */
    static char filler[4 << 20];

    /* Overwrite the build-id note of the program's own ELF header in memory (the core shows this copy). */
    static int forge(struct dl_phdr_info *info, size_t size, void *data) {
        const char *hex = data;
        (void)size;
        for (int i = 0; i < info->dlpi_phnum; i++) {
            const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
            if (ph->p_type != PT_NOTE) continue;
            char *p = (char *)(info->dlpi_addr + ph->p_vaddr), *end = p + ph->p_memsz;
            while (p + sizeof(ElfW(Nhdr)) <= end) {
                ElfW(Nhdr) *n = (ElfW(Nhdr) *)p;
                unsigned char *desc = (unsigned char *)p + sizeof *n + ((n->n_namesz + 3) & ~3u);
                if (n->n_type == NT_GNU_BUILD_ID) {
                    long pg = sysconf(_SC_PAGESIZE);
                    if (mprotect((void *)((unsigned long)desc & ~(unsigned long)(pg - 1)), pg,
                                 PROT_READ | PROT_WRITE) != 0) { perror("mprotect"); exit(3); }
                    for (unsigned j = 0; j < n->n_descsz && hex[2 * j] && hex[2 * j + 1]; j++) {
                        unsigned v; sscanf(hex + 2 * j, "%2x", &v); desc[j] = (unsigned char)v;
                    }
                    return 1;
                }
                p = (char *)desc + ((n->n_descsz + 3) & ~3u);
            }
        }
        return 1;  /* the first object is the program itself */
    }

    __attribute__((noinline)) void crash_here(volatile int *p) { raise(SIGSTOP); *p = 1; }
    __attribute__((noinline)) void crash_there(volatile int *p) { raise(SIGSTOP); *p = 2; }
    __attribute__((noinline)) void on_the_way(int which) { if (which) crash_there(0); else crash_here(0); }
    int main(int argc, char **argv) {
        memset(filler, 7, sizeof filler);
        if (argc > 2 && strcmp(argv[1], "forge") == 0) dl_iterate_phdr(forge, argv[2]);
        on_the_way(argc > 1 && strcmp(argv[1], "there") == 0);
        return filler[3] + flavour[0];
    }
""")


@dataclass
class Image:
    """A program in a root directory of its own, with its libraries: a container image on disk."""

    base: Path
    root: Path
    exe: str  # path inside the root

    @property
    def binary(self) -> Path:
        return self.root / self.exe.lstrip("/")


def _libraries(binary: Path) -> list[Path]:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/"):
            libs.append(Path(path))
    return libs


def make_image(base: Path, *, kind: str, flavour: str = "plain") -> Image:
    """``kind``: ``debug-info`` (-g), ``symbols`` (no -g) or ``stripped``."""
    base.mkdir(parents=True, exist_ok=True)
    src = base / "prog.c"
    src.write_text(PROGRAM)
    root = base / "root"
    (root / "app").mkdir(parents=True)
    exe = root / "app" / "prog"
    flags = ["-g"] if kind == "debug-info" else []
    subprocess.run(["gcc", "-O1", *flags, f'-DFLAVOUR="{flavour}"', "-o", str(exe), str(src)], check=True)
    if kind == "stripped":
        subprocess.run(["strip", str(exe)], check=True)
    for lib in _libraries(exe):
        dst = root / str(lib).lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib.resolve(), dst)
    return Image(base=base, root=root, exe="/app/prog")


# What the root borrows from this machine, read-only, in the held process's own mount namespace only: gcore runs
# inside that root (so the paths it writes in the core's NT_FILE note are the paths in the root, as a kernel core
# of a container process has them), and needs a shell, gdb and its libraries.
_BORROWED = ("usr", "etc")


@dataclass
class Held:
    """A process stopped at its crash site, in its own root and its own (private) mount namespace."""

    pid: int
    popen: subprocess.Popen[bytes]
    image: Image

    def release(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)

    def gcore(self) -> Path:
        """gcore of the held process, run in its mount namespace and root; the core's path on this machine."""
        out = f"/tmp/gcore-{self.pid}"
        subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "-r", "/usr/bin/gcore", "-o", out, str(self.pid)],
            check=True,
            capture_output=True,
            timeout=120,
            env={"PATH": "/usr/bin:/bin"},
        )
        return self.image.root / f"tmp/gcore-{self.pid}.{self.pid}"


def hold(image: Image, *args: str) -> Held:
    r = image.root
    for d in (*_BORROWED, "dev", "proc", "tmp"):
        (r / d).mkdir(exist_ok=True)
    if not (r / "bin").is_symlink():
        (r / "bin").symlink_to("usr/bin")
    # unshare's default propagation is private: none of these mounts is seen outside, all end with the process.
    mounts = " && ".join(
        [
            *(f"mount -o bind,ro /{d} {r / d}" for d in _BORROWED),
            f"mount --bind /dev {r / 'dev'}",
            f"mount -t proc proc {r / 'proc'}",
        ]
    )
    popen = subprocess.Popen(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            f'{mounts} && exec chroot {r} {image.exe} "$@"',
            "sh",
            *args,
        ],
        start_new_session=True,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    deadline = time.monotonic() + 30
    while Path(f"/proc/{popen.pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "T":
        assert time.monotonic() < deadline and popen.poll() is None, "the program did not reach its crash site"
        time.sleep(0.02)
    return Held(pid=popen.pid, popen=popen, image=image)


def delete_image(image: Image) -> None:
    """Remove the program, its libraries and its root (after every process in it is gone)."""
    for d in (*_BORROWED, "dev", "proc"):
        path = image.root / d
        # The borrowed directories were mounted only in the held processes' namespaces, gone with them.
        assert not os.path.ismount(path) and not any(path.iterdir()), f"{path} is still a mount"
    shutil.rmtree(image.base)


@dataclass
class Node:
    """A node's directories for the handler: a proc root of links to real processes, host logs, storage, spool."""

    base: Path
    storage: Path
    proc: Path = field(init=False)
    host: Path = field(init=False)
    spool: Path = field(init=False)
    state: Path = field(init=False)

    def __post_init__(self) -> None:
        for name in ("proc", "host", "spool", "state"):
            d = self.base / name
            d.mkdir(parents=True, exist_ok=True)
            setattr(self, name, d)
        self.storage.mkdir(parents=True, exist_ok=True)
        (self.host / "var/log/containers").mkdir(parents=True, exist_ok=True)

    def add_pod(self, *, namespace: str, pod: str, pod_uid: str, container: str) -> None:
        """The kubelet's log link that names the pod of a container id (what the handler resolves names from)."""
        target = f"/var/log/pods/{namespace}_{pod}_{pod_uid}/{container}/0.log"
        link = self.host / "var/log/containers" / f"{pod}_{namespace}_{container}-{container_id(pod_uid)}.log"
        if not link.is_symlink():
            link.symlink_to(target)

    def _proc_entry(self, pid: int, *, pod_uid: str) -> None:
        d = self.proc / str(pid)
        d.mkdir()
        u = pod_uid.replace("-", "_")
        (d / "cgroup").write_text(
            f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/"
            f"cri-containerd-{container_id(pod_uid)}.scope\n"
        )
        (d / "cmdline").write_bytes(Path(f"/proc/{pid}/cmdline").read_bytes())
        # exe as this node reads it (a path on the node); map_files and root: the real process's
        (d / "exe").symlink_to(os.readlink(f"/proc/{pid}/exe"))
        for name in ("map_files", "root"):
            (d / name).symlink_to(f"/proc/{pid}/{name}")

    def capture(
        self,
        held: Held,
        *,
        pod_uid: str,
        when: int,
        signal_number: int = 11,
        config: dict[str, object] | None = None,
        data: bytes | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """gcore of the held process (or ``data``), piped to the handler as the kernel pipes a core, with its real
        pid; ``config``: the handler's config file (e.g. its object budgets)."""
        self._proc_entry(held.pid, pod_uid=pod_uid)
        config_file = self.base / f"handler-{held.pid}.json"
        config_file.write_text(json.dumps(config or {}))
        if data is not None:
            core = self.base / f"data-{held.pid}"
            core.write_bytes(data)
        else:
            core = held.gcore()
        try:
            with core.open("rb") as stdin:
                return subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "handler.cli",
                        "--config",
                        str(config_file),
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
                        "capture",
                        str(held.pid),
                        str(held.pid),
                        str(signal_number),
                        str(when),
                        "-1",
                        "prog",
                    ],
                    stdin=stdin,
                    capture_output=True,
                    cwd=REPO,
                    timeout=180,
                )
        finally:
            core.unlink()
