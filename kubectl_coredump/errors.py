"""
What can go wrong, as one line for the user and an exit code for scripts.

Every failure the plugin reports is a :class:`PluginError`: its message is printed as one line on stderr
(``error: ...``) and the process exits with its ``code``. The codes are part of the interface (README,
``--help``); keep them stable.
"""

from __future__ import annotations

import enum


class Exit(enum.IntEnum):
    """The plugin's exit codes."""

    OK = 0
    ERROR = 1  # anything not listed below: network, server error, bad local state
    USAGE = 2  # bad command line (argparse's own code)
    NOT_FOUND = 3  # no such endpoint, core or container; no cores match the filters
    FORBIDDEN = 4  # 401/403: not logged in, or RBAC says no
    UNAVAILABLE = 5  # the coredump.example.io API is not served (APIService missing or down)
    VERIFY_FAILED = 6  # a core's bytes do not match the digest of its metadata, or the archive is damaged
    INCOMPLETE = 7  # the download did not complete within the retries


EXIT_CODES_HELP = """exit codes:
  0  success
  1  other error (network, server error, local files)
  2  bad command line
  3  not found: no such endpoint, core or container, or no core matches the filters
  4  forbidden: not authenticated, or RBAC does not allow the request
  5  the coredump.example.io API is not available on this cluster
  6  verification failed: a core does not match the digest in its metadata
  7  the download did not complete after the retries"""


class PluginError(Exception):
    """A failure to report in one line, with the exit code that classifies it."""

    def __init__(self, message: str, *, code: Exit = Exit.ERROR, http_status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.http_status = http_status  # the API's answer when the error is one
