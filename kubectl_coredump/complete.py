"""
Shell completion: commands, flags, contexts, pod names and core ids, in cobra's ``__complete`` protocol.

kubectl (1.26+) completes ``kubectl coredump <TAB>`` by running ``kubectl_complete-coredump ARGS... WORD`` from
``PATH``; ``kubectl coredump completion`` prints that two-line script (``completion bash`` prints a bash
function for the ``kubectl-coredump`` executable itself). Both end up in ``kubectl-coredump __complete ARGS...
WORD``, which prints one candidate a line (``value<TAB>description``) and then ``:DIRECTIVE`` (cobra's bits:
4 = no file completion, 16 = directories only, 0 = the shell's default, files).

Pod names and core ids come from the API with the user's kubeconfig, the namespace and context typed so
far; any failure (no cluster, forbidden, slow) completes nothing rather than printing an error into the
user's command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubectl_coredump.kubeconfig import Target

NO_FILES = 4
DIRECTORIES = 16
FILES = 0
REQUEST_TIMEOUT = 5.0
# Flags whose value is the next word, per what their value is.
VALUE_FLAGS = {
    "--kubeconfig": "file",
    "--context": "context",
    "-n": "namespace",
    "--namespace": "namespace",
    "--core": "core",
    "-c": "container",
    "--container": "container",
    "-o": "dir",
    "--output": "dir",
    "-l": "none",
    "--selector": "none",
    "--since": "none",
    "--exe": "file",
}
POD_COMMANDS = ("describe", "get", "gdb", "bt")

KUBECTL_SCRIPT = """#!/bin/sh
# kubectl's completion of "kubectl coredump ..." (kubectl 1.26+ runs kubectl_complete-coredump from PATH)
exec kubectl-coredump __complete "$@"
"""

BASH_SCRIPT = r"""# bash completion for kubectl-coredump: source <(kubectl-coredump completion bash)
_kubectl_coredump() {
    local cur="${COMP_WORDS[COMP_CWORD]}" out directive
    out=$(kubectl-coredump __complete "${COMP_WORDS[@]:1:COMP_CWORD-1}" "$cur" 2>/dev/null) || return
    directive=${out##*:}
    out=${out%:*}
    COMPREPLY=()
    if (( directive & 16 )); then
        mapfile -t COMPREPLY < <(compgen -d -- "$cur")
    elif [[ -n "$out" ]]; then
        mapfile -t COMPREPLY < <(compgen -W "$(printf '%s\n' "$out" | cut -f1)" -- "$cur")
    elif (( (directive & 4) == 0 )); then
        mapfile -t COMPREPLY < <(compgen -f -- "$cur")
    fi
}
complete -F _kubectl_coredump kubectl-coredump
"""


def _parsed(words: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """The flag values (last wins; ``--flag=value`` too) and the positional words typed before the current one."""
    flags: dict[str, str] = {}
    positional: list[str] = []
    index = 0
    while index < len(words):
        word = words[index]
        if word.startswith("-") and "=" in word:
            name, _, value = word.partition("=")
            flags[name] = value
        elif word in VALUE_FLAGS:
            if index + 1 < len(words):
                flags[word] = words[index + 1]
            index += 1
        elif not word.startswith("-"):
            positional.append(word)
        index += 1
    return flags, positional


def _flag(flags: dict[str, str], *names: str) -> str | None:
    return next((flags[n] for n in names if n in flags), None)


def _options(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    return [
        (option, action.help or "")
        for action in parser._actions  # argparse has no public list
        for option in action.option_strings
        if option.startswith("--") or len(option) == 2
    ]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help_of(parser: argparse.ArgumentParser) -> dict[str, str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {choice.dest: choice.help or "" for choice in action._choices_actions}
    return {}


def candidates(words: Sequence[str]) -> tuple[list[tuple[str, str]], int]:
    """What may come in place of the last word of ``words`` (the word being completed), and the directive."""
    from kubectl_coredump.cli import build_parser

    words = list(words) or [""]
    current, before = words[-1], words[:-1]
    flags, positional = _parsed(before)
    parser = build_parser()
    commands = _subparsers(parser)
    command = next((w for w in positional if w in commands), None)
    if before and before[-1] in VALUE_FLAGS:
        kind = VALUE_FLAGS[before[-1]]
        if kind == "file":
            return [], FILES
        if kind == "dir":
            return [("-", "the tar.gz on stdout")], DIRECTORIES
        if kind == "context":
            return [(c, "") for c in _contexts(flags)], NO_FILES
        if kind == "namespace":
            return [(n, "") for n in _namespaces(flags)], NO_FILES
        if kind in ("core", "container") and command in POD_COMMANDS:
            pods = positional[positional.index(command) + 1 :]
            if pods:
                return _of_pod(flags, pod=pods[0], kind=kind), NO_FILES
        return [], NO_FILES
    if command is None:
        if current.startswith("-"):
            return _options(parser), NO_FILES
        helps = _help_of(parser)
        return [(name, helps.get(name, "")) for name in commands], NO_FILES
    if current.startswith("-"):
        return _options(commands[command]), NO_FILES
    after = positional[positional.index(command) + 1 :]
    if command == "completion" and not after:
        return [("kubectl", "the kubectl_complete-coredump script"), ("bash", "a bash completion function")], NO_FILES
    if command in POD_COMMANDS and not after:
        return [(pod, "") for pod in _pods(flags)], NO_FILES
    return [], NO_FILES


def _target(flags: dict[str, str]) -> "Target":
    from kubectl_coredump.kubeconfig import resolve_target

    return resolve_target(
        kubeconfig=_flag(flags, "--kubeconfig"),
        context=_flag(flags, "--context"),
        namespace=_flag(flags, "-n", "--namespace"),
    )


def _contexts(flags: dict[str, str]) -> list[str]:
    from kubectl_coredump.kubeconfig import kubeconfig_paths, read_contexts

    return read_contexts(kubeconfig_paths(flag=_flag(flags, "--kubeconfig"), environ=os.environ))


def _endpoints(flags: dict[str, str], *, all_namespaces: bool) -> list[dict[str, Any]]:
    from kubectl_coredump import api
    from kubectl_coredump.kubeconfig import load_credentials
    from kubectl_coredump.transport import Client

    target = _target(flags)
    with Client(load_credentials(target), timeout=REQUEST_TIMEOUT) as client:
        return api.list_endpoints(client, namespace=None if all_namespaces else target.namespace, selector=None)


def _pods(flags: dict[str, str]) -> list[str]:
    from kubectl_coredump.model import Endpoint

    return sorted({e.name for e in map(Endpoint.from_object, _endpoints(flags, all_namespaces=False)) if e.cores})


def _namespaces(flags: dict[str, str]) -> list[str]:
    from kubectl_coredump.model import Endpoint

    return sorted({e.namespace for e in map(Endpoint.from_object, _endpoints(flags, all_namespaces=True)) if e.cores})


def _of_pod(flags: dict[str, str], *, pod: str, kind: str) -> list[tuple[str, str]]:
    from kubectl_coredump.model import Endpoint

    endpoint = next(
        (e for e in map(Endpoint.from_object, _endpoints(flags, all_namespaces=False)) if e.name == pod), None
    )
    if endpoint is None:
        return []
    container = _flag(flags, "-c", "--container")
    cores = sorted(endpoint.cores, key=lambda c: (c.time, c.id), reverse=True)  # newest first
    if kind == "container":
        return [(name, "") for name in sorted({c.container for c in cores})]
    return [
        (c.id, f"{c.container} {c.signal_text} {c.time}")
        for c in cores
        if container is None or c.container == container
    ]


def main(words: Sequence[str]) -> int:
    """``kubectl-coredump __complete WORDS...``: print the candidates and the directive; never fail loudly."""
    try:
        found, directive = candidates(words)
    except Exception:  # a completion that cannot ask the cluster offers nothing, silently
        found, directive = [], NO_FILES
    prefix = (list(words) or [""])[-1]
    for value, description in found:
        if value.startswith(prefix):
            text = value + (f"\t{' '.join(description.split())}" if description else "")
            sys.stdout.write(text + "\n")
    sys.stdout.write(f":{directive}\n")
    sys.stdout.flush()
    return 0
