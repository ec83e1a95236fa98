"""
The README's install section (the cluster admin's guide) stays true to the code: it lists every flag the three
programs' real parsers define, and every repository path it tells the admin to edit or run exists.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
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
        if path.startswith(("manifests/tls/{", "manifests/tls/run-deploy-make-certs.sh-first/")):
            continue  # what deploy/make-certs.sh writes there
        assert (REPO / path).exists(), f"README names {path}, which does not exist"


# Rows whose default the README states better than the parser can: the interpreter path of the machine that runs
# the parser, a float duration written as an integer, and a store_false flag whose "default" is the feature on.
README_DEFAULT_BY_HAND = {("coredump-agent", "`--handler-command`"), ("coredump-agent", "`--max-age`"),
                          ("coredump-agent", "`--no-events`")}


@pytest.mark.parametrize("script", ["coredump-apiserver", "coredump-agent", "coredump-handler"])
def test_deploy_readme_flag_defaults_are_the_parsers(script: str) -> None:
    """The default column of every flag row is what the program really uses (issue 15: the handler's were wrong)."""
    spec = importlib.util.spec_from_file_location("flags_table", REPO / "deploy" / "flags-table.py")
    assert spec and spec.loader
    flags_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flags_table)
    listed: dict[str, list[str]] = {}
    for line in install_section().splitlines():
        if line.startswith("| `-"):
            flag, default = line.split(" | ")[:2]
            listed.setdefault(flag, []).append(default)
    for row in flags_table.rows(script):
        flag, default = row.split(" | ")[:2]
        if (script, flag.removeprefix("| ")) in README_DEFAULT_BY_HAND:
            continue
        assert default in listed.get(flag, []), f"README: {script} {flag} default is not {default}"
