"""
The guest's scenario runner (stdlib only): makes the guest a node, runs each scenario, writes what it observed.

Run by the guest's PID 1 (``init.sh``) as ``runner.py RESULTS_DIR``. It asserts nothing: every scenario writes
``RESULTS_DIR/<scenario>.json`` with the raw observations (files on NFS, the recorder's output, exit statuses,
the kernel's log) and the host's pytest suite (``test/vm/test_kernel_path.py``) judges them. A scenario that
raises writes its traceback instead, and the next one still runs.

The node: an NFSv4.2 server exporting ``/srv/nfs`` to 127.0.0.1; the agent in its own mount namespace (made by
``unshare -m``) with the export mounted at ``/storage`` there only and the guest's ``/`` at ``/host``, as in its
DaemonSet pod; the node's previous ``core_pattern`` is ``recorder.sh``. "Pod" processes run in cgroup v2
directories named as the kubelet names them, in their own pid and mount namespaces, with the kubelet's
``/var/log/containers`` link that names their pod.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

VENV = Path("/opt/coredump/venv")
CRASHER = "/project/crasher"
RECORDER = "/project/guest/recorder.sh"
NODE_PATTERN = f"|{RECORDER} %P %s %e"
RECORDED = Path("/var/recorded")
EXPORT = Path("/srv/nfs")
HOST_DIR = Path("/var/lib/coredump")
SPOOL = HOST_DIR / "spool"
CGROUP = Path("/sys/fs/cgroup")
SYSCTL = Path("/proc/sys")
WAIT = 120.0  # seconds any one expected file may take to appear (TCG is slow; this is not a bound under test)


def log(msg: str) -> None:
    print(f"[{time.monotonic():9.2f}] {msg}", flush=True)


def sh(*argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{argv}: exit {proc.returncode}: {proc.stdout} {proc.stderr}")
    return proc


def sysctl_read(name: str) -> str:
    return (SYSCTL / name.replace(".", "/")).read_text().rstrip("\n")


def sysctl_write(name: str, value: str) -> None:
    (SYSCTL / name.replace(".", "/")).write_text(value + "\n")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blake3_digest(data: bytes) -> str:
    """The ``digest`` a core's metadata should carry (the default algorithm), computed here, not by the product."""
    import blake3

    return "blake3:" + blake3.blake3(data).hexdigest()


def wait_for(pred, *, timeout: float = WAIT, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(interval)


def kmsg_lines() -> list[str]:
    return sh("dmesg", check=False).stdout.splitlines()


# ---------------------------------------------------------------- the node


def start_nfs() -> None:
    """nfsd exporting /srv/nfs to the loopback, NFSv4 only, short grace period."""
    sh("modprobe", "nfsd")
    sh("modprobe", "nfsv4")
    Path("/proc/fs/nfsd").mkdir(exist_ok=True)
    sh("mount", "-t", "nfsd", "nfsd", "/proc/fs/nfsd")
    # Grace and lease must be set before nfsd starts; 10 s is the kernel's minimum.
    Path("/proc/fs/nfsd/nfsv4gracetime").write_text("10\n")
    Path("/proc/fs/nfsd/nfsv4leasetime").write_text("10\n")
    Path("/var/lib/nfs/v4recovery").mkdir(parents=True, exist_ok=True)
    set_export(rw=True)
    sh("rpc.mountd", "-N", "2", "-N", "3", "--no-udp")
    sh("rpc.nfsd", "-N", "3", "--no-udp", "4")
    # Wait out the grace period: a create blocks until it ends.
    probe = Path("/mnt/probe")
    probe.mkdir(parents=True, exist_ok=True)
    sh("mount", "-t", "nfs4", "-o", "vers=4.2", "127.0.0.1:/", str(probe))
    (probe / ".probe").write_text("x")
    (probe / ".probe").unlink()
    sh("umount", str(probe))


def set_export(*, rw: bool) -> None:
    Path("/etc/exports").write_text(
        f"{EXPORT} 127.0.0.1({'rw' if rw else 'ro'},sync,no_subtree_check,no_root_squash,fsid=0)\n"
    )
    sh("exportfs", "-ra")
    sh("exportfs", "-f")


@dataclass
class Pod:
    namespace: str
    name: str
    uid: str
    container: str
    cid: str
    shape: str = "systemd"  # or "cgroupfs"

    @property
    def cgroup(self) -> Path:
        if self.shape == "systemd":
            u = self.uid.replace("-", "_")
            return (
                CGROUP
                / "kubepods.slice/kubepods-burstable.slice"
                / f"kubepods-burstable-pod{u}.slice"
                / f"cri-containerd-{self.cid}.scope"
            )
        return CGROUP / "kubepods/burstable" / f"pod{self.uid}" / self.cid

    def create(self) -> "Pod":
        self.cgroup.mkdir(parents=True, exist_ok=True)
        # The kubelet's records of the container: its log directory and the /var/log/containers link.
        logdir = Path("/var/log/pods") / f"{self.namespace}_{self.name}_{self.uid}" / self.container
        logdir.mkdir(parents=True, exist_ok=True)
        (logdir / "0.log").touch()
        link = Path("/var/log/containers") / f"{self.name}_{self.namespace}_{self.container}-{self.cid}.log"
        if not link.is_symlink():
            link.symlink_to(logdir / "0.log")
        return self

    def to_json(self) -> dict:
        return {
            "namespace": self.namespace,
            "pod": self.name,
            "podUID": self.uid,
            "container": self.container,
            "containerID": self.cid,
            "shape": self.shape,
        }


def make_pod(n: int, *, shape: str = "systemd", namespace: str = "team-a") -> Pod:
    uid = f"{n:08x}-5b7e-4c1d-9f00-1234567890ab"
    return Pod(
        namespace=namespace, name=f"app-{n}", uid=uid, container="main", cid=f"{n:08x}" * 8, shape=shape
    ).create()


OUTSIDE = CGROUP / "system.slice" / "crash-test.service"


class Crasher:
    """A crashing process held at a read on stdin until :meth:`trigger`; its host pid, exe and comm are known."""

    claimed: set[int] = set()  # pids already taken by a Crasher (several may share a pod's cgroup)

    def __init__(self, *, pod: Pod | None, mode: str = "segv") -> None:
        cg = pod.cgroup if pod is not None else OUTSIDE
        cg.mkdir(parents=True, exist_ok=True)
        self.cgroup = cg
        self.pod = pod
        self.mode = mode
        script = f"echo $$ >{cg}/cgroup.procs && ulimit -c unlimited && {CRASHER} {mode} wait; exit $?"
        # Its own pid and mount namespace, as in a container: sh is the namespace's pid 1, the crasher pid 2.
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount", "--", "sh", "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.pid = wait_for(self._find, timeout=60, interval=0.05)
        if not self.pid:
            raise RuntimeError(f"crasher did not start in {cg}")
        self.exe = os.readlink(f"/proc/{self.pid}/exe")
        self.comm = Path(f"/proc/{self.pid}/comm").read_text().strip()
        status = Path(f"/proc/{self.pid}/status").read_text()
        self.ns_pid = int([ln for ln in status.splitlines() if ln.startswith("NSpid:")][0].split()[-1])
        self.t_trigger: float | None = None
        self.t_exit: float | None = None
        self.returncode: int | None = None

    def _find(self) -> int | None:
        try:
            pids = (self.cgroup / "cgroup.procs").read_text().split()
        except OSError:
            return None
        for p in pids:
            if int(p) in Crasher.claimed:
                continue
            try:
                if Path(f"/proc/{p}/comm").read_text().strip() == "crasher":
                    # Wait until it is at its read: its filler is written and the core will be whole.
                    if (
                        "pipe_read" in Path(f"/proc/{p}/wchan").read_text()
                        or Path(f"/proc/{p}/stat").read_text().split(")")[1].split()[0] == "S"
                    ):
                        Crasher.claimed.add(int(p))
                        return int(p)
            except OSError:
                continue
        return None

    def trigger(self) -> None:
        self.t_trigger = time.monotonic()
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"\n")
        self.proc.stdin.close()

    def wait(self, timeout: float = 300) -> dict:
        self.returncode = self.proc.wait(timeout=timeout)
        self.t_exit = time.monotonic()
        return self.to_json()

    def to_json(self) -> dict:
        return {
            "pid": self.pid,
            "nsPid": self.ns_pid,
            "exe": self.exe,
            "comm": self.comm,
            "mode": self.mode,
            "signal": 11 if self.mode == "segv" else 6,
            "pod": self.pod.to_json() if self.pod else None,
            "exitStatus": self.returncode,
            "heldSeconds": None if self.t_exit is None or self.t_trigger is None else self.t_exit - self.t_trigger,
        }


def crash(pod: Pod | None, mode: str = "segv") -> dict:
    c = Crasher(pod=pod, mode=mode)
    c.trigger()
    return c.wait()


def gdb_bt(core: Path) -> str:
    out = sh("gdb", "-batch", "-nx", "-ex", "bt", CRASHER, str(core), check=False, timeout=300)
    return out.stdout + out.stderr


def stored_cores() -> dict[int, dict]:
    """Committed cores on the NFS server (its export), by pid: metadata, files, integrity, gdb's backtrace."""
    found: dict[int, dict] = {}
    for meta_path in EXPORT.glob("*/*/*/*/*.json"):
        if meta_path.name.startswith("."):
            continue
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        found[int(meta.get("pid") or 0)] = {
            "meta": meta,
            "path": str(meta_path.relative_to(EXPORT)),
            "core": str(meta_path.with_suffix(".core.gz").relative_to(EXPORT)),
        }
    return found


def examine(entry: dict) -> dict:
    """Decompress the stored core, check it against its metadata, and ask gdb where it crashed."""
    core_gz = EXPORT / entry["core"]
    raw = gzip.decompress(core_gz.read_bytes())
    tmp = Path("/tmp/examine.core")
    tmp.write_bytes(raw)
    out = dict(
        entry,
        coreExists=True,
        rawSha256=sha256(raw),
        rawDigest=blake3_digest(raw),
        rawSize=len(raw),
        backtrace=gdb_bt(tmp),
        containerDirFiles=sorted(p.name for p in core_gz.parent.iterdir()),
    )
    tmp.unlink()
    return out


def wait_stored(pids: list[int], *, timeout: float = WAIT) -> dict[int, dict]:
    wait_for(lambda: all(p in stored_cores() for p in pids), timeout=timeout, interval=0.5)
    have = stored_cores()
    return {p: examine(have[p]) for p in pids if p in have}


def spool_listing() -> list[dict]:
    out = []
    try:
        entries = sorted(SPOOL.iterdir())
    except FileNotFoundError:
        return out
    for p in entries:
        if p.is_file():
            e = {"name": p.name, "size": p.stat().st_size}
            if p.name.endswith(".core"):
                e["sha256"] = sha256(p.read_bytes())
            if p.name.endswith((".info", ".json")):
                e["text"] = p.read_text(errors="replace")
            out.append(e)
    return out


# ---------------------------------------------------------------- the agent


class Agent:
    """``coredump-agent`` in its own mount namespace: the NFS export at /storage (there only), the node's / at /host."""

    def __init__(self, *extra: str, name: str = "agent") -> None:
        self.log_path = Path(f"/results/{name}-{int(time.time() * 1000) % 10**8}.log")
        args = " ".join(
            f"'{a}'"
            for a in (
                "--host-root",
                "/host",
                "--host-dir",
                str(HOST_DIR),
                "--storage-root",
                "/storage",
                "--crictl",
                "",
                "--no-events",
                "--metrics-port",
                "0",
                "--metrics-bind-address",
                "127.0.0.1",
                "--drain-interval",
                "1s",
                "--watch-interval",
                "1s",
                "--node-name",
                "vm-node",
                "--rate-first",
                "1000",
                "-v",
                *extra,
            )
        )
        script = (
            "mount --rbind / /host && mount -t nfs4 -o vers=4.2 127.0.0.1:/ /storage && "
            f"exec {VENV}/bin/coredump-agent {args}"
        )
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.pid = self.proc.pid

    def ready(self) -> bool:
        try:
            # agent.pid is "<pid> <start time> <mount ns>": the pid comes first
            published = (HOST_DIR / "agent.pid").read_text().split()[:1] == [str(self.pid)]
        except OSError:
            published = False
        return published and sysctl_read("kernel.core_pattern").startswith(f"|{HOST_DIR}/shim ")

    def wait_ready(self) -> "Agent":
        if not wait_for(self.ready, timeout=WAIT):
            raise RuntimeError(f"agent {self.pid} not ready: {self.log_path.read_text()[-2000:]}")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=WAIT)
        self.log.close()
        return rc


def uninstall() -> subprocess.CompletedProcess:
    return sh(
        "unshare",
        "--mount",
        "--",
        "sh",
        "-c",
        f"mount --rbind / /host && exec {VENV}/bin/coredump-agent uninstall --host-root /host "
        f"--host-dir {HOST_DIR} --storage-root /storage",
        check=False,
    )


def node_sysctls() -> dict:
    return {n: sysctl_read(n) for n in ("kernel.core_pattern", "kernel.core_pipe_limit", "fs.suid_dumpable")}


# ---------------------------------------------------------------- scenarios


class Node:
    def __init__(self) -> None:
        self.agent: Agent | None = None
        self.before: dict = {}

    def ensure_agent(self, *extra: str) -> Agent:
        if self.agent is None or self.agent.proc.poll() is not None:
            self.agent = Agent(*extra).wait_ready()
        return self.agent

    def restart_agent(self, *extra: str) -> Agent:
        if self.agent is not None and self.agent.proc.poll() is None:
            self.agent.stop()
        self.agent = Agent(*extra).wait_ready()
        return self.agent


def scenario_reference(node: Node) -> dict:
    """Before the agent: the node's own pattern records a crash (the baseline scenario 2 compares with)."""
    c = crash(None)
    wait_for(lambda: (RECORDED / f"{c['pid']}.args").exists())
    core = RECORDED / f"{c['pid']}.core"
    return {
        "crash": c,
        "args": (RECORDED / f"{c['pid']}.args").read_text().splitlines(),
        "coreSize": core.stat().st_size,
        "backtrace": gdb_bt(core),
        "sysctls": node.before,
    }


def scenario_1_pod_crash(node: Node) -> dict:
    node.ensure_agent()
    pods = [make_pod(1, shape="systemd"), make_pod(2, shape="cgroupfs")]
    crashes = [crash(pods[0], "segv"), crash(pods[1], "abort")]
    stored = wait_stored([c["pid"] for c in crashes])
    return {
        "crashes": crashes,
        "stored": {str(k): v for k, v in stored.items()},
        "spool": spool_listing(),
        "sysctls": node_sysctls(),
    }


def scenario_2_foreign(node: Node) -> dict:
    node.ensure_agent()
    c = crash(None)
    wait_for(lambda: (RECORDED / f"{c['pid']}.args").exists())
    core = RECORDED / f"{c['pid']}.core"
    return {
        "crash": c,
        "args": (RECORDED / f"{c['pid']}.args").read_text().splitlines()
        if (RECORDED / f"{c['pid']}.args").exists()
        else None,
        "coreSize": core.stat().st_size if core.exists() else None,
        "backtrace": gdb_bt(core) if core.exists() else "",
        "onNfs": c["pid"] in stored_cores(),
    }


def scenario_3_agent_killed(node: Node) -> dict:
    agent = node.ensure_agent()
    rc = agent.stop(signal.SIGKILL)
    pods = [make_pod(3), make_pod(4, shape="cgroupfs")]
    crashes = [crash(pods[0], "segv"), crash(pods[1], "abort")]
    spooled = spool_listing()
    on_nfs_before = [c["pid"] for c in crashes if c["pid"] in stored_cores()]
    node.agent = Agent().wait_ready()
    stored = wait_stored([c["pid"] for c in crashes])
    wait_for(lambda: not spool_listing(), timeout=30)
    return {
        "killExit": rc,
        "crashes": crashes,
        "spooledWhileAway": spooled,
        "onNfsWhileAway": on_nfs_before,
        "stored": {str(k): v for k, v in stored.items()},
        "spoolAfter": spool_listing(),
    }


def scenario_4_pipe_limit(node: Node, *, limit: int = 2, n: int = 6) -> dict:
    node.restart_agent("--core-pipe-limit", str(limit))
    pod = make_pod(5)
    dmesg_before = len(kmsg_lines())
    crashers = [Crasher(pod=pod) for _ in range(n)]
    for c in crashers:
        c.trigger()
    results = [c.wait() for c in crashers]
    pids = [c["pid"] for c in results]
    wait_for(lambda: len([p for p in pids if p in stored_cores()]) >= min(limit, n), timeout=WAIT)
    time.sleep(5)  # anything still on its way
    stored = {p: stored_cores()[p]["meta"] for p in pids if p in stored_cores()}
    out = {
        "limit": limit,
        "sysctlLimit": sysctl_read("kernel.core_pipe_limit"),
        "crashes": results,
        "stored": {str(k): v for k, v in stored.items()},
        "spool": spool_listing(),
        "kernelLog": kmsg_lines()[dmesg_before:],
    }
    node.restart_agent()
    return out


def scenario_5_readonly(node: Node) -> dict:
    node.ensure_agent()
    cfg = json.loads((HOST_DIR / "handler.json").read_text())
    pod = make_pod(6)
    set_export(rw=False)
    try:
        c = crash(pod)
        wait_for(lambda: [e for e in spool_listing() if e["name"].endswith((".json", ".info"))], timeout=WAIT)
        spooled = spool_listing()
        on_nfs = c["pid"] in stored_cores()
        shim_log = (HOST_DIR / "shim.log").read_text() if (HOST_DIR / "shim.log").exists() else ""
    finally:
        set_export(rw=True)
    stored = wait_stored([c["pid"]])
    return {
        "crash": c,
        "stallTimeout": cfg.get("stall_timeout"),
        "storageTimeout": cfg.get("storage_timeout"),
        "spooledWhileReadOnly": spooled,
        "onNfsWhileReadOnly": on_nfs,
        "stored": {str(k): v for k, v in stored.items()},
        "shimLog": shim_log[-4000:],
        "spoolAfter": spool_listing(),
    }


class CrashLoop(threading.Thread):
    """Crash one pod process after another, sampling core_pattern before each, until stopped."""

    def __init__(self, pod: Pod) -> None:
        super().__init__(daemon=True)
        self.pod = pod
        self.crashes: list[dict] = []
        self.patterns: list[str] = []
        self.halt = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                self.patterns.append(sysctl_read("kernel.core_pattern"))
                self.crashes.append(crash(self.pod))
        except Exception:  # reported in the results
            self.error = traceback.format_exc()


def _rollout(node: Node, *, surge: bool, pod: Pod) -> dict:
    loop = CrashLoop(pod)
    loop.start()
    wait_for(lambda: len(loop.crashes) >= 1, timeout=WAIT)
    old = node.agent
    assert old is not None
    if surge:
        new = Agent().wait_ready()  # the new pod starts before the old one is gone (maxSurge)
        old_rc = old.stop()
    else:
        old_rc = old.stop()  # maxUnavailable: the old pod goes, then the new one comes
        mid = len(loop.crashes)
        wait_for(lambda: len(loop.crashes) >= mid + 1, timeout=WAIT)  # at least one crash with no agent
        new = Agent().wait_ready()
    node.agent = new
    n = len(loop.crashes)
    wait_for(lambda: len(loop.crashes) >= n + 2, timeout=WAIT)
    loop.halt.set()
    loop.join(timeout=300)
    pids = [c["pid"] for c in loop.crashes]
    wait_for(lambda: all(p in stored_cores() for p in pids), timeout=WAIT, interval=0.5)
    have = stored_cores()
    return {
        "surge": surge,
        "oldExit": old_rc,
        "crashes": loop.crashes,
        "patterns": sorted(set(loop.patterns)),
        "storedPids": [p for p in pids if p in have],
        "loopError": loop.error,
        "spoolAfter": spool_listing(),
        "pidFile": ((HOST_DIR / "agent.pid").read_text().split() or [None])[0]
        if (HOST_DIR / "agent.pid").exists()
        else None,
        "newPid": new.pid,
    }


def scenario_6_rollout_uninstall(node: Node) -> dict:
    node.ensure_agent()
    ours = sysctl_read("kernel.core_pattern")
    rolling = _rollout(node, surge=False, pod=make_pod(7))
    surge = _rollout(node, surge=True, pod=make_pod(8))
    assert node.agent is not None
    node.agent.stop()
    node.agent = None
    during = node_sysctls()
    proc = uninstall()
    after = node_sysctls()
    c = crash(make_pod(9))
    wait_for(lambda: (RECORDED / f"{c['pid']}.args").exists(), timeout=WAIT)
    return {
        "ours": ours,
        "rolling": rolling,
        "surge": surge,
        "beforeAgent": node.before,
        "stoppedAgent": during,
        "afterUninstall": after,
        "uninstallExit": proc.returncode,
        "uninstallOutput": proc.stdout + proc.stderr,
        "shimLeft": (HOST_DIR / "shim").exists(),
        "crashAfterUninstall": c,
        "recordedAfterUninstall": (RECORDED / f"{c['pid']}.args").exists(),
    }


SCENARIOS = [
    scenario_reference,
    scenario_1_pod_crash,
    scenario_2_foreign,
    scenario_3_agent_killed,
    scenario_4_pipe_limit,
    scenario_5_readonly,
    scenario_6_rollout_uninstall,
]


def main(results: Path) -> int:
    t0 = time.monotonic()
    start_nfs()
    log(f"nfs up after {time.monotonic() - t0:.1f}s")
    sysctl_write("kernel.core_pattern", NODE_PATTERN)
    node = Node()
    node.before = node_sysctls()
    (results / "guest.json").write_text(json.dumps({"uname": os.uname().release, "before": node.before}))
    for fn in SCENARIOS:
        name = fn.__name__.removeprefix("scenario_")
        t = time.monotonic()
        log(f"scenario {name}")
        try:
            out = {"ok": True, "data": fn(node)}
        except Exception:  # one failing scenario must not hide the others
            out = {"ok": False, "error": traceback.format_exc()}
            log(out["error"])
        out["seconds"] = time.monotonic() - t
        out["shimLog"] = (HOST_DIR / "shim.log").read_text()[-8000:] if (HOST_DIR / "shim.log").exists() else ""
        (results / f"{name}.json").write_text(json.dumps(out, indent=1, default=str))
        log(f"scenario {name} done in {out['seconds']:.1f}s ok={out['ok']}")
    if node.agent is not None and node.agent.proc.poll() is None:
        node.agent.stop()
    (results / "done").write_text(f"{time.monotonic() - t0:.1f}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
