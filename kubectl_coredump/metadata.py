"""
A core's metadata JSON without downloading the core: the head of its one-core dump.

The archive's first gzip member holds the tar header and body of ``<container>/<core-id>.json`` (see
``apiserver/dump/plan.py``), so ``GET .../dump?core=ID&container=C`` with ``Range: bytes=0-N`` and a read
that stops once that member is complete costs a few KiB, whatever the size of the core. This needs the
same permission as the dump itself (``coredump:dump``).
"""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from typing import Any

from kubectl_coredump import api
from kubectl_coredump.errors import Exit, PluginError
from kubectl_coredump.transport import Client

HEAD_BYTES = 4 * 1024 * 1024  # compressed bytes asked for; the metadata member is far smaller
MAX_METADATA_BYTES = 16 * 1024 * 1024


def fetch_metadata(client: Client, *, namespace: str, name: str, container: str, core_id: str) -> dict[str, Any]:
    response = client.get(
        api.dump_path(namespace, name),
        query=[("container", container), ("core", core_id)],
        headers={"Range": f"bytes=0-{HEAD_BYTES - 1}"},
    )
    try:
        if response.status not in (200, 206):
            body = api.read_bounded(response, limit=1 << 16)
            raise api.error_for(
                status=response.status, body=body, request=api.dump_request(namespace, name), server=client.server
            )
        inflater = zlib.decompressobj(31)
        plain = bytearray()
        received = 0
        buffer = memoryview(bytearray(1 << 16))
        while count := response.readinto(buffer):
            received += count
            plain += inflater.decompress(buffer[:count], MAX_METADATA_BYTES + 1024 - len(plain))
            if inflater.eof or len(plain) > MAX_METADATA_BYTES or received >= HEAD_BYTES:
                break
    except zlib.error as exc:
        raise PluginError(f"the dump of {container}/{core_id} is damaged: {exc}", code=Exit.VERIFY_FAILED) from None
    finally:
        response.close()  # stop the transfer (the rest is the core): the connection is dropped
    return _parse(bytes(plain), container=container, core_id=core_id)


def _parse(data: bytes, *, container: str, core_id: str) -> dict[str, Any]:
    wanted = f"{container}/{core_id}.json"
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as archive:
            for member in archive:
                if member.name == wanted and member.isfile() and member.size <= MAX_METADATA_BYTES:
                    source = archive.extractfile(member)
                    assert source is not None
                    meta = json.loads(source.read())
                    if isinstance(meta, dict):
                        return meta
                break
    except (tarfile.TarError, ValueError, EOFError):
        pass
    raise PluginError(f"the dump of {container}/{core_id} does not start with its metadata", code=Exit.VERIFY_FAILED)
