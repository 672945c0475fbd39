"""The `sendd` command line as real processes: tenant set, campaign show/pause/resume/cancel,
config check, and bad input (a broken config file, an unreachable database): non-zero exit,
exactly one line on stderr, no traceback, and nothing stored."""

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from harness import (
    SENDD,
    assert_user_error,
    enqueue,
    env,
    numbers,
    query,
    scalar,
    sendd,
    sendd_json,
    setup_database,
    write_config,
)

NO_PROVIDER = "http://127.0.0.1:9"  # never contacted: none of these commands sends
MISSING_DATABASE = "postgresql://sendd@127.0.0.1:1/x"


def run_cli(*args: str, config: Path | None = None, stdin: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    options = ["--config", str(config)] if config else []
    return subprocess.run([*SENDD, *options, *args], input=stdin, capture_output=True,
                          text=True, env=env(), timeout=timeout)


def run_many(commands: list[list[str]], config: Path,
             timeout: float = 60) -> list[subprocess.CompletedProcess[str]]:
    """Run several commands side by side (they only fail): the same as run_cli, sooner."""
    processes = [subprocess.Popen([*SENDD, "--config", str(config), *args], text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env())
                 for args in commands]
    results = []
    for args, process in zip(commands, processes, strict=True):
        stdout, stderr = process.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(args, process.returncode, stdout, stderr))
    return results


def snapshot(url: str) -> dict[str, Any]:
    """Every row count in the sendd schema, plus the tenants' state."""
    tables = [r["table_name"] for r in query(
        url, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'sendd'")]
    counts = {t: scalar(url, f"SELECT count(*) FROM sendd.{t}") for t in sorted(tables)}
    if "tenant" in tables:
        counts["tenants"] = [tuple(r) for r in query(
            url, "SELECT id, credits, active, rate_msgs_per_s, weight FROM sendd.tenant "
                 "ORDER BY id")]
        counts["campaigns"] = [tuple(r) for r in query(
            url, "SELECT id, status, total FROM sendd.campaign ORDER BY id")]
    return counts


@pytest.fixture
def config(tmp_path, database_url) -> Path:
    path = write_config(tmp_path / "sendd.toml", database_url, NO_PROVIDER)
    sendd(path, "migrate")
    return path


def ledger(url: str) -> list[tuple[str, int, str]]:
    return [tuple(r) for r in query(
        url, "SELECT tenant_id, delta, reason FROM sendd.credit_ledger ORDER BY id")]


# --- tenant set ---------------------------------------------------------------------------

def test_tenant_set_creates_a_tenant(config, database_url):
    row = sendd_json(config, "tenant", "set", "acme")
    assert (row["id"], row["credits"], row["active"], row["rate_msgs_per_s"]) == (
        "acme", 0, True, 0)
    assert scalar(database_url, "SELECT count(*) FROM sendd.tenant WHERE id = 'acme'") == 1
    assert ledger(database_url) == []  # no credit change, no ledger row


def test_tenant_credits_set_and_add_write_ledger_rows(config, database_url):
    assert sendd_json(config, "tenant", "set", "acme", "--credits", "100")["credits"] == 100
    assert sendd_json(config, "tenant", "set", "acme", "--add-credits", "25")["credits"] == 125
    assert sendd_json(config, "tenant", "set", "acme", "--credits", "40")["credits"] == 40
    assert sendd_json(config, "tenant", "set", "acme", "--add-credits", "-15")["credits"] == 25
    assert scalar(database_url, "SELECT credits FROM sendd.tenant WHERE id = 'acme'") == 25
    assert ledger(database_url) == [
        ("acme", 100, "set"), ("acme", 25, "top-up"), ("acme", -85, "set"),
        ("acme", -15, "top-up"),
    ]
    assert scalar(database_url, "SELECT sum(delta) FROM sendd.credit_ledger") == 25


def test_tenant_rate_and_active(config, database_url):
    sendd(config, "tenant", "set", "acme", "--credits", "10")
    row = sendd_json(config, "tenant", "set", "acme", "--rate", "50")
    assert (row["rate_msgs_per_s"], row["credits"], row["active"]) == (50, 10, True)
    row = sendd_json(config, "tenant", "set", "acme", "--inactive")
    assert (row["active"], row["rate_msgs_per_s"]) == (False, 50)
    assert scalar(database_url, "SELECT active FROM sendd.tenant WHERE id = 'acme'") is False
    row = sendd_json(config, "tenant", "set", "acme", "--active")
    assert row["active"] is True
    assert scalar(database_url, "SELECT active FROM sendd.tenant WHERE id = 'acme'") is True
    assert scalar(database_url, "SELECT rate_msgs_per_s FROM sendd.tenant") == 50


@pytest.mark.parametrize("args, mention", [
    (["--credits", "-5"], "--credits"),
    (["--credits=-1"], "--credits"),
    (["--add-credits", "-11"], "below zero"),
    (["--rate", "-1"], "--rate"),
])
def test_tenant_set_refuses_negative_values(config, database_url, args, mention):
    sendd(config, "tenant", "set", "acme", "--credits", "10")
    before = snapshot(database_url)
    assert_user_error(run_cli("tenant", "set", "acme", *args, config=config), mention)
    assert snapshot(database_url) == before
    assert scalar(database_url, "SELECT credits FROM sendd.tenant") == 10


def test_tenant_weight_is_stored_kept_and_shown(config, database_url):
    assert sendd_json(config, "tenant", "set", "acme")["weight"] == 1  # a new tenant weighs 1
    assert sendd_json(config, "tenant", "set", "acme", "--weight", "3")["weight"] == 3
    assert scalar(database_url, "SELECT weight FROM sendd.tenant WHERE id = 'acme'") == 3
    row = sendd_json(config, "tenant", "set", "acme", "--rate", "50", "--credits", "10")
    assert (row["weight"], row["rate_msgs_per_s"], row["credits"]) == (3, 50, 10)
    row = sendd_json(config, "tenant", "set", "shop", "--weight", "1000")  # created with it
    assert (row["id"], row["weight"]) == ("shop", 1000)
    assert sendd_json(config, "tenant", "set", "acme", "--weight", "1")["weight"] == 1
    assert [tuple(r) for r in query(
        database_url, "SELECT id, weight FROM sendd.tenant ORDER BY id")] == [
        ("acme", 1), ("shop", 1000)]


def test_tenant_set_refuses_a_bad_weight_and_changes_nothing(config, database_url):
    sendd(config, "tenant", "set", "acme", "--credits", "10", "--weight", "3")
    before = snapshot(database_url)
    # On an existing tenant with another change beside it, and on a tenant it would create.
    commands = [["tenant", "set", "acme", "--weight", value, "--credits", "20"]
                for value in ["0", "1001", "-1", "2.5", "x", "", "99999999999999999999"]]
    commands += [["tenant", "set", "newco", "--weight", value] for value in ["0", "1001"]]
    for result in run_many(commands, config):
        assert_user_error(result, "argument --weight: must be an integer")
    assert snapshot(database_url) == before
    assert [tuple(r) for r in query(database_url, "SELECT id, credits, weight FROM sendd.tenant")
            ] == [("acme", 10, 3)]


def test_tenant_credits_cannot_drop_below_segments_in_flight(config, database_url):
    sendd(config, "tenant", "set", "acme", "--credits", "100")
    # 10 messages of 3 segments each, claimed by a daemon: 30 segments reserved.
    query(database_url,
          """INSERT INTO sendd.message (tenant_id, account, recipient, body, segments)
             SELECT 'acme', 'main', '+3069' || lpad(i::text, 8, '0'), 'hi', 3
             FROM generate_series(1, 10) i""")
    query(database_url, "UPDATE sendd.message SET status = 'sending', lease_owner = 'd1'")
    before = snapshot(database_url)
    assert_user_error(run_cli("tenant", "set", "acme", "--credits", "29", config=config), "30")
    assert_user_error(run_cli("tenant", "set", "acme", "--add-credits", "-71", config=config),
                      "30")
    assert snapshot(database_url) == before
    assert scalar(database_url, "SELECT credits FROM sendd.tenant") == 100

    assert sendd_json(config, "tenant", "set", "acme", "--credits", "30")["credits"] == 30
    assert ledger(database_url)[-1] == ("acme", -70, "set")


# --- campaign show / pause / resume / cancel ----------------------------------------------

def campaign_of(config: Path, tmp_path: Path, count: int) -> int:
    setup_database(config, {"acme": 1000})
    result = enqueue(config, tmp_path, "acme", numbers(count))
    assert result["queued"] == count
    return result["campaign_id"]


def test_campaign_show_prints_counters(config, tmp_path, database_url):
    cid = campaign_of(config, tmp_path, 10)
    shown = sendd_json(config, "campaign", "show", str(cid))
    assert shown["id"] == cid
    assert shown["status"] == "sending"
    assert shown["tenant_id"] == "acme"
    assert {k: shown[k] for k in ("total", "sent", "failed", "delivered", "undelivered",
                                  "unknown", "cancelled", "processed", "queued")} == {
        "total": 10, "sent": 0, "failed": 0, "delivered": 0, "undelivered": 0, "unknown": 0,
        "cancelled": 0, "processed": 0, "queued": 10}

    ids = [r["id"] for r in query(database_url, "SELECT id FROM sendd.message ORDER BY id")]
    query(database_url, "UPDATE sendd.message SET status = 'sending' WHERE id = ANY($1)", ids[:4])
    query(database_url, "UPDATE sendd.message SET status = 'sent' WHERE id = ANY($1)", ids[:3])
    query(database_url, "UPDATE sendd.message SET status = 'failed' WHERE id = $1", ids[3])
    shown = sendd_json(config, "campaign", "show", str(cid))
    assert (shown["sent"], shown["failed"], shown["processed"], shown["queued"]) == (3, 1, 4, 6)


def test_campaign_pause_and_resume(config, tmp_path, database_url):
    cid = campaign_of(config, tmp_path, 5)
    status = f"SELECT status FROM sendd.campaign WHERE id = {cid}"
    assert sendd_json(config, "campaign", "pause", str(cid))["status"] == "paused"
    assert scalar(database_url, status) == "paused"
    assert sendd_json(config, "campaign", "show", str(cid))["status"] == "paused"
    # Pausing twice is refused: it is already paused.
    assert_user_error(run_cli("campaign", "pause", str(cid), config=config), "paused")

    assert sendd_json(config, "campaign", "resume", str(cid))["status"] == "sending"
    assert scalar(database_url, status) == "sending"
    assert_user_error(run_cli("campaign", "resume", str(cid), config=config), "sending")


def test_campaign_cancel_cancels_queued_messages(config, tmp_path, database_url):
    cid = campaign_of(config, tmp_path, 10)
    ids = [r["id"] for r in query(database_url, "SELECT id FROM sendd.message ORDER BY id")]
    query(database_url, "UPDATE sendd.message SET status = 'sending' WHERE id = ANY($1)", ids[:3])
    query(database_url, "UPDATE sendd.message SET status = 'sent' WHERE id = ANY($1)", ids[:2])
    # The one still sending is on the wire: its submission mark says so.
    query(database_url, "INSERT INTO sendd.submission (instance_id, account, message_ids) "
                        "VALUES ('d1', 'main', $1)", ids[2:3])
    # Now: 2 sent, 1 sending (in flight: left to finish), 7 queued.

    result = sendd_json(config, "campaign", "cancel", str(cid))
    assert result["status"] == "cancelled"
    assert (result["cancelled"], result["in_flight"]) == (7, 1)
    counts = {r["status"]: r["count"] for r in query(
        database_url, "SELECT status, count(*) FROM sendd.message GROUP BY status")}
    assert counts == {"cancelled": 7, "sent": 2, "sending": 1}
    shown = sendd_json(config, "campaign", "show", str(cid))
    assert shown["status"] == "cancelled"
    assert (shown["cancelled"], shown["sent"], shown["queued"]) == (7, 2, 0)
    assert shown["finished_at"] is not None
    assert_user_error(run_cli("campaign", "resume", str(cid), config=config), "cancelled")


def test_pausing_a_completed_campaign_is_refused(config, tmp_path, database_url):
    cid = campaign_of(config, tmp_path, 2)
    query(database_url, "UPDATE sendd.message SET status = 'sending'")
    query(database_url, "UPDATE sendd.message SET status = 'sent'")
    assert scalar(database_url, f"SELECT status FROM sendd.campaign WHERE id = {cid}") == \
        "completed"
    before = snapshot(database_url)
    assert_user_error(run_cli("campaign", "pause", str(cid), config=config), "completed")
    assert_user_error(run_cli("campaign", "cancel", str(cid), config=config), "completed")
    assert snapshot(database_url) == before


@pytest.mark.parametrize("action", ["show", "pause", "resume", "cancel"])
def test_unknown_campaign_is_one_line(config, action):
    assert_user_error(run_cli("campaign", action, "424242", config=config), "424242")


# --- config check -------------------------------------------------------------------------

def test_config_check_masks_secrets(tmp_path):
    api_key = "sk-LIVE-7f3a9c1e55d2"
    password = "pgpw-Zq81xK"
    token = "wa-TOKEN-88be1c"
    token_file = tmp_path / "wa.token"
    token_file.write_text(token + "\n")
    path = tmp_path / "sendd.toml"
    path.write_text(f"""
[database]
url = "postgresql://sendd:{password}@db.example.com:5432/sendd"

[redis]
url = "redis://:{password}@127.0.0.1:6379/0"

[accounts.main]
kind = "mitto"
base_url = "https://mitto.example.com"
api_key = "{api_key}"

[accounts.wa]
kind = "whatsapp"
base_url = "https://graph.example.com"
token_file = "{token_file}"
phone_number_id = "12345"
""")
    result = run_cli("config", "check", config=path)
    assert result.returncode == 0, result.stderr
    for secret in (api_key, password, token):
        assert secret not in result.stdout + result.stderr
    shown = json.loads(result.stdout)
    assert shown["accounts"]["main"]["api_key"] == "***"
    assert shown["accounts"]["wa"]["token"] == "***"
    assert shown["database"]["url"] == "postgresql://sendd:***@db.example.com:5432/sendd"
    assert "***" in shown["redis"]["url"]
    assert shown["accounts"]["main"]["base_url"] == "https://mitto.example.com"
    assert shown["pipeline"]["claim_chunk"] == 1000  # defaults are shown too


def test_config_error_never_shows_a_secret(tmp_path):
    secret = "sk-LIVE-do-not-print"
    path = tmp_path / "sendd.toml"
    path.write_text(f'[accounts.main]\nkind = "mitto"\nbase_url = "https://x.example"\n'
                    f'api_key = "{secret}\\u0007"\n')  # not printable: refused
    line = assert_user_error(run_cli("config", "check", config=path), "api_key")
    assert secret not in line


# --- bad configuration files, for every command -------------------------------------------

def good_config_text(database_url: str) -> str:
    return f"""
[database]
url = "{database_url}"

[pipeline]
claim_chunk = 100

[accounts.main]
kind = "mitto"
base_url = "{NO_PROVIDER}"
api_key = "k"
timeout = 1.5
"""


BAD_CONFIGS = {
    "toml_syntax": (("claim_chunk = 100", "claim_chunk = = 100"), "line"),
    "unknown_key": (("claim_chunk = 100", "claim_chunk = 100\nfrobnicate = true"), "frobnicate"),
    "bad_value": (("claim_chunk = 100", "claim_chunk = -5"), "claim_chunk"),
    "bad_type": (("timeout = 1.5", 'timeout = "soon"'), "timeout"),
    "bad_kind": (('kind = "mitto"', 'kind = "pigeon"'), "kind"),
}


@pytest.mark.parametrize("variant", sorted(BAD_CONFIGS))
def test_bad_config_file_is_one_line_and_stores_nothing(tmp_path, database_url, variant):
    (old, new), mention = BAD_CONFIGS[variant]
    good = tmp_path / "good.toml"
    good.write_text(good_config_text(database_url))
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace(old, new))
    assert bad.read_text() != good.read_text()
    recipients = tmp_path / "recipients.txt"
    recipients.write_text("\n".join(numbers(3)) + "\n")

    # migrate on the empty database creates nothing.
    assert_user_error(run_cli("migrate", config=bad), mention)
    assert scalar(database_url, "SELECT to_regnamespace('sendd') IS NULL")

    setup_database(good, {"acme": 100})
    cid = sendd_json(good, "enqueue", "--tenant", "acme", "--text", "hi",
                     "--recipients", str(recipients))["campaign_id"]
    before = snapshot(database_url)
    commands = [["migrate"],
                ["tenant", "set", "acme", "--credits", "5"],
                ["tenant", "set", "newco"],
                ["enqueue", "--tenant", "acme", "--text", "hi", "--recipients", str(recipients)],
                ["campaign", "show", str(cid)],
                ["campaign", "cancel", str(cid)],
                ["config", "check"],
                ["run"]]
    for result in run_many(commands, bad):
        assert_user_error(result, mention)
    assert snapshot(database_url) == before


def test_missing_config_file_is_one_line(tmp_path):
    assert_user_error(run_cli("config", "check", config=tmp_path / "absent.toml"),
                      "absent.toml")


# --- an unreachable database --------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["migrate"],
    ["tenant", "set", "acme", "--credits", "5"],
    ["enqueue", "--tenant", "acme", "--text", "hi", "--recipients", "{recipients}"],
    ["campaign", "show", "1"],
    ["run"],
], ids=["migrate", "tenant-set", "enqueue", "campaign-show", "run"])
def test_missing_database_is_one_line(config, tmp_path, database_url, args):
    recipients = tmp_path / "recipients.txt"
    recipients.write_text("\n".join(numbers(3)) + "\n")
    args = [a.replace("{recipients}", str(recipients)) for a in args]
    sendd(config, "tenant", "set", "acme", "--credits", "100")
    before = snapshot(database_url)
    # The flag overrides the (working) database of the config file, before or after the command.
    for result in run_many([[*args, "--database-url", MISSING_DATABASE],
                            ["--database-url", MISSING_DATABASE, *args]], config):
        assert_user_error(result, "127.0.0.1:1")
    assert snapshot(database_url) == before
