"""Progress of every batch job (engine.progress): without a terminal, lines with done/total, rate, ETA."""

from __future__ import annotations

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
