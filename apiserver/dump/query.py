"""
The query of ``GET .../coredumpendpoints/NAME/dump``: ``container``, ``core``, ``since`` and ``objects``
(``true``/``false``: the ELF objects the cores reference, see :mod:`.objects`), validated.

Nothing from the query ever reaches a path: each value is checked against the storage layout's
own name rules and only then used as a filter on what ``handler.layout.list_cores`` returns.
"""

from __future__ import annotations

import dataclasses
import datetime
import re

from multidict import MultiMapping

from handler import layout

from apiserver.api import errors


ALLOWED = ("container", "core", "since", "objects")

# RFC 3339 date-time (section 5.6): a full date, a time and a mandatory offset. A '+' in a query
# string decodes to a space unless the client escaped it, so " 02:00" is read as "+02:00".
_RFC3339_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?([Zz]|[+\- ]\d{2}:\d{2})$")


@dataclasses.dataclass(frozen=True)
class DumpQuery:
    """The filters of one dump request; ``None`` means "no filter"."""

    container: str | None = None
    core: str | None = None
    since: datetime.datetime | None = None
    objects: bool = False

    def describe(self) -> str:
        """The filters in words, for messages such as "no cores match ..."."""
        parts = []
        if self.container:
            parts.append(f"container={self.container}")
        if self.core:
            parts.append(f"core={self.core}")
        if self.since:
            parts.append(f"since={layout.rfc3339(self.since)}")
        return ", ".join(parts)


def parse_rfc3339(value: str) -> datetime.datetime:
    """An aware UTC datetime from an RFC 3339 date-time; ValueError for anything else."""
    m = _RFC3339_RE.match(value)
    if not m:
        raise ValueError("not an RFC 3339 date-time (e.g. 2026-11-23T10:15:00Z)")
    text = value
    if m.group(8)[0] == " ":
        text = value[: m.start(8)] + "+" + value[m.start(8) + 1 :]
    frac = m.group(7)
    if frac and len(frac) > 7:
        # datetime keeps microseconds; RFC 3339 allows any precision, Kubernetes sends nanoseconds.
        text = text[: m.start(7)] + frac[:7] + text[m.end(7) :]
    parsed = datetime.datetime.fromisoformat(text.replace("z", "Z").replace("t", "T"))
    return parsed.astimezone(datetime.timezone.utc)


def parse_query(query: MultiMapping[str]) -> DumpQuery:
    """Validate the query string; any unknown, repeated, empty or malformed parameter is a 400."""
    keys = list(query.keys())
    unknown = sorted({k for k in keys if k not in ALLOWED})
    if unknown:
        raise errors.bad_request(
            f"unknown query parameter(s) {', '.join(repr(k) for k in unknown)}: dump accepts only {', '.join(ALLOWED)}"
        )
    for key in ALLOWED:
        if len(query.getall(key, [])) > 1:
            raise errors.bad_request(f"query parameter {key!r} may be given only once")
    values = {k: query[k] for k in keys}
    for key, value in values.items():
        if value == "":
            raise errors.bad_request(f"query parameter {key!r} is empty")
    container = core = None
    since = None
    try:
        if "container" in values:
            container = layout.validate_container(values["container"])
        if "core" in values:
            core = layout.validate_core_id(values["core"])
    except layout.InvalidName as exc:
        raise errors.bad_request(f"invalid query parameter: {exc}") from None
    if "since" in values:
        try:
            since = parse_rfc3339(values["since"])
        except ValueError as exc:
            raise errors.bad_request(f"invalid query parameter 'since' {values['since']!r}: {exc}") from None
    objects = False
    if "objects" in values:
        if values["objects"] not in ("true", "false"):
            raise errors.bad_request(f"invalid query parameter 'objects' {values['objects']!r}: true or false")
        objects = values["objects"] == "true"
    return DumpQuery(container=container, core=core, since=since, objects=objects)
