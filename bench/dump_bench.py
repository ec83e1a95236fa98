"""
Benchmark of the dump subresource: a 1 GiB core over TLS on loopback, against two baselines run in the same go.

- ours: the real ``coredump-apiserver`` (dev mode: TLS, client-certificate auth, audit) serving ``.../dump``;
- (a) nginx from Debian's package serving the identical archive bytes as a static file over TLS with the same
  certificate: the practical ceiling;
- (b) a naive server that builds the tar.gz on the fly with ``tarfile`` + gzip (level 6) from the stored core.

The client is curl (HTTP/1.1, TLS 1.3, output discarded) for all three. Prints MB/s of the stream and of the
uncompressed payload, the ratios (targets: >= 0.8x nginx, >= 10x naive), then the server's RSS growth during
four concurrent 1 GiB dumps (target <= 32 MiB).

    .venv/bin/python bench/dump_bench.py [--size-mib 1024] [--runs 3] [--naive-seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gzip
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

from isal import igzip, isal_zlib

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NS, POD, CONTAINER = "bench", "crashy-0", "app"
UID = "0b6e2b56-4b1c-4e4a-9d57-2f7f3bb2a001"
MiB = 1 << 20
DUMP_PATH = f"/apis/coredump.example.io/v1alpha1/namespaces/{NS}/coredumpendpoints/{POD}/dump"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_core(root: Path, *, size_mib: int) -> dict:
    """A core-like 1 GiB (zero pages, repetitive heap, incompressible data) filed as the handler files it."""
    from handler import layout

    rng = random.Random(1)
    pattern = rng.randbytes(4096)
    digest = hashlib.sha256()
    when = datetime.datetime(2026, 11, 23, 10, 0, tzinfo=datetime.timezone.utc)
    core_id = layout.make_core_id(timestamp=when, comm="crashy", pid=4242, signal=11)
    comp = isal_zlib.compressobj(1, isal_zlib.DEFLATED, 31)
    with layout.CoreWriter(root, namespace=NS, pod=POD, pod_uid=UID, container=CONTAINER, core_id=core_id) as w:
        for i in range(size_mib):
            kind = i % 10
            if kind < 4:
                block = bytes(MiB)
            elif kind < 7:
                block = bytearray(pattern * 256)
                for j in range(0, MiB, 4096):
                    block[j : j + 8] = (i * 256 + j).to_bytes(8, "little")
                block = bytes(block)
            else:
                block = os.urandom(MiB)
            digest.update(block)
            w.write(comp.compress(block))
        w.write(comp.flush())
        size = size_mib * MiB
        stored = w.commit(
            {
                "pid": 4242,
                "signal": 11,
                "signalName": "SIGSEGV",
                "comm": "crashy",
                "exe": "/crashy",
                "timestamp": layout.rfc3339(when),
                "size": size,
                "observedSize": size,
                "sha256": digest.hexdigest(),
                "truncated": False,
                "truncationReason": None,
                "compression": "gzip",
            }
        )
    return stored.metadata


def curl(
    url: str, *, out: str = "/dev/null", cert: tuple[Path, Path] | None, ca: Path, max_time: float | None = None
) -> tuple[int, float]:
    cmd = ["curl", "-sS", "--http1.1", "--cacert", str(ca), "-o", out, "-w", "%{size_download} %{time_total}"]
    if cert:
        cmd += ["--cert", str(cert[0]), "--key", str(cert[1])]
    if max_time:
        cmd += ["--max-time", str(max_time)]
    result = subprocess.run([*cmd, url], capture_output=True, text=True)
    if result.returncode not in (0, 28):  # 28: --max-time reached (the naive baseline)
        raise RuntimeError(f"curl {url} failed: {result.stderr}")
    size, seconds = result.stdout.split()
    return int(size), float(seconds)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


# --- the naive baseline: tarfile + gzip on the fly, served by aiohttp over the same TLS -------------------


def naive_server(*, port: int, cert: Path, key: Path, core: Path, meta: Path) -> None:
    import tarfile

    from aiohttp import web

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_type = "application/gzip"
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=8)

        class Sink:
            def write(self, data: bytes) -> int:
                asyncio.run_coroutine_threadsafe(queue.put(bytes(data)), loop).result()
                return len(data)

        def produce() -> None:
            try:
                # gzip's usual level 6 (tarfile's own "w|gz" would use 9, slower still).
                with (
                    gzip.GzipFile(fileobj=Sink(), mode="wb", compresslevel=6) as gz,
                    tarfile.open(fileobj=gz, mode="w|") as tf,
                ):
                    tf.add(str(meta), arcname=f"{CONTAINER}/{meta.name}")
                    info = tarfile.TarInfo(f"{CONTAINER}/{core.name[:-3]}")
                    info.size = json.loads(meta.read_text())["size"]
                    with igzip.open(core, "rb") as body:
                        tf.addfile(info, body)
            except (ConnectionError, RuntimeError):
                pass  # the client went away (curl --max-time)
            finally:
                asyncio.run_coroutine_threadsafe(queue.put(None), loop)

        threading.Thread(target=produce, daemon=True).start()
        try:
            while (chunk := await queue.get()) is not None:
                await response.write(chunk)
        except ConnectionError:
            pass  # curl --max-time hung up, as intended
        return response

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    app = web.Application()
    app.router.add_get("/naive.tar.gz", handler)
    web.run_app(app, host="127.0.0.1", port=port, ssl_context=ctx, print=None, access_log=None)


NGINX_CONF = """
daemon off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/nginx-error.log;
events {{ worker_connections 64; }}
http {{
  access_log off; sendfile on;
  client_body_temp_path {d}/t; proxy_temp_path {d}/t; fastcgi_temp_path {d}/t; uwsgi_temp_path {d}/t;
  scgi_temp_path {d}/t;
  types {{ application/gzip gz; }}
  server {{ listen 127.0.0.1:{port} ssl; ssl_certificate {cert}; ssl_certificate_key {key}; root {root}; }}
}}
"""


def wait_port(port: int, *, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--naive-seconds", type=float, default=20.0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--naive-server", nargs=5, metavar=("PORT", "CERT", "KEY", "CORE", "META"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.naive_server:
        port, cert, key, core, meta = args.naive_server
        naive_server(port=int(port), cert=Path(cert), key=Path(key), core=Path(core), meta=Path(meta))
        return 0
    for tool in ("curl", "nginx"):
        if not shutil.which(tool) and not Path("/usr/sbin/nginx").exists():
            print(f"{tool} is needed", file=sys.stderr)
            return 1

    work = Path(tempfile.mkdtemp(prefix="dump-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        root = work / "cores"
        print(f"filing a {args.size_mib} MiB core under {root} ...", flush=True)
        meta = make_core(root, size_mib=args.size_mib)
        print(f"  stored {meta['storedSize'] / MiB:.0f} MiB gzip for {meta['size'] / MiB:.0f} MiB", flush=True)

        port = free_port()
        dev = work / "dev"
        ours = subprocess.Popen(
            [
                str(BIN / "coredump-apiserver"),
                "--dev",
                "--dev-dir",
                str(dev),
                "--storage-root",
                str(root),
                "--secure-port",
                str(port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(work / "apiserver.log", "wb"),
        )
        procs.append(ours)
        wait_port(port)
        ca, cert, key = dev / "ca.crt", dev / "serving.crt", dev / "serving.key"
        admin = (dev / "admin.crt", dev / "admin.key")
        url = f"https://127.0.0.1:{port}{DUMP_PATH}"
        for _ in range(100):  # auto-create makes the endpoint at start-up
            probe = subprocess.run(
                [
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--cacert",
                    str(ca),
                    "--cert",
                    str(admin[0]),
                    "--key",
                    str(admin[1]),
                    "-r",
                    "0-0",
                    url,
                ],
                capture_output=True,
                text=True,
            )
            if probe.stdout == "206":
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"the dump never became available: {(work / 'apiserver.log').read_text()[-2000:]}")

        static = work / "static"
        static.mkdir()
        archive = static / "cores.tar.gz"
        curl(url, out=str(archive), cert=admin, ca=ca)
        # nginx's workers run unprivileged: let them reach the archive (and only it).
        for path, mode in ((work, 0o711), (static, 0o755), (archive, 0o644)):
            path.chmod(mode)
        with igzip.open(archive, "rb") as f:
            payload = 0
            while block := f.read(16 * MiB):
                payload += len(block)
        print(f"  archive {archive.stat().st_size / MiB:.0f} MiB, payload (tar) {payload / MiB:.0f} MiB", flush=True)

        nginx_port = free_port()
        (work / "t").mkdir()
        (work / "nginx.conf").write_text(NGINX_CONF.format(d=work, port=nginx_port, cert=cert, key=key, root=static))
        procs.append(
            subprocess.Popen(
                ["nginx", "-c", str(work / "nginx.conf"), "-e", str(work / "nginx-error.log")],
                stderr=subprocess.DEVNULL,
            )
        )
        naive_port = free_port()
        stored = next(root.rglob("*.core.gz"))
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--naive-server",
                    str(naive_port),
                    str(cert),
                    str(key),
                    str(stored),
                    str(stored.with_name(stored.name[:-8] + ".json")),
                ]
            )
        )
        wait_port(nginx_port)
        wait_port(naive_port)
        nginx_url = f"https://127.0.0.1:{nginx_port}/cores.tar.gz"

        size = archive.stat().st_size
        results: dict[str, list[float]] = {"ours": [], "nginx": []}
        for _ in range(args.runs):
            for name, u, c in (("nginx", nginx_url, None), ("ours", url, admin)):
                got, seconds = curl(u, cert=c, ca=ca)
                assert got == size, (name, got, size)
                results[name].append(seconds)
        naive_out = work / "naive.tar.gz"
        naive_bytes, naive_seconds = curl(
            f"https://127.0.0.1:{naive_port}/naive.tar.gz",
            out=str(naive_out),
            cert=None,
            ca=ca,
            max_time=args.naive_seconds,
        )
        d = zlib.decompressobj(31)
        naive_payload = 0
        with naive_out.open("rb") as f:
            while block := f.read(4 * MiB):
                naive_payload += len(d.decompress(block))

        def rates(seconds: float, stream: int, tar: int) -> tuple[float, float]:
            return stream / seconds / 1e6, tar / seconds / 1e6

        table = {name: rates(statistics.median(s), size, payload) for name, s in results.items()}
        table["naive"] = rates(naive_seconds, naive_bytes, naive_payload)
        print()
        print(f"{'server':<8} {'stream MB/s':>12} {'payload MB/s':>13}")
        for name in ("ours", "nginx", "naive"):
            print(f"{name:<8} {table[name][0]:>12.0f} {table[name][1]:>13.0f}")
        print(f"ours / nginx (stream): {table['ours'][0] / table['nginx'][0]:.2f}x  (target >= 0.8)")
        print(f"ours / naive (payload): {table['ours'][1] / table['naive'][1]:.1f}x  (target >= 10)")

        before = rss_bytes(ours.pid)
        peak = before
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, rss_bytes(ours.pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        clients = [
            subprocess.Popen(
                [
                    "curl",
                    "-sS",
                    "--http1.1",
                    "--cacert",
                    str(ca),
                    "--cert",
                    str(admin[0]),
                    "--key",
                    str(admin[1]),
                    "-o",
                    "/dev/null",
                    url,
                ]
            )
            for _ in range(4)
        ]
        began = time.monotonic()
        for c in clients:
            c.wait()
        elapsed = time.monotonic() - began
        stop.set()
        sampler.join()
        print(
            f"4 concurrent dumps: {4 * size / elapsed / 1e6:.0f} MB/s total; server RSS {before / MiB:.1f} MiB "
            f"before, peak +{(peak - before) / MiB:.1f} MiB (target <= 32)"
        )
        return 0
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
