"""
Assembling and running the server: the aiohttp application with its routes and middleware chain
(Status errors → authenticate/authorize → handler), the object store, TLS, and a graceful shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from apiserver import devmode, metrics
from apiserver.api import openapi, openapi_proto
from apiserver.api import resource as r
from apiserver.auth.options import AuthConfigError, AuthSetup, DevAuth, build_auth
from apiserver.auth.static import dev_rules
from apiserver.context import REGISTRY, SHUTTING_DOWN, STORAGE_ROOT
from apiserver.dump.options import OBJECT_LIMITS, object_limits
from apiserver.handlers import devreviews, dump, endpoints, meta
from apiserver.handlers.io import BODY_LIMIT_KEY
from apiserver.limits import ConnectionLimits, Middleware, inflight_limit
from apiserver.options import Config
from apiserver.middleware import observe_requests, status_errors
from apiserver.retention import setup as retention_setup
from apiserver.registry.coredata import CoreData
from apiserver.registry.autocreate import AutoCreator
from apiserver.registry.cacher import WatchCache
from apiserver.registry.changedetect import ChangeDetector
from apiserver.registry.endpoints import KEY_ROOT, EndpointRegistry, key_of
from apiserver.registry.eventwatch import EventWatch, PendingIncarnations
from apiserver.registry.store import ObjectStore, StoreUnavailable

logger = logging.getLogger(__name__)

GV = f"/apis/{r.GROUP}/{r.VERSION}"
SHUTDOWN_TIMEOUT = 5.0


def add_routes(app: web.Application) -> None:
    collection = f"{GV}/namespaces/{{namespace}}/{r.PLURAL}"
    item = f"{collection}/{{name}}"
    router = app.router
    router.add_get("/apis", meta.apis)
    router.add_get("/apis/", meta.apis)
    router.add_get(f"/apis/{r.GROUP}", meta.api_group)
    router.add_get(f"/apis/{r.GROUP}/", meta.api_group)
    router.add_get(GV, meta.api_resources)
    router.add_get(f"{GV}/", meta.api_resources)
    router.add_get("/openapi/v2", meta.openapi_v2)
    router.add_get("/openapi/v3", meta.openapi_v3_root)
    router.add_get(f"/openapi/v3/apis/{r.GROUP}/{r.VERSION}", meta.openapi_v3_group_version)
    router.add_get("/version", meta.version)
    for path, handler in (("/healthz", meta.healthz), ("/livez", meta.livez), ("/readyz", meta.readyz)):
        router.add_get(path, handler)
        router.add_get(path + "/{check:.*}", handler)
    router.add_get(f"{GV}/{r.PLURAL}", endpoints.list_endpoints)
    router.add_get(collection, endpoints.list_endpoints)
    router.add_post(collection, endpoints.create_endpoint)
    router.add_delete(collection, endpoints.delete_endpoints)
    router.add_get(item, endpoints.get_endpoint)
    router.add_put(item, endpoints.replace_endpoint)
    router.add_patch(item, endpoints.patch_endpoint)
    router.add_delete(item, endpoints.delete_endpoint)
    router.add_get(f"{item}/{r.SUBRESOURCE_DUMP}", dump.get_dump)
    add_status_routes(app, item=item)


def add_status_routes(app: web.Application, *, item: str) -> None:
    """The ``status`` subresource: readable; a client's write re-reads the status from storage (the server's)."""
    app.router.add_get(f"{item}/status", endpoints.get_endpoint_status)
    app.router.add_put(f"{item}/status", endpoints.write_endpoint_status)
    app.router.add_patch(f"{item}/status", endpoints.write_endpoint_status)


def status_tasks(
    config: Config, *, registry: EndpointRegistry, coredata: CoreData, storage_root: Path
) -> list[asyncio.Task[None]]:
    """
    Endpoints and stored status kept in step with storage (:mod:`apiserver.registry.autocreate`): the slow
    full pass every ``--status-resync-interval``, and the notification path: the agent's CoreDumped Events
    in a cluster (:mod:`apiserver.registry.eventwatch`), the storage change detector in dev mode
    (:mod:`apiserver.registry.changedetect`).
    """
    creator = AutoCreator(
        root=storage_root, registry=registry, status_cache=coredata.status_cache, create=config.auto_create_endpoints
    )
    coredata.on_purge(creator.forget)
    tasks = [asyncio.create_task(creator.run(interval=config.status_resync_interval), name="status-full-pass")]
    if config.dev:
        detector = ChangeDetector(root=storage_root, on_change=creator.changed)
        tasks.append(asyncio.create_task(detector.run(), name="storage-changes"))
    if coredata.pods.api_client is not None:  # in a cluster, or dev mode given a --kubeconfig
        pending = PendingIncarnations(handler=creator.changed)
        events = EventWatch(api=coredata.pods.api_client, pending=pending)
        tasks += [
            asyncio.create_task(pending.run(), name="core-notifications"),
            asyncio.create_task(events.run(), name="coredumped-events"),
        ]
    elif not config.dev:
        logger.warning(
            "no cluster access: new cores reach watchers at the next full pass (--status-resync-interval %.0f s)",
            config.status_resync_interval,
        )
    return tasks


def encode_documents() -> None:
    """Encode OpenAPI once before serving: a schema the encoders cannot express stops startup, not a request."""
    openapi.encoded_v2()
    openapi.encoded_v3()
    openapi_proto.encoded_v2()


def add_observability_routes(app: web.Application) -> None:
    """``GET /metrics`` (Prometheus text format; authorized like any non-resource path)."""
    app.router.add_get("/metrics", metrics.serve_metrics)


def limit_middlewares(
    *, connections: ConnectionLimits | None, max_requests_inflight: int, max_mutating_requests_inflight: int
) -> list[Middleware]:
    """Outermost first: the header watchdog stands down, the request is observed, then the in-flight cap."""
    outer: list[Middleware] = [connections.middleware] if connections is not None else []
    return [
        *outer,
        observe_requests,
        inflight_limit(max_readonly=max_requests_inflight, max_mutating=max_mutating_requests_inflight),
    ]


def build_app(
    *,
    registry: EndpointRegistry,
    storage_root: Path,
    auth_middleware: Callable[..., Awaitable[web.StreamResponse]],
    max_body_bytes: int,
    outer_middlewares: list[Middleware] | None = None,
) -> web.Application:
    encode_documents()
    # Bodies are read through handlers.io with our own limit and Status; aiohttp's limit only backs it up.
    app = web.Application(
        middlewares=[*(outer_middlewares or []), status_errors, auth_middleware], client_max_size=max_body_bytes + 1
    )
    app[REGISTRY] = registry
    app[STORAGE_ROOT] = storage_root
    app[BODY_LIMIT_KEY] = max_body_bytes
    app[SHUTTING_DOWN] = asyncio.Event()

    async def announce_shutdown(app: web.Application) -> None:
        app[SHUTTING_DOWN].set()

    app.on_shutdown.append(announce_shutdown)
    add_routes(app)
    add_observability_routes(app)
    return app


def make_store(config: Config) -> ObjectStore:
    if config.etcd_servers:
        from apiserver.registry.etcd import EtcdStore

        return EtcdStore(
            endpoints=list(config.etcd_servers),
            prefix=config.etcd_prefix,
            ca_file=config.etcd_cafile,
            cert_file=config.etcd_certfile,
            key_file=config.etcd_keyfile,
        )
    from apiserver.registry.memory import MemoryStore

    logger.warning("no --etcd-servers: CoredumpEndpoint objects live in memory and are lost on restart")
    return MemoryStore()


def watch_cache(config: Config, *, store: ObjectStore) -> WatchCache:
    """The watch cache in front of ``store`` (see :mod:`apiserver.registry.cacher`); started by the caller."""
    return WatchCache(
        store=store,
        prefix=KEY_ROOT,
        key_of=key_of,
        capacity=config.watch_cache_size,
        bookmark_interval=config.watch_bookmark_interval,
    )


def instrumented(store: ObjectStore) -> ObjectStore:
    """The store with every call timed for ``/metrics`` (``etcd_request_duration_seconds``)."""
    return metrics.InstrumentedStore(store)


async def start_listener(
    *, runner: web.AppRunner, sock: socket.socket, context: ssl.SSLContext, connections: ConnectionLimits
) -> asyncio.base_events.Server:
    """Serve ``runner`` on ``sock`` through the connection limits (what ``web.SockSite`` does, plus the guard).

    The TLS handshake is bounded by the header timeout, as Go's http.Server bounds it by ReadHeaderTimeout.
    """
    loop = asyncio.get_running_loop()
    assert runner.server is not None
    return await loop.create_server(
        connections.factory(runner.server),
        sock=sock,
        ssl=context,
        ssl_handshake_timeout=connections.read_header_timeout,
    )


def serving_context(*, cert: Path, key: Path, auth: AuthSetup) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    auth.configure_ssl(context)
    return context


def _file_identity(*paths: Path) -> tuple[tuple[int, int, int], ...]:
    identity = []
    for path in paths:
        stat = path.stat()
        identity.append((stat.st_ino, stat.st_mtime_ns, stat.st_size))
    return tuple(identity)


async def reload_serving_certificate(
    *,
    context: ssl.SSLContext,
    cert: Path,
    key: Path,
    interval: float,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """
    Load the serving certificate again whenever its files change, as kube-apiserver's dynamic serving
    certificate does: cert-manager and kubelet-projected Secrets renew the files in place, and new TLS
    handshakes must present the new certificate without a restart. A broken pair keeps the old one.
    ``sleep`` is the clock (tests move a fake one).
    """
    seen = await asyncio.to_thread(_file_identity, cert, key)
    while True:
        await sleep(interval)
        try:
            current = await asyncio.to_thread(_file_identity, cert, key)
            if current == seen:
                continue
            await asyncio.to_thread(context.load_cert_chain, certfile=str(cert), keyfile=str(key))
        except (OSError, ssl.SSLError) as error:
            logger.warning(
                "serving certificate not reloaded, keeping the current one",
                extra={"cert": str(cert), "error": str(error)},
            )
            continue
        seen = current
        logger.info("serving certificate reloaded", extra={"cert": str(cert)})


def _listen(host: str, port: int) -> socket.socket:
    """Bind before anything else, so port 0 resolves to a real port the dev kubeconfig can name."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class StartupError(Exception):
    """A problem that stops the server before it serves: printed as one line, exit code 1."""


async def serve(config: Config, *, stop: asyncio.Event) -> None:
    host = "127.0.0.1" if config.dev else config.bind_address
    try:
        sock = _listen(host, config.secure_port)
    except OSError as error:
        raise StartupError(f"cannot listen on {host}:{config.secure_port}: {error.strerror}") from None
    port = sock.getsockname()[1]

    dev_files = None
    if config.dev:
        dev_files = await asyncio.to_thread(
            devmode.prepare, directory=config.dev_dir, port=port, storage_root=config.storage_root
        )
    config = config.complete(dev_files)
    # options.validate made these required outside dev mode; complete() filled them in dev mode.
    assert config.tls_cert_file and config.tls_private_key_file and config.storage_root
    cert, key, storage_root = config.tls_cert_file, config.tls_private_key_file, config.storage_root

    store = instrumented(make_store(config))
    try:
        await store.start()
    except StoreUnavailable as error:
        raise StartupError(f"object storage unavailable: {error}") from None
    coredata = CoreData(
        storage_root=storage_root,
        kubeconfig=str(config.kubeconfig) if config.kubeconfig else None,
        in_cluster=not config.dev and config.kubeconfig is None,
    )
    cache = watch_cache(config, store=store)
    try:
        await cache.start()
    except StoreUnavailable as error:
        await store.close()
        raise StartupError(f"object storage unavailable: {error}") from None
    auth: AuthSetup | None = None
    runner: web.AppRunner | None = None
    listener: asyncio.base_events.Server | None = None
    background: list[asyncio.Task[None]] = []
    try:
        await coredata.start()
        registry = EndpointRegistry(store=store, coredata=coredata, cache=cache)
        background.append(asyncio.create_task(cache.run(), name="watch-cache"))
        dev_auth = DevAuth(client_ca_file=dev_files.ca_cert, rules=dev_rules()) if dev_files else None
        try:
            auth = await build_auth(options=config.auth, dev=dev_auth)
        except AuthConfigError as error:
            raise StartupError(f"authentication setup failed: {error}") from None
        try:
            context = serving_context(cert=cert, key=key, auth=auth)
        except (OSError, ssl.SSLError) as error:
            raise StartupError(f"cannot load the serving certificate {cert}: {error}") from None
        connections = ConnectionLimits(
            max_connections=config.max_connections, read_header_timeout=config.read_header_timeout
        )
        app = build_app(
            registry=registry,
            storage_root=storage_root,
            auth_middleware=auth.middleware,
            max_body_bytes=config.max_request_body_bytes,
            outer_middlewares=limit_middlewares(
                connections=connections,
                max_requests_inflight=config.max_requests_inflight,
                max_mutating_requests_inflight=config.max_mutating_requests_inflight,
            ),
        )
        if dev_auth is not None:
            devreviews.add_routes(app, rules=dev_auth.rules)
        app[OBJECT_LIMITS] = object_limits(config)
        # keepalive_timeout: aiohttp closes a connection idle between requests after --idle-timeout.
        runner = web.AppRunner(
            app,
            access_log=None,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            handle_signals=False,
            keepalive_timeout=config.idle_timeout,
        )
        await runner.setup()
        listener = await start_listener(runner=runner, sock=sock, context=context, connections=connections)
        background.append(
            asyncio.create_task(
                reload_serving_certificate(
                    context=context, cert=cert, key=key, interval=config.tls_cert_reload_interval
                ),
                name="cert-reload",
            )
        )
        if retention_setup.enabled(config):
            background.append(
                asyncio.create_task(
                    retention_setup.run(config, storage_root=storage_root, registry=registry, dev=config.dev),
                    name="retention",
                )
            )
        background += status_tasks(config, registry=registry, coredata=coredata, storage_root=storage_root)
        logger.info(
            "serving",
            extra={
                "address": f"https://{host}:{port}",
                "storage_root": str(storage_root),
                "store": "etcd" if config.etcd_servers else "memory",
            },
        )
        if dev_files:
            print(devmode.banner(dev_files, port=port), flush=True)
        await stop.wait()
        logger.info("shutting down")
    finally:
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(BaseException):
                await task
        await cache.close()
        if listener is not None:
            listener.close()  # no new connections; the runner ends the open ones
        if runner is not None:
            await runner.cleanup()
        if auth is not None:
            await auth.close()
        await coredata.close()
        await store.close()
        sock.close()


def run(config: Config) -> int:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, stop=stop)

    try:
        asyncio.run(main())
    except StartupError as error:
        print(f"coredump-apiserver: {error}", file=sys.stderr)
        return 1
    return 0
