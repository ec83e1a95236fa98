"""Dev mode shows RBAC at work: the admin context may do everything, the dev-viewer context only read ``default``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

SERVER = Path(sys.executable).parent / "coredump-apiserver"
GV = "/apis/coredump.example.io/v1alpha1"


@pytest.mark.kubectl
async def test_dev_viewer_reads_default_but_cannot_dump(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    dev_dir = tmp_path / "dev"
    proc = await asyncio.create_subprocess_exec(
        str(SERVER),
        "--dev",
        f"--dev-dir={dev_dir}",
        "--secure-port=0",
        "--auto-create-endpoints=false",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    drain: asyncio.Task[bytes] | None = None
    try:
        while True:
            line = await asyncio.wait_for(proc.stderr.readline(), timeout=30)
            assert line, "coredump-apiserver --dev exited before serving"
            with contextlib.suppress(ValueError):
                if json.loads(line).get("msg") == "serving":
                    break
        # Keep the pipe drained so the server never blocks on a full stderr.
        drain = asyncio.create_task(proc.stderr.read())
        env = {**os.environ, "KUBECONFIG": str(dev_dir / "kubeconfig"), "HOME": str(tmp_path)}

        async def run(*args: str) -> tuple[int, str]:
            child = await asyncio.create_subprocess_exec(
                kubectl, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
            )
            out, _ = await asyncio.wait_for(child.communicate(), timeout=60)
            assert child.returncode is not None
            return child.returncode, out.decode()

        code, out = await run("--context=dev-viewer", "get", "coredumpendpoints", "-n", "default")
        assert code == 0, out
        code, out = await run("--context=dev-viewer", "get", "coredumpendpoints", "-n", "kube-system")
        assert code == 1
        assert (
            "Error from server (Forbidden): coredumpendpoints.coredump.example.io is forbidden: User "
            '"dev-viewer" cannot list resource "coredumpendpoints" in API group "coredump.example.io" in the '
            'namespace "kube-system"'
        ) in out
        code, out = await run(
            "--context=dev-viewer", "get", "--raw", f"{GV}/namespaces/default/coredumpendpoints/web/dump"
        )
        assert code == 1 and 'cannot get resource "coredumpendpoints/dump"' in out, out

        # The admin context (current) is system:masters: the same dump gets past authorization (no such endpoint).
        code, out = await run("get", "--raw", f"{GV}/namespaces/default/coredumpendpoints/web/dump")
        assert code == 1 and "NotFound" in out and "Forbidden" not in out, out
        code, out = await run("get", "coredumpendpoints", "-n", "kube-system")
        assert code == 0, out
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), timeout=15)
        if drain is not None:
            await drain
