"""
Credentials of the kubeconfig forms :mod:`kubectl_coredump.kubeconfig` does not read itself: exec credential
plugins, auth providers (OIDC...), username/password. kubernetes-asyncio's loader runs them (it is made for
exactly this, and kept current with client-go); the result becomes the same
:class:`~kubectl_coredump.transport.Credentials` the small loader gives, so the requests themselves do not
depend on which loader ran.

Imported only for such a user: kubernetes-asyncio costs about a second of CPU to import.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

from kubectl_coredump.errors import PluginError
from kubectl_coredump.transport import Credentials


def load_credentials(*, paths: Sequence[str], context: str) -> Credentials:
    return asyncio.run(_load(paths=paths, context=context))


async def _load(*, paths: Sequence[str], context: str) -> Credentials:
    from kubernetes_asyncio import client as k8s_client
    from kubernetes_asyncio import config as k8s_config

    configuration = type.__call__(k8s_client.Configuration)  # a fresh one, not the library's shared default
    try:
        await k8s_config.load_kube_config(
            config_file=os.pathsep.join(paths),
            context=context,
            client_configuration=configuration,
            persist_config=False,
        )
        authorization = await configuration.get_api_key_with_prefix("BearerToken")
    except (k8s_config.ConfigException, OSError, ValueError, KeyError) as exc:
        raise PluginError(f"cannot use context {context!r} of the kubeconfig: {exc}") from None
    if configuration.proxy:
        raise PluginError(
            "the kubeconfig's cluster sets proxy-url, which kubectl coredump does not support; "
            "use a context that reaches the API server directly"
        )
    return Credentials(
        server=str(configuration.host),
        ca_file=configuration.ssl_ca_cert or None,
        insecure=not configuration.verify_ssl,
        tls_server_name=configuration.tls_server_name or None,
        cert_file=configuration.cert_file or None,
        key_file=configuration.key_file or None,
        authorization=authorization or None,
    )
