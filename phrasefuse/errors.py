"""The one error type that means "the user's input is wrong" (exit status 2).

Everything else that goes wrong is a bug or an environment failure (exit status 1).
Also: user text made safe to print on a terminal (`printable`).
"""

import re


class BadInput(Exception):
    """Bad usage or bad input.

    The message is one line that names the file, the row or the column, and what to
    do about it. The CLI prints it without a traceback and exits with status 2.
    """


# Seeds reach NumPy, torch and LightGBM (a C int): every one of them takes 0 .. 2**31 - 1.
MAX_SEED = 2**31 - 1


def check_seed(seed: int, what: str = "--seed", count: int = 1) -> int:
    """`seed` (and the `count` - 1 seeds after it) as every library takes them, else BadInput naming `what`."""
    if not 0 <= seed <= MAX_SEED - (count - 1):
        raise BadInput(f"{what} {seed}: must be a whole number from 0 to {MAX_SEED - (count - 1)}")
    return seed


# What a terminal must never receive raw from a file name, label or other user text: C0 controls
# (ESC starts the escape sequences that set a window title or clear the screen; a newline forges an
# output line), DEL and C1 controls (a lone CSI), the Unicode line separators, the bidirectional
# overrides that make text read in another order, and the surrogates that stand for bytes of a name
# that were not UTF-8 (printing one raises UnicodeEncodeError).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match) -> str:
    char = match.group()
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for the byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object) -> str:
    """`text` as it may be printed to a terminal: every character above (`_UNPRINTABLE`) written as
    a visible escape (`\\n`, `\\x1b`, `\\u202e`, `\\xff` for a byte that was not UTF-8), the rest
    unchanged, so one name is one line and shows what it holds."""
    text = str(text)
    return _UNPRINTABLE.sub(_escape, text) if _UNPRINTABLE.search(text) else text


def printable_lines(text: str) -> str:
    """A command's output text: each of its lines through `printable` (its own newlines kept)."""
    return "\n".join(printable(line) for line in text.split("\n"))
