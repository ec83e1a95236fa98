"""
The user's kubeconfig, read the way kubectl reads it, and a client for the API server it names.

Which file: ``--kubeconfig`` if given, else every path of ``$KUBECONFIG`` (merged, the first to define a
name wins, the first ``current-context`` wins), else ``~/.kube/config``. Which context: ``--context``, else
the current one. Which namespace: ``-n``, else the context's, else ``default``. Credentials (client
certificates, bearer tokens and token files, exec plugins, auth providers) are loaded by kubernetes-asyncio,
which is made for exactly this; the plugin never handles them itself.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config

from kubectl_coredump.errors import PluginError

CONNECT_TIMEOUT = 30.0
# No byte for this long: the connection is dead (a download resumes; a small read fails).
READ_TIMEOUT = 60.0


@dataclasses.dataclass(frozen=True)
class Target:
    """Where to talk to and as whom: the kubeconfig paths, the context and the namespace."""

    paths: tuple[str, ...]
    context: str
    namespace: str


def kubeconfig_paths(*, flag: str | None, environ: Mapping[str, str]) -> tuple[str, ...]:
    if flag:
        return (flag,)
    env = environ.get("KUBECONFIG", "")
    if env:
        paths = tuple(os.path.expanduser(p) for p in env.split(os.pathsep) if p)
        if paths:
            return paths
    return (str(Path("~/.kube/config").expanduser()),)


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, yaml.YAMLError) as exc:
        raise PluginError(f"cannot read kubeconfig {path}: {exc}") from None
    return data if isinstance(data, dict) else {}


def resolve_target(*, kubeconfig: str | None, context: str | None, namespace: str | None,
                   environ: Mapping[str, str] = os.environ) -> Target:
    """The context and namespace kubectl would use with these flags."""
    paths = kubeconfig_paths(flag=kubeconfig, environ=environ)
    if kubeconfig and not Path(kubeconfig).exists():
        raise PluginError(f"kubeconfig {kubeconfig} does not exist")
    configs = [_read(p) for p in paths]
    if not any(configs):
        raise PluginError(f"no kubeconfig found (looked at {', '.join(paths)}); "
                          "set KUBECONFIG or pass --kubeconfig")
    chosen = context or next((c.get("current-context") for c in configs if c.get("current-context")), None)
    if not chosen:
        raise PluginError("the kubeconfig has no current context; pass --context NAME "
                          "(kubectl config get-contexts lists them)")
    found: dict[str, Any] | None = None
    for config in configs:
        for entry in config.get("contexts") or []:
            if isinstance(entry, dict) and entry.get("name") == chosen:
                found = entry.get("context") if isinstance(entry.get("context"), dict) else {}
                break
        if found is not None:
            break
    if found is None:
        raise PluginError(f'context "{chosen}" is not in the kubeconfig; kubectl config get-contexts lists them')
    return Target(paths=paths, context=chosen, namespace=namespace or found.get("namespace") or "default")


class Client:
    """An authenticated connection to the API server of a :class:`Target` (use ``async with``)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._api: k8s_client.ApiClient | None = None

    async def __aenter__(self) -> "Client":
        configuration = type.__call__(k8s_client.Configuration)
        try:
            await k8s_config.load_kube_config(config_file=os.pathsep.join(self.target.paths),
                                              context=self.target.context, client_configuration=configuration,
                                              persist_config=False)
        except (k8s_config.ConfigException, OSError, ValueError, KeyError) as exc:
            raise PluginError(f"cannot use context {self.target.context!r} of the kubeconfig: {exc}") from None
        self._api = k8s_client.ApiClient(configuration=configuration)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._api is not None:
            await self._api.close()
            self._api = None

    @property
    def server(self) -> str:
        assert self._api is not None
        return str(self._api.configuration.host)

    async def get(self, path: str, *, query: Sequence[tuple[str, str]] = (),
                  headers: Mapping[str, str] | None = None,
                  read_timeout: float = READ_TIMEOUT) -> aiohttp.ClientResponse:
        """
        ``GET path`` with the user's credentials; the response is returned unread, whatever its status
        (the caller reads or streams the body and releases it).
        """
        assert self._api is not None, "use the client inside async with"
        header_params = {"Accept": "application/json, */*", **(headers or {})}
        try:
            response = await self._api.call_api(
                path, "GET", query_params=list(query), header_params=header_params, auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT,
                                                       sock_read=read_timeout))
        except aiohttp.ClientError as exc:
            raise ConnectionProblem(f"cannot reach the API server {self.server}: {exc}") from exc
        except TimeoutError as exc:
            raise ConnectionProblem(f"the API server {self.server} did not answer in time") from exc
        return response


class ConnectionProblem(PluginError):
    """The server could not be reached or the connection broke: a download may retry."""
