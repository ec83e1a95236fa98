"""
``kubectl coredump get`` against ``curl`` of the same dump URL, and the cost of a resume.

A real core: the crashing C program of the plugin tests allocates SIZE MiB of mixed content (zero pages, a
pattern, pseudo-random bytes) and dies under ``ulimit -c unlimited`` (core_pattern ``core``); the core is
cached under ~/.cache/kubectl-coredump-bench and filed with ``coredump-handler import`` into a temporary
storage root served by ``coredump-apiserver --dev``. Each round, interleaved:

- ``curl`` with the dev admin client certificate, writing the tar.gz to a file (the baseline);
- ``kubectl-coredump get -o -`` writing the same tar.gz to a file;
- ``kubectl-coredump get -o DIR``: download + gunzip + sha256 verification + extraction of the 1 GiB core;
- through a local TCP proxy, ``get -o DIR`` without cuts and with CUTS forced cuts: the difference per cut is
  the resume overhead.

With ``--before REV`` the plugin as of git revision REV (its ``kubectl_coredump/`` unpacked into a temporary
directory, run by the same Python) is timed too, interleaved in the same rounds: before and after under the
same load.

Prints each round and the medians; ratios are curl time / plugin time (≥ 1 means as fast as curl), the
median of each round's ratio (a plugin run against the curl run of its own round).
``.venv/bin/python bench/plugin_bench.py [--size-mib 1024] [--rounds 3] [--cuts 5] [--before REV]``
"""
from __future__ import annotations

import argparse
import os
import shutil
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

from plugin_harness import (PLUGIN, CuttingProxy, ProxyRule, build_crasher, crash, free_port,  # noqa: E402
                            import_core, kubeconfig_via)

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


def timed(command: list[str], *, env: dict[str, str], stdout: Path | None = None) -> float:
    began = time.monotonic()
    with open(stdout, "wb") if stdout else open(os.devnull, "wb") as out:
        result = subprocess.run(command, env=env, stdout=out, stderr=subprocess.PIPE)
    seconds = time.monotonic() - began
    if result.returncode != 0:
        raise SystemExit(f"{command[0]} failed: {result.stderr.decode()[-2000:]}")
    return seconds


def byte_compile(package: Path) -> None:
    """What ``pip install`` does: without it (PYTHONDONTWRITEBYTECODE, an editable install) every run would
    compile the plugin's modules from source, a cost no installed plugin pays."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True)


def plugin_at(revision: str, *, work: Path) -> list[str]:
    """A command running ``kubectl_coredump`` as of ``revision`` (unpacked from git) with this Python."""
    target = work / "before"
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(HERE.parent), "archive", revision, "kubectl_coredump"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    byte_compile(target / "kubectl_coredump")
    code = (f"import sys; sys.path.insert(0, {str(target)!r}); import kubectl_coredump; "
            f"assert kubectl_coredump.__file__.startswith({str(target)!r}); "
            f"from kubectl_coredump.cli import main; sys.exit(main())")
    return [sys.executable, "-c", code]


def main() -> None:
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
        import_core(root=root, work=work, core=core, namespace="default", pod="big-0", pod_uid=str(uuid.uuid4()),
                    container="app")
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
        curl = ["curl", "-sSf", "--cacert", str(dev / "ca.crt"), "--cert", str(dev / "admin.crt"),
                "--key", str(dev / "admin.key"), "-o", str(work / "curl.tar.gz"), server.url + path + "/dump"]
        print(f"core {core} ({core.stat().st_size >> 20} MiB), archive {size / 2**20:.0f} MiB; "
              f"load average {os.getloadavg()[0]:.1f}")
        before = plugin_at(options.before, work=work) if options.before else None
        rows = []
        old_rows = []
        for round_ in range(1, options.rounds + 1):
            t_curl = timed(curl, env=env)
            t_raw = timed([str(PLUGIN), "get", "big-0", "-q", "-o", "-"], env=env, stdout=work / "plugin.tar.gz")
            if (work / "curl.tar.gz").read_bytes() != (work / "plugin.tar.gz").read_bytes():
                raise SystemExit("get -o - differs from curl's bytes")
            if before:
                old_raw = timed([*before, "get", "big-0", "-q", "-o", "-"], env=env, stdout=work / "plugin.tar.gz")
            shutil.rmtree(work / "out", ignore_errors=True)
            t_dir = timed([str(PLUGIN), "get", "big-0", "-q", "-o", str(work / "out")], env=env)
            if before:
                shutil.rmtree(work / "out", ignore_errors=True)
                old_dir = timed([*before, "get", "big-0", "-q", "-o", str(work / "out")], env=env)
                old_rows.append((t_curl, old_raw, old_dir))
                print(f"round {round_} before ({options.before}): get -o - {old_raw:.2f}s ({t_curl / old_raw:.2f}x)  "
                      f"get -o DIR {old_dir:.2f}s ({t_curl / old_dir:.2f}x)")
            proxy = CuttingProxy(server.port, [])
            kc = kubeconfig_via(server.kubeconfig, port=proxy.port, target=work / "kc-proxy")
            shutil.rmtree(work / "out", ignore_errors=True)
            t_proxy = timed([str(PLUGIN), "get", "big-0", "-q", "-o", str(work / "out")],
                            env={**env, "KUBECONFIG": str(kc)})
            proxy.close()
            # Cuts spread over the archive; connection 0 is also the endpoint GET (a few KiB, kept alive).
            rules = [ProxyRule(connection=i, after=size // (options.cuts + 1), action="cut")
                     for i in range(options.cuts)]
            proxy = CuttingProxy(server.port, rules)
            kc = kubeconfig_via(server.kubeconfig, port=proxy.port, target=work / "kc-cut")
            shutil.rmtree(work / "out", ignore_errors=True)
            t_cut = timed([str(PLUGIN), "get", "big-0", "-q", "-o", str(work / "out")],
                          env={**env, "KUBECONFIG": str(kc)})
            cuts = proxy.connections - 1
            proxy.close()
            per_cut = (t_cut - t_proxy) / max(cuts, 1)
            rows.append((t_curl, t_raw, t_dir, per_cut))
            print(f"round {round_}: curl {t_curl:.2f}s ({size / t_curl / 1e6:.0f} MB/s)  get -o - {t_raw:.2f}s "
                  f"({t_curl / t_raw:.2f}x)  get -o DIR {t_dir:.2f}s ({t_curl / t_dir:.2f}x)  via proxy "
                  f"{t_proxy:.2f}s, with {cuts} cuts {t_cut:.2f}s: {per_cut:+.2f}s per cut")
        med = [statistics.median(r[i] for r in rows) for i in range(4)]

        def ratio(table: list[tuple[float, ...]], column: int) -> float:
            """The median of the rounds' ratios: each plugin run against the curl run of its own round."""
            return statistics.median(r[0] / r[column] for r in table)

        print(f"median: curl {med[0]:.2f}s  get -o - {med[1]:.2f}s ({ratio(rows, 1):.2f}x curl)  "
              f"get -o DIR {med[2]:.2f}s ({ratio(rows, 2):.2f}x curl)  resume overhead {med[3]:+.2f}s per cut "
              f"(targets: >= 0.9x, < 1 s)")
        if old_rows:
            old = [statistics.median(r[i] for r in old_rows) for i in range(3)]
            print(f"median before ({options.before}): get -o - {old[1]:.2f}s ({ratio(old_rows, 1):.2f}x curl)  "
                  f"get -o DIR {old[2]:.2f}s ({ratio(old_rows, 2):.2f}x curl)")
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
