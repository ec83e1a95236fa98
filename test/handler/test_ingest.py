"""The ingest pipeline: bytes in order whatever order the compressors finish in, the digest of what was stored,
memory bounded behind a slow storage write, a failing write reported instead of hanging."""

from __future__ import annotations

import gzip
import os
import threading
import time

import pytest
from digests import digest_of
from waiting import wait_until

from handler import digest, ingest
from handler.config import HandlerConfig


def _chunks(n: int, size: int = 64 << 10) -> list[bytes]:
    # Alternating random and repetitive chunks: the compressors take different times on them, so they finish out
    # of order.
    return [os.urandom(size) if i % 2 else (b"frame %d " % i) * (size // 10) for i in range(n)]


@pytest.mark.parametrize("algorithm", digest.ALGORITHMS)
def test_stored_bytes_are_the_stream_in_order_with_its_digest(algorithm: str) -> None:
    chunks = _chunks(64)
    out: list[bytes] = []
    result = ingest.ingest(chunks, out.append, algorithm=algorithm, threads=2)
    data = b"".join(chunks)
    assert gzip.decompress(b"".join(out)) == data
    assert result.digest == digest_of(data, algorithm=algorithm)
    assert result.size == result.observed_size == len(data) and not result.truncated


def _held_ingest(*, sink, monkeypatch: pytest.MonkeyPatch | None = None, slow_first_compress: bool = False):
    """Ingest 200 chunks with one step of chunk 0 held until the returned event is set; returns the count of
    chunks pulled from the source (a function), that event, an event set when the ingest ended, and the chunks."""
    pulled = [0]
    release = threading.Event()
    chunks = _chunks(200, size=16 << 10)

    def source():
        for c in chunks:
            pulled[0] += 1
            yield c

    if slow_first_compress:
        assert monkeypatch is not None
        compress = ingest.isal_zlib.compress

        def held_compress(data, *args):
            if bytes(data[:16]) == chunks[0][:16]:
                release.wait()  # the head of the line: its worker is descheduled, or the chunk is slow to code
            return compress(data, *args)

        monkeypatch.setattr(ingest.isal_zlib, "compress", held_compress)
    done = threading.Event()
    t = threading.Thread(target=lambda: (ingest.ingest(source(), sink(release), threads=2), done.set()), daemon=True)
    t.start()
    return (lambda: pulled[0]), release, done, chunks


def _assert_held_at(pulled, bound: int) -> None:
    wait_until(lambda: pulled() >= bound, what="the workers to fill the queue behind the held chunk")
    for _ in range(20):  # they stay held: a worker that went on would pull past the bound within these 0.5 s
        assert pulled() == bound
        time.sleep(0.025)


def test_a_slow_storage_write_holds_the_compressors_instead_of_growing_memory() -> None:
    def sink(release: threading.Event):
        return lambda data: release.wait()  # the first write hangs, like a stuck NFS server

    pulled, release, done, _ = _held_ingest(sink=sink)
    # The writer holds chunk 0; the other worker queues READY_MAX + 1 before it waits.
    _assert_held_at(pulled, 1 + ingest.READY_MAX + 1)
    release.set()
    assert done.wait(60) and pulled() == 200


def test_a_chunk_slow_to_compress_holds_the_others_instead_of_growing_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[bytes] = []
    pulled, release, done, chunks = _held_ingest(
        sink=lambda release: written.append, monkeypatch=monkeypatch, slow_first_compress=True
    )
    # Nothing can be written before chunk 0: the other worker queues READY_MAX + 1 behind it and waits.
    _assert_held_at(pulled, 1 + ingest.READY_MAX + 1)
    assert written == []
    release.set()
    assert done.wait(60) and pulled() == 200
    assert gzip.decompress(b"".join(written)) == b"".join(chunks)  # and in order


def test_a_failing_storage_write_ends_the_ingest_with_its_error() -> None:
    calls = 0

    def sink(data: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        ingest.ingest(_chunks(100), sink, threads=2)
    assert calls == 3  # nothing written after the failure


def test_a_config_file_naming_an_unknown_digest_falls_back_to_the_default(tmp_path) -> None:
    path = tmp_path / "handler.json"
    path.write_text('{"core_digest": "md5", "compress_level": 7}')
    cfg = HandlerConfig.load(path)
    assert cfg.core_digest == digest.DEFAULT and cfg.compress_level == HandlerConfig().compress_level
