"""The configuration layer: file, environment, secrets, validation and masking."""

import dataclasses
import json
import re
from pathlib import Path

import pytest

from sendd import config as cfg
from sendd.config import (
    AccountConfig,
    Config,
    ConfigError,
    DaemonConfig,
    DatabaseConfig,
    PipelineConfig,
    RedisConfig,
    RetryConfig,
    load_config,
    mask_url,
    masked,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "sendd.toml"
SECRET = "s3cr3t-VALUE-42"
MITTO = {
    "SENDD_ACCOUNTS__MAIN__KIND": "mitto",
    "SENDD_ACCOUNTS__MAIN__BASE_URL": "https://mitto.example.com/",
    "SENDD_ACCOUNTS__MAIN__API_KEY": SECRET,
}


@pytest.fixture(autouse=True)
def no_system_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Tests must not depend on whether this machine has an /etc/sendd/sendd.toml.
    monkeypatch.setattr(cfg, "DEFAULT_PATH", str(tmp_path / "absent.toml"))


def write(tmp_path: Path, text: str, name: str = "sendd.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_of(*args: object, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message and "\r" not in message and message
    return message


# --- defaults and sources --------------------------------------------------------------------


def test_defaults() -> None:
    config = load_config(env={})
    assert config.source == "built-in defaults"
    assert config.database == DatabaseConfig(url="postgresql:///sendd")
    assert config.database.url == "postgresql:///sendd"
    assert config.daemon == DaemonConfig()
    assert config.pipeline == PipelineConfig()
    assert config.retry == RetryConfig()
    assert config.redis == RedisConfig(url="")
    assert config.accounts == {}


def test_default_path_used_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[pipeline]\nsenders = 3\n", "etc.toml")
    monkeypatch.setattr(cfg, "DEFAULT_PATH", path)
    config = load_config(env={})
    assert (config.source, config.pipeline.senders) == (path, 3)


def test_sendd_config_env_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[pipeline]\nsenders = 5\n")
    config = load_config(env={"SENDD_CONFIG": path})
    assert (config.source, config.pipeline.senders) == (path, 5)


def test_missing_explicit_path_is_an_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    assert missing in error_of(missing, env={})
    message = error_of(env={"SENDD_CONFIG": missing})
    assert missing in message and "SENDD_CONFIG" in message


def test_toml_syntax_error_has_line_number(tmp_path: Path) -> None:
    path = write(tmp_path, "[pipeline]\nsenders = 8\nlinger_ms = \n")
    message = error_of(path, env={})
    assert path in message and "line 3" in message
    path = write(tmp_path, "[pipeline]\nx = [1,\n", "eof.toml")
    assert "line 3" in error_of(path, env={})


# --- the example file ------------------------------------------------------------------------


def test_example_file_loads_as_defaults() -> None:
    config = load_config(str(EXAMPLE), env={})
    assert dataclasses.replace(config, source="") == dataclasses.replace(
        load_config(env={}), source=""
    )


def example_keys() -> dict[str, set[str]]:
    """Keys shown per section, commented out or not ("#key = ..." and "#[section]" too)."""
    keys: dict[str, set[str]] = {}
    section = ""
    for line in EXAMPLE.read_text().splitlines():
        if header := re.match(r"#?\[([\w.]+)\]", line):
            section = header.group(1)
        elif key := re.match(r"#?(\w+) *=", line):
            keys.setdefault(section, set()).add(key.group(1))
    return keys


@pytest.mark.parametrize(
    "section, cls",
    [
        ("database", DatabaseConfig),
        ("daemon", DaemonConfig),
        ("pipeline", PipelineConfig),
        ("retry", RetryConfig),
        ("redis", RedisConfig),
        ("accounts", AccountConfig),
    ],
)
def test_example_file_shows_every_key(section: str, cls: type) -> None:
    keys = example_keys()
    if section == "accounts":
        shown = keys["accounts.main"] | keys["accounts.wa"]
        assert {"kind"} <= keys["accounts.main"] & keys["accounts.wa"]
    else:
        shown = keys[section]
    for f in dataclasses.fields(cls):
        if f.name != "name":  # an account's name is its table's name
            assert f.name in shown or f"{f.name}_file" in shown, f"{section}.{f.name} missing"


def test_example_accounts_are_valid_when_uncommented(tmp_path: Path) -> None:
    head, sep, accounts = EXAMPLE.read_text().partition("#[accounts.")
    text = head + re.sub(r"(?m)^#(?=[\[a-z])", "", sep + accounts)
    secrets = {"API_KEY", "TOKEN", "APP_SECRET", "VERIFY_TOKEN"}
    env = {f"SENDD_ACCOUNTS__{a}__{k}": SECRET for a in ("MAIN", "WA") for k in secrets}
    del env["SENDD_ACCOUNTS__MAIN__TOKEN"], env["SENDD_ACCOUNTS__MAIN__APP_SECRET"]
    del env["SENDD_ACCOUNTS__MAIN__VERIFY_TOKEN"], env["SENDD_ACCOUNTS__WA__API_KEY"]
    config = load_config(write(tmp_path, text), env=env)
    main, wa = config.accounts["main"], config.accounts["wa"]
    assert (main.kind, main.max_batch, main.api_key) == ("mitto", 1000, SECRET)
    assert (wa.kind, wa.max_batch, wa.token, wa.msgs_per_s) == ("whatsapp", 1, SECRET, 80)


# --- environment overrides -------------------------------------------------------------------


def test_env_overrides_each_type(tmp_path: Path) -> None:
    path = write(tmp_path, "[pipeline]\nsenders = 3\n")
    env = {
        "SENDD_PIPELINE__SENDERS": "16",
        "SENDD_PIPELINE__LEASE_SECONDS": "45.5",
        "SENDD_DAEMON__LOG_LEVEL": "DEBUG",
        "SENDD_DATABASE__URL": "postgresql://app@db/sendd",
        "SENDD_ACCOUNTS__MAIN__SINGLE": "yes",
        **MITTO,
    }
    config = load_config(path, env=env)
    assert config.pipeline.senders == 16
    assert config.pipeline.lease_seconds == 45.5
    assert config.daemon.log_level == "debug"
    assert config.database.url == "postgresql://app@db/sendd"
    assert config.accounts["main"].single is True


@pytest.mark.parametrize(
    "word, value", [("true", True), ("1", True), ("Yes", True), ("false", False), ("0", False)]
)
def test_env_booleans(word: str, value: bool) -> None:
    env = {**MITTO, "SENDD_ACCOUNTS__MAIN__IDEMPOTENT_REFERENCES": word}
    assert load_config(env=env).accounts["main"].idempotent_references is value


def test_env_bad_boolean_names_the_variable() -> None:
    env = {**MITTO, "SENDD_ACCOUNTS__MAIN__SINGLE": "maybe"}
    message = error_of(env=env)
    assert "accounts.main.single" in message and "SENDD_ACCOUNTS__MAIN__SINGLE" in message


def test_account_entirely_from_env() -> None:
    account = load_config(env=MITTO).accounts["main"]
    assert account.name == "main"
    assert account.base_url == "https://mitto.example.com"  # trailing slash dropped
    assert (account.api_key, account.max_batch, account.msgs_per_s) == (SECRET, 1000, 0)


def test_env_account_name_is_lower_cased(tmp_path: Path) -> None:
    path = write(tmp_path, '[accounts.bulk-1]\nkind = "mitto"\nbase_url = "http://x"\n')
    config = load_config(path, env={"SENDD_ACCOUNTS__BULK-1__API_KEY": SECRET})
    assert config.accounts["bulk-1"].api_key == SECRET


def test_batch_size_is_the_contract_alias_of_claim_chunk() -> None:
    assert load_config(env={"SENDD_PIPELINE__BATCH_SIZE": "500"}).pipeline.claim_chunk == 500
    message = error_of(env={"SENDD_PIPELINE__BATCH_SIZE": "abc"})
    assert message.startswith("pipeline.batch_size (from SENDD_PIPELINE__BATCH_SIZE): ")
    assert message.endswith('must be an integer between 1 and 100000, got "abc"')


def test_env_beats_the_file_and_cli_beats_env(tmp_path: Path) -> None:
    text = '[database]\nurl = "postgresql://file/db"\n[pipeline]\nclaim_chunk = 9\n'
    path = write(tmp_path, text)
    env = {"SENDD_DATABASE__URL": "postgresql://env/db", "SENDD_PIPELINE__BATCH_SIZE": "7"}
    config = load_config(path, env=env, database_url="postgresql://cli/db")
    assert config.database.url == "postgresql://cli/db"
    assert config.pipeline.claim_chunk == 7


def test_unknown_env_variable_is_an_error() -> None:
    message = error_of(env={"SENDD_PIPELINE__SENDERZ": "4"})
    assert 'unknown key "pipeline.senderz"' in message
    assert "SENDD_PIPELINE__SENDERZ" in message and '"pipeline.senders"' in message
    assert '(did you mean "pipeline"?)' in error_of(env={"SENDD_PIPLINE__SENDERS": "4"})
    assert "SENDD_NOPE" in error_of(env={"SENDD_NOPE": "1"})
    assert "SENDD_PIPELINE" in error_of(env={"SENDD_PIPELINE": "1"})
    assert "SENDD_ACCOUNTS__MAIN" in error_of(env={"SENDD_ACCOUNTS__MAIN": "1"})


def test_unrelated_env_is_ignored() -> None:
    assert load_config(env={"HOME": "/root", "SENDD_CONFIG": "", "XSENDD_A": "1"}).accounts == {}


# --- validation ------------------------------------------------------------------------------


def test_unknown_section_with_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "[pipline]\nsenders = 4\n")
    assert error_of(path, env={}) == (f'unknown key "pipline" in {path} (did you mean "pipeline"?)')


def test_unknown_key_with_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "[pipeline]\nsender = 4\n")
    assert error_of(path, env={}) == (
        f'unknown key "pipeline.sender" in {path} (did you mean "pipeline.senders"?)'
    )


def test_key_in_the_wrong_section_suggests_the_right_one(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon]\nsenders = 4\n")
    assert '(did you mean "pipeline.senders"?)' in error_of(path, env={})


def test_unknown_account_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[accounts.main]\nkind = "mitto"\napikey = "x"\n')
    message = error_of(path, env={})
    assert 'unknown key "accounts.main.apikey"' in message
    assert '"accounts.main.api_key"' in message


@pytest.mark.parametrize(
    "toml, expected",
    [
        ('[pipeline]\nsenders = "8"', 'senders: must be an integer between 1 and 256, got "8"'),
        ("[pipeline]\nsenders = true", "pipeline.senders: must be an integer between 1 and 256"),
        ("[pipeline]\nsenders = 8.0", "pipeline.senders: must be an integer"),
        ('[retry]\njitter = "x"', "retry.jitter: must be a number between 0 and 1"),
        ("[daemon]\nlog_level = 3", 'daemon.log_level: must be one of "debug"'),
        ("pipeline = 3", "pipeline: must be a table"),
    ],
)
def test_wrong_type(tmp_path: Path, toml: str, expected: str) -> None:
    assert expected in error_of(write(tmp_path, toml + "\n"), env={})


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("PIPELINE__SENDERS", "0", "pipeline.senders"),
        ("PIPELINE__SENDERS", "257", "pipeline.senders"),
        ("PIPELINE__CLAIM_CHUNK", "100001", "pipeline.claim_chunk"),
        ("PIPELINE__CLAIM_CAPACITY", "0", "pipeline.claim_capacity"),
        ("PIPELINE__LINGER_MS", "-1", "pipeline.linger_ms"),
        ("PIPELINE__LEASE_SECONDS", "0.9", "pipeline.lease_seconds"),
        ("PIPELINE__POLL_INTERVAL", "nan", "pipeline.poll_interval"),
        ("RETRY__MAX_ATTEMPTS", "101", "retry.max_attempts"),
        ("RETRY__JITTER", "1.5", "retry.jitter"),
        ("RETRY__MAX_DELAY", "1", "retry.max_delay"),
        ("DAEMON__HTTP_LISTEN", "9464", "daemon.http_listen"),
        ("DAEMON__HTTP_LISTEN", "127.0.0.1:99999", "daemon.http_listen"),
        ("DAEMON__LOG_FORMAT", "xml", "daemon.log_format"),
        ("DAEMON__CONTROL_SOCKET", "/" + "x" * 200, "daemon.control_socket"),
        ("DATABASE__URL", "mysql://x", "database.url"),
        ("REDIS__URL", "http://x", "redis.url"),
    ],
)
def test_out_of_range(key: str, value: str, expected: str) -> None:
    assert error_of(env={f"SENDD_{key}": value}).startswith(expected)


@pytest.mark.parametrize("listen", ["127.0.0.1:9464", "[::1]:0", "0.0.0.0:80", "localhost:1"])
def test_http_listen_accepts_host_port(listen: str) -> None:
    assert load_config(env={"SENDD_DAEMON__HTTP_LISTEN": listen}).daemon.http_listen == listen


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"SENDD_ACCOUNTS__MAIN__BASE_URL": "ftp://x"}, "accounts.main.base_url"),
        ({"SENDD_ACCOUNTS__MAIN__KIND": "sms"}, "accounts.main.kind"),
        ({"SENDD_ACCOUNTS__MAIN__API_KEY": ""}, "accounts.main.api_key: required"),
        ({"SENDD_ACCOUNTS__MAIN__MAX_BATCH": "1001"}, "accounts.main.max_batch"),
        ({"SENDD_ACCOUNTS__MAIN__MSGS_PER_S": "-1"}, "accounts.main.msgs_per_s"),
        ({"SENDD_ACCOUNTS__MAIN__TIMEOUT": "0"}, "accounts.main.timeout"),
        ({"SENDD_ACCOUNTS__MAIN__KIND": "whatsapp"}, "accounts.main.token: required"),
    ],
)
def test_account_validation(extra: dict[str, str], expected: str) -> None:
    assert error_of(env={**MITTO, **extra}).startswith(expected)


def test_account_needs_kind_and_base_url() -> None:
    assert error_of(env={"SENDD_ACCOUNTS__X__API_KEY": "k"}) == "accounts.x.kind: required"


def test_account_name_must_be_simple(tmp_path: Path) -> None:
    path = write(tmp_path, '[accounts."Main Account"]\nkind = "mitto"\n')
    assert error_of(path, env={}).startswith("accounts.Main Account: account names must be")


def whatsapp(**extra: str) -> dict[str, str]:
    env = {
        "SENDD_ACCOUNTS__WA__KIND": "whatsapp",
        "SENDD_ACCOUNTS__WA__BASE_URL": "https://graph.facebook.com",
        "SENDD_ACCOUNTS__WA__TOKEN": SECRET,
        "SENDD_ACCOUNTS__WA__PHONE_NUMBER_ID": "1234",
    }
    return env | {f"SENDD_ACCOUNTS__WA__{k.upper()}": v for k, v in extra.items()}


def test_whatsapp_is_one_message_per_request() -> None:
    account = load_config(env=whatsapp()).accounts["wa"]
    assert (account.max_batch, account.api_version, account.token) == (1, "v21.0", SECRET)
    assert load_config(env=whatsapp(max_batch="1")).accounts["wa"].max_batch == 1
    assert error_of(env=whatsapp(max_batch="50")).startswith("accounts.wa.max_batch")
    assert error_of(env=whatsapp(phone_number_id="")).startswith("accounts.wa.phone_number_id")


# --- secrets ---------------------------------------------------------------------------------


def test_secrets_from_files(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text(f"  {SECRET}\n")
    url = tmp_path / "url"
    url.write_text(f"postgresql://app:{SECRET}@db:5432/sendd\n")
    text = (
        f'[database]\nurl_file = "{url}"\n'
        f'[accounts.main]\nkind = "mitto"\nbase_url = "https://m"\napi_key_file = "{key}"\n'
    )
    config = load_config(write(tmp_path, text), env={})
    assert config.accounts["main"].api_key == SECRET
    assert config.database.url == f"postgresql://app:{SECRET}@db:5432/sendd"


def test_secret_file_from_env(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(SECRET)
    env = whatsapp() | {"SENDD_ACCOUNTS__WA__APP_SECRET_FILE": str(token)}
    assert load_config(env=env).accounts["wa"].app_secret == SECRET


def test_unreadable_secret_file_names_key_and_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "gone.key")
    env = {k: v for k, v in MITTO.items() if not k.endswith("API_KEY")}
    message = error_of(env={**env, "SENDD_ACCOUNTS__MAIN__API_KEY_FILE": missing})
    assert "accounts.main.api_key_file" in message and missing in message
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    message = error_of(env={**env, "SENDD_ACCOUNTS__MAIN__API_KEY_FILE": str(empty)})
    assert "empty" in message


def test_secret_and_secret_file_both_given(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text(SECRET)
    text = (
        f'[accounts.main]\nkind = "mitto"\nbase_url = "https://m"\n'
        f'api_key = "{SECRET}"\napi_key_file = "{key}"\n'
    )
    message = error_of(write(tmp_path, text), env={})
    assert "accounts.main.api_key" in message and "api_key_file" in message
    assert SECRET not in message
    env = {**MITTO, "SENDD_ACCOUNTS__MAIN__API_KEY_FILE": str(key)}
    message = error_of(env=env)
    assert message.startswith("accounts.main.api_key")
    assert "SENDD_ACCOUNTS__MAIN__API_KEY_FILE" in message and SECRET not in message


def test_env_secret_replaces_the_files_secret_file(tmp_path: Path) -> None:
    text = '[accounts.main]\nkind = "mitto"\nbase_url = "https://m"\napi_key_file = "/none"\n'
    env = {"SENDD_ACCOUNTS__MAIN__API_KEY": SECRET}
    assert load_config(write(tmp_path, text), env=env).accounts["main"].api_key == SECRET


def full_secret_config() -> Config:
    env = {
        **MITTO,
        **whatsapp(app_secret=SECRET, verify_token=SECRET),
        "SENDD_DATABASE__URL": f"postgresql://app:{SECRET}@db/sendd?sslpassword={SECRET}",
        "SENDD_REDIS__URL": f"redis://:{SECRET}@cache:6379/0",
    }
    return load_config(env=env)


def test_masked_hides_every_secret() -> None:
    config = full_secret_config()
    view = masked(config)
    text = json.dumps(view)
    assert SECRET not in text
    assert view["database"]["url"] == "postgresql://app:***@db/sendd?sslpassword=***"
    assert view["redis"]["url"] == "redis://:***@cache:6379/0"
    assert view["accounts"]["main"]["api_key"] == "***"
    assert view["accounts"]["wa"]["token"] == "***"
    assert view["accounts"]["wa"]["verify_token"] == "***"
    assert view["accounts"]["main"]["token"] == ""  # unset stays visibly unset
    assert view["pipeline"]["senders"] == 8 and view["source"] == "built-in defaults"


def test_repr_hides_every_secret() -> None:
    config = full_secret_config()
    assert SECRET not in repr(config) and SECRET not in str(config)


@pytest.mark.parametrize(
    "url, expected",
    [
        ("postgresql:///sendd", "postgresql:///sendd"),
        ("postgresql://u:p@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u@h/db?password=p&x=1", "postgresql://u@h/db?password=***&x=1"),
        ("garbage-with-secret", "***"),
        ("", ""),
    ],
)
def test_mask_url(url: str, expected: str) -> None:
    assert mask_url(url) == expected


@pytest.mark.parametrize(
    "extra",
    [
        {"SENDD_DATABASE__URL": f"mysql://u:{SECRET}@h/db"},
        {"SENDD_ACCOUNTS__MAIN__API_KEY": f"{SECRET}\x07"},
        {"SENDD_ACCOUNTS__MAIN__KIND": "whatsapp", "SENDD_ACCOUNTS__MAIN__APP_SECRET": "x\n"},
    ],
)
def test_errors_never_contain_secrets(extra: dict[str, str]) -> None:
    message = error_of(env={**MITTO, **extra})
    assert SECRET not in message and "x\\n" not in message


def test_errors_are_one_line() -> None:
    assert str(ConfigError("a\nb\r\n  c")) == "a b c"
    message = error_of(env={"SENDD_DAEMON__INSTANCE_ID": "a\nb"})
    assert message.startswith("daemon.instance_id") and '"a\\nb"' in message
