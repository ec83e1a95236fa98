"""
A one-line progress bar on stderr: bytes, total (from Content-Length), rate, ETA, and resumes so far.

Shown only when stderr is a terminal and not ``-q`` (the caller decides with :func:`wanted`); redrawn at
most ten times a second, so it costs nothing measurable on a fast download.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import TextIO

from kubectl_coredump.model import human_size

REDRAW_SECONDS = 0.1


def wanted(*, quiet: bool, stream: TextIO = sys.stderr) -> bool:
    return not quiet and stream.isatty() and os.environ.get("TERM") != "dumb"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


class Progress:
    """Receives the download's events; draws only when ``enabled``."""

    def __init__(self, *, enabled: bool, label: str, stream: TextIO = sys.stderr) -> None:
        self.enabled = enabled
        self.label = label
        self.stream = stream
        self.total: int | None = None
        self.done = 0
        self.resumes = 0
        self._began = time.monotonic()
        self._base = 0  # bytes already there when the rate clock started (a resume does not inflate it)
        self._drawn = 0.0

    def start(self, *, total: int | None, offset: int) -> None:
        self.total = total
        if offset == 0:
            self._began, self._base = time.monotonic(), 0

    def advance(self, *, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if self.enabled and now - self._drawn >= REDRAW_SECONDS:
            self._drawn = now
            self._draw(now)

    def resumed(self) -> None:
        self.resumes += 1

    def line(self, now: float) -> str:
        elapsed = max(now - self._began, 1e-6)
        rate = (self.done - self._base) / elapsed
        parts = [self.label]
        if self.total:
            fraction = min(self.done / self.total, 1.0)
            width = 20
            filled = int(fraction * width)
            parts.append(f"[{'#' * filled}{'.' * (width - filled)}] {fraction * 100:5.1f}%")
            parts.append(f"{human_size(self.done)}/{human_size(self.total)}")
        else:
            parts.append(human_size(self.done))
        parts.append(f"{human_size(int(rate))}/s")
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        if self.resumes:
            parts.append(f"resumed {self.resumes}×")
        return "  ".join(parts)

    def _draw(self, now: float) -> None:
        columns = shutil.get_terminal_size((100, 20)).columns
        self.stream.write("\r" + self.line(now)[: columns - 1].ljust(columns - 1))
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

    def note(self, message: str) -> None:
        """A line that must not be overdrawn by the bar (a resume, a warning)."""
        if self.enabled:
            self.stream.write("\r" + " " * (shutil.get_terminal_size((100, 20)).columns - 1) + "\r")
        self.stream.write(message + "\n")
        self.stream.flush()
