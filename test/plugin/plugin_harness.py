"""
Reusable pieces of the plugin tests: run the installed ``kubectl-coredump`` (directly, or as ``kubectl
coredump`` through the real kubectl) with a given kubeconfig, build the crashing program, file its real
cores with ``coredump-handler import``, and a TCP proxy that cuts or holds connections.

Importable by other suites (the real-control-plane e2e tests): ``run_plugin(kubeconfig, "get", ...)``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from fixtures_apiserver import RunningServer

from handler import layout

BIN = Path(sys.executable).parent
PLUGIN = BIN / "kubectl-coredump"

CRASHER_C = r"""
#include <stdlib.h>
#include <signal.h>
/* A distinct frame for gdb to name; heap of mixed content (zeros, a pattern, pseudo-random bytes). */
__attribute__((noinline)) void crash_here(volatile int *p) { *p = 42; }
int main(int argc, char **argv) {
    size_t n = argc > 1 ? (size_t)atol(argv[1]) : 0;
    if (n) {
        unsigned char *b = malloc(n); unsigned x = 12345;
        for (size_t i = 0; i < n; i++) {
            size_t page = i / 4096;
            if (page % 3 == 0) b[i] = 0;
            else if (page % 3 == 1) b[i] = (unsigned char)(i * 7 / 4096);
            else { x = x * 1103515245u + 12345u; b[i] = (unsigned char)(x >> 16); }
        }
    }
    if (argc > 2) raise(atoi(argv[2]));
    crash_here((volatile int *)0);
    return 0;
}
"""


BIG_HEAP = 40 * 1024 * 1024  # a heap big enough that a core takes a while to stream
T0 = time.time() - 3600  # the cores' crash times start an hour ago


def run_plugin(
    kubeconfig: Path | None,
    *args: str,
    via_kubectl: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """
    Run ``kubectl-coredump ARGS`` (or ``<via_kubectl> coredump ARGS``, the real kubectl finding the plugin on
    PATH) with ``kubeconfig`` in ``KUBECONFIG``; stdout and stderr captured as bytes.
    """
    environment = {**os.environ, **(env or {})}
    environment["PATH"] = f"{BIN}{os.pathsep}{environment.get('PATH', '')}"
    if kubeconfig is not None:
        environment["KUBECONFIG"] = str(kubeconfig)
    command = [via_kubectl, "coredump", *args] if via_kubectl else [str(PLUGIN), *args]
    return subprocess.run(
        command, capture_output=True, timeout=timeout, env=environment, cwd=cwd, stdin=subprocess.DEVNULL
    )


def build_crasher(directory: Path) -> Path:
    source = directory / "crasher.c"
    source.write_text(CRASHER_C)
    subprocess.run(["gcc", "-g", "-O0", "-o", str(directory / "crasher"), str(source)], check=True)
    return directory / "crasher"


def crash(binary: Path, workdir: Path, *, heap: int = 0, signal: int | None = None) -> Path:
    """Run the program until it dumps core in ``workdir`` (core_pattern is ``core``); return the core."""
    workdir.mkdir(parents=True, exist_ok=True)
    args = [str(binary), str(heap)] + ([str(signal)] if signal else [])
    proc = subprocess.run(
        ["bash", "-c", 'ulimit -c unlimited && exec "$@"', "crasher", *args], cwd=workdir, capture_output=True
    )
    assert proc.returncode < 0 or proc.returncode >= 128, proc
    cores = [p for p in workdir.iterdir() if p.name == "core" or p.name.startswith("core.")]
    assert cores, f"no core in {workdir}: is core_pattern 'core'? ({proc})"
    return cores[0]


def import_core(
    *,
    root: Path,
    work: Path,
    core: Path,
    namespace: str,
    pod: str,
    pod_uid: str,
    container: str,
    time: float | None = None,
) -> None:
    """File a core the way an operator does: ``coredump-handler import``."""
    command = [
        str(BIN / "coredump-handler"),
        "--config",
        str(work / "absent.json"),
        "--storage-root",
        str(root),
        "--spool-dir",
        str(work / "spool"),
        "--state-dir",
        str(work / "state"),
        "--crictl",
        "",
        "import",
        "--namespace",
        namespace,
        "--pod",
        pod,
        "--pod-uid",
        pod_uid,
        "--container",
        container,
    ]
    if time is not None:
        command += ["--time", str(time)]
    subprocess.run([*command, str(core)], check=True, capture_output=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass
class ProxyRule:
    """What the proxy does to connection number ``connection`` (0-based): cut or hold it after ``after`` bytes
    from the server."""

    connection: int
    after: int
    action: str  # "cut" | "hold" | "slow" (from ``after`` bytes on, forward at ``rate`` bytes/s: a slow client)
    rate: int = 1 << 20


class CuttingProxy:
    """
    A TCP proxy on 127.0.0.1 in front of ``upstream_port`` (TLS passes through untouched). Per its rules it
    aborts a connection after N bytes towards the client (a dropped connection, an aggregator timeout), or
    holds it (stops forwarding) until :meth:`release`, which then closes it.
    """

    def __init__(self, upstream_port: int, rules: list[ProxyRule]) -> None:
        self.upstream_port = upstream_port
        self.rules = {r.connection: r for r in rules}
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.held = threading.Event()
        self._release = threading.Event()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def release(self) -> None:
        self._release.set()

    def close(self) -> None:
        self._closed = True
        self._release.set()
        self.listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            number = self.connections
            self.connections += 1
            threading.Thread(target=self._serve, args=(client, self.rules.get(number)), daemon=True).start()

    def _serve(self, client: socket.socket, rule: ProxyRule | None) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        except OSError:
            client.close()
            return

        def pump_up() -> None:
            try:
                while data := client.recv(65536):
                    upstream.sendall(data)
            except OSError:
                pass

        threading.Thread(target=pump_up, daemon=True).start()
        sent = 0
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                if rule is not None and rule.action == "slow" and sent + len(data) >= rule.after:
                    client.sendall(data)
                    sent += len(data)
                    time.sleep(len(data) / rule.rate)
                    continue
                if rule is not None and sent + len(data) >= rule.after:
                    client.sendall(data[: max(0, rule.after - sent)])
                    if rule.action == "hold":
                        self.held.set()
                        self._release.wait(120)
                    break
                client.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                # shutdown first: close() alone does not end a recv() blocked in the other thread,
                # and the peer would see nothing until its read timeout.
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()


def kubeconfig_via(source: Path, *, port: int, target: Path) -> Path:
    """A copy of a dev kubeconfig whose server is ``127.0.0.1:port`` (the proxy)."""
    import yaml

    config = yaml.safe_load(source.read_text())
    for cluster in config["clusters"]:
        cluster["cluster"]["server"] = f"https://127.0.0.1:{port}"
    target.write_text(yaml.safe_dump(config))
    return target


def kubectl_for_plugin() -> str | None:
    return shutil.which("kubectl")


@dataclasses.dataclass
class PluginWorld:
    server: RunningServer
    root: Path
    crasher: Path
    cache: Path
    uids: dict[str, str]
    originals: dict[str, str]  # "<ns>/<pod>/<container>/<core-id>" -> the digest its metadata promises

    @property
    def kubeconfig(self) -> Path:
        return self.server.kubeconfig

    def cores(self, namespace: str, pod: str) -> list[layout.StoredCore]:
        return layout.list_cores(self.root, namespace=namespace, pod=pod, pod_uid=self.uids[f"{namespace}/{pod}"])
