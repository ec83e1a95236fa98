"""
What explaining a crash costs, on real kernel cores of 1 to 8 GiB: the sparse copy made while the core streams
past, and the unwind of that copy, against the baseline of only reading the stream.

For each size, a C program fills that much memory (a third random, a third zero, a third repetitive pages) and
crashes under ``ulimit -c unlimited`` (this machine's core_pattern is ``core``); the core is cached in
``$XDG_CACHE_HOME/coredump-bench``. Then, interleaved, median of ``--rounds`` rounds:

- ``read``: reading the core in 1 MiB chunks (what the handler does anyway);
- ``read+sparse``: the same while feeding :class:`handler.sparsecore.SparseCore` — the extra time the crashing
  process would be held for the copy;
- ``unwind``: ``python -m handler.backtrace`` on the sparse copy in a child (its wall time and peak RSS).

Prints the sparse copy's size on disk and the ratios. Usage: ``python bench/explain_bench.py --sizes 1,4,8``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from handler.sparsecore import SparseCore  # noqa: E402

PROGRAM = textwrap.dedent(r"""
    #include <stdlib.h>
    #include <string.h>
    #include <stdint.h>
    __attribute__((noinline)) void crash_in_big_function(volatile int *p) { *p = 1; }
    int main(int argc, char **argv) {
        size_t n = strtoull(argv[1], 0, 10) << 30, third = n / 3;
        unsigned char *m = malloc(n);
        uint64_t x = 88172645463325252ull;
        for (size_t i = 0; i < third; i += 8) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; memcpy(m + i, &x, 8); }
        memset(m + third, 0, third);
        for (size_t i = 2 * third; i < n; i++) m[i] = "repetitive page "[i % 16];
        crash_in_big_function(0);
        return m[5];
    }
""")


def cache_dir() -> Path:
    d = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "coredump-bench"
    d.mkdir(parents=True, exist_ok=True)
    return d


def real_core(gib: int) -> Path:
    d = cache_dir() / f"explain-{gib}g"
    core = d / "core"
    if core.exists():
        return core
    d.mkdir(exist_ok=True)
    (d / "big.c").write_text(PROGRAM)
    subprocess.run(["gcc", "-O1", "-g", "-o", str(d / "big"), str(d / "big.c")], check=True)
    print(f"making a {gib} GiB core ...", file=sys.stderr, flush=True)
    subprocess.run(f"ulimit -c unlimited; exec ./big {gib}", shell=True, cwd=d)
    if not core.exists():
        sys.exit(f"no core was written in {d}: is core_pattern 'core' and is there room?")
    return core


def read_only(core: Path) -> float:
    t = time.perf_counter()
    with open(core, "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass
    return time.perf_counter() - t


def read_sparse(core: Path, dst: Path) -> tuple[float, int]:
    t = time.perf_counter()
    sc = SparseCore(dst)
    with open(core, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            sc.feed(chunk)
    sc.close()
    return time.perf_counter() - t, dst.stat().st_blocks * 512


def unwind(sparse: Path) -> tuple[float, float, str]:
    import json

    t = time.perf_counter()
    # The program ran on this machine, so its files are at their paths under /.
    proc = subprocess.Popen(
        [sys.executable, "-m", "handler.backtrace", str(sparse), "--root", "/"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert proc.stdout is not None
    text = proc.stdout.read()
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    elapsed = time.perf_counter() - t
    rss = usage.ru_maxrss / 1024
    doc = json.loads(text)
    top = doc.get("threads", [{}])[0].get("frames", [{}])[0].get("function", "?") if "threads" in doc else doc
    return elapsed, rss, str(top)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--sizes", default="1,4,8", help="core sizes in GiB (default 1,4,8)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    print(
        f"{'core':>6} {'read s':>8} {'+sparse s':>9} {'extra':>7} {'sparse MiB':>10} {'unwind s':>8} "
        f"{'RSS MiB':>8}  top frame"
    )
    for gib in [int(s) for s in args.sizes.split(",")]:
        core = real_core(gib)
        reads, sparses, unwinds = [], [], []
        size = 0
        rss = 0.0
        top = ""
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                reads.append(read_only(core))
                t, size = read_sparse(core, Path(tmp) / f"sparse-{r}")
                sparses.append(t)
                u, rss, top = unwind(Path(tmp) / f"sparse-{r}")
                unwinds.append(u)
        rd, sp, un = statistics.median(reads), statistics.median(sparses), statistics.median(unwinds)
        print(f"{gib:>4}Gi {rd:8.2f} {sp:9.2f} {sp / rd:6.2f}x {size / 2**20:10.1f} {un:8.2f} {rss:8.1f}  {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
