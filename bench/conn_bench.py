"""
What an idle TLS connection costs the API server, against the floor of the same machine: the real
``coredump-apiserver`` (dev mode, in-memory store) next to a plain aiohttp HTTPS app with the same
certificate and the same optional client-certificate check, each in its own process.

    .venv/bin/python bench/conn_bench.py [--connections 1000] [--rounds 3]

Per round and server (order alternating between rounds, a fresh process each time): the server is
warmed with one request, its RSS (``VmRSS`` of ``/proc/PID/status``) read, N TLS connections opened (the
handshake done with the dev admin certificate, then nothing sent: what an idle or slow client holds),
RSS read again once it is steady. Printed: the median over rounds of the RSS growth per connection and
per 1,000 connections, for both servers, and the ratio. The API server runs with its timeouts raised and
its connection cap off so that the connections stay open while they are counted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from aiohttp import web

logger = logging.getLogger(__name__)

BIN = Path(sys.executable).parent
START_TIMEOUT = 30.0


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def steady_rss(pid: int) -> int:
    """RSS once it stops moving (the server may still be finishing handshakes when the client is done)."""
    last = rss_bytes(pid)
    for _ in range(50):
        await asyncio.sleep(0.2)
        current = rss_bytes(pid)
        if current == last:
            return current
        last = current
    return last


@contextlib.contextmanager
def process(command: list[str]) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Start a server that prints ``serving https://127.0.0.1:PORT`` and yield it with its port."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        port = 0
        while time.monotonic() < deadline and not port:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{command[0]} exited before serving")
            if b"serving https://127.0.0.1:" in line:
                port = int(line.split(b"127.0.0.1:")[1].split()[0].rstrip(b","))
        if not port:
            raise RuntimeError(f"{command[0]} did not start")
        yield proc, port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def apiserver_command(dev_dir: Path) -> list[str]:
    return [
        str(BIN / "coredump-apiserver"),
        "--dev",
        "--dev-dir",
        str(dev_dir),
        "--secure-port",
        "0",
        "--max-connections=0",
        "--read-header-timeout=30m",
        "--idle-timeout=30m",
        "--log-level=warning",
    ]


def baseline_command(dev_dir: Path) -> list[str]:
    return [sys.executable, __file__, "--serve-baseline", str(dev_dir)]


def client_context(dev_dir: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(dev_dir / "ca.crt"))
    context.load_cert_chain(str(dev_dir / "admin.crt"), str(dev_dir / "admin.key"))
    return context


async def warm(port: int, context: ssl.SSLContext) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    writer.write(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    await writer.drain()
    await reader.read()
    writer.close()


async def measure(pid: int, port: int, *, connections: int, context: ssl.SSLContext) -> int:
    """RSS growth of ``pid`` while ``connections`` idle TLS connections are open to it."""
    await warm(port, context)
    before = await steady_rss(pid)
    writers: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(32)

    async def connect() -> None:
        async with gate:
            _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
            writers.append(writer)

    try:
        await asyncio.gather(*(connect() for _ in range(connections)))
        after = await steady_rss(pid)
    finally:
        for writer in writers:
            writer.close()
    return after - before


async def run(*, connections: int, rounds: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # both processes hold `connections` sockets
    if hard < connections + 100:
        raise SystemExit(f"conn_bench: the open-file limit {hard} is below {connections} connections")
    work = Path(tempfile.mkdtemp(prefix="conn-bench-"))
    dev_dir = work / "dev"
    try:
        with process(apiserver_command(dev_dir)):
            pass  # writes the dev certificates both servers use
        context = client_context(dev_dir)
        results: dict[str, list[int]] = {"baseline": [], "coredump-apiserver": []}
        commands = {"baseline": baseline_command(dev_dir), "coredump-apiserver": apiserver_command(dev_dir)}
        for index in range(rounds):
            order = list(commands) if index % 2 else list(reversed(commands))
            for name in order:
                with process(commands[name]) as (proc, port):
                    grown = await measure(proc.pid, port, connections=connections, context=context)
                results[name].append(grown)
                print(
                    f"round {index + 1} {name:>18}: +{grown / 2**20:7.1f} MiB for {connections} connections "
                    f"({grown / connections / 1024:6.1f} kB each)",
                    flush=True,
                )
        print()
        print(f"median of {rounds} rounds, {connections} idle TLS connections (handshake done, nothing sent):")
        medians = {name: statistics.median(values) for name, values in results.items()}
        for name, grown in medians.items():
            print(
                f"  {name:>18}: {grown / connections / 1024:6.1f} kB per connection, "
                f"{grown / connections * 1000 / 2**20:6.1f} MiB per 1,000"
            )
        if medians["baseline"] > 0:
            print(f"  ratio coredump-apiserver / baseline: {medians['coredump-apiserver'] / medians['baseline']:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def serve_baseline(dev_dir: Path) -> None:
    """A plain aiohttp HTTPS app with the API server's TLS settings: the floor of an aiohttp TLS connection."""

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def main() -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(dev_dir / "serving.crt"), str(dev_dir / "serving.key"))
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(cafile=str(dev_dir / "ca.crt"))
        app = web.Application()
        app.router.add_get("/readyz", ok)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        port = runner.addresses[0][1]
        print(f"serving https://127.0.0.1:{port}", flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve-baseline", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_baseline:
        serve_baseline(args.serve_baseline)
        return
    asyncio.run(run(connections=args.connections, rounds=args.rounds))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
