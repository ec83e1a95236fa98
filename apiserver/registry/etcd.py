"""
The etcd v3 object store, through aetcd's gRPC bindings.

aetcd's ``Client`` cannot do everything this store needs (a range with ``limit`` and ``revision``,
the header revision of a transaction, TLS, several endpoints), so this module drives the etcd API
with aetcd's generated stubs and messages (``aetcd.rpc``) on a ``grpc.aio`` channel of its own.
The semantics are the ones kube-apiserver's etcd3 storage has:

- a value is the JSON of the object without ``metadata.resourceVersion``; the resourceVersion is
  set from the key's mod revision on every read;
- create, update and delete are transactions comparing the key's create/mod revision or version,
  so that a conflict or a missing key is decided by etcd, atomically;
- watch = etcd watch from ``from_revision + 1`` with ``prev_kv`` (a DELETED event carries the last
  object); a compacted start revision raises :class:`RevisionCompacted`;
- any failure to reach etcd within a deadline raises :class:`StoreUnavailable`, never a hang.

Several endpoints (``--etcd-servers`` is comma-separated) are tried in turn: a request that cannot
reach one endpoint moves on to the next, and later requests stay on the one that answered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import urllib.parse
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import grpc
from aetcd import rpc
from aetcd.utils import prefix_range_end

from apiserver.registry.store import (
    EventType,
    KeyExists,
    KeyNotFound,
    ListPage,
    ObjectStore,
    ProgressRequests,
    RevisionCompacted,
    RevisionConflict,
    StoreError,
    StoreEvent,
    StoreUnavailable,
    check_key,
    check_prefix,
    encode_object,
    with_revision,
)

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "/registry/coredump.example.io"

_CHANNEL_OPTIONS = [
    # A list of many objects is one response; gRPC's default 4 MiB cap would break it.
    ("grpc.max_receive_message_length", 512 * 1024 * 1024),
    # Come back quickly after an etcd restart instead of gRPC's default backoff of up to 2 minutes.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # Notice a dead etcd under an idle watch (etcd's default enforcement allows pings every 5 s).
    ("grpc.keepalive_time_ms", 30000),
    ("grpc.keepalive_timeout_ms", 10000),
    ("grpc.keepalive_permit_without_calls", 1),
]

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def parse_endpoints(values: str | Iterable[str]) -> list[str]:
    """``--etcd-servers`` values (each may be comma-separated) as a flat list of URLs."""
    if isinstance(values, str):
        values = [values]
    endpoints = [part.strip() for value in values for part in value.split(",") if part.strip()]
    if not endpoints:
        raise ValueError("no etcd endpoint given")
    return endpoints


async def _watch_requests(
    create: rpc.WatchRequest, ended: asyncio.Event, progress: asyncio.Event | None = None
) -> AsyncIterator[rpc.WatchRequest]:
    """The request side of a watch stream: the create request, then a progress request whenever ``progress``
    is set, until ``ended`` (half-closing the request side early could end the watch)."""
    yield create
    if progress is None:
        await ended.wait()
        return
    ending = asyncio.ensure_future(ended.wait())
    try:
        while not ended.is_set():
            wanted = asyncio.ensure_future(progress.wait())
            try:
                await asyncio.wait({ending, wanted}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                wanted.cancel()
            if progress.is_set() and not ended.is_set():
                progress.clear()
                yield rpc.WatchRequest(progress_request=rpc.WatchProgressRequest())
    finally:
        ending.cancel()


@dataclasses.dataclass(frozen=True)
class _Endpoint:
    url: str
    target: str  # host:port for gRPC
    secure: bool

    @classmethod
    def parse(cls, url: str, *, tls_configured: bool) -> _Endpoint:
        parsed = urllib.parse.urlsplit(url if "://" in url else f"//{url}")
        if parsed.scheme not in ("", "http", "https") or not parsed.hostname:
            raise ValueError(f"etcd endpoint is not an http(s)://host:port URL: {url!r}")
        host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
        port = parsed.port or 2379
        secure = parsed.scheme == "https" or (parsed.scheme == "" and tls_configured)
        return cls(url=url, target=f"{host}:{port}", secure=secure)


@dataclasses.dataclass
class _Connection:
    channel: grpc.aio.Channel
    kv: rpc.KVStub
    watch: rpc.WatchStub


class EtcdStore(ObjectStore):
    """
    :param endpoints: etcd client URLs (``http://host:2379``; ``https://`` for TLS), tried in order.
    :param prefix: root of every key this store writes (``--etcd-prefix``).
    :param ca_file: CA bundle that signs etcd's serving certificate (enables TLS).
    :param cert_file: client certificate for etcd's mutual TLS, with ``key_file``.
    :param dial_timeout: how long :meth:`start` and :meth:`check` wait for etcd to answer.
    :param request_timeout: deadline of every other request.
    """

    def __init__(
        self,
        *,
        endpoints: list[str],
        prefix: str = DEFAULT_PREFIX,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        dial_timeout: float = 3.0,
        request_timeout: float = 10.0,
    ) -> None:
        if bool(cert_file) != bool(key_file):
            raise ValueError("an etcd client certificate needs both cert_file and key_file")
        tls_configured = bool(ca_file or cert_file)
        self._endpoints = [_Endpoint.parse(url, tls_configured=tls_configured) for url in parse_endpoints(endpoints)]
        self._root = prefix.rstrip("/")
        self._ca_file = ca_file
        self._cert_file = cert_file
        self._key_file = key_file
        self._dial_timeout = dial_timeout
        self._request_timeout = request_timeout
        self._credentials: grpc.ChannelCredentials | None = None
        self._connections: dict[_Endpoint, _Connection] = {}
        self._current = 0  # index of the endpoint that answered last
        self._watches: set[grpc.aio.StreamStreamCall] = set()
        self._closed = True

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if any(endpoint.secure for endpoint in self._endpoints):
            self._credentials = await asyncio.to_thread(self._load_credentials)
        self._closed = False
        try:
            await self.check()
        except StoreUnavailable as error:
            await self.close()
            raise StoreUnavailable(f"cannot reach etcd: {error}") from None
        logger.info("using etcd at %s under %s", self._endpoints[self._current].url, self._root)

    def _load_credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | Path | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self._ca_file),
            private_key=read(self._key_file),
            certificate_chain=read(self._cert_file),
        )

    async def close(self) -> None:
        self._closed = True
        for call in list(self._watches):
            call.cancel()
        connections, self._connections = self._connections, {}
        for connection in connections.values():
            await connection.channel.close()

    async def check(self) -> None:
        try:
            await self._range_header(timeout=self._dial_timeout)
        except StoreUnavailable:
            raise
        except StoreError as error:
            # Whatever answers there (a proxy, a server that is not etcd) cannot serve us either.
            raise StoreUnavailable(str(error)) from None

    async def current_revision(self) -> int:
        return await self._range_header(timeout=self._request_timeout)

    async def _range_header(self, *, timeout: float) -> int:
        # A linearizable read: its header carries the newest revision, and it proves a quorum.
        request = rpc.RangeRequest(key=self._etcd_key("/"), count_only=True)
        response = await self._call("kv", "Range", request, timeout=timeout, idempotent=True)
        return response.header.revision

    # -- keys and values ---------------------------------------------------------------------

    def _etcd_key(self, key: str) -> bytes:
        return (self._root + key).encode()

    def _store_key(self, etcd_key: bytes) -> str:
        return etcd_key.decode()[len(self._root) :]

    def _range(self, prefix: str) -> tuple[bytes, bytes]:
        # "" means every key of this store, which all start with "/": never the root's siblings.
        start = self._etcd_key(prefix or "/")
        return start, prefix_range_end(start)

    @staticmethod
    def _decode(value: bytes, revision: int, *, etcd_key: bytes) -> dict[str, Any]:
        try:
            obj = json.loads(value)
        except ValueError:
            raise StoreError(f"etcd key {etcd_key!r} does not hold JSON") from None
        if not isinstance(obj, dict):
            raise StoreError(f"etcd key {etcd_key!r} does not hold a JSON object")
        return with_revision(obj, revision)

    # -- calls -------------------------------------------------------------------------------

    def _connection(self, endpoint: _Endpoint) -> _Connection:
        connection = self._connections.get(endpoint)
        if connection is None:
            if endpoint.secure:
                credentials = self._credentials or grpc.ssl_channel_credentials()
                channel = grpc.aio.secure_channel(endpoint.target, credentials, options=_CHANNEL_OPTIONS)
            else:
                channel = grpc.aio.insecure_channel(endpoint.target, options=_CHANNEL_OPTIONS)
            connection = self._connections[endpoint] = _Connection(
                channel=channel,
                kv=rpc.KVStub(channel),
                watch=rpc.WatchStub(channel),
            )
        return connection

    async def _call(
        self, service: str, method: str, request: Any, *, timeout: float | None = None, idempotent: bool
    ) -> Any:
        """
        One unary call, on the endpoint that answered last, then on the others.

        A write moves on only when the endpoint could not be reached at all (UNAVAILABLE); after a
        deadline it may have been applied, and sending it twice could turn a success into a
        conflict. Reads move on after either.
        """
        if self._closed:
            raise StoreUnavailable("the etcd store is closed")
        failures: list[str] = []
        for _ in range(len(self._endpoints)):
            endpoint = self._endpoints[self._current]
            stub = getattr(self._connection(endpoint), service)
            try:
                return await getattr(stub, method)(request, timeout=timeout or self._request_timeout)
            except grpc.aio.AioRpcError as error:
                code = error.code()
                if code not in _RETRYABLE:
                    raise self._error(endpoint, error, request=request) from None
                failures.append(self._describe(endpoint, error))
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and not idempotent:
                    break
                self._current = (self._current + 1) % len(self._endpoints)
        raise StoreUnavailable("; ".join(failures))

    def _error(self, endpoint: _Endpoint, error: grpc.aio.AioRpcError, *, request: Any) -> StoreError:
        details = error.details() or ""
        if error.code() == grpc.StatusCode.CANCELLED and self._closed:
            return StoreUnavailable("the etcd store is closed")
        if error.code() == grpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
            # etcd does not say what the compact revision is; list() asks for it.
            return RevisionCompacted(requested=getattr(request, "revision", 0), compacted=0)
        return StoreError(f"etcd {endpoint.url}: {details}")

    @staticmethod
    def _describe(endpoint: _Endpoint, error: grpc.aio.AioRpcError) -> str:
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"etcd {endpoint.url}: no answer within the deadline"
        return f"etcd {endpoint.url}: {error.details()}"

    async def _txn(
        self, *, compare: list[rpc.Compare], success: list[rpc.RequestOp], failure: list[rpc.RequestOp]
    ) -> rpc.TxnResponse:
        request = rpc.TxnRequest(compare=compare, success=success, failure=failure)
        return await self._call("kv", "Txn", request, idempotent=False)

    # -- reads -------------------------------------------------------------------------------

    async def get(self, key: str) -> dict[str, Any]:
        check_key(key)
        etcd_key = self._etcd_key(key)
        response = await self._call("kv", "Range", rpc.RangeRequest(key=etcd_key), idempotent=True)
        if not response.kvs:
            raise KeyNotFound(key)
        kv = response.kvs[0]
        return self._decode(kv.value, kv.mod_revision, etcd_key=kv.key)

    async def list(
        self,
        prefix: str,
        *,
        limit: int | None = None,
        start_after: str | None = None,
        revision: int | None = None,
    ) -> ListPage:
        check_prefix(prefix)
        start, end = self._range(prefix)
        if start_after is not None:
            # The smallest key after start_after: etcd ranges are [key, range_end).
            start = max(start, self._etcd_key(start_after) + b"\x00")
        request = rpc.RangeRequest(key=start, range_end=end, limit=limit or 0, revision=revision or 0)
        try:
            response = await self._call("kv", "Range", request, idempotent=True)
        except RevisionCompacted as error:
            raise RevisionCompacted(
                requested=error.requested, compacted=await self._compacted_revision(error.requested)
            ) from None
        items = [self._decode(kv.value, kv.mod_revision, etcd_key=kv.key) for kv in response.kvs]
        continue_key = self._store_key(response.kvs[-1].key) if response.more and response.kvs else None
        return ListPage(items=items, revision=revision or response.header.revision, continue_key=continue_key)

    async def _compacted_revision(self, requested: int) -> int:
        """
        etcd's compact revision, which only a watch reports: watching from below it is answered
        with ``compact_revision``. The watched key is one no object can have, so no event comes.
        """
        create = rpc.WatchRequest(
            create_request=rpc.WatchCreateRequest(
                key=self._etcd_key("/\x00compaction-probe"), start_revision=max(requested, 1)
            )
        )
        ended = asyncio.Event()
        call = self._connection(self._endpoints[self._current]).watch.Watch(_watch_requests(create, ended))
        try:
            async with asyncio.timeout(self._dial_timeout):
                async for response in call:
                    if response.compact_revision:
                        return response.compact_revision
        except (TimeoutError, grpc.aio.AioRpcError):
            pass
        finally:
            ended.set()
            call.cancel()
        return 0

    # -- writes ------------------------------------------------------------------------------

    async def create(self, key: str, obj: dict[str, Any]) -> dict[str, Any]:
        check_key(key)
        etcd_key = self._etcd_key(key)
        value = encode_object(obj)
        response = await self._txn(
            compare=[rpc.Compare(key=etcd_key, target=rpc.Compare.CREATE, result=rpc.Compare.EQUAL, create_revision=0)],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=etcd_key, value=value))],
            failure=[],
        )
        if not response.succeeded:
            raise KeyExists(key)
        return self._decode(value, response.header.revision, etcd_key=etcd_key)

    async def _write_existing(
        self, key: str, etcd_key: bytes, write: rpc.RequestOp, *, expected_revision: int | None
    ) -> rpc.TxnResponse:
        """
        ``write`` if the key exists (with mod revision ``expected_revision``, if given), as one
        transaction; else :class:`KeyNotFound` or :class:`RevisionConflict`, from the current value
        the failure branch read.
        """
        if expected_revision is None:
            compare = rpc.Compare(key=etcd_key, target=rpc.Compare.VERSION, result=rpc.Compare.GREATER, version=0)
        else:
            # A missing key has mod revision 0, which no expected revision (>= 1) equals.
            compare = rpc.Compare(
                key=etcd_key, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL, mod_revision=expected_revision
            )
        response = await self._txn(
            compare=[compare], success=[write], failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=etcd_key))]
        )
        if response.succeeded:
            return response
        kvs = response.responses[0].response_range.kvs
        if not kvs:
            raise KeyNotFound(key)
        raise RevisionConflict(current=self._decode(kvs[0].value, kvs[0].mod_revision, etcd_key=kvs[0].key))

    async def update(self, key: str, obj: dict[str, Any], *, expected_revision: int | None) -> dict[str, Any]:
        check_key(key)
        etcd_key = self._etcd_key(key)
        value = encode_object(obj)
        put = rpc.RequestOp(request_put=rpc.PutRequest(key=etcd_key, value=value))
        response = await self._write_existing(key, etcd_key, put, expected_revision=expected_revision)
        return self._decode(value, response.header.revision, etcd_key=etcd_key)

    async def delete(self, key: str, *, expected_revision: int | None = None) -> dict[str, Any]:
        check_key(key)
        etcd_key = self._etcd_key(key)
        delete = rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=etcd_key, prev_kv=True))
        response = await self._write_existing(key, etcd_key, delete, expected_revision=expected_revision)
        prev_kvs = response.responses[0].response_delete_range.prev_kvs
        if not prev_kvs:  # cannot happen under the compare, but never invent an object
            raise KeyNotFound(key)
        return self._decode(prev_kvs[0].value, response.header.revision, etcd_key=etcd_key)

    # -- history -----------------------------------------------------------------------------

    async def compact(self, revision: int) -> None:
        # physical=True returns once the old revisions are gone, so what follows sees them gone.
        request = rpc.CompactionRequest(revision=revision, physical=True)
        try:
            await self._call("kv", "Compact", request, idempotent=True)
        except RevisionCompacted:
            pass  # already compacted at or past it: nothing left to do

    # -- watch -------------------------------------------------------------------------------

    async def watch(
        self, prefix: str, *, from_revision: int, progress: ProgressRequests | None = None
    ) -> AsyncIterator[StoreEvent]:
        check_prefix(prefix)
        if self._closed:
            raise StoreUnavailable("the etcd store is closed")
        start, end = self._range(prefix)
        create = rpc.WatchRequest(
            create_request=rpc.WatchCreateRequest(
                key=start, range_end=end, start_revision=from_revision + 1, prev_kv=True
            )
        )
        ended = asyncio.Event()
        wanted = asyncio.Event() if progress is not None else None
        unsubscribe = progress.subscribe(wanted.set) if progress is not None and wanted is not None else None
        endpoint = self._endpoints[self._current]
        call = self._connection(endpoint).watch.Watch(_watch_requests(create, ended, wanted))
        self._watches.add(call)
        try:
            async for response in call:
                if response.compact_revision:
                    raise RevisionCompacted(requested=from_revision, compacted=response.compact_revision)
                if response.canceled:
                    raise StoreUnavailable(f"etcd {endpoint.url} canceled the watch: {response.cancel_reason}")
                if not response.events and not response.created and progress is not None:
                    # etcd's answer to a progress request: every event up to this revision was sent.
                    yield StoreEvent(type=EventType.PROGRESS, key="", obj={}, revision=response.header.revision)
                for event in response.events:
                    yield self._event(event)
            if not self._closed:
                raise StoreUnavailable(f"etcd {endpoint.url} ended the watch")
        except grpc.aio.AioRpcError as error:
            if self._closed:
                return
            if error.code() in _RETRYABLE:
                self._current = (self._current + 1) % len(self._endpoints)
                raise StoreUnavailable(self._describe(endpoint, error)) from None
            raise self._error(endpoint, error, request=create.create_request) from None
        except asyncio.CancelledError:
            # close() cancels the call, which surfaces here; a cancellation of our task must not
            # be swallowed.
            task = asyncio.current_task()
            if self._closed and call.cancelled() and not (task and task.cancelling()):
                return
            raise
        finally:
            if unsubscribe is not None:
                unsubscribe()
            ended.set()
            call.cancel()
            self._watches.discard(call)

    def _event(self, event: rpc.Event) -> StoreEvent:
        kv = event.kv
        key = self._store_key(kv.key)
        if event.type == rpc.Event.DELETE:
            if event.prev_kv.key:
                obj = self._decode(event.prev_kv.value, kv.mod_revision, etcd_key=kv.key)
            else:  # etcd compacted the previous value away before sending the event
                logger.warning("DELETED event for %s without its last value", key)
                obj = {"metadata": {"resourceVersion": str(kv.mod_revision)}}
            return StoreEvent(type=EventType.DELETED, key=key, obj=obj, revision=kv.mod_revision)
        type_ = EventType.ADDED if kv.create_revision == kv.mod_revision else EventType.MODIFIED
        return StoreEvent(
            type=type_, key=key, obj=self._decode(kv.value, kv.mod_revision, etcd_key=kv.key), revision=kv.mod_revision
        )
