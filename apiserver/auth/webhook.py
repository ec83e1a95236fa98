"""
One call to the cluster whose answer is read as raw bytes, for the strict readers of
:mod:`apiserver.auth.reviews`: ``await call_cluster(start=..., timeout=...)`` → :class:`Answer`.

``start`` begins a kubernetes-asyncio call made with ``_preload_content=False`` (so its models never
interpret the body); the body is read up to :data:`~apiserver.auth.reviews.MAX_ANSWER_BYTES` + 1 bytes
and the connection released. Connection failures and timeouts raise :class:`Unreachable`; every HTTP
answer, whatever its code, comes back as an :class:`Answer` for the caller to judge.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from apiserver.auth.reviews import MAX_ANSWER_BYTES


class Unreachable(Exception):
    """No HTTP answer: the connection failed or the call took longer than its timeout."""

    def __init__(self, message: str, *, seconds: float) -> None:
        super().__init__(message)
        self.seconds = seconds


@dataclasses.dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    seconds: float


async def call_cluster(*, start: Callable[[], Awaitable[Any]], timeout: float) -> Answer:
    began = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            response: aiohttp.ClientResponse = await start()
            try:
                body = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MAX_ANSWER_BYTES:
                        break  # the reader refuses it by its size; no need to read the rest
            finally:
                response.release()
    except (aiohttp.ClientError, TimeoutError, OSError) as error:
        raise Unreachable(str(error) or type(error).__name__, seconds=time.perf_counter() - began) from error
    return Answer(status=response.status, body=bytes(body), seconds=time.perf_counter() - began)
