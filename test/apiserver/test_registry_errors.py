"""
The one mapping from the registry's errors to Kubernetes Status: each refusal answers with the code,
reason, message and details kube-apiserver sends for it, so kubectl prints the familiar line.
"""

from __future__ import annotations

from typing import Any

import pytest

from apiserver.api import errors
from apiserver.registry import errors as registry

GROUP = "coredump.example.io"
KIND = "coredumpendpoints"


def status(*, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details is not None:
        body["details"] = details
    return body


CASES = [
    (
        registry.NotFound(name="web"),
        status(
            code=404,
            reason="NotFound",
            message=f'{KIND}.{GROUP} "web" not found',
            details={"group": GROUP, "kind": KIND, "name": "web"},
        ),
    ),
    (
        registry.AlreadyExists(name="web"),
        status(
            code=409,
            reason="AlreadyExists",
            message=f'{KIND}.{GROUP} "web" already exists',
            details={"group": GROUP, "kind": KIND, "name": "web"},
        ),
    ),
    (
        registry.Conflict(name="web", message=registry.MODIFIED),
        status(
            code=409,
            reason="Conflict",
            message=f'Operation cannot be fulfilled on {KIND}.{GROUP} "web": the object has been modified; '
            "please apply your changes to the latest version and try again",
            details={"group": GROUP, "kind": KIND, "name": "web"},
        ),
    ),
    (
        registry.Invalid(
            name="web",
            causes=(
                registry.FieldError(
                    field="spec.podUID", message="Required value: give spec.podUID", type="FieldValueRequired"
                ),
                registry.FieldError(field="metadata.name", message='Invalid value: "A"'),
            ),
        ),
        status(
            code=422,
            reason="Invalid",
            message=f'CoredumpEndpoint.{GROUP} "web" is invalid: spec.podUID: Required value: give spec.podUID, '
            'metadata.name: Invalid value: "A"',
            details={
                "name": "web",
                "group": GROUP,
                "kind": "CoredumpEndpoint",
                "causes": [
                    {
                        "reason": "FieldValueRequired",
                        "message": "Required value: give spec.podUID",
                        "field": "spec.podUID",
                    },
                    {"reason": "FieldValueInvalid", "message": 'Invalid value: "A"', "field": "metadata.name"},
                ],
            },
        ),
    ),
    (
        registry.BadRequest("continue key is not valid: it belongs to another list"),
        status(code=400, reason="BadRequest", message="continue key is not valid: it belongs to another list"),
    ),
    (
        registry.Unavailable("storage is unavailable: etcd down"),
        status(code=503, reason="ServiceUnavailable", message="storage is unavailable: etcd down"),
    ),
    (
        registry.Expired("too old resource version: 3"),
        status(code=410, reason="Expired", message="too old resource version: 3"),
    ),
    (
        registry.ResourceVersionTooLarge(requested=90, current=7),
        status(
            code=504,
            reason="Timeout",
            message="Too large resource version: 90, current: 7",
            details={
                "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                "retryAfterSeconds": 1,
            },
        ),
    ),
]


@pytest.mark.parametrize(("error", "expected"), CASES, ids=[type(error).__name__ for error, _ in CASES])
def test_each_registry_refusal_answers_with_the_status_kube_apiserver_sends(
    error: registry.RegistryError, expected: dict[str, Any]
) -> None:
    api_error = errors.from_registry(error)
    assert api_error.to_status() == expected
    assert api_error.code == expected["code"]


def test_a_registry_error_the_mapping_does_not_know_is_an_internal_error_without_its_message() -> None:
    class Unmapped(registry.RegistryError):
        pass

    status_body = errors.from_registry(Unmapped("secret detail")).to_status()
    assert (status_body["code"], status_body["reason"]) == (500, "InternalError")
    assert "secret detail" not in status_body["message"]
