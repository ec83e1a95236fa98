"""
``GET .../namespaces/NS/coredumpendpoints/NAME/dump``: a pod's cores as one tar.gz, streamed.

Authorization (``get coredumpendpoints/dump`` in NS) happened in the auth middleware. Here: the
query is validated (400), the endpoint looked up (404 if absent), its incarnation's cores selected
(404 if none match), the archive planned (size, ETag), a ``Range`` honoured under ``If-Range``,
and the bytes streamed. ``objects=true`` adds the ELF objects those cores' metadata records as verified at their
capture (``apiserver.dump.objects``): reached only through a core of this namespace's dump, never by a build-id
the client names. Every dump request that got here is audited once, whatever its outcome: a refusal
(404, 400, 409) with its code, a transfer with the bytes actually sent. (A 403 is audited by the auth
pipeline, which refuses it before this handler.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from aiohttp import web

from handler import layout

from apiserver import context, metrics
from apiserver.auth.audit import audit_dump
from apiserver.api import errors
from apiserver.dump.objects import ObjectLimits
from apiserver.dump.options import OBJECT_LIMITS
from apiserver.dump.plan import DumpPlan, PlanError, build_plan
from apiserver.dump.query import DumpQuery, parse_query
from apiserver.dump.ranges import select_range
from apiserver.dump.select import select_cores
from apiserver.dump.stream import CoreVanished, iter_range
from apiserver.registry.errors import RegistryError

logger = logging.getLogger(__name__)


async def get_dump(request: web.Request) -> web.StreamResponse:
    namespace = request.match_info["namespace"]
    name = request.match_info["name"]
    try:
        return await _get_dump(request, namespace=namespace, name=name)
    except errors.ApiError as error:
        # Refused before a byte was sent (404, 400, 409, ...): audited with its code, then answered.
        _audit_refusal(request, namespace=namespace, pod=name, code=error.code)
        raise
    except RegistryError as error:
        refusal = errors.from_registry(error)
        _audit_refusal(request, namespace=namespace, pod=name, code=refusal.code)
        raise refusal from None


def _audit_refusal(request: web.Request, *, namespace: str, pod: str, code: int) -> None:
    outcome = {404: "not_found", 400: "invalid", 416: "invalid"}.get(code, "error")
    try:
        audit_dump(request=request, namespace=namespace, pod=pod, outcome=outcome, code=code)
    except Exception:  # an audit failure must not hide the answer
        logger.exception("audit of a refused dump failed")


async def _get_dump(request: web.Request, *, namespace: str, name: str) -> web.StreamResponse:
    query = parse_query(request.query)
    try:
        layout.validate_namespace(namespace)
        layout.validate_pod_name(name)
    except layout.InvalidName:
        # No endpoint can carry such a name, so it is simply not there (and never a path).
        raise errors.not_found(name=name) from None

    # Only spec.podUID is needed: the dump lists the cores itself, fresh, not from the status cache.
    obj = await request.app[context.REGISTRY].get(namespace=namespace, name=name, with_status=False)
    pod_uid = (obj.get("spec") or {}).get("podUID")
    plan = None
    if pod_uid:
        try:
            limits = request.app.get(OBJECT_LIMITS, ObjectLimits()) if query.objects else None
            plan = await asyncio.to_thread(
                _plan,
                request.app[context.STORAGE_ROOT],
                namespace=namespace,
                pod=name,
                pod_uid=pod_uid,
                query=query,
                objects=limits,
            )
        except layout.InvalidName as exc:
            raise errors.internal(
                f"coredumpendpoint {namespace}/{name} has an unusable spec.podUID: {exc}; "
                "delete it and create it again with the pod's uid"
            ) from None
        except PlanError as exc:
            # A core removed by retention between listing and planning: the client may simply retry.
            raise errors.conflict(
                name=name, message=f"the cores changed while reading them ({exc}); download again"
            ) from None
    if plan is None:
        what = query.describe()
        raise errors.ApiError(
            code=404,
            reason="NotFound",
            message=f'no cores of pod "{name}" (uid {pod_uid or "unknown"}) in namespace "{namespace}"'
            + (f" match {what}; status.cores of the endpoint lists the stored ones" if what else ""),
            details={"group": errors.GROUP, "kind": f"{errors.RESOURCE}/dump", "name": name},
        )

    byte_range = select_range(
        range_header=request.headers.get("Range"),
        if_range=request.headers.get("If-Range"),
        etag=plan.etag,
        size=plan.size,
    )
    start, end = (byte_range.start, byte_range.end) if byte_range else (0, plan.size)
    response = web.StreamResponse(status=206 if byte_range else 200)
    response.content_type = "application/gzip"
    response.content_length = end - start
    response.headers["Content-Disposition"] = f'attachment; filename="{namespace}_{name}_cores.tar.gz"'
    response.headers["Accept-Ranges"] = "bytes"
    response.headers["ETag"] = plan.etag
    # Cores hold secrets: no shared cache may keep them.
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    if byte_range:
        response.headers["Content-Range"] = byte_range.content_range()

    return await _send(request, response, plan=plan, namespace=namespace, pod=name, start=start, end=end)


def _plan(
    root: Path, *, namespace: str, pod: str, pod_uid: str, query: DumpQuery, objects: ObjectLimits | None
) -> DumpPlan | None:
    """Blocking: the archive of the matching cores, ``None`` if none match (one trip to a worker thread)."""
    cores = select_cores(root=root, namespace=namespace, pod=pod, pod_uid=pod_uid, query=query)
    if not cores:
        return None
    return build_plan(cores) if objects is None else build_plan(cores, objects=objects)


async def _send(
    request: web.Request,
    response: web.StreamResponse,
    *,
    plan: DumpPlan,
    namespace: str,
    pod: str,
    start: int,
    end: int,
) -> web.StreamResponse:
    sent = 0
    outcome = "error"
    began = time.monotonic()
    try:
        await response.prepare(request)
        if request.method == "HEAD":
            outcome = "complete"
            return response
        # aclosing: a failed write (client gone) closes the reader at once, not whenever GC runs.
        async with contextlib.aclosing(iter_range(plan, start=start, end=end)) as chunks:
            async for chunk in chunks:
                await response.write(chunk)
                sent += len(chunk)
        await response.write_eof()
        outcome = "complete"
        return response
    except CoreVanished as exc:
        # The promised bytes cannot be sent: cut the connection so the client sees a short body
        # (Content-Length) and retries, rather than receiving a well-formed but wrong archive.
        logger.warning("dump of %s/%s cut after %d bytes: %s", namespace, pod, sent, exc)
        if request.transport is not None:
            request.transport.abort()
        return response
    except ConnectionError:
        outcome = "disconnected"  # the client hung up: audited as such, not an error of ours
        return response
    except asyncio.CancelledError:
        outcome = "disconnected"
        raise
    finally:
        _audit(
            request,
            response,
            namespace=namespace,
            pod=pod,
            plan=plan,
            start=start,
            end=end,
            sent=sent,
            outcome=outcome,
            seconds=time.monotonic() - began,
        )


def _audit(
    request: web.Request,
    response: web.StreamResponse,
    *,
    namespace: str,
    pod: str,
    plan: DumpPlan,
    start: int,
    end: int,
    sent: int,
    outcome: str,
    seconds: float,
) -> None:
    try:
        audit_dump(
            request=request,
            namespace=namespace,
            pod=pod,
            cores=len(plan.cores),
            bytes_sent=sent,
            outcome=outcome,
            code=response.status,
        )
    except Exception:  # an audit failure must not turn a served dump into a 500
        logger.exception("audit of a dump failed")
    metrics.DUMP_BYTES.inc(sent)
    metrics.DUMP_DURATION.labels(outcome=outcome).observe(seconds)
    # The audit line says who got what; this one says how the transfer went, for operators.
    logger.info(
        "dump streamed",
        extra={
            "namespace": namespace,
            "pod": pod,
            "range": [start, end],
            "archiveSize": plan.size,
            "bytesSent": sent,
            "outcome": outcome,
            "seconds": round(seconds, 3),
            "mbPerSecond": round(sent / seconds / 1e6, 1) if seconds > 0 else None,
        },
    )
