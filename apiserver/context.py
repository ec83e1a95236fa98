"""
Typed keys for what the aiohttp application and each request carry, so modules share state by name.

``app[REGISTRY]`` is the CoredumpEndpoint registry, ``app[STORAGE_ROOT]`` the shared core storage,
``app[SHUTTING_DOWN]`` is set when the server stops, ``request[USER]`` the authenticated user and
``request[ATTRIBUTES]`` what it is authorized for.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from apiserver.auth import RequestAttributes, UserInfo
    from apiserver.registry.endpoints import EndpointRegistry

REGISTRY: web.AppKey["EndpointRegistry"] = web.AppKey("registry")
STORAGE_ROOT: web.AppKey[Path] = web.AppKey("storage_root", Path)
# Set when the server starts shutting down, so long-running streams (watch, dump) end at once
# instead of holding the shutdown until its grace period runs out.
SHUTTING_DOWN: web.AppKey[asyncio.Event] = web.AppKey("shutting_down", asyncio.Event)

USER: web.RequestKey["UserInfo"] = web.RequestKey("user")
ATTRIBUTES: web.RequestKey["RequestAttributes"] = web.RequestKey("attributes")
