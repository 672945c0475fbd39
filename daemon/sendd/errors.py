"""Errors a user can act on: the CLI prints them as one line, never a traceback."""


class UserError(Exception):
    """Bad input or an unmet precondition; str() is one line that says what to do."""
