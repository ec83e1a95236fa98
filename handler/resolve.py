"""
pid → container → pod: the cgroup path gives the pod uid and container id, the kubelet's log links (or the CRI)
the names.

The cgroup shapes of each runtime and driver are parsed in :mod:`handler.cgroup`.

hostNetwork pods look exactly like others here: nothing is taken from the crashing process's network or uts
namespace, so the node's hostname never ends up as a pod name.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from handler import layout
from handler.config import HandlerConfig
from handler.cgroup import CgroupIdentity, identity_from_cgroup_text
from handler.podrecord import PodRecord, read_pod

logger = logging.getLogger(__name__)

# /var/log/containers/<pod>_<namespace>_<container>-<64 hex>.log
_LOG_LINK_RE = re.compile(
    r"^(?P<pod>[a-z0-9.-]+)_(?P<ns>[a-z0-9-]+)_(?P<container>[a-z0-9-]+)-(?P<id>[0-9a-f]{64})\.log$"
)
# /var/log/pods/<namespace>_<pod>_<uid>/<container>/N.log
_POD_LOG_DIR_RE = re.compile(r"^(?P<ns>[a-z0-9-]+)_(?P<pod>[a-z0-9.-]+)_(?P<uid>[0-9a-f-]+)$")


@dataclass
class PodIdentity:
    namespace: str
    pod: str
    pod_uid: str
    container: str
    container_id: str  # "<runtime>://<id>" as Kubernetes prints it in containerStatuses
    image: str | None = None
    image_digest: str | None = None
    # The agent's record of the pod (labels, annotations, owner), when it has one.
    record: PodRecord | None = None


def read_cgroup(proc_root: Path, pid: int) -> str | None:
    try:
        return (Path(proc_root) / str(pid) / "cgroup").read_text()
    except OSError as e:
        logger.warning("cannot read cgroup of pid %d: %s", pid, e)
        return None


def names_from_log_links(logs_dir: Path, *, container_id: str) -> PodIdentity | None:
    """Names from the kubelet's ``/var/log/containers`` link of this container, if it is there."""
    try:
        with os.scandir(logs_dir) as it:
            matches = [e.name for e in it if e.name.endswith(f"-{container_id}.log")]
    except OSError as e:
        logger.debug("no container log links at %s: %s", logs_dir, e)
        return None
    for name in matches:
        m = _LOG_LINK_RE.match(name)
        if not m:
            continue
        uid = ""
        try:
            target = os.readlink(logs_dir / name)
            pm = _POD_LOG_DIR_RE.match(Path(target).parent.parent.name)
            if pm:
                uid = pm["uid"]
        except OSError:
            pass
        return PodIdentity(
            namespace=m["ns"], pod=m["pod"], pod_uid=uid, container=m["container"], container_id=container_id
        )
    return None


def inspect_with_crictl(crictl: str, *, container_id: str, timeout: float) -> dict | None:
    """``crictl inspect`` of a container (names, image), or None if the CRI cannot tell in time."""
    try:
        proc = subprocess.run(
            [crictl, "inspect", "-o", "json", container_id],
            capture_output=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        logger.warning("crictl inspect %s failed: %s", container_id[:12], e)
        return None
    if proc.returncode != 0:
        logger.warning(
            "crictl inspect %s: exit %d: %s",
            container_id[:12],
            proc.returncode,
            proc.stderr.decode(errors="replace").strip()[:200],
        )
        return None
    try:
        return json.loads(proc.stdout)
    except ValueError:
        return None


def _from_crictl(info: dict, *, container_id: str) -> PodIdentity | None:
    status = info.get("status") or {}
    labels = status.get("labels") or (info.get("info") or {}).get("config", {}).get("labels") or {}
    try:
        ident = PodIdentity(
            namespace=labels["io.kubernetes.pod.namespace"],
            pod=labels["io.kubernetes.pod.name"],
            pod_uid=labels.get("io.kubernetes.pod.uid", ""),
            container=labels["io.kubernetes.container.name"],
            container_id=container_id,
        )
    except KeyError:
        return None
    _add_image(ident, info)
    return ident


def _add_image(ident: PodIdentity, info: dict) -> None:
    status = info.get("status") or {}
    image = (status.get("image") or {}).get("image")
    ref = status.get("imageRef")
    ident.image = image or ident.image
    if ref and "@sha256:" in ref:
        ident.image_digest = ref.split("@", 1)[1]
    elif ref and ref.startswith("sha256:"):
        ident.image_digest = ref


def resolve_pod(
    cfg: HandlerConfig, *, pid: int, cgroup_text: str | None = None, pod_records: bool = True
) -> PodIdentity | CgroupIdentity | None:
    """
    The pod identity of a crashing pid.

    Sources, none of them an API call: the agent's pod record in ``cfg.state_dir`` (names, labels, owner, image
    and digest; skipped without ``pod_records``), the kubelet's log links under ``cfg.host_root`` (names), and
    the CRI if ``cfg.crictl`` is set (names, image).

    Returns a :class:`PodIdentity` when names were found, the bare :class:`CgroupIdentity` when the process is
    in a pod whose names cannot be found (yet), and None when it is not in a pod at all.
    """
    proc_root, host_root, container_logs = cfg.proc_root, cfg.host_root, cfg.container_logs
    crictl, crictl_timeout, runtime = cfg.crictl, cfg.crictl_timeout, cfg.runtime
    state_dir = cfg.state_dir if pod_records else None
    if cgroup_text is None:
        cgroup_text = read_cgroup(proc_root, pid)
    if cgroup_text is None:
        return None
    cg = identity_from_cgroup_text(cgroup_text)
    if cg is None:
        return None
    if cg.container_id is None:
        return cg
    runtime = cg.runtime or runtime
    record = read_pod(state_dir, cg.pod_uid) if state_dir is not None else None
    ident = names_from_log_links(Path(host_root) / container_logs, container_id=cg.container_id)
    if ident is None and record is not None:
        c = record.container(container_id=cg.container_id)
        if c is not None:
            ident = PodIdentity(
                namespace=record.namespace,
                pod=record.name,
                pod_uid=record.uid,
                container=c.name,
                container_id=cg.container_id,
            )
    info = None
    if crictl:
        # The CRI is optional: the agent's record names the image; the CRI is the fallback for names.
        info = inspect_with_crictl(crictl, container_id=cg.container_id, timeout=crictl_timeout)
    if ident is None and info is not None:
        ident = _from_crictl(info, container_id=cg.container_id)
    elif ident is not None and info is not None:
        _add_image(ident, info)
    if ident is None:
        return cg
    if record is not None and (record.namespace, record.name) == (ident.namespace, ident.pod):
        ident.record = record
        c = record.container(container_id=cg.container_id, name=ident.container)
        if c is not None:
            ident.image = c.image or ident.image
            ident.image_digest = c.image_digest or ident.image_digest
    if ident.pod_uid and ident.pod_uid != cg.pod_uid:
        logger.warning(
            "pod uid mismatch for %s: cgroup %s, names %s; trusting the cgroup",
            cg.container_id[:12],
            cg.pod_uid,
            ident.pod_uid,
        )
    ident.pod_uid = cg.pod_uid
    ident.container_id = f"{runtime}://{cg.container_id}"
    try:
        layout.validate_namespace(ident.namespace)
        layout.validate_pod_name(ident.pod)
        layout.validate_container(ident.container)
        layout.validate_pod_uid(ident.pod_uid)
    except layout.InvalidName as e:
        logger.error("unusable pod identity for %s: %s", cg.container_id[:12], e)
        return cg
    return ident
