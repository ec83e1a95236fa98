"""
The storage layout contract (DESIGN §1): the one owner of paths, names, the metadata schema and the commit protocol.

A core lives at ``<root>/<namespace>/<pod>/<pod-uid>/<container>/<core-id>.core.gz`` next to
``<core-id>.json``. The JSON file is the commit point: it is renamed into place last, and every reader
here ignores a core without it. Hidden names (leading ``.``) are temporary files of writes in flight.

Everything in this module is blocking filesystem code; the API server calls it through
``asyncio.to_thread``. Names that reach a path are validated here, and names that come from a crashing
process (comm, exe) are sanitized here, so no caller can build a path component of its own.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

logger = logging.getLogger(__name__)

CORE_SUFFIX = ".core.gz"
META_SUFFIX = ".json"
# Modes of what we create: cores hold secrets, so nothing is world-readable.
DIR_MODE = 0o750
FILE_MODE = 0o640
# A data file without metadata younger than this may be a write about to commit; older ones are debris.
ORPHAN_GRACE_SECONDS = 15 * 60

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


def container_dir(root: Path, *, namespace: str, pod: str, pod_uid: str, container: str) -> Path:
    return (Path(root) / validate_namespace(namespace) / validate_pod_name(pod) / validate_pod_uid(pod_uid)
            / validate_container(container))


def _subdirs(path: Path, validator: Any) -> list[str]:
    """Names of the real (not symlinked) subdirectories of ``path`` that are valid names of their level."""
    try:
        with os.scandir(path) as it:
            entries = [e for e in it if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    names = []
    for e in entries:
        try:
            names.append(validator(e.name))
        except InvalidName:
            logger.debug("ignoring %s: not a valid name at this level", path / e.name)
    return sorted(names)


def _read_committed(root: Path, *, namespace: str, pod: str, pod_uid: str, container: str) -> list[StoredCore]:
    directory = container_dir(root, namespace=namespace, pod=pod, pod_uid=pod_uid, container=container)
    try:
        with os.scandir(directory) as it:
            names = [e.name for e in it if e.name.endswith(META_SUFFIX) and not e.name.startswith(".")
                     and e.is_file(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    cores = []
    for name in names:
        core_id = name[: -len(META_SUFFIX)]
        if not CORE_ID_RE.match(core_id):
            continue
        ref = CoreRef(namespace=namespace, pod=pod, pod_uid=pod_uid, container=container, core_id=core_id)
        meta_path, core_path = ref.meta_path(root), ref.core_path(root)
        try:
            with open(meta_path, "rb") as f:
                metadata = json.loads(f.read(1 << 20))
        except FileNotFoundError:
            continue  # deleted while we listed
        except (OSError, ValueError) as e:
            logger.warning("ignoring core %s: unreadable metadata: %s", meta_path, e)
            continue
        if not isinstance(metadata, dict) or not os.path.isfile(core_path):
            logger.warning("ignoring core %s: metadata without a data file", meta_path)
            continue
        cores.append(StoredCore(ref=ref, metadata=metadata, core_path=core_path, meta_path=meta_path))
    return cores


def list_cores(root: Path, *, namespace: str, pod: str | None = None, pod_uid: str | None = None,
               container: str | None = None) -> list[StoredCore]:
    """Committed cores of a namespace, optionally narrowed; sorted by (container, core_id)."""
    root = Path(root)
    validate_namespace(namespace)
    if pod is not None:
        validate_pod_name(pod)
    if pod_uid is not None:
        validate_pod_uid(pod_uid)
    if container is not None:
        validate_container(container)
    cores: list[StoredCore] = []
    pods = [pod] if pod is not None else _subdirs(root / namespace, validate_pod_name)
    for p in pods:
        uids = [pod_uid] if pod_uid is not None else _subdirs(root / namespace / p, validate_pod_uid)
        for u in uids:
            containers = ([container] if container is not None
                          else _subdirs(root / namespace / p / u, validate_container))
            for c in containers:
                cores.extend(_read_committed(root, namespace=namespace, pod=p, pod_uid=u, container=c))
    cores.sort(key=lambda s: (s.ref.container, s.ref.core_id, s.ref.pod, s.ref.pod_uid))
    return cores


def list_pod_uids(root: Path, *, namespace: str, pod: str) -> list[str]:
    """The incarnations (uids) of a pod that have committed cores, ordered by their latest core, oldest first."""
    latest: dict[str, str] = {}
    for core in list_cores(root, namespace=namespace, pod=pod):
        uid = core.ref.pod_uid
        latest[uid] = max(latest.get(uid, ""), core.ref.core_id)
    return sorted(latest, key=lambda u: (latest[u], u))


def list_crashed_pods(root: Path, *, namespace: str | None = None) -> list[tuple[str, str, str]]:
    """``(namespace, pod, pod_uid)`` of every pod incarnation with committed cores, sorted."""
    root = Path(root)
    namespaces = [validate_namespace(namespace)] if namespace is not None else _subdirs(root, validate_namespace)
    found = set()
    for ns in namespaces:
        for core in list_cores(root, namespace=ns):
            found.add((ns, core.ref.pod, core.ref.pod_uid))
    return sorted(found)


def iter_all_cores(root: Path) -> Iterator[StoredCore]:
    """Every committed core under ``root`` (for retention)."""
    for ns in _subdirs(Path(root), validate_namespace):
        yield from list_cores(root, namespace=ns)


def remove_core(core: StoredCore) -> bool:
    """Uncommit a core (metadata first, so no reader ever sees half of it), then remove its data."""
    try:
        core.meta_path.unlink()
    except FileNotFoundError:
        return False
    try:
        core.core_path.unlink()
    except FileNotFoundError:
        pass
    return True


def _prune_empty_dirs(root: Path, directory: Path) -> None:
    """Remove ``directory`` and its parents up to (not including) the namespace level while they are empty."""
    root = Path(root)
    d = directory
    while d != root and d.parent != root:
        try:
            d.rmdir()
        except OSError:
            return  # not empty (maybe a write in flight), or gone
        d = d.parent


def sweep_debris(directory: Path, *, now: float | None = None, grace: float = ORPHAN_GRACE_SECONDS) -> int:
    """Remove temp files and uncommitted data files older than ``grace`` from one container directory."""
    now = time.time() if now is None else now
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    names = {e.name for e in entries}
    for e in entries:
        debris = e.name.startswith(".") or (
            e.name.endswith(CORE_SUFFIX) and e.name[: -len(CORE_SUFFIX)] + META_SUFFIX not in names)
        if not debris or not e.is_file(follow_symlinks=False):
            continue
        try:
            if now - e.stat(follow_symlinks=False).st_mtime >= grace:
                os.unlink(e.path)
                removed += 1
                logger.info("removed uncommitted file %s", e.path)
        except FileNotFoundError:
            pass
    return removed


def delete_cores(root: Path, *, namespace: str, pod: str, pod_uid: str | None = None) -> int:
    """Delete a pod's committed cores (one incarnation, or all); returns how many were removed."""
    root = Path(root)
    validate_namespace(namespace)
    validate_pod_name(pod)
    if pod_uid is not None:
        validate_pod_uid(pod_uid)
    removed = 0
    dirs = set()
    for core in list_cores(root, namespace=namespace, pod=pod, pod_uid=pod_uid):
        if remove_core(core):
            removed += 1
        dirs.add(core.core_path.parent)
    uids = [pod_uid] if pod_uid is not None else _subdirs(root / namespace / pod, validate_pod_uid)
    for u in uids:
        for c in _subdirs(root / namespace / pod / u, validate_container):
            dirs.add(root / namespace / pod / u / c)
    for d in dirs:
        sweep_debris(d)
        _prune_empty_dirs(root, d)
    logger.info("deleted %d cores of %s/%s uid=%s", removed, namespace, pod, pod_uid or "*")
    return removed


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some network filesystems refuse fsync on directories; their renames are synchronous anyway
    finally:
        os.close(fd)


def _link_no_replace(src: Path, dst: Path) -> bool:
    """
    Give ``src`` the name ``dst`` unless ``dst`` exists (FileExistsError), atomically where the fs allows.
    True: hard-linked (``src`` still exists too); False: renamed (the fs has no hard links).
    """
    try:
        os.link(src, dst)
        return True
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
    # No hard links here: check-then-rename; the uniquifier race is then only as good as the fs.
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    os.rename(src, dst)
    return False


class CoreWriter:
    """
    Writes one core under the commit protocol: hidden temp name, fsync, data renamed, metadata renamed last.

    ::

        with CoreWriter(root, namespace=..., pod=..., pod_uid=..., container=..., core_id=base) as w:
            w.write(gzip_bytes)          # or w.file for a file object
            stored = w.commit(metadata)  # the core exists only from here on

    Leaving the block without ``commit`` (an exception, a signal) removes the temp file; a handler killed
    outright leaves only a hidden temp file, which readers ignore and :func:`sweep_debris` removes.
    ``core_id`` is the base id; if it is taken, ``-1``, ``-2``... is appended at commit.
    """

    def __init__(self, root: Path, *, namespace: str, pod: str, pod_uid: str, container: str,
                 core_id: str) -> None:
        self.root = Path(root)
        self.base = CoreRef(namespace=namespace, pod=pod, pod_uid=pod_uid, container=container, core_id=core_id)
        self.directory = self.base.directory(self.root)
        self._tmp: Path | None = None
        self._file: BinaryIO | None = None
        self.stored_size = 0
        self.committed: StoredCore | None = None

    def open(self) -> BinaryIO:
        if self._file is not None:
            return self._file
        for attempt in range(3):
            try:
                self.directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
                self._tmp = self.directory / f".{self.base.core_id}.{secrets.token_hex(6)}{CORE_SUFFIX}.tmp"
                fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
                break
            except FileNotFoundError:
                # A concurrent delete_cores pruned the directory between mkdir and open: make it again.
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

    def commit(self, metadata: dict[str, Any]) -> StoredCore:
        """Make the core visible; fills coreID, the names, storedSize and compression into ``metadata``."""
        f = self.open()
        assert self._tmp is not None
        f.flush()
        os.fsync(f.fileno())
        stored_size = os.fstat(f.fileno()).st_size
        f.close()
        ref = None
        linked = False
        for n in range(0, 100000):
            core_id = self.base.core_id if n == 0 else f"{self.base.core_id}-{n}"
            candidate = CoreRef(namespace=self.base.namespace, pod=self.base.pod, pod_uid=self.base.pod_uid,
                                container=self.base.container, core_id=core_id)
            try:
                linked = _link_no_replace(self._tmp, candidate.core_path(self.root))
            except FileExistsError:
                continue
            ref = candidate
            break
        if ref is None:
            raise FileExistsError(f"no free core id for {self.base.core_id}")
        meta = dict(metadata)
        meta.update(coreID=ref.core_id, namespace=ref.namespace, pod=ref.pod, podUID=ref.pod_uid,
                    container=ref.container, storedSize=stored_size)
        meta.setdefault("compression", "gzip")
        missing = [k for k in METADATA_KEYS if k not in meta]
        for k in missing:
            meta[k] = None
        body = (json.dumps(meta, indent=2, sort_keys=False) + "\n").encode()
        meta_tmp = self.directory / f".{ref.core_id}.{secrets.token_hex(6)}{META_SUFFIX}.tmp"
        try:
            fd = os.open(meta_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            with os.fdopen(fd, "wb") as mf:
                mf.write(body)
                mf.flush()
                os.fsync(mf.fileno())
            os.rename(meta_tmp, ref.meta_path(self.root))
        except BaseException:
            # Uncommitted: take the final data name away again, keeping the temp file (a caller may still
            # move its bytes elsewhere; abort() removes it).
            for p in (meta_tmp, *((ref.core_path(self.root),) if linked else ())):
                try:
                    p.unlink()
                except OSError:
                    pass
            if not linked:
                try:
                    os.rename(ref.core_path(self.root), self._tmp)
                except OSError:
                    pass
            raise
        if linked:
            try:
                self._tmp.unlink()
            except OSError:
                pass  # the core is committed; a stray temp file is swept later
        self._tmp = None
        _fsync_dir(self.directory)
        self.committed = StoredCore(ref=ref, metadata=meta, core_path=ref.core_path(self.root),
                                    meta_path=ref.meta_path(self.root))
        return self.committed

    def partial(self) -> Path | None:
        """Close the data file and name the temp file holding what was written so far (None if nothing was
        opened), so a caller can move the bytes elsewhere before :meth:`abort` removes it."""
        if self._file is not None and not self._file.closed:
            self._file.close()
        return self._tmp

    def abort(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self._tmp is not None:
            try:
                self._tmp.unlink()
            except OSError:
                pass
            self._tmp = None

    def __enter__(self) -> "CoreWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.committed is None:
            self.abort()


def amend_metadata(core: StoredCore, extra: dict[str, Any]) -> StoredCore:
    """Add keys to a committed core's metadata (its backtrace, its objects): a new file written, fsynced and
    renamed over the old one, so a reader sees the old or the new metadata, never part of either. The keys of
    :data:`METADATA_KEYS` cannot be changed this way."""
    fixed = set(METADATA_KEYS) & set(extra)
    if fixed:
        raise ValueError(f"cannot amend {sorted(fixed)} of a committed core")
    meta = {**core.metadata, **extra}
    body = (json.dumps(meta, indent=2, sort_keys=False) + "\n").encode()
    directory = core.meta_path.parent
    tmp = directory / f".{core.ref.core_id}.{secrets.token_hex(6)}{META_SUFFIX}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, core.meta_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)
    return StoredCore(ref=core.ref, metadata=meta, core_path=core.core_path, meta_path=core.meta_path)
