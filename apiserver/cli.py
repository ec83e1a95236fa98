"""The ``coredump-apiserver`` command: parse flags, set up logging, run the server."""
from __future__ import annotations

import logging
import sys

from apiserver import devmode, logs, options, server

logger = logging.getLogger(__name__)

build_parser = options.build_parser


def main(argv: list[str] | None = None) -> int:
    parser = options.build_parser()
    args = parser.parse_args(argv)
    options.check(args, parser)
    if args.dev and (problem := devmode.check_storage_root(storage_root=args.storage_root, directory=args.dev_dir)):
        print(f"coredump-apiserver: {problem}", file=sys.stderr)
        return 2
    logs.setup(args.log_level)
    return server.run(args)


if __name__ == "__main__":
    sys.exit(main())
