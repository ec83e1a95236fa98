"""
``coredump-agent``: run the node agent (default), or ``uninstall`` to give the node its core_pattern back.

Every host path is a flag (``--sysctl-root``, ``--proc-root``, ``--host-root``, ``--host-dir``,
``--storage-root``), so the agent runs against temporary trees in tests and never touches the real /proc/sys
there. Handler settings given here are written to the handler's config file on the host.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from handler import flags
from handler.agent.config import AgentConfig
from handler.config import CHOICES, HandlerConfig


def build_parser() -> argparse.ArgumentParser:
    """The agent's options; defaults are written as a user writes them (``10s``, ``64Mi``), see handler.flags."""
    d = AgentConfig()
    h = HandlerConfig()
    p = argparse.ArgumentParser(
        prog="coredump-agent", description="Node agent of coredump.example.io.", formatter_class=flags.HelpFormatter
    )
    p.add_argument(
        "command",
        nargs="?",
        choices=["run", "uninstall"],
        default="run",
        help="run the agent (default) or restore the node's core_pattern and remove the shim",
    )
    g = p.add_argument_group("host paths")
    g.add_argument(
        "--sysctl-root",
        type=Path,
        default=d.sysctl_root,
        help="the host's /proc/sys as mounted here (core_pattern, core_pipe_limit, suid_dumpable)",
    )
    g.add_argument(
        "--proc-root",
        type=Path,
        default=d.proc_root,
        help="the host's /proc as mounted here (the agent runs in the host's pid namespace)",
    )
    g.add_argument("--host-root", type=Path, default=d.host_root, help="the host's / as mounted here")
    g.add_argument(
        "--host-dir", default=d.host_dir, help="host directory for the shim, spool and state, as the host sees it"
    )
    g.add_argument("--storage-root", type=Path, default=d.storage_root, help="shared core storage")
    g = p.add_argument_group("kernel")
    g.add_argument(
        "--core-pipe-limit",
        type=flags.parse_count,
        default=str(d.core_pipe_limit),
        help="kernel.core_pipe_limit: crashes handled at once (0: no limit)",
    )
    g.add_argument(
        "--suid-dumpable",
        type=int,
        choices=[0, 1, 2],
        default=d.suid_dumpable,
        help="fs.suid_dumpable (2: set-uid programs dump too, into the pipe)",
    )
    g.add_argument(
        "--handler-command",
        default=d.handler_command,
        help="the handler inside this container, run by the shim through nsenter (<python>: the agent's "
        "interpreter, /usr/local/bin/python in the image)",
    )
    g.add_argument("--nsenter", default=d.nsenter, help="nsenter on the host")
    g.add_argument(
        "--shim-spool-max-bytes",
        type=flags.parse_size,
        default=str(d.shim_spool_max_bytes),
        help="raw bytes the shim spools per core while the agent is away (0: all)",
    )
    g = p.add_argument_group("handler")
    g.add_argument(
        "--max-core-size",
        type=flags.parse_size,
        default=str(h.max_core_size),
        help="bytes stored per core, e.g. 2Gi (0: all)",
    )
    g.add_argument(
        "--rate-first",
        type=flags.parse_count,
        default=str(h.rate_first),
        help="keep the first N cores per container and window",
    )
    g.add_argument("--rate-latest", type=flags.parse_count, default=str(h.rate_latest), help="... and the latest M")
    g.add_argument(
        "--rate-window",
        type=flags.parse_positive_duration,
        default=flags.format_duration(h.rate_window),
        help="the rate-limit window",
    )
    g.add_argument(
        "--rate-latest-interval",
        type=flags.parse_duration,
        default=flags.format_duration(h.rate_latest_interval),
        help="past the first N, take a new 'latest' core at most this often; "
        "the others are discarded uncompressed and counted",
    )
    flags.add_bool(
        g,
        "--capture-default",
        default=h.capture_default,
        help="keep cores of pods when neither the pod nor its namespace has the annotation coredump.example.io/capture",
    )
    g.add_argument(
        "--compress-level",
        type=int,
        choices=CHOICES["compress_level"],
        default=h.compress_level,
        help="ISA-L gzip level 0-3 (1 is as fast as 2 and stores ~2.5%% more; 3 stores ~3%% less, several times "
        "slower)",
    )
    g.add_argument(
        "--core-digest",
        choices=CHOICES["core_digest"],
        default=h.core_digest,
        help="the hash recorded for every core's content: blake3 (4.7x cheaper on the crash path) or sha256 "
        "(where only FIPS-approved hashes may be used)",
    )
    g.add_argument("--crictl", default=h.crictl, help="crictl for names and images ('' disables)")
    g.add_argument("--runtime", default=h.runtime, help="containerID scheme when the cgroup does not tell")
    g.add_argument("--container-logs", default=h.container_logs, help="kubelet log links under --host-root")
    g.add_argument(
        "--foreign",
        choices=CHOICES["foreign"],
        default=h.foreign,
        help="cores of processes outside pods: the node's previous core_pattern, or drop (counted)",
    )
    g = p.add_argument_group("retention")
    g.add_argument(
        "--max-age",
        type=flags.parse_retention_duration,
        default=flags.format_duration(d.max_age),
        help="remove cores older than this, e.g. 14d (0: never)",
    )
    g.add_argument(
        "--max-namespace-bytes",
        type=flags.parse_size,
        default=str(d.max_namespace_bytes),
        help="stored bytes per namespace, e.g. 20Gi (0: unlimited)",
    )
    g.add_argument(
        "--retention-interval",
        type=flags.parse_positive_duration,
        default=flags.format_duration(d.retention_interval),
        help="time between retention passes over the storage",
    )
    g = p.add_argument_group("loop")
    g.add_argument(
        "--drain-interval",
        type=flags.parse_positive_duration,
        default=flags.format_duration(d.drain_interval),
        help="time between passes over the host spool",
    )
    g.add_argument(
        "--watch-interval",
        type=flags.parse_positive_duration,
        default=flags.format_duration(d.watch_interval),
        help="core_pattern check period",
    )
    g = p.add_argument_group("kubernetes")
    g.add_argument(
        "--node-name", dest="node", default=os.environ.get("NODE_NAME"), help="this node (default: env NODE_NAME)"
    )
    g.add_argument("--kubeconfig", help="kubeconfig for the API (default: in-cluster configuration)")
    g.add_argument(
        "--no-events",
        dest="events",
        action="store_false",
        help="do not post CoreDumped Events (they are posted by default)",
    )
    g.add_argument(
        "--no-pod-records",
        dest="pod_records",
        action="store_false",
        help="do not watch this node's pods and the namespaces (cores then carry no labels, owner, "
        "image digest or capture annotations)",
    )
    g = p.add_argument_group("cloudevents")
    g.add_argument(
        "--event-sinks-file",
        type=Path,
        default=None,
        help="YAML file of CloudEvents sinks (a mounted ConfigMap, re-read when it changes); "
        "unset: no CloudEvents (see Notifications)",
    )
    g.add_argument(
        "--outbox-max-events",
        type=flags.parse_count,
        default=str(d.outbox_max_events),
        help="events queued per sink before the oldest are dropped",
    )
    g.add_argument(
        "--outbox-max-bytes",
        type=flags.parse_size,
        default=flags.format_size(d.outbox_max_bytes),
        help="bytes queued per sink before the oldest are dropped",
    )
    g = p.add_argument_group("metrics")
    g.add_argument(
        "--metrics-bind-address",
        default=d.metrics_bind_address,
        help="address of the Prometheus `/metrics` and `/healthz` endpoint",
    )
    g.add_argument(
        "--metrics-port",
        type=flags.parse_port,
        default=str(d.metrics_port),
        help="port of `/metrics` and `/healthz` (0 picks a free port)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


# The flags that set the handler's settings (the agent writes them to handler.json); each is named after its field.
HANDLER_FLAGS = (
    "max_core_size",
    "rate_first",
    "rate_latest",
    "rate_window",
    "rate_latest_interval",
    "capture_default",
    "compress_level",
    "core_digest",
    "crictl",
    "runtime",
    "container_logs",
    "foreign",
)
AGENT_ONLY = ("command", "verbose")


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Combinations the flag types cannot check end the program with argparse's one line (exit 2)."""
    if not args.host_dir.startswith("/"):
        parser.error(f"--host-dir {args.host_dir!r} must be absolute (it is a path on the host)")


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    """The complete, frozen configuration: every flag is named after the AgentConfig/HandlerConfig field it sets."""
    values = vars(args)
    handler = HandlerConfig(**{name: values[name] for name in HANDLER_FLAGS})
    return AgentConfig(**{k: v for k, v in values.items() if k not in HANDLER_FLAGS + AGENT_ONLY}, handler=handler)


def main(argv: list[str] | None = None) -> int:
    from handler import logs

    parser = build_parser()
    args = parser.parse_args(argv)
    validate(args, parser)
    logs.setup(verbose=args.verbose)
    cfg = config_from_args(args)
    try:
        if args.command == "uninstall":
            from handler.agent.runner import uninstall

            for note in uninstall(cfg):
                print(f"coredump-agent: {note}", file=sys.stderr)
            print("coredump-agent: node core_pattern restored, shim removed")
            return 0
        from handler.agent.runner import Agent

        asyncio.run(Agent(cfg).run())
        return 0
    except (OSError, ValueError) as e:
        print(f"coredump-agent: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
