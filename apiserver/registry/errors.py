"""
What the registry refuses, in its own words: one exception per kind of refusal, no HTTP in sight.

The registry (endpoints, CoreData, the watch cache, the pod lookup) raises these; the HTTP layer maps
each to its Kubernetes ``Status`` in one place (:func:`apiserver.api.errors.from_registry`), so the
wording kubectl prints is decided there and nowhere else. Each exception carries only the facts the
Status is built from (the object's name, a message, the field errors). ``str()`` of each is a one-line
description for logs.
"""

from __future__ import annotations

import dataclasses

# The message of the Conflict a stale compare-and-swap ends in: callers retry on exactly this one.
MODIFIED = "the object has been modified; please apply your changes to the latest version and try again"


@dataclasses.dataclass(frozen=True, kw_only=True)
class FieldError:
    """One field that breaks a rule: its path, what is wrong, and the field.ErrorType (``FieldValueRequired``)."""

    field: str
    message: str
    type: str = "FieldValueInvalid"


class RegistryError(Exception):
    """Any refusal of the registry; ``message`` says what was refused."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(RegistryError):
    """The named object does not exist."""

    def __init__(self, *, name: str) -> None:
        super().__init__(f'"{name}" not found')
        self.name = name


class AlreadyExists(RegistryError):
    """An object of that name exists already."""

    def __init__(self, *, name: str) -> None:
        super().__init__(f'"{name}" already exists')
        self.name = name


class Conflict(RegistryError):
    """The write does not fit the object's current state (a stale version, a failed precondition)."""

    def __init__(self, *, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


class Invalid(RegistryError):
    """The object is well-formed but its fields break the rules; ``causes`` name each field."""

    def __init__(self, *, name: str, causes: tuple[FieldError, ...]) -> None:
        super().__init__(", ".join(f"{cause.field}: {cause.message}" for cause in causes))
        self.name = name
        self.causes = causes


class BadRequest(RegistryError):
    """The request cannot be served as sent (a foreign continue token, a name that does not match)."""


class Unavailable(RegistryError):
    """Something the registry depends on (storage, the cluster's pod API) cannot answer now."""


class Expired(RegistryError):
    """The asked-for version is no longer kept (compacted): the client must list again."""


class ResourceVersionTooLarge(RegistryError):
    """The asked-for version is newer than the storage has reached (yet): the client waits and retries."""

    def __init__(self, *, requested: int, current: int) -> None:
        super().__init__(f"Too large resource version: {requested}, current: {current}")
        self.requested = requested
        self.current = current
