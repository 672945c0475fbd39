"""The HTTP server (/healthz, /readyz, /metrics) against a running daemon."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from harness import (
    Daemon,
    FakeProvider,
    enqueue,
    numbers,
    setup_database,
    status_counts,
    stays,
    wait_until,
    write_config,
)
from sendd.dev.pgserver import free_port


def http_config(tmp_path: Path, database_url: str, provider_url: str, port: int,
                **sections: Any) -> Path:
    daemon = {"http_listen": f"127.0.0.1:{port}", "control_socket": str(tmp_path / "c.sock"),
              **sections.pop("daemon", {})}
    return write_config(tmp_path / "sendd.toml", database_url, provider_url, daemon=daemon,
                        **sections)


def samples(base: str, name: str) -> list[Any]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name]


def sent_metric(base: str) -> float:
    return sum(s.value for s in samples(base, "sendd_messages_total")
               if s.labels["outcome"] == "sent")


def test_health_ready_metrics_and_limits(tmp_path: Path, database_url: str,
                                         fake_provider: FakeProvider) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = http_config(tmp_path, database_url, fake_provider.url, port)
    setup_database(config, {"acme": 10_000})
    with Daemon(config, tmp_path / "daemon.log").wait_ready() as daemon:
        health = httpx.get(f"{base}/healthz", timeout=10)
        assert (health.status_code, health.json()) == (200, {"ok": True})
        assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200

        enqueue(config, tmp_path, "acme", numbers(2000))
        wait_until(lambda: status_counts(database_url).get("sent") == 2000, 60, "all sent")
        wait_until(lambda: sent_metric(base) == 2000, 10, "the sent counter to reach 2000")
        assert fake_provider.stats()["accepted"] == 2000
        assert samples(base, "sendd_messages_total")[0].labels["tenant"] == "acme"

        names = {s.name for f in text_string_to_metric_families(
            httpx.get(f"{base}/metrics", timeout=10).text) for s in f.samples}
        for name in ("sendd_provider_request_seconds_count", "sendd_batch_size_count",
                     "sendd_rate_wait_seconds_count", "sendd_writer_flush_seconds_count",
                     "sendd_writer_flush_size_sum", "sendd_channel_used",
                     "sendd_channel_capacity", "sendd_queued_messages", "sendd_active_leases",
                     "sendd_actor_restarts_total"):
            assert name in names, name
        batches = samples(base, "sendd_batch_size_sum")
        assert batches[0].value == 2000
        capacity = {s.labels["channel"]: s.value
                    for s in samples(base, "sendd_channel_capacity")}
        assert set(capacity) == {"claims", "batches", "results", "unsettled", "express"}
        wait_until(lambda: samples(base, "sendd_active_leases")[0].value == 1, 15,
                   "the lease gauge to be refreshed")

        big = httpx.post(f"{base}/healthz", content=b"x" * (2 * 1024 * 1024), timeout=10)
        assert big.status_code == 413
        assert httpx.post(f"{base}/metrics", content=b"{}", timeout=10).status_code == 405
        assert httpx.get(f"{base}/nope", timeout=10).status_code == 404
        assert daemon.process.poll() is None


def test_readyz_and_healthz_fail_while_draining(tmp_path: Path, database_url: str) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with FakeProvider("--latency-ms", "2000") as provider:
        config = http_config(tmp_path, database_url, provider.url, port,
                             accounts={"main": {"timeout": 3.0, "max_batch": 10}},
                             pipeline={"lease_seconds": 10.0, "claim_chunk": 20,
                                       "claim_capacity": 1, "batch_capacity": 1})
        setup_database(config, {"acme": 10_000})
        enqueue(config, tmp_path, "acme", numbers(500))
        with Daemon(config, tmp_path / "daemon.log").wait_ready() as daemon:
            wait_until(lambda: status_counts(database_url).get("sending", 0) > 0, 20,
                       "requests in flight")
            assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200
            daemon.signal(signal.SIGTERM)
            ready = wait_until(lambda: _status(f"{base}/readyz", 503), 5, "readyz to fail")
            assert ready.json() == {"ok": False, "reason": "draining"}
            health = httpx.get(f"{base}/healthz", timeout=10)
            assert health.status_code == 503 and "draining" in health.json()["reasons"]
            assert daemon.wait(30) == 0


def test_an_unbindable_address_leaves_the_daemon_running(tmp_path: Path, database_url: str,
                                                          fake_provider: FakeProvider) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = http_config(tmp_path, database_url, fake_provider.url, port)
        setup_database(config, {"acme": 100})
        with Daemon(config, tmp_path / "daemon.log").wait_ready() as daemon:
            assert daemon.events("http_unavailable")
            stays(lambda: daemon.process.poll() is None, 0.5, "the daemon running")


def _status(url: str, expected: int) -> httpx.Response | None:
    try:
        response = httpx.get(url, timeout=5)
    except httpx.TransportError:
        return None
    return response if response.status_code == expected else None


# --- slow clients (issue 13) ------------------------------------------------------------------


def dribble(port: int, head: bytes, body: bytes, pause: float,
            give_up: float) -> tuple[bytes, float]:
    """Send `head`, then `body` a byte every `pause` seconds until the server answers or closes;
    returns what it answered and how long that took."""
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        sock.settimeout(pause)
        for byte in body:
            if time.monotonic() - began > give_up:
                return b"(still open)", time.monotonic() - began
            try:
                sock.sendall(bytes([byte]))
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:  # reset: closed with our bytes unread
                return b"", time.monotonic() - began
            sock.settimeout(5)
            while chunk := _recv(sock):
                answer += chunk
            return answer, time.monotonic() - began
    return b"(body sent)", time.monotonic() - began


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def test_a_slow_body_is_cut_off_with_408(tmp_path: Path, database_url: str,
                                        fake_provider: FakeProvider) -> None:
    port = free_port()
    config = http_config(tmp_path, database_url, fake_provider.url, port)
    setup_database(config, {"acme": 10})
    with Daemon(config, tmp_path / "daemon.log").wait_ready() as daemon:
        head = b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
        answer, took = dribble(port, head, b"x" * 1000, pause=0.5, give_up=20)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"request body not received within 5s" in answer
        assert took < 9, took
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
        assert daemon.process.poll() is None


def test_slow_headers_are_cut_off(tmp_path: Path, database_url: str,
                                  fake_provider: FakeProvider) -> None:
    port = free_port()
    config = http_config(tmp_path, database_url, fake_provider.url, port)
    setup_database(config, {"acme": 10})
    with Daemon(config, tmp_path / "daemon.log").wait_ready():
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 1000
        answer, took = dribble(port, b"", head, pause=0.3, give_up=20)
        assert answer in (b"", b"(still open)") or not answer.startswith(b"HTTP/1.1 200"), answer
        assert answer != b"(still open)" and took < 9, (answer, took)
