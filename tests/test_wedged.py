"""A wedged actor stops the systemd watchdog pings and turns /healthz 503, naming it.

The wedge is real: the test holds an exclusive lock on `sendd.submission`, so the senders'
submission marks and the writer's flush block inside the database with no error to retry.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import asyncpg
import httpx

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
from sendd.dev.pgserver import free_port

STALL_SECONDS = 2.0


async def hold_lock(database_url: str, locked: asyncio.Event, release: asyncio.Event) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE sendd.submission IN ACCESS EXCLUSIVE MODE")
            locked.set()
            await release.wait()
    finally:
        await conn.close()


def test_wedged_actor_stops_pings_and_fails_health(tmp_path: Path, database_url: str,
                                                    fake_provider) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = write_config(tmp_path / "sendd.toml", database_url, fake_provider.url,
                          daemon={"http_listen": f"127.0.0.1:{port}",
                                  "control_socket": str(tmp_path / "c.sock"),
                                  "stall_seconds": STALL_SECONDS})
    setup_database(config, {"acme": 100_000})
    notify_path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(notify_path)
        sock.setblocking(False)
        environment = {"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "1000000"}
        with Daemon(config, tmp_path / "daemon.log", extra_env=environment).wait_ready():
            lines: list[str] = []
            wait_until(lambda: lines.extend(received(sock)) or "WATCHDOG=1" in lines, 10,
                       "a first watchdog ping")

            async def wedge_then_check() -> list[str]:
                locked, release = asyncio.Event(), asyncio.Event()
                holder = asyncio.create_task(hold_lock(database_url, locked, release))
                await locked.wait()
                await asyncio.to_thread(enqueue, config, tmp_path, "acme", numbers(2000))
                reasons = await asyncio.to_thread(wait_until, lambda: unhealthy(base), 20,
                                                  "/healthz to report the wedge")
                received(sock)  # drop pings sent before the wedge was seen
                await asyncio.sleep(2.5)  # over two watchdog intervals
                quiet = received(sock)
                release.set()
                await holder
                return [*reasons, "PINGS:" + ",".join(quiet)]

            outcome = asyncio.run(wedge_then_check())
            pings_while_wedged = [m for m in outcome.pop().removeprefix("PINGS:").split(",")
                                  if m == "WATCHDOG=1"]
            wait_until(lambda: status_counts(database_url).get("sent") == 2000, 60, "all sent")
            wait_until(lambda: httpx.get(f"{base}/healthz", timeout=10).status_code == 200, 20,
                       "/healthz to recover")
            wait_until(lambda: "WATCHDOG=1" in received(sock), 10, "the pings to resume")
    assert any("wedged" in reason and ("sender" in reason or "writer" in reason)
               for reason in outcome), outcome
    assert pings_while_wedged == []


def unhealthy(base: str) -> list[str] | None:
    response = httpx.get(f"{base}/healthz", timeout=10)
    if response.status_code == 503 and any("wedged" in r for r in response.json()["reasons"]):
        return response.json()["reasons"]
    return None
