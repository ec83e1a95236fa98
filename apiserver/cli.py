"""The ``coredump-apiserver`` command: flags to a :class:`~apiserver.options.Config`, logging, the server."""

from __future__ import annotations

import sys

from apiserver import devmode, logs, options, server

build_parser = options.build_parser


def main(argv: list[str] | None = None) -> int:
    config = options.parse(argv)
    if config.dev and (
        problem := devmode.check_storage_root(storage_root=config.storage_root, directory=config.dev_dir)
    ):
        print(f"coredump-apiserver: {problem}", file=sys.stderr)
        return 2
    logs.setup(config.log_level)
    return server.run(config)


if __name__ == "__main__":
    sys.exit(main())
