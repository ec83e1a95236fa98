"""
Outcome records: what each handler run did, left as one small JSON file for the agent.

The handler is a short-lived process per core; the agent is the long-lived one that serves metrics and posts
Events. Each run writes ``<state>/outcomes/<time>-<pid>-<rand>.json`` atomically; the agent reads, accounts and
deletes them. If the agent is away they wait (they are a few hundred bytes each).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# result values
STORED, SPOOLED, FORWARDED, DROPPED, ERROR, DRAINED = "stored", "spooled", "forwarded", "dropped", "error", "drained"


def write_outcome(outcomes_dir: Path, record: dict[str, Any]) -> Path | None:
    """Leave a record for the agent; never raises (accounting must not cost a core)."""
    try:
        Path(outcomes_dir).mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns()}-{os.getpid()}-{secrets.token_hex(3)}.json"
        tmp = Path(outcomes_dir) / f".{name}.tmp"
        tmp.write_text(json.dumps(record))
        final = Path(outcomes_dir) / name
        os.rename(tmp, final)
        return final
    except OSError as e:
        logger.error("cannot write outcome record: %s", e)
        return None


def read_outcomes(outcomes_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Committed outcome records, oldest first."""
    out = []
    try:
        names = sorted(n for n in os.listdir(outcomes_dir) if n.endswith(".json") and not n.startswith("."))
    except FileNotFoundError:
        return []
    for n in names:
        p = Path(outcomes_dir) / n
        try:
            out.append((p, json.loads(p.read_text())))
        except (OSError, ValueError) as e:
            logger.warning("dropping unreadable outcome %s: %s", p, e)
            try:
                p.unlink()
            except OSError:
                pass
    return out
