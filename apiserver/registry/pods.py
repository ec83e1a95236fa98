"""
The live pods of the cluster, as far as endpoints need them: a pod's uid, read with kubernetes-asyncio.

Configured from a kubeconfig (``--kubeconfig``) or the in-cluster service account; without either
(dev mode) there is no cluster and :meth:`PodLookup.pod_uid` is never asked.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from apiserver.registry import errors

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT_SECONDS = 10


class PodLookup:
    def __init__(self, *, kubeconfig: str | None = None, in_cluster: bool = False) -> None:
        self.kubeconfig = kubeconfig
        self.in_cluster = in_cluster
        self._api: client.ApiClient | None = None

    @property
    def configured(self) -> bool:
        return self._api is not None

    @property
    def api_client(self) -> client.ApiClient | None:
        """The cluster client once started (also used for the CoredumpEndpoint Event watch), else None."""
        return self._api

    async def start(self) -> None:
        if self.kubeconfig:
            self._api = await config.new_client_from_config(config_file=self.kubeconfig, persist_config=False)
        elif self.in_cluster:
            configuration = client.Configuration()
            try:
                config.load_incluster_config(client_configuration=configuration)
            except ConfigException as error:
                # Not fatal: endpoints then need spec.podUID (or a single stored incarnation) as in dev mode.
                logger.warning("no in-cluster configuration, pods cannot be looked up: %s", error)
                return
            self._api = client.ApiClient(configuration=configuration)

    async def close(self) -> None:
        if self._api is not None:
            await self._api.close()
            self._api = None

    async def pod_uid(self, *, namespace: str, name: str) -> str | None:
        """The uid of the live pod, ``None`` if there is no such pod; 503 if the cluster cannot say."""
        assert self._api is not None
        try:
            pod = await client.CoreV1Api(self._api).read_namespaced_pod(
                name, namespace, _request_timeout=REQUEST_TIMEOUT_SECONDS
            )
        except ApiException as error:
            if error.status == 404:
                return None
            logger.warning("reading pod %s/%s failed: %s %s", namespace, name, error.status, error.reason)
            raise errors.Unavailable(
                f'cannot read pod "{name}" in namespace "{namespace}" to fill spec.podUID '
                f"({error.status} {error.reason}); give spec.podUID or try again"
            ) from None
        except (OSError, asyncio.TimeoutError, aiohttp.ClientError) as error:
            logger.warning("reading pod %s/%s failed: %s", namespace, name, error)
            raise errors.Unavailable(
                f'cannot reach the cluster to read pod "{name}" in namespace "{namespace}" '
                f"({error}); give spec.podUID or try again"
            ) from None
        return pod.metadata.uid
