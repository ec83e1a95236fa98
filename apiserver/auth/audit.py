"""
The audit trail of dumps: one JSON line per dump served, naming who got which cores.

Cores hold passwords, keys and customer data; whoever reads the logs must be able to tell who
downloaded what. The dump handler calls :func:`audit_dump` once per request, whatever the outcome.
The fields travel as the record's ``extra``, so the server's JSON formatter (:mod:`apiserver.logs`)
writes them as top-level keys of one JSON object per line.
"""
from __future__ import annotations

import logging

from aiohttp import web

from apiserver import context
from apiserver.auth import UserInfo

logger = logging.getLogger("coredump.audit")


def audit_dump(*, request: web.Request, namespace: str, pod: str, cores: int, bytes_sent: int,
               outcome: str) -> None:
    """Log one line: user, groups, namespace, pod, number of cores, bytes sent and the outcome."""
    user: UserInfo | None = request.get(context.USER)
    record = {
        "audit": "dump",
        "user": user.name if user else "",
        "uid": user.uid if user else "",
        "groups": list(user.groups) if user else [],
        "namespace": namespace,
        "pod": pod,
        "cores": cores,
        "bytes": bytes_sent,
        "outcome": outcome,
        "query": request.query_string,
        "remote": request.remote or "",
    }
    logger.info("dump served", extra=record)
