"""
CloudEvents sinks as the cluster admin names them: a YAML file (mounted from a ConfigMap), parsed strictly.

The file's shape (every key but ``name`` and ``url`` optional)::

    sinks:
    - name: tickets                       # [a-z0-9-], unique; names the sink's outbox and its metrics
      url: https://broker.example/default # http or https
      mode: binary                        # binary (default) or structured
      namespaces: [team-a, team-b]        # only cores of these namespaces
      namespaceSelector:                  # and/or: namespaces whose labels match (a Kubernetes LabelSelector)
        matchLabels: {team: payments}
        matchExpressions: [{key: tier, operator: In, values: [prod]}]
      signals: [SIGSEGV, 6]               # only these signals (names or numbers)
      caFile: /etc/coredump/sinks/ca.crt  # verify the sink's certificate against this CA
      tokenFile: /etc/coredump/sinks/token  # send "Authorization: Bearer <file content>", re-read every send
      timeout: 10s                        # per request (Go duration), default 10s

A namespace opts out of every sink with the annotation ``coredump.example.io/events: "false"``.

:func:`parse_sinks` refuses an unknown key, a wrong type or a duplicate name with one line that names the sink
and the key. :class:`SinksFile` re-reads the file when it changes (the kubelet updates a mounted ConfigMap in
place) and keeps the last good configuration when a new one does not parse, so an admin's typo never stops
delivery of what was already configured.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal as signal_mod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from handler.flags import parse_duration

logger = logging.getLogger(__name__)

OPT_OUT_ANNOTATION = "coredump.example.io/events"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SINK_KEYS = {"name", "url", "mode", "namespaces", "namespaceSelector", "signals", "caFile", "tokenFile", "timeout"}
_OPERATORS = {"In", "NotIn", "Exists", "DoesNotExist"}


class SinkConfigError(ValueError):
    """The sinks file is not valid; the message is one line naming the sink and key."""


@dataclass(frozen=True)
class Requirement:
    """One ``matchExpressions`` entry."""

    key: str
    operator: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        if self.operator == "In":
            return labels.get(self.key) in self.values
        return labels.get(self.key) not in self.values  # NotIn: an absent key matches, as in Kubernetes


@dataclass(frozen=True)
class LabelSelector:
    """A Kubernetes ``LabelSelector`` (matchLabels AND matchExpressions); empty matches everything."""

    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels) and all(
            r.matches(labels) for r in self.match_expressions
        )


@dataclass(frozen=True)
class Sink:
    name: str
    url: str
    mode: str = "binary"
    namespaces: frozenset[str] | None = None
    namespace_selector: LabelSelector | None = None
    signals: frozenset[int] | None = None
    ca_file: Path | None = None
    token_file: Path | None = None
    timeout: float = 10.0

    @property
    def needs_namespace(self) -> bool:
        """Whether deciding needs the namespace's labels (the opt-out annotation is always read)."""
        return self.namespace_selector is not None

    def wants(self, *, namespace: str, signal: int | None, labels: Mapping[str, str]) -> bool:
        """The sink's own filters (the namespace opt-out is decided by the caller, once for every sink)."""
        if self.namespaces is not None and namespace not in self.namespaces:
            return False
        if self.signals is not None and signal not in self.signals:
            return False
        return self.namespace_selector is None or self.namespace_selector.matches(labels)


@dataclass(frozen=True)
class SinkSet:
    sinks: tuple[Sink, ...] = field(default_factory=tuple)

    def by_name(self) -> dict[str, Sink]:
        return {s.name: s for s in self.sinks}


def _signal_number(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 128:
        return value
    if isinstance(value, str):
        name = value.upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        try:
            return int(signal_mod.Signals[name])
        except KeyError:
            pass
    raise SinkConfigError(f"{where}: signals: {value!r} is not a signal name or number")


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise SinkConfigError(f"{where}: must be a list of non-empty strings")
    return value


def _selector(value: Any, where: str) -> LabelSelector:
    if not isinstance(value, dict) or set(value) - {"matchLabels", "matchExpressions"}:
        raise SinkConfigError(f"{where}: namespaceSelector takes matchLabels and matchExpressions only")
    labels = value.get("matchLabels") or {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise SinkConfigError(f"{where}: namespaceSelector.matchLabels must map strings to strings")
    exprs = []
    for i, e in enumerate(value.get("matchExpressions") or []):
        w = f"{where}: namespaceSelector.matchExpressions[{i}]"
        if not isinstance(e, dict) or set(e) - {"key", "operator", "values"} or not isinstance(e.get("key"), str):
            raise SinkConfigError(f"{w}: needs key, operator and (for In/NotIn) values")
        op = e.get("operator")
        if op not in _OPERATORS:
            raise SinkConfigError(f"{w}: operator must be one of {', '.join(sorted(_OPERATORS))}")
        values = _strings(e.get("values", []), f"{w}.values") if "values" in e else []
        if (op in ("In", "NotIn")) != bool(values):
            raise SinkConfigError(f"{w}: In and NotIn need values, Exists and DoesNotExist take none")
        exprs.append(Requirement(key=e["key"], operator=op, values=frozenset(values)))
    return LabelSelector(match_labels=tuple(sorted(labels.items())), match_expressions=tuple(exprs))


def _sink(raw: Any, index: int) -> Sink:
    where = f"sinks[{index}]"
    if not isinstance(raw, dict):
        raise SinkConfigError(f"{where}: must be a mapping")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise SinkConfigError(f"{where}: name must be a DNS label ([a-z0-9-], at most 63 characters)")
    where = f"sink {name!r}"
    unknown = set(raw) - _SINK_KEYS
    if unknown:
        raise SinkConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} (known: {', '.join(sorted(_SINK_KEYS))})")
    url = raw.get("url")
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise SinkConfigError(f"{where}: url must be an http:// or https:// URL")
    mode = raw.get("mode", "binary")
    if mode not in ("binary", "structured"):
        raise SinkConfigError(f"{where}: mode must be binary or structured")
    namespaces = frozenset(_strings(raw["namespaces"], f"{where}: namespaces")) if "namespaces" in raw else None
    selector = _selector(raw["namespaceSelector"], where) if "namespaceSelector" in raw else None
    signals = None
    if "signals" in raw:
        if not isinstance(raw["signals"], list):
            raise SinkConfigError(f"{where}: signals must be a list")
        signals = frozenset(_signal_number(s, where) for s in raw["signals"])
    files: dict[str, Path | None] = {}
    for key in ("caFile", "tokenFile"):
        v = raw.get(key)
        if v is not None and (not isinstance(v, str) or not v.startswith("/")):
            raise SinkConfigError(f"{where}: {key} must be an absolute path")
        files[key] = Path(v) if v else None
    if files["caFile"] is not None and parts.scheme != "https":
        raise SinkConfigError(f"{where}: caFile needs an https:// url")
    try:
        timeout = parse_duration(raw.get("timeout", "10s"))
    except argparse.ArgumentTypeError as e:
        raise SinkConfigError(f"{where}: timeout: {e}") from None
    if not 0 < timeout <= 300:
        raise SinkConfigError(f"{where}: timeout must be more than 0 and at most 5m")
    assert isinstance(url, str)  # checked above
    return Sink(
        name=name,
        url=url,
        mode=mode,
        namespaces=namespaces,
        namespace_selector=selector,
        signals=signals,
        ca_file=files["caFile"],
        token_file=files["tokenFile"],
        timeout=timeout,
    )


def parse_sinks(text: str) -> SinkSet:
    """The sinks of a sinks file; :class:`SinkConfigError` with one line for anything wrong."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SinkConfigError(f"not YAML: {str(e).splitlines()[0]}") from None
    if doc is None:
        return SinkSet()
    if not isinstance(doc, dict) or set(doc) - {"sinks"}:
        raise SinkConfigError("the file must be a mapping with one key, 'sinks'")
    raw = doc.get("sinks") or []
    if not isinstance(raw, list):
        raise SinkConfigError("sinks must be a list")
    sinks = [_sink(r, i) for i, r in enumerate(raw)]
    names = [s.name for s in sinks]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise SinkConfigError(f"sink {dup!r} is named twice")
    return SinkSet(sinks=tuple(sinks))


class SinksFile:
    """The sinks file, re-read when its identity or mtime changes; a bad new version keeps the last good one."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.current = SinkSet()
        self.error: str | None = None
        self._seen: tuple[int, int, int, int] | None = None

    def refresh(self) -> SinkSet:
        """Blocking (a file read); returns the sinks in force."""
        if self.path is None:
            return self.current
        try:
            st = os.stat(self.path)
            key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            if key == self._seen:
                return self.current
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            key, text = (0, 0, 0, 0), ""
        except (OSError, UnicodeDecodeError) as e:
            self._fail(f"cannot read {self.path}: {e}")
            return self.current
        self._seen = key
        try:
            self.current = parse_sinks(text)
        except SinkConfigError as e:
            self._fail(f"{self.path}: {e}")
            return self.current
        self.error = None
        logger.info(
            "cloudevents sinks: %s",
            ", ".join(s.name for s in self.current.sinks) or "none",
            extra={"sinks": [s.name for s in self.current.sinks]},
        )
        return self.current

    def _fail(self, message: str) -> None:
        if message != self.error:
            logger.error(
                "%s; keeping the previous sinks (%s)", message, ", ".join(s.name for s in self.current.sinks) or "none"
            )
        self.error = message
