"""
A real etcd for the tests: one server per test session, on free 127.0.0.1 ports, in a temp data dir.

``etcd_server`` can be stopped and started again on the same data dir and ports, so a test can
check what survives a restart; ``etcd_prefix`` gives each test a key prefix of its own so that tests
sharing the server never see each other's objects.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

logger = logging.getLogger(__name__)

__all__ = ["EtcdServer", "EtcdTLS", "etcd_server", "etcd_prefix", "find_etcd"]

_START_TIMEOUT = 30.0


def find_etcd() -> str | None:
    """The etcd binary, or None when it is not installed."""
    return shutil.which("etcd") or ("/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None)


def _free_port() -> int:
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
    """A single-member etcd; ``endpoint`` stays the same across :meth:`stop` and :meth:`start`."""

    def __init__(self, *, binary: str, base_dir: Path, tls: EtcdTLS | None = None) -> None:
        self.binary = binary
        self.base_dir = base_dir
        self.tls = tls
        self.data_dir = base_dir / "data"
        self.log_path = base_dir / "etcd.log"
        self.client_port = _free_port()
        self.peer_port = _free_port()
        self.endpoint = f"{'https' if tls else 'http'}://127.0.0.1:{self.client_port}"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        if self.running:
            return
        peer = f"http://127.0.0.1:{self.peer_port}"
        command = [
            self.binary,
            "--name", "test",
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"test={peer}",
            "--logger", "zap",
            "--log-level", "warn",
        ]
        if self.tls:
            command += [
                "--cert-file", str(self.tls.server_cert),
                "--key-file", str(self.tls.server_key),
                "--trusted-ca-file", str(self.tls.ca_file),
                "--client-cert-auth",
            ]
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        last_error = "no answer"
        context = None
        if self.tls:
            context = ssl.create_default_context(cafile=str(self.tls.ca_file))
            context.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                raise RuntimeError(f"etcd exited during startup:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1, context=context) as response:
                    if b'"true"' in response.read():
                        return
            except (OSError, urllib.error.URLError) as error:
                last_error = str(error)
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"etcd did not become healthy in {_START_TIMEOUT:.0f}s ({last_error}):\n{self._log_tail()}")

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


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    binary = find_etcd()
    if binary is None:
        pytest.skip("etcd is not installed (/usr/bin/etcd or etcd on PATH); scripts/test installs it")
    base_dir = Path(tempfile.mkdtemp(prefix="coredump-etcd-"))
    server = EtcdServer(binary=binary, base_dir=base_dir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base_dir, ignore_errors=True)


@pytest.fixture
def etcd_prefix(etcd_server: EtcdServer) -> str:
    """A key prefix no other test uses (for ``EtcdStore(prefix=...)``)."""
    etcd_server.start()  # a test that stopped it and failed before restarting must not break the next ones
    return f"/test/{uuid.uuid4().hex}"
