#!/usr/bin/env python3
"""
The README's flag tables, generated from the programs' real argparse parsers: one row per flag
(flag | default | meaning), the meaning being the flag's help text as ``--help`` shows it.

    .venv/bin/python deploy/flags-table.py coredump-apiserver     # print the table
    .venv/bin/python deploy/flags-table.py --write README.md       # rewrite every marked table in place

A table in the README is marked by ``<!-- flags: SCRIPT -->`` on the line above it and ends at the first line
that is not a table row; ``test/deploy/test_deploy_readme.py`` checks that every marked table is exactly what
this prints, so the README's defaults and meanings cannot drift from the code.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import re
import sys
from pathlib import Path

HEADER = ["| flag | default | meaning |", "|---|---|---|"]
MARK = re.compile(r"^<!-- flags: ([a-z-]+) -->$")


def parser_of(script: str) -> argparse.ArgumentParser:
    scripts = {
        ep.name: ep.value
        for ep in importlib.metadata.distribution("coredump-example-io").entry_points
        if ep.group == "console_scripts"
    }
    module = importlib.import_module(scripts[script].split(":")[0])
    parser: argparse.ArgumentParser = module.build_parser()
    return parser


def flags(
    parser: argparse.ArgumentParser, *, command: str = ""
) -> list[tuple[str, argparse.ArgumentParser, argparse.Action]]:
    """(subcommand, parser, action) of every optional flag, subcommands' after the global ones (help excluded)."""
    out = []
    subcommands = []
    for action in parser._actions:  # argparse has no public accessor for its actions
        if isinstance(action, argparse._SubParsersAction):
            subcommands.extend(action.choices.items())
        elif action.option_strings and not isinstance(action, argparse._HelpAction):
            out.append((command, parser, action))
    # A subcommand's copies of the global flags (accepted after it too) are rows of the global table already.
    shared = {option for _, _, action in out for option in action.option_strings}
    for name, sub in subcommands:
        out.extend(row for row in flags(sub, command=name) if not set(row[2].option_strings) & shared)
    return out


def builtin_defaults(script: str) -> dict[str, object]:
    """The handler's flags default to None so handler.json can fill them; its real defaults are HandlerConfig's."""
    if script != "coredump-handler":
        return {}
    from handler.config import HandlerConfig

    return {f.name: getattr(HandlerConfig(), f.name) for f in dataclasses.fields(HandlerConfig)}


def spelled(value: object, action: argparse.Action) -> str:
    """A default as a user writes it on the command line (``1m``, ``64Mi``, ``true``)."""
    from handler import flags as f

    durations = (f.parse_duration, f.parse_positive_duration, f.parse_retention_duration)
    if isinstance(value, bool):
        return "true" if value else "false"
    if action.type in durations and isinstance(value, (int, float)):
        return f.format_duration(value) if float(value).is_integer() else f"{value * 1000:g}ms"
    if action.type is f.parse_size and isinstance(value, int):
        return f.format_size(value)
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    # A default naming this interpreter (the agent's --handler-command) is machine-specific.
    return str(value).replace(sys.executable, "<python>")


def default_text(action: argparse.Action, fallback: dict[str, object]) -> str:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "off"  # a switch: not given unless given
    value = action.default if action.default is not None else fallback.get(action.dest)
    if value is None or value is argparse.SUPPRESS or value in ([], (), ""):
        return "—"
    return f"`{spelled(value, action)}`"


def rows(script: str) -> list[str]:
    lines = []
    fallback = builtin_defaults(script)
    for command, parser, action in flags(parser_of(script)):
        names = ", ".join(f"`{o}`" for o in action.option_strings)
        # argparse's own expansion of %(default)s and friends, without the "(default: ...)" --help adds (the
        # default has its own column).
        meaning = argparse.HelpFormatter(parser.prog)._expand_help(action) if action.help else ""
        meaning = meaning.replace("|", "\\|").replace("\n", " ")
        if action.choices and not isinstance(action.choices, dict):
            meaning = (meaning + f" (one of {', '.join(map(str, action.choices))})").strip()
        if command:
            meaning = f"`{command}` only. {meaning}".strip()
        lines.append(f"| {names} | {default_text(action, fallback)} | {meaning} |")
    return lines


def rewrite(text: str) -> str:
    """``text`` with every marked table replaced by the generated one."""
    lines, out, i = text.splitlines(keepends=False), [], 0
    while i < len(lines):
        out.append(lines[i])
        mark = MARK.match(lines[i])
        i += 1
        if mark:
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
            out.extend(HEADER + rows(mark.group(1)))
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("script", nargs="?", help="console script name, e.g. coredump-apiserver")
    parser.add_argument("--write", type=Path, metavar="README", help="rewrite the marked tables of this file")
    args = parser.parse_args(argv)
    try:
        if args.write:
            args.write.write_text(rewrite(args.write.read_text()))
        elif args.script:
            print("\n".join(HEADER + rows(args.script)))
        else:
            parser.error("give a script name or --write README")
    except (KeyError, ImportError, AttributeError) as exc:
        print(f"flags-table: no parser for {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
