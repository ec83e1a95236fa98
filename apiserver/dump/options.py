"""The flags of ``dump?objects=true`` (how many objects, how many bytes one archive may carry), and their app key."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from aiohttp import web

from handler.flags import format_size, parse_size

from apiserver.dump.objects import DEFAULT_MAX_OBJECT_BYTES, DEFAULT_MAX_OBJECTS, ObjectLimits

if TYPE_CHECKING:
    from apiserver.options import Config

OBJECT_LIMITS: web.AppKey[ObjectLimits] = web.AppKey("dump_object_limits", ObjectLimits)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r} (a whole number, at least 1)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is less than 1")
    return value


def _size(text: str) -> int:
    value = parse_size(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size")
    return value


def add_dump_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("dump")
    g.add_argument(
        "--dump-max-objects",
        type=_positive,
        default=str(DEFAULT_MAX_OBJECTS),
        metavar="COUNT",
        help="ELF objects one dump?objects=true carries at most; the others are listed in its manifest.json",
    )
    g.add_argument(
        "--dump-max-object-bytes",
        type=_size,
        default=format_size(DEFAULT_MAX_OBJECT_BYTES),
        metavar="SIZE",
        help="bytes of ELF objects (uncompressed) one dump?objects=true carries at most, e.g. 2Gi",
    )


def object_limits(config: Config) -> ObjectLimits:
    return ObjectLimits(max_objects=config.dump_max_objects, max_bytes=config.dump_max_object_bytes)
