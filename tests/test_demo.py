"""`sendd demo` as a real process: it sends everything and leaves nothing running."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

from harness import env, wait_until

DEMO = [sys.executable, "-m", "sendd", "demo", "--messages"]


def _field(summary: str, label: str) -> str:
    match = re.search(rf"^\s+{label}\s+(.+)$", summary, re.MULTILINE)
    assert match, f"no {label!r} line in the summary:\n{summary}"
    return match.group(1)


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def _started(stderr: str) -> tuple[Path, list[int]]:
    """The demo's work dir and the pids of the postgres, fake provider and daemon it started."""
    workdir = re.search(r"work dir (\S+)", stderr)
    pids = re.findall(r"\(pid (\d+)\)", stderr)
    assert workdir and len(pids) == 3, f"the demo did not report what it started:\n{stderr}"
    return Path(workdir.group(1)), [int(pid) for pid in pids]


def _alive(pid: int) -> bool:
    """Running, that is: a zombie waiting for an init that reaps slowly has stopped."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def _assert_all_stopped(workdir: Path, pids: list[int]) -> None:
    # The work dir is in every command line it started (postgres -D, the daemon's --config).
    listing = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert str(workdir) not in listing
    assert [pid for pid in pids if _alive(pid)] == []
    assert not workdir.exists()


def test_demo_sends_everything_then_stops_everything() -> None:
    result = subprocess.run([*DEMO, "2000"], capture_output=True, text=True, env=env(),
                            timeout=300)
    assert result.returncode == 0, result.stderr
    summary = result.stdout
    assert _number(_field(summary, "sent")) == 2000
    assert _number(_field(summary, "failed")) == 0
    provider = _field(summary, "provider")
    assert re.search(r"accepted 2,000\b", provider)
    assert re.search(r"duplicate references 0\b", provider)
    assert re.search(r"[\d,]+ messages/s", _field(summary, "throughput"))
    _assert_all_stopped(*_started(result.stderr))


def test_sigint_stops_everything_and_exits_130() -> None:
    demo = subprocess.Popen([*DEMO, "20000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env())
    seen: list[str] = []
    try:
        # Interrupt once the daemon runs, when all three processes are up.
        wait_until(lambda: _read_until_daemon(demo, seen), 120, "the daemon to start")
        demo.send_signal(signal.SIGINT)
        _, rest = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    stderr = "".join(seen) + rest
    assert demo.returncode == 130, stderr
    assert "demo interrupted" in stderr
    _assert_all_stopped(*_started(stderr))


def _read_until_daemon(demo: subprocess.Popen[str], seen: list[str]) -> bool:
    assert demo.stderr is not None
    line = demo.stderr.readline()
    if not line:
        raise AssertionError(f"the demo exited {demo.wait()} early:\n{''.join(seen)}")
    seen.append(line)
    return "daemon started" in line
