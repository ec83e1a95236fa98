"""
``coredump-handler``: the core_pattern handler (``capture``, started by the shim), ``import`` and ``drain``.

Global flags override the agent-written config file (``--config``); every path is a flag so tests and manual
runs point the handler at temporary trees. Expected failures print one line and exit non-zero, no traceback.
"""

from __future__ import annotations

import signal
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

    from handler.config import HandlerConfig

# Deliberately light: ``capture`` starts reading the core (handler.early) before the heavy imports below run.
DEFAULT_CONFIG = "/host/var/lib/coredump/handler.json"  # same as handler.config.DEFAULT_CONFIG_FILE
# ``import`` exit codes: stored; refused (not a core, a bad name: nothing written); spooled (the agent files it
# when storage is back); error (nothing filed). 1 is left to Python itself.
IMPORT_STORED, IMPORT_REFUSED, IMPORT_SPOOLED, IMPORT_ERROR = 0, 2, 3, 4


def _epoch(text: str) -> float:
    import argparse
    import math

    try:
        t = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    # Up to the last second of year 9999: what an RFC 3339 timestamp (and a core id) can say.
    if not math.isfinite(t) or not 0 <= t < 253402300800:
        raise argparse.ArgumentTypeError(f"not a time between 1970 and 9999: {text!r}")
    return t


def build_parser() -> "argparse.ArgumentParser":
    import argparse
    from pathlib import Path

    from handler import flags
    from handler.config import CHOICES, DEFAULT_CONFIG_FILE

    p = argparse.ArgumentParser(
        prog="coredump-handler",
        formatter_class=flags.HelpFormatter,
        description="File core dumps of pod processes on shared storage.",
    )
    p.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG_FILE, help="JSON config written by the agent; flags override it"
    )
    p.add_argument("--storage-root", type=Path, help="root of the shared core storage")
    p.add_argument("--spool-dir", type=Path, help="node-local spool for cores storage cannot take now")
    p.add_argument("--state-dir", type=Path, help="outcome records and rate-limit state (read by the agent)")
    p.add_argument("--proc-root", type=Path, help="the host's /proc")
    p.add_argument("--host-root", type=Path, help="the host's / as mounted here (for /var/log/containers)")
    p.add_argument("--container-logs", help="kubelet container log links, relative to --host-root")
    p.add_argument("--crictl", help="crictl binary for names/images; '' disables the CRI lookup")
    p.add_argument("--crictl-timeout", type=flags.parse_positive_duration, help="how long a crictl call may take")
    p.add_argument("--runtime", help="runtime for containerID when the cgroup path does not name it")
    p.add_argument("--node", help="node name recorded in metadata")
    p.add_argument(
        "--max-core-size", type=flags.parse_size, help="store at most this many bytes per core, e.g. 2Gi (0: all)"
    )
    p.add_argument("--rate-first", type=flags.parse_count, help="per container and window: keep the first N cores")
    p.add_argument("--rate-latest", type=flags.parse_count, help="... and the latest M")
    p.add_argument("--rate-window", type=flags.parse_positive_duration, help="the rate-limit window")
    p.add_argument(
        "--rate-latest-interval",
        type=flags.parse_duration,
        help="past the first N, take a new 'latest' core at most this often; others are discarded uncompressed",
    )
    p.add_argument(
        "--capture-default",
        type=flags.parse_bool,
        metavar="true|false",
        help="keep cores of pods whose pod and namespace have no coredump.example.io/capture annotation",
    )
    p.add_argument(
        "--compress-level", type=int, choices=CHOICES["compress_level"], metavar="0-3", help="ISA-L gzip level"
    )
    p.add_argument("--core-digest", choices=CHOICES["core_digest"], help="hash of every core's content")
    p.add_argument("--previous-pattern-file", type=Path, help="file holding the node's previous core_pattern")
    p.add_argument("--foreign", choices=CHOICES["foreign"], help="cores of non-pod processes")
    p.add_argument(
        "--storage-timeout",
        type=flags.parse_positive_duration,
        help="how long a storage probe may take before the core is spooled",
    )
    p.add_argument(
        "--stall-timeout",
        type=flags.parse_positive_duration,
        help="give up after this long without progress (the crashing process may then exit)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("capture", help="file the core on stdin (the shim runs this from core_pattern)")
    c.add_argument("pid", type=int, help="%%P: pid in the initial pid namespace")
    c.add_argument("tid", type=int, help="%%I: tid in the initial pid namespace")
    c.add_argument("signal", type=int, help="%%s")
    c.add_argument("time", type=int, help="%%t: seconds since the epoch")
    c.add_argument("rlimit", type=int, help="%%c: RLIMIT_CORE of the process (-1 = unlimited)")
    # REMAINDER: a comm may start with "-" and must not be read as a flag.
    c.add_argument("comm", nargs=argparse.REMAINDER, help="%%e (may have been split on spaces)")

    i = sub.add_parser("import", help="file an existing core file")
    i.add_argument("--namespace", required=True, help="the pod's namespace")
    i.add_argument("--pod", required=True, help="the pod's name")
    i.add_argument("--pod-uid", required=True, help="the pod's UID")
    i.add_argument("--container", required=True, help="the container's name")
    i.add_argument("--container-id", default="", help="runtime://id, if known")
    i.add_argument("--pid", type=int, help="default: from the core's notes")
    i.add_argument("--signal", type=int, help="default: from the core's notes")
    i.add_argument("--comm", help="default: from the core's notes")
    i.add_argument("--time", type=_epoch, help="crash time, seconds since the epoch (default: file mtime)")
    i.add_argument("file", type=Path)

    sub.add_parser("drain", help="file what waits in the spool")
    share_global_flags(p, sub)
    return p


def share_global_flags(parser: "argparse.ArgumentParser", subparsers: "argparse._SubParsersAction") -> None:
    """
    Accept every global flag after the subcommand too (``import --storage-root DIR ...``), where users put it.

    Each subcommand gets a copy of each global flag whose default is ``SUPPRESS``: argparse lets a subparser's
    values replace the global ones, and a suppressed default sets nothing, so a flag given before the subcommand
    is kept unless it is given again after it (the later one wins, as on one command line). Copies are made
    here, after the global flags, so a flag added to the global list is shared without further wiring.
    argparse has no public accessor for a parser's actions (``parents=`` reads ``_actions`` the same way).
    """
    import argparse
    import copy

    shared = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    for sub in subparsers.choices.values():
        group = sub.add_argument_group("global flags (also accepted before the subcommand)")
        for action in shared:
            clone = copy.copy(action)
            clone.default = argparse.SUPPRESS
            clone.required = False
            group._add_action(clone)


def load_config(args: "argparse.Namespace") -> "HandlerConfig":
    import dataclasses

    from handler.config import HandlerConfig

    # Every global flag is named after the HandlerConfig field it overrides (deploy/flags-table.py relies on it).
    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(HandlerConfig)}
    return HandlerConfig.load(args.config, overrides=overrides)


def _terminate(signum: int, frame: object) -> None:
    # Unwind, so the writers remove their temp files.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    early = None
    if "capture" in argv:
        from handler.early import start_capture

        early = start_capture(argv, default_config=DEFAULT_CONFIG)
    from handler import layout, logs

    args = build_parser().parse_args(argv)
    logs.setup(verbose=args.verbose)
    signal.signal(signal.SIGTERM, _terminate)
    cfg = load_config(args)
    if args.command == "capture":
        from handler.capture import capture
        from handler.foreign import CrashSpecifiers

        spec = CrashSpecifiers(
            pid=args.pid,
            tid=args.tid,
            signal=args.signal,
            time=args.time,
            comm=" ".join(args.comm),
            rlimit=None if args.rlimit < 0 or args.rlimit >= 1 << 62 else args.rlimit,
        )
        return capture(cfg, spec, early=early)
    if args.command == "import":
        from handler.capture import NotACore, import_core
        from handler.resolve import PodIdentity

        try:
            ident = PodIdentity(
                namespace=layout.validate_namespace(args.namespace),
                pod=layout.validate_pod_name(args.pod),
                pod_uid=layout.validate_pod_uid(args.pod_uid),
                container=layout.validate_container(args.container),
                container_id=args.container_id,
            )
            filed = import_core(
                cfg, args.file, ident=ident, pid=args.pid, sig=args.signal, comm=args.comm, timestamp=args.time
            )
        except (layout.InvalidName, NotACore) as e:
            print(f"coredump-handler: refused: {e}", file=sys.stderr)
            return IMPORT_REFUSED
        except OSError as e:
            print(f"coredump-handler: {e}", file=sys.stderr)
            return IMPORT_ERROR
        if filed.stored is not None:
            print(filed.stored.core_path)
            return IMPORT_STORED
        assert filed.spooled is not None
        print(f"spooled (storage unusable: {filed.reason}): {filed.spooled.data_path}")
        return IMPORT_SPOOLED
    if args.command == "drain":
        from handler.drain import drain

        report = drain(cfg)
        print(
            f"drained {report.drained}, waiting {report.waiting}, not from pods {report.host}, errors {report.errors}"
        )
        for r in report.reasons:
            print(f"  {r}")
        return 1 if report.errors else 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
