"""
``dump?objects=true`` end to end, on real programs: built by gcc, run in roots of their own (like container images),
held at their crash site and filed by the real node handler with their real pids (so it keeps their ELF objects),
then deleted with their roots; the archive, downloaded with the real kubectl through the real API server and
unpacked with tar, still gives gdb a symbolized backtrace.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from handler import layout
from handler import objects as store

from apiserver.dump.objects import ObjectLimits
from apiserver.dump.plan import build_plan
from apiserver.dump.stream import iter_range

from fixtures_apiserver import RunningServer, collection_path, endpoint_manifest, start_apiserver
from fixtures_crash_image import Image, Node, delete_image, hold, make_image
from digests import content_matches

pytestmark = pytest.mark.kubectl

DUMP = "/apis/coredump.example.io/v1alpha1/namespaces/{ns}/coredumpendpoints/{name}/dump"
T0 = 1795000000


@dataclasses.dataclass
class Pod:
    namespace: str
    name: str
    uid: str
    cores: list[layout.StoredCore] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class World:
    server: RunningServer
    storage: Path
    pods: dict[str, Pod]
    stored_after_first: set[Path]
    stored_after_second: set[Path]
    secret_build_id: str


def _stored_objects(storage: Path) -> set[Path]:
    return set((storage / store.STORE_DIR).rglob(store.OBJECT_NAME))


def _crash(
    node: Node,
    image: Image,
    pod: Pod,
    *args: str,
    when: int,
    config: dict[str, object] | None = None,
    data: bytes | None = None,
) -> layout.StoredCore:
    node.add_pod(namespace=pod.namespace, pod=pod.name, pod_uid=pod.uid, container="app")
    held = hold(image, *args)
    try:
        result = node.capture(held, pod_uid=pod.uid, when=when, config=config, data=data)
    finally:
        held.release()
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    known = {c.ref.core_id for c in pod.cores}
    (core,) = [
        c for c in layout.list_cores(node.storage, namespace=pod.namespace, pod=pod.name) if c.ref.core_id not in known
    ]
    pod.cores.append(core)
    return core


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("objdump")
    storage = base / "storage"
    node = Node(base / "node", storage=storage)
    pods = {
        key: Pod(namespace=ns, name=name, uid=str(uuid.uuid4()))
        for key, ns, name in [
            ("debug-info", "team-a", "web-0"),
            ("symbols", "team-a", "sym-0"),
            ("stripped", "team-a", "strip-0"),
            ("secret", "team-b", "secret-0"),
            ("forger", "team-a", "forger-0"),
            ("budget", "team-a", "budget-0"),
        ]
    }
    # Each its own flavour: strip keeps the build-id, so a stripped twin of the symbols image would have the same
    # one (and, being other bytes, would not count as that stored object: see test_a_stripped_twin_...).
    images = {kind: make_image(base / kind, kind=kind, flavour=kind) for kind in ("debug-info", "symbols", "stripped")}
    images["secret"] = make_image(base / "secret", kind="debug-info", flavour="team-b-secret-flavour")
    images["forger"] = make_image(base / "forger", kind="debug-info", flavour="forger")
    images["budget"] = make_image(base / "budget", kind="symbols", flavour="budget")

    # Same path twice (the second copies nothing), then the other path.
    _crash(node, images["debug-info"], pods["debug-info"], when=T0)
    first = _stored_objects(storage)
    _crash(node, images["debug-info"], pods["debug-info"], when=T0 + 1)
    second = _stored_objects(storage)
    _crash(node, images["debug-info"], pods["debug-info"], "there", when=T0 + 2)
    for kind in ("symbols", "stripped"):
        _crash(node, images[kind], pods[kind], when=T0)
    secret = _crash(node, images["secret"], pods["secret"], when=T0)
    secret_id = next(o["buildID"] for o in secret.metadata["objects"] if o["path"] == "/app/prog")
    # Namespace A's program writes B's build-id into its own ELF header in memory before it crashes.
    _crash(node, images["forger"], pods["forger"], "forge", secret_id, when=T0)
    # Budgets: nothing may be copied; and a core without any note (an ELF header and zeros).
    _crash(node, images["budget"], pods["budget"], when=T0 + 5, config={"objects_max_bytes": 1})
    _crash(node, images["budget"], pods["budget"], when=T0 + 6, data=b"\x7fELF\x02\x01\x01" + b"\0" * 8000)
    for image in images.values():
        delete_image(image)

    server = start_apiserver(base / "server", "--storage-root", str(storage))
    try:
        for pod in pods.values():
            created = server.request(
                "POST",
                collection_path(pod.namespace),
                body=endpoint_manifest(pod.name, namespace=pod.namespace, pod_uid=pod.uid),
            )
            assert created.status in (201, 409), created.body  # 409: the server auto-created it first
        yield World(
            server=server,
            storage=storage,
            pods=pods,
            stored_after_first=first,
            stored_after_second=second,
            secret_build_id=secret_id,
        )
    finally:
        server.stop()
    assert "Traceback" not in server.log_path.read_text(), server.log_path.read_text()[-5000:]


def download(world: World, pod: Pod, directory: Path, *, query: str = "objects=true") -> Path:
    """The README's recipe: kubectl get --raw '.../dump?objects=true' | tar xz."""
    directory.mkdir(parents=True)
    path = DUMP.format(ns=pod.namespace, name=pod.name) + f"?{query}"
    env = {"HOME": str(world.server.dev_dir), "PATH": os.environ["PATH"]}
    subprocess.run(
        f"kubectl --kubeconfig {world.server.kubeconfig} get --raw '{path}' | tar xz",
        shell=True,
        check=True,
        cwd=directory,
        env=env,
        timeout=120,
    )
    return directory


def gdb(directory: Path, script: str) -> str:
    out = subprocess.run(
        ["gdb", "-batch", "-nx", "-x", script, "-ex", "info sharedlibrary"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": os.environ["PATH"], "HOME": str(directory)},
    )
    return out.stdout + out.stderr


def manifest(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "manifest.json").read_text())


@pytest.mark.parametrize("kind", ["debug-info", "symbols", "stripped"])
def test_after_the_program_and_its_root_are_gone_gdb_symbolizes_from_the_archive(
    world: World, kind: str, tmp_path: Path
) -> None:
    pod = world.pods[kind]
    core = pod.cores[0]
    # The stored backtrace, at capture, named the crashing function (offsets only when stripped).
    frames = core.metadata["backtrace"]["threads"][0]["frames"]
    if kind != "stripped":
        assert "crash_here" in [f.get("function") for f in frames], frames
    assert not (world.storage.parent / kind).exists()  # the program, its libraries, its root: gone

    out_dir = download(world, pod, tmp_path / "x", query=f"objects=true&core={core.ref.core_id}")
    man = manifest(out_dir)
    (entry,) = man["cores"]
    assert entry["skipped"] == [] and {o["path"] for o in entry["objects"]} == {
        "/app/prog",
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/ld-linux-x86-64.so.2",
    }
    for o in entry["objects"]:
        data = (out_dir / o["file"]).read_bytes()
        assert len(data) == o["size"] and store.build_id_of_bytes(data) == o["buildID"]
    out = gdb(out_dir, entry["gdb"])
    # every shared library came from the archive's sysroot, not from this machine
    assert "sysroot/lib/x86_64-linux-gnu/libc.so.6" in out and "sysroot/lib64/ld-linux-x86-64.so.2" in out, out
    assert "No symbol table is loaded" not in out and "warning: Could not load shared library symbols" not in out
    if kind == "debug-info":
        assert "crash_here (p=" in out and "prog.c:" in out and " on_the_way (" in out and " main (" in out, out
    elif kind == "symbols":
        assert "in crash_here ()" in out and "in main ()" in out, out
    else:
        assert "raise" in out and "in ?? ()" in out, out  # libc named from the archive's libc; the program not


def test_second_crash_copies_nothing_and_each_object_is_in_the_archive_once(world: World, tmp_path: Path) -> None:
    first, second, other = world.pods["debug-info"].cores
    assert world.stored_after_second == world.stored_after_first  # nothing new in the store
    assert {o["state"] for o in second.metadata["objects"]} == {"stored-earlier"}
    assert all("size" not in o for o in second.metadata["objects"])  # not copied: only checked against the store
    # Two crashes on one code path share a signature; the other path differs (ASLR moved every address).
    assert first.metadata["signature"] == second.metadata["signature"] != other.metadata["signature"]

    archive = tmp_path / "a.tar.gz"
    path = DUMP.format(ns="team-a", name="web-0") + "?objects=true"
    got = world.server.request("GET", path)
    assert got.status == 200
    archive.write_bytes(got.body)
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        files = [m for m in members if m.name.startswith("sysroot/") and m.isfile()]
        bodies = [tf.extractfile(m).read() for m in files]  # type: ignore[union-attr]
    assert len(files) == len({hashlib.sha256(b).digest() for b in bodies}) == 3  # once each, for three cores
    assert sorted(m.name for m in members if m.name.endswith(".gdb")) == sorted(
        f"app_{c.ref.core_id}.gdb" for c in (first, second, other)
    )
    out_dir = tmp_path / "x"
    with tarfile.open(archive) as tf:
        tf.extractall(out_dir, filter="data")
    assert "crash_there (p=" in gdb(out_dir, f"app_{other.ref.core_id}.gdb")


def test_a_forged_build_id_gets_no_other_namespace_s_object(world: World, tmp_path: Path) -> None:
    (forger,) = world.pods["forger"].cores
    prog = next(o for o in forger.metadata["objects"] if o["path"] == "/app/prog")
    # The core showed B's build-id; the handler read A's own mapped file and found other bytes.
    assert prog["buildID"] == world.secret_build_id
    assert prog["state"] == "skipped" and prog["reason"] == store.DIFFERS
    out_dir = download(world, world.pods["forger"], tmp_path / "a")
    (entry,) = manifest(out_dir)["cores"]
    assert {
        "path": "/app/prog",
        "buildID": world.secret_build_id,
        "reason": f"not stored at capture: {store.DIFFERS}",
    } in entry["skipped"]
    assert not (out_dir / "sysroot/app/prog").exists()
    secret = b"team-b-secret-flavour"
    assert not any(secret in p.read_bytes() for p in (out_dir / "sysroot").rglob("*") if p.is_file())
    # libc is the very same bytes in both images: A's process mapped it, so A gets it (content-addressed, shared)
    assert (out_dir / "sysroot/lib/x86_64-linux-gnu/libc.so.6").is_file()
    # control: B's own dump carries B's program
    b_dir = download(world, world.pods["secret"], tmp_path / "b")
    assert secret in (b_dir / "sysroot/app/prog").read_bytes()


def test_budgets_and_a_core_without_notes_are_recorded_in_metadata_and_manifest_and_the_cores_kept(
    world: World, tmp_path: Path
) -> None:
    tight, junk = world.pods["budget"].cores
    # Its program is new: over the byte budget, not copied; its libraries were stored by earlier crashes.
    states = {o["path"]: (o["state"], o.get("reason")) for o in tight.metadata["objects"]}
    assert states.pop("/app/prog") == ("skipped", "byte budget")
    assert set(states.values()) == {("stored-earlier", None)}
    assert junk.metadata["objects"] == [] and "backtraceError" in junk.metadata
    out_dir = download(world, world.pods["budget"], tmp_path / "x")
    by_core = {e["core"]: e for e in manifest(out_dir)["cores"]}
    t, j = by_core[f"app/{tight.ref.core_id}.core"], by_core[f"app/{junk.ref.core_id}.core"]
    assert [(s["path"], s["reason"]) for s in t["skipped"]] == [("/app/prog", "not stored at capture: byte budget")]
    assert {o["path"] for o in t["objects"]} == set(states)
    assert not (out_dir / "sysroot/app/prog").exists()
    assert j["objects"] == [] and "no mapped ELF object" in j["note"] and j["backtraceError"]
    for core in (tight, junk):  # both cores are in the archive, whole
        data = (out_dir / f"app/{core.ref.core_id}.core").read_bytes()
        assert content_matches(data, core.metadata)
    # gdb files still open the core: the one without objects gets no sysroot, the other no `file`
    assert "set sysroot" not in (out_dir / j["gdb"]).read_text()
    script = (out_dir / t["gdb"]).read_text()
    assert "\nfile " not in script and "set sysroot sysroot" in script


def test_limits_per_dump_are_listed_in_the_manifest(world: World) -> None:
    cores = world.pods["debug-info"].cores

    async def whole(limits: ObjectLimits) -> bytes:
        plan = build_plan(cores, objects=limits)
        return b"".join([c async for c in iter_range(plan)])

    import asyncio

    for limits, reason in [
        (ObjectLimits(max_objects=1), "dump object limit (1 objects)"),
        (ObjectLimits(max_bytes=100_000), "dump object byte limit (100000 bytes)"),
    ]:
        data = asyncio.run(whole(limits))
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            man = json.loads(tf.extractfile("manifest.json").read())  # type: ignore[union-attr]
            files = [m for m in tf.getmembers() if m.name.startswith("sysroot/") and m.isfile()]
        assert len(files) == man["objects"] == 1 and man["objectBytes"] <= limits.max_bytes
        assert all(reason in {s["reason"] for s in e["skipped"]} for e in man["cores"])


def test_ranges_resume_the_objects_archive_and_the_etag_covers_the_objects(world: World) -> None:
    path = DUMP.format(ns="team-a", name="web-0")
    whole = world.server.request("GET", path + "?objects=true")
    plain = world.server.request("GET", path)
    etag = whole.headers["ETag"]
    assert etag != plain.headers["ETag"] and len(whole.body) > len(plain.body)
    size = len(whole.body)
    cuts = [0, size // 3, size // 3 + 1, 2 * size // 3, size]
    parts = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        got = world.server.request(
            "GET", path + "?objects=true", headers={"Range": f"bytes={a}-{b - 1}", "If-Range": etag}
        )
        assert got.status == 206 and got.headers["Content-Range"] == f"bytes {a}-{b - 1}/{size}"
        parts.append(got.body)
    assert b"".join(parts) == whole.body
    assert len(gzip.decompress(whole.body)) % tarfile.RECORDSIZE == 0
