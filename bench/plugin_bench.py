"""
``kubectl coredump get`` against ``curl`` of the same dump URL, and the cost of a resume.

A real core: the crashing C program of the plugin tests allocates SIZE MiB of mixed content (zero pages, a
pattern, pseudo-random bytes) and dies under ``ulimit -c unlimited`` (core_pattern ``core``); the core is
cached under ~/.cache/kubectl-coredump-bench and filed with ``coredump-handler import`` into a temporary
storage root served by ``coredump-apiserver --dev``. Each round, interleaved:

- ``curl`` with the dev admin client certificate, writing the tar.gz to a file (the baseline), run before
  and after every plugin run: each plugin run's ratio is against the mean of the two curl runs around it;
- ``kubectl-coredump get -o -`` writing the same tar.gz to a file (bytes compared with curl's);
- ``kubectl-coredump get -o DIR``: download + gunzip + digest verification + extraction of the 1 GiB core;
- through a local TCP proxy, ``get -o -`` without cuts and with CUTS forced cuts (bytes compared): the
  difference per cut is the resume overhead.
Each run also reports the client's own CPU time (user + system), which the machine's load does not change.

With ``--before REV`` the plugin as of git revision REV (its ``kubectl_coredump/`` unpacked into a temporary
directory, run by the same Python) is timed too, interleaved in the same rounds: before and after under the
same load.

Prints each round and the medians; ratios are curl time / plugin time (≥ 1 means as fast as curl), the
median of each round's ratio (a plugin run against the curl run of its own round).
``.venv/bin/python bench/plugin_bench.py [--size-mib 1024] [--rounds 3] [--cuts 5] [--before REV]``
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "test" / "plugin"))
sys.path.insert(0, str(HERE.parent / "test"))

from plugin_harness import (  # noqa: E402
    PLUGIN,
    CuttingProxy,
    ProxyRule,
    build_crasher,
    crash,
    free_port,
    import_core,
    kubeconfig_via,
)

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kubectl-coredump-bench"


def real_core(size_mib: int) -> Path:
    target = CACHE / f"core-{size_mib}MiB"
    if target.exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        binary = build_crasher(Path(work))
        core = crash(binary, Path(work) / "run", heap=size_mib << 20)
        os.replace(core, target)
    return target


@dataclasses.dataclass(frozen=True)
class Run:
    wall: float
    cpu: float  # user + system of the client process (what the client itself costs, whatever the load)


def timed(command: list[str], *, env: dict[str, str], stdout: Path | None = None) -> Run:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.monotonic()
    with open(stdout, "wb") if stdout else open(os.devnull, "wb") as out:
        result = subprocess.run(command, env=env, stdout=out, stderr=subprocess.PIPE)
    seconds = time.monotonic() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{command[0]} failed: {result.stderr.decode()[-2000:]}")
    return Run(wall=seconds, cpu=after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime)


def byte_compile(package: Path) -> None:
    """What ``pip install`` does: without it (PYTHONDONTWRITEBYTECODE, an editable install) every run would
    compile the plugin's modules from source, a cost no installed plugin pays."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True)


def plugin_at(revision: str, *, work: Path) -> list[str]:
    """A command running ``kubectl_coredump`` as of ``revision`` (unpacked from git) with this Python."""
    target = work / "before"
    target.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(HERE.parent), "archive", revision, "kubectl_coredump"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    byte_compile(target / "kubectl_coredump")
    code = (
        f"import sys; sys.path.insert(0, {str(target)!r}); import kubectl_coredump; "
        f"assert kubectl_coredump.__file__.startswith({str(target)!r}); "
        f"from kubectl_coredump.cli import main; sys.exit(main())"
    )
    return [sys.executable, "-c", code]


def main() -> None:
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(1))  # stop the server on kill, too
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cuts", type=int, default=5)
    parser.add_argument("--before", metavar="REV", help="also time the plugin as of this git revision")
    options = parser.parse_args()
    core = real_core(options.size_mib)
    byte_compile(HERE.parent / "kubectl_coredump")
    work = Path(tempfile.mkdtemp(prefix="plugin-bench-"))
    server = None
    try:
        root = work / "cores"
        root.mkdir()
        import_core(
            root=root,
            work=work,
            core=core,
            namespace="default",
            pod="big-0",
            pod_uid=str(uuid.uuid4()),
            container="app",
        )
        from fixtures_apiserver import start_apiserver

        server = start_apiserver(work / "server", "--storage-root", str(root), "--secure-port", str(free_port()))
        path = "/apis/coredump.example.io/v1alpha1/namespaces/default/coredumpendpoints/big-0"
        deadline = time.monotonic() + 60
        while server.request("GET", path).status != 200:  # auto-created at startup from storage
            if time.monotonic() > deadline:
                raise SystemExit("the endpoint was never auto-created")
            time.sleep(0.2)
        size = int(server.request("HEAD", path + "/dump").headers["Content-Length"])
        dev = server.dev_dir
        env = {**os.environ, "KUBECONFIG": str(server.kubeconfig), "XDG_CACHE_HOME": str(work / "xdg")}
        curl = [
            "curl",
            "-sSf",
            "--cacert",
            str(dev / "ca.crt"),
            "--cert",
            str(dev / "admin.crt"),
            "--key",
            str(dev / "admin.key"),
            "-o",
            str(work / "curl.tar.gz"),
            server.url + path + "/dump",
        ]
        print(
            f"core {core} ({core.stat().st_size >> 20} MiB), archive {size / 2**20:.0f} MiB; "
            f"load average {os.getloadavg()[0]:.1f}"
        )
        before = plugin_at(options.before, work=work) if options.before else None
        cases = [
            ("get -o -", [str(PLUGIN), "get", "big-0", "-q", "-o", "-"], True),
            ("get -o DIR", [str(PLUGIN), "get", "big-0", "-q", "-o", str(work / "out")], False),
        ]
        if before:
            cases[1:1] = [(f"before {options.before}: get -o -", [*before, "get", "big-0", "-q", "-o", "-"], True)]
            cases.append(
                (
                    f"before {options.before}: get -o DIR",
                    [*before, "get", "big-0", "-q", "-o", str(work / "out")],
                    False,
                )
            )
        ratios: dict[str, list[float]] = {label: [] for label, _, _ in cases}
        walls: dict[str, list[float]] = {label: [] for label, _, _ in cases}
        cpus: dict[str, list[float]] = {label: [] for label, _, _ in cases}
        curl_runs: list[Run] = []
        per_cuts: list[float] = []
        for round_ in range(1, options.rounds + 1):
            previous = timed(curl, env=env)
            curl_runs.append(previous)
            line = [f"round {round_}:"]
            for label, command, to_stdout in cases:
                shutil.rmtree(work / "out", ignore_errors=True)
                run = timed(command, env=env, stdout=work / "plugin.tar.gz" if to_stdout else None)
                if to_stdout and (work / "curl.tar.gz").read_bytes() != (work / "plugin.tar.gz").read_bytes():
                    raise SystemExit(f"{label} differs from curl's bytes")
                following = timed(curl, env=env)
                curl_runs.append(following)
                # Against the curl runs just before and just after it: the load moves, the pair cancels most of it.
                ratio = (previous.wall + following.wall) / 2 / run.wall
                ratios[label].append(ratio)
                walls[label].append(run.wall)
                cpus[label].append(run.cpu)
                line.append(f"{label} {run.wall:.2f}s ({ratio:.2f}x, cpu {run.cpu:.2f}s)")
                previous = following
            proxy = CuttingProxy(server.port, [])
            kc = kubeconfig_via(server.kubeconfig, port=proxy.port, target=work / "kc-proxy")
            shutil.rmtree(work / "out", ignore_errors=True)
            t_proxy = timed(
                [str(PLUGIN), "get", "big-0", "-q", "-o", "-"],
                env={**env, "KUBECONFIG": str(kc)},
                stdout=work / "plugin.tar.gz",
            ).wall
            proxy.close()
            # Cuts spread over the archive, one per connection.
            rules = [
                ProxyRule(connection=i, after=size // (options.cuts + 1), action="cut") for i in range(options.cuts)
            ]
            proxy = CuttingProxy(server.port, rules)
            kc = kubeconfig_via(server.kubeconfig, port=proxy.port, target=work / "kc-cut")
            t_cut = timed(
                [str(PLUGIN), "get", "big-0", "-q", "-o", "-"],
                env={**env, "KUBECONFIG": str(kc)},
                stdout=work / "plugin.tar.gz",
            ).wall
            if (work / "curl.tar.gz").read_bytes() != (work / "plugin.tar.gz").read_bytes():
                raise SystemExit("get -o - across cuts differs from curl's bytes")
            cuts = proxy.connections - 1
            proxy.close()
            per_cuts.append((t_cut - t_proxy) / max(cuts, 1))
            line.append(
                f"| curl cpu {previous.cpu:.2f}s | via proxy {t_proxy:.2f}s, with {cuts} cuts {t_cut:.2f}s: "
                f"{per_cuts[-1]:+.2f}s per cut"
            )
            print("  ".join(line), flush=True)
        median = statistics.median
        print(
            f"median of {options.rounds} rounds: curl {median(r.wall for r in curl_runs):.2f}s "
            f"(cpu {median(r.cpu for r in curl_runs):.2f}s)"
        )
        for label, _, _ in cases:
            print(
                f"  {label}: {median(walls[label]):.2f}s, {median(ratios[label]):.2f}x curl "
                f"(cpu {median(cpus[label]):.2f}s)"
            )
        print(f"  resume overhead {median(per_cuts):+.2f}s per cut (targets: >= 0.9x curl, < 1 s per cut)")
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
