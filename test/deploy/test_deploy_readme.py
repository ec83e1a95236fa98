"""
The README's install section (the cluster admin's guide) stays true to the code: it lists every flag the three
programs' real parsers define, and every repository path it tells the admin to edit or run exists.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import importlib.util
import importlib.metadata
import logging
import re
from typing import Any

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
    entry = {
        ep.name: ep.value
        for ep in importlib.metadata.distribution("coredump-example-io").entry_points
        if ep.group == "console_scripts"
    }[script]
    parser = importlib.import_module(entry.split(":")[0]).build_parser()
    section = install_section()
    # The first column of the flag tables: "| `--flag` |" or "| `-v`, `--verbose` |".
    listed = {
        flag
        for line in section.splitlines()
        if line.startswith("| `-")
        for flag in re.findall(r"`(--[a-z0-9-]+)`", line.split(" | ")[0])
    }
    missing = all_flags(parser) - listed
    assert not missing, (
        f"README install section lacks {script} flags {sorted(missing)} "
        f"(regenerate rows with deploy/flags-table.py {script})"
    )


def test_deploy_readme_paths_exist() -> None:
    section = install_section()
    paths = set(re.findall(r"\b((?:manifests|deploy|handler)/[A-Za-z0-9_./-]*[A-Za-z0-9_-])", section))
    generated = {"manifests/tls/ca.crt", "manifests/tls/ca.key", "manifests/tls/tls.crt", "manifests/tls/tls.key"}
    assert {"deploy/make-certs.sh", "deploy/Dockerfile", "manifests/uninstall"} <= paths
    for path in paths - generated:
        if path.startswith(("manifests/tls/{", "manifests/tls/run-deploy-make-certs.sh-first/")):
            continue  # what deploy/make-certs.sh writes there
        assert (REPO / path).exists(), f"README names {path}, which does not exist"


def flags_table() -> Any:
    spec = importlib.util.spec_from_file_location("flags_table", REPO / "deploy" / "flags-table.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", ["coredump-apiserver", "coredump-agent", "coredump-handler"])
def test_deploy_readme_flag_rows_are_the_parsers(script: str) -> None:
    """
    Every row of the README's flag table of ``script`` (name, default, meaning) is what the parser says, in the
    parser's order, and nothing else is in the table (issue 15: the handler's defaults were wrong).
    """
    table = flags_table()
    lines = install_section().splitlines()
    marks = [i for i, line in enumerate(lines) if line == f"<!-- flags: {script} -->"]
    assert len(marks) == 1, f"README install section needs one <!-- flags: {script} --> table"
    readme_rows = list(itertools.takewhile(lambda line: line.startswith("|"), lines[marks[0] + 1 :]))
    expected = table.HEADER + table.rows(script)
    for got, want in zip(readme_rows, expected, strict=False):  # the lengths are compared below
        assert got == want, (
            f"README {script} flag row differs from the parser (run "
            f"'.venv/bin/python deploy/flags-table.py --write README.md'):\n{got}\n{want}"
        )
    assert len(readme_rows) == len(expected), (
        f"README {script} flag table has {len(readme_rows)} rows, the "
        f"parser {len(expected)} (deploy/flags-table.py --write README.md)"
    )


def test_deploy_flag_table_spells_defaults_as_flags() -> None:
    """Defaults are shown as a user writes them, so a row can be pasted as a flag value."""
    rows = {row.split(" | ")[0].removeprefix("| "): row.split(" | ")[1] for row in flags_table().rows("coredump-agent")}
    assert rows["`--rate-window`"] == "`1h`" and rows["`--outbox-max-bytes`"] == "`64Mi`"
    assert rows["`--capture-default`"] == "`true`" and rows["`--no-events`"] == "off"
    assert rows["`--handler-command`"] == "`<python> -m handler.cli`"
