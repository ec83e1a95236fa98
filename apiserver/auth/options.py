"""
Authentication and authorization flags, named as Kubernetes names them, and the setup they produce.

``add_auth_flags(parser)`` adds the flags, :meth:`AuthOptions.from_args` turns what they parsed into a frozen
:class:`AuthOptions`, and ``await build_auth(options=..., dev=...)`` builds an
:class:`AuthSetup` whose ``middleware`` goes into the aiohttp application and whose ``configure_ssl`` is
called on the serving ``SSLContext`` (so TLS asks for client certificates and trusts the client and
front-proxy CAs, also after they rotate). Without ``dev``, everything is delegated to the cluster named
by ``--authentication-kubeconfig``/``--authorization-kubeconfig`` (in-cluster configuration when they are
absent). With ``dev`` (``coredump-apiserver --dev``), client certificates from the dev CA and a static rule
table stand in for the cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

from kubernetes_asyncio import client, config
from kubernetes_asyncio.config.config_exception import ConfigException

from apiserver.auth import Authenticator
from apiserver.auth.authconfig import AuthConfigError, DelegatedAuthConfig
from apiserver.auth.pipeline import HEALTH_PATHS, AlwaysAllowPaths, Middleware, UnionAuthenticator, make_auth_middleware
from apiserver.auth.requestheader import RequestHeaderAuthenticator, RequestHeaderNames
from apiserver.auth.sar import SubjectAccessReviewAuthorizer
from apiserver.auth.static import Rule, StaticAuthorizer
from apiserver.auth.tokenreview import TokenReviewAuthenticator
from apiserver.auth.x509 import CABundle, X509Authenticator, configure_client_verification
from handler import flags

logger = logging.getLogger(__name__)

__all__ = ["AuthConfigError", "AuthOptions", "AuthSetup", "DevAuth", "add_auth_flags", "build_auth"]


def _path_list(text: str) -> tuple[str, ...]:
    paths = flags.parse_list(text)
    try:
        AlwaysAllowPaths(paths)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return paths


def add_auth_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("authentication and authorization (delegated to the cluster)")
    group.add_argument(
        "--authentication-kubeconfig",
        type=Path,
        default=None,
        help="kubeconfig with rights to create tokenreviews and read the "
        "extension-apiserver-authentication ConfigMap (default: in-cluster configuration)",
    )
    group.add_argument(
        "--authorization-kubeconfig",
        type=Path,
        default=None,
        help="kubeconfig with rights to create subjectaccessreviews (default: in-cluster)",
    )
    group.add_argument(
        "--client-ca-file",
        type=Path,
        default=None,
        help="CA bundle for client certificates (default: the ConfigMap's client-ca-file)",
    )
    group.add_argument(
        "--requestheader-client-ca-file",
        type=Path,
        default=None,
        help="CA bundle of the front proxy; X-Remote-* headers are trusted only from its "
        "certificates (default: from the ConfigMap)",
    )
    group.add_argument(
        "--requestheader-allowed-names",
        type=flags.parse_list,
        default="",
        help="comma-separated CNs allowed to send X-Remote-* headers (empty: any CN of that CA)",
    )
    group.add_argument(
        "--requestheader-username-headers",
        type=flags.parse_list,
        default="X-Remote-User",
        help="headers that carry the user name from the front proxy",
    )
    group.add_argument(
        "--requestheader-uid-headers",
        type=flags.parse_list,
        default="",
        help="headers that carry the user's UID from the front proxy",
    )
    group.add_argument(
        "--requestheader-group-headers",
        type=flags.parse_list,
        default="X-Remote-Group",
        help="headers that carry groups (one group per header)",
    )
    group.add_argument(
        "--requestheader-extra-headers-prefix",
        type=flags.parse_list,
        default="X-Remote-Extra-",
        help="prefixes of headers that carry the user's extra attributes",
    )
    flags.add_bool(
        group, "--anonymous-auth", default=False, help="serve requests without credentials as system:anonymous"
    )
    flags.add_bool(
        group,
        "--authentication-skip-lookup",
        default=False,
        help="do not read the extension-apiserver-authentication ConfigMap",
    )
    group.add_argument(
        "--authentication-token-webhook-cache-ttl",
        type=flags.parse_duration,
        default="10s",
        help="how long TokenReview answers are cached",
    )
    group.add_argument(
        "--authorization-webhook-cache-authorized-ttl",
        type=flags.parse_duration,
        default="10s",
        help="how long allowed SubjectAccessReview answers are cached",
    )
    group.add_argument(
        "--authorization-webhook-cache-unauthorized-ttl",
        type=flags.parse_duration,
        default="10s",
        help="how long denied SubjectAccessReview answers are cached",
    )
    group.add_argument(
        "--authorization-always-allow-paths",
        type=_path_list,
        default=",".join(HEALTH_PATHS),
        help="comma-separated paths served without authorization, matched exactly; a trailing * matches a prefix",
    )
    group.add_argument(
        "--authentication-config-refresh-interval",
        type=flags.parse_positive_duration,
        default="30s",
        help="how often CA files and the ConfigMap are read again to follow rotation",
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class AuthOptions:
    """What the authentication and authorization flags say, each field named after its flag."""

    authentication_kubeconfig: Path | None = None
    authorization_kubeconfig: Path | None = None
    client_ca_file: Path | None = None
    requestheader_client_ca_file: Path | None = None
    requestheader_allowed_names: tuple[str, ...] = ()
    requestheader_username_headers: tuple[str, ...] = ("X-Remote-User",)
    requestheader_uid_headers: tuple[str, ...] = ()
    requestheader_group_headers: tuple[str, ...] = ("X-Remote-Group",)
    requestheader_extra_headers_prefix: tuple[str, ...] = ("X-Remote-Extra-",)
    anonymous_auth: bool = False
    authentication_skip_lookup: bool = False
    authentication_token_webhook_cache_ttl: float = 10.0
    authorization_webhook_cache_authorized_ttl: float = 10.0
    authorization_webhook_cache_unauthorized_ttl: float = 10.0
    authorization_always_allow_paths: tuple[str, ...] = HEALTH_PATHS
    authentication_config_refresh_interval: float = 30.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "AuthOptions":
        """The fields of ``args`` (a parse of a parser :func:`add_auth_flags` added to) that are auth options."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass
class DevAuth:
    """Dev mode: client certificates from this CA, decisions from this rule table (no cluster to ask)."""

    client_ca_file: Path
    rules: list[Rule]


@dataclasses.dataclass
class AuthSetup:
    middleware: Middleware
    bundles: list[CABundle]
    _closers: list[Callable[[], Awaitable[None]]] = dataclasses.field(default_factory=list)

    def configure_ssl(self, ctx: ssl.SSLContext) -> None:
        """Request client certificates (optional) and verify them against the client and front-proxy CAs."""
        configure_client_verification(ctx, self.bundles)

    async def close(self) -> None:
        for closer in reversed(self._closers):
            await closer()
        self._closers.clear()


async def _api_client(kubeconfig: Path | None, *, flag: str) -> client.ApiClient:
    configuration = client.Configuration()
    if kubeconfig is None:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except (ConfigException, OSError) as error:
            raise AuthConfigError(
                f"no {flag} given and no in-cluster configuration ({error}): run in a pod "
                f"with a service account, or pass {flag}"
            ) from error
    else:
        if not kubeconfig.is_file():
            raise AuthConfigError(f"{flag} {kubeconfig}: no such file")
        try:
            await config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
        except (ConfigException, OSError, ValueError, KeyError) as error:
            raise AuthConfigError(f"{flag} {kubeconfig}: not a usable kubeconfig ({error})") from error
    configuration.connection_pool_maxsize = 32
    return client.ApiClient(configuration=configuration)


async def build_auth(
    *, options: AuthOptions, dev: DevAuth | None, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
) -> AuthSetup:
    """
    The middleware and TLS settings for ``options``; raises :class:`AuthConfigError` with one clear line.
    ``sleep`` is the clock of the refresh of CA files and the ConfigMap (tests move a fake one).
    """
    always_allow, anonymous = options.authorization_always_allow_paths, options.anonymous_auth

    if dev is not None:
        try:
            pem = await asyncio.to_thread(dev.client_ca_file.read_text)
            bundle = CABundle(name="dev client CA", pem=pem)
        except (OSError, ValueError) as error:
            raise AuthConfigError(f"dev client CA {dev.client_ca_file}: {error}") from error
        middleware = make_auth_middleware(
            authenticator=UnionAuthenticator([X509Authenticator(bundle=bundle)]),
            authorizer=StaticAuthorizer(dev.rules),
            always_allow_paths=always_allow,
            anonymous=anonymous,
        )
        return AuthSetup(middleware=middleware, bundles=[bundle])

    closers: list[Callable[[], Awaitable[None]]] = []
    try:
        authn_client = await _api_client(options.authentication_kubeconfig, flag="--authentication-kubeconfig")
        closers.append(authn_client.close)
        authz_client = await _api_client(options.authorization_kubeconfig, flag="--authorization-kubeconfig")
        closers.append(authz_client.close)

        delegated = DelegatedAuthConfig(
            core_api=None if options.authentication_skip_lookup else client.CoreV1Api(authn_client),
            client_ca_file=options.client_ca_file,
            requestheader_ca_file=options.requestheader_client_ca_file,
            requestheader_names=RequestHeaderNames(
                allowed_names=options.requestheader_allowed_names,
                username_headers=options.requestheader_username_headers,
                uid_headers=options.requestheader_uid_headers,
                group_headers=options.requestheader_group_headers,
                extra_headers_prefixes=options.requestheader_extra_headers_prefix,
            ),
            refresh_interval=options.authentication_config_refresh_interval,
            sleep=sleep,
        )
        await delegated.refresh()
        delegated.start()
        closers.append(delegated.close)
    except BaseException:
        for closer in reversed(closers):
            await closer()
        raise

    authenticators: list[Authenticator] = [
        RequestHeaderAuthenticator(config=delegated.requestheader),
        X509Authenticator(bundle=delegated.client_ca),
        TokenReviewAuthenticator(api_client=authn_client, cache_ttl=options.authentication_token_webhook_cache_ttl),
    ]
    authorizer = SubjectAccessReviewAuthorizer(
        api_client=authz_client,
        authorized_ttl=options.authorization_webhook_cache_authorized_ttl,
        unauthorized_ttl=options.authorization_webhook_cache_unauthorized_ttl,
    )
    middleware = make_auth_middleware(
        authenticator=UnionAuthenticator(authenticators),
        authorizer=authorizer,
        always_allow_paths=always_allow,
        anonymous=anonymous,
    )
    logger.info(
        "delegated authentication: client CA %d cert(s), front-proxy CA %d cert(s), allowed names %s",
        len(delegated.client_ca.certificates),
        len(delegated.requestheader.bundle.certificates),
        list(delegated.requestheader.names.allowed_names) or "any",
    )
    if not delegated.requestheader.bundle.certificates:
        logger.warning(
            "no front-proxy CA (requestheader-client-ca-file): requests the kube-aggregator forwards "
            "(every kubectl call) will be 401; give --requestheader-client-ca-file or let the server "
            "read the extension-apiserver-authentication ConfigMap"
        )
    return AuthSetup(
        middleware=middleware, bundles=[delegated.client_ca, delegated.requestheader.bundle], _closers=closers
    )
