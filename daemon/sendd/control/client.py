"""`sendd ctl`: the client of the control socket (sendd.control.server), on plain blocking sockets.

Replies are printed as the daemon sent them (one JSON object), except `status` without --json
and `watch`, which are for people. An error reply is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

from sendd.config import ConfigError, control_socket_of, load_config
from sendd.errors import UserError
from sendd.options import BIGINT_MAX, MAX_RATE, integer_between, short_name, text

CONNECT_TIMEOUT = 5.0
REPLY_TIMEOUT = 30.0  # a campaign pause waits for the database, up to 10 s
WATCH_TIMEOUT = 10.0  # watch lines come every second
MAX_REPLY = 16 * 1024 * 1024


# --- finding and talking to the daemon ------------------------------------------------------


@dataclass(frozen=True)
class Daemon:
    """Where the daemon listens; config_error says why the configuration was not used."""

    socket: str
    config_error: str | None = None


def find_daemon(args: argparse.Namespace) -> Daemon:
    """--socket, else daemon.control_socket. `sendd ctl` needs nothing else, so a configuration
    file that does not load (the moment an operator needs `status` and `reload` most) does not
    stop it: the socket is then read from what of the file can be read, or the default."""
    if args.socket is not None:
        return Daemon(args.socket)
    try:
        return Daemon(load_config(args.config).daemon.control_socket)
    except ConfigError as error:
        return Daemon(control_socket_of(args.config), str(error))


@contextmanager
def connect(daemon: Daemon) -> Iterator[socket.socket]:
    path = daemon.socket
    # Without the configuration, a wrong guess at the socket is likely: say why it was made.
    why = f" (the configuration was not used: {daemon.config_error})" \
        if daemon.config_error else ""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CONNECT_TIMEOUT)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as error:
        sock.close()
        raise UserError(f"is sendd running? cannot connect to the control socket {path}: "
                        f"{error.strerror}{why}") from None
    except PermissionError:
        sock.close()
        raise UserError(f"permission denied on the control socket {path}: run as root or as "
                        f"the user sendd runs as{why}") from None
    except OSError as error:
        sock.close()
        raise UserError(f"cannot connect to the control socket {path}: "
                        f"{error.strerror or error}{why}") from None
    with sock:
        yield sock


def send(sock: socket.socket, request: dict[str, Any]) -> None:
    sock.sendall(json.dumps(request).encode() + b"\n")


def read_reply(stream: IO[bytes], path: str) -> dict[str, Any] | None:
    """The next reply line as an object; None when the daemon closed the connection."""
    try:
        line = stream.readline(MAX_REPLY)
    except TimeoutError:
        raise UserError(f"sendd did not answer on {path} in time") from None
    except ConnectionResetError:
        return None
    if not line:
        return None
    try:
        return json.loads(line)
    except ValueError:
        raise UserError(f"unreadable reply from {path}: {line[:80]!r}") from None


def request(daemon: Daemon, req: dict[str, Any]) -> dict[str, Any]:
    """One request, one reply; an error reply raises UserError with the daemon's text."""
    with connect(daemon) as sock:
        sock.settimeout(REPLY_TIMEOUT)
        send(sock, req)
        reply = read_reply(sock.makefile("rb"), daemon.socket)
    if reply is None:
        raise UserError(f"sendd closed the control connection without answering "
                        f"({daemon.socket})")
    if not reply.get("ok"):
        # The daemon names the command of a malformed request itself: say it once.
        error = str(reply.get("error", "failed")).removeprefix(f"{req['cmd']}: ")
        raise UserError(f"ctl {req['cmd']}: {error}")
    return reply


# --- rendering -------------------------------------------------------------------------------


def format_status(status: dict[str, Any]) -> str:
    """`sendd ctl status` for people."""
    state = "DRAINING" if status["draining"] else "running"
    lines = [f"sendd {status['instance_id']} (pid {status['pid']}): {state}, "
             f"up {_duration(status['uptime_s'])}, config {status['config']}"]
    paused = status["paused"]
    parts = (["everything"] if paused["all"] else []) + \
        [f"tenant {t}" for t in paused["tenants"]] + [f"account {a}" for a in paused["accounts"]]
    lines.append(f"paused:    {', '.join(parts) if parts else 'nothing'}")
    actors = ", ".join(f"{name}" + (f" ({a['restarts']} restarts)" if a["restarts"] else "")
                       for name, a in status["actors"].items())
    lines.append(f"actors:    {actors}")
    channels = ", ".join(f"{name} {c['used']}/{c['capacity']}"
                         for name, c in status["channels"].items())
    lines.append(f"channels:  {channels}")
    lines.append(f"limits:    {_limits_text(status.get('redis'))}")
    lines.append("accounts:")
    for name, a in status["accounts"].items():
        rate = f"{_limit(a['msgs_per_s'])} msgs/s, {_limit(a['reqs_per_s'])} reqs/s"
        configured = (a["configured_msgs_per_s"], a["configured_reqs_per_s"])
        if configured != (a["msgs_per_s"], a["reqs_per_s"]):
            rate += f" (configured {_limit(configured[0])}, {_limit(configured[1])})"
        notes = ["PAUSED"] if a["paused"] else []
        notes += [f"SUSPENDED: {a['suspended']}"] if a["suspended"] else []
        breaker = a.get("breaker", {})
        if breaker.get("state", "closed") != "closed":
            notes.append(f"UNREACHABLE for {breaker['failing_for_s']}s, next probe in "
                         f"{breaker['next_probe_in_s']}s: {breaker['reason']}")
        lines.append(f"  {name}: {rate}, max batch {a['max_batch']}"
                     + "".join(f"; {n}" for n in notes))
    lines += format_waiting(status.get("waiting", []))
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(status["outcomes"].items()))
    lines.append(f"outcomes:  {outcomes or 'none yet'}")
    for account, waiting in status.get("unserved_accounts", {}).items():
        lines.append(f"UNSERVED:  account {account}: {waiting} messages waiting, "
                     "and no running daemon is configured for it")
    for actor, reason in status.get("problems", {}).items():
        lines.append(f"PROBLEM:   {actor}: {reason}")
    return "\n".join(lines)


def _limits_text(redis: dict[str, Any] | None) -> str:
    if redis is None:
        return "this daemon's own (no redis.url)"
    if redis["mode"] == "shared":
        return f"shared through Redis by the fleet (for {_duration(redis['for_s'])})"
    return (f"REDIS AWAY for {_duration(redis['for_s'])}: sending at 1/{redis['daemons']} of "
            "each limit (the live daemons' share) until it answers")


def format_waiting(waiting: list[dict[str, Any]]) -> list[str]:
    """What the claimed messages of each tenant and account wait for."""
    return [f"waiting:   tenant {w['tenant']} on account {w['account']}: {w['messages']} "
            f"messages, for {w['for']}" for w in waiting]


def format_progress(line: dict[str, Any]) -> list[str]:
    """One `watch` line for people: a line per campaign."""
    if not line.get("ok"):
        return [f"error: {line.get('error')}"]
    flags = (["DRAINING"] if line["draining"] else []) + \
        (["PAUSED ALL"] if line["paused"]["all"] else [])
    head = f"{line['at']}  {' '.join(flags)}".rstrip()
    if not line["campaigns"]:
        return [f"{head}  no campaign sending"]
    out = [head]
    for c in line["campaigns"]:
        done = 100 * c["processed"] / c["total"] if c["total"] else 100.0
        rate = "-" if c["msgs_per_s"] is None else f"{c['msgs_per_s']:g}"
        eta = "-" if c["eta_s"] is None else _duration(c["eta_s"])
        out.append(f"  campaign {c['id']} ({c['tenant']}) {c['status']}: sent {c['sent']}, "
                   f"failed {c['failed']}, {c['processed']}/{c['total']} ({done:.1f}%), "
                   f"{rate} msgs/s, ETA {eta}")
    return out + format_waiting(line.get("waiting", []))


def _limit(value: int) -> str:
    return "unlimited" if value == 0 else str(value)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


# --- the command line ----------------------------------------------------------------------

Command = Callable[..., argparse.ArgumentParser]


def add_commands(commands: Any, common: argparse.ArgumentParser, command: Command) -> None:
    """Register `sendd ctl ...`; `command(subparsers, common, name, help, handler)` adds one."""
    ctl = commands.add_parser("ctl", help="talk to a running daemon over its control socket")
    actions = ctl.add_subparsers(title="commands", metavar="COMMAND", required=True)
    sub = command(actions, common, "status", "the daemon's state", _status)
    sub.add_argument("--json", action="store_true", help="print the reply as one JSON object")
    for name, verb in (("pause", "stop claiming for"), ("resume", "resume")):
        sub = command(actions, common, name, f"{verb} a campaign, tenant, account or all",
                      _pause_resume)
        target = sub.add_mutually_exclusive_group(required=True)
        target.add_argument("--campaign", type=integer_between(1, BIGINT_MAX), metavar="ID")
        target.add_argument("--tenant", type=short_name(), metavar="T")
        target.add_argument("--account", type=short_name(), metavar="A")
        target.add_argument("--all", action="store_true")
        sub.set_defaults(cmd=name)
    sub = command(actions, common, "drain", "finish in-flight work and stop the daemon", _simple)
    sub.set_defaults(cmd="drain")
    sub = command(actions, common, "set-rate", "change an account's or tenant's limit live",
                  _set_rate)
    target = sub.add_mutually_exclusive_group(required=True)
    target.add_argument("--account", type=short_name(), metavar="A")
    target.add_argument("--tenant", type=short_name(), metavar="T")
    rate = integer_between(0, MAX_RATE)
    sub.add_argument("--msgs-per-s", type=rate, required=True, metavar="N", help="0 = unlimited")
    sub.add_argument("--reqs-per-s", type=rate, metavar="N", help="accounts only; 0 = unlimited")
    sub = command(actions, common, "reload", "re-read the configuration file", _simple)
    sub.set_defaults(cmd="reload")
    sub = command(actions, common, "watch", "live campaign progress until Ctrl-C", _watch)
    sub.add_argument("--json", action="store_true", help="print the daemon's JSON lines")
    for parser in actions.choices.values():
        parser.add_argument("--socket", metavar="PATH", type=text(),
                            help="control socket (default: daemon.control_socket, which is "
                                 "also read from a configuration that does not load)")
        parser.set_defaults(control=True)  # sendd.cli: call with find_daemon(), not a Config


def _print_json(value: Any) -> None:
    print(json.dumps(value, default=str))


def _status(args: argparse.Namespace, daemon: Daemon) -> None:
    reply = request(daemon, {"cmd": "status"})
    print(json.dumps(reply, default=str) if args.json else format_status(reply))


def _pause_resume(args: argparse.Namespace, daemon: Daemon) -> None:
    if args.all:
        scope, ident = "all", None
    elif args.campaign is not None:
        scope, ident = "campaign", args.campaign
    elif args.tenant is not None:
        scope, ident = "tenant", args.tenant
    else:
        scope, ident = "account", args.account
    _print_json(request(daemon, {"cmd": args.cmd, "scope": scope, "id": ident}))


def _simple(args: argparse.Namespace, daemon: Daemon) -> None:
    _print_json(request(daemon, {"cmd": args.cmd}))


def _set_rate(args: argparse.Namespace, daemon: Daemon) -> None:
    req: dict[str, Any] = {"cmd": "set-rate", "msgs_per_s": args.msgs_per_s}
    if args.tenant is not None:
        if args.reqs_per_s is not None:
            raise UserError("--reqs-per-s: applies to --account only")
        req["tenant"] = args.tenant
    else:
        req["account"] = args.account
        if args.reqs_per_s is not None:
            req["reqs_per_s"] = args.reqs_per_s
    _print_json(request(daemon, req))


def _watch(args: argparse.Namespace, daemon: Daemon) -> int:
    path = daemon.socket
    out = sys.stdout
    live = out.isatty() and not args.json
    shown = 0
    try:
        with connect(daemon) as sock:
            sock.settimeout(WATCH_TIMEOUT)
            send(sock, {"cmd": "watch"})
            stream = sock.makefile("rb")
            while (line := read_reply(stream, path)) is not None:
                if args.json:
                    out.write(json.dumps(line) + "\n")
                elif live:
                    shown = _redraw(out, format_progress(line), shown)
                else:
                    out.write("\n".join(format_progress(line)) + "\n")
                out.flush()
    except KeyboardInterrupt:
        return 0
    print("sendd: the daemon closed the connection (it stopped?)", file=sys.stderr)
    return 0


def _redraw(out: IO[str], lines: list[str], shown: int) -> int:
    """Replace the `shown` lines written last time with `lines`; returns how many there are."""
    if shown:
        out.write(f"\x1b[{shown}F\x1b[J")  # to the start of the first of them, clear below
    out.write("\n".join(lines) + "\n")
    return len(lines)

