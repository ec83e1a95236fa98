"""
The configuration of ``coredump-apiserver``, in metrics-server's steps: options → validate → Config → complete.

- :func:`build_parser`: the flags, named as kube-apiserver and metrics-server name them, their values in the one
  flag language of :mod:`handler.flags` (authentication and authorization flags come from
  :mod:`apiserver.auth.options`, retention's from :mod:`apiserver.retention.setup`);
- :func:`validate`: combinations that cannot work end the program with argparse's one line (exit 2);
- :class:`Config`: the frozen result, one field per flag under the flag's name (``config.secure_port``), the
  auth options as one :class:`~apiserver.auth.options.AuthOptions`; nothing downstream sees argparse;
- :meth:`Config.complete`: dev mode's files (serving certificate, cores directory) filled in once the port is
  known, so the server reads the certificate and the storage root from one place.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from apiserver.auth.options import AuthOptions, add_auth_flags
from apiserver.dump.options import add_dump_flags
from apiserver.handlers.io import DEFAULT_MAX_BODY_BYTES
from apiserver.registry.cacher import DEFAULT_BOOKMARK_INTERVAL, DEFAULT_CAPACITY
from apiserver.limits import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_MUTATING_REQUESTS_INFLIGHT,
    DEFAULT_MAX_REQUESTS_INFLIGHT,
    DEFAULT_READ_HEADER_TIMEOUT,
)
from apiserver.retention.setup import add_retention_flags
from handler import flags

if TYPE_CHECKING:
    from apiserver.devmode import DevFiles


def _server(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"etcd server {text!r} must be an http:// or https:// URL")
    return text


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """What one client may cost (:mod:`apiserver.limits`); defaults are kube-apiserver's where it has one."""
    limits = parser.add_argument_group("client limits")
    limits.add_argument(
        "--read-header-timeout",
        type=flags.parse_positive_duration,
        default=flags.format_duration(DEFAULT_READ_HEADER_TIMEOUT),
        metavar="DURATION",
        help="close a connection whose TLS handshake or request header takes longer "
        "(kube-apiserver's ReadHeaderTimeout)",
    )
    limits.add_argument(
        "--idle-timeout",
        type=flags.parse_positive_duration,
        default=flags.format_duration(DEFAULT_IDLE_TIMEOUT),
        metavar="DURATION",
        help="close a keep-alive connection idle this long between requests (kube-apiserver's IdleTimeout)",
    )
    limits.add_argument(
        "--max-connections",
        type=flags.parse_count,
        default=str(DEFAULT_MAX_CONNECTIONS),
        help="client connections open at once; more are closed after their handshake (0: no limit)",
    )
    limits.add_argument(
        "--max-requests-inflight",
        type=flags.parse_count,
        default=str(DEFAULT_MAX_REQUESTS_INFLIGHT),
        help="read-only requests served at once, watches and dumps not counted; more get 429 (0: no limit)",
    )
    limits.add_argument(
        "--max-mutating-requests-inflight",
        type=flags.parse_count,
        default=str(DEFAULT_MAX_MUTATING_REQUESTS_INFLIGHT),
        help="create/update/patch/delete requests served at once; more get 429 (0: no limit)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coredump-apiserver",
        formatter_class=flags.HelpFormatter,
        description="Aggregated Kubernetes API server for coredump.example.io: CoredumpEndpoint objects and "
        "the dump subresource that streams a pod's core dumps.",
    )
    serving = parser.add_argument_group("serving")
    serving.add_argument("--secure-port", type=flags.parse_port, default="6443", help="HTTPS port (0 picks one)")
    serving.add_argument("--bind-address", default="0.0.0.0", help="address to listen on")
    serving.add_argument("--tls-cert-file", type=Path, help="serving certificate (PEM)")
    serving.add_argument("--tls-private-key-file", type=Path, help="serving private key (PEM)")
    serving.add_argument(
        "--tls-cert-reload-interval",
        type=flags.parse_positive_duration,
        default="1m",
        metavar="DURATION",
        help="how often the certificate files are checked for renewal",
    )
    serving.add_argument(
        "--max-request-body-bytes",
        type=flags.parse_size,
        default=flags.format_size(DEFAULT_MAX_BODY_BYTES),
        help="largest accepted request body (kube-apiserver's 3Mi)",
    )

    add_limit_flags(parser)

    storage = parser.add_argument_group("object storage")
    storage.add_argument(
        "--etcd-servers",
        type=flags.list_of(_server),
        default="",
        help="comma-separated etcd URLs; without it objects live in memory (dev and tests only)",
    )
    storage.add_argument("--etcd-prefix", default="/registry/coredump.example.io", help="key prefix in etcd")
    storage.add_argument("--etcd-cafile", type=Path, help="CA bundle to verify etcd's serving certificate")
    storage.add_argument("--etcd-certfile", type=Path, help="client certificate for etcd")
    storage.add_argument("--etcd-keyfile", type=Path, help="client key for etcd")
    storage.add_argument(
        "--watch-cache-size",
        type=flags.parse_count,
        default=str(DEFAULT_CAPACITY),
        metavar="EVENTS",
        help="changes the watch cache keeps: how old a resourceVersion a watch may resume from, "
        "and how far a watcher may fall behind before its watch is closed",
    )
    storage.add_argument(
        "--watch-bookmark-interval",
        type=flags.parse_positive_duration,
        default=flags.format_duration(DEFAULT_BOOKMARK_INTERVAL),
        metavar="DURATION",
        help="how often a watch with allowWatchBookmarks gets a BOOKMARK",
    )

    cores = parser.add_argument_group("core storage")
    cores.add_argument("--storage-root", type=Path, help="root of the shared core storage (NFS/CephFS mount)")
    flags.add_bool(
        cores,
        "--auto-create-endpoints",
        default=True,
        help="create a CoredumpEndpoint for every pod that has cores but no endpoint",
    )
    cores.add_argument(
        "--kubeconfig", type=Path, help="kubeconfig for reading pods (default: in-cluster configuration when available)"
    )
    cores.add_argument(
        "--status-resync-interval",
        type=flags.parse_positive_duration,
        default="10m",
        metavar="DURATION",
        help="time between full passes (one storage walk: endpoints auto-created, every status "
        "reconciled), which catch any change of storage no notification reported",
    )

    add_auth_flags(parser)
    add_retention_flags(parser)
    add_dump_flags(parser)

    dev = parser.add_argument_group("development")
    dev.add_argument(
        "--dev",
        action="store_true",
        help="serve on 127.0.0.1 with self-signed TLS, dev client certificates and a kubeconfig in "
        "--dev-dir; cores from DIR/cores unless --storage-root is given",
    )
    dev.add_argument("--dev-dir", type=Path, default=Path(".dev"), help="directory for dev mode files")

    logs = parser.add_argument_group("logging")
    logs.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity; logs are one JSON object per line",
    )
    return parser


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Flag combinations that cannot work end the program with one clear line (argparse's error, exit 2)."""
    if not args.dev:
        if not args.tls_cert_file or not args.tls_private_key_file:
            parser.error("--tls-cert-file and --tls-private-key-file are required (or use --dev)")
        if args.storage_root is None:
            parser.error("--storage-root is required (or use --dev)")
    if args.watch_cache_size < 1:
        parser.error("--watch-cache-size must be at least 1")
    if bool(args.etcd_certfile) != bool(args.etcd_keyfile):
        parser.error("--etcd-certfile and --etcd-keyfile go together")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """The API server's whole configuration, one field per flag (named as the flag), frozen once parsed."""

    secure_port: int
    bind_address: str
    tls_cert_file: Path | None
    tls_private_key_file: Path | None
    tls_cert_reload_interval: float
    max_request_body_bytes: int
    read_header_timeout: float
    idle_timeout: float
    max_connections: int
    max_requests_inflight: int
    max_mutating_requests_inflight: int
    etcd_servers: tuple[str, ...]
    etcd_prefix: str
    etcd_cafile: Path | None
    etcd_certfile: Path | None
    etcd_keyfile: Path | None
    storage_root: Path | None
    auto_create_endpoints: bool
    kubeconfig: Path | None
    status_resync_interval: float
    watch_cache_size: int
    watch_bookmark_interval: float
    dump_max_objects: int
    dump_max_object_bytes: int
    retention_max_age: float
    retention_max_namespace_bytes: int
    retention_max_cores_per_pod: int
    retention_namespace_limit_max_age: float | None
    retention_namespace_limit_bytes: int | None
    retention_namespace_limit_cores_per_pod: int | None
    retention_interval: float
    retention_full_interval: float
    debris_grace: float
    object_grace: float
    retention_lease_namespace: str
    retention_lease_name: str
    dev: bool
    dev_dir: Path
    log_level: str
    auth: AuthOptions

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Config":
        auth = AuthOptions.from_args(args)
        auth_names = {f.name for f in dataclasses.fields(AuthOptions)}
        values = {k: v for k, v in vars(args).items() if k not in auth_names}
        unknown = values.keys() - {f.name for f in dataclasses.fields(cls)}
        if unknown:  # a flag added to a parser without its Config field: a programming error, caught by the tests
            raise TypeError(f"flags without a Config field: {sorted(unknown)}")
        return cls(**values, auth=auth)

    def complete(self, dev_files: DevFiles | None) -> "Config":
        """The configuration the server runs with: in dev mode, on 127.0.0.1 with the dev files."""
        if dev_files is None:
            return self
        return dataclasses.replace(
            self,
            bind_address="127.0.0.1",
            tls_cert_file=dev_files.serving_cert,
            tls_private_key_file=dev_files.serving_key,
            storage_root=dev_files.cores,
        )


def parse(argv: list[str] | None = None) -> Config:
    """Options → validate → Config: ``--help`` and bad flags exit here (argparse, exit 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(args, parser)
    return Config.from_args(args)
