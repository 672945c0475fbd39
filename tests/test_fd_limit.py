"""A daemon with few file descriptors under a crowd of slow HTTP and control clients: its
listeners bound their connections, /healthz still answers and the log stays JSON lines."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import time
from pathlib import Path

import httpx

from harness import (
    SENDD,
    Daemon,
    FakeProvider,
    env,
    sendd_json,
    setup_database,
    stays,
    wait_until,
    write_config,
)
from sendd.dev.pgserver import free_port

NOFILE = 200


class LimitedDaemon(Daemon):
    """`sendd run` with RLIMIT_NOFILE set to `nofile` before it starts."""

    def __init__(self, config: Path, log_path: Path, nofile: int) -> None:
        self.log_path = log_path
        self._log = open(log_path, "a")  # noqa: SIM115 -- closed in wait()
        self.process = subprocess.Popen(
            [*SENDD, "--config", str(config), "run"], stderr=self._log, stdout=self._log,
            env=env(), preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE,
                                                              (nofile, nofile)))


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def slow_http_clients(port: int, count: int) -> list[socket.socket]:
    """Connections that send a request head announcing a big body, then nothing more."""
    clients = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        clients.append(sock)
    time.sleep(0.5)
    for sock in clients:
        try:
            sock.send(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nab")
        except OSError:
            pass  # not connected (yet): it still takes a place in the listen queue
    return clients


def half_line_clients(path: Path, count: int) -> list[socket.socket]:
    clients = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        if sock.connect_ex(str(path)) == 0:
            sock.send(b'{"cmd": "sta')
        clients.append(sock)
    return clients


def healthz(port: int) -> int | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=3).status_code
    except httpx.TransportError:
        return None


def test_slow_clients_cannot_exhaust_descriptors(tmp_path: Path, database_url: str,
                                                 fake_provider: FakeProvider) -> None:
    port = free_port()
    sock_path = tmp_path / "control.sock"
    config = write_config(tmp_path / "sendd.toml", database_url, fake_provider.url,
                          daemon={"http_listen": f"127.0.0.1:{port}",
                                  "control_socket": str(sock_path)})
    setup_database(config, {"acme": 10})
    log = tmp_path / "daemon.log"
    with LimitedDaemon(config, log, NOFILE).wait_ready() as daemon:
        # Without bounds, these take every descriptor the daemon has left (about 185).
        clients = slow_http_clients(port, 150) + half_line_clients(sock_path, 60)
        try:
            stays(lambda: open_descriptors(daemon.process.pid) < NOFILE - 60, 2,
                  "the daemon's descriptors bounded")
            # The control socket makes room for an operator at once.
            assert sendd_json(config, "ctl", "status", "--json")["ok"]
            assert open_descriptors(daemon.process.pid) < NOFILE - 60
        finally:
            for client in clients:
                client.close()
        wait_until(lambda: healthz(port) == 200, 10, "/healthz once the clients left")
        assert daemon.process.poll() is None
    lines = log.read_text().splitlines()
    assert lines
    for line in lines:
        json.loads(line)  # one JSON object a line, nothing else
