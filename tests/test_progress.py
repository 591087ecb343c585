"""Progress of every batch job (engine.progress): without a terminal, lines with done/total, rate, ETA;
none with --json (index build's: tests/index/test_streaming.py)."""

from __future__ import annotations

import json

import pytest

from phrasefuse import engine
from phrasefuse.engine import _progress_lines, progress


def test_lines_without_a_terminal(capsys):
    advance = _progress_lines(100, "extract images", every=0.0)  # every call may print: no clock raced
    advance(25)
    advance(25)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("extract images: 50/100 (50%), ")
    assert "rows/s, ETA " in lines[-1]


def test_disabled_and_throttled(capsys):
    with progress(10, "x", False) as advance:
        advance(10)
    advance = _progress_lines(10, "x", every=3600.0)  # at most one line an hour: none now
    advance(5)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("command", [["extract", "images", "--workers", "0"], ["extract", "texts", "--col", "title"]])
def test_extract_prints_progress_lines_and_none_with_json(command, shapes_dataset, tiny_clip_spec, tmp_path,
                                                           monkeypatch):
    from typer.testing import CliRunner

    from phrasefuse.cli import app

    monkeypatch.setattr(engine, "LOG_EVERY", 0.0)  # no terminal: a line at every batch, no clock raced
    args = [*command[:2], str(shapes_dataset), *command[2:], "--model", tiny_clip_spec, "--batch-size", "8",
            "--limit", "16"]
    text = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "text")])
    assert text.exit_code == 0, text.output
    label = " ".join(command[:2]) + (" (title)" if command[1] == "texts" else "")
    lines = [line for line in text.stderr.splitlines() if line.startswith(f"{label}: ")]
    assert lines and "(100%), " in lines[-1] and " rows/s, ETA " in lines[-1], text.stderr
    as_json = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "json"), "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert as_json.stderr == "" and json.loads(as_json.stdout)["embedded"] > 0
