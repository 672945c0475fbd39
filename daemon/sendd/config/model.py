"""The configuration's dataclasses, a section each and one per account: every field says its
default and its rule (sendd.config.rules)."""

from dataclasses import dataclass

from sendd.config.rules import (
    BASE_URL,
    LISTEN,
    PG_URL,
    REDIS_URL,
    SECRET_TEXT,
    SOCKET,
    choice,
    ints,
    nums,
    pattern,
    positive,
    setting,
)

DEFAULT_DATABASE_URL = "postgresql:///sendd"
DEFAULT_CONTROL_SOCKET = "/run/sendd/control.sock"


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = setting(rule=PG_URL, secret="url")
    pool_size: int = setting(4, ints(1, 1000))
    connect_timeout: float = setting(10.0, positive(300))


@dataclass(frozen=True)
class DaemonConfig:
    instance_id: str = setting(  # empty: derived at start from hostname + pid
        "", pattern(r"[A-Za-z0-9_.:@-]{0,64}", "up to 64 of the characters A-Z a-z 0-9 _.:@-")
    )
    control_socket: str = setting(DEFAULT_CONTROL_SOCKET, SOCKET)
    http_listen: str = setting("127.0.0.1:9464", LISTEN)
    stop_timeout: float = setting(30.0, positive(3600))
    stall_seconds: float = setting(60.0, positive(3600))  # an actor busy this long is wedged
    log_level: str = setting("info", choice("debug", "info", "warning", "error"))
    log_format: str = setting("json", choice("json", "console"))


@dataclass(frozen=True)
class PipelineConfig:
    claim_chunk: int = setting(1000, ints(1, 100_000))
    poll_interval: float = setting(0.5, positive(60))
    claim_capacity: int = setting(4, ints(1, 100_000))  # chunks, poller -> batcher
    batch_capacity: int = setting(8, ints(1, 100_000))  # batches, batcher -> senders
    result_capacity: int = setting(64, ints(1, 100_000))  # batch results, senders -> writer
    linger_ms: int = setting(20, ints(0, 10_000))
    senders: int = setting(8, ints(1, 256))
    writer_flush_ms: int = setting(20, ints(0, 10_000))
    writer_max_results: int = setting(5000, ints(1, 1_000_000))
    lease_seconds: float = setting(30.0, nums(1, 3600))
    settle_seconds: float = setting(60.0, positive(86_400))  # lookups before a message is unknown


@dataclass(frozen=True)
class RetryConfig:
    max_attempts: int = setting(5, ints(1, 100))
    base_delay: float = setting(3.0, positive(86_400))
    max_delay: float = setting(600.0, positive(86_400))
    jitter: float = setting(0.2, nums(0, 1))
    # A provider that cannot be reached is probed with backoff up to this many seconds apart.
    probe_cap: float = setting(60.0, positive(3600))
    # An account unreachable this long pauses the campaigns waiting for it (with the reason).
    provider_down_pause: float = setting(3600.0, positive(30 * 86_400))


@dataclass(frozen=True)
class RedisConfig:
    url: str = setting("", REDIS_URL, secret="url")  # empty: in-process rate governor only


@dataclass(frozen=True)
class AccountConfig:
    name: str
    kind: str = setting(rule=choice("mitto", "whatsapp"))
    base_url: str = setting(rule=BASE_URL, url=True)
    api_key: str = setting("", SECRET_TEXT, secret="value")  # mitto
    token: str = setting("", SECRET_TEXT, secret="value")  # whatsapp
    phone_number_id: str = setting("", pattern(r"[A-Za-z0-9_-]*", "letters, digits, _ or -"))
    api_version: str = setting("v21.0", pattern(r"v\d+(\.\d+)?", 'a version like "v21.0"'))
    app_secret: str = setting("", SECRET_TEXT, secret="value")
    verify_token: str = setting("", SECRET_TEXT, secret="value")
    max_batch: int = setting(1000, ints(1, 1000))  # forced to 1 for whatsapp
    msgs_per_s: int = setting(0, ints(0, 1_000_000))  # 0: unlimited
    reqs_per_s: int = setting(0, ints(0, 1_000_000))  # 0: unlimited
    timeout: float = setting(10.0, positive(600))
    # Requests on the wire at once; 0: all the senders when it is the only account, else half.
    max_in_flight: int = setting(0, ints(0, 256))
    single: bool = False  # use the one-message endpoint
    idempotent_references: bool = False


@dataclass(frozen=True)
class Config:
    database: DatabaseConfig
    daemon: DaemonConfig
    pipeline: PipelineConfig
    retry: RetryConfig
    redis: RedisConfig
    accounts: dict[str, AccountConfig]
    source: str  # the file it came from, or "built-in defaults"


SECTIONS: dict[str, type] = {
    "database": DatabaseConfig,
    "daemon": DaemonConfig,
    "pipeline": PipelineConfig,
    "retry": RetryConfig,
    "redis": RedisConfig,
}
# The contract's own example is SENDD_PIPELINE__BATCH_SIZE; it names the claim chunk.
ALIASES: dict[type, dict[str, str]] = {PipelineConfig: {"batch_size": "claim_chunk"}}
