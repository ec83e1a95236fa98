"""
deploy/make-certs.sh, run for real (openssl): the CA signs a serving certificate that kube-apiserver's
aggregator accepts for the Service's name, the caBundle it writes is that CA, and renewing keeps the CA.
"""

from __future__ import annotations

import base64
import logging
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from deploy_helpers import APISERVICE, MAKE_CERTS, NAMESPACE, SERVICE, TLS_FILES, Rendered, run_make_certs

logger = logging.getLogger(__name__)


def dns_sans(path: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return set(
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    )


def ca_bundle(out: Path) -> str:
    patch = yaml.safe_load((out / "apiservice-cabundle.yaml").read_text())
    assert patch["kind"] == "APIService" and patch["metadata"]["name"] == APISERVICE
    return patch["spec"]["caBundle"]


def handshake(out: Path, server_name: str) -> None:
    """A TLS handshake as the aggregator does it: trust only caBundle, verify the Service's DNS name."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(out / "tls.crt", out / "tls.key")
    client_ctx = ssl.create_default_context(cadata=base64.b64decode(ca_bundle(out)).decode())
    with socket.create_server(("127.0.0.1", 0)) as listener:
        errors: list[BaseException] = []

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError) as e:  # the client refused us: its error is the one that matters
                errors.append(e)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(listener.getsockname(), timeout=10) as raw,
                client_ctx.wrap_socket(raw, server_hostname=server_name) as tls,
            ):
                assert tls.recv(2) == b"ok"
        finally:
            thread.join(timeout=10)


def test_deploy_make_certs_makes_a_certificate_the_aggregator_accepts(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    proc = run_make_certs(out)
    assert proc.returncode == 0, proc.stderr
    assert dns_sans(out / "tls.crt") == {
        SERVICE,
        f"{SERVICE}.{NAMESPACE}",
        f"{SERVICE}.{NAMESPACE}.svc",
        f"{SERVICE}.{NAMESPACE}.svc.cluster.local",
    }
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(out / "ca.crt"), "-purpose", "sslserver", str(out / "tls.crt")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # caBundle is base64 of the PEM CA, exactly what kube-apiserver decodes.
    assert base64.b64decode(ca_bundle(out)) == (out / "ca.crt").read_bytes()
    handshake(out, f"{SERVICE}.{NAMESPACE}.svc")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(out, "kubernetes.default.svc")
    # Private keys are not readable by others.
    for key in ("ca.key", "tls.key"):
        assert (out / key).stat().st_mode & 0o077 == 0


def test_deploy_make_certs_renewal_keeps_the_ca_unless_asked(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    assert run_make_certs(out).returncode == 0
    first_ca, first_cert = (out / "ca.crt").read_bytes(), (out / "tls.crt").read_bytes()
    assert run_make_certs(out).returncode == 0
    assert (out / "ca.crt").read_bytes() == first_ca and (out / "tls.crt").read_bytes() != first_cert
    handshake(out, f"{SERVICE}.{NAMESPACE}.svc")
    assert run_make_certs(out, "--new-ca").returncode == 0
    assert (out / "ca.crt").read_bytes() != first_ca
    handshake(out, f"{SERVICE}.{NAMESPACE}.svc")


def test_deploy_make_certs_names_another_namespace_and_domain(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    proc = run_make_certs(out, "--namespace", "crash", "--service", "cores", "--cluster-domain", "corp.local")
    assert proc.returncode == 0, proc.stderr
    assert dns_sans(out / "tls.crt") == {"cores", "cores.crash", "cores.crash.svc", "cores.crash.svc.corp.local"}
    handshake(out, "cores.crash.svc")


def test_deploy_make_certs_rejects_bad_arguments_in_one_line(tmp_path: Path) -> None:
    proc = run_make_certs(tmp_path / "tls", "--days", "soon")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--days" in proc.stderr
    proc = run_make_certs(tmp_path / "tls", "--frobnicate")
    assert proc.returncode == 2 and "--frobnicate" in proc.stderr
    assert not (tmp_path / "tls" / "tls.crt").exists()


@pytest.mark.kubectl
def test_deploy_rendered_apiservice_carries_the_script_ca(
    manifests_with_certs: Path, rendered: dict[str, Rendered]
) -> None:
    ca = (manifests_with_certs / TLS_FILES / "ca.crt").read_bytes()
    for name in ("base", "nfs", "cephfs"):
        apiservice = rendered[name].one("APIService", APISERVICE)
        assert base64.b64decode(apiservice["spec"]["caBundle"]) == ca, name
        secret = rendered[name].one("Secret", "coredump-apiserver-tls", prefix=True)
        assert base64.b64decode(secret["data"]["ca.crt"]) == ca
        assert (
            base64.b64decode(secret["data"]["tls.crt"]) == (manifests_with_certs / TLS_FILES / "tls.crt").read_bytes()
        )


def test_deploy_make_certs_help_is_the_header_and_nothing_else(tmp_path: Path) -> None:
    proc = subprocess.run([str(MAKE_CERTS), "--help"], capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0 and proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("Make the certificates") and "set -eu" not in proc.stdout
    assert lines[-1].startswith("Needs only openssl") and all(not line.startswith("#") for line in lines)
    assert "deploy/make-certs.sh [--out DIR]" in proc.stdout
