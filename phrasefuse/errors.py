"""The one error type that means "the user's input is wrong" (exit status 2).

Everything else that goes wrong is a bug or an environment failure (exit status 1).
"""


class BadInput(Exception):
    """Bad usage or bad input.

    The message is one line that names the file, the row or the column, and what to
    do about it. The CLI prints it without a traceback and exits with status 2.
    """
