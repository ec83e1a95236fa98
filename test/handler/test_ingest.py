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


def test_a_slow_storage_write_holds_the_compressors_instead_of_growing_memory() -> None:
    pulled = 0
    release = threading.Event()

    def source():
        nonlocal pulled
        for c in _chunks(200, size=16 << 10):
            pulled += 1
            yield c

    def sink(data: bytes) -> None:
        release.wait()  # the first write hangs, like a stuck NFS server

    done = threading.Event()
    t = threading.Thread(target=lambda: (ingest.ingest(source(), sink, threads=2), done.set()), daemon=True)
    t.start()
    # The writer holds chunk 0; the other worker queues at most READY_MAX more past the one it waits with.
    bound = 1 + ingest.READY_MAX + 1
    wait_until(lambda: pulled >= bound, what="the workers to fill the queue behind the stuck write")
    for _ in range(20):  # they stay held: a worker that went on would pull past the bound within these 0.5 s
        assert pulled == bound
        time.sleep(0.025)
    release.set()
    assert done.wait(60) and pulled == 200


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
