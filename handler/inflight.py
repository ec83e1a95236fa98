"""
Writes in flight on shared storage: who is writing a temp file, and whether that writer is still alive.

Every node writes into the same storage and any of them (or the API server's leader) may sweep it, so a temp file
says who wrote it and keeps a liveness mark a sweeper on another machine can check:

* its name carries the writer: ``.<core-id>@<node>@<pid>-<starttime>@<token><suffix>.tmp`` (:func:`temp_name`;
  ``@`` appears in no core id and no node name, so :func:`parse_temp_name` takes it apart unambiguously). The data
  temp and the metadata temp of one write share the token, so a sweeper can pair them;
* its writer, while alive, touches the data temp's mtime through its own fd every ``interval`` seconds
  (:class:`Heartbeat`, at most :data:`HEARTBEAT_SECONDS`), even while the stream is stalled and no byte is written.

A sweeper judges a temp file abandoned (:func:`abandoned`) when its mark is older than its grace (which must be at
least :data:`MIN_GRACE_SECONDS`, four heartbeats); on its own node it also asks the process table: a writer whose
pid still has the recorded start time is alive whatever the mark says (a hung NFS write cannot touch the mark),
and one whose pid is gone or reused is dead at once, without waiting for the grace.

Names read from storage are untrusted: a name that does not parse is an old-style or foreign temp file, judged by
its mtime alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# A writer touches its temp file at least this often; a sweeper's grace must cover several of them.
HEARTBEAT_SECONDS = 60.0
MIN_GRACE_SECONDS = 4 * HEARTBEAT_SECONDS
NODE_TAG_MAX = 63
UNKNOWN_NODE = "_"
TMP = ".tmp"

_NODE_CHARS = re.compile(r"[^a-z0-9.-]")
_NODE_TAG = re.compile(r"^(_|[a-z0-9.~-]{1,63})$")
_PROCESS = re.compile(r"^(?P<pid>[1-9]\d{0,9})-(?P<start>\d{1,20})$")
_TOKEN = re.compile(r"^[0-9a-f]{8,32}$")


@dataclass(frozen=True)
class Writer:
    """The process that writes a temp file: its node (as a tag, see :func:`node_tag`), pid and start time."""

    node: str
    pid: int
    start: int


@dataclass(frozen=True)
class TempName:
    """A temp file's name taken apart."""

    core_id: str
    writer: Writer
    token: str
    suffix: str


def node_tag(node: str | None) -> str:
    """The node's name as it appears in temp names: lowercase DNS characters, at most 63 (longer names are cut
    and get 8 hex digits of their hash, so two long names still differ)."""
    if not node:
        return UNKNOWN_NODE
    clean = _NODE_CHARS.sub("-", node.lower())
    if len(clean) > NODE_TAG_MAX:
        clean = clean[: NODE_TAG_MAX - 9] + "~" + hashlib.sha256(node.encode()).hexdigest()[:8]
    return clean


def process_start(pid: int, *, proc_root: Path = Path("/proc")) -> int | None:
    """The start time (clock ticks after boot, ``stat`` field 22) of ``pid`` under ``proc_root``; None if gone."""
    try:
        raw = (Path(proc_root) / str(int(pid)) / "stat").read_bytes()
    except OSError:
        return None
    # The comm (field 2) may hold spaces and parentheses: the fields after it start after the last ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def this_writer(node: str | None) -> Writer:
    """This process as a writer. Its start time is 0 when /proc does not show it (then only the mark counts)."""
    pid = os.getpid()
    start = process_start(pid)
    return Writer(node=node_tag(node), pid=pid, start=start or 0)


def temp_name(core_id: str, writer: Writer, token: str, suffix: str) -> str:
    return f".{core_id}@{writer.node}@{writer.pid}-{writer.start}@{token}{suffix}{TMP}"


def parse_temp_name(name: str, *, suffixes: tuple[str, ...], core_id: re.Pattern[str]) -> TempName | None:
    """``name`` taken apart if it is a temp name of :func:`temp_name`'s form with one of ``suffixes``, else None."""
    if not (name.startswith(".") and name.endswith(TMP)):
        return None
    body = name[1 : -len(TMP)]
    for suffix in suffixes:
        if body.endswith(suffix):
            parts = body[: -len(suffix)].split("@")
            break
    else:
        return None
    if len(parts) != 4:
        return None
    cid, node, process, token = parts
    m = _PROCESS.match(process)
    if not (core_id.match(cid) and _NODE_TAG.match(node) and m and _TOKEN.match(token)):
        return None
    return TempName(
        core_id=cid, writer=Writer(node=node, pid=int(m["pid"]), start=int(m["start"])), token=token, suffix=suffix
    )


def process_alive(writer: Writer, *, proc_root: Path) -> bool | None:
    """Whether the writer's process still runs, for a writer known to be of this machine (None: it recorded no
    start time, so its pid alone could be a reused one)."""
    if writer.start == 0:
        return None
    return process_start(writer.pid, proc_root=proc_root) == writer.start


def writer_alive(writer: Writer, *, node: str | None, proc_root: Path | None) -> bool | None:
    """True/False if this sweeper can tell (the writer is of its own node and recorded its start time), else None."""
    if proc_root is None or node is None or writer.node != node_tag(node):
        return None
    return process_alive(writer, proc_root=proc_root)


def abandoned(
    st: os.stat_result,
    parsed: TempName | None,
    *,
    now: float,
    grace: float,
    node: str | None = None,
    proc_root: Path | None = None,
) -> bool:
    """Whether the temp file whose ``lstat`` is ``st`` belongs to no live write (see the module docstring)."""
    if not stat.S_ISREG(st.st_mode):
        return False
    if parsed is not None:
        alive = writer_alive(parsed.writer, node=node, proc_root=proc_root)
        if alive is not None:
            return not alive
    return now - st.st_mtime >= grace


def check_grace(grace: float) -> float:
    """``grace`` if a sweeper may use it: shorter than four heartbeats, it would take live writes for debris."""
    if not grace >= MIN_GRACE_SECONDS:
        raise ValueError(
            f"a debris grace of {grace:g}s is shorter than {MIN_GRACE_SECONDS:g}s "
            f"(four writer heartbeats of {HEARTBEAT_SECONDS:g}s): live writes would be swept"
        )
    return grace


class Heartbeat:
    """Touches a file's mtime through ``fd`` every ``interval`` seconds in a thread until :meth:`stop`.

    :meth:`stop` joins the thread, so once it returns the fd may be closed (and its number reused) safely.
    """

    def __init__(self, fd: int, *, interval: float, what: str) -> None:
        self._fd = fd
        self._interval = min(max(float(interval), 0.01), HEARTBEAT_SECONDS)
        self._what = what
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="temp-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failed = False
        while not self._stop.wait(self._interval):
            try:
                os.utime(self._fd)
            except OSError as e:
                if not failed:
                    logger.warning("cannot mark %s as alive (%s): a sweeper may take it for debris", self._what, e)
                failed = True

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
