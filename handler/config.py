"""
The handler's configuration: every path it touches and every limit, from a JSON file the agent writes and flags.

The handler is started by the kernel (through the shim) with only the crash's specifiers on its command
line, so the agent writes the rest to ``handler.json`` in its state directory; flags override the file,
which is how tests and ``import`` point it at temporary trees.

The steps are metrics-server's: the flags (``handler.cli.build_parser``, values checked by :mod:`handler.flags`)
are the options; :meth:`HandlerConfig.load` completes them with the file and the defaults into one frozen
``HandlerConfig`` that everything downstream receives. A file value of the wrong type is dropped with one log
line (the default applies): a broken config must never lose a core.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from handler import digest

logger = logging.getLogger(__name__)

# The agent's defaults (``--host-root``, ``--host-dir``, ``--storage-root``, ``--proc-root``) and the names it
# gives its files in the host dir: the handler's own defaults are derived from them, so the two always agree.
HOST_ROOT = Path("/host")
HOST_DIR = "/var/lib/coredump"
STORAGE_ROOT = Path("/var/lib/coredump/storage")
PROC_ROOT = Path("/proc")
CONFIG_NAME, SPOOL_NAME, STATE_NAME = "handler.json", "spool", "state"


def local_dir(host_root: Path, host_dir: str) -> Path:
    """The agent's host directory (``host_dir``, as the host sees it) as seen with the host's / at ``host_root``."""
    return Path(host_root) / host_dir.lstrip("/")


_LOCAL_DIR = local_dir(HOST_ROOT, HOST_DIR)
# Where the agent writes it (handler.cli keeps a copy as a string, to start reading before importing this).
DEFAULT_CONFIG_FILE = _LOCAL_DIR / CONFIG_NAME


@dataclass(frozen=True)
class HandlerConfig:
    storage_root: Path = STORAGE_ROOT
    spool_dir: Path = _LOCAL_DIR / SPOOL_NAME
    # Per-core outcome records the agent turns into metrics and Events; rate-limit state lives here too.
    state_dir: Path = _LOCAL_DIR / STATE_NAME
    proc_root: Path = PROC_ROOT
    host_root: Path = HOST_ROOT
    # Where the kubelet's /var/log/containers links are, relative to host_root.
    container_logs: str = "var/log/containers"
    crictl: str | None = "crictl"
    # The runtime named in containerID when the cgroup path does not tell (cgroupfs paths are bare ids).
    runtime: str = "containerd"
    crictl_timeout: float = 3.0
    node: str | None = None
    max_core_size: int = 0  # bytes stored per core; 0 = unlimited
    rate_first: int = 5  # cores kept at the start of a window, per container
    rate_latest: int = 5  # plus the latest this many
    rate_window: float = 3600.0  # seconds
    # Past the first N, a core replaces the oldest of the latest M at most this often; the rest are not compressed.
    rate_latest_interval: float = 60.0
    # Whether a core is kept when neither its pod nor its namespace says (annotation coredump.example.io/capture).
    capture_default: bool = True
    # The node's core_pattern before the agent replaced it: non-pod crashes go there.
    previous_pattern_file: Path | None = None
    foreign: str = "previous"  # previous | drop
    storage_timeout: float = 5.0  # a storage probe slower than this sends the core to the spool
    stall_timeout: float = 60.0  # no progress for this long: give up, so the crashing process can die
    chunk_size: int = 1 << 20
    # After the commit, while the process is held: keep its objects by build-id and unwind it (handler.explain).
    explain: bool = True
    objects_max_bytes: int = 512 << 20  # bytes of objects copied per core
    objects_max_seconds: float = 1.0  # time spent copying objects per core
    unwind_timeout: float = 5.0  # wall time of the unwinding child
    compress_level: int = 2  # ISA-L gzip level 0-3 (README, Core ingest: speed against size)
    core_digest: str = digest.DEFAULT  # the hash of every core's content: blake3 | sha256 (handler.digest)
    # How often a writer marks its temp file on storage as alive (handler.inflight; at most 60 s).
    heartbeat_interval: float = 60.0
    extra: dict[str, Any] = field(default_factory=dict)
    # The settings that came from the config file or a flag (not defaults): ``import`` writes only there.
    explicit: frozenset[str] = frozenset()

    _PATHS = ("storage_root", "spool_dir", "state_dir", "proc_root", "host_root", "previous_pattern_file")

    def __post_init__(self) -> None:
        # Completed once here, so every way of making a config (file, flags, the agent) ends the same.
        for name in self._PATHS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if self.crictl == "":
            object.__setattr__(self, "crictl", None)  # '' disables the CRI lookup

    @classmethod
    def load(cls, path: Path | None, *, overrides: dict[str, Any] | None = None) -> "HandlerConfig":
        data: dict[str, Any] = {}
        if path is not None:
            try:
                data = json.loads(Path(path).read_text())
            except FileNotFoundError:
                logger.debug("no handler config at %s, using defaults", path)
            except (OSError, ValueError) as e:
                # A broken config must not lose a core: go on with defaults (which spool if storage is not there).
                logger.error("unreadable handler config %s: %s; using defaults", path, e)
        if not isinstance(data, dict):
            logger.error("handler config %s is not a JSON object; using defaults", path)
            data = {}
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
        defaults = cls()
        known: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in ("extra", "explicit") or f.name not in data:
                continue
            value, default = data[f.name], getattr(defaults, f.name)
            if not _fits(value, default):
                logger.error("handler config %s: %s=%r is not like %r; using the default", path, f.name, value, default)
                continue
            if f.name in CHOICES and value not in CHOICES[f.name]:
                logger.error(
                    "handler config %s: %s=%r is not one of %s; using the default",
                    path,
                    f.name,
                    value,
                    ", ".join(map(str, CHOICES[f.name])),
                )
                continue
            known[f.name] = value
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**known, extra={k: v for k, v in data.items() if k not in names}, explicit=frozenset(known))

    def to_json(self) -> str:
        out = {}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "explicit"):
                continue
            v = getattr(self, f.name)
            out[f.name] = str(v) if isinstance(v, Path) else v
        return json.dumps(out, indent=2, sort_keys=True) + "\n"

    @property
    def outcomes_dir(self) -> Path:
        return self.state_dir / "outcomes"

    @property
    def ratelimit_dir(self) -> Path:
        return self.state_dir / "ratelimit"


# Settings with a fixed set of values: the agent's and the handler's flags offer these, and any other value in the
# config file falls back to the default.
CHOICES: dict[str, tuple[Any, ...]] = {
    "foreign": ("previous", "drop"),
    "compress_level": (0, 1, 2, 3),
    "core_digest": digest.ALGORITHMS,
}


def _fits(value: Any, default: Any) -> bool:
    """Whether a value read from the JSON file can stand where ``default`` stands (paths are strings there)."""
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, (str, Path)):
        return isinstance(value, (str, Path))
    return True
