"""The ``dump`` subresource (placeholder until the dump work lands)."""
from __future__ import annotations

import logging

from aiohttp import web

from apiserver.api import errors

logger = logging.getLogger(__name__)


async def get_dump(request: web.Request) -> web.StreamResponse:
    raise errors.ApiError(code=501, reason="NotImplemented", message="dump is not implemented yet")
