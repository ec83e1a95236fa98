"""
Which pod and container a cgroup path belongs to (imports nothing heavy: the kernel path runs it first).

Shapes understood (cgroup v1 and v2 alike; v1 lists one line per hierarchy, all with the same path):

* cgroupfs driver: ``/kubepods/burstable/pod<uid>/<id>`` (containerd, docker), ``.../pod<uid>/crio-<id>`` (CRI-O)
* systemd driver:  ``/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/``
  then ``cri-containerd-<id>.scope``, ``crio-<id>.scope`` or ``docker-<id>.scope`` (sometimes with a child
  cgroup such as ``/container`` below it)
"""

from __future__ import annotations

import re

_POD_UID_RE = re.compile(
    r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}|[0-9a-f]{32})"
    r"(?:\.slice)?$"
)
_CONTAINER_RE = re.compile(r"^(?:(?P<rt>cri-containerd|crio|docker|containerd)-)?(?P<id>[0-9a-f]{64})(?:\.scope)?$")
_RUNTIME_PREFIX = {"cri-containerd": "containerd", "crio": "cri-o", "docker": "docker", "containerd": "containerd"}


class CgroupIdentity:
    """What the cgroup path tells: the pod uid, and the container id when the process is in a container."""

    __slots__ = ("pod_uid", "container_id", "runtime", "cgroup_path")

    def __init__(self, *, pod_uid: str, container_id: str | None, runtime: str | None, cgroup_path: str) -> None:
        self.pod_uid = pod_uid
        self.container_id = container_id
        self.runtime = runtime
        self.cgroup_path = cgroup_path

    def __repr__(self) -> str:
        return f"CgroupIdentity(pod_uid={self.pod_uid!r}, container_id={self.container_id!r}, runtime={self.runtime!r})"


def cgroup_paths(text: str) -> list[str]:
    """The cgroup paths of a ``/proc/<pid>/cgroup`` text, v2's unified line first."""
    unified: list[str] = []
    legacy: list[str] = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        (unified if parts[0] == "0" and parts[1] == "" else legacy).append(parts[2])
    return unified + legacy


def parse_cgroup_path(path: str) -> CgroupIdentity | None:
    """The pod and container a cgroup path belongs to, or None for a process outside any pod."""
    pod_uid = None
    container_id = runtime = None
    for comp in path.split("/"):
        m = _POD_UID_RE.search(comp)
        if m and ("kubepods" in comp or comp.startswith("pod")):
            pod_uid = m.group(1).replace("_", "-")
            continue
        if pod_uid is None:
            continue
        m = _CONTAINER_RE.match(comp)
        if m:
            container_id = m["id"]
            runtime = _RUNTIME_PREFIX.get(m["rt"] or "")
    if pod_uid is None:
        return None
    return CgroupIdentity(pod_uid=pod_uid, container_id=container_id, runtime=runtime, cgroup_path=path)


def identity_from_cgroup_text(text: str) -> CgroupIdentity | None:
    for path in cgroup_paths(text):
        ident = parse_cgroup_path(path)
        if ident is not None:
            return ident
    return None
