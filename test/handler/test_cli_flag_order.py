"""
Flags of ``coredump-handler`` and ``coredump-agent`` are accepted before or after the subcommand, for every
subcommand: users write ``coredump-handler import --storage-root DIR ...`` (issue 16).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from handler.agent.cli import build_parser as agent_parser
from handler.cli import build_parser as handler_parser

from handler_harness import NodeTree, RealCore, REPO

IMPORT_ARGS = [
    "--namespace",
    "default",
    "--pod",
    "my-pod",
    "--pod-uid",
    "5f1c3b2a-8d4e-4f6a-9b7c-0d1e2f3a4b5c",
    "--container",
    "app",
    "core",
]
# subcommand → its own arguments (positionals last, as users write them)
HANDLER_SUBCOMMANDS = {
    "capture": ["1234", "1234", "11", "1795000000", "-1", "crasher"],
    "import": IMPORT_ARGS,
    "drain": [],
}
GLOBALS = ["--storage-root", "/s", "--spool-dir", "/sp", "--state-dir", "/st", "--rate-first", "3", "-v"]


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    return {
        name for action in parser._actions if isinstance(action, argparse._SubParsersAction) for name in action.choices
    }


def test_every_handler_subcommand_is_covered() -> None:
    assert _subcommands(handler_parser()) == set(HANDLER_SUBCOMMANDS)


@pytest.mark.parametrize("command", sorted(HANDLER_SUBCOMMANDS))
def test_handler_global_flags_before_or_after_the_subcommand(command: str) -> None:
    parser = handler_parser()
    own = HANDLER_SUBCOMMANDS[command]
    before = vars(parser.parse_args([*GLOBALS, command, *own]))
    after = vars(parser.parse_args([command, *GLOBALS, *own]))
    assert before == after
    assert (after["storage_root"], after["spool_dir"], after["rate_first"], after["verbose"]) == (
        Path("/s"),
        Path("/sp"),
        3,
        True,
    )
    # Not given after the subcommand: the value given before it stays (a subcommand default never replaces it).
    mixed = vars(parser.parse_args(["--storage-root", "/s", command, "--spool-dir", "/sp", *own]))
    assert (mixed["storage_root"], mixed["spool_dir"]) == (Path("/s"), Path("/sp"))
    # Given on neither side: the global default, as before.
    plain = vars(parser.parse_args([command, *own]))
    assert plain["storage_root"] is None and plain["verbose"] is False


def test_handler_capture_keeps_a_comm_that_looks_like_a_flag() -> None:
    args = handler_parser().parse_args(["capture", "--proc-root", "/p", "1", "1", "11", "0", "-1", "--storage-root"])
    assert args.comm == ["--storage-root"] and args.proc_root == Path("/p") and args.storage_root is None


def test_handler_import_with_flags_after_the_subcommand_files_a_real_core(
    node: NodeTree, segv_core: RealCore, tmp_path: Path
) -> None:
    core = tmp_path / "core"
    core.write_bytes(segv_core.path.read_bytes())
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "handler.cli",
            "import",
            "--config",
            str(tmp_path / "none.json"),
            "--storage-root",
            str(node.storage),
            "--spool-dir",
            str(node.spool),
            "--state-dir",
            str(node.state),
            *IMPORT_ARGS[:-1],
            str(core),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    stored = Path(proc.stdout.strip())
    assert stored.is_relative_to(node.storage) and stored.name.endswith(".core.gz")
    assert stored.relative_to(node.storage).parts[:4] == (
        "default",
        "my-pod",
        "5f1c3b2a-8d4e-4f6a-9b7c-0d1e2f3a4b5c",
        "app",
    )


@pytest.mark.parametrize("command", ["run", "uninstall"])
def test_agent_flags_before_or_after_the_subcommand(command: str) -> None:
    parser = agent_parser()
    flags = ["--host-dir", "/h", "--max-age", "1d", "-v"]
    before = vars(parser.parse_args([*flags, command]))
    after = vars(parser.parse_args([command, *flags]))
    assert before == after
    assert (after["command"], after["host_dir"], after["max_age"], after["verbose"]) == (command, "/h", 86400.0, True)


def test_agent_subcommands_are_covered() -> None:
    [positional] = [a for a in agent_parser()._actions if a.dest == "command"]
    assert set(positional.choices) == {"run", "uninstall"}
