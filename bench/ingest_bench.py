#!/usr/bin/env python3
"""
Ingest benchmark of ``coredump-handler``: a core-like stream through the handler vs ``cat > file`` and
``gzip -1 > file``, all measured in the same run, on the same filesystem, from the same generator.

The stream mixes pages like a real core: zero pages, text-like pages (strings, small integers, pointers) and
random pages (already-compressed or encrypted heap). Each consumer reads it from a pipe, as the handler reads
the kernel's pipe. Reported per size: MB/s, peak RSS of the consumer (``wait4`` rusage), the compressed
size, and for the handler the time from process start to its first read. Ratios are against cat and gzip -1
of the same run.

    .venv/bin/python bench/ingest_bench.py                 # 1G,4G
    .venv/bin/python bench/ingest_bench.py --sizes 256M    # quick
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import select
import tempfile
import threading
import time
from pathlib import Path

from handler.agent.events import human_size as human
from handler.cli import parse_size

logger = logging.getLogger(__name__)

PAGE = 4096
BLOCK_PAGES = 16384                     # a 64 MiB block, repeated (with rotation) to reach the size
MIX = (("zero", 0.40), ("text", 0.30), ("random", 0.30))
POD_UID = "00000000-0000-4000-8000-000000000001"
CID = "b" * 64


def build_block(seed: int = 1) -> bytes:
    rnd = random.Random(seed)
    words = [w.encode() for w in ("malloc", "free", "std::string", "GLIBC_2.34", "main", "libc.so.6", "errno",
                                  "config", "request", "handler", "0x7ffd", "timeout", "user", "/usr/lib")]
    pages = []
    for _ in range(BLOCK_PAGES):
        kind = rnd.choices([k for k, _ in MIX], weights=[w for _, w in MIX])[0]
        if kind == "zero":
            pages.append(bytes(PAGE))
        elif kind == "random":
            pages.append(os.urandom(PAGE))
        else:
            buf = bytearray()
            while len(buf) < PAGE:
                if rnd.random() < 0.5:
                    buf += rnd.choice(words) + b"\0"
                else:
                    buf += (0x7F0000000000 + rnd.randrange(1 << 20) * 8).to_bytes(8, "little")
            pages.append(bytes(buf[:PAGE]))
    return b"".join(pages)


def generate(size: int, block_file: Path) -> None:
    """Write ``size`` bytes of the core-like stream to stdout (run as a separate process)."""
    block = block_file.read_bytes()
    out = sys.stdout.buffer.fileno()
    view = memoryview(block)
    written, shift = 0, 0
    while written < size:
        # Rotate the block each round so the stream does not repeat at a fixed distance.
        part = view[shift:] if shift else view
        n = min(len(part), size - written)
        while n:
            k = os.write(out, part[:n])
            part, n, written = part[k:], n - k, written + k
        shift = (shift + 7 * PAGE) % len(block)


class PeakRss:
    """Peak RSS of a running process: the last VmHWM seen (the high-water mark of its own address space).

    rusage's ru_maxrss is not used: Linux carries the parent's high-water mark over fork and exec.
    """

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
            self._stop.wait(0.01)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


def run_consumer(gen_cmd: list[str], cmd: list[str], *, stdout_path: Path | None, env: dict | None = None,
                 ) -> tuple[float, int, float]:
    """(seconds, peak RSS bytes, start wall time) of ``cmd`` reading the generator's stream."""
    gen = subprocess.Popen(gen_cmd, stdout=subprocess.PIPE)
    assert gen.stdout is not None
    # Like the kernel, the stream is ready before the consumer starts: wait for the generator's first bytes.
    select.select([gen.stdout], [], [])
    out = open(stdout_path, "wb") if stdout_path else subprocess.DEVNULL
    try:
        started_wall = time.time()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=gen.stdout, stdout=out, env=env)
        peak = PeakRss(proc.pid)
        gen.stdout.close()
        # WNOWAIT: the last VmHWM is read from the exited (not yet reaped) process.
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        elapsed = time.perf_counter() - t0
        rss = peak.stop()
        proc.wait()
    finally:
        if stdout_path:
            out.close()
    gen.wait()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed with exit {proc.returncode}")
    return elapsed, rss, started_wall


def make_node(base: Path) -> list[str]:
    proc = base / "proc" / "4242"
    proc.mkdir(parents=True)
    (base / "storage").mkdir()
    (proc / "cgroup").write_text(f"0::/kubepods.slice/kubepods-pod{POD_UID.replace('-', '_')}.slice/"
                                 f"cri-containerd-{CID}.scope\n")
    logs = base / "host/var/log/containers"
    logs.mkdir(parents=True)
    (logs / f"bench-0_bench_app-{CID}.log").symlink_to(f"/var/log/pods/bench_bench-0_{POD_UID}/app/0.log")
    return [sys.executable, "-m", "handler.cli", "--config", str(base / "none.json"), "--storage-root",
            str(base / "storage"), "--spool-dir", str(base / "spool"), "--state-dir", str(base / "state"),
            "--proc-root", str(base / "proc"), "--host-root", str(base / "host"), "--crictl", "",
            "--rate-first", "0", "--rate-latest", "0", "capture", "4242", "4242", "11", str(int(time.time())),
            "-1", "bench"]


def bench_size(size: int, workdir: Path, block_file: Path) -> list[dict]:
    gen_cmd = [sys.executable, __file__, "--generate", str(size), "--block-file", str(block_file)]
    rows = []
    t, rss, _ = run_consumer(gen_cmd, ["cat"], stdout_path=None)
    rows.append({"name": "generator → /dev/null (ceiling)", "s": t, "rss": None, "out": None})
    target = workdir / "cat.out"
    t, rss, _ = run_consumer(gen_cmd, ["cat"], stdout_path=target)
    rows.append({"name": "cat > file", "s": t, "rss": rss, "out": target.stat().st_size})
    target.unlink()
    target = workdir / "gzip.out"
    t, rss, _ = run_consumer(gen_cmd, ["gzip", "-1"], stdout_path=target)
    rows.append({"name": "gzip -1 > file", "s": t, "rss": rss, "out": target.stat().st_size})
    target.unlink()
    node = workdir / "node"
    args = make_node(node)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    t, rss, started = run_consumer(gen_cmd, args, stdout_path=None, env=env)
    (outcome,) = [json.loads(p.read_text()) for p in (node / "state/outcomes").glob("*.json")]
    if outcome.get("result") != "stored" or outcome.get("size") != size:
        raise SystemExit(f"handler did not store the stream: {outcome}")
    first = (outcome["firstReadAt"] - started) if outcome.get("firstReadAt") else None
    rows.append({"name": "coredump-handler (isal gzip + sha256 + fsync)", "s": t, "rss": rss,
                 "out": outcome["storedSize"], "first_read": first})
    shutil.rmtree(node)
    for r in rows:
        r["mbps"] = size / r["s"] / 1e6
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1G,4G", help="comma-separated stream sizes (default %(default)s)")
    p.add_argument("--dir", type=Path, default=None,
                   help="directory for the outputs (default: a temp dir under the repository, same filesystem)")
    p.add_argument("--generate", type=int, help=argparse.SUPPRESS)
    p.add_argument("--block-file", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.generate is not None:
        generate(args.generate, args.block_file)
        return 0
    base = args.dir or Path(__file__).resolve().parent
    print(f"kernel {os.uname().release}, {os.cpu_count()} CPUs, python {sys.version.split()[0]}, dir {base}")
    print(f"stream: {', '.join(f'{int(w * 100)}% {k}' for k, w in MIX)} pages")
    with tempfile.TemporaryDirectory(dir=base, prefix=".ingest-bench-block-") as bd:
        block_file = Path(bd) / "block"
        block_file.write_bytes(build_block())
        for size_text in args.sizes.split(","):
            print_size(size_text, base, block_file)
    return 0


def print_size(size_text: str, base: Path, block_file: Path) -> None:
    size = parse_size(size_text)
    with tempfile.TemporaryDirectory(dir=base, prefix=".ingest-bench-") as d:
        rows = bench_size(size, Path(d), block_file)
    cat = next(r for r in rows if r["name"] == "cat > file")
    gz = next(r for r in rows if r["name"] == "gzip -1 > file")
    print(f"\n{size_text} ({human(size)})")
    print("| consumer | MB/s | vs cat | vs gzip -1 | peak RSS | output | first read |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        fr = f"{r['first_read'] * 1000:.0f} ms" if r.get("first_read") is not None else ""
        print(f"| {r['name']} | {r['mbps']:.0f} | {r['mbps'] / cat['mbps']:.2f}x | {r['mbps'] / gz['mbps']:.1f}x"
              f" | {human(r['rss']) if r['rss'] else ''} | {human(r['out']) if r['out'] else ''} | {fr} |")


if __name__ == "__main__":
    sys.exit(main())
