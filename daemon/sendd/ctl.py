"""`sendd ctl`: the client of the control socket (sendd.control), on plain blocking sockets.

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
from typing import IO, Any

from sendd.config import Config
from sendd.errors import UserError

CONNECT_TIMEOUT = 5.0
REPLY_TIMEOUT = 30.0  # a campaign pause waits for the database, up to 10 s
WATCH_TIMEOUT = 10.0  # watch lines come every second
MAX_REPLY = 16 * 1024 * 1024


# --- talking to the daemon -----------------------------------------------------------------


@contextmanager
def connect(path: str) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CONNECT_TIMEOUT)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as error:
        sock.close()
        raise UserError(f"is sendd running? cannot connect to the control socket {path}: "
                        f"{error.strerror}") from None
    except PermissionError:
        sock.close()
        raise UserError(f"permission denied on the control socket {path}: run as root or as "
                        "the user sendd runs as") from None
    except OSError as error:
        sock.close()
        raise UserError(f"cannot connect to the control socket {path}: "
                        f"{error.strerror or error}") from None
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


def request(path: str, req: dict[str, Any]) -> dict[str, Any]:
    """One request, one reply; an error reply raises UserError with the daemon's text."""
    with connect(path) as sock:
        sock.settimeout(REPLY_TIMEOUT)
        send(sock, req)
        reply = read_reply(sock.makefile("rb"), path)
    if reply is None:
        raise UserError(f"sendd closed the control connection without answering ({path})")
    if not reply.get("ok"):
        raise UserError(f"ctl {req['cmd']}: {reply.get('error', 'failed')}")
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
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(status["outcomes"].items()))
    lines.append(f"outcomes:  {outcomes or 'none yet'}")
    for account, waiting in status.get("unserved_accounts", {}).items():
        lines.append(f"UNSERVED:  account {account}: {waiting} messages waiting, "
                     "and no running daemon is configured for it")
    for actor, reason in status.get("problems", {}).items():
        lines.append(f"PROBLEM:   {actor}: {reason}")
    return "\n".join(lines)


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
    return out


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
        target.add_argument("--campaign", type=int, metavar="ID")
        target.add_argument("--tenant", metavar="T")
        target.add_argument("--account", metavar="A")
        target.add_argument("--all", action="store_true")
        sub.set_defaults(cmd=name)
    sub = command(actions, common, "drain", "finish in-flight work and stop the daemon", _simple)
    sub.set_defaults(cmd="drain")
    sub = command(actions, common, "set-rate", "change an account's or tenant's limit live",
                  _set_rate)
    target = sub.add_mutually_exclusive_group(required=True)
    target.add_argument("--account", metavar="A")
    target.add_argument("--tenant", metavar="T")
    sub.add_argument("--msgs-per-s", type=int, required=True, metavar="N", help="0 = unlimited")
    sub.add_argument("--reqs-per-s", type=int, metavar="N", help="accounts only; 0 = unlimited")
    sub = command(actions, common, "reload", "re-read the configuration file", _simple)
    sub.set_defaults(cmd="reload")
    sub = command(actions, common, "watch", "live campaign progress until Ctrl-C", _watch)
    sub.add_argument("--json", action="store_true", help="print the daemon's JSON lines")
    for parser in actions.choices.values():
        parser.add_argument("--socket", metavar="PATH",
                            help="control socket (default: daemon.control_socket)")


def _path(args: argparse.Namespace, config: Config) -> str:
    return args.socket or config.daemon.control_socket


def _print_json(value: Any) -> None:
    print(json.dumps(value, default=str))


def _status(args: argparse.Namespace, config: Config) -> None:
    reply = request(_path(args, config), {"cmd": "status"})
    print(json.dumps(reply, default=str) if args.json else format_status(reply))


def _pause_resume(args: argparse.Namespace, config: Config) -> None:
    if args.all:
        scope, ident = "all", None
    elif args.campaign is not None:
        scope, ident = "campaign", args.campaign
    elif args.tenant is not None:
        scope, ident = "tenant", args.tenant
    else:
        scope, ident = "account", args.account
    _print_json(request(_path(args, config), {"cmd": args.cmd, "scope": scope, "id": ident}))


def _simple(args: argparse.Namespace, config: Config) -> None:
    _print_json(request(_path(args, config), {"cmd": args.cmd}))


def _set_rate(args: argparse.Namespace, config: Config) -> None:
    req: dict[str, Any] = {"cmd": "set-rate", "msgs_per_s": args.msgs_per_s}
    if args.tenant is not None:
        if args.reqs_per_s is not None:
            raise UserError("--reqs-per-s: applies to --account only")
        req["tenant"] = args.tenant
    else:
        req["account"] = args.account
        if args.reqs_per_s is not None:
            req["reqs_per_s"] = args.reqs_per_s
    _print_json(request(_path(args, config), req))


def _watch(args: argparse.Namespace, config: Config) -> int:
    path = _path(args, config)
    out = sys.stdout
    live = out.isatty() and not args.json
    shown = 0
    try:
        with connect(path) as sock:
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

