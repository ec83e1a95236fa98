"""
An in-test fake of exactly the kube-apiserver endpoints this project calls, over real TLS on 127.0.0.1.

Endpoints (shapes as the real API server answers them):

- ``GET  /api/v1/namespaces/kube-system/configmaps/extension-apiserver-authentication``
- ``POST /apis/authentication.k8s.io/v1/tokenreviews``
- ``POST /apis/authorization.k8s.io/v1/subjectaccessreviews`` (decided by a rule table, see ``allow``)
- ``GET  /api/v1/namespaces/{ns}/pods/{name}`` (404 ``Status`` when absent)
- ``POST /api/v1/namespaces/{ns}/events`` and ``POST /apis/events.k8s.io/v1/namespaces/{ns}/events`` (recorded)
- ``GET  /api/v1/events`` (core/v1 Events of every namespace, list or watch, with kube-apiserver's Event field
  selectors, resourceVersion resume, ``limit``; ``.compact()`` makes older versions 410 Gone, ``.drop_watches()``
  ends every open watch; ``.list_count["events"]`` counts the LISTs)

Callers authenticate with a bearer token from ``.tokens``; anything else gets a 401 ``Status``.

The ``fake_kube`` fixture (async, function scope) yields a :class:`FakeKube`:

- ``.url``, ``.ca_file`` (the cluster CA: it signed the fake's serving certificate and is the ``client-ca-file``)
- ``.write_kubeconfig(path, *, token=None) -> Path``: a kubeconfig for kubernetes-asyncio, kubectl or our
  server; the default token is ``.server_token`` (the API server's own service account)
- ``.add_token(token, *, user, groups=(), uid="", extra=None)`` and ``.tokens`` (token → :class:`FakeUser`)
- ``.allow(*, verbs, users=(), groups=(), resources=(), namespaces=(), non_resource_urls=())``: add an RBAC-like
  rule to the fake's own small table (:class:`FakeRule`, deliberately not the production rule engine of
  :mod:`apiserver.auth.static`, so a bug there is not mirrored here); ``system:masters`` may do anything,
  every user may get the discovery paths, as in a real cluster
- ``.add_pod(namespace=, name=, uid=None) -> dict`` and ``.delete_pod(namespace=, name=)``
- ``.add_namespace(name, *, labels=None, annotations=None) -> dict`` (served by ``GET /api/v1/namespaces/{name}``)
- ``.add_configmap(namespace=, name=, data=)`` (``GET .../configmaps/{name}``) and ``.leases``: Leases with
  get/create/replace, a stale resourceVersion on replace answered 409 Conflict as the real API does
- ``.events``: every event body posted (as stored, with ``metadata.name`` filled in)
- ``.sar_requests`` / ``.token_reviews``: the bodies received, in order (to test caching)
- ``.sar_failure`` / ``.token_review_failure``: ``None``, ``"unreachable"`` (the connection is dropped) or an
  HTTP status such as 500
- ``.sar_answer`` / ``.token_review_answer`` / ``.configmap_answer``: ``None``, or ``(content_type, body)``
  sent verbatim with 201 (200 for the ConfigMap) instead of the real answer, to try malformed ones
- ``.set_authentication_configmap(*, client_ca=..., requestheader_ca=..., allowed_names=..., ...)``
- ``.client_ca`` / ``.front_proxy_ca`` (:class:`TestCA`) and ``.issue_client_cert(directory, *, cn, orgs=(),
  ca="client")`` → (cert path, key path) for mTLS tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
import json
import logging
import secrets
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any, Literal

import pytest_asyncio
import yaml
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from apiserver.auth import AUTHENTICATED_GROUP

logger = logging.getLogger(__name__)

__all__ = ["FakeKube", "FakeUser", "TestCA", "fake_kube"]

AUTH_CONFIGMAP_PATH = "/api/v1/namespaces/kube-system/configmaps/extension-apiserver-authentication"
Failure = Literal["unreachable"] | int | None


# --- certificates -------------------------------------------------------------------------------------------

# kube-apiserver's default --api-audiences: its --service-account-issuer.
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class TestCA:
    """A CA that issues serving and client certificates into a directory (EC P-256: fast to generate)."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, *, name: str) -> None:
        self.directory = directory
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
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
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM).decode()
        self.cert_file = directory / f"{name}.crt"
        self.cert_file.write_text(self.pem)

    def issue(
        self,
        *,
        cn: str,
        orgs: Iterable[str] = (),
        server: bool = False,
        directory: Path | None = None,
        stem: str | None = None,
    ) -> tuple[Path, Path]:
        """Write ``<stem>.crt``/``<stem>.key`` signed by this CA; a server certificate is valid for 127.0.0.1."""
        key = ec.generate_private_key(ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in orgs]
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        directory = directory or self.directory
        stem = stem or f"{self.name}-{cn.replace(':', '_')}-{secrets.token_hex(3)}"
        cert_file, key_file = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(_pem_key(key))
        key_file.chmod(0o600)
        return cert_file, key_file


# --- the fake -----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FakeUser:
    name: str
    groups: tuple[str, ...] = ()
    uid: str = ""
    extra: dict[str, list[str]] = dataclasses.field(default_factory=dict)


def _status(code: int, reason: str, message: str, **details: Any) -> web.Response:
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return web.json_response(body, status=code)


def _timestamp() -> str:
    return _now().strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass(frozen=True)
class FakeRule:
    """
    One row of the fake's access table, read as RBAC reads a rule (a few lines, on purpose independent of the
    server's own matcher): the subject is one of ``users`` or in one of ``groups``; ``verbs`` and ``resources``
    are exact or ``*``, a resource is ``plural`` or ``plural/subresource`` (``plural/*`` any subresource);
    ``namespaces`` empty means all; a non-resource URL is exact, or a prefix when it ends in ``*``.
    """

    verbs: tuple[str, ...]
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    resources: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    non_resource_urls: tuple[str, ...] = ()

    def allows(
        self, *, user: str, groups: Iterable[str], resource: dict[str, Any] | None, non_resource: dict[str, Any] | None
    ) -> bool:
        if user not in self.users and not set(groups) & set(self.groups):
            return False
        attributes = resource or non_resource or {}
        if "*" not in self.verbs and attributes.get("verb") not in self.verbs:
            return False
        if resource is None:
            path = str(attributes.get("path", ""))
            return any(
                path == url or (url.endswith("*") and path.startswith(url[:-1])) for url in self.non_resource_urls
            )
        if self.namespaces and resource.get("namespace", "") not in self.namespaces:
            return False
        plural, sub = resource.get("resource", ""), resource.get("subresource", "")
        wanted = f"{plural}/{sub}" if sub else plural
        return any(pattern in ("*", wanted) or (sub and pattern == f"{plural}/*") for pattern in self.resources)


class FakeKube:
    """The fake's state and its aiohttp application; start it with :meth:`start` (the fixture does)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.client_ca = TestCA(directory, name="cluster-ca")
        self.front_proxy_ca = TestCA(directory, name="front-proxy-ca")
        self.ca_file = self.client_ca.cert_file
        self._serving_cert, self._serving_key = self.client_ca.issue(
            cn="kube-apiserver", server=True, stem="fake-kube-serving"
        )
        self.front_proxy_cert, self.front_proxy_key = self.front_proxy_ca.issue(
            cn="front-proxy-client", stem="front-proxy-client"
        )
        self.server_token = "apiserver-" + secrets.token_hex(8)
        self.tokens: dict[str, FakeUser] = {
            self.server_token: FakeUser(
                name="system:serviceaccount:coredump:apiserver",
                groups=("system:serviceaccounts", "system:serviceaccounts:coredump"),
            ),
        }
        self.rules: list[FakeRule] = [
            FakeRule(verbs=("*",), groups=("system:masters",), resources=("*",), non_resource_urls=("*",)),
            # system:discovery and system:public-info-viewer
            FakeRule(
                verbs=("get",),
                groups=(AUTHENTICATED_GROUP, "system:unauthenticated"),
                non_resource_urls=(
                    "/api",
                    "/api/*",
                    "/apis",
                    "/apis/*",
                    "/openapi",
                    "/openapi/*",
                    "/version",
                    "/version/",
                    "/healthz",
                    "/livez",
                    "/readyz",
                ),
            ),
        ]
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.namespaces: dict[str, dict[str, Any]] = {}
        self.leases: dict[tuple[str, str], dict[str, Any]] = {}
        self.configmaps: dict[tuple[str, str], dict[str, Any]] = {}
        # (resourceVersion, collection, type, object) of every change, for watches that resume from a version.
        self.changes: list[tuple[int, str, str, dict[str, Any]]] = []
        self._changed: asyncio.Condition | None = None
        self.list_requests: list[str] = []
        self.list_count: dict[str, int] = {}  # LISTs (not watches) per collection
        self.compacted = 0  # watches from before this resourceVersion get 410 (see compact())
        self.watch_generation = 0  # bumped by drop_watches()
        self.events: list[dict[str, Any]] = []
        self.sar_requests: list[dict[str, Any]] = []
        self.token_reviews: list[dict[str, Any]] = []
        self.sar_failure: Failure = None
        self.token_review_failure: Failure = None
        self.sar_answer: tuple[str, bytes] | None = None
        self.token_review_answer: tuple[str, bytes] | None = None
        self.configmap_answer: tuple[str, bytes] | None = None
        self.configmap_reads = 0
        self._resource_version = 1000
        self.auth_configmap: dict[str, str] = {}
        self.set_authentication_configmap()
        self.url = ""
        self._runner: web.AppRunner | None = None

    # -- configuration used by tests --

    def add_token(
        self,
        token: str,
        *,
        user: str,
        groups: Iterable[str] = (),
        uid: str = "",
        extra: dict[str, list[str]] | None = None,
    ) -> str:
        self.tokens[token] = FakeUser(name=user, groups=tuple(groups), uid=uid, extra=dict(extra or {}))
        return token

    def allow(
        self,
        *,
        verbs: Iterable[str],
        users: Iterable[str] = (),
        groups: Iterable[str] = (),
        resources: Iterable[str] = (),
        namespaces: Iterable[str] = (),
        non_resource_urls: Iterable[str] = (),
    ) -> FakeRule:
        added = FakeRule(
            verbs=tuple(verbs),
            users=tuple(users),
            groups=tuple(groups),
            resources=tuple(resources),
            namespaces=tuple(namespaces),
            non_resource_urls=tuple(non_resource_urls),
        )
        self.rules.append(added)
        return added

    def add_pod(
        self,
        *,
        namespace: str,
        name: str,
        uid: str | None = None,
        containers: Iterable[str] = ("app",),
        node_name: str = "node-1",
        labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
        owner_references: list[dict[str, Any]] | None = None,
        container_statuses: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "name": name,
            "namespace": namespace,
            "uid": uid or str(uuid.uuid4()),
            "resourceVersion": self._next_rv(),
            "creationTimestamp": _timestamp(),
        }
        for key, value in (("labels", labels), ("annotations", annotations), ("ownerReferences", owner_references)):
            if value:
                metadata[key] = value
        pod = {
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": metadata,
            "spec": {"nodeName": node_name, "containers": [{"name": c, "image": f"example/{c}:1"} for c in containers]},
            "status": {"phase": "Running", **({"containerStatuses": container_statuses} if container_statuses else {})},
        }
        kind = "MODIFIED" if (namespace, name) in self.pods else "ADDED"
        self.pods[(namespace, name)] = pod
        self._record("pods", kind, pod)
        return pod

    def delete_pod(self, *, namespace: str, name: str) -> None:
        pod = self.pods.pop((namespace, name), None)
        if pod is not None:
            gone = json.loads(json.dumps(pod))
            gone["metadata"]["resourceVersion"] = self._next_rv()
            self._record("pods", "DELETED", gone)

    def set_namespace(self, name: str, *, annotations: dict[str, str] | None = None) -> dict[str, Any]:
        kind = "MODIFIED" if name in self.namespaces else "ADDED"
        ns = {
            "kind": "Namespace",
            "apiVersion": "v1",
            "metadata": {
                "name": name,
                "uid": str(uuid.uuid4()),
                "resourceVersion": self._next_rv(),
                **({"annotations": annotations} if annotations else {}),
            },
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        }
        self.namespaces[name] = ns
        self._record("namespaces", kind, ns)
        return ns

    def _record(self, collection: str, kind: str, obj: dict[str, Any]) -> None:
        self.changes.append((int(obj["metadata"]["resourceVersion"]), collection, kind, obj))
        self._notify()

    def _notify(self) -> None:
        if self._changed is not None:
            cond = self._changed

            async def wake() -> None:
                async with cond:
                    cond.notify_all()

            try:
                asyncio.get_running_loop().create_task(wake())
            except RuntimeError:
                pass

    def add_namespace(
        self, name: str, *, labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """A Namespace as kube-apiserver returns it (with the ``kubernetes.io/metadata.name`` label it adds)."""
        ns = {
            "kind": "Namespace",
            "apiVersion": "v1",
            "metadata": {
                "name": name,
                "uid": str(uuid.uuid4()),
                "resourceVersion": self._next_rv(),
                "creationTimestamp": _timestamp(),
                "labels": {"kubernetes.io/metadata.name": name, **(labels or {})},
                **({"annotations": dict(annotations)} if annotations else {}),
            },
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        }
        self.namespaces[name] = ns
        self._record("namespaces", "ADDED", ns)
        return ns

    def set_authentication_configmap(
        self,
        *,
        client_ca: str | None = None,
        requestheader_ca: str | None = None,
        allowed_names: Iterable[str] = ("front-proxy-client",),
        username_headers: Iterable[str] = ("X-Remote-User",),
        group_headers: Iterable[str] = ("X-Remote-Group",),
        extra_headers_prefix: Iterable[str] = ("X-Remote-Extra-",),
        uid_headers: Iterable[str] | None = None,
        include_requestheader: bool = True,
    ) -> None:
        """Rewrite the ConfigMap the way kube-apiserver publishes it (list values are JSON strings)."""
        data = {"client-ca-file": client_ca if client_ca is not None else self.client_ca.pem}
        if include_requestheader:
            data.update(
                {
                    "requestheader-client-ca-file": (
                        requestheader_ca if requestheader_ca is not None else self.front_proxy_ca.pem
                    ),
                    "requestheader-allowed-names": json.dumps(list(allowed_names)),
                    "requestheader-username-headers": json.dumps(list(username_headers)),
                    "requestheader-group-headers": json.dumps(list(group_headers)),
                    "requestheader-extra-headers-prefix": json.dumps(list(extra_headers_prefix)),
                }
            )
            if uid_headers is not None:
                data["requestheader-uid-headers"] = json.dumps(list(uid_headers))
        self.auth_configmap = data
        self._auth_configmap_rv = self._next_rv()

    def issue_client_cert(
        self, directory: Path, *, cn: str, orgs: Iterable[str] = (), ca: Literal["client", "front-proxy"] = "client"
    ) -> tuple[Path, Path]:
        authority = self.client_ca if ca == "client" else self.front_proxy_ca
        return authority.issue(cn=cn, orgs=orgs, directory=directory)

    def write_kubeconfig(
        self, path: Path, *, token: str | None = None, client_cert: tuple[Path, Path] | None = None
    ) -> Path:
        user: dict[str, Any] = {}
        if client_cert:
            user = {"client-certificate": str(client_cert[0]), "client-key": str(client_cert[1])}
        else:
            user = {"token": token or self.server_token}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "preferences": {},
            "clusters": [{"name": "fake", "cluster": {"server": self.url, "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": "fake-user", "user": user}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake-user"}}],
            "current-context": "fake",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    # -- lifecycle --

    async def start(self) -> None:
        app = web.Application(middlewares=[self._authenticate_caller])
        app.router.add_get(AUTH_CONFIGMAP_PATH, self._get_auth_configmap)
        app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", self._token_review)
        app.router.add_post("/apis/authorization.k8s.io/v1/subjectaccessreviews", self._subject_access_review)
        app.router.add_get("/api/v1/namespaces/{namespace}/pods/{name}", self._get_pod)
        app.router.add_get("/api/v1/namespaces/{name}", self._get_namespace)
        app.router.add_get("/api/v1/namespaces/{namespace}/configmaps/{name}", self._get_configmap)
        leases = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        app.router.add_get(leases + "/{name}", self._get_lease)
        app.router.add_post(leases, self._create_lease)
        app.router.add_put(leases + "/{name}", self._replace_lease)
        app.router.add_get("/api/v1/pods", self._list_pods)
        app.router.add_get("/api/v1/namespaces", self._list_namespaces)
        app.router.add_get("/api/v1/events", self._list_events)
        self._changed = asyncio.Condition()
        app.router.add_post("/api/v1/namespaces/{namespace}/events", self._post_core_event)
        app.router.add_post("/apis/events.k8s.io/v1/namespaces/{namespace}/events", self._post_events_event)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self._serving_cert, self._serving_key)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.SockSite(self._runner, sock, ssl_context=ctx)
        await site.start()
        self.url = f"https://127.0.0.1:{sock.getsockname()[1]}"

    async def close(self) -> None:
        self.drop_watches()  # open watches end within a second, instead of holding cleanup up until they time out
        if self._runner:
            await self._runner.cleanup()

    # -- handlers --

    def _next_rv(self) -> str:
        self._resource_version += 1
        return str(self._resource_version)

    @web.middleware
    async def _authenticate_caller(self, request: web.Request, handler: Any) -> web.StreamResponse:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token.strip() not in self.tokens:
            return _status(401, "Unauthorized", "Unauthorized")
        return await handler(request)

    async def _fail(self, request: web.Request, failure: Failure) -> web.StreamResponse | None:
        if failure is None:
            return None
        if failure == "unreachable":
            # Drop the connection without an answer: what the caller sees when the API server is gone.
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)
        return _status(int(failure), "InternalError", "Internal error occurred: injected failure")

    async def _get_auth_configmap(self, request: web.Request) -> web.StreamResponse:
        self.configmap_reads += 1
        if self.configmap_answer is not None:
            return web.Response(body=self.configmap_answer[1], headers={"Content-Type": self.configmap_answer[0]})
        return web.json_response(
            {
                "kind": "ConfigMap",
                "apiVersion": "v1",
                "metadata": {
                    "name": "extension-apiserver-authentication",
                    "namespace": "kube-system",
                    "resourceVersion": self._auth_configmap_rv,
                    "uid": "00000000-0000-0000-0000-00000000ca01",
                },
                "data": dict(self.auth_configmap),
            }
        )

    async def _token_review(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.token_reviews.append(body)
        if (failed := await self._fail(request, self.token_review_failure)) is not None:
            return failed
        if self.token_review_answer is not None:
            return web.Response(
                status=201, body=self.token_review_answer[1], headers={"Content-Type": self.token_review_answer[0]}
            )
        spec = body.get("spec") or {}
        found = self.tokens.get(spec.get("token", ""))
        status: dict[str, Any]
        if found is None:
            status = {"user": {}, "error": "invalid bearer token"}
        else:
            user: dict[str, Any] = {"username": found.name, "groups": [*found.groups, AUTHENTICATED_GROUP]}
            if found.uid:
                user["uid"] = found.uid
            if found.extra:
                user["extra"] = found.extra
            # Like kube-apiserver: a review without spec.audiences is checked against (and answers with)
            # the API server's own audiences, by default its service-account issuer.
            status = {"authenticated": True, "user": user, "audiences": spec.get("audiences") or [API_AUDIENCE]}
        answer = {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }
        return web.json_response(answer, status=201)

    async def _subject_access_review(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.sar_requests.append(body)
        if (failed := await self._fail(request, self.sar_failure)) is not None:
            return failed
        if self.sar_answer is not None:
            return web.Response(status=201, body=self.sar_answer[1], headers={"Content-Type": self.sar_answer[0]})
        spec = body.get("spec") or {}
        ra, nra = spec.get("resourceAttributes"), spec.get("nonResourceAttributes")
        if not ra and not nra:
            return _status(
                422,
                "Invalid",
                'SubjectAccessReview.authorization.k8s.io "" is invalid: '
                'spec.resourceAttributes: Invalid value: "null": exactly one of '
                "nonResourceAttributes or resourceAttributes must be specified",
            )
        allowed = any(
            r.allows(user=spec.get("user", ""), groups=spec.get("groups") or (), resource=ra, non_resource=nra)
            for r in self.rules
        )
        status: dict[str, Any] = {"allowed": allowed}
        if allowed:
            status["reason"] = "RBAC: allowed by fake rule table"
        answer = {
            "kind": "SubjectAccessReview",
            "apiVersion": "authorization.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }
        return web.json_response(answer, status=201)

    async def _get_pod(self, request: web.Request) -> web.StreamResponse:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        pod = self.pods.get((namespace, name))
        if pod is None:
            return _status(404, "NotFound", f'pods "{name}" not found', name=name, kind="pods")
        return web.json_response(pod)

    def add_configmap(self, *, namespace: str, name: str, data: dict[str, str]) -> dict[str, Any]:
        cm = {
            "kind": "ConfigMap",
            "apiVersion": "v1",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": str(uuid.uuid4()),
                "resourceVersion": self._next_rv(),
                "creationTimestamp": _timestamp(),
            },
            "data": dict(data),
        }
        self.configmaps[(namespace, name)] = cm
        return cm

    async def _get_configmap(self, request: web.Request) -> web.StreamResponse:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        cm = self.configmaps.get((namespace, name))
        if cm is None:
            return _status(404, "NotFound", f'configmaps "{name}" not found', name=name, kind="configmaps")
        return web.json_response(cm)

    async def _get_lease(self, request: web.Request) -> web.StreamResponse:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        lease = self.leases.get((namespace, name))
        if lease is None:
            return _status(
                404,
                "NotFound",
                f'leases.coordination.k8s.io "{name}" not found',
                name=name,
                group="coordination.k8s.io",
                kind="leases",
            )
        return web.json_response(lease)

    async def _create_lease(self, request: web.Request) -> web.StreamResponse:
        namespace = request.match_info["namespace"]
        body = await request.json()
        name = (body.get("metadata") or {}).get("name")
        if (namespace, name) in self.leases:
            return _status(
                409,
                "AlreadyExists",
                f'leases.coordination.k8s.io "{name}" already exists',
                name=name,
                group="coordination.k8s.io",
                kind="leases",
            )
        body["metadata"].update(
            namespace=namespace, uid=str(uuid.uuid4()), resourceVersion=self._next_rv(), creationTimestamp=_timestamp()
        )
        body.update(kind="Lease", apiVersion="coordination.k8s.io/v1")
        self.leases[(namespace, name)] = body
        return web.json_response(body, status=201)

    async def _replace_lease(self, request: web.Request) -> web.StreamResponse:
        """PUT with optimistic concurrency: a stale ``metadata.resourceVersion`` is a 409 Conflict."""
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        body = await request.json()
        current = self.leases.get((namespace, name))
        if current is None:
            return _status(
                404,
                "NotFound",
                f'leases.coordination.k8s.io "{name}" not found',
                name=name,
                group="coordination.k8s.io",
                kind="leases",
            )
        rv = (body.get("metadata") or {}).get("resourceVersion")
        if rv and rv != current["metadata"]["resourceVersion"]:
            return _status(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on leases.coordination.k8s.io "{name}": '
                "the object has been modified; please apply your changes to the latest version and try "
                "again",
                name=name,
                group="coordination.k8s.io",
                kind="leases",
            )
        body["metadata"] = {
            **current["metadata"],
            **{k: v for k, v in body["metadata"].items() if k in ("labels", "annotations")},
            "resourceVersion": self._next_rv(),
        }
        body.update(kind="Lease", apiVersion="coordination.k8s.io/v1")
        self.leases[(namespace, name)] = body
        return web.json_response(body)

    async def _get_namespace(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        ns = self.namespaces.get(name)
        if ns is None:
            return _status(404, "NotFound", f'namespaces "{name}" not found', name=name, kind="namespaces")
        return web.json_response(ns)

    # Field selectors the real server accepts for pods (a subset: the ones with a use here); others are a 400.
    _POD_FIELDS = {
        "spec.nodeName": lambda o: o["spec"].get("nodeName", ""),
        "metadata.name": lambda o: o["metadata"]["name"],
        "metadata.namespace": lambda o: o["metadata"]["namespace"],
        "status.phase": lambda o: o["status"].get("phase", ""),
    }
    # The field selectors kube-apiserver supports on core/v1 Events (pkg/registry/core/event/strategy.go).
    _EVENT_FIELDS = {
        "metadata.name": lambda o: o["metadata"]["name"],
        "metadata.namespace": lambda o: o["metadata"]["namespace"],
        **{
            f"involvedObject.{k}": (lambda k: lambda o: str((o.get("involvedObject") or {}).get(k) or ""))(k)  # noqa: B023
            for k in ("kind", "namespace", "name", "uid", "apiVersion", "resourceVersion", "fieldPath")
        },
        "reason": lambda o: o.get("reason") or "",
        "reportingComponent": lambda o: o.get("reportingComponent") or "",
        "source": lambda o: (o.get("source") or {}).get("component") or "",
        "type": lambda o: o.get("type") or "",
    }
    _NAMESPACE_FIELDS = {
        "metadata.name": lambda o: o["metadata"]["name"],
        "status.phase": lambda o: o["status"].get("phase", ""),
    }

    def _selector(self, text: str, fields: dict[str, Any]) -> Any:
        tests = []
        for term in filter(None, text.split(",")):
            for op in ("!=", "==", "="):
                if op in term:
                    key, value = term.split(op, 1)
                    break
            else:
                raise ValueError(f"invalid selector: {text!r}; can't understand {term!r}")
            if key not in fields:
                raise ValueError(f"field label not supported: {key}")
            tests.append((fields[key], op == "!=", value))
        return lambda obj: all((get(obj) != v) if neg else (get(obj) == v) for get, neg, v in tests)

    async def _list_or_watch(
        self, request: web.Request, *, collection: str, kind: str, objects: Any, fields: dict[str, Any]
    ) -> web.StreamResponse:
        q = request.query
        self.list_requests.append(request.path_qs)
        try:
            match = self._selector(q.get("fieldSelector", ""), fields)
        except ValueError as e:
            return _status(400, "BadRequest", str(e))
        if q.get("watch", "").lower() not in ("true", "1"):  # Go's strconv.ParseBool: kubernetes-asyncio sends True
            self.list_count[collection] = self.list_count.get(collection, 0) + 1
            items = []
            for obj in objects():
                if match(obj):
                    item = json.loads(json.dumps(obj))
                    item.pop("kind", None)
                    item.pop("apiVersion", None)
                    items.append(item)
            if (q.get("limit") or "").isdigit() and int(q["limit"]) > 0:
                items = items[: int(q["limit"])]  # (no continue token: the callers here only want the version)
            return web.json_response(
                {
                    "kind": f"{kind}List",
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(self._resource_version)},
                    "items": items,
                }
            )
        try:
            since = int(q.get("resourceVersion") or self._resource_version)
        except ValueError:
            return _status(400, "BadRequest", f"invalid resourceVersion {q.get('resourceVersion')!r}")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        oldest = max(self.compacted, self.changes[0][0] - 1 if self.changes else 0)
        if since < oldest:
            await resp.write(
                json.dumps(
                    {
                        "type": "ERROR",
                        "object": {
                            "kind": "Status",
                            "apiVersion": "v1",
                            "status": "Failure",
                            "reason": "Expired",
                            "code": 410,
                            "message": f"too old resource version: {since}",
                        },
                    }
                ).encode()
                + b"\n"
            )
            return resp
        deadline = asyncio.get_running_loop().time() + float(q.get("timeoutSeconds") or 1800)
        assert self._changed is not None
        generation = self.watch_generation
        while generation == self.watch_generation:
            for rv, coll, typ, obj in list(self.changes):
                if coll == collection and rv > since:
                    since = rv
                    if match(obj):
                        await resp.write(json.dumps({"type": typ, "object": obj}).encode() + b"\n")
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return resp
            try:
                async with self._changed:
                    await asyncio.wait_for(self._changed.wait(), timeout=min(left, 1.0))
            except asyncio.TimeoutError:
                pass
        return resp

    async def _list_pods(self, request: web.Request) -> web.StreamResponse:
        return await self._list_or_watch(
            request, collection="pods", kind="Pod", objects=lambda: self.pods.values(), fields=self._POD_FIELDS
        )

    async def _list_events(self, request: web.Request) -> web.StreamResponse:
        return await self._list_or_watch(
            request,
            collection="events",
            kind="Event",
            objects=lambda: (e for e in self.events if e["apiVersion"] == "v1"),
            fields=self._EVENT_FIELDS,
        )

    def compact(self) -> None:
        """As etcd compaction: every watch from a resourceVersion before now gets 410 Gone (a relist is needed)."""
        self.compacted = self._resource_version
        self.changes.clear()

    def drop_watches(self) -> None:
        """End every open watch now (an API server restart): clients must resume from their last resourceVersion."""
        self.watch_generation += 1
        self._notify()

    async def _list_namespaces(self, request: web.Request) -> web.StreamResponse:
        return await self._list_or_watch(
            request,
            collection="namespaces",
            kind="Namespace",
            objects=lambda: self.namespaces.values(),
            fields=self._NAMESPACE_FIELDS,
        )

    async def _record_event(self, request: web.Request, *, api_version: str) -> web.StreamResponse:
        namespace = request.match_info["namespace"]
        body = await request.json()
        metadata = body.setdefault("metadata", {})
        if metadata.get("namespace", namespace) != namespace:
            return _status(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request",
            )
        if body.get("apiVersion", api_version) != api_version:
            return _status(400, "BadRequest", f"wrong apiVersion {body.get('apiVersion')!r} for {request.path}")
        # The real server answers with apiVersion and kind filled even when the client left them out.
        body["apiVersion"], body["kind"] = api_version, "Event"
        metadata["namespace"] = namespace
        if not metadata.get("name"):
            if not metadata.get("generateName"):
                return _status(
                    422,
                    "Invalid",
                    'Event "" is invalid: metadata.name: Required value: name or generateName is required',
                )
            metadata["name"] = metadata["generateName"] + secrets.token_hex(3)
        metadata.update(uid=str(uuid.uuid4()), resourceVersion=self._next_rv(), creationTimestamp=_timestamp())
        self.events.append(body)
        if api_version == "v1":
            self._record("events", "ADDED", body)
        return web.json_response(body, status=201)

    async def _post_core_event(self, request: web.Request) -> web.StreamResponse:
        return await self._record_event(request, api_version="v1")

    async def _post_events_event(self, request: web.Request) -> web.StreamResponse:
        return await self._record_event(request, api_version="events.k8s.io/v1")


@pytest_asyncio.fixture
async def fake_kube(tmp_path_factory: Any) -> AsyncIterator[FakeKube]:
    fake = FakeKube(tmp_path_factory.mktemp("fake-kube"))
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()
