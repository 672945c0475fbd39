"""Bad input on the command line, as real processes: every command answers one line on stderr
naming what to fix (the option, the line of the file, the configuration key), exits non-zero,
prints no traceback and stores nothing. Also `--at`/`--now`, and `sendd ctl` with a broken
configuration file."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from harness import (
    SENDD,
    Daemon,
    assert_user_error,
    env,
    fresh_database,
    numbers,
    query,
    scalar,
    sendd,
    sendd_json,
    setup_database,
    write_config,
    write_recipients,
)

NO_PROVIDER = "http://127.0.0.1:9"  # never contacted: nothing here sends
KIB = 1024
PASSWORD = "pw-Do-Not-Print-81"


def run_cli(*args: str, config: Path | None = None, stdin: str | bytes | None = None,
            extra_env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    options = ["--config", str(config)] if config else []
    binary = isinstance(stdin, bytes)
    result = subprocess.run([*SENDD, *options, *args], input=stdin, capture_output=True,
                            text=not binary, env={**env(), **(extra_env or {})},
                            timeout=timeout)
    if binary:
        result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def snapshot(url: str) -> dict[str, Any]:
    return {
        "messages": scalar(url, "SELECT count(*) FROM sendd.message"),
        "campaigns": [tuple(r) for r in query(url, "SELECT id, status, total FROM sendd.campaign")],
        "ledger": scalar(url, "SELECT count(*) FROM sendd.credit_ledger"),
        "tenants": [tuple(r) for r in query(
            url, "SELECT id, credits, rate_msgs_per_s FROM sendd.tenant ORDER BY id")],
    }


@pytest.fixture(scope="module")
def shared_database(pg_server, tmp_path_factory) -> Iterator[tuple[Path, str]]:
    """One migrated database (tenant acme) for the module's commands, and its config file.

    They share it: a refused command must store nothing (`refused` compares the database
    before and after), and the few that do store read back only their own campaign. Each test
    migrating a database of its own cost about a second of `sendd` processes."""
    with fresh_database(pg_server, "cli_errors") as url:
        path = write_config(tmp_path_factory.mktemp("cli-errors") / "sendd.toml", url,
                            NO_PROVIDER)
        setup_database(path, {"acme": 1000})
        yield path, url


@pytest.fixture
def config(shared_database) -> Path:
    return shared_database[0]


@pytest.fixture
def database_url(shared_database) -> str:
    """The shared database (this overrides conftest's fresh one in this module)."""
    return shared_database[1]


def refused(config: Path, database_url: str, *args: str, mentions: tuple[str, ...] = (),
            stdin: str | bytes | None = None) -> str:
    """Run a command that must fail: one line naming `mentions`, nothing stored."""
    before = snapshot(database_url)
    line = assert_user_error(run_cli(*args, config=config, stdin=stdin), *mentions)
    assert snapshot(database_url) == before
    return line


def enqueue_args(recipients: Path | str, *extra: str, text: str = "Hello") -> list[str]:
    return ["enqueue", "--tenant", "acme", "--text", text, "--recipients", str(recipients),
            *extra]


# --- --at and --now ---------------------------------------------------------------------------

def test_at_in_the_past_is_refused_unless_now_is_said(config, tmp_path, database_url):
    path = write_recipients(tmp_path / "r.txt", numbers(2))
    past = (datetime.now(UTC) - timedelta(minutes=5)).replace(microsecond=0).isoformat()
    line = refused(config, database_url, *enqueue_args(path, "--at", past),
                   mentions=("--at", "past", "--now"))
    assert past in line
    # --now says "send at once", and cannot be combined with a time.
    refused(config, database_url, *enqueue_args(path, "--at", past, "--now"),
            mentions=("--now", "--at"))
    result = sendd_json(config, *enqueue_args(path, "--now"))
    campaign = query(database_url, "SELECT status, scheduled_at FROM sendd.campaign WHERE id = $1",
                     result["campaign_id"])[0]
    assert (campaign["status"], campaign["scheduled_at"]) == ("sending", None)


@pytest.mark.parametrize("at", ["2030-01-01T09:00:00", "2030-01-01", "2030-01-01 09:00"])
def test_at_without_a_time_zone_is_refused_showing_the_accepted_form(config, tmp_path,
                                                                     database_url, at):
    path = write_recipients(tmp_path / "r.txt", numbers(2))
    refused(config, database_url, *enqueue_args(path, "--at", at),
            mentions=("--at", "time zone", "2026-12-01T09:00:00+02:00"))


@pytest.mark.parametrize("at", ["", "  "])
def test_an_empty_at_is_refused_not_taken_as_now(config, tmp_path, database_url, at):
    # `--at "$WHEN"` with WHEN unset must not send at once.
    path = write_recipients(tmp_path / "r.txt", numbers(2))
    refused(config, database_url, *enqueue_args(path, "--at", at), mentions=("--at", "empty"))


def test_an_at_past_the_year_9999_in_utc_names_the_option(config, tmp_path, database_url):
    path = write_recipients(tmp_path / "r.txt", numbers(2))
    refused(config, database_url, *enqueue_args(path, "--at", "9999-12-31T23:59:59-12:00"),
            mentions=("--at", "9999"))


def test_at_with_a_zone_in_the_future_schedules(config, tmp_path, database_url):
    at = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)
    local = at.astimezone(datetime.now().astimezone().tzinfo).isoformat()
    path = write_recipients(tmp_path / "r.txt", numbers(2))
    for given in (at.isoformat(), at.strftime("%Y-%m-%dT%H:%M:%SZ"), local):
        result = sendd_json(config, *enqueue_args(path, "--at", given))
        campaign = query(database_url, "SELECT * FROM sendd.campaign WHERE id = $1",
                         result["campaign_id"])[0]
        assert (campaign["status"], campaign["scheduled_at"]) == ("scheduled", at), given


# --- the recipients file -----------------------------------------------------------------------

@pytest.mark.parametrize("lines", [3000, 30_000])
def test_a_bad_last_line_is_named_by_its_real_number(config, tmp_path, database_url, lines):
    path = tmp_path / "r.txt"
    path.write_bytes(("\n".join(numbers(lines)) + "\n").encode() + b"+30 caf\xe9\n")
    refused(config, database_url, *enqueue_args(path),
            mentions=(f"line {lines + 1}: not UTF-8 text",))


def test_a_bad_line_in_a_csv_is_named_by_its_real_number(config, tmp_path, database_url):
    rows = [f"{n},Ann" for n in numbers(2000)]
    data = ("phone,name\n" + "\n".join(rows[:1500]) + "\n").encode()
    data += numbers(1, start=9000)[0].encode() + b",Ren\xe9e\n"  # line 1502
    data += ("\n".join(rows[1500:]) + "\n").encode()
    path = tmp_path / "r.csv"
    path.write_bytes(data)
    refused(config, database_url, *enqueue_args(path, text="Hi {name}"),
            mentions=("line 1502: not UTF-8 text",))


def test_a_bad_line_on_stdin_is_named_by_its_real_number(config, database_url):
    data = ("\n".join(numbers(5000)) + "\n").encode() + b"\xff\xfe\n"
    refused(config, database_url, *enqueue_args("-"), stdin=data,
            mentions=("line 5001: not UTF-8 text",))


def test_utf8_names_and_a_byte_order_mark_still_read(config, tmp_path, database_url):
    a, b = numbers(2)
    path = tmp_path / "r.csv"
    path.write_bytes(f"\ufeffphone,name\r\n{a},Renée\r\n{b},Zoë 🎉\r\n".encode())
    campaign_id = sendd_json(config, *enqueue_args(path, text="Hi {name}"))["campaign_id"]
    bodies = [r["body"] for r in query(database_url, "SELECT body FROM sendd.message "
                                                     "WHERE campaign_id = $1 ORDER BY id",
                                       campaign_id)]
    assert bodies == ["Hi Renée", "Hi Zoë 🎉"]


@pytest.mark.parametrize("where", ["first", "middle"])
def test_a_line_over_128_kib_is_one_line_naming_it(config, tmp_path, database_url, where):
    long_line = "+3069" + "1" * (130 * KIB)
    lines = [long_line, *numbers(3)] if where == "first" else [*numbers(3), long_line]
    path = write_recipients(tmp_path / "r.txt", lines)
    number = 1 if where == "first" else 4
    refused(config, database_url, *enqueue_args(path), mentions=(f"line {number}", "long"))


def test_a_csv_field_over_128_kib_is_one_line_naming_it(config, tmp_path, database_url):
    a, b, c = numbers(3)
    path = write_recipients(tmp_path / "r.csv",
                            ["phone,name", f"{a},Ann", f'{b},"{"x" * (129 * KIB)}"', f"{c},Cy"])
    refused(config, database_url, *enqueue_args(path, text="Hi {name}"),
            mentions=("line 3", "long"))


def test_a_long_line_in_a_large_file_stores_nothing(config, tmp_path, database_url):
    # Lines after the first COPY chunk (10,000 rows): what was copied is rolled back.
    path = write_recipients(tmp_path / "r.txt", [*numbers(12_000), "9" * (200 * KIB)])
    before = scalar(database_url, "SELECT count(*) FROM sendd.message")
    refused(config, database_url, *enqueue_args(path), mentions=("line 12001",))
    assert scalar(database_url, "SELECT count(*) FROM sendd.message") == before


# --- text options ----------------------------------------------------------------------------

@pytest.mark.parametrize("option", ["--text", "--sender", "--name", "--tenant"])
def test_text_options_that_are_not_utf8_name_the_option(config, tmp_path, database_url, option):
    # A shell hands Python bytes that are not UTF-8 as lone surrogates.
    path = write_recipients(tmp_path / "r.txt", numbers(2))
    args = enqueue_args(path)
    args = [*args, option, "caf\udce9"] if option != "--tenant" else \
        ["enqueue", "--tenant", "caf\udce9", "--text", "hi", "--recipients", str(path)]
    refused(config, database_url, *args, mentions=(option, "UTF-8"))


@pytest.mark.parametrize("option", ["--text", "--sender"])
def test_empty_text_or_sender_is_refused(config, tmp_path, database_url, option):
    path = write_recipients(tmp_path / "r.txt", numbers(2))
    refused(config, database_url, *enqueue_args(path), option, "", mentions=(option, "empty"))


def test_usage_errors_are_one_line(config, database_url):
    line = refused(config, database_url, "campaign", "pause", "abc", mentions=("ID", "abc"))
    assert "--help" in line
    refused(config, database_url, "tenant", "set", mentions=("TENANT",))
    refused(config, database_url, "enqueue", "--tenant", "acme", mentions=("--text",))
    refused(config, database_url, "ctl", "status", "--socket", "", mentions=("--socket",))


# --- numbers: the option is named, never "query argument $N" -------------------------------

HUGE = "99999999999999999999"


@pytest.mark.parametrize("args, option", [
    (["tenant", "set", "acme", "--credits", HUGE], "--credits"),
    (["tenant", "set", "acme", "--add-credits", HUGE], "--add-credits"),
    (["tenant", "set", "acme", "--add-credits", "9223372036854775000"], "--add-credits"),
    (["tenant", "set", "acme", "--rate", "-1"], "--rate"),
    (["tenant", "set", "acme", "--rate", "99999999999"], "--rate"),
    (["tenant", "set", "acme", "--rate", "2000000"], "--rate"),
    (["campaign", "show", HUGE], "ID"),
    (["campaign", "cancel", "0"], "ID"),
    (["ctl", "pause", "--campaign", HUGE], "--campaign"),
    (["ctl", "set-rate", "--account", "main", "--msgs-per-s", "-1"], "--msgs-per-s"),
    (["ctl", "set-rate", "--account", "main", "--msgs-per-s", "5", "--reqs-per-s", HUGE],
     "--reqs-per-s"),
    (["demo", "--messages", HUGE], "--messages"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_out_of_range_numbers_name_the_option(config, database_url, args, option):
    line = refused(config, database_url, *args, mentions=(option,))
    assert "query argument" not in line and "int64" not in line and "int32" not in line


def test_ctl_rates_match_the_daemons_limits():
    from sendd import options
    from sendd.control import protocol as control

    assert options.MAX_RATE == control.MAX_RATE


# --- the database URL ------------------------------------------------------------------------

@pytest.mark.parametrize("hosts", [
    "localhost:99999", "localhost:abc", "localhost:0", "[::1", "h1:abc,h2:5432", "h1:5432:5432",
    "local%00host",
])
def test_a_bad_database_url_names_the_key_and_hides_the_password(tmp_path, hosts):
    url = f"postgresql://sendd:{PASSWORD}@{hosts}/sendd"
    for args in (["--database-url", url, "migrate"], ["tenant", "set", "x", "--database-url", url]):
        line = assert_user_error(run_cli(*args))
        assert line.startswith("sendd: database.url (from --database-url): "), line
        assert PASSWORD not in line
    path = tmp_path / "sendd.toml"
    path.write_text(f'[database]\nurl = "{url}"\n')
    line = assert_user_error(run_cli("config", "check", config=path))
    assert line.startswith("sendd: database.url: ") and PASSWORD not in line


# --- secret files ------------------------------------------------------------------------------

def secret_file_config(tmp_path: Path, secret_path: Path | str) -> Path:
    path = tmp_path / "sendd.toml"
    path.write_text(f'[accounts.main]\nkind = "mitto"\nbase_url = "https://x.example"\n'
                    f'api_key_file = "{secret_path}"\n')
    return path


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "directory", "too-large"])
def test_a_secret_file_must_be_a_small_regular_file(tmp_path, kind):
    secret = {"dev-zero": Path("/dev/zero"), "fifo": tmp_path / "fifo",
              "directory": tmp_path, "too-large": tmp_path / "big.key"}[kind]
    if kind == "fifo":
        os.mkfifo(secret)
    if kind == "too-large":
        secret.write_text("k" * (64 * KIB + 1))
    result = run_cli("config", "check", config=secret_file_config(tmp_path, secret), timeout=20)
    assert_user_error(result, "accounts.main.api_key_file", str(secret))


def test_a_secret_file_of_64_kib_is_read(tmp_path):
    secret = tmp_path / "ok.key"
    secret.write_text("k" * (64 * KIB - 1) + "\n")
    result = run_cli("config", "check", config=secret_file_config(tmp_path, secret))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["accounts"]["main"]["api_key"] == "***"


def test_a_config_file_that_never_ends_is_refused(tmp_path):
    assert_user_error(run_cli("config", "check", config=Path("/dev/zero"), timeout=20),
                      "/dev/zero")


# --- URLs are shown without their passwords ---------------------------------------------------

def test_config_check_masks_the_userinfo_of_base_urls(tmp_path):
    path = tmp_path / "sendd.toml"
    path.write_text(f'[accounts.main]\nkind = "mitto"\napi_key = "k"\n'
                    f'base_url = "https://joe:{PASSWORD}@mitto.example.com/"\n'
                    f'[accounts.other]\nkind = "mitto"\napi_key = "k"\n'
                    f'base_url = "https://{PASSWORD}@mitto.example.com"\n')
    result = run_cli("config", "check", config=path)
    assert result.returncode == 0, result.stderr
    assert PASSWORD not in result.stdout
    accounts = json.loads(result.stdout)["accounts"]
    assert accounts["main"]["base_url"] == "https://joe:***@mitto.example.com"
    assert accounts["other"]["base_url"] == "https://***@mitto.example.com"


def test_a_bad_base_url_is_shown_without_its_password(tmp_path):
    path = tmp_path / "sendd.toml"
    path.write_text(f'[accounts.main]\nkind = "mitto"\napi_key = "k"\n'
                    f'base_url = "https://joe:{PASSWORD}@mitto.example.com:http/"\n')
    line = assert_user_error(run_cli("config", "check", config=path),
                             "accounts.main.base_url")
    assert PASSWORD not in line


# --- sendd ctl ---------------------------------------------------------------------------------

@contextmanager
def fake_daemon(path: Path, reply: dict[str, Any]) -> Iterator[list[dict[str, Any]]]:
    """A control socket that answers one request with `reply`; yields the requests seen."""
    seen: list[dict[str, Any]] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            seen.append(json.loads(conn.makefile("rb").readline()))
            conn.sendall(json.dumps(reply).encode() + b"\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        server.close()
        thread.join(5)


def test_a_daemon_error_is_printed_with_the_command_named_once(tmp_path):
    path = tmp_path / "control.sock"
    error = 'set-rate: "msgs_per_s" must be an integer between 0 and 1000000, got 5'
    with fake_daemon(path, {"ok": False, "error": error}) as seen:
        result = run_cli("ctl", "set-rate", "--socket", str(path), "--account", "main",
                         "--msgs-per-s", "5")
    line = assert_user_error(result)
    assert line == 'sendd: ctl set-rate: "msgs_per_s" must be an integer between 0 and 1000000, ' \
                   "got 5"
    assert seen == [{"cmd": "set-rate", "msgs_per_s": 5, "account": "main"}]


@pytest.fixture
def own_database_url(pg_server, request) -> Iterator[str]:
    """A database of this test's own (the module's `database_url` is the shared one)."""
    with fresh_database(pg_server, request.node.name) as url:
        yield url


def test_ctl_talks_to_the_daemon_while_the_config_file_is_broken(tmp_path, own_database_url):
    config = write_config(tmp_path / "sendd.toml", own_database_url, NO_PROVIDER)
    sendd(config, "migrate")
    sock = str(tmp_path / "control.sock")
    good = config.read_text()
    with Daemon(config, tmp_path / "daemon.log").wait_ready() as daemon:
        # Valid TOML with a bad value: the file's daemon.control_socket is still used.
        config.write_text(good.replace("senders = 4", "senders = 0"))
        status = run_cli("ctl", "status", "--json", config=config)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["pid"] == daemon.process.pid
        # The daemon refuses the file itself, and says why; it goes on as it was.
        line = assert_user_error(run_cli("ctl", "reload", config=config),
                                 "ctl reload", "pipeline.senders")
        assert line.count("reload:") == 1

        # Not TOML at all: --socket, else $SENDD_DAEMON__CONTROL_SOCKET, else the default.
        config.write_text("not toml [")
        status = run_cli("ctl", "status", "--socket", sock, config=config)
        assert status.returncode == 0 and "running" in status.stdout, status.stderr
        status = run_cli("ctl", "status", "--json", config=config,
                         extra_env={"SENDD_DAEMON__CONTROL_SOCKET": sock})
        assert json.loads(status.stdout)["ok"] is True, status.stderr
        line = assert_user_error(run_cli("ctl", "reload", "--socket", sock, config=config),
                                 "ctl reload", "invalid TOML")
        # Nowhere to find the daemon: one line that says why the file was not used.
        line = assert_user_error(run_cli("ctl", "status", config=config),
                                 "/run/sendd/control.sock", "invalid TOML")
        config.write_text(good)
        status = run_cli("ctl", "status", "--json", config=config)
        assert json.loads(status.stdout)["ok"] is True, status.stderr
        assert daemon.process.poll() is None
