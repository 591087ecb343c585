"""What reaches the terminal: user text (file names, ids, labels, phrases, paths in error lines)
through `errors.printable`, so no terminal escape of theirs arrives raw and a newline in one
cannot forge an output line."""

from __future__ import annotations

import os

import pytest

from phrasefuse.errors import printable, printable_lines


@pytest.mark.parametrize("raw, shown", [
    ("\x1b]0;pwned\x07a.jpg", "\\x1b]0;pwned\\x07a.jpg"),  # OSC: sets the window title
    ("\x1b[2Jclear", "\\x1b[2Jclear"),
    ("a\nb\rc\td", "a\\nb\\rc\\td"),
    ("\x9b31m", "\\x9b31m"),  # a lone C1 CSI
    ("\u202eevil.jpg", "\\u202eevil.jpg"),  # right-to-left override
    ("line\u2028sep", "line\\u2028sep"),
    (os.fsdecode(b"\xff\xfename"), "\\xff\\xfename"),  # bytes that were not UTF-8
    ("héllo 日本 \\ plain", "héllo 日本 \\ plain"),  # printable text is left alone
])
def test_printable_escapes_what_a_terminal_would_act_on(raw, shown):
    assert printable(raw) == shown
    printable(raw).encode("utf-8")  # never a lone surrogate: printing it cannot raise


def test_printable_lines_keeps_the_lines_and_escapes_within_them():
    assert printable_lines("a\x1b]0;t\x07\nb") == "a\\x1b]0;t\\x07\nb"


def test_lookup_and_inspect_lines_show_names_as_one_escaped_line():
    from phrasefuse.folder_report import Report
    from phrasefuse.index.lookup import LookupResult

    text = LookupResult(["x.jpg\n  0.999  forged"], [["a\x1b[31m", "b"]], [[0.9, 0.8]]).text()
    assert text.splitlines() == ["x.jpg\\n  0.999  forged", "   0.900  a\\x1b[31m", "   0.800  b"]
    text = Report("head", "h\nx", {"labels": "2 (a\nb, c)"}, problems=["p\x1b]0;t\x07"], verified=True).text()
    assert len(text.splitlines()) == 4 and "\x1b" not in text and "2 (a\\nb, c)" in text
