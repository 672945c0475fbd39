"""Errors a user can act on, and the one way errors are told in one line.

The CLI prints a UserError as one line, never a traceback; logs, status and health replies
describe any other error with `describe` and find an actor's own error inside trio's exception
groups with `first_leaf`.
"""


class UserError(Exception):
    """Bad input or an unmet precondition; str() is one line that says what to do."""


def describe(error: BaseException, *, typed: bool = False) -> str:
    """The first line of the error's message, or its type's name when it has none; `typed`:
    the type's name first ("ValueError: bad value"), for errors nobody expected."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    line = text.splitlines()[0]
    return f"{type(error).__name__}: {line}" if typed else line


def first_leaf(error: BaseException) -> BaseException:
    """The first error inside (possibly nested) exception groups."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def contains(error: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    """Is `error`, or anything in it when it is an exception group, one of `kinds`?"""
    if isinstance(error, kinds):
        return True
    if isinstance(error, BaseExceptionGroup):
        return any(contains(inner, kinds) for inner in error.exceptions)
    return False
