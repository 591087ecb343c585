"""The one error type that means "the user's input is wrong" (exit status 2).

Everything else that goes wrong is a bug or an environment failure (exit status 1).
"""


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
