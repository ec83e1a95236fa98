"""
Label and field selectors with kube-apiserver's syntax and error messages.

Label selectors: ``a=b``, ``a==b``, ``a!=b``, ``a in (x,y)``, ``a notin (x)``, ``a``, ``!a``.
Field selectors: ``metadata.name`` and ``metadata.namespace`` with ``=``, ``==``, ``!=``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

from apiserver.api import errors

Predicate = Callable[[dict[str, Any]], bool]

_REQUIREMENT = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9][-A-Za-z0-9_./]*)\s*"
    r"(?:(?P<op>==|=|!=|\s+in\s+|\s+notin\s+)\s*(?P<value>\([^)]*\)|[A-Za-z0-9_.-]*))?\s*$"
)
FIELD_LABELS = ("metadata.name", "metadata.namespace")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside an `in (...)` set."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p for p in parts if p.strip()]


@dataclasses.dataclass(frozen=True)
class LabelRequirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!exists"
    values: frozenset[str]

    def matches(self, labels: dict[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!exists":
            return self.key not in labels
        if self.op in ("=", "in"):
            return labels.get(self.key) in self.values
        # "!=" and "notin" match objects that lack the label, as in Kubernetes.
        return labels.get(self.key) not in self.values


def parse_label_selector(text: str | None) -> Predicate:
    if not text or not text.strip():
        return lambda obj: True
    requirements: list[LabelRequirement] = []
    for part in _split_top_level(text):
        match = _REQUIREMENT.match(part)
        if not match:
            raise errors.bad_request(
                f'unable to parse requirement: found "{part.strip()}", expected a valid label selector requirement'
            )
        key, neg, op, value = match["key"], match["neg"], (match["op"] or "").strip(), match["value"]
        if neg:
            if op:
                raise errors.bad_request(f'unable to parse requirement: "{part.strip()}": "!" only goes before a key')
            requirements.append(LabelRequirement(key, "!exists", frozenset()))
        elif not op:
            requirements.append(LabelRequirement(key, "exists", frozenset()))
        elif op in ("in", "notin"):
            if not value or not value.startswith("("):
                raise errors.bad_request(f'unable to parse requirement: "{part.strip()}": expected a set "(a,b)"')
            values = frozenset(v.strip() for v in value[1:-1].split(",") if v.strip())
            requirements.append(LabelRequirement(key, op, values))
        else:
            if value is None or value.startswith("("):
                raise errors.bad_request(f'unable to parse requirement: "{part.strip()}": expected a value')
            requirements.append(LabelRequirement(key, "!=" if op == "!=" else "=", frozenset({value})))

    def predicate(obj: dict[str, Any]) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        return all(r.matches(labels) for r in requirements)

    return predicate


@dataclasses.dataclass(frozen=True)
class FieldSelector:
    """Parsed field selector; ``name`` is set when it pins one object (kubectl delete/wait do this)."""

    predicate: Predicate
    name: str | None = None
    namespace: str | None = None


def parse_field_selector(text: str | None) -> FieldSelector:
    if not text or not text.strip():
        return FieldSelector(lambda obj: True)
    terms: list[tuple[str, bool, str]] = []
    pinned: dict[str, str] = {}
    for part in text.split(","):
        part = part.strip()
        for op in ("!=", "==", "="):
            field, sep, value = part.partition(op)
            if sep:
                break
        else:
            raise errors.bad_request(f"invalid selector: '{text}'; can't understand '{part}'")
        field = field.strip()
        if field not in FIELD_LABELS:
            raise errors.bad_request(
                f'"{field}" is not a known field selector: only "metadata.name", "metadata.namespace"'
            )
        equal = op != "!="
        terms.append((field, equal, value.strip()))
        if equal:
            pinned[field] = value.strip()

    def predicate(obj: dict[str, Any]) -> bool:
        metadata = obj.get("metadata", {})
        for field, equal, value in terms:
            actual = metadata.get(field.split(".", 1)[1], "")
            if (actual == value) != equal:
                return False
        return True

    return FieldSelector(predicate, name=pinned.get("metadata.name"), namespace=pinned.get("metadata.namespace"))
