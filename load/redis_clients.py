"""Two Redis clients for a trio program, measured side by side on this machine.

  (a) redis-py's asyncio client (`redis.asyncio`) under trio-asyncio, every call wrapped with
      `trio_asyncio.aio_as_trio` (the loop opened as sendd.db.connection.run opens it);
  (b) coredis, which runs on anyio and so natively under `trio.run` (no asyncio loop at all);
  plus, as a reference only, redis-py under plain `asyncio.run` (no trio, no bridge).

For each: 5,000 PINGs and 5,000 EVALSHAs of a rate-limit reservation script, one after the
other on one connection (p50/p99 latency, calls/s, CPU per call), then the same with 8 trio
tasks sharing the client (calls/s, CPU per call). CPU is this process's `time.process_time`,
the redis-server's own CPU is not in it.

    .venv/bin/pip install coredis   # not a dependency of sendd: only this comparison needs it
    python load/redis_clients.py [--runs 3] [--calls 5000] [--tasks 8]

Starts a private redis-server on a free port of 127.0.0.1 (no persistence) and stops it at the
end. Each measurement runs in a fresh child process (`--worker NAME --port N`), the clients in
alternating order from one round to the next; the table gives every run and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from importlib import metadata
from pathlib import Path
from typing import Any

RESERVE = """\
local now = redis.call('TIME'); local t = tonumber(now[1]) + tonumber(now[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', t - 1.05)
local n = redis.call('ZCARD', KEYS[1])
if n < tonumber(ARGV[1]) then redis.call('ZADD', KEYS[1], t, ARGV[2] .. ':' .. t) end
return n
"""
LIMIT = "1000000"
WORKERS = {
    "redis-py+trio-asyncio": "(a) redis.asyncio under trio-asyncio, aio_as_trio per call",
    "coredis+trio": "(b) coredis natively under trio.run (anyio)",
    "redis-py+asyncio": "reference: redis.asyncio under plain asyncio.run (no trio)",
}

Call = Callable[[int], Awaitable[Any]]
RunConcurrently = Callable[[Callable[[int], Awaitable[None]], int], Awaitable[None]]


# ----------------------------------------------------------------------------------------------
# The measurement, shared by every client: `ping(i)`, `reserve(i)` and `connections()` are the
# client's, `concurrently(task, n)` is the event loop's (a trio nursery or asyncio.gather).


async def sequential(call: Call, calls: int, warmup: int) -> dict[str, float]:
    for i in range(warmup):
        await call(i)
    latencies = [0] * calls
    clock = time.perf_counter_ns
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i in range(calls):
        start = clock()
        await call(i)
        latencies[i] = clock() - start
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    latencies.sort()
    return {
        "p50_us": latencies[calls // 2] / 1e3,
        "p99_us": latencies[min(calls - 1, int(calls * 0.99))] / 1e3,
        "calls_per_s": calls / wall,
        "cpu_us_per_call": cpu / calls * 1e6,
    }


async def concurrent(
    call: Call, concurrently: RunConcurrently, tasks: int, per_task: int, warmup: int
) -> dict[str, float]:
    async def task(k: int, count: int) -> None:
        base = k * count
        for i in range(count):
            await call(base + i)

    # Warm-up round: lets a pool open the connections it wants for `tasks` callers.
    await concurrently(lambda k: task(k, max(1, warmup // tasks)), tasks)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await concurrently(lambda k: task(k, per_task), tasks)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    calls = tasks * per_task
    return {"calls_per_s": calls / wall, "cpu_us_per_call": cpu / calls * 1e6}


async def measure(
    ping: Call,
    reserve: Call,
    connections: Callable[[], Awaitable[int]],
    concurrently: RunConcurrently,
    args: argparse.Namespace,
) -> dict[str, Any]:
    first = await reserve(0)
    if not isinstance(first, int):
        raise RuntimeError(f"the script returned {first!r}, not an integer")
    result: dict[str, Any] = {}
    result["ping"] = await sequential(ping, args.calls, args.warmup)
    result["evalsha"] = await sequential(reserve, args.calls, args.warmup)
    result["sequential_connections"] = await connections()
    per_task = args.calls // args.tasks
    result["ping_concurrent"] = await concurrent(
        ping, concurrently, args.tasks, per_task, args.warmup
    )
    result["evalsha_concurrent"] = await concurrent(
        reserve, concurrently, args.tasks, per_task, args.warmup
    )
    result["concurrent_connections"] = await connections()
    return result


def keys_for(name: str) -> list[str]:
    tag = f"bench:{name}:{os.getpid()}"
    return [f"{tag}:window", f"{tag}:b", f"{tag}:c"]


def connected_clients(info: dict[Any, Any]) -> int:
    for key, value in info.items():
        if (key.decode() if isinstance(key, bytes) else key) == "connected_clients":
            return int(value)
    raise RuntimeError(f"no connected_clients in INFO: {info!r}")


# ----------------------------------------------------------------------------------------------
# The clients.


async def redis_py_calls(client: Any, keys: list[str], wrap: Callable[[Any], Any]) -> tuple:
    """(ping, reserve, connections, sha) for a redis.asyncio client, each call through `wrap`."""
    ping_ = wrap(client.ping)
    evalsha = wrap(client.evalsha)
    info = wrap(client.info)
    sha = await wrap(client.script_load)(RESERVE)

    def ping(i: int) -> Awaitable[Any]:
        return ping_()

    def reserve(i: int) -> Awaitable[Any]:
        return evalsha(sha, len(keys), *keys, LIMIT, str(i))

    async def connections() -> int:
        return connected_clients(await info("clients"))

    return ping, reserve, connections


async def trio_concurrently(task: Callable[[int], Awaitable[None]], n: int) -> None:
    import trio

    async with trio.open_nursery() as nursery:
        for k in range(n):
            nursery.start_soon(task, k)


async def asyncio_concurrently(task: Callable[[int], Awaitable[None]], n: int) -> None:
    import asyncio

    await asyncio.gather(*(task(k) for k in range(n)))


def run_redis_py_trio_asyncio(args: argparse.Namespace) -> dict[str, Any]:
    import redis.asyncio
    import trio
    import trio_asyncio

    aio = trio_asyncio.aio_as_trio

    async def main() -> dict[str, Any]:
        # The same bridge as sendd.db.connection.run: trio.run, then trio_asyncio.open_loop().
        async with trio_asyncio.open_loop():
            client = redis.asyncio.Redis(host="127.0.0.1", port=args.port)
            keys = keys_for("redis-py-trio")
            try:
                ping, reserve, connections = await redis_py_calls(client, keys, aio)
                return await measure(ping, reserve, connections, trio_concurrently, args)
            finally:
                await aio(client.delete)(*keys)
                await aio(client.aclose)()

    return trio.run(main)


def run_redis_py_asyncio(args: argparse.Namespace) -> dict[str, Any]:
    import asyncio

    import redis.asyncio

    async def main() -> dict[str, Any]:
        client = redis.asyncio.Redis(host="127.0.0.1", port=args.port)
        keys = keys_for("redis-py-asyncio")
        try:
            ping, reserve, connections = await redis_py_calls(client, keys, lambda f: f)
            return await measure(ping, reserve, connections, asyncio_concurrently, args)
        finally:
            await client.delete(*keys)
            await client.aclose()

    return asyncio.run(main())


def run_coredis_trio(args: argparse.Namespace) -> dict[str, Any]:
    import coredis
    import trio

    async def main() -> dict[str, Any]:
        # No asyncio loop anywhere: coredis finds trio through anyio.
        async with coredis.Redis(host="127.0.0.1", port=args.port) as client:
            keys = keys_for("coredis-trio")
            sha = await client.script_load(RESERVE)

            def ping(i: int) -> Awaitable[Any]:
                return client.ping()

            def reserve(i: int) -> Awaitable[Any]:
                return client.evalsha(sha, keys=keys, args=[LIMIT, str(i)])

            async def connections() -> int:
                return connected_clients(await client.info("clients"))

            try:
                return await measure(ping, reserve, connections, trio_concurrently, args)
            finally:
                await client.delete(keys)

    return trio.run(main)


RUNNERS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "redis-py+trio-asyncio": run_redis_py_trio_asyncio,
    "coredis+trio": run_coredis_trio,
    "redis-py+asyncio": run_redis_py_asyncio,
}


def worker(args: argparse.Namespace) -> None:
    try:
        result = {"ok": True, **RUNNERS[args.worker](args)}
    except BaseException as error:  # noqa: B036 - report whatever went wrong, groups included
        result = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        if isinstance(error, BaseExceptionGroup):
            leaves = error
            while isinstance(leaves, BaseExceptionGroup) and len(leaves.exceptions) == 1:
                leaves = leaves.exceptions[0]
            result["error"] = f"{type(leaves).__name__}: {leaves}"
    print(json.dumps(result))


# ----------------------------------------------------------------------------------------------
# The harness: a private redis-server, the rounds, the table.


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def raw_command(port: int, *words: str) -> bytes:
    request = f"*{len(words)}\r\n".encode() + b"".join(
        f"${len(w.encode())}\r\n{w}\r\n".encode() for w in words
    )
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(request)
        data = b""
        while not complete(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def complete(reply: bytes) -> bool:
    """Whether `reply` holds a whole simple reply or bulk string."""
    head, sep, rest = reply.partition(b"\r\n")
    if not sep:
        return False
    if head.startswith(b"$") and int(head[1:]) >= 0:
        return len(rest) >= int(head[1:]) + 2
    return True


class RedisServer:
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            sys.exit("redis-server not found (apt-get install redis-server)")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--dir", "/tmp", "--logfile", ""],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"redis-server exited with code {self.proc.returncode}")
            try:
                if raw_command(self.port, "PING").startswith(b"+PONG"):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        sys.exit("redis-server did not answer PING")

    def version(self) -> str:
        for line in raw_command(self.port, "INFO", "server").decode().splitlines():
            if line.startswith("redis_version:"):
                return line.split(":", 1)[1]
        return "?"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def versions(server: RedisServer) -> dict[str, str]:
    found = {"python": platform.python_version(), "redis-server": server.version()}
    for name in ("redis", "coredis", "trio", "trio-asyncio", "anyio", "hiredis"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def machine() -> str:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} CPUs (nproc), {model}"


def run_worker(name: str, port: int, args: argparse.Namespace) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--worker", name, "--port", str(port),
            "--calls", str(args.calls), "--tasks", str(args.tasks), "--warmup", str(args.warmup)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"ok": False, "error": f"worker exited {done.returncode}: {done.stderr[-2000:]}"}
    return json.loads(lines[-1])


COLUMNS = [
    ("PING p50 µs", "ping", "p50_us", "{:.0f}"),
    ("PING p99 µs", "ping", "p99_us", "{:.0f}"),
    ("PING calls/s", "ping", "calls_per_s", "{:,.0f}"),
    ("PING CPU µs/call", "ping", "cpu_us_per_call", "{:.0f}"),
    ("EVALSHA p50 µs", "evalsha", "p50_us", "{:.0f}"),
    ("EVALSHA p99 µs", "evalsha", "p99_us", "{:.0f}"),
    ("EVALSHA calls/s", "evalsha", "calls_per_s", "{:,.0f}"),
    ("EVALSHA CPU µs/call", "evalsha", "cpu_us_per_call", "{:.0f}"),
    ("8 tasks PING calls/s", "ping_concurrent", "calls_per_s", "{:,.0f}"),
    ("8 tasks PING CPU µs/call", "ping_concurrent", "cpu_us_per_call", "{:.0f}"),
    ("8 tasks EVALSHA calls/s", "evalsha_concurrent", "calls_per_s", "{:,.0f}"),
    ("8 tasks EVALSHA CPU µs/call", "evalsha_concurrent", "cpu_us_per_call", "{:.0f}"),
]


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    """Medians over the runs, the clients as columns, each cell `median (min–max)`."""
    names = [n for n in results if all(r.get("ok") for r in results[n])]
    out = ["| measure | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, group, field, fmt in COLUMNS:
        cells = []
        for name in names:
            values = [r[group][field] for r in results[name]]
            cell = fmt.format(statistics.median(values))
            if len(values) > 1:
                cell += f" ({fmt.format(min(values))}–{fmt.format(max(values))})"
            cells.append(cell)
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    for label, field in (("connections, sequential", "sequential_connections"),
                         ("connections, 8 tasks", "concurrent_connections")):
        cells = [",".join(sorted({str(r[field]) for r in results[n]})) for n in names]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="rounds, clients alternating")
    parser.add_argument("--calls", type=int, default=5000, help="calls per measurement")
    parser.add_argument("--tasks", type=int, default=8, help="concurrent trio tasks")
    parser.add_argument("--warmup", type=int, default=500, help="calls before each measurement")
    parser.add_argument("--clients", default=",".join(WORKERS), help="comma-separated names")
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    parser.add_argument("--worker", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    names = [n.strip() for n in args.clients.split(",") if n.strip()]
    for name in names:
        if name not in RUNNERS:
            parser.error(f"unknown client {name!r}: choose from {', '.join(RUNNERS)}")
    server = RedisServer()
    try:
        print(f"redis-server on 127.0.0.1:{server.port}; {machine()}", file=sys.stderr)
        print(f"load average at start: {os.getloadavg()}", file=sys.stderr)
        found = versions(server)
        results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for round_ in range(args.runs):
            order = names if round_ % 2 == 0 else names[::-1]
            for name in order:
                result = run_worker(name, server.port, args)
                results[name].append(result)
                if result.get("ok"):
                    summary = (f"PING p50 {result['ping']['p50_us']:.0f} µs, "
                               f"EVALSHA {result['evalsha']['calls_per_s']:,.0f}/s, "
                               f"CPU {result['evalsha']['cpu_us_per_call']:.0f} µs/call")
                else:
                    summary = f"FAILED: {result['error']}"
                print(f"round {round_ + 1} {name}: {summary}", file=sys.stderr)
        print(f"load average at end: {os.getloadavg()}", file=sys.stderr)
    finally:
        server.stop()

    print(f"machine: {machine()}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in found.items()))
    print(f"command: python load/redis_clients.py --runs {args.runs} --calls {args.calls} "
          f"--tasks {args.tasks} --warmup {args.warmup}")
    print()
    for name in names:
        print(f"- {name}: {WORKERS[name]}")
        for result in results[name]:
            if not result.get("ok"):
                print(f"  - FAILED: {result['error']}")
    print()
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"versions": found, "machine": machine(),
                                         "results": results}, indent=1))


if __name__ == "__main__":
    main()
