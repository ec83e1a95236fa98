"""
The five commands of ``kubectl coredump``, each ``(client, args, namespace) -> exit code``.

Kept apart from :mod:`kubectl_coredump.cli` so that ``--help`` and usage errors import nothing more. The
extractor, the metadata reader and the gdb cache are imported by the commands that use them: ``get -o -``
starts as fast as it can (it is measured against curl).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubectl_coredump import api, tables
from kubectl_coredump.download import StdoutSink, download
from kubectl_coredump.errors import Exit, PluginError
from kubectl_coredump.model import Core, Endpoint, human_size, parse_time
from kubectl_coredump.progress import Progress, wanted
from kubectl_coredump.transport import Client

if TYPE_CHECKING:
    from kubectl_coredump import gdb
    from kubectl_coredump.extract import Extracted

_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def since_value(text: str, *, now: datetime.datetime | None = None) -> str:
    """An RFC 3339 time in UTC for ``--since`` (an absolute time, or a duration before ``now``)."""
    match = _DURATION.match(text)
    if match and any(match.groups()):
        days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
        when = (now or datetime.datetime.now(datetime.timezone.utc)) - datetime.timedelta(
            days=days, hours=hours, minutes=minutes, seconds=seconds
        )
    else:
        parsed = parse_time(text)
        if parsed is None or "T" not in text.upper():
            raise PluginError(
                f"--since {text!r}: give an RFC 3339 time (2026-11-23T10:00:00Z) or a duration (30m, 2h, 1d)",
                code=Exit.USAGE,
            )
        when = parsed
    return when.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- commands --------------------------------------------------------------------------------------


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _endpoint(client: Client, *, namespace: str, pod: str) -> Endpoint:
    return Endpoint.from_object(api.get_endpoint(client, namespace=namespace, name=pod))


def _existing(endpoint: Endpoint) -> str:
    ids = [f"{c.container}/{c.id}" for c in sorted(endpoint.cores, key=lambda c: (c.time, c.id))]
    shown = ", ".join(ids[-10:]) + (f" (and {len(ids) - 10} older)" if len(ids) > 10 else "")
    return shown or "none"


def pick_core(endpoint: Endpoint, *, core_id: str | None, container: str | None) -> Core:
    """The core a one-core command works on: ``--core``, else the newest (of ``-c`` if given)."""
    where = f'pod "{endpoint.name}" in namespace "{endpoint.namespace}"'
    if not endpoint.cores:
        raise PluginError(f"{where} has no stored cores", code=Exit.NOT_FOUND)
    if core_id:
        matches = [c for c in endpoint.cores if c.id == core_id and (container is None or c.container == container)]
        if not matches:
            raise PluginError(
                f"no core {core_id}{f' in container {container}' if container else ''} of {where}; "
                f"its cores: {_existing(endpoint)}",
                code=Exit.NOT_FOUND,
            )
        if len(matches) > 1:
            raise PluginError(
                f"core {core_id} exists in containers {', '.join(c.container for c in matches)}; say which with -c",
                code=Exit.USAGE,
            )
        return matches[0]
    core = endpoint.newest(container=container)
    if core is None:
        containers = sorted({c.container for c in endpoint.cores})
        raise PluginError(
            f"no cores of container {container} in {where}; containers with cores: {', '.join(containers)}",
            code=Exit.NOT_FOUND,
        )
    return core


def _check_filters(endpoint: Endpoint, *, core_id: str | None, container: str | None) -> None:
    """Say what exists when a filter names nothing listed (the server would only say 404)."""
    complete = endpoint.core_count <= len(endpoint.cores)
    where = f'pod "{endpoint.name}" in namespace "{endpoint.namespace}"'
    if not endpoint.cores and complete:
        raise PluginError(f"{where} has no stored cores", code=Exit.NOT_FOUND)
    if container and complete and container not in {c.container for c in endpoint.cores}:
        raise PluginError(
            f"no cores of container {container} in {where}; containers with cores: "
            f"{', '.join(sorted({c.container for c in endpoint.cores}))}",
            code=Exit.NOT_FOUND,
        )
    if (
        core_id
        and complete
        and not any(c.id == core_id and (not container or c.container == container) for c in endpoint.cores)
    ):
        raise PluginError(f"no core {core_id} in {where}; its cores: {_existing(endpoint)}", code=Exit.NOT_FOUND)


def cmd_list(client: Client, args: argparse.Namespace, namespace: str) -> int:
    scope = None if args.all_namespaces else namespace
    endpoints = [Endpoint.from_object(o) for o in api.list_endpoints(client, namespace=scope, selector=args.selector)]
    crashed = [e for e in endpoints if e.cores]
    if not crashed:
        _err(f"No cores found{' in ' + repr(namespace) + ' namespace' if scope else ''}.")
        return Exit.OK
    _out(
        tables.signature_table(crashed)
        if args.by_signature
        else tables.list_table(crashed, all_namespaces=args.all_namespaces)
    )
    return Exit.OK


def cmd_describe(client: Client, args: argparse.Namespace, namespace: str) -> int:
    endpoint = _endpoint(client, namespace=namespace, pod=args.pod)
    cores = list(endpoint.cores)
    metadata: dict[str, dict[str, Any]] = {}
    if args.core:
        core = pick_core(endpoint, core_id=args.core, container=None)
        cores = [core]
        try:
            from kubectl_coredump.metadata import fetch_metadata

            metadata[core.id] = fetch_metadata(
                client, namespace=namespace, name=args.pod, container=core.container, core_id=core.id
            )
        except PluginError as exc:
            if exc.code != Exit.FORBIDDEN:
                raise
            _err("note: the core's metadata JSON needs the coredump:dump role; showing the status only")
    _out(tables.describe(endpoint, cores=sorted(cores, key=lambda c: (c.time, c.id)), metadata=metadata))
    return Exit.OK


def cmd_bt(client: Client, args: argparse.Namespace, namespace: str) -> int:
    endpoint = _endpoint(client, namespace=namespace, pod=args.pod)
    core = pick_core(endpoint, core_id=args.core, container=args.container)
    lines = tables.stored_backtrace(core.raw)
    if not lines:
        try:
            from kubectl_coredump.metadata import fetch_metadata

            meta = fetch_metadata(client, namespace=namespace, name=args.pod, container=core.container, core_id=core.id)
            lines = tables.stored_backtrace(meta)
        except PluginError as exc:
            if exc.code != Exit.FORBIDDEN:
                raise
    if not lines:
        _out(
            f"no backtrace was stored for core {core.container}/{core.id} "
            f"(try: kubectl coredump gdb {args.pod} --core {core.id})"
        )
        return Exit.OK
    _out(f"{core.container}/{core.id}  {core.signal_text}  {core.exe or '-'}")
    _out("\n".join(lines))
    return Exit.OK


def _query(*, container: str | None, core: str | None, since: str | None, objects: bool) -> list[tuple[str, str]]:
    query = [("container", container)] if container else []
    query += [("core", core)] if core else []
    query += [("since", since)] if since else []
    query += [("objects", "true")] if objects else []
    return query


def _objects_rejected(exc: PluginError) -> bool:
    return exc.http_status == 400 and "objects" in exc.message


OBJECTS_REJECTED = (
    "this coredump API server does not serve objects (?objects=true is not supported there); "
    "run again without --objects"
)


def _fetch_into(
    client: Client, *, namespace: str, pod: str, query: list[tuple[str, str]], directory: Path, progress: Progress
) -> Extracted:
    from kubectl_coredump.extract import ExtractSink

    created = not directory.exists()
    try:
        with ExtractSink(directory=directory) as sink:
            download(client, namespace=namespace, name=pod, query=query, sink=sink, progress=progress)
            extracted = sink.finish()
    except BaseException:
        if created:
            _remove_empty(directory)  # nothing kept of a failed run: no empty directories either
        raise
    progress.finish()
    return extracted


def _remove_empty(directory: Path) -> None:
    for folder in sorted(
        (p for p in directory.rglob("*") if p.is_dir() and not p.is_symlink()), key=lambda p: len(p.parts), reverse=True
    ) + [directory]:
        try:
            folder.rmdir()
        except OSError:
            pass


def cmd_get(client: Client, args: argparse.Namespace, namespace: str) -> int:
    since = since_value(args.since) if args.since else None
    query = _query(container=args.container, core=args.core, since=since, objects=args.objects)
    label = f"{namespace}/{args.pod}"
    show = wanted(quiet=args.quiet)
    progress = Progress(enabled=show, label=label)
    if not args.quiet and not show:
        progress.note = lambda message: _err(message)  # type: ignore[method-assign]
    elif args.quiet:
        progress.note = lambda message: None  # type: ignore[method-assign]
    try:
        if args.output == "-":
            if sys.stdout.isatty():
                raise PluginError(
                    "refusing to write a tar.gz to a terminal; redirect stdout (> cores.tar.gz) or use -o DIR",
                    code=Exit.USAGE,
                )
            download(client, namespace=namespace, name=args.pod, query=query, sink=StdoutSink(), progress=progress)
            progress.finish()
            return Exit.OK
        directory = Path(args.output or f"coredump-{namespace}-{args.pod}")
        extracted = _fetch_into(
            client, namespace=namespace, pod=args.pod, query=query, directory=directory, progress=progress
        )
    except PluginError as exc:
        if args.objects and _objects_rejected(exc):
            raise PluginError(OBJECTS_REJECTED, code=Exit.USAGE) from None
        if exc.code == Exit.NOT_FOUND:
            # The dump matched nothing (asked first, as curl would: one request on the way that works); the
            # endpoint says what exists, for an error that lists it.
            endpoint = _endpoint(client, namespace=namespace, pod=args.pod)
            _check_filters(endpoint, core_id=args.core, container=args.container)
        raise
    for core in extracted.cores:
        meta = core.metadata
        exe = meta.get("exe") if isinstance(meta.get("exe"), str) else ""
        _out(
            core.path.as_posix()
            if args.quiet
            else f"{core.path}  {meta.get('signalName') or '-'}  {exe or '-'}  "
            f"{human_size(core.path.stat().st_size)}  {core.digest.partition(':')[0]} verified"
        )
    if not args.quiet:
        count = len(extracted.cores)
        _err(
            f"{count} core{'s' if count != 1 else ''} in {directory}/ (digests verified)"
            + (f", objects in {extracted.sysroot}/" if extracted.sysroot else "")
            + (
                f"; open one with: kubectl coredump gdb {args.pod} --core {extracted.cores[-1].core_id}"
                if extracted.cores
                else ""
            )
        )
        for skipped in extracted.skipped:
            _err(f"note: skipped archive entry {skipped!r}")
    return Exit.OK


def _gdb_copy(client: Client, *, namespace: str, endpoint: Endpoint, core: Core, quiet: bool) -> gdb.CachedCore:
    from kubectl_coredump import gdb

    final = gdb.cache_dir(
        root=gdb.cache_root(),
        namespace=namespace,
        pod=endpoint.name,
        pod_uid=endpoint.pod_uid,
        container=core.container,
        core_id=core.id,
    )
    copy = gdb.cached(final, container=core.container, core_id=core.id)
    if copy is not None:
        return copy
    final.parent.mkdir(parents=True, exist_ok=True)
    progress = Progress(enabled=wanted(quiet=quiet), label=f"{namespace}/{endpoint.name} {core.id}")
    if quiet:
        progress.note = lambda message: None  # type: ignore[method-assign]
    elif not progress.enabled:
        progress.note = lambda message: _err(message)  # type: ignore[method-assign]
    staging = Path(tempfile.mkdtemp(prefix=f".{core.id}.", dir=final.parent))
    try:
        query = _query(container=core.container, core=core.id, since=None, objects=True)
        try:
            extracted = _fetch_into(
                client, namespace=namespace, pod=endpoint.name, query=query, directory=staging, progress=progress
            )
        except PluginError as exc:
            if not _objects_rejected(exc):
                raise
            progress.note("note: this server keeps no objects (?objects=true); downloading the core alone")
            extracted = _fetch_into(
                client, namespace=namespace, pod=endpoint.name, query=query[:-1], directory=staging, progress=progress
            )
        found = [c for c in extracted.cores if c.core_id == core.id and c.container == core.container]
        if not found:
            raise PluginError(f"the dump of {core.container}/{core.id} did not contain that core", code=Exit.ERROR)
        gdb.commit(staging=staging, final=final, core=found[0].path, digest=found[0].digest)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    copy = gdb.cached(final, container=core.container, core_id=core.id)
    if copy is None:
        raise PluginError(f"the cached copy in {final} could not be read back")
    return copy


def cmd_gdb(client: Client, args: argparse.Namespace, namespace: str) -> int:
    from kubectl_coredump import gdb

    endpoint = _endpoint(client, namespace=namespace, pod=args.pod)
    core = pick_core(endpoint, core_id=args.core, container=args.container)
    if args.exe and not os.path.isfile(args.exe):
        raise PluginError(f"--exe {args.exe}: no such file", code=Exit.USAGE)
    copy = _gdb_copy(client, namespace=namespace, endpoint=endpoint, core=core, quiet=args.quiet)
    command, notes = gdb.command(
        copy,
        container=core.container,
        core_id=core.id,
        gdb_args=list(args.gdb_args),
        exe=Path(args.exe).resolve() if args.exe else None,
    )
    if not args.quiet:
        for note in notes:
            _err(note)
    if args.print:
        _out(shlex.join(command))
        return Exit.OK
    if shutil.which("gdb") is None:
        raise PluginError(
            "gdb is not installed here (apt-get install gdb); the command would be: " + shlex.join(command)
        )
    client.discard()  # gdb may run for hours: no idle connection kept meanwhile
    # ^C is gdb's (it interrupts the debuggee): caught here, not ignored (an ignored signal would stay so in gdb)
    previous = signal.signal(signal.SIGINT, lambda number, frame: None)
    try:
        return subprocess.run(command).returncode
    finally:
        signal.signal(signal.SIGINT, previous)


COMMANDS = {"list": cmd_list, "describe": cmd_describe, "get": cmd_get, "gdb": cmd_gdb, "bt": cmd_bt}
