"""
Command-line flags of ``coredump-apiserver``, named as kube-apiserver and metrics-server name them.
Authentication and authorization flags come from :mod:`apiserver.auth.options`.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from apiserver.auth.options import add_auth_flags, parse_bool, parse_duration
from apiserver.dump.options import add_dump_flags
from apiserver.handlers.io import DEFAULT_MAX_BODY_BYTES
from apiserver.registry.cacher import DEFAULT_BOOKMARK_INTERVAL, DEFAULT_CAPACITY
from apiserver.limits import (DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_MUTATING_REQUESTS_INFLIGHT,
                              DEFAULT_MAX_REQUESTS_INFLIGHT, DEFAULT_READ_HEADER_TIMEOUT)
from apiserver.retention.setup import add_retention_flags

logger = logging.getLogger(__name__)


def _servers(text: str) -> list[str]:
    servers = [s.strip() for s in text.split(",") if s.strip()]
    for server in servers:
        if not server.startswith(("http://", "https://")):
            raise argparse.ArgumentTypeError(f"etcd server {server!r} must be an http:// or https:// URL")
    return servers


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r} (a whole number, 0 for no limit)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative (0 means no limit)")
    return value


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """What one client may cost (:mod:`apiserver.limits`); defaults are kube-apiserver's where it has one."""
    limits = parser.add_argument_group("client limits")
    limits.add_argument("--read-header-timeout", type=parse_duration, default=DEFAULT_READ_HEADER_TIMEOUT,
                        metavar="DURATION",
                        help="close a connection whose TLS handshake or request header takes longer "
                             "(default 32s, kube-apiserver's ReadHeaderTimeout)")
    limits.add_argument("--idle-timeout", type=parse_duration, default=DEFAULT_IDLE_TIMEOUT, metavar="DURATION",
                        help="close a keep-alive connection idle this long between requests "
                             "(default 1m30s, kube-apiserver's IdleTimeout)")
    limits.add_argument("--max-connections", type=_count, default=DEFAULT_MAX_CONNECTIONS,
                        help="client connections open at once; more are closed after their handshake "
                             "(default 1000, 0: no limit)")
    limits.add_argument("--max-requests-inflight", type=_count, default=DEFAULT_MAX_REQUESTS_INFLIGHT,
                        help="read-only requests served at once, watches and dumps not counted; more get 429 "
                             "(default 400, 0: no limit)")
    limits.add_argument("--max-mutating-requests-inflight", type=_count,
                        default=DEFAULT_MAX_MUTATING_REQUESTS_INFLIGHT,
                        help="create/update/patch/delete requests served at once; more get 429 "
                             "(default 200, 0: no limit)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coredump-apiserver",
        description="Aggregated Kubernetes API server for coredump.example.io: CoredumpEndpoint objects and "
                    "the dump subresource that streams a pod's core dumps.")
    serving = parser.add_argument_group("serving")
    serving.add_argument("--secure-port", type=int, default=6443, help="HTTPS port (default 6443; 0 picks one)")
    serving.add_argument("--bind-address", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    serving.add_argument("--tls-cert-file", type=Path, help="serving certificate (PEM)")
    serving.add_argument("--tls-private-key-file", type=Path, help="serving private key (PEM)")
    serving.add_argument("--tls-cert-reload-interval", type=parse_duration, default=60.0, metavar="DURATION",
                         help="how often the certificate files are checked for renewal (default 1m)")
    serving.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                         help="largest accepted request body (default 3 MiB, like kube-apiserver)")

    add_limit_flags(parser)

    storage = parser.add_argument_group("object storage")
    storage.add_argument("--etcd-servers", type=_servers, default=[],
                         help="comma-separated etcd URLs; without it objects live in memory (dev and tests only)")
    storage.add_argument("--etcd-prefix", default="/registry/coredump.example.io", help="key prefix in etcd")
    storage.add_argument("--etcd-cafile", type=Path, help="CA bundle to verify etcd's serving certificate")
    storage.add_argument("--etcd-certfile", type=Path, help="client certificate for etcd")
    storage.add_argument("--etcd-keyfile", type=Path, help="client key for etcd")
    storage.add_argument("--watch-cache-size", type=int, default=DEFAULT_CAPACITY, metavar="EVENTS",
                         help="changes the watch cache keeps: how old a resourceVersion a watch may resume from, "
                              "and how far a watcher may fall behind before its watch is closed (default 1000)")
    storage.add_argument("--watch-bookmark-interval", type=parse_duration, default=DEFAULT_BOOKMARK_INTERVAL,
                         metavar="DURATION",
                         help="how often a watch with allowWatchBookmarks gets a BOOKMARK (default 1m)")

    cores = parser.add_argument_group("core storage")
    cores.add_argument("--storage-root", type=Path, help="root of the shared core storage (NFS/CephFS mount)")
    cores.add_argument("--auto-create-endpoints", type=parse_bool, nargs="?", const=True, default=True,
                       help="create a CoredumpEndpoint for every pod that has cores but no endpoint (default true)")
    cores.add_argument("--kubeconfig", type=Path,
                       help="kubeconfig for reading pods (default: in-cluster configuration when available)")
    cores.add_argument("--status-resync-interval", type=float, default=600.0, metavar="SECONDS",
                       help="seconds between full passes (one storage walk: endpoints auto-created, every "
                            "status reconciled), which catch any change no notification reported (default 600)")

    add_auth_flags(parser)
    add_retention_flags(parser)
    add_dump_flags(parser)

    dev = parser.add_argument_group("development")
    dev.add_argument("--dev", action="store_true",
                     help="serve on 127.0.0.1 with self-signed TLS, dev client certificates and a kubeconfig in "
                          "--dev-dir; cores from DIR/cores unless --storage-root is given")
    dev.add_argument("--dev-dir", type=Path, default=Path(".dev"), help="directory for dev mode files (default .dev)")

    logs = parser.add_argument_group("logging")
    logs.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Flag combinations that cannot work end the program with one clear line (argparse's error)."""
    if not args.dev:
        if not args.tls_cert_file or not args.tls_private_key_file:
            parser.error("--tls-cert-file and --tls-private-key-file are required (or use --dev)")
        if args.storage_root is None:
            parser.error("--storage-root is required (or use --dev)")
    if not 0 <= args.secure_port <= 65535:
        parser.error(f"--secure-port {args.secure_port} is not a port number")
    if args.status_resync_interval <= 0:
        parser.error("--status-resync-interval must be positive")
    if args.watch_cache_size < 1:
        parser.error("--watch-cache-size must be at least 1")
    if args.watch_bookmark_interval <= 0:
        parser.error("--watch-bookmark-interval must be positive")
    if args.tls_cert_reload_interval <= 0:
        parser.error("--tls-cert-reload-interval must be positive")
    for flag in ("read_header_timeout", "idle_timeout"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    if bool(args.etcd_certfile) != bool(args.etcd_keyfile):
        parser.error("--etcd-certfile and --etcd-keyfile go together")
