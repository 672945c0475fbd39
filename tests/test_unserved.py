"""Messages naming an account that no running daemon serves are made visible, once per account:
a log line, `ctl status` and a metric (they would otherwise wait `queued` forever, unseen)."""

from __future__ import annotations

import httpx
import pytest

from harness import (
    Daemon,
    enqueue,
    http_url,
    numbers,
    query,
    sendd_json,
    setup_database,
    wait_until,
    write_config,
)


@pytest.mark.slow
def test_an_account_no_daemon_serves_is_reported_once_per_account(tmp_path, database_url,
                                                                  fake_provider):
    config = write_config(tmp_path / "sendd.toml", database_url, fake_provider.url)
    setup_database(config, {"acme": 1000})
    served = enqueue(config, tmp_path, "acme", numbers(20))["campaign_id"]
    # An application inserts rows itself: a campaign and transactional messages for "nosuch".
    query(database_url, "INSERT INTO sendd.message (tenant_id, account, recipient, body) "
                        "SELECT 'acme', 'nosuch', '+3069' || lpad(i::text, 8, '0'), 'hi' "
                        "FROM generate_series(1, 7) i")
    query(database_url, "INSERT INTO sendd.message (tenant_id, campaign_id, account, recipient, "
                        "body) SELECT 'acme', $1, 'elsewhere', '+3069' || lpad(i::text, 8, '0'), "
                        "'hi' FROM generate_series(100, 104) i", served)
    with Daemon(config, tmp_path / "daemon.log").wait_ready() as daemon:
        wait_until(lambda: {e["account"] for e in daemon.events("account_unknown")}
                   == {"nosuch", "elsewhere"}, 50, "both accounts reported", interval=0.5)
        status = sendd_json(config, "ctl", "status", "--json")
        metrics = httpx.get(http_url(config, "/metrics")).text
        events = daemon.events("account_unknown")
    assert status["unserved_accounts"] == {"elsewhere": 5, "nosuch": 7}
    assert 'sendd_unserved_messages{account="nosuch"} 7.0' in metrics
    assert len(events) == 2  # one line per account, not per message
    assert {e["waiting"] for e in events} == {5, 7}
