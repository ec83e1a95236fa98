"""
``kubectl coredump`` as a user runs it: the installed plugin, as a subprocess, against a dev-mode API
server holding real kernel cores; through the real kubectl; through a proxy that cuts connections; across
a restart of the server; and gdb on the result.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from digests import digest_of_file, promised
from fixtures_apiserver import kubectl_binary
from plugin_harness import (
    BIG_HEAP,
    PLUGIN,
    T0,
    CuttingProxy,
    PluginWorld,
    ProxyRule,
    crash,
    import_core,
    kubeconfig_via,
    run_plugin,
)

from handler import layout

pytestmark = pytest.mark.slow

DUMP = "/apis/coredump.example.io/v1alpha1/namespaces/{ns}/coredumpendpoints/{pod}/dump"


def plugin(
    world: PluginWorld, *args: str, kubeconfig: Path | None = None, **kw: object
) -> subprocess.CompletedProcess[bytes]:
    env = {"XDG_CACHE_HOME": str(world.cache), **kw.pop("env", {})}  # type: ignore[dict-item]
    return run_plugin(kubeconfig or world.kubeconfig, *args, env=env, **kw)  # type: ignore[arg-type]


def ok(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, (result.returncode, result.stderr.decode())
    return result.stdout.decode()


def raw_dump(world: PluginWorld, ns: str, pod: str) -> bytes:
    response = world.server.request("GET", DUMP.format(ns=ns, pod=pod))
    assert response.status == 200
    return response.body


def extracted_digests(directory: Path) -> dict[str, str]:
    """Each extracted core's digest, by the algorithm its extracted metadata names (computed here, not by the
    plugin)."""
    out = {}
    for p in directory.rglob("*.core"):
        algorithm = promised(json.loads(p.with_suffix(".json").read_text())).partition(":")[0]
        out[str(p.relative_to(directory).with_suffix(""))] = digest_of_file(p, algorithm=algorithm)
    return out


def expected_digests(world: PluginWorld, ns: str, pod: str) -> dict[str, str]:
    prefix = f"{ns}/{pod}/"
    return {k[len(prefix) :]: v for k, v in world.originals.items() if k.startswith(prefix)}


def test_help_of_every_command_names_the_exit_codes() -> None:
    for command in ([], ["list"], ["describe"], ["get"], ["gdb"], ["bt"]):
        result = subprocess.run([str(PLUGIN), *command, "--help"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "exit codes:" in result.stdout and "verification failed" in result.stdout, command
    bad = subprocess.run([str(PLUGIN), "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2


def test_kubectl_finds_the_plugin_and_runs_it(world: PluginWorld) -> None:
    kubectl = kubectl_binary(None)
    env = {**os.environ, "PATH": f"{PLUGIN.parent}{os.pathsep}{os.environ['PATH']}"}
    listed = subprocess.run([kubectl, "plugin", "list"], capture_output=True, env=env)
    assert str(PLUGIN).encode() in listed.stdout, listed
    out = ok(run_plugin(world.kubeconfig, "list", "-A", via_kubectl=kubectl))
    assert "web-0" in out and "big-0" in out


def test_list_shows_every_core_the_api_serves(world: PluginWorld) -> None:
    out = ok(plugin(world, "list", "-n", "shop"))
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["POD", "CONTAINER", "CORE", "TIME"]
    assert "SIGNATURE" in lines[0] and "TOP FRAME" in lines[0]
    rows = [line.split() for line in lines[1:]]
    assert sorted((r[1], r[2]) for r in rows) == sorted(
        (c.ref.container, c.ref.core_id) for c in world.cores("shop", "web-0")
    )
    assert {r[4] for r in rows} == {"SIGSEGV", "SIGABRT"}
    everywhere = ok(plugin(world, "list", "-A"))
    assert everywhere.splitlines()[0].startswith("NAMESPACE") and "default" in everywhere and "shop" in everywhere
    selected = ok(plugin(world, "--context", "dev-admin", "list", "-A", "-l", "app=web"))  # global flag first
    assert "web-0" in selected and "big-0" not in selected
    empty = plugin(world, "list", "-n", "nobody-here")
    assert empty.returncode == 0 and b"No cores found" in empty.stderr


def test_list_by_signature_groups_across_pods(world: PluginWorld) -> None:
    out = ok(plugin(world, "list", "-A", "--by-signature"))
    header, *rows = out.splitlines()
    assert header.split()[:2] == ["SIGNATURE", "COUNT"]
    listed = ok(plugin(world, "list", "-A")).splitlines()[1:]
    assert sum(int(r.split()[1]) for r in rows) == len(listed) == len(world.originals)
    # Until the server puts signatures in status.cores, every core groups under "-", across pods.
    group = next(r for r in rows if "default/traced-0" in r or "+" in r.split()[-1])
    assert int(group.split()[4]) >= 1


def test_describe_shows_status_and_with_core_the_metadata(world: PluginWorld) -> None:
    out = ok(plugin(world, "describe", "web-0", "-n", "shop"))
    for core in world.cores("shop", "web-0"):
        assert f"Core {core.ref.core_id}" in out
    assert "Cores:         3" in out and "SIGABRT" in out
    one = world.cores("shop", "web-0")[0]
    detail = ok(plugin(world, "describe", "web-0", "-n", "shop", "--core", one.ref.core_id))
    assert one.metadata["digest"] in detail and detail.count("Core ") == 1
    traced = ok(plugin(world, "describe", "traced-0", "--core", world.cores("default", "traced-0")[0].ref.core_id))
    assert "crash_here" in traced and "crasher.c:5" in traced
    missing = plugin(world, "describe", "web-0", "-n", "shop", "--core", "20200101T000000Z-x-1-11")
    assert missing.returncode == 3
    assert one.ref.core_id.encode() in missing.stderr and missing.stderr.count(b"\n") == 1


def test_get_extracts_verified_cores_ready_for_gdb(world: PluginWorld, tmp_path: Path) -> None:
    result = plugin(world, "get", "web-0", "-n", "shop", "-o", str(tmp_path / "all"))
    out = ok(result)
    assert extracted_digests(tmp_path / "all") == expected_digests(world, "shop", "web-0")
    assert out.count("blake3 verified") == 3 and b"3 cores in" in result.stderr
    for meta in (tmp_path / "all").rglob("*.json"):
        assert promised(json.loads(meta.read_text())) == world.originals[f"shop/web-0/{meta.parent.name}/{meta.stem}"]
    ok(plugin(world, "get", "web-0", "-n", "shop", "-c", "sidecar", "-o", str(tmp_path / "side")))
    assert [p.parent.name for p in (tmp_path / "side").rglob("*.core")] == ["sidecar"]
    newest = max(world.cores("shop", "web-0"), key=lambda c: c.ref.core_id)
    quiet = ok(
        plugin(world, "get", "web-0", "-n", "shop", "--core", newest.ref.core_id, "-q", "-o", str(tmp_path / "one"))
    )
    assert quiet.strip().endswith(f"{newest.ref.core_id}.core") and len(quiet.splitlines()) == 1
    future = plugin(world, "get", "web-0", "-n", "shop", "--since", "2999-01-01T00:00:00Z", "-o", str(tmp_path / "f"))
    assert future.returncode == 3 and b"no cores" in future.stderr
    nope = plugin(world, "get", "web-0", "-n", "shop", "-c", "nope", "-o", str(tmp_path / "n"))
    assert nope.returncode == 3 and b"app, sidecar" in nope.stderr
    assert not (tmp_path / "f").exists() and not (tmp_path / "n").exists()  # a failed get leaves no directory
    missing = plugin(world, "get", "no-such-pod", "-o", str(tmp_path / "m"))
    assert missing.returncode == 3 and b'"no-such-pod" not found' in missing.stderr


def test_get_to_stdout_is_the_archive_unchanged(world: PluginWorld) -> None:
    result = plugin(world, "get", "web-0", "-n", "shop", "-o", "-")
    assert result.returncode == 0, result.stderr
    assert result.stdout == raw_dump(world, "shop", "web-0")


def test_get_fails_on_a_core_that_does_not_match_its_sha256(world: PluginWorld, tmp_path: Path) -> None:
    result = plugin(world, "get", "bad-0", "-o", str(tmp_path / "bad"))
    assert result.returncode == 6, result.stderr
    assert b"sha256" in result.stderr and b"does not match" in result.stderr
    assert not list((tmp_path / "bad").rglob("*.core")) and not list((tmp_path / "bad").rglob("*.part"))


@pytest.fixture
def proxy_kubeconfig(world: PluginWorld, tmp_path: Path) -> Iterator[tuple[CuttingProxy, Path]]:
    proxies: list[CuttingProxy] = []

    def make(rules: list[ProxyRule]) -> tuple[CuttingProxy, Path]:
        proxy = CuttingProxy(world.server.port, rules)
        proxies.append(proxy)
        return proxy, kubeconfig_via(world.kubeconfig, port=proxy.port, target=tmp_path / f"kc{len(proxies)}")

    yield make  # type: ignore[misc]
    for proxy in proxies:
        proxy.close()


def test_get_resumes_across_forced_cuts_byte_identical(world: PluginWorld, proxy_kubeconfig, tmp_path: Path) -> None:
    size = len(raw_dump(world, "default", "big-0"))
    assert size > 8 << 20
    rules = [
        ProxyRule(connection=0, after=size // 5, action="cut"),
        ProxyRule(connection=1, after=size // 3, action="cut"),
        ProxyRule(connection=2, after=100, action="cut"),
    ]
    proxy, kubeconfig = proxy_kubeconfig(rules)
    result = plugin(world, "get", "big-0", "-o", str(tmp_path / "big"), kubeconfig=kubeconfig)
    ok(result)
    assert result.stderr.count(b"resuming at byte") >= 3, result.stderr.decode()
    assert proxy.connections >= 4
    assert extracted_digests(tmp_path / "big") == expected_digests(world, "default", "big-0")

    proxy, kubeconfig = proxy_kubeconfig([ProxyRule(connection=0, after=size // 2, action="cut")])
    streamed = plugin(world, "get", "big-0", "-o", "-", kubeconfig=kubeconfig)
    assert streamed.returncode == 0, streamed.stderr
    assert b"resuming at byte" in streamed.stderr
    assert streamed.stdout == raw_dump(world, "default", "big-0")


def test_get_resumes_across_a_server_restart(world: PluginWorld, proxy_kubeconfig, tmp_path: Path) -> None:
    proxy, kubeconfig = proxy_kubeconfig([ProxyRule(connection=0, after=3 << 20, action="hold")])
    env = {"XDG_CACHE_HOME": str(world.cache), "KUBECONFIG": str(kubeconfig)}
    process = subprocess.Popen(
        [str(PLUGIN), "get", "big-0", "-o", str(tmp_path / "big")],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proxy.held.wait(60), "the download never reached the hold point"
        world.server.stop()
        world.server.start()  # same port: the replica is back
        proxy.release()
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err.decode()
    assert b"resuming at byte" in err
    assert extracted_digests(tmp_path / "big") == expected_digests(world, "default", "big-0")


def test_an_archive_changed_between_cut_and_resume_starts_over(
    world: PluginWorld, proxy_kubeconfig, tmp_path: Path
) -> None:
    """
    A core filed while the download is cut: the resume's If-Range (the first response's ETag) no longer
    matches, the server sends the whole new archive (200), and -o DIR starts over and ends with every core
    verified and nothing of the first archive spliced in; -o - cannot start over and says so (exit 7).
    """
    uid = str(uuid.uuid4())
    item = "/apis/coredump.example.io/v1alpha1/namespaces/default/coredumpendpoints/change-0"
    import_core(
        root=world.root,
        work=tmp_path,
        core=crash(world.crasher, tmp_path / "c1", heap=BIG_HEAP),
        namespace="default",
        pod="change-0",
        pod_uid=uid,
        container="app",
        time=T0 + 300,
    )
    deadline = time.monotonic() + 60
    while world.server.request("GET", item).status != 200:  # auto-created from storage
        assert time.monotonic() < deadline, "the endpoint was never auto-created"
        time.sleep(0.2)
    small = crash(world.crasher, tmp_path / "c2", heap=100_000)
    env = {**os.environ, "XDG_CACHE_HOME": str(world.cache)}

    def cut_while_a_core_is_filed(output: str, at: float) -> subprocess.CompletedProcess[bytes]:
        proxy, kubeconfig = proxy_kubeconfig([ProxyRule(connection=0, after=3 << 20, action="hold")])
        process = subprocess.Popen(
            [str(PLUGIN), "get", "change-0", "-o", output],
            env={**env, "KUBECONFIG": str(kubeconfig)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert proxy.held.wait(60), "the download never reached the hold point"
            import_core(
                root=world.root,
                work=tmp_path,
                core=small,
                namespace="default",
                pod="change-0",
                pod_uid=uid,
                container="app",
                time=at,
            )
            proxy.release()
            out, err = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    result = cut_while_a_core_is_filed(str(tmp_path / "out"), T0 + 400)
    assert result.returncode == 0, result.stderr.decode()
    assert b"the archive changed on the server" in result.stderr
    stored = {
        f"{c.ref.container}/{c.ref.core_id}": promised(c.metadata)
        for c in layout.list_cores(world.root, namespace="default", pod="change-0", pod_uid=uid)
    }
    assert len(stored) == 2
    assert extracted_digests(tmp_path / "out") == stored
    assert not list((tmp_path / "out").rglob("*.part"))

    streamed = cut_while_a_core_is_filed("-", T0 + 500)
    assert streamed.returncode == 7, streamed.stderr.decode()
    assert b"archive changed on the server while it was written to stdout" in streamed.stderr


def test_gdb_gives_a_backtrace_of_a_real_core_and_caches_it(world: PluginWorld) -> None:
    segv = next(c for c in world.cores("shop", "web-0") if c.ref.container == "app" and c.metadata["signal"] == 11)
    args = ["gdb", "web-0", "-n", "shop", "--core", segv.ref.core_id, "--exe", str(world.crasher)]
    result = plugin(world, *args, "--", "-batch", "-ex", "bt")
    out = ok(result)
    assert "crash_here" in out and "SIGSEGV" in out, out
    cached = next(world.cache.rglob(f"{segv.ref.core_id}.core"))
    assert digest_of_file(cached) == segv.metadata["digest"]
    stamp = cached.stat().st_mtime_ns
    printed = ok(plugin(world, *args, "--print"))
    assert printed.split()[0] == "gdb" and str(cached) in printed and str(world.crasher) in printed
    assert cached.stat().st_mtime_ns == stamp  # served from the cache, not downloaded again
    # traced-0's executable (/usr/bin/crasher) was never captured: the dump's command file opens the core alone
    alone = plugin(world, "gdb", "traced-0", "--print")
    assert alone.returncode == 0 and b"gdb opens the core alone" in alone.stderr, alone.stderr
    assert b"-x " in alone.stdout and b".gdb" in alone.stdout


def test_bt_prints_the_stored_backtrace_or_says_there_is_none(world: PluginWorld) -> None:
    out = ok(plugin(world, "bt", "traced-0"))
    assert "#0   crash_here (crasher) at crasher.c:5" in out and "#1   main" in out
    none = ok(plugin(world, "bt", "bad-0"))
    assert none.count("\n") == 1 and "no backtrace was stored" in none


def test_errors_are_one_line_with_what_to_do(world: PluginWorld, tmp_path: Path) -> None:
    denied = plugin(world, "--context", "dev-viewer", "get", "traced-0", "-o", str(tmp_path / "x"))
    assert denied.returncode == 4
    line = denied.stderr.decode()
    assert line.count("\n") == 1 and "coredump:dump" in line and "coredumpendpoints/dump" in line and "get" in line
    assert ok(plugin(world, "--context", "dev-viewer", "list"))  # viewers see the crashes
    missing = plugin(world, "describe", "no-such-pod")
    assert missing.returncode == 3 and b'"no-such-pod" not found' in missing.stderr
    # The server serves ?objects=true now (branch objdump): web-0's cores come, with the archive's manifest.json.
    objects = plugin(world, "get", "web-0", "-n", "shop", "--objects", "-o", str(tmp_path / "o"))
    assert objects.returncode == 0, objects.stderr
    nocontext = plugin(world, "--context", "nope", "list")
    assert nocontext.returncode == 1 and b'context "nope"' in nocontext.stderr


class _NoGroup(http.server.BaseHTTPRequestHandler):
    """kube-apiserver's answers for a group it does not serve (404) or whose APIService is down (503)."""

    def do_GET(self) -> None:  # http.server's name
        code = 503 if "unavailable" in self.path else 404
        body = json.dumps(
            {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "code": code,
                "reason": "NotFound" if code == 404 else "ServiceUnavailable",
                "message": "the server could not find the requested resource" if code == 404 else "service unavailable",
            }
        ).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_cluster_without_the_api_says_the_apiservice_is_not_available(world: PluginWorld, tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NoGroup)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        kubeconfig = tmp_path / "kc"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "c",
                    "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
                    "users": [{"name": "u", "user": {"token": "t"}}],
                    "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u", "namespace": "unavailable"}}],
                }
            )
        )
        down = plugin(world, "list", kubeconfig=kubeconfig)
        assert down.returncode == 5 and b"apiservice v1alpha1.coredump.example.io" in down.stderr
        absent = plugin(world, "list", "-n", "other", kubeconfig=kubeconfig)
        assert absent.returncode == 5 and b"not available" in absent.stderr and absent.stderr.count(b"\n") == 1
    finally:
        server.shutdown()


def test_kubeconfig_merges_paths_like_kubectl(world: PluginWorld, tmp_path: Path) -> None:
    """KUBECONFIG=a:b: the first file's current-context wins, contexts come from either file."""
    config = yaml.safe_load(world.kubeconfig.read_text())
    first = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "dev-viewer",
        "clusters": [],
        "users": [],
        "contexts": [],
    }
    (tmp_path / "a").write_text(yaml.safe_dump(first))
    (tmp_path / "b").write_text(yaml.safe_dump(config))
    merged = run_plugin(
        None,
        "get",
        "traced-0",
        "-o",
        str(tmp_path / "o"),
        env={
            "KUBECONFIG": os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")]),
            "XDG_CACHE_HOME": str(world.cache),
        },
    )
    assert merged.returncode == 4, merged.stderr  # dev-viewer (from a) may not dump
    admin = run_plugin(
        None,
        "--context",
        "dev-admin",
        "get",
        "traced-0",
        "-q",
        "-o",
        str(tmp_path / "o"),
        env={"KUBECONFIG": os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")])},
    )
    assert admin.returncode == 0, admin.stderr
