"""
Client certificates: CA bundles that can rotate, the peer certificate of a request, and the x509 authenticator.

TLS (``CERT_OPTIONAL``) checks that a presented certificate chains to *some* CA the server ever trusted;
the authenticators then decide against the *current* bundle whether it was issued by a CA of their own
(client-ca for users, requestheader CA for the front proxy). That second check is what keeps a cluster-CA
certificate from forging X-Remote-* headers, and what makes a CA dropped by rotation stop working even
though OpenSSL's store can only grow. Python 3.11 exposes only the leaf certificate, so the leaf must be
issued directly by a CA in the bundle (intermediates are not supported).

:class:`X509Authenticator` maps a verified certificate to a user like kube-apiserver: CN → name,
O → groups.
"""

from __future__ import annotations

import datetime
import logging
import ssl
from collections.abc import Callable

from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from apiserver.api import errors
from apiserver.auth import UserInfo

logger = logging.getLogger(__name__)

MAX_REMEMBERED_LEAVES = 1024
_PEER_CERTIFICATE: web.RequestKey[x509.Certificate | None] = web.RequestKey("peer_certificate")
# From when to when a leaf authenticates: the overlap of its own validity and its issuer's.
_Window = tuple[datetime.datetime, datetime.datetime]


class CABundle:
    """A PEM bundle of CA certificates whose content can be replaced at runtime (CA rotation)."""

    def __init__(self, *, name: str, pem: str = "") -> None:
        self.name = name
        self.pem = ""
        self.certificates: tuple[x509.Certificate, ...] = ()
        self._listeners: list[Callable[[CABundle], None]] = []
        # Signature checks cost ~150 µs each and clients present the same certificate on every request,
        # so remember for each leaf when this bundle's CAs vouch for it (forgotten when the bundle changes).
        # Keyed by the certificate itself: it hashes and compares its DER, ~5x cheaper than a fingerprint.
        self._windows: dict[x509.Certificate, _Window | None] = {}
        if pem:
            self.update(pem)

    def update(self, pem: str) -> bool:
        """Replace the bundle; True when the content changed. Invalid PEM raises ValueError and changes nothing."""
        if pem == self.pem:
            return False
        certificates = tuple(x509.load_pem_x509_certificates(pem.encode())) if pem.strip() else ()
        self.pem, self.certificates = pem, certificates
        self._windows = {}
        logger.info("CA bundle %s now holds %d certificate(s)", self.name, len(certificates))
        for listener in self._listeners:
            listener(self)
        return True

    def on_change(self, listener: Callable[[CABundle], None]) -> None:
        self._listeners.append(listener)

    def issued(self, leaf: x509.Certificate) -> bool:
        """True when a CA of this bundle signed ``leaf`` and the leaf is valid now for client authentication."""
        try:
            window = self._windows[leaf]
        except KeyError:
            window = self._window(leaf)
            if len(self._windows) >= MAX_REMEMBERED_LEAVES:
                self._windows.clear()
            self._windows[leaf] = window
        return window is not None and window[0] <= datetime.datetime.now(datetime.timezone.utc) <= window[1]

    def _window(self, leaf: x509.Certificate) -> _Window | None:
        """When both ``leaf`` and the CA that signed it are valid; None when no CA here signed it for client auth."""
        try:
            usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            if (
                ExtendedKeyUsageOID.CLIENT_AUTH not in usages
                and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in usages
            ):
                return None
        except x509.ExtensionNotFound:
            pass
        issuer = self._issuer(leaf)
        if issuer is None:
            return None
        return (
            max(leaf.not_valid_before_utc, issuer.not_valid_before_utc),
            min(leaf.not_valid_after_utc, issuer.not_valid_after_utc),
        )

    def _issuer(self, leaf: x509.Certificate) -> x509.Certificate | None:
        for ca in self.certificates:
            try:
                leaf.verify_directly_issued_by(ca)
            except (InvalidSignature, ValueError, TypeError):  # other issuer, or another key type
                continue
            return ca
        return None


def peer_certificate(request: web.Request) -> x509.Certificate | None:
    """The client certificate TLS verified for this connection, or None; parsed once per request."""
    if _PEER_CERTIFICATE in request:
        return request[_PEER_CERTIFICATE]
    cert = None
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if isinstance(ssl_object, (ssl.SSLObject, ssl.SSLSocket)):
        der = ssl_object.getpeercert(binary_form=True)
        cert = x509.load_der_x509_certificate(der) if der else None
    request[_PEER_CERTIFICATE] = cert
    return cert


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def configure_client_verification(ctx: ssl.SSLContext, bundles: list[CABundle]) -> None:
    """Ask clients for certificates and trust every CA of ``bundles``, now and after each rotation."""

    def load(bundle: CABundle) -> None:
        if bundle.pem.strip():
            # OpenSSL's store only grows: a dropped CA still passes TLS, but CABundle.issued() refuses it.
            ctx.load_verify_locations(cadata=bundle.pem)
            ctx.verify_mode = ssl.CERT_OPTIONAL

    for bundle in bundles:
        load(bundle)
        bundle.on_change(load)


class X509Authenticator:
    """Users from client certificates issued by the client CA (``--client-ca-file`` or the ConfigMap)."""

    def __init__(self, *, bundle: CABundle) -> None:
        self._bundle = bundle

    async def authenticate(self, request: web.Request) -> UserInfo | None:
        cert = peer_certificate(request)
        if cert is None:
            return None
        if not self._bundle.issued(cert):
            raise errors.unauthorized()
        name = common_name(cert)
        if not name:
            raise errors.unauthorized()
        groups = tuple(str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME))
        return UserInfo(name=name, groups=groups)
