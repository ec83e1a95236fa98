"""
Download a dump to a :class:`Sink`, resuming with ``Range`` + ``If-Range`` after any cut.

A cut is anything that ends the body short of ``Content-Length``: the aggregator's request timeout, a
dropped connection, a server replica restarted (connection refused until it is back), a 409 or 5xx
before the first byte. Each resume asks for ``bytes=N-`` under the ``ETag`` of the first response: a
206 continues the same archive; a 200 means the archive changed (a core was added or removed), so the
sink starts over (a file sink can; stdout cannot and the command fails, saying to run it again).

Retries are bounded: :data:`MAX_FAILURES` attempts in a row that bring no new byte, with exponential
backoff between them; an attempt that brought bytes resumes at once and resets the count.

The body is read with blocking ``readinto`` into one reusable buffer of :data:`CHUNK` bytes and handed
to the sink as a view of it (stdout writes it straight to the fd; the extractor copies it into its queue):
no per-chunk allocation, no event loop between the socket and the file.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Sequence
from typing import Protocol

from kubectl_coredump import api
from kubectl_coredump.errors import Exit, PluginError
from kubectl_coredump.progress import Progress
from kubectl_coredump.transport import Client, ConnectionProblem

MAX_FAILURES = 8
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 8.0
CHUNK = 1 << 20
RETRY_STATUSES = {409, 429, 500, 502, 503, 504}
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")


class Sink(Protocol):
    """Where the archive's bytes go, in order."""

    @property
    def written(self) -> int: ...

    def write(self, data: memoryview) -> None:
        """Take these bytes (a view of the downloader's buffer, valid only during the call)."""
        ...

    def restart(self) -> None:
        """Discard everything written: the archive changed. Raise PluginError when that is impossible."""
        ...


@dataclasses.dataclass
class Result:
    size: int
    etag: str | None
    resumes: int


@dataclasses.dataclass
class _Archive:
    """What the first response said about the archive; kept across attempts (a cut loses nothing of it)."""

    etag: str | None = None
    total: int | None = None


class _Cut(Exception):
    """This attempt ended early; the reason is for the user's log line."""


class _ArchiveChanged(Exception):
    pass


def download(
    client: Client,
    *,
    namespace: str,
    name: str,
    query: Sequence[tuple[str, str]],
    sink: Sink,
    progress: Progress,
    max_failures: int = MAX_FAILURES,
) -> Result:
    path = api.dump_path(namespace, name)
    archive = _Archive()
    buffer = memoryview(bytearray(CHUNK))
    failures = 0
    resumes = 0
    while True:
        before = sink.written
        try:
            _attempt(
                client,
                path=path,
                query=query,
                sink=sink,
                archive=archive,
                progress=progress,
                request=api.dump_request(namespace, name),
                buffer=buffer,
            )
            if archive.total is None or sink.written == archive.total:
                return Result(size=sink.written, etag=archive.etag, resumes=resumes)
            reason = f"the body ended at {sink.written} of {archive.total} bytes"
        except _Cut as exc:
            reason = str(exc)
        except _ArchiveChanged:
            sink.restart()
            progress.note("the archive changed on the server (a core was added or removed): downloading it again")
            archive.etag, archive.total = None, None
            continue
        progressed = sink.written > before
        failures = 0 if progressed else failures + 1
        if failures >= max_failures:
            raise PluginError(
                f"the download stopped at {sink.written} of {archive.total or '?'} bytes after "
                f"{max_failures} attempts without progress (last: {reason}); run the command again",
                code=Exit.INCOMPLETE,
            )
        resumes += 1
        progress.resumed()
        progress.note(f"resuming at byte {sink.written}: {reason}")
        if failures:
            time.sleep(min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (failures - 1)))


def _attempt(
    client: Client,
    *,
    path: str,
    query: Sequence[tuple[str, str]],
    sink: Sink,
    archive: _Archive,
    progress: Progress,
    request: api.Request,
    buffer: memoryview,
) -> None:
    """One request, recording what it learns in ``archive``. Raises _Cut when it should be retried."""
    offset = sink.written
    etag, total = archive.etag, archive.total
    headers = {"Accept": "application/gzip, application/json"}
    if offset and etag:
        headers["Range"] = f"bytes={offset}-"
        headers["If-Range"] = etag
    try:
        response = client.get(path, query=query, headers=headers)
    except ConnectionProblem as exc:
        raise _Cut(exc.message) from None
    try:
        status = response.status
        # 404 while resuming: a restarted replica may not have re-created the endpoint yet (bounded retries).
        if status in RETRY_STATUSES or (status == 404 and offset):
            body = api.read_bounded(response, limit=1 << 16)
            raise _Cut(api.error_for(status=status, body=body, request=request, server=client.server).message)
        if status == 416 and total is not None and offset == total:
            return
        if status not in (200, 206):
            body = api.read_bounded(response, limit=1 << 16)
            raise api.error_for(status=status, body=body, request=request, server=client.server)
        new_etag = response.headers.get("ETag")
        length = response.content_length
        if status == 200:
            if offset:
                raise _ArchiveChanged()
            total = length
        else:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if (
                not match
                or int(match.group(1)) != offset
                or (total is not None and int(match.group(3)) != total)
                or new_etag != etag
            ):
                raise _ArchiveChanged()  # not the continuation asked for: start over, never splice
            total = int(match.group(3))
        archive.etag, archive.total = new_etag or etag, total
        progress.start(total=total, offset=offset)
        try:
            while count := response.readinto(buffer):
                if total is not None and sink.written + count > total:
                    raise PluginError(
                        "the server sent more bytes than its Content-Length; the archive is damaged",
                        code=Exit.VERIFY_FAILED,
                    )
                sink.write(buffer[:count])
                progress.advance(done=sink.written)
        except ConnectionProblem as exc:
            raise _Cut(exc.message) from None
    finally:
        response.close()


class StdoutSink:
    """The archive unchanged on stdout; it cannot start over, so a changed archive fails the command."""

    def __init__(self) -> None:
        self._written = 0
        self._fd = 1

    @property
    def written(self) -> int:
        return self._written

    def write(self, data: memoryview) -> None:
        view = data
        while view:
            view = view[os.write(self._fd, view) :]
        self._written += len(data)

    def restart(self) -> None:
        raise PluginError(
            "the archive changed on the server while it was written to stdout (a core was added or "
            "removed); run the command again",
            code=Exit.INCOMPLETE,
        )
