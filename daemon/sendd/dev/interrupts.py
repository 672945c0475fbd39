"""Ctrl-C and stop signals for commands that start servers as children (`sendd demo`,
load/bench.py): whatever stops the command, the children are stopped on the way out.

The children run in their own sessions (so a Ctrl-C at the terminal reaches only the command,
which stops them in order), which means dying by a signal's default action would leave them
running: SIGTERM and SIGHUP are turned into Ctrl-C instead, and the unwinding runs with every
stop signal held off, so an impatient second Ctrl-C cannot leave a server behind.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from sendd.dev.pgserver import ServerError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Within: SIGTERM and SIGHUP act like Ctrl-C (KeyboardInterrupt)."""
    with signals_handled((signal.SIGTERM, signal.SIGHUP), _as_ctrl_c):
        yield


def unwind(stack: ExitStack, command: str) -> None:
    """Close the stack (children, PostgreSQL, temp dirs) with stop signals held off; a failure
    to stop PostgreSQL is reported as one line, not raised."""
    with signals_handled(STOP_SIGNALS, signal.SIG_IGN):
        try:
            stack.close()
        except ServerError as error:
            print(f"{command}: stopping PostgreSQL: {error}", file=sys.stderr)


def during_interrupt(error: BaseException) -> bool:
    """Whether error was raised while handling a Ctrl-C (PrivatePostgres cleans up after an
    interrupted start, and that cleanup can fail too)."""
    context = error.__context__
    while context is not None:
        if isinstance(context, KeyboardInterrupt):
            return True
        context = context.__context__
    return False


@contextmanager
def signals_handled(signums: tuple[int, ...], handler: Any) -> Iterator[None]:
    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _as_ctrl_c(signum: int, frame: object) -> None:
    # Re-raised as SIGINT, so an asyncio loop running now stops the way it does for Ctrl-C
    # (cancelling its task) instead of being torn through by an exception.
    if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL, None):
        raise KeyboardInterrupt
    signal.raise_signal(signal.SIGINT)
