"""
Leader election through the Kubernetes Lease API (``coordination.k8s.io/v1``), with kubernetes-asyncio's elector.

:class:`LeaseElector` runs ``work`` only while this process holds the Lease; a replica that loses it (or cannot
renew within ``renew_deadline``) stops ``work`` at once, and another takes over within ``lease_duration`` after
the holder dies. Errors reaching the API (the library raises them from its loop) never end the election: the
elector logs one line per change of error and tries again after ``retry_period``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from kubernetes_asyncio.leaderelection import electionconfig, leaderelection
from kubernetes_asyncio.leaderelection.resourcelock.leaselock import LeaseLock

logger = logging.getLogger(__name__)


def default_identity() -> str:
    return f"{socket.gethostname()}_{os.getpid()}_{uuid.uuid4().hex[:8]}"


class LeaseElector:
    def __init__(
        self,
        *,
        api_client: Any,
        name: str,
        namespace: str,
        identity: str | None = None,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
    ) -> None:
        self.api_client = api_client
        self.name = name
        self.namespace = namespace
        self.identity = identity or default_identity()
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.leading = False
        self.terms = 0
        self._term: asyncio.Task[Any] | None = None

    async def run(self, work: Callable[[], Awaitable[None]]) -> None:
        """Campaign forever (until cancelled); ``work`` runs in each term and is cancelled when it ends."""
        last_error = None
        while True:
            lock = LeaseLock(self.name, self.namespace, self.identity, self.api_client)

            async def started() -> None:
                self.leading = True
                self.terms += 1
                self._term = asyncio.current_task()
                logger.info(
                    "leading %s/%s as %s",
                    self.namespace,
                    self.name,
                    self.identity,
                    extra={"lease": f"{self.namespace}/{self.name}", "identity": self.identity},
                )
                await work()

            async def stopped() -> None:
                self.leading = False
                logger.info(
                    "no longer leading %s/%s",
                    self.namespace,
                    self.name,
                    extra={"lease": f"{self.namespace}/{self.name}"},
                )

            # Whole seconds: the library writes str(lease_duration) into the Lease and reads it back with int(),
            # so a float (15.0) fails every attempt; the Lease API's leaseDurationSeconds is an integer anyway.
            config = electionconfig.Config(
                lock, math.ceil(self.lease_duration), self.renew_deadline, self.retry_period, started, stopped
            )
            try:
                await leaderelection.LeaderElection(config).run()
                last_error = None
            except asyncio.CancelledError:
                # The library runs each term in a task of its own: stopping the campaign must stop the work too.
                self.leading = False
                if self._term is not None:
                    self._term.cancel()
                raise
            except Exception as e:  # the API away must not end the campaign
                self.leading = False
                message = f"{type(e).__name__}: {e}"
                if message != last_error:
                    logger.warning(
                        "leader election for %s/%s failed: %s; retrying",
                        self.namespace,
                        self.name,
                        message,
                        extra={"lease": f"{self.namespace}/{self.name}"},
                    )
                last_error = message
            await asyncio.sleep(self.retry_period)
