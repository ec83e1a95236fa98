"""
Handlers for what every Kubernetes API server answers besides its resources: discovery, OpenAPI v2/v3,
/version and the health endpoints (/healthz, /livez, /readyz with a storage check).
"""

from __future__ import annotations

import asyncio
import logging
import platform
import sys

from aiohttp import web

from apiserver.api import discovery, errors, openapi, openapi_proto
from apiserver.api.conventions import parse_accept
from apiserver.context import REGISTRY
from apiserver.handlers import io
from apiserver.registry.errors import RegistryError

logger = logging.getLogger(__name__)

VERSION = "0.1.0"
READY_CHECK_TIMEOUT = 2.0


def _aggregated_version(request: web.Request) -> str | None:
    """The apidiscovery.k8s.io version the client asked for first, if it asked for aggregated discovery."""
    for media in parse_accept(request.headers.get("Accept")):
        if media.params.get("as") == "APIGroupDiscoveryList" and media.params.get("g") == "apidiscovery.k8s.io":
            if media.params.get("v") in discovery.AGGREGATED_VERSIONS:
                return media.params["v"]
        elif media.type in ("application/json", "*/*", "application/*") and not media.params.get("as"):
            return None
    return None


def _with_etag(request: web.Request, body: bytes, etag: str, content_type: str) -> web.Response:
    headers = {"ETag": etag, "Vary": "Accept", "Cache-Control": "public"}
    if etag in [t.strip() for t in request.headers.get("If-None-Match", "").split(",")]:
        return web.Response(status=304, headers=headers)
    response = web.Response(body=body, headers=headers)
    response.headers["Content-Type"] = content_type
    return response


async def apis(request: web.Request) -> web.Response:
    version = _aggregated_version(request)
    if version is not None:
        body, etag = discovery.encode_with_etag(discovery.aggregated_discovery(version))
        return _with_etag(request, body, etag, discovery.aggregated_media_type(version))
    return io.respond(request, discovery.api_group_list())


async def api_group(request: web.Request) -> web.Response:
    return io.respond(request, discovery.api_group())


async def api_resources(request: web.Request) -> web.Response:
    return io.respond(request, discovery.api_resource_list())


async def openapi_v2(request: web.Request) -> web.Response:
    # kubectl 1.27/1.28 ask for gnostic's protobuf only (and fail on 406); the aggregator asks for JSON.
    for media in parse_accept(request.headers.get("Accept")):
        if media.type in openapi_proto.MEDIA_TYPES:
            body, etag = openapi_proto.encoded_v2()
            return _with_etag(request, body, etag, openapi_proto.MEDIA_TYPE)
        if media.type in ("application/json", "*/*", "application/*"):
            body, etag = openapi_proto.encoded_v2_json()
            return _with_etag(request, body, etag, "application/json")
    raise errors.not_acceptable(f"only application/json and {openapi_proto.MEDIA_TYPE} are served for /openapi/v2")


async def openapi_v3_root(request: web.Request) -> web.Response:
    return io.respond(request, openapi.v3_root(), yaml_out=False)


async def openapi_v3_group_version(request: web.Request) -> web.Response:
    body, digest = openapi.encoded_v3()
    asked = request.query.get("hash")
    if asked and asked != digest:
        # kube-apiserver redirects a stale hash to the current document rather than serving old content.
        raise web.HTTPMovedPermanently(location=f"/openapi/v3/{openapi.V3_PATH}?hash={digest}")
    headers = {"ETag": f'"{digest}"', "Vary": "Accept"}
    headers["Cache-Control"] = "public, immutable, max-age=31536000" if asked else "no-cache, private"
    if f'"{digest}"' in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    response = web.Response(body=body, headers=headers)
    response.headers["Content-Type"] = "application/json"
    return response


async def version(request: web.Request) -> web.Response:
    return io.respond(
        request,
        {
            "major": "0",
            "minor": "1",
            "gitVersion": f"v{VERSION}",
            "gitCommit": "",
            "gitTreeState": "",
            "buildDate": "",
            "goVersion": f"python{sys.version.split()[0]}",
            "compiler": "cpython",
            "platform": f"{platform.system().lower()}/{platform.machine()}",
        },
        yaml_out=False,
    )


async def _storage_check(request: web.Request) -> str | None:
    try:
        await asyncio.wait_for(request.app[REGISTRY].check(), timeout=READY_CHECK_TIMEOUT)
    except (RegistryError, asyncio.TimeoutError) as error:
        return str(error) or "timed out"
    return None


async def _health(request: web.Request, *, name: str, with_storage: bool) -> web.Response:
    checks: list[tuple[str, str | None]] = [("ping", None)]
    if with_storage:
        checks.append(("storage", await _storage_check(request)))
    failed = [check for check, problem in checks if problem]
    verbose = "verbose" in request.query
    if not failed and not verbose:
        return web.Response(text="ok", content_type="text/plain")
    lines = [f"[+]{check} ok" if not problem else f"[-]{check} failed: reason withheld" for check, problem in checks]
    lines.append(f"{name} check failed" if failed else f"{name} check passed")
    for check, problem in checks:
        if problem:
            logger.warning("%s check %s failed: %s", name, check, problem)
    return web.Response(text="\n".join(lines) + "\n", status=500 if failed else 200, content_type="text/plain")


async def healthz(request: web.Request) -> web.Response:
    return await _health(request, name="healthz", with_storage=False)


async def livez(request: web.Request) -> web.Response:
    return await _health(request, name="livez", with_storage=False)


async def readyz(request: web.Request) -> web.Response:
    return await _health(request, name="readyz", with_storage=True)
