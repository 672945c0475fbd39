"""The `sendd` command line. Machine-readable output is one JSON object on stdout; every
error is one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import asyncpg

from sendd.commands import campaigns, tenants
from sendd.config import Config, ConfigError, load_config, masked
from sendd.db import connection as db
from sendd.db import migrate
from sendd.errors import UserError, describe
from sendd.options import BIGINT_MAX, MAX_RATE, MAX_WEIGHT, integer_between, short_name, text

EXIT_USER_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        if getattr(args, "control", False):  # sendd ctl: needs the socket, not the config
            from sendd.control import client as ctl

            return args.handler(args, ctl.find_daemon(args)) or 0
        config = load_config(args.config, database_url=args.database_url)
        return args.handler(args, config) or 0
    except (UserError, ConfigError) as error:
        _print_error(str(error))
        return EXIT_USER_ERROR
    except asyncpg.PostgresError as error:
        _print_error(f"database error: {describe(error)}")
        return 1
    except KeyboardInterrupt:
        print("sendd: interrupted", file=sys.stderr)
        return 130


def _print_error(message: str) -> None:
    # One line, whatever the text holds: a daemon's reply or a driver's message may not be.
    print(f"sendd: {' '.join(message.split())}", file=sys.stderr)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line too (the usage is one --help away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR,
                  f"{self.prog}: {' '.join(message.split())} (see {self.prog} --help)\n")


def _common_options(default: Any) -> argparse.ArgumentParser:
    """--config and --database-url, accepted before or after the command."""
    common = OneLineParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=default,
                        help="configuration file (default: $SENDD_CONFIG, else "
                             "/etc/sendd/sendd.toml, else built-in defaults)")
    common.add_argument("--database-url", metavar="URL", default=default,
                        help="PostgreSQL URL; overrides database.url")
    return common


def build_parser() -> argparse.ArgumentParser:
    # In subcommands the options default to "absent", so they never undo a value given
    # before the command.
    common = _common_options(argparse.SUPPRESS)
    parser = OneLineParser(
        prog="sendd", parents=[_common_options(None)],
        description="Bulk message send daemon: queued messages in PostgreSQL, sent to providers "
                    "as fast as they allow, every outcome written back.",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_migrate(commands, common)
    _add_tenant(commands, common)
    _add_enqueue(commands, common)
    _add_campaign(commands, common)
    _add_run(commands, common)
    _add_config(commands, common)
    _add_demo(commands, common)
    _add_ctl(commands, common)
    return parser


Handler = Callable[[argparse.Namespace, Config], int | None]


def _command(commands: Any, common: argparse.ArgumentParser, name: str, help_text: str,
             handler: Handler) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, parents=[common], help=help_text, description=help_text)
    sub.set_defaults(handler=handler)
    return sub


def print_json(value: Any) -> None:
    print(json.dumps(value, default=str))


def with_connection(config: Config, work: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run `work(conn)` on one database connection."""

    async def main() -> Any:
        async with db.connect(config.database.url, config.database.connect_timeout) as conn:
            return await work(conn)

    return db.run(main)


# --- migrate ------------------------------------------------------------------------------

def _add_migrate(commands: Any, common: argparse.ArgumentParser) -> None:
    _command(commands, common, "migrate",
             "create or upgrade the sendd schema (safe to run twice and while daemons run)",
             _migrate)


def _migrate(args: argparse.Namespace, config: Config) -> None:
    applied = with_connection(config, migrate.migrate)
    print_json({"applied": applied, "version": migrate.available_migrations()[-1][0]})


# --- tenant -------------------------------------------------------------------------------

def _add_tenant(commands: Any, common: argparse.ArgumentParser) -> None:
    tenant = commands.add_parser("tenant", help="create or change tenants")
    actions = tenant.add_subparsers(title="actions", metavar="ACTION", required=True)
    sub = _command(actions, common, "set", "create or change a tenant", _tenant_set)
    sub.add_argument("tenant", metavar="TENANT")
    sub.add_argument("--credits", type=integer_between(0, BIGINT_MAX),
                     help="set the credit balance (SMS segments)")
    sub.add_argument("--add-credits", type=integer_between(-BIGINT_MAX, BIGINT_MAX),
                     help="add to (or, negative, take from) credits")
    sub.add_argument("--rate", type=integer_between(0, MAX_RATE), metavar="MSGS_PER_S",
                     help="the tenant's message rate limit (0 = unlimited)")
    sub.add_argument("--weight", type=integer_between(1, MAX_WEIGHT), metavar="N",
                     help="the tenant's share of the throughput beside other busy tenants "
                          f"(1 to {MAX_WEIGHT}; new tenants weigh 1)")
    sub.add_argument("--active", dest="active", action="store_true", default=None,
                     help="let the tenant's messages be sent")
    sub.add_argument("--inactive", dest="active", action="store_false",
                     help="hold the tenant's messages")


def _tenant_set(args: argparse.Namespace, config: Config) -> None:
    row = with_connection(config, lambda conn: tenants.set_tenant(
        conn, args.tenant, credits=args.credits, add_credits=args.add_credits,
        rate=args.rate, weight=args.weight, active=args.active))
    print_json(row)


# --- enqueue ------------------------------------------------------------------------------

def _add_enqueue(commands: Any, common: argparse.ArgumentParser) -> None:
    sub = _command(commands, common, "enqueue",
                   "queue a campaign (or transactional messages) from a recipients file",
                   _enqueue)
    sub.add_argument("--tenant", required=True, type=short_name())
    sub.add_argument("--text", required=True, type=text(),
                     help="message text; {column} placeholders are filled from a CSV file")
    sub.add_argument("--sender", default="sendd", type=text(printable=True),
                     help="sender id shown to recipients")
    sub.add_argument("--account", type=short_name(),
                     help="traffic account (default: the only configured one)")
    sub.add_argument("--name", type=text(empty=True), help="campaign name")
    when = sub.add_mutually_exclusive_group()
    when.add_argument("--at", metavar="ISO8601",
                      help="schedule the campaign for this time, with its UTC offset "
                           "(e.g. 2026-12-01T09:00:00+02:00); a time in the past is refused")
    when.add_argument("--now", action="store_true",
                      help="send at once (the default when --at is not given)")
    sub.add_argument("--transactional", action="store_true",
                     help="standalone high-priority messages instead of a campaign")
    sub.add_argument("--recipients", required=True, metavar="FILE|-",
                     help="E.164 numbers one a line, or a CSV with a 'phone' column")


def _enqueue(args: argparse.Namespace, config: Config) -> None:
    from sendd.commands.enqueue import (
        EnqueueRequest,
        enqueue,
        open_recipients,
        parse_at,
        progress_stream,
    )

    account = _pick_account(config, args.account)
    at = None if args.at is None else parse_at(args.at)  # --at "" is an error, not "now"
    if args.transactional and (at or args.name is not None):
        raise UserError("--transactional messages have no campaign: drop --at and --name")
    with open_recipients(args.recipients) as stream:
        request = EnqueueRequest(
            tenant=args.tenant, text=args.text, account=account, sender=args.sender,
            recipients=stream, source_name=args.recipients, name=args.name, at=at,
            transactional=args.transactional,
        )
        progress = progress_stream()
        result = with_connection(config, lambda conn: enqueue(conn, request, progress))
        if progress is not None:
            progress.write("\n")
    print_json(result.as_dict())


def _pick_account(config: Config, requested: str | None) -> str:
    if requested is not None:
        if config.accounts and requested not in config.accounts:
            raise UserError(f"--account: unknown account {requested!r} (configured: "
                            f"{', '.join(sorted(config.accounts))})")
        return requested
    if len(config.accounts) == 1:
        return next(iter(config.accounts))
    if not config.accounts:
        raise UserError("--account: no [accounts.NAME] in the configuration; name the account")
    raise UserError(f"--account: several accounts configured ({', '.join(sorted(config.accounts))})"
                    "; choose one")


# --- campaign -----------------------------------------------------------------------------

def _add_campaign(commands: Any, common: argparse.ArgumentParser) -> None:
    campaign = commands.add_parser("campaign",
                                   help="show, start, pause, resume or cancel a campaign")
    actions = campaign.add_subparsers(title="actions", metavar="ACTION", required=True)
    for name, help_text in (
        ("show", "print the campaign's status and counters"),
        ("start", "send a loaded (draft) campaign: now, or at its scheduled time"),
        ("pause", "stop sending the campaign (in-flight messages finish)"),
        ("resume", "resume a paused campaign"),
        ("cancel", "cancel the campaign and every message not yet sent"),
    ):
        sub = _command(actions, common, name, help_text, _campaign)
        sub.add_argument("campaign_id", metavar="ID", type=integer_between(1, BIGINT_MAX))
        sub.set_defaults(action=getattr(campaigns, name))


def _campaign(args: argparse.Namespace, config: Config) -> None:
    print_json(with_connection(config, lambda conn: args.action(conn, args.campaign_id)))


# --- run, config, demo --------------------------------------------------------------------

def _add_run(commands: Any, common: argparse.ArgumentParser) -> None:
    _command(commands, common, "run", "run the daemon in the foreground (systemd runs this)",
             _run)


def _run(args: argparse.Namespace, config: Config) -> int:
    from sendd import logs
    from sendd.daemon import run_daemon, tune_gc

    logs.configure(config.daemon.log_level, config.daemon.log_format)
    tune_gc()
    return db.run(lambda: run_daemon(config))


def _add_config(commands: Any, common: argparse.ArgumentParser) -> None:
    config = commands.add_parser("config", help="configuration tools")
    actions = config.add_subparsers(title="actions", metavar="ACTION", required=True)
    _command(actions, common, "check",
             "validate the configuration and print the effective one, secrets masked",
             lambda args, config: print_json(masked(config)))


def _add_ctl(commands: Any, common: argparse.ArgumentParser) -> None:
    from sendd.control import client as ctl

    ctl.add_commands(commands, common, _command)


def _add_demo(commands: Any, common: argparse.ArgumentParser) -> None:
    sub = _command(commands, common, "demo",
                   "send a campaign through a private PostgreSQL and the built-in fake "
                   "provider, then stop everything", _demo)
    sub.add_argument("--messages", type=integer_between(1, 100_000_000), default=100_000,
                     help="campaign size")


def _demo(args: argparse.Namespace, config: Config) -> int:
    from sendd.dev.demo import run_demo

    return run_demo(args.messages)
