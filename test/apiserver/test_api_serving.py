"""
Serving: a renewed certificate is served without a restart (cert-manager renews Secrets in place), a
broken renewal keeps the old one, and bad flags or an unusable port end the program with one plain line.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fake_clock import FakeClock
from fake_kube import TestCA
from fixtures_apiserver import BIN, RunningServer, start_apiserver
from waiting import wait_until

from apiserver.server import reload_serving_certificate


def served_serial(server: RunningServer) -> int:
    context = ssl.create_default_context(cafile=str(server.dev_dir / "ca.crt"))
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def renew(dev_dir: Path) -> int:
    """Issue a new serving certificate from the dev CA and write it over the old files, as a renewal does."""
    ca_key = serialization.load_pem_private_key((dev_dir / "ca.key").read_bytes(), password=None)
    ca = x509.load_pem_x509_certificate((dev_dir / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "renewed")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )  # type: ignore[arg-type]
    (dev_dir / "serving.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (dev_dir / "serving.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert.serial_number


def wait_for_serial(server: RunningServer, serial: int) -> int:
    wait_until(
        lambda: served_serial(server) == serial,
        what=f"the server to present certificate {serial}",
        timeout=10,
        interval=0.1,
    )
    return served_serial(server)


def test_renewed_serving_certificate_is_served_without_restart(tmp_path: Path) -> None:
    server = start_apiserver(tmp_path, "--tls-cert-reload-interval", "200ms")
    try:
        first = served_serial(server)
        renewed = renew(server.dev_dir)
        assert renewed != first
        assert wait_for_serial(server, renewed) == renewed
        (server.dev_dir / "serving.crt").write_text("not a certificate")
        wait_until(
            lambda: "serving certificate not reloaded" in server.log_path.read_text(),
            what="the server to try the broken renewal",
        )
        assert served_serial(server) == renewed, "a broken renewal must not replace a working certificate"
        assert server.request("GET", "/readyz").status == 200
    finally:
        server.stop()


def test_bad_flags_and_busy_ports_are_one_line_errors(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "coredump-apiserver"), *args], capture_output=True, text=True, timeout=30)

    missing = run("--storage-root", str(tmp_path))
    assert missing.returncode == 2 and "--tls-cert-file and --tls-private-key-file are required" in missing.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        taken = run("--dev", "--dev-dir", str(tmp_path / "dev"), "--secure-port", str(port))
    assert taken.returncode == 1
    assert taken.stderr.strip().splitlines() == [
        f"coredump-apiserver: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
    dead_etcd = run(
        "--dev", "--dev-dir", str(tmp_path / "dev2"), "--secure-port", "0", "--etcd-servers", f"http://127.0.0.1:{port}"
    )
    assert dead_etcd.returncode == 1 and "Traceback" not in dead_etcd.stderr
    assert dead_etcd.stderr.strip().splitlines()[-1].startswith("coredump-apiserver: object storage unavailable")


async def test_certificate_reload_follows_renewals_on_its_interval_and_keeps_a_working_pair(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The reload loop on a fake clock, checked by real TLS handshakes against the context it reloads."""
    ca = TestCA(tmp_path, name="serving-ca")
    cert, key = ca.issue(cn="first", server=True, directory=tmp_path, stem="serving")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def hang_up(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    listener = await asyncio.start_server(hang_up, "127.0.0.1", 0, ssl=context)
    port = listener.sockets[0].getsockname()[1]

    async def served_cn() -> str:
        client = ssl.create_default_context(cafile=str(ca.cert_file))
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="127.0.0.1")
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        certificate = x509.load_der_x509_certificate(der)
        return str(certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)

    clock = FakeClock()
    task = asyncio.create_task(
        reload_serving_certificate(context=context, cert=cert, key=key, interval=60, sleep=clock.sleep)
    )
    try:
        await clock.asleep()
        await clock.advance(60)  # nothing changed: nothing to do
        assert await served_cn() == "first"
        ca.issue(cn="renewed", server=True, directory=tmp_path, stem="serving")
        assert await served_cn() == "first", "not before the interval"
        await clock.advance(60)
        assert await served_cn() == "renewed"
        cert.write_text("not a certificate")
        with caplog.at_level(logging.WARNING, logger="apiserver.server"):
            await clock.advance(60)
        assert "serving certificate not reloaded" in caplog.text
        assert await served_cn() == "renewed", "a broken renewal must not replace a working certificate"
        ca.issue(cn="third", server=True, directory=tmp_path, stem="serving")
        await clock.advance(60)
        assert await served_cn() == "third", "a broken renewal must not stop later ones"
    finally:
        task.cancel()
        listener.close()
        await listener.wait_closed()
