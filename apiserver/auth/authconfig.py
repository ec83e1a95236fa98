"""
Where the client CA and the front-proxy settings come from, and how they follow rotation.

As in k8s.io/apiserver: ``--client-ca-file`` wins over the ConfigMap's ``client-ca-file``;
``--requestheader-client-ca-file`` (with the other ``--requestheader-*`` flags) wins over the
ConfigMap's ``requestheader-*`` keys; otherwise both come from
``kube-system/extension-apiserver-authentication`` (unless ``--authentication-skip-lookup``). Files and
the ConfigMap are read again every refresh interval; a failed refresh keeps the last good settings.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from pathlib import Path

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from apiserver.auth.requestheader import RequestHeaderConfig
from apiserver.auth.x509 import CABundle

logger = logging.getLogger(__name__)

CONFIGMAP_NAMESPACE = "kube-system"
CONFIGMAP_NAME = "extension-apiserver-authentication"


class AuthConfigError(Exception):
    """The authentication configuration cannot be loaded (one line, for the command line)."""


@dataclasses.dataclass(frozen=True)
class RequestHeaderFlags:
    client_ca_file: Path | None = None
    allowed_names: tuple[str, ...] = ()
    username_headers: tuple[str, ...] = ("X-Remote-User",)
    uid_headers: tuple[str, ...] = ()
    group_headers: tuple[str, ...] = ("X-Remote-Group",)
    extra_headers_prefixes: tuple[str, ...] = ("X-Remote-Extra-",)


def _string_list(value: str | None) -> tuple[str, ...]:
    """The ConfigMap stores lists as JSON arrays in strings (deserializeStrings in k8s.io/apiserver)."""
    if not value:
        return ()
    parsed = json.loads(value)
    if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
        raise ValueError(f"expected a JSON list of strings, got {value!r}")
    return tuple(parsed)


class DelegatedAuthConfig:
    """The client CA bundle and the requestheader settings, kept current by :meth:`refresh`."""

    def __init__(self, *, core_api: client.CoreV1Api | None, client_ca_file: Path | None,
                 requestheader: RequestHeaderFlags, refresh_interval: float) -> None:
        self._core_api = core_api
        self._client_ca_file = client_ca_file
        self._flags = requestheader
        self._refresh_interval = refresh_interval
        self.client_ca = CABundle(name="client-ca")
        self.requestheader = RequestHeaderConfig(bundle=CABundle(name="requestheader-client-ca"))
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        """Read files and ConfigMap once; raise :class:`AuthConfigError` when a source cannot be read."""
        data: dict[str, str] = {}
        needs_configmap = self._client_ca_file is None or self._flags.client_ca_file is None
        if self._core_api is not None and needs_configmap:
            data = await self._read_configmap()
        try:
            if self._client_ca_file is not None:
                self.client_ca.update(await _read(self._client_ca_file))
            else:
                self.client_ca.update(data.get("client-ca-file", ""))
            rh = self.requestheader
            if self._flags.client_ca_file is not None:
                rh.bundle.update(await _read(self._flags.client_ca_file))
                rh.allowed_names = self._flags.allowed_names
                rh.username_headers = self._flags.username_headers
                rh.uid_headers = self._flags.uid_headers
                rh.group_headers = self._flags.group_headers
                rh.extra_headers_prefixes = self._flags.extra_headers_prefixes
            else:
                # Parse everything before changing anything, so a bad key never leaves a half-applied config.
                allowed = _string_list(data.get("requestheader-allowed-names"))
                users = _string_list(data.get("requestheader-username-headers"))
                uids = _string_list(data.get("requestheader-uid-headers"))
                groups = _string_list(data.get("requestheader-group-headers"))
                extras = _string_list(data.get("requestheader-extra-headers-prefix"))
                rh.bundle.update(data.get("requestheader-client-ca-file", ""))
                rh.allowed_names, rh.username_headers, rh.uid_headers = allowed, users, uids
                rh.group_headers, rh.extra_headers_prefixes = groups, extras
        except (ValueError, OSError) as error:
            raise AuthConfigError(f"invalid authentication configuration: {error}") from error

    async def _read_configmap(self) -> dict[str, str]:
        assert self._core_api is not None
        try:
            cm = await self._core_api.read_namespaced_config_map(CONFIGMAP_NAME, CONFIGMAP_NAMESPACE,
                                                                 _request_timeout=10)
        except ApiException as error:
            raise AuthConfigError(
                f"cannot read configmap {CONFIGMAP_NAMESPACE}/{CONFIGMAP_NAME}: HTTP {error.status} "
                f"{error.reason} (grant the extension-apiserver-authentication-reader role, or use "
                f"--authentication-skip-lookup with --client-ca-file)") from error
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
            raise AuthConfigError(f"cannot reach the cluster to read configmap {CONFIGMAP_NAMESPACE}/"
                                  f"{CONFIGMAP_NAME}: {error or type(error).__name__}") from error
        return dict(cm.data or {})

    def start(self) -> None:
        if self._task is None and self._refresh_interval > 0:
            self._task = asyncio.create_task(self._refresh_forever(), name="auth-config-refresh")

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_interval)
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


async def _read(path: Path) -> str:
    return await asyncio.to_thread(path.read_text)
