"""
The CoredumpEndpoint registry: Kubernetes object semantics on top of an :class:`ObjectStore`.

It owns what kube-apiserver's generic registry owns for a custom resource: server-managed metadata
(uid, creationTimestamp, generation, resourceVersion), generateName, validation and field validation,
optimistic concurrency, dryRun, list paging and resourceVersion semantics, and watch filtering. It asks
:class:`CoreData` for what only storage knows (a new object's status, a deleted pod's uid, purging cores).

``status`` is stored with the object, as for a CRD with the status subresource: reads (get, list, watch)
return the stored status and never walk storage; writes through the main resource (create, update,
patch) drop the incoming status and keep the stored one; only :meth:`EndpointRegistry.write_status`
(called by the server's status reconciler, :mod:`.statusreconciler`) changes it, with a resourceVersion
precondition.

Refusals are the registry's own errors (:mod:`.errors`); the HTTP layer turns them into a Status.
Errors of the resource's HTTP-level checks (:mod:`apiserver.api.resource`, :mod:`apiserver.apply`)
pass through as they are.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import dataclasses
import datetime as dt
import json
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from apiserver.api import resource as r
from apiserver.api.conventions import encode_continue, decode_continue
from apiserver.api.selectors import FieldSelector, Predicate
from apiserver.apply import managed
from apiserver.apply.config import applied_config
from apiserver.registry.cacher import WatchCache
from apiserver.registry import errors
from apiserver.registry.coredata import CoreData
from apiserver.registry.corestatus import empty_status
from apiserver.registry.statusreconciler import StatusReconciler, key_of as incarnation_of
from apiserver.registry.store import (
    KeyExists,
    KeyNotFound,
    ListPage,
    ObjectStore,
    RevisionCompacted,
    RevisionConflict,
    StoreEvent,
    StoreUnavailable,
)


KEY_ROOT = f"/{r.PLURAL}/"
FIELD_VALIDATION_VALUES = ("Ignore", "Warn", "Strict")
_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # kube-apiserver's: no vowels, no look-alikes
_LIST_CHUNK = 500
ManagedFields = list[dict[str, Any]]  # metadata.managedFields as stored (see apiserver.apply.managed)
CONTINUE_EXPIRED = (
    "The provided continue parameter is too old to display a consistent list result. You can start a new list "
    "without the continue parameter."
)


def key_for(namespace: str, name: str) -> str:
    return f"{KEY_ROOT}{namespace}/{name}"


def prefix_for(namespace: str | None) -> str:
    return f"{KEY_ROOT}{namespace}/" if namespace else KEY_ROOT


def now_rfc3339() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass(frozen=True)
class WriteOptions:
    dry_run: bool = False
    field_validation: str = "Warn"
    duplicate_fields: tuple[str, ...] = ()  # found by the body decoder, which alone sees the raw document
    field_manager: str = managed.SERVER_MANAGER  # who the write's managedFields entry names


@dataclasses.dataclass
class WriteResult:
    obj: dict[str, Any]
    warnings: list[str]


@dataclasses.dataclass(frozen=True)
class ListResult:
    items: list[dict[str, Any]]
    resource_version: str
    continue_token: str | None
    # From the watch cache: each item as compact JSON (``encode_item``), so that a plain JSON answer is a join.
    encoded: list[bytes] | None = None


def encode_item(obj: dict[str, Any]) -> bytes:
    """An object as it appears in a compact JSON answer (the encoding ``handlers.io.respond`` uses)."""
    return json.dumps(_with_status(dict(obj)), separators=(",", ":")).encode()


@dataclasses.dataclass(frozen=True)
class WatchItem:
    type: str  # ADDED, MODIFIED, DELETED, BOOKMARK
    obj: dict[str, Any] | None
    revision: int
    initial_events_end: bool = False


def _with_status(obj: dict[str, Any]) -> dict[str, Any]:
    """An object as read: its stored status (an object stored before status was stored gets an empty one
    until the reconciler writes it)."""
    if not isinstance(obj.get("status"), dict):
        obj["status"] = empty_status()
    return obj


def _set_managed_fields(obj: dict[str, Any], entries: ManagedFields) -> None:
    """Store the entries, or no key at all when there are none (as kube-apiserver omits an empty list)."""
    if entries:
        obj["metadata"]["managedFields"] = entries
    else:
        obj["metadata"].pop("managedFields", None)


def _selection(labels: Predicate | None, fields: FieldSelector | None) -> Predicate:
    """Label and field selectors as one predicate, the same for lists and watches."""
    return lambda obj: (labels is None or labels(obj)) and (fields is None or fields.predicate(obj))


def _field_errors(causes: builtins.list[dict[str, str]]) -> tuple[errors.FieldError, ...]:
    """The field errors of the resource's checks (:mod:`apiserver.api.resource`) in the registry's words."""
    return tuple(errors.FieldError(field=c["field"], message=c["message"], type=c["reason"]) for c in causes)


@contextlib.contextmanager
def _store_errors(name: str) -> Iterator[None]:
    """Translate store exceptions into the registry's errors at the one place they surface."""
    try:
        yield
    except KeyNotFound:
        raise errors.NotFound(name=name) from None
    except KeyExists:
        raise errors.AlreadyExists(name=name) from None
    except RevisionConflict:
        raise errors.Conflict(name=name, message=errors.MODIFIED) from None
    except StoreUnavailable as error:
        raise errors.Unavailable(f"storage is unavailable: {error}") from None


def key_of(obj: dict[str, Any]) -> str:
    """The store key of a stored object."""
    return key_for(obj["metadata"]["namespace"], obj["metadata"]["name"])


def serves_list_from_cache(
    *, resource_version: int | None, exact: bool, limit: int | None, continue_token: str | None
) -> bool:
    """
    kube-apiserver's rule (without ConsistentListFromCache): ``resourceVersion=0`` (its limit is ignored) and
    ``NotOlderThan`` a version without limit come from the watch cache; a consistent read (no resourceVersion),
    ``Exact``, a limit with a non-zero version and a continue token are read from the store.
    """
    if continue_token or exact or resource_version is None:
        return False
    return resource_version == 0 or limit is None


class EndpointRegistry:
    """:param cache: the watch cache serving watches and cacheable lists; without it both go to the store."""

    def __init__(self, *, store: ObjectStore, coredata: CoreData, cache: WatchCache | None = None) -> None:
        self.store = store
        self.coredata = coredata
        self.cache = cache

    # ---- reads ------------------------------------------------------------------------------------

    async def get(self, *, namespace: str, name: str, with_status: bool = True) -> dict[str, Any]:
        """The object with its stored status (``with_status`` is kept for callers; status costs nothing now)."""
        with _store_errors(name):
            obj = await self.store.get(key_for(namespace, name))
        return _with_status(obj)

    async def list(
        self,
        *,
        namespace: str | None,
        labels: Predicate | None = None,
        fields: FieldSelector | None = None,
        limit: int | None = None,
        continue_token: str | None = None,
        resource_version: int | None = None,
        exact: bool = False,
    ) -> ListResult:
        """
        A consistent page of objects. ``resource_version`` with ``exact`` reads that snapshot (410 when
        compacted); without ``exact`` it only must not be newer than what the store has.
        """
        prefix = prefix_for(namespace)
        if self.cache is not None and serves_list_from_cache(
            resource_version=resource_version, exact=exact, limit=limit, continue_token=continue_token
        ):
            return await self._list_cached(
                self.cache, namespace=namespace, labels=labels, fields=fields, resource_version=resource_version or 0
            )
        start_after: str | None = None
        revision: int | None = None
        if continue_token:
            revision, start_after = decode_continue(continue_token)
            if not start_after.startswith(prefix):
                raise errors.BadRequest("continue key is not valid: it belongs to another list")
        elif resource_version:
            current = await self._current_revision()
            if resource_version > current:
                raise errors.ResourceVersionTooLarge(requested=resource_version, current=current)
            if exact:
                revision = resource_version
        if fields is not None and fields.namespace is not None and namespace and fields.namespace != namespace:
            return ListResult(items=[], resource_version=str(await self._current_revision()), continue_token=None)

        selected = _selection(labels, fields)
        filtering = labels is not None or fields is not None
        matched: list[dict[str, Any]] = []
        next_token: str | None = None
        while True:
            # Unfiltered, read exactly what the page needs; filtered, read in chunks until enough match.
            wanted = None if limit is None else limit - len(matched)
            page = await self._read_page(
                prefix,
                limit=max(wanted, _LIST_CHUNK) if wanted and filtering else wanted,
                start_after=start_after,
                revision=revision,
                continued=bool(continue_token),
            )
            revision = page.revision
            for index, obj in enumerate(page.items):
                if not selected(obj):
                    continue
                matched.append(obj)
                if len(matched) == limit:
                    if index + 1 < len(page.items) or page.continue_key is not None:
                        next_token = encode_continue(revision=revision, start_after=self._key_of(obj))
                    break
            if next_token or page.continue_key is None or len(matched) == limit:
                break
            start_after = page.continue_key
        for obj in matched:
            _with_status(obj)
        return ListResult(items=matched, resource_version=str(revision), continue_token=next_token)

    async def _list_cached(
        self,
        cache: WatchCache,
        *,
        namespace: str | None,
        labels: Predicate | None,
        fields: FieldSelector | None,
        resource_version: int,
    ) -> ListResult:
        if resource_version:
            await cache.wait_fresh(resource_version)
        if fields is not None and fields.namespace is not None and namespace and fields.namespace != namespace:
            return ListResult(items=[], resource_version=str(cache.revision), continue_token=None)
        items, encoded, revision = cache.list_encoded(prefix_for(namespace), _selection(labels, fields), encode_item)
        # Cached objects are shared: each answer gets its own top level (status may be added).
        return ListResult(
            items=[_with_status(dict(obj)) for obj in items],
            resource_version=str(revision),
            continue_token=None,
            encoded=encoded,
        )

    async def _read_page(
        self, prefix: str, *, limit: int | None, start_after: str | None, revision: int | None, continued: bool
    ) -> ListPage:
        try:
            with _store_errors(""):
                return await self.store.list(prefix, limit=limit, start_after=start_after, revision=revision)
        except RevisionCompacted:
            if continued:
                raise errors.Expired(CONTINUE_EXPIRED) from None
            raise errors.Expired(f"too old resource version: {revision}") from None

    @staticmethod
    def _key_of(obj: dict[str, Any]) -> str:
        return key_for(obj["metadata"]["namespace"], obj["metadata"]["name"])

    async def _current_revision(self) -> int:
        with _store_errors(""):
            return await self.store.current_revision()

    # ---- writes -----------------------------------------------------------------------------------

    def _field_check(self, body: dict[str, Any], options: WriteOptions) -> builtins.list[str]:
        """Strict: 400 on unknown or duplicate fields; Warn: warnings; Ignore: nothing. Unknown fields are dropped."""
        problems = [f'unknown field "{path}"' for path in r.unknown_fields(body)]
        problems += [f'duplicate field "{name}"' for name in options.duplicate_fields]
        if not problems or options.field_validation == "Ignore":
            return []
        if options.field_validation == "Strict":
            raise errors.BadRequest("strict decoding error: " + ", ".join(problems))
        return problems

    def _validated(self, body: Any, *, namespace: str) -> dict[str, Any]:
        r.check_type_meta(body)
        causes = r.validate_metadata_types(body.get("metadata", {}))
        metadata = body.get("metadata")
        name = metadata.get("name") if isinstance(metadata, dict) else None
        name = name if isinstance(name, str) else ""  # a Status names the object only by a string
        if causes:
            raise errors.Invalid(name=name, causes=_field_errors(causes))
        obj = r.prune(body)
        body_namespace = obj["metadata"].get("namespace")
        if body_namespace and body_namespace != namespace:
            raise errors.BadRequest(
                "the namespace of the provided object does not match the namespace sent on the request"
            )
        obj["metadata"]["namespace"] = namespace
        if obj["spec"] is None:
            obj["spec"] = {}
        return obj

    def _raise_if_invalid(self, obj: dict[str, Any]) -> None:
        causes = r.validate_object(obj)
        if causes:
            raise errors.Invalid(name=obj["metadata"].get("name", ""), causes=_field_errors(causes))

    async def create(
        self,
        *,
        namespace: str,
        body: Any,
        options: WriteOptions = WriteOptions(),
        managed_fields: ManagedFields | None = None,
    ) -> WriteResult:
        """``managed_fields`` given (by :meth:`apply`): the object's entries; else an Update is recorded."""
        obj = self._validated(body, namespace=namespace)
        warnings = self._field_check(body, options)
        metadata = obj["metadata"]
        generate = metadata.get("generateName")
        if not metadata.get("name") and generate:
            metadata["name"] = generate + "".join(secrets.choice(_GENERATE_ALPHABET) for _ in range(5))
        if generate is not None and not isinstance(generate, str):
            raise errors.Invalid(
                name="",
                causes=(
                    errors.FieldError(
                        field="metadata.generateName", message="must be a string", type="FieldValueTypeInvalid"
                    ),
                ),
            )
        self._raise_if_invalid(obj)
        name = metadata["name"]
        for field in ("uid", "resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink"):
            metadata.pop(field, None)
        metadata["uid"] = str(uuid.uuid4())
        metadata["creationTimestamp"] = now_rfc3339()
        metadata["generation"] = 1
        if not obj["spec"].get("podUID"):
            obj["spec"]["podUID"] = await self.coredata.default_pod_uid(namespace=namespace, name=name)
        # The client's status is dropped: the stored one is the server's, read from storage now.
        obj.pop("status", None)
        if managed_fields is None:
            managed.check_sent(obj)
            managed_fields = managed.record_update(live=None, new=obj, manager=options.field_manager)
        _set_managed_fields(obj, managed_fields)
        await self.coredata.fill_status([obj])
        if options.dry_run:
            with _store_errors(name):
                try:
                    await self.store.get(key_for(namespace, name))
                except KeyNotFound:
                    pass
                else:
                    raise errors.AlreadyExists(name=name)
            created = obj
        else:
            with _store_errors(name):
                created = await self.store.create(key_for(namespace, name), obj)
        return WriteResult(obj=created, warnings=warnings)

    async def update(
        self, *, namespace: str, name: str, body: Any, options: WriteOptions = WriteOptions()
    ) -> WriteResult:
        obj = self._validated(body, namespace=namespace)
        warnings = self._field_check(body, options)
        if obj["metadata"].get("name") != name:
            raise errors.BadRequest(
                f"the name of the object ({obj['metadata'].get('name')}) does not match the name on the URL ({name})"
            )
        with _store_errors(name):
            current = await self.store.get(key_for(namespace, name))
        expected = obj["metadata"].get("resourceVersion") or None
        if expected is not None and not str(expected).isdigit():
            raise errors.BadRequest(f'metadata.resourceVersion: Invalid value: "{expected}": must be an integer')
        return await self._replace(
            current=current, new=obj, warnings=warnings, expected=int(expected) if expected else None, options=options
        )

    async def _replace(
        self,
        *,
        current: dict[str, Any],
        new: dict[str, Any],
        warnings: builtins.list[str],
        expected: int | None,
        options: WriteOptions,
        managed_fields: ManagedFields | None = None,
    ) -> WriteResult:
        name = current["metadata"]["name"]
        metadata, old_meta = new["metadata"], current["metadata"]
        if metadata.get("uid") and metadata["uid"] != old_meta["uid"]:
            raise errors.Conflict(
                name=name,
                message=f"Precondition failed: UID in precondition: {metadata['uid']}, "
                f"UID in object meta: {old_meta['uid']}",
            )
        if not isinstance(new.get("spec"), dict):
            self._raise_if_invalid(new)  # 422 for a spec that is not an object, before anything reads it
        old_uid, new_uid = current["spec"].get("podUID"), new["spec"].get("podUID")
        if new_uid is None:
            new["spec"]["podUID"] = old_uid
        self._raise_if_invalid(new)
        if new_uid is not None and new_uid != old_uid:
            raise errors.Invalid(
                name=name,
                causes=(
                    errors.FieldError(field="spec.podUID", message=f'Invalid value: "{new_uid}": field is immutable'),
                ),
            )
        for field in ("uid", "creationTimestamp", "generation", "deletionTimestamp", "generateName"):
            if field in old_meta:
                metadata[field] = old_meta[field]
            else:
                metadata.pop(field, None)
        metadata.pop("resourceVersion", None)
        metadata.pop("selfLink", None)
        # Writes through the main resource never change status (as for a CRD with the status subresource).
        new["status"] = _with_status(current)["status"]
        if new["spec"] != current["spec"]:
            metadata["generation"] = old_meta.get("generation", 1) + 1
        if managed_fields is None:
            managed.check_sent(new)
            managed_fields = managed.record_update(live=current, new=new, manager=options.field_manager)
        _set_managed_fields(new, managed_fields)
        if new == {**current, "metadata": {k: v for k, v in old_meta.items() if k != "resourceVersion"}}:
            # Nothing changes: no write, no new resourceVersion, no event (kube-apiserver skips such writes).
            return WriteResult(obj=_with_status(current), warnings=warnings)
        if options.dry_run:
            result = copy.deepcopy(new)
            result["metadata"]["resourceVersion"] = old_meta["resourceVersion"]
        else:
            revision = expected if expected is not None else int(old_meta["resourceVersion"])
            with _store_errors(name):
                result = await self.store.update(key_for(metadata["namespace"], name), new, expected_revision=revision)
        return WriteResult(obj=result, warnings=warnings)

    async def patch(
        self, *, namespace: str, name: str, apply_patch: Any, options: WriteOptions = WriteOptions()
    ) -> WriteResult:
        """``apply_patch`` maps the current object (without status) to the patched body."""
        for _attempt in range(5):
            with _store_errors(name):
                current = await self.store.get(key_for(namespace, name))
            patched = apply_patch(copy.deepcopy(current))
            obj = self._validated(patched, namespace=namespace)
            warnings = self._field_check(patched, options)
            if obj["metadata"].get("name") != name:
                raise errors.BadRequest("the name of the object cannot be changed by a patch")
            expected = obj["metadata"].get("resourceVersion")
            pinned = expected and expected != current["metadata"]["resourceVersion"]
            if expected and not str(expected).isdigit():
                raise errors.BadRequest(f'metadata.resourceVersion: Invalid value: "{expected}"')
            try:
                return await self._replace(
                    current=current,
                    new=obj,
                    warnings=warnings,
                    expected=int(expected) if pinned else None,
                    options=options,
                )
            except errors.Conflict:
                # A concurrent write between our read and CAS: retry, unless the patch pinned a version.
                if pinned:
                    raise
        raise errors.Conflict(name=name, message="the object keeps changing; try again")

    async def apply(
        self, *, namespace: str, name: str, body: Any, force: bool, options: WriteOptions
    ) -> tuple[WriteResult, bool]:
        """
        Server-side apply of ``body`` by ``options.field_manager`` (see :mod:`apiserver.apply`): the result
        and whether the object was created. A ``metadata.resourceVersion`` in the configuration is a
        precondition, as in kube-apiserver.
        """
        config = applied_config(body, namespace=namespace, name=name)
        warnings = self._field_check(body, options)
        pinned = config["metadata"].get("resourceVersion") or None
        if pinned is not None and not str(pinned).isdigit():
            raise errors.BadRequest(f'metadata.resourceVersion: Invalid value: "{pinned}": must be an integer')
        for _attempt in range(5):
            current: dict[str, Any] | None
            try:
                with _store_errors(name):
                    current = await self.store.get(key_for(namespace, name))
            except errors.NotFound:
                current = None
            applied = managed.record_apply(live=current, config=config, manager=options.field_manager, force=force)
            entries = applied.obj["metadata"].get("managedFields", [])
            try:
                if current is None:
                    created = await self.create(
                        namespace=namespace, body=applied.obj, options=options, managed_fields=entries
                    )
                    return WriteResult(obj=created.obj, warnings=[*warnings, *created.warnings]), True
                new = self._validated(applied.obj, namespace=namespace)
                result = await self._replace(
                    current=current,
                    new=new,
                    warnings=warnings,
                    expected=int(pinned) if pinned else None,
                    options=options,
                    managed_fields=entries,
                )
                return result, False
            except (errors.AlreadyExists, errors.Conflict) as error:
                # Created or changed by someone else between our read and write: apply again on the new state.
                raced = isinstance(error, errors.AlreadyExists) or (not pinned and error.message == errors.MODIFIED)
                if not raced:
                    raise
        raise errors.Conflict(name=name, message="the object keeps changing; try again")

    async def delete(
        self,
        *,
        namespace: str,
        name: str,
        dry_run: bool = False,
        precondition_uid: str | None = None,
        precondition_rv: str | None = None,
    ) -> dict[str, Any]:
        with _store_errors(name):
            current = await self.store.get(key_for(namespace, name))
        if precondition_uid and precondition_uid != current["metadata"]["uid"]:
            raise errors.Conflict(
                name=name,
                message=f"Precondition failed: UID in precondition: {precondition_uid}, "
                f"UID in object meta: {current['metadata']['uid']}",
            )
        if precondition_rv and precondition_rv != current["metadata"]["resourceVersion"]:
            raise errors.Conflict(
                name=name,
                message=f"Precondition failed: ResourceVersion in precondition: "
                f"{precondition_rv}, ResourceVersion in object meta: "
                f"{current['metadata']['resourceVersion']}",
            )
        if dry_run:
            deleted = current
        else:
            with _store_errors(name):
                deleted = await self.store.delete(
                    key_for(namespace, name), expected_revision=int(current["metadata"]["resourceVersion"])
                )
            await self.coredata.on_delete(deleted)
        return _with_status(deleted)

    async def delete_collection(
        self,
        *,
        namespace: str,
        labels: Predicate | None = None,
        fields: FieldSelector | None = None,
        dry_run: bool = False,
    ) -> ListResult:
        listed = await self.list(namespace=namespace, labels=labels, fields=fields)
        deleted = []
        for obj in listed.items:
            try:
                deleted.append(await self.delete(namespace=namespace, name=obj["metadata"]["name"], dry_run=dry_run))
            except errors.NotFound:
                pass  # deleted meanwhile: that is what was asked
        return ListResult(items=deleted, resource_version=listed.resource_version, continue_token=None)

    # ---- watch ------------------------------------------------------------------------------------

    async def watch(
        self,
        *,
        namespace: str | None,
        labels: Predicate | None = None,
        fields: FieldSelector | None = None,
        resource_version: int | None,
        send_initial_events: bool,
        bookmarks: bool = False,
    ) -> AsyncIterator[WatchItem]:
        """
        ADDED/MODIFIED/DELETED items in revision order. With no resourceVersion (or with
        ``send_initial_events``) the watch starts with synthetic ADDED events for what exists; with
        ``send_initial_events`` a BOOKMARK marks their end. RevisionCompacted propagates to the caller,
        which reports it in-stream as a 410 ERROR event. Served by the watch cache when there is one
        (with periodic BOOKMARKs when ``bookmarks``).
        """
        if self.cache is not None:
            async for item in self._watch_cached(
                self.cache,
                namespace=namespace,
                labels=labels,
                fields=fields,
                resource_version=resource_version,
                send_initial_events=send_initial_events,
                bookmarks=bookmarks,
            ):
                yield item
            return
        selected = _selection(labels, fields)
        if resource_version is None or resource_version == 0 or send_initial_events:
            snapshot = await self.list(namespace=namespace, labels=labels, fields=fields)
            start = int(snapshot.resource_version)
            for obj in snapshot.items:
                yield WatchItem(type="ADDED", obj=obj, revision=start)
            if send_initial_events:
                yield WatchItem(type="BOOKMARK", obj=None, revision=start, initial_events_end=True)
        else:
            start = resource_version
        events: AsyncIterator[StoreEvent] = self.store.watch(prefix_for(namespace), from_revision=start)
        try:
            async for event in events:
                if not selected(event.obj):
                    continue
                yield WatchItem(type=event.type.value, obj=_with_status(event.obj), revision=event.revision)
        finally:
            close = getattr(events, "aclose", None)
            if close is not None:
                # The client is gone or the watch failed: nothing is left to report about closing it.
                with contextlib.suppress(Exception):
                    await close()

    async def _watch_cached(
        self,
        cache: WatchCache,
        *,
        namespace: str | None,
        labels: Predicate | None,
        fields: FieldSelector | None,
        resource_version: int | None,
        send_initial_events: bool,
        bookmarks: bool,
    ) -> AsyncIterator[WatchItem]:
        if send_initial_events and resource_version != 0:
            # A consistent start (no resourceVersion) or one not older than the client's: wait for the cache.
            await cache.wait_fresh(resource_version or await self._current_revision())
        events = cache.watch(
            prefix=prefix_for(namespace),
            selected=_selection(labels, fields),
            resource_version=resource_version,
            initial_events=send_initial_events or not resource_version,
            initial_events_end=send_initial_events,
            bookmarks=bookmarks,
        )
        try:
            async for event in events:
                obj = _with_status(dict(event.obj)) if event.obj is not None else None
                yield WatchItem(
                    type=event.type, obj=obj, revision=event.revision, initial_events_end=event.initial_events_end
                )
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    # ---- status (the server's own writes) --------------------------------------------------------------

    async def read_stored(self, *, namespace: str, name: str) -> dict[str, Any]:
        """The object as stored (status as stored, possibly absent); store errors propagate as they are."""
        return await self.store.get(key_for(namespace, name))

    async def write_status(self, *, current: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        """
        Store ``status`` on ``current`` (as read by :meth:`read_stored`) with a compare-and-swap on its
        resourceVersion: a new resourceVersion and a MODIFIED event. Store errors propagate as they are
        (:class:`RevisionConflict`, :class:`KeyNotFound`): the reconciler decides what they mean.
        """
        meta = current["metadata"]
        new = {**current, "status": status}
        return await self.store.update(
            key_for(meta["namespace"], meta["name"]), new, expected_revision=int(meta["resourceVersion"])
        )

    async def refresh_status(
        self, *, namespace: str, name: str, body: Any, options: WriteOptions = WriteOptions()
    ) -> WriteResult:
        """
        A client's PUT or PATCH of the status subresource: the body is checked as for any write (400 or 422
        Status), a resourceVersion or uid in it is a precondition (409 when stale), and its ``status`` is
        ignored: the endpoint's status is re-read from storage now (the truth) and the stored object is
        returned. So a status write means "re-read storage now", and RBAC decides who may ask for it.
        """
        obj = self._validated(body, namespace=namespace)
        warnings = self._field_check(body, options)
        if obj["metadata"].get("name") != name:
            raise errors.BadRequest(
                f"the name of the object ({obj['metadata'].get('name')}) does not match the name on the URL ({name})"
            )
        with _store_errors(name):
            current = await self.store.get(key_for(namespace, name))
        expected, uid = obj["metadata"].get("resourceVersion"), obj["metadata"].get("uid")
        if expected and not str(expected).isdigit():
            raise errors.BadRequest(f'metadata.resourceVersion: Invalid value: "{expected}": must be an integer')
        if expected and expected != current["metadata"]["resourceVersion"]:
            raise errors.Conflict(name=name, message=errors.MODIFIED)
        if uid and uid != current["metadata"]["uid"]:
            raise errors.Conflict(
                name=name,
                message=f"Precondition failed: UID in precondition: {uid}, "
                f"UID in object meta: {current['metadata']['uid']}",
            )
        key = incarnation_of(current)
        if key is not None and not options.dry_run:
            reconciler = StatusReconciler(registry=self, root=self.coredata.storage_root)
            with _store_errors(name):
                await reconciler.reconcile(namespace=key[0], pod=key[1], uid=key[2])
        return WriteResult(obj=await self.get(namespace=namespace, name=name), warnings=warnings)

    async def check(self) -> None:
        with _store_errors(""):
            await self.store.check()
