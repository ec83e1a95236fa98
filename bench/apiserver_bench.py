"""
How fast the API server answers, against the floor of the same machine: the real ``coredump-apiserver``
(in-memory store and etcd), measured over real TLS with the dev admin client certificate and keep-alive
connections, next to a trivial aiohttp HTTPS server with the same certificates that answers fixed bytes.

    .venv/bin/python bench/apiserver_bench.py [--backends memory,etcd] [--objects 10000] [--duration 10]
    .venv/bin/python bench/apiserver_bench.py --notify [--objects 10000] [--repetitions 10]   (bench/notify_bench.py)

Measured per backend:
  * GET of one object at a fixed rate (open loop: every request has a scheduled time and its latency is
    counted from that time, so a stall shows up in the tail instead of slowing the sender down);
  * creating N objects concurrently through the API (each stores its status), then LIST of all N: a
    consistent LIST (quorum read from the store), LIST resourceVersion=0 (served by the watch cache), and
    paged (limit=500); the three and the transfer floor interleaved, median of ``--rounds``;
  * the delay for one event to reach 100 watchers (all established first; from just before the POST to
    each watcher reading its ADDED line), over several repetitions, API and floor interleaved for ``--rounds``.
The baseline runs in its own process like the API server, so both share the machine the same way. It
answers GET with a small fixed JSON body, serves back the exact bytes of the API's full LIST (the
transfer floor), and fans one line out to 100 streaming clients (the fan-out floor).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import json
import logging
import os
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web


logger = logging.getLogger(__name__)

BIN = Path(sys.executable).parent
# The test suite's etcd launcher (test-only code, not in the installed package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test"))
_launcher = importlib.import_module("etcd_launcher")
EtcdServer, find_etcd = _launcher.EtcdServer, _launcher.find_etcd
GV = "/apis/coredump.example.io/v1alpha1"
NAMESPACE = "bench"
COLLECTION = f"{GV}/namespaces/{NAMESPACE}/coredumpendpoints"
TARGETS = {"get_p99_ms": 10.0, "list_s": 0.3, "watch_ms": 50.0}
START_TIMEOUT = 30.0


# --------------------------------------------------------------------------------------------------
# Processes: etcd, the API server, the baseline server. Each is stopped by the context that started it.


@contextlib.contextmanager
def running(command: list[str], *, log: Path, **popen: Any) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as log_file:
        process = subprocess.Popen(command, stderr=log_file, stdin=subprocess.DEVNULL, **popen)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def etcd(directory: Path) -> Iterator[str]:
    binary = find_etcd()
    assert binary is not None, "main() checks for etcd first"
    with EtcdServer(binary=binary, base_dir=directory / "etcd") as server:
        yield server.endpoint


def _port_from(process: subprocess.Popen[bytes], marker: bytes, *, what: str) -> int:
    assert process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        if marker in line:
            return int(line.split(marker)[1].split()[0].rstrip(b","))
    raise RuntimeError(f"{what} did not start")


@contextlib.contextmanager
def apiserver(directory: Path, *, etcd_endpoint: str | None) -> Iterator[int]:
    command = [
        str(BIN / "coredump-apiserver"),
        "--dev",
        "--dev-dir",
        str(directory / "dev"),
        "--secure-port",
        "0",
        "--log-level",
        "warning",
    ]
    if etcd_endpoint:
        command += ["--etcd-servers", etcd_endpoint]
    with running(command, log=directory / "apiserver.log", stdout=subprocess.PIPE) as process:
        port = _port_from(process, b"serving https://127.0.0.1:", what="coredump-apiserver")
        yield port


@contextlib.contextmanager
def baseline_server(directory: Path) -> Iterator[int]:
    dev = directory / "dev"
    command = [sys.executable, __file__, "--serve-baseline", str(dev)]
    with running(command, log=directory / "baseline.log", stdout=subprocess.PIPE) as process:
        yield _port_from(process, b"baseline serving on port ", what="baseline server")


# --------------------------------------------------------------------------------------------------
# The baseline: the least an aiohttp HTTPS server with the same TLS setup can do.


def serve_baseline(dev: Path) -> None:
    """Run the baseline server until terminated (``--serve-baseline DEV_DIR``, in its own process)."""
    small = json.dumps({"kind": "Fixed", "apiVersion": "v1", "metadata": {"name": "x"}, "spec": {}}).encode()
    state: dict[str, Any] = {"blob": b"{}", "watchers": set()}

    async def get_small(_: web.Request) -> web.Response:
        return web.Response(body=small, content_type="application/json")

    async def put_blob(request: web.Request) -> web.Response:
        state["blob"] = await request.read()
        return web.Response(status=204)

    async def get_blob(_: web.Request) -> web.Response:
        return web.Response(body=state["blob"], content_type="application/json")

    async def watch(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        state["watchers"].add(queue)
        try:
            while True:
                await response.write(await queue.get())
        except (ConnectionError, asyncio.CancelledError):
            return response
        finally:
            state["watchers"].discard(queue)

    async def event(request: web.Request) -> web.Response:
        line = await request.read() + b"\n"
        for queue in state["watchers"]:
            queue.put_nowait(line)
        return web.Response(status=201, body=small, content_type="application/json")

    async def main() -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(dev / "serving.crt"), str(dev / "serving.key"))
        context.verify_mode = ssl.CERT_OPTIONAL  # as the API server asks for client certificates
        context.load_verify_locations(str(dev / "ca.crt"))
        app = web.Application(client_max_size=256 * 1024 * 1024)  # /blob takes a whole LIST
        app.router.add_get("/small", get_small)
        app.router.add_put("/blob", put_blob)
        app.router.add_get("/blob", get_blob)
        app.router.add_get("/watch", watch)
        app.router.add_post("/event", event)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        port = runner.addresses[0][1]
        print(f"baseline serving on port {port}", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())


# --------------------------------------------------------------------------------------------------
# Measurements.


def client_ssl(dev: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(dev / "ca.crt"))
    context.load_cert_chain(str(dev / "admin.crt"), str(dev / "admin.key"))
    return context


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def manifest(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "coredump.example.io/v1alpha1",
        "kind": "CoredumpEndpoint",
        "metadata": {"name": name, "labels": {"bench": "yes"}},
        "spec": {"podUID": str(uuid.uuid4())},
    }


@dataclasses.dataclass
class OpenLoop:
    p50_ms: float
    p99_ms: float
    max_ms: float
    sent: int
    errors: int


async def open_loop_get(session: aiohttp.ClientSession, url: str, *, rate: float, duration: float) -> OpenLoop:
    """GET ``url`` at ``rate``/s for ``duration`` s; each latency counts from the request's scheduled time."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    errors = 0

    async def one(scheduled: float) -> None:
        nonlocal errors
        await asyncio.sleep(max(0.0, scheduled - loop.time()))
        try:
            async with session.get(url) as response:
                await response.read()
                if response.status != 200:
                    errors += 1
        except aiohttp.ClientError:
            errors += 1
        latencies.append(loop.time() - scheduled)

    for _ in range(50):  # warm up: connections open, caches filled
        async with session.get(url) as response:
            await response.read()
    start = loop.time() + 0.1
    count = int(rate * duration)
    await asyncio.gather(*(one(start + i / rate) for i in range(count)))
    ms = [v * 1000 for v in latencies]
    return OpenLoop(p50_ms=percentile(ms, 50), p99_ms=percentile(ms, 99), max_ms=max(ms), sent=count, errors=errors)


async def create_objects(session: aiohttp.ClientSession, base: str, *, count: int, concurrency: int) -> float:
    """Create ``count`` objects through the API with ``concurrency`` requests in flight; seconds taken."""
    names = iter(range(count))
    failures: list[str] = []

    async def worker() -> None:
        for i in names:
            async with session.post(base + COLLECTION, json=manifest(f"obj-{i:06d}")) as response:
                if response.status != 201:
                    failures.append(f"{response.status} {(await response.text())[:200]}")
                await response.read()

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    if failures:
        raise RuntimeError(f"{len(failures)} creates failed, e.g. {failures[0]}")
    return elapsed


async def timed_get(session: aiohttp.ClientSession, url: str) -> tuple[float, bytes]:
    began = time.perf_counter()
    async with session.get(url) as response:
        body = await response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {url}: {response.status} {body[:300]!r}")
    return time.perf_counter() - began, body


async def list_paged(session: aiohttp.ClientSession, base: str, *, limit: int) -> tuple[float, int]:
    began = time.perf_counter()
    token, items = "", 0
    while True:
        query = f"?limit={limit}" + (f"&continue={token}" if token else "")
        async with session.get(base + COLLECTION + query) as response:
            page = json.loads(await response.read())
        items += len(page["items"])
        token = page["metadata"].get("continue", "")
        if not token:
            return time.perf_counter() - began, items


@dataclasses.dataclass
class FanOut:
    p50_all_ms: float  # median over repetitions of the time until the last watcher had the event
    max_all_ms: float
    p50_each_ms: float  # median over every (repetition, watcher) delay
    all_ms: list[float]  # per repetition: the delay until the last watcher had the event
    each_ms: list[float]


async def watch_fan_out(
    ssl_context: ssl.SSLContext,
    *,
    watch_url: str,
    post: Callable[[str], Awaitable[None]],
    watchers: int,
    repetitions: int,
) -> FanOut:
    """Open ``watchers`` streams, make sure each sees events, then time ``repetitions`` events to all of them."""
    connector = aiohttp.TCPConnector(ssl=ssl_context, limit=watchers + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        streams = [await session.get(watch_url) for _ in range(watchers)]
        try:
            for stream in streams:
                if stream.status != 200:
                    raise RuntimeError(f"watch: {stream.status} {(await stream.read())[:300]!r}")

            async def until(stream: aiohttp.ClientResponse, marker: bytes, began: float) -> float:
                while True:
                    line = await stream.content.readline()
                    if not line:
                        raise RuntimeError("a watch ended early")
                    if marker in line:
                        return time.perf_counter() - began

            async def one_event(name: str) -> list[float]:
                waiting = [asyncio.ensure_future(until(s, f'"{name}"'.encode(), 0.0)) for s in streams]
                await asyncio.sleep(0)  # every watcher is reading before the clock starts
                began = time.perf_counter()
                await post(name)
                arrived = await asyncio.wait_for(asyncio.gather(*waiting), timeout=60)
                return [a - began for a in arrived]

            await one_event(f"warm-{uuid.uuid4().hex[:8]}")  # all established: each has seen an event
            all_ms, each_ms = [], []
            for _ in range(repetitions):
                delays = [d * 1000 for d in await one_event(f"ev-{uuid.uuid4().hex[:8]}")]
                all_ms.append(max(delays))
                each_ms += delays
                await asyncio.sleep(0.05)
            return FanOut(
                p50_all_ms=statistics.median(all_ms),
                max_all_ms=max(all_ms),
                p50_each_ms=statistics.median(each_ms),
                all_ms=all_ms,
                each_ms=each_ms,
            )
        finally:
            for stream in streams:
                stream.close()


# --------------------------------------------------------------------------------------------------
# One backend, start to finish.


@dataclasses.dataclass
class Row:
    backend: str
    metric: str
    value: str
    target: str = ""
    baseline: str = ""
    ratio: str = ""


def ratio(value: float, floor: float) -> str:
    return f"{value / floor:.1f}x" if floor > 0 else "-"


async def measure(backend: str, *, port: int, baseline_port: int, dev: Path, args: argparse.Namespace) -> list[Row]:
    context = client_ssl(dev)
    base, floor = f"https://127.0.0.1:{port}", f"https://127.0.0.1:{baseline_port}"
    rows: list[Row] = []
    connector = aiohttp.TCPConnector(ssl=context, limit=64)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(base + COLLECTION, json=manifest("probe")) as response:
            assert response.status == 201, await response.text()

        print(f"[{backend}] GET at {args.rate:.0f}/s for {args.duration:.0f} s ...", file=sys.stderr)
        api = await open_loop_get(session, f"{base}{COLLECTION}/probe", rate=args.rate, duration=args.duration)
        low = await open_loop_get(session, f"{floor}/small", rate=args.rate, duration=args.duration)
        target = f"p99 <= {TARGETS['get_p99_ms']:.0f} ms"
        rows += [
            Row(
                backend,
                f"GET p50 @{args.rate:.0f}/s",
                f"{api.p50_ms:.1f} ms",
                "",
                f"{low.p50_ms:.1f} ms",
                ratio(api.p50_ms, low.p50_ms),
            ),
            Row(
                backend,
                f"GET p99 @{args.rate:.0f}/s",
                f"{api.p99_ms:.1f} ms",
                target,
                f"{low.p99_ms:.1f} ms",
                ratio(api.p99_ms, low.p99_ms),
            ),
            Row(
                backend,
                "GET max",
                f"{api.max_ms:.1f} ms (errors {api.errors}/{api.sent})",
                "",
                f"{low.max_ms:.1f} ms",
                "",
            ),
        ]

        print(f"[{backend}] creating {args.objects} objects ...", file=sys.stderr)
        seconds = await create_objects(session, base, count=args.objects, concurrency=args.concurrency)
        rows.append(
            Row(
                backend,
                f"create {args.objects} (x{args.concurrency} in flight)",
                f"{seconds:.1f} s = {args.objects / seconds:.0f}/s",
            )
        )

        print(f"[{backend}] LIST ...", file=sys.stderr)
        _, body = await timed_get(session, base + COLLECTION)  # warm: connections, the watch cache
        listed = json.loads(body)["items"]
        count = len(listed)
        stored = sum(1 for item in listed if isinstance(item.get("status"), dict) and "coreCount" in item["status"])
        async with session.put(floor + "/blob", data=body) as response:
            assert response.status == 204, response.status
        _, echoed = await timed_get(session, floor + "/blob")
        assert len(echoed) == len(body), (len(echoed), len(body))
        quorum, cached, paged, floors = [], [], [], []
        for _ in range(args.rounds):  # interleaved, so that the machine's load falls on all alike
            quorum.append(await _seconds(session, base + COLLECTION))
            cached.append(await _seconds(session, base + COLLECTION + "?resourceVersion=0"))
            seconds, items = await list_paged(session, base, limit=500)
            paged.append(seconds)
            floors.append(await _seconds(session, floor + "/blob"))
        floor_median = statistics.median(floors)
        target = f"<= {TARGETS['list_s']} s"
        what = f"{count}, {stored} with stored status, no limit, {len(body) / 1e6:.1f} MB"
        for label, values in (
            (f"LIST {what}: consistent (store)", quorum),
            (f"LIST {what}: resourceVersion=0 (watch cache)", cached),
            (f"LIST {items} (limit=500, {-(-items // 500)} pages, store)", paged),
        ):
            rows.append(
                Row(
                    backend,
                    label,
                    f"{statistics.median(values):.2f} s (best {min(values):.2f})",
                    target,
                    f"{floor_median * 1000:.0f} ms",
                    ratio(statistics.median(values), floor_median),
                )
            )
        async with session.get(base + COLLECTION + "?limit=1") as response:
            revision = json.loads(await response.read())["metadata"]["resourceVersion"]

    print(f"[{backend}] event to {args.watchers} watchers ...", file=sys.stderr)

    async def post_api(name: str) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as poster:
            async with poster.post(base + COLLECTION, json=manifest(name)) as response:
                assert response.status == 201, await response.text()

    async def post_floor(name: str) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as poster:
            async with poster.post(floor + "/event", data=json.dumps({"name": name})) as response:
                await response.read()

    # From the list's revision on: without a resourceVersion each watcher would first get every object as ADDED.
    api_rounds, floor_rounds = [], []
    for _ in range(args.rounds):
        api_rounds.append(
            await watch_fan_out(
                context,
                watch_url=f"{base}{COLLECTION}?watch=true&timeoutSeconds=600&resourceVersion={revision}",
                post=post_api,
                watchers=args.watchers,
                repetitions=args.repetitions,
            )
        )
        floor_rounds.append(
            await watch_fan_out(
                context,
                watch_url=f"{floor}/watch",
                post=post_floor,
                watchers=args.watchers,
                repetitions=args.repetitions,
            )
        )
    api_fan, floor_fan = merged(api_rounds), merged(floor_rounds)
    target = f"<= {TARGETS['watch_ms']:.0f} ms"
    rows += [
        Row(
            backend,
            f"event to all {args.watchers} watchers, p50",
            f"{api_fan.p50_all_ms:.1f} ms",
            target,
            f"{floor_fan.p50_all_ms:.1f} ms",
            ratio(api_fan.p50_all_ms, floor_fan.p50_all_ms),
        ),
        Row(
            backend,
            f"event to all {args.watchers} watchers, max of {args.repetitions}",
            f"{api_fan.max_all_ms:.1f} ms",
            target,
            f"{floor_fan.max_all_ms:.1f} ms",
            ratio(api_fan.max_all_ms, floor_fan.max_all_ms),
        ),
        Row(
            backend,
            "event to one watcher, p50",
            f"{api_fan.p50_each_ms:.1f} ms",
            "",
            f"{floor_fan.p50_each_ms:.1f} ms",
            ratio(api_fan.p50_each_ms, floor_fan.p50_each_ms),
        ),
    ]
    return rows


def merged(rounds: list[FanOut]) -> FanOut:
    all_ms = [value for one in rounds for value in one.all_ms]
    each_ms = [value for one in rounds for value in one.each_ms]
    return FanOut(
        p50_all_ms=statistics.median(all_ms),
        max_all_ms=max(all_ms),
        p50_each_ms=statistics.median(each_ms),
        all_ms=all_ms,
        each_ms=each_ms,
    )


async def _seconds(session: aiohttp.ClientSession, url: str) -> float:
    seconds, _ = await timed_get(session, url)
    return seconds


def run_backend(backend: str, args: argparse.Namespace) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix=f"apiserver-bench-{backend}-") as temp:
        directory = Path(temp)
        with contextlib.ExitStack() as stack:
            endpoint = stack.enter_context(etcd(directory)) if backend == "etcd" else None
            port = stack.enter_context(apiserver(directory, etcd_endpoint=endpoint))
            baseline_port = stack.enter_context(baseline_server(directory))
            try:
                return asyncio.run(
                    measure(backend, port=port, baseline_port=baseline_port, dev=directory / "dev", args=args)
                )
            except Exception:
                log = (directory / "apiserver.log").read_text(errors="replace")[-3000:]
                print(f"[{backend}] failed; API server log tail:\n{log}", file=sys.stderr)
                raise


def print_table(rows: list[Row]) -> None:
    headers = ("backend", "metric", "value", "target", "baseline", "ratio")
    cells = [headers] + [tuple(dataclasses.astuple(row)) for row in rows]
    widths = [max(len(str(line[i])) for line in cells) for i in range(len(headers))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in cells[1:]:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="memory,etcd", help="comma-separated: memory, etcd (default both)")
    parser.add_argument("--objects", type=int, default=10_000, help="objects to create and LIST (default 10000)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of GET at the fixed rate (default 10)")
    parser.add_argument("--rate", type=float, default=200.0, help="GET requests per second (default 200)")
    parser.add_argument("--concurrency", type=int, default=32, help="creates in flight (default 32)")
    parser.add_argument("--watchers", type=int, default=100, help="concurrent watchers (default 100)")
    parser.add_argument(
        "--repetitions", type=int, default=10, help="events timed to the watchers per round (default 10)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of LIST and fan-out (default 5)")
    parser.add_argument("--serve-baseline", type=Path, metavar="DEV_DIR", help=argparse.SUPPRESS)
    parser.add_argument(
        "--notify",
        action="store_true",
        help="instead: commit → watcher latency and idle storage calls (bench/notify_bench.py)",
    )
    args = parser.parse_args(argv)
    if args.serve_baseline:
        serve_baseline(args.serve_baseline)
        return 0
    if args.notify:
        import notify_bench

        notify_bench.print_rows(
            notify_bench.rows(rounds=args.repetitions * 3, endpoints=args.objects, idle_seconds=60.0)
        )
        return 0
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - {"memory", "etcd"}
    if unknown:
        parser.error(f"unknown backend(s): {', '.join(sorted(unknown))}")
    if "etcd" in backends and find_etcd() is None:
        parser.error("the etcd backend needs etcd (/usr/bin/etcd or on PATH): install it, or pass --backends memory")
    rows: list[Row] = []
    for backend in backends:
        rows += run_backend(backend, args)
    print(
        f"\n{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, aiohttp {aiohttp.__version__}; "
        f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}; "
        f"`{' '.join(['bench/apiserver_bench.py', *(argv if argv is not None else sys.argv[1:])])}`\n"
    )
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
