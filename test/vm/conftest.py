"""
The VM suite's one guest: built (or taken from the cache), booted once per session, its observations loaded.

Every test here is marked ``vm`` (``pytestmark`` in each module; ``scripts/test -m 'not vm'`` runs the fast suite
alone). The guest is built and booted only when a ``vm`` test is selected. The build and the boot times are
printed at the end of the run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

import guest_image as image
from vm_harness import GuestRun

BOOT_TIMEOUT = 600.0  # the whole guest run: the bound under TCG
TIMES: dict[str, str] = {}


@pytest.fixture(scope="session")
def guest(tmp_path_factory: pytest.TempPathFactory) -> GuestRun:
    reuse = os.environ.get("COREDUMP_VM_RESULTS")
    if reuse:
        # Developer aid: judge the results directory of an earlier guest run again, without booting.
        return _load(Path(reuse), console="", accel="earlier run")
    t0 = time.monotonic()
    image.ensure_host_tools()
    base = image.ensure_base()
    TIMES["image"] = (
        f"built in {base.built_seconds:.0f}s" if base.built_seconds is not None else "from the cache"
    ) + f" ({base.directory})"
    work = tmp_path_factory.mktemp("vm")
    project = work / "project.img"
    image.build_project_disk(dest=project, work=work)
    run = image.boot(base=base, project=project, work=work, timeout=BOOT_TIMEOUT)
    TIMES["guest"] = f"{run.seconds:.0f}s under {run.accel}"
    TIMES["total"] = f"{time.monotonic() - t0:.0f}s"
    return _load(run.results, console=run.console, accel=run.accel)


def _load(results: Path, *, console: str, accel: str) -> GuestRun:
    log = results / "runner.log"
    g = GuestRun(
        results=results,
        console=console,
        accel=accel,
        runner_log=log.read_text(errors="replace") if log.exists() else "",
    )
    for p in results.glob("*.json"):
        try:
            g.scenarios[p.stem] = json.loads(p.read_text())
        except ValueError:
            pass
    return g


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if TIMES:
        terminalreporter.write_line(
            f"vm: guest image {TIMES.get('image')}; guest run {TIMES.get('guest')}; VM suite {TIMES.get('total')}"
        )
