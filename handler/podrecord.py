"""
Per-pod and per-namespace records on the node's state dir: written by the agent's watcher, read by the handler.

The handler must not call the API server while a process is held in its crash, so the agent keeps what the
core's metadata needs at hand: ``<state>/pods/<pod-uid>.json`` (namespace, name, uid, node, labels,
annotations, owner, and per container its image, image digest and container id) and
``<state>/namespaces/<name>.json`` (the namespace's annotations, for the capture opt-out). Records are
written atomically (temp file, fsync, rename) and read with bounded size and checked types: a record that
is missing or broken only means less context, never a lost core.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PODS_DIR, NAMESPACES_DIR = "pods", "namespaces"
VERSION = 1
MAX_RECORD_BYTES = 256 << 10
CAPTURE_ANNOTATION = "coredump.example.io/capture"
# Annotations not carried: large and of no use beside a core.
_SKIPPED_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration",)
MAX_ANNOTATION_VALUE = 1024
MAX_ENTRIES = 128


@dataclass
class ContainerRecord:
    name: str
    image: str | None = None
    image_id: str | None = None
    container_id: str | None = None  # "<runtime>://<id>"

    @property
    def image_digest(self) -> str | None:
        """``sha256:...`` from the kubelet's imageID (``repo@sha256:...`` or a bare ``sha256:...``)."""
        ref = self.image_id or ""
        if "@sha256:" in ref:
            return ref.rsplit("@", 1)[1]
        if ref.startswith("sha256:"):
            return ref
        return None


@dataclass
class PodRecord:
    namespace: str
    name: str
    uid: str
    node: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    owner: dict[str, str] | None = None  # the controller ownerReference: kind, name, uid
    containers: list[ContainerRecord] = field(default_factory=list)

    def container(self, *, container_id: str | None = None, name: str | None = None) -> ContainerRecord | None:
        """The container with this runtime id (bare hex or ``runtime://id``) or, failing that, this name."""
        bare = container_id.split("://", 1)[-1] if container_id else None
        for c in self.containers:
            if bare and c.container_id and c.container_id.split("://", 1)[-1] == bare:
                return c
        for c in self.containers:
            if name and c.name == name:
                return c
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "namespace": self.namespace,
            "name": self.name,
            "uid": self.uid,
            "node": self.node,
            "labels": self.labels,
            "annotations": self.annotations,
            "owner": self.owner,
            "containers": [
                {"name": c.name, "image": c.image, "imageID": c.image_id, "containerID": c.container_id}
                for c in self.containers
            ],
        }


def _str_map(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    out = {}
    for k, v in list(value.items())[:MAX_ENTRIES]:
        if isinstance(k, str) and isinstance(v, str) and k not in _SKIPPED_ANNOTATIONS:
            out[k] = v[:MAX_ANNOTATION_VALUE]
    return out


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def pod_from_api(pod: dict[str, Any]) -> PodRecord | None:
    """The record of a Pod object as the API returns it (a dict, camelCase keys); None if it has no uid."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    uid, ns, name = meta.get("uid"), meta.get("namespace"), meta.get("name")
    if not (isinstance(uid, str) and uid and isinstance(ns, str) and ns and isinstance(name, str) and name):
        return None
    owner = None
    for ref in meta.get("ownerReferences") or []:
        if isinstance(ref, dict) and (ref.get("controller") or owner is None):
            owner = {
                "kind": str(ref.get("kind") or ""),
                "name": str(ref.get("name") or ""),
                "uid": str(ref.get("uid") or ""),
            }
    images = {}
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for c in spec.get(key) or []:
            if isinstance(c, dict) and isinstance(c.get("name"), str):
                images[c["name"]] = _opt_str(c.get("image"))
    containers: dict[str, ContainerRecord] = {n: ContainerRecord(name=n, image=img) for n, img in images.items()}
    for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
        for cs in status.get(key) or []:
            if not isinstance(cs, dict) or not isinstance(cs.get("name"), str):
                continue
            rec = containers.setdefault(cs["name"], ContainerRecord(name=cs["name"]))
            rec.image = rec.image or _opt_str(cs.get("image"))
            rec.image_id = _opt_str(cs.get("imageID")) or rec.image_id
            rec.container_id = _opt_str(cs.get("containerID")) or rec.container_id
    return PodRecord(
        namespace=ns,
        name=name,
        uid=uid,
        node=_opt_str(spec.get("nodeName")),
        labels=_str_map(meta.get("labels")),
        annotations=_str_map(meta.get("annotations")),
        owner=owner,
        containers=list(containers.values()),
    )


def _parse_pod(data: dict[str, Any]) -> PodRecord | None:
    try:
        containers = [
            ContainerRecord(
                name=c["name"],
                image=_opt_str(c.get("image")),
                image_id=_opt_str(c.get("imageID")),
                container_id=_opt_str(c.get("containerID")),
            )
            for c in data.get("containers") or []
            if isinstance(c, dict) and isinstance(c.get("name"), str)
        ]
        owner = data.get("owner")
        return PodRecord(
            namespace=data["namespace"],
            name=data["name"],
            uid=data["uid"],
            node=_opt_str(data.get("node")),
            labels=_str_map(data.get("labels")),
            annotations=_str_map(data.get("annotations")),
            owner={k: str(v) for k, v in owner.items() if k in ("kind", "name", "uid")}
            if isinstance(owner, dict)
            else None,
            containers=containers,
        )
    except (KeyError, TypeError, AttributeError):
        return None


def _safe_name(name: str) -> bool:
    return bool(name) and len(name) <= 253 and all(c.isalnum() or c in "-." for c in name) and name[0] != "."


def _read(path: Path) -> dict[str, Any] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            body = f.read(MAX_RECORD_BYTES + 1)
        if len(body) > MAX_RECORD_BYTES:
            raise ValueError("record too large")
        data = json.loads(body)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError) as e:
        logger.warning("unusable record %s: %s", path, e)
        return None


def read_pod(state_dir: Path, pod_uid: str) -> PodRecord | None:
    """The agent's record of pod ``pod_uid`` (None if there is none or it is unusable)."""
    if not _safe_name(pod_uid):
        return None
    data = _read(Path(state_dir) / PODS_DIR / f"{pod_uid}.json")
    rec = _parse_pod(data) if data else None
    if rec is not None and rec.uid != pod_uid:
        logger.warning("pod record %s names uid %s; ignored", pod_uid, rec.uid)
        return None
    return rec


def read_namespace_annotations(state_dir: Path, namespace: str) -> dict[str, str]:
    if not _safe_name(namespace):
        return {}
    data = _read(Path(state_dir) / NAMESPACES_DIR / f"{namespace}.json")
    return _str_map((data or {}).get("annotations"))


def _write_atomic(directory: Path, name: str, data: dict[str, Any]) -> Path:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    final = directory / name
    tmp = directory / f".{name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    return final


def write_pod(state_dir: Path, rec: PodRecord) -> Path | None:
    if not _safe_name(rec.uid):
        return None
    return _write_atomic(Path(state_dir) / PODS_DIR, f"{rec.uid}.json", rec.to_json())


def remove_pod(state_dir: Path, pod_uid: str) -> None:
    if _safe_name(pod_uid):
        try:
            (Path(state_dir) / PODS_DIR / f"{pod_uid}.json").unlink()
        except FileNotFoundError:
            pass


def write_namespace(state_dir: Path, *, name: str, annotations: dict[str, str]) -> Path | None:
    if not _safe_name(name):
        return None
    return _write_atomic(
        Path(state_dir) / NAMESPACES_DIR,
        f"{name}.json",
        {"version": VERSION, "name": name, "annotations": _str_map(annotations)},
    )


def capture_wanted(*, pod: dict[str, str] | None, namespace: dict[str, str] | None, default: bool) -> tuple[bool, str]:
    """
    Whether to keep a core, and why: the pod's ``coredump.example.io/capture`` annotation wins over its
    namespace's, which wins over the agent's default. Values other than "true"/"false" are ignored.
    """
    for where, ann in (("pod", pod), ("namespace", namespace)):
        value = (ann or {}).get(CAPTURE_ANNOTATION)
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true", f"{where} annotation {CAPTURE_ANNOTATION}={value.strip()}"
    return default, "default"
