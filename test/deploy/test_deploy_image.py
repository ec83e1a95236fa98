"""
What can be checked of the image without a container engine: every file the Dockerfile copies from the
build context exists, every program it names is a console script of the package, and the pinned
requirements it installs are the package's whole runtime dependency closure and satisfy its declared ranges.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import shlex
import subprocess
import sys
import tomllib

from packaging.requirements import Requirement

from deploy_helpers import DEPLOY, REPO

logger = logging.getLogger(__name__)

DOCKERFILE = DEPLOY / "Dockerfile"
REQUIREMENTS = DEPLOY / "requirements.txt"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_deploy_dockerfile_copies_only_files_that_exist() -> None:
    copies = [args for word, args in instructions() if word in ("COPY", "ADD")]
    assert copies
    checked = 0
    for args in copies:
        words = shlex.split(args)
        if any(w.startswith("--from") for w in words):
            continue  # from another build stage, not the build context
        sources = [w for w in words[:-1] if not w.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the build context"
            checked += 1
    # The package's sources, its metadata and the pins are all in the image.
    copied = {s for args in copies for s in shlex.split(args)[:-1]}
    assert {"pyproject.toml", "apiserver", "handler", "deploy/requirements.txt"} <= copied
    assert checked >= 4


def test_deploy_dockerfile_names_only_console_scripts_of_the_package() -> None:
    declared = set(pyproject()["project"]["scripts"])
    installed = {
        ep.name
        for ep in importlib.metadata.distribution("coredump-example-io").entry_points
        if ep.group == "console_scripts"
    }
    assert declared == installed
    named = set()
    for word, args in instructions():
        if word in ("RUN", "CMD", "ENTRYPOINT"):
            named |= set(re.findall(r"\b(?:kubectl-coredump|coredump-[a-z-]+)\b", args)) - {"coredump-example-io"}
    assert named, "the Dockerfile runs none of the programs"
    assert named <= declared, f"not console scripts of the package: {sorted(named - declared)}"
    # The build smoke-tests every program, so an image with a broken entry point does not build.
    assert named == declared


def test_deploy_image_runs_as_non_root_by_default() -> None:
    users = [args for word, args in instructions() if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")


def test_deploy_pinned_requirements_cover_the_runtime_closure() -> None:
    pins = {}
    for line in REQUIREMENTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not pinned: {line}"
            pins[canonical(name)] = version

    # Every distribution the installed package needs at run time (test extras excluded) is pinned.
    needed, pending = set(), ["coredump-example-io"]
    while pending:
        dist = importlib.metadata.distribution(pending.pop())
        name = canonical(dist.metadata["Name"])
        if name in needed:
            continue
        needed.add(name)
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                pending.append(req.name)
    needed.discard("coredump-example-io")
    assert needed <= set(pins), f"missing from {REQUIREMENTS.name}: {sorted(needed - set(pins))}"

    # The pins satisfy the package's own declared ranges (pip check in the build checks the rest).
    for spec in pyproject()["project"]["dependencies"]:
        req = Requirement(spec)
        assert req.specifier.contains(pins[canonical(req.name)], prereleases=True), (
            f"{req.name}=={pins[canonical(req.name)]} is outside {req.specifier}"
        )
    # No test tooling in the image.
    for spec in pyproject()["project"]["optional-dependencies"]["test"]:
        assert canonical(Requirement(spec).name) not in pins


def test_deploy_pins_are_the_versions_the_tests_run_against() -> None:
    """deploy/requirements.txt equals the runtime closure installed in this venv (scripts/test installs with the
    pins as constraints), so the image ships what was tested; a stale file names the command that rewrites it."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "pin-requirements.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "pin-requirements.py"), "--check", "--output", "/dev/null"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1 and "rerun deploy/pin-requirements.py" in proc.stderr  # the check can fail
