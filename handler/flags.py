"""
One flag language for every program of the project (API server, handler, agent), as Kubernetes writes values.

- Durations are Go durations (``300ms``, ``90s``, ``1m30s``, ``1.5h``), as every Kubernetes component takes them;
  where retention needs them, ``d`` (24h) and ``w`` (7d) are accepted too (``allow_days=True``). A bare number is
  refused (``0`` excepted): ``--max-age 30`` would be seconds to Go and days to a person.
- Sizes are Kubernetes quantities: ``Ki Mi Gi Ti Pi`` (powers of 1024) and ``k M G T P`` (powers of 1000), or
  plain bytes; ``0`` means "no limit" where a flag says so. ``512M`` is therefore 512 000 000 bytes, as in a pod's
  resource limits; write ``512Mi`` for 512 × 1024².
- Counts are whole numbers ≥ 0 (``0`` is "no limit" where a flag says so).
- Booleans are ``true``/``false`` (Go's strconv.ParseBool also takes 1/0/t/f); a Kubernetes-style boolean flag
  (:func:`add_bool`) given without a value means true (``--anonymous-auth``, ``--anonymous-auth=false``).
- Lists are comma-separated (``--etcd-servers=https://a:2379,https://b:2379``); empty items are dropped.

Every parser raises ``argparse.ArgumentTypeError`` with one line that shows an accepted example, so argparse
prints ``coredump-agent: error: argument --max-age: ...`` and exits 2. Defaults are given to argparse in the
same syntax (``default="1m"``): argparse converts a string default through the flag's type, so ``--help`` and
the README's flag tables (``deploy/flags-table.py``) show the value as a user would write it.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h|d|w)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$")
_SIZE_UNITS = {
    None: 1,
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
    "Pi": 1 << 50,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
}


def parse_duration(text: str, *, allow_days: bool = False) -> float:
    """Seconds from a Go duration (``1m30s``); with ``allow_days`` also ``7d``, ``2w``."""
    t = text.strip() if isinstance(text, str) else ""
    if t == "0":
        return 0.0
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(t):
        if m.start() != pos or (m.group(2) in ("d", "w") and not allow_days):
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    else:
        if pos == len(t) and t:
            return total
    example = "90s, 1m30s, 12h, 7d" if allow_days else "90s, 1m30s, 1h"
    raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. {example})")


def parse_retention_duration(text: str) -> float:
    return parse_duration(text, allow_days=True)


def parse_positive_duration(text: str) -> float:
    """A duration that must be more than zero (an interval or a timeout that cannot be "off")."""
    seconds = parse_duration(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be more than zero: {text!r} (use e.g. 90s, 1m30s, 1h)")
    return seconds


def parse_size(text: str) -> int:
    """Bytes from a Kubernetes quantity (``64Mi``, ``1G``, ``4096``)."""
    m = _QUANTITY.match(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 4096, 512Mi, 10Gi)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def parse_count(text: str) -> int:
    """A whole number ≥ 0."""
    t = text.strip() if isinstance(text, str) else ""
    if not t.isdigit():
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (a whole number, e.g. 0 or 16)")
    return int(t)


def parse_port(text: str) -> int:
    """A TCP port, 0 to 65535 (0: the kernel picks a free one)."""
    port = parse_count(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"not a port: {text!r} (0 to 65535)")
    return port


def parse_bool(text: str) -> bool:
    t = text.strip().lower() if isinstance(text, str) else ""
    if t in ("1", "t", "true"):
        return True
    if t in ("0", "f", "false"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r} (use true or false)")


def parse_list(text: str) -> tuple[str, ...]:
    """Comma-separated items, blanks dropped (``a, b,,c`` is ``a``, ``b``, ``c``)."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def list_of(item: Callable[[str], str]) -> Callable[[str], tuple[str, ...]]:
    """A comma-separated list whose every item is checked by ``item`` (which raises ArgumentTypeError)."""

    def parse(text: str) -> tuple[str, ...]:
        return tuple(item(part) for part in parse_list(text))

    return parse


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` shows a flag's default as it is written on the command line, ``(default: 1m)``, where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if (
            switch
            or not action.option_strings
            or "%(default)" in text
            or action.default in (None, argparse.SUPPRESS, "", (), [])
        ):
            return action.help
        return f"{text} (default: %(default)s)"


def add_bool(group: argparse._ActionsContainer, flag: str, *, default: bool, help: str) -> None:
    """A Kubernetes-style boolean flag: ``--flag`` (true), ``--flag=true``, ``--flag=false``."""
    group.add_argument(
        flag,
        type=parse_bool,
        nargs="?",
        const=True,
        default="true" if default else "false",
        metavar="true|false",
        help=help,
    )


def format_duration(seconds: float) -> str:
    """The shortest Go-style spelling of a whole number of seconds (``1h30m``), for help texts and Status."""
    s = int(seconds)
    if s == 0:
        return "0s"
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size:
            out += f"{s // size}{unit}"
            s %= size
    return out


def format_size(size: int) -> str:
    """The exact quantity spelling of ``size`` bytes with the largest binary unit that divides it (``64Mi``)."""
    for unit in ("Pi", "Ti", "Gi", "Mi", "Ki"):
        if size and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return str(size)
