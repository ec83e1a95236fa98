"""
Bounded cost per client, against the real server over real TLS: a half-sent header is closed after
``--read-header-timeout``, an idle keep-alive connection after ``--idle-timeout``, connections past
``--max-connections`` are closed, and requests past the in-flight caps get 429 with ``Retry-After`` while
watches do not count. Short timeouts come from the flags; no test asserts how long anything took.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures_apiserver import RunningServer, collection_path, endpoint_manifest, start_apiserver

# Generous safety net for a recv that should end with a close; the close comes after the flag's timeout.
SAFETY_TIMEOUT = 30.0


@contextlib.contextmanager
def server_with(tmp_path: Path, *flags: str) -> Iterator[RunningServer]:
    server = start_apiserver(tmp_path, *flags)
    try:
        yield server
    finally:
        server.stop()
    assert "Traceback" not in server.log_path.read_text()


def tls_socket(server: RunningServer) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=SAFETY_TIMEOUT)
    return server.ssl_context(user="admin").wrap_socket(raw, server_hostname="127.0.0.1")


def closed_by_server(sock: ssl.SSLSocket) -> bool:
    """Read until the server closes; True on a close, False if the safety timeout ran out first."""
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


def get(sock: ssl.SSLSocket, path: str) -> http.client.HTTPResponse:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    response = http.client.HTTPResponse(sock)  # type: ignore[arg-type]
    response.begin()
    response.read()
    return response


def test_half_a_header_is_closed_and_a_whole_one_is_served(tmp_path: Path) -> None:
    with server_with(tmp_path, "--read-header-timeout=1s") as server:
        with tls_socket(server) as loris:
            loris.sendall(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            assert closed_by_server(loris)
        # Connected, handshake done, not a byte sent: closed as well.
        with tls_socket(server) as silent:
            assert closed_by_server(silent)
        with tls_socket(server) as honest:
            assert get(honest, "/readyz").status == 200
            # After a request the next one gets the same bound from its first byte.
            honest.sendall(b"GET /readyz HTTP/1.1\r\nHo")
            assert closed_by_server(honest)
        assert server.request("GET", "/readyz").status == 200


def test_idle_keepalive_connection_is_closed(tmp_path: Path) -> None:
    with server_with(tmp_path, "--idle-timeout=1s") as server:
        with tls_socket(server) as idle:
            response = get(idle, "/readyz")
            assert response.status == 200 and not response.will_close
            assert closed_by_server(idle)


def test_connections_past_the_cap_are_closed(tmp_path: Path) -> None:
    with server_with(tmp_path, "--max-connections=3") as server:
        held = [tls_socket(server) for _ in range(2)]  # with the readiness probe's gone, 2 + 1 below = 3
        try:
            third = tls_socket(server)
            held.append(third)
            assert get(third, "/readyz").status == 200
            with tls_socket(server) as fourth:
                assert closed_by_server(fourth)
            for sock in held:  # the ones within the cap are untouched
                assert get(sock, "/readyz").status == 200
        finally:
            for sock in held:
                sock.close()
        # Closed ones no longer count.
        assert server.request("GET", "/readyz").status == 200


def test_inflight_cap_answers_429_and_a_watch_does_not_count(tmp_path: Path) -> None:
    flags = ("--max-requests-inflight=1", "--max-mutating-requests-inflight=1")
    with server_with(tmp_path, *flags) as server:
        collection = collection_path("default")
        watch = server.connect()
        slow = tls_socket(server)
        try:
            watch.request("GET", f"{collection}?watch=true")
            assert watch.getresponse().status == 200  # open and streaming: long-running, not counted

            # The one read-only slot is free despite the watch.
            assert server.request("GET", collection).status == 200

            # Hold the one mutating slot: a create whose body is still coming.
            body = json.dumps(endpoint_manifest("held")).encode()
            slow.sendall(
                f"POST {collection} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body[:10]
            )
            refused = None
            for _ in range(50):  # the held request reaches the server concurrently with this one
                refused = server.request("POST", collection, body=endpoint_manifest("refused"))
                if refused.status == 429:
                    break
            assert refused is not None and refused.status == 429
            assert refused.headers["Retry-After"] == "1"
            status = refused.json()
            assert (status["kind"], status["reason"], status["code"]) == ("Status", "TooManyRequests", 429)
            # Read-only requests have their own limit.
            assert server.request("GET", collection).status == 200

            slow.sendall(body[10:])
            held = http.client.HTTPResponse(slow)  # type: ignore[arg-type]
            held.begin()
            assert held.status == 201
            held.read()
            assert server.request("POST", collection, body=endpoint_manifest("after")).status == 201
        finally:
            slow.close()
            watch.close()


@pytest.mark.parametrize(
    "flag", ["--max-connections=-1", "--read-header-timeout=0s", "--idle-timeout=x", "--max-requests-inflight=many"]
)
def test_bad_limit_flags_are_one_line_errors(flag: str, tmp_path: Path) -> None:
    import subprocess

    from fixtures_apiserver import BIN

    result = subprocess.run(
        [str(BIN / "coredump-apiserver"), "--dev", "--dev-dir", str(tmp_path), flag],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert flag.split("=")[0] in result.stderr and "Traceback" not in result.stderr


def test_a_request_being_served_outlives_the_header_timeout(tmp_path: Path) -> None:
    import time

    with server_with(tmp_path, "--read-header-timeout=1s") as server:
        watch = server.connect()
        try:
            watch.request("GET", f"{collection_path('default')}?watch=true")
            response = watch.getresponse()
            assert response.status == 200
            time.sleep(2.5)  # past the header timeout: the watch's header was complete, so it stays
            assert server.request("POST", collection_path("default"), body=endpoint_manifest("late")).status == 201
            event = json.loads(response.readline())
            assert (event["type"], event["object"]["metadata"]["name"]) == ("ADDED", "late")
        finally:
            watch.close()
