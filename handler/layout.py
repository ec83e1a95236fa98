"""
The storage layout contract (README "Storage layout"): the one owner of paths, names, the metadata schema
and the commit protocol.

A core lives at ``<root>/<namespace>/<pod>/<pod-uid>/<container>/<core-id>.core.gz`` next to
``<core-id>.json``. Hidden names (leading ``.``) are temporary files of writes in flight. Beside the container
directories, ``<pod-uid>/retention.json`` (:data:`RETENTION_RECORD`) says when retention last removed cores of
that incarnation (written by ``apiserver.retention.storage``; a container name, a DNS label, has no dot).

The commit protocol (one rule, the README says the same): **the ``.json`` is the commit point.**
:class:`CoreWriter` writes the data under a hidden temp name, then at commit: writes the metadata under a hidden
temp name sharing the data temp's token and fsyncs it (``commit:meta-written``), fsyncs the data
(``commit:data-synced``), gives the data its final name (a hard link that never replaces, which also reserves the
core id: ``commit:data-named``), renames the metadata into place (``commit:meta-named``: committed) and removes
the data temp (``commit:done``). So at any instant a crash leaves one of:

* nothing public, and either a data temp alone (killed before the stream ended: removed by :func:`sweep_debris`)
  or a data temp with its metadata temp (killed in the commit: :func:`sweep_debris` checks the data against the
  metadata, stored size and digest, and completes the commit, never deleting its bytes);
* a public ``<core-id>.core.gz`` whose complete metadata is on disk under its temp name (an *incomplete* core:
  every reader skips it, and :func:`sweep_debris` completes it by renaming that metadata into place);
* a committed pair.

The sweep only touches writes that are abandoned: temp names carry their writer and the writer keeps a liveness
mark on its data temp (:mod:`handler.inflight`). Each step is a :func:`handler.faults.point` so tests kill the
writer at every one of them.

Every access below the root goes through :mod:`handler.safefs`: no level is ever reached through a link, and
what is opened is checked to be a regular file or directory. Names that reach a path are validated here, and
names that come from a crashing process (comm, exe) are sanitized here, so no caller can build a path component
of its own. Everything in this module is blocking filesystem code; the API server calls it through
``asyncio.to_thread``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import secrets
import signal as signals
import stat
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from isal import igzip, isal_zlib

from handler import digest as core_digest
from handler import elfinfo, faults, inflight, safefs

logger = logging.getLogger(__name__)

CORE_SUFFIX = ".core.gz"
META_SUFFIX = ".json"
RETENTION_RECORD = "retention.json"  # in a pod-uid directory, beside its containers
# Modes of what we create: cores hold secrets, so nothing is world-readable.
DIR_MODE = 0o750
FILE_MODE = 0o640
# A temp file or incomplete core younger than this may be a write about to commit; older ones are swept.
ORPHAN_GRACE_SECONDS = 15 * 60
# A writer starts the writeback of its data every this many bytes (CoreWriter._start_writeback).
WRITEBACK_BYTES = 32 << 20
# Metadata is a few kB; a planted multi-GB ".json" is read no further than this.
META_MAX_BYTES = 1 << 20

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_POD_UID = re.compile(r"^[0-9a-f-]{1,64}$")
# '-' is not allowed inside the comm part: it separates the fields, and keeping it out keeps parsing unambiguous.
_COMM_CHARS = "A-Za-z0-9_.+"
COMM_MAX = 32
CORE_ID_RE: re.Pattern[str] = re.compile(
    r"^(?P<time>\d{8}T\d{6}Z)-(?P<comm>[" + _COMM_CHARS + r"]{1,32})-(?P<pid>\d{1,10})-(?P<signal>\d{1,3})"
    r"(?:-(?P<n>[1-9]\d{0,5}))?$"
)
_UNSAFE_COMM = re.compile(r"[^" + _COMM_CHARS + r"]")
CORE_ID_TIME_FORMAT = "%Y%m%dT%H%M%SZ"

# The metadata schema (camelCase). Writers may add keys; these are always present in a committed core.
METADATA_KEYS: tuple[str, ...] = (
    "coreID",
    "namespace",
    "pod",
    "podUID",
    "container",
    "containerID",
    "node",
    "image",
    "imageDigest",
    "pid",
    "signal",
    "signalName",
    "comm",
    "exe",
    "buildID",
    "timestamp",
    "size",
    "observedSize",
    "storedSize",
    "digest",
    "sha256",
    "truncated",
    "truncationReason",
    "compression",
)


class InvalidName(ValueError):
    """A name that cannot be a component of a storage path."""


def _check(kind: str, value: object, pattern: re.Pattern[str], *, max_len: int, rule: str) -> str:
    if not isinstance(value, str):
        raise InvalidName(f"{kind} must be a string, not {type(value).__name__}")
    if not value:
        raise InvalidName(f"{kind} must not be empty")
    if len(value) > max_len:
        raise InvalidName(f"{kind} {value[:80]!r}...: must be at most {max_len} characters")
    if not pattern.match(value):
        raise InvalidName(f"{kind} {value!r}: {rule}")
    return value


def validate_namespace(v: str) -> str:
    return _check(
        "namespace",
        v,
        _DNS1123_LABEL,
        max_len=63,
        rule="must be a DNS-1123 label (lowercase letters, digits and '-', starting and ending alphanumeric)",
    )


def validate_pod_name(v: str) -> str:
    return _check(
        "pod name",
        v,
        _DNS1123_SUBDOMAIN,
        max_len=253,
        rule="must be a DNS-1123 subdomain (lowercase letters, digits, '-' and '.', "
        "each part starting and ending alphanumeric)",
    )


def validate_pod_uid(v: str) -> str:
    return _check("pod uid", v, _POD_UID, max_len=64, rule="must be lowercase hex digits and '-' (a UUID)")


def validate_container(v: str) -> str:
    return _check(
        "container",
        v,
        _DNS1123_LABEL,
        max_len=63,
        rule="must be a DNS-1123 label (lowercase letters, digits and '-', starting and ending alphanumeric)",
    )


def validate_core_id(v: str) -> str:
    return _check(
        "core id", v, CORE_ID_RE, max_len=128, rule="must look like YYYYMMDDTHHMMSSZ-<comm>-<pid>-<signal>[-<n>]"
    )


def sanitize_comm(comm: str | bytes | None) -> str:
    """The comm of a crashing process made safe for a core id: ``[A-Za-z0-9_.+]``, 1..32 characters."""
    if isinstance(comm, bytes):
        comm = comm.decode("utf-8", "replace")
    cleaned = _UNSAFE_COMM.sub("_", comm or "")[:COMM_MAX]
    return cleaned or "unknown"


def sanitize_text(value: str | bytes | None, *, max_len: int = 4096) -> str | None:
    """An untrusted string (comm, exe path) made safe to store in metadata: no control characters, bounded."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "\ufffd" for c in value[:max_len])


def make_core_id(*, timestamp: datetime | float, comm: str | bytes | None, pid: int, signal: int) -> str:
    """The core id of a crash (without uniquifier): sortable by time, safe as a file name."""
    if not isinstance(timestamp, datetime):
        timestamp = datetime.fromtimestamp(float(timestamp), tz=timezone.utc)
    stamp = timestamp.astimezone(timezone.utc).strftime(CORE_ID_TIME_FORMAT)
    return validate_core_id(f"{stamp}-{sanitize_comm(comm)}-{int(pid)}-{int(signal)}")


def core_id_time(core_id: str) -> datetime:
    """The UTC time encoded in a core id."""
    m = CORE_ID_RE.match(core_id)
    if not m:
        raise InvalidName(f"core id {core_id!r}: not a core id")
    return datetime.strptime(m["time"], CORE_ID_TIME_FORMAT).replace(tzinfo=timezone.utc)


def rfc3339(ts: datetime | float) -> str:
    """RFC 3339 UTC with a ``Z``, second precision (as Kubernetes prints times)."""
    if not isinstance(ts, datetime):
        ts = datetime.fromtimestamp(float(ts), tz=timezone.utc)
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class CoreRef:
    """Where one core lives; every field is validated on construction."""

    namespace: str
    pod: str
    pod_uid: str
    container: str
    core_id: str

    def __post_init__(self) -> None:
        validate_namespace(self.namespace)
        validate_pod_name(self.pod)
        validate_pod_uid(self.pod_uid)
        validate_container(self.container)
        validate_core_id(self.core_id)

    def directory(self, root: Path) -> Path:
        return container_dir(
            root, namespace=self.namespace, pod=self.pod, pod_uid=self.pod_uid, container=self.container
        )

    def core_path(self, root: Path) -> Path:
        return self.directory(root) / (self.core_id + CORE_SUFFIX)

    def meta_path(self, root: Path) -> Path:
        return self.directory(root) / (self.core_id + META_SUFFIX)


@dataclass(frozen=True)
class StoredCore:
    """A committed core: its place, its metadata, and its two files."""

    ref: CoreRef
    metadata: dict[str, Any]
    core_path: Path
    meta_path: Path

    @property
    def root(self) -> Path:
        """The storage root this core was found under (lexically: the paths are built from validated names)."""
        return self.core_path.parents[4]


def container_dir(root: Path, *, namespace: str, pod: str, pod_uid: str, container: str) -> Path:
    """The container directory's path, for messages and for tests; access goes through :func:`open_container`."""
    return (
        Path(root)
        / validate_namespace(namespace)
        / validate_pod_name(pod)
        / validate_pod_uid(pod_uid)
        / validate_container(container)
    )


def open_container(root: Path, ref: CoreRef) -> safefs.Dir | None:
    """The container directory of ``ref``, reached beneath ``root`` without following links; None if not there."""
    return safefs.open_dir(root, ref.namespace, ref.pod, ref.pod_uid, ref.container)


def _valid_names(d: safefs.Dir, validator: Any) -> list[str]:
    """Names of the real (not linked) subdirectories of ``d`` that are valid names of their level."""
    names = []
    for name in d.entries("dir"):
        if name.startswith("."):
            continue
        try:
            names.append(validator(name))
        except InvalidName:
            logger.debug("ignoring %s/%s: not a valid name at this level", d.path, name)
    return names


def _sub_or_all(d: safefs.Dir, name: str | None, validator: Any) -> Iterator[tuple[str, safefs.Dir]]:
    """The named subdirectory (if it is a real one), or every valid one: each yielded open, closed after."""
    for n in [name] if name is not None else _valid_names(d, validator):
        sub = d.sub(n)
        if sub is None:
            continue
        with sub:
            yield n, sub


def _read_metadata(d: safefs.Dir, name: str) -> dict[str, Any] | None:
    raw = d.read_bytes(name, limit=META_MAX_BYTES + 1)
    if raw is None:
        return None
    if len(raw) > META_MAX_BYTES:
        logger.warning("ignoring %s/%s: metadata larger than %d bytes", d.path, name, META_MAX_BYTES)
        return None
    try:
        meta = json.loads(raw)
    except ValueError as e:
        logger.warning("ignoring core %s/%s: unreadable metadata: %s", d.path, name, e)
        return None
    return meta if isinstance(meta, dict) else None


def _read_committed(
    root: Path, d: safefs.Dir, *, namespace: str, pod: str, pod_uid: str, container: str
) -> list[StoredCore]:
    files = d.entries("file")
    present = set(files)
    cores = []
    for name in files:
        if not name.endswith(META_SUFFIX) or name.startswith("."):
            continue
        core_id = name[: -len(META_SUFFIX)]
        if not CORE_ID_RE.match(core_id):
            continue
        ref = CoreRef(namespace=namespace, pod=pod, pod_uid=pod_uid, container=container, core_id=core_id)
        if core_id + CORE_SUFFIX not in present:
            logger.warning("ignoring core %s: metadata without a data file", ref.meta_path(root))
            continue
        metadata = _read_metadata(d, name)
        if metadata is None:
            continue
        cores.append(
            StoredCore(ref=ref, metadata=metadata, core_path=ref.core_path(root), meta_path=ref.meta_path(root))
        )
    return cores


def list_cores(
    root: Path, *, namespace: str, pod: str | None = None, pod_uid: str | None = None, container: str | None = None
) -> list[StoredCore]:
    """Committed cores of a namespace, optionally narrowed; sorted by (container, core_id). Links are absent."""
    root = Path(root)
    validate_namespace(namespace)
    if pod is not None:
        validate_pod_name(pod)
    if pod_uid is not None:
        validate_pod_uid(pod_uid)
    if container is not None:
        validate_container(container)
    cores: list[StoredCore] = []
    ns_dir = safefs.open_dir(root, namespace)
    if ns_dir is None:
        return []
    with ns_dir:
        for p, pod_dir in _sub_or_all(ns_dir, pod, validate_pod_name):
            for u, uid_dir in _sub_or_all(pod_dir, pod_uid, validate_pod_uid):
                for c, c_dir in _sub_or_all(uid_dir, container, validate_container):
                    cores.extend(_read_committed(root, c_dir, namespace=namespace, pod=p, pod_uid=u, container=c))
    cores.sort(key=lambda s: (s.ref.container, s.ref.core_id, s.ref.pod, s.ref.pod_uid))
    return cores


def list_pod_uids(root: Path, *, namespace: str, pod: str) -> list[str]:
    """The incarnations (uids) of a pod that have committed cores, ordered by their latest core, oldest first."""
    latest: dict[str, str] = {}
    for core in list_cores(root, namespace=namespace, pod=pod):
        uid = core.ref.pod_uid
        latest[uid] = max(latest.get(uid, ""), core.ref.core_id)
    return sorted(latest, key=lambda u: (latest[u], u))


def _namespaces(root: Path) -> list[str]:
    r = safefs.open_root(root)
    if r is None:
        return []
    with r:
        return _valid_names(r, validate_namespace)


def list_crashed_pods(root: Path, *, namespace: str | None = None) -> list[tuple[str, str, str]]:
    """``(namespace, pod, pod_uid)`` of every pod incarnation with committed cores, sorted."""
    root = Path(root)
    namespaces = [validate_namespace(namespace)] if namespace is not None else _namespaces(root)
    found = set()
    for ns in namespaces:
        for core in list_cores(root, namespace=ns):
            found.add((ns, core.ref.pod, core.ref.pod_uid))
    return sorted(found)


def iter_all_cores(root: Path) -> Iterator[StoredCore]:
    """Every committed core under ``root`` (for retention)."""
    for ns in _namespaces(Path(root)):
        yield from list_cores(root, namespace=ns)


def iter_container_dirs(root: Path) -> Iterator[Path]:
    """Every real container directory under ``root`` (validated names at each level, no link followed), whether
    it holds committed cores or not: a sweep must also reach a directory whose only core is an interrupted one."""
    root = Path(root)
    for ns in _namespaces(root):
        ns_dir = safefs.open_dir(root, ns)
        if ns_dir is None:
            continue
        with ns_dir:
            for p, pod_dir in _sub_or_all(ns_dir, None, validate_pod_name):
                for u, uid_dir in _sub_or_all(pod_dir, None, validate_pod_uid):
                    for c in _valid_names(uid_dir, validate_container):
                        yield container_dir(root, namespace=ns, pod=p, pod_uid=u, container=c)


def stat_core(core: StoredCore) -> os.stat_result | None:
    """The stat of a core's data file, reached without links; None if it is not (or no longer) a regular file."""
    d = open_container(core.root, core.ref)
    if d is None:
        return None
    with d:
        return d.stat(core.ref.core_id + CORE_SUFFIX)


def stored_bytes(core: StoredCore) -> int:
    """Bytes a committed core takes (data + metadata); 0 if it is gone."""
    d = open_container(core.root, core.ref)
    if d is None:
        return 0
    with d:
        data, meta = d.stat(core.ref.core_id + CORE_SUFFIX), d.stat(core.ref.core_id + META_SUFFIX)
    return (data.st_size if data else 0) + (meta.st_size if meta else 0)


def open_core(core: StoredCore) -> safefs.ReadFile | None:
    """A core's data file opened for reading (regular file, never through a link); None if not there."""
    d = open_container(core.root, core.ref)
    if d is None:
        return None
    with d:
        return d.open_read(core.ref.core_id + CORE_SUFFIX)


def remove_core(core: StoredCore) -> bool:
    """Uncommit a core (metadata first, so no reader ever sees half of it), then remove its data."""
    d = open_container(core.root, core.ref)
    if d is None:
        return False
    with d:
        if not d.unlink(core.ref.core_id + META_SUFFIX):
            return False
        d.unlink(core.ref.core_id + CORE_SUFFIX)
    return True


def _split_container_dir(directory: Path) -> tuple[Path, CoreRef]:
    """``<root>/<ns>/<pod>/<uid>/<container>`` taken apart (lexically) into the root and a validated ref."""
    directory = Path(directory)
    c, u, p, ns = directory.name, directory.parent.name, directory.parents[1].name, directory.parents[2].name
    ref = CoreRef(namespace=ns, pod=p, pod_uid=u, container=c, core_id="19700101T000000Z-x-0-0")
    return directory.parents[3], ref


def prune_empty_dirs(root: Path, directory: Path) -> None:
    """Remove the container directory ``directory`` and its parents below the namespace level while empty."""
    root_, ref = _split_container_dir(directory)
    names = [ref.namespace, ref.pod, ref.pod_uid, ref.container]
    # From the deepest level up: rmdir(name) relative to the parent's fd (rmdir never follows a link).
    for depth in range(len(names), 1, -1):
        parent = safefs.open_dir(root_, *names[: depth - 1])
        if parent is None:
            return
        with parent:
            if not parent.rmdir(names[depth - 1]):
                return  # not empty (maybe a write in flight), a link, or gone


_prune_empty_dirs = prune_empty_dirs  # the name retention used


def _is_family(core_id: str, base: str) -> bool:
    """Whether ``core_id`` is ``base`` or one of its uniquified ids (``base-1``, ``base-2``...)."""
    return core_id == base or (core_id.startswith(base + "-") and core_id[len(base) + 1 :].isdigit())


def _id_candidates(base: str) -> Iterator[str]:
    yield base
    for n in range(1, 100000):
        yield f"{base}-{n}"


@dataclass
class _PendingWrite:
    """The temp files of one write under this module's protocol: its data temp and its metadata temp(s)."""

    token: str
    data: str | None = None
    data_name: inflight.TempName | None = None
    metas: list[str] = dataclasses.field(default_factory=list)

    def names(self) -> list[str]:
        return ([self.data] if self.data else []) + self.metas


def _parse_temp(name: str) -> inflight.TempName | None:
    return inflight.parse_temp_name(name, suffixes=(CORE_SUFFIX, META_SUFFIX), core_id=CORE_ID_RE)


def _pending_writes(names: Iterable[str]) -> dict[str, _PendingWrite]:
    writes: dict[str, _PendingWrite] = {}
    for name in sorted(names):
        t = _parse_temp(name)
        if t is None:
            continue
        w = writes.setdefault(t.token, _PendingWrite(token=t.token))
        if t.suffix == CORE_SUFFIX:
            w.data, w.data_name = name, t
        else:
            w.metas.append(name)
    return writes


# isal's own stream error (not an OSError), under a name mypy accepts in an except clause.
_GZIP_ERROR: type[Exception] = isal_zlib.error  # type: ignore[assignment]  # the stub calls it an instance


def _verify_data(d: safefs.Dir, name: str, meta: dict[str, Any]) -> str | None:
    """None if the data file ``name`` is what ``meta`` describes (stored size, and the digest of its content),
    else what is wrong. Bounded memory: the gzip members are read through in 1 MiB pieces."""
    f = d.open_read(name)
    if f is None:
        return "the data file is gone"
    with f:
        if f.st.st_size != meta.get("storedSize"):
            return f"{f.st.st_size} bytes on disk, the metadata says {meta.get('storedSize')}"
        want = core_digest.of_metadata(meta)
        if want is None or meta.get("compression") != "gzip":
            return None
        hasher = core_digest.new(want[0])
        try:
            with os.fdopen(os.dup(f.fd), "rb") as raw, igzip.GzipFile(fileobj=raw, mode="rb") as gz:
                while chunk := gz.read(1 << 20):
                    hasher.update(chunk)
        except (OSError, EOFError, ValueError, _GZIP_ERROR) as e:
            return f"its gzip stream is damaged ({e})"
        if hasher.hexdigest() != want[1]:
            return f"its content does not match the {want[0]} digest in the metadata"
    return None


def _finish_write(d: safefs.Dir, w: _PendingWrite) -> str | None:
    """
    Complete the commit of an abandoned write that had its metadata on disk (a writer killed at any step of
    :meth:`CoreWriter.commit`): give the data its public name unless it has it already, then the metadata.
    Returns the committed core id, or None if there was nothing to complete (the temps are then debris).
    """
    assert w.data is not None and w.data_name is not None
    data_st = d.lstat(w.data)
    if data_st is None:
        return None
    for meta_name in w.metas:
        t = _parse_temp(meta_name)
        meta = _read_metadata(d, meta_name)
        if t is None or meta is None or meta.get("coreID") != t.core_id:
            continue
        cid = t.core_id
        public = d.lstat(cid + CORE_SUFFIX)
        if public is not None and (public.st_dev, public.st_ino) == (data_st.st_dev, data_st.st_ino):
            # Killed after the data got its name: only the metadata's rename is missing.
            if d.lstat(cid + META_SUFFIX) is None:
                d.rename(meta_name, cid + META_SUFFIX)
            d.unlink(w.data)
            d.fsync()
            return cid
        why = _verify_data(d, w.data, meta)
        if why is not None:
            logger.error(
                "cannot complete the interrupted commit of %s/%s: %s; its temp files are removed", d.path, cid, why
            )
            return None
        for candidate in _id_candidates(w.data_name.core_id):
            if d.lstat(candidate + CORE_SUFFIX) is not None:
                continue
            if candidate != cid:
                # The id this write meant to take went to another core meanwhile: the next free one, relabelled.
                meta["coreID"] = candidate
                relabelled = inflight.temp_name(candidate, w.data_name.writer, w.token, META_SUFFIX)
                d.write_new(relabelled, (json.dumps(meta, indent=2) + "\n").encode(), mode=FILE_MODE)
                d.unlink(meta_name)
                meta_name = relabelled
            try:
                linked = d.link_no_replace(w.data, candidate + CORE_SUFFIX)
            except FileExistsError:
                continue
            d.rename(meta_name, candidate + META_SUFFIX)
            if linked:
                d.unlink(w.data)
            d.fsync()
            return candidate
    return None


# A salvaged member's output is held until the member ends (its CRC checked): members are one input chunk (1 MiB
# by default); a planted file with a bigger one is salvaged only up to it.
_SALVAGE_MEMBER_MAX = 16 << 20
KILLED_MID_STREAM = "killed"


def _whole_members(f: safefs.ReadFile, *, algorithm: str) -> tuple[int, int, str, elfinfo.CoreShape]:
    """(compressed bytes of the whole gzip members at the start of ``f``, their uncompressed size, its digest
    (hex, ``algorithm``), the ELF shape of that content). Reading stops at the first cut or damaged member; memory
    stays bounded."""
    shape = elfinfo.CoreShape()
    digest = core_digest.new(algorithm)
    good = size = 0
    base = 0  # compressed offset where ``buf`` starts
    obj = zlib.decompressobj(31)
    pending: list[bytes] = []
    pending_len = 0
    try:
        for chunk in f.chunks(1 << 20):
            buf = chunk
            while buf:
                out = obj.decompress(buf, 1 << 20)
                pending.append(out)
                pending_len += len(out)
                if pending_len > _SALVAGE_MEMBER_MAX:
                    return good, size, digest.hexdigest(), shape
                if obj.eof:
                    for piece in pending:
                        digest.update(piece)
                        if not shape.done:
                            shape.feed(piece)
                    size += pending_len
                    pending, pending_len = [], 0
                    base += len(buf) - len(obj.unused_data)
                    good = base
                    buf = obj.unused_data
                    obj = zlib.decompressobj(31)
                elif obj.unconsumed_tail:
                    base += len(buf) - len(obj.unconsumed_tail)
                    buf = obj.unconsumed_tail
                else:
                    base += len(buf)
                    buf = b""
    except zlib.error:
        pass
    return good, size, digest.hexdigest(), shape


def _is_public(entries: dict[str, os.stat_result], name: str) -> bool:
    """Whether the temp ``name`` is a second name of a public data file (its writer died right after the commit,
    before unlinking it): then it is no core of its own."""
    st = entries[name]
    return any(
        not n.startswith(".") and n.endswith(CORE_SUFFIX) and (o.st_dev, o.st_ino) == (st.st_dev, st.st_ino)
        for n, o in entries.items()
    )


def _salvage(d: safefs.Dir, w: _PendingWrite, ref: CoreRef, *, algorithm: str) -> str | None:
    """
    A write whose writer died before its commit (SIGKILL, the OOM killer, a node losing power): keep what it wrote
    as a core truncated ``killed`` (or whole, if its own headers say all of it is there) if the ELF header, program
    headers and every note are in its whole gzip members (what a debugger needs: the same rule as for a stalled or
    killed stream). The cut last member is trimmed off, the metadata is made from what the names say (core id:
    time, comm, pid, signal; directory: the pod; temp name: the node), then the write is committed like an
    interrupted commit. None: nothing to keep.
    """
    assert w.data is not None and w.data_name is not None
    m = CORE_ID_RE.match(w.data_name.core_id)
    f = d.open_read(w.data)
    if m is None or f is None:
        return None
    with f:
        good, size, hexdigest, shape = _whole_members(f, algorithm=algorithm)
        ino = (f.st.st_dev, f.st.st_ino)
    if not good or shape.is_core is not True or not shape.has_notes(size):
        return None
    try:
        fd = os.open(w.data, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=d.fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != ino:
            return None
        os.ftruncate(fd, good)
        os.fsync(fd)
    finally:
        os.close(fd)
    # Killed after the last byte but before its commit, the core is whole: its own headers say how long it is.
    cut = shape.expected_size is None or size < shape.expected_size
    sig = int(m["signal"])
    try:
        signal_name: str | None = signals.Signals(sig).name
    except ValueError:
        signal_name = None
    node = w.data_name.writer.node
    meta: dict[str, Any] = {k: None for k in METADATA_KEYS}
    meta.update(
        coreID=w.data_name.core_id,
        namespace=ref.namespace,
        pod=ref.pod,
        podUID=ref.pod_uid,
        container=ref.container,
        node=None if node == inflight.UNKNOWN_NODE else node,
        pid=int(m["pid"]),
        signal=sig,
        signalName=signal_name,
        comm=m["comm"],
        timestamp=rfc3339(core_id_time(w.data_name.core_id)),
        size=size,
        observedSize=size,
        storedSize=good,
        **core_digest.metadata_fields(core_digest.format_digest(algorithm, hexdigest)),
        truncated=cut,
        truncationReason=KILLED_MID_STREAM if cut else None,
        compression="gzip",
        recovered="the handler was killed mid-stream; the debris sweep kept what it had written",
    )
    meta_name = inflight.temp_name(w.data_name.core_id, w.data_name.writer, w.token, META_SUFFIX)
    d.write_new(meta_name, (json.dumps(meta, indent=2) + "\n").encode(), mode=FILE_MODE)
    return _finish_write(d, _PendingWrite(token=w.token, data=w.data, data_name=w.data_name, metas=[meta_name]))


def _complete_incomplete(d: safefs.Dir, core_id: str, temps: list[str]) -> bool:
    """Rename the metadata temp of a public ``core_id`` into place (finishing an interrupted commit)."""
    for name in temps:
        meta = _read_metadata(d, name)
        if meta is not None and meta.get("coreID") == core_id:
            d.rename(name, core_id + META_SUFFIX)
            d.fsync()
            logger.warning("completed the interrupted commit of core %s/%s from its metadata", d.path, core_id)
            return True
    return False


def sweep_debris(
    directory: Path,
    *,
    now: float | None = None,
    grace: float = ORPHAN_GRACE_SECONDS,
    recover: bool = True,
    node: str | None = None,
    proc_root: Path | None = None,
    algorithm: str = core_digest.DEFAULT,
) -> int:
    """
    One container directory: finish or remove the writes that were abandoned (their writer is dead, or their
    liveness mark is older than ``grace``; see :mod:`handler.inflight`). Returns how many files were removed.

    With ``recover`` an abandoned write whose metadata was on disk is committed (its data checked against the
    metadata first: stored size and digest), and a public data file with its metadata temp is completed; without
    it (a pod's cores being deleted) those are removed too. Temp files of writes that never reached their commit
    are removed. ``grace`` must be at least :data:`handler.inflight.MIN_GRACE_SECONDS`. ``node`` and
    ``proc_root``: the sweeper's own node and its process table, to judge its own node's writers by pid.
    ``algorithm``: the digest recorded for a core kept from a killed writer (the agent's ``--core-digest``).
    """
    inflight.check_grace(grace)
    now = time.time() if now is None else now
    root, ref = _split_container_dir(directory)
    d = open_container(root, ref)
    if d is None:
        return 0
    removed = 0
    with d:
        entries = {n: st for n, st in d.all_entries() if stat.S_ISREG(st.st_mode)}

        def gone(name: str) -> bool:
            return inflight.abandoned(
                entries[name], _parse_temp(name), now=now, grace=grace, node=node, proc_root=proc_root
            )

        done: set[str] = set()
        # 1. Writes of this protocol, judged by their data temp (the one whose mark is kept fresh).
        for w in _pending_writes(n for n in entries if n.startswith(".")).values():
            if w.data is None:
                continue  # a metadata temp alone: its data is public (step 2) or it is debris (step 3)
            done.update(w.names())
            if not gone(w.data):
                continue
            if recover and w.metas:
                cid = _finish_write(d, w)
                if cid is not None:
                    logger.warning("completed the interrupted commit of core %s/%s", d.path, cid)
                    entries[cid + META_SUFFIX] = entries[w.data]
            elif recover and not _is_public(entries, w.data):
                cid = _salvage(d, w, ref, algorithm=algorithm)
                if cid is not None:
                    logger.warning("kept core %s/%s, cut where its writer was killed (truncated: killed)", d.path, cid)
                    entries[cid + META_SUFFIX] = entries[w.data]
            for name in w.names():
                if d.unlink(name):
                    removed += 1
                    logger.info("removed uncommitted file %s/%s", d.path, name)
        # 2. Public data without metadata (a filesystem without hard links, or an older writer).
        for name in sorted(entries):
            if name.startswith(".") or not name.endswith(CORE_SUFFIX):
                continue
            core_id = name[: -len(CORE_SUFFIX)]
            if core_id + META_SUFFIX in entries or not CORE_ID_RE.match(core_id):
                continue
            temps = [
                n
                for n in entries
                if n not in done
                and n.endswith(META_SUFFIX + inflight.TMP)
                and (n.startswith(f".{core_id}.") or n.startswith(f".{core_id}@"))
                and gone(n)
            ]
            if not temps and not gone(name):
                continue
            if recover:
                if _complete_incomplete(d, core_id, temps):
                    entries[core_id + META_SUFFIX] = entries[name]
                    done.update(temps)
                else:
                    logger.warning(
                        "core %s/%s has no metadata, not even a temporary one; kept, not deleted", d.path, core_id
                    )
            elif d.unlink(name):
                removed += 1
        # 3. Any other temp file whose mark is old: a write that never reached its commit.
        for name in sorted(entries):
            if name in done or not (name.startswith(".") and name.endswith(inflight.TMP)) or not gone(name):
                continue
            if d.unlink(name):
                removed += 1
                logger.info("removed uncommitted file %s/%s", d.path, name)
    return removed


def delete_cores(root: Path, *, namespace: str, pod: str, pod_uid: str | None = None) -> int:
    """
    Delete a pod's committed cores (one incarnation, or all); returns how many were removed. Only what is
    reached beneath ``<root>/<namespace>/<pod>`` without a link is touched: a linked level is absent.
    """
    root = Path(root)
    validate_namespace(namespace)
    validate_pod_name(pod)
    if pod_uid is not None:
        validate_pod_uid(pod_uid)
    removed = 0
    dirs: list[Path] = []
    pod_dir = safefs.open_dir(root, namespace, pod)
    if pod_dir is None:
        return 0
    with pod_dir:
        for u, uid_dir in _sub_or_all(pod_dir, pod_uid, validate_pod_uid):
            for c, c_dir in _sub_or_all(uid_dir, None, validate_container):
                for core in _read_committed(root, c_dir, namespace=namespace, pod=pod, pod_uid=u, container=c):
                    if c_dir.unlink(core.ref.core_id + META_SUFFIX):
                        c_dir.unlink(core.ref.core_id + CORE_SUFFIX)
                        removed += 1
                dirs.append(container_dir(root, namespace=namespace, pod=pod, pod_uid=u, container=c))
    for d in dirs:
        # The owner asked for them gone: incomplete cores go too, not only committed ones.
        sweep_debris(d, recover=False)
        prune_empty_dirs(root, d)
    logger.info("deleted %d cores of %s/%s uid=%s", removed, namespace, pod, pod_uid or "*")
    return removed


class WriteInFlight(Exception):
    """A core of the same source is being committed by a process that is still alive (or may be)."""


def find_by_key(
    root: Path,
    *,
    namespace: str,
    pod: str,
    pod_uid: str,
    container: str,
    core_id: str,
    key: str,
    key_field: str,
    proc_root: Path = Path("/proc"),
) -> StoredCore | None:
    """
    The core filed earlier from the same source (``metadata[key_field] == key``) under ``core_id`` or one of
    its uniquified ids: committed, or interrupted in its commit by the death of its writer (then its commit is
    completed here). The key names this machine (a spool entry), so its writer is judged by pid and start time
    in ``proc_root``; one that may still be alive raises :class:`WriteInFlight`. None if there is none.
    """
    base = CoreRef(namespace=namespace, pod=pod, pod_uid=pod_uid, container=container, core_id=core_id)
    d = open_container(root, base)
    if d is None:
        return None

    def found(cid: str, meta: dict[str, Any]) -> StoredCore:
        ref = CoreRef(namespace=namespace, pod=pod, pod_uid=pod_uid, container=container, core_id=cid)
        return StoredCore(ref=ref, metadata=meta, core_path=ref.core_path(root), meta_path=ref.meta_path(root))

    with d:
        files = set(d.entries("file"))
        # Writes of the same source whose writer died before the metadata's rename: finish them.
        for w in _pending_writes(f for f in files if f.startswith(".")).values():
            if w.data is None or w.data_name is None or not _is_family(w.data_name.core_id, core_id):
                continue
            metas = [m for m in w.metas if (_read_metadata(d, m) or {}).get(key_field) == key]
            if not metas:
                continue
            if inflight.process_alive(w.data_name.writer, proc_root=proc_root) is not False:
                # Its writer may still be committing it: not filed yet, but filing it again would make two.
                raise WriteInFlight(
                    f"core {w.data_name.core_id} of the same source is being committed by pid {w.data_name.writer.pid}"
                )
            cid = _finish_write(d, _PendingWrite(token=w.token, data=w.data, data_name=w.data_name, metas=metas))
            if cid is not None:
                files = set(d.entries("file"))
        for cid in _id_candidates(core_id):
            if cid + CORE_SUFFIX not in files:
                return None
            meta = _read_metadata(d, cid + META_SUFFIX) if cid + META_SUFFIX in files else None
            if meta is None:
                temps = sorted(
                    f
                    for f in files
                    if (f.startswith(f".{cid}.") or f.startswith(f".{cid}@")) and f.endswith(META_SUFFIX + inflight.TMP)
                )
                for t in temps:
                    m = _read_metadata(d, t)
                    if m is not None and m.get(key_field) == key and m.get("coreID") == cid:
                        d.rename(t, cid + META_SUFFIX)
                        d.fsync()
                        meta = m
                        break
            if meta is not None and meta.get(key_field) == key:
                return found(cid, meta)
    return None


class CoreWriter:
    """
    Writes one core under the commit protocol of this module's docstring.

    ::

        with CoreWriter(root, namespace=..., pod=..., pod_uid=..., container=..., core_id=base, node=...) as w:
            w.write(gzip_bytes)          # or w.file for a file object
            stored = w.commit(metadata)  # the core exists only from here on

    Leaving the block without ``commit`` (an exception, a signal) removes the temp file. While the writer is
    open its temp file names it (``node``, pid, start time) and a thread touches the temp file's mtime every
    ``heartbeat`` seconds (:mod:`handler.inflight`), so no sweeper takes a stalled write for debris. A handler
    killed outright leaves hidden temp files that :func:`sweep_debris` commits (killed anywhere in
    :meth:`commit`: the metadata was on disk) or removes (killed before: the stream never ended), once the
    writer is known dead or its mark is older than the sweeper's grace.
    ``core_id`` is the base id; if it is taken, ``-1``, ``-2``... is appended at commit.
    """

    def __init__(
        self,
        root: Path,
        *,
        namespace: str,
        pod: str,
        pod_uid: str,
        container: str,
        core_id: str,
        node: str | None = None,
        heartbeat: float = inflight.HEARTBEAT_SECONDS,
    ) -> None:
        self.root = Path(root)
        self.base = CoreRef(namespace=namespace, pod=pod, pod_uid=pod_uid, container=container, core_id=core_id)
        self.directory = self.base.directory(self.root)
        self.node = node
        self.heartbeat_interval = heartbeat
        self._dir: safefs.Dir | None = None
        self._tmp_name: str | None = None
        self._token = secrets.token_hex(6)
        self._writer: inflight.Writer | None = None
        self._file: BinaryIO | None = None
        self._heartbeat: inflight.Heartbeat | None = None
        self.stored_size = 0
        self._written_back = 0
        self.committed: StoredCore | None = None

    @property
    def _tmp(self) -> Path | None:
        return self.directory / self._tmp_name if self._tmp_name else None

    def open(self) -> BinaryIO:
        if self._file is not None:
            return self._file
        b = self.base
        self._writer = inflight.this_writer(self.node)
        for attempt in range(3):
            try:
                self._dir = safefs.make_dirs(
                    self.root, b.namespace, b.pod, b.pod_uid, b.container, mode=DIR_MODE, root_mode=DIR_MODE
                )
                self._tmp_name = inflight.temp_name(b.core_id, self._writer, self._token, CORE_SUFFIX)
                fd = self._dir.create(self._tmp_name, mode=FILE_MODE)
                break
            except FileNotFoundError:
                # A concurrent delete_cores pruned the directory between mkdir and open: make it again.
                if self._dir is not None:
                    self._dir.close()
                    self._dir = None
                if attempt == 2:
                    raise
        self._file = os.fdopen(fd, "wb", buffering=0)
        self._heartbeat = inflight.Heartbeat(
            fd, interval=self.heartbeat_interval, what=f"{self.directory}/{self._tmp_name}"
        )
        return self._file

    @property
    def file(self) -> BinaryIO:
        return self.open()

    def write(self, data: bytes | memoryview) -> None:
        f = self.open()
        view = memoryview(data)
        while view:
            n = f.write(view)
            view = view[n:]
        self.stored_size += len(data)
        if self.stored_size - self._written_back >= WRITEBACK_BYTES:
            self._start_writeback(f.fileno())

    def _start_writeback(self, fd: int) -> None:
        """Start writing back what was written so far, without waiting, and keep it out of the node's page
        cache: the commit's fsync then has only the tail left to wait for (on a local disk it took ~0.6 s per
        GiB of core at the end, now ~0.05 s), and a big core does not evict the node's workloads' cache.
        POSIX_FADV_DONTNEED starts asynchronous writeback of dirty pages in the range and drops clean ones."""
        try:
            os.posix_fadvise(fd, self._written_back, self.stored_size - self._written_back, os.POSIX_FADV_DONTNEED)
        except OSError as e:
            logger.debug("no early writeback for %s: %s", self._tmp_name, e)
        self._written_back = self.stored_size

    def _close_file(self) -> None:
        """Stop the heartbeat (it writes through the fd), then close the fd."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        if self._file is not None and not self._file.closed:
            self._file.close()

    def _metadata_body(self, metadata: dict[str, Any], ref: CoreRef, stored_size: int) -> tuple[dict[str, Any], bytes]:
        meta = dict(metadata)
        meta.update(
            coreID=ref.core_id,
            namespace=ref.namespace,
            pod=ref.pod,
            podUID=ref.pod_uid,
            container=ref.container,
            storedSize=stored_size,
        )
        meta.setdefault("compression", "gzip")
        for k in METADATA_KEYS:
            meta.setdefault(k, None)
        return meta, (json.dumps(meta, indent=2, sort_keys=False) + "\n").encode()

    def _write_meta_temp(
        self, d: safefs.Dir, metadata: dict[str, Any], core_id: str, stored_size: int
    ) -> tuple[CoreRef, dict[str, Any], str]:
        assert self._writer is not None
        ref = CoreRef(
            namespace=self.base.namespace,
            pod=self.base.pod,
            pod_uid=self.base.pod_uid,
            container=self.base.container,
            core_id=core_id,
        )
        meta, body = self._metadata_body(metadata, ref, stored_size)
        name = inflight.temp_name(core_id, self._writer, self._token, META_SUFFIX)
        try:
            d.write_new(name, body, mode=FILE_MODE)
        except BaseException:
            d.unlink(name)  # a metadata temp cut by a full filesystem must not be left to pair with the data
            raise
        return ref, meta, name

    def _free_ids(self, d: safefs.Dir) -> Iterator[str]:
        for core_id in _id_candidates(self.base.core_id):
            if d.lstat(core_id + CORE_SUFFIX) is None:
                yield core_id

    def _next_id(self, free: Iterator[str]) -> str:
        core_id = next(free, None)
        if core_id is None:
            raise FileExistsError(f"no free core id for {self.base.core_id}")
        return core_id

    def commit(self, metadata: dict[str, Any]) -> StoredCore:
        """Make the core visible; fills coreID, the names, storedSize and compression into ``metadata``.

        The metadata temp is written (and fsynced) first, before anything else the commit does, so a writer
        killed at any step of it leaves a write the sweep can finish: data temp + metadata temp sharing a token.
        """
        f = self.open()
        assert self._tmp_name is not None and self._dir is not None
        d = self._dir
        stored_size = os.fstat(f.fileno()).st_size
        free = self._free_ids(d)
        meta_tmp: str | None = None
        named: str | None = None
        linked = False
        try:
            ref, meta, meta_tmp = self._write_meta_temp(d, metadata, self._next_id(free), stored_size)
            faults.point("commit:meta-written")
            os.fsync(f.fileno())
            faults.point("commit:data-synced")
            while True:
                try:
                    linked = d.link_no_replace(self._tmp_name, ref.core_id + CORE_SUFFIX)
                    named = ref.core_id + CORE_SUFFIX
                    break
                except FileExistsError:
                    # Taken since we looked (another writer of the same base id): relabel for the next free id.
                    d.unlink(meta_tmp)
                    meta_tmp = None
                    ref, meta, meta_tmp = self._write_meta_temp(d, metadata, self._next_id(free), stored_size)
            faults.point("commit:data-named")
            d.rename(meta_tmp, ref.core_id + META_SUFFIX)
        except BaseException:
            # Uncommitted (a full or failing filesystem): take the final data name away again, keeping the temp
            # file (a caller may still move its bytes elsewhere; abort() removes it).
            if meta_tmp is not None:
                d.unlink(meta_tmp)
            if named is not None:
                if linked:
                    d.unlink(named)
                else:
                    try:
                        d.rename(named, self._tmp_name)
                    except OSError:
                        pass
            raise
        faults.point("commit:meta-named")
        self._close_file()
        if linked:
            d.unlink(self._tmp_name)  # the core is committed; a stray temp file would be swept later
        self._tmp_name = None
        d.fsync()
        faults.point("commit:done")
        self.committed = StoredCore(
            ref=ref, metadata=meta, core_path=ref.core_path(self.root), meta_path=ref.meta_path(self.root)
        )
        self._close_dir()
        return self.committed

    def _close_dir(self) -> None:
        if self._dir is not None:
            self._dir.close()
            self._dir = None

    def partial(self) -> Path | None:
        """Close the data file and name the temp file holding what was written so far (None if nothing was
        opened), so a caller can move the bytes elsewhere before :meth:`abort` removes it."""
        self._close_file()
        return self._tmp

    def open_partial(self) -> BinaryIO | None:
        """What was written so far, opened for reading through the directory fd (never through a link)."""
        self._close_file()
        if self._dir is None or self._tmp_name is None:
            return None
        f = self._dir.open_read(self._tmp_name)
        return os.fdopen(f.fd, "rb") if f is not None else None

    def abort(self) -> None:
        self._close_file()
        if self._tmp_name is not None and self._dir is not None:
            self._dir.unlink(self._tmp_name)
        self._tmp_name = None
        self._close_dir()

    def __enter__(self) -> "CoreWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.committed is None:
            self.abort()


def amend_metadata(core: StoredCore, extra: dict[str, Any]) -> StoredCore:
    """Add keys to a committed core's metadata (its backtrace, its objects): a new file written, fsynced and
    renamed over the old one beneath the core's own directory (no link followed), so a reader sees the old or
    the new metadata, never part of either. The keys of :data:`METADATA_KEYS` cannot be changed this way."""
    fixed = set(METADATA_KEYS) & set(extra)
    if fixed:
        raise ValueError(f"cannot amend {sorted(fixed)} of a committed core")
    meta = {**core.metadata, **extra}
    body = (json.dumps(meta, indent=2, sort_keys=False) + "\n").encode()
    ref = core.ref
    d = safefs.open_dir(core.root, ref.namespace, ref.pod, ref.pod_uid, ref.container)
    if d is None:
        raise FileNotFoundError(f"the directory of core {ref.core_id} is gone")
    with d:
        d.replace_atomically(ref.core_id + META_SUFFIX, body, mode=FILE_MODE)
        d.fsync()
    return StoredCore(ref=ref, metadata=meta, core_path=core.core_path, meta_path=core.meta_path)
