"""`sendd enqueue` as a real process: plain and CSV files, validation, segments, scheduling,
transactional messages, stdin, streaming memory, and bad input that stores nothing."""

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from harness import (
    SENDD,
    assert_user_error,
    env,
    numbers,
    query,
    scalar,
    sendd,
    sendd_json,
    setup_database,
    write_config,
    write_recipients,
)

NO_PROVIDER = "http://127.0.0.1:9"  # never contacted: enqueue talks to PostgreSQL only
MIB = 1024 * 1024


@pytest.fixture
def config(tmp_path, database_url) -> Path:
    path = write_config(tmp_path / "sendd.toml", database_url, NO_PROVIDER)
    setup_database(path, {"acme": 1_000_000})
    return path


def run_enqueue(config: Path, recipients: str | Path, *extra: str, text: str = "Hello",
                stdin: str | bytes | None = None) -> subprocess.CompletedProcess:
    args = [*SENDD, "--config", str(config), "enqueue", "--tenant", "acme", "--text", text,
            "--recipients", str(recipients), *extra]
    binary = isinstance(stdin, bytes)
    result = subprocess.run(args, input=stdin, capture_output=True, text=not binary, env=env(),
                            timeout=300)
    if binary:
        result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def enqueue_json(config: Path, recipients: str | Path, *extra: str, text: str = "Hello",
                 stdin: str | None = None) -> dict[str, Any]:
    return sendd_json(config, "enqueue", "--tenant", "acme", "--text", text,
                      "--recipients", str(recipients), *extra, stdin=stdin)


def messages(url: str) -> list[dict[str, Any]]:
    return [dict(r) for r in query(url, "SELECT * FROM sendd.message ORDER BY id")]


def snapshot(url: str) -> dict[str, Any]:
    return {
        "messages": scalar(url, "SELECT count(*) FROM sendd.message"),
        "campaigns": [tuple(r) for r in query(url, "SELECT id, status, total FROM sendd.campaign")],
        "ledger": scalar(url, "SELECT count(*) FROM sendd.credit_ledger"),
        "tenants": [tuple(r) for r in query(url, "SELECT id, credits FROM sendd.tenant")],
    }


# --- what gets queued ---------------------------------------------------------------------

def test_plain_file(config, tmp_path, database_url):
    recipients = numbers(5)
    path = tmp_path / "r.txt"
    path.write_text("# customers\n" + "\n".join(recipients[:3]) + "\n\n"
                    + "\n".join(recipients[3:]) + "\n")
    result = enqueue_json(config, path, "--name", "spring", text="Hello there")
    assert (result["queued"], result["rejected"], result["rejected_sample"]) == (5, 0, [])
    cid = result["campaign_id"]
    assert isinstance(cid, int)

    rows = messages(database_url)
    assert [r["recipient"] for r in rows] == recipients
    for row in rows:
        assert (row["tenant_id"], row["campaign_id"], row["account"], row["sender"]) == (
            "acme", cid, "main", "sendd")
        assert (row["body"], row["status"], row["priority"], row["segments"]) == (
            "Hello there", "queued", 0, 1)
    campaign = query(database_url, "SELECT * FROM sendd.campaign")[0]
    assert (campaign["id"], campaign["name"], campaign["status"], campaign["total"]) == (
        cid, "spring", "sending", 5)


def test_csv_fills_placeholders(config, tmp_path, database_url):
    a, b, c = numbers(3)
    path = tmp_path / "r.csv"
    path.write_text("Phone,Name,Code\n"
                    f"{a},Alice,1234\n"
                    f'"{b}","Smith, Bob",77\n'
                    f"+30 69{c[5:7]} {c[7:10]} {c[10:]},Γιώργος,9\n")  # formatted: normalized
    result = enqueue_json(config, path, text="Hi {name}, your code is {CODE} ({phone})")
    assert (result["queued"], result["rejected"]) == (3, 0)
    bodies = {r["recipient"]: r["body"] for r in messages(database_url)}
    assert bodies == {
        a: f"Hi Alice, your code is 1234 ({a})",
        b: f"Hi Smith, Bob, your code is 77 ({b})",
        c: f"Hi Γιώργος, your code is 9 ({c})",
    }


def test_csv_with_a_byte_order_mark(config, tmp_path, database_url):
    a, b = numbers(2)
    path = tmp_path / "excel.csv"
    path.write_bytes(f"\ufeffphone,name\r\n{a},Ann\r\n{b},Ben\r\n".encode())
    result = enqueue_json(config, path, text="Hi {name}")
    assert (result["queued"], result["rejected"]) == (2, 0)
    assert [r["body"] for r in messages(database_url)] == ["Hi Ann", "Hi Ben"]


def test_invalid_numbers_are_rejected_with_a_sample_and_never_queued(config, tmp_path,
                                                                    database_url):
    good = numbers(4)
    bad = ["12345", "hello", "+30690", "+999123456789", "0030690000", "+1 555", "++30"]
    lines = [good[0], bad[0], good[1], bad[1], "", bad[2], "# note", bad[3], good[2], bad[4],
             bad[5], bad[6], good[3]]
    path = write_recipients(tmp_path / "r.txt", lines)
    result = enqueue_json(config, path)
    assert (result["queued"], result["rejected"]) == (4, 7)
    sample = result["rejected_sample"]
    assert 1 <= len(sample) <= 7
    # Each sample entry names the line and the text found there, first ones first.
    assert sample[:3] == ["line 2: 12345", "line 4: hello", "line 6: +30690"]
    stored = [r["recipient"] for r in messages(database_url)]
    assert stored == good
    assert scalar(database_url, "SELECT total FROM sendd.campaign") == 4


@pytest.mark.parametrize("text, segments", [
    ("a" * 160, 1),
    ("a" * 161, 2),
    ("é" * 160, 1),  # é is in the GSM-7 alphabet
    ("€" * 80, 1),  # an extension character costs two septets: 160
    ("€" * 81, 2),
    ("й" * 70, 1),  # Cyrillic: UCS-2
    ("й" * 71, 2),
    ("a" * 70 + "й", 2),  # one non-GSM character makes the whole text UCS-2
])
def test_segments_are_counted(config, tmp_path, database_url, text, segments):
    result = enqueue_json(config, write_recipients(tmp_path / "r.txt", numbers(2)), text=text)
    assert result["queued"] == 2
    assert [(r["body"], r["segments"]) for r in messages(database_url)] == [(text, segments)] * 2


def test_segments_are_counted_per_rendered_body(config, tmp_path, database_url):
    a, b, c = numbers(3)
    path = tmp_path / "r.csv"
    path.write_text(f"phone,extra\n{a},\n{b},{'x' * 60}\n{c},ж\n")
    enqueue_json(config, path, text="y" * 150 + "{extra}")
    assert {r["recipient"]: r["segments"] for r in messages(database_url)} == {
        a: 1, b: 2, c: 3}  # 150 GSM-7; 210 GSM-7; 151 UCS-2


def test_transactional_messages_have_no_campaign_and_high_priority(config, tmp_path,
                                                                   database_url):
    result = enqueue_json(config, write_recipients(tmp_path / "r.txt", numbers(3)),
                          "--transactional", text="Your code is 1234")
    assert result["campaign_id"] is None
    assert result["queued"] == 3
    rows = messages(database_url)
    assert len(rows) == 3
    assert all(r["campaign_id"] is None and r["priority"] > 0 for r in rows)
    assert scalar(database_url, "SELECT count(*) FROM sendd.campaign") == 0


def test_at_in_the_future_schedules_the_campaign(config, tmp_path, database_url):
    at = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    result = enqueue_json(config, write_recipients(tmp_path / "r.txt", numbers(2)),
                          "--at", at.isoformat())
    campaign = query(database_url, "SELECT * FROM sendd.campaign WHERE id = $1",
                     result["campaign_id"])[0]
    assert campaign["status"] == "scheduled"
    assert campaign["scheduled_at"] == at
    assert campaign["started_at"] is None


def test_at_in_the_past_is_refused_and_now_sends_at_once(config, tmp_path, database_url):
    path = write_recipients(tmp_path / "r.txt", numbers(2))
    check_refused(config, database_url, path, "--at", "past", "--now",
                  extra=("--at", "2020-01-01T00:00:00+00:00"))
    result = enqueue_json(config, path, "--now")
    assert scalar(database_url, "SELECT status FROM sendd.campaign WHERE id = $1",
                  result["campaign_id"]) == "sending"


def test_recipients_from_stdin(config, database_url):
    recipients = numbers(4)
    result = enqueue_json(config, "-", stdin="\n".join(recipients) + "\n")
    assert (result["queued"], result["rejected"]) == (4, 0)
    assert [r["recipient"] for r in messages(database_url)] == recipients


def test_csv_from_stdin(config, database_url):
    a, b = numbers(2)
    enqueue_json(config, "-", text="Hi {name}", stdin=f"phone,name\n{a},Ann\n{b},Ben\n")
    assert [r["body"] for r in messages(database_url)] == ["Hi Ann", "Hi Ben"]


# Runs argv[2:] and writes its peak RSS (KiB) to argv[1]. A go-between is needed: Linux
# carries the pre-exec memory high-water mark of a forked child over into its ru_maxrss, so a
# child forked straight from this (large) pytest process would report pytest's size, and
# RUSAGE_CHILDREN would also count every other process this session has waited for.
MEASURE = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def peak_rss(args: list[str], tmp_path: Path) -> tuple[int, str]:
    """Run a command; (its peak RSS in bytes, its stdout)."""
    report = tmp_path / "maxrss"
    result = subprocess.run([sys.executable, "-c", MEASURE, str(report), *args],
                            capture_output=True, text=True, env=env(), timeout=600)
    assert result.returncode == 0, result.stderr
    return int(report.read_text()) * 1024, result.stdout  # ru_maxrss is in KiB on Linux


@pytest.mark.slow
def test_large_file_streams_in_bounded_memory(config, tmp_path, database_url):
    count = 200_000
    text = "Hello {phone}, " + "this is the spring campaign, with a body of some length. " * 2
    command = [*SENDD, "--config", str(config), "enqueue", "--tenant", "acme", "--text", text]
    small = write_recipients(tmp_path / "small.txt", numbers(1000, start=10_000_000))
    baseline, _ = peak_rss([*command, "--recipients", str(small)], tmp_path)
    large = write_recipients(tmp_path / "large.txt", numbers(count))
    peak, stdout = peak_rss([*command, "--recipients", str(large)], tmp_path)

    result = json.loads(stdout)
    assert (result["queued"], result["rejected"]) == (count, 0)
    total = scalar(database_url, "SELECT total FROM sendd.campaign WHERE id = $1",
                   result["campaign_id"])
    assert total == result["queued"] == count
    assert scalar(database_url, "SELECT count(*) FROM sendd.message WHERE campaign_id = $1",
                  result["campaign_id"]) == count

    # What holding every row would cost, at the least: a tuple with its own recipient and body.
    recipient = numbers(1)[0]
    row = ("acme", 1, "main", "sendd", recipient, text.replace("{phone}", recipient), 0, 2)
    all_rows = count * (sys.getsizeof(row) + sum(sys.getsizeof(v) for v in row[4:6]))  # ~70 MiB
    # Measured: ~36 MiB for 1,000 lines and ~41 MiB for 200,000 (one COPY chunk in memory).
    assert peak < 60 * MIB, f"peak RSS {peak / MIB:.0f} MiB"
    assert peak - baseline < 15 * MIB, f"grew {(peak - baseline) / MIB:.0f} MiB"
    assert peak < baseline + all_rows / 4


# --- bad input: one line, non-zero, nothing stored ----------------------------------------

def check_refused(config: Path, database_url: str, recipients: str | Path, *mentions: str,
                  extra: tuple[str, ...] = (), text: str = "Hello",
                  stdin: str | bytes | None = None) -> str:
    before = snapshot(database_url)
    line = assert_user_error(run_enqueue(config, recipients, *extra, text=text, stdin=stdin),
                             *mentions)
    assert snapshot(database_url) == before
    return line


def test_nul_bytes_after_many_valid_lines_store_nothing(config, tmp_path, database_url):
    # 25,000 good lines are copied in chunks before the bad one is read: all rolled back.
    path = tmp_path / "r.txt"
    path.write_bytes(("\n".join(numbers(25_000)) + "\n").encode() + b"+3069\x00\x01\x02\n")
    check_refused(config, database_url, path, "line 25001")
    assert scalar(database_url, "SELECT count(*) FROM sendd.message") == 0


def test_binary_file_is_refused(config, tmp_path, database_url):
    path = tmp_path / "r.bin"
    path.write_bytes(bytes(range(256)) * 64)
    check_refused(config, database_url, path, str(path))


def test_binary_on_stdin_is_refused(config, database_url):
    check_refused(config, database_url, "-", stdin=b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")


def test_non_utf8_text_is_refused(config, tmp_path, database_url):
    path = tmp_path / "r.txt"
    path.write_bytes(("\n".join(numbers(3)) + "\n").encode() + b"caf\xe9\n")
    check_refused(config, database_url, path, "UTF-8")


@pytest.mark.parametrize("bad_line", ["{a},x,extra", "{a}"], ids=["too-many", "too-few"])
def test_csv_with_wrong_field_count_names_the_line(config, tmp_path, database_url, bad_line):
    rows = [f"{n},name{i}" for i, n in enumerate(numbers(12))]
    rows[7] = bad_line.format(a=numbers(1, start=500)[0])  # file line 9 (after the header)
    path = write_recipients(tmp_path / "r.csv", ["phone,name", *rows])
    check_refused(config, database_url, path, "line 9", text="Hi {name}")


def test_csv_with_wrong_field_count_after_a_chunk_stores_nothing(config, tmp_path,
                                                                 database_url):
    rows = [f"{n},x" for n in numbers(15_000)]
    rows.append("+306900000001,x,y")  # line 15,002
    path = write_recipients(tmp_path / "r.csv", ["phone,name", *rows])
    check_refused(config, database_url, path, "line 15002")
    assert scalar(database_url, "SELECT count(*) FROM sendd.message") == 0


def test_csv_placeholder_without_a_column(config, tmp_path, database_url):
    a, b = numbers(2)
    path = write_recipients(tmp_path / "r.csv", ["phone,first", f"{a},Ann", f"{b},Ben"])
    check_refused(config, database_url, path, "{name}", text="Hi {name}")


def test_placeholder_in_a_plain_file(config, tmp_path, database_url):
    path = write_recipients(tmp_path / "r.txt", numbers(2))
    check_refused(config, database_url, path, "{name}", text="Hi {name}")


def test_several_fields_without_a_header(config, tmp_path, database_url):
    a, b = numbers(2)
    path = write_recipients(tmp_path / "r.txt", [a, f"{b},Ben"])
    check_refused(config, database_url, path, "line 2")


def test_unknown_tenant(config, tmp_path, database_url):
    path = write_recipients(tmp_path / "r.txt", numbers(2))
    before = snapshot(database_url)
    result = subprocess.run([*SENDD, "--config", str(config), "enqueue", "--tenant", "ghost",
                             "--text", "hi", "--recipients", str(path)],
                            capture_output=True, text=True, env=env(), timeout=60)
    assert_user_error(result, "ghost")
    assert snapshot(database_url) == before


def test_missing_recipients_file(config, tmp_path, database_url):
    check_refused(config, database_url, tmp_path / "absent.txt", "absent.txt")


def test_directory_as_recipients_file(config, tmp_path, database_url):
    check_refused(config, database_url, tmp_path, str(tmp_path))


def test_no_valid_numbers(config, tmp_path, database_url):
    path = write_recipients(tmp_path / "r.txt", ["12345", "hello", "+30690"])
    check_refused(config, database_url, path, "no valid recipients")
    assert scalar(database_url, "SELECT count(*) FROM sendd.campaign") == 0


def test_empty_file(config, tmp_path, database_url):
    path = tmp_path / "r.txt"
    path.write_text("")
    check_refused(config, database_url, path)


@pytest.mark.parametrize("extra, mention", [
    (("--at", "next tuesday"), "--at"),
    (("--account", "nope"), "nope"),
    (("--transactional", "--at", "2030-01-01T00:00:00+00:00"), "--transactional"),
    (("--transactional", "--name", ""), "--transactional"),
])
def test_bad_options(config, tmp_path, database_url, extra, mention):
    path = write_recipients(tmp_path / "r.txt", numbers(2))
    check_refused(config, database_url, path, mention, extra=extra)


def test_tenant_needs_no_credits_to_enqueue(config, tmp_path, database_url):
    """Credits are debited on acceptance, not reserved at enqueue."""
    sendd(config, "tenant", "set", "poor")
    result = sendd_json(config, "enqueue", "--tenant", "poor", "--text", "hi",
                        "--recipients", str(write_recipients(tmp_path / "r.txt", numbers(2))))
    assert result["queued"] == 2
