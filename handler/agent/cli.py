"""
``coredump-agent``: run the node agent (default), or ``uninstall`` to give the node its core_pattern back.

Every host path is a flag (``--sysctl-root``, ``--proc-root``, ``--host-root``, ``--host-dir``,
``--storage-root``), so the agent runs against temporary trees in tests and never touches the real /proc/sys
there. Handler settings given here are written to the handler's config file on the host.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from handler.agent.config import AgentConfig
from handler.cli import parse_size
from handler.config import HandlerConfig

logger = logging.getLogger(__name__)


def _duration(text: str) -> float:
    """Seconds from ``90``, ``30s``, ``15m``, ``12h``, ``7d``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    t = text.strip().lower()
    try:
        if t and t[-1] in units:
            return float(t[:-1]) * units[t[-1]]
        return float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = AgentConfig()
    h = HandlerConfig()
    p = argparse.ArgumentParser(prog="coredump-agent", description="Node agent of coredump.example.io.")
    p.add_argument("command", nargs="?", choices=["run", "uninstall"], default="run",
                   help="run the agent (default) or restore the node's core_pattern and remove the shim")
    g = p.add_argument_group("host paths")
    g.add_argument("--sysctl-root", type=Path, default=d.sysctl_root, help="default %(default)s")
    g.add_argument("--proc-root", type=Path, default=d.proc_root, help="default %(default)s")
    g.add_argument("--host-root", type=Path, default=d.host_root, help="the host's / mounted here (%(default)s)")
    g.add_argument("--host-dir", default=d.host_dir,
                   help="host directory for the shim, spool and state, as the host sees it (%(default)s)")
    g.add_argument("--storage-root", type=Path, default=d.storage_root, help="shared core storage (%(default)s)")
    g = p.add_argument_group("kernel")
    g.add_argument("--core-pipe-limit", type=int, default=d.core_pipe_limit, help="default %(default)s")
    g.add_argument("--suid-dumpable", type=int, choices=[0, 1, 2], default=d.suid_dumpable, help="default %(default)s")
    g.add_argument("--handler-command", default=d.handler_command,
                   help="the handler inside this container, run by the shim through nsenter (%(default)s)")
    g.add_argument("--nsenter", default=d.nsenter, help="nsenter on the host (%(default)s)")
    g.add_argument("--shim-spool-max-bytes", type=parse_size, default=d.shim_spool_max_bytes,
                   help="raw bytes the shim spools per core while the agent is away (0 = all)")
    g = p.add_argument_group("handler")
    g.add_argument("--max-core-size", type=parse_size, default=h.max_core_size, help="bytes stored per core, 0 = all")
    g.add_argument("--rate-first", type=int, default=h.rate_first, help="keep the first N cores per container and window")
    g.add_argument("--rate-latest", type=int, default=h.rate_latest, help="... and the latest M")
    g.add_argument("--rate-window", type=_duration, default=h.rate_window, help="window (%(default)ss)")
    g.add_argument("--rate-latest-interval", type=_duration, default=h.rate_latest_interval,
                   help="past the first N, take a new 'latest' core at most this often (%(default)ss); "
                        "the others are discarded uncompressed and counted")
    g.add_argument("--capture-default", choices=["true", "false"], default="true" if h.capture_default else "false",
                   help="keep cores of pods when neither the pod nor its namespace has the annotation "
                        "coredump.example.io/capture (%(default)s)")
    g.add_argument("--compress-level", type=int, choices=range(0, 4), default=h.compress_level,
                   help="ISA-L gzip level 0-3 (%(default)s; 3 stores ~5%% less, at a quarter of the speed)")
    g.add_argument("--crictl", default=h.crictl, help="crictl for names and images ('' disables)")
    g.add_argument("--runtime", default=h.runtime, help="containerID scheme when the cgroup does not tell (%(default)s)")
    g.add_argument("--container-logs", default=h.container_logs, help="kubelet log links under --host-root")
    g.add_argument("--foreign", choices=["previous", "drop"], default=h.foreign,
                   help="cores of processes outside pods: the node's previous core_pattern, or drop (counted)")
    g = p.add_argument_group("retention")
    g.add_argument("--max-age", type=_duration, default=d.max_age, help="remove cores older than this (0 = never)")
    g.add_argument("--max-namespace-bytes", type=parse_size, default=d.max_namespace_bytes,
                   help="stored bytes per namespace (0 = unlimited)")
    g.add_argument("--retention-interval", type=_duration, default=d.retention_interval)
    g = p.add_argument_group("loop")
    g.add_argument("--drain-interval", type=_duration, default=d.drain_interval)
    g.add_argument("--watch-interval", type=_duration, default=d.watch_interval, help="core_pattern check period")
    g = p.add_argument_group("kubernetes")
    g.add_argument("--node-name", default=os.environ.get("NODE_NAME"), help="this node (env NODE_NAME)")
    g.add_argument("--kubeconfig", help="default: in-cluster config")
    g.add_argument("--no-events", dest="events", action="store_false", help="do not post CoreDumped Events")
    g.add_argument("--no-pod-records", dest="pod_records", action="store_false",
                   help="do not watch this node's pods and the namespaces (cores then carry no labels, owner, "
                        "image digest or capture annotations)")
    g = p.add_argument_group("cloudevents")
    g.add_argument("--event-sinks-file", type=Path, default=None,
                   help="YAML file of CloudEvents sinks (a mounted ConfigMap, re-read when it changes); "
                        "unset: no CloudEvents")
    g.add_argument("--outbox-max-events", type=int, default=d.outbox_max_events,
                   help="events queued per sink before the oldest are dropped (%(default)s)")
    g.add_argument("--outbox-max-bytes", type=parse_size, default=d.outbox_max_bytes,
                   help="bytes queued per sink before the oldest are dropped (64Mi)")
    g = p.add_argument_group("metrics")
    g.add_argument("--metrics-bind-address", default=d.metrics_bind_address)
    g.add_argument("--metrics-port", type=int, default=d.metrics_port, help="0 picks a free port")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    handler = HandlerConfig(max_core_size=args.max_core_size, rate_first=args.rate_first,
                            rate_latest=args.rate_latest, rate_window=args.rate_window,
                            rate_latest_interval=args.rate_latest_interval,
                            capture_default=args.capture_default == "true", compress_level=args.compress_level,
                            crictl=args.crictl or None, runtime=args.runtime, container_logs=args.container_logs, foreign=args.foreign)
    return AgentConfig(
        sysctl_root=args.sysctl_root, proc_root=args.proc_root, host_root=args.host_root, host_dir=args.host_dir,
        storage_root=args.storage_root, node=args.node_name, handler_command=args.handler_command,
        nsenter=args.nsenter, core_pipe_limit=args.core_pipe_limit, suid_dumpable=args.suid_dumpable,
        shim_spool_max_bytes=args.shim_spool_max_bytes, drain_interval=args.drain_interval,
        watch_interval=args.watch_interval, retention_interval=args.retention_interval, max_age=args.max_age,
        max_namespace_bytes=args.max_namespace_bytes, metrics_bind_address=args.metrics_bind_address,
        metrics_port=args.metrics_port, events=args.events, pod_records=args.pod_records, kubeconfig=args.kubeconfig,
        event_sinks_file=args.event_sinks_file, outbox_max_events=args.outbox_max_events,
        outbox_max_bytes=args.outbox_max_bytes, handler=handler)


def main(argv: list[str] | None = None) -> int:
    from handler import logs
    args = build_parser().parse_args(argv)
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
