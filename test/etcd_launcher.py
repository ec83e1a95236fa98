"""
A single-member etcd on 127.0.0.1 for the tests and the API server benchmark (never used in production, so it is
not in the installed package; ``bench/apiserver_bench.py`` puts test/ on ``sys.path`` to import it).

``EtcdServer`` picks free ports once, so its ``endpoint`` stays the same across :meth:`EtcdServer.stop`
and :meth:`EtcdServer.start` on the same data dir: a caller can check what survives a restart. As a
context manager it starts etcd on entry and stops it on exit.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import ssl
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from waiting import wait_until

START_TIMEOUT = 30.0


def find_etcd() -> str | None:
    """The etcd binary, or None when it is not installed."""
    return shutil.which("etcd") or ("/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None)


def free_port() -> int:
    """A 127.0.0.1 port nothing listens on (until someone binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class EtcdTLS:
    """PEM files for an etcd that serves TLS and requires client certificates signed by ``ca_file``."""

    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


class EtcdServer:
    """A single-member etcd whose data and log (``etcd.log``) live in ``base_dir``."""

    def __init__(self, *, binary: str, base_dir: Path, tls: EtcdTLS | None = None) -> None:
        self.binary = binary
        self.base_dir = base_dir
        self.tls = tls
        self.data_dir = base_dir / "data"
        self.log_path = base_dir / "etcd.log"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.endpoint = f"{'https' if tls else 'http'}://127.0.0.1:{self.client_port}"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start etcd and return once it reports healthy; RuntimeError with its log tail if it does not."""
        if self.running:
            return
        peer = f"http://127.0.0.1:{self.peer_port}"
        command = [
            self.binary,
            "--name",
            "local",
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            self.endpoint,
            "--advertise-client-urls",
            self.endpoint,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"local={peer}",
            "--logger",
            "zap",
            "--log-level",
            "warn",
        ]
        if self.tls:
            command += [
                "--cert-file",
                str(self.tls.server_cert),
                "--key-file",
                str(self.tls.server_key),
                "--trusted-ca-file",
                str(self.tls.ca_file),
                "--client-cert-auth",
            ]
        self.base_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        context = None
        if self.tls:
            context = ssl.create_default_context(cafile=str(self.tls.ca_file))
            context.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))

        def healthy() -> bool:
            if self._process is None or self._process.poll() is not None:
                raise RuntimeError(f"etcd exited during startup (log {self.log_path}):\n{self._log_tail()}")
            with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1, context=context) as response:
                return b'"true"' in response.read()

        try:
            wait_until(healthy, what="etcd to be healthy", timeout=START_TIMEOUT, ignore=(OSError,))
        except AssertionError as error:
            self.stop()
            raise RuntimeError(f"{error} (log {self.log_path}):\n{self._log_tail()}") from None

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stop etcd gracefully (its data stays); kill it if it does not stop."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
