"""
The kubeconfig forms users have, each driving the installed plugin against a real TLS server: inline
``-data`` and relative files (read by the plugin's own loader, as kubectl reads them), TLS verified as
kubectl verifies it (CA, ``tls-server-name``, ``insecure-skip-tls-verify``), bearer tokens from ``token``
and ``tokenFile`` (never printed), an exec credential plugin (loaded through kubernetes-asyncio), and the
forms refused with one line (impersonation, ``proxy-url``).
"""

from __future__ import annotations

import base64
import http.server
import json
import shutil
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from plugin_harness import PluginWorld
from fixtures_apiserver import kubectl_binary
from plugin_harness import run_plugin

pytestmark = pytest.mark.slow

DUMP = "/apis/coredump.example.io/v1alpha1/namespaces/default/coredumpendpoints/traced-0/dump"


def _raw_dump(world: PluginWorld) -> bytes:
    response = world.server.request("GET", DUMP)
    assert response.status == 200
    return response.body


def _kubeconfig(path: Path, *, server: str, cluster: dict[str, Any], user: dict[str, Any]) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "c",
                "clusters": [{"name": "c", "cluster": {"server": server, **cluster}}],
                "users": [{"name": "u", "user": user}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u", "namespace": "default"}}],
            }
        )
    )
    return path


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _get(world: PluginWorld, kubeconfig: Path, **kw: Any) -> subprocess.CompletedProcess[bytes]:
    return run_plugin(kubeconfig, "get", "traced-0", "-q", "-o", "-", env={"XDG_CACHE_HOME": str(world.cache)}, **kw)


def test_inline_data_and_relative_files_work_like_kubectl(world: PluginWorld, tmp_path: Path) -> None:
    dev = world.server.dev_dir
    inline = _kubeconfig(
        tmp_path / "inline",
        server=world.server.url,
        cluster={"certificate-authority-data": _b64(dev / "ca.crt")},
        user={"client-certificate-data": _b64(dev / "admin.crt"), "client-key-data": _b64(dev / "admin.key")},
    )
    result = _get(world, inline)
    assert result.returncode == 0, result.stderr
    assert result.stdout == _raw_dump(world)
    # The same file works for the real kubectl: the plugin reads the forms kubectl reads.
    listed = subprocess.run(
        [kubectl_binary(None), "--kubeconfig", str(inline), "get", "--raw", DUMP[: -len("/dump")]],
        capture_output=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr

    # Files relative to the kubeconfig's own directory, whatever the working directory.
    (tmp_path / "kc" / "pki").mkdir(parents=True)
    for name in ("ca.crt", "admin.crt", "admin.key"):
        shutil.copy(dev / name, tmp_path / "kc" / "pki" / name)
    relative = _kubeconfig(
        tmp_path / "kc" / "config",
        server=world.server.url,
        cluster={"certificate-authority": "pki/ca.crt"},
        user={"client-certificate": "pki/admin.crt", "client-key": "pki/admin.key"},
    )
    (tmp_path / "elsewhere").mkdir()
    result = _get(world, relative, cwd=tmp_path / "elsewhere")
    assert result.returncode == 0, result.stderr
    assert result.stdout == _raw_dump(world)


def test_tls_is_verified_like_kubectl(world: PluginWorld, tmp_path: Path) -> None:
    dev = world.server.dev_dir
    user = {"client-certificate": str(dev / "admin.crt"), "client-key": str(dev / "admin.key")}
    ca = {"certificate-authority": str(dev / "ca.crt")}
    # No CA in the kubeconfig: the system's roots, which do not know the dev CA.
    untrusted = _get(world, _kubeconfig(tmp_path / "a", server=world.server.url, cluster={}, user=user))
    assert untrusted.returncode == 1 and untrusted.stdout == b""
    assert b"does not verify" in untrusted.stderr and untrusted.stderr.count(b"\n") == 1, untrusted.stderr
    # tls-server-name is the name checked: the serving certificate is for 127.0.0.1 and localhost only.
    named = _get(
        world,
        _kubeconfig(tmp_path / "b", server=world.server.url, cluster={**ca, "tls-server-name": "localhost"}, user=user),
    )
    assert named.returncode == 0, named.stderr
    misnamed = _get(
        world,
        _kubeconfig(
            tmp_path / "c", server=world.server.url, cluster={**ca, "tls-server-name": "api.example.com"}, user=user
        ),
    )
    assert misnamed.returncode == 1 and b"'api.example.com'" in misnamed.stderr, misnamed.stderr
    # insecure-skip-tls-verify only when the kubeconfig says so; never together with a CA (kubectl refuses it).
    insecure = _get(
        world,
        _kubeconfig(tmp_path / "d", server=world.server.url, cluster={"insecure-skip-tls-verify": True}, user=user),
    )
    assert insecure.returncode == 0, insecure.stderr
    assert insecure.stdout == _raw_dump(world)
    both = _get(
        world,
        _kubeconfig(
            tmp_path / "e", server=world.server.url, cluster={**ca, "insecure-skip-tls-verify": True}, user=user
        ),
    )
    assert both.returncode == 1 and b"insecure-skip-tls-verify" in both.stderr and both.stderr.count(b"\n") == 1


class _Recorder(http.server.BaseHTTPRequestHandler):
    """An API server that records the Authorization header and lists no endpoints (401 for token 'expired')."""

    seen: list[str] = []

    def do_GET(self) -> None:  # http.server's name
        authorization = self.headers.get("Authorization", "")
        self.seen.append(authorization)
        if authorization.endswith("expired"):
            code, body = (
                401,
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "code": 401,
                    "reason": "Unauthorized",
                    "message": "Unauthorized",
                },
            )
        else:
            code, body = (
                200,
                {
                    "kind": "CoredumpEndpointList",
                    "apiVersion": "coredump.example.io/v1alpha1",
                    "metadata": {},
                    "items": [],
                },
            )
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def recorder(world: PluginWorld) -> Iterator[tuple[str, list[str]]]:
    """An HTTPS server with the dev serving certificate (so the dev CA verifies it) recording credentials."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(world.server.dev_dir / "serving.crt"), str(world.server.dev_dir / "serving.key"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    seen: list[str] = []
    _Recorder.seen = seen
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{server.server_port}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_token_and_token_file_are_sent_as_bearer_and_never_printed(
    world: PluginWorld, tmp_path: Path, recorder: tuple[str, list[str]]
) -> None:
    url, seen = recorder
    ca = {"certificate-authority": str(world.server.dev_dir / "ca.crt")}
    direct = run_plugin(_kubeconfig(tmp_path / "a", server=url, cluster=ca, user={"token": "s3cret-one"}), "list")
    assert direct.returncode == 0, direct.stderr
    assert seen[-1] == "Bearer s3cret-one"
    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens" / "t").write_text("s3cret-two\n")
    from_file = run_plugin(_kubeconfig(tmp_path / "b", server=url, cluster=ca, user={"tokenFile": "tokens/t"}), "list")
    assert from_file.returncode == 0, from_file.stderr
    assert seen[-1] == "Bearer s3cret-two"  # relative to the kubeconfig, trailing newline dropped
    both = run_plugin(
        _kubeconfig(
            tmp_path / "c",
            server=url,
            cluster=ca,
            user={"token": "s3cret-one", "tokenFile": str(tmp_path / "tokens" / "t")},
        ),
        "list",
    )
    assert both.returncode == 0 and seen[-1] == "Bearer s3cret-one"  # token wins, as in client-go
    expired = run_plugin(_kubeconfig(tmp_path / "d", server=url, cluster=ca, user={"token": "s3cret-expired"}), "list")
    assert expired.returncode == 4 and b"not authenticated" in expired.stderr
    for result in (direct, from_file, both, expired):
        assert b"s3cret" not in result.stdout + result.stderr


EXEC_PLUGIN = """
import json, sys
print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential",
                  "status": json.load(open(sys.argv[1]))}))
"""


def _exec_user(tmp_path: Path, status: dict[str, str]) -> dict[str, Any]:
    (tmp_path / "status.json").write_text(json.dumps(status))
    (tmp_path / "credential.py").write_text(EXEC_PLUGIN)
    return {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1beta1",
            "command": sys.executable,
            "args": [str(tmp_path / "credential.py"), str(tmp_path / "status.json")],
            "interactiveMode": "Never",
        }
    }


def test_an_exec_credential_plugin_works_through_kubernetes_asyncio(
    world: PluginWorld, tmp_path: Path, recorder: tuple[str, list[str]]
) -> None:
    dev = world.server.dev_dir
    ca = {"certificate-authority": str(dev / "ca.crt")}
    (tmp_path / "cert").mkdir()
    certs = _exec_user(
        tmp_path / "cert",
        {"clientCertificateData": (dev / "admin.crt").read_text(), "clientKeyData": (dev / "admin.key").read_text()},
    )
    result = _get(world, _kubeconfig(tmp_path / "a", server=world.server.url, cluster=ca, user=certs))
    assert result.returncode == 0, result.stderr
    assert result.stdout == _raw_dump(world)
    url, seen = recorder
    (tmp_path / "token").mkdir()
    token = _exec_user(tmp_path / "token", {"token": "s3cret-exec"})
    listed = run_plugin(_kubeconfig(tmp_path / "b", server=url, cluster=ca, user=token), "list")
    assert listed.returncode == 0, listed.stderr
    assert seen[-1] == "Bearer s3cret-exec"


def test_impersonation_and_proxies_are_refused_not_ignored(world: PluginWorld, tmp_path: Path) -> None:
    dev = world.server.dev_dir
    ca = {"certificate-authority": str(dev / "ca.crt")}
    user = {"client-certificate": str(dev / "admin.crt"), "client-key": str(dev / "admin.key")}
    impersonating = run_plugin(
        _kubeconfig(tmp_path / "a", server=world.server.url, cluster=ca, user={**user, "as": "someone"}), "list"
    )
    assert impersonating.returncode == 1 and b"impersonates" in impersonating.stderr
    proxied = run_plugin(
        _kubeconfig(
            tmp_path / "b", server=world.server.url, cluster={**ca, "proxy-url": "http://127.0.0.1:9"}, user=user
        ),
        "list",
    )
    assert proxied.returncode == 1 and b"proxy-url" in proxied.stderr and proxied.stderr.count(b"\n") == 1


class _ClosesKeptConnections(http.server.BaseHTTPRequestHandler):
    """Says HTTP/1.1 keep-alive, then closes the connection after every answer (an idle timeout of zero)."""

    protocol_version = "HTTP/1.1"
    connections: list[str] = []

    def setup(self) -> None:
        super().setup()
        self.connections.append(str(self.client_address))  # one handler per connection

    def do_GET(self) -> None:  # http.server's name
        body = json.dumps(
            {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "code": 404,
                "reason": "NotFound",
                "details": {"name": "gone-0", "kind": "coredumpendpoints"},
                "message": 'coredumpendpoints "gone-0" not found',
            }
        ).encode()
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


def test_a_kept_connection_the_server_closed_is_replaced_once(world: PluginWorld, tmp_path: Path) -> None:
    """get asks for the dump, then (404) for the endpoint on the kept connection, which the server closed."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ClosesKeptConnections)
    _ClosesKeptConnections.connections = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        kubeconfig = _kubeconfig(
            tmp_path / "kc", server=f"http://127.0.0.1:{server.server_port}", cluster={}, user={"token": "t"}
        )
        result = run_plugin(kubeconfig, "get", "gone-0", "-o", str(tmp_path / "out"))
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 3, result.stderr
    assert b'"gone-0" not found' in result.stderr and result.stderr.count(b"\n") == 1
    assert len(_ClosesKeptConnections.connections) == 2  # the dump's, then a new one for the endpoint
