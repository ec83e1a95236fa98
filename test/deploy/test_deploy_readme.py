"""
The README's install section (the cluster admin's guide) stays true to the code: it lists every flag the three
programs' real parsers define, and every repository path it tells the admin to edit or run exists.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import re

import pytest

from deploy_helpers import REPO

logger = logging.getLogger(__name__)


def install_section() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- section: install \(owner: deploy\) -->(.*?)<!-- end: install -->", text, re.S)
    assert match, "README.md has no install section"
    return match.group(1)


def all_flags(parser: argparse.ArgumentParser) -> set[str]:
    flags = set()
    for action in parser._actions:  # argparse has no public accessor for its actions
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= all_flags(sub)
        elif not isinstance(action, argparse._HelpAction):
            flags |= {o for o in action.option_strings if o.startswith("--")}
    return flags


@pytest.mark.parametrize("script", ["coredump-apiserver", "coredump-agent", "coredump-handler"])
def test_deploy_readme_lists_every_flag(script: str) -> None:
    entry = {ep.name: ep.value for ep in importlib.metadata.distribution("coredump-example-io").entry_points
             if ep.group == "console_scripts"}[script]
    parser = importlib.import_module(entry.split(":")[0]).build_parser()
    section = install_section()
    # The first column of the flag tables: "| `--flag` |" or "| `-v`, `--verbose` |".
    listed = {flag for line in section.splitlines() if line.startswith("| `-")
              for flag in re.findall(r"`(--[a-z0-9-]+)`", line.split(" | ")[0])}
    missing = all_flags(parser) - listed
    assert not missing, f"README install section lacks {script} flags {sorted(missing)} " \
                        f"(regenerate rows with deploy/flags-table.py {script})"


def test_deploy_readme_paths_exist() -> None:
    section = install_section()
    paths = set(re.findall(r"\b((?:manifests|deploy|handler)/[A-Za-z0-9_./-]*[A-Za-z0-9_-])", section))
    generated = {"manifests/tls/ca.crt", "manifests/tls/ca.key", "manifests/tls/tls.crt", "manifests/tls/tls.key"}
    assert {"deploy/make-certs.sh", "deploy/Dockerfile", "manifests/uninstall"} <= paths
    for path in paths - generated:
        if path.startswith("manifests/tls/{"):
            continue
        assert (REPO / path).exists(), f"README names {path}, which does not exist"
