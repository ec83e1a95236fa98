"""
Where the client CA and the front-proxy settings come from, and how they follow rotation.

As in k8s.io/apiserver: ``--client-ca-file`` wins over the ConfigMap's ``client-ca-file``;
``--requestheader-client-ca-file`` (with the other ``--requestheader-*`` flags) wins over the
ConfigMap's ``requestheader-*`` keys; otherwise both come from
``kube-system/extension-apiserver-authentication`` (unless ``--authentication-skip-lookup``). Files and
the ConfigMap are read again every refresh interval; a failed refresh keeps the last good settings. The
ConfigMap is read strictly: another kind or object, a value that is not a string, or a list key that is not
a JSON list of strings is refused (at start: the server does not start; later: the last good settings stay).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from kubernetes_asyncio import client

from apiserver.auth.requestheader import RequestHeaderConfig, RequestHeaderNames
from apiserver.auth.reviews import MalformedAnswer, parse_configmap_data
from apiserver.auth.webhook import Unreachable, call_cluster
from apiserver.auth.x509 import CABundle

logger = logging.getLogger(__name__)

CONFIGMAP_NAMESPACE = "kube-system"
CONFIGMAP_NAME = "extension-apiserver-authentication"


class AuthConfigError(Exception):
    """The authentication configuration cannot be loaded (one line, for the command line)."""


# ConfigMap key → RequestHeaderNames field.
_NAME_KEYS = {
    "requestheader-allowed-names": "allowed_names",
    "requestheader-username-headers": "username_headers",
    "requestheader-uid-headers": "uid_headers",
    "requestheader-group-headers": "group_headers",
    "requestheader-extra-headers-prefix": "extra_headers_prefixes",
}
_CONFIGMAP = f"configmap {CONFIGMAP_NAMESPACE}/{CONFIGMAP_NAME}"


def _string_list(data: dict[str, str], key: str) -> tuple[str, ...]:
    """The ConfigMap stores lists as JSON arrays in strings (deserializeStrings in k8s.io/apiserver)."""
    value = data.get(key)
    if not value:
        return ()
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = None
    if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
        raise AuthConfigError(f"{_CONFIGMAP} key {key}: expected a JSON list of strings, got {value!r}")
    return tuple(parsed)


class DelegatedAuthConfig:
    """The client CA bundle and the requestheader settings, kept current by :meth:`refresh`.

    ``requestheader_ca_file`` given: it and ``requestheader_names`` (the ``--requestheader-*`` flags) replace
    the ConfigMap's ``requestheader-*`` keys, as in k8s.io/apiserver; otherwise ``requestheader_names`` is unused.
    """

    def __init__(
        self,
        *,
        core_api: client.CoreV1Api | None,
        client_ca_file: Path | None,
        requestheader_ca_file: Path | None,
        requestheader_names: RequestHeaderNames,
        refresh_interval: float,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._core_api = core_api
        self._sleep = sleep  # the refresh loop's clock (tests move a fake one)
        self._client_ca_file = client_ca_file
        self._requestheader_ca_file = requestheader_ca_file
        self._refresh_interval = refresh_interval
        self.client_ca = CABundle(name="client-ca")
        self.requestheader = RequestHeaderConfig(
            bundle=CABundle(name="requestheader-client-ca"), names=requestheader_names
        )
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        """Read files and ConfigMap once; raise :class:`AuthConfigError` naming the source that is unreadable or bad.

        A source is read and parsed before its settings change, so a bad one never leaves them half-applied.
        """
        data: dict[str, str] = {}
        if self._core_api is not None and (self._client_ca_file is None or self._requestheader_ca_file is None):
            data = await self._read_configmap()
        if self._client_ca_file is not None:
            await _update_from_file(self.client_ca, self._client_ca_file, "--client-ca-file")
        else:
            _update(self.client_ca, data.get("client-ca-file", ""), f"{_CONFIGMAP} key client-ca-file")
        if self._requestheader_ca_file is not None:
            await _update_from_file(
                self.requestheader.bundle, self._requestheader_ca_file, "--requestheader-client-ca-file"
            )
        else:
            names = RequestHeaderNames(**{field: _string_list(data, key) for key, field in _NAME_KEYS.items()})
            _update(
                self.requestheader.bundle,
                data.get("requestheader-client-ca-file", ""),
                f"{_CONFIGMAP} key requestheader-client-ca-file",
            )
            self.requestheader.names = names

    async def _read_configmap(self) -> dict[str, str]:
        """The ConfigMap's data, read strictly (:func:`~apiserver.auth.reviews.parse_configmap_data`)."""
        assert self._core_api is not None
        core_api = self._core_api
        try:
            answer = await call_cluster(
                start=lambda: core_api.read_namespaced_config_map(
                    CONFIGMAP_NAME, CONFIGMAP_NAMESPACE, _preload_content=False, _request_timeout=10
                ),
                timeout=10,
            )
        except Unreachable as error:
            raise AuthConfigError(
                f"cannot reach the cluster to read {_CONFIGMAP}: {error} (is the cluster's "
                f"API server reachable from here?)"
            ) from error
        if not 200 <= answer.status <= 299:
            raise AuthConfigError(
                f"cannot read {_CONFIGMAP}: HTTP {answer.status} (grant the "
                f"extension-apiserver-authentication-reader role, or use --authentication-skip-lookup with "
                f"--client-ca-file)"
            )
        try:
            return parse_configmap_data(answer.body, name=CONFIGMAP_NAME, namespace=CONFIGMAP_NAMESPACE)
        except MalformedAnswer as error:
            raise AuthConfigError(f"{_CONFIGMAP}: refused: {error}") from None

    def start(self) -> None:
        if self._task is None and self._refresh_interval > 0:
            self._task = asyncio.create_task(self._refresh_forever(), name="auth-config-refresh")

    async def _refresh_forever(self) -> None:
        while True:
            await self._sleep(self._refresh_interval)
            try:
                await self.refresh()
            except AuthConfigError as error:
                logger.warning("keeping the previous authentication configuration: %s", error)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def _update(bundle: CABundle, pem: str, source: str) -> None:
    try:
        bundle.update(pem)
    except ValueError as error:
        raise AuthConfigError(f"{source}: not a PEM bundle of CA certificates ({error})") from error


async def _update_from_file(bundle: CABundle, path: Path, flag: str) -> None:
    try:
        pem = await asyncio.to_thread(path.read_text)
    except (OSError, UnicodeDecodeError) as error:
        raise AuthConfigError(f"{flag} {path}: {getattr(error, 'strerror', None) or error}") from error
    _update(bundle, pem, f"{flag} {path}")
