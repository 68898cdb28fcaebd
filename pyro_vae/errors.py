"""The two ways a run can end badly, each with its own exit status.

``UserInputError`` is bad input (spec, data, checkpoint, command line): the
command line prints its one-line message and exits with status 2.
``NonFiniteError`` is a loss or gradient that stopped being finite during
training: exit status 3, the last good checkpoint untouched.
"""


def one_line(exc: BaseException, limit: int | None = None) -> str:
    """An exception's message as one line (whitespace runs collapsed), cut to ``limit`` characters."""
    text = " ".join(str(exc).split())
    return text if limit is None else text[:limit]


class UserInputError(Exception):
    """Bad input from the user; the message is one line naming the key or file."""

    exit_status = 2


class NonFiniteError(RuntimeError):
    """Training produced a NaN or infinite loss or gradient."""

    exit_status = 3
