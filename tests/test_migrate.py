"""`sendd migrate` as a real process: applied once, idempotent, safe when started concurrently."""

import json
import subprocess

from harness import SENDD, env, query, scalar, write_config

NO_PROVIDER = "http://127.0.0.1:9"  # never contacted: migrate talks to PostgreSQL only


ALL_MIGRATIONS = ["0001_schema", "0002_drop_message_campaign_index", "0003_claim_slots",
                  "0004_trigger_no_key_locks", "0005_in_flight_counters",
                  "0006_express_claim", "0007_trigger_without_join", "0008_honest_inserts",
                  "0009_instance_accounts", "0010_counters_in_named_steps",
                  "0011_one_claim_rule", "0012_stored_pauses", "0013_tenant_weight",
                  "0014_local_limits"]


def test_migrate_applies_once_then_nothing(tmp_path, database_url):
    config = write_config(tmp_path / "sendd.toml", database_url, NO_PROVIDER)
    first = subprocess.run([*SENDD, "--config", str(config), "migrate"], capture_output=True,
                           text=True, env=env(), timeout=120)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {"applied": ALL_MIGRATIONS, "version": 14}

    second = subprocess.run([*SENDD, "--config", str(config), "migrate"], capture_output=True,
                            text=True, env=env(), timeout=120)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout) == {"applied": [], "version": 14}

    rows = query(database_url, "SELECT version, name FROM sendd.schema_migration")
    assert [f"{r['version']:04d}_{r['name']}" for r in rows] == ALL_MIGRATIONS
    for table in ("tenant", "campaign", "message", "credit_ledger"):
        assert scalar(database_url, "SELECT to_regclass($1) IS NOT NULL", f"sendd.{table}")


def test_two_concurrent_migrates_both_succeed_and_apply_once(tmp_path, database_url):
    config = write_config(tmp_path / "sendd.toml", database_url, NO_PROVIDER)
    # Started back to back, before either has had time to connect.
    processes = [
        subprocess.Popen([*SENDD, "--config", str(config), "migrate"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env())
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in processes]
    for process, (stdout, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr
        assert "Traceback" not in stdout + stderr
    applied = sorted(json.loads(stdout)["applied"] for stdout, _ in outputs)
    assert applied == [[], ALL_MIGRATIONS]

    rows = query(database_url, "SELECT version FROM sendd.schema_migration")
    assert [r["version"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
