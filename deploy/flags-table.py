#!/usr/bin/env python3
"""
Print the flags of a console script as the rows of a Markdown table (flag | default | meaning), from its real
argparse parser, for the README's install section:

    .venv/bin/python deploy/flags-table.py coredump-apiserver
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import logging
import sys

logger = logging.getLogger(__name__)


def parser_of(script: str) -> argparse.ArgumentParser:
    scripts = {ep.name: ep.value for ep in importlib.metadata.distribution("coredump-example-io").entry_points
               if ep.group == "console_scripts"}
    module = importlib.import_module(scripts[script].split(":")[0])
    return module.build_parser()


def flags(parser: argparse.ArgumentParser, *, command: str = "") -> list[tuple[str, argparse.ArgumentParser,
                                                                              argparse.Action]]:
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


def default_text(action: argparse.Action, fallback: dict[str, object]) -> str:
    value = action.default if action.default is not None else fallback.get(action.dest)
    if value is None or value is argparse.SUPPRESS or value in ([], (), ""):
        return "—"
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    return f"`{value}`"


def rows(script: str) -> list[str]:
    lines = []
    fallback = builtin_defaults(script)
    for command, parser, action in flags(parser_of(script)):
        names = ", ".join(f"`{o}`" for o in action.option_strings)
        # argparse's own expansion of %(default)s and friends, as --help shows it.
        meaning = parser._get_formatter()._expand_help(action) if action.help else ""
        meaning = meaning.replace("|", "\\|").replace("\n", " ")
        if action.choices and not isinstance(action.choices, dict):
            meaning = (meaning + f" (one of {', '.join(map(str, action.choices))})").strip()
        if command:
            meaning = f"`{command}` only. {meaning}".strip()
        lines.append(f"| {names} | {default_text(action, fallback)} | {meaning} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("script", help="console script name, e.g. coredump-apiserver")
    args = parser.parse_args(argv)
    try:
        print("\n".join(rows(args.script)))
    except (KeyError, ImportError, AttributeError) as exc:
        print(f"flags-table: no parser for {args.script}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
