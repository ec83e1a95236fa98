"""
HTTP(S) to the API server a kubeconfig names, verified the way kubectl verifies it, with blocking sockets.

The plugin is one command at a time, so it needs no event loop: the body is read by ``ssl`` in C straight
into the caller's buffer (bench/plugin_bench.py: the client's CPU for a 354 MiB dump is within 0.1 s of
curl's), and there is no HTTP client library to import. One connection is kept alive between requests (the
endpoint GET and the dump that follows it share it, like kubectl's); one the server closed is replaced once.

TLS, as client-go's ``transport.TLSConfigFor``: the cluster's CA (data or file) when given, else the
system's roots; the name checked (and sent as SNI) is ``tls-server-name`` when given, else the server's
host; ``insecure-skip-tls-verify: true`` turns verification off and is refused together with a CA (as
kubectl refuses it); the client certificate and key, data or file. A certificate the server presents
that does not verify is an error of its own (never retried); any other failure to connect, a reset, a
timeout or a short body is a :class:`ConnectionProblem`, which a download resumes after.

The ``Authorization`` header is never logged nor part of an error message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import os
import ssl
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from urllib.parse import urlencode, urlsplit

from kubectl_coredump.errors import PluginError

CONNECT_TIMEOUT = 30.0
# No byte for this long: the connection is dead (a download resumes; a small read fails).
READ_TIMEOUT = 60.0
USER_AGENT = "kubectl-coredump"


class ConnectionProblem(PluginError):
    """The server could not be reached or the connection broke: a download may retry."""


@dataclasses.dataclass(frozen=True)
class Credentials:
    """Where the API server is and how to trust it and be known to it (what a kubeconfig context says)."""

    server: str
    ca_data: str | None = None  # PEM
    ca_file: str | None = None
    insecure: bool = False
    tls_server_name: str | None = None
    cert_data: bytes | None = None  # PEM
    cert_file: str | None = None
    key_data: bytes | None = None  # PEM
    key_file: str | None = None
    authorization: str | None = dataclasses.field(default=None, repr=False)  # the header's value: a secret


@contextlib.contextmanager
def _pem_path(data: bytes | None, path: str | None) -> Iterator[str | None]:
    """A path ``ssl`` can load: ``path``, or ``data`` in an anonymous memory file (never on disk)."""
    if data is None:
        yield path
        return
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("kubectl-coredump-pem")
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="kubectl-coredump-") as directory:  # 0700
        file = os.path.join(directory, "pem")
        with open(os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
            handle.write(data)
        yield file


def tls_context(credentials: Credentials) -> ssl.SSLContext:
    """The ``SSLContext`` kubectl's rules give for these credentials (raises PluginError when they are unusable)."""
    has_ca = bool(credentials.ca_data or credentials.ca_file)
    if credentials.insecure and has_ca:
        raise PluginError(
            "the kubeconfig's cluster sets both insecure-skip-tls-verify and a certificate-authority; "
            "kubectl refuses that too: remove one of them"
        )
    try:
        if credentials.insecure:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif credentials.ca_data:
            context = ssl.create_default_context(cadata=credentials.ca_data)
        elif credentials.ca_file:
            context = ssl.create_default_context(cafile=credentials.ca_file)
        else:
            context = ssl.create_default_context()
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise PluginError(f"cannot load the certificate-authority of the kubeconfig's cluster: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # client-go's minimum
    if bool(credentials.cert_data or credentials.cert_file) != bool(credentials.key_data or credentials.key_file):
        raise PluginError(
            "the kubeconfig's user has a client certificate without its key (or a key without its "
            "certificate): set both client-certificate and client-key"
        )
    if credentials.cert_data or credentials.cert_file:
        try:
            with (
                _pem_path(credentials.cert_data, credentials.cert_file) as cert,
                _pem_path(credentials.key_data, credentials.key_file) as key,
            ):
                assert cert is not None and key is not None
                context.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise PluginError(f"cannot load the client certificate and key of the kubeconfig's user: {exc}") from None
    return context


class _TLSConnection(http.client.HTTPSConnection):
    """``HTTPSConnection`` checking (and sending as SNI) ``server_name`` instead of the host when given."""

    def __init__(
        self, host: str, port: int | None, *, context: ssl.SSLContext, server_name: str | None, timeout: float
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._server_name = server_name

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(  # type: ignore[attr-defined]
            self.sock,
            server_hostname=self._server_name or self.host,
        )


class Response:
    """A response whose body is read by the caller: :meth:`readinto`, :meth:`read_bounded`; then :meth:`close`."""

    def __init__(self, raw: http.client.HTTPResponse, *, client: "Client") -> None:
        self._raw = raw
        self._client = client
        self.status = raw.status
        self.headers = raw.headers

    @property
    def content_length(self) -> int | None:
        value = (self.headers.get("Content-Length") or "").strip()
        return int(value) if value.isdigit() else None

    def readinto(self, buffer: memoryview) -> int:
        """Up to ``len(buffer)`` bytes of the body; 0 at its end (also when the server ended it short)."""
        try:
            return self._raw.readinto(buffer)
        except TimeoutError as exc:
            raise ConnectionProblem(f"no byte from {self._client.server} in time") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise ConnectionProblem(f"the connection broke ({type(exc).__name__}: {exc})".replace(": )", ")")) from exc

    def read_bounded(self, *, limit: int) -> bytes | None:
        """The whole body, or None when it is longer than ``limit`` bytes."""
        chunks: list[bytes] = []
        size = 0
        buffer = memoryview(bytearray(1 << 16))
        while count := self.readinto(buffer):
            size += count
            if size > limit:
                return None
            chunks.append(bytes(buffer[:count]))
        return b"".join(chunks)

    def close(self) -> None:
        """Done with the body: a fully read one leaves the connection for the next request, else it is dropped."""
        if not self._raw.isclosed():
            self._client.discard()
        self._raw.close()


class Client:
    """Requests to one API server with one set of :class:`Credentials` (use ``with``)."""

    def __init__(self, credentials: Credentials, *, timeout: float | None = None) -> None:
        """``timeout`` (seconds) bounds the connect and each read (default: CONNECT_TIMEOUT, READ_TIMEOUT)."""
        self.credentials = credentials
        self._connect_timeout = timeout or CONNECT_TIMEOUT
        self._read_timeout = timeout or READ_TIMEOUT
        parts = urlsplit(credentials.server if "://" in credentials.server else f"https://{credentials.server}")
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise PluginError(f"the kubeconfig's cluster server {credentials.server!r} is not an http(s) URL")
        self._scheme = parts.scheme
        self._host = parts.hostname
        try:
            self._port = parts.port
        except ValueError:
            raise PluginError(f"the kubeconfig's cluster server {credentials.server!r} has a bad port") from None
        self._prefix = parts.path.rstrip("/")  # a server behind a path (Rancher's /k8s/clusters/ID)
        self._context = tls_context(credentials) if self._scheme == "https" else None
        self._connection: http.client.HTTPConnection | None = None

    @property
    def server(self) -> str:
        return self.credentials.server

    def __enter__(self) -> "Client":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.discard()

    def discard(self) -> None:
        """Close the kept connection (the next request opens a new one)."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _connect(self) -> http.client.HTTPConnection:
        if self._context is not None:
            connection: http.client.HTTPConnection = _TLSConnection(
                self._host,
                self._port,
                context=self._context,
                server_name=self.credentials.tls_server_name,
                timeout=self._connect_timeout,
            )
        else:
            connection = http.client.HTTPConnection(self._host, self._port, timeout=self._connect_timeout)
        try:
            connection.connect()
        except ssl.SSLCertVerificationError as exc:
            connection.close()
            name = self.credentials.tls_server_name or self._host
            raise PluginError(
                f"the TLS certificate of {self.server} does not verify for {name!r} "
                f"({exc.verify_message}); check the certificate-authority (and tls-server-name) of "
                "the kubeconfig's cluster"
            ) from None
        except TimeoutError as exc:
            connection.close()
            raise ConnectionProblem(f"the API server {self.server} did not answer in time") from exc
        except OSError as exc:
            connection.close()
            raise ConnectionProblem(f"cannot reach the API server {self.server}: {exc}") from exc
        return connection

    def get(
        self,
        path: str,
        *,
        query: Sequence[tuple[str, str]] = (),
        headers: Mapping[str, str] | None = None,
        read_timeout: float | None = None,
    ) -> Response:
        """
        ``GET path`` with the user's credentials; the response is returned with its body unread, whatever
        its status (the caller reads it and closes the response).
        """
        target = self._prefix + path + (f"?{urlencode(list(query))}" if query else "")
        request_headers = {
            "Accept": "application/json, */*",
            "User-Agent": USER_AGENT,
            "Accept-Encoding": "identity",
            **(headers or {}),
        }
        if self.credentials.authorization:
            request_headers["Authorization"] = self.credentials.authorization
        for attempt in (1, 2):
            if self._connection is not None and self._connection.sock is None:
                self.discard()  # http.client closed it (the server said Connection: close)
            reused = self._connection is not None
            if self._connection is None:
                self._connection = self._connect()
            connection = self._connection
            assert connection.sock is not None
            connection.sock.settimeout(read_timeout or self._read_timeout)
            try:
                connection.request("GET", target, headers=request_headers)
                raw = connection.getresponse()
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected) as exc:
                self.discard()
                if reused and attempt == 1:
                    continue  # the server closed the idle kept connection: once more on a new one
                raise ConnectionProblem(f"the API server {self.server} closed the connection ({exc})") from exc
            except TimeoutError as exc:
                self.discard()
                raise ConnectionProblem(f"the API server {self.server} did not answer in time") from exc
            except (OSError, http.client.HTTPException) as exc:
                self.discard()
                raise ConnectionProblem(f"cannot reach the API server {self.server}: {exc}") from exc
            if raw.will_close:
                self._connection = None  # http.client closes it with the response
            return Response(raw, client=self)
        raise AssertionError("unreachable")
