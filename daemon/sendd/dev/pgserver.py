"""Throwaway PostgreSQL and Redis servers on free local ports.

Used by the test fixtures and by `sendd demo`. Plain subprocess and socket code, no trio, so it
works from sync pytest fixtures and from a command before `trio.run` starts.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, Self

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
PG_USER = "sendd"
# PostgreSQL refuses to run as root, so as root the server tools run as this user.
SERVER_USER = "postgres"
COMMAND_TIMEOUT = 120.0
PORT_ATTEMPTS = 3  # free_port() can race with another process; retry on a fresh port
_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class ServerError(RuntimeError):
    """A private server could not be started, used or stopped; the message is one line."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (picked by the kernel)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path | None, lines: int = 5) -> str:
    """The last non-empty lines of a log, joined into one line."""
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return _one_line(text, lines)


def _one_line(text: str, lines: int) -> str:
    kept = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


def find_pg_bindir() -> Path:
    """The directory holding initdb and pg_ctl: the newest Debian install, else pg_config's."""
    found = [Path(p) for p in glob.glob(PG_BIN_GLOB) if (Path(p) / "initdb").is_file()]
    if found:
        # Numeric, so that 10 sorts above 9.
        return max(found, key=lambda p: [int(d) for d in re.findall(r"\d+", p.parent.name)])
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        bindir = Path(out.stdout.strip())
        if out.returncode == 0 and (bindir / "initdb").is_file():
            return bindir
    raise ServerError(
        "PostgreSQL server binaries not found: "
        "install the postgresql package (apt-get install postgresql)"
    )


def server_user() -> str | None:
    """Who must run the server tools: None for ourselves, else the postgres user (as root)."""
    if os.geteuid() != 0:
        return None
    if shutil.which("runuser") is None:
        raise ServerError("running as root needs runuser (util-linux) to start PostgreSQL")
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        _create_server_user()
    return SERVER_USER


def _create_server_user() -> None:
    try:
        subprocess.run(
            ["useradd", "--system", SERVER_USER], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ServerError(
            f"PostgreSQL cannot run as root and creating the {SERVER_USER!r} user failed: {exc}"
        ) from None


def run_tool(
    argv: list[str], *, what: str, user: str | None, cwd: Path, log: Path | None = None
) -> str:
    """Run one server tool to completion; any failure becomes a one-line ServerError."""
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    # PG* variables (PGDATA, PGPORT, PGSERVICE...) would silently redirect the tools.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    try:
        proc = subprocess.run(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise ServerError(f"{what} timed out: {log_tail(log)}") from None
    except OSError as exc:
        raise ServerError(f"{what} could not run: {exc}") from None
    if proc.returncode != 0:
        detail = " | ".join(filter(None, [_one_line(proc.stderr, 2), log_tail(log)]))
        raise ServerError(f"{what} failed (exit {proc.returncode}): {detail}")
    return proc.stdout


class PrivatePostgres:
    """A PostgreSQL server of our own in a temp dir, on a free port, removed by stop()."""

    def __init__(
        self,
        *,
        durable: bool = True,
        extra_settings: dict[str, str] | None = None,
        base_dir: str | Path | None = None,
    ) -> None:
        self.durable = durable
        self.extra_settings = dict(extra_settings or {})
        self.base_dir = Path(base_dir or tempfile.gettempdir())
        self.directory: Path | None = None
        self.port: int | None = None
        self._bindir = Path()
        self._user: str | None = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return self.url_for("sendd")

    def url_for(self, database: str) -> str:
        if self.port is None:
            raise ServerError("the private PostgreSQL server is not running")
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> Self:
        if self.directory is not None:
            raise ServerError("the private PostgreSQL server is already started")
        self._bindir = find_pg_bindir()
        self._user = server_user()
        self.directory = Path(tempfile.mkdtemp(prefix="sendd-pg-", dir=self.base_dir))
        atexit.register(self.stop)  # a safety net if the caller never reaches stop()
        try:
            self._hand_over_directory()
            self._initdb()
            self._start_on_free_port()
            self._psql(f"CREATE DATABASE {PG_USER}")
        except BaseException:
            self.stop()
            raise
        return self

    def postmaster_pid(self) -> int | None:
        """The server's main process (every other server process is its child); None when its
        pid file cannot be read (not started, or already stopped)."""
        if self.directory is None:
            return None
        try:
            return int((self._datadir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its directory; safe to call twice."""
        atexit.unregister(self.stop)
        if self.directory is None:
            return
        try:
            if (self._datadir / "postmaster.pid").exists():
                self._shut_down()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
            self.port = None

    def restart(self) -> None:
        """Restart on the same port and return once it accepts connections again."""
        self._pg_ctl("restart", "-m", "fast", "-l", str(self._logfile), "-o", self._options())

    def create_database(self, name: str) -> str:
        self._psql(f"CREATE DATABASE {_checked_name(name)}")
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        # FORCE ends sessions a test left open, which would otherwise block the drop.
        self._psql(f"DROP DATABASE IF EXISTS {_checked_name(name)} WITH (FORCE)")

    @property
    def _datadir(self) -> Path:
        assert self.directory is not None
        return self.directory / "data"

    @property
    def _logfile(self) -> Path:
        assert self.directory is not None
        return self.directory / "postgres.log"

    def _hand_over_directory(self) -> None:
        if self._user is None:
            return
        entry = pwd.getpwnam(self._user)
        os.chown(self.directory, entry.pw_uid, entry.pw_gid)
        # A base dir such as pytest's tmp_path (mode 0700, owned by root) is out of its reach.
        run_tool(
            ["test", "-w", str(self.directory)], user=self._user, cwd=self.directory,
            what=f"user {self._user!r} cannot write {self.directory} "
            "(choose a base_dir every user can traverse, such as /tmp)",
        )

    def _initdb(self) -> None:
        argv = [str(self._bindir / "initdb"), "-D", str(self._datadir), "-A", "trust",
                "-U", PG_USER, "-E", "UTF8", "--no-locale", "--no-instructions"]
        if not self.durable:
            argv.append("--no-sync")
        self._tool(argv, what="initdb")

    def _start_on_free_port(self) -> None:
        for attempt in range(PORT_ATTEMPTS):
            self.port = free_port()
            try:
                self._pg_ctl("start", "-l", str(self._logfile), "-o", self._options())
                return
            except ServerError as exc:
                if "already in use" not in str(exc) or attempt == PORT_ATTEMPTS - 1:
                    raise

    def _shut_down(self) -> None:
        try:
            self._pg_ctl("stop", "-m", "fast")
        except ServerError:
            self._pg_ctl("stop", "-m", "immediate")

    def _options(self) -> str:
        settings = {"listen_addresses": "127.0.0.1", "max_connections": "200"}
        if not self.durable:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        settings |= self.extra_settings
        argv = ["-p", str(self.port), "-k", str(self._datadir)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        return shlex.join(argv)  # pg_ctl hands -o to /bin/sh

    def _pg_ctl(self, action: str, *args: str) -> None:
        argv = [str(self._bindir / "pg_ctl"), action, "-w", "-t", "60",
                "-D", str(self._datadir), *args]
        self._tool(argv, what=f"pg_ctl {action}")

    def _psql(self, sql: str) -> None:
        argv = [str(self._bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER, "-d", "postgres",
                "-c", sql]
        self._tool(argv, what="psql")

    def _tool(self, argv: list[str], *, what: str) -> None:
        assert self.directory is not None
        run_tool(argv, what=what, user=self._user, cwd=self.directory, log=self._logfile)


def _checked_name(name: str) -> str:
    # Names are spliced into SQL, so only plain lower-case identifiers are allowed.
    if not _DB_NAME.match(name):
        raise ValueError(f"invalid database name {name!r}: use [a-z_][a-z0-9_]*, at most 63")
    return name


class PrivateRedis:
    """A redis-server of our own on a free port of 127.0.0.1, with no persistence."""

    def __init__(
        self, *, base_dir: str | Path | None = None, startup_timeout: float = 30.0
    ) -> None:
        self.base_dir = Path(base_dir or tempfile.gettempdir())
        self.startup_timeout = startup_timeout
        self.directory: Path | None = None
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self.port is None:
            raise ServerError("the private Redis server is not running")
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Self:
        if self.directory is not None:
            raise ServerError("the private Redis server is already started")
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServerError(
                "redis-server not found: install the redis-server package "
                "(apt-get install redis-server)"
            )
        self.directory = Path(tempfile.mkdtemp(prefix="sendd-redis-", dir=self.base_dir))
        atexit.register(self.stop)
        try:
            self._start_on_free_port(binary)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Terminate the server and remove its directory; safe to call twice."""
        atexit.unregister(self.stop)
        self._end_process()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
        self.directory = None
        self.port = None

    def stop_process(self) -> None:
        """Stop the server but keep its port, to start it again (empty) with start_process."""
        self._end_process()

    def start_process(self) -> None:
        """Start a stopped server again on the same port (it comes back empty)."""
        binary = shutil.which("redis-server")
        assert binary is not None and self.port is not None
        self._spawn(binary)
        self._wait_until_ready()

    @property
    def _logfile(self) -> Path:
        assert self.directory is not None
        return self.directory / "redis.log"

    def _start_on_free_port(self, binary: str) -> None:
        for attempt in range(PORT_ATTEMPTS):
            self.port = free_port()
            self._spawn(binary)
            try:
                self._wait_until_ready()
                return
            except ServerError as exc:
                self._end_process()
                if "already in use" not in str(exc) or attempt == PORT_ATTEMPTS - 1:
                    raise

    def _spawn(self, binary: str) -> None:
        assert self.directory is not None
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.directory),
                "--daemonize", "no", "--logfile", ""]
        self._log = self._logfile.open("wb")
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )

    def _wait_until_ready(self) -> None:
        assert self._proc is not None and self.port is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                raise ServerError(f"redis-server exited (code {code}): {log_tail(self._logfile)}")
            if _answers_ping(self.port):
                return
            time.sleep(0.05)
        raise ServerError(f"redis-server did not answer PING: {log_tail(self._logfile)}")

    def _end_process(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")  # the inline command form; no RESP framing needed
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False
