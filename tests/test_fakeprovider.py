"""The fake mitto provider, run as a real subprocess and driven over loopback with httpx."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest

DAEMON_DIR = Path(__file__).resolve().parents[1] / "daemon"
BULK = "/api/v1.1/Messages/sendmessagesbulk"
SEND = "/api/v1.1/Messages/send"
MESSAGES = "/api/v1.1/Messages"
KEY = {"X-Mitto-API-Key": "test-key"}


class FakeProcess:
    """A `python -m sendd.dev.fakeprovider` child and the port it printed."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(DAEMON_DIR),
                                                          env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sendd.dev.fakeprovider", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        if not line:  # it died before listening: show why
            self.stop()
            pytest.fail(f"fake provider did not start: {self.proc.stderr.read()}")
        self.port = json.loads(line)["port"]
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=KEY, **kwargs)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return code


@pytest.fixture(scope="module")
def fake_process() -> Iterator[tuple[FakeProcess, dict]]:
    """One fake for the module, and its default settings as `GET /_control` shows them."""
    fake = FakeProcess()
    defaults = httpx.get(f"{fake.url}/_control").json()
    yield fake, defaults
    fake.stop()


@pytest.fixture
def fake(fake_process: tuple[FakeProcess, dict]) -> Iterator[httpx.Client]:
    """A client of the shared fake, reset to default settings and empty stats."""
    process, defaults = fake_process
    with process.client(timeout=10) as client:
        assert client.post("/_control", json=defaults).status_code == 200
        assert client.post("/_reset").status_code == 200
        yield client


def entry(n: int, to: str = "+306900000000", sender: str = "ACME") -> dict:
    return {"from": sender, "to": to, "text": f"hello {n}", "reference": f"m-{n}"}


def batch(refs: range, **kwargs) -> dict:
    return {"messages": [entry(n, **kwargs) for n in refs]}


def stats(client: httpx.Client) -> dict:
    return client.get("/_stats").json()


def control(client: httpx.Client, **changes) -> dict:
    response = client.post("/_control", json=changes)
    assert response.status_code == 200, response.text
    return response.json()


def test_bulk_accepts_with_ids(fake: httpx.Client) -> None:
    response = fake.post(BULK, json=batch(range(3)))
    assert response.status_code == 200
    body = response.json()
    bulk_id = body["bulkId"]
    assert bulk_id.startswith("b-")
    assert body["messages"] == [
        {"reference": f"m-{i}", "messageId": f"{bulk_id}-{i}", "status": "accepted"}
        for i in range(3)
    ]
    counts = stats(fake)
    assert counts["send_requests"] == 1
    assert counts["messages"] == counts["accepted"] == counts["distinct_references"] == 3
    assert counts["responses"] == {"200": 1}
    assert fake.post(BULK, json=batch(range(3, 4))).json()["bulkId"] != bulk_id


def test_rejects_by_prefix(fake: httpx.Client) -> None:
    messages = [entry(0), entry(1, to="+99123"), entry(2), entry(3, to="+99456")]
    results = fake.post(BULK, json={"messages": messages}).json()["messages"]
    assert [r["status"] for r in results] == ["accepted", "rejected", "accepted", "rejected"]
    assert results[1] == {"reference": "m-1", "messageId": None, "status": "rejected",
                          "errorCode": "INVALID_NUMBER", "errorMessage": "not a mobile number"}
    counts = stats(fake)
    assert (counts["messages"], counts["accepted"], counts["rejected"]) == (4, 2, 2)
    assert fake.get(MESSAGES, params={"reference": "m-1"}).status_code == 404


def test_accepted_at_tells_when_each_reference_was_first_accepted(fake: httpx.Client) -> None:
    before = time.time()
    fake.post(BULK, json=batch(range(2)))
    middle = time.time()
    fake.post(BULK, json=batch(range(1, 3)))  # m-1 again: its first acceptance counts
    after = time.time()
    times = fake.post("/_accepted_at", json=["m-0", "m-1", "m-2", "never"]).json()
    assert before <= times["m-0"] == times["m-1"] <= middle <= times["m-2"] <= after
    assert times["never"] is None
    assert fake.post("/_accepted_at", content=b"{}").status_code == 400


def test_single_send(fake: httpx.Client) -> None:
    ok = fake.post(SEND, json=entry(1)).json()
    assert ok["status"] == "accepted" and ok["reference"] == "m-1"
    assert fake.get(f"{MESSAGES}/{ok['messageId']}").json()["reference"] == "m-1"
    rejected = fake.post(SEND, json=entry(2, to="+9900")).json()
    assert rejected["status"] == "rejected" and rejected["errorCode"] == "INVALID_NUMBER"


def test_bad_key_is_401(fake: httpx.Client) -> None:
    bad = fake.post(BULK, json=batch(range(2)), headers={"X-Mitto-API-Key": "nope"})
    assert bad.status_code == 401
    missing = httpx.post(f"{fake.base_url}{BULK}", json=batch(range(2)))
    assert missing.status_code == 401
    assert fake.get(MESSAGES, params={"reference": "m-0"},
                    headers={"X-Mitto-API-Key": "nope"}).status_code == 401
    counts = stats(fake)
    assert counts["accepted"] == 0 and counts["responses"] == {"401": 3}


def test_malformed_is_400(fake: httpx.Client) -> None:
    assert fake.post(BULK, content=b"{nope").status_code == 400
    assert fake.post(BULK, json={"messages": []}).status_code == 400
    no_ref = {"messages": [{"from": "A", "to": "+30690", "text": "x"}]}
    response = fake.post(BULK, json=no_ref)
    assert response.status_code == 400 and "reference" in response.json()["error"]
    assert stats(fake)["accepted"] == 0


def test_over_max_batch_is_413(fake: httpx.Client) -> None:
    control(fake, max_batch=2)
    assert fake.post(BULK, json=batch(range(3))).status_code == 413
    assert fake.post(BULK, json=batch(range(2))).status_code == 200
    assert stats(fake)["accepted"] == 2


def test_429_with_retry_after(fake: httpx.Client) -> None:
    control(fake, error_429_rate=1.0, retry_after=7)
    response = fake.post(BULK, json=batch(range(2)))
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "7"
    counts = stats(fake)
    assert counts["accepted"] == 0 and counts["responses"] == {"429": 1}
    assert counts["max_reqs_per_1s"] == {"test-key": 1}  # refused requests still count


def test_random_rates_are_seeded(fake: httpx.Client) -> None:
    def statuses() -> list[int]:
        control(fake, error_503_rate=0.5, seed=42)
        return [fake.post(SEND, json=entry(n)).status_code for n in range(20)]

    first = statuses()
    assert set(first) == {200, 503}
    assert statuses() == first


@pytest.mark.parametrize("status", [401, 402, 400, 413, 503])
def test_status_override(fake: httpx.Client, status: int) -> None:
    fake.post(SEND, json=entry(0))
    control(fake, status_override=status)
    assert fake.post(BULK, json=batch(range(1, 3))).status_code == status
    assert fake.post(SEND, json=entry(3)).status_code == status
    assert fake.get(MESSAGES, params={"reference": "m-0"}).status_code == 200  # sends only
    control(fake, status_override=0)
    assert fake.post(SEND, json=entry(4)).status_code == 200
    assert stats(fake)["accepted"] == 2


def test_lookups(fake: httpx.Client) -> None:
    sent = fake.post(BULK, json=batch(range(2))).json()["messages"][1]
    expected = {"messageId": sent["messageId"], "reference": "m-1", "status": "Sent",
                "errorCode": None}
    assert fake.get(f"{MESSAGES}/{sent['messageId']}").json() == expected
    assert fake.get(MESSAGES, params={"reference": "m-1"}).json() == expected
    missing = fake.get(MESSAGES, params={"reference": "never"})
    assert missing.status_code == 404 and missing.json() == {"error": "not found"}
    assert fake.get(f"{MESSAGES}/b-999999-0").status_code == 404
    control(fake, lookup_fail=True)
    assert fake.get(MESSAGES, params={"reference": "m-1"}).status_code == 500


def test_duplicates_counted_when_references_not_honoured(fake: httpx.Client) -> None:
    first = fake.post(BULK, json=batch(range(3))).json()["messages"]
    again = fake.post(BULK, json=batch(range(1, 3))).json()["messages"]
    assert all(r["status"] == "accepted" for r in again)
    assert again[0]["messageId"] != first[1]["messageId"]
    counts = stats(fake)
    assert counts["accepted"] == 5
    assert counts["distinct_references"] == 3
    assert counts["duplicate_references"] == 2
    assert fake.get("/_references").json() == [
        {"reference": "m-0", "count": 1}, {"reference": "m-1", "count": 2},
        {"reference": "m-2", "count": 2}]


def test_honoured_references_are_not_sent_twice(fake: httpx.Client) -> None:
    control(fake, honour_references=True)
    first = fake.post(BULK, json=batch(range(2))).json()["messages"]
    again = fake.post(BULK, json=batch(range(3))).json()["messages"]
    assert [r["messageId"] for r in again[:2]] == [r["messageId"] for r in first]
    assert again[2]["status"] == "accepted"
    counts = stats(fake)
    assert counts["accepted"] == 3 and counts["duplicate_references"] == 0
    assert {r["count"] for r in fake.get("/_references").json()} == {1}


def test_control_changes_latency_live(fake: httpx.Client) -> None:
    settings = control(fake, latency_ms=400)
    assert settings["latency_ms"] == 400
    started = time.monotonic()
    assert fake.post(SEND, json=entry(0)).status_code == 200
    slow = time.monotonic() - started
    control(fake, latency_ms=0)
    started = time.monotonic()
    fake.post(SEND, json=entry(1))
    assert slow >= 0.4 > time.monotonic() - started
    assert fake.post("/_control", json={"latency": 1}).status_code == 400
    assert fake.post("/_control", json={"latency_ms": "x"}).status_code == 400
    assert fake.post("/_control", json={"error_429_rate": 1.5}).status_code == 400


def test_sliding_window_max_counters(fake: httpx.Client) -> None:
    for _ in range(3):
        fake.post(BULK, json=batch(range(10)))
    fake.post(BULK, json=batch(range(10, 12), sender="OTHER"))
    time.sleep(1.2)  # the next requests fall in a new window
    for _ in range(2):
        fake.post(BULK, json=batch(range(5)))
    counts = stats(fake)
    assert counts["max_reqs_per_1s"] == {"test-key": 4}
    assert counts["max_msgs_per_1s"] == {"test-key": 32}
    assert counts["max_msgs_per_1s_by_sender"] == {"ACME": 30, "OTHER": 2}


def test_hang_accepts_and_records_while_client_times_out(fake: httpx.Client) -> None:
    control(fake, hang_rate=1.0, hang_seconds=3)
    with pytest.raises(httpx.ReadTimeout):
        fake.post(BULK, json=batch(range(2)), timeout=0.5)
    control(fake, hang_rate=0.0)
    found = fake.get(MESSAGES, params={"reference": "m-1"})
    assert found.status_code == 200 and found.json()["status"] == "Sent"
    assert stats(fake)["accepted"] == 2


def test_reset_clears_stats_and_records(fake: httpx.Client) -> None:
    fake.post(BULK, json=batch(range(2)))
    fake.post("/_reset")
    counts = stats(fake)
    assert counts["accepted"] == counts["requests"] == 0 and counts["responses"] == {}
    assert fake.get(MESSAGES, params={"reference": "m-0"}).status_code == 404
    assert fake.get("/_references").json() == []


def test_cli_flags_and_sigterm() -> None:
    fake = FakeProcess("--api-key", "k1", "--api-key", "k2", "--max-batch", "2",
                       "--reject-prefix", "+1", "--honour-references")
    try:
        with httpx.Client(base_url=fake.url) as client:
            for key, status in (("k1", 200), ("k2", 200), ("test-key", 401)):
                response = client.post(BULK, json=batch(range(2), to="+3069"),
                                       headers={"X-Mitto-API-Key": key})
                assert response.status_code == status
            settings = client.get("/_control").json()
            assert settings["max_batch"] == 2 and settings["honour_references"] is True
            result = client.post(SEND, json=entry(9, to="+1555"),
                                 headers={"X-Mitto-API-Key": "k1"}).json()
            assert result["status"] == "rejected"
    finally:
        assert fake.stop() == 0
    assert fake.proc.returncode == 0


def test_cli_rejects_bad_values() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sendd.dev.fakeprovider", "--status-override", "200"],
        capture_output=True, text=True, timeout=30,
        env={**os.environ, "PYTHONPATH": str(DAEMON_DIR)})
    assert result.returncode != 0
    assert "status_override" in result.stderr and "Traceback" not in result.stderr


async def test_serve_in_process(nursery) -> None:
    from sendd.dev.fakeprovider import FakeProvider, FakeSettings, serve

    settings = FakeSettings(api_keys=["inproc"])
    provider = FakeProvider(settings)  # passed instead of settings to read its stats directly
    port = await nursery.start(partial(serve, provider))
    headers = {"X-Mitto-API-Key": "inproc"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers) as c:
        assert (await c.post(BULK, json=batch(range(2)))).status_code == 200
        settings.status_override = 503  # the settings object is read live
        assert (await c.post(SEND, json=entry(5))).status_code == 503
    assert provider.stats()["accepted"] == 2
