"""
Field sets on a CoredumpEndpoint, with the rules of sigs.k8s.io/structured-merge-diff for this schema.

A *path* is a tuple of path elements in their ``fieldsV1`` spelling: ``f:<field>`` (a struct field or a
map key), ``k:{"uid":"..."}`` (an item of an associative list), ``v:"..."`` (an item of a set). The shape
of the object decides what is granular:

- ``metadata`` and ``spec`` are structs: each field is tracked on its own;
- ``metadata.labels`` and ``metadata.annotations`` are granular maps: one path per key;
- ``metadata.finalizers`` is a set (``x-kubernetes-list-type: set``): one path per value;
- ``metadata.ownerReferences`` is an associative list keyed by ``uid`` whose items are atomic;
- everything else (scalars, unknown fields) is a leaf, owned as a whole.

A list that breaks its list type (duplicates, missing keys, non-scalars) is treated as one atomic leaf
rather than refused: ownership then covers the whole list. ``status`` and ``metadata.managedFields`` are
never tracked (see :func:`tracked`).

The functions mirror structured-merge-diff's: :func:`field_set` is ``ToFieldSet`` (the fields an applied
configuration sets), :func:`compare` is ``Compare`` (added/removed/modified paths between two objects),
:func:`merge` is ``Merge`` (a configuration over a live object), :func:`remove` is ``RemoveItems``, and
:func:`to_fields_v1` / :func:`from_fields_v1` are the ``FieldsV1`` wire form. Inputs are JSON values a client
sent: nothing here trusts their types, and :func:`from_fields_v1` bounds depth and size.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
from collections.abc import Iterable, Mapping
from typing import Any

Path = tuple[str, ...]

MAX_FIELDS_V1_DEPTH = 16  # the schema is 4 deep; anything deeper is not ours
MAX_FIELDS_V1_PATHS = 100_000


class Kind(enum.Enum):
    STRUCT = "struct"
    MAP = "map"
    SET = "set"
    ASSOC = "assoc"
    LEAF = "leaf"


@dataclasses.dataclass(frozen=True)
class Node:
    kind: Kind
    fields: Mapping[str, Node] = dataclasses.field(default_factory=dict)
    key: str = ""


LEAF = Node(Kind.LEAF)
METADATA = Node(
    Kind.STRUCT,
    fields={
        **{
            name: LEAF
            for name in (
                "name",
                "generateName",
                "namespace",
                "selfLink",
                "uid",
                "resourceVersion",
                "generation",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "managedFields",
            )
        },
        "labels": Node(Kind.MAP),
        "annotations": Node(Kind.MAP),
        "finalizers": Node(Kind.SET),
        "ownerReferences": Node(Kind.ASSOC, key="uid"),
    },
)
SPEC = Node(Kind.STRUCT, fields={"podUID": LEAF})
OBJECT = Node(Kind.STRUCT, fields={"apiVersion": LEAF, "kind": LEAF, "metadata": METADATA, "spec": SPEC})


class _Missing:
    """An absent value (distinct from JSON null)."""


MISSING: Any = _Missing()


class FieldsV1Error(ValueError):
    """A ``fieldsV1`` document that is not a well-formed field set."""


@dataclasses.dataclass(frozen=True)
class Comparison:
    added: frozenset[Path]
    removed: frozenset[Path]
    modified: frozenset[Path]

    @property
    def changed(self) -> frozenset[Path]:
        return self.added | self.modified

    @property
    def same(self) -> bool:
        return not (self.added or self.removed or self.modified)


def tracked(obj: Mapping[str, Any] | None) -> dict[str, Any]:
    """The part of an object fields are tracked on: without ``status`` and ``metadata.managedFields``."""
    if obj is None:
        return {}
    out = {key: value for key, value in obj.items() if key != "status"}
    metadata = out.get("metadata")
    if isinstance(metadata, dict) and "managedFields" in metadata:
        out["metadata"] = {key: value for key, value in metadata.items() if key != "managedFields"}
    return out


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _same(a: Any, b: Any) -> bool:
    return a is b or _canonical(a) == _canonical(b)


def _child(node: Node, key: str) -> Node:
    return node.fields.get(key, LEAF) if node.kind is Kind.STRUCT else LEAF


def _element(item: Any, node: Node) -> str | None:
    """The path element of one list item, or None when the item cannot be keyed."""
    if node.kind is Kind.SET:
        if isinstance(item, (str, int, float, bool)) or item is None:
            return "v:" + _canonical(item)
        return None
    key = item.get(node.key, MISSING) if isinstance(item, dict) else MISSING
    if key is MISSING or not isinstance(key, (str, int, float, bool)):
        return None
    return "k:" + json.dumps({node.key: key}, separators=(",", ":"), ensure_ascii=False)


def _items(value: Any, node: Node) -> dict[str, Any] | None:
    """A set's or associative list's items by path element; None when it is not a valid one (then atomic)."""
    if not isinstance(value, list):
        return None
    items: dict[str, Any] = {}
    for item in value:
        element = _element(item, node)
        if element is None or element in items:
            return None
        items[element] = item
    return items


def _granular(value: Any, node: Node) -> bool:
    if node.kind in (Kind.STRUCT, Kind.MAP):
        return isinstance(value, dict)
    if node.kind in (Kind.SET, Kind.ASSOC):
        return _items(value, node) is not None
    return False


def field_set(value: Any, node: Node = OBJECT) -> set[Path]:
    """The fields a configuration sets: leaves, list items, map keys, and fields set to null or ``{}``."""
    out: set[Path] = set()

    def walk(current: Any, shape: Node, path: Path) -> None:
        if not _granular(current, shape):
            if path:
                out.add(path)
            return
        if shape.kind in (Kind.STRUCT, Kind.MAP):
            for key, child in current.items():
                child_path = path + (f"f:{key}",)
                walk(child, _child(shape, key), child_path)
                if child is None or child == {}:
                    out.add(child_path)
            return
        for element in _items(current, shape) or {}:
            out.add(path + (element,))

    walk(value, node, ())
    return out


def compare(lhs: Any, rhs: Any, node: Node = OBJECT) -> Comparison:
    """What changed from ``lhs`` to ``rhs``: leaves and list items added, removed or modified, and
    granular parents (maps, structs, lists) added or removed as a whole."""
    added: set[Path] = set()
    removed: set[Path] = set()
    modified: set[Path] = set()

    def walk(left: Any, right: Any, shape: Node, path: Path) -> None:
        left_ok = left is MISSING or _granular(left, shape)
        right_ok = right is MISSING or _granular(right, shape)
        if shape.kind is not Kind.LEAF and left_ok and right_ok:
            if shape.kind in (Kind.STRUCT, Kind.MAP):
                lmap = {} if left is MISSING else left
                rmap = {} if right is MISSING else right
                for key in list(lmap) + [k for k in rmap if k not in lmap]:
                    walk(lmap.get(key, MISSING), rmap.get(key, MISSING), _child(shape, key), path + (f"f:{key}",))
            else:
                litems = {} if left is MISSING else (_items(left, shape) or {})
                ritems = {} if right is MISSING else (_items(right, shape) or {})
                for element in list(litems) + [e for e in ritems if e not in litems]:
                    walk(litems.get(element, MISSING), ritems.get(element, MISSING), LEAF, path + (element,))
            if path and left is MISSING:
                added.add(path)
            elif path and right is MISSING:
                removed.add(path)
            return
        if left is MISSING:
            added.add(path)
        elif right is MISSING:
            removed.add(path)
        elif not _same(left, right):
            modified.add(path)

    walk(lhs, rhs, node, ())
    return Comparison(added=frozenset(added), removed=frozenset(removed), modified=frozenset(modified))


def merge(live: Any, config: Any, node: Node = OBJECT) -> Any:
    """``config`` over ``live``: granular parts merged key by key (list items by their key), leaves and
    atomic items replaced. Neither input is changed."""
    if config is MISSING:
        return copy.deepcopy(live)
    if live is MISSING:
        return copy.deepcopy(config)
    if node.kind in (Kind.STRUCT, Kind.MAP) and isinstance(live, dict) and isinstance(config, dict):
        out = copy.deepcopy(live)
        for key, value in config.items():
            out[key] = merge(live.get(key, MISSING), value, _child(node, key))
        return out
    if node.kind in (Kind.SET, Kind.ASSOC):
        litems, citems = _items(live, node), _items(config, node)
        if litems is not None and citems is not None:
            kept = [copy.deepcopy(citems.get(element, item)) for element, item in litems.items()]
            return kept + [copy.deepcopy(item) for element, item in citems.items() if element not in litems]
    return copy.deepcopy(config)


def remove(obj: dict[str, Any], paths: Iterable[Path], node: Node = OBJECT) -> dict[str, Any]:
    """A copy of ``obj`` without the given paths (a path's whole subtree goes with it)."""
    out = copy.deepcopy(obj)
    for path in sorted(paths, key=len, reverse=True):
        _remove_one(out, node, path)
    return out


def _remove_one(container: Any, node: Node, path: Path) -> None:
    element, rest = path[0], path[1:]
    if element.startswith("f:") and isinstance(container, dict) and node.kind in (Kind.STRUCT, Kind.MAP):
        key = element[2:]
        if key not in container:
            return
        if not rest:
            del container[key]
        else:
            _remove_one(container[key], _child(node, key), rest)
    elif node.kind in (Kind.SET, Kind.ASSOC) and not rest and _items(container, node) is not None:
        container[:] = [item for item in container if _element(item, node) != element]


def with_parents(paths: Iterable[Path]) -> set[Path]:
    """The paths and every parent of them (structure-merge-diff's named fields made members)."""
    out: set[Path] = set()
    for path in paths:
        for end in range(1, len(path) + 1):
            out.add(path[:end])
    return out


# ---- wire forms --------------------------------------------------------------------------------------

_RANK = {"f": 0, "k": 1, "v": 2, "i": 3}


def _sort_key(element: str) -> tuple[int, str]:
    return _RANK.get(element[:1], 9), element[2:]


def to_fields_v1(paths: Iterable[Path]) -> dict[str, Any]:
    """The ``fieldsV1`` object: a tree of path elements, ``.`` marking a member that also has children."""
    tree: dict[str, Any] = {}
    members: set[Path] = set()
    for path in paths:
        members.add(path)
        node = tree
        for element in path:
            node = node.setdefault(element, {})

    def emit(node: dict[str, Any], path: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if node and path in members:
            out["."] = {}
        for element in sorted(node, key=_sort_key):
            out[element] = emit(node[element], path + (element,))
        return out

    return emit(tree, ())


def _check_element(element: str) -> None:
    kind, sep, text = element.partition(":")
    if not sep or kind not in _RANK:
        raise FieldsV1Error(f"unknown path element {element!r}")
    try:
        if kind == "k":
            if not isinstance(json.loads(text), dict):
                raise FieldsV1Error(f"key element {element!r} is not a JSON object")
        elif kind == "v":
            json.loads(text)
        elif kind == "i" and not text.isdigit():
            raise FieldsV1Error(f"index element {element!r} is not a number")
    except (ValueError, RecursionError):
        raise FieldsV1Error(f"path element {element!r} is not valid JSON") from None


def from_fields_v1(document: Any) -> set[Path]:
    """The paths of a ``fieldsV1`` object; :class:`FieldsV1Error` when it is not one."""
    out: set[Path] = set()

    def walk(node: Any, path: Path) -> None:
        if not isinstance(node, dict):
            raise FieldsV1Error(f"fieldsV1 at {path_string(path) or 'the top'} is not an object")
        if len(path) > MAX_FIELDS_V1_DEPTH:
            raise FieldsV1Error("fieldsV1 is nested too deeply")
        if path and (not node or "." in node):
            out.add(path)
            if len(out) > MAX_FIELDS_V1_PATHS:
                raise FieldsV1Error("fieldsV1 has too many fields")
        for element, child in node.items():
            if element == ".":
                if not path or child != {}:
                    raise FieldsV1Error("misplaced '.' in fieldsV1")
                continue
            if not isinstance(element, str):
                raise FieldsV1Error("fieldsV1 keys must be strings")
            _check_element(element)
            walk(child, path + (element,))

    walk(document, ())
    return out


def path_string(path: Path) -> str:
    """A path as structured-merge-diff prints it: ``.spec.podUID``, ``.metadata.finalizers[="x"]``,
    ``.metadata.ownerReferences[uid="..."]``."""
    parts: list[str] = []
    for element in path:
        kind, _, text = element.partition(":")
        if kind == "f":
            parts.append("." + text)
        elif kind == "k":
            try:
                keys = json.loads(text)
                parts.append(
                    "["
                    + ",".join(
                        f"{name}={json.dumps(value, ensure_ascii=False)}" for name, value in sorted(keys.items())
                    )
                    + "]"
                )
            except (ValueError, AttributeError):
                parts.append(f"[{text}]")
        elif kind == "v":
            parts.append(f"[={text}]")
        else:
            parts.append(f"[{text}]")
    return "".join(parts)
