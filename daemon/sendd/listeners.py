"""Accept loops for the daemon's listeners (the control socket, HTTP) that bound their
connections and outlive running out of file descriptors.

A listener holds at most `limit` connections. When it is full it stops accepting: newcomers
wait in the kernel's listen queue (which costs this process no descriptor) until a connection
ends, and `make_room` is called so the server can end one early (the control socket closes its
oldest idle connection). `accept` failing for want of descriptors or memory (EMFILE, ENFILE,
ENOMEM, ENOBUFS) is retried after ACCEPT_RETRY and logged as one line per REPEAT_INTERVAL,
never as a traceback.
"""

from __future__ import annotations

import errno
import os
import resource
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from sendd.logs import Throttle

ACCEPT_RETRY = 0.5  # seconds between attempts while accept fails for want of resources
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


def connection_limit(wanted: int, share: float) -> int:
    """`wanted`, but at most `share` of this process's descriptor limit, so the listeners can
    never take the descriptors the pipeline needs (database, providers)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, int(soft * share)))


async def accept(listener: trio.SocketListener, log: Any, name: str,
                 throttle: Throttle) -> trio.SocketStream:
    """The next connection; waits out a lack of descriptors or memory."""
    while True:
        try:
            return await listener.accept()
        except OSError as error:
            if error.errno not in ACCEPT_CAPACITY_ERRNOS:
                raise
            held = throttle.allow(error.errno)
            if held is not None:
                log.error("accept_failed", listener=name, error=errno.errorcode[error.errno],
                          detail=os.strerror(error.errno), retry_in=ACCEPT_RETRY,
                          repeated=held)
            await trio.sleep(ACCEPT_RETRY)


async def serve_bounded(listener: trio.SocketListener,
                        handler: Callable[[trio.SocketStream], Awaitable[None]], *,
                        limit: int, log: Any, name: str,
                        make_room: Callable[[], None] = lambda: None) -> None:
    """Run `handler(stream)` for each connection, at most `limit` at once, until cancelled.
    A handler's exception is logged and ends only its connection."""
    slots = trio.Semaphore(limit)
    throttle = Throttle(clock=trio.current_time)
    async with listener, trio.open_nursery() as nursery:
        while True:
            if slots.value == 0:
                await trio.lowlevel.wait_readable(listener.socket)  # someone is waiting
                make_room()
            await slots.acquire()
            try:
                stream = await accept(listener, log, name, throttle)
            except BaseException:
                slots.release()
                raise
            nursery.start_soon(_run_handler, handler, stream, slots, log, name)


async def _run_handler(handler: Callable[[trio.SocketStream], Awaitable[None]],
                       stream: trio.SocketStream, slots: trio.Semaphore, log: Any,
                       name: str) -> None:
    try:
        await handler(stream)
    except Exception as error:  # noqa: BLE001 -- a connection's error boundary
        log.error("connection_failed", listener=name, error=repr(error), exc_info=error)
    finally:
        await trio.aclose_forcefully(stream)
        slots.release()
