"""
A real etcd for the tests: one server per test session, on free 127.0.0.1 ports, in a temp data dir.

The launcher itself is ``etcd_launcher`` (the API server benchmark uses it too).
``etcd_server`` can be stopped and started again on the same data dir and ports, so a test can
check what survives a restart; ``etcd_prefix`` gives each test a key prefix of its own so that tests
sharing the server never see each other's objects.
"""

from __future__ import annotations

import contextlib
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from etcd_launcher import EtcdServer, EtcdTLS, find_etcd

__all__ = ["EtcdServer", "EtcdTLS", "etcd_in_temp_dir", "etcd_server", "etcd_prefix"]


@contextlib.contextmanager
def etcd_in_temp_dir(prefix: str, *, tls: Callable[[Path], EtcdTLS] | None = None) -> Iterator[EtcdServer]:
    """
    A started etcd in a temp dir of its own, stopped and removed afterwards; ``tls`` writes the
    certificates into that dir. Skips the test when etcd is not installed.
    """
    binary = find_etcd()
    if binary is None:
        pytest.skip("etcd is not installed (/usr/bin/etcd or etcd on PATH); scripts/test installs it")
    with tempfile.TemporaryDirectory(prefix=prefix, ignore_cleanup_errors=True) as temp:
        base_dir = Path(temp)
        with EtcdServer(binary=binary, base_dir=base_dir, tls=tls(base_dir) if tls else None) as server:
            yield server


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    with etcd_in_temp_dir("coredump-etcd-") as server:
        yield server


@pytest.fixture
def etcd_prefix(etcd_server: EtcdServer) -> str:
    """A key prefix no other test uses (for ``EtcdStore(prefix=...)``)."""
    etcd_server.start()  # a test that stopped it and failed before restarting must not break the next ones
    return f"/test/{uuid.uuid4().hex}"
