"""
Every command block of README.md runs as written against a dev server, or is explicitly marked as one that
cannot (issue 16): a README command can never rot again.

A block is a fence with info ``console``, ``sh``, ``shell`` or ``bash``. The line above it may mark it
``<!-- readme-test: KIND [NAME=VALUE ...] -->``: ``run`` (the default for ``console`` blocks; ``NAME=VALUE``
replaces the placeholder word NAME), ``cluster`` (needs a real cluster), ``shape`` (has parts to fill in) or
``setup`` (what this environment itself does). A ``sh`` block without a mark fails the test: nothing is skipped
silently.

Commands (``$ `` lines and their ``\\`` continuations) run one by one in one shell session (exports and the
working directory carry over) in a temp directory that stands for the repository root: its ``.venv`` is the
test's venv and its ``.dev`` the dev server's directory, with ``PATH`` free of the venv as in a fresh shell
(``KUBECONFIG`` names the dev server's, for the blocks before the dev-mode walk-through). A
command must exit 0, unless its trailing comment says ``Forbidden`` (it must fail, saying Forbidden) or
``exits N``. The dev server's start-up hints run the same way, in a fresh session in another directory.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures_apiserver import BIN, RunningServer
from waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
KINDS = {"run", "cluster", "shape", "setup"}
COMMAND_FENCES = {"console", "sh", "shell", "bash"}
# What the README's placeholders (e.g. NS/POD in the introduction) and the dump section name: a pod with a core.
FILED_NAMESPACE, FILED_POD, FILED_UID = "shop", "web-0", "0b6e2b56-4b1c-4e4a-9d57-2f7f3bb2a001"
FILED_TIME = "1795500000"  # 2026-11-24, after the `since=2026-11-23T10:00:00Z` the README filters with
COMMAND_TIMEOUT = 60


@dataclasses.dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the fence
    info: str
    kind: str
    placeholders: dict[str, str]
    body: list[str]

    def commands(self) -> list[str]:
        """``$ `` lines, each joined with its continuation lines, placeholders replaced."""
        out: list[str] = []
        current: list[str] | None = None
        for raw in self.body:
            text = raw.strip()
            if current is not None:
                current.append(text)
            elif text.startswith("$ "):
                current = [text[2:]]
            else:
                continue  # output shown in the README
            if not current[-1].endswith("\\"):
                command = "\n".join(current)
                for name, value in self.placeholders.items():
                    command = re.sub(rf"\b{re.escape(name)}\b", value, command)
                out.append(command)
                current = None
        assert current is None, f"README.md:{self.line}: a command ends with a backslash"
        return out


def readme_blocks(text: str) -> list[Block]:
    lines = text.split("\n")
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = re.match(r"^\s*```(\S*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        info = fence.group(1)
        if info in COMMAND_FENCES:
            previous = lines[i - 1].strip() if i else ""
            mark = re.fullmatch(r"<!-- readme-test: (\w+)(.*?) -->", previous)
            if mark:
                kind = mark.group(1)
                placeholders = dict(re.findall(r"\b([A-Z][A-Z0-9_]*)=(\S+)", mark.group(2)))
            else:
                kind, placeholders = ("run" if info == "console" else "unmarked"), {}
            blocks.append(Block(line=i + 1, info=info, kind=kind, placeholders=placeholders, body=lines[i + 1 : end]))
        i = end + 1
    return blocks


def expected_exit(command: str) -> tuple[int | None, str | None]:
    """(exit code, text the output must contain) stated by the command's trailing comment; (0, None) if none."""
    comment = command.rsplit("#", 1)[1] if re.search(r"\s#\s", command) else ""
    if re.search(r"\bForbidden\b", comment):
        return None, "Forbidden"  # any non-zero exit
    code = re.search(r"\bexits (\d+)\b", comment)
    return (int(code.group(1)) if code else 0), None


class Session:
    """One shell session in ``cwd``: each command in its own bash, exports and ``cd`` carried to the next."""

    def __init__(self, *, cwd: Path, env: dict[str, str], state: Path) -> None:
        self.cwd, self.env, self.state = cwd, env, state
        state.write_text(f"cd {shlex.quote(str(cwd))}\n")

    def run(self, command: str) -> subprocess.CompletedProcess[str]:
        script = (
            f". {shlex.quote(str(self.state))}\n{command}\n__rc=$?\n"
            f'{{ export -p; echo "cd $(printf %q "$PWD")"; }} > {shlex.quote(str(self.state))}\nexit $__rc\n'
        )
        return subprocess.run(
            ["bash", "-c", script],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )

    def check(self, command: str, *, where: str) -> None:
        code, text = expected_exit(command)
        proc = self.run(command)
        output = proc.stdout + proc.stderr
        shown = f"{where}: {command!r} exited {proc.returncode}:\n{output[-2000:]}"
        if code is None:
            assert proc.returncode != 0, f"{shown}\n(expected to fail)"
        else:
            assert proc.returncode == code, shown
        if text is not None:
            assert text in output, f"{shown}\n(expected {text!r} in the output)"


def fresh_env(home: Path) -> dict[str, str]:
    """A new login's environment: the system PATH with kubectl, without the venv (the README adds it)."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is not installed"
    path = [os.path.dirname(kubectl), "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
    path = [p for p in dict.fromkeys(path) if Path(p).resolve() != BIN.resolve()]
    return {"PATH": ":".join(path), "HOME": str(home), "LANG": "C.UTF-8", "TERM": "dumb"}


@dataclasses.dataclass
class DevSetup:
    root: Path  # stands for the repository root
    server: RunningServer
    banner: list[str]


def _core(directory: Path) -> Path:
    """A real kernel core of a shell killed by SIGSEGV (this machine's core_pattern is `core`)."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["bash", "-c", "(ulimit -c unlimited; sh -c 'kill -SEGV $$')"], cwd=directory, capture_output=True, check=False
    )
    core = directory / "core"
    if not core.is_file():
        pytest.skip(f"no core in {directory}: core_pattern is {Path('/proc/sys/kernel/core_pattern').read_text()!r}")
    return core


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevSetup]:
    root = tmp_path_factory.mktemp("readme") / "repo"
    root.mkdir()
    (root / ".venv").symlink_to(BIN.parent)
    dev_dir = root / ".dev"
    server = RunningServer(args=["--secure-port", "0"], dev_dir=dev_dir, log_path=root.parent / "apiserver.log")
    server.start()
    try:
        assert server.process is not None and server.process.stdout is not None
        banner = []
        for raw in server.process.stdout:  # the hints follow the "serving" line the fixture read
            line = raw.decode().rstrip("\n")
            if not line.startswith("  "):
                if banner:
                    break
                continue
            banner.append(line.strip())
            if "dev-viewer" in line:
                break
        # The pod the README's placeholders and the dump section name: one core, filed into the storage the
        # server made (the handler never creates a storage root: it is a mount).
        core = _core(root.parent / "crash")
        subprocess.run(
            [
                str(BIN / "coredump-handler"),
                "--config",
                str(root.parent / "none.json"),
                "--storage-root",
                str(dev_dir / "cores"),
                "--spool-dir",
                str(dev_dir / "spool"),
                "--state-dir",
                str(dev_dir / "state"),
                "import",
                "--namespace",
                FILED_NAMESPACE,
                "--pod",
                FILED_POD,
                "--pod-uid",
                FILED_UID,
                "--container",
                "app",
                "--time",
                FILED_TIME,
                str(core),
            ],
            check=True,
            capture_output=True,
            timeout=COMMAND_TIMEOUT,
        )
        wait_until(
            lambda: (
                server.request(
                    "GET",
                    f"/apis/coredump.example.io/v1alpha1/namespaces/{FILED_NAMESPACE}/coredumpendpoints/{FILED_POD}",
                ).status
                == 200
            ),
            what="the dev server to auto-create the filed pod's endpoint",
            interval=0.1,
        )
        yield DevSetup(root=root, server=server, banner=banner)
    finally:
        server.stop()
    assert "Traceback" not in server.log_path.read_text(), server.log_path.read_text()[-5000:]


def test_every_command_block_is_run_or_marked() -> None:
    blocks = readme_blocks(README.read_text())
    assert blocks, "README.md has no command blocks"
    for block in blocks:
        where = f"README.md:{block.line}"
        assert block.kind != "unmarked", f"{where}: a ```{block.info} block must be marked <!-- readme-test: ... -->"
        assert block.kind in KINDS, f"{where}: unknown mark {block.kind!r} (one of {sorted(KINDS)})"
        if block.kind == "run":
            assert block.info == "console", f"{where}: only console blocks ($ lines) can run"
            assert block.commands(), f"{where}: a block to run has no $ command"
    assert sum(b.kind == "run" for b in blocks) >= 5


def test_readme_commands_run_as_written(dev: DevSetup) -> None:
    # Blocks before the dev-mode walk-through (the introduction) assume a kubeconfig for some server: this one.
    env = {**fresh_env(dev.root.parent), "KUBECONFIG": str(dev.server.kubeconfig)}
    session = Session(cwd=dev.root, env=env, state=dev.root.parent / "readme-session.sh")
    ran = 0
    for block in readme_blocks(README.read_text()):
        if block.kind != "run":
            continue
        for command in block.commands():
            session.check(command, where=f"README.md:{block.line}")
            ran += 1
    # What the dev-mode walk-through leaves behind is what it promises: a real archive with the core.
    listing = subprocess.run(
        ["tar", "-tzf", str(dev.root / "cores.tar.gz")], capture_output=True, text=True, check=True
    ).stdout.split()
    assert any(name.startswith("app/") and name.endswith(".core") for name in listing), listing
    assert ran >= 10


def test_startup_hints_work_in_a_fresh_shell(dev: DevSetup, tmp_path: Path) -> None:
    hints = dev.banner
    assert any("coredump-handler" in h for h in hints) and any("Forbidden" in h for h in hints), dev.banner
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    session = Session(cwd=elsewhere, env=fresh_env(tmp_path), state=tmp_path / "hints-session.sh")
    assert session.run("command -v coredump-handler").returncode != 0  # the venv is not on this PATH
    for hint in hints:
        session.check(hint, where="start-up hint")
    assert (elsewhere / "cores.tar.gz").stat().st_size > 0


def test_dev_mode_refuses_a_storage_root_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent" / "x"
    proc = subprocess.run(
        [
            str(BIN / "coredump-apiserver"),
            "--dev",
            "--dev-dir",
            str(tmp_path / ".dev"),
            "--secure-port",
            "0",
            "--storage-root",
            str(missing),
        ],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"coredump-apiserver: --storage-root {missing} does not exist (dev mode creates only its default, "
        f"{tmp_path / '.dev' / 'cores'})"
    ]
    assert not missing.exists() and not missing.parent.exists()
    a_file = tmp_path / "file"
    a_file.write_text("")
    proc = subprocess.run(
        [str(BIN / "coredump-apiserver"), "--dev", "--dev-dir", str(tmp_path / ".dev"), "--storage-root", str(a_file)],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert (proc.returncode, proc.stderr.strip()) == (
        2,
        f"coredump-apiserver: --storage-root {a_file} is not a directory",
    )


def test_a_broken_command_fails_the_run(tmp_path: Path) -> None:
    """The checker itself: what issue 16 saw (`.../my-pod/dump` as --raw) fails, and a stated failure must fail."""
    session = Session(cwd=tmp_path, env=fresh_env(tmp_path), state=tmp_path / "session.sh")
    with pytest.raises(AssertionError, match="exited 1"):
        session.check("kubectl --kubeconfig /dev/null get --raw .../my-pod/dump", where="test")
    with pytest.raises(AssertionError, match="expected to fail"):
        session.check("true   # Forbidden", where="test")
    session.check("export GREETING=hello; cd /", where="test")
    assert session.run('test "$GREETING" = hello && test "$PWD" = /').returncode == 0  # a session carries over
