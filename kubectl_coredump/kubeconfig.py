"""
The user's kubeconfig, read the way kubectl reads it: which server, how to trust it, who the user is.

Which file: ``--kubeconfig`` if given, else every path of ``$KUBECONFIG`` (merged, the first to define a
name wins, the first ``current-context`` wins), else ``~/.kube/config``. Which context: ``--context``, else
the current one. Which namespace: ``-n``, else the context's, else ``default``.

Credentials: the forms nearly every kubeconfig uses are read here, as client-go reads them (its
``clientcmd`` loader): the cluster's ``server``, ``certificate-authority(-data)``,
``insecure-skip-tls-verify``, ``tls-server-name``; the user's ``client-certificate(-data)`` +
``client-key(-data)``, ``token`` (which wins over) ``tokenFile``. ``-data`` wins over the file; a relative
file is relative to the kubeconfig file that names it. A user with ``exec``, ``auth-provider`` or
``username``/``password`` is loaded by kubernetes-asyncio instead (:mod:`kubectl_coredump.fallback`): it is
made for those, and importing it costs a second of CPU that the common forms do not need to pay.
Impersonation (``as``, ``as-groups``...) and ``proxy-url`` are refused with one line rather than ignored
(ignoring them would act as someone else, or bypass a proxy the user relies on).

The kubeconfig is untrusted input: every value used is type-checked, and no secret is ever printed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import base64
import binascii

import yaml

from kubectl_coredump.errors import PluginError
from kubectl_coredump.transport import Credentials

# Users with these are loaded by kubernetes-asyncio (kubectl_coredump.fallback).
FALLBACK_KEYS = ("exec", "auth-provider", "username", "password")
IMPERSONATION_KEYS = ("as", "as-uid", "as-groups", "as-user-extra")
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclasses.dataclass(frozen=True)
class Target:
    """Where to talk to and as whom: the kubeconfig paths, the context and the namespace."""

    paths: tuple[str, ...]
    context: str
    namespace: str
    # Each path with what it holds, as read once.
    documents: tuple[tuple[str, dict[str, Any]], ...] = dataclasses.field(default=(), repr=False, compare=False)


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
            data = yaml.load(handle, Loader=_LOADER)  # a safe loader (libyaml's when built)
    except FileNotFoundError:
        return {}
    except (OSError, yaml.YAMLError) as exc:
        raise PluginError(f"cannot read kubeconfig {path}: {exc}") from None
    return data if isinstance(data, dict) else {}


def read_contexts(paths: tuple[str, ...]) -> list[str]:
    """The names of the contexts these kubeconfig files define (for completion; unreadable files count as empty)."""
    names: list[str] = []
    for path in paths:
        try:
            config = _read(path)
        except PluginError:
            continue
        entries = config.get("contexts")
        for entry in entries if isinstance(entries, list) else []:
            name = entry.get("name") if isinstance(entry, dict) else None
            if isinstance(name, str) and name not in names:
                names.append(name)
    return names


def resolve_target(
    *, kubeconfig: str | None, context: str | None, namespace: str | None, environ: Mapping[str, str] = os.environ
) -> Target:
    """The context and namespace kubectl would use with these flags."""
    paths = kubeconfig_paths(flag=kubeconfig, environ=environ)
    if kubeconfig and not Path(kubeconfig).exists():
        raise PluginError(f"kubeconfig {kubeconfig} does not exist")
    configs = [_read(p) for p in paths]
    if not any(configs):
        raise PluginError(f"no kubeconfig found (looked at {', '.join(paths)}); set KUBECONFIG or pass --kubeconfig")
    chosen = context or next((c.get("current-context") for c in configs if c.get("current-context")), None)
    if not chosen:
        raise PluginError(
            "the kubeconfig has no current context; pass --context NAME (kubectl config get-contexts lists them)"
        )
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
    return Target(
        paths=paths,
        context=chosen,
        namespace=namespace or found.get("namespace") or "default",
        documents=tuple(zip(paths, configs, strict=True)),
    )


def _named(target: Target, section: str, name: str) -> tuple[str, dict[str, Any]] | None:
    """The first entry called ``name`` in ``section`` (clusters, users, contexts) of any file, with its file."""
    key = section[:-1]  # "clusters" -> "cluster"
    for path, config in target.documents:
        entries = config.get(section)
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict) and entry.get("name") == name:
                value = entry.get(key)
                return path, value if isinstance(value, dict) else {}
    return None


def _text(section: dict[str, Any], key: str, *, what: str) -> str | None:
    value = section.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise PluginError(f"the kubeconfig's {what} has a {key} that is not a string")
    return value


def _data(section: dict[str, Any], key: str, *, what: str) -> bytes | None:
    value = _text(section, key, what=what)
    if value is None:
        return None
    try:
        return base64.b64decode("".join(value.split()), validate=True)  # line breaks ignored, as Go does
    except (binascii.Error, ValueError):
        raise PluginError(f"the kubeconfig's {what} has a {key} that is not base64") from None


def _file(section: dict[str, Any], key: str, *, what: str, origin: str) -> str | None:
    value = _text(section, key, what=what)
    if value is None:
        return None
    return value if os.path.isabs(value) else os.path.join(os.path.dirname(os.path.abspath(origin)), value)


def load_credentials(target: Target) -> Credentials:
    """The server and credentials of the target's context (kubernetes-asyncio loads the forms not read here)."""
    context = _named(target, "contexts", target.context)
    assert context is not None, "resolve_target found it"
    cluster_name = context[1].get("cluster")
    user_name = context[1].get("user")
    cluster = _named(target, "clusters", cluster_name) if isinstance(cluster_name, str) and cluster_name else None
    if cluster is None:
        raise PluginError(f'context "{target.context}" names cluster {cluster_name!r}, which is not in the kubeconfig')
    user: tuple[str, dict[str, Any]] = ("", {})
    if isinstance(user_name, str) and user_name:
        found = _named(target, "users", user_name)
        if found is None:
            raise PluginError(f'context "{target.context}" names user "{user_name}", which is not in the kubeconfig')
        user = found
    origin, fields = user
    impersonating = [k for k in IMPERSONATION_KEYS if fields.get(k)]
    if impersonating:
        raise PluginError(
            f'the kubeconfig\'s user "{user_name}" impersonates ({", ".join(impersonating)}), which '
            "kubectl coredump does not support; use a context without it"
        )
    cluster_origin, cluster_fields = cluster
    what = f'cluster "{cluster_name}"'
    if _text(cluster_fields, "proxy-url", what=what):
        raise PluginError(
            f"the kubeconfig's {what} sets proxy-url, which kubectl coredump does not support; "
            "use a context that reaches the API server directly"
        )
    if any(k in fields for k in FALLBACK_KEYS):
        from kubectl_coredump import fallback

        return fallback.load_credentials(paths=target.paths, context=target.context)
    server = _text(cluster_fields, "server", what=what)
    if server is None:
        raise PluginError(f"the kubeconfig's {what} has no server")
    insecure = cluster_fields.get("insecure-skip-tls-verify") is True
    ca_data = _data(cluster_fields, "certificate-authority-data", what=what)
    who = f'user "{user_name}"'
    token = _text(fields, "token", what=who)
    token_file = _file(fields, "tokenFile", what=who, origin=origin)
    if token is None and token_file is not None:
        try:
            with open(token_file, encoding="utf-8") as handle:
                token = handle.read(1 << 20).strip() or None
        except (OSError, UnicodeDecodeError) as exc:
            raise PluginError(f"cannot read the tokenFile of the kubeconfig's {who}: {exc}") from None
    if token is not None and any(c in token for c in "\r\n\0"):
        raise PluginError(f"the token of the kubeconfig's {who} is not one line")
    return Credentials(
        server=server,
        ca_data=ca_data.decode("ascii", "replace") if ca_data is not None else None,
        ca_file=None if ca_data else _file(cluster_fields, "certificate-authority", what=what, origin=cluster_origin),
        insecure=insecure,
        tls_server_name=_text(cluster_fields, "tls-server-name", what=what),
        cert_data=_data(fields, "client-certificate-data", what=who),
        cert_file=_file(fields, "client-certificate", what=who, origin=origin),
        key_data=_data(fields, "client-key-data", what=who),
        key_file=_file(fields, "client-key", what=who, origin=origin),
        authorization=f"Bearer {token}" if token else None,
    )
