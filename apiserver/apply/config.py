"""
The applied configuration of a server-side apply request: checked and reduced to what can be applied.

kube-apiserver refuses (400) an apply body that is not an object, names another group/version or kind,
carries ``metadata.managedFields``, or names another object or namespace than the URL; it ignores
``status`` on the main resource of a kind with a status subresource. Everything else the schema does not
know is dropped here, after the registry's field validation has reported it (Strict: 400, Warn: warnings).
"""

from __future__ import annotations

from typing import Any

from apiserver.api import errors
from apiserver.api import resource as r


def applied_config(body: Any, *, namespace: str, name: str) -> dict[str, Any]:
    """The configuration to apply, with the URL's name and namespace; :class:`ApiError` when refused."""
    if not isinstance(body, dict):
        raise errors.bad_request("error decoding YAML: the apply configuration must be an object")
    kind, api_version = body.get("kind"), body.get("apiVersion")
    if not kind:
        raise errors.bad_request("Object 'Kind' is missing in the request body")
    if not api_version:
        raise errors.bad_request("Object 'apiVersion' is missing in the request body")
    if api_version != r.API_VERSION:
        raise errors.bad_request(
            f"Incorrect version specified in apply patch. Specified patch version: "
            f"{api_version}, expected: {r.API_VERSION}"
        )
    r.check_type_meta(body)
    metadata = body.get("metadata")
    if metadata is None:
        metadata = {}
    causes = r.validate_metadata_types(metadata)
    if causes:
        raise errors.invalid(name=name, causes=causes)
    if metadata.get("managedFields") is not None:
        raise errors.bad_request("metadata.managedFields must be nil")
    if metadata.get("name") not in (None, name):
        raise errors.bad_request(
            f"the name of the object ({metadata['name']}) does not match the name on the URL ({name})"
        )
    if metadata.get("namespace") not in (None, "", namespace):
        raise errors.bad_request(
            "the namespace of the provided object does not match the namespace sent on the request"
        )
    kept_meta = {
        key: value for key, value in metadata.items() if key in r.OBJECT_META_FIELDS and key != "managedFields"
    }
    kept_meta["name"] = name
    kept_meta["namespace"] = namespace
    config: dict[str, Any] = {"apiVersion": api_version, "kind": kind, "metadata": kept_meta}
    if "spec" in body:
        spec = body["spec"]
        if isinstance(spec, dict):
            spec = {key: value for key, value in spec.items() if key in r.SPEC_SCHEMA["properties"]}
        config["spec"] = spec
    return config
