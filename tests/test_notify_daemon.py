"""The notify protocol spoken by a running daemon, through a fake NOTIFY_SOCKET."""

import os
import signal
import socket

from harness import (
    Daemon,
    enqueue,
    numbers,
    received,
    setup_database,
    status_counts,
    wait_until,
    write_config,
)


def test_ready_then_watchdog_and_status_then_stopping(tmp_path, database_url, fake_provider):
    config = write_config(tmp_path / "sendd.toml", database_url, fake_provider.url)
    setup_database(config, {"acme": 10_000})
    enqueue(config, tmp_path, "acme", numbers(500))
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.setblocking(False)
        # WATCHDOG_USEC=1s asks for a ping every 0.5 s; WATCHDOG_PID names the daemon's pid,
        # so it is set after start: systemd sets it for the main process, we cannot know it yet.
        environment = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}
        daemon = Daemon(config, tmp_path / "daemon.log", extra_env=environment).wait_ready()
        with daemon:
            wait_until(lambda: status_counts(database_url).get("sent") == 500, 30, "all sent")
            lines: list[str] = []
            wait_until(lambda: lines.extend(received(sock)) or
                       sum("WATCHDOG=1" in m for m in lines) >= 3, 15, "three watchdog pings")
            daemon.signal(signal.SIGTERM)
            assert daemon.wait(30) == 0
        lines += received(sock)
    assert lines[0] == "READY=1"
    assert any(m.startswith("STATUS=") and "msgs/s" in m and "backlog " in m for m in lines), lines
    assert "STOPPING=1" in lines
    assert lines.index("STOPPING=1") > max(i for i, m in enumerate(lines) if m == "WATCHDOG=1")
    assert os.path.exists(path)
