"""
``metadata.managedFields`` bookkeeping and server-side apply, as kube-apiserver's fieldmanager does it.

- :func:`record_update` is every non-apply write (create, update, merge/JSON patch): the fields the write
  added or changed become the writer's (one ``Update`` entry per manager, apiVersion and subresource),
  and nobody owns them any more but the writer; removed fields leave every entry. A write that changes
  nothing leaves managedFields as they were.
- :func:`record_apply` is ``application/apply-patch+yaml``: the configuration is merged over the live
  object, fields the manager applied last time and no longer sets are removed unless another manager
  owns them, and a change to a field another manager owns is a conflict (409, one cause per field and
  manager) unless ``force`` takes it over.

What a client sends in ``metadata.managedFields`` is taken as kube-apiserver takes it: absent, or not
decodable, keeps the stored entries; ``[]`` or ``[{}]`` resets them; otherwise entries are validated
(422 for a bad operation, fieldsType or manager) and then replace the stored ones, which is how
``kubectl apply --server-side`` moves ownership over from client-side apply.

Never tracked: ``status`` (written by the server alone, through its reconciler, so no client owns it
and no entry records it) and the server-owned metadata structured-merge-diff strips (name, namespace,
uid, resourceVersion, generation, creationTimestamp, selfLink, managedFields).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import unicodedata
from collections.abc import Mapping
from typing import Any

from apiserver.api import errors
from apiserver.api import resource as r
from apiserver.apply import fieldset
from apiserver.apply.fieldset import Path

APPLY = "Apply"
UPDATE = "Update"
FIELDS_V1 = "FieldsV1"
FIELD_MANAGER_MAX_LENGTH = 128
SUBRESOURCE_MAX_LENGTH = 256
MAX_UPDATE_MANAGERS = 10  # kube-apiserver's cap; older Update entries merge into one
ANCIENT_CHANGES = "ancient-changes"
SERVER_MANAGER = "coredump-apiserver"  # the server's own writes (endpoints it creates for crashed pods)

STRIPPED: frozenset[Path] = frozenset(
    {
        ("f:apiVersion",),
        ("f:kind",),
        ("f:metadata",),
        *(
            (("f:metadata", f"f:{name}"))
            for name in (
                "name",
                "namespace",
                "creationTimestamp",
                "selfLink",
                "uid",
                "clusterName",
                "generation",
                "managedFields",
                "resourceVersion",
            )
        ),
    }
)


@dataclasses.dataclass
class Entry:
    manager: str
    operation: str
    api_version: str
    subresource: str
    time: str | None
    fields: set[Path]

    @property
    def key(self) -> tuple[str, str, str, str]:
        """The manager identity: for appliers, apiVersion is not part of it (as in kube-apiserver)."""
        return (self.manager, self.operation, "" if self.operation == APPLY else self.api_version, self.subresource)

    def describe(self) -> str:
        """How a conflict names this manager (kube-apiserver's printManager)."""
        text = _go_quote(self.manager)
        if self.subresource:
            text += f" with subresource {_go_quote(self.subresource)}"
        if self.operation == UPDATE:
            text += f" using {self.api_version}"
        return text


Managers = dict[tuple[str, str, str, str], Entry]


class DecodeError(ValueError):
    """Stored or sent managedFields that cannot be read as entries."""


def _go_quote(text: str) -> str:
    """Go's %q for the printable text managers are made of."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def now_rfc3339() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- field manager names -----------------------------------------------------------------------------


def _printable(char: str) -> bool:
    """Go's unicode.IsPrint: letters, marks, numbers, punctuation, symbols and the ASCII space."""
    return char == " " or unicodedata.category(char)[0] in "LMNPS"


def manager_from_user_agent(user_agent: str) -> str:
    """The default manager kube-apiserver derives: the user agent up to its first ``/``, printable
    characters only, at most 128 of them (``kubectl/v1.33.0 (linux/amd64)`` → ``kubectl``)."""
    name = "".join(ch for ch in user_agent.split("/", 1)[0] if _printable(ch))
    return name[:FIELD_MANAGER_MAX_LENGTH]


def field_manager_causes(value: str, *, field: str) -> list[dict[str, str]]:
    causes: list[dict[str, str]] = []
    if len(value) > FIELD_MANAGER_MAX_LENGTH:
        causes.append(
            {
                "reason": "FieldValueTooLong",
                "field": field,
                "message": f"Too long: may not be more than {FIELD_MANAGER_MAX_LENGTH} bytes",
            }
        )
    for index, char in enumerate(value):
        if not _printable(char):
            causes.append(
                {
                    "reason": "FieldValueInvalid",
                    "field": field,
                    "message": f"Invalid value: {_go_quote(value)}: invalid character U+{ord(char):04X} "
                    f"(at position {index})",
                }
            )
            break
    return causes


def options_invalid(*, kind: str, causes: list[dict[str, str]]) -> errors.ApiError:
    """422 for bad request options, worded as kube-apiserver words it (``PatchOptions.meta.k8s.io "" ...``)."""
    summary = ", ".join(f"{c['field']}: {c['message']}" for c in causes)
    return errors.ApiError(
        code=422,
        reason="Invalid",
        message=f'{kind}.meta.k8s.io "" is invalid: {summary}',
        details={"group": "meta.k8s.io", "kind": kind, "causes": causes},
    )


# ---- entries: validate, decode, encode ---------------------------------------------------------------


def _is_reset(value: Any) -> bool:
    return isinstance(value, list) and (value == [] or value == [{}])


def validate(value: Any) -> list[dict[str, str]]:
    """StatusCauses for sent managedFields, as kube-apiserver's ValidateManagedFields (plus JSON types)."""
    if value is None or _is_reset(value):
        return []
    if not isinstance(value, list):
        return [
            {
                "reason": "FieldValueTypeInvalid",
                "field": "metadata.managedFields",
                "message": "Invalid value: must be a list of ManagedFieldsEntry",
            }
        ]
    causes: list[dict[str, str]] = []
    for index, entry in enumerate(value):
        at = f"metadata.managedFields[{index}]"
        if not isinstance(entry, dict):
            causes.append(
                {"reason": "FieldValueTypeInvalid", "field": at, "message": "Invalid value: must be an object"}
            )
            continue
        for name in ("manager", "operation", "apiVersion", "time", "fieldsType", "subresource"):
            if name in entry and not isinstance(entry[name], str):
                causes.append(
                    {
                        "reason": "FieldValueTypeInvalid",
                        "field": f"{at}.{name}",
                        "message": "Invalid value: must be a string",
                    }
                )
        operation = entry.get("operation")
        if operation not in (APPLY, UPDATE):
            causes.append(
                {
                    "reason": "FieldValueInvalid",
                    "field": f"{at}.operation",
                    "message": f"Invalid value: {_go_quote(str(operation or ''))}: must be `Apply` or `Update`",
                }
            )
        fields_type = entry.get("fieldsType")
        if fields_type and fields_type != FIELDS_V1:
            causes.append(
                {
                    "reason": "FieldValueInvalid",
                    "field": f"{at}.fieldsType",
                    "message": f"Invalid value: {_go_quote(str(fields_type))}: must be `FieldsV1`",
                }
            )
        manager = entry.get("manager")
        if isinstance(manager, str):
            causes += field_manager_causes(manager, field=f"{at}.manager")
        subresource = entry.get("subresource")
        if isinstance(subresource, str) and len(subresource) > SUBRESOURCE_MAX_LENGTH:
            causes.append(
                {
                    "reason": "FieldValueTooLong",
                    "field": f"{at}.subresource",
                    "message": f"Too long: may not be more than {SUBRESOURCE_MAX_LENGTH} bytes",
                }
            )
    return causes


def decode(value: Any) -> Managers:
    """Entries by manager identity; :class:`DecodeError` for anything kube-apiserver could not decode."""
    if value is None:
        return {}
    if not isinstance(value, list):
        raise DecodeError("managedFields is not a list")
    managers: Managers = {}
    for item in value:
        if not isinstance(item, dict):
            raise DecodeError("a managedFields entry is not an object")
        if item.get("fieldsType", FIELDS_V1) != FIELDS_V1:
            raise DecodeError(f"unsupported fieldsType {item.get('fieldsType')!r}")
        text = {name: item.get(name, "") for name in ("manager", "operation", "apiVersion", "subresource")}
        if not all(isinstance(v, str) for v in text.values()) or text["operation"] not in (APPLY, UPDATE):
            raise DecodeError("a managedFields entry has a bad manager, operation, apiVersion or subresource")
        time = item.get("time")
        if time is not None and not isinstance(time, str):
            raise DecodeError("a managedFields entry has a bad time")
        try:
            fields = fieldset.from_fields_v1(item.get("fieldsV1", {}))
        except fieldset.FieldsV1Error as error:
            raise DecodeError(str(error)) from None
        entry = Entry(
            manager=text["manager"],
            operation=text["operation"],
            api_version=text["apiVersion"],
            subresource=text["subresource"],
            time=time,
            fields=fields,
        )
        if entry.key in managers:
            raise DecodeError(f"duplicate managedFields entry for {entry.describe()}")
        managers[entry.key] = entry
    return managers


def decode_or_empty(value: Any) -> Managers:
    try:
        return decode(value)
    except DecodeError:
        return {}


def encode(managers: Managers) -> list[dict[str, Any]]:
    """The wire form, sorted as kube-apiserver sorts it (operation, time, manager, apiVersion, subresource)."""

    def order(entry: Entry) -> tuple[str, str, str, str, str]:
        return entry.operation, entry.time or "", entry.manager, entry.api_version, entry.subresource

    out: list[dict[str, Any]] = []
    for entry in sorted((e for e in managers.values() if e.fields), key=order):
        encoded: dict[str, Any] = {
            "manager": entry.manager,
            "operation": entry.operation,
            "apiVersion": entry.api_version,
        }
        if entry.time:
            encoded["time"] = entry.time
        encoded["fieldsType"] = FIELDS_V1
        encoded["fieldsV1"] = fieldset.to_fields_v1(entry.fields)
        if entry.subresource:
            encoded["subresource"] = entry.subresource
        out.append(encoded)
    return out


def _cap(managers: Managers) -> Managers:
    """At most MAX_UPDATE_MANAGERS Update entries: the oldest merge into ``ancient-changes``."""
    updates = sorted(
        (e for e in managers.values() if e.operation == UPDATE and e.manager != ANCIENT_CHANGES),
        key=lambda e: e.time or "",
    )
    excess = (
        len(updates) + (1 if any(e.manager == ANCIENT_CHANGES for e in managers.values()) else 0) - MAX_UPDATE_MANAGERS
    )
    if excess <= 0:
        return managers
    out = dict(managers)
    ancient = next((e for e in out.values() if e.manager == ANCIENT_CHANGES and e.operation == UPDATE), None)
    for entry in updates[: excess + (0 if ancient else 1)]:
        del out[entry.key]
        if ancient is None:
            ancient = Entry(
                manager=ANCIENT_CHANGES,
                operation=UPDATE,
                api_version=entry.api_version,
                subresource="",
                time=entry.time,
                fields=set(),
            )
            out[ancient.key] = ancient
        ancient.fields |= entry.fields
    return out


def _known_versions(managers: Managers) -> Managers:
    """Entries of this kind's one version: structured-merge-diff drops entries whose version it cannot convert to."""
    return {key: entry for key, entry in managers.items() if entry.api_version == r.API_VERSION}


def _incoming(live: Mapping[str, Any] | None, new: Mapping[str, Any]) -> Managers:
    """kube-apiserver's decodeLiveOrNew: the sent entries, a reset, or the stored ones."""
    live_value = (live or {}).get("metadata", {}).get("managedFields")
    sent = new.get("metadata", {}).get("managedFields")
    if _is_reset(sent):
        return {}
    try:
        managers = decode(sent)
    except DecodeError:
        managers = {}
    if not managers:
        return decode_or_empty(live_value)
    return managers


# ---- the two operations --------------------------------------------------------------------------------


def check_sent(obj: Mapping[str, Any]) -> None:
    """422 when the managedFields a client sent break kube-apiserver's validation."""
    metadata = obj.get("metadata") or {}
    causes = validate(metadata.get("managedFields"))
    if causes:
        raise errors.invalid(name=str(metadata.get("name") or ""), causes=causes)


def record_update(
    *, live: Mapping[str, Any] | None, new: Mapping[str, Any], manager: str, subresource: str = ""
) -> list[dict[str, Any]]:
    """The managedFields of ``new`` (a create when ``live`` is None) written by ``manager``."""
    managers = _known_versions(_incoming(live, new))
    comparison = fieldset.compare(fieldset.tracked(live), fieldset.tracked(new))
    taken = comparison.changed - STRIPPED
    gone = comparison.removed
    for entry in managers.values():
        entry.fields -= comparison.changed | gone
    if taken:
        key = (manager, UPDATE, r.API_VERSION, subresource)
        entry = managers.get(key) or Entry(
            manager=manager,
            operation=UPDATE,
            api_version=r.API_VERSION,
            subresource=subresource,
            time=None,
            fields=set(),
        )
        entry.fields |= taken
        entry.time = now_rfc3339()
        managers[key] = entry
    return encode(_cap(managers))


@dataclasses.dataclass(frozen=True)
class Applied:
    obj: dict[str, Any]  # the merged object, with its new managedFields
    changed: bool  # False: the object is as it was (a no-op apply)


def _conflict_error(conflicts: list[tuple[Entry, Path]]) -> errors.ApiError:
    causes = [
        {
            "type": "FieldManagerConflict",
            "message": f"conflict with {entry.describe()}",
            "field": fieldset.path_string(path),
        }
        for entry, path in conflicts
    ]
    if len(conflicts) == 1:
        entry, path = conflicts[0]
        message = f"Apply failed with 1 conflict: conflict with {entry.describe()}: {fieldset.path_string(path)}"
    else:
        lines: list[str] = []
        for described in sorted({entry.describe() for entry, _ in conflicts}):
            lines.append(f"conflicts with {described}:")
            lines += [f"- {fieldset.path_string(path)}" for entry, path in conflicts if entry.describe() == described]
        message = f"Apply failed with {len(conflicts)} conflicts: " + "\n".join(lines)
    return errors.ApiError(code=409, reason="Conflict", message=message, details={"causes": causes})


def record_apply(
    *, live: Mapping[str, Any] | None, config: Mapping[str, Any], manager: str, force: bool, subresource: str = ""
) -> Applied:
    """
    ``config`` applied by ``manager`` over ``live`` (None: the object does not exist yet). Raises the 409
    conflict error when the result changes fields other managers own and ``force`` is false.
    """
    live_tracked = fieldset.tracked(live)
    managers = _known_versions(decode_or_empty((live or {}).get("metadata", {}).get("managedFields")))
    key = (manager, APPLY, "", subresource)
    previous = managers.pop(key, None)
    applied = fieldset.field_set(config) - STRIPPED
    merged = fieldset.merge(live_tracked, dict(config))

    # Prune: what this manager applied last time and no longer applies goes, unless someone else owns it.
    if previous is not None and previous.fields:
        owned = fieldset.with_parents(applied.union(*(e.fields for e in managers.values())))
        prunable = [
            path for path in fieldset.with_parents(previous.fields) if path not in owned and path not in STRIPPED
        ]
        merged = fieldset.remove(merged, prunable)

    comparison = fieldset.compare(live_tracked, merged)
    changed = comparison.changed
    conflicts = sorted(
        ((entry, path) for entry in managers.values() for path in entry.fields & changed),
        key=lambda item: (item[0].describe(), fieldset.path_string(item[1])),
    )
    if conflicts and not force:
        raise _conflict_error(conflicts)
    for entry in managers.values():
        entry.fields -= changed | comparison.removed
    now = now_rfc3339()
    keep_time = previous is not None and comparison.same and previous.fields == applied
    managers[key] = Entry(
        manager=manager,
        operation=APPLY,
        api_version=r.API_VERSION,
        subresource=subresource,
        time=previous.time if keep_time and previous is not None else now,
        fields=applied,
    )
    encoded = encode(_cap(managers))
    result = dict(merged)
    result["metadata"] = {**(merged.get("metadata") or {}), "managedFields": encoded}
    if live is not None and "status" in live:
        result["status"] = live["status"]
    return Applied(obj=result, changed=not comparison.same)
