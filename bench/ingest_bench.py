#!/usr/bin/env python3
"""
Ingest benchmark of ``coredump-handler`` on REAL kernel cores, against ``cat > file`` and ``gzip -1 > file``
measured in the same run, on the same filesystem, interleaved, median of ``--rounds`` rounds.

The cores come from a C program compiled here that fills N GiB (1/3 random, 1/3 zero, 1/3 repetitive text
pages) and crashes under ``ulimit -c unlimited``; they are cached under ``~/.cache/coredump-bench`` (not in the
repository; ``--clean`` removes them). Each consumer reads the core from a pipe (``cat core |``), as the
handler reads the kernel's pipe. Reported per size and consumer: MB/s, ratio to cat and gzip -1, peak RSS
(the consumer's own VmHWM, polled), stored size, and for the handler the time the crashing process would be
held (its first read to its exit). Consumers:

* ``handler``: the real ``coredump-handler capture`` end to end (metadata, digest, fsync, backtrace) as configured
  by default; ``handler-Lk`` the same at ISA-L level k; ``handler-sha256`` with ``--core-digest sha256``;
* ``previous``: the pipeline before the buffer pool (a bytearray per chunk, a hasher thread, a compress pool);
* ``igzip_threaded``: ``isal.igzip_threaded`` (one gzip stream, 2 threads) hashing in the main thread;

The two variants hash with BLAKE3 and compress at level 2, as the handler does by default, so only the pipelines
differ.

    .venv/bin/python bench/ingest_bench.py                       # 1G, 3 rounds
    .venv/bin/python bench/ingest_bench.py --sizes 4G,8G --rounds 1 --consumers cat,handler
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "coredump-bench"
REPO = Path(__file__).resolve().parent.parent
POD_UID = "00000000-0000-4000-8000-000000000001"
CID = "b" * 64
GIB = 1 << 30

CRASHER_C = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
int main(int argc, char **argv) {
    size_t size = strtoull(argv[1], 0, 10), page = 4096, n = size / page;
    unsigned char *m = mmap(0, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return 2;
    uint64_t x = 88172645463325252ull;
    static const char text[] = "malloc free std::string GLIBC_2.34 request handler timeout /usr/lib/libc.so.6 ";
    for (size_t i = 0; i < n; i++) {
        unsigned char *p = m + i * page;
        switch (i % 3) {
        case 0:
            for (size_t j = 0; j < page; j += 8) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; memcpy(p + j, &x, 8); }
            break;
        case 1: memset(p, 0, page); break;
        default: for (size_t j = 0; j < page; j++) p[j] = text[(j + i) % (sizeof text - 1)]; break;
        }
    }
    *(volatile int *)0 = 1;
    return 0;
}
"""


def real_core(gib: int) -> Path:
    """A cached real core of a process that filled ``gib`` GiB (made on first use)."""
    d = CACHE / f"real-{gib}G"
    core = d / "core"
    if core.exists() and (d / "done").exists():
        return core
    CACHE.mkdir(parents=True, exist_ok=True)
    exe = CACHE / "bigcrash"
    if not exe.exists():
        (CACHE / "bigcrash.c").write_text(CRASHER_C)
        subprocess.run(["gcc", "-O2", "-o", str(exe), str(CACHE / "bigcrash.c")], check=True)
    d.mkdir(exist_ok=True)
    core.unlink(missing_ok=True)
    print(f"making a real {gib} GiB core in {d} ...", flush=True)
    subprocess.run(["sh", "-c", f'ulimit -c unlimited && exec "{exe}" {gib * GIB}'], cwd=d)
    if not core.exists():
        raise SystemExit(
            f"no core in {d}: is core_pattern 'core'? ({Path('/proc/sys/kernel/core_pattern').read_text().strip()})"
        )
    (d / "done").touch()
    return core


class PeakRss:
    """Peak RSS of a running process: the last VmHWM seen (ru_maxrss would carry the parent's over fork)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak = max(self.peak, int(line.split()[1]) * 1024)
            except (OSError, ValueError, IndexError):
                pass
            self._stop.wait(0.02)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


def run_piped(
    core: Path, cmd: list[str], *, stdout_path: Path | None, env: dict | None = None, cwd: Path = REPO
) -> tuple[float, int, float, float]:
    """(seconds, peak RSS, wall time at start, CPU seconds) of ``cmd`` reading ``cat core`` from a pipe. The CPU
    seconds (user + system, its threads and the children it reaped) are far steadier on a loaded machine than
    wall time: they say what the consumer costs, the wall time what it got."""
    feeder = subprocess.Popen(["cat", str(core)], stdout=subprocess.PIPE)
    assert feeder.stdout is not None
    out = open(stdout_path, "wb") if stdout_path else subprocess.DEVNULL
    try:
        started_wall = time.time()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=feeder.stdout, stdout=out, env=env, cwd=cwd)
        peak = PeakRss(proc.pid)
        feeder.stdout.close()
        # WNOWAIT: the last VmHWM is read from the exited (not yet reaped) process.
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        elapsed = time.perf_counter() - t0
        rss = peak.stop()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc.wait()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    finally:
        if stdout_path:
            out.close()
    feeder.wait()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed with exit {proc.returncode}")
    return elapsed, rss, started_wall, cpu


def make_node(base: Path, *, level: int | None) -> list[str]:
    """The handler's command line on a fake node tree under ``base``; ``level`` None: the handler's default."""
    proc = base / "proc" / "4242"
    proc.mkdir(parents=True)
    (base / "storage").mkdir()
    (proc / "cgroup").write_text(
        f"0::/kubepods.slice/kubepods-pod{POD_UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope\n"
    )
    logs = base / "host/var/log/containers"
    logs.mkdir(parents=True)
    (logs / f"bench-0_bench_app-{CID}.log").symlink_to(f"/var/log/pods/bench_bench-0_{POD_UID}/app/0.log")
    return [
        sys.executable,
        "-m",
        "handler.cli",
        "--config",
        str(base / "none.json"),
        "--storage-root",
        str(base / "storage"),
        "--spool-dir",
        str(base / "spool"),
        "--state-dir",
        str(base / "state"),
        "--proc-root",
        str(base / "proc"),
        "--host-root",
        str(base / "host"),
        "--crictl",
        "",
        "--rate-first",
        "0",
        "--rate-latest",
        "0",
        *(["--compress-level", str(level)] if level is not None else []),
        "capture",
        "4242",
        "4242",
        "11",
        str(int(time.time())),
        "-1",
        "bench",
    ]


# --- variants run in a child process: stdin -> gzip file (argv[3]) with fsync, digest printed -------------
VARIANT_LEVEL = 2  # the handler's default ISA-L level


def _hasher():
    import blake3  # the handler's default digest

    return blake3.blake3()


def _variant_previous(out: Path) -> str:
    """The pipeline before flat memory: a new bytearray per chunk, a hasher thread, a pool of compress futures."""
    import queue
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from isal import isal_zlib

    h = _hasher()
    hq: queue.Queue = queue.Queue(maxsize=4)

    def hasher() -> None:
        while (c := hq.get()) is not None:
            h.update(c)

    ht = threading.Thread(target=hasher, daemon=True)
    ht.start()
    rq: queue.Queue = queue.Queue(maxsize=4)

    def reader() -> None:
        while True:
            buf = bytearray(1 << 20)
            view = memoryview(buf)
            filled = 0
            while filled < len(buf):
                n = os.readv(0, [view[filled:]])
                if not n:
                    break
                filled += n
            view.release()
            if filled:
                del buf[filled:]
                rq.put(buf)
            if filled < (1 << 20):
                rq.put(None)
                return

    threading.Thread(target=reader, daemon=True).start()
    pool = ThreadPoolExecutor(max_workers=2)
    pending: deque = deque()
    with open(out, "wb", buffering=0) as f:
        while (chunk := rq.get()) is not None:
            hq.put(chunk)
            pending.append(pool.submit(isal_zlib.compress, chunk, VARIANT_LEVEL, 31))
            while len(pending) > 2 or (pending and pending[0].done()):
                f.write(pending.popleft().result())
        while pending:
            f.write(pending.popleft().result())
        os.fsync(f.fileno())
    hq.put(None)
    ht.join()
    return h.hexdigest()


def _variant_igzip_threaded(out: Path) -> str:
    from isal import igzip_threaded

    h = _hasher()
    buf = bytearray(1 << 20)
    with open(out, "wb", buffering=0) as raw:
        with igzip_threaded.open(raw, "wb", compresslevel=VARIANT_LEVEL, threads=2) as gz:
            while n := os.readv(0, [buf]):
                view = memoryview(buf)[:n]
                h.update(view)
                gz.write(view)
                view.release()
        os.fsync(raw.fileno())
    return h.hexdigest()


VARIANTS = {"previous": _variant_previous, "igzip_threaded": _variant_igzip_threaded}


def bench_round(core: Path, workdir: Path, consumers: list[str], *, baseline: Path | None = None) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    for name in consumers:
        if name == "cat":
            target = workdir / "cat.out"
            t, rss, _, cpu = run_piped(core, ["cat"], stdout_path=target)
            rows[name] = {"s": t, "rss": rss, "out": target.stat().st_size, "cpu": cpu}
            target.unlink()
        elif name == "gzip":
            target = workdir / "gzip.out"
            t, rss, _, cpu = run_piped(core, ["gzip", "-1"], stdout_path=target)
            rows[name] = {"s": t, "rss": rss, "out": target.stat().st_size, "cpu": cpu}
            target.unlink()
        elif name.startswith("handler") or name == "baseline":
            # "baseline": the handler of another checkout (--baseline), so a change is measured against what
            # it changes in the same run, interleaved.
            level = int(name[len("handler-L") :]) if name.startswith("handler-L") else None
            node = workdir / "node"
            args = make_node(node, level=level)
            if name == "handler-sha256":
                args[args.index("capture") : args.index("capture")] = ["--core-digest", "sha256"]
            env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
            cwd = baseline if name == "baseline" and baseline is not None else REPO
            t, rss, started, cpu = run_piped(core, args, stdout_path=None, env=env, cwd=cwd)
            ended = started + t
            (outcome,) = [json.loads(p.read_text()) for p in (node / "state/outcomes").glob("*.json")]
            if outcome.get("result") != "stored" or outcome.get("size") != core.stat().st_size:
                raise SystemExit(f"handler did not store the core: {outcome}")
            held = ended - outcome["firstReadAt"] if outcome.get("firstReadAt") else None
            rows[name] = {"s": t, "rss": rss, "out": outcome["storedSize"], "held": held, "cpu": cpu}
            shutil.rmtree(node)
        else:
            target = workdir / f"{name}.gz"
            t, rss, _, cpu = run_piped(
                core, [sys.executable, __file__, "--variant", name, str(target)], stdout_path=None
            )
            rows[name] = {"s": t, "rss": rss, "out": target.stat().st_size, "cpu": cpu}
            target.unlink()
    return rows


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


def report(gib: int, core: Path, rounds: list[dict[str, dict]]) -> None:
    size = core.stat().st_size
    names = list(rounds[0])
    med = {
        n: {
            k: statistics.median(r[n][k] for r in rounds if r[n].get(k) is not None)
            for k in rounds[0][n]
            if any(r[n].get(k) is not None for r in rounds)
        }
        for n in names
    }
    print(f"\n{gib} GiB real core ({human(size)}), median of {len(rounds)} interleaved round(s)")
    print(
        "| consumer | MB/s | vs cat | vs gzip -1 | CPU s | peak RSS (max) | stored / input | held (first read → exit) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for n in names:
        m = med[n]
        mbps = size / m["s"] / 1e6
        vs_cat = f"{med['cat']['s'] / m['s']:.2f}x" if "cat" in med else ""
        vs_gz = f"{med['gzip']['s'] / m['s']:.1f}x" if "gzip" in med else ""
        peak = max(r[n]["rss"] for r in rounds)
        held = f"{m['held']:.1f} s" if m.get("held") is not None else ""
        print(
            f"| {n} | {mbps:.0f} | {vs_cat} | {vs_gz} | {m['cpu']:.2f} | {human(peak)} | {m['out'] / size:.4f} "
            f"| {held} |"
        )
    print("rounds (seconds): " + "; ".join(", ".join(f"{n} {r[n]['s']:.1f}" for n in names) for r in rounds))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1", help="comma-separated core sizes in GiB (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--consumers", default="cat,gzip,handler,handler-L3,previous,igzip_threaded")
    p.add_argument("--dir", type=Path, default=REPO, help="where outputs go (default: the repository's filesystem)")
    p.add_argument("--clean", action="store_true", help="remove the cached cores and exit")
    p.add_argument("--baseline", type=Path, help="a checkout of another commit: adds consumer 'baseline', its handler")
    p.add_argument("--variant", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.variant:
        print(VARIANTS[args.variant[0]](Path(args.variant[1])))
        return 0
    if args.clean:
        shutil.rmtree(CACHE, ignore_errors=True)
        return 0
    consumers = args.consumers.split(",")
    if args.baseline is not None and "baseline" not in consumers:
        consumers.append("baseline")
    print(f"kernel {os.uname().release}, {os.cpu_count()} CPUs, python {sys.version.split()[0]}, outputs in {args.dir}")
    for gib in (int(s.rstrip("Gg")) for s in args.sizes.split(",")):
        core = real_core(gib)
        print("load average (1, 5, 15 min) at the start: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
        subprocess.run(["cat", str(core)], stdout=subprocess.DEVNULL, check=True)  # into the page cache
        rounds = []
        with tempfile.TemporaryDirectory(dir=args.dir, prefix=".ingest-bench-") as d:
            for i in range(args.rounds):
                # Interleaved: each round runs every consumer once, the order rotated.
                order = consumers[i % len(consumers) :] + consumers[: i % len(consumers)]
                row = bench_round(core, Path(d), order, baseline=args.baseline)
                rounds.append({n: row[n] for n in consumers})
                print(f"  round {i + 1}: " + ", ".join(f"{n} {row[n]['s']:.1f}s" for n in consumers), flush=True)
        report(gib, core, rounds)
        print("load average (1, 5, 15 min) at the end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
