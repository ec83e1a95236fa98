"""
``kubectl coredump``: the command line. Parses arguments, runs one command, prints, and exits with a
documented code (:mod:`kubectl_coredump.errors`).

Commands: ``list``, ``describe``, ``get``, ``gdb``, ``bt``. Global flags (``--kubeconfig``, ``--context``,
``-n``) are accepted before or after the command, as kubectl users type them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence

from kubectl_coredump.errors import EXIT_CODES_HELP, Exit, PluginError

PROG = "kubectl coredump"


# ---- arguments -------------------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    default = None if top else argparse.SUPPRESS
    group = parser.add_argument_group("kubeconfig")
    group.add_argument("--kubeconfig", default=default, help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
    group.add_argument("--context", default=default, help="kubeconfig context to use")
    group.add_argument("-n", "--namespace", default=default, help="namespace (default: the context's)")


def _core_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pod", metavar="POD", help="pod name (its CoredumpEndpoint)")
    parser.add_argument("--core", metavar="ID", help="core id (see list); default: the newest core")
    parser.add_argument("-c", "--container", help="only cores of this container")


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=formatter,
        description="List, inspect, download and debug the core dumps of Kubernetes pods "
        "(the coredump.example.io API).",
        epilog="examples:\n  kubectl coredump list -A\n  kubectl coredump describe web-0\n"
        "  kubectl coredump get web-0 -o ./cores\n  kubectl coredump gdb web-0\n\n" + EXIT_CODES_HELP,
    )
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "list",
        help="crashed pods and their cores",
        formatter_class=formatter,
        description="A table of the cores of every CoredumpEndpoint (the API's status.cores).",
        epilog=EXIT_CODES_HELP,
    )
    _common(p, top=False)
    p.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace you may list")
    p.add_argument("-l", "--selector", help="label selector on the endpoints, e.g. app=web")
    p.add_argument(
        "--by-signature",
        action="store_true",
        help="group cores by crash signature across pods: count, first/last seen, pods",
    )

    p = sub.add_parser(
        "describe",
        help="an endpoint, its cores' metadata and backtraces",
        formatter_class=formatter,
        description="The endpoint and every core's metadata; with --core also the metadata JSON "
        "of that core (needs coredump:dump).",
        epilog=EXIT_CODES_HELP,
    )
    _common(p, top=False)
    p.add_argument("pod", metavar="POD")
    p.add_argument("--core", metavar="ID", help="only this core, with its full metadata")

    p = sub.add_parser(
        "get",
        help="download cores (resumes, verifies digests, extracts)",
        formatter_class=formatter,
        description="Download a pod's cores: resumes after any cut, verifies each core against the "
        "digest of its metadata (blake3 or sha256) and extracts them as DIR/<container>/<core-id>.core "
        "(+ .json). With -o - the tar.gz goes to stdout unchanged.",
        epilog=EXIT_CODES_HELP,
    )
    _common(p, top=False)
    p.add_argument("pod", metavar="POD")
    p.add_argument("-c", "--container", help="only cores of this container")
    p.add_argument("--core", metavar="ID", help="only this core")
    p.add_argument(
        "--since",
        metavar="TIME",
        help="only cores at or after TIME: RFC 3339 (2026-11-23T10:00:00Z) or a duration ago (30m, 2h, 1d)",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="DIR",
        help="directory to extract into (default ./coredump-NS-POD), or - for the tar.gz on stdout",
    )
    p.add_argument(
        "--objects",
        action="store_true",
        help="also the ELF objects the cores reference, under DIR/sysroot (?objects=true)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no notes")

    p = sub.add_parser(
        "gdb",
        help="run gdb on a core (downloaded once, cached)",
        formatter_class=formatter,
        description="Download the core (cached by core id and digest under "
        "$XDG_CACHE_HOME/kubectl-coredump) with its objects when the server keeps "
        "them, and run gdb on it with the right executable and sysroot. "
        "Arguments after -- go to gdb.",
        epilog=EXIT_CODES_HELP,
    )
    _common(p, top=False)
    _core_options(p)
    p.add_argument("--print", action="store_true", help="print the gdb command instead of running it")
    p.add_argument(
        "--exe",
        metavar="PATH",
        help="the executable to load (default: from the archive's objects, else the recorded path if it exists here)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no notes")

    p = sub.add_parser(
        "completion",
        help="print a shell completion script",
        formatter_class=formatter,
        description="kubectl (1.26+) completes 'kubectl coredump ...' with an executable "
        "kubectl_complete-coredump on PATH; this prints it. Install it beside the plugin:\n"
        '  S="$(dirname "$(command -v kubectl-coredump)")/kubectl_complete-coredump"\n'
        '  kubectl coredump completion > "$S" && chmod +x "$S"\n'
        "'completion bash' prints a bash function for the kubectl-coredump executable "
        "itself (source <(kubectl-coredump completion bash)).",
        epilog=EXIT_CODES_HELP,
    )
    p.add_argument(
        "shell",
        nargs="?",
        choices=("kubectl", "bash"),
        default="kubectl",
        help="kubectl (default): the kubectl_complete-coredump script; bash: a bash function",
    )

    p = sub.add_parser(
        "bt",
        help="print the stored backtrace of a core (no download)",
        formatter_class=formatter,
        description="The backtrace the node recorded at capture, from the API (no core download).",
        epilog=EXIT_CODES_HELP,
    )
    _common(p, top=False)
    _core_options(p)
    return parser


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    from kubectl_coredump import commands
    from kubectl_coredump.kubeconfig import load_credentials, resolve_target
    from kubectl_coredump.transport import Client

    target = resolve_target(kubeconfig=args.kubeconfig, context=args.context, namespace=args.namespace)
    with Client(load_credentials(target)) as client:
        return commands.COMMANDS[args.command](client, args, target.namespace)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["__complete"]:  # cobra's protocol, what kubectl_complete-coredump runs
        from kubectl_coredump import complete

        return complete.main(argv[1:])
    parser = build_parser()
    # Everything after the first "--" is gdb's (argparse would take gdb's own options as ours).
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    args = parser.parse_args(argv)
    if extra and args.command != "gdb":
        parser.error(f"arguments after -- are for gdb only: {shlex.join(extra)}")
    args.gdb_args = extra
    if args.command == "completion":
        from kubectl_coredump import complete

        sys.stdout.write(complete.BASH_SCRIPT if args.shell == "bash" else complete.KUBECTL_SCRIPT)
        return Exit.OK
    try:
        code = run(args)
    except PluginError as exc:
        _err(f"error: {exc.message}")
        code = int(exc.code)
    except KeyboardInterrupt:
        _err("interrupted")
        code = 130
    except BrokenPipeError:
        code = Exit.ERROR
    except Exception as exc:  # one line for the user; the traceback on request
        if os.environ.get("KUBECTL_COREDUMP_DEBUG"):
            raise
        _err(f"error: unexpected {type(exc).__name__}: {exc} (set KUBECTL_COREDUMP_DEBUG=1 for the traceback)")
        code = Exit.ERROR
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
