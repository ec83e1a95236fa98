"""
The audit trail of dumps: one JSON line per dump request that reached a decision, naming who asked for what
and what they got.

Cores hold passwords, keys and customer data; whoever reads the logs must be able to tell who downloaded
what, and who tried. :func:`audit_dump` is called exactly once per ``dump`` request that was authenticated:
by the auth pipeline when authorization refuses it (403) or cannot decide (500), and by the dump handler
for everything after that — served (200/206, with the bytes actually sent), not found (404), a bad query
(400), cores changing underneath (409). The fields travel as the record's ``extra``, so the server's JSON
formatter (:mod:`apiserver.logs`) writes them as top-level keys of one JSON object per line.
"""

from __future__ import annotations

import logging

from aiohttp import web

from apiserver import context, metrics
from apiserver.auth import UserInfo

logger = logging.getLogger("coredump.audit")


def audit_dump(
    *,
    request: web.Request,
    namespace: str,
    pod: str,
    outcome: str,
    code: int,
    bytes_sent: int = 0,
    cores: int = 0,
    user: UserInfo | None = None,
) -> None:
    """Log one line: user, groups, namespace, pod, query, status code, cores, bytes sent and the outcome.

    ``outcome`` is one of complete, disconnected, error (served, then cut), denied, not_found, invalid.
    """
    user = user or request.get(context.USER)
    record = {
        "audit": "dump",
        "user": user.name if user else "",
        "uid": user.uid if user else "",
        "groups": list(user.groups) if user else [],
        "namespace": namespace,
        "pod": pod,
        "query": request.query_string,
        "code": code,
        "cores": cores,
        "bytes": bytes_sent,
        "outcome": outcome,
        "remote": request.remote or "",
    }
    metrics.DUMPS.labels(outcome=outcome).inc()
    logger.info(f"dump {outcome}", extra=record)
