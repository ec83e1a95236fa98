"""
The one flag language (handler.flags) as the three programs' users meet it: the same spelling is accepted or
refused with the same one line by the API server, the agent and the handler.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from handler import flags


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("1m30s", 90), ("1h", 3600), ("300ms", 0.3), ("0", 0), ("1.5h", 5400)]
)
def test_go_durations(text: str, seconds: float) -> None:
    assert flags.parse_duration(text) == pytest.approx(seconds)


def test_days_and_weeks_only_where_retention_takes_them() -> None:
    assert flags.parse_retention_duration("2w") == 14 * 86400 and flags.parse_retention_duration("1d12h") == 1.5 * 86400
    with pytest.raises(argparse.ArgumentTypeError, match="not a duration: '1d'"):
        flags.parse_duration("1d")


@pytest.mark.parametrize(("text", "size"), [("4096", 4096), ("64Mi", 64 << 20), ("1G", 10**9), ("1.5Gi", 3 << 29)])
def test_sizes_are_kubernetes_quantities(text: str, size: int) -> None:
    assert flags.parse_size(text) == size
    assert flags.parse_size(flags.format_size(size)) == size


@pytest.mark.parametrize("bad", ["64MB", "-1", "1 Gi", "ten"])
def test_bad_sizes_are_refused(bad: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        flags.parse_size(bad)


def test_positive_durations_counts_ports_lists() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="more than zero"):
        flags.parse_positive_duration("0s")
    with pytest.raises(argparse.ArgumentTypeError, match="not a count"):
        flags.parse_count("-1")
    with pytest.raises(argparse.ArgumentTypeError, match="not a port"):
        flags.parse_port("65536")
    assert flags.parse_list(" a, b,,c ") == ("a", "b", "c")


def test_kubernetes_style_booleans() -> None:
    parser = argparse.ArgumentParser()
    flags.add_bool(parser, "--on", default=True, help="x")
    assert parser.parse_args([]).on is True
    assert parser.parse_args(["--on=false"]).on is False and parser.parse_args(["--on"]).on is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--on=maybe"])


@pytest.mark.parametrize(
    ("module", "argv"),
    [
        ("apiserver.cli", ["--dev", "--tls-cert-reload-interval=30"]),
        ("handler.agent.cli", ["--drain-interval=30"]),
        ("handler.cli", ["--stall-timeout=30", "drain"]),
    ],
)
def test_every_program_refuses_a_bare_number_as_a_duration_in_one_line(module: str, argv: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    (line,) = [line for line in result.stderr.splitlines() if "error:" in line]
    assert "not a duration: '30' (use e.g. 90s, 1m30s, 1h)" in line and "Traceback" not in result.stderr


def test_api_server_config_has_a_field_for_every_flag() -> None:
    """A flag added without its Config field would stop the server at startup: caught here instead."""
    from apiserver import options

    config = options.parse(["--dev"])
    assert config.dev and config.tls_cert_reload_interval == 60 and config.auth.anonymous_auth is False
