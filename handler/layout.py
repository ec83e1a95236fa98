"""
The storage layout contract (README "Storage layout"): the one owner of paths, names, the metadata schema
and the commit protocol.

A core lives at ``<root>/<namespace>/<pod>/<pod-uid>/<container>/<core-id>.core.gz`` next to
``<core-id>.json``. Hidden names (leading ``.``) are temporary files of writes in flight.

The commit protocol (one rule, the README says the same): **the ``.json`` is the commit point.**
:class:`CoreWriter` writes the data under a hidden temp name and fsyncs it, writes the metadata under a hidden
temp name (``.<core-id>.<rand>.json.tmp``) and fsyncs it, *then* gives the data its final name (a hard link that
never replaces, which also reserves the core id), and renames the metadata into place last. So at any instant a
crash leaves either nothing public, or a public ``<core-id>.core.gz`` whose complete metadata is already on disk
under its temp name (an *incomplete* core: every reader skips it, and :func:`sweep_debris` completes it by
renaming that metadata into place, never deleting its bytes), or a committed pair. Each step is a
:func:`handler.faults.point` so tests kill the writer at every one of them.

Every access below the root goes through :mod:`handler.safefs`: no level is ever reached through a link, and
what is opened is checked to be a regular file or directory. Names that reach a path are validated here, and
names that come from a crashing process (comm, exe) are sanitized here, so no caller can build a path component
of its own. Everything in this module is blocking filesystem code; the API server calls it through
``asyncio.to_thread``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from handler import faults, safefs

logger = logging.getLogger(__name__)

CORE_SUFFIX = ".core.gz"
META_SUFFIX = ".json"
# Modes of what we create: cores hold secrets, so nothing is world-readable.
DIR_MODE = 0o750
FILE_MODE = 0o640
# A temp file or incomplete core younger than this may be a write about to commit; older ones are swept.
ORPHAN_GRACE_SECONDS = 15 * 60
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
    "coreID", "namespace", "pod", "podUID", "container", "containerID", "node", "image", "imageDigest",
    "pid", "signal", "signalName", "comm", "exe", "buildID", "timestamp", "size", "observedSize",
    "storedSize", "sha256", "truncated", "truncationReason", "compression",
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
    return _check("namespace", v, _DNS1123_LABEL, max_len=63,
                  rule="must be a DNS-1123 label (lowercase letters, digits and '-', starting and ending alphanumeric)")


def validate_pod_name(v: str) -> str:
    return _check("pod name", v, _DNS1123_SUBDOMAIN, max_len=253,
                  rule="must be a DNS-1123 subdomain (lowercase letters, digits, '-' and '.', "
                       "each part starting and ending alphanumeric)")


def validate_pod_uid(v: str) -> str:
    return _check("pod uid", v, _POD_UID, max_len=64, rule="must be lowercase hex digits and '-' (a UUID)")


def validate_container(v: str) -> str:
    return _check("container", v, _DNS1123_LABEL, max_len=63,
                  rule="must be a DNS-1123 label (lowercase letters, digits and '-', starting and ending alphanumeric)")


def validate_core_id(v: str) -> str:
    return _check("core id", v, CORE_ID_RE, max_len=128,
                  rule="must look like YYYYMMDDTHHMMSSZ-<comm>-<pid>-<signal>[-<n>]")


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
        return container_dir(root, namespace=self.namespace, pod=self.pod, pod_uid=self.pod_uid,
                             container=self.container)

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
    return (Path(root) / validate_namespace(namespace) / validate_pod_name(pod) / validate_pod_uid(pod_uid)
            / validate_container(container))


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
    for n in ([name] if name is not None else _valid_names(d, validator)):
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


def _read_committed(root: Path, d: safefs.Dir, *, namespace: str, pod: str, pod_uid: str,
                    container: str) -> list[StoredCore]:
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
        cores.append(StoredCore(ref=ref, metadata=metadata, core_path=ref.core_path(root),
                                meta_path=ref.meta_path(root)))
    return cores


def list_cores(root: Path, *, namespace: str, pod: str | None = None, pod_uid: str | None = None,
               container: str | None = None) -> list[StoredCore]:
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


def _complete_incomplete(d: safefs.Dir, core_id: str, temps: list[str]) -> bool:
    """Rename the fsynced metadata temp of ``core_id`` into place (finishing an interrupted commit)."""
    for name in temps:
        meta = _read_metadata(d, name)
        if meta is not None and meta.get("coreID") == core_id:
            d.rename(name, core_id + META_SUFFIX)
            d.fsync()
            logger.warning("completed the interrupted commit of core %s/%s from its metadata", d.path, core_id)
            return True
    return False


def sweep_debris(directory: Path, *, now: float | None = None, grace: float = ORPHAN_GRACE_SECONDS,
                 recover: bool = True) -> int:
    """
    One container directory, after ``grace``: complete incomplete cores (``recover``; else remove them) and
    remove temp files of writes that never reached their commit. Returns how many files were removed.
    """
    now = time.time() if now is None else now
    root, ref = _split_container_dir(directory)
    d = open_container(root, ref)
    if d is None:
        return 0
    removed = 0
    with d:
        entries = {n: st for n, st in d.all_entries() if stat.S_ISREG(st.st_mode)}
        old = {n for n, st in entries.items() if now - st.st_mtime >= grace}
        for name in sorted(old):
            if name.startswith(".") or not name.endswith(CORE_SUFFIX):
                continue
            core_id = name[: -len(CORE_SUFFIX)]
            if core_id + META_SUFFIX in entries or not CORE_ID_RE.match(core_id):
                continue
            temps = [n for n in old if n.startswith(f".{core_id}.") and n.endswith(META_SUFFIX + ".tmp")]
            if recover:
                if _complete_incomplete(d, core_id, temps):
                    entries[core_id + META_SUFFIX] = entries[name]
                    old.difference_update(temps)
                else:
                    logger.warning("core %s/%s has no metadata, not even a temporary one; kept, not deleted",
                                   d.path, core_id)
            elif d.unlink(name):
                removed += 1
        for name in sorted(old):
            if name.startswith(".") and name.endswith(".tmp") and d.unlink(name):
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


def find_by_key(root: Path, *, namespace: str, pod: str, pod_uid: str, container: str, core_id: str,
                key: str, key_field: str) -> StoredCore | None:
    """
    The core filed earlier from the same source (``metadata[key_field] == key``) under ``core_id`` or one of
    its uniquified ids: committed, or incomplete (then its commit is completed here). None if there is none.
    """
    base = CoreRef(namespace=namespace, pod=pod, pod_uid=pod_uid, container=container, core_id=core_id)
    d = open_container(root, base)
    if d is None:
        return None
    with d:
        files = set(d.entries("file"))
        for n in range(0, 100000):
            cid = core_id if n == 0 else f"{core_id}-{n}"
            if cid + CORE_SUFFIX not in files:
                return None
            meta = _read_metadata(d, cid + META_SUFFIX) if cid + META_SUFFIX in files else None
            if meta is None:
                temps = sorted(f for f in files if f.startswith(f".{cid}.") and f.endswith(META_SUFFIX + ".tmp"))
                for t in temps:
                    m = _read_metadata(d, t)
                    if m is not None and m.get(key_field) == key and m.get("coreID") == cid:
                        d.rename(t, cid + META_SUFFIX)
                        d.fsync()
                        meta = m
                        break
            if meta is not None and meta.get(key_field) == key:
                ref = CoreRef(namespace=namespace, pod=pod, pod_uid=pod_uid, container=container, core_id=cid)
                return StoredCore(ref=ref, metadata=meta, core_path=ref.core_path(root), meta_path=ref.meta_path(root))
    return None


class CoreWriter:
    """
    Writes one core under the commit protocol of this module's docstring.

    ::

        with CoreWriter(root, namespace=..., pod=..., pod_uid=..., container=..., core_id=base) as w:
            w.write(gzip_bytes)          # or w.file for a file object
            stored = w.commit(metadata)  # the core exists only from here on

    Leaving the block without ``commit`` (an exception, a signal) removes the temp file; a handler killed
    outright leaves hidden temp files (readers ignore them, :func:`sweep_debris` removes them) or, killed after
    the data got its name, an incomplete core that :func:`sweep_debris` completes.
    ``core_id`` is the base id; if it is taken, ``-1``, ``-2``... is appended at commit.
    """

    def __init__(self, root: Path, *, namespace: str, pod: str, pod_uid: str, container: str,
                 core_id: str) -> None:
        self.root = Path(root)
        self.base = CoreRef(namespace=namespace, pod=pod, pod_uid=pod_uid, container=container, core_id=core_id)
        self.directory = self.base.directory(self.root)
        self._dir: safefs.Dir | None = None
        self._tmp_name: str | None = None
        self._file: BinaryIO | None = None
        self.stored_size = 0
        self.committed: StoredCore | None = None

    @property
    def _tmp(self) -> Path | None:
        return self.directory / self._tmp_name if self._tmp_name else None

    def open(self) -> BinaryIO:
        if self._file is not None:
            return self._file
        b = self.base
        for attempt in range(3):
            try:
                self._dir = safefs.make_dirs(self.root, b.namespace, b.pod, b.pod_uid, b.container, mode=DIR_MODE,
                                             root_mode=DIR_MODE)
                self._tmp_name = f".{b.core_id}.{secrets.token_hex(6)}{CORE_SUFFIX}.tmp"
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

    def _metadata_body(self, metadata: dict[str, Any], ref: CoreRef, stored_size: int) -> tuple[dict[str, Any], bytes]:
        meta = dict(metadata)
        meta.update(coreID=ref.core_id, namespace=ref.namespace, pod=ref.pod, podUID=ref.pod_uid,
                    container=ref.container, storedSize=stored_size)
        meta.setdefault("compression", "gzip")
        for k in METADATA_KEYS:
            meta.setdefault(k, None)
        return meta, (json.dumps(meta, indent=2, sort_keys=False) + "\n").encode()

    def commit(self, metadata: dict[str, Any]) -> StoredCore:
        """Make the core visible; fills coreID, the names, storedSize and compression into ``metadata``."""
        f = self.open()
        assert self._tmp_name is not None and self._dir is not None
        d = self._dir
        f.flush()
        os.fsync(f.fileno())
        stored_size = os.fstat(f.fileno()).st_size
        f.close()
        faults.point("commit:data-synced")
        ref = None
        linked = False
        meta: dict[str, Any] = {}
        meta_tmp = ""
        for n in range(0, 100000):
            core_id = self.base.core_id if n == 0 else f"{self.base.core_id}-{n}"
            candidate = CoreRef(namespace=self.base.namespace, pod=self.base.pod, pod_uid=self.base.pod_uid,
                                container=self.base.container, core_id=core_id)
            if d.lstat(core_id + CORE_SUFFIX) is not None:
                continue
            meta, body = self._metadata_body(metadata, candidate, stored_size)
            # The metadata is on disk (under its temp name) before the data is public: see the module docstring.
            meta_tmp = f".{core_id}.{secrets.token_hex(6)}{META_SUFFIX}.tmp"
            d.write_new(meta_tmp, body, mode=FILE_MODE)
            faults.point("commit:meta-written")
            try:
                linked = d.link_no_replace(self._tmp_name, core_id + CORE_SUFFIX)
            except FileExistsError:
                d.unlink(meta_tmp)
                continue
            except BaseException:
                d.unlink(meta_tmp)
                raise
            ref = candidate
            break
        if ref is None:
            raise FileExistsError(f"no free core id for {self.base.core_id}")
        faults.point("commit:data-named")
        try:
            d.rename(meta_tmp, ref.core_id + META_SUFFIX)
        except BaseException:
            # Uncommitted: take the final data name away again, keeping the temp file (a caller may still
            # move its bytes elsewhere; abort() removes it).
            d.unlink(meta_tmp)
            if linked:
                d.unlink(ref.core_id + CORE_SUFFIX)
            else:
                try:
                    d.rename(ref.core_id + CORE_SUFFIX, self._tmp_name)
                except OSError:
                    pass
            raise
        faults.point("commit:meta-named")
        if linked:
            d.unlink(self._tmp_name)  # the core is committed; a stray temp file would be swept later
        self._tmp_name = None
        d.fsync()
        faults.point("commit:done")
        self.committed = StoredCore(ref=ref, metadata=meta, core_path=ref.core_path(self.root),
                                    meta_path=ref.meta_path(self.root))
        self._close_dir()
        return self.committed

    def _close_dir(self) -> None:
        if self._dir is not None:
            self._dir.close()
            self._dir = None

    def partial(self) -> Path | None:
        """Close the data file and name the temp file holding what was written so far (None if nothing was
        opened), so a caller can move the bytes elsewhere before :meth:`abort` removes it."""
        if self._file is not None and not self._file.closed:
            self._file.close()
        return self._tmp

    def open_partial(self) -> BinaryIO | None:
        """What was written so far, opened for reading through the directory fd (never through a link)."""
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self._dir is None or self._tmp_name is None:
            return None
        f = self._dir.open_read(self._tmp_name)
        return os.fdopen(f.fd, "rb") if f is not None else None

    def abort(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
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
