"""
Dev mode's credentials: a private CA, a serving certificate for 127.0.0.1/localhost, client certificates
for an admin (``system:masters``) and a restricted viewer, and a kubeconfig with a context for each.

Files are made once and reused, so a kubeconfig keeps working across restarts of ``--dev``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import os
import shlex
import sys
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ADMIN = ("dev-admin", "system:masters")
VIEWER = ("dev-viewer", "dev-viewers")
VALIDITY = dt.timedelta(days=365)
# A crash imported by hand shows up as an endpoint (or a MODIFIED event) within this many seconds: the
# storage change detector (apiserver.registry.changedetect) looks at the directory levels every second.
AUTOCREATE_INTERVAL = 2.0


@dataclasses.dataclass(frozen=True)
class DevFiles:
    dir: Path
    ca_cert: Path
    serving_cert: Path
    serving_key: Path
    kubeconfig: Path
    cores: Path


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _issue(
    *,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    usage: x509.ObjectIdentifier,
    sans: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _kubeconfig(*, server: str, ca: Path, users: dict[str, tuple[Path, Path]]) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "coredump-dev", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [
            {"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}
            for user, (cert, key) in users.items()
        ],
        "contexts": [
            {"name": user, "context": {"cluster": "coredump-dev", "user": user, "namespace": "default"}}
            for user in users
        ],
        "current-context": next(iter(users)),
    }


def prepare(*, directory: Path, port: int, storage_root: Path | None) -> DevFiles:
    """Create (or reuse) the dev CA and certificates, and (re)write the kubeconfig for ``port``."""
    directory.mkdir(parents=True, exist_ok=True)
    directory = directory.resolve()
    ca_cert_path, ca_key_path = directory / "ca.crt", directory / "ca.key"
    if not (ca_cert_path.exists() and ca_key_path.exists()):
        ca_key = _key()
        now = dt.datetime.now(dt.timezone.utc)
        ca_name = _name("coredump-dev-ca")
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write_private(ca_key_path, _pem_key(ca_key))
        ca_cert_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        for stale in ("serving.crt", "admin.crt", "viewer.crt"):
            (directory / stale).unlink(missing_ok=True)
    loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    ca_key = loaded

    def ensure(
        stem: str, subject: x509.Name, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName] | None = None
    ) -> tuple[Path, Path]:
        cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
        if not (cert_path.exists() and key_path.exists()):
            key = _key()
            cert = _issue(ca_key=ca_key, ca_cert=ca_cert, subject=subject, key=key, usage=usage, sans=sans)
            _write_private(key_path, _pem_key(key))
            cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path

    serving = ensure(
        "serving",
        _name("coredump-apiserver-dev"),
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    admin = ensure("admin", _name(*ADMIN), ExtendedKeyUsageOID.CLIENT_AUTH)
    viewer = ensure("viewer", _name(*VIEWER), ExtendedKeyUsageOID.CLIENT_AUTH)
    kubeconfig_path = directory / "kubeconfig"
    kubeconfig = _kubeconfig(
        server=f"https://127.0.0.1:{port}", ca=ca_cert_path, users={ADMIN[0]: admin, VIEWER[0]: viewer}
    )
    _write_private(kubeconfig_path, yaml.safe_dump(kubeconfig, sort_keys=False).encode())
    cores = storage_root or directory / "cores"
    cores.mkdir(parents=True, exist_ok=True)
    return DevFiles(
        dir=directory,
        ca_cert=ca_cert_path,
        serving_cert=serving[0],
        serving_key=serving[1],
        kubeconfig=kubeconfig_path,
        cores=cores,
    )


def check_storage_root(*, storage_root: Path | None, directory: Path) -> str | None:
    """
    Why ``--storage-root`` cannot be used in dev mode, or None. Dev mode creates only its own default
    (``DIR/cores``): a mistyped root (``/nonexistent/x``) must not be created silently.
    """
    if storage_root is None:
        return None
    if storage_root.absolute() == (directory / "cores").absolute() or storage_root.is_dir():
        return None
    if storage_root.exists():
        return f"--storage-root {storage_root} is not a directory"
    return f"--storage-root {storage_root} does not exist (dev mode creates only its default, {directory / 'cores'})"


def _command(script: str, module: str) -> str:
    """An absolute command line for one of this package's programs, so a hint works in a fresh shell."""
    beside = Path(sys.executable).parent / script  # the venv's bin/, where pip put the console scripts
    if beside.is_file() and os.access(beside, os.X_OK):
        return shlex.quote(str(beside))
    return f"{shlex.quote(sys.executable)} -m {module}"


def banner(files: DevFiles, *, port: int) -> str:
    """What to try first, printed once the server listens: each line works pasted into a fresh shell."""
    q = shlex.quote
    base = "/apis/coredump.example.io/v1alpha1/namespaces/default/coredumpendpoints"
    handler = _command("coredump-handler", "handler.cli")
    return "\n".join(
        [
            f"coredump-apiserver (dev) serving https://127.0.0.1:{port}, cores from {files.cores}",
            "Try:",
            f"  export KUBECONFIG={q(str(files.kubeconfig))}",
            "  kubectl api-resources --api-group=coredump.example.io",
            "  kubectl get coredumpendpoints -A",
            "  (ulimit -c unlimited; sh -c 'kill -SEGV $$')   # exits 139 (SIGSEGV), leaves ./core where core_pattern"
            " is `core`",
            f"  {handler} import --storage-root {q(str(files.cores))} --spool-dir {q(str(files.dir / 'spool'))}"
            f" --state-dir {q(str(files.dir / 'state'))} --namespace default --pod my-pod"
            " --pod-uid 5f1c3b2a-8d4e-4f6a-9b7c-0d1e2f3a4b5c --container app core",
            "  until kubectl get coredumpendpoints my-pod 2>/dev/null; do sleep 1; done   # auto-created within"
            f" {AUTOCREATE_INTERVAL:.0f} s",
            "  kubectl get coredumpendpoints my-pod -o yaml",
            f"  kubectl get --raw {base}/my-pod/dump > cores.tar.gz",
            f"  kubectl --context dev-viewer get --raw {base}/my-pod/dump   # Forbidden: may list, may not dump",
        ]
    )
