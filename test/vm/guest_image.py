"""
The guest of the VM suite, built only from Debian packages and this project, and booted with qemu.

Three disks, so a change to the project never rebuilds the Debian part:

* **base** (cached under ``$XDG_CACHE_HOME/coredump-vm/<key>/``, ``key`` = hash of :data:`PINS`, the kernel
  package version, ``deploy/requirements.txt`` and the initramfs script): a Debian root filesystem made by
  ``mmdebstrap``
  into a directory (python3, util-linux, gdb, the NFS server, kmod, iproute2), the kernel's modules from the
  Debian kernel package, a virtual environment at ``/opt/coredump/venv`` with the project's pinned runtime
  dependencies (from PyPI, at build time: the guest has no network) and a ``.pth`` naming ``/project``; written
  into an ext4 image with ``mke2fs -d`` (no loop mount). The kernel image and a busybox initramfs that loads the
  virtio modules sit next to it. The guest boots it with ``snapshot=on``: the cached image is never written.
* **project** (made per run, a few MiB): ``handler/`` (byte-compiled), ``test/vm/guest/`` and the crashing test
  program, built statically here; mounted read-only at ``/project``.
* **results**: an empty ext4 the guest writes its observations to; read back with ``debugfs`` (no mount).

Nothing here touches the host's ``/proc/sys``: every sysctl the scenarios set is the guest kernel's.
"""

from __future__ import annotations

import compileall
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
GUEST_SRC = Path(__file__).resolve().parent / "guest"

# Everything the base image is made of; changing any of it rebuilds the image.
PINS = {
    "suite": "bookworm",
    "mirror": "http://deb.debian.org/debian",
    "kernel_meta": "linux-image-cloud-amd64",
    "packages": ["python3", "python3-venv", "gdb", "nfs-kernel-server", "kmod", "iproute2", "mount", "procps"],
    "initramfs_modules": ["virtio_pci", "virtio_blk"],
    # Bump when build_base changes what it puts in the image (the key does not hash this file, so that
    # editing the boot or disk code does not rebuild the Debian part).
    "layout": 1,
}
# Host tools, as Debian packages (installed when missing).
HOST_PACKAGES = {
    "qemu-system-x86_64": "qemu-system-x86",
    "mmdebstrap": "mmdebstrap",
    "busybox": "busybox-static",
    "mke2fs": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "gcc": "gcc",
}
VENV = "/opt/coredump/venv"
# arch-capabilities off: nested KVM hosts refuse that MSR for a plain "-cpu host" (qemu aborts).
KVM_CPU = "host,-arch-capabilities"


@dataclass
class Base:
    """A built base: kernel, initramfs and root image."""

    directory: Path
    kernel: Path
    initrd: Path
    rootfs: Path
    built_seconds: float | None  # None when it came from the cache


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    logger.info("+ %s", " ".join(argv))
    return subprocess.run(argv, check=True, **kw)


def ensure_host_tools() -> None:
    """Install the Debian packages this module runs, when missing (CI starts from a fresh machine)."""
    missing = sorted(
        {
            pkg
            for tool, pkg in HOST_PACKAGES.items()
            if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()
        }
    )
    if not missing:
        return
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    print(f"vm: installing {' '.join(missing)} (Debian packages)", file=sys.stderr)
    _run([*sudo, "apt-get", "update", "-qq"])
    _run(
        [
            *sudo,
            "env",
            "DEBIAN_FRONTEND=noninteractive",
            "apt-get",
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            *missing,
        ],
        stdout=subprocess.DEVNULL,
    )


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "coredump-vm"


def kernel_package() -> tuple[str, str]:
    """The versioned kernel package the metapackage points at, and its candidate version."""
    out = subprocess.run(
        ["apt-cache", "depends", PINS["kernel_meta"]], capture_output=True, text=True, check=True
    ).stdout
    name = next(line.split()[-1] for line in out.splitlines() if line.strip().startswith("Depends: linux-image-"))
    pol = subprocess.run(["apt-cache", "policy", name], capture_output=True, text=True, check=True).stdout
    version = next(line.split()[-1] for line in pol.splitlines() if line.strip().startswith("Candidate:"))
    return name, version


def base_key(*, kernel: tuple[str, str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(PINS, sort_keys=True).encode())
    h.update(repr(kernel).encode())
    h.update((REPO / "deploy/requirements.txt").read_bytes())
    h.update((GUEST_SRC / "initramfs-init").read_bytes())
    return h.hexdigest()[:16]


def _modinfo_depends(ko: Path) -> list[str]:
    data = ko.read_bytes()
    i = data.find(b"\0depends=")
    if i < 0:
        return []
    end = data.index(b"\0", i + 1)
    value = data[i + len(b"\0depends=") : end].decode()
    return [d for d in value.split(",") if d]


def _module_order(moddir: Path, wanted: list[str]) -> list[Path]:
    """The .ko files for ``wanted`` with their dependencies first (read from each module's modinfo)."""
    index = {p.stem.replace("-", "_"): p for p in moddir.rglob("*.ko")}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        ko = index[name]
        for dep in _modinfo_depends(ko):
            visit(dep)
        order.append(ko)

    for w in wanted:
        visit(w)
    return order


def _cpio_newc(files: list[tuple[str, int, bytes]]) -> bytes:
    """An initramfs archive (cpio "newc"): entries ``(name, mode, data)``; directories have an empty body."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*files, ("TRAILER!!!", 0, b"")], start=1):
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0))
        out += hdr.encode() + nb
        out += b"\0" * (-len(out) % 4)
        out += data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def build_initramfs(*, rootfs: Path, release: str, dest: Path) -> None:
    moddir = rootfs / "lib/modules" / release
    busybox = Path(shutil.which("busybox") or "/bin/busybox")
    entries: list[tuple[str, int, bytes]] = [
        (d, 0o40755, b"") for d in ("bin", "dev", "proc", "sys", "newroot", "modules")
    ]
    entries.append(("bin/busybox", 0o100755, busybox.read_bytes()))
    entries.append(("init", 0o100755, (GUEST_SRC / "initramfs-init").read_bytes()))
    for n, ko in enumerate(_module_order(moddir, PINS["initramfs_modules"])):
        entries.append((f"modules/{n:02d}-{ko.name}", 0o100644, ko.read_bytes()))
    dest.write_bytes(_cpio_newc(entries))


def _dir_bytes(d: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(d):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def mke2fs(*, src: Path | None, dest: Path, size_mb: int, label: str) -> None:
    dest.unlink(missing_ok=True)
    with open(dest, "wb") as f:
        f.truncate(size_mb << 20)
    argv = ["mke2fs", "-q", "-F", "-t", "ext4", "-L", label, "-E", "root_owner=0:0"]
    if src is not None:
        argv += ["-d", str(src)]
    _run([*argv, str(dest)])


def build_base(*, directory: Path, kernel: tuple[str, str]) -> None:
    """mmdebstrap a root tree, add the kernel's modules and the venv, write the images (root only)."""
    work = Path(tempfile.mkdtemp(prefix="build-", dir=directory.parent))
    try:
        debs = work / "debs"
        debs.mkdir()
        _run(
            ["apt-get", "download", "-q", f"{kernel[0]}={kernel[1]}"],
            cwd=debs,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deb = next(debs.glob("*.deb"))
        # Unpacked aside, not over the root tree: the package's ./lib would replace the merged-/usr symlink.
        kdir = work / "kernel"
        _run(["dpkg-deb", "-x", str(deb), str(kdir)])
        tree = work / "rootfs"
        req = REPO / "deploy/requirements.txt"
        # Wheels come through the host's pip (its index, proxy and CA settings); the chroot installs them
        # offline. The host's Python is 3.11 on glibc like the guest's, so its wheel tags fit.
        wheels = work / "wheels"
        _run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(wheels), "-r", str(req)])
        hooks = [
            f'mkdir -p "$1/usr/lib/modules" && cp -a "{kdir}/lib/modules/." "$1/usr/lib/modules/"',
            f'chroot "$1" /sbin/depmod {kernel[0].removeprefix("linux-image-")}',
            f'chroot "$1" python3 -m venv {VENV}',
            f'cp "{req}" "$1/tmp/requirements.txt" && cp -a "{wheels}" "$1/tmp/wheels"',
            f'chroot "$1" env -u PIP_FIND_LINKS -u PIP_CERT {VENV}/bin/pip install -q --no-cache-dir '
            f"--disable-pip-version-check --no-index --find-links /tmp/wheels -r /tmp/requirements.txt",
            'rm -rf "$1/tmp/requirements.txt" "$1/tmp/wheels"',
        ]
        argv = [
            "mmdebstrap",
            "--quiet",
            "--mode=root",
            "--variant=minbase",
            f"--include={','.join(PINS['packages'])}",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
        ]
        argv += [f"--customize-hook={h}" for h in hooks]
        argv += [PINS["suite"], str(tree), PINS["mirror"]]
        _run(argv)
        site = next((tree / VENV.lstrip("/") / "lib").glob("python3*/site-packages"))
        # The project itself comes from the project disk, mounted at /project: code changes need no rebuild.
        (site / "coredump-project.pth").write_text("/project\n")
        for name, module in (("coredump-agent", "handler.agent.cli"), ("coredump-handler", "handler.cli")):
            script = tree / VENV.lstrip("/") / "bin" / name
            script.write_text(f"#!{VENV}/bin/python3\nimport sys\nfrom {module} import main\nsys.exit(main())\n")
            script.chmod(0o755)
        for d in ("project", "results", "storage", "host", "srv/nfs", "var/log/containers", "var/log/pods"):
            (tree / d).mkdir(parents=True, exist_ok=True)
        release = kernel[0].removeprefix("linux-image-")
        shutil.copy(kdir / "boot" / f"vmlinuz-{release}", work / "vmlinuz")
        build_initramfs(rootfs=tree, release=release, dest=work / "initrd")
        shutil.rmtree(kdir)
        size = int(_dir_bytes(tree) * 1.25 / (1 << 20)) + 768
        mke2fs(src=tree, dest=work / "rootfs.img", size_mb=size, label="root")
        shutil.rmtree(tree)
        shutil.rmtree(debs)
        shutil.rmtree(wheels)
        (work / "pins.json").write_text(json.dumps({"pins": PINS, "kernel": kernel}, indent=2) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        os.rename(work, directory)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def ensure_base() -> Base:
    """The cached base for the current pins, built when missing."""
    kernel = kernel_package()
    directory = cache_root() / base_key(kernel=kernel)
    built = None
    if not (directory / "rootfs.img").exists():
        directory.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        print(
            f"vm: building the guest image in {directory} (Debian {PINS['suite']}, {kernel[0]} {kernel[1]})",
            file=sys.stderr,
        )
        build_base(directory=directory, kernel=kernel)
        built = time.monotonic() - t0
    return Base(
        directory=directory,
        kernel=directory / "vmlinuz",
        initrd=directory / "initrd",
        rootfs=directory / "rootfs.img",
        built_seconds=built,
    )


def build_project_disk(*, dest: Path, work: Path) -> None:
    """``handler/`` (byte-compiled, so the guest's cold starts under TCG do not compile), the guest scripts, the
    crasher."""
    stage = work / "project"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    shutil.copytree(REPO / "handler", stage / "handler", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(GUEST_SRC, stage / "guest", ignore=shutil.ignore_patterns("__pycache__"))
    # Same bytecode magic as the guest's Python (both 3.11); unchecked: the files never change in the guest.
    compileall.compile_dir(
        str(stage), quiet=1, invalidation_mode=compileall.py_compile.PycInvalidationMode.UNCHECKED_HASH
    )
    _run(["gcc", "-static", "-g", "-O0", "-o", str(stage / "crasher"), str(GUEST_SRC / "crasher.c")])
    mke2fs(src=stage, dest=dest, size_mb=max(64, _dir_bytes(stage) * 2 >> 20), label="project")


def kvm_usable(*, kernel: Path, work: Path) -> bool:
    """
    KVM when /dev/kvm opens and really runs our kernel; COREDUMP_VM_ACCEL=tcg forces software emulation.

    Opening is not enough: nested hosts may expose /dev/kvm and then fail or hang the guest (seen here: an
    internal KVM error with ``-cpu host``). So the kernel boots once without a root disk, up to its panic.
    """
    if os.environ.get("COREDUMP_VM_ACCEL", "") == "tcg":
        return False
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    console = work / "kvm-probe.log"
    console.unlink(missing_ok=True)
    try:
        subprocess.run(
            [
                "qemu-system-x86_64",
                "-enable-kvm",
                "-cpu",
                KVM_CPU,
                "-m",
                "256",
                "-nodefaults",
                "-no-reboot",
                "-display",
                "none",
                "-serial",
                f"file:{console}",
                "-kernel",
                str(kernel),
                "-append",
                "console=ttyS0 panic=-1",
            ],
            check=False,
            timeout=20,
            capture_output=True,
        )
    except subprocess.TimeoutExpired:
        pass
    text = console.read_text(errors="replace") if console.exists() else ""
    ok = "Kernel panic" in text and "VFS" in text
    if not ok:
        logger.warning("KVM is there but does not run the guest kernel; using TCG")
    return ok


@dataclass
class Boot:
    results: Path  # the guest's /results, read back
    console: str  # serial console output
    accel: str
    seconds: float


def boot(*, base: Base, project: Path, work: Path, timeout: float, cpus: int = 2, memory_mb: int = 1536) -> Boot:
    """Boot the guest once; it runs every scenario and powers off. Returns what it wrote to the results disk."""
    results_img = work / "results.img"
    mke2fs(src=None, dest=results_img, size_mb=256, label="results")
    console = work / "console.log"
    kvm = kvm_usable(kernel=base.kernel, work=work)
    t0 = time.monotonic()
    _qemu(
        kvm=kvm,
        base=base,
        project=project,
        results_img=results_img,
        console=console,
        timeout=timeout,
        cpus=cpus,
        memory_mb=memory_mb,
    )
    seconds = time.monotonic() - t0
    out = work / "results"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    subprocess.run(["debugfs", "-R", f"rdump / {out}", str(results_img)], check=True, capture_output=True)
    text = console.read_text(errors="replace") if console.exists() else ""
    return Boot(results=out, console=text, accel="kvm" if kvm else "tcg", seconds=seconds)


def _qemu(
    *, kvm: bool, base: Base, project: Path, results_img: Path, console: Path, timeout: float, cpus: int, memory_mb: int
) -> int:
    console.unlink(missing_ok=True)
    accel = ["-enable-kvm", "-cpu", KVM_CPU] if kvm else ["-accel", "tcg", "-cpu", "max"]
    argv = [
        "qemu-system-x86_64",
        *accel,
        "-smp",
        str(cpus),
        "-m",
        str(memory_mb),
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-serial",
        f"file:{console}",
        "-kernel",
        str(base.kernel),
        "-initrd",
        str(base.initrd),
        "-append",
        "console=ttyS0 panic=-1 quiet loglevel=4",
        "-drive",
        f"file={base.rootfs},if=virtio,format=raw,snapshot=on",
        "-drive",
        f"file={project},if=virtio,format=raw,readonly=on",
        "-drive",
        f"file={results_img},if=virtio,format=raw",
    ]
    logger.info("+ %s", " ".join(argv))
    try:
        return subprocess.run(argv, check=False, timeout=timeout, stdin=subprocess.DEVNULL).returncode
    except subprocess.TimeoutExpired:
        logger.error("the guest did not power off within %.0fs", timeout)
        return -1
