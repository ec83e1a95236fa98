"""
Retention policy: what the cluster admin sets (defaults and maxima, flags) and what a namespace asks for.

A namespace owner sets a policy for their namespace with a ConfigMap named :data:`CONFIGMAP` in it (standard
RBAC: ``admin`` and ``edit`` may write ConfigMaps, ``view`` may not), keys ``maxAge`` (``30d``, ``12h``),
``maxBytes`` (``10Gi``) and ``maxCoresPerPod`` (``20``). A namespace can only be stricter than the cluster's
maxima: each value in force is the smaller of the namespace's and the cluster maximum, and a key the namespace
does not set takes the cluster default. ``0`` means "no limit" for the cluster's values; a namespace's ``0`` is
refused (it could only loosen). A ConfigMap that does not parse is ignored with one log line per change, and the
cluster defaults apply: a typo never deletes more than the admin allowed.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass

from handler.flags import parse_retention_duration, parse_size


CONFIGMAP = "coredump-retention"
KEYS = ("maxAge", "maxBytes", "maxCoresPerPod")


class PolicyError(ValueError):
    """A namespace's retention ConfigMap is not valid; one line naming the key."""


@dataclass(frozen=True)
class Policy:
    max_age: float = 0.0  # seconds; 0 = keep forever
    max_bytes: int = 0  # stored bytes per namespace; 0 = unlimited
    max_cores_per_pod: int = 0  # newest cores kept per pod (all incarnations); 0 = unlimited

    def describe(self) -> dict[str, object]:
        return {"maxAge": self.max_age, "maxBytes": self.max_bytes, "maxCoresPerPod": self.max_cores_per_pod}


def _stricter(asked: float, maximum: float) -> float:
    """The smaller limit, where 0 is "none"."""
    if maximum == 0:
        return asked
    if asked == 0:
        return maximum
    return min(asked, maximum)


def parse_namespace_policy(data: Mapping[str, str]) -> dict[str, float]:
    """The values a namespace's ConfigMap sets (a subset of :data:`KEYS`)."""
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise PolicyError(f"unknown key {unknown[0]!r} (known: {', '.join(KEYS)})")
    out: dict[str, float] = {}
    try:
        if "maxAge" in data:
            out["maxAge"] = parse_retention_duration(str(data["maxAge"]))
        if "maxBytes" in data:
            out["maxBytes"] = parse_size(str(data["maxBytes"]))
        if "maxCoresPerPod" in data:
            text = str(data["maxCoresPerPod"]).strip()
            if not text.isdigit():
                raise argparse.ArgumentTypeError(f"maxCoresPerPod: not a count: {text!r}")
            out["maxCoresPerPod"] = int(text)
    except argparse.ArgumentTypeError as e:
        raise PolicyError(str(e)) from None
    for key, value in out.items():
        if value <= 0:
            raise PolicyError(f"{key} must be more than 0 (a namespace can only be stricter than the cluster)")
    return out


def effective(*, default: Policy, maximum: Policy, asked: Mapping[str, float] | None) -> Policy:
    """The policy in force for a namespace."""
    asked = asked or {}
    return Policy(
        max_age=_stricter(asked.get("maxAge", default.max_age), maximum.max_age),
        max_bytes=int(_stricter(asked.get("maxBytes", default.max_bytes), maximum.max_bytes)),
        max_cores_per_pod=int(
            _stricter(asked.get("maxCoresPerPod", default.max_cores_per_pod), maximum.max_cores_per_pod)
        ),
    )
