"""
Shell completion as users get it: the real kubectl completing ``kubectl coredump ...`` through the
``kubectl_complete-coredump`` script the plugin prints, and bash completing ``kubectl-coredump ...`` with the
function it prints; commands, flags, contexts, pod names and core ids from the dev server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from plugin_harness import PluginWorld
from fixtures_apiserver import kubectl_binary
from plugin_harness import BIN, run_plugin

pytestmark = pytest.mark.slow


def _kubectl_complete(world: PluginWorld, tmp_path: Path, *words: str) -> list[str]:
    """``kubectl __complete coredump WORDS...`` (what kubectl's shell script runs on TAB), values only."""
    shim = tmp_path / "bin" / "kubectl_complete-coredump"
    if not shim.exists():
        shim.parent.mkdir(exist_ok=True)
        script = run_plugin(None, "completion")
        assert script.returncode == 0, script.stderr
        shim.write_bytes(script.stdout)
        shim.chmod(0o755)
    env = {
        **os.environ,
        "KUBECONFIG": str(world.kubeconfig),
        "PATH": os.pathsep.join([str(shim.parent), str(BIN), os.environ.get("PATH", "")]),
    }
    result = subprocess.run(
        [kubectl_binary(None), "__complete", "coredump", *words], capture_output=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines and lines[-1].startswith(":"), lines
    return [line.split("\t")[0] for line in lines[:-1]]


def test_kubectl_completes_commands_flags_pods_and_core_ids(world: PluginWorld, tmp_path: Path) -> None:
    assert {"list", "describe", "get", "gdb", "bt"} <= set(_kubectl_complete(world, tmp_path, ""))
    assert "--output" in _kubectl_complete(world, tmp_path, "get", "--")
    pods = _kubectl_complete(world, tmp_path, "get", "")
    assert {"big-0", "traced-0", "bad-0"} <= set(pods) and "web-0" not in pods  # web-0 is in shop
    assert _kubectl_complete(world, tmp_path, "gdb", "-n", "shop", "w") == ["web-0"]
    ids = _kubectl_complete(world, tmp_path, "gdb", "-n", "shop", "web-0", "--core", "")
    assert sorted(ids) == sorted(c.ref.core_id for c in world.cores("shop", "web-0"))
    sidecar = _kubectl_complete(world, tmp_path, "gdb", "web-0", "-n", "shop", "-c", "sidecar", "--core", "")
    assert sidecar == [c.ref.core_id for c in world.cores("shop", "web-0") if c.ref.container == "sidecar"]
    assert {"dev-admin", "dev-viewer"} <= set(_kubectl_complete(world, tmp_path, "--context", ""))
    # A cluster that cannot be asked completes nothing, without an error in the command line.
    env_kc = tmp_path / "absent"
    result = run_plugin(env_kc, "__complete", "get", "")
    assert result.returncode == 0 and result.stdout == b":4\n" and result.stderr == b""


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is needed")
def test_bash_completes_the_executable(world: PluginWorld) -> None:
    script = run_plugin(None, "completion", "bash")
    assert script.returncode == 0
    probe = (
        script.stdout.decode() + '\nCOMP_WORDS=(kubectl-coredump get -n shop ""); COMP_CWORD=4; '
        '_kubectl_coredump; printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    env = {**os.environ, "KUBECONFIG": str(world.kubeconfig), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-c", probe], capture_output=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().split() == ["web-0"]
