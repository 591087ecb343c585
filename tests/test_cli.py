"""The CLI contract's exit statuses and one-line errors (DESIGN.md, The CLI contract)."""

import pytest

from tests.conftest import run_cli


@pytest.mark.parametrize("args,expected", [
    (["extract", "images"], "Missing argument"),
    (["extract", "images", "m.csv", "--out", "s", "--device", "gpu"], "--device"),
    (["no-such-command"], "No such command"),
])
def test_usage_errors_are_one_line_and_exit_2(args, expected):
    proc = run_cli(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and lines[0].startswith("phrasefuse: error:")
    assert proc.stdout == ""


def test_help_lists_the_contract_commands():
    proc = run_cli("--help", check=True)
    for command in ("extract", "index", "phrases", "inspect"):
        assert command in proc.stdout
