"""What the VM tests read: one guest run's observations (the ``guest`` fixture in conftest.py makes it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass
class GuestRun:
    results: Path
    console: str
    runner_log: str
    accel: str
    scenarios: dict[str, dict] = field(default_factory=dict)

    def scenario(self, name: str) -> dict:
        """The observations of one scenario; the test fails with the guest's traceback if it did not run through."""
        out = self.scenarios.get(name)
        if out is None:
            pytest.fail(
                f"scenario {name} did not report; runner log:\n{self.runner_log[-6000:]}\n"
                f"console:\n{self.console[-3000:]}"
            )
        if not out.get("ok"):
            pytest.fail(f"scenario {name} failed in the guest:\n{out.get('error')}\nshim log:\n{out.get('shimLog')}")
        return out["data"]
