"""
``kubectl coredump gdb`` on an archive laid out as ``dump?objects=true`` lays it out (branch objdump: the
ELF objects under ``sysroot/`` or a core's own ``sysroot.<container>_<core-id>/``, relative links between
them, a gdb command file ``<container>_<core-id>.gdb`` per core, ``manifest.json``), served by a stand-in
API server until that feature is merged: the installed plugin downloads it, extracts it (links resolved
inside the archive, never outside), and real gdb runs the core's command file on a real core.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from isal import isal_zlib

from plugin_harness import PluginWorld
from plugin_harness import crash, run_plugin

pytestmark = pytest.mark.slow

CORE_ID = "20261123T101500Z-crasher-4242-11"
POD_UID = "5d1c7f6e-0000-4000-8000-000000000001"


def _archive(*, core: bytes, binary: bytes) -> bytes:
    """One gzip member per tar entry, as the server writes it."""
    meta = {
        "sha256": hashlib.sha256(core).hexdigest(),
        "exe": "/usr/bin/crasher",
        "signal": 11,
        "signalName": "SIGSEGV",
        "size": len(core),
    }
    script = (
        f"set auto-load off\nset sysroot sysroot\nfile sysroot/usr/bin/crasher\ncore-file app/{CORE_ID}.core\nbt\n"
    ).encode()
    entries: list[tuple[str, bytes | None, str | None]] = [
        (f"app/{CORE_ID}.json", json.dumps(meta).encode(), None),
        (f"app/{CORE_ID}.core", core, None),
        ("sysroot/usr/bin/crasher", binary, None),
        ("sysroot/usr/bin/by-absolute-path", None, "/usr/bin/crasher"),
        (f"sysroot.app_{CORE_ID}/usr/bin/crasher", None, "../../../sysroot/usr/bin/crasher"),
        ("sysroot/etc/outside", None, "../../../../../etc/passwd"),
        ("sysroot/lib/core-link", None, f"../../app/{CORE_ID}.core"),
        (f"app_{CORE_ID}.gdb", script, None),
        ("manifest.json", json.dumps({"cores": [{"gdb": f"app_{CORE_ID}.gdb"}]}).encode(), None),
    ]
    out = bytearray()
    for name, data, link in entries:
        info = tarfile.TarInfo(name)
        if link is not None:
            info.type, info.linkname = tarfile.SYMTYPE, link
        else:
            assert data is not None
            info.size, info.mode = len(data), 0o755 if name.endswith("crasher") else 0o644
        body = info.tobuf(format=tarfile.PAX_FORMAT)
        if data is not None:
            body += data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)
        out += isal_zlib.compress(body, 1, 31)
    out += isal_zlib.compress(b"\0" * tarfile.RECORDSIZE, 1, 31)
    return bytes(out)


@pytest.fixture
def objects_server(world: PluginWorld, tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    core = crash(world.crasher, tmp_path / "crash", heap=100_000).read_bytes()
    archive = _archive(core=core, binary=world.crasher.read_bytes())
    endpoint = {
        "kind": "CoredumpEndpoint",
        "apiVersion": "coredump.example.io/v1alpha1",
        "metadata": {"name": "obj-0", "namespace": "default"},
        "spec": {"podUID": POD_UID},
        "status": {
            "cores": [
                {
                    "id": CORE_ID,
                    "container": "app",
                    "signal": 11,
                    "signalName": "SIGSEGV",
                    "exe": "/usr/bin/crasher",
                    "time": "2026-11-23T10:15:00Z",
                }
            ]
        },
    }
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server's name
            asked.append(self.path)
            body, kind = (
                (archive, "application/gzip")
                if "/dump?" in self.path and "objects=true" in self.path
                else (json.dumps(endpoint).encode(), "application/json")
            )
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", '"objects-1"')
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = tmp_path / "kc"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "c",
                "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u", "namespace": "default"}}],
            }
        )
    )
    try:
        yield kubeconfig, asked
    finally:
        server.shutdown()
        server.server_close()


def test_gdb_runs_the_cores_own_command_file_from_an_objects_archive(
    world: PluginWorld, tmp_path: Path, objects_server: tuple[Path, list[str]]
) -> None:
    kubeconfig, asked = objects_server
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    printed = run_plugin(kubeconfig, "gdb", "obj-0", "--print", env=env)
    assert printed.returncode == 0, printed.stderr
    assert any("objects=true" in path for path in asked)
    cache = next((tmp_path / "cache").rglob(f"app_{CORE_ID}.gdb")).parent
    assert printed.stdout.decode().split() == ["gdb", f"-cd={cache}", "-x", str(cache / f"app_{CORE_ID}.gdb")]
    # Links became files of the archive itself: across sysroots and by absolute path inside the sysroot ...
    binary = world.crasher.read_bytes()
    assert (cache / "sysroot/usr/bin/by-absolute-path").read_bytes() == binary
    assert (cache / f"sysroot.app_{CORE_ID}/usr/bin/crasher").read_bytes() == binary
    # ... and never anything outside it, nor a core outside the sysroots; nothing written is a symlink.
    assert not (cache / "sysroot/etc/outside").exists() and not (cache / "sysroot/lib/core-link").exists()
    assert not [p for p in cache.rglob("*") if p.is_symlink()]
    assert (cache / "manifest.json").is_file()
    result = run_plugin(kubeconfig, "gdb", "obj-0", "--", "-batch", env=env)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr
    assert "crash_here" in out and "SIGSEGV" in out, out
    assert sum("/dump" in path for path in asked) == 1  # the second run was served from the cache
