"""The sd_notify protocol: telling systemd we are ready, alive, stopping, and what we are doing.

Harmless outside systemd: without NOTIFY_SOCKET every call does nothing, as python-systemd's
`daemon.notify` does. Each message is one datagram on a fresh non-blocking socket (as libsystemd's
sd_notify), so a stalled or vanished systemd can neither block the event loop nor crash the
daemon: a failed send is logged and dropped.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

import structlog


class Notifier:
    """Sends notify messages to `address`, an AF_UNIX path or abstract name; None: does nothing."""

    def __init__(self, address: str | None, log: Any = None) -> None:
        self.address = address
        self.log = log if log is not None else structlog.get_logger()
        self._failing = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, log: Any = None) -> Notifier:
        env = os.environ if environ is None else environ
        value = env.get("NOTIFY_SOCKET", "")
        notifier = cls(_socket_address(value), log)
        if value and not notifier.enabled:
            notifier.log.warning("notify_socket_unsupported", notify_socket=value)
        return notifier

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def ready(self) -> bool:
        return self.notify("READY=1")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        # One line: a newline would start another field of the message.
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    def notify(self, *fields: str) -> bool:
        """Send `KEY=value` fields as one message; True if it was sent."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as error:
            # Warn once per run of failures: the watchdog would repeat it every few seconds.
            emit = self.log.debug if self._failing else self.log.warning
            emit("notify_failed", address=self.address, fields=list(fields), error=str(error))
            self._failing = True
            return False
        self._failing = False
        return True


def watchdog_interval(environ: Mapping[str, str] | None = None,
                      pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None if no watchdog is ours.

    WATCHDOG_PID, when set, names the process the watchdog is for; a child that inherited the
    environment must not ping on its parent's behalf.
    """
    env = os.environ if environ is None else environ
    watchdog_pid = env.get("WATCHDOG_PID", "")
    if watchdog_pid and watchdog_pid != str(os.getpid() if pid is None else pid):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2_000_000 if usec > 0 else None


def _socket_address(value: str) -> str | None:
    """NOTIFY_SOCKET as a socket address: "@name" is Linux's abstract namespace ("\\0name")."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # unset, empty, or a kind we don't speak (e.g. vsock:)
